//! One client connection: HTTP request, WebSocket upgrade, echo or chat,
//! close.
//!
//! The connection is a hand-written future driven by socket readiness, its
//! [`ConnShared`] flags and the shard's sweeper. Each poll flushes what is
//! queued (one `send` for everything produced since the last flush: its own
//! replies, then the frames of its rooms, gathered from the rooms' feeds),
//! then reads and decodes what arrived.
//!
//! This layer knows nothing above it: what `/ws` means (the chat session),
//! what the side doors answer and whether cross-shard work is behind, a
//! connection asks its [`Host`] (the shard implements it), and it carries
//! the session it is given as [`ConnShared::app`] without looking inside.
//!
//! # Invariants
//! - Lives its whole life on the shard that accepted it; `!Send` (holds `Rc`).
//! - Never blocks: the socket is non-blocking and registered in the shard's
//!   epoll set (`readiness`); the connection calls `recv`/`send` while its
//!   readiness flags say so and waits for the next edge once they come back
//!   short or with `EAGAIN`. A read buffer is borrowed from the shard pool
//!   only for one `recv`, so an idle connection holds no I/O buffer at all.
//! - Output is bounded: above `outbound_budget_bytes` queued the connection
//!   stops reading (back-pressure); staying there past the slow-consumer
//!   timeout, or reaching 4× the budget through deliveries, closes it with
//!   1008 (a room's feed checks its members' lag as it grows, see `feed`).
//!   Nothing is queued after our close frame.
//! - The shard (sweeper, room deliveries) reaches a connection only through
//!   its `ConnShared`, and never while the connection itself is being polled
//!   (deliveries run in their own tasks).

use std::{
    cell::{Cell, RefCell},
    future::Future,
    io,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
    time::Instant,
};

use std::os::fd::{AsFd, OwnedFd};

use corecast_router::proto as chat_proto;
use rustix::{event::epoll::EventFlags, io::Errno};
use slab::Slab;

use crate::{
    buf::{InBuf, GATHER_BYTES, READ_CHUNK},
    doors,
    feed::{Cursor, Feed},
    local::Local,
    metrics::{Initiator, ShardMetrics},
    readiness::{self, Peeked, Poller, Waiter},
    tls::{
        self,
        stream::{self as tls_stream, TlsStream},
    },
    ws::{
        self,
        close::code,
        handshake::{self, Refusal},
        Event, OpCode, Role,
    },
};

/// Reads handled in one poll before yielding to the shard's other tasks.
const READS_PER_POLL: usize = 16;

/// Deliveries may queue up to this many times the outbound budget before
/// the connection is closed at once (instead of after the slow-consumer
/// timeout): memory per slow client stays bounded however fast rooms are.
const HARD_CAP_BUDGETS: usize = 4;

/// What a connection asks of the layers above it: the chat session that
/// `/ws` serves, the side doors' answers, and whether cross-shard work is
/// behind. The shard implements it (`shard::Shard`); this module imports
/// none of those layers.
pub trait Host: 'static {
    /// What the layer above keeps per connection (the chat session), in
    /// the connection's [`ConnShared::app`].
    type App;
    fn local(&self) -> &Local;
    fn conns(&self) -> &Conns<Self::App>;
    /// The answer to a plain HTTP request for `path` (with its `query`,
    /// without `?`), or `None` (404).
    fn side_door(&self, path: &str, query: Option<&str>) -> Option<doors::Answer>;
    /// Cross-shard work is behind: chat input waits in the socket buffer.
    fn congested(&self) -> bool;
    /// Wakes `waker` when the congestion clears (once per congestion:
    /// `epoch` remembers the release it registered for).
    fn wait_uncongested(&self, waker: &Waker, epoch: &Cell<u64>);
    /// Whether `opened` wants the client's address (a per-address cap).
    fn wants_peer(&self) -> bool;
    /// A `/ws` upgrade was answered; `token` came with the request, `peer`
    /// is the client's address when `wants_peer`.
    fn opened(
        &self,
        conn: &ConnShared<Self::App>,
        key: u32,
        token: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Outcome;
    /// A text message arrived on `/ws`.
    fn text(&self, conn: &ConnShared<Self::App>, key: u32, text: &[u8]) -> Outcome;
    /// A `/ws` connection is gone.
    fn closed(&self, conn: &ConnShared<Self::App>, key: u32);
    /// When the session must close unless its client acts first (time to
    /// authenticate, token expiry), and the close code and reason then.
    fn deadline(app: &Self::App) -> Option<(Instant, u16, Reason)>;
}

/// What the layer above tells a connection to do after its input: go on,
/// or close with a code and reason (the chat session's own answer).
pub use corecast_router::session::{Outcome, Reason};

/// The shard's sockets: the listener's readiness and the live connections
/// (for the epoll dispatcher, the sweeper, deliveries and the drain).
pub struct Conns<A> {
    pub slab: RefCell<Slab<Rc<ConnShared<A>>>>,
    /// Generation of the last connection accepted (see `ConnShared::gen`).
    next_gen: Cell<u32>,
    /// Each listener's readiness and the acceptor waiting on it (the
    /// listener, then the TLS listener if there is one).
    pub accepting: [Waiter; readiness::MAX_LISTENERS],
}

impl<A> Default for Conns<A> {
    fn default() -> Self {
        Conns {
            slab: RefCell::new(Slab::new()),
            next_gen: Cell::new(0),
            accepting: Default::default(),
        }
    }
}

impl<A> Conns<A> {
    /// The connection at `key`, if it is still the one of generation `gen`.
    pub fn get(&self, key: u32, gen: u32) -> Option<Rc<ConnShared<A>>> {
        let conns = self.slab.borrow();
        conns.get(key as usize).filter(|c| c.gen == gen).cloned()
    }

    /// Hands one epoll event to whoever waits for it: the acceptor, or the
    /// connection the token names (if it is still the same connection).
    pub fn on_event(&self, token: u64, flags: EventFlags) {
        if let Some(i) = readiness::listener_of(token) {
            let accepting = &self.accepting[i];
            if accepting.io.set(flags) {
                accepting.wake();
            }
            return;
        }
        let (key, gen) = readiness::split_token(token);
        let conns = self.slab.borrow();
        if let Some(c) = conns.get(key).filter(|c| c.gen == gen) {
            if c.ready.io.set(flags) {
                c.wake();
            }
        }
    }
}

/// What a connection shares with its shard: the sweeper's flags, the output
/// queue that room deliveries append to, and the session of the layer
/// above.
#[derive(Debug)]
pub struct ConnShared<A> {
    /// The socket's readiness (set by the shard's epoll set) and the
    /// connection's task, woken by the shard and by room deliveries.
    pub ready: Waiter,
    /// Tells this connection from an earlier one with the same slab key.
    pub gen: u32,
    /// Earliest time the connection wants its timers looked at.
    pub deadline: Cell<Instant>,
    /// Set by the sweeper once `deadline` has passed.
    pub fired: Cell<bool>,
    /// The server is draining: close with 1001.
    pub shutdown: Cell<bool>,
    /// Bytes for the client; capacity 0 (no allocation) whenever all is sent.
    out: RefCell<Vec<u8>>,
    out_sent: Cell<usize>,
    /// Open for deliveries: a WebSocket that has not sent its close frame.
    accepting: Cell<bool>,
    /// Since when more than the outbound budget is queued.
    over_budget_since: Cell<Option<Instant>>,
    /// A delivery found the queue at its hard cap: close as a slow consumer.
    overflowed: Cell<bool>,
    /// The layer above's session (chat, for connections on `/ws`).
    pub app: RefCell<Option<Box<A>>>,
    /// The congestion release this connection last registered for.
    congestion_epoch: Cell<u64>,
    /// Its place in the feed of each room it is in on this shard: room
    /// frames are sent from the feeds' bytes, after `out`.
    feeds: RefCell<Vec<Cursor>>,
    /// On the shard's list for the next flush round (see `flush`).
    pub flush_pending: Cell<bool>,
}

impl<A> ConnShared<A> {
    pub fn new(deadline: Instant, gen: u32) -> ConnShared<A> {
        ConnShared {
            ready: Waiter::default(),
            gen,
            deadline: Cell::new(deadline),
            fired: Cell::new(false),
            shutdown: Cell::new(false),
            out: RefCell::new(Vec::new()),
            out_sent: Cell::new(0),
            accepting: Cell::new(false),
            over_budget_since: Cell::new(None),
            overflowed: Cell::new(false),
            app: RefCell::new(None),
            congestion_epoch: Cell::new(0),
            feeds: RefCell::new(Vec::new()),
            flush_pending: Cell::new(false),
        }
    }

    pub fn wake(&self) {
        self.ready.wake();
    }

    /// Bytes queued and not yet sent: our own output and the room frames
    /// after our cursors.
    pub fn queued(&self) -> usize {
        let own = self.out.borrow().len() - self.out_sent.get();
        own + self.feeds.borrow().iter().map(Cursor::lag).sum::<usize>()
    }

    /// Runs `f` on the output buffer, taken from the pool if we hold none.
    /// Room frames that arrived before whatever `f` queues are copied in
    /// first, so the client sees everything in the order it happened; a
    /// connection that stopped accepting deliveries drops its cursors here.
    fn with_out<R>(&self, local: &Local, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let mut out = self.out.borrow_mut();
        if out.capacity() == 0 {
            *out = local.pool.take_write();
        } else {
            let sent = self.out_sent.get();
            if sent > 0 && sent >= out.len() / 2 {
                out.drain(..sent);
                self.out_sent.set(0);
            }
        }
        let mut feeds = self.feeds.borrow_mut();
        for c in feeds.iter_mut() {
            c.drain_into(&mut out);
        }
        if !self.accepting.get() {
            feeds.clear();
        }
        drop(feeds);
        f(&mut out)
    }

    /// Starts sending a room's frames: the connection is now a member there.
    pub fn subscribe(&self, feed: &Rc<Feed>) {
        if self.accepting.get() {
            self.feeds.borrow_mut().push(feed.subscribe());
        }
    }

    /// Stops sending a room's frames. Those that arrived before stay queued,
    /// unless the connection is closing anyway.
    pub fn unsubscribe(&self, local: &Local, feed: &Rc<Feed>) {
        let mut feeds = self.feeds.borrow_mut();
        let Some(i) = feeds.iter().position(|c| Rc::ptr_eq(c.feed(), feed)) else {
            return;
        };
        let mut cursor = feeds.remove(i);
        drop(feeds);
        if self.accepting.get() && cursor.lag() > 0 {
            self.with_out(local, |out| cursor.drain_into(out));
        }
    }

    /// The connection holds more than its hard cap: it is closed as a slow
    /// consumer, and its places in the rooms' feeds go, so the rooms keep
    /// no frames for it. A frame it had started to send is finished first,
    /// so the close frame that follows starts on a frame boundary.
    pub fn cut_off(&self, local: &Local) {
        if !self.feeds.borrow().is_empty() {
            let mut feeds = std::mem::take(&mut *self.feeds.borrow_mut());
            self.with_out(local, |out| {
                for c in feeds.iter_mut() {
                    c.finish_frame_into(out);
                }
            });
        }
        self.overflowed.set(true);
        self.accepting.set(false);
        self.wake();
    }

    /// The connection will queue nothing more from its rooms (it is
    /// closing): the frames that arrived so far stay queued, later ones are
    /// not sent, and the rooms keep none for it.
    fn stop_accepting(&self, local: &Local) {
        self.accepting.set(false);
        let lagging = self.feeds.borrow().iter().any(|c| c.lag() > 0);
        if lagging {
            // Not accepting: `with_out` copies what is pending, then drops
            // the cursors.
            self.with_out(local, |_| ());
        } else {
            self.feeds.borrow_mut().clear();
        }
    }

    /// More than the outbound budget is queued: start the slow-consumer
    /// clock, unless it runs already.
    pub fn over_budget(&self, local: &Local) {
        if self.over_budget_since.get().is_some() {
            return;
        }
        self.over_budget_since.set(Some(local.clock.get()));
        // The sweeper must look at us when the timeout runs out.
        let timeout = local.clock.get() + local.limits.slow_consumer_timeout;
        if timeout < self.deadline.get() {
            self.deadline.set(timeout);
        }
    }

    /// Hands what is queued to `write` in one piece: our own output, then
    /// the unsent frames of each room, gathered in the shard's gather buffer
    /// up to `limit` (≤ `GATHER_BYTES`; the rest goes in the next call), or
    /// our own output alone when it is that long already. `write` says how
    /// much it took: what one `send` took on a plain socket, what was
    /// encrypted on TLS (at most the same limit).
    fn write_queued(
        &self,
        local: &Local,
        limit: usize,
        write: impl FnOnce(&[u8]) -> Result<usize, Errno>,
    ) -> Result<usize, Errno> {
        let out = self.out.borrow();
        let own = &out[self.out_sent.get()..];
        let feeds = self.feeds.borrow();
        if own.len() >= limit || feeds.iter().all(|c| c.lag() == 0) {
            return write(own);
        }
        local.pool.gather(|g| {
            g.extend_from_slice(own);
            for c in feeds.iter() {
                c.copy_unsent(g, limit);
            }
            write(g)
        })
    }

    /// Counts `n` bytes as sent: our own output first, then the feeds in
    /// the order `send_queued` gathered them.
    fn mark_sent(&self, n: usize) {
        let own = self.out.borrow().len() - self.out_sent.get();
        let k = n.min(own);
        self.out_sent.set(self.out_sent.get() + k);
        let mut left = n - k;
        for c in self.feeds.borrow_mut().iter_mut() {
            if left == 0 {
                break;
            }
            left = c.advance(left);
        }
        debug_assert_eq!(left, 0, "the socket took more than was queued");
    }

    /// Forgets everything queued: the client will not read it.
    fn discard(&self) {
        self.out.borrow_mut().clear();
        self.out_sent.set(0);
        self.feeds.borrow_mut().clear();
    }

    /// Everything is sent: the output buffer goes back to the pool, the
    /// rooms' next frames must wake us, and the slow-consumer clock stops.
    fn flushed(&self, local: &Local) {
        let mut out = self.out.borrow_mut();
        if out.capacity() > 0 {
            local.pool.put_write(std::mem::take(&mut *out));
            self.out_sent.set(0);
        }
        for c in self.feeds.borrow().iter() {
            c.caught_up();
        }
        self.over_budget_since.set(None);
    }

    /// Queues a frame the connection produced itself (a reply); the
    /// connection's own poll flushes it.
    pub fn push_own(&self, local: &Local, frame: &[u8]) {
        self.with_out(local, |out| out.extend_from_slice(frame));
    }

    /// Queues a frame delivered from a room or another connection, and wakes
    /// the connection to flush it. Dropped if the connection is closing; at
    /// the hard cap the connection is closed as a slow consumer instead.
    pub fn enqueue(&self, local: &Local, frame: &[u8]) {
        if !self.accepting.get() {
            return;
        }
        let budget = local.limits.outbound_budget_bytes;
        let queued = self.queued();
        if queued + frame.len() > hard_cap(local) {
            self.cut_off(local);
            return;
        }
        self.with_out(local, |out| out.extend_from_slice(frame));
        if queued + frame.len() > budget {
            self.over_budget(local);
        }
        if queued == 0 {
            self.wake();
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
    /// session is dead; after the flush we shut down our side and discard
    /// input until the client closes or the close timeout.
    Linger,
    /// Nothing more to read: close the socket once the output is flushed (an
    /// HTTP response, or our reply to the client's close frame).
    CloseAfterFlush,
}

/// What the WebSocket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Echo,
    Chat,
}

/// What a read brought.
enum Got {
    /// Input to decode.
    Input,
    /// Nothing for the layers above (TLS handshake records).
    Nothing,
    /// The client closed its side.
    End,
}

/// What `on_frames` does after a frame, once the session lets go of it;
/// each but `NeedMore` and `Failed` carries the bytes the frame took.
enum Then {
    NeedMore,
    Consume(usize),
    /// Close from our side with this code and reason.
    Close(usize, u16, &'static str),
    /// The close handshake is complete: flush and close.
    Closed(usize),
    /// A protocol error: the session's close frame is queued.
    Failed,
}

const BINARY_REFUSED: &str = "binary frames are not part of corecast.v1";

/// The most a connection may hold queued for it.
pub fn hard_cap(local: &Local) -> usize {
    local
        .limits
        .outbound_budget_bytes
        .saturating_mul(HARD_CAP_BUDGETS)
}

/// The per-connection future.
pub struct Conn<H: Host> {
    host: Rc<H>,
    shared: Rc<ConnShared<H::App>>,
    /// Its slab key in `Conns` (a `u32`, as in its epoll token).
    key: u32,
    /// Non-blocking TCP socket, in the shard's epoll set until dropped.
    socket: OwnedFd,
    /// The connection's TLS, if it came in on a TLS listener: reads and
    /// writes go through it; everything above sees plaintext.
    tls: Option<Box<TlsStream>>,
    phase: Phase,
    endpoint: Endpoint,
    /// Unconsumed input; `None` whenever everything read was consumed.
    inbuf: Option<InBuf>,
    /// The WebSocket rules: reassembly, pong and close replies, the close
    /// handshake's state (the I/O side of it is `phase`).
    session: ws::Session,
    is_websocket: bool,
    /// Shard clock at the last read from the client.
    last_rx: Instant,
    ping_sent: bool,
    /// Deadline of the handshake, or of the close handshake.
    phase_deadline: Instant,
    write_shut: bool,
    shutdown_seen: bool,
}

/// Starts serving an accepted, non-blocking socket on the current shard,
/// over TLS if `tls` is given.
pub fn spawn<H: Host>(
    host: &Rc<H>,
    poller: &Poller,
    socket: OwnedFd,
    tls: Option<&std::sync::Arc<rustls::ServerConfig>>,
) -> io::Result<()> {
    let tls = match tls {
        Some(config) => Some(Box::new(
            TlsStream::new(config.clone()).map_err(io::Error::other)?,
        )),
        None => None,
    };
    let local = host.local();
    let conns = host.conns();
    let now = local.clock.get();
    let deadline = now + local.limits.handshake_timeout;
    let gen = conns.next_gen.get().wrapping_add(1);
    conns.next_gen.set(gen);
    let shared = Rc::new(ConnShared::new(deadline, gen));
    let slot = conns.slab.borrow_mut().insert(shared.clone());
    let Ok(key) = u32::try_from(slot) else {
        conns.slab.borrow_mut().remove(slot);
        return Err(io::Error::other("more connections than a u32 counts"));
    };
    if let Err(e) = poller.add(socket.as_fd(), readiness::conn_token(slot, gen)) {
        conns.slab.borrow_mut().remove(slot);
        return Err(e);
    }
    let m = local.metrics();
    m.connections_accepted.inc();
    m.connections_open.inc();
    let conn = Conn {
        host: host.clone(),
        shared,
        key,
        socket,
        tls,
        phase: Phase::Request,
        endpoint: Endpoint::Echo,
        inbuf: None,
        session: ws::Session::new(Role::Server, local.limits.frame),
        is_websocket: false,
        last_rx: now,
        ping_sent: false,
        phase_deadline: deadline,
        write_shut: false,
        shutdown_seen: false,
    };
    glommio::spawn_local(conn).detach();
    Ok(())
}

impl<H: Host> Future for Conn<H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.shared.ready.register(cx.waker());
        for _ in 0..READS_PER_POLL {
            if this.shared.fired.replace(false) {
                this.on_timer(Instant::now());
            }
            if this.shared.shutdown.get() && !this.shutdown_seen {
                this.shutdown_seen = true;
                this.on_shutdown();
            }
            if this.shared.overflowed.replace(false) && this.phase == Phase::Open {
                this.slow_consumer();
            }
            match this.poll_flush() {
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
                    let _ = rustix::net::shutdown(&this.socket, rustix::net::Shutdown::Write);
                }
                _ => {}
            }
            if !this.may_read(cx) {
                return Poll::Pending;
            }
            match this.poll_read() {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Got::End)) => return this.on_eof(),
                Poll::Ready(Ok(Got::Input)) => this.on_input(),
                // TLS records without plaintext: their answer is flushed
                // at the top of the loop.
                Poll::Ready(Ok(Got::Nothing)) => {}
                Poll::Ready(Err(_)) => return this.lost(),
            }
        }
        // Plenty of input: let the shard's other connections run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<H: Host> Drop for Conn<H> {
    fn drop(&mut self) {
        self.shared.accepting.set(false);
        if self.endpoint == Endpoint::Chat {
            self.host.closed(&self.shared, self.key);
        }
        self.host
            .conns()
            .slab
            .borrow_mut()
            .try_remove(self.key as usize);
        let m = self.local().metrics();
        m.connections_open.sub(1);
        if self.is_websocket {
            m.websockets_open.sub(1);
        }
        if let Some(mut b) = self.inbuf.take() {
            b.consume(b.len());
            self.local().pool.put_read(b);
        }
        let out = std::mem::take(&mut *self.shared.out.borrow_mut());
        if out.capacity() > 0 {
            self.local().pool.put_write(out);
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.release(&self.host.local().pool);
        }
    }
}

impl<H: Host> Conn<H> {
    fn local(&self) -> &Local {
        self.host.local()
    }

    fn m(&self) -> &ShardMetrics {
        self.local().metrics()
    }

    /// Bytes waiting for the client: queued plaintext, and ciphertext not
    /// yet sent.
    fn queued(&self) -> usize {
        self.shared.queued() + self.tls.as_ref().map_or(0, |t| t.pending())
    }

    fn may_read(&self, cx: &mut Context<'_>) -> bool {
        match self.phase {
            Phase::Request | Phase::Linger => true,
            Phase::Open | Phase::CloseSent => {
                if self.queued() > self.local().limits.outbound_budget_bytes {
                    return false;
                }
                // Chat input makes cross-shard work: while other shards are
                // behind, let the client wait in its socket buffer. Not the
                // frames that make none: after our close, data is discarded
                // and only the client's close is awaited; and a close or ping
                // at the head of the input is read, so a storm of closes
                // (which congests the shard with leave and offline work)
                // still finishes its handshakes in time.
                if self.endpoint == Endpoint::Chat
                    && self.phase == Phase::Open
                    && self.host.congested()
                    && !self.control_frame_next()
                {
                    self.host
                        .wait_uncongested(cx.waker(), &self.shared.congestion_epoch);
                    return false;
                }
                true
            }
            Phase::CloseAfterFlush => false,
        }
    }

    /// Whether the next frame to decode is a control frame (close, ping,
    /// pong), judged from the buffered head of a frame or else from one byte
    /// peeked from the socket; also true at the end of the stream, which is
    /// read to let the connection go.
    fn control_frame_next(&self) -> bool {
        if let Some(b) = self.inbuf.as_ref().and_then(|b| b.filled().first()) {
            return ws::is_control_frame_start(*b);
        }
        match self.shared.ready.io.peek(self.socket.as_fd()) {
            // Ciphertext says nothing about the frame inside: a TLS client's
            // frames wait for the congestion to clear, close frames too.
            Peeked::Byte(_) if self.tls.is_some() => false,
            Peeked::Byte(b) => ws::is_control_frame_start(b),
            Peeked::Nothing => false,
            Peeked::EndOrError => true,
        }
    }

    /// Queues bytes this connection produced (a reply, a control frame).
    fn push(&self, f: impl FnOnce(&mut Vec<u8>)) {
        self.shared.with_out(self.host.local(), f);
    }

    /// Writes queued output; one `send` per call when the socket keeps up.
    fn poll_flush(&mut self) -> Poll<io::Result<()>> {
        if self.tls.is_some() {
            return self.poll_flush_tls();
        }
        let shared = self.shared.clone();
        let io = &shared.ready.io;
        while shared.queued() > 0 {
            let sent = if io.writable.get() {
                shared.write_queued(self.host.local(), GATHER_BYTES, |b| {
                    io.send(self.socket.as_fd(), b)
                })
            } else {
                Err(Errno::AGAIN)
            };
            match sent {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    shared.mark_sent(n);
                    self.local().metrics().bytes_out.add(n as u64);
                }
                Err(Errno::AGAIN) => {
                    // The socket's buffer is full: wait for its next edge.
                    self.track_budget();
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
        shared.flushed(self.host.local());
        Poll::Ready(Ok(()))
    }

    /// The TLS flush: ciphertext out first; then, once the handshake is
    /// done, the next gathered plaintext is encrypted and sent.
    fn poll_flush_tls(&mut self) -> Poll<io::Result<()>> {
        let shared = self.shared.clone();
        let host = self.host.clone();
        let local = host.local();
        loop {
            let Some(tls) = self.tls.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            if tls.pending() > 0 {
                match tls.send(&shared.ready.io, self.socket.as_fd(), &local.pool) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => local.metrics().bytes_out.add(n as u64),
                    Err(Errno::AGAIN) => {
                        self.track_budget();
                        return Poll::Pending;
                    }
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
                continue;
            }
            if shared.queued() == 0 {
                break;
            }
            if tls.handshaking() {
                // Nothing may be encrypted yet (a reply queued before the
                // handshake failed or timed out): it is never sent.
                shared.discard();
                break;
            }
            let inbuf = &mut self.inbuf;
            let mut failed = None;
            // A bounded piece at a time, even of one big reply: the
            // ciphertext buffer stays poolable and the rest waits as
            // plaintext, where the outbound budget counts it.
            let max = tls_stream::MAX_PLAINTEXT;
            let taken = shared.write_queued(local, max, |plain| {
                let plain = &plain[..plain.len().min(max)];
                tls.encrypt(plain, &local.pool, inbuf).map_err(|f| {
                    failed = Some(f);
                    Errno::IO
                })?;
                Ok(plain.len())
            });
            match taken {
                Ok(n) => shared.mark_sent(n),
                Err(_) => {
                    let f = failed.unwrap_or(tls::Failure::Other);
                    self.tls_failed(f);
                    shared.discard();
                }
            }
        }
        shared.flushed(local);
        Poll::Ready(Ok(()))
    }

    /// The TLS layer gave up on the client: count it, send the alert rustls
    /// queued (or the 400 for plain HTTP) and close.
    fn tls_failed(&mut self, f: tls::Failure) {
        let handshaking = self.tls.as_ref().is_some_and(|t| t.handshaking());
        if handshaking {
            self.m().tls_failed(f);
        } else if self.phase == Phase::Open {
            self.m().closed(code::ABNORMAL, Initiator::Client);
        }
        log::debug!(
            "shard {}: TLS connection failed: {}",
            self.local().id,
            f.label()
        );
        if let Some(mut b) = self.inbuf.take() {
            b.consume(b.len());
            self.local().pool.put_read(b);
        }
        self.shared.discard();
        self.close_after_flush();
    }

    /// Reads once into a pooled buffer; keeps it only if input is left over.
    fn poll_read(&mut self) -> Poll<io::Result<Got>> {
        if !self.shared.ready.io.readable.get() {
            // Nothing to read until the next edge: a buffer whose input was
            // all consumed goes back to the pool now, so an idle connection
            // holds none.
            if let Some(b) = self.inbuf.take_if(|b| b.is_empty()) {
                self.local().pool.put_read(b);
            }
            return Poll::Pending;
        }
        if self.tls.is_some() {
            return self.poll_read_tls();
        }
        let mut buf = self
            .inbuf
            .take()
            .unwrap_or_else(|| self.local().pool.take_read());
        let want = match self.phase {
            Phase::Open | Phase::CloseSent => self
                .session
                .frame_len_hint()
                .map_or(0, |n| n.saturating_sub(buf.len())),
            _ => 0,
        };
        // `want` is bounded by the session's decoder: it refuses frames over the limit
        // from their header alone.
        buf.reserve(want.max(READ_CHUNK / 4));
        let r = match self
            .shared
            .ready
            .io
            .recv(self.socket.as_fd(), buf.spare_mut())
        {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(Errno::AGAIN) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e.into())),
        };
        if let Poll::Ready(Ok(n)) = r {
            buf.advance(n);
            self.local().metrics().bytes_in.add(n as u64);
            self.last_rx = self.local().clock.get();
            self.ping_sent = false;
        }
        if buf.is_empty() {
            self.local().pool.put_read(buf);
        } else {
            self.inbuf = Some(buf);
        }
        r.map(|r| r.map(|n| if n == 0 { Got::End } else { Got::Input }))
    }

    /// Reads once through TLS: the plaintext lands in `inbuf` as a plain
    /// read's bytes would.
    fn poll_read_tls(&mut self) -> Poll<io::Result<Got>> {
        let host = self.host.clone();
        let local = host.local();
        let Some(tls) = self.tls.as_mut() else {
            return Poll::Ready(Ok(Got::Nothing));
        };
        let was_handshaking = tls.handshaking();
        let read = tls.read(
            &self.shared.ready.io,
            self.socket.as_fd(),
            &local.pool,
            &mut self.inbuf,
        );
        if was_handshaking && !tls.handshaking() {
            local.metrics().tls_handshakes.inc();
        }
        match read {
            Ok((n, what)) => {
                if n > 0 {
                    local.metrics().bytes_in.add(n as u64);
                    self.last_rx = local.clock.get();
                    self.ping_sent = false;
                }
                Poll::Ready(Ok(match what {
                    tls_stream::Read::Plaintext => Got::Input,
                    tls_stream::Read::Nothing => Got::Nothing,
                    tls_stream::Read::End => Got::End,
                }))
            }
            Err(tls_stream::Error::Io(Errno::AGAIN)) => Poll::Pending,
            Err(tls_stream::Error::Io(e)) => Poll::Ready(Err(e.into())),
            Err(tls_stream::Error::Tls(f)) => {
                self.tls_failed(f);
                Poll::Ready(Ok(Got::Nothing))
            }
        }
    }

    fn on_input(&mut self) {
        match self.phase {
            Phase::Request => self.on_request(),
            Phase::Open | Phase::CloseSent => self.on_frames(),
            Phase::Linger => {
                if let Some(mut b) = self.inbuf.take() {
                    b.consume(b.len());
                    self.local().pool.put_read(b);
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
        let max = self.local().limits.max_header_bytes;
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
        // A browser's upgrade must come from a page of an allowed origin.
        let upgrade = matches!(req.upgrade, Some(Ok(_))) && matches!(&*req.path, "/echo" | "/ws");
        if upgrade {
            if let Err(r) = self.local().origins.check(req.origin.as_deref()) {
                return self.refuse(r);
            }
        }
        match req.path.as_str() {
            "/echo" => match req.upgrade {
                Some(Ok(up)) => {
                    self.push(|out| handshake::write_accept(out, &up.accept, None));
                    self.open();
                    // A client may send frames right behind its request.
                    if self.inbuf.as_ref().is_some_and(|b| !b.is_empty()) {
                        self.on_frames();
                    }
                }
                Some(Err(r)) => self.refuse(r),
                None => self.refuse(Refusal::UpgradeRequired),
            },
            "/ws" => match req.upgrade {
                Some(Ok(up)) => {
                    let offered = !up.protocols.is_empty();
                    let ours = up.protocols.iter().any(|p| p == chat_proto::SUBPROTOCOL);
                    if offered && !ours {
                        return self.refuse(Refusal::UnsupportedSubprotocol);
                    }
                    let protocol = ours.then_some(chat_proto::SUBPROTOCOL);
                    self.push(|out| handshake::write_accept(out, &up.accept, protocol));
                    self.endpoint = Endpoint::Chat;
                    self.open();
                    let token = req.token.as_deref();
                    let peer = self.host.wants_peer().then(|| self.peer()).flatten();
                    match self.host.opened(&self.shared, self.key, token, peer) {
                        Outcome::Continue => self.rearm(),
                        Outcome::Close(code, reason) => return self.start_close(code, reason),
                    }
                    if self.inbuf.as_ref().is_some_and(|b| !b.is_empty()) {
                        self.on_frames();
                    }
                }
                Some(Err(r)) => self.refuse(r),
                None => self.refuse(Refusal::UpgradeRequired),
            },
            path => match self.host.side_door(path, req.query.as_deref()) {
                Some(a) => self.reply(a.status, a.content_type, &a.body),
                None => self.refuse(Refusal::NotFound),
            },
        }
    }

    fn open(&mut self) {
        self.phase = Phase::Open;
        self.shared.accepting.set(true);
        self.is_websocket = true;
        let m = self.m();
        m.upgrades.inc();
        m.websockets_open.inc();
        self.rearm();
    }

    fn reply(&mut self, status: u16, content_type: &str, body: &[u8]) {
        self.m().http_requests.inc();
        self.push(|out| handshake::write_response(out, status, "", content_type, body));
        self.close_after_flush();
    }

    fn refuse(&mut self, r: Refusal) {
        self.m().handshake_failed(r);
        let head = self
            .inbuf
            .as_ref()
            .is_some_and(|b| handshake::is_head(b.filled()));
        self.push(|out| r.write_response_to(out, head));
        self.close_after_flush();
    }

    fn close_after_flush(&mut self) {
        self.phase = Phase::CloseAfterFlush;
        self.shared.stop_accepting(self.host.local());
        self.phase_deadline = self.local().clock.get() + self.local().limits.close_timeout;
        self.rearm();
    }

    /// Decodes and handles every complete frame in the input buffer.
    fn on_frames(&mut self) {
        let Some(mut buf) = self.inbuf.take() else {
            return;
        };
        while matches!(self.phase, Phase::Open | Phase::CloseSent) {
            let then = self.on_next_frame(buf.filled_mut());
            match then {
                Then::NeedMore => break,
                Then::Consume(n) => buf.consume(n),
                Then::Close(n, code, reason) => {
                    buf.consume(n);
                    self.start_close(code, reason);
                }
                Then::Closed(n) => {
                    buf.consume(n);
                    self.close_after_flush();
                }
                Then::Failed => {
                    buf.consume(buf.len());
                    if self.phase == Phase::Open {
                        // Our close frame went out just now.
                        self.phase_deadline = Instant::now() + self.local().limits.close_timeout;
                    }
                    self.phase = Phase::Linger;
                    self.rearm();
                }
            }
        }
        if buf.is_empty() {
            self.local().pool.put_read(buf);
        } else {
            self.inbuf = Some(buf);
        }
        // A chat frame may have moved the session's deadline (a `refresh`
        // with a token that expires sooner or later).
        if self.endpoint == Endpoint::Chat {
            self.rearm();
        }
    }

    /// Hands the session the next frame of `input` and acts on what it
    /// meant. The session's step borrows the session and the input, so the
    /// work here reaches only the other fields; what needs the whole
    /// connection is returned.
    fn on_next_frame(&mut self, input: &mut [u8]) -> Then {
        let Conn {
            host,
            shared,
            session,
            endpoint,
            key,
            phase,
            ..
        } = self;
        let m = host.local().metrics();
        let step = match session.read(input) {
            Ok(Some(step)) => step,
            Ok(None) => return Then::NeedMore,
            Err(failure) => {
                log::debug!(
                    "shard {}: closing connection: {}",
                    host.local().id,
                    failure.error
                );
                if let Some(reply) = failure.reply {
                    shared.with_out(host.local(), |out| reply.encode(out, None));
                    m.frames_out.inc();
                    m.closed(failure.error.close_code(), Initiator::Server);
                    shared.accepting.set(false);
                }
                return Then::Failed;
            }
        };
        m.frames_in.add(u64::from(step.frames));
        let n = step.consumed;
        if let Some(reply) = &step.reply {
            shared.with_out(host.local(), |out| reply.encode(out, None));
            m.frames_out.inc();
        }
        match step.event {
            None => {}
            Some(Event::Message { opcode, data }) => match endpoint {
                Endpoint::Echo => {
                    m.messages_in.inc();
                    shared.with_out(host.local(), |out| {
                        ws::encode_frame(out, true, opcode, data, None)
                    });
                    m.frames_out.inc();
                    m.messages_out.inc();
                }
                Endpoint::Chat => {
                    if opcode == OpCode::Binary {
                        return Then::Close(n, chat_proto::close::UNSUPPORTED_DATA, BINARY_REFUSED);
                    }
                    m.messages_in.inc();
                    if let Outcome::Close(code, reason) = host.text(shared, *key, data) {
                        return Then::Close(n, code, reason);
                    }
                }
            },
            Some(Event::Ping(_) | Event::Pong(_)) => {}
            Some(Event::Close { code, .. }) => {
                if *phase == Phase::Open {
                    // The client closed first; the session queued the echo.
                    m.closed(code.unwrap_or(1005), Initiator::Client);
                }
                // Either way the handshake is complete.
                return Then::Closed(n);
            }
        }
        // A binary message on /ws is refused at its first fragment, before
        // the rest of it is buffered.
        if *endpoint == Endpoint::Chat && session.message_in_progress() == Some(OpCode::Binary) {
            return Then::Close(n, chat_proto::close::UNSUPPORTED_DATA, BINARY_REFUSED);
        }
        Then::Consume(n)
    }

    /// Starts a server-initiated close handshake (nothing if a close frame
    /// already went out).
    fn start_close(&mut self, code: u16, reason: &str) {
        let Some(reply) = self.session.close(code, reason) else {
            return;
        };
        self.shared.accepting.set(false);
        self.push(|out| reply.encode(out, None));
        self.m().frames_out.inc();
        self.m().closed(code, Initiator::Server);
        self.phase = Phase::CloseSent;
        self.phase_deadline = Instant::now() + self.local().limits.close_timeout;
        self.rearm();
    }

    fn on_shutdown(&mut self) {
        match self.phase {
            Phase::Request if self.tls.as_ref().is_some_and(|t| t.handshaking()) => {
                self.close_after_flush();
            }
            Phase::Request => {
                self.m().http_requests.inc();
                self.push(|out| {
                    handshake::write_response(
                        out,
                        503,
                        "",
                        "text/plain; charset=utf-8",
                        b"server shutting down\n",
                    )
                });
                self.close_after_flush();
            }
            Phase::Open => self.start_close(code::GOING_AWAY, "server shutting down"),
            _ => {}
        }
    }

    fn on_timer(&mut self, now: Instant) {
        let limits = self.local().limits;
        match self.phase {
            Phase::Request => {
                if now >= self.phase_deadline {
                    if self.tls.as_ref().is_some_and(|t| t.handshaking()) {
                        self.tls_failed(tls::Failure::Timeout);
                    } else {
                        self.refuse(Refusal::Timeout);
                    }
                }
            }
            Phase::Open => {
                if let Some(since) = self.shared.over_budget_since.get() {
                    if now.duration_since(since) >= limits.slow_consumer_timeout {
                        self.slow_consumer();
                        return;
                    }
                }
                if let Some((at, code, reason)) = self.app_deadline() {
                    if now >= at {
                        self.start_close(code, &reason);
                        return;
                    }
                }
                // While the shard holds chat input back (cross-shard
                // congestion) the client may well be sending: its silence is
                // ours, not its own, so it does not count as idle.
                if self.endpoint == Endpoint::Chat && self.host.congested() {
                    self.last_rx = now;
                }
                let idle = now.saturating_duration_since(self.last_rx);
                if idle >= limits.idle_timeout {
                    self.start_close(code::GOING_AWAY, "idle timeout");
                } else if let Some(interval) = limits.ping_interval {
                    if idle >= interval && !self.ping_sent {
                        if let Some(ping) = self.session.ping(b"") {
                            self.ping_sent = true;
                            self.push(|out| ping.encode(out, None));
                            let m = self.m();
                            m.frames_out.inc();
                            m.pings_sent.inc();
                        }
                    }
                }
            }
            Phase::CloseSent | Phase::Linger | Phase::CloseAfterFlush => {
                if now >= self.phase_deadline {
                    // The peer did not finish the close handshake (or did
                    // not read our reply) in time: drop the socket.
                    self.phase = Phase::CloseAfterFlush;
                    self.shared.discard();
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
            self.local().id,
            self.queued()
        );
        self.start_close(
            code::POLICY_VIOLATION,
            "slow consumer: outbound budget exceeded",
        );
        // Read nothing more: the socket goes once flushed or at the deadline.
        self.phase = Phase::CloseAfterFlush;
    }

    /// Starts the slow-consumer clock when the queue goes over budget.
    fn track_budget(&mut self) {
        let over = self.queued() > self.local().limits.outbound_budget_bytes;
        match (over, self.shared.over_budget_since.get()) {
            (true, None) => {
                self.shared
                    .over_budget_since
                    .set(Some(self.local().clock.get()));
                self.rearm();
            }
            (false, Some(_)) => self.shared.over_budget_since.set(None),
            _ => {}
        }
    }

    /// Tells the sweeper when this connection next needs its timers checked.
    fn rearm(&self) {
        let limits = &self.local().limits;
        let deadline = match self.phase {
            Phase::Open => {
                let mut d = self.last_rx + limits.idle_timeout;
                if let (Some(interval), false) = (limits.ping_interval, self.ping_sent) {
                    d = d.min(self.last_rx + interval);
                }
                if let Some(since) = self.shared.over_budget_since.get() {
                    d = d.min(since + limits.slow_consumer_timeout);
                }
                if let Some((at, ..)) = self.app_deadline() {
                    d = d.min(at);
                }
                d
            }
            _ => self.phase_deadline,
        };
        self.shared.deadline.set(deadline);
    }

    /// The client's address, asked of the kernel (once, at the upgrade).
    fn peer(&self) -> Option<std::net::IpAddr> {
        let addr = rustix::net::getpeername(&self.socket).ok()??;
        std::net::SocketAddr::try_from(addr)
            .ok()
            .map(|a| a.ip().to_canonical())
    }

    fn app_deadline(&self) -> Option<(Instant, u16, Reason)> {
        self.shared.app.borrow().as_deref().and_then(H::deadline)
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
