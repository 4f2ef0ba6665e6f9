#!/usr/bin/env bash
# Server API publishes per second and their delivery latency
# (target/release/api-publish): --connections keep-alive HTTP/1.1
# connections POST /api/publish to one room, --window requests in flight
# on each, while --members anonymous WebSocket members of the room time
# every delivery and check its seq (LOST, gaps, duplicates). A fresh gateway
# each round, in a room of its own; the memory store, or with --redis a
# private redis-server without persistence, shared by the rounds.
#
# The gateway (--shards 1, every thread of it) and redis-server share CPU 0;
# api-publish runs on CPU 1. --no-pin pins nothing and gives the gateway
# its default shards.
#
# Usage: benches/api-publish.sh [--repeat N] [--redis] [--members N]
#        [--connections N] [--window N] [--duration-s N] [--warmup-s N]
#        [--reader-threads N] [--no-pin] [--no-build]
# Prints one line per round and the medians of publishes/s and of delivery
# p99; writes them with every round's JSON to
# benches/results/api-publish-<utc>.txt. Exits 1 if a round was not clean.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repeat=3
members=100
connections=4
window=1
duration=10
warmup=2
readers=4
redis=0
pin=1
build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --repeat) repeat="${2:?}"; shift ;;
    --members) members="${2:?}"; shift ;;
    --connections) connections="${2:?}"; shift ;;
    --window) window="${2:?}"; shift ;;
    --duration-s) duration="${2:?}"; shift ;;
    --warmup-s) warmup="${2:?}"; shift ;;
    --reader-threads) readers="${2:?}"; shift ;;
    --redis) redis=1 ;;
    --no-pin) pin=0 ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,19{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "api-publish.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $(nproc) -ge 2 ]] || pin=0

cd "$repo"
if [[ $build -eq 1 ]]; then
  cargo build --release --offline -p corecast-gateway -p corecast-benches --bin gateway --bin api-publish
fi
# shellcheck source=conformance/lib.sh
source conformance/lib.sh

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p benches/results
out="benches/results/api-publish-$stamp.txt"
work="$(mktemp -d)"
# Called by conformance/lib.sh's EXIT trap, which stops the gateway and
# redis-server by pid.
on_exit() { rm -rf "$work"; }
# Both the gateway and api-publish read it; it stays out of `ps`.
CORECAST_API_KEY="bench-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export CORECAST_API_KEY

store="memory"
store_flags=()
if [[ $redis -eq 1 ]]; then
  start_redis "$work/redis" --appendonly no
  ((pin)) && taskset -p -c 0 "$redis_pid" >/dev/null
  store="redis $(redis-server --version | awk '{print $3}'), no persistence"
  store_flags=(--store redis --redis "$redis_url")
fi
gw_flags=()
tool=(target/release/api-publish)
placement="unpinned, default shards"
if ((pin)); then
  gw_flags=(--shards 1 --cpus 0)
  tool=(taskset -c 1 target/release/api-publish)
  placement="gateway --shards 1, all threads on CPU 0 (with redis-server); api-publish on CPU 1"
fi

{
  echo "api-publish: $members members ($readers reader threads), $connections connections x window $window, ${warmup} s warm-up + ${duration} s measured, $repeat rounds"
  echo "store: $store; $placement"
  echo "commit $(git describe --always --dirty), $(date -u +%FT%TZ), kernel $(uname -r), $(nproc) x $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
} | tee "$out"

rates=()
p99s=()
failed=0
for r in $(seq "$repeat"); do
  api_port="$(free_port)"
  start_gateway target/release/gateway "$work/gw-$r.log" "${gw_flags[@]}" --allow-anonymous \
    --api-listen "127.0.0.1:$api_port" --spill-dir "$work/spill-$r" "${store_flags[@]}"
  ((pin)) && taskset -a -p -c 0 "$gw_pid" >/dev/null
  status=0
  json="$("${tool[@]}" --ws "ws://127.0.0.1:$gw_port/ws" --api "127.0.0.1:$api_port" \
    --members "$members" --room "bench-$stamp-$r" --connections "$connections" \
    --window "$window" --duration-s "$duration" --warmup-s "$warmup" \
    --reader-threads "$readers" --json)" || status=$?
  # 2: the tool could not run at all (it said why on stderr).
  [[ $status -eq 2 || -z "$json" ]] && { echo "round $r: api-publish failed (status $status)"; cat "$work/gw-$r.log"; exit 1; }
  metrics="$(curl -sf "http://127.0.0.1:$gw_port/metrics" |
    grep -E '^corecast_(api_requests_total\{endpoint="publish"|slow_consumer_closes_total|storage_refusals_total|ring_full_total)' |
    paste -sd' ' || true)"
  stop_gateway
  line="$(python3 - "$r" "$json" <<'PY'
import json, sys
r, j = sys.argv[1], json.loads(sys.argv[2])
a, d = j["api_latency_us"], j["delivery_latency_us"]
errors = ", ".join(f"{k}: {v}" for k, v in j["errors"].items()) or "none"
if j["io_errors"]:
    errors += f"; {j['io_errors']} broken connections ({j['last_io_error']})"
for why, n in j["members_closed"].items():
    errors += f"; {n} members closed ({why})"
print(f"round {r}: {j['publishes_per_s']:.0f} publishes/s, api p50/p99/p99.9/max "
      f"{a['p50']}/{a['p99']}/{a['p999']}/{a['max']} us, delivery p50/p99/p99.9/max "
      f"{d['p50']}/{d['p99']}/{d['p999']}/{d['max']} us, {j['deliveries_per_s']:.0f} deliveries/s, "
      f"errors: {errors}; LOST {j['lost']}, gaps {j['gaps']}, duplicates {j['duplicates']}, "
      f"reorders {j['reorders']}{'' if j['clean'] else ' FAILED'}")
print(j["publishes_per_s"], d["p99"])
PY
)"
  echo "$line" | head -1 | tee -a "$out"
  read -r rate p99 <<<"$(echo "$line" | tail -1)"
  rates+=("$rate")
  p99s+=("$p99")
  { echo "  json: $json"; echo "  gateway metrics: $metrics"; } >>"$out"
  if [[ $status -ne 0 ]]; then
    failed=1
    echo "  gateway log of round $r:" >>"$out"
    sed 's/^/    /' "$work/gw-$r.log" >>"$out"
  fi
done
stop_redis

med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "median: $(med "${rates[@]}") publishes/s, delivery p99 $(med "${p99s[@]}") us" | tee -a "$out"
echo "results: $out"
exit "$failed"
