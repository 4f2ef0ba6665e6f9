#!/usr/bin/env bash
# Apply the corecast sysctl profile, like `sysctl -p`, but explaining each key.
# Dry run unless --apply.
set -euo pipefail

# shellcheck source=lib/common.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

DEFAULT_PERSIST=/etc/sysctl.d/60-corecast.conf

usage() {
    cat <<EOF
Usage: ${0##*/} [--apply] [options]

Set the kernel parameters in the corecast profile. Without --apply, print what
would change and which keys could not be set here, and change nothing.

How values are chosen (same rules as check.sh):
  - net.ipv4.tcp_mem is scaled to this host's RAM (the profile was written for
    the RAM named in its "corecast-tcp-mem-reference-gib" comment);
  - a key the host already has at least as good as the profile (check.sh
    says OK) is left alone: floors (fs.file-max, fs.nr_open, somaxconn,
    backlogs, tcp_mem, the max of tcp_rmem/tcp_wmem, conntrack) are never
    lowered, ceilings (timeouts, notsent_lowat, the rmem/wmem default) never
    raised, a wider port range never narrowed;
  - keys written "-key = value" are skipped quietly when absent.

Options:
  --apply              write the values (needs root; fails per key, with the
                       reason, where /proc/sys is read-only or the key is absent)
  --persist [FILE]     with --apply, also write the values chosen to FILE
                       (default $DEFAULT_PERSIST) so they survive a reboot
  --profile FILE       profile to apply (default: $DEFAULT_PROFILE)
  --no-scale-tcp-mem   use tcp_mem exactly as written in the profile
  --exact              write the profile's values as they are, even where the
                       host already has more room (tcp_mem is still scaled
                       unless --no-scale-tcp-mem)
  -h, --help           this text

Exit status: 0 when every key is set or already right (in a dry run: always 0
unless the arguments are wrong); 1 when --apply could not set some key; 2 on
bad usage.
EOF
}

profile=$DEFAULT_PROFILE
apply=0
persist=""
scale=1
exact=0
while (($# > 0)); do
    case $1 in
        --apply) apply=1; shift ;;
        --persist)
            if [[ ${2:-} != "" && ${2:-} != --* ]]; then
                persist=$2
                shift 2
            else
                persist=$DEFAULT_PERSIST
                shift
            fi
            ;;
        --profile) profile=${2:?--profile needs a file}; shift 2 ;;
        --no-scale-tcp-mem) scale=0; shift ;;
        --exact) exact=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ -r $profile ]] || die "profile $profile: not readable (pass --profile FILE)"

ref_gib=$(profile_tcp_mem_ref_gib "$profile")
if ((apply == 1)); then
    echo "Applying $profile to $PROC_SYS"
else
    echo "Dry run: nothing is written. Add --apply to set these. Profile: $profile"
fi
if ((scale == 1)); then
    echo "tcp_mem: profile written for ${ref_gib} GiB; this host has $(human_kib "$(mem_total_kib)"), values scaled to match."
fi
if ((apply == 1)) && [[ $(id -u) != 0 ]]; then
    warn "not running as root: expect 'permission denied' for every key"
fi
echo

trow() { printf '  %-34s %-24s %-24s %s\n' "$@"; }
trow KEY CURRENT TARGET ACTION

n_change=0 n_ok=0 n_fail=0 n_skip=0
persist_lines=()
declare -A why=() # short reason -> explanation, printed once at the end
note_reason() { # remember the explanation for the footer; sets $short
    short=$(reason_short "$1")
    why[$short]=$(reason_long "$1")
}
while IFS=$'\t' read -r raw_key want; do
    key=${raw_key#-}
    optional=0
    [[ $raw_key == -* ]] && optional=1
    path=$(sysctl_path "$key")
    rc=0
    cur=$(sysctl_read "$key") || rc=$?
    if ((rc == 1)); then
        if ((optional == 1)); then
            trow "$key" "(not present)" "$want" "skip: optional, not present here"
            n_skip=$((n_skip + 1))
        else
            note_reason "$(explain_write_error "No such file" "$path")"
            trow "$key" "(not present)" "$want" "CANNOT: $short"
            n_fail=$((n_fail + 1))
        fi
        continue
    elif ((rc != 0)); then
        trow "$key" "(unreadable)" "$want" "CANNOT: not readable here (run as root)"
        n_fail=$((n_fail + 1))
        continue
    fi

    target=$(sysctl_target "$key" "$want" "$cur" "$scale" "$exact" "$ref_gib")
    persist_lines+=("$raw_key = $target")
    if [[ $cur == "$target" ]]; then
        trow "$key" "$cur" "$target" "ok (already set)"
        n_ok=$((n_ok + 1))
        continue
    fi

    if ((apply == 0)); then
        if reason=$(predict_writable "$path"); then
            action="would set"
            n_change=$((n_change + 1))
        elif ((optional == 1)); then
            note_reason "$reason"
            action="would skip: $short"
            n_skip=$((n_skip + 1))
        else
            note_reason "$reason"
            action="would FAIL: $short"
            n_fail=$((n_fail + 1))
        fi
        trow "$key" "$cur" "$target" "$action"
        continue
    fi

    if reason=$(write_value "$path" "$target"); then
        now=$(sysctl_read "$key" || echo "?")
        if [[ $now == "$target" ]]; then
            action="set"
            n_change=$((n_change + 1))
        else
            action="FAILED: the kernel accepted it but now reads '$now' (clamped?)"
            n_fail=$((n_fail + 1))
        fi
    elif ((optional == 1)); then
        note_reason "$reason"
        action="skipped (optional): $short"
        n_skip=$((n_skip + 1))
    else
        note_reason "$reason"
        action="FAILED: $short"
        n_fail=$((n_fail + 1))
    fi
    trow "$key" "$cur" "$target" "$action"
done < <(profile_entries "$profile")

echo
if ((apply == 1)); then
    echo "Done: $n_change set, $n_ok already right, $n_skip skipped, $n_fail could not be set."
else
    echo "Would change $n_change, $n_ok already right, $n_skip would be skipped, $n_fail cannot be set here."
fi

if [[ -n $persist ]]; then
    header="# Written by corecast tuning/apply-sysctl.sh from $(basename -- "$profile") on $(date -u +%Y-%m-%dT%H:%MZ) for $(uname -n).
# Values are this host's (tcp_mem scaled to its RAM); see tuning/sysctl/corecast.conf for why."
    if ((apply == 0)); then
        echo "--persist: ignored without --apply (it would write ${#persist_lines[@]} keys to $persist)."
    elif ((${#persist_lines[@]} == 0)); then
        warn "--persist: no keys to write"
    elif err=$( { printf '%s\n' "$header" "${persist_lines[@]}" >"$persist"; } 2>&1); then
        echo "Persisted ${#persist_lines[@]} keys to $persist (loaded at boot by systemd-sysctl, or now: sysctl -p $persist)."
    else
        warn "--persist: could not write $persist: $err"
        n_fail=$((n_fail + 1))
    fi
fi

if ((${#why[@]} > 0)); then
    echo
    echo "Why:"
    for r in "${!why[@]}"; do
        printf '  %s: %s\n' "$r" "${why[$r]}"
    done
fi
if ((n_fail > 0)); then
    echo
    echo "$n_fail key(s) cannot be set from here (see Why); check.sh shows what is still off."
    ((apply == 1)) && exit 1
fi
exit 0
