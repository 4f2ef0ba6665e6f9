#!/usr/bin/env bash
# Side-by-side echo benchmark: corecast's /echo against tokio-tungstenite-echo.
#
# Each server in turn runs alone on one core (taskset -c SERVER_CPU; corecast
# also gets --shards 1 --cpus SERVER_CPU, the peer --threads 1), and
# `loadgen echo` drives it from another core at max throughput (closed loop,
# --window messages in flight per connection). Around the measured window the
# script samples the server's CPU time (utime+stime of /proc/PID/stat, all
# threads) and reports server CPU seconds per million echoes next to loadgen's
# throughput and latency percentiles. The loadgen's own CPU use is reported
# too: near 100% of its core, the client is the bottleneck and the row says
# more about loadgen than about the server.
#
# Output: a markdown table on stdout, and under benches/results/ a .jsonl
# (one environment line, then one line per server: loadgen's JSON plus the
# CPU samples) and a .md with the same table. Commit the results files that
# README numbers are taken from.
#
# Loopback only; every run is bounded by --duration-s plus a few seconds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

connections=100
size=64
duration_s=15
warmup_s=3
window=1
rate=0
repeat=1
server_cpu=0
client_cpu=1
build=1
tls=0
servers="corecast,tokio-tungstenite"
corecast_port=18080
peer_port=18081
results_dir="$here/results"

usage() {
    cat <<EOF
usage: $0 [options]
  --connections N     connections (default $connections)
  --size BYTES        payload bytes per message (default $size)
  --duration-s S      measured seconds (default $duration_s)
  --warmup-s S        unmeasured seconds of load first (default $warmup_s)
  --window W          messages in flight per connection at max throughput (default $window)
  --rate R            messages per second over all connections, open loop;
                      0 = max throughput, closed loop (default $rate)
  --servers LIST      comma separated: corecast,tokio-tungstenite (default both)
  --repeat N          rounds of all servers, alternating (default $repeat); the
                      summary gives each round's ratios and their median, since
                      one round on a shared VM can be off by 20% either way
  --server-cpu N      CPU the server is pinned to (default $server_cpu)
  --client-cpu N      CPU loadgen is pinned to (default $client_cpu)
  --results-dir DIR   where the .jsonl and .md go (default benches/results)
  --tls               over wss:// (both servers TLS on their port with the test
                      certificate of gateway/tests/testdata/tls; the peer with
                      tokio-rustls; loadgen --ca)
  --no-build          use the binaries already in target/release
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --connections) connections=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --duration-s) duration_s=$2; shift 2 ;;
        --warmup-s) warmup_s=$2; shift 2 ;;
        --window) window=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --servers) servers=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --server-cpu) server_cpu=$2; shift 2 ;;
        --client-cpu) client_cpu=$2; shift 2 ;;
        --results-dir) results_dir=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --tls) tls=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$0: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "$0: $*" >&2; exit 1; }
is_num() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }
for v in connections size window rate repeat server_cpu client_cpu; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v//_/-} ${!v}: expected a whole number"
done
is_num "$duration_s" || die "--duration-s $duration_s: expected seconds"
is_num "$warmup_s" || die "--warmup-s $warmup_s: expected seconds"
# CPU sampling skips this much at each end of the measured window, so that
# connection setup and the final drain never fall inside it.
margin_s=0.5
python3 -c "import sys; sys.exit(0 if $duration_s > 2 * $margin_s else 1)" ||
    die "--duration-s $duration_s: must be more than twice the ${margin_s} s sampling margin"
[[ $server_cpu != "$client_cpu" ]] || die "--server-cpu and --client-cpu must differ"
ncpu=$(nproc --all)
((server_cpu < ncpu && client_cpu < ncpu)) || die "this machine has CPUs 0..$((ncpu - 1))"
for tool in taskset ss python3 getconf; do
    command -v "$tool" >/dev/null || die "$tool not found (needed for pinning, port checks or reporting)"
done

bin="$root/target/release"
if ((build)); then
    (cd "$root" && cargo build --release -p corecast-gateway -p corecast-loadgen -p corecast-peers)
fi
for b in gateway loadgen tokio-tungstenite-echo; do
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
}
trap 'exit 130' INT TERM

stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$results_dir"
tmp=$(mktemp -d)
trap 'cleanup; rm -rf "$tmp"' EXIT
# Written in $tmp and moved into $results_dir only when every server ran,
# so a results file is always a whole run.
if ((rate > 0)); then mode="rate$rate"; else mode="max"; fi
certs="$root/gateway/tests/testdata/tls"
scheme=ws
host=127.0.0.1
tls_server=()
tls_client=()
if ((tls)); then
    mode="$mode-tls"
    scheme=wss
    host=localhost
    tls_server=(--tls-cert "$certs/cert.pem" --tls-key "$certs/key.pem")
    tls_client=(--ca "$certs/ca.pem")
fi
jsonl="$tmp/echo-vs-peer-$stamp-$mode.jsonl"
md="$tmp/echo-vs-peer-$stamp-$mode.md"

git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$root" diff --quiet HEAD 2>/dev/null || git_rev="$git_rev+dirty"

# The environment line: what the numbers ran on (STYLE.md, "Tests and benchmarks").
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo) \
HYPERVISOR=$(lscpu 2>/dev/null | awk -F': +' '/^Hypervisor vendor/ { print $2 }') \
GOVERNOR=$(cat "/sys/devices/system/cpu/cpu$server_cpu/cpufreq/scaling_governor" 2>/dev/null || echo n/a) \
KERNEL=$(uname -r) RUSTC=$(rustc -V 2>/dev/null || echo unknown) GIT_REV=$git_rev STAMP=$stamp \
NCPU=$ncpu SERVER_CPU=$server_cpu CLIENT_CPU=$client_cpu CONNECTIONS=$connections SIZE=$size \
WINDOW=$window RATE=$rate WARMUP_S=$warmup_s DURATION_S=$duration_s TLS=$tls \
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
    "client_cpu": int(e["CLIENT_CPU"]),
    "connections": int(e["CONNECTIONS"]),
    "size_bytes": int(e["SIZE"]),
    "window": int(e["WINDOW"]),
    "rate": int(e["RATE"]),
    "irq_time_accounting": irq_acc,
    "tls": e["TLS"] == "1",
    "warmup_s": float(e["WARMUP_S"]),
    "duration_s": float(e["DURATION_S"]),
}
open(sys.argv[2], "w").write(json.dumps(env) + "\n")
EOF

run_one() {
    local name=$1 port cmd
    case "$name" in
        corecast)
            port=$corecast_port
            cmd=("$bin/gateway" --listen "127.0.0.1:$port" --shards 1 --cpus "$server_cpu" "${tls_server[@]}")
            ;;
        tokio-tungstenite)
            port=$peer_port
            cmd=("$bin/tokio-tungstenite-echo" --listen "127.0.0.1:$port" --threads 1 "${tls_server[@]}")
            ;;
        *) die "--servers: unknown server $name (corecast, tokio-tungstenite)" ;;
    esac
    port_in_use "$port" && die "port $port is already in use (a server left running?)"

    echo "== $name: starting on CPU $server_cpu, port $port" >&2
    RUST_LOG=warn taskset -c "$server_cpu" "${cmd[@]}" 2>"$tmp/$name.server.log" &
    server_pid=$!
    wait_for_port "$port" "$server_pid" ||
        die "$name did not listen on $port; its log: $(cat "$tmp/$name.server.log")"

    echo "== $name: loadgen on CPU $client_cpu, ${connections} conns x ${size} B, window $window, ${warmup_s}s warm-up + ${duration_s}s" >&2
    taskset -c "$client_cpu" "$bin/loadgen" echo \
        --url "$scheme://$host:$port/echo" "${tls_client[@]}" \
        --connections "$connections" --size "$size" --window "$window" --rate "$rate" \
        --warmup-s "$warmup_s" --duration-s "$duration_s" \
        --threads 1 --cpus "$client_cpu" --json \
        >"$tmp/$name.json" 2>"$tmp/$name.loadgen.log" &
    loadgen_pid=$!
    local started
    started=$(now_s)

    # Sample inside loadgen's measured window, which starts after connecting
    # and the warm-up; the margin absorbs connection setup. Deadlines are
    # absolute so the sampling itself cannot push the window late.
    local t0 c0 l0 t1 c1 l1 b0s b0c b1s b1c
    sleep_until "$(awk -v s="$started" 'BEGIN { printf "%.3f", s + '"$warmup_s + $margin_s"' }')"
    t0=$(now_s)
    c0=$(cpu_ticks "$server_pid") || die "$name exited during the run; its log: $(cat "$tmp/$name.server.log")"
    l0=$(cpu_ticks "$loadgen_pid") || die "loadgen exited early; its log: $(cat "$tmp/$name.loadgen.log")"
    b0s=$(core_s "$server_cpu"); b0c=$(core_s "$client_cpu")
    sleep_until "$(awk -v s="$started" 'BEGIN { printf "%.3f", s + '"$warmup_s + $duration_s - $margin_s"' }')"
    t1=$(now_s)
    c1=$(cpu_ticks "$server_pid") || die "$name exited during the run; its log: $(cat "$tmp/$name.server.log")"
    l1=$(cpu_ticks "$loadgen_pid") ||
        die "loadgen exited before its measured window ended; its log: $(cat "$tmp/$name.loadgen.log")"
    b1s=$(core_s "$server_cpu"); b1c=$(core_s "$client_cpu")

    local lg_status=0
    wait "$loadgen_pid" || lg_status=$?
    loadgen_pid=""

    kill -TERM "$server_pid"
    local server_status=0 waited=0
    while kill -0 "$server_pid" 2>/dev/null && ((waited < 150)); do
        sleep 0.1; waited=$((waited + 1))
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "== $name: still running 15 s after SIGTERM; killing it" >&2
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" || server_status=$?
    server_pid=""

    if [[ ! -s $tmp/$name.json ]]; then
        echo "== $name: loadgen printed no result (exit $lg_status); its log:" >&2
        cat "$tmp/$name.loadgen.log" >&2
        return 1
    fi
    ((lg_status == 0)) || echo "== $name: loadgen exited $lg_status (errors during the run)" >&2

    python3 - "$jsonl" "$tmp/$name.json" <<EOF
import json, sys
lg = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
window_s = $t1 - $t0
def core(before, after):
    d = [(int(a) - int(b)) / $clk_tck / window_s for a, b in zip(after.split(), before.split())]
    return {"task": round(d[0], 3), "irq": round(d[1], 3), "steal": round(d[2], 3)}
server_cpu_s = ($c1 - $c0) / $clk_tck
row = {
    "kind": "result",
    "server": "$name",
    "round": $round,
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
    # CPU per message from rates, so the sample window need not match
    # loadgen's window exactly, only lie inside it.
    "server_cpu_s_per_1m_msgs": round(server_cpu_s / window_s / lg["msgs_per_s"] * 1e6, 3)
        if lg.get("msgs_per_s") else None,
}
open(sys.argv[1], "a").write(json.dumps(row) + "\n")
EOF
    echo "== $name: done (server exit $server_status)" >&2
}

((repeat >= 1)) || die "--repeat $repeat: expected at least 1"
IFS=, read -r -a server_list <<<"$servers"
for ((round = 1; round <= repeat; round++)); do
    ((repeat == 1)) || echo "== round $round of $repeat" >&2
    for s in "${server_list[@]}"; do
        run_one "$s"
    done
done

python3 - "$jsonl" "$md" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
env = lines[0]
rows = [l for l in lines[1:] if l["kind"] == "result"]
out = []
load = (f"fixed rate {env['rate']:,} msgs/s (open loop)" if env.get("rate")
        else f"max throughput (closed loop, window {env['window']})")
out.append(
    f"echo benchmark, {env['utc']}: {env['connections']} connections x {env['size_bytes']} B, "
    f"{load}, {env['warmup_s']} s warm-up + {env['duration_s']} s measured"
    f"{' over wss:// (TLS 1.3, AES-128-GCM, both servers rustls with ring)' if env.get('tls') else ''}."
)
out.append(
    f"CPU: {env['cpu']} ({env['cpus']} CPUs, hypervisor {env['hypervisor']}, governor {env['governor']}); "
    f"kernel {env['kernel']}; {env['rustc']}; corecast {env['corecast']}; "
    f"peer tokio-tungstenite {env['tokio_tungstenite']} (tungstenite {env['tungstenite']}, tokio {env['tokio']}, "
    f"multi-thread runtime, 1 worker)."
)
out.append(
    f"Pinning: server alone on CPU {env['server_cpu']} (taskset; corecast --shards 1 --cpus {env['server_cpu']}, "
    f"peer --threads 1); loadgen on CPU {env['client_cpu']} (1 thread)."
)
out.append(
    "Server CPU = the server process's utime+stime over the window (1 core = 100%); server core busy = "
    "all non-idle time of the server's core (task+irq+softirq+steal), whoever ran; "
    + ("irq time is charged to tasks on this kernel, so the two match on a quiet machine."
       if env.get("irq_time_accounting") is False else
       "this kernel keeps irq time out of tasks (or it is unknown): busy exceeds server CPU by the softirq share."
       if env.get("irq_time_accounting") else
       "whether this kernel charges irq time to tasks is unknown.")
)
out.append("")
rounds = sorted({r.get("round", 1) for r in rows})
many = len(rounds) > 1
out.append(("| round " if many else "") + "| server | msgs/s | p50 µs | p99 µs | p99.9 µs | max µs | server CPU s / 1M msgs | server CPU | server core busy | loadgen CPU | errors |")
out.append(("|---:" if many else "") + "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    lg = r["loadgen"]
    per = r["server_cpu_s_per_1m_msgs"]
    out.append(
        (f"| {r.get('round', 1)} " if many else "") +
        f"| {r['server']} | {lg.get('msgs_per_s', 0):,.0f} | {lg.get('p50_us', '?')} | {lg.get('p99_us', '?')} | "
        f"{lg.get('p999_us', '?')} | {lg.get('max_us', '?')} | {per if per is not None else '?'} | "
        f"{100 * r['server_cpu_util']:.0f}% | {100 * sum(r['server_core'].values()):.0f}% | "
        f"{100 * r['loadgen_cpu_util']:.0f}% | {lg.get('errors', '?')} |"
    )
import statistics
cpu_ratios, p99_ratios = [], []
for n in rounds:
    by = {r["server"]: r for r in rows if r.get("round", 1) == n}
    if "corecast" not in by or "tokio-tungstenite" not in by:
        continue
    c, p = by["corecast"], by["tokio-tungstenite"]
    out.append("")
    tag = f"Round {n}: " if many else ""
    if c["server_cpu_s_per_1m_msgs"] and p["server_cpu_s_per_1m_msgs"]:
        ratio = c["server_cpu_s_per_1m_msgs"] / p["server_cpu_s_per_1m_msgs"]
        cpu_ratios.append(ratio)
        out.append(f"{tag}CPU per message, corecast / tokio-tungstenite: {ratio:.2f} (below 1: corecast spends less).")
    cm, pm = c["loadgen"].get("msgs_per_s"), p["loadgen"].get("msgs_per_s")
    if cm and pm:
        out.append(f"{tag}Throughput, corecast / tokio-tungstenite: {cm / pm:.2f}.")
    cp, pp = c["loadgen"].get("p99_us"), p["loadgen"].get("p99_us")
    if cp and pp:
        p99_ratios.append(cp / pp)
        out.append(f"{tag}p99: corecast {cp} µs vs tokio-tungstenite {pp} µs ({cp / pp:.2f}x).")
if many and cpu_ratios:
    out.append("")
    out.append(
        f"Median over {len(cpu_ratios)} rounds: CPU per message ratio {statistics.median(cpu_ratios):.2f} "
        f"(range {min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}); p99 ratio {statistics.median(p99_ratios):.2f} "
        f"(range {min(p99_ratios):.2f}-{max(p99_ratios):.2f})."
    )
for r in rows:
    sc, cc = r["server_core"], r["client_core"]
    # CPU time the core spent on anything but our process. When the kernel
    # keeps irq time out of tasks, the softirq share is ours too (loopback
    # TCP work for our own sends), so it is not counted as other work.
    own_irq = env.get("irq_time_accounting") is True
    other_s = sum(sc.values()) - (sc["irq"] if own_irq else 0) - r["server_cpu_util"]
    other_c = sum(cc.values()) - (cc["irq"] if own_irq else 0) - r["loadgen_cpu_util"]
    if other_s > 0.05 or other_c > 0.05:
        out.append(f"Note: against {r['server']}, other work (or hypervisor steal) took {100 * max(other_s, 0):.0f}% "
                   f"of the server's core and {100 * max(other_c, 0):.0f}% of loadgen's: the machine was not "
                   "quiet; rerun when it is before quoting these numbers.")
    rate = env.get("rate") or 0
    if rate and r["loadgen"].get("msgs_per_s", 0) < 0.98 * rate:
        out.append(f"Note: against {r['server']} the run fell short of the asked {rate:,} msgs/s: "
                   "latencies include the backlog.")
    if r["loadgen_cpu_util"] > 0.9:
        out.append(f"Note: loadgen used {100 * r['loadgen_cpu_util']:.0f}% of its core against {r['server']}: "
                   "the client may be the bottleneck there.")
    if r["loadgen_exit"] != 0 or r["server_exit"] != 0:
        out.append(f"Note: {r['server']}: loadgen exit {r['loadgen_exit']}, server exit {r['server_exit']}.")
text = "\n".join(out) + "\n"
open(sys.argv[2], "w").write(text)
print(text, end="")
EOF
mv "$jsonl" "$md" "$results_dir/"
echo "raw: $results_dir/${jsonl##*/}, table: $results_dir/${md##*/}" >&2
