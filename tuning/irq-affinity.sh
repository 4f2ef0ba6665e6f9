#!/usr/bin/env bash
# Show a NIC's IRQs and where they run; spread its queue IRQs over a CPU list.
# Dry run unless --apply.
set -euo pipefail

# shellcheck source=lib/common.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: ${0##*/} NIC [--cpus LIST] [--apply] [--include-control]

Without --cpus: list the NIC's IRQs with their current CPU affinity.
With --cpus: also plan one CPU per queue IRQ, round-robin over LIST (the
kernel's list syntax, e.g. 0-1 or 0,8), and print the plan. With --apply,
write it to /proc/irq/N/smp_affinity_list.

Control vectors (names with config, async, misc, ...) stay where the driver
put them unless --include-control, which puts them on the first CPU of LIST.

Which CPUs: pin-plan.sh prints a plan that keeps IRQs off the gateway's shard
CPUs on larger hosts, or shares them on small ones.

Options:
  --cpus LIST          CPUs to spread the queue IRQs over
  --apply              write the plan (needs root, and a writable /proc/irq)
  --include-control    move control vectors too
  -h, --help           this text

Queue N's vectors go to LIST[N mod len(LIST)], N read from the vector's name
(virtio2-input.3, eth0-TxRx-3, mlx5_comp3@pci...), so a queue's RX and TX
vectors share a CPU on drivers that split them.

Exit status: 0 on success or a clean report (a virtual NIC such as lo, which
has no IRQs, included); 1 when the NIC does not exist, or --apply found no
IRQs on a hardware NIC or could not set one; 2 on bad usage.
EOF
}

nic=""
cpus_arg=""
apply=0
include_control=0
while (($# > 0)); do
    case $1 in
        --cpus) cpus_arg=${2:?--cpus needs a CPU list}; shift 2 ;;
        --apply) apply=1; shift ;;
        --include-control) include_control=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *)
            [[ -z $nic ]] || die "one NIC at a time (got '$nic' and '$1')"
            nic=$1
            shift
            ;;
    esac
done
[[ -n $nic ]] || { usage >&2; die "name a NIC (NICs here: $(list_nics))"; }
if ((apply == 1)) && [[ -z $cpus_arg ]]; then
    die "--apply needs --cpus LIST (what to spread the IRQs over)"
fi

if ! nic_exists "$nic"; then
    printf "%s: no NIC named '%s' here (NICs here: %s)\n" "${0##*/}" "$nic" "$(list_nics)" >&2
    exit 1
fi

cpus=()
if [[ -n $cpus_arg ]]; then
    mapfile -t cpus < <(expand_cpulist "$cpus_arg") || true
    ((${#cpus[@]} > 0)) || die "--cpus '$cpus_arg' is not a CPU list (examples: 2-7, 0,2,4)"
    mapfile -t online < <(expand_cpulist "$(online_cpulist)")
    for c in "${cpus[@]}"; do
        in_list "$c" "${online[@]}" ||
            die "CPU $c in --cpus is not online (online: $(online_cpulist))"
    done
fi

if ! nic_is_hw "$nic"; then
    echo "$nic is a virtual device (no device behind $SYS_NET/$nic): it has no hardware IRQs to spread."
    if [[ $nic == lo ]]; then
        echo "Loopback packets are processed on the CPU that sends them; to move that work, see rps-xps.sh."
    else
        echo "Spread the IRQs of the physical NIC(s) beneath it instead (NICs here: $(list_nics))."
    fi
    exit 0
fi

dev=$(readlink -f -- "$SYS_NET/$nic/device")
driver=$(basename -- "$(readlink -f -- "$SYS_NET/$nic/device/driver" 2>/dev/null || echo unknown)")
numa=$(cat "$dev/numa_node" 2>/dev/null || cat "$(dirname -- "$dev")/numa_node" 2>/dev/null || echo -1)
n_rx=$(nic_queues "$nic" rx | wc -l)
n_tx=$(nic_queues "$nic" tx | wc -l)

mapfile -t irq_lines < <(nic_irqs "$nic")
echo "$nic: driver $driver, device ${dev##*/}, $n_rx RX / $n_tx TX queue(s), NUMA node $([[ $numa == -1 ]] && echo "not reported" || echo "$numa")"
if ((${#irq_lines[@]} == 0)); then
    echo "$nic: no IRQs found (no MSI/MSI-X vectors on ${dev##*/}, no legacy IRQ, no /proc/interrupts line naming it)."
    echo "The link may be down with its vectors released, or the driver may poll. Nothing to spread."
    ((apply == 1)) && exit 1
    exit 0
fi

if [[ $numa != -1 && ${#cpus[@]} -gt 0 && -r $SYS_NODE/node$numa/cpulist ]]; then
    node_cpus=$(cat "$SYS_NODE/node$numa/cpulist")
    mapfile -t node_list < <(expand_cpulist "$node_cpus")
    for c in "${cpus[@]}"; do
        if ! in_list "$c" "${node_list[@]}"; then
            warn "CPU $c is not on $nic's NUMA node $numa (CPUs $node_cpus): packets will cross the interconnect"
            break
        fi
    done
fi

irq_file() { printf '%s/%s/%s\n' "$PROC_IRQ" "$1" "$2"; }

echo
printf '  %-6s %-28s %-8s %-10s %-10s %s\n' IRQ NAME KIND AFFINITY EFFECTIVE PLANNED
plan_irqs=()
plan_cpus=()
i=0
for line in "${irq_lines[@]}"; do
    irq=${line%%$'\t'*}
    name=${line#*$'\t'}
    kind=queue
    irq_is_control "$name" && kind=control
    aff=$(cat "$(irq_file "$irq" smp_affinity_list)" 2>/dev/null || echo "?")
    eff=$(cat "$(irq_file "$irq" effective_affinity_list)" 2>/dev/null || echo "-")
    planned="-"
    if ((${#cpus[@]} > 0)); then
        if [[ $kind == queue ]]; then
            # Queue N's vectors (RX and TX on drivers that split them) share a
            # CPU: N from the last number in the name ("virtio2-input.3",
            # "eth0-TxRx-3", "mlx5_comp3@pci:..."); else the running count.
            base=${name%%@*}
            if [[ $base =~ ([0-9]+)[^0-9]*$ ]]; then
                qidx=$((10#${BASH_REMATCH[1]}))
            else
                qidx=$i
            fi
            planned=${cpus[qidx % ${#cpus[@]}]}
            i=$((i + 1))
        elif ((include_control == 1)); then
            planned=${cpus[0]}
        else
            planned="(leave)"
        fi
        if [[ $planned != "(leave)" ]]; then
            plan_irqs+=("$irq")
            plan_cpus+=("$planned")
        fi
    fi
    printf '  %-6s %-28s %-8s %-10s %-10s %s\n' "$irq" "${name:0:28}" "$kind" "$aff" "$eff" "$planned"
done

if irqbalance_running; then
    echo
    warn "irqbalance is running and will move these IRQs again. Stop it (systemctl stop irqbalance) or keep it off the shard CPUs (IRQBALANCE_BANNED_CPULIST=<shard CPUs> in /etc/default/irqbalance or its unit)."
fi
if ((${#cpus[@]} > 0 && n_rx > 0 && i > 0 && n_rx < ${#cpus[@]})); then
    echo
    echo "note: $nic has $n_rx RX queue(s) for ${#cpus[@]} IRQ CPU(s); some CPUs get no queue. More queues, if the NIC has them: ethtool -L $nic combined ${#cpus[@]} (see ethtool -l $nic); or share the protocol work with rps-xps.sh."
fi

((${#cpus[@]} > 0)) || { echo; echo "Pass --cpus LIST to plan a spread."; exit 0; }
if ((${#plan_irqs[@]} == 0)); then
    echo
    echo "Nothing to move: $nic has only control vectors (use --include-control to move them)."
    exit 0
fi

echo
if ((apply == 0)); then
    blocked=""
    for irq in "${plan_irqs[@]}"; do
        if ! reason=$(predict_writable "$(irq_file "$irq" smp_affinity_list)"); then
            blocked=$reason
            break
        fi
    done
    echo "Dry run: nothing written. Add --apply to set the PLANNED column."
    if [[ -n $blocked ]]; then
        echo "It would fail here: $(reason_short "$blocked"): $(reason_long "$blocked")"
    fi
    exit 0
fi

failed=0
for k in "${!plan_irqs[@]}"; do
    irq=${plan_irqs[k]}
    cpu=${plan_cpus[k]}
    f=$(irq_file "$irq" smp_affinity_list)
    if reason=$(write_value "$f" "$cpu"); then
        now=$(cat "$f" 2>/dev/null || echo "?")
        if [[ $now == "$cpu" ]]; then
            echo "  IRQ $irq -> CPU $cpu: set"
        else
            echo "  IRQ $irq -> CPU $cpu: written, but reads back '$now'"
            failed=$((failed + 1))
        fi
    else
        echo "  IRQ $irq -> CPU $cpu: FAILED: $(reason_short "$reason"): $(reason_long "$reason")"
        failed=$((failed + 1))
    fi
done
if ((failed > 0)); then
    echo "$failed IRQ(s) not set."
    exit 1
fi
echo "All ${#plan_irqs[@]} IRQ(s) set. Affinity does not survive a reboot or a driver reload: run this from the unit that starts the gateway."
