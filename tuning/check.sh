#!/usr/bin/env bash
# Read-only check of a host (and the limits of the shell that will start the
# gateway) against the corecast profile. Changes nothing.
set -euo pipefail

# shellcheck source=lib/common.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: ${0##*/} [options]

Compare this host's kernel settings and this shell's process limits with the
corecast profile and print a table: OK, LOW (below what the profile needs),
DIFF (set differently than the profile), MISSING (not on this kernel or in
this namespace), FAIL (the gateway will not start). Every row that is not OK
says how to fix it. Reads only; writes nothing.

Options:
  --profile FILE       sysctl profile (default: $DEFAULT_PROFILE)
  --conns N            connections one gateway process should hold
                       (default: 100000); sizes the fd and memory checks
  --shards N           shards per gateway process (default: the CPUs this
                       shell may use, like the gateway's own default)
  --io-memory-kib N    registered io_uring buffer per ring, KiB (default 1024);
                       the gateway has 3 rings per shard (glommio's main,
                       latency and poll rings)
  --pid PID            check the limits of a running process (e.g. the
                       gateway) instead of this shell's
  --no-probe           skip the io_uring_setup probe (needs python3)
  --strict             exit 1 if any row is LOW, DIFF or FAIL
  -h, --help           this text

Exit status: 0 (even with LOW rows) unless --strict; 2 on bad usage.
EOF
}

profile=$DEFAULT_PROFILE
conns=100000
shards=""
io_mem_kib=1024
pid=""
strict=0
probe=1
while (($# > 0)); do
    case $1 in
        --profile) profile=${2:?--profile needs a file}; shift 2 ;;
        --conns) conns=${2:?--conns needs a number}; shift 2 ;;
        --shards) shards=${2:?--shards needs a number}; shift 2 ;;
        --io-memory-kib) io_mem_kib=${2:?--io-memory-kib needs a number}; shift 2 ;;
        --pid) pid=${2:?--pid needs a process id}; shift 2 ;;
        --no-probe) probe=0; shift ;;
        --strict) strict=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
if ! is_uint "$conns" || ((conns == 0)); then die "--conns must be a positive integer, got '$conns'"; fi
is_uint "$io_mem_kib" || die "--io-memory-kib must be an integer, got '$io_mem_kib'"
[[ -r $profile ]] || die "profile $profile: not readable (pass --profile FILE)"
if [[ -z $shards ]]; then
    shards=$(expand_cpulist "$(allowed_cpulist)" | wc -l)
fi
if ! is_uint "$shards" || ((shards == 0)); then die "--shards must be a positive integer, got '$shards'"; fi
if [[ -n $pid ]]; then
    [[ -r /proc/$pid/limits ]] || die "--pid $pid: /proc/$pid/limits is not readable (no such process, or not yours)"
fi

problems=0
note_problem() { problems=$((problems + 1)); }

trow() { printf '  %-34s %-24s %-24s %s\n' "$@"; }
row() { # NAME CURRENT WANT STATUS [FIX...]
    local name=$1 cur=$2 want=$3 status=$4
    shift 4
    trow "$name" "$cur" "$want" "$status"
    local line
    for line in "$@"; do
        if [[ $line == note:* ]]; then
            printf '  %-34s   %s\n' "" "$line"
        else
            printf '  %-34s   fix: %s\n' "" "$line"
        fi
    done
    case $status in LOW | DIFF | FAIL) note_problem ;; esac
}
section() { printf '\n%s\n' "$1"; }
kv() { printf '  %-24s %s\n' "$1" "$2"; }

# --- Host --------------------------------------------------------------------
kernel=$(uname -r)
section "Host $(uname -n): Linux $kernel $(uname -m), $(human_kib "$(mem_total_kib)") RAM"

online=$(online_cpulist)
allowed=$(allowed_cpulist)
n_online=$(expand_cpulist "$online" | wc -l)
n_allowed=$(expand_cpulist "$allowed" | wc -l)
kv "CPUs online" "$online ($n_online)"
kv "CPUs this shell may use" "$allowed ($n_allowed)$([[ $allowed != "$online" ]] && echo '  (cpuset/taskset restricts it: the gateway defaults to these)')"

smt=""
if [[ -r $SYS_CPU/cpu0/topology/thread_siblings_list ]]; then
    sib=$(cat "$SYS_CPU/cpu0/topology/thread_siblings_list")
    n_sib=$(expand_cpulist "$sib" | wc -l)
    smt="$n_sib thread(s) per core (cpu0 siblings: $sib)"
fi
[[ -n $smt ]] && kv "SMT" "$smt"

nodes=()
for d in "$SYS_NODE"/node[0-9]*; do
    [[ -d $d ]] && nodes+=("${d##*/}:$(cat "$d/cpulist" 2>/dev/null || echo '?')")
done
if ((${#nodes[@]} == 0)); then
    kv "NUMA nodes" "not reported (no $SYS_NODE); treat as 1"
elif ((${#nodes[@]} == 1)); then
    kv "NUMA nodes" "1 (${nodes[0]})"
else
    kv "NUMA nodes" "${#nodes[@]} (${nodes[*]}): keep each gateway process's shards, and its NIC's IRQs, on one node; pin-plan.sh"
fi

isolated=$(cat "$SYS_CPU/isolated" 2>/dev/null || true)
nohz=$(cat "$SYS_CPU/nohz_full" 2>/dev/null || true)
[[ $nohz == "(null)" ]] && nohz=""
if [[ -n $isolated ]]; then
    kv "Isolated CPUs" "$isolated (isolcpus=): the scheduler will not balance onto them; pin shards there with --cpus"
else
    kv "Isolated CPUs" "none (fine: shards are pinned with --cpus either way; isolcpus= only keeps other tasks off)"
fi
[[ -n $nohz ]] && kv "nohz_full CPUs" "$nohz"

k_major=${kernel%%.*}
k_rest=${kernel#*.}
k_minor=${k_rest%%[!0-9]*}
if ((k_major < 5 || (k_major == 5 && k_minor < 8))); then
    row "kernel" "$kernel" ">= 5.8" FAIL "glommio needs Linux 5.8 or newer (io_uring probes); upgrade the kernel"
elif ((k_major == 5 && k_minor < 12)); then
    kv "Kernel" "$kernel (>= 5.8: OK for glommio; before 5.12 the rings themselves also count against memlock)"
else
    kv "Kernel" "$kernel (>= 5.8 needed by glommio: OK)"
fi

# io_uring availability
iou=$(sysctl_read kernel.io_uring_disabled 2>/dev/null || echo "absent")
case $iou in
    absent) kv "io_uring (sysctl)" "kernel.io_uring_disabled not present (kernel < 6.6): allowed unless seccomp blocks it" ;;
    0) kv "io_uring (sysctl)" "kernel.io_uring_disabled = 0: allowed for all processes" ;;
    1)
        grp=$(sysctl_read kernel.io_uring_group 2>/dev/null || echo "?")
        read -r -a my_gids <<<"$(id -G)"
        if have_cap "$CAP_SYS_ADMIN" || in_list "$grp" "${my_gids[@]}"; then
            kv "io_uring (sysctl)" "kernel.io_uring_disabled = 1: allowed only for CAP_SYS_ADMIN or group $grp (this shell qualifies)"
        else
            row "io_uring (sysctl)" "disabled=1" "0, or group $grp" FAIL \
                "run the gateway in group $grp (kernel.io_uring_group), or: sysctl -w kernel.io_uring_disabled=0"
        fi
        ;;
    2) row "io_uring (sysctl)" "disabled=2" "0" FAIL "io_uring is off for everyone: sysctl -w kernel.io_uring_disabled=0 (host admin)" ;;
    *) kv "io_uring (sysctl)" "kernel.io_uring_disabled = $iou" ;;
esac

seccomp=$(awk '/^Seccomp:/ { print $2 }' /proc/self/status 2>/dev/null || true)
if [[ $seccomp == 2 ]]; then
    kv "seccomp" "a filter is active (container?). Docker >= 25 and containerd's default profiles block io_uring_*: the probe below tells"
fi

if ((probe == 1)); then
    if command -v python3 >/dev/null 2>&1; then
        # io_uring_setup(2) is syscall 425 on every architecture since 5.1.
        # One-entry ring, closed at once.
        res=$(python3 - <<'PY' 2>/dev/null || echo "error"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 1, params)
if fd >= 0:
    os.close(fd)
    print("ok")
else:
    print(os.strerror(ctypes.get_errno()))
PY
)
        case $res in
            ok) kv "io_uring probe" "io_uring_setup works in this process" ;;
            *"not permitted"*)
                row "io_uring probe" "EPERM" "works" FAIL \
                    "blocked by kernel.io_uring_disabled or a seccomp profile: allow io_uring_setup/enter/register (docker run --security-opt seccomp=PROFILE.json)" ;;
            *"not implemented"*)
                row "io_uring probe" "ENOSYS" "works" FAIL "kernel built without io_uring (CONFIG_IO_URING=n)" ;;
            *) kv "io_uring probe" "inconclusive: $res" ;;
        esac
    else
        kv "io_uring probe" "skipped (no python3)"
    fi
fi

for marker in /.dockerenv /run/.containerenv; do
    if [[ -e $marker ]]; then
        kv "Container" "probably ($marker exists): kernel settings belong to the host; net.* keys may be per-container (docker run --sysctl)"
        break
    fi
done
probe_key=$(sysctl_path net.core.somaxconn)
if reason=$(predict_writable "$probe_key"); then
    kv "/proc/sys" "writable here (apply-sysctl.sh --apply can set keys)"
else
    kv "/proc/sys" "not writable here ($(reason_short "$reason")): $(reason_long "$reason")"
fi

# --- Process limits ------------------------------------------------------------
# Soft/hard values of one limit, from /proc/PID/limits or this shell's ulimit.
# "unlimited" comes back as -1. Memlock in KiB.
limit_of() { # nofile|memlock -> "soft hard"
    local which=$1 s h
    if [[ -n $pid ]]; then
        local label
        case $which in nofile) label="Max open files" ;; memlock) label="Max locked memory" ;; esac
        read -r s h < <(awk -v l="$label" 'index($0, l) == 1 {
            rest = substr($0, length(l) + 1); split(rest, f, " "); print f[1], f[2] }' "/proc/$pid/limits")
        if [[ $which == memlock ]]; then
            [[ $s == unlimited ]] || s=$((s / 1024))
            [[ $h == unlimited ]] || h=$((h / 1024))
        fi
    else
        case $which in
            nofile) s=$(ulimit -Sn); h=$(ulimit -Hn) ;;
            memlock) s=$(ulimit -Sl); h=$(ulimit -Hl) ;;
        esac
    fi
    [[ $s == unlimited ]] && s=-1
    [[ $h == unlimited ]] && h=-1
    echo "$s $h"
}
fmt_limit() { if [[ $1 == -1 ]]; then echo unlimited; else echo "$1${2:-}"; fi; }
ge() { [[ $1 == -1 ]] || (($1 >= $2)); } # limit value (maybe unlimited) >= need

who=${pid:+pid $pid}
who=${who:-this shell, pid $$}
section "Process limits ($who; the gateway inherits them from the shell or unit that starts it)"
trow ITEM CURRENT NEEDED STATUS

# Per-process fds beyond connections: per shard a listener, 3 rings, eventfds,
# plus stdio, logs, the mesh and storage sockets. A generous round number.
fd_overhead=$((64 + 8 * shards))
need_fd=$((conns + fd_overhead))
read -r nofile_s nofile_h < <(limit_of nofile)
nr_open=$(sysctl_read fs.nr_open 2>/dev/null || echo 1048576)
can_raise_hard=0
have_cap "$CAP_SYS_RESOURCE" && can_raise_hard=1

procs_needed() { # connections per process with hard limit H -> processes for $conns
    local h=$1 per
    per=$((h - fd_overhead))
    ((per > 0)) || { echo "?"; return; }
    echo $(((conns + per - 1) / per))
}

if ge "$nofile_s" "$need_fd"; then
    row "nofile (soft, ulimit -n)" "$(fmt_limit "$nofile_s")" "$need_fd" OK
elif ge "$nofile_h" "$need_fd"; then
    row "nofile (soft, ulimit -n)" "$(fmt_limit "$nofile_s")" "$need_fd" LOW \
        "ulimit -n $need_fd in the shell that starts the gateway (the hard limit allows it; no privilege needed)"
else
    row "nofile (soft, ulimit -n)" "$(fmt_limit "$nofile_s")" "$need_fd" LOW "raise the hard limit (next row), then ulimit -n $need_fd"
fi

if ge "$nofile_h" "$need_fd"; then
    row "nofile (hard, ulimit -Hn)" "$(fmt_limit "$nofile_h")" "$need_fd" OK
else
    fixes=()
    if ((need_fd > nr_open)); then
        fixes+=("fs.nr_open is $nr_open: raise it first (apply-sysctl.sh --apply), no process can have more")
    fi
    fixes+=("systemd: LimitNOFILE=$need_fd in the unit; docker: --ulimit nofile=$need_fd:$need_fd; login shells: 'nofile' in /etc/security/limits.conf")
    if ((can_raise_hard == 1)); then
        fixes+=("or in this shell: ulimit -Hn $need_fd && ulimit -n $need_fd (this shell has CAP_SYS_RESOURCE)")
    else
        fixes+=("note: this shell lacks CAP_SYS_RESOURCE, so it cannot raise its own hard limit")
    fi
    fixes+=("or run $(procs_needed "$nofile_h") gateway processes of ~$((nofile_h - fd_overhead)) connections each (README: several processes per host)")
    row "nofile (hard, ulimit -Hn)" "$(fmt_limit "$nofile_h")" "$need_fd" LOW "${fixes[@]}"
fi

# Memlock: glommio refuses to start an executor below 512 KiB (soft). Each
# shard registers its io_uring buffer with its 3 rings, and io_uring charges
# registered buffers per ring to the *user* (all processes of the uid share
# the budget) unless the process has CAP_IPC_LOCK. Since 5.12 the rings
# themselves are charged to the memory cgroup instead.
read -r ml_s ml_h < <(limit_of memlock)
need_ml=$((shards * 3 * io_mem_kib))
ml_note="$shards shard(s) x 3 rings x ${io_mem_kib} KiB"
if ! ge "$ml_s" 512; then
    row "memlock (soft, ulimit -l)" "$(fmt_limit "$ml_s" " KiB")" ">= 512 KiB" FAIL \
        "glommio refuses to start an executor below 512 KiB: ulimit -l $need_ml (systemd LimitMEMLOCK=, docker --ulimit memlock=)"
elif ge "$ml_s" "$need_ml"; then
    row "memlock (soft, ulimit -l)" "$(fmt_limit "$ml_s" " KiB")" "$need_ml KiB" OK
elif have_cap "$CAP_IPC_LOCK"; then
    row "memlock (soft, ulimit -l)" "$(fmt_limit "$ml_s" " KiB")" "$need_ml KiB" OK
    printf '  %-34s   note: below %s, but this shell has CAP_IPC_LOCK, which exempts io_uring buffers\n' "" "$ml_note"
else
    fix="ulimit -l $need_ml"
    ge "$ml_h" "$need_ml" || fix="raise the hard limit: systemd LimitMEMLOCK=$((need_ml * 1024)), docker --ulimit memlock=$((need_ml * 1024)):$((need_ml * 1024)), limits.conf 'memlock'"
    row "memlock (soft, ulimit -l)" "$(fmt_limit "$ml_s" " KiB")" "$need_ml KiB" LOW \
        "$fix ($ml_note). Below it the gateway still starts, glommio logs 'registering buffers ... Skipping' and uses unregistered buffers" \
        "note: the budget is per user: N gateway processes under one uid need N x this"
fi
if ge "$ml_h" "$need_ml"; then
    row "memlock (hard, ulimit -Hl)" "$(fmt_limit "$ml_h" " KiB")" "$need_ml KiB" OK
else
    row "memlock (hard, ulimit -Hl)" "$(fmt_limit "$ml_h" " KiB")" "$need_ml KiB" "$(have_cap "$CAP_IPC_LOCK" && echo OK || echo LOW)" \
        "$( ((can_raise_hard == 1)) && echo "ulimit -Hl $need_ml (this shell has CAP_SYS_RESOURCE)" || echo "systemd LimitMEMLOCK= / docker --ulimit memlock= / limits.conf; this shell cannot raise it (no CAP_SYS_RESOURCE)")"
fi

# --- Kernel settings -------------------------------------------------------------
section "Kernel settings vs $(basename -- "$profile") (tcp_mem scaled to this host's RAM)"
trow KEY CURRENT PROFILE STATUS
ref_gib=$(profile_tcp_mem_ref_gib "$profile")
while IFS=$'\t' read -r key want; do
    optional=0
    if [[ $key == -* ]]; then optional=1; key=${key#-}; fi
    rc=0
    cur=$(sysctl_read "$key") || rc=$?
    if ((rc == 1)); then
        if ((optional == 1)); then
            row "$key" "(not present)" "$want" OK
            printf '  %-34s   note: optional key; its module is not loaded or it is hidden in this namespace\n' ""
        else
            row "$key" "(not present)" "$want" MISSING \
                "note: $(reason_long "$(explain_write_error "No such file" "$(sysctl_path "$key")")")"
        fi
        continue
    elif ((rc != 0)); then
        row "$key" "(unreadable)" "$want" MISSING "run as root to read it"
        continue
    fi
    target=$(sysctl_target "$key" "$want" "$want" 1 1 "$ref_gib")
    if sysctl_satisfies "$(sysctl_policy "$key")" "$cur" "$target"; then
        row "$key" "$cur" "$target" OK
    else
        status=DIFF
        case $(sysctl_policy "$key") in '>'* | R) status=LOW ;; esac
        # tcp_mem: only the "high" field matters for being LOW
        row "$key" "$cur" "$target" "$status" "sysctl -w $key='$(sysctl_target "$key" "$want" "$cur" 1 0 "$ref_gib")'  (or: apply-sysctl.sh --apply)"
    fi
done < <(profile_entries "$profile")

# --- Derived capacity ------------------------------------------------------------
section "Capacity for --conns $conns per process (estimates from this kernel's numbers, not measurements)"
if [[ $nofile_h != -1 ]]; then
    kv "fd-limited" "one process holds ~$((nofile_h - fd_overhead)) connections at hard nofile $nofile_h; $(procs_needed "$nofile_h") process(es) for $conns"
fi

# Kernel objects per idle connection, from /proc/slabinfo when readable.
slab_size() { awk -v n="$1" '$1 == n { print $4; exit }' /proc/slabinfo 2>/dev/null; }
if [[ -r /proc/slabinfo ]]; then
    per=0
    parts=()
    for s in TCP sock_inode_cache filp dentry eventpoll_epi eventpoll_pwq; do
        sz=$(slab_size "$s")
        if [[ -n $sz ]]; then
            per=$((per + sz))
            parts+=("$s $sz")
        fi
    done
    total_kib=$((conns * per / 1024))
    user_kib=$((conns * 4))
    joined=$(printf ' + %s' "${parts[@]}")
    kv "kernel per idle conn" "~$per B (${joined# + }), empty socket buffers"
    kv "for $conns conns" "kernel ~$(human_kib "$total_kib") + gateway <= 4 KiB each ~$(human_kib "$user_kib") = ~$(human_kib $((total_kib + user_kib))) of $(human_kib "$(mem_total_kib)") RAM, before queued data"
else
    kv "kernel per idle conn" "/proc/slabinfo not readable (needs root); Linux 6.18 x86_64: ~3.6-3.9 KiB, see README"
fi

if tm=$(sysctl_read net.ipv4.tcp_mem 2>/dev/null); then
    read -r _ tm_p tm_h <<<"$tm"
    kv "tcp_mem now" "pressure at $(human_kib $((tm_p * 4))), hard limit $(human_kib $((tm_h * 4))) for all queued TCP data: $((tm_h * 4 * 1024 / conns)) B per connection at $conns"
fi

if pr=$(sysctl_read net.ipv4.ip_local_port_range 2>/dev/null); then
    read -r lo hi <<<"$pr"
    ports=$((hi - lo + 1))
    kv "ephemeral ports" "$ports per (source IP, gateway IP:port): a same-host loadgen needs $(((conns + ports - 1) / ports)) source address(es) for $conns"
fi

if ct_max=$(sysctl_read net.netfilter.nf_conntrack_max 2>/dev/null); then
    ct_count=$(sysctl_read net.netfilter.nf_conntrack_count 2>/dev/null || echo "?")
    if ((ct_max < conns)); then
        row "conntrack (loaded)" "$ct_count used / $ct_max" ">= $conns" LOW \
            "every tracked connection takes an entry: raise net.netfilter.nf_conntrack_max, or exempt the gateway port (nftables notrack)"
    else
        kv "conntrack (loaded)" "$ct_count used / max $ct_max: enough for $conns"
    fi
fi

if irqbalance_running; then
    kv "irqbalance" "running: it will move IRQs that irq-affinity.sh sets; stop it or ban the shard CPUs (IRQBALANCE_BANNED_CPULIST)"
fi

printf '\n'
if ((problems == 0)); then
    echo "Result: all checks OK."
else
    echo "Result: $problems row(s) need attention (LOW/DIFF/FAIL above)."
fi
if ((strict == 1 && problems > 0)); then
    exit 1
fi
exit 0
