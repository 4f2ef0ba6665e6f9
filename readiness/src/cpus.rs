//! CPU lists (`0-3,6`) and the CPUs this process may run on: where the
//! gateway pins its shards and loadgen its executors. One parser for both
//! binaries, so `--cpus` means the same in each.

/// The most CPU ids a list may name (the kernel's `CONFIG_NR_CPUS` default
/// ceiling): a typo like `0-4000000` is refused instead of allocating.
pub const MAX_CPU: usize = 4095;

/// Parses a CPU list such as `1`, `0,2` or `0-3,6`, in the order given.
/// Spaces around parts are allowed; a CPU named twice, a backwards range,
/// an id above [`MAX_CPU`] or an empty list is an error that says so.
pub fn parse(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad CPU list part {part:?}: expected N or N-M, e.g. 0-3,6");
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo.parse().map_err(|_| bad())?;
        let hi: usize = hi.parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(bad());
        }
        if hi > MAX_CPU {
            return Err(format!("CPU {hi} in {list:?} is above {MAX_CPU}"));
        }
        for cpu in lo..=hi {
            if cpus.contains(&cpu) {
                return Err(format!("CPU list {list:?} names CPU {cpu} twice"));
            }
            cpus.push(cpu);
        }
    }
    if cpus.is_empty() {
        return Err(format!("empty CPU list {list:?}"));
    }
    Ok(cpus)
}

/// The CPUs this process may run on (its affinity mask, read from
/// `/proc/self/status` so no unsafe call is needed), in ascending order.
/// Without `/proc`: `0..available_parallelism`.
pub fn allowed() -> Vec<usize> {
    let from_proc = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))?;
            parse(line.split(':').nth(1)?.trim()).ok()
        });
    match from_proc {
        Some(mut cpus) => {
            cpus.sort_unstable();
            cpus
        }
        None => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (0..n).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        let cases: &[(&str, Option<&[usize]>)] = &[
            ("0", Some(&[0])),
            ("1", Some(&[1])),
            ("0-3,6", Some(&[0, 1, 2, 3, 6])),
            ("0,2-3", Some(&[0, 2, 3])),
            (" 1 , 0 ", Some(&[1, 0])),
            ("2 - 3", Some(&[2, 3])),
            ("3-1", None),
            ("a", None),
            ("1-", None),
            ("-1", None),
            ("", None),
            (",", None),
            ("0,0", None),
            ("0-2,1", None),
            ("0-4096", None),
        ];
        for (s, expected) in cases {
            assert_eq!(parse(s).ok().as_deref(), *expected, "{s:?}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(parse("0,0").unwrap_err().contains("names CPU 0 twice"));
        assert!(parse("x").unwrap_err().contains("expected N or N-M"));
        assert!(parse("").unwrap_err().contains("empty CPU list"));
        assert!(parse("9999").unwrap_err().contains("above 4095"));
    }

    #[test]
    fn this_process_may_run_somewhere() {
        let cpus = allowed();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }
}
