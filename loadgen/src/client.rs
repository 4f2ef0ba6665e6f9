//! One client WebSocket connection: a paced, bound, non-blocking connect,
//! the RFC 6455 §4 opening handshake, and frame I/O over the sans-IO
//! `corecast_ws::Session` (role `Client`), which owns the protocol's rules:
//! reassembly, the pong and close replies, the closing handshake.
//!
//! # Invariants
//! - Owned by one task on one executor; `!Send` (its socket sits in the
//!   executor's epoll set, see `reactor`). The socket is non-blocking and
//!   read and written only through its `readiness::Io`, which keeps the
//!   flags that say when to wait for the next edge.
//! - All I/O progress lives in the struct (`tx_pos`, `RecvBuf`), never in a
//!   future, so any read or write future may be dropped (raced against a
//!   timer or a stop signal) without losing or tearing a frame.
//! - Both buffers are bounded: the receive buffer by the session's frame
//!   limit, the send buffer by the caller (it queues at most its in-flight
//!   limit of messages) plus at most `MAX_UNFLUSHED_PONGS` pongs and one
//!   close.
//! - Every frame this end sends is masked with a fresh key (RFC 6455 §5.3).

use std::{
    fmt,
    future::poll_fn,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use base64::Engine as _;
use corecast_ws::{
    self as ws, close::code, Event, Limits, ProtocolError, Role, Session, State, MAX_HEADER_LEN,
};
use futures_lite::future::or;
use glommio::timer::Timer;
use rustix::io::Errno;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{config::Target, reactor::Registration, sys};

/// Largest upgrade response accepted; real ones are a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 16 << 10;

/// How long to wait for the server's end of TCP after both close frames.
/// The server should close first (RFC 6455 §7.1.1) so TIME_WAIT lands there,
/// but a server that does not is not an error.
const EOF_AFTER_CLOSE: Duration = Duration::from_millis(500);

/// Pongs queued but not yet written, past which further pings go unanswered
/// until the socket drains (RFC 6455 §5.5.3 lets an endpoint skip pongs for
/// earlier pings). Bounds the send buffer against a server that pings but
/// does not read.
const MAX_UNFLUSHED_PONGS: u8 = 16;

/// `Conn::handed_out` after a protocol error: the input is unusable.
const DISCARD_ALL: usize = usize::MAX;

/// xorshift64*: cheap, non-cryptographic randomness for masks and keys.
/// Masks only need to be unpredictable to intermediaries, not to attackers.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// Seeds from the clock and a per-connection salt.
    pub fn seeded(salt: u64) -> XorShift {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // splitmix64 of the mix, so neighbouring salts diverge at once.
        let mut z = nanos ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        ((self.next_u64() >> 32) as u32).to_ne_bytes()
    }
}

/// Receive buffer: unconsumed bytes live in `buf[start..end]`, always
/// starting at a frame boundary, as the decoder's contract requires.
#[derive(Debug)]
pub struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Growth limit: the decoder's frame limit plus a header.
    max: usize,
}

impl RecvBuf {
    pub fn new(initial: usize, max: usize) -> RecvBuf {
        RecvBuf {
            buf: vec![0; initial.min(max)],
            start: 0,
            end: 0,
            max,
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Free space after the data, making room first: moves the data to the
    /// front when the tail is full or the frame in progress (`need` bytes in
    /// all) would not fit behind it, and grows the buffer when the data alone
    /// fills it or `need` is larger. Empty only at the growth limit.
    pub fn spare(&mut self, need: Option<usize>) -> &mut [u8] {
        let need = need.unwrap_or(0);
        let tail_full = self.end == self.buf.len() || self.start + need > self.buf.len();
        if self.start > 0 && tail_full {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() || need > self.buf.len() {
            let grown = (self.buf.len() * 2).max(need).min(self.max);
            if grown > self.buf.len() {
                self.buf.resize(grown, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    pub fn filled(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.end += n;
    }
}

/// Why a connection could not be opened. Display reads as advice.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot create a socket: {}", io_hint(.0))]
    Socket(io::Error),
    #[error("cannot bind source address {local}: {}", bind_hint(.err))]
    Bind { local: IpAddr, err: io::Error },
    #[error("cannot connect to {addr}{}: {}", from(.local), io_hint(.err))]
    Connect {
        addr: SocketAddr,
        local: Option<IpAddr>,
        err: io::Error,
    },
    #[error(
        "cannot connect to {addr}: no answer within {ms} ms (is the server overloaded or its \
         accept backlog full? lower --connect-rate or raise --connect-timeout-ms)"
    )]
    Timeout { addr: SocketAddr, ms: u128 },
    #[error("upgrade refused by {url}: {reason}")]
    Handshake { url: String, reason: String },
}

fn from(local: &Option<IpAddr>) -> String {
    local.map_or(String::new(), |s| format!(" from {s}"))
}

fn bind_hint(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => {
            "not an address of this machine (all of 127.0.0.0/8 is; fix --sources)".into()
        }
        _ => io_hint(err),
    }
}

/// An I/O error in words a person running a load test can act on.
fn io_hint(err: &io::Error) -> String {
    let hint = match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused (is the gateway running? pass --url)",
        Some(libc::EADDRNOTAVAIL) => {
            "no free local port (spread connections over more --sources, e.g. 127.0.0.2,127.0.0.3)"
        }
        Some(libc::EMFILE) | Some(libc::ENFILE) => {
            "too many open files (lower --connections, or raise ulimit -n)"
        }
        Some(libc::ECONNRESET) => {
            "connection reset by the server (accept backlog full? lower --connect-rate)"
        }
        Some(libc::ETIMEDOUT) => "timed out",
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "no route to the host",
        _ => return err.to_string(),
    };
    hint.to_string()
}

/// Why a connection ended before this end closed it. Small and `Copy`:
/// it is produced on the hot path and only counted there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnFailure {
    /// The server broke a framing rule; this end sent a close with the code
    /// the RFC prescribes.
    Protocol(ProtocolError),
    /// The server sent a close frame (with this code, if any).
    ServerClosed(Option<u16>),
    /// The server closed TCP without a close frame.
    Eof,
    /// The socket failed (reset, broken pipe, ...).
    Io(io::ErrorKind),
}

impl fmt::Display for ConnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnFailure::Protocol(e) => write!(f, "protocol error from the server: {e}"),
            ConnFailure::ServerClosed(Some(c)) => write!(f, "the server closed with code {c}"),
            ConnFailure::ServerClosed(None) => write!(f, "the server closed (no code)"),
            ConnFailure::Eof => write!(f, "the server dropped the TCP connection"),
            ConnFailure::Io(k) => write!(f, "socket error: {k}"),
        }
    }
}

/// How a closing handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseOutcome {
    /// Both close frames crossed.
    Clean,
    /// No close frame came back before the deadline.
    NoReply,
    /// The connection failed first (reset, EOF, protocol error).
    Failed,
}

/// Per-connection buffer settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    /// Largest frame or message accepted from the server.
    pub max_frame_bytes: usize,
    /// Receive buffer to start with; it grows up to a frame when needed.
    pub initial_rx_bytes: usize,
    /// Subprotocol to offer (`Sec-WebSocket-Protocol`); the server must then
    /// select it. `None`: offer none, and refuse a server that selects one.
    pub protocol: Option<&'static str>,
}

/// An open client WebSocket connection.
pub struct Conn {
    /// Declared first so that it leaves the epoll set before `socket` closes.
    reg: Registration,
    socket: OwnedFd,
    session: Session,
    rx: RecvBuf,
    /// Bytes of `rx` the event last handed out came from; dropped before
    /// the buffer is touched again.
    handed_out: usize,
    /// Bytes to send; `tx[..tx_pos]` already went out.
    tx: Vec<u8>,
    tx_pos: usize,
    rng: XorShift,
    /// A `wss://` connection's TLS: frames go through it.
    tls: Option<Box<crate::tls::Stream>>,
}

impl Conn {
    /// Opens a TCP connection from `source` (port chosen by the kernel) and
    /// upgrades it. Returns the connection and how long that took.
    pub async fn connect(
        target: &Target,
        source: Option<IpAddr>,
        salt: u64,
        timeout: Duration,
        opts: ConnOptions,
    ) -> Result<(Conn, Duration), ConnectError> {
        let started = Instant::now();
        let attempt = async { Some(Self::open(target, source, salt, opts).await) };
        let timer = async {
            Timer::new(timeout).await;
            None
        };
        match or(attempt, timer).await {
            Some(r) => r.map(|c| (c, started.elapsed())),
            None => Err(ConnectError::Timeout {
                addr: target.addr,
                ms: timeout.as_millis(),
            }),
        }
    }

    async fn open(
        target: &Target,
        source: Option<IpAddr>,
        salt: u64,
        opts: ConnOptions,
    ) -> Result<Conn, ConnectError> {
        let addr = target.addr;
        let connect_err = |err| ConnectError::Connect {
            addr,
            local: source,
            err,
        };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(ConnectError::Socket)?;
        socket.set_nonblocking(true).map_err(ConnectError::Socket)?;
        socket.set_nodelay(true).map_err(ConnectError::Socket)?;
        if let Some(src) = source {
            // Best effort: without it binds still work, with fewer ports.
            let _ = sys::set_bind_address_no_port(&socket);
            socket
                .bind(&SockAddr::from(SocketAddr::new(src, 0)))
                .map_err(|err| ConnectError::Bind { local: src, err })?;
        }
        match socket.connect(&SockAddr::from(addr)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(connect_err(e)),
        }
        let max_frame = opts.max_frame_bytes;
        let socket = OwnedFd::from(socket);
        let reg = Registration::new(socket.as_fd()).map_err(ConnectError::Socket)?;
        let mut conn = Conn {
            reg,
            socket,
            session: Session::new(
                Role::Client,
                Limits {
                    max_frame_bytes: max_frame as u64,
                    max_message_bytes: max_frame as u64,
                },
            )
            .with_pong_limit(MAX_UNFLUSHED_PONGS),
            rx: RecvBuf::new(opts.initial_rx_bytes, max_frame + MAX_HEADER_LEN),
            handed_out: 0,
            tx: Vec::with_capacity(256),
            tx_pos: 0,
            rng: XorShift::seeded(salt),
            tls: match &target.tls {
                Some(t) => Some(Box::new(
                    crate::tls::Stream::new(t).map_err(ConnectError::Socket)?,
                )),
                None => None,
            },
        };
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&conn.rng.next_u64().to_ne_bytes());
        key[8..].copy_from_slice(&conn.rng.next_u64().to_ne_bytes());
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        {
            use std::io::Write as _;
            let _ = write!(
                conn.tx,
                "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
                 User-Agent: corecast-loadgen/{}\r\n",
                target.path,
                target.host,
                env!("CARGO_PKG_VERSION"),
            );
            if let Some(p) = opts.protocol {
                let _ = write!(conn.tx, "Sec-WebSocket-Protocol: {p}\r\n");
            }
            conn.tx.extend_from_slice(b"\r\n");
        }
        // A non-blocking send waits for writability, which is the connect
        // completing; a refused connect surfaces here.
        conn.flush().await.map_err(connect_err)?;
        let expected = ws::handshake::accept_key(key.as_bytes());
        let handshake_err = |reason: String| ConnectError::Handshake {
            url: target.url.clone(),
            reason,
        };
        loop {
            match conn.fill().await {
                Ok(0) => {
                    return Err(handshake_err(
                        "the server closed the connection instead of answering the upgrade \
                         (is this a WebSocket endpoint?)"
                            .into(),
                    ))
                }
                Ok(_) => {}
                Err(e) if conn.rx.is_empty() => return Err(connect_err(e)),
                Err(e) => return Err(handshake_err(format!("reading the response: {e}"))),
            }
            // The query may carry a token: errors name the path only.
            let path = target.path.split('?').next().unwrap_or("/");
            match parse_response(conn.rx.data(), &expected, path, opts.protocol) {
                Ok(Some(len)) => {
                    conn.rx.consume(len);
                    return Ok(conn);
                }
                Ok(None) if conn.rx.len() > MAX_RESPONSE_BYTES => {
                    return Err(handshake_err(format!(
                        "response headers over {MAX_RESPONSE_BYTES} bytes"
                    )))
                }
                Ok(None) => {}
                Err(reason) => return Err(handshake_err(reason)),
            }
        }
    }

    pub fn mask(&mut self) -> [u8; 4] {
        self.rng.mask()
    }

    /// The send buffer, to append frames to; [`Conn::poll_flush`] sends them.
    pub fn tx_mut(&mut self) -> &mut Vec<u8> {
        &mut self.tx
    }

    pub fn has_pending_tx(&self) -> bool {
        self.tx_pos < self.tx.len() || self.tls.as_ref().is_some_and(|t| t.pending())
    }

    /// Writes queued bytes until done or the socket is full.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(tls) = self.tls.as_mut() {
            // rustls takes all the plaintext at once; what waits is its
            // ciphertext.
            let plain = &self.tx[self.tx_pos..];
            self.tx_pos = self.tx.len();
            match tls.write(self.reg.io(), self.socket.as_fd(), plain) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reg.wait(cx);
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        while self.tx_pos < self.tx.len() {
            match self
                .reg
                .io()
                .send(self.socket.as_fd(), &self.tx[self.tx_pos..])
            {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.tx_pos += n,
                Err(Errno::AGAIN) => {
                    self.reg.wait(cx);
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
        self.tx.clear();
        self.tx_pos = 0;
        self.session.flushed();
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into the receive buffer; `Ok(0)` is EOF.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.settle();
        let spare = self.rx.spare(self.session.frame_len_hint());
        if spare.is_empty() {
            // The decoder refuses frames over the limit the buffer grows to.
            return Poll::Ready(Err(io::Error::other("receive buffer full")));
        }
        let got = match self.tls.as_mut() {
            Some(tls) => match tls.read(self.reg.io(), self.socket.as_fd(), spare) {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Errno::AGAIN),
                Err(e) => return Poll::Ready(Err(e)),
            },
            None => self.reg.io().recv(self.socket.as_fd(), spare),
        };
        match got {
            Ok(n) => {
                self.rx.filled(n);
                Poll::Ready(Ok(n))
            }
            Err(Errno::AGAIN) => {
                self.reg.wait(cx);
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    pub async fn fill(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Drops the bytes of the event last handed out.
    fn settle(&mut self) {
        match std::mem::take(&mut self.handed_out) {
            DISCARD_ALL => self.rx.clear(),
            n => self.rx.consume(n),
        }
    }

    /// Decodes and handles the next complete frame in the receive buffer:
    /// the replies the protocol obliges (a pong, a close echo) are queued,
    /// and what the frame meant is returned, borrowing the connection until
    /// the next call. `Ok(None)`: more bytes are needed, or reading is over
    /// (the close handshake is complete, or failed). After an error the
    /// session's close frame is queued and nothing more is decoded.
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, ProtocolError> {
        self.settle();
        if self.session.is_done() {
            self.rx.clear();
            return Ok(None);
        }
        match self.session.read(self.rx.data_mut()) {
            Ok(None) => Ok(None),
            Err(failure) => {
                if let Some(reply) = failure.reply {
                    reply.encode(&mut self.tx, Some(self.rng.mask()));
                }
                self.handed_out = DISCARD_ALL;
                Err(failure.error)
            }
            Ok(Some(step)) => {
                if let Some(reply) = &step.reply {
                    reply.encode(&mut self.tx, Some(self.rng.mask()));
                }
                // Dropped at the next call (or read): the event borrows them.
                // A step without an event passed over fragments and leaves
                // an incomplete frame: the caller reads more.
                self.handed_out = step.consumed;
                Ok(step.event)
            }
        }
    }

    /// Queues a close frame unless one was sent already.
    pub fn queue_close(&mut self, close_code: u16, reason: &str) {
        if let Some(reply) = self.session.close(close_code, reason) {
            reply.encode(&mut self.tx, Some(self.rng.mask()));
        }
    }

    /// The closing handshake from this end: sends a close frame (unless one
    /// went out already), then reads, answering pings and ignoring data,
    /// until the server's close frame and its end of TCP, or `deadline`.
    pub async fn close(&mut self, reason: &str, deadline: Instant) -> CloseOutcome {
        self.queue_close(code::NORMAL, reason);
        let handshake = async { Some(self.finish_close().await) };
        let timer = async {
            Timer::new(deadline.saturating_duration_since(Instant::now())).await;
            None
        };
        let ended = or(handshake, timer).await;
        match ended {
            Some(outcome) => outcome,
            None if self.session.state() == State::Closed => CloseOutcome::Clean,
            None => CloseOutcome::NoReply,
        }
    }

    async fn finish_close(&mut self) -> CloseOutcome {
        let mut eof_by = None;
        loop {
            if self.flush().await.is_err() {
                return self.outcome_on_failure();
            }
            let closed = match self.session.state() {
                State::Failed => return CloseOutcome::Failed,
                State::Closed => true,
                State::Open | State::CloseSent => false,
            };
            if closed && eof_by.is_none() {
                eof_by = Some(Instant::now() + EOF_AFTER_CLOSE);
            }
            let read = async { Some(self.fill().await) };
            let wait = async {
                match eof_by {
                    Some(at) => Timer::new(at.saturating_duration_since(Instant::now())).await,
                    None => std::future::pending().await,
                };
                None
            };
            let got = or(read, wait).await;
            match got {
                None => return CloseOutcome::Clean,
                Some(Ok(0)) | Some(Err(_)) => return self.outcome_on_failure(),
                Some(Ok(_)) => {}
            }
            // Until the server's close: data is discarded, pings answered
            // while the session is open, the close ends the handshake.
            while let Ok(Some(_)) = self.next_event() {}
        }
    }

    fn outcome_on_failure(&self) -> CloseOutcome {
        if self.session.state() == State::Closed {
            CloseOutcome::Clean
        } else {
            CloseOutcome::Failed
        }
    }
}

/// Checks the server's answer to the upgrade (RFC 6455 §4.1, client side).
/// `Ok(Some(len))`: a valid 101 of `len` bytes; `Ok(None)`: incomplete;
/// `Err(reason)`: refused or not a WebSocket server. `path` names the
/// request in errors; `protocol` is the subprotocol offered, which the
/// server must select.
pub fn parse_response(
    buf: &[u8],
    expected_accept: &str,
    path: &str,
    protocol: Option<&str>,
) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(format!(
                "malformed HTTP response ({e}); is this a WebSocket server?"
            ))
        }
    };
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        let body = String::from_utf8_lossy(&buf[len..buf.len().min(len + 200)]);
        let body = body.trim();
        let hint = match status {
            404 => " (is the path right? the gateway serves /echo and, for chat, /ws)",
            _ => "",
        };
        return Err(format!(
            "the server answered {status} {} to GET {path}, not 101 Switching Protocols{hint}{}{}",
            resp.reason.unwrap_or(""),
            if body.is_empty() { "" } else { ": " },
            body
        ));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let has_token = |name: &str, token: &str| {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    };
    if !has_token("upgrade", "websocket") {
        return Err("101 without `Upgrade: websocket`".into());
    }
    if !has_token("connection", "upgrade") {
        return Err("101 without `Connection: Upgrade`".into());
    }
    match header("sec-websocket-accept") {
        Some(a) if a == expected_accept => {}
        Some(a) => {
            return Err(format!(
                "Sec-WebSocket-Accept is {a:?}, expected {expected_accept:?}"
            ))
        }
        None => return Err("101 without Sec-WebSocket-Accept".into()),
    }
    if header("sec-websocket-extensions").is_some() {
        return Err("the server negotiated an extension this client did not offer".into());
    }
    match (header("sec-websocket-protocol"), protocol) {
        (None, None) => {}
        (Some(got), Some(offered)) if got == offered => {}
        (Some(got), _) => {
            return Err(format!(
                "the server selected subprotocol {got:?}, which this client did not offer"
            ))
        }
        (None, Some(offered)) => {
            return Err(format!(
                "the server did not select the offered subprotocol {offered} \
                 (is this the chat endpoint, /ws?)"
            ))
        }
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn ok_response(extra: &str) -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\n{extra}\r\n"
        )
    }

    #[test]
    fn responses() {
        assert_eq!(ws::handshake::accept_key(KEY.as_bytes()), ACCEPT);
        type Expect = Result<bool, &'static str>;
        let cases: Vec<(&str, String, Expect)> = vec![
            ("valid", ok_response(""), Ok(true)),
            (
                "tokens in any case",
                ok_response("")
                    .replace("Upgrade: websocket", "upgrade: WebSocket")
                    .replace("Connection: Upgrade", "connection: keep-alive, upgrade"),
                Ok(true),
            ),
            ("partial", ok_response("")[..30].to_string(), Ok(false)),
            (
                "404 with body",
                "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno route\n".into(),
                Err("is the path right"),
            ),
            (
                "wrong accept",
                ok_response("").replace(ACCEPT, "AAAA"),
                Err("expected"),
            ),
            (
                "no upgrade",
                ok_response("").replace("Upgrade: websocket\r\n", ""),
                Err("Upgrade: websocket"),
            ),
            (
                "no connection",
                ok_response("").replace("Connection: Upgrade\r\n", ""),
                Err("Connection: Upgrade"),
            ),
            (
                "extension",
                ok_response("Sec-WebSocket-Extensions: permessage-deflate\r\n"),
                Err("extension"),
            ),
            (
                "not http",
                "SSH-2.0-OpenSSH\r\n\r\n".into(),
                Err("malformed"),
            ),
        ];
        for (name, resp, expected) in cases {
            let got = parse_response(resp.as_bytes(), ACCEPT, "/echo", None);
            match (got, expected) {
                (Ok(Some(len)), Ok(true)) => assert_eq!(len, resp.len(), "{name}"),
                (Ok(None), Ok(false)) => {}
                (Err(e), Err(want)) => assert!(e.contains(want), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn trailing_frame_bytes_are_left() {
        let mut resp = ok_response("").into_bytes();
        let len = resp.len();
        resp.extend_from_slice(&[0x82, 0x01, 0xaa]);
        assert_eq!(parse_response(&resp, ACCEPT, "/", None), Ok(Some(len)));
    }

    #[test]
    fn subprotocols() {
        let chosen = ok_response("Sec-WebSocket-Protocol: corecast.v1\r\n");
        let plain = ok_response("");
        let other = ok_response("Sec-WebSocket-Protocol: chat\r\n");
        type Case<'a> = (&'a str, &'a str, Option<&'a str>, Result<(), &'a str>);
        let cases: &[Case] = &[
            ("selected", &chosen, Some("corecast.v1"), Ok(())),
            ("none either way", &plain, None, Ok(())),
            (
                "not selected",
                &plain,
                Some("corecast.v1"),
                Err("did not select"),
            ),
            ("other", &other, Some("corecast.v1"), Err("did not offer")),
            ("unoffered", &chosen, None, Err("did not offer")),
        ];
        for (name, resp, offered, want) in cases {
            let got = parse_response(resp.as_bytes(), ACCEPT, "/ws", *offered);
            match (got, want) {
                (Ok(Some(_)), Ok(())) => {}
                (Err(e), Err(w)) => assert!(e.contains(w), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn recv_buf_compacts_and_grows() {
        let mut b = RecvBuf::new(8, 32);
        b.spare(None)[..8].copy_from_slice(b"abcdefgh");
        b.filled(8);
        b.consume(6);
        // Tail full: data moves to the front.
        assert_eq!(b.spare(None).len(), 6);
        assert_eq!(b.data(), b"gh");
        // A 20-byte frame in progress: the buffer grows to hold it.
        assert!(b.spare(Some(20)).len() >= 18);
        assert_eq!(b.data(), b"gh");
        // Never past the limit.
        let n = b.spare(Some(100)).len();
        assert_eq!(n + b.len(), 32);
        b.consume(2);
        assert!(b.is_empty());
    }

    #[test]
    fn masks_vary() {
        let mut r = XorShift::seeded(1);
        let a = r.mask();
        let b = r.mask();
        assert_ne!(a, b);
        assert_ne!(
            XorShift::seeded(1).next_u64(),
            XorShift::seeded(2).next_u64()
        );
    }
}
