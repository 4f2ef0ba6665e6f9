# shellcheck shell=bash
# Shared by the conformance and benchmark scripts: start a gateway on a free
# loopback port, wait until it answers, and stop it checking that it drained
# and exited 0 ($gw_port, $gw_pid); a private redis-server ($redis_url); a
# cluster of nodes on loopback ($node_ports, $node_pids, $node_urls). Source
# it. It installs an EXIT trap that kills whatever of these still runs; a
# script with its own cleanup defines a function `on_exit`, which the trap
# calls too.

lib_cleanup() {
  [[ -n "${gw_pid:-}" ]] && kill "$gw_pid" 2>/dev/null
  [[ -n "${redis_pid:-}" ]] && kill "$redis_pid" 2>/dev/null
  for p in "${node_pids[@]}"; do kill "$p" 2>/dev/null; done
  if declare -F on_exit >/dev/null; then on_exit; fi
  true
}
trap lib_cleanup EXIT
node_pids=()

# free_port: a loopback TCP port nobody listens on right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_gateway BINARY LOG [FLAGS...]
start_gateway() {
  local bin=$1 log=$2
  shift 2
  gw_log=$log
  gw_port="$(free_port)"
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
  redis_port="$(free_port)"
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

# start_nodes BINARY N DIR [FLAGS...]: N gateways (`node-0` ...) in one
# cluster on loopback, each a --peers of all, with FLAGS for every node;
# logs (node-I.log) and spill files in DIR. N = 1 runs one node without a
# mesh. Waits until every node answers /readyz 200 (it has its first live
# set) and exits, showing the log, if one stops. Sets node_ports,
# node_pids and node_urls (their /ws URLs, comma separated).
start_nodes() {
  local bin=$1 n=$2 dir=$3 i peers
  shift 3
  mkdir -p "$dir"
  node_ports=() node_pids=() node_urls=""
  local meshes=()
  for ((i = 0; i < n; i++)); do
    node_ports+=("$(free_port)")
    meshes+=("tcp://127.0.0.1:$(free_port)")
  done
  peers=$(IFS=,; echo "${meshes[*]}")
  for ((i = 0; i < n; i++)); do
    local cluster=()
    ((n > 1)) && cluster=(--node-id "node-$i" --mesh-bind "${meshes[$i]}" --peers "$peers")
    RUST_LOG="${RUST_LOG:-warn}" "$bin" --listen "127.0.0.1:${node_ports[$i]}" "${cluster[@]}" \
      --spill-dir "$dir/spill-$i" "$@" >"$dir/node-$i.log" 2>&1 &
    node_pids+=("$!")
    node_urls+="${node_urls:+,}ws://127.0.0.1:${node_ports[$i]}/ws"
  done
  for ((i = 0; i < n; i++)); do
    local ready=0
    for _ in $(seq 150); do
      [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${node_ports[$i]}/readyz")" == 200 ]] && { ready=1; break; }
      kill -0 "${node_pids[$i]}" 2>/dev/null || { echo "node-$i exited:"; cat "$dir/node-$i.log"; exit 1; }
      sleep 0.1
    done
    ((ready)) || { echo "node-$i was not ready within 15 s:"; cat "$dir/node-$i.log"; exit 1; }
  done
}

# stop_nodes: SIGTERM to every node of start_nodes, and wait for them.
stop_nodes() {
  for p in "${node_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${node_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  node_pids=()
}
