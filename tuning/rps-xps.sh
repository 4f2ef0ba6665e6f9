#!/usr/bin/env bash
# Show and set a NIC's RPS (receive packet steering) and XPS (transmit packet
# steering) CPU masks, and optionally RFS. Dry run unless --apply.
set -euo pipefail

# shellcheck source=lib/common.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: ${0##*/} NIC [--cpus LIST | --off] [--rfs ENTRIES] [--apply]

Without --cpus/--off/--rfs: show each queue's current masks.

  RPS  every RX queue hands its packets' protocol work to the CPUs in LIST
       (hash of the flow picks one). Use it when the NIC has fewer RX queues
       (IRQs) than the CPUs that should share the work.
  XPS  TX queue q is used by the CPUs LIST[j] with j mod (TX queues) = q, so a
       shard's sends stay on "its" queue. Not available on a single-queue NIC.
  RFS  with --rfs ENTRIES, steer each flow to the CPU that last read from its
       socket: for a thread-per-core gateway, the shard that owns the
       connection. Sets net.core.rps_sock_flow_entries=ENTRIES and each RX
       queue's rps_flow_cnt to ENTRIES / (RX queues). Needs RPS masks set.
       --rfs 0 turns it off.

Options:
  --cpus LIST          CPUs for RPS and XPS (kernel list syntax: 2-7, 0,2,4)
  --off                clear RPS and XPS masks (the kernel default)
  --rfs ENTRIES        also set up RFS (e.g. 32768); 0 disables it
  --apply              write the masks (needs root and a writable /sys)
  -h, --help           this text

Exit status: 0 on success or a clean report (including "no queues"); 1 when
the NIC does not exist or --apply could not set something; 2 on bad usage.
EOF
}

nic=""
cpus_arg=""
off=0
rfs=""
apply=0
while (($# > 0)); do
    case $1 in
        --cpus) cpus_arg=${2:?--cpus needs a CPU list}; shift 2 ;;
        --off) off=1; shift ;;
        --rfs) rfs=${2:?--rfs needs a number of entries}; shift 2 ;;
        --apply) apply=1; shift ;;
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
[[ -n $cpus_arg && $off == 1 ]] && die "--cpus and --off exclude each other"
[[ -z $rfs ]] || is_uint "$rfs" || die "--rfs needs a number, got '$rfs'"
if ((apply == 1)) && [[ -z $cpus_arg && $off == 0 && -z $rfs ]]; then
    die "--apply needs --cpus LIST, --off or --rfs N (what to set)"
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

mapfile -t rxq < <(nic_queues "$nic" rx)
mapfile -t txq < <(nic_queues "$nic" tx)
q="$SYS_NET/$nic/queues"
echo "$nic: ${#rxq[@]} RX / ${#txq[@]} TX queue(s)$(nic_is_hw "$nic" || echo ", virtual device")"
if ((${#rxq[@]} == 0 && ${#txq[@]} == 0)); then
    echo "$nic has no queues in $q: nothing to steer."
    ((apply == 1)) && exit 1
    exit 0
fi
if [[ $nic == lo ]]; then
    echo "note: lo is the loopback device. Its packets are processed on the sending CPU; RPS on lo"
    echo "      moves that work to LIST at the cost of an inter-processor interrupt per batch."
    echo "      For a same-host benchmark that is rarely a gain: measure before keeping it."
fi

# Read a mask file; print its CPU list, "n/a (reason)" when unreadable.
read_mask() {
    local f=$1 v err
    if [[ ! -e $f ]]; then
        echo "n/a (not in this kernel)"
        return
    fi
    if v=$(cat "$f" 2>/dev/null); then
        mask_to_cpulist "$v"
    else
        err=$(cat "$f" 2>&1 >/dev/null || true)
        case $err in
            *"No such file"*) echo "n/a (single TX queue)" ;;
            *) echo "n/a ($err)" ;;
        esac
    fi
}

# Plan: file -> mask
plan_files=()
plan_masks=()
plan_lists=()
add_plan() { plan_files+=("$1"); plan_masks+=("$2"); plan_lists+=("$3"); }

rps_mask="" rps_list=""
if ((${#cpus[@]} > 0)); then
    rps_mask=$(cpus_to_mask "${cpus[@]}")
    rps_list=$(compress_cpulist "${cpus[@]}")
elif ((off == 1)); then
    rps_mask=0
    rps_list=none
fi

echo
printf '  %-8s %-16s %-16s %s\n' QUEUE "RPS NOW" "RPS PLANNED" "RFS FLOW_CNT"
for r in "${rxq[@]}"; do
    now=$(read_mask "$q/$r/rps_cpus")
    flow=$(cat "$q/$r/rps_flow_cnt" 2>/dev/null || echo "n/a")
    planned="-"
    if [[ -n $rps_mask && -e $q/$r/rps_cpus ]]; then
        planned=$rps_list
        add_plan "$q/$r/rps_cpus" "$rps_mask" "$rps_list"
    elif [[ -n $rps_mask ]]; then
        planned="n/a (no RPS in this kernel)"
    fi
    if [[ -n $rfs && -e $q/$r/rps_flow_cnt ]]; then
        per=$((rfs / ${#rxq[@]}))
        flow="$flow -> $per"
        add_plan "$q/$r/rps_flow_cnt" "$per" "$per"
    fi
    printf '  %-8s %-16s %-16s %s\n' "$r" "$now" "$planned" "$flow"
done

echo
printf '  %-8s %-24s %s\n' QUEUE "XPS NOW" "XPS PLANNED"
ntx=${#txq[@]}
for idx in "${!txq[@]}"; do
    t=${txq[idx]}
    now=$(read_mask "$q/$t/xps_cpus")
    planned="-"
    if [[ $now == n/a* ]]; then
        [[ -n $rps_mask ]] && planned="skipped"
    elif ((off == 1)); then
        planned=none
        add_plan "$q/$t/xps_cpus" 0 none
    elif ((${#cpus[@]} > 0)); then
        mine=()
        for j in "${!cpus[@]}"; do
            ((j % ntx == idx)) && mine+=("${cpus[j]}")
        done
        # More TX queues than CPUs: wrap, so no queue is left without a CPU.
        ((${#mine[@]} > 0)) || mine=("${cpus[idx % ${#cpus[@]}]}")
        planned=$(compress_cpulist "${mine[@]}")
        add_plan "$q/$t/xps_cpus" "$(cpus_to_mask "${mine[@]}")" "$planned"
    fi
    printf '  %-8s %-24s %s\n' "$t" "$now" "$planned"
done

rfs_key=net.core.rps_sock_flow_entries
if rfs_now=$(sysctl_read "$rfs_key" 2>/dev/null); then
    echo
    echo "  RFS: $rfs_key = $rfs_now$([[ -n $rfs ]] && echo " -> $rfs")"
    [[ -n $rfs ]] && add_plan "$(sysctl_path "$rfs_key")" "$rfs" "$rfs"
elif [[ -n $rfs ]]; then
    echo
    echo "  RFS: $rfs_key not present here (host-wide key, hidden in containers): RFS cannot be set from here."
fi

if nic_is_hw "$nic" && ((${#cpus[@]} > 0 && ${#rxq[@]} >= ${#cpus[@]})); then
    echo
    echo "note: $nic has ${#rxq[@]} RX queues for ${#cpus[@]} CPUs: hardware RSS already spreads them."
    echo "      RPS on top adds cross-CPU work; spread the IRQs instead (irq-affinity.sh) and consider --off."
fi

if ((${#plan_files[@]} == 0)); then
    echo
    if [[ -z $rps_mask && -z $rfs ]]; then
        echo "Pass --cpus LIST (or --off, --rfs N) to plan a change."
    else
        echo "Nothing to set on $nic."
    fi
    exit 0
fi

echo
if ((apply == 0)); then
    echo "Dry run: nothing written. Add --apply to write ${#plan_files[@]} value(s)."
    for f in "${plan_files[@]}"; do
        if ! reason=$(predict_writable "$f"); then
            echo "It would fail here: $(reason_short "$reason"): $(reason_long "$reason")"
            break
        fi
    done
    exit 0
fi

failed=0
for k in "${!plan_files[@]}"; do
    f=${plan_files[k]}
    short=${f#"$SYS_NET"/}
    if reason=$(write_value "$f" "${plan_masks[k]}"); then
        echo "  $short = ${plan_lists[k]}: set"
    else
        echo "  $short = ${plan_lists[k]}: FAILED: $(reason_short "$reason"): $(reason_long "$reason")"
        failed=$((failed + 1))
    fi
done
if ((failed > 0)); then
    echo "$failed value(s) not set."
    exit 1
fi
echo "Done. These masks do not survive a reboot or a driver reload: run this from the unit that starts the gateway."
