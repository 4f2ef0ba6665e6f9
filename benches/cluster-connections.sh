#!/usr/bin/env bash
# The most concurrent WebSocket connections three gateway nodes hold on this
# machine (issue 5), and RSS per connection. Each process here may open at
# most 20,000 files, so: three nodes (a cluster on loopback with one
# private Redis), and three `loadgen hold` processes, each opening
# --per-loadgen idle chat connections (/ws, anonymous) spread round-robin
# over the three nodes from its own loopback source addresses.
#
# Usage: benches/cluster-connections.sh [--per-loadgen N] [--hold-s S] [--no-build]
# Prints a table and one JSON line; writes benches/results/cluster-connections.json.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
per=19400
hold_s=15
build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --per-loadgen) per="${2:?}"; shift ;;
    --hold-s) hold_s="${2:?}"; shift ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,10{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "cluster-connections.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $build -eq 1 ]] && (cd "$repo" && scripts/deps.sh && cargo build --release -p corecast-gateway -p corecast-loadgen)
gw="$repo/target/release/gateway"
lg="$repo/target/release/loadgen"
# shellcheck source=conformance/lib.sh
source "$repo/conformance/lib.sh"
work=$(mktemp -d)
lgs=()
on_exit() {
  for p in "${lgs[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
start_redis "$work/redis"
start_nodes "$gw" 3 "$work" --shards 2 --allow-anonymous --backlog 4096 --redis "$redis_url"
ports=("${node_ports[@]}")
pids=("${node_pids[@]}")
urls=$node_urls
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# Warm each node's pools with a small round, then take the baseline.
"$lg" hold --url "$urls" -c 600 --hold-s 1 >/dev/null 2>&1
sleep 1
before=0
for p in "${pids[@]}"; do before=$((before + $(rss_kib "$p"))); done

total=$((per * 3))
for k in 0 1 2; do
  srcs="127.0.$((k + 1)).2,127.0.$((k + 1)).3,127.0.$((k + 1)).4"
  "$lg" hold --url "$urls" -c "$per" --hold-s "$hold_s" --sources "$srcs" --connect-rate 3000 \
    --connect-timeout-ms 15000 --json >"$work/lg-$k.json" 2>"$work/lg-$k.log" &
  lgs+=("$!")
done
open_ws() {
  local s=0 i
  for i in 0 1 2; do
    s=$((s + $(curl -s "http://127.0.0.1:${ports[$i]}/metrics" | awk '/^corecast_websockets\{/ {s+=$2} END {print s+0}')))
  done
  echo "$s"
}
open=0
for _ in $(seq 300); do
  open=$(open_ws)
  [[ "$open" -ge "$total" ]] && break
  sleep 0.2
done
sleep 3
open=$(open_ws)
during=0
per_node=()
for i in 0 1 2; do
  r=$(rss_kib "${pids[$i]}")
  during=$((during + r))
  per_node+=("$((r / 1024))")
done
failed=0
for k in 0 1 2; do
  wait "${lgs[$k]}" || failed=1
done
lgs=()
live=$(curl -s "http://127.0.0.1:${ports[0]}/metrics" | awk '$1 == "corecast_mesh_live_nodes" {print $2}')
# The closes at the end: every loadgen closes all of its connections at once
# and gives the servers its --close-timeout-ms (2 s) to answer each close.
json_sum() { python3 -c 'import json,sys; print(sum(json.load(open(f)).get(sys.argv[1], 0) for f in sys.argv[2:]))' "$@"; }
clean=$(json_sum closed_cleanly "$work"/lg-*.json)
missed=$(json_sum unclean_closes "$work"/lg-*.json)
per_conn=$(( (during - before) * 1024 / (open > 0 ? open : 1) ))
cat <<TABLE
| nodes | loadgen processes | concurrent WebSockets held | RSS per node (MiB) | RSS before (3 nodes) | RSS holding (3 nodes) | user-space bytes per connection | closed at once: answered in time | missed the close deadline |
|---|---|---|---|---|---|---|---|---|
| 3 (live: $live) | 3 | $open | ${per_node[*]} | $((before / 1024)) MiB | $((during / 1024)) MiB | $per_conn | $clean | $missed |
TABLE
json="{\"bench\":\"cluster-connections\",\"nodes\":3,\"connections\":$open,\"attempted\":$total,\"rss_before_kib\":$before,\"rss_holding_kib\":$during,\"bytes_per_connection\":$per_conn,\"closed_cleanly\":$clean,\"missed_close_deadline\":$missed,\"loadgen_failed\":$failed,\"kernel\":\"$(uname -r)\",\"date\":\"$(date -u +%F)\"}"
echo "$json"
mkdir -p "$repo/benches/results"
echo "$json" >"$repo/benches/results/cluster-connections.json"
for k in 0 1 2; do tail -3 "$work/lg-$k.log" | sed "s/^/loadgen $k: /"; done
