#!/usr/bin/env bash
# TLS handshakes per second per core: `loadgen hold` opens N wss://
# connections (full TLS 1.3 handshakes, then the upgrade) to a gateway with
# one shard, in rounds; the gateway's CPU time over each round (user +
# system, from /proc) gives handshakes per CPU-second, i.e. per core. The
# client (loadgen, on the other core) pays its side of every handshake too.
# Each round is followed by the same over plain ws:// (same accept, upgrade
# and close, no TLS), so the TLS share of the cost shows.
#
# Usage: benches/tls-handshakes.sh [--connections N] [--rounds R] [--no-build]
# Prints one line per round and a JSON line with the median; writes it to
# benches/results/tls-handshakes.json.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
conns=3000
rounds=3
build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --connections) conns="${2:?}"; shift ;;
    --rounds) rounds="${2:?}"; shift ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,10{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "tls-handshakes.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $build -eq 1 ]]; then
  (cd "$repo" && cargo build --release -p corecast-gateway -p corecast-loadgen)
fi
gw="$repo/target/release/gateway"
lg="$repo/target/release/loadgen"
certs="$repo/gateway/tests/testdata/tls"
# shellcheck source=conformance/lib.sh
source "$repo/conformance/lib.sh"
tport="$(free_port)"
start_gateway "$gw" "$(mktemp)" --shards 1 --cpus 0 \
  --tls-cert "$certs/cert.pem" --tls-key "$certs/key.pem" --tls-listen "127.0.0.1:$tport"
port=$gw_port
# utime + stime of the gateway, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$gw_pid/stat"; }
hz=$(getconf CLK_TCK)
results=()
plain=()
# round URL [LOADGEN FLAGS...]: connections per gateway CPU-second.
round() {
  local url=$1 t0 t1 out opened
  shift
  t0=$(ticks)
  out=$("$lg" hold --url "$url" "$@" -c "$conns" --hold-s 0 \
    --cpus 1 --connect-rate 20000 --connect-timeout-ms 30000 --sources 127.0.0.2,127.0.0.3 2>&1) ||
    { echo "$out" >&2; exit 1; }
  t1=$(ticks)
  opened=$(echo "$out" | awk '/^opened/ {print $2; exit}')
  [[ "$opened" -eq "$conns" ]] || { echo "only $opened of $conns opened:" >&2; echo "$out" >&2; exit 1; }
  python3 -c "print(round($opened / (($t1 - $t0) / $hz)))"
}
for r in $(seq "$rounds"); do
  tls_rate=$(round "wss://localhost:$tport/echo" --ca "$certs/ca.pem")
  plain_rate=$(round "ws://127.0.0.1:$port/echo")
  echo "round $r: wss:// $tls_rate, ws:// $plain_rate connections per gateway CPU-second"
  results+=("$tls_rate")
  plain+=("$plain_rate")
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
median=$(med "${results[@]}")
plain_median=$(med "${plain[@]}")
stop_gateway
json="{\"bench\":\"tls-handshakes\",\"connections\":$conns,\"rounds\":[$(IFS=,; echo "${results[*]}")],\"median_per_cpu_second\":$median,\"plain_rounds\":[$(IFS=,; echo "${plain[*]}")],\"plain_median_per_cpu_second\":$plain_median,\"tls\":\"1.3 ECDSA P-256\",\"kernel\":\"$(uname -r)\",\"date\":\"$(date -u +%F)\"}"
echo "$json"
mkdir -p "$repo/benches/results"
echo "$json" >"$repo/benches/results/tls-handshakes.json"
