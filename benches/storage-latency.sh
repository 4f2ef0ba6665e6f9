#!/usr/bin/env bash
# Does the hot path notice storage? (issue 4). The same `loadgen chat` run
# against three freshly started gateways, one after the other in one run:
#   memory      the embedded store (the default);
#   redis       a healthy private redis-server (appendonly, fsync every s);
#   redis-slow  the same Redis made slow: a background loop sends
#               `DEBUG SLEEP <--stall-s>` every second, so Redis answers
#               nothing for that long, over and over. Under the gateway's
#               --redis-timeout-ms (1000) the worker just waits: acks are
#               late, deliveries are not.
#   redis-down  the same, with stalls longer than --redis-timeout-ms: the
#               breaker opens, messages go to the spill file and are
#               replayed, and acks come from the spill file.
# Publish -> delivery latency (from each publish's intended send time) and
# publish -> ack latency are reported side by side; the first is the hot
# path, the second waits for the store by design.
#
# Then the storage worker alone: messages/s persisted to Redis at several
# batch sizes (target/release/storage-throughput).
#
# The gateway (--shards 1 --cpus 0) and redis-server share CPU 0; loadgen
# runs on CPU 1. Output: a markdown table on stdout, and
# benches/results/storage-latency-<utc>.{jsonl,md}. Loopback only; bounded
# by 4 x (--duration-s + a few s) plus the throughput runs.
#
# Usage: benches/storage-latency.sh [--rate N] [--duration-s N] [--stall-s S]
#        [--down-stall-s S] [--messages N]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rate=2000
duration=10
stall=0.2
down_stall=1.5
messages=200000
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rate) rate="$2"; shift ;;
    --duration-s) duration="$2"; shift ;;
    --stall-s) stall="$2"; shift ;;
    --down-stall-s) down_stall="$2"; shift ;;
    --messages) messages="$2"; shift ;;
    -h|--help) sed -n '2,27{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "storage-latency.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$repo"
scripts/deps.sh
cargo build --release -p corecast-gateway -p corecast-loadgen -p corecast-benches --bin gateway --bin loadgen --bin storage-throughput
# shellcheck source=conformance/lib.sh
source conformance/lib.sh

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p benches/results
jsonl="benches/results/storage-latency-$stamp.jsonl"
md="benches/results/storage-latency-$stamp.md"
work="$(mktemp -d)"
stall_pid=""
# Called by conformance/lib.sh's EXIT trap (which also stops the gateway
# and redis-server).
on_exit() {
  stop_stalls
  rm -rf "$work"
}
stop_stalls() {
  if [[ -n "$stall_pid" ]]; then
    pkill -P "$stall_pid" 2>/dev/null || true
    kill "$stall_pid" 2>/dev/null || true
    wait "$stall_pid" 2>/dev/null || true
    stall_pid=""
  fi
}

# DEBUG SLEEP needs the debug command (refused by default since Redis 7).
start_redis "$work/redis" --enable-debug-command local
echo "{\"env\":{\"utc\":\"$stamp\",\"commit\":\"$(git describe --always --dirty)\",\"cpus\":$(nproc),\"rate\":$rate,\"duration_s\":$duration,\"stall_s\":$stall,\"down_stall_s\":$down_stall,\"redis\":\"$(redis-server --version | awk '{print $3}')\"}}" >"$jsonl"

# stall_loop SECONDS: DEBUG SLEEP every second until killed.
stall_loop() {
  while true; do
    redis-cli -p "$redis_port" DEBUG SLEEP "$1" >/dev/null
    sleep 1
  done
}

phase() {
  local name=$1
  shift
  start_gateway target/release/gateway "$work/gw-$name.log" --shards 1 --cpus 0 \
    --allow-anonymous --rate-limit-per-s 100000 --rate-limit-burst 100000 "$@"
  taskset -p -c 0 "$redis_pid" >/dev/null
  # Stalls begin after the clients joined (a room first seen while Redis
  # does not answer refuses publishes: see docs/storage.md).
  case "$name" in
    redis-slow) (sleep 0.5; stall_loop "$stall") & stall_pid=$! ;;
    redis-down) (sleep 0.5; stall_loop "$down_stall") & stall_pid=$! ;;
  esac
  local out
  out="$(taskset -c 1 target/release/loadgen chat --url "ws://127.0.0.1:$gw_port/ws" \
    --rooms 10 --members 20 --publishers 2 --rate "$rate" --warmup-s 1 \
    --duration-s "$duration" --room-prefix "$name-$stamp" --drain-timeout-ms 10000 --json)"
  stop_stalls
  local storage
  storage="$(curl -sf "http://127.0.0.1:$gw_port/metrics" | awk '/^corecast_storage_(persisted|spilled|replayed|lost|breaker_opened)_total / {gsub("corecast_storage_",""); gsub("_total",""); printf "%s\"%s\":%s", (n++ ? "," : ""), $1, $2}')"
  stop_gateway
  echo "{\"phase\":\"$name\",\"storage\":{$storage},\"loadgen\":$out}" >>"$jsonl"
}

phase memory
phase redis --redis "$redis_url" --spill-dir "$work/spill"
phase redis-slow --redis "$redis_url" --spill-dir "$work/spill"
phase redis-down --redis "$redis_url" --spill-dir "$work/spill"

# The last DEBUG SLEEP may still be running.
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.2; done
echo "{\"throughput\":[$(taskset -c 1 target/release/storage-throughput --redis "$redis_url" --messages "$messages" | grep '^{' | paste -sd,)]}" >>"$jsonl"

python3 - "$jsonl" "$stall" "$down_stall" >"$md" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
env = lines[0]["env"]
stall, down = sys.argv[2], sys.argv[3]
label = {
    "memory": "memory store",
    "redis": "Redis, healthy",
    "redis-slow": f"Redis, DEBUG SLEEP {stall} s every s",
    "redis-down": f"Redis, DEBUG SLEEP {down} s every s (> timeout)",
}
print(f"10 rooms x 20 members, 2 publishers per room, {env['rate']} publishes/s, {env['duration_s']} s; gateway 1 shard + redis-server on CPU 0, loadgen on CPU 1 (commit {env['commit']}, {env['utc']})\n")
print("| store | deliveries/s | delivery p50 | delivery p99 | delivery p99.9 | ack p50 | ack p99 | persisted | spilled | replayed | lost | gaps/dups/reorders/lost |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
ms = lambda us: f"{us/1000:.2f} ms"
for l in lines[1:]:
    if "phase" not in l:
        continue
    g, s = l["loadgen"], l["storage"]
    print(f"| {label[l['phase']]} | {g['deliveries_per_s']:,.0f} | {ms(g['p50_us'])} | {ms(g['p99_us'])} | {ms(g['p999_us'])} | {ms(g['ack_p50_us'])} | {ms(g['ack_p99_us'])} | {s.get('persisted','-')} | {s.get('spilled','-')} | {s.get('replayed','-')} | {s.get('lost','-')} | {g['gaps']}/{g['duplicates']}/{g['reorders']}/{g['lost']} |")
for l in lines:
    if "throughput" in l:
        print("\nStorage worker alone, 128 B messages over 10 rooms, acked when stored (redis-server appendonly, fsync every s):\n")
        print("| batch | msgs/s persisted |")
        print("|---|---|")
        for t in l["throughput"]:
            print(f"| {t['batch']} | {t['msgs_per_s']:,} |")
PY
cat "$md"
echo
echo "results: $jsonl $md"
