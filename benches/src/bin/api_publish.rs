//! The server API under load: `--connections` keep-alive HTTP/1.1
//! connections publish to one room (`POST /api/publish`, `--window`
//! requests in flight on each) while `--members` WebSocket members of the
//! room time every delivery and check its seq.
//!
//! Each publish carries its send time in its body (`{"t":<ns>,"k":<publisher>,
//! "n":<count>}`, nanoseconds since this process's clock epoch), so members
//! measure delivery latency on the same monotonic clock as the publishers.
//! A publish belongs to the measured period when its request was written in
//! it; rates and percentiles are over those publishes and their deliveries.
//! After the last answer every member must hold every acked seq (within
//! --drain-timeout-ms): one some member never got is LOST; a seq skipped,
//! seen twice or out of order is a gap, duplicate or reorder.
//!
//! Usage: api-publish --key KEY [--ws ws://127.0.0.1:8080/ws] [--api 127.0.0.1:8081]
//!        [--members 100] [--room bench] [--connections 4] [--window 1]
//!        [--duration-s 10] [--warmup-s 2] [--reader-threads 4] [--json]
//!
//! Exit status: 0 clean; 1 when an acked message was lost, a seq was out of
//! order, a member was closed or nothing was acked; 2 for bad input (an
//! unreachable gateway, a refused key).
//!
//! # Invariants
//! - One blocking thread per publisher; `--reader-threads` threads read the
//!   members' non-blocking sockets through epoll. They share only the stop
//!   flag, the measured period (set once) and each member's progress
//!   atomics, and hand their reports back when joined.

#![forbid(unsafe_code)]

use std::{
    borrow::Cow,
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use rustix::{
    buffer::spare_capacity,
    event::{epoll, Timespec},
};
use serde::Deserialize;
use serde_json::{json, value::RawValue, Value};
use tungstenite::{
    client::IntoClientRequest, http::HeaderValue, protocol::CloseFrame, Message, WebSocket,
};

/// Publishes through the server API and times the deliveries to a room's
/// WebSocket members.
#[derive(Debug, Parser)]
#[command(name = "api-publish", version)]
struct Config {
    /// The gateway's WebSocket URL (ws:// only). Members join anonymously,
    /// so the gateway runs with --allow-anonymous.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    ws: String,

    /// The server API's address, host:port (the gateway's --api-listen).
    #[arg(long, default_value = "127.0.0.1:8081")]
    api: String,

    /// One of the gateway's --api-key values.
    #[arg(long, env = "CORECAST_API_KEY", hide_env_values = true)]
    key: String,

    /// WebSocket members in the room, one reading thread each.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    members: u32,

    /// The room published to.
    #[arg(long, default_value = "bench")]
    room: String,

    /// Threads reading the members' sockets (epoll, each a share of the
    /// members). A thread per member puts the tool's context switches in
    /// every latency (on 2 cores: a third of the publishes, 4x the p99);
    /// one thread drains 100 sockets in turn and the last waits (p99 x14).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    reader_threads: u32,

    /// Publisher threads, each with one keep-alive connection to the API.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connections: u32,

    /// Requests each connection keeps in flight (pipelined); 1 is
    /// request/response.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    window: u32,

    /// Length of the measured period, in s.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration_s: u64,

    /// Publishing before the measured period, in s; not counted.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,

    /// After the last answer, how long members may take to receive every
    /// acked message, in ms; what is still missing then is LOST.
    #[arg(long, default_value_t = 5000)]
    drain_timeout_ms: u64,

    /// One JSON object on stdout instead of the human lines.
    #[arg(long)]
    json: bool,
}

/// Connecting to the gateway, either door.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Waiting for welcome and joined while members join.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than the gateway's default --api-timeout-ms (5 s, then 503): an
/// answer this late means the API is stuck, not slow.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How often an idle reader looks at the stop flag.
const MEMBER_POLL: Duration = Duration::from_millis(100);
/// A publisher whose connection broke this often gives up.
const MAX_RECONNECTS: u64 = 100;
/// Seqs a member tracks past its join seq (a 16 MiB bitmap); a seq further
/// on (a new epoch numbered from the clock) counts as a gap.
const MAX_TRACKED_SEQS: u64 = 1 << 27;

/// The process's clock epoch: body timestamps and receive times are both
/// nanoseconds since it, so latency needs no clock sync and never runs back.
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Microsecond histogram, 3 significant figures, up to one hour.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

/// The measured period, on the [`EPOCH`] clock; set once every member has
/// joined, just before the publishers start.
#[derive(Debug, Clone, Copy)]
struct Period {
    from_ns: u64,
    until_ns: u64,
}

impl Period {
    fn contains(&self, t_ns: u64) -> bool {
        (self.from_ns..self.until_ns).contains(&t_ns)
    }
}

/// The gateway's two doors, resolved once.
struct Target {
    ws_url: String,
    ws_addr: SocketAddr,
    api_host: String,
    api_addr: SocketAddr,
}

impl Target {
    fn resolve(cfg: &Config) -> Result<Target> {
        let req = cfg
            .ws
            .as_str()
            .into_client_request()
            .map_err(|e| anyhow!("--ws {}: not a WebSocket URL ({e})", cfg.ws))?;
        let uri = req.uri();
        if uri.scheme_str() != Some("ws") {
            bail!(
                "--ws {}: only ws:// URLs (the members do not speak TLS)",
                cfg.ws
            );
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("--ws {}: no host", cfg.ws))?;
        let ws_addr = first_addr(&format!("{host}:{}", uri.port_u16().unwrap_or(80)), "--ws")?;
        Ok(Target {
            ws_url: cfg.ws.clone(),
            ws_addr,
            api_host: cfg.api.clone(),
            api_addr: first_addr(&cfg.api, "--api")?,
        })
    }
}

fn first_addr(s: &str, flag: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .map_err(|e| anyhow!("{flag} {s}: not an address, host:port ({e})"))?
        .next()
        .ok_or_else(|| anyhow!("{flag} {s}: resolves to no address"))
}

/// One keep-alive HTTP/1.1 connection to the API. Requests are written by
/// hand and answers parsed with httparse, so the client adds no HTTP stack
/// of its own to the latency.
struct ApiConn {
    stream: TcpStream,
    host: Arc<str>,
    key: Arc<str>,
    /// Bytes read and not yet parsed: the next answers, in order.
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// One answer from the API.
struct Answer {
    status: u16,
    body: Vec<u8>,
    /// The server ends the connection after it (`Connection: close`).
    close: bool,
}

impl ApiConn {
    fn connect(addr: SocketAddr, host: Arc<str>, key: Arc<str>) -> io::Result<ApiConn> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(ApiConn {
            stream,
            host,
            key,
            buf: Vec::with_capacity(8192),
            out: Vec::with_capacity(512),
        })
    }

    /// Writes one POST, head and body in one write.
    fn send(&mut self, path: &str, body: &[u8]) -> io::Result<()> {
        self.out.clear();
        write!(
            self.out,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: apikey {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            self.key,
            body.len()
        )?;
        self.out.extend_from_slice(body);
        self.stream.write_all(&self.out)
    }

    /// The next answer, in the order the requests were sent.
    fn recv(&mut self) -> io::Result<Answer> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some((answer, used)) = parse_answer(&self.buf)? {
                self.buf.drain(..used);
                return Ok(answer);
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the API closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The answer at the front of `buf` and the bytes it takes; `Ok(None)`
/// means more bytes are needed. Bodies must come with Content-Length (hyper
/// sends it for every API answer); a chunked one is an error.
fn parse_answer(buf: &[u8]) -> io::Result<Option<(Answer, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(format!("unreadable HTTP answer from the API: {e}"))),
    };
    let mut length = None;
    let mut close = false;
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| invalid("an API answer with a bad Content-Length".into()))?;
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let length = length.ok_or_else(|| invalid("an API answer without Content-Length".into()))?;
    if buf.len() < head + length {
        return Ok(None);
    }
    let answer = Answer {
        status: r.code.unwrap_or(0),
        body: buf[head..head + length].to_vec(),
        close,
    };
    Ok(Some((answer, head + length)))
}

/// The `code` of an API error answer, or what the body was instead.
fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_else(|| "unreadable".into())
}

/// Checks the API is there and takes the key, before anything else runs:
/// an `/api/info` call publishes nothing.
fn check_api(target: &Target, key: &Arc<str>) -> Result<()> {
    let host: Arc<str> = target.api_host.as_str().into();
    let mut c = ApiConn::connect(target.api_addr, host, key.clone()).map_err(|e| {
        anyhow!(
            "connect to the API at {}: {e} (is the gateway running with --api-listen? pass --api)",
            target.api_host
        )
    })?;
    let a = c
        .send("/api/info", b"{}")
        .and_then(|()| c.recv())
        .map_err(|e| anyhow!("POST /api/info at {}: {e}", target.api_host))?;
    match a.status {
        200 => Ok(()),
        401 => bail!(
            "the API at {} refused the key (401 unauthorized): pass one of the gateway's --api-key values with --key",
            target.api_host
        ),
        s => bail!(
            "the API at {} answered /api/info with {s} {}",
            target.api_host,
            error_code(&a.body)
        ),
    }
}

/// The fields of an API publish answer this tool reads.
#[derive(Deserialize)]
struct Ack {
    seq: u64,
    stored: bool,
    #[serde(default)]
    duplicate: bool,
}

/// What one publisher saw.
struct PublisherReport {
    /// Request written to answer read, of the measured publishes answered
    /// 200, in µs.
    latency: Histogram<u64>,
    /// Measured publishes answered 200.
    measured_ok: u64,
    /// The seq of every publish answered 200 (warm-up too).
    acked: Vec<u64>,
    /// Answers other than 200, by "status code", whole run.
    errors: BTreeMap<String, u64>,
    /// Connections that broke (read or write failed, or timed out).
    io_errors: u64,
    last_io_error: Option<String>,
    /// Requests in flight on a connection that broke or was closed.
    unanswered: u64,
    /// 200s with `"duplicate":true`: never expected, every id is new.
    duplicate_acks: u64,
    /// 200s with `"stored":false`.
    unstored: u64,
    /// Why the publisher stopped early.
    fatal: Option<String>,
}

impl PublisherReport {
    fn new() -> PublisherReport {
        PublisherReport {
            latency: histogram(),
            measured_ok: 0,
            acked: Vec::new(),
            errors: BTreeMap::new(),
            io_errors: 0,
            last_io_error: None,
            unanswered: 0,
            duplicate_acks: 0,
            unstored: 0,
            fatal: None,
        }
    }

    fn answered(&mut self, sent_ns: u64, a: &Answer, period: Period) {
        let rtt = now_ns().saturating_sub(sent_ns);
        if a.status != 200 {
            let key = format!("{} {}", a.status, error_code(&a.body));
            *self.errors.entry(key).or_default() += 1;
            return;
        }
        let Ok(ack) = serde_json::from_slice::<Ack>(&a.body) else {
            *self.errors.entry("200 unreadable".into()).or_default() += 1;
            return;
        };
        self.acked.push(ack.seq);
        self.duplicate_acks += u64::from(ack.duplicate);
        self.unstored += u64::from(!ack.stored);
        if period.contains(sent_ns) {
            self.measured_ok += 1;
            record_ns(&mut self.latency, rtt);
        }
    }
}

/// Publisher `k`: keeps `window` publishes in flight on one connection until
/// the measured period ends, then collects the last answers.
fn publish(
    k: u32,
    window: usize,
    room_json: &str,
    target: (SocketAddr, Arc<str>, Arc<str>),
    period: Period,
) -> PublisherReport {
    let (addr, host, key) = target;
    let mut rep = PublisherReport::new();
    let connect = || ApiConn::connect(addr, host.clone(), key.clone());
    let mut conn = match connect() {
        Ok(c) => c,
        Err(e) => {
            rep.fatal = Some(format!("publisher {k}: connect to the API: {e}"));
            return rep;
        }
    };
    let mut in_flight: VecDeque<u64> = VecDeque::with_capacity(window);
    let mut body = String::with_capacity(128);
    let mut n = 0u64;
    loop {
        let mut broken = None;
        while in_flight.len() < window && now_ns() < period.until_ns {
            n += 1;
            body.clear();
            let t = now_ns();
            let _ = write!(
                body,
                r#"{{"room":{room_json},"id":"p{k}-{n}","body":{{"t":{t},"k":{k},"n":{n}}}}}"#
            );
            if let Err(e) = conn.send("/api/publish", body.as_bytes()) {
                broken = Some(e);
                break;
            }
            in_flight.push_back(t);
        }
        if broken.is_none() {
            let Some(&sent) = in_flight.front() else {
                break;
            };
            match conn.recv() {
                Ok(a) => {
                    in_flight.pop_front();
                    rep.answered(sent, &a, period);
                    if !a.close {
                        continue;
                    }
                    rep.unanswered += in_flight.len() as u64;
                    in_flight.clear();
                }
                Err(e) => broken = Some(e),
            }
        }
        if let Some(e) = broken {
            rep.io_errors += 1;
            rep.last_io_error = Some(e.to_string());
            rep.unanswered += in_flight.len() as u64;
            in_flight.clear();
            if rep.io_errors >= MAX_RECONNECTS {
                rep.fatal = Some(format!(
                    "publisher {k}: {MAX_RECONNECTS} connections to the API broke, the last with: {e}"
                ));
                return rep;
            }
        }
        if now_ns() >= period.until_ns {
            break;
        }
        conn = match connect() {
            Ok(c) => c,
            Err(e) => {
                rep.fatal = Some(format!("publisher {k}: reconnect to the API: {e}"));
                return rep;
            }
        };
    }
    rep
}

/// One member's view of the room's seqs: which arrived, and which arrived
/// out of order. Sans-IO, so the rules are tested without a gateway.
struct Seqs {
    /// The room's seq at join: the first message is `base + 1`.
    base: u64,
    /// Highest seq seen.
    last: u64,
    /// Bit i: seq `base + 1 + i` arrived.
    got: Vec<u64>,
    /// Seqs skipped over when a later one arrived.
    gaps: u64,
    /// Seqs that arrived again.
    duplicates: u64,
    /// Seqs that arrived after a later one, or at or below the join seq.
    reorders: u64,
}

impl Seqs {
    fn new(base: u64) -> Seqs {
        Seqs {
            base,
            last: base,
            got: Vec::new(),
            gaps: 0,
            duplicates: 0,
            reorders: 0,
        }
    }

    fn note(&mut self, seq: u64) {
        if seq <= self.base {
            self.reorders += 1;
            return;
        }
        let i = seq - self.base - 1;
        if i >= MAX_TRACKED_SEQS {
            self.gaps += 1;
            return;
        }
        if self.has(seq) {
            self.duplicates += 1;
            return;
        }
        let (word, bit) = ((i / 64) as usize, i % 64);
        if word >= self.got.len() {
            self.got.resize((word + 1).next_power_of_two(), 0);
        }
        self.got[word] |= 1 << bit;
        if seq > self.last + 1 {
            self.gaps += seq - self.last - 1;
        } else if seq < self.last {
            self.reorders += 1;
        }
        self.last = self.last.max(seq);
    }

    fn has(&self, seq: u64) -> bool {
        if seq <= self.base {
            return false;
        }
        let i = seq - self.base - 1;
        self.got
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// A frame from the gateway, the fields this tool reads.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
    #[serde(default, borrow)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
}

/// The body this tool publishes: the send time is all a member needs.
#[derive(Deserialize)]
struct Stamp {
    t: u64,
}

/// What the main thread reads of a running member.
#[derive(Default)]
struct Progress {
    last_seq: AtomicU64,
    /// The member's connection ended (closed by the gateway or broken).
    ended: AtomicBool,
}

/// What one member saw.
struct MemberReport {
    seqs: Seqs,
    /// Delivery latency of the measured publishes, in µs.
    latency: Histogram<u64>,
    /// Deliveries of measured publishes.
    deliveries: u64,
    /// Room messages whose body this tool did not write.
    foreign: u64,
    /// `error` frames, and frames that were not JSON of a known shape.
    error_frames: u64,
    last_error_frame: Option<String>,
    /// Why the connection ended before the run did.
    closed: Option<String>,
}

type Ws = WebSocket<TcpStream>;

fn closed_by(f: Option<CloseFrame>) -> String {
    match f {
        Some(f) => format!("closed by the gateway: {} {}", u16::from(f.code), f.reason),
        None => "closed by the gateway without a code".into(),
    }
}

/// The next text frame, skipping pings and pongs.
fn next_text(ws: &mut Ws) -> Result<String> {
    loop {
        match ws.read()? {
            Message::Text(t) => return Ok(t.as_str().to_string()),
            Message::Close(f) => bail!("{}", closed_by(f)),
            _ => continue,
        }
    }
}

/// Connects one anonymous member, reads its welcome and joins `room`;
/// the socket and the room's seq at join.
fn join_member(target: &Target, room_json: &str) -> Result<(Ws, u64)> {
    let url = &target.ws_url;
    let stream = TcpStream::connect_timeout(&target.ws_addr, CONNECT_TIMEOUT)
        .map_err(|e| anyhow!("connect {url}: {e} (is the gateway running? pass --ws)"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(SETUP_TIMEOUT))?;
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("corecast.v1"),
    );
    let (mut ws, resp) = tungstenite::client(req, stream).map_err(|e| {
        anyhow!(
            "WebSocket handshake with {url}: {e} (does the gateway run with --allow-anonymous?)"
        )
    })?;
    if resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.as_bytes())
        != Some(b"corecast.v1")
    {
        bail!("{url} did not accept the corecast.v1 subprotocol (is it a corecast gateway's /ws?)");
    }
    let welcome = next_text(&mut ws).with_context(|| {
        format!("{url}: no welcome (does the gateway run with --allow-anonymous?)")
    })?;
    let frame: Frame =
        serde_json::from_str(&welcome).with_context(|| format!("{url}: welcome {welcome}"))?;
    if frame.kind != "welcome" {
        bail!("{url}: expected a welcome, got {welcome}");
    }
    ws.send(Message::text(format!(
        r#"{{"type":"join","room":{room_json}}}"#
    )))?;
    loop {
        let text = next_text(&mut ws).with_context(|| format!("{url}: no answer to join"))?;
        let frame: Frame =
            serde_json::from_str(&text).with_context(|| format!("{url}: frame {text}"))?;
        match frame.kind.as_ref() {
            "joined" => {
                if frame.epoch.as_deref() == Some("") {
                    bail!("joined {room_json} without an epoch (the gateway's storage queue is full): its seq says nothing");
                }
                let seq = frame
                    .seq
                    .ok_or_else(|| anyhow!("{url}: joined without a seq: {text}"))?;
                return Ok((ws, seq));
            }
            "error" => bail!(
                "join {room_json}: {}: {}",
                frame.code.unwrap_or_default(),
                frame.message.unwrap_or_default()
            ),
            _ => continue,
        }
    }
}

impl MemberReport {
    fn new(base: u64) -> MemberReport {
        MemberReport {
            seqs: Seqs::new(base),
            latency: histogram(),
            deliveries: 0,
            foreign: 0,
            error_frames: 0,
            last_error_frame: None,
            closed: None,
        }
    }

    fn odd_frame(&mut self, text: &str) {
        self.error_frames += 1;
        self.last_error_frame = Some(text.to_string());
    }

    /// Notes one text frame, read at `now_ns`.
    fn on_text(&mut self, text: &str, now_ns: u64, room: &str, period: Option<&Period>) {
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            return self.odd_frame(text);
        };
        match frame.kind.as_ref() {
            "msg" if frame.room.as_deref() == Some(room) => {}
            "error" => return self.odd_frame(text),
            _ => return,
        }
        let Some(seq) = frame.seq else {
            return self.odd_frame(text);
        };
        self.seqs.note(seq);
        match frame
            .body
            .and_then(|b| serde_json::from_str::<Stamp>(b.get()).ok())
        {
            Some(stamp) => {
                if period.is_some_and(|p| p.contains(stamp.t)) {
                    self.deliveries += 1;
                    record_ns(&mut self.latency, now_ns.saturating_sub(stamp.t));
                }
            }
            None => self.foreign += 1,
        }
    }
}

/// A member as its reader thread holds it.
struct Member {
    ws: Ws,
    rep: MemberReport,
    progress: Arc<Progress>,
}

impl Member {
    fn end(&mut self, why: String) {
        self.rep.closed = Some(why);
        self.progress.ended.store(true, Ordering::Release);
    }

    /// Reads every frame the socket holds, until it would block.
    fn drain(&mut self, room: &str, period: Option<&Period>) {
        loop {
            let text = match self.ws.read() {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(f)) => return self.end(closed_by(f)),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return self.end(format!("connection ended: {e}")),
            };
            self.rep.on_text(text.as_str(), now_ns(), room, period);
        }
        self.progress
            .last_seq
            .store(self.rep.seqs.last, Ordering::Release);
    }
}

/// A reader thread: its members' non-blocking sockets in one epoll set,
/// each readable one drained until it would block, until `stop`. A few of
/// these instead of a thread per member keep the tool's context switches
/// (and so its share of the measured latency) low.
fn read_members(
    mut members: Vec<Member>,
    room: &str,
    period: &OnceLock<Period>,
    stop: &AtomicBool,
) -> Vec<MemberReport> {
    let registered = epoll::create(epoll::CreateFlags::CLOEXEC).and_then(|ep| {
        for (i, m) in members.iter().enumerate() {
            let data = epoll::EventData::new_u64(i as u64);
            epoll::add(&ep, m.ws.get_ref(), data, epoll::EventFlags::IN)?;
        }
        Ok(ep)
    });
    let ep = match registered {
        Ok(ep) => ep,
        Err(e) => {
            for m in &mut members {
                m.end(format!("epoll: {e}"));
            }
            return members.into_iter().map(|m| m.rep).collect();
        }
    };
    let poll = Timespec {
        tv_sec: 0,
        tv_nsec: MEMBER_POLL.as_nanos() as _,
    };
    let mut events = Vec::with_capacity(members.len());
    while !stop.load(Ordering::Acquire) {
        events.clear();
        match epoll::wait(&ep, spare_capacity(&mut events), Some(&poll)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                for m in members.iter_mut().filter(|m| m.rep.closed.is_none()) {
                    m.end(format!("epoll_wait: {e}"));
                }
                break;
            }
        }
        for event in &events {
            let m = &mut members[event.data.u64() as usize];
            if m.rep.closed.is_none() {
                m.drain(room, period.get());
                if m.rep.closed.is_some() {
                    let _ = epoll::delete(&ep, m.ws.get_ref());
                }
            }
        }
    }
    for m in members.iter_mut().filter(|m| m.rep.closed.is_none()) {
        let _ = m.ws.close(None);
        let _ = m.ws.flush();
    }
    members.into_iter().map(|m| m.rep).collect()
}

/// Latency percentiles, in µs (never a mean alone).
#[derive(Debug, Clone, Copy)]
struct Percentiles {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles {
                p50: 0,
                p99: 0,
                p999: 0,
                max: 0,
            };
        }
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    fn json(&self) -> Value {
        json!({"p50": self.p50, "p99": self.p99, "p999": self.p999, "max": self.max})
    }

    fn human(&self) -> String {
        format!(
            "p50 {} us, p99 {} us, p99.9 {} us, max {} us",
            self.p50, self.p99, self.p999, self.max
        )
    }
}

/// Everything a run reports.
struct Report {
    publishes: u64,
    api: Percentiles,
    delivery: Percentiles,
    deliveries: u64,
    acked: u64,
    errors: BTreeMap<String, u64>,
    io_errors: u64,
    last_io_error: Option<String>,
    unanswered: u64,
    duplicate_acks: u64,
    unstored: u64,
    /// Acked seqs some member never got, and the deliveries missing.
    lost: u64,
    missed_deliveries: u64,
    gaps: u64,
    duplicates: u64,
    reorders: u64,
    /// Seqs acked for more than one publish.
    seq_conflicts: u64,
    foreign: u64,
    error_frames: u64,
    last_error_frame: Option<String>,
    closed: BTreeMap<String, u64>,
    /// From the last answer until every member held every acked seq.
    drain_ms: u64,
    drained: bool,
    fatal: Vec<String>,
}

impl Report {
    fn clean(&self) -> bool {
        self.acked > 0
            && self.lost == 0
            && self.gaps == 0
            && self.duplicates == 0
            && self.reorders == 0
            && self.seq_conflicts == 0
            && self.closed.is_empty()
            && self.fatal.is_empty()
    }

    fn json(&self, cfg: &Config) -> Value {
        let secs = cfg.duration_s as f64;
        json!({
            "bench": "api-publish",
            "members": cfg.members,
            "room": cfg.room,
            "connections": cfg.connections,
            "window": cfg.window,
            "duration_s": cfg.duration_s,
            "warmup_s": cfg.warmup_s,
            "publishes": self.publishes,
            "publishes_per_s": (self.publishes as f64 / secs).round(),
            "api_latency_us": self.api.json(),
            "delivery_latency_us": self.delivery.json(),
            "deliveries": self.deliveries,
            "deliveries_per_s": (self.deliveries as f64 / secs).round(),
            "acked": self.acked,
            "errors": self.errors,
            "io_errors": self.io_errors,
            "last_io_error": self.last_io_error,
            "unanswered": self.unanswered,
            "duplicate_acks": self.duplicate_acks,
            "unstored": self.unstored,
            "lost": self.lost,
            "missed_deliveries": self.missed_deliveries,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "reorders": self.reorders,
            "seq_conflicts": self.seq_conflicts,
            "foreign": self.foreign,
            "error_frames": self.error_frames,
            "last_error_frame": self.last_error_frame,
            "members_closed": self.closed,
            "drain_ms": self.drain_ms,
            "drained": self.drained,
            "fatal": self.fatal,
            "clean": self.clean(),
        })
    }

    fn human(&self, cfg: &Config) -> String {
        let secs = cfg.duration_s as f64;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "api-publish: {} members in {:?}, {} connections x window {}, {} s warm-up + {} s measured",
            cfg.members, cfg.room, cfg.connections, cfg.window, cfg.warmup_s, cfg.duration_s
        );
        let _ = writeln!(
            s,
            "publishes   {:.0}/s ({} answered 200 in the measured period, {} in all)",
            self.publishes as f64 / secs,
            self.publishes,
            self.acked
        );
        let _ = writeln!(s, "api         {}", self.api.human());
        let _ = writeln!(s, "delivery    {}", self.delivery.human());
        let _ = writeln!(
            s,
            "deliveries  {:.0}/s ({}); all delivered {} ms after the last answer{}",
            self.deliveries as f64 / secs,
            self.deliveries,
            self.drain_ms,
            if self.drained { "" } else { " (gave up)" }
        );
        let mut errors: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        if self.io_errors > 0 {
            errors.push(format!(
                "broken connections: {} ({} requests unanswered; last: {})",
                self.io_errors,
                self.unanswered,
                self.last_io_error.as_deref().unwrap_or("")
            ));
        }
        if self.duplicate_acks > 0 {
            errors.push(format!("answered duplicate: {}", self.duplicate_acks));
        }
        if self.unstored > 0 {
            errors.push(format!("answered stored:false: {}", self.unstored));
        }
        if self.error_frames > 0 {
            errors.push(format!(
                "error frames to members: {} (last: {})",
                self.error_frames,
                self.last_error_frame.as_deref().unwrap_or("")
            ));
        }
        if self.foreign > 0 {
            errors.push(format!("messages not from this run: {}", self.foreign));
        }
        for (why, n) in &self.closed {
            errors.push(format!("members ended early: {n} ({why})"));
        }
        errors.extend(self.fatal.iter().cloned());
        let _ = writeln!(
            s,
            "errors      {}",
            if errors.is_empty() {
                "none".to_string()
            } else {
                errors.join("; ")
            }
        );
        let _ = write!(
            s,
            "check       LOST {} ({} deliveries missing), gaps {}, duplicates {}, reorders {}, seq conflicts {}: {}",
            self.lost,
            self.missed_deliveries,
            self.gaps,
            self.duplicates,
            self.reorders,
            self.seq_conflicts,
            if self.clean() { "ok" } else { "FAILED" }
        );
        s
    }
}

/// The members, joined and reading.
struct Members {
    threads: Vec<JoinHandle<Vec<MemberReport>>>,
    progress: Vec<Arc<Progress>>,
}

impl Members {
    /// Stops every reader and collects the members' reports.
    fn stop(self, stop: &AtomicBool) -> Result<Vec<MemberReport>> {
        stop.store(true, Ordering::Release);
        let mut reports = Vec::new();
        for t in self.threads {
            reports.extend(t.join().map_err(|_| anyhow!("a reader thread panicked"))?);
        }
        Ok(reports)
    }
}

/// Joins every member, then hands them to `--reader-threads` readers
/// round-robin.
fn join_members(
    cfg: &Config,
    target: &Target,
    room_json: &str,
    period: &Arc<OnceLock<Period>>,
    stop: &Arc<AtomicBool>,
) -> Result<Members> {
    let readers = cfg.reader_threads.min(cfg.members) as usize;
    let mut groups: Vec<Vec<Member>> = (0..readers).map(|_| Vec::new()).collect();
    let mut progress = Vec::new();
    for i in 0..cfg.members as usize {
        let (ws, base) = join_member(target, room_json)
            .with_context(|| format!("member {} of {}", i + 1, cfg.members))?;
        ws.get_ref()
            .set_nonblocking(true)
            .context("make a member's socket non-blocking")?;
        let p = Arc::new(Progress::default());
        p.last_seq.store(base, Ordering::Release);
        progress.push(p.clone());
        groups[i % readers].push(Member {
            ws,
            rep: MemberReport::new(base),
            progress: p,
        });
    }
    let mut members = Members {
        threads: Vec::new(),
        progress,
    };
    for (i, group) in groups.into_iter().enumerate() {
        let (room, period, halt) = (cfg.room.clone(), period.clone(), stop.clone());
        let spawned = thread::Builder::new()
            .name(format!("reader-{i}"))
            .spawn(move || read_members(group, &room, &period, &halt));
        match spawned {
            Ok(t) => members.threads.push(t),
            Err(e) => {
                let _ = members.stop(stop);
                bail!("start reader thread {i}: {e}");
            }
        }
    }
    Ok(members)
}

fn run(cfg: &Config) -> Result<Report> {
    if cfg.key.is_empty() || !cfg.key.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("--key: the API key must be printable ASCII without spaces");
    }
    let target = Target::resolve(cfg)?;
    let key: Arc<str> = cfg.key.as_str().into();
    check_api(&target, &key)?;
    let room_json = serde_json::to_string(&cfg.room)?;
    let stop = Arc::new(AtomicBool::new(false));
    let period = Arc::new(OnceLock::new());
    let members = join_members(cfg, &target, &room_json, &period, &stop)?;

    let from_ns = now_ns() + cfg.warmup_s * 1_000_000_000;
    let p = Period {
        from_ns,
        until_ns: from_ns + cfg.duration_s * 1_000_000_000,
    };
    let _ = period.set(p);
    let host: Arc<str> = target.api_host.as_str().into();
    let mut publishers = Vec::new();
    for k in 0..cfg.connections {
        let (room_json, t) = (
            room_json.clone(),
            (target.api_addr, host.clone(), key.clone()),
        );
        let window = cfg.window as usize;
        let spawned = thread::Builder::new()
            .name(format!("publisher-{k}"))
            .spawn(move || publish(k, window, &room_json, t, p));
        match spawned {
            Ok(t) => publishers.push(t),
            Err(e) => {
                stop.store(true, Ordering::Release);
                bail!("start publisher thread {k}: {e}");
            }
        }
    }
    let mut pubs = Vec::new();
    for t in publishers {
        match t.join() {
            Ok(r) => pubs.push(r),
            Err(_) => {
                let _ = members.stop(&stop);
                bail!("a publisher thread panicked");
            }
        }
    }

    let mut acked: Vec<u64> = pubs.iter().flat_map(|p| p.acked.iter().copied()).collect();
    acked.sort_unstable();
    let all_acks = acked.len() as u64;
    acked.dedup();
    let max_acked = acked.last().copied().unwrap_or(0);
    let drain_from = Instant::now();
    let deadline = drain_from + Duration::from_millis(cfg.drain_timeout_ms);
    let drained = loop {
        let done = members.progress.iter().all(|p| {
            p.ended.load(Ordering::Acquire) || p.last_seq.load(Ordering::Acquire) >= max_acked
        });
        if done || Instant::now() >= deadline {
            break done;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let drain_ms = drain_from.elapsed().as_millis() as u64;
    let reports = members.stop(&stop)?;

    let mut api = histogram();
    let mut delivery = histogram();
    let mut rep = Report {
        publishes: 0,
        api: Percentiles::of(&api),
        delivery: Percentiles::of(&delivery),
        deliveries: 0,
        acked: all_acks,
        errors: BTreeMap::new(),
        io_errors: 0,
        last_io_error: None,
        unanswered: 0,
        duplicate_acks: 0,
        unstored: 0,
        lost: 0,
        missed_deliveries: 0,
        gaps: 0,
        duplicates: 0,
        reorders: 0,
        seq_conflicts: all_acks - acked.len() as u64,
        foreign: 0,
        error_frames: 0,
        last_error_frame: None,
        closed: BTreeMap::new(),
        drain_ms,
        drained,
        fatal: Vec::new(),
    };
    for p in &pubs {
        api.add(&p.latency)
            .map_err(|e| anyhow!("merge histograms: {e:?}"))?;
        rep.publishes += p.measured_ok;
        for (k, v) in &p.errors {
            *rep.errors.entry(k.clone()).or_default() += v;
        }
        rep.io_errors += p.io_errors;
        if p.last_io_error.is_some() {
            rep.last_io_error.clone_from(&p.last_io_error);
        }
        rep.unanswered += p.unanswered;
        rep.duplicate_acks += p.duplicate_acks;
        rep.unstored += p.unstored;
        rep.fatal.extend(p.fatal.iter().cloned());
    }
    for m in &reports {
        delivery
            .add(&m.latency)
            .map_err(|e| anyhow!("merge histograms: {e:?}"))?;
        rep.deliveries += m.deliveries;
        rep.gaps += m.seqs.gaps;
        rep.duplicates += m.seqs.duplicates;
        rep.reorders += m.seqs.reorders;
        rep.foreign += m.foreign;
        rep.error_frames += m.error_frames;
        if m.last_error_frame.is_some() {
            rep.last_error_frame.clone_from(&m.last_error_frame);
        }
        if let Some(why) = &m.closed {
            *rep.closed.entry(why.clone()).or_default() += 1;
        }
    }
    for &seq in &acked {
        let missing = reports.iter().filter(|m| !m.seqs.has(seq)).count() as u64;
        if missing > 0 {
            rep.lost += 1;
            rep.missed_deliveries += missing;
        }
    }
    rep.api = Percentiles::of(&api);
    rep.delivery = Percentiles::of(&delivery);
    Ok(rep)
}

fn main() -> ExitCode {
    EPOCH.get_or_init(Instant::now);
    let cfg = Config::parse();
    match run(&cfg) {
        Ok(rep) => {
            if cfg.json {
                println!("{}", rep.json(&cfg));
            } else {
                println!("{}", rep.human(&cfg));
            }
            if rep.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("api-publish: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_whole_and_in_order() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 8\r\n\r\n{\"seq\":1";
        let close =
            b"HTTP/1.1 401 Unauthorized\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}";
        // name, bytes in, (status, body, close) of a whole answer
        type Case<'a> = (&'a str, &'a [u8], Option<(u16, &'a [u8], bool)>);
        let cases: &[Case] = &[
            ("empty", b"", None),
            ("partial head", b"HTTP/1.1 200 OK\r\ncontent-len", None),
            ("partial body", &ok[..ok.len() - 1], None),
            ("whole", ok, Some((200, b"{\"seq\":1", false))),
            ("close", close, Some((401, b"{}", true))),
        ];
        for (name, bytes, want) in cases {
            let got = parse_answer(bytes).unwrap().map(|(a, used)| {
                assert_eq!(used, bytes.len(), "{name}");
                (a.status, a.body, a.close)
            });
            let want = want.map(|(s, b, c)| (s, b.to_vec(), c));
            assert_eq!(got, want, "{name}");
        }
        let mut two = ok.to_vec();
        two.extend_from_slice(close);
        let (first, used) = parse_answer(&two).unwrap().unwrap();
        assert_eq!((first.status, used), (200, ok.len()));
        assert_eq!(parse_answer(&two[used..]).unwrap().unwrap().0.status, 401);
    }

    #[test]
    fn answers_without_a_length_are_refused() {
        for (name, bytes) in [
            (
                "chunked",
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            ),
            (
                "bad length",
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            ),
            ("not http", b"SSH-2.0-OpenSSH\r\n\r\n"),
        ] {
            assert!(parse_answer(bytes).is_err(), "{name}");
        }
    }

    #[test]
    fn seqs_count_gaps_duplicates_and_reorders() {
        // name, join seq, seqs in, (gaps, duplicates, reorders), held
        type Case<'a> = (&'a str, u64, &'a [u64], (u64, u64, u64), &'a [u64]);
        let cases: &[Case] = &[
            ("in order", 5, &[6, 7, 8], (0, 0, 0), &[6, 7, 8]),
            ("gap", 0, &[1, 4], (2, 0, 0), &[1, 4]),
            ("duplicate", 0, &[1, 2, 2], (0, 1, 0), &[1, 2]),
            ("late", 0, &[1, 3, 2], (1, 0, 1), &[1, 2, 3]),
            ("before join", 10, &[10, 11], (0, 0, 1), &[11]),
            ("far apart", 0, &[1, 200], (198, 0, 0), &[1, 200]),
        ];
        for (name, base, seqs, want, held) in cases {
            let mut s = Seqs::new(*base);
            for &q in *seqs {
                s.note(q);
            }
            assert_eq!((s.gaps, s.duplicates, s.reorders), *want, "{name}");
            for q in base.saturating_sub(1)..=base + 201 {
                assert_eq!(s.has(q), held.contains(&q), "{name}: seq {q}");
            }
        }
    }
}
