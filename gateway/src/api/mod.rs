//! The server API: HTTP/1.1 + JSON for the application's backend
//! (`--api-listen`), on a thread of its own.
//!
//! hyper serves the requests on one tokio current-thread runtime; every
//! call is checked there (key, JSON, names, sizes) and handed to the shard
//! that homes its room or user as a [`Call`], through that shard's inbox,
//! exactly as the storage and mesh threads hand their work over. The shard
//! acts as a connection would: it sends the homes the same requests a
//! client's frames become, under a [`ConnRef`](corecast_router::message::ConnRef)
//! of its own API key range, and the answer frame the homes send back to
//! that reference (from this node or another) completes the call. So a call
//! on any node of a cluster reaches the room's home node or the user's
//! nodes by the paths client frames take. See docs/api.md.
//!
//! # Invariants
//! - Nothing reaches a shard before it is checked: a call that is refused
//!   (400, 401, 404, 405, 413, 429) changes nothing anywhere.
//! - Bounded: at most `max_in_flight` calls wait for shards (more are 429),
//!   request bodies are read up to `max_body_bytes` (more is 413), and a
//!   call waits at most `timeout` (then 503; a publish may still have been
//!   sequenced, so the client retries with the same `id`).

mod http;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use corecast_router::{homes::UserAction, store::Query};

use crate::{inbox::Inbox, lifecycle::NodeState, metrics::ShardMetrics};

pub use http::{payload, DISCONNECT_CODE};

/// Most rooms one `broadcast` call publishes to.
pub const MAX_BROADCAST_ROOMS: usize = 1000;

/// The API's settings, validated from the configuration.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub listen: SocketAddr,
    /// Accepted keys (`Authorization: apikey <key>`).
    pub keys: Vec<Box<[u8]>>,
    /// Largest request body read, in bytes.
    pub max_body_bytes: usize,
    /// Largest direct message `body` (the chat's `--max-body-bytes`); a
    /// room's comes from its namespace.
    pub max_message_body_bytes: usize,
    /// The rooms' namespaces (their `max_body_bytes`).
    pub namespaces: corecast_router::namespace::Namespaces,
    /// Most messages one history call returns (from `--history-size`, at
    /// most 1000).
    pub history_max_limit: usize,
    /// Longest a call waits for its answer.
    pub timeout: Duration,
    /// Calls that may wait for shards at once.
    pub max_in_flight: usize,
    /// Most rooms in one broadcast.
    pub max_broadcast_rooms: usize,
}

/// What a call asks a shard to do.
#[derive(Debug)]
pub enum Op {
    /// Publish to a room as `from` (sent to the room's home shard).
    Publish {
        room: Arc<str>,
        from: Arc<str>,
        id: Box<str>,
        body: Box<str>,
    },
    /// A direct message (sent to the recipient's home shard).
    Dm {
        to: Arc<str>,
        from: Arc<str>,
        id: Box<str>,
        body: Box<str>,
    },
    Presence {
        room: Arc<str>,
    },
    History {
        room: Arc<str>,
        query: Query,
    },
    /// Disconnect or unsubscribe every connection of a user.
    Act {
        user: Arc<str>,
        action: UserAction,
    },
    /// The rooms with members on the shard whose names start so.
    Rooms {
        prefix: Box<str>,
    },
    /// The live nodes, as the shard knows them.
    Nodes,
}

/// What a shard answers a call.
#[derive(Debug)]
pub enum Reply {
    /// The JSON payload of the frame the homes answered (an ack, a
    /// presence or history answer, an error).
    Frame(Vec<u8>),
    /// Rooms with local members, and their member connections on the shard.
    Rooms(Vec<(Arc<str>, u64)>),
    /// The live nodes' ids; `None` outside a cluster.
    Nodes(Option<Vec<Arc<str>>>),
}

/// Where a shard sends a call's reply; dropping it unanswered answers the
/// call 503.
#[derive(Debug)]
pub struct Answer(tokio::sync::oneshot::Sender<Reply>);

impl Answer {
    pub fn send(self, reply: Reply) {
        let _ = self.0.send(reply);
    }

    /// Answers with a WebSocket frame's payload.
    pub fn frame(self, frame: &[u8]) {
        self.send(Reply::Frame(payload(frame).to_vec()));
    }

    /// The caller stopped waiting (timed out, went away).
    pub fn abandoned(&self) -> bool {
        self.0.is_closed()
    }
}

/// A call for a shard.
#[derive(Debug)]
pub struct Call {
    pub op: Op,
    pub answer: Answer,
}

/// The endpoints, as the metrics name them (`other`: no such endpoint).
pub(crate) const ENDPOINTS: [&str; 11] = [
    "publish",
    "broadcast",
    "dm",
    "disconnect",
    "unsubscribe",
    "presence",
    "presence_stats",
    "history",
    "rooms",
    "info",
    "other",
];

/// The statuses the API answers with.
pub(crate) const STATUSES: [u16; 10] = [200, 400, 401, 404, 405, 408, 413, 429, 500, 503];

/// What the API counts (written by the API thread, read by `/metrics`).
#[derive(Default)]
pub struct ApiMetrics {
    requests: [[AtomicU64; STATUSES.len()]; ENDPOINTS.len()],
    /// Calls waiting for shards now (gauge).
    pub(crate) in_flight: AtomicUsize,
}

impl ApiMetrics {
    pub(crate) fn answered(&self, endpoint: usize, status: u16) {
        let s = STATUSES.iter().position(|&x| x == status).unwrap_or(8);
        self.requests[endpoint][s].fetch_add(1, Relaxed);
    }
}

/// The shards' inboxes for calls; shard `i` drains `inbox(i)`.
#[derive(Default)]
pub struct Calls {
    inboxes: Box<[Inbox<Call>]>,
    pub metrics: ApiMetrics,
}

impl Calls {
    pub fn new(shards: usize) -> Calls {
        Calls {
            inboxes: (0..shards).map(|_| Inbox::new()).collect(),
            metrics: ApiMetrics::default(),
        }
    }

    /// The API's series for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        let m = &self.metrics;
        let name = "corecast_api_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Server API requests answered, by endpoint and HTTP status.\n# TYPE {name} counter"
        );
        for (e, endpoint) in ENDPOINTS.iter().enumerate() {
            for (s, status) in STATUSES.iter().enumerate() {
                let n = m.requests[e][s].load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "{name}{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                    );
                }
            }
        }
        let name = "corecast_api_calls_in_flight";
        let _ = writeln!(
            out,
            "# HELP {name} Server API calls waiting for the shards' answers.\n# TYPE {name} gauge\n{name} {}",
            m.in_flight.load(Relaxed)
        );
    }

    pub fn inbox(&self, shard: usize) -> &Inbox<Call> {
        &self.inboxes[shard]
    }

    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }
}

/// What the API thread reads of the node.
pub struct NodeView {
    pub node_id: Arc<str>,
    pub metrics: Arc<[ShardMetrics]>,
    pub state: Arc<NodeState>,
}

/// The running API thread.
pub struct ApiThread {
    stop: Arc<tokio::sync::Notify>,
    handle: JoinHandle<()>,
}

impl ApiThread {
    /// Stops serving (open requests are dropped) and joins the thread.
    pub fn stop(self) {
        self.stop.notify_one();
        if self.handle.join().is_err() {
            log::error!("the API thread panicked");
        }
    }
}

/// Binds the API's listener (so a port clash stops the gateway at start).
pub fn bind(settings: &ApiSettings) -> Result<std::net::TcpListener, crate::Error> {
    let err = |e| {
        crate::Error::bind(
            settings.listen,
            e,
            " (is another gateway running? pass --api-listen)",
        )
    };
    let listener = std::net::TcpListener::bind(settings.listen).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// Starts serving the API on `listener`.
pub fn start(
    settings: ApiSettings,
    listener: std::net::TcpListener,
    calls: Arc<Calls>,
    node: NodeView,
) -> std::io::Result<ApiThread> {
    let stop = Arc::new(tokio::sync::Notify::new());
    let ctx = http::Ctx::new(settings, calls, node);
    let stopped = stop.clone();
    let handle = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || http::run(ctx, listener, stopped))?;
    Ok(ApiThread { stop, handle })
}
