//! One client connection: HTTP request, WebSocket upgrade, echo, close.
//!
//! The connection is a hand-written future driven by socket readiness, its
//! [`ConnShared`] flags and the shard's sweeper. Each poll flushes what is
//! queued (one `send` for everything produced since the last flush), then
//! reads and decodes what arrived.
//!
//! # Invariants
//! - Lives its whole life on the shard that accepted it; `!Send` (holds `Rc`).
//! - Never blocks: glommio's non-buffered stream tries a non-blocking
//!   `recv`/`send` and otherwise arms an io_uring readiness poll, which holds
//!   no buffer. So a read buffer is borrowed from the shard pool only for one
//!   non-blocking `recv`, and an idle connection holds no I/O buffer at all.
//! - Output is bounded: above `outbound_budget_bytes` queued the connection
//!   stops reading (back-pressure); staying there past the slow-consumer
//!   timeout closes it with 1008.
//! - The shard reaches a connection only through its `ConnShared`.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    io,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
    time::Instant,
};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use crate::{
    buf::{InBuf, READ_CHUNK},
    metrics::{self, Initiator, ShardMetrics},
    shard::Shard,
    ws::{
        self,
        close::{self, code},
        handshake::{self, Refusal},
        Decoder, OpCode, Role,
    },
};

/// Reads handled in one poll before yielding to the shard's other tasks.
const READS_PER_POLL: usize = 16;

/// What the shard's sweeper and drain logic share with a connection.
#[derive(Debug)]
pub struct ConnShared {
    waker: RefCell<Option<Waker>>,
    /// Earliest time the connection wants its timers looked at.
    pub deadline: Cell<Instant>,
    /// Set by the sweeper once `deadline` has passed.
    pub fired: Cell<bool>,
    /// The server is draining: close with 1001.
    pub shutdown: Cell<bool>,
}

impl ConnShared {
    pub fn new(deadline: Instant) -> ConnShared {
        ConnShared {
            waker: RefCell::new(None),
            deadline: Cell::new(deadline),
            fired: Cell::new(false),
            shutdown: Cell::new(false),
        }
    }

    pub fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    fn register(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the HTTP request (handshake timeout running).
    Request,
    /// WebSocket open.
    Open,
    /// We sent a close frame and wait for the client's (close timeout running).
    CloseSent,
    /// The connection failed (protocol error): our close frame is queued, the
    /// decoder is dead; after the flush we shut down our side and discard
    /// input until the client closes or the close timeout.
    Linger,
    /// Nothing more to read: close the socket once the output is flushed (an
    /// HTTP response, or our reply to the client's close frame).
    CloseAfterFlush,
}

/// The per-connection future.
pub struct Conn {
    shard: Rc<Shard>,
    shared: Rc<ConnShared>,
    key: usize,
    stream: TcpStream,
    phase: Phase,
    /// Unconsumed input; `None` whenever everything read was consumed.
    inbuf: Option<InBuf>,
    /// Queued output; capacity 0 (no allocation) whenever it is all sent.
    out: Vec<u8>,
    out_sent: usize,
    decoder: Decoder,
    /// Payload of the fragmented message being assembled (echo).
    fragments: Vec<u8>,
    is_websocket: bool,
    /// Shard clock at the last read from the client.
    last_rx: Instant,
    ping_sent: bool,
    over_budget_since: Option<Instant>,
    /// Deadline of the handshake, or of the close handshake.
    phase_deadline: Instant,
    write_shut: bool,
    shutdown_seen: bool,
}

/// Starts serving an accepted socket on the current shard.
pub fn spawn(shard: &Rc<Shard>, stream: TcpStream) {
    let now = shard.clock.get();
    let deadline = now + shard.limits.handshake_timeout;
    let shared = Rc::new(ConnShared::new(deadline));
    let key = shard.conns.borrow_mut().insert(shared.clone());
    let m = shard.metrics();
    m.connections_accepted.inc();
    m.connections_open.inc();
    let conn = Conn {
        shard: shard.clone(),
        shared,
        key,
        stream,
        phase: Phase::Request,
        inbuf: None,
        out: Vec::new(),
        out_sent: 0,
        decoder: Decoder::new(Role::Server, shard.limits.frame),
        fragments: Vec::new(),
        is_websocket: false,
        last_rx: now,
        ping_sent: false,
        over_budget_since: None,
        phase_deadline: deadline,
        write_shut: false,
        shutdown_seen: false,
    };
    glommio::spawn_local(conn).detach();
}

impl Future for Conn {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.shared.register(cx.waker());
        for _ in 0..READS_PER_POLL {
            if this.shared.fired.replace(false) {
                this.on_timer(Instant::now());
            }
            if this.shared.shutdown.get() && !this.shutdown_seen {
                this.shutdown_seen = true;
                this.on_shutdown();
            }
            match this.poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return this.lost(),
                Poll::Pending => {}
            }
            let flushed = this.queued() == 0;
            match this.phase {
                Phase::CloseAfterFlush if flushed => return Poll::Ready(()),
                Phase::Linger if flushed && !this.write_shut => {
                    // Our close frame is out: send FIN after it, then wait for
                    // the client's FIN, so unread input does not turn our
                    // close into a reset that could destroy the frame.
                    this.write_shut = true;
                    // glommio's close is shutdown(SHUT_WR), done synchronously.
                    let _ = Pin::new(&mut this.stream).poll_close(cx);
                }
                _ => {}
            }
            if !this.may_read() {
                return Poll::Pending;
            }
            match this.poll_read(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return this.on_eof(),
                Poll::Ready(Ok(_)) => this.on_input(),
                Poll::Ready(Err(_)) => return this.lost(),
            }
        }
        // Plenty of input: let the shard's other connections run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shard.conns.borrow_mut().try_remove(self.key);
        let m = self.shard.metrics();
        m.connections_open.sub(1);
        if self.is_websocket {
            m.websockets_open.sub(1);
        }
        if let Some(mut b) = self.inbuf.take() {
            b.consume(b.len());
            self.shard.pool.put_read(b);
        }
        if self.out.capacity() > 0 {
            self.shard.pool.put_write(std::mem::take(&mut self.out));
        }
    }
}

impl Conn {
    fn m(&self) -> &ShardMetrics {
        self.shard.metrics()
    }

    fn queued(&self) -> usize {
        self.out.len() - self.out_sent
    }

    fn may_read(&self) -> bool {
        match self.phase {
            Phase::Request | Phase::Linger => true,
            Phase::Open | Phase::CloseSent => {
                self.queued() <= self.shard.limits.outbound_budget_bytes
            }
            Phase::CloseAfterFlush => false,
        }
    }

    /// The output buffer, taken from the pool if we hold none.
    fn out(&mut self) -> &mut Vec<u8> {
        if self.out.capacity() == 0 {
            self.out = self.shard.pool.take_write();
        } else if self.out_sent > 0 && self.out_sent >= self.out.len() / 2 {
            self.out.drain(..self.out_sent);
            self.out_sent = 0;
        }
        &mut self.out
    }

    /// Writes queued output; one `send` per call when the socket keeps up.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_sent < self.out.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.out[self.out_sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.out_sent += n;
                    self.shard.metrics().bytes_out.add(n as u64);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.track_budget();
                    return Poll::Pending;
                }
            }
        }
        if self.out.capacity() > 0 {
            self.shard.pool.put_write(std::mem::take(&mut self.out));
            self.out_sent = 0;
        }
        self.over_budget_since = None;
        Poll::Ready(Ok(()))
    }

    /// Reads once into a pooled buffer; keeps it only if input is left over.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut buf = self
            .inbuf
            .take()
            .unwrap_or_else(|| self.shard.pool.take_read());
        let want = match self.phase {
            Phase::Open | Phase::CloseSent => self
                .decoder
                .frame_len_hint()
                .map_or(0, |n| n.saturating_sub(buf.len())),
            _ => 0,
        };
        // `want` is bounded by the decoder: it refuses frames over the limit
        // from their header alone.
        buf.reserve(want.max(READ_CHUNK / 4));
        let r = Pin::new(&mut self.stream).poll_read(cx, buf.spare_mut());
        if let Poll::Ready(Ok(n)) = r {
            buf.advance(n);
            self.shard.metrics().bytes_in.add(n as u64);
            self.last_rx = self.shard.clock.get();
            self.ping_sent = false;
        }
        if buf.is_empty() {
            self.shard.pool.put_read(buf);
        } else {
            self.inbuf = Some(buf);
        }
        r
    }

    fn on_input(&mut self) {
        match self.phase {
            Phase::Request => self.on_request(),
            Phase::Open | Phase::CloseSent => self.on_frames(),
            Phase::Linger => {
                if let Some(mut b) = self.inbuf.take() {
                    b.consume(b.len());
                    self.shard.pool.put_read(b);
                }
            }
            Phase::CloseAfterFlush => {}
        }
        self.track_budget();
    }

    fn on_request(&mut self) {
        let Some(buf) = self.inbuf.as_ref() else {
            return;
        };
        let parsed = handshake::parse_request(buf.filled());
        let max = self.shard.limits.max_header_bytes;
        let (req, len) = match parsed {
            Ok(Some((_, len))) if len > max => return self.refuse(Refusal::HeadersTooLarge),
            Ok(Some(r)) => r,
            Ok(None) if buf.len() >= max => return self.refuse(Refusal::HeadersTooLarge),
            Ok(None) => return,
            Err(r) => return self.refuse(r),
        };
        if let Some(b) = self.inbuf.as_mut() {
            b.consume(len);
        }
        match req.path.as_str() {
            "/echo" => match req.upgrade {
                Some(Ok(up)) => {
                    handshake::write_accept(self.out(), &up.accept, None);
                    self.open();
                    // A client may send frames right behind its request.
                    if self.inbuf.as_ref().is_some_and(|b| !b.is_empty()) {
                        self.on_frames();
                    }
                }
                Some(Err(r)) => self.refuse(r),
                None => self.refuse(Refusal::UpgradeRequired),
            },
            "/healthz" => self.reply(200, "text/plain; charset=utf-8", b"ok\n"),
            "/readyz" => {
                if self.shard.draining.get() {
                    self.reply(503, "text/plain; charset=utf-8", b"draining\n")
                } else {
                    self.reply(200, "text/plain; charset=utf-8", b"ready\n")
                }
            }
            "/metrics" => {
                let body = metrics::render(&self.shard.all_metrics, self.shard.draining.get());
                self.reply(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body.as_bytes(),
                )
            }
            _ => self.refuse(Refusal::NotFound),
        }
    }

    fn open(&mut self) {
        self.phase = Phase::Open;
        self.is_websocket = true;
        let m = self.m();
        m.upgrades.inc();
        m.websockets_open.inc();
        self.rearm();
    }

    fn reply(&mut self, status: u16, content_type: &str, body: &[u8]) {
        self.m().http_requests.inc();
        handshake::write_response(self.out(), status, "", content_type, body);
        self.close_after_flush();
    }

    fn refuse(&mut self, r: Refusal) {
        self.m().handshake_failed(r);
        r.write_response(self.out());
        self.close_after_flush();
    }

    fn close_after_flush(&mut self) {
        self.phase = Phase::CloseAfterFlush;
        self.phase_deadline = self.shard.clock.get() + self.shard.limits.close_timeout;
        self.rearm();
    }

    /// Decodes and handles every complete frame in the input buffer.
    fn on_frames(&mut self) {
        let Some(mut buf) = self.inbuf.take() else {
            return;
        };
        while matches!(self.phase, Phase::Open | Phase::CloseSent) {
            match self.decoder.decode(buf.filled_mut()) {
                Ok(Some(frame)) => {
                    self.m().frames_in.inc();
                    self.on_frame(&frame, &buf.filled()[frame.payload.clone()]);
                    buf.consume(frame.consumed);
                }
                Ok(None) => break,
                Err(e) => {
                    self.fail(e);
                    buf.consume(buf.len());
                }
            }
        }
        if buf.is_empty() {
            self.shard.pool.put_read(buf);
        } else {
            self.inbuf = Some(buf);
        }
    }

    fn on_frame(&mut self, f: &ws::Frame, payload: &[u8]) {
        match f.opcode {
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                if self.phase != Phase::Open {
                    return; // After our close frame, data is discarded.
                }
                if f.fin && f.opcode != OpCode::Continuation {
                    self.m().messages_in.inc();
                    self.send_message(f.opcode, payload);
                    return;
                }
                self.fragments.extend_from_slice(payload);
                if f.fin {
                    self.m().messages_in.inc();
                    let msg = std::mem::take(&mut self.fragments);
                    self.send_message(f.message, &msg);
                    if msg.capacity() <= READ_CHUNK {
                        self.fragments = msg;
                        self.fragments.clear();
                    }
                }
            }
            OpCode::Ping => {
                if self.phase == Phase::Open {
                    ws::encode_frame(self.out(), true, OpCode::Pong, payload, None);
                    self.m().frames_out.inc();
                }
            }
            OpCode::Pong => {}
            OpCode::Close => {
                if self.phase == Phase::CloseSent {
                    // The client answered our close: the handshake is done.
                    self.close_after_flush();
                    return;
                }
                let code = close::parse_close(payload).ok().flatten().map(|c| c.code);
                ws::encode_close(self.out(), code, "", None);
                self.m().frames_out.inc();
                self.m().closed(code.unwrap_or(1005), Initiator::Client);
                self.close_after_flush();
            }
        }
    }

    /// Queues one message (the echo) as a single frame.
    fn send_message(&mut self, opcode: OpCode, payload: &[u8]) {
        ws::encode_frame(self.out(), true, opcode, payload, None);
        let m = self.m();
        m.frames_out.inc();
        m.messages_out.inc();
    }

    /// Starts a server-initiated close handshake.
    fn start_close(&mut self, code: u16, reason: &str) {
        ws::encode_close(self.out(), Some(code), reason, None);
        self.m().frames_out.inc();
        self.m().closed(code, Initiator::Server);
        self.phase = Phase::CloseSent;
        self.phase_deadline = Instant::now() + self.shard.limits.close_timeout;
        self.rearm();
    }

    /// Fails the connection after a protocol error (RFC 6455 §7.1.7).
    fn fail(&mut self, e: ws::ProtocolError) {
        log::debug!("shard {}: closing connection: {e}", self.shard.id);
        self.start_close(e.close_code(), e.reason());
        self.phase = Phase::Linger;
    }

    fn on_shutdown(&mut self) {
        match self.phase {
            Phase::Request => {
                self.m().http_requests.inc();
                handshake::write_response(
                    self.out(),
                    503,
                    "",
                    "text/plain; charset=utf-8",
                    b"server shutting down\n",
                );
                self.close_after_flush();
            }
            Phase::Open => self.start_close(code::GOING_AWAY, "server shutting down"),
            _ => {}
        }
    }

    fn on_timer(&mut self, now: Instant) {
        let limits = self.shard.limits;
        match self.phase {
            Phase::Request => {
                if now >= self.phase_deadline {
                    self.refuse(Refusal::Timeout);
                }
            }
            Phase::Open => {
                if let Some(since) = self.over_budget_since {
                    if now.duration_since(since) >= limits.slow_consumer_timeout {
                        self.slow_consumer();
                        return;
                    }
                }
                let idle = now.saturating_duration_since(self.last_rx);
                if idle >= limits.idle_timeout {
                    self.start_close(code::GOING_AWAY, "idle timeout");
                } else if let Some(interval) = limits.ping_interval {
                    if idle >= interval && !self.ping_sent {
                        self.ping_sent = true;
                        ws::encode_frame(self.out(), true, OpCode::Ping, b"", None);
                        let m = self.m();
                        m.frames_out.inc();
                        m.pings_sent.inc();
                    }
                }
            }
            Phase::CloseSent | Phase::Linger | Phase::CloseAfterFlush => {
                if now >= self.phase_deadline {
                    // The peer did not finish the close handshake (or did
                    // not read our reply) in time: drop the socket.
                    self.phase = Phase::CloseAfterFlush;
                    self.out.clear();
                    self.out_sent = 0;
                }
            }
        }
        self.rearm();
    }

    /// A client that stopped reading: close with 1008. The close frame is
    /// queued behind what the client has not read, so it arrives only if the
    /// client resumes reading before the close timeout; then the socket is
    /// dropped either way.
    fn slow_consumer(&mut self) {
        let m = self.m();
        m.slow_consumer_closes.inc();
        log::debug!(
            "shard {}: closing slow consumer ({} bytes queued)",
            self.shard.id,
            self.queued()
        );
        self.start_close(
            code::POLICY_VIOLATION,
            "slow consumer: outbound budget exceeded",
        );
        self.phase = Phase::Linger;
    }

    /// Starts the slow-consumer clock when the queue goes over budget.
    fn track_budget(&mut self) {
        let over = self.queued() > self.shard.limits.outbound_budget_bytes;
        match (over, self.over_budget_since) {
            (true, None) => {
                self.over_budget_since = Some(self.shard.clock.get());
                self.rearm();
            }
            (false, Some(_)) => self.over_budget_since = None,
            _ => {}
        }
    }

    /// Tells the sweeper when this connection next needs its timers checked.
    fn rearm(&self) {
        let limits = &self.shard.limits;
        let deadline = match self.phase {
            Phase::Open => {
                let mut d = self.last_rx + limits.idle_timeout;
                if let (Some(interval), false) = (limits.ping_interval, self.ping_sent) {
                    d = d.min(self.last_rx + interval);
                }
                if let Some(since) = self.over_budget_since {
                    d = d.min(since + limits.slow_consumer_timeout);
                }
                d
            }
            _ => self.phase_deadline,
        };
        self.shared.deadline.set(deadline);
    }

    /// The client closed its side of the TCP connection.
    fn on_eof(&mut self) -> Poll<()> {
        if self.phase == Phase::Open {
            self.m().closed(code::ABNORMAL, Initiator::Client);
        }
        Poll::Ready(())
    }

    /// The socket failed (reset, broken pipe).
    fn lost(&mut self) -> Poll<()> {
        if self.phase == Phase::Open {
            self.m().closed(code::ABNORMAL, Initiator::Client);
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_state_stays_small() {
        // Every idle connection holds one of these (plus its task header,
        // glommio's stream and a pending poll). The memory target is 4 KiB
        // per idle connection in all; keep the state itself well under it.
        let conn = std::mem::size_of::<Conn>();
        let shared = std::mem::size_of::<ConnShared>();
        assert!(
            conn + shared <= 768,
            "Conn {conn} B + ConnShared {shared} B"
        );
    }
}
