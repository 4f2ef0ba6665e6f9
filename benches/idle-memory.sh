#!/usr/bin/env bash
# Memory per idle WebSocket connection: RSS of one gateway process before and
# while it holds N idle connections opened by `loadgen hold` (another
# process, several loopback source addresses).
#
# Usage: benches/idle-memory.sh [--connections N] [--shards S] [--path /echo|/ws] [--tls] [--no-build]
#   --path /ws holds authenticated (anonymous) chat connections instead of
#   plain echo WebSockets.
#   --tls holds wss:// connections (the test certificate, TLS 1.3), opened at
#   600 per second (each costs a handshake on both sides of this machine).
# Prints a table and one JSON line; writes it to benches/results/idle-memory.json.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
conns=15000
shards=2
path=/echo
build=1
tls=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --connections) conns="${2:?}"; shift ;;
    --shards) shards="${2:?}"; shift ;;
    --path) path="${2:?}"; shift ;;
    --no-build) build=0 ;;
    --tls) tls=1 ;;
    -h|--help) sed -n '2,11{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "idle-memory.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $build -eq 1 ]]; then
  (cd "$repo" && cargo build --release -p corecast-gateway -p corecast-loadgen)
fi
gw="$repo/target/release/gateway"
lg="$repo/target/release/loadgen"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log="$(mktemp)"
url="ws://127.0.0.1:$port$path"
tls_flags=()
lg_tls=()
rate=5000
if [[ $tls -eq 1 ]]; then
  certs="$repo/gateway/tests/testdata/tls"
  tport="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  tls_flags=(--tls-cert "$certs/cert.pem" --tls-key "$certs/key.pem" --tls-listen "127.0.0.1:$tport")
  lg_tls=(--ca "$certs/ca.pem")
  url="wss://localhost:$tport$path"
  rate=600
fi
RUST_LOG=warn "$gw" --listen "127.0.0.1:$port" --shards "$shards" --allow-anonymous "${tls_flags[@]}" >"$log" 2>&1 &
gw_pid=$!
trap 'kill $gw_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$gw_pid/status"; }
# Warm the shards' pools and allocator with a small round first, so the
# baseline is a running gateway rather than a just-started one.
"$lg" hold --url "$url" "${lg_tls[@]}" -c 200 --hold-s 1 >/dev/null 2>&1
sleep 1
before=$(rss_kib)
hold_s=12
"$lg" hold --url "$url" "${lg_tls[@]}" -c "$conns" --hold-s "$hold_s" \
  --sources 127.0.0.2,127.0.0.3,127.0.0.4 --connect-rate "$rate" --json >"$log.lg" 2>/dev/null &
lg_pid=$!
# Sample while every connection is open and idle.
open=0
for _ in $(seq 200); do
  open=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^corecast_websockets\{/ {s+=$2} END {print s+0}')
  [[ "$open" -ge "$conns" ]] && break
  sleep 0.2
done
sleep 3
during=$(rss_kib)
open=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^corecast_websockets\{/ {s+=$2} END {print s+0}')
wait $lg_pid || { echo "loadgen hold failed:"; cat "$log.lg"; exit 1; }
sleep 1
after=$(rss_kib)
kill -TERM $gw_pid; wait $gw_pid || true; trap - EXIT

per_conn=$(( (during - before) * 1024 / open ))
cat <<TABLE
| url | gateway shards | idle WebSockets | RSS before | RSS holding | RSS after close | user-space bytes per idle connection |
|---|---|---|---|---|---|---|
| ${url%%:*}:// $path | $shards | $open | $((before/1024)) MiB | $((during/1024)) MiB | $((after/1024)) MiB | $per_conn |
TABLE
json="{\"bench\":\"idle-memory\",\"tls\":$([[ $tls -eq 1 ]] && echo true || echo false),\"path\":\"$path\",\"shards\":$shards,\"connections\":$open,\"rss_before_kib\":$before,\"rss_holding_kib\":$during,\"rss_after_kib\":$after,\"bytes_per_connection\":$per_conn,\"kernel\":\"$(uname -r)\",\"date\":\"$(date -u +%F)\"}"
echo "$json"
mkdir -p "$repo/benches/results"
echo "$json" >"$repo/benches/results/idle-memory${path//\//-}$([[ $tls -eq 1 ]] && echo -tls).json"
