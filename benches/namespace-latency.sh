#!/usr/bin/env bash
# An ephemeral namespace's publish → delivery latency next to a stored
# room's, with Redis as the store (issue 17), in a 3-node cluster: a
# cluster home sends a stored message to the other nodes only once Redis has
# it, an ephemeral one at once; both are acked (stored) or acked at once
# (ephemeral). The same `loadgen chat` per round, rounds alternating stored
# and ephemeral rooms on the same running nodes (rooms `lgs<stamp>-<i>` and
# `typing:lge<stamp>-<i>`; the nodes' config file makes `typing:` ephemeral).
# loadgen spreads members and publishers round-robin over the three nodes.
#
# Output: a table per round and the medians on stdout, and under
# benches/results/ namespace-latency-<utc>.jsonl (loadgen's JSON per round).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
rooms=10
members=30
rate=300
duration_s=10
repeat=3
build=1
results_dir="$here/results"
usage() { sed -n '2,12{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; echo "flags: --rooms N --members N --rate N --duration-s N --repeat N --no-build"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rooms) rooms=$2; shift ;;
    --members) members=$2; shift ;;
    --rate) rate=$2; shift ;;
    --duration-s) duration_s=$2; shift ;;
    --repeat) repeat=$2; shift ;;
    --no-build) build=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "namespace-latency.sh: unknown flag $1" >&2; usage >&2; exit 2 ;;
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
printf '[namespaces."typing:"]\nephemeral = true\n' >"$work/corecast.toml"
start_nodes "$gateway" 3 "$work/nodes" --shards 1 --allow-anonymous \
  --rate-limit-per-s 100000 --rate-limit-burst 100000 --redis "$redis_url" --config "$work/corecast.toml"
sleep 1

stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$results_dir"
jsonl="$results_dir/namespace-latency-$stamp.jsonl"
echo "{\"env\":{\"cpus\":$(nproc),\"kernel\":\"$(uname -r)\",\"nodes\":3,\"rooms\":$rooms,\"members\":$members,\"rate\":$rate,\"duration_s\":$duration_s}}" >"$jsonl"
for ((i = 1; i <= repeat; i++)); do
  for kind in stored ephemeral; do
    prefix="lgs$stamp-$i"
    [[ $kind == ephemeral ]] && prefix="typing:lge$stamp-$i"
    out=$("$loadgen" chat --url "$node_urls" --rooms "$rooms" --members "$members" --publishers 1 \
      --rate "$rate" --duration-s "$duration_s" --room-prefix "$prefix" --json 2>/dev/null) || true
    echo "{\"round\":$i,\"kind\":\"$kind\",\"loadgen\":${out:-null}}" >>"$jsonl"
  done
done
python3 - "$jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"round"' in l]
print("| round | rooms | delivery p50 | delivery p99 | delivery p99.9 | ack p99 | deliveries/s | clean |")
print("|---|---|---|---|---|---|---|---|")
per = {"stored": [], "ephemeral": []}
for r in rows:
    g = r["loadgen"] or {}
    bad = sum(g.get(k, 0) for k in ("gaps", "duplicates", "reorders", "lost", "errors", "unexpected_closes", "connect_failures"))
    clean = "yes" if g and bad == 0 else "NO"
    per[r["kind"]].append(g)
    ms = lambda k: g.get(k, 0) / 1000
    print(f"| {r['round']} | {r['kind']} | {ms('p50_us'):.2f} ms | {ms('p99_us'):.2f} ms | {ms('p999_us'):.2f} ms | {ms('ack_p99_us'):.2f} ms | {g.get('deliveries_per_s', 0):,.0f} | {clean} |")
for kind, gs in per.items():
    med = lambda k: statistics.median(x.get(k, 0) for x in gs) / 1000 if gs else 0
    print(f"| median | {kind} | {med('p50_us'):.2f} ms | {med('p99_us'):.2f} ms | {med('p999_us'):.2f} ms | {med('ack_p99_us'):.2f} ms | | |")
PY
echo "results: $jsonl"
