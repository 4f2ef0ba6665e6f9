//! The command line (clap derive, every flag also readable from `LOADGEN_*`)
//! and its validation, once at start, into read-only run plans.

use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use corecast_gateway::ws::{OpCode, MAX_HEADER_LEN};

/// Largest `--size`: a 64 MiB message already says more about memory
/// bandwidth than about the gateway.
const MAX_SIZE_BYTES: usize = 64 << 20;

/// Most bytes of messages one connection may have in flight with `--window`.
const MAX_WINDOW_BYTES: usize = 64 << 20;

/// Most bytes of messages one connection keeps in flight at a fixed rate:
/// bounds the send buffer when the server falls behind.
const MAX_RATE_IN_FLIGHT_BYTES: usize = 8 << 20;

/// Descriptors a process needs besides its connections: stdio, each
/// executor's rings and eventfds, the allocator's files.
const SPARE_FDS_BASE: u64 = 32;
const SPARE_FDS_PER_THREAD: u64 = 16;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "corecast load generator: echo throughput and latency, idle connection holds",
    after_help = "The human-readable report goes to stdout; with --json it goes to stderr \
                  and stdout carries exactly one JSON line. Exit status: 0 clean run, \
                  1 errors or failed connections during the run, 2 bad command line."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Send messages to an RFC 6455 echo endpoint; report throughput and round-trip latency.
    Echo(EchoArgs),
    /// Open many idle connections, hold them, then close them (memory per idle connection).
    Hold(HoldArgs),
}

/// Flags every scenario shares: where to connect and how.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// WebSocket URL, ws://HOST[:PORT][/PATH]. wss:// is not supported yet.
    #[arg(long, env = "LOADGEN_URL", default_value = "ws://127.0.0.1:8080/echo")]
    pub url: String,

    /// Local source addresses, comma separated, given to connections round-robin.
    /// Each source address has its own ~28k ephemeral ports per destination.
    /// Default: the kernel picks.
    #[arg(
        long,
        env = "LOADGEN_SOURCES",
        value_delimiter = ',',
        value_name = "IP,..."
    )]
    pub sources: Vec<IpAddr>,

    /// Executor threads, one glommio executor each; connections are spread over
    /// them round-robin. Default: 1, or one per --cpus entry.
    #[arg(long, env = "LOADGEN_THREADS")]
    pub threads: Option<usize>,

    /// Pin executor threads to these CPUs, one per thread: "1", "0,2" or "2-3".
    /// Default: not pinned.
    #[arg(long, env = "LOADGEN_CPUS", value_name = "LIST")]
    pub cpus: Option<String>,

    /// New connections per second over all threads. Pacing keeps a connect
    /// storm from overflowing the server's accept backlog (dropped SYNs cost a
    /// 1 s retransmit each).
    #[arg(
        long,
        env = "LOADGEN_CONNECT_RATE",
        default_value_t = 5000,
        value_name = "CONNS_PER_S"
    )]
    pub connect_rate: u32,

    /// How long one connection attempt (TCP connect and upgrade) may take
    /// before it counts as failed.
    #[arg(long, env = "LOADGEN_CONNECT_TIMEOUT_MS", default_value_t = 5000)]
    pub connect_timeout_ms: u64,

    /// How long the closing handshakes at the end may take in all (close
    /// frame out, close frame back); bounds the exit of a run against a
    /// server that never answers a close.
    #[arg(long, env = "LOADGEN_CLOSE_TIMEOUT_MS", default_value_t = 2000)]
    pub close_timeout_ms: u64,

    /// Print one JSON line on stdout; the human-readable report moves to stderr.
    #[arg(long, env = "LOADGEN_JSON")]
    pub json: bool,
}

/// `loadgen echo`.
#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Connections to open.
    #[arg(long, short = 'c', env = "LOADGEN_CONNECTIONS", default_value_t = 100)]
    pub connections: usize,

    /// Payload bytes per message.
    #[arg(
        long = "size",
        visible_alias = "size-bytes",
        env = "LOADGEN_SIZE_BYTES",
        default_value_t = 64,
        value_name = "BYTES"
    )]
    pub size_bytes: usize,

    /// Measured seconds, after the warm-up.
    #[arg(long, env = "LOADGEN_DURATION_S", default_value_t = 10.0)]
    pub duration_s: f64,

    /// Seconds of load before measuring; messages sent then are not recorded.
    #[arg(long, env = "LOADGEN_WARMUP_S", default_value_t = 0.0)]
    pub warmup_s: f64,

    /// Messages per second over all connections, spread evenly over them and
    /// in time. Latency is measured from each message's intended send time,
    /// so a stalled sender cannot hide it. 0 = as fast as echoes come back
    /// (closed loop, --window messages in flight per connection).
    #[arg(
        long,
        env = "LOADGEN_RATE",
        default_value_t = 0,
        value_name = "MSGS_PER_S"
    )]
    pub rate: u64,

    /// At max throughput (--rate 0): messages in flight per connection,
    /// written together in one send.
    #[arg(long, env = "LOADGEN_WINDOW", default_value_t = 1)]
    pub window: usize,

    /// At a fixed rate: most unanswered messages per connection, and never
    /// more than 8 MiB of them. Past it the sender waits; the wait still
    /// counts in latency, from intended send times.
    #[arg(long, env = "LOADGEN_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,

    /// Send text frames (ASCII payloads) instead of binary ones.
    #[arg(long, conflicts_with = "binary")]
    pub text: bool,

    /// Send binary frames (the default).
    #[arg(long)]
    pub binary: bool,

    /// After the measured time, how long to wait for the last echoes before
    /// counting them as lost.
    #[arg(long, env = "LOADGEN_DRAIN_TIMEOUT_MS", default_value_t = 2000)]
    pub drain_timeout_ms: u64,
}

/// `loadgen hold`.
#[derive(Args, Debug, Clone)]
pub struct HoldArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Connections to open. One process may hold up to its open-files limit
    /// minus a few dozen; run several processes (with different --sources) for more.
    #[arg(long, short = 'c', env = "LOADGEN_CONNECTIONS", default_value_t = 1000)]
    pub connections: usize,

    /// Seconds to hold the connections idle once all attempts are done
    /// (Ctrl-C ends the hold early and still closes cleanly).
    #[arg(long, env = "LOADGEN_HOLD_S", default_value_t = 10.0)]
    pub hold_s: f64,
}

/// Where to connect: a parsed `ws://` URL with its address resolved once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given, for reports.
    pub url: String,
    /// `Host` header value: the URL's authority.
    pub host: String,
    /// Request target: path and query, at least "/".
    pub path: String,
    pub addr: SocketAddr,
}

/// Validated connection settings shared by every scenario.
#[derive(Debug, Clone)]
pub struct ConnPlan {
    pub target: Target,
    pub sources: Vec<IpAddr>,
    pub threads: usize,
    /// One CPU per thread when pinned.
    pub cpus: Option<Vec<usize>>,
    pub connect_rate: f64,
    pub connect_timeout: Duration,
    pub close_timeout: Duration,
    pub json: bool,
}

impl ConnPlan {
    /// Source address of connection `index`, round-robin.
    pub fn source(&self, index: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[index % self.sources.len()])
    }

    /// Connection indices thread `thread` owns, round-robin.
    pub fn indices(&self, thread: usize, connections: usize) -> impl Iterator<Item = usize> {
        (thread..connections).step_by(self.threads)
    }
}

#[derive(Debug, Clone)]
pub struct EchoPlan {
    pub conn: ConnPlan,
    pub connections: usize,
    pub size: usize,
    pub opcode: OpCode,
    pub warmup: Duration,
    pub duration: Duration,
    /// Messages per second over all connections; `None` = closed loop.
    pub rate: Option<f64>,
    pub window: usize,
    pub max_in_flight: usize,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct HoldPlan {
    pub conn: ConnPlan,
    pub connections: usize,
    pub hold: Duration,
}

impl EchoArgs {
    pub fn validate(&self) -> anyhow::Result<EchoPlan> {
        let conn = self.common.validate(self.connections)?;
        if self.size_bytes > MAX_SIZE_BYTES {
            bail!(
                "--size {}: at most {MAX_SIZE_BYTES} bytes per message",
                self.size_bytes
            );
        }
        if self.window == 0 || self.window > 65_536 {
            bail!("--window {}: between 1 and 65536", self.window);
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1 << 20 {
            bail!(
                "--max-in-flight {}: between 1 and 1048576",
                self.max_in_flight
            );
        }
        let frame_bytes = self.size_bytes + MAX_HEADER_LEN;
        if self.window * frame_bytes > MAX_WINDOW_BYTES {
            bail!(
                "--window {} of {} B messages is over {} MiB in flight per connection",
                self.window,
                self.size_bytes,
                MAX_WINDOW_BYTES >> 20
            );
        }
        let max_in_flight = self
            .max_in_flight
            .min(MAX_RATE_IN_FLIGHT_BYTES / frame_bytes)
            .max(1);
        let duration = seconds("--duration-s", self.duration_s)?;
        if duration.is_zero() {
            bail!("--duration-s must be more than 0");
        }
        Ok(EchoPlan {
            conn,
            connections: self.connections,
            size: self.size_bytes,
            opcode: if self.text {
                OpCode::Text
            } else {
                OpCode::Binary
            },
            warmup: seconds("--warmup-s", self.warmup_s)?,
            duration,
            rate: (self.rate > 0).then_some(self.rate as f64),
            window: self.window,
            max_in_flight,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
        })
    }
}

impl HoldArgs {
    pub fn validate(&self) -> anyhow::Result<HoldPlan> {
        Ok(HoldPlan {
            conn: self.common.validate(self.connections)?,
            connections: self.connections,
            hold: seconds("--hold-s", self.hold_s)?,
        })
    }
}

impl CommonArgs {
    fn validate(&self, connections: usize) -> anyhow::Result<ConnPlan> {
        if connections == 0 {
            bail!("--connections must be at least 1");
        }
        let target = parse_ws_url(&self.url)?;
        let cpus = self.cpus.as_deref().map(parse_cpu_list).transpose()?;
        let threads = match (self.threads, &cpus) {
            (Some(0), _) => bail!("--threads must be at least 1"),
            (Some(t), Some(c)) if t != c.len() => bail!(
                "--threads {t} but --cpus lists {} CPU(s): give one CPU per thread",
                c.len()
            ),
            (Some(t), _) => t,
            (None, Some(c)) => c.len(),
            (None, None) => 1,
        };
        if threads > 256 {
            bail!("--threads {threads}: at most 256");
        }
        if threads > connections {
            bail!("--threads {threads} is more than --connections {connections}");
        }
        for s in &self.sources {
            if s.is_ipv4() != target.addr.is_ipv4() {
                bail!(
                    "--sources {s} and {} are not the same IP version",
                    target.addr
                );
            }
        }
        if self.connect_rate == 0 {
            bail!("--connect-rate must be at least 1 per second");
        }
        if self.connect_timeout_ms == 0 {
            bail!("--connect-timeout-ms must be at least 1");
        }
        check_open_files(connections as u64, threads as u64)?;
        Ok(ConnPlan {
            target,
            sources: self.sources.clone(),
            threads,
            cpus,
            connect_rate: self.connect_rate as f64,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            close_timeout: Duration::from_millis(self.close_timeout_ms),
            json: self.json,
        })
    }
}

/// Raises the open-files limit as far as allowed and checks the run fits.
fn check_open_files(connections: u64, threads: u64) -> anyhow::Result<()> {
    let need = connections + SPARE_FDS_BASE + SPARE_FDS_PER_THREAD * threads;
    let limit = crate::sys::raise_open_files_limit().context("reading the open-files limit")?;
    if need > limit {
        bail!(
            "--connections {connections} needs about {need} open files but this process may \
             open {limit} (ulimit -n); run several loadgen processes, each with its own --sources"
        );
    }
    Ok(())
}

fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    if !(0.0..=7.0 * 86_400.0).contains(&s) {
        bail!("{flag} {s}: expected seconds between 0 and one week");
    }
    Ok(Duration::from_secs_f64(s))
}

/// Parses `ws://HOST[:PORT][/PATH][?QUERY]` and resolves HOST.
pub fn parse_ws_url(url: &str) -> anyhow::Result<Target> {
    let lower = url.to_ascii_lowercase();
    let rest = if lower.starts_with("ws://") {
        &url[5..]
    } else if lower.starts_with("wss://") {
        bail!("{url}: wss:// (TLS) is not supported by loadgen yet; use ws://");
    } else if lower.starts_with("http://") || lower.starts_with("https://") {
        bail!("{url}: a WebSocket URL starts with ws://, e.g. ws://127.0.0.1:8080/echo");
    } else {
        bail!("{url}: expected ws://HOST[:PORT][/PATH], e.g. ws://127.0.0.1:8080/echo");
    };
    let rest = rest.split('#').next().unwrap_or("");
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        bail!("{url}: user names in URLs are not supported");
    }
    let (host, port) = split_host_port(authority).with_context(|| url.to_string())?;
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        bail!("{url}: the path may not contain spaces or control characters");
    }
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{url}: {host} has no address"))?;
    Ok(Target {
        url: url.to_string(),
        host: authority.to_string(),
        path,
        addr,
    })
}

/// Splits `host[:port]` or `[v6][:port]`; the port defaults to 80.
fn split_host_port(authority: &str) -> anyhow::Result<(&str, u16)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').context("unclosed '[' in the host")?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').context("expected ':' after ']'")?),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        bail!("no host");
    }
    let port = match port {
        None | Some("") => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .with_context(|| format!("bad port {p:?}"))?,
    };
    Ok((host, port))
}

/// Parses a CPU list such as "1", "0,2" or "0-3,6".
pub fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("--cpus {list:?}: expected a list like 1 or 0,2-3");
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo.parse().with_context(bad)?;
        let hi: usize = hi.parse().with_context(bad)?;
        if lo > hi || hi > 4095 {
            bail!("{}", bad());
        }
        for cpu in lo..=hi {
            if cpus.contains(&cpu) {
                bail!("--cpus {list:?}: CPU {cpu} listed twice");
            }
            cpus.push(cpu);
        }
    }
    if cpus.is_empty() {
        bail!("--cpus {list:?}: no CPUs listed");
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        type Expect = Result<(&'static str, &'static str, &'static str), &'static str>;
        let cases: &[(&str, &str, Expect)] = &[
            (
                "full",
                "ws://127.0.0.1:8080/echo",
                Ok(("127.0.0.1:8080", "/echo", "127.0.0.1:8080")),
            ),
            (
                "default port and path",
                "ws://127.0.0.1",
                Ok(("127.0.0.1", "/", "127.0.0.1:80")),
            ),
            (
                "query without path",
                "WS://127.0.0.1:9?x=1",
                Ok(("127.0.0.1:9", "/?x=1", "127.0.0.1:9")),
            ),
            (
                "fragment dropped",
                "ws://127.0.0.1:9/a?b#c",
                Ok(("127.0.0.1:9", "/a?b", "127.0.0.1:9")),
            ),
            (
                "ipv6",
                "ws://[::1]:81/x",
                Ok(("[::1]:81", "/x", "[::1]:81")),
            ),
            ("wss", "wss://127.0.0.1/", Err("not supported")),
            ("http", "http://127.0.0.1/", Err("starts with ws://")),
            ("no scheme", "127.0.0.1:8080", Err("expected ws://")),
            ("bad port", "ws://127.0.0.1:99999/", Err("bad port")),
            ("zero port", "ws://127.0.0.1:0/", Err("bad port")),
            ("no host", "ws://:80/", Err("no host")),
            ("user", "ws://a@127.0.0.1/", Err("user names")),
            ("space", "ws://127.0.0.1/a b", Err("spaces")),
        ];
        for (name, url, expected) in cases {
            match (parse_ws_url(url), expected) {
                (Ok(t), Ok((host, path, addr))) => {
                    assert_eq!(t.host, *host, "{name}");
                    assert_eq!(t.path, *path, "{name}");
                    assert_eq!(t.addr.to_string(), *addr, "{name}");
                }
                (Err(e), Err(want)) => {
                    let e = format!("{e:#}");
                    assert!(e.contains(want), "{name}: {e}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
        assert_eq!(parse_cpu_list(" 4 , 1 ").unwrap(), vec![4, 1]);
        for bad in ["", "a", "3-1", "1,1", "1-", "-1"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cli_shape() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "loadgen",
            "echo",
            "--url",
            "ws://127.0.0.1:1/echo",
            "-c",
            "10",
            "--size",
            "128",
            "--duration-s",
            "1.5",
            "--rate",
            "1000",
            "--text",
            "--cpus",
            "0",
        ])
        .unwrap();
        let Command::Echo(e) = cli.command else {
            panic!("not echo")
        };
        let plan = e.validate().unwrap();
        assert_eq!(plan.size, 128);
        assert_eq!(plan.opcode, OpCode::Text);
        assert_eq!(plan.conn.threads, 1);
        assert_eq!(plan.rate, Some(1000.0));
        assert_eq!(plan.duration, Duration::from_millis(1500));
        assert!(Cli::try_parse_from(["loadgen", "echo", "--text", "--binary"]).is_err());
    }
}
