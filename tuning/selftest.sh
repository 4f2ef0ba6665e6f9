#!/usr/bin/env bash
# Self-test for the tuning kit. Read-only on the real machine; every --apply
# runs against a fake /proc + /sys tree in a temporary directory.
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

usage() {
    cat <<EOF
Usage: ${0##*/} [--keep]

Checks every script in $here:
  - bash -n, and shellcheck when it is installed;
  - --help and bad-usage exit codes;
  - the read-only modes against this machine (check.sh, dry runs, pin-plan.sh,
    the IRQ/RPS scripts on lo and on a NIC that does not exist);
  - --apply against a fake tree (sysctl keys, one of them missing, IRQs and
    queue masks of a fake 4-queue NIC) and the values that land there.
Never writes to the real /proc or /sys.

  --keep   leave the fake tree in place and print its path
EOF
}
keep=0
case ${1:-} in
    -h | --help) usage; exit 0 ;;
    --keep) keep=1 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

pass=0 fail=0
ok() { pass=$((pass + 1)); printf '  ok    %s\n' "$1"; }
bad() { fail=$((fail + 1)); printf '  FAIL  %s\n' "$1"; [[ -z ${2:-} ]] || printf '%s\n' "$2" | sed 's/^/        | /' | head -n 20; }
# expect NAME STATUS CMD...: run CMD, compare its exit status.
out=""
expect() {
    local name=$1 want=$2 rc=0
    shift 2
    out=$("$@" 2>&1) || rc=$?
    if [[ $rc == "$want" ]]; then ok "$name (exit $rc)"; else bad "$name: exit $rc, wanted $want" "$out"; fi
}
contains() { # NAME NEEDLE: the last expect's output contains NEEDLE
    if [[ $out == *"$2"* ]]; then ok "$1"; else bad "$1: output lacks '$2'" "$out"; fi
}
file_is() { # NAME FILE WANT
    local got
    got=$(tr -s ' \t' '  ' <"$2")
    if [[ $got == "$3" ]]; then ok "$1"; else bad "$1: $2 is '$got', wanted '$3'"; fi
}

scripts=(check.sh apply-sysctl.sh irq-affinity.sh rps-xps.sh pin-plan.sh selftest.sh)

echo "Syntax"
for s in "${scripts[@]}" lib/common.sh; do
    if bash -n "$here/$s"; then ok "bash -n $s"; else bad "bash -n $s"; fi
done
if command -v shellcheck >/dev/null 2>&1; then
    if o=$(cd "$here" && shellcheck -x "${scripts[@]}" lib/common.sh 2>&1); then
        ok "shellcheck (all scripts)"
    else
        bad "shellcheck" "$o"
    fi
else
    echo "  skip  shellcheck not installed (apt-get install shellcheck)"
fi

echo "Usage"
for s in "${scripts[@]}"; do
    expect "$s --help" 0 "$here/$s" --help
done
for s in check.sh apply-sysctl.sh irq-affinity.sh rps-xps.sh pin-plan.sh; do
    expect "$s --bogus" 2 "$here/$s" --bogus
done
expect "irq-affinity.sh without a NIC" 2 "$here/irq-affinity.sh"
expect "pin-plan.sh --cpus 0" 2 "$here/pin-plan.sh" --cpus 0
expect "check.sh --conns x" 2 "$here/check.sh" --conns x

echo "Read-only on this machine"
expect "check.sh" 0 "$here/check.sh" --no-probe
contains "check.sh prints the limits table" "nofile (hard, ulimit -Hn)"
contains "check.sh ends with a result line" "Result:"
expect "apply-sysctl.sh dry run" 0 "$here/apply-sysctl.sh"
contains "dry run says so" "Dry run"
expect "irq-affinity.sh lo" 0 "$here/irq-affinity.sh" lo
contains "lo has no IRQs" "no hardware IRQs"
expect "irq-affinity.sh on a missing NIC" 1 "$here/irq-affinity.sh" no-such-nic0
contains "missing NIC is named" "no NIC named 'no-such-nic0'"
expect "rps-xps.sh lo (show)" 0 "$here/rps-xps.sh" lo
expect "rps-xps.sh lo --cpus 0 (dry run)" 0 "$here/rps-xps.sh" lo --cpus 0
expect "rps-xps.sh on a missing NIC" 1 "$here/rps-xps.sh" no-such-nic0
expect "pin-plan.sh (this machine)" 0 "$here/pin-plan.sh"
expect "pin-plan.sh --cpus 8 --format env" 0 "$here/pin-plan.sh" --cpus 8 --format env
contains "8 CPUs: 7 shards" "GATEWAY_SHARDS=7"
contains "8 CPUs: shards on 1-7" "GATEWAY_CPUS=1-7"
expect "pin-plan.sh --cpus 2 --loadgen --format env" 0 "$here/pin-plan.sh" --cpus 2 --loadgen --format env
contains "2 CPUs + loadgen: 1 shard" "GATEWAY_SHARDS=1"
contains "2 CPUs + loadgen: loadgen on 1" "LOADGEN_CPUS=1"
expect "pin-plan.sh --cpus 32 --smt 2 --format env" 0 "$here/pin-plan.sh" --cpus 32 --smt 2 --format env
contains "SMT siblings stay together for IRQs" "IRQ_CPUS=0,16"

echo "--apply against a fake tree"
T=$(mktemp -d "${TMPDIR:-/tmp}/corecast-selftest.XXXXXX")
cleanup() { if ((keep == 1)); then echo "fake tree kept: $T"; else rm -rf -- "$T"; fi; }
trap cleanup EXIT

# sysctl keys: copy the real values of every profile key but one.
export CORECAST_PROC_SYS=$T/proc/sys
while IFS= read -r key; do
    [[ $key == net.core.netdev_max_backlog ]] && continue # plays "hidden in this namespace"
    p=$CORECAST_PROC_SYS/${key//.//}
    mkdir -p "$(dirname -- "$p")"
    if [[ -r /proc/sys/${key//.//} ]]; then cat "/proc/sys/${key//.//}" >"$p"; else echo 0 >"$p"; fi
done < <(sed -n 's/^-\{0,1\}\([a-z][a-z0-9_.-]*\)[[:space:]]*=.*/\1/p' "$here/sysctl/corecast.conf")
mkdir -p "$CORECAST_PROC_SYS/net/core"
echo 0 >"$CORECAST_PROC_SYS/net/core/rps_sock_flow_entries"
echo 1000 >"$CORECAST_PROC_SYS/fs/file-max"      # below the floor: raised
echo 8388608 >"$CORECAST_PROC_SYS/fs/nr_open"    # above the floor: kept
echo "1024 65535" >"$CORECAST_PROC_SYS/net/ipv4/ip_local_port_range" # wider: kept
echo 10 >"$CORECAST_PROC_SYS/net/ipv4/tcp_fin_timeout"          # tighter: kept
echo 60 >"$CORECAST_PROC_SYS/net/ipv4/tcp_keepalive_time"       # below the ceiling: kept
expect "apply-sysctl.sh --apply (one key missing)" 1 "$here/apply-sysctl.sh" --apply --persist "$T/60-corecast.conf"
contains "the missing key is reported" "net.core.netdev_max_backlog"
contains "and why" "not present"
file_is "fs.file-max raised" "$CORECAST_PROC_SYS/fs/file-max" 4194304
file_is "fs.nr_open not lowered" "$CORECAST_PROC_SYS/fs/nr_open" 8388608
file_is "somaxconn set" "$CORECAST_PROC_SYS/net/core/somaxconn" 65535
file_is "wider port range kept" "$CORECAST_PROC_SYS/net/ipv4/ip_local_port_range" "1024 65535"
file_is "tighter fin_timeout kept" "$CORECAST_PROC_SYS/net/ipv4/tcp_fin_timeout" 10
file_is "keepalive_time 60 kept (below the 300 ceiling)" "$CORECAST_PROC_SYS/net/ipv4/tcp_keepalive_time" 60
file_is "notsent_lowat set" "$CORECAST_PROC_SYS/net/ipv4/tcp_notsent_lowat" 16384
if grep -q '^net.ipv4.tcp_mem = ' "$T/60-corecast.conf"; then ok "--persist wrote tcp_mem"; else bad "--persist did not write tcp_mem"; fi
expect "apply-sysctl.sh again (idempotent, still one missing)" 1 "$here/apply-sysctl.sh" --apply
contains "nothing left to set" "0 set"
expect "apply-sysctl.sh --exact --apply" 1 "$here/apply-sysctl.sh" --exact --apply
file_is "--exact narrows the port range to the profile's" "$CORECAST_PROC_SYS/net/ipv4/ip_local_port_range" "10240 65535"
file_is "--exact lowers nr_open to the profile's" "$CORECAST_PROC_SYS/fs/nr_open" 2097152
# Read-only /proc/sys, as in a container: needs a private mount namespace
# (root with CAP_SYS_ADMIN); the bind mount covers the fake tree only.
# shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash
ro_run='mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
if command -v unshare >/dev/null 2>&1 && unshare -m --propagation private true 2>/dev/null; then
    echo 128 >"$CORECAST_PROC_SYS/net/core/somaxconn" # something to change
    expect "apply-sysctl.sh --apply on a read-only tree" 1 \
        unshare -m --propagation private bash -c "$ro_run" _ "$CORECAST_PROC_SYS" "$here/apply-sysctl.sh" --apply
    contains "read-only mount is named" "read-only mount"
    file_is "and nothing was written" "$CORECAST_PROC_SYS/net/core/somaxconn" 128
    expect "check.sh on a read-only tree" 0 \
        unshare -m --propagation private bash -c "$ro_run" _ "$CORECAST_PROC_SYS" "$here/check.sh" --no-probe
    contains "check.sh says /proc/sys is not writable" "not writable here (read-only mount)"
else
    echo "  skip  read-only /proc/sys test (needs unshare -m: root with CAP_SYS_ADMIN)"
fi
expect "check.sh against the fake tree" 0 "$here/check.sh" --no-probe
contains "check.sh flags the missing key" "MISSING"

# A fake 4-queue NIC with MSI-X vectors and a control vector.
export CORECAST_SYS_NET=$T/sys/class/net CORECAST_PROC_IRQ=$T/proc/irq \
    CORECAST_PROC_INTERRUPTS=$T/proc/interrupts CORECAST_SYS_NODE=$T/sys/node
dev=$T/sys/devices/pci0000:00/0000:00:05.0
mkdir -p "$dev/msi_irqs" "$T/sys/bus/pci/drivers/fakenic" "$CORECAST_SYS_NET/fake0/queues" "$CORECAST_PROC_IRQ" "$CORECAST_SYS_NODE"
ln -s "$dev" "$CORECAST_SYS_NET/fake0/device"
ln -s "$T/sys/bus/pci/drivers/fakenic" "$dev/driver"
echo -1 >"$dev/numa_node"
printf '           CPU0\n' >"$CORECAST_PROC_INTERRUPTS"
for i in 0 1 2 3; do
    irq=$((50 + i))
    : >"$dev/msi_irqs/$irq"
    mkdir -p "$CORECAST_PROC_IRQ/$irq/fake0-TxRx-$i"
    echo 0-63 >"$CORECAST_PROC_IRQ/$irq/smp_affinity_list"
    printf ' %d:  10  PCI-MSIX-0000:00:05.0 %d-edge fake0-TxRx-%d\n' "$irq" "$i" "$i" >>"$CORECAST_PROC_INTERRUPTS"
    mkdir -p "$CORECAST_SYS_NET/fake0/queues/rx-$i" "$CORECAST_SYS_NET/fake0/queues/tx-$i"
    echo 0 >"$CORECAST_SYS_NET/fake0/queues/rx-$i/rps_cpus"
    echo 0 >"$CORECAST_SYS_NET/fake0/queues/rx-$i/rps_flow_cnt"
    echo 0 >"$CORECAST_SYS_NET/fake0/queues/tx-$i/xps_cpus"
done
: >"$dev/msi_irqs/54"
mkdir -p "$CORECAST_PROC_IRQ/54/fake0-misc"
echo 0-63 >"$CORECAST_PROC_IRQ/54/smp_affinity_list"
printf ' 54:  1  PCI-MSIX-0000:00:05.0 4-edge fake0-misc\n' >>"$CORECAST_PROC_INTERRUPTS"
mkdir -p "$CORECAST_SYS_NET/lo/queues/rx-0"

# shellcheck source=lib/common.sh
. "$here/lib/common.sh"
online=$(online_cpulist)
mapfile -t on < <(expand_cpulist "$online")
n=${#on[@]}
expect "irq-affinity.sh fake0 (show)" 0 "$here/irq-affinity.sh" fake0
contains "queue vectors found" "fake0-TxRx-3"
contains "control vector classified" "control"
expect "irq-affinity.sh fake0 --cpus $online --apply" 0 "$here/irq-affinity.sh" fake0 --cpus "$online" --apply
file_is "IRQ 50 (queue 0) on CPU ${on[0]}" "$CORECAST_PROC_IRQ/50/smp_affinity_list" "${on[0]}"
file_is "IRQ 53 (queue 3) on CPU ${on[3 % n]}" "$CORECAST_PROC_IRQ/53/smp_affinity_list" "${on[3 % n]}"
file_is "control IRQ 54 left alone" "$CORECAST_PROC_IRQ/54/smp_affinity_list" 0-63
expect "irq-affinity.sh fake lo (virtual)" 0 "$here/irq-affinity.sh" lo
expect "rps-xps.sh fake0 --cpus $online --rfs 32768 --apply" 0 "$here/rps-xps.sh" fake0 --cpus "$online" --rfs 32768 --apply
file_is "RPS mask on rx-2 = all of $online" "$CORECAST_SYS_NET/fake0/queues/rx-2/rps_cpus" "$(cpus_to_mask "${on[@]}")"
if ((n <= 3)); then
    file_is "XPS mask on tx-3 = CPU ${on[3 % n]}" "$CORECAST_SYS_NET/fake0/queues/tx-3/xps_cpus" "$(cpus_to_mask "${on[3 % n]}")"
fi
file_is "XPS mask on tx-0 = CPU ${on[0]}$( ((n > 4)) && echo ",${on[4]}...")" "$CORECAST_SYS_NET/fake0/queues/tx-0/xps_cpus" \
    "$(for ((j = 0; j < n; j += 4)); do echo "${on[j]}"; done | { mapfile -t x; cpus_to_mask "${x[@]}"; })"
file_is "rps_flow_cnt per queue" "$CORECAST_SYS_NET/fake0/queues/rx-1/rps_flow_cnt" 8192
file_is "rps_sock_flow_entries" "$CORECAST_PROC_SYS/net/core/rps_sock_flow_entries" 32768
expect "rps-xps.sh fake0 --off --apply" 0 "$here/rps-xps.sh" fake0 --off --apply
file_is "RPS cleared" "$CORECAST_SYS_NET/fake0/queues/rx-0/rps_cpus" 0

echo
echo "selftest: $pass passed, $fail failed"
((fail == 0))
