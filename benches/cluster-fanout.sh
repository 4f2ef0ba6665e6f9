#!/usr/bin/env bash
# Cross-node fan-out (issue 5): the same `loadgen chat` against one gateway
# node and against three nodes in one cluster, on this machine.
#
# --rooms rooms of --members members; loadgen spreads the connections
# round-robin over the nodes' URLs, so with three nodes two thirds of every
# room's members sit on nodes other than its home and every message crosses
# the ZeroMQ mesh. Two phases per setup, each on freshly started nodes:
#   rate  a fixed publish rate (--rate publishes/s over all publishers):
#         delivery latency at a load both setups carry;
#   max   closed loop, --window unacked publishes per publisher and
#         --max-publishers per room: the most deliveries/s.
# Both setups store into one private redis-server (a cluster needs Redis;
# the single node uses it too). A single node delivers before the store
# answers, a cluster home sends a message out only once it is stored: that
# difference is part of what this measures. Every gateway has
# --shards 1; nothing is pinned: on 2 cores the 3 nodes, Redis and loadgen
# share both cores, so the 3-node numbers show the mesh's cost, not added
# capacity (more nodes bring capacity when they bring cores).
#
# Output: a markdown table on stdout, and under benches/results/
# cluster-fanout-<utc>.jsonl (loadgen's JSON per setup and phase, with the
# summed gateway CPU seconds) and .md with the table.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
rooms=10
members=100
rate=200
window=4
max_publishers=4
duration_s=10
build=1
results_dir="$here/results"
usage() { sed -n '2,25{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; echo "flags: --rooms N --members N --rate N --window N --max-publishers N --duration-s N --no-build"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rooms) rooms=$2; shift ;;
    --members) members=$2; shift ;;
    --rate) rate=$2; shift ;;
    --window) window=$2; shift ;;
    --max-publishers) max_publishers=$2; shift ;;
    --duration-s) duration_s=$2; shift ;;
    --no-build) build=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "cluster-fanout.sh: unknown flag $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[[ $build == 1 ]] && (cd "$root" && scripts/deps.sh && cargo build --release -p corecast-gateway -p corecast-loadgen)
gateway="$root/target/release/gateway"
loadgen="$root/target/release/loadgen"
# shellcheck source=conformance/lib.sh
source "$root/conformance/lib.sh"
work=$(mktemp -d)
on_exit() { rm -rf "$work"; }
start_redis "$work/redis"
redis=$redis_url

stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$results_dir"
jsonl="$results_dir/cluster-fanout-$stamp.jsonl"
md="$results_dir/cluster-fanout-$stamp.md"
echo "{\"env\":{\"cpus\":$(nproc),\"kernel\":\"$(uname -r)\",\"rooms\":$rooms,\"members\":$members,\"rate\":$rate,\"window\":$window,\"max_publishers\":$max_publishers,\"duration_s\":$duration_s}}" >"$jsonl"

cpu_s() { # summed utime+stime of the given pids, in seconds
  local t=0
  for p in "$@"; do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "scale=2; $t / $(getconf CLK_TCK)" | bc
}

printf '| nodes | phase | publishes/s | deliveries/s | delivery p50 | p99 | p99.9 | gateway CPU s / M deliveries | clean |\n|---|---|---|---|---|---|---|---|---|\n' | tee "$md"
for n in 1 3; do
  for phase in rate max; do
    start_nodes "$gateway" "$n" "$work/$n-$phase" --shards 1 --allow-anonymous \
      --rate-limit-per-s 100000 --rate-limit-burst 100000 --redis "$redis"
    sleep 0.5
    if [[ $phase == rate ]]; then
      flags=(--publishers 1 --rate "$rate")
    else
      flags=(--publishers "$max_publishers" --rate 0 --window "$window")
    fi
    before=$(cpu_s "${node_pids[@]}")
    out=$("$loadgen" chat --url "$node_urls" --rooms "$rooms" --members "$members" "${flags[@]}" \
      --duration-s "$duration_s" --room-prefix "b$n$phase$stamp" --json 2>/dev/null) || true
    after=$(cpu_s "${node_pids[@]}")
    stop_nodes
    echo "{\"nodes\":$n,\"phase\":\"$phase\",\"gateway_cpu_s\":$(echo "$after - $before" | bc),\"loadgen\":$out}" >>"$jsonl"
    python3 - "$n" "$phase" "$after" "$before" "$out" <<'PY' | tee -a "$md"
import json, sys
n, phase, after, before, out = sys.argv[1:]
r = json.loads(out)
d = r.get("deliveries", 0)
dps = r.get("deliveries_per_s", 0)
lat = {k: r.get(f"{k}_us", 0) for k in ("p50", "p99", "p999")}
cpu = float(after) - float(before)
per_m = cpu / (d / 1e6) if d else float("nan")
bad = sum(r.get(k, 0) for k in ("gaps", "duplicates", "reorders", "lost", "errors", "unexpected_closes", "connect_failures"))
clean = "yes" if bad == 0 else "NO"
pps = r.get("published", 0) / max(r.get("duration_s", 1), 1e-9)
print(f"| {n} | {phase} | {pps:,.0f} | {dps:,.0f} | {lat.get('p50',0)/1000:.2f} ms | {lat.get('p99',0)/1000:.2f} ms | {lat.get('p999',0)/1000:.2f} ms | {per_m:.1f} | {clean} |")
PY
  done
done
echo "results: $jsonl"
