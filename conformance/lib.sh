# shellcheck shell=bash
# Shared by the conformance scripts: start a gateway on a free loopback port,
# wait until it answers, and stop it checking that it drained and exited 0.
# Source it; it sets $gw_port and $gw_pid. It installs an EXIT trap that
# kills a gateway or redis-server still running; a script with its own
# cleanup defines a function `on_exit`, which the trap calls too.

lib_cleanup() {
  [[ -n "${gw_pid:-}" ]] && kill "$gw_pid" 2>/dev/null
  [[ -n "${redis_pid:-}" ]] && kill "$redis_pid" 2>/dev/null
  if declare -F on_exit >/dev/null; then on_exit; fi
  true
}
trap lib_cleanup EXIT

# start_gateway BINARY LOG [FLAGS...]
start_gateway() {
  local bin=$1 log=$2
  shift 2
  gw_log=$log
  gw_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  RUST_LOG=warn "$bin" --listen "127.0.0.1:$gw_port" "$@" >"$log" 2>&1 &
  gw_pid=$!
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
  gw_pid=""
  if [[ $status -ne 0 ]] || grep -q panicked "$gw_log"; then
    echo "the gateway did not exit cleanly after SIGTERM (status $status):"; cat "$gw_log"; exit 1
  fi
}

# start_redis DIR [FLAGS...]: a private redis-server on a free loopback port,
# data and log in DIR, extra redis-server flags after it. Sets $redis_port,
# $redis_pid and $redis_url.
start_redis() {
  local dir=$1
  shift
  mkdir -p "$dir"
  redis_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --save "" \
    --appendonly yes --appendfsync everysec --daemonize no "$@" >"$dir/redis.log" 2>&1 &
  redis_pid=$!
  redis_url="redis://127.0.0.1:$redis_port/"
  for _ in $(seq 100); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return 0
    kill -0 "$redis_pid" 2>/dev/null || { echo "redis-server exited:"; cat "$dir/redis.log"; exit 1; }
    sleep 0.1
  done
  echo "redis-server did not answer within 10 s:"; cat "$dir/redis.log"; exit 1
}

# stop_redis: by pid, and wait for it.
stop_redis() {
  [[ -n "${redis_pid:-}" ]] || return 0
  kill -TERM "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
  redis_pid=""
}
