#!/usr/bin/env bash
# Side-by-side fan-out benchmark (issue 3): corecast's chat on /ws against
# tokio-tungstenite-broadcast, a tokio peer with the same room semantics
# (benches/peers/src/broadcast.rs), driven by the same `loadgen chat`.
#
# --rooms rooms of --members members each (one connection per member); the
# first publishers of each room publish, every member receives every message
# of its room. Two phases per server, each on a freshly started server:
#   rate  a fixed publish rate (--rate publishes/s over all publishers, open
#         loop, --rate-publishers per room): latency and CPU per delivery at
#         a load both servers carry;
#   max   closed loop, --window unacked publishes per publisher and
#         --max-publishers per room: the most deliveries/s each server gives.
#         On a 2-core machine loadgen's core saturates first (it parses and
#         checks every delivery); the defaults, 10 publishers x window 4,
#         are where the server's core comes closest to saturation too (the
#         peer's does). Bigger windows make batches, and the servers'
#         per-delivery cost, smaller.
# Both servers do the same work: no JWTs (corecast runs --allow-anonymous,
# the peer does not verify tokens), corecast's per-connection rate limit
# raised out of the way.
#
# Each server runs alone on one core (taskset -c SERVER_CPU; corecast also
# gets --shards 1 --cpus SERVER_CPU, the peer --threads 1); loadgen runs on
# another (1 thread). Around the measured window the script samples the
# server's CPU time (utime+stime of /proc/PID/stat) and reports server CPU
# seconds per million deliveries next to loadgen's throughput and delivery
# latency percentiles. loadgen's own CPU use is reported too: near 100% of
# its core, the client is the bottleneck and the row says more about loadgen
# than about the server.
#
# Output: a markdown table on stdout, and under benches/results/ a
# fanout-vs-peer-<utc>.jsonl (one environment line, then one line per
# server and phase: loadgen's JSON plus the CPU samples) and a .md with the
# same table. Commit the results files that README numbers are taken from.
#
# Loopback only; every run is bounded by --warmup-s + --duration-s plus
# connection setup and a few seconds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

rooms=10
members=100
size=128
duration_s=15
warmup_s=3
rate=300
rate_publishers=1
window=4
max_publishers=10
phases="rate,max"
server_cpu=0
client_cpu=1
build=1
tls=0
servers="corecast,tokio-tungstenite"
corecast_port=18180
peer_port=18181
results_dir="$here/results"
server_cpu_quota=0
repeat=1

usage() {
    cat <<EOF
usage: $0 [options]
  --rooms N            rooms (default $rooms)
  --members N          members per room, publishers included (default $members)
  --size BYTES         publish body bytes (default $size)
  --duration-s S       measured seconds per phase (default $duration_s)
  --warmup-s S         unmeasured seconds of publishing first (default $warmup_s)
  --rate R             rate phase: publishes/s over all publishers (default $rate;
                       deliveries/s = R x members)
  --rate-publishers N  rate phase: publishers per room (default $rate_publishers)
  --window W           max phase: unacked publishes per publisher (default $window)
  --max-publishers N   max phase: publishers per room (default $max_publishers)
  --phases LIST        comma separated: rate,max (default both)
  --servers LIST       comma separated: corecast,tokio-tungstenite (default both)
  --server-cpu N       CPU the server is pinned to (default $server_cpu)
  --client-cpu N       CPU loadgen is pinned to (default $client_cpu)
  --repeat N           rounds of all phases and servers, alternating (default
                       $repeat); the summary gives each round's ratios and their
                       median, since one round on a shared VM can be off by 20%
  --server-cpu-quota P cap each server at P% of its core (a cgroup cpu quota,
                       10 ms period) so that the server, not loadgen, is the
                       bottleneck; 0 = no cap (default $server_cpu_quota)
  --results-dir DIR    where the .jsonl and .md go (default benches/results)
  --tls                over wss:// (both servers TLS with the test certificate of
                       gateway/tests/testdata/tls; the peer with tokio-rustls;
                       loadgen --ca)
  --no-build           use the binaries already in target/release
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --rooms) rooms=$2; shift 2 ;;
        --members) members=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --duration-s) duration_s=$2; shift 2 ;;
        --warmup-s) warmup_s=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --rate-publishers) rate_publishers=$2; shift 2 ;;
        --window) window=$2; shift 2 ;;
        --max-publishers) max_publishers=$2; shift 2 ;;
        --phases) phases=$2; shift 2 ;;
        --servers) servers=$2; shift 2 ;;
        --server-cpu) server_cpu=$2; shift 2 ;;
        --client-cpu) client_cpu=$2; shift 2 ;;
        --server-cpu-quota) server_cpu_quota=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --results-dir) results_dir=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --tls) tls=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$0: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "$0: $*" >&2; exit 1; }
is_num() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }
for v in rooms members size rate rate_publishers window max_publishers server_cpu client_cpu server_cpu_quota repeat; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v//_/-} ${!v}: expected a whole number"
done
for v in rooms members rate rate_publishers window max_publishers repeat; do
    ((${!v} > 0)) || die "--${v//_/-}: must be at least 1"
done
((rate_publishers <= members && max_publishers <= members)) ||
    die "publishers per room cannot exceed --members $members"
is_num "$duration_s" || die "--duration-s $duration_s: expected seconds"
is_num "$warmup_s" || die "--warmup-s $warmup_s: expected seconds"
# CPU sampling skips this much at each end of the measured window, so that
# the join phase and the final drain never fall inside it.
margin_s=0.5
python3 -c "import sys; sys.exit(0 if $duration_s > 2 * $margin_s else 1)" ||
    die "--duration-s $duration_s: must be more than twice the ${margin_s} s sampling margin"
[[ $server_cpu != "$client_cpu" ]] || die "--server-cpu and --client-cpu must differ"
((server_cpu_quota <= 100)) || die "--server-cpu-quota $server_cpu_quota: a percentage of one core, 0-100"
# The cap: a cgroup (v1 cpu controller, or v2) the server runs in.
cgroup=""
if ((server_cpu_quota > 0)); then
    if [[ -d /sys/fs/cgroup/cpu ]]; then
        cgroup=/sys/fs/cgroup/cpu/corecast-fanout-$$
        mkdir "$cgroup" 2>/dev/null || die "cannot create $cgroup (needs root and a writable cgroup cpu controller)"
        echo 10000 >"$cgroup/cpu.cfs_period_us"
        echo $((server_cpu_quota * 100)) >"$cgroup/cpu.cfs_quota_us"
    elif [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
        cgroup=/sys/fs/cgroup/corecast-fanout-$$
        mkdir "$cgroup" 2>/dev/null || die "cannot create $cgroup (needs root and a writable cgroup v2 tree)"
        echo "$((server_cpu_quota * 100)) 10000" >"$cgroup/cpu.max" ||
            die "cannot set cpu.max in $cgroup (is the cpu controller enabled for it?)"
    else
        die "--server-cpu-quota needs a cgroup cpu controller under /sys/fs/cgroup"
    fi
fi
ncpu=$(nproc --all)
((server_cpu < ncpu && client_cpu < ncpu)) || die "this machine has CPUs 0..$((ncpu - 1))"
for tool in taskset ss python3 getconf; do
    command -v "$tool" >/dev/null || die "$tool not found (needed for pinning, port checks or reporting)"
done
IFS=, read -r -a server_list <<<"$servers"
IFS=, read -r -a phase_list <<<"$phases"
for s in "${server_list[@]}"; do
    [[ $s == corecast || $s == tokio-tungstenite ]] ||
        die "--servers: unknown server $s (corecast, tokio-tungstenite)"
done
for p in "${phase_list[@]}"; do
    [[ $p == rate || $p == max ]] || die "--phases: unknown phase $p (rate, max)"
done
connections=$((rooms * members))

bin="$root/target/release"
if ((build)); then
    (cd "$root" && cargo build --release -p corecast-gateway -p corecast-loadgen -p corecast-peers)
fi
for b in gateway loadgen tokio-tungstenite-broadcast; do
    [[ -x $bin/$b ]] || die "$bin/$b missing: run without --no-build"
done

clk_tck=$(getconf CLK_TCK)

# Clock ticks of CPU time (user+system, all threads) a process has used so
# far. Pure bash: sampling must not lag behind the schedule it keeps.
cpu_ticks() {
    local stat f
    stat=$(<"/proc/$1/stat") || return 1
    # Fields after the ")" that ends comm; utime and stime are fields 14, 15.
    stat=${stat##*) }
    read -r -a f <<<"$stat"
    echo $((f[11] + f[12]))
}

# Clock ticks CPU $1 has spent since boot, whoever ran, as "TASK IRQ STEAL":
# TASK = user+nice+system, IRQ = irq+softirq (loopback TCP runs much of its
# receive path there), STEAL = taken by the hypervisor. TASK well above the
# server's own CPU time means something else ran on the server's core during
# the window: taskset pins our processes; it does not keep others off.
core_s() {
    local f
    read -r -a f < <(grep "^cpu$1 " /proc/stat)
    echo "$((f[1] + f[2] + f[3])) $((f[6] + f[7])) ${f[8]}"
}

now_s() { date +%s.%N; }

# Sleeps until the wall-clock time $1 (seconds since the epoch).
sleep_until() {
    local d
    d=$(awk -v t="$1" -v n="$(now_s)" 'BEGIN { d = t - n; print (d > 0 ? d : 0) }')
    sleep "$d"
}

port_in_use() { [[ -n $(ss -Hltn "sport = :$1") ]]; }

# Established connections on the server's side of port $1.
established() { ss -Htn state established "sport = :$1" | wc -l; }

wait_for_port() {
    local port=$1 pid=$2
    for _ in $(seq 100); do
        port_in_use "$port" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

server_pid=""
loadgen_pid=""
cleanup() {
    if [[ -n $loadgen_pid ]]; then kill -TERM "$loadgen_pid" 2>/dev/null || true; fi
    if [[ -n $server_pid ]]; then kill -TERM "$server_pid" 2>/dev/null || true; fi
    if [[ -n $cgroup ]]; then sleep 0.5; rmdir "$cgroup" 2>/dev/null || true; fi
}
trap 'exit 130' INT TERM

stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$results_dir"
tmp=$(mktemp -d)
trap 'cleanup; rm -rf "$tmp"' EXIT
# Written in $tmp and moved into $results_dir only when every run finished,
# so a results file is always a whole run.
certs="$root/gateway/tests/testdata/tls"
scheme=ws
host=127.0.0.1
tls_server=()
tls_client=()
suffix=""
if ((tls)); then
    scheme=wss
    host=localhost
    tls_server=(--tls-cert "$certs/cert.pem" --tls-key "$certs/key.pem")
    tls_client=(--ca "$certs/ca.pem")
    suffix="-tls"
fi
jsonl="$tmp/fanout-vs-peer-$stamp$suffix.jsonl"
md="$tmp/fanout-vs-peer-$stamp$suffix.md"

git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$root" diff --quiet HEAD 2>/dev/null || git_rev="$git_rev+dirty"

# The environment line: what the numbers ran on (STYLE.md, "Tests and benchmarks").
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo) \
HYPERVISOR=$(lscpu 2>/dev/null | awk -F': +' '/^Hypervisor vendor/ { print $2 }') \
GOVERNOR=$(cat "/sys/devices/system/cpu/cpu$server_cpu/cpufreq/scaling_governor" 2>/dev/null || echo n/a) \
KERNEL=$(uname -r) RUSTC=$(rustc -V 2>/dev/null || echo unknown) GIT_REV=$git_rev STAMP=$stamp \
NCPU=$ncpu SERVER_CPU=$server_cpu SERVER_CPU_QUOTA=$server_cpu_quota CLIENT_CPU=$client_cpu ROOMS=$rooms MEMBERS=$members SIZE=$size \
RATE=$rate RATE_PUBLISHERS=$rate_publishers WINDOW=$window MAX_PUBLISHERS=$max_publishers \
WARMUP_S=$warmup_s DURATION_S=$duration_s TLS=$tls \
    python3 - "$root/Cargo.lock" "$jsonl" <<'EOF'
import json, os, sys, tomllib

lock = tomllib.load(open(sys.argv[1], "rb"))["package"]
def version(name, dep_of=None):
    if dep_of:
        # The version dep_of resolved to, when several are locked.
        parent = next(p for p in lock if p["name"] == dep_of[0] and p["version"] == dep_of[1])
        dep = next(d for d in parent.get("dependencies", []) if d.split(" ")[0] == name)
        if " " in dep:
            return dep.split(" ")[1]
    return next((p["version"] for p in lock if p["name"] == name), "unknown")

e = os.environ

def kernel_config():
    import gzip
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{os.uname().release}", open)):
        try:
            with opener(path, "rt") as f:
                return f.read()
        except OSError:
            pass
    return None

# Whether irq/softirq time is kept out of tasks' CPU time; None = unknown.
config = kernel_config()
irq_acc = None if config is None else "CONFIG_IRQ_TIME_ACCOUNTING=y" in config
ttv = version("tokio-tungstenite")
env = {
    "kind": "env",
    "utc": e["STAMP"],
    "cpu": e["CPU_MODEL"],
    "cpus": int(e["NCPU"]),
    "hypervisor": e["HYPERVISOR"] or "none",
    "governor": e["GOVERNOR"],
    "kernel": e["KERNEL"],
    "rustc": e["RUSTC"],
    "corecast": e["GIT_REV"],
    "tokio_tungstenite": ttv,
    "tungstenite": version("tungstenite", ("tokio-tungstenite", ttv)),
    "tokio": version("tokio"),
    "server_cpu": int(e["SERVER_CPU"]),
    "server_cpu_quota_pct": int(e["SERVER_CPU_QUOTA"]),
    "client_cpu": int(e["CLIENT_CPU"]),
    "rooms": int(e["ROOMS"]),
    "members": int(e["MEMBERS"]),
    "size_bytes": int(e["SIZE"]),
    "rate": int(e["RATE"]),
    "rate_publishers": int(e["RATE_PUBLISHERS"]),
    "window": int(e["WINDOW"]),
    "max_publishers": int(e["MAX_PUBLISHERS"]),
    "irq_time_accounting": irq_acc,
    "warmup_s": float(e["WARMUP_S"]),
    "duration_s": float(e["DURATION_S"]),
    "tls": e["TLS"] == "1",
}
open(sys.argv[2], "w").write(json.dumps(env) + "\n")
EOF

# Runs one phase ($2) against one server ($1), on a server started for it.
run_one() {
    local name=$1 phase=$2 port cmd load
    case "$name" in
        corecast)
            port=$corecast_port
            # No JWTs (the peer verifies none), and the per-connection frame
            # limit (default 100/s) out of the way of the publishers.
            cmd=("$bin/gateway" --listen "127.0.0.1:$port" --shards 1 --cpus "$server_cpu"
                --allow-anonymous --rate-limit-per-s 1000000 --rate-limit-burst 1000000 "${tls_server[@]}")
            ;;
        tokio-tungstenite)
            port=$peer_port
            cmd=("$bin/tokio-tungstenite-broadcast" --listen "127.0.0.1:$port" --threads 1 "${tls_server[@]}")
            ;;
    esac
    case "$phase" in
        rate) load=(--publishers "$rate_publishers" --rate "$rate") ;;
        max) load=(--publishers "$max_publishers" --rate 0 --window "$window") ;;
    esac
    local tag="$name.$phase"
    port_in_use "$port" && die "port $port is already in use (a server left running?)"

    echo "== $name, $phase: starting on CPU $server_cpu, port $port" >&2
    if [[ -n $cgroup ]]; then
        # Join the capped cgroup, then become the server.
        RUST_LOG=warn taskset -c "$server_cpu" bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' \
            "$cgroup" "${cmd[@]}" 2>"$tmp/$tag.server.log" &
    else
        RUST_LOG=warn taskset -c "$server_cpu" "${cmd[@]}" 2>"$tmp/$tag.server.log" &
    fi
    server_pid=$!
    wait_for_port "$port" "$server_pid" ||
        die "$name did not listen on $port; its log: $(cat "$tmp/$tag.server.log")"

    echo "== $name, $phase: loadgen on CPU $client_cpu, $rooms rooms x $members members, ${load[*]}, ${warmup_s}s warm-up + ${duration_s}s" >&2
    taskset -c "$client_cpu" "$bin/loadgen" chat \
        --url "$scheme://$host:$port/ws" "${tls_client[@]}" \
        --rooms "$rooms" --members "$members" --size "$size" "${load[@]}" \
        --warmup-s "$warmup_s" --duration-s "$duration_s" \
        --threads 1 --cpus "$client_cpu" --json \
        >"$tmp/$tag.json" 2>"$tmp/$tag.loadgen.log" &
    loadgen_pid=$!

    # Publishing starts once every member has joined: wait until the server
    # holds every connection; joins follow within milliseconds, and the
    # sampling margin absorbs them. Deadlines are absolute so the sampling
    # itself cannot push the window late.
    local waited=0
    while (($(established "$port") < connections)); do
        kill -0 "$loadgen_pid" 2>/dev/null ||
            die "loadgen exited while connecting; its log: $(cat "$tmp/$tag.loadgen.log")"
        ((waited < 600)) || die "$name: not all $connections connections up after 30 s"
        sleep 0.05; waited=$((waited + 1))
    done
    local started
    started=$(now_s)

    local t0 c0 l0 t1 c1 l1 b0s b0c b1s b1c
    sleep_until "$(awk -v s="$started" 'BEGIN { printf "%.3f", s + '"$warmup_s + $margin_s"' }')"
    t0=$(now_s)
    c0=$(cpu_ticks "$server_pid") || die "$name exited during the run; its log: $(cat "$tmp/$tag.server.log")"
    l0=$(cpu_ticks "$loadgen_pid") || die "loadgen exited early; its log: $(cat "$tmp/$tag.loadgen.log")"
    b0s=$(core_s "$server_cpu"); b0c=$(core_s "$client_cpu")
    sleep_until "$(awk -v s="$started" 'BEGIN { printf "%.3f", s + '"$warmup_s + $duration_s - $margin_s"' }')"
    t1=$(now_s)
    c1=$(cpu_ticks "$server_pid") || die "$name exited during the run; its log: $(cat "$tmp/$tag.server.log")"
    l1=$(cpu_ticks "$loadgen_pid") ||
        die "loadgen exited before its measured window ended; its log: $(cat "$tmp/$tag.loadgen.log")"
    b1s=$(core_s "$server_cpu"); b1c=$(core_s "$client_cpu")

    local lg_status=0
    wait "$loadgen_pid" || lg_status=$?
    loadgen_pid=""

    kill -TERM "$server_pid"
    local server_status=0
    waited=0
    while kill -0 "$server_pid" 2>/dev/null && ((waited < 150)); do
        sleep 0.1; waited=$((waited + 1))
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "== $name: still running 15 s after SIGTERM; killing it" >&2
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" || server_status=$?
    server_pid=""

    if [[ ! -s $tmp/$tag.json ]]; then
        echo "== $name, $phase: loadgen printed no result (exit $lg_status); its log:" >&2
        cat "$tmp/$tag.loadgen.log" >&2
        return 1
    fi
    ((lg_status == 0)) || {
        echo "== $name, $phase: loadgen exited $lg_status (failed checks or errors); its log:" >&2
        tail -n 20 "$tmp/$tag.loadgen.log" >&2
    }

    python3 - "$jsonl" "$tmp/$tag.json" <<EOF
import json, sys
lg = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
window_s = $t1 - $t0
def core(before, after):
    d = [(int(a) - int(b)) / $clk_tck / window_s for a, b in zip(after.split(), before.split())]
    return {"task": round(d[0], 3), "irq": round(d[1], 3), "steal": round(d[2], 3)}
server_cpu_s = ($c1 - $c0) / $clk_tck
row = {
    "kind": "result",
    "round": $round,
    "server": "$name",
    "phase": "$phase",
    "loadgen": lg,
    "loadgen_exit": $lg_status,
    "server_exit": $server_status,
    "sample_window_s": round(window_s, 3),
    "server_cpu_s": round(server_cpu_s, 3),
    "server_cpu_util": round(server_cpu_s / window_s, 3),
    "loadgen_cpu_util": round(($l1 - $l0) / $clk_tck / window_s, 3),
    # Whole-core fractions of the window (see core_s in the script).
    "server_core": core("$b0s", "$b1s"),
    "client_core": core("$b0c", "$b1c"),
    "loadavg_after": open("/proc/loadavg").read().split()[:3],
    # CPU per delivery from rates, so the sample window need not match
    # loadgen's window exactly, only lie inside it.
    "server_cpu_s_per_1m_deliveries": round(server_cpu_s / window_s / lg["deliveries_per_s"] * 1e6, 3)
        if lg.get("deliveries_per_s") else None,
}
open(sys.argv[1], "a").write(json.dumps(row) + "\n")
EOF
    echo "== $name, $phase: done (loadgen exit $lg_status, server exit $server_status)" >&2
}

for ((round = 1; round <= repeat; round++)); do
    ((repeat == 1)) || echo "== round $round of $repeat" >&2
    for p in "${phase_list[@]}"; do
        for s in "${server_list[@]}"; do
            run_one "$s" "$p"
        done
    done
done

python3 - "$jsonl" "$md" <<'EOF'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
env = lines[0]
rows = [l for l in lines[1:] if l["kind"] == "result"]
out = []
m = env["members"]
out.append(
    f"fan-out benchmark, {env['utc']}: {env['rooms']} rooms x {m} members "
    f"({env['rooms'] * m} connections), {env['size_bytes']} B bodies, "
    f"{env['warmup_s']} s warm-up + {env['duration_s']} s measured per phase, a fresh server per phase. "
    f"rate: {env['rate']:,} publishes/s over {env['rate_publishers']} publisher(s) per room (open loop, "
    f"{env['rate'] * m:,} deliveries/s asked); max: {env['max_publishers']} publisher(s) per room, "
    f"closed loop, window {env['window']} unacked publishes each."
    f"{' Over wss:// (TLS 1.3, AES-128-GCM, X25519; both servers rustls with ring).' if env.get('tls') else ''}"
)
out.append(
    f"CPU: {env['cpu']} ({env['cpus']} CPUs, hypervisor {env['hypervisor']}, governor {env['governor']}); "
    f"kernel {env['kernel']}; {env['rustc']}; corecast {env['corecast']}; "
    f"peer tokio-tungstenite-broadcast on tokio-tungstenite {env['tokio_tungstenite']} "
    f"(tungstenite {env['tungstenite']}, tokio {env['tokio']}, multi-thread runtime, 1 worker)."
)
out.append(
    f"Pinning: server alone on CPU {env['server_cpu']} (taskset; corecast --shards 1 --cpus {env['server_cpu']} "
    f"--allow-anonymous, rate limit raised; peer --threads 1); loadgen chat on CPU {env['client_cpu']} (1 thread). "
    "No JWTs on either side."
    + (f" Each server capped at {env['server_cpu_quota_pct']}% of its core (cgroup cpu quota, 10 ms period)."
       if env.get("server_cpu_quota_pct") else "")
)
out.append(
    "Latency = delivery latency (publish's intended send time to receipt at a member), µs. "
    "Server CPU = the server process's utime+stime over the window (1 core = 100%); server core busy = "
    "all non-idle time of the server's core (task+irq+softirq+steal), whoever ran; "
    + ("irq time is charged to tasks on this kernel, so the two match on a quiet machine."
       if env.get("irq_time_accounting") is False else
       "this kernel keeps irq time out of tasks: busy exceeds server CPU by the softirq share."
       if env.get("irq_time_accounting") else
       "whether this kernel charges irq time to tasks is unknown.")
    + " At max the loop is closed: latency is mostly queueing (deliveries in flight / deliveries per s)."
    + " Checks: gaps/duplicates/reorders/lost, then every other failure loadgen counts "
    "(errors, unacked, bad frames, unexpected closes, connect failures, ...); all must be 0."
)
out.append("")
rounds = sorted({r.get("round", 1) for r in rows})
many = len(rounds) > 1
out.append(("| round " if many else "") + "| server | phase | deliveries/s | p50 µs | p99 µs | p99.9 µs | max µs | server CPU s / 1M deliveries | server CPU | server core busy | loadgen CPU | gaps/dups/reorders/lost | other failures |")
out.append(("|---" if many else "") + "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
OTHER = ("publisher_reorders", "unacked", "duplicate_acks", "foreign", "errors", "bad_frames",
         "unexpected_closes", "connect_failures")
for r in rows:
    lg = r["loadgen"]
    per = r["server_cpu_s_per_1m_deliveries"]
    checks = "/".join(str(lg.get(k, "?")) for k in ("gaps", "duplicates", "reorders", "lost"))
    other = sum(lg.get(k, 0) for k in OTHER)
    out.append(
        (f"| {r.get('round', 1)} " if many else "") +
        f"| {r['server']} | {r['phase']} | {lg.get('deliveries_per_s', 0):,.0f} | {lg.get('p50_us', '?')} | "
        f"{lg.get('p99_us', '?')} | {lg.get('p999_us', '?')} | {lg.get('max_us', '?')} | "
        f"{per if per is not None else '?'} | {100 * r['server_cpu_util']:.0f}% | "
        f"{100 * sum(r['server_core'].values()):.0f}% | {100 * r['loadgen_cpu_util']:.0f}% | {checks} | {other} |"
    )
out.append("")
for phase in ("rate", "max"):
    deliv, p99, cpu = [], [], []
    for n in rounds:
        by = {r["server"]: r for r in rows if r.get("round", 1) == n and r["phase"] == phase}
        c, p = by.get("corecast"), by.get("tokio-tungstenite")
        if not (c and p):
            continue
        cl, pl = c["loadgen"], p["loadgen"]
        parts = []
        if cl.get("deliveries_per_s") and pl.get("deliveries_per_s"):
            deliv.append(cl["deliveries_per_s"] / pl["deliveries_per_s"])
            parts.append(f"deliveries/s {deliv[-1]:.2f}x")
        if cl.get("p99_us") and pl.get("p99_us"):
            p99.append(cl["p99_us"] / pl["p99_us"])
            parts.append(f"p99 {cl['p99_us']} vs {pl['p99_us']} µs ({p99[-1]:.2f}x)")
        if c["server_cpu_s_per_1m_deliveries"] and p["server_cpu_s_per_1m_deliveries"]:
            cpu.append(c["server_cpu_s_per_1m_deliveries"] / p["server_cpu_s_per_1m_deliveries"])
            parts.append(f"server CPU per delivery {cpu[-1]:.2f}x")
        out.append(f"{phase}{f' (round {n})' if many else ''}, corecast / tokio-tungstenite: "
                   + "; ".join(parts) + ".")
    if many and deliv:
        span = lambda v: f"{statistics.median(v):.2f}x (range {min(v):.2f}-{max(v):.2f})"
        out.append(f"{phase}, median over {len(deliv)} rounds: deliveries/s {span(deliv)}"
                   + (f"; p99 {span(p99)}" if p99 else "")
                   + (f"; server CPU per delivery {span(cpu)}" if cpu else "") + ".")
    if phase == "max" and deliv:
        ok = statistics.median(deliv) >= 2 and p99 and statistics.median(p99) <= 1
        out.append("Issue 3 target (max: >= 2x the peer's deliveries/s at an equal or lower p99"
                   + (", medians of the rounds" if many else "") + f"): {'met' if ok else 'not met'}.")
for r in rows:
    who = f"{r['server']} ({r['phase']})" + (f" in round {r.get('round', 1)}" if many else "")
    sc, cc = r["server_core"], r["client_core"]
    # Task (and hypervisor steal) time on the core beyond our process's own
    # CPU time: other work ran there, at least this much. Softirq time is
    # left out: loopback TCP for our own traffic runs there, also while the
    # core is otherwise idle (then it is charged to no task).
    other_s = sc["task"] + sc["steal"] - r["server_cpu_util"]
    other_c = cc["task"] + cc["steal"] - r["loadgen_cpu_util"]
    if other_s > 0.05 or other_c > 0.05:
        out.append(f"Note: against {who}, other work (or hypervisor steal) took at least {100 * max(other_s, 0):.0f}% "
                   f"of the server's core and {100 * max(other_c, 0):.0f}% of loadgen's: the machine was not "
                   "quiet; rerun when it is before quoting these numbers.")
    asked = env["rate"] * env["members"]
    if r["phase"] == "rate" and r["loadgen"].get("deliveries_per_s", 0) < 0.98 * asked:
        out.append(f"Note: against {who} the run fell short of the asked {asked:,} deliveries/s: "
                   "latencies include the backlog.")
    if r["phase"] == "rate" and r["loadgen"].get("send_lag_p99_us", 0) > 1000:
        out.append(f"Note: against {who} loadgen's publishes went out late (send lag p99 "
                   f"{r['loadgen']['send_lag_p99_us']} µs): loadgen was falling behind.")
    if r["loadgen_cpu_util"] > 0.9:
        out.append(f"Note: loadgen used {100 * r['loadgen_cpu_util']:.0f}% of its core against {who}: "
                   "the client may be the bottleneck there.")
    if r["loadgen_exit"] != 0 or r["server_exit"] != 0:
        out.append(f"Note: {who}: loadgen exit {r['loadgen_exit']}, server exit {r['server_exit']}.")
text = "\n".join(out) + "\n"
open(sys.argv[2], "w").write(text)
print(text, end="")
EOF
mv "$jsonl" "$md" "$results_dir/"
echo "raw: $results_dir/${jsonl##*/}, table: $results_dir/${md##*/}" >&2
