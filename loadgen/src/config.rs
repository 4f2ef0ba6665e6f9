//! The command line (clap derive, every flag also readable from `LOADGEN_*`)
//! and its validation, once at start, into read-only run plans.

use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use corecast_ws::{OpCode, MAX_HEADER_LEN};

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
    /// Drive the gateway's chat protocol (corecast.v1): rooms of members, some of
    /// them publishing; check ordering and delivery, report delivery latency.
    /// With --reconnect, ride out a gateway node going away (resume and check).
    Chat(ChatArgs),
}

/// Flags every scenario shares: where to connect and how.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// WebSocket URL, ws://HOST[:PORT][/PATH] or wss:// (with --ca or
    /// --insecure); repeat the flag or give a comma list to spread
    /// connections round-robin over several servers (the nodes of a
    /// cluster). Default: ws://127.0.0.1:8080/echo (chat:
    /// ws://127.0.0.1:8080/ws).
    #[arg(
        long,
        env = "LOADGEN_URL",
        value_delimiter = ',',
        value_name = "URL,..."
    )]
    pub url: Vec<String>,

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
    /// before it counts as failed; chat allows as long again for welcome and joined.
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

    /// For wss:// URLs: a PEM file of the CA certificate(s) the server's
    /// certificate must chain to (its name is checked against the URL's host).
    #[arg(long, env = "LOADGEN_CA", value_name = "PATH")]
    pub ca: Option<std::path::PathBuf>,

    /// For wss:// URLs: accept any certificate (self-signed test servers).
    /// The handshake is still encrypted and signed; only who signed the
    /// certificate goes unchecked.
    #[arg(long, env = "LOADGEN_INSECURE")]
    pub insecure: bool,
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

/// `loadgen chat`.
#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Rooms, named <room-prefix>-0, <room-prefix>-1, ...
    #[arg(long, env = "LOADGEN_ROOMS", default_value_t = 10)]
    pub rooms: usize,

    /// Members per room, one connection (and one user) each; publishers included.
    #[arg(long, env = "LOADGEN_MEMBERS", default_value_t = 100)]
    pub members: usize,

    /// Publishers per room: its first members also publish.
    #[arg(long, env = "LOADGEN_PUBLISHERS", default_value_t = 1)]
    pub publishers: usize,

    /// Publishes per second over all publishers, spread evenly over them and
    /// in time. Latency runs from each publish's intended send time, so a
    /// stalled publisher cannot hide it. 0 = as fast as acks come back
    /// (--window unacked publishes per publisher).
    #[arg(
        long,
        env = "LOADGEN_RATE",
        default_value_t = 0,
        value_name = "MSGS_PER_S"
    )]
    pub rate: u64,

    /// At --rate 0: unacked publishes per publisher.
    #[arg(long, env = "LOADGEN_WINDOW", default_value_t = 1)]
    pub window: usize,

    /// At a fixed rate: most unacked publishes per publisher (and never more
    /// than 8 MiB of them). Past it the publisher waits; the wait still counts
    /// in latency, from intended send times.
    #[arg(long, env = "LOADGEN_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,

    /// Bytes of each publish's `body` JSON, reached by padding (`pad`); bodies
    /// never get shorter than their fixed fields (about 50 bytes).
    #[arg(
        long = "size",
        visible_alias = "size-bytes",
        env = "LOADGEN_SIZE_BYTES",
        default_value_t = 128,
        value_name = "BYTES"
    )]
    pub size_bytes: usize,

    /// Measured seconds of publishing, after the warm-up.
    #[arg(long, env = "LOADGEN_DURATION_S", default_value_t = 10.0)]
    pub duration_s: f64,

    /// Seconds of publishing before measuring; their deliveries are checked
    /// but their latencies are not recorded.
    #[arg(long, env = "LOADGEN_WARMUP_S", default_value_t = 0.0)]
    pub warmup_s: f64,

    /// HS256 secret the gateway was started with (its --jwt-secret); each
    /// connection gets a token for its own user in `?token=`. Without it the
    /// connections bring no token (for a gateway run with --allow-anonymous).
    #[arg(long, env = "LOADGEN_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Prefix of room and user names. Rooms keep their sequence across runs,
    /// which is fine; but another run or client publishing in the same rooms
    /// at the same time fails the checks, so give concurrent runs different prefixes.
    #[arg(long, env = "LOADGEN_ROOM_PREFIX", default_value = "lg")]
    pub room_prefix: String,

    /// After publishing ends, how long to wait for the last acks and
    /// deliveries before counting the missing ones as unacked or lost.
    #[arg(long, env = "LOADGEN_DRAIN_TIMEOUT_MS", default_value_t = 5000)]
    pub drain_timeout_ms: u64,

    /// Survive a gateway node going away (failover tests): a member whose
    /// connection drops after it joined (close 1001/1011-1014, EOF, reset)
    /// reconnects to the next --url, round-robin, and resumes its room from
    /// the last seq it holds (join with since + epoch). Unacked publishes
    /// (in flight at the drop, or forwarded to a node that died) are counted
    /// (not retried) but do not fail the run; lost acked messages and a
    /// resume answered `recovered:false` do. Off: a drop fails the run
    /// (unexpected_closes).
    #[arg(long, env = "LOADGEN_RECONNECT")]
    pub reconnect: bool,

    /// With --reconnect: how long after its drop a member keeps trying
    /// (backoff 100 ms doubling to 1 s, each try on the next --url) before it
    /// counts as an unexpected close.
    #[arg(
        long,
        env = "LOADGEN_RECONNECT_TIMEOUT_S",
        default_value_t = 10.0,
        requires = "reconnect"
    )]
    pub reconnect_timeout_s: f64,
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
    /// A `wss://` URL: the host its certificate must name.
    pub secure: Option<String>,
    /// How a `wss://` target connects (set once `--ca`/`--insecure` are read).
    pub tls: Option<crate::tls::TlsClient>,
}

impl Target {
    /// The same target with `key=value` added to the query. `value` must be
    /// URL-safe as it is (a JWT is: base64url and dots).
    pub fn with_query(&self, key: &str, value: &str) -> Target {
        let sep = if self.path.contains('?') { '&' } else { '?' };
        Target {
            path: format!("{}{sep}{key}={value}", self.path),
            ..self.clone()
        }
    }
}

/// Validated connection settings shared by every scenario.
#[derive(Debug, Clone)]
pub struct ConnPlan {
    /// One or more servers; connection `i` goes to `targets[i % len]`.
    pub targets: Vec<Target>,
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
    /// Server of connection `index`, round-robin.
    pub fn target(&self, index: usize) -> &Target {
        &self.targets[index % self.targets.len()]
    }

    /// The server to try after a connection to `targets[slot]` failed: the
    /// next one, round-robin, so that a dead node is left behind (with one
    /// URL, the same one: a node coming back).
    pub fn next_target(&self, slot: usize) -> usize {
        (slot + 1) % self.targets.len()
    }

    /// The URLs, comma separated, for reports.
    pub fn urls(&self) -> String {
        let urls: Vec<&str> = self.targets.iter().map(|t| t.url.as_str()).collect();
        urls.join(",")
    }

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

#[derive(Debug, Clone)]
pub struct ChatPlan {
    pub conn: ConnPlan,
    pub rooms: usize,
    pub members: usize,
    pub publishers: usize,
    /// Publishes per second over all publishers; `None` = closed loop.
    pub rate: Option<f64>,
    /// Unacked publishes per publisher: `--window` (closed loop) or
    /// `--max-in-flight` (fixed rate).
    pub window: usize,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain_timeout: Duration,
    pub jwt_secret: Option<Vec<u8>>,
    pub room_prefix: String,
    /// `--reconnect`: how long a member that dropped after joining keeps
    /// trying to come back and resume; `None`: a drop fails the member.
    pub reconnect_timeout: Option<Duration>,
}

impl ChatPlan {
    /// Connections in all: one per member of each room.
    pub fn connections(&self) -> usize {
        self.rooms * self.members
    }
}

impl EchoArgs {
    pub fn validate(&self) -> anyhow::Result<EchoPlan> {
        let conn = self.common.validate(self.connections, DEFAULT_ECHO_URL)?;
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
            conn: self.common.validate(self.connections, DEFAULT_ECHO_URL)?,
            connections: self.connections,
            hold: seconds("--hold-s", self.hold_s)?,
        })
    }
}

impl ChatArgs {
    pub fn validate(&self) -> anyhow::Result<ChatPlan> {
        if self.rooms == 0 || self.members == 0 {
            bail!("--rooms and --members must be at least 1");
        }
        if self.publishers == 0 || self.publishers > self.members {
            bail!(
                "--publishers {}: between 1 and --members ({}); publishers are members",
                self.publishers,
                self.members
            );
        }
        let connections = self
            .rooms
            .checked_mul(self.members)
            .filter(|&c| c <= 1 << 24)
            .with_context(|| {
                format!(
                    "--rooms {} × --members {}: too many connections",
                    self.rooms, self.members
                )
            })?;
        let conn = self.common.validate(connections, DEFAULT_CHAT_URL)?;
        check_room_prefix(&self.room_prefix, self.rooms)?;
        if self.size_bytes > MAX_SIZE_BYTES {
            bail!(
                "--size {}: at most {MAX_SIZE_BYTES} bytes per body",
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
        // A publish frame: the body plus the envelope (type, room, id) and a header.
        let frame_bytes = self.size_bytes + 256 + MAX_HEADER_LEN;
        if self.window * frame_bytes > MAX_WINDOW_BYTES {
            bail!(
                "--window {} of {} B bodies is over {} MiB in flight per publisher",
                self.window,
                self.size_bytes,
                MAX_WINDOW_BYTES >> 20
            );
        }
        let window = match self.rate {
            0 => self.window,
            _ => self
                .max_in_flight
                .min(MAX_RATE_IN_FLIGHT_BYTES / frame_bytes)
                .max(1),
        };
        let duration = seconds("--duration-s", self.duration_s)?;
        if duration.is_zero() {
            bail!("--duration-s must be more than 0");
        }
        let jwt_secret = match self.jwt_secret.as_deref() {
            Some("") => bail!("--jwt-secret is empty; leave it out to connect without tokens"),
            s => s.map(|s| s.as_bytes().to_vec()),
        };
        let reconnect_timeout = match self.reconnect {
            false => None,
            true => {
                let t = seconds("--reconnect-timeout-s", self.reconnect_timeout_s)?;
                if t.is_zero() {
                    bail!("--reconnect-timeout-s must be more than 0");
                }
                Some(t)
            }
        };
        Ok(ChatPlan {
            conn,
            rooms: self.rooms,
            members: self.members,
            publishers: self.publishers,
            rate: (self.rate > 0).then_some(self.rate as f64),
            window,
            size: self.size_bytes,
            warmup: seconds("--warmup-s", self.warmup_s)?,
            duration,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            jwt_secret,
            room_prefix: self.room_prefix.clone(),
            reconnect_timeout,
        })
    }
}

/// Room names are `<prefix>-<index>`: 1 to 128 bytes of letters, digits and
/// `_ - . : @ /` (docs/protocol.md); user names `<prefix>-u<index>`.
fn check_room_prefix(prefix: &str, rooms: usize) -> anyhow::Result<()> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-.:@/".contains(&b);
    if prefix.is_empty() || !prefix.bytes().all(allowed) {
        bail!(
            "--room-prefix {prefix:?}: use letters, digits and _ - . : @ / only (room name rules)"
        );
    }
    let longest = prefix.len() + 1 + (rooms - 1).to_string().len();
    if longest > 128 {
        bail!("--room-prefix {prefix:?}: room names would be over 128 bytes");
    }
    Ok(())
}

const DEFAULT_ECHO_URL: &str = "ws://127.0.0.1:8080/echo";
const DEFAULT_CHAT_URL: &str = "ws://127.0.0.1:8080/ws";

impl CommonArgs {
    fn validate(&self, connections: usize, default_url: &str) -> anyhow::Result<ConnPlan> {
        if connections == 0 {
            bail!("--connections must be at least 1");
        }
        let targets = if self.url.is_empty() {
            vec![parse_ws_url(default_url)?]
        } else {
            let urls = self.url.iter().map(|u| u.trim()).filter(|u| !u.is_empty());
            urls.map(parse_ws_url).collect::<anyhow::Result<Vec<_>>>()?
        };
        if targets.is_empty() {
            bail!("--url: no URL given");
        }
        let mut targets = targets;
        if targets.iter().any(|t| t.secure.is_some()) {
            let config = crate::tls::client_config(self.ca.as_deref(), self.insecure)?;
            for t in targets.iter_mut() {
                if let Some(host) = &t.secure {
                    let name =
                        rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                            anyhow::anyhow!("{}: {host} is not a server name: {e}", t.url)
                        })?;
                    t.tls = Some(crate::tls::TlsClient {
                        config: config.clone(),
                        name,
                    });
                }
            }
        } else if self.ca.is_some() || self.insecure {
            bail!("--ca and --insecure are for wss:// URLs; every --url here is ws://");
        }
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
            for target in &targets {
                if s.is_ipv4() != target.addr.is_ipv4() {
                    bail!(
                        "--sources {s} and {} are not the same IP version",
                        target.addr
                    );
                }
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
            targets,
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
    let (rest, secure) = if lower.starts_with("ws://") {
        (&url[5..], false)
    } else if lower.starts_with("wss://") {
        (&url[6..], true)
    } else if lower.starts_with("http://") || lower.starts_with("https://") {
        bail!("{url}: a WebSocket URL starts with ws:// or wss://, e.g. ws://127.0.0.1:8080/echo");
    } else {
        bail!("{url}: expected ws://HOST[:PORT][/PATH], e.g. ws://127.0.0.1:8080/echo");
    };
    let rest = rest.split('#').next().unwrap_or("");
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        bail!("{url}: user names in URLs are not supported");
    }
    let (host, port) = split_host_port(authority, if secure { 443 } else { 80 })
        .with_context(|| url.to_string())?;
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
        secure: secure.then(|| host.to_string()),
        tls: None,
    })
}

/// Splits `host[:port]` or `[v6][:port]`; the port defaults to `default`
/// (80 for ws://, 443 for wss://).
fn split_host_port(authority: &str, default: u16) -> anyhow::Result<(&str, u16)> {
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
        None | Some("") => default,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .with_context(|| format!("bad port {p:?}"))?,
    };
    Ok((host, port))
}

/// Parses a CPU list such as "1", "0,2" or "0-3,6" (the gateway's parser).
pub fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<usize>> {
    corecast_readiness::cpus::parse(list).map_err(|e| anyhow::anyhow!("--cpus: {e}"))
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
            (
                "wss default port",
                "wss://127.0.0.1/",
                Ok(("127.0.0.1", "/", "127.0.0.1:443")),
            ),
            (
                "wss",
                "WSS://localhost:8443/ws",
                Ok(("localhost:8443", "/ws", "127.0.0.1:8443")),
            ),
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
                    let secure = url.to_ascii_lowercase().starts_with("wss://");
                    assert_eq!(t.secure.is_some(), secure, "{name}");
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

    #[test]
    fn reconnects_rotate_over_the_urls() {
        let plan = |urls: &str| {
            let cli = Cli::try_parse_from(["loadgen", "chat", "--url", urls]).unwrap();
            let Command::Chat(c) = cli.command else {
                panic!("not chat")
            };
            c.validate().unwrap().conn
        };
        let three = plan("ws://127.0.0.1:1/ws,ws://127.0.0.1:2/ws,ws://127.0.0.1:3/ws");
        // name, slot used, next slot
        let cases = [("first", 0, 1), ("middle", 1, 2), ("wraps", 2, 0)];
        for (name, slot, next) in cases {
            assert_eq!(three.next_target(slot), next, "{name}");
        }
        // Connection 4 starts on port 2, then tries 3, 1, 2, ...
        let mut slot = 4 % three.targets.len();
        let ports: Vec<u16> = (0..4)
            .map(|_| {
                slot = three.next_target(slot);
                three.target(slot).addr.port()
            })
            .collect();
        assert_eq!(ports, [3, 1, 2, 3]);
        let one = plan("ws://127.0.0.1:1/ws");
        assert_eq!(one.next_target(0), 0, "one URL: the same node again");
    }

    #[test]
    fn wss_urls_need_a_ca_or_insecure_and_get_their_tls() {
        let validate = |args: &[&str]| {
            let mut argv = vec!["loadgen", "echo"];
            argv.extend_from_slice(args);
            let Command::Echo(e) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not echo")
            };
            e.validate().map(|p| p.conn)
        };
        let ca = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../gateway/tests/testdata/tls/ca.pem"
        );
        let cases: &[(&str, &[&str], Result<usize, &str>)] = &[
            (
                "no trust given",
                &["--url", "wss://localhost:1/echo"],
                Err("needs --ca"),
            ),
            (
                "both",
                &["--url", "wss://localhost:1/", "--ca", ca, "--insecure"],
                Err("give one"),
            ),
            (
                "not a CA file",
                &["--url", "wss://localhost:1/", "--ca", "/nonexistent"],
                Err("--ca /nonexistent"),
            ),
            (
                "ca on ws",
                &["--url", "ws://127.0.0.1:1/", "--insecure"],
                Err("for wss://"),
            ),
            (
                "ca",
                &["--url", "wss://localhost:1/,ws://127.0.0.1:2/", "--ca", ca],
                Ok(1),
            ),
            (
                "insecure",
                &["--url", "wss://127.0.0.1:1/", "--insecure"],
                Ok(1),
            ),
        ];
        for (name, args, want) in cases {
            match (validate(args), want) {
                (Ok(plan), Ok(n)) => {
                    let tls = plan.targets.iter().filter(|t| t.tls.is_some()).count();
                    assert_eq!(tls, *n, "{name}");
                }
                (Err(e), Err(w)) => assert!(format!("{e:#}").contains(w), "{name}: {e:#}"),
                (got, want) => panic!("{name}: got {:?}, want {want:?}", got.map(|_| ())),
            }
        }
    }

    #[test]
    fn reconnect_timeout_needs_reconnect() {
        let e = Cli::try_parse_from(["loadgen", "chat", "--reconnect-timeout-s", "3"]).unwrap_err();
        assert!(e.to_string().contains("--reconnect"), "{e}");
    }

    #[test]
    fn chat_cli() {
        let chat = |args: &[&str]| {
            let mut argv = vec!["loadgen", "chat"];
            argv.extend_from_slice(args);
            let Command::Chat(c) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not chat")
            };
            c.validate()
        };
        let plan = chat(&[
            "--url",
            "ws://127.0.0.1:1/ws,ws://127.0.0.1:2/ws",
            "--url",
            "ws://127.0.0.1:3/ws",
            "--rooms",
            "3",
            "--members",
            "4",
            "--publishers",
            "2",
            "--rate",
            "500",
        ])
        .unwrap();
        assert_eq!(plan.connections(), 12);
        assert_eq!(plan.conn.targets.len(), 3);
        assert_eq!(plan.conn.target(4).addr.port(), 2);
        assert_eq!(plan.window, 1024, "fixed rate: --max-in-flight");
        assert!(plan.jwt_secret.is_none());
        let plan = chat(&["--rooms", "1", "--members", "1"]).unwrap();
        assert_eq!(plan.conn.urls(), "ws://127.0.0.1:8080/ws");
        assert_eq!(plan.window, 1);
        let t = plan.conn.target(0).with_query("token", "a.b.c");
        assert_eq!(t.path, "/ws?token=a.b.c");
        assert_eq!(t.with_query("x", "1").path, "/ws?token=a.b.c&x=1");
        assert_eq!(plan.reconnect_timeout, None, "off by default");
        let plan = chat(&["--reconnect", "--reconnect-timeout-s", "2.5"]).unwrap();
        assert_eq!(plan.reconnect_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(
            chat(&["--reconnect"]).unwrap().reconnect_timeout,
            Some(Duration::from_secs(10))
        );
        for (args, want) in [
            (&["--publishers", "101"][..], "publishers are members"),
            (&["--publishers", "0"][..], "between 1"),
            (&["--room-prefix", "a b"][..], "--room-prefix"),
            (&["--jwt-secret", ""][..], "empty"),
            (&["--rooms", "0"][..], "at least 1"),
            (
                &["--reconnect", "--reconnect-timeout-s", "0"][..],
                "--reconnect-timeout-s",
            ),
        ] {
            let e = format!("{:#}", chat(args).unwrap_err());
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
}
