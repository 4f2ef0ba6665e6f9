//! Reports: latency percentiles from hdrhistogram, the human-readable lines
//! and the one-line JSON record, with its keys in a stable order.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Microsecond histogram, 3 significant figures, up to one hour.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

/// The percentiles every report carries (never a mean alone).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }

    pub fn human(&self) -> String {
        if self.max_us == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            us(self.p50_us),
            us(self.p90_us),
            us(self.p99_us),
            us(self.p999_us),
            us(self.max_us)
        )
    }
}

/// A duration in microseconds, in the unit a person reads best.
pub fn us(v: u64) -> String {
    match v {
        0..=9_999 => format!("{v} µs"),
        10_000..=9_999_999 => format!("{:.2} ms", v as f64 / 1e3),
        _ => format!("{:.2} s", v as f64 / 1e6),
    }
}

/// Builds one JSON object, keys in insertion order.
#[derive(Debug, Default)]
pub struct JsonLine {
    out: String,
}

impl JsonLine {
    pub fn new() -> JsonLine {
        JsonLine::default()
    }

    fn key(&mut self, key: &str) -> &mut String {
        self.out.push(if self.out.is_empty() { '{' } else { ',' });
        let _ = write!(self.out, "{}:", serde_json::Value::from(key));
        &mut self.out
    }

    pub fn str(mut self, key: &str, v: &str) -> JsonLine {
        let value = serde_json::Value::from(v).to_string();
        self.key(key).push_str(&value);
        self
    }

    pub fn u64(mut self, key: &str, v: u64) -> JsonLine {
        let _ = write!(self.key(key), "{v}");
        self
    }

    /// Finite floats with up to 3 decimals; non-finite ones as null.
    pub fn f64(mut self, key: &str, v: f64) -> JsonLine {
        let value = if v.is_finite() {
            let r = (v * 1000.0).round() / 1000.0;
            serde_json::Value::from(r).to_string()
        } else {
            "null".to_string()
        };
        self.key(key).push_str(&value);
        self
    }

    pub fn bool(mut self, key: &str, v: bool) -> JsonLine {
        let _ = write!(self.key(key), "{v}");
        self
    }

    pub fn latency(self, prefix: &str, l: &Latency) -> JsonLine {
        self.u64(&format!("{prefix}p50_us"), l.p50_us)
            .u64(&format!("{prefix}p90_us"), l.p90_us)
            .u64(&format!("{prefix}p99_us"), l.p99_us)
            .u64(&format!("{prefix}p999_us"), l.p999_us)
            .u64(&format!("{prefix}max_us"), l.max_us)
            .f64(&format!("{prefix}mean_us"), l.mean_us)
    }

    pub fn finish(mut self) -> String {
        if self.out.is_empty() {
            self.out.push('{');
        }
        self.out.push('}');
        self.out
    }
}

/// Prints a report: the human lines on stdout, or, with `json`, on stderr
/// with the JSON line alone on stdout.
pub fn emit(json: bool, human: &str, line: String) {
    if json {
        eprint!("{human}");
        println!("{line}");
    } else {
        print!("{human}");
    }
}

/// A header or progress line: stdout, or stderr when stdout is for JSON.
pub fn say(json: bool, line: &str) {
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_keeps_order_and_escapes() {
        let line = JsonLine::new()
            .str("scenario", "echo")
            .str("url", "ws://h/\"x\"")
            .u64("n", 3)
            .f64("rate", 1.23456)
            .f64("nan", f64::NAN)
            .bool("ok", true)
            .finish();
        assert_eq!(
            line,
            r#"{"scenario":"echo","url":"ws://h/\"x\"","n":3,"rate":1.235,"nan":null,"ok":true}"#
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["n"], 3);
    }

    #[test]
    fn percentiles() {
        let mut h = new_histogram();
        for v in 1..=1000 {
            h.record(v).unwrap();
        }
        let l = Latency::of(&h);
        assert_eq!(l.p50_us, 500);
        assert_eq!(l.p99_us, 990);
        assert_eq!(l.max_us, 1000);
        assert_eq!(Latency::of(&new_histogram()), Latency::default());
        assert_eq!(us(12), "12 µs");
        assert_eq!(us(12_345), "12.35 ms");
    }
}
