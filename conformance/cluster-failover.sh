#!/usr/bin/env bash
# End-to-end failover check: three release gateways in one cluster (mesh on
# loopback, one Redis), `loadgen chat --reconnect` spreading its members
# over the three, and one node SIGKILLed by pid in the middle of the run.
# Its members reconnect to another node and resume; loadgen exits non-zero
# on any gap, duplicate, reorder, lost acked message, failed resume or error
# frame, and at most 1% of the publishes may go unanswered (those on their
# way to the dying node). Afterwards both survivors must count 2 live nodes,
# have re-homed rooms, and stop cleanly on SIGTERM.
#
# Usage: conformance/cluster-failover.sh --redis URL [--gateway PATH] [--loadgen PATH]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gateway=""
loadgen=""
redis=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gateway) gateway="${2:?--gateway needs a path}"; shift ;;
    --loadgen) loadgen="${2:?--loadgen needs a path}"; shift ;;
    --redis) redis="${2:?--redis needs a URL}"; shift ;;
    -h|--help) sed -n '2,12{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "cluster-failover.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$redis" ]] || { echo "cluster-failover.sh: --redis URL is required (a cluster keeps its sequences in Redis)" >&2; exit 2; }
if [[ -z "$gateway" || -z "$loadgen" ]]; then
  (cd "$repo" && cargo build --release -p corecast-gateway -p corecast-loadgen)
  gateway="${gateway:-$repo/target/release/gateway}"
  loadgen="${loadgen:-$repo/target/release/loadgen}"
fi

# shellcheck source=conformance/lib.sh
source "$repo/conformance/lib.sh"
work="$(mktemp -d)"
on_exit() { rm -rf "$work"; }

secret="cluster-failover-secret-0123456789abcdef"
RUST_LOG=info start_nodes "$gateway" 3 "$work" --shards 2 --jwt-secret "$secret" --redis "$redis"
ports=("${node_ports[@]}")
pids=("${node_pids[@]}")
metric() { curl -sf "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n {print $2}'; }
for i in 0 1 2; do
  [[ "$(metric "${ports[$i]}" corecast_mesh_live_nodes)" == 3 ]] || { echo "node-$i does not see 3 live nodes:"; cat "$work/node-$i.log"; exit 1; }
done
echo "3 nodes live on ports ${ports[*]}; killing node-2 (pid ${pids[2]}) 5 s into the run"

(sleep 5; kill -KILL "${pids[2]}"; echo "node-2 killed at $(date -u +%T.%N)") &
killer=$!
status=0
"$loadgen" chat --url "$node_urls" --jwt-secret "$secret" --reconnect --json \
  --rooms 12 --members 9 --publishers 3 --rate 600 --duration-s 10 --room-prefix failover \
  >"$work/loadgen.json" || status=$?
wait "$killer"
# Unacked publishes do not fail a --reconnect run (those on their way to the
# dying node are never answered); more than 1% would mean publishes vanish.
python3 - "$work/loadgen.json" <<'PY' || status=1
import json, sys
r = json.loads(open(sys.argv[1]).read())
print(f"loadgen: {r['published']} published, {r['acked']} acked, {r['unacked']} unacked, {r['lost']} lost")
if r["published"] == 0 or r["unacked"] * 100 > r["published"]:
    sys.exit("cluster-failover: more than 1% of the publishes were never answered")
PY

for i in 0 1; do
  live=$(metric "${ports[$i]}" corecast_mesh_live_nodes)
  rehomed=$(metric "${ports[$i]}" corecast_mesh_rehomed_total)
  unrepaired=$(metric "${ports[$i]}" corecast_mesh_unrepaired_total)
  echo "node-$i: live nodes $live, rooms re-homed $rehomed, gaps repaired $(metric "${ports[$i]}" corecast_mesh_repaired_total), unrepaired $unrepaired"
  if [[ "$live" != 2 || "$unrepaired" != 0 ]]; then
    echo "cluster-failover: node-$i should count 2 live nodes and no unrepaired gap" >&2
    status=1
  fi
done
total_rehomed=$(( $(metric "${ports[0]}" corecast_mesh_rehomed_total) + $(metric "${ports[1]}" corecast_mesh_rehomed_total) ))
[[ $total_rehomed -gt 0 ]] || { echo "cluster-failover: no room moved off the killed node" >&2; status=1; }

for i in 0 1; do
  kill -TERM "${pids[$i]}"
  s=0
  wait "${pids[$i]}" || s=$?
  if [[ $s -ne 0 ]] || grep -q panicked "$work/node-$i.log"; then
    echo "node-$i did not exit cleanly after SIGTERM (status $s):"; cat "$work/node-$i.log"; status=1
  fi
done
node_pids=()
exit $status
