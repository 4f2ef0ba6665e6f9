#!/usr/bin/env bash
# Runs the Autobahn|Testsuite (cases 1-11; 12/13 need permessage-deflate,
# which corecast does not negotiate yet) against a freshly started gateway's
# /echo, and compares every case's result with autobahn-expected.json.
#
# Usage: conformance/autobahn.sh [--update] [--gateway PATH]
#   --update        rewrite autobahn-expected.json from this run
#   --gateway PATH  gateway binary (default: builds target/release/gateway)
# Exit 0 when every case matches the expected results; 1 otherwise.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${CORECAST_SHARED:-$repo/../shared}"
update=0
gateway=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --update) update=1 ;;
    --gateway) gateway="${2:?--gateway needs a path}"; shift ;;
    -h|--help) sed -n '2,9{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "autobahn.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
runner="$shared/tools/autobahn/run.sh"
[[ -x "$runner" || -f "$runner" ]] || { echo "autobahn.sh: $runner not found (set CORECAST_SHARED to the shared/ folder)" >&2; exit 2; }

if [[ -z "$gateway" ]]; then
  (cd "$repo" && cargo build --release -p corecast-gateway --bin gateway)
  gateway="$repo/target/release/gateway"
fi

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
out="$(mktemp -d "${TMPDIR:-/tmp}/corecast-autobahn.XXXXXX")"
log="$out/gateway.log"
# Autobahn's 9.* cases send messages of up to 16 MiB.
RUST_LOG=warn "$gateway" --listen "127.0.0.1:$port" --shards 2 \
  --max-frame-bytes 16777216 --max-message-bytes 16777216 \
  --outbound-budget-bytes 33554432 >"$log" 2>&1 &
gw_pid=$!
cleanup() { kill "$gw_pid" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  kill -0 "$gw_pid" 2>/dev/null || { echo "gateway exited:"; cat "$log"; exit 1; }
  sleep 0.1
done

status=0
bash "$runner" -n -o "$out/report" "ws://127.0.0.1:$port/echo" || status=$?

# The gateway must drain and exit 0 on SIGTERM after the run.
kill -TERM "$gw_pid"
gw_status=0
wait "$gw_pid" || gw_status=$?
trap - EXIT
if [[ $gw_status -ne 0 ]]; then
  echo "autobahn.sh: gateway exited with $gw_status after SIGTERM:"; cat "$log"; exit 1
fi
if grep -q "panicked" "$log"; then
  echo "autobahn.sh: the gateway panicked:"; cat "$log"; exit 1
fi

args=("$out/report/index.json" "$repo/conformance/autobahn-expected.json")
[[ $update -eq 1 ]] && args+=(--update)
python3 "$repo/conformance/compare.py" "${args[@]}" || status=1
exit $status
