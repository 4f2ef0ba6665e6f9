#!/usr/bin/env bash
# End-to-end chat check: a fresh release gateway on 4 shards and
# `loadgen chat` (10 rooms x 20 members, 2 publishers per room, 5 s at a
# fixed rate) over loopback. loadgen exits non-zero on any gap, duplicate,
# reorder, lost message, error frame or failed connection. With --redis the
# gateway stores into that Redis, and afterwards every published message
# must have been persisted (none spilled, none lost). With --tls the members
# connect over wss:// (a --tls-listen port with the test certificate, loadgen
# --ca), half of them, the other half over ws://, all in the same rooms.
#
# Usage: conformance/chat-smoke.sh [--gateway PATH] [--loadgen PATH] [--redis URL] [--tls]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gateway=""
loadgen=""
redis=""
tls=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gateway) gateway="${2:?--gateway needs a path}"; shift ;;
    --loadgen) loadgen="${2:?--loadgen needs a path}"; shift ;;
    --redis) redis="${2:?--redis needs a URL}"; shift ;;
    --tls) tls=1 ;;
    -h|--help) sed -n '2,13{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
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
store_flags=()
if [[ -n "$redis" ]]; then
  spill="$(mktemp -d)"
  store_flags=(--redis "$redis" --spill-dir "$spill")
fi
tls_flags=()
urls_flags=()
if [[ $tls -eq 1 ]]; then
  certs="$repo/gateway/tests/testdata/tls"
  tls_port="$(free_port)"
  tls_flags=(--tls-cert "$certs/cert.pem" --tls-key "$certs/key.pem" --tls-listen "127.0.0.1:$tls_port")
fi
start_gateway "$gateway" "$(mktemp)" --shards 4 --jwt-secret "$secret" "${store_flags[@]}" "${tls_flags[@]}"
if [[ $tls -eq 1 ]]; then
  urls_flags=(--url "wss://localhost:$tls_port/ws,ws://127.0.0.1:$gw_port/ws" --ca "$certs/ca.pem")
else
  urls_flags=(--url "ws://127.0.0.1:$gw_port/ws")
fi

status=0
"$loadgen" chat "${urls_flags[@]}" --jwt-secret "$secret" \
  --rooms 10 --members 20 --publishers 2 --rate 200 --duration-s 5 || status=$?
if [[ $tls -eq 1 ]]; then
  handshakes=$(curl -sf "http://127.0.0.1:$gw_port/metrics" | awk '/^corecast_tls_handshakes_total/ {s += $2} END {print s}')
  echo "tls: $handshakes handshakes"
  if [[ "$handshakes" -lt 100 ]]; then
    echo "chat-smoke: half of the 200 members should have come over wss://" >&2
    status=1
  fi
fi

if [[ -n "$redis" ]]; then
  metric() { curl -sf "http://127.0.0.1:$gw_port/metrics" | awk -v n="$1" '$1 == n {print $2}'; }
  published=$(curl -sf "http://127.0.0.1:$gw_port/metrics" | awk '/^corecast_publishes_total/ {s += $2} END {print s}')
  persisted=$(metric corecast_storage_persisted_total)
  echo "redis store: $published published, $persisted persisted, $(metric corecast_storage_spilled_total) spilled, $(metric corecast_storage_lost_total) lost"
  if [[ "$published" -eq 0 || "$persisted" -ne "$published" ]]; then
    echo "chat-smoke: every published message must be persisted to Redis" >&2
    status=1
  fi
fi

stop_gateway
exit $status
