# shellcheck shell=bash
# Shared by the conformance scripts: start a gateway on a free loopback port,
# wait until it answers, and stop it checking that it drained and exited 0.
# Source it; it sets $gw_port and $gw_pid.

# start_gateway BINARY LOG [FLAGS...]
start_gateway() {
  local bin=$1 log=$2
  shift 2
  gw_log=$log
  gw_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  RUST_LOG=warn "$bin" --listen "127.0.0.1:$gw_port" "$@" >"$log" 2>&1 &
  gw_pid=$!
  trap 'kill $gw_pid 2>/dev/null || true' EXIT
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$gw_port/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$gw_pid" 2>/dev/null || { echo "gateway exited:"; cat "$log"; exit 1; }
    sleep 0.1
  done
  echo "gateway did not answer /healthz within 10 s:"; cat "$log"; exit 1
}

# stop_gateway: SIGTERM, then the gateway must exit 0 without a panic.
stop_gateway() {
  kill -TERM "$gw_pid"
  local status=0
  wait "$gw_pid" || status=$?
  trap - EXIT
  if [[ $status -ne 0 ]] || grep -q panicked "$gw_log"; then
    echo "the gateway did not exit cleanly after SIGTERM (status $status):"; cat "$gw_log"; exit 1
  fi
}
