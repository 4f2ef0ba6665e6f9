//! tokio-tungstenite chat broadcast server: the peer corecast's `/ws` fan-out
//! is measured against (`benches/fanout-vs-peer.sh`, issue 3).
//!
//! It speaks the part of `corecast.v1` (docs/protocol.md) that `loadgen
//! chat` uses, with corecast's semantics:
//! - `GET /ws`; the subprotocol `corecast.v1` is selected when offered, and a
//!   client offering only other subprotocols is refused with 400.
//! - Every connection is authenticated at once as user `anon-<n>` and gets
//!   `welcome`. A `?token=` is accepted and **not verified** (not even
//!   read): JWT verification is not what this benchmark measures. corecast
//!   does verify a token when one comes, so the benchmark runs corecast with
//!   `--allow-anonymous` and loadgen without `--jwt-secret`: neither server
//!   checks a signature.
//! - `join`: the room's members and last seq live behind one
//!   `std::sync::Mutex` per room. The joiner is added and `joined` (with the
//!   room's last seq and member count) is queued to it under that lock, so
//!   every message sequenced after the join is queued after `joined`.
//! - `publish`: under the room's lock the next gapless seq is assigned, the
//!   `msg` frame (type, room, seq, from, id, ts, body; corecast's fields) is
//!   serialized once, and the same bytes are queued to every member; then
//!   `ack` goes to the publisher. A retry of an id the same user published
//!   recently (the last 4096 ids per room, for 300 s: corecast's window) is
//!   not delivered again and gets the original ack with `"duplicate":true`.
//! - `leave` (answered `left`), `connect` (`already_authenticated`), and
//!   `error` frames for bad requests with corecast's codes; a binary message
//!   closes with 1003. Not implemented, because `loadgen chat` does not use
//!   them: `dm` and `presence` (answered `bad_request`), presence events,
//!   per-connection rate limits, idle and handshake timeouts.
//!
//! Order: a member's frames go through one FIFO queue, and a room's
//! messages are queued under the room's lock in seq order, so every member
//! receives a room's messages in seq order, each once.
//!
//! Configured as a careful tokio user would deploy it (the same choices as
//! `src/echo.rs`):
//! - TCP_NODELAY on every accepted socket; a 4 KiB read buffer; a write
//!   buffer cap that bounds a slow reader's backlog inside tungstenite.
//! - The socket is split: the connection's task reads and handles client
//!   frames; a writer task per connection drains a bounded
//!   `tokio::sync::mpsc` queue of ready `Message`s. A message is serialized
//!   once into `Utf8Bytes` and every member's queue gets a clone of the same
//!   bytes (a reference count, not a copy). The writer feeds every message
//!   already queued and flushes once per batch.
//! - A member whose queue is full ([`OUTBOUND_MESSAGES`]) is a slow consumer:
//!   it is removed from the room on the spot and its connection is dropped
//!   (TCP closed without a close frame: it is not reading anyway). corecast
//!   closes such a client with 1008 at a comparable backlog.
//!
//! Runtime: tokio's multi-thread scheduler with `--threads` workers (default:
//! one per available CPU); for the side-by-side benchmark the process is
//! pinned to one core with `taskset` and runs `--threads 1`, matching
//! corecast's `--shards 1 --cpus N`. `--current-thread` runs tokio's
//! single-threaded scheduler instead.
//!
//! SIGTERM or SIGINT exits at once with status 0 (no drain: a benchmark peer
//! has nothing to hand over).

#![forbid(unsafe_code)]

use std::{
    borrow::Cow,
    collections::{hash_map::Entry, HashMap, VecDeque},
    fmt::Write as _,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use futures_util::{
    stream::{SplitSink, SplitStream},
    SinkExt as _, StreamExt as _,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use tls::Stream;
use tokio::{
    net::TcpListener,
    sync::{
        mpsc::{self, error::TrySendError},
        Notify,
    },
};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::{
    tungstenite::{
        handshake::server::{ErrorResponse, Request, Response},
        http::{header::SEC_WEBSOCKET_PROTOCOL, HeaderValue, StatusCode},
        protocol::{frame::coding::CloseCode, CloseFrame, WebSocketConfig},
        Error as WsError, Message, Utf8Bytes,
    },
    WebSocketStream,
};

mod tls;

/// The subprotocol clients may offer.
const SUBPROTOCOL: &str = "corecast.v1";

/// Largest client message (and frame): 1 MiB, corecast's default
/// `--max-message-bytes`. Guards memory against a client that announces a
/// huge message.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Read buffer per connection: 4 KiB, as in the echo peer. tungstenite's
/// 128 KiB default would cost 32x the memory per idle connection.
const READ_BUFFER_BYTES: usize = 4096;

/// Buffered output before tungstenite writes to the socket without a flush:
/// 64 KiB. A member's batch is many fan-out frames (unlike an echo batch);
/// a 4 KiB threshold would split it into one write(2) per ~16 messages.
/// tungstenite's out buffer grows only as far as a batch needs.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

/// Most output tungstenite may buffer for one connection: the threshold
/// plus one maximal frame and slack for a close frame. Past it a write fails
/// (`WriteBufferFull`) instead of growing without bound. The queue in front
/// of it ([`OUTBOUND_MESSAGES`]) is the real bound.
const MAX_WRITE_BUFFER_BYTES: usize = WRITE_BUFFER_BYTES + MAX_MESSAGE_BYTES + 4096;

/// Messages one connection may have queued for its writer. Full means the
/// client does not read fast enough: it is dropped (see the module docs).
/// At the benchmark's ~250-byte messages this is ~4 MiB, the backlog at
/// which corecast closes a slow consumer at once (4x its 1 MiB
/// `--outbound-budget-bytes`). The queue's memory grows only with use.
const OUTBOUND_MESSAGES: usize = 16384;

/// Most messages a writer takes from its queue per batch (one flush each).
const WRITE_BATCH: usize = 1024;

/// Largest publish `body`, in bytes: corecast's default `--max-body-bytes`.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest room name, in bytes.
const MAX_ROOM_BYTES: usize = 128;

/// Longest client message id, in bytes.
const MAX_ID_BYTES: usize = 64;

/// Rooms one connection may be in: corecast's default
/// `--max-rooms-per-connection`.
const MAX_ROOMS_PER_CONNECTION: usize = 64;

/// Client message ids remembered per room for duplicate detection, and for
/// how long: corecast's window (`corecast_router::room`).
const RECENT_IDS_PER_ROOM: usize = 4096;
const RECENT_IDS_TTL: Duration = Duration::from_secs(300);

/// How long the writer may take to send what is queued and a close frame
/// after the reader stopped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// tokio-tungstenite chat broadcast server, the peer for corecast's fan-out benchmark.
#[derive(Parser, Debug)]
#[command(name = "tokio-tungstenite-broadcast", version)]
struct Config {
    /// Address to listen on; port 0 picks a free port (printed on stderr).
    #[arg(long, env = "PEER_LISTEN", default_value = "127.0.0.1:9003")]
    listen: SocketAddr,

    /// Worker threads of the multi-thread runtime. Default: available CPUs
    /// (as tokio would pick; honours taskset).
    #[arg(long, env = "PEER_THREADS")]
    threads: Option<usize>,

    /// Use tokio's current-thread scheduler (one thread in all) instead of
    /// the multi-thread one; --threads must then be absent.
    #[arg(long, env = "PEER_CURRENT_THREAD", conflicts_with = "threads")]
    current_thread: bool,

    #[command(flatten)]
    tls: tls::TlsArgs,
}

fn main() -> ExitCode {
    let config = Config::parse();
    let mut builder = if config.current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let threads = match config.threads {
            Some(0) => {
                eprintln!("--threads 0: give at least 1 worker thread");
                return ExitCode::from(2);
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match config.tls.acceptor() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(serve(config.listen, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Accepts until SIGTERM or SIGINT.
async fn serve(listen: SocketAddr, tls: Option<TlsAcceptor>) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};

    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e} (is another server running? pass --listen)"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("local address of {listen}: {e}"))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    eprintln!("tokio-tungstenite-broadcast listening on {local}");

    // On the multi-thread runtime `block_on` runs this future on the main
    // thread, not on a worker: spawn the accept loop so accepting shares the
    // worker (and its core) with the connections, as in corecast's shard.
    let accept = tokio::spawn(accept_loop(listener, Arc::new(Hub::default()), tls));
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = accept => return Err(match r {
            Ok(e) => e,
            Err(e) => format!("accept loop: {e}"),
        }),
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, hub: Arc<Hub>, tls: Option<TlsAcceptor>) -> String {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let (hub, tls) = (hub.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls::accept(stream, tls.as_ref()).await {
                        Ok(stream) => connection(stream, config, hub).await,
                        Err(e) if tls.is_none() => eprintln!("TCP_NODELAY: {e}"),
                        // A failed TLS handshake is the client's problem.
                        Err(_) => {}
                    }
                });
            }
            // Out of descriptors or memory, or the peer left before accept:
            // all transient for a listener; back off briefly, keep accepting.
            Err(e) if is_transient_accept_error(&e) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return format!("accept: {e}"),
        }
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux: out of descriptors or memory
    // for now, not for good.
    const RESOURCE_ERRNOS: [i32; 4] = [24, 23, 105, 12];
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e
        .raw_os_error()
        .is_some_and(|n| RESOURCE_ERRNOS.contains(&n))
}

// ---------------------------------------------------------------------------
// Shared state

/// Every room of the server, and the connection counter.
#[derive(Default)]
struct Hub {
    /// Rooms by name. Locked only to find or create a room at a join; rooms
    /// are kept when empty, so a room's sequence survives its members (as
    /// corecast's does).
    rooms: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    next_conn: AtomicU64,
}

struct Room {
    name: Arc<str>,
    /// Held while a seq is assigned and the message queued to every member,
    /// and while a member is added or removed: so seqs have no gaps, and
    /// every member's queue gets the room's messages in seq order.
    state: Mutex<RoomState>,
}

#[derive(Default)]
struct RoomState {
    last_seq: u64,
    members: Vec<Arc<ConnHandle>>,
    /// Recent `(user, id)` publishes and their seqs, for retries.
    recent: HashMap<(Arc<str>, Box<str>), u64>,
    /// The same keys, oldest first, with when they were sequenced.
    recent_order: VecDeque<(Arc<str>, Box<str>, Instant)>,
}

/// What a publish became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sequenced {
    New(u64),
    /// A retry of an id already sequenced with this seq.
    Duplicate(u64),
}

impl RoomState {
    /// Assigns the next seq, unless `(user, id)` was sequenced recently. An
    /// empty id is never deduplicated.
    fn sequence(&mut self, user: &Arc<str>, id: &str, now: Instant) -> Sequenced {
        while let Some((_, _, at)) = self.recent_order.front() {
            if now.duration_since(*at) < RECENT_IDS_TTL {
                break;
            }
            if let Some((u, i, _)) = self.recent_order.pop_front() {
                self.recent.remove(&(u, i));
            }
        }
        if id.is_empty() {
            self.last_seq += 1;
            return Sequenced::New(self.last_seq);
        }
        match self.recent.entry((user.clone(), Box::from(id))) {
            Entry::Occupied(e) => Sequenced::Duplicate(*e.get()),
            Entry::Vacant(e) => {
                self.last_seq += 1;
                e.insert(self.last_seq);
                if self.recent_order.len() == RECENT_IDS_PER_ROOM {
                    if let Some((u, i, _)) = self.recent_order.pop_front() {
                        self.recent.remove(&(u, i));
                    }
                }
                self.recent_order
                    .push_back((user.clone(), Box::from(id), now));
                Sequenced::New(self.last_seq)
            }
        }
    }

    /// Queues `frame` to every member; a member whose queue is full is
    /// removed and told to drop its connection.
    fn broadcast(&mut self, frame: &Message) {
        self.members.retain(|m| match m.tx.try_send(frame.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                m.kill.notify_one();
                false
            }
            // The connection is going away and removes itself.
            Err(TrySendError::Closed(_)) => true,
        });
    }

    fn remove(&mut self, conn: u64) {
        if let Some(i) = self.members.iter().position(|m| m.id == conn) {
            self.members.swap_remove(i);
        }
    }
}

/// Locks a mutex even if a thread panicked holding it: the state it guards
/// is consistent between statements, and a benchmark peer keeps serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How rooms reach a connection.
struct ConnHandle {
    id: u64,
    /// The writer's queue; bounded by [`OUTBOUND_MESSAGES`], full = drop.
    tx: mpsc::Sender<Message>,
    /// Tells the connection's reader to drop the connection (slow consumer).
    kill: Notify,
}

/// The client does not read fast enough: drop its connection.
#[derive(Debug, Clone, Copy)]
struct SlowConsumer;

// ---------------------------------------------------------------------------
// Connections

/// Selects `corecast.v1` when offered; refuses other paths than `/ws`, and
/// clients that offer only other subprotocols.
// The signature is tungstenite's `Callback`; its error type is not ours to box.
#[allow(clippy::result_large_err)]
fn check_upgrade(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != "/ws" {
        return Err(refuse(StatusCode::NOT_FOUND, "this server serves /ws only"));
    }
    let mut offered = req
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .peekable();
    if offered.peek().is_some() {
        if !offered.any(|p| p == SUBPROTOCOL) {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "offer the subprotocol corecast.v1",
            ));
        }
        resp.headers_mut().insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    Ok(resp)
}

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    r
}

async fn connection(stream: Stream, config: WebSocketConfig, hub: Arc<Hub>) {
    let ws =
        match tokio_tungstenite::accept_hdr_async_with_config(stream, check_upgrade, Some(config))
            .await
        {
            Ok(ws) => ws,
            // A bad upgrade request is the client's problem; nothing to report.
            Err(_) => return,
        };
    let (sink, stream) = ws.split();
    let (tx, rx) = mpsc::channel(OUTBOUND_MESSAGES);
    let n = hub.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
    let conn = Arc::new(ConnHandle {
        id: n,
        tx,
        kill: Notify::new(),
    });
    let mut writer = tokio::spawn(write_loop(sink, rx));
    let mut session = Session {
        hub,
        conn,
        user: Arc::from(format!("anon-{n}")),
        rooms: Vec::new(),
    };
    let slow = session.run(stream).await.is_err();
    session.leave_all();
    // The rooms no longer hold the queue: once the session's handle is gone
    // the writer sends what is queued, closes and ends.
    drop(session);
    // A slow consumer's socket is not being read: do not wait on it.
    let finished = !slow
        && tokio::time::timeout(CLOSE_TIMEOUT, &mut writer)
            .await
            .is_ok();
    if !finished {
        writer.abort();
    }
}

/// Sends what the connection's queue holds: every message already queued
/// is fed and the batch flushed once. Ends when the queue is closed (the
/// session ended) or the socket fails.
async fn write_loop(
    mut sink: SplitSink<WebSocketStream<Stream>, Message>,
    mut rx: mpsc::Receiver<Message>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        for m in batch.drain(..) {
            if sink.feed(m).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

/// One connection's chat state; owned by its reader task.
struct Session {
    hub: Arc<Hub>,
    conn: Arc<ConnHandle>,
    user: Arc<str>,
    rooms: Vec<Arc<Room>>,
}

impl Session {
    /// Reads and handles client frames until the client closes, the
    /// connection fails, or it turns out a slow consumer.
    async fn run(
        &mut self,
        mut stream: SplitStream<WebSocketStream<Stream>>,
    ) -> Result<(), SlowConsumer> {
        self.reply(frame::welcome(&self.user, &format!("0.{}", self.conn.id)))?;
        let conn = self.conn.clone();
        loop {
            let next = tokio::select! {
                biased;
                _ = conn.kill.notified() => return Err(SlowConsumer),
                next = stream.next() => next,
            };
            let close = match next {
                None => return Ok(()),
                Some(Ok(Message::Text(text))) => {
                    self.on_text(text.as_bytes())?;
                    continue;
                }
                Some(Ok(Message::Binary(_))) => CloseFrame {
                    code: CloseCode::Unsupported,
                    reason: "binary frames are not part of corecast.v1".into(),
                },
                // tungstenite answers pings and closes itself; a pong needs
                // no answer; raw frames are never returned by a read.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_)))
                | Some(Ok(Message::Frame(_))) => continue,
                Some(Err(e)) => match close_code(e) {
                    Some(code) => CloseFrame {
                        code,
                        reason: "".into(),
                    },
                    None => return Ok(()),
                },
            };
            // Tell the client which rule it broke (RFC 6455 §7.4.1); the
            // writer sends it after what is queued.
            self.reply(Message::Close(Some(close)))?;
            return Ok(());
        }
    }

    /// Queues a frame for this connection; a full queue makes it a slow
    /// consumer.
    fn reply(&self, frame: Message) -> Result<(), SlowConsumer> {
        match self.conn.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SlowConsumer),
            // The writer is gone: the socket failed; the read side sees it next.
            Err(TrySendError::Closed(_)) => Ok(()),
        }
    }

    fn error(
        &self,
        code: ErrorCode,
        id: Option<&str>,
        room: Option<&str>,
    ) -> Result<(), SlowConsumer> {
        self.reply(frame::error(code, id, room))
    }

    fn on_text(&mut self, text: &[u8]) -> Result<(), SlowConsumer> {
        let Ok(f) = ClientFrame::parse(text) else {
            return self.error(ErrorCode::BadRequest, None, None);
        };
        match f {
            ClientFrame::Connect => self.error(ErrorCode::AlreadyAuthenticated, None, None),
            ClientFrame::Unsupported => self.reply(frame::unsupported()),
            ClientFrame::Join { room } => self.join(&room),
            ClientFrame::Leave { room } => {
                let Some(i) = self.rooms.iter().position(|r| *r.name == *room) else {
                    return self.error(ErrorCode::NotJoined, None, Some(&room));
                };
                let r = self.rooms.swap_remove(i);
                lock(&r.state).remove(self.conn.id);
                self.reply(frame::left(&r.name))
            }
            ClientFrame::Publish { room, id, body } => {
                let id = id.as_deref().unwrap_or("");
                if id.len() > MAX_ID_BYTES {
                    return self.error(ErrorCode::InvalidId, None, Some(&room));
                }
                let Some(r) = self.rooms.iter().find(|r| *r.name == *room) else {
                    return self.error(ErrorCode::NotJoined, Some(id), Some(&room));
                };
                if body.get().len() > MAX_BODY_BYTES {
                    return self.error(ErrorCode::BodyTooLarge, Some(id), Some(&room));
                }
                let ack = {
                    let mut state = lock(&r.state);
                    match state.sequence(&self.user, id, Instant::now()) {
                        Sequenced::New(seq) => {
                            let msg =
                                frame::message(&r.name, seq, &self.user, id, now_ms(), body.get());
                            state.broadcast(&msg);
                            frame::ack(id, &r.name, seq, false)
                        }
                        Sequenced::Duplicate(seq) => frame::ack(id, &r.name, seq, true),
                    }
                };
                self.reply(ack)
            }
        }
    }

    fn join(&mut self, room: &str) -> Result<(), SlowConsumer> {
        if !valid_room(room) {
            return self.error(ErrorCode::InvalidRoom, None, None);
        }
        if self.rooms.iter().any(|r| *r.name == *room) {
            return self.error(ErrorCode::AlreadyJoined, None, Some(room));
        }
        if self.rooms.len() >= MAX_ROOMS_PER_CONNECTION {
            return self.error(ErrorCode::TooManyRooms, None, Some(room));
        }
        let r = {
            let mut rooms = lock(&self.hub.rooms);
            match rooms.get(room) {
                Some(r) => r.clone(),
                None => {
                    let name: Arc<str> = Arc::from(room);
                    let r = Arc::new(Room {
                        name: name.clone(),
                        state: Mutex::default(),
                    });
                    rooms.insert(name, r.clone());
                    r
                }
            }
        };
        let mut state = lock(&r.state);
        state.members.push(self.conn.clone());
        // Under the room's lock: every message sequenced after this one is
        // queued after `joined`.
        let joined = frame::joined(&r.name, state.last_seq, state.members.len() as u64);
        if let Err(slow) = self.reply(joined) {
            state.remove(self.conn.id);
            return Err(slow);
        }
        drop(state);
        self.rooms.push(r);
        Ok(())
    }

    fn leave_all(&mut self) {
        for r in self.rooms.drain(..) {
            lock(&r.state).remove(self.conn.id);
        }
    }
}

/// The close code for a failed read, or `None` when the connection is just
/// gone.
fn close_code(e: WsError) -> Option<CloseCode> {
    match e {
        WsError::Protocol(_) => Some(CloseCode::Protocol),
        WsError::Utf8(_) => Some(CloseCode::Invalid),
        WsError::Capacity(_) => Some(CloseCode::Size),
        WsError::ConnectionClosed | WsError::AlreadyClosed => None,
        WsError::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            None
        }
        e => {
            eprintln!("connection: {e}");
            None
        }
    }
}

/// Milliseconds since the Unix epoch, for message timestamps.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Is `room` a valid room name (1-128 bytes of letters, digits and
/// `_ - . : @ /`)?
fn valid_room(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_BYTES
        && room.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/')
        })
}

// ---------------------------------------------------------------------------
// Wire format

/// A client frame this server handles.
#[derive(Debug)]
enum ClientFrame<'a> {
    Connect,
    Join {
        room: Cow<'a, str>,
    },
    Leave {
        room: Cow<'a, str>,
    },
    Publish {
        room: Cow<'a, str>,
        id: Option<Cow<'a, str>>,
        body: &'a RawValue,
    },
    /// A valid `dm` or `presence`, which this peer does not implement.
    Unsupported,
}

/// Every field any client frame has, parsed flat (as corecast does: serde's
/// internally tagged enums buffer, which a borrowed `RawValue` cannot go
/// through) and then checked per type.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flat<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    body: Body<'a>,
}

/// A JSON value kept as its text; `null` is a value, only a missing field
/// is `None`.
#[derive(Default)]
struct Body<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Body<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'de RawValue>::deserialize(d).map(|r| Body(Some(r)))
    }
}

/// Not a valid `corecast.v1` client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BadFrame;

impl<'a> ClientFrame<'a> {
    fn parse(text: &'a [u8]) -> Result<ClientFrame<'a>, BadFrame> {
        let f: Flat<'a> = serde_json::from_slice(text).map_err(|_| BadFrame)?;
        let need = |v: Option<Cow<'a, str>>| v.ok_or(BadFrame);
        Ok(match &*f.kind {
            "connect" => {
                need(f.token)?;
                ClientFrame::Connect
            }
            "join" => ClientFrame::Join {
                room: need(f.room)?,
            },
            "leave" => ClientFrame::Leave {
                room: need(f.room)?,
            },
            "publish" => ClientFrame::Publish {
                room: need(f.room)?,
                id: f.id,
                body: f.body.0.ok_or(BadFrame)?,
            },
            "dm" => {
                need(f.to)?;
                f.body.0.ok_or(BadFrame)?;
                ClientFrame::Unsupported
            }
            "presence" => {
                need(f.room)?;
                ClientFrame::Unsupported
            }
            _ => return Err(BadFrame),
        })
    }
}

/// Why a request was refused (corecast's codes that apply here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorCode {
    BadRequest,
    InvalidRoom,
    InvalidId,
    NotJoined,
    AlreadyJoined,
    TooManyRooms,
    BodyTooLarge,
    AlreadyAuthenticated,
}

impl ErrorCode {
    fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
        }
    }

    fn message(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "not a corecast.v1 frame: see docs/protocol.md",
            ErrorCode::InvalidRoom => {
                "room names are 1-128 bytes of letters, digits and _ - . : @ /"
            }
            ErrorCode::InvalidId => "id must be at most 64 bytes",
            ErrorCode::NotJoined => "join the room first",
            ErrorCode::AlreadyJoined => "already joined this room",
            ErrorCode::TooManyRooms => "too many rooms on this connection: leave one first",
            ErrorCode::BodyTooLarge => "body larger than the server allows",
            ErrorCode::AlreadyAuthenticated => "already authenticated",
        }
    }
}

/// Server frames, each serialized once into a text `Message` (cloning it
/// shares the bytes).
mod frame {
    use super::*;

    /// A JSON object written piece by piece.
    struct Json(String);

    impl Json {
        fn new(capacity: usize) -> Json {
            Json(String::with_capacity(capacity))
        }

        fn raw(&mut self, s: &str) -> &mut Self {
            self.0.push_str(s);
            self
        }

        /// A JSON string literal, escaped.
        fn string(&mut self, s: &str) -> &mut Self {
            if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
                self.0.push('"');
                self.0.push_str(s);
                self.0.push('"');
            } else {
                // A str always serializes.
                self.0
                    .push_str(&serde_json::to_string(s).unwrap_or_default());
            }
            self
        }

        fn number(&mut self, n: u64) -> &mut Self {
            let _ = write!(self.0, "{n}");
            self
        }

        fn finish(&mut self) -> Message {
            Message::Text(Utf8Bytes::from(std::mem::take(&mut self.0)))
        }
    }

    pub(super) fn welcome(user: &str, conn: &str) -> Message {
        Json::new(64 + user.len())
            .raw(r#"{"type":"welcome","user":"#)
            .string(user)
            .raw(r#","conn":"#)
            .string(conn)
            .raw("}")
            .finish()
    }

    pub(super) fn joined(room: &str, seq: u64, members: u64) -> Message {
        Json::new(64 + room.len())
            .raw(r#"{"type":"joined","room":"#)
            .string(room)
            .raw(r#","seq":"#)
            .number(seq)
            .raw(r#","members":"#)
            .number(members)
            .raw("}")
            .finish()
    }

    pub(super) fn left(room: &str) -> Message {
        Json::new(32 + room.len())
            .raw(r#"{"type":"left","room":"#)
            .string(room)
            .raw("}")
            .finish()
    }

    pub(super) fn message(
        room: &str,
        seq: u64,
        from: &str,
        id: &str,
        ts_ms: u64,
        body: &str,
    ) -> Message {
        Json::new(96 + room.len() + from.len() + id.len() + body.len())
            .raw(r#"{"type":"msg","room":"#)
            .string(room)
            .raw(r#","seq":"#)
            .number(seq)
            .raw(r#","from":"#)
            .string(from)
            .raw(r#","id":"#)
            .string(id)
            .raw(r#","ts":"#)
            .number(ts_ms)
            .raw(r#","body":"#)
            .raw(body)
            .raw("}")
            .finish()
    }

    pub(super) fn ack(id: &str, room: &str, seq: u64, duplicate: bool) -> Message {
        let mut j = Json::new(80 + id.len() + room.len());
        j.raw(r#"{"type":"ack","id":"#)
            .string(id)
            .raw(r#","room":"#)
            .string(room)
            .raw(r#","seq":"#)
            .number(seq);
        if duplicate {
            j.raw(r#","duplicate":true"#);
        }
        j.raw("}").finish()
    }

    pub(super) fn error(code: ErrorCode, id: Option<&str>, room: Option<&str>) -> Message {
        let mut j = Json::new(128);
        j.raw(r#"{"type":"error","code":""#)
            .raw(code.as_str())
            .raw(r#"","message":"#)
            .string(code.message());
        if let Some(id) = id {
            j.raw(r#","id":"#).string(id);
        }
        if let Some(room) = room {
            j.raw(r#","room":"#).string(room);
        }
        j.raw("}").finish()
    }

    /// The answer to a valid `dm` or `presence`.
    pub(super) fn unsupported() -> Message {
        Json::new(128)
            .raw(r#"{"type":"error","code":"bad_request","message":"#)
            .string("dm and presence are not implemented by this benchmark peer")
            .raw("}")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(m: Message) -> serde_json::Value {
        match m {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("not a text message: {other:?}"),
        }
    }

    #[test]
    fn server_frames_are_corecast_json() {
        let v = json(frame::message(
            "lg-0",
            7,
            "al\"ice",
            "r.0-1",
            99,
            r#"{"t":1}"#,
        ));
        assert_eq!(
            v,
            serde_json::json!({"type":"msg","room":"lg-0","seq":7,"from":"al\"ice",
                "id":"r.0-1","ts":99,"body":{"t":1}})
        );
        let v = json(frame::ack("r.0-1", "lg-0", 7, true));
        assert_eq!(
            v,
            serde_json::json!({"type":"ack","id":"r.0-1","room":"lg-0","seq":7,"duplicate":true})
        );
        let v = json(frame::joined("lg-0", 41, 12));
        assert_eq!(
            v,
            serde_json::json!({"type":"joined","room":"lg-0","seq":41,"members":12})
        );
        let v = json(frame::error(ErrorCode::NotJoined, Some("x"), Some("r")));
        assert_eq!(
            (v["code"].as_str(), v["id"].as_str()),
            (Some("not_joined"), Some("x"))
        );
        for m in [
            frame::welcome("anon-1", "0.1"),
            frame::left("r"),
            frame::unsupported(),
        ] {
            json(m);
        }
    }

    #[test]
    fn client_frames_parse_and_refuse() {
        let cases: &[(&str, bool)] = &[
            (r#"{"type":"join","room":"lobby"}"#, true),
            (r#"{"type":"leave","room":"lobby"}"#, true),
            (
                r#"{"type":"publish","room":"lobby","id":"1","body":{"a":[1,2]}}"#,
                true,
            ),
            (r#"{"type":"publish","room":"lobby","body":null}"#, true),
            (r#"{"type":"connect","token":"t"}"#, true),
            (r#"{"type":"presence","room":"lobby"}"#, true),
            ("", false),
            ("[]", false),
            (r#"{"type":"nope"}"#, false),
            (r#"{"type":"join"}"#, false),
            (r#"{"type":"join","room":5}"#, false),
            (r#"{"type":"publish","room":"r"}"#, false),
            (r#"{"type":"join","room":"r","extra":1}"#, false),
        ];
        for (s, ok) in cases {
            assert_eq!(ClientFrame::parse(s.as_bytes()).is_ok(), *ok, "{s}");
        }
    }

    #[test]
    fn seqs_are_gapless_and_retries_deduplicated() {
        let mut r = RoomState::default();
        let now = Instant::now();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        assert_eq!(r.sequence(&a, "x", now), Sequenced::New(1));
        assert_eq!(
            r.sequence(&b, "x", now),
            Sequenced::New(2),
            "ids are per user"
        );
        assert_eq!(r.sequence(&a, "x", now), Sequenced::Duplicate(1));
        assert_eq!(r.sequence(&a, "", now), Sequenced::New(3));
        assert_eq!(
            r.sequence(&a, "", now),
            Sequenced::New(4),
            "no id, no dedup"
        );
        assert_eq!(r.sequence(&a, "x", now + RECENT_IDS_TTL), Sequenced::New(5));
        for i in 0..RECENT_IDS_PER_ROOM + 10 {
            r.sequence(&a, &i.to_string(), now + RECENT_IDS_TTL);
        }
        assert_eq!(r.recent.len(), RECENT_IDS_PER_ROOM);
        assert_eq!(r.recent_order.len(), RECENT_IDS_PER_ROOM);
    }

    #[test]
    fn room_names() {
        for (room, ok) in [
            ("lobby", true),
            ("team-1/general", true),
            ("", false),
            ("has space", false),
            (&*"x".repeat(129), false),
            (&*"x".repeat(128), true),
        ] {
            assert_eq!(valid_room(room), ok, "{room:?}");
        }
    }
}
