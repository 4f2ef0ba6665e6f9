#!/usr/bin/env bash
# End-to-end chat check: a fresh release gateway on 4 shards and
# `loadgen chat` (10 rooms x 20 members, 2 publishers per room, 5 s at a
# fixed rate) over loopback. loadgen exits non-zero on any gap, duplicate,
# reorder, lost message, error frame or failed connection.
#
# Usage: conformance/chat-smoke.sh [--gateway PATH] [--loadgen PATH]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gateway=""
loadgen=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gateway) gateway="${2:?--gateway needs a path}"; shift ;;
    --loadgen) loadgen="${2:?--loadgen needs a path}"; shift ;;
    -h|--help) sed -n '2,8{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "chat-smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$gateway" || -z "$loadgen" ]]; then
  (cd "$repo" && cargo build --release -p corecast-gateway -p corecast-loadgen)
  gateway="${gateway:-$repo/target/release/gateway}"
  loadgen="${loadgen:-$repo/target/release/loadgen}"
fi

secret="chat-smoke-secret-0123456789abcdef0123"
# shellcheck source=conformance/lib.sh
source "$repo/conformance/lib.sh"
start_gateway "$gateway" "$(mktemp)" --shards 4 --jwt-secret "$secret"

status=0
"$loadgen" chat --url "ws://127.0.0.1:$gw_port/ws" --jwt-secret "$secret" \
  --rooms 10 --members 20 --publishers 2 --rate 200 --duration-s 5 || status=$?

stop_gateway
exit $status
