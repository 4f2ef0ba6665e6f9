#!/usr/bin/env bash
# Print a core plan for the gateway: which CPUs run shards, which take NIC IRQs
# and housekeeping, and which run the loadgen when benchmarking on the same box.
# Changes nothing.
set -euo pipefail

# shellcheck source=lib/common.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: ${0##*/} [--cpus N [--smt K] | --cpu-list LIST] [--loadgen] [options]

Print a recommended split of CPUs between gateway shards, NIC IRQs and OS
housekeeping, and (with --loadgen) a load generator on the same host, with the
commands that apply it. Reads the CPUs this shell may use, their SMT siblings
and NUMA nodes unless --cpus describes another machine. Changes nothing.

The rule of thumb (the same shape as Seastar's perftune.py):
  <= 4 CPUs   "shared": no CPU can be spared; IRQs are spread over the shard
              CPUs and each shard's core also runs its NIC queue's softirq work
  5-16 cores  "dedicated": the first physical core (all its SMT threads) takes
              the IRQs and housekeeping; shards get the rest
  > 16 cores  one IRQ core per 16 cores, from the start of each NUMA node
These are starting points, not measurements. Watch the IRQ CPUs' softirq time
(mpstat -P ALL 1: %soft; or /proc/softirqs) under load: near 100% means give
IRQs more CPUs, mostly idle means give shards more.

Options:
  --cpus N             plan for a machine with N CPUs (0..N-1), one NUMA node
  --smt K              with --cpus: K threads per core, numbered the way Linux
                       numbers x86 siblings (cpu i and i + N/K share a core)
  --cpu-list LIST      plan within these CPUs of this machine (e.g. a cpuset)
  --loadgen            also reserve CPUs for a loadgen on this host
  --loadgen-cpus N     how many (default: half of what is left after
                       housekeeping, rounded down, at least 1)
  --irq-mode MODE      auto (default), shared or dedicated
  --one-per-core       one shard per physical core (leave SMT siblings idle:
                       lower latency per shard, fewer shards)
  --nic NAME           put NAME in the printed commands and check its queues
  --format text|env    env prints GATEWAY_SHARDS=... lines for scripts
  -h, --help           this text
EOF
}

n_cpus=""
smt=1
cpu_list=""
loadgen=0
loadgen_n=""
irq_mode=auto
one_per_core=0
nic=""
format=text
while (($# > 0)); do
    case $1 in
        --cpus) n_cpus=${2:?--cpus needs a number}; shift 2 ;;
        --smt) smt=${2:?--smt needs a number}; shift 2 ;;
        --cpu-list) cpu_list=${2:?--cpu-list needs a CPU list}; shift 2 ;;
        --loadgen) loadgen=1; shift ;;
        --loadgen-cpus) loadgen=1; loadgen_n=${2:?--loadgen-cpus needs a number}; shift 2 ;;
        --irq-mode) irq_mode=${2:?--irq-mode needs auto, shared or dedicated}; shift 2 ;;
        --one-per-core) one_per_core=1; shift ;;
        --nic) nic=${2:?--nic needs a NIC name}; shift 2 ;;
        --format) format=${2:?--format needs text or env}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
case $irq_mode in auto | shared | dedicated) ;; *) die "--irq-mode must be auto, shared or dedicated" ;; esac
case $format in text | env) ;; *) die "--format must be text or env" ;; esac
[[ -n $n_cpus && -n $cpu_list ]] && die "--cpus and --cpu-list exclude each other"
if ! is_uint "$smt" || ((smt < 1)); then die "--smt must be 1 or more"; fi
[[ -z $loadgen_n ]] || { is_uint "$loadgen_n" && ((loadgen_n >= 1)); } || die "--loadgen-cpus must be 1 or more"

# --- Topology: cpus[], core_of[cpu] (first CPU of its core), node_of[cpu] --------
declare -a cpus=()
declare -A core_of=() node_of=()
if [[ -n $n_cpus ]]; then
    if ! is_uint "$n_cpus" || ((n_cpus < 1)); then die "--cpus must be a positive number of CPUs"; fi
    ((n_cpus % smt == 0)) || die "--cpus $n_cpus is not a multiple of --smt $smt"
    per=$((n_cpus / smt))
    for ((c = 0; c < n_cpus; c++)); do
        cpus+=("$c")
        core_of[$c]=$((c % per))
        node_of[$c]=0
    done
    source_desc="a hypothetical machine (--cpus $n_cpus --smt $smt)"
else
    list=${cpu_list:-$(allowed_cpulist)}
    mapfile -t cpus < <(expand_cpulist "$list") || true
    ((${#cpus[@]} > 0)) || die "'$list' is not a CPU list"
    mapfile -t online < <(expand_cpulist "$(online_cpulist)")
    for c in "${cpus[@]}"; do
        in_list "$c" "${online[@]}" || die "CPU $c is not online (online: $(online_cpulist))"
        sib=$(cat "$SYS_CPU/cpu$c/topology/thread_siblings_list" 2>/dev/null || echo "$c")
        core_of[$c]=${sib%%[,-]*} # first CPU of the sibling list
        node_of[$c]=0
    done
    for d in "$SYS_NODE"/node[0-9]*; do
        [[ -r $d/cpulist ]] || continue
        for c in $(expand_cpulist "$(cat "$d/cpulist")" 2>/dev/null); do
            [[ -n ${core_of[$c]:-} ]] && node_of[$c]=${d##*node}
        done
    done
    source_desc="this machine$([[ -n $cpu_list ]] && echo " (--cpu-list $cpu_list)" || echo ", the CPUs this shell may use")"
fi

P=${#cpus[@]}
mapfile -t cores < <(for c in "${cpus[@]}"; do echo "${core_of[$c]}"; done | sort -n -u)
C=${#cores[@]}
mapfile -t nodes < <(for c in "${cpus[@]}"; do echo "${node_of[$c]}"; done | sort -n -u)

first_cpu_of_core() {
    local c
    for c in "${cpus[@]}"; do
        if [[ ${core_of[$c]} == "$1" ]]; then
            echo "$c"
            return 0
        fi
    done
}

cpus_of_core() { # core id -> its CPUs within our set
    local c
    for c in "${cpus[@]}"; do
        if [[ ${core_of[$c]} == "$1" ]]; then echo "$c"; fi
    done
}

# --- Plan ---------------------------------------------------------------------------
mode=$irq_mode
if [[ $mode == auto ]]; then
    if ((P <= 4)); then mode=shared; else mode=dedicated; fi
fi
if [[ $mode == dedicated ]] && ((C < 2)); then
    die "--irq-mode dedicated needs at least 2 physical cores (have $C)"
fi

irq_cores=()
if [[ $mode == dedicated ]]; then
    want=$(((C + 15) / 16))
    # Spread IRQ cores over NUMA nodes: the first core(s) of each node.
    per_node=$(((want + ${#nodes[@]} - 1) / ${#nodes[@]}))
    for n in "${nodes[@]}"; do
        k=0
        for core in "${cores[@]}"; do
            ((k < per_node)) || break
            first=$(first_cpu_of_core "$core")
            [[ ${node_of[$first]} == "$n" ]] || continue
            irq_cores+=("$core")
            k=$((k + 1))
        done
    done
fi

declare -A is_irq_core=()
for core in "${irq_cores[@]}"; do is_irq_core[$core]=1; done
rest_cores=()
for core in "${cores[@]}"; do
    [[ -n ${is_irq_core[$core]:-} ]] || rest_cores+=("$core")
done

# Loadgen takes whole cores from the end, leaving the gateway the low ones.
loadgen_cores=()
if ((loadgen == 1)); then
    avail=${#rest_cores[@]}
    ((avail >= 2)) || die "--loadgen needs at least 2 cores outside the IRQ cores (have $avail); try --irq-mode shared"
    n=${loadgen_n:-$((avail / 2))}
    ((n >= 1)) || n=1
    ((n < avail)) || die "--loadgen-cpus $n leaves no core for the gateway (cores available: $avail)"
    loadgen_cores=("${rest_cores[@]: -n}")
    rest_cores=("${rest_cores[@]:0:avail-n}")
fi

collect() { # cores... -> CPUs (all threads, or the first with --one-per-core for shards)
    local core
    for core in "$@"; do cpus_of_core "$core"; done
}
mapfile -t irq_cpus < <(collect "${irq_cores[@]}")
mapfile -t lg_cpus < <(collect "${loadgen_cores[@]}")
mapfile -t shard_cpus < <(
    for core in "${rest_cores[@]}"; do
        if ((one_per_core == 1)); then first_cpu_of_core "$core"; else cpus_of_core "$core"; fi
    done
)
shard_list=$(compress_cpulist "${shard_cpus[@]}")
n_shards=${#shard_cpus[@]}
if [[ $mode == shared ]]; then
    irq_list=$shard_list
else
    irq_list=$(compress_cpulist "${irq_cpus[@]}")
fi
lg_list=""
((${#lg_cpus[@]} > 0)) && lg_list=$(compress_cpulist "${lg_cpus[@]}")
nic_name=${nic:-NIC}

if [[ $format == env ]]; then
    echo "GATEWAY_SHARDS=$n_shards"
    echo "GATEWAY_CPUS=$shard_list"
    echo "IRQ_CPUS=$irq_list"
    echo "IRQ_MODE=$mode"
    echo "LOADGEN_CPUS=$lg_list"
    exit 0
fi

# --- Report -------------------------------------------------------------------------
all_list=$(compress_cpulist "${cpus[@]}")
echo "corecast core plan for $P CPU(s) ($all_list): $C physical core(s), ${#nodes[@]} NUMA node(s); from $source_desc"
case $mode in
    shared) echo "IRQ mode: shared - too few CPUs to set one aside; NIC IRQs run on the shard CPUs" ;;
    dedicated) echo "IRQ mode: dedicated - ${#irq_cores[@]} core(s) for NIC IRQs and housekeeping, the rest for shards" ;;
esac
col_w=14
for l in "$shard_list" "$irq_list" "$lg_list"; do
    ((${#l} + 1 > col_w)) && col_w=$((${#l} + 1))
done
prow() { printf "  %-26s %-${col_w}s %s\n" "$@"; }
echo
prow ROLE CPUS NOTE
prow "gateway shards" "$shard_list" "$n_shards shard(s), one per CPU$( ((one_per_core == 1)) && echo ', SMT siblings left idle')"
if [[ $mode == shared ]]; then
    prow "NIC IRQs + housekeeping" "$irq_list" "shared with the shards"
else
    prow "NIC IRQs + housekeeping" "$irq_list" "keep other daemons here too (systemd CPUAffinity=)"
fi
if ((loadgen == 1)); then
    prow "loadgen (same host)" "$lg_list" "${#lg_cpus[@]} CPU(s), whole cores, disjoint from the shards"
fi

echo
echo "Commands:"
echo "  gateway --shards $n_shards --cpus $shard_list ..."
if ((loadgen == 1)); then
    echo "  taskset -c $lg_list loadgen ...      (or the loadgen's own CPU option, if it has one)"
fi
if [[ -n $nic ]] && nic_exists "$nic" && ! nic_is_hw "$nic"; then
    echo "  (no IRQ commands: $nic is a virtual device)"
else
    echo "  tuning/irq-affinity.sh $nic_name --cpus $irq_list --apply"
    if [[ $mode == dedicated ]]; then
        echo "  tuning/rps-xps.sh $nic_name --cpus $shard_list --apply   (optional: moves protocol work off the IRQ CPUs if they saturate)"
    fi
    if [[ $mode == dedicated ]]; then
        echo "  irqbalance: stop it, or ban the shard CPUs: IRQBALANCE_BANNED_CPULIST=$shard_list"
    else
        echo "  irqbalance: stop it (it would move the IRQs again)"
    fi
fi

notes=()
if ((${#nodes[@]} > 1)); then
    per_node_cmds=""
    for n in "${nodes[@]}"; do
        mine=()
        for c in "${shard_cpus[@]}"; do
            if [[ ${node_of[$c]} == "$n" ]]; then mine+=("$c"); fi
        done
        ((${#mine[@]} > 0)) || continue
        per_node_cmds+=" node $n: gateway --shards ${#mine[@]} --cpus $(compress_cpulist "${mine[@]}");"
    done
    notes+=("${#nodes[@]} NUMA nodes: a shard that serves a NIC on another node pays for every packet crossing the interconnect. Consider one gateway process per node (README: several processes per host):${per_node_cmds%;}.")
fi
if [[ -n $nic ]]; then
    if nic_exists "$nic"; then
        n_rx=$(nic_queues "$nic" rx | wc -l)
        if ! nic_is_hw "$nic"; then
            notes+=("$nic is a virtual device: it has no IRQs, and irq-affinity.sh will say so. On loopback, packet work runs on the sending CPUs (the shards and the loadgen).")
        elif [[ $mode == shared ]] && ((n_rx < n_shards)); then
            notes+=("$nic has $n_rx RX queue(s) for $n_shards shard(s): raise them (ethtool -L $nic combined $n_shards) or use rps-xps.sh to share the work.")
        else
            notes+=("$nic has $n_rx RX queue(s).")
        fi
    else
        notes+=("there is no NIC named '$nic' here (NICs here: $(list_nics)).")
    fi
fi
if ((loadgen == 1)); then
    notes+=("Benchmarking on one host: loadgen and gateway share caches, memory bandwidth and the kernel's loopback path, so results compare builds and settings; they do not measure a host's capacity. A loadgen does about as much socket work as the gateway it drives, hence the half/half start; if the loadgen's CPUs idle while the shards are saturated, give the gateway more.")
    if ((P <= 2)); then
        notes+=("With $P CPU(s) the split is one CPU each: expect noisy numbers.")
    fi
fi
if ((P == 1)); then
    notes+=("One CPU: one shard, everything shared. Fine for functional tests only.")
fi
if ((${#notes[@]} > 0)); then
    echo
    echo "Notes:"
    for n in "${notes[@]}"; do
        printf '%s\n' "$n" | fold -s -w 86 | sed '1s/^/  - /; 2,$s/^/    /'
    done
fi
