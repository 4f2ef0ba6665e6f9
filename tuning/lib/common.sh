# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables set here are read by the scripts that source it
# Shared helpers for the corecast tuning scripts. Sourced, never run.
#
# Every path the scripts read or write goes through one of these variables, so
# the scripts can be exercised against a fake tree (see README.md, "Testing the
# kit") without touching the machine:
#   CORECAST_PROC_SYS        default /proc/sys
#   CORECAST_PROC_IRQ        default /proc/irq
#   CORECAST_PROC_INTERRUPTS default /proc/interrupts
#   CORECAST_SYS_NET         default /sys/class/net
#   CORECAST_SYS_CPU         default /sys/devices/system/cpu
#   CORECAST_SYS_NODE        default /sys/devices/system/node

PROC_SYS=${CORECAST_PROC_SYS:-/proc/sys}
PROC_IRQ=${CORECAST_PROC_IRQ:-/proc/irq}
PROC_INTERRUPTS=${CORECAST_PROC_INTERRUPTS:-/proc/interrupts}
SYS_NET=${CORECAST_SYS_NET:-/sys/class/net}
SYS_CPU=${CORECAST_SYS_CPU:-/sys/devices/system/cpu}
SYS_NODE=${CORECAST_SYS_NODE:-/sys/devices/system/node}

TUNING_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
DEFAULT_PROFILE="$TUNING_DIR/sysctl/corecast.conf"

die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 2
}

warn() {
    printf '%s: warning: %s\n' "${0##*/}" "$*" >&2
}

is_uint() {
    [[ $1 =~ ^[0-9]+$ ]]
}

# in_list NEEDLE ITEM... : is NEEDLE one of the items? (No grep -q in a
# pipeline: with pipefail its early exit turns a match into a failure.)
in_list() {
    local needle=$1 x
    shift
    for x in "$@"; do
        [[ $x == "$needle" ]] && return 0
    done
    return 1
}

# ---------------------------------------------------------------------------
# CPU lists ("0-3,8,10-11") and masks ("f0f" / "00000001,00000000")

# Print the CPUs of a list, one per line, ascending and unique.
# Fails (status 1) on a malformed list.
expand_cpulist() {
    local list=$1 part lo hi i
    local -a parts cpus=()
    [[ -n $list ]] || return 1
    IFS=',' read -r -a parts <<<"$list"
    for part in "${parts[@]}"; do
        if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
            lo=$((10#${BASH_REMATCH[1]}))
            hi=$((10#${BASH_REMATCH[2]}))
            ((lo <= hi)) || return 1
            for ((i = lo; i <= hi; i++)); do cpus+=("$i"); done
        elif [[ $part =~ ^[0-9]+$ ]]; then
            cpus+=("$((10#$part))")
        else
            return 1
        fi
    done
    printf '%s\n' "${cpus[@]}" | sort -n -u
}

# Compress CPUs given as arguments into the kernel's list syntax.
compress_cpulist() {
    local out="" start="" prev="" c
    for c in $(printf '%s\n' "$@" | sort -n -u); do
        if [[ -z $start ]]; then
            start=$c
            prev=$c
        elif ((c == prev + 1)); then
            prev=$c
        else
            out+="${out:+,}$start"
            ((start == prev)) || out+="-$prev"
            start=$c
            prev=$c
        fi
    done
    if [[ -n $start ]]; then
        out+="${out:+,}$start"
        ((start == prev)) || out+="-$prev"
    fi
    printf '%s\n' "$out"
}

# CPUs as arguments -> hex mask in the comma-separated 32-bit groups sysfs uses.
cpus_to_mask() {
    local -a groups=()
    local c g max=0 out="" i
    for c in "$@"; do
        g=$((c / 32))
        groups[g]=$((${groups[g]:-0} | (1 << (c % 32))))
        ((g > max)) && max=$g
    done
    for ((i = max; i >= 0; i--)); do
        if ((i == max)); then
            out+=$(printf '%x' "${groups[i]:-0}")
        else
            out+=$(printf ',%08x' "${groups[i]:-0}")
        fi
    done
    printf '%s\n' "$out"
}

# Hex mask ("00000000,0000000f") -> CPU list ("0-3"); empty mask -> "none".
mask_to_cpulist() {
    local mask=${1//,/} cpus=() nib i b len
    mask=${mask#0x}
    len=${#mask}
    for ((i = 0; i < len; i++)); do
        nib=$((16#${mask:len-1-i:1}))
        for ((b = 0; b < 4; b++)); do
            if (((nib >> b) & 1)); then cpus+=($((i * 4 + b))); fi
        done
    done
    if ((${#cpus[@]} == 0)); then
        echo none
    else
        compress_cpulist "${cpus[@]}"
    fi
}

online_cpulist() {
    if [[ -r $SYS_CPU/online ]]; then
        cat "$SYS_CPU/online"
    else
        echo "0-$(($(getconf _NPROCESSORS_ONLN) - 1))"
    fi
}

# CPUs this process may run on (cgroup cpuset and taskset both show up here).
allowed_cpulist() {
    local line
    line=$(grep -m1 '^Cpus_allowed_list:' /proc/self/status 2>/dev/null || true)
    line=${line#*:}
    line=${line//[[:space:]]/}
    if [[ -n $line ]]; then echo "$line"; else online_cpulist; fi
}

# ---------------------------------------------------------------------------
# sysctl keys, read and written through $PROC_SYS (no dependency on procps).

sysctl_path() {
    printf '%s/%s\n' "$PROC_SYS" "${1//.//}"
}

# Current value with runs of whitespace squeezed to one space. Status 1 if the
# key does not exist here, 3 if it exists but cannot be read.
sysctl_read() {
    local p
    p=$(sysctl_path "$1")
    [[ -e $p ]] || return 1
    local v
    v=$(cat -- "$p" 2>/dev/null) || return 3
    printf '%s\n' "$v" | tr -s ' \t' '  '
}

# Profile lines as "key<TAB>value", comments and blanks dropped. A leading '-'
# (sysctl.d: "ignore errors for this key") is kept on the key.
profile_entries() {
    local file=$1 line key val
    [[ -r $file ]] || die "profile $file: not readable"
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        [[ $line =~ ^[[:space:]]*([#\;]|$) ]] && continue
        [[ $line == *=* ]] || { warn "profile $file: ignoring line without '=': $line"; continue; }
        key=${line%%=*}
        val=${line#*=}
        key=$(printf '%s' "$key" | tr -d '[:space:]')
        key=${key//\//.}
        val=$(printf '%s' "$val" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' | tr -s ' \t' '  ')
        printf '%s\t%s\n' "$key" "$val"
    done <"$file"
}

# Reference RAM (GiB) the profile's net.ipv4.tcp_mem line was sized for, from a
# "# corecast-tcp-mem-reference-gib: N" comment in the profile.
profile_tcp_mem_ref_gib() {
    local v
    v=$(sed -n 's/^#[[:space:]]*corecast-tcp-mem-reference-gib:[[:space:]]*\([0-9][0-9]*\).*/\1/p;T;q' "$1")
    echo "${v:-64}"
}

mem_total_kib() {
    awk '/^MemTotal:/ { print $2; exit }' /proc/meminfo
}

# How each profile field compares with what the host has, one code per field:
#   '>'  at least the profile value: a host that already has more is left alone
#   '<'  at most the profile value
#   '='  exactly the profile value
#   'R'  a port range at least as wide as the profile's (two fields)
# Keys not listed are '='.
sysctl_policy() {
    case $1 in
        fs.file-max | fs.nr_open | net.core.somaxconn | net.ipv4.tcp_max_syn_backlog | \
            net.core.netdev_max_backlog | net.netfilter.nf_conntrack_max) echo '>' ;;
        net.ipv4.tcp_mem) echo '> > >' ;;
        net.ipv4.tcp_rmem | net.ipv4.tcp_wmem) echo '= < >' ;;
        net.ipv4.tcp_fin_timeout | net.ipv4.tcp_keepalive_time | net.ipv4.tcp_keepalive_intvl | \
            net.ipv4.tcp_notsent_lowat) echo '<' ;;
        net.ipv4.ip_local_port_range) echo 'R' ;;
        *) echo '=' ;;
    esac
}

# Does CURRENT satisfy PROFILE under POLICY? Non-numeric values compare as text.
sysctl_satisfies() {
    local policy=$1 cur=$2 want=$3
    local -a p c w
    read -r -a p <<<"$policy"
    read -r -a c <<<"$cur"
    read -r -a w <<<"$want"
    if [[ ${p[0]} == R ]]; then
        ((${#c[@]} == 2 && ${#w[@]} == 2)) || return 1
        ((c[0] <= w[0] && c[1] >= w[1]))
        return
    fi
    ((${#c[@]} == ${#w[@]})) || return 1
    local i op
    for i in "${!w[@]}"; do
        op=${p[i]:-${p[0]}}
        if ! is_uint "${c[i]}" || ! is_uint "${w[i]}"; then
            [[ ${c[i]} == "${w[i]}" ]] || return 1
            continue
        fi
        case $op in
            '>') ((c[i] >= w[i])) || return 1 ;;
            '<') ((c[i] <= w[i])) || return 1 ;;
            *) ((c[i] == w[i])) || return 1 ;;
        esac
    done
}

# The value to aim for on this host. Starts from the profile value, with
# tcp_mem scaled to this host's RAM (unless scale=0). Unless exact=1, a host
# that already satisfies the policy keeps its value, and otherwise each field
# moves only as far as the policy asks: '>' fields keep a higher current value,
# '<' fields a lower one, a range keeps whichever end is wider.
sysctl_target() {
    local key=$1 want=$2 cur=$3 scale=$4 exact=$5 ref_gib=$6
    local policy
    policy=$(sysctl_policy "$key")
    local -a p c w
    read -r -a p <<<"$policy"
    read -r -a c <<<"$cur"
    read -r -a w <<<"$want"
    local i op
    if [[ $key == net.ipv4.tcp_mem && $scale == 1 ]]; then
        local mem
        mem=$(mem_total_kib)
        for i in "${!w[@]}"; do
            w[i]=$((w[i] * mem / (ref_gib * 1024 * 1024)))
            ((w[i] > 0)) || w[i]=1
        done
    fi
    if [[ $exact == 1 ]] || ((${#c[@]} != ${#w[@]})); then
        echo "${w[*]}"
        return
    fi
    if sysctl_satisfies "$policy" "$cur" "${w[*]}"; then
        echo "$cur"
        return
    fi
    if [[ ${p[0]} == R ]]; then
        p=('<' '>')
    fi
    for i in "${!w[@]}"; do
        op=${p[i]:-${p[0]}}
        if ! is_uint "${c[i]}" || ! is_uint "${w[i]}"; then continue; fi
        case $op in
            '>') ((c[i] > w[i])) && w[i]=${c[i]} ;;
            '<') ((c[i] < w[i])) && w[i]=${c[i]} ;;
        esac
    done
    echo "${w[*]}"
}

# Why a write to a /proc or /sys file failed, from the shell's error text.
# Prints "short<TAB>explanation"; see reason_short / reason_long.
explain_write_error() {
    local err=$1 path=$2
    case $err in
        *"Read-only file system"*)
            if [[ $path == "$PROC_SYS"/* ]]; then
                printf '%s\t%s\n' "read-only mount" \
                    "/proc/sys is mounted read-only here (usual inside containers): set it on the host; namespaced net.* sysctls can also be set by the container runtime (docker run --sysctl KEY=VALUE, Kubernetes securityContext.sysctls)"
            else
                printf '%s\t%s\n' "read-only mount" \
                    "the file is on a read-only mount (containers mount /sys and /proc/irq read-only): run this on the host"
            fi
            ;;
        *"Permission denied"* | *"Operation not permitted"*)
            printf '%s\t%s\n' "permission denied" \
                "needs root in the namespace that owns the file (sysctls: uid 0 / CAP_SYS_ADMIN or CAP_NET_ADMIN; IRQs and sysfs: uid 0)" ;;
        *"No such file"*)
            printf '%s\t%s\n' "not present" \
                "the file does not exist: this kernel lacks it, the module that provides it is not loaded, or it is a host-wide key hidden inside a container's network namespace" ;;
        *"Invalid argument"*)
            printf '%s\t%s\n' "value rejected" "the kernel rejected the value (out of range for this kernel, or no online CPU in the mask)" ;;
        *"Input/output error"*)
            printf '%s\t%s\n' "kernel-managed" "the kernel refused the change: this IRQ's affinity is managed by the kernel for its driver and cannot be set from user space" ;;
        *)
            printf '%s\t%s\n' "error" "${err:-unknown error} ($path)" ;;
    esac
}
reason_short() { printf '%s\n' "${1%%$'\t'*}"; }
reason_long() { printf '%s\n' "${1#*$'\t'}"; }

# Write VALUE to PATH. On failure print the explanation and return 1.
write_value() {
    local path=$1 value=$2 err
    if err=$( { printf '%s\n' "$value" >"$path"; } 2>&1); then
        return 0
    fi
    explain_write_error "$err" "$path"
    return 1
}

# Predict whether PATH can be written, without writing: open it for append
# and close it again (no write(2), so /proc and /sys handlers never run) and
# let the kernel say why not. Prints a reason and returns 1 when it cannot.
predict_writable() {
    local path=$1 err
    if [[ ! -e $path ]]; then
        explain_write_error "No such file" "$path"
        return 1
    fi
    if err=$( { : >>"$path"; } 2>&1); then
        return 0
    fi
    explain_write_error "$err" "$path"
    return 1
}

# ---------------------------------------------------------------------------
# Capabilities (from /proc/self/status; no libcap needed)

have_cap() {
    local bit=$1 hex
    hex=$(awk '/^CapEff:/ { print $2 }' /proc/self/status 2>/dev/null)
    [[ -n $hex ]] || return 1
    (((16#$hex >> bit) & 1))
}
CAP_IPC_LOCK=14
CAP_SYS_ADMIN=21
CAP_SYS_RESOURCE=24

# ---------------------------------------------------------------------------
# NICs, queues and IRQs

nic_exists() {
    [[ -e $SYS_NET/$1 ]]
}

list_nics() {
    local d out=()
    for d in "$SYS_NET"/*; do
        [[ -e $d ]] && out+=("${d##*/}")
    done
    echo "${out[*]:-none}"
}

# "yes" when the NIC is backed by a device (PCI, virtio, ...), else "no".
nic_is_hw() {
    [[ -e $SYS_NET/$1/device ]]
}

nic_queues() { # NIC rx|tx -> queue directory names, in index order
    local q
    for q in "$SYS_NET/$1/queues/$2-"*; do
        [[ -d $q ]] && echo "${q##*/}"
    done | sort -t- -k2 -n
}

# IRQ number -> action name(s): the handler directories under /proc/irq/N,
# else the last field of its /proc/interrupts line. Empty if not requested.
irq_name() {
    local d names=()
    for d in "$PROC_IRQ/$1"/*/; do
        [[ -d $d ]] && names+=("$(basename -- "$d")")
    done
    if ((${#names[@]} > 0)); then
        local IFS=,
        echo "${names[*]}"
        return
    fi
    awk -v irq="$1:" '$1 == irq { print $NF; exit }' "$PROC_INTERRUPTS"
}

# IRQs of a NIC, one "irq<TAB>name" per line, in /proc/interrupts order.
# Finds MSI/MSI-X vectors of the device (or of its parent bus device, as for
# virtio_net), then a legacy INTx line, then /proc/interrupts names that
# contain the NIC's name.
nic_irqs() {
    local nic=$1 dev="" devname="" irqs=() d irq
    if [[ -e $SYS_NET/$nic/device ]]; then
        dev=$(readlink -f -- "$SYS_NET/$nic/device")
        devname=${dev##*/}
        for d in "$dev" "$(dirname -- "$dev")"; do
            if [[ -d $d/msi_irqs ]]; then
                for irq in "$d"/msi_irqs/*; do
                    [[ -e $irq ]] && irqs+=("${irq##*/}")
                done
                break
            fi
        done
        if ((${#irqs[@]} == 0)) && [[ -r $dev/irq ]]; then
            irq=$(cat "$dev/irq")
            [[ $irq != 0 ]] && irqs+=("$irq")
        fi
    fi
    if ((${#irqs[@]} == 0)) && [[ -n $dev ]]; then
        while read -r irq; do irqs+=("$irq"); done < <(
            awk -v nic="$nic" '$1 ~ /^[0-9]+:$/ && index($NF, nic) { sub(/:$/, "", $1); print $1 }' "$PROC_INTERRUPTS")
    fi
    local name
    for irq in $(printf '%s\n' "${irqs[@]}" | sort -n -u); do
        name=$(irq_name "$irq")
        [[ -n $name ]] || continue # vector allocated but not requested
        # A parent bus device can carry other functions' vectors; keep ours.
        if [[ -n $devname && $devname == virtio* && $name != "$devname"* && $name != *"$nic"* ]]; then
            continue
        fi
        printf '%s\t%s\n' "$irq" "$name"
    done
}

# Control/management vectors are left where the driver put them.
irq_is_control() {
    [[ $1 =~ (config|async|ctrl|misc|mgmnt|mgmt|admin|lsc|event|fdir) ]]
}

irqbalance_running() {
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -x irqbalance >/dev/null 2>&1
    else
        local c
        for c in /proc/[0-9]*/comm; do
            [[ $(cat "$c" 2>/dev/null) == irqbalance ]] && return 0
        done
        return 1
    fi
}

human_kib() { # KiB -> "1.5 GiB" style
    awk -v k="$1" 'BEGIN {
        if (k >= 1048576) printf "%.1f GiB\n", k / 1048576;
        else if (k >= 1024) printf "%.1f MiB\n", k / 1024;
        else printf "%d KiB\n", k }'
}
