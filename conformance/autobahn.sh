#!/usr/bin/env bash
# Runs the Autobahn|Testsuite (cases 1-11; 12/13 need permessage-deflate,
# which corecast does not negotiate yet) against a freshly started gateway's
# /echo, and compares every case's result with autobahn-expected.json.
#
# Usage: conformance/autobahn.sh [--update] [--tls] [--gateway PATH]
#   --update        rewrite autobahn-expected.json from this run
#   --tls           run over wss:// (a --tls-listen port with the test
#                   certificate of gateway/tests/testdata/tls); the same
#                   expected results as over ws://
#   --gateway PATH  gateway binary (default: builds target/release/gateway)
# Exit 0 when every case matches the expected results; 1 otherwise.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${CORECAST_SHARED:-$repo/../shared}"
update=0
tls=0
gateway=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --update) update=1 ;;
    --tls) tls=1 ;;
    --gateway) gateway="${2:?--gateway needs a path}"; shift ;;
    -h|--help) sed -n '2,12{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
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

out="$(mktemp -d "${TMPDIR:-/tmp}/corecast-autobahn.XXXXXX")"
# shellcheck source=conformance/lib.sh
source "$repo/conformance/lib.sh"
tls_flags=()
if [[ $tls -eq 1 ]]; then
  certs="$repo/gateway/tests/testdata/tls"
  tls_port="$(free_port)"
  tls_flags=(--tls-cert "$certs/cert.pem" --tls-key "$certs/key.pem" --tls-listen "127.0.0.1:$tls_port")
  export SSL_CERT_FILE="$certs/ca.pem"
fi
# Autobahn's 9.* cases send messages of up to 16 MiB.
start_gateway "$gateway" "$out/gateway.log" --shards 2 \
  --max-frame-bytes 16777216 --max-message-bytes 16777216 \
  --outbound-budget-bytes 33554432 "${tls_flags[@]}"

status=0
if [[ $tls -eq 1 ]]; then
  url="wss://127.0.0.1:$tls_port/echo"
else
  url="ws://127.0.0.1:$gw_port/echo"
fi
bash "$runner" -n -o "$out/report" "$url" || status=$?

# The gateway must drain and exit 0 on SIGTERM after the run.
stop_gateway

args=("$out/report/index.json" "$repo/conformance/autobahn-expected.json")
[[ $update -eq 1 ]] && args+=(--update)
python3 "$repo/conformance/compare.py" "${args[@]}" || status=1
exit $status
