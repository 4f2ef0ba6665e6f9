//! The cross-node mesh: one thread per node owns the ZeroMQ sockets (they
//! block and are not thread-safe) and bridges them to the shards.
//!
//! - Shards hand messages to the thread over a bounded crossbeam channel
//!   ([`Mesh::wire`]; a full channel drops the message, counted, exactly as
//!   a PUB socket at its high-water mark would) and subscription changes
//!   over an unbounded one that never drops ([`Mesh::send`]), and wake it
//!   through a socket pair the thread polls together with its ZeroMQ
//!   sockets.
//! - The thread answers each shard through its [`Inbox`]: messages from
//!   other nodes, routed to the shard that owns their room or user, and the
//!   set of live nodes whenever it changes.
//! - PUB is bound on `--mesh-bind`; one SUB socket per peer address, so the
//!   thread knows which peer each message came from. Peers come from
//!   `--peers` and, with Redis, from the node registry ([`registry`]).
//! - Liveness: every node publishes a heartbeat naming the nodes it hears.
//!   A peer is live while this node hears it and it hears this node; room
//!   homes are a rendezvous hash over the live nodes.
//!
//! What the messages mean is the chat module's business; see
//! docs/cluster.md for the protocol between nodes and its guarantees.

mod exposition;
mod registry;
mod thread;
pub mod wire;

use std::{
    io::Write as _,
    os::unix::net::UnixStream,
    sync::{
        atomic::{
            AtomicBool, AtomicU64,
            Ordering::{Relaxed, SeqCst},
        },
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::{Sender, TrySendError};

use crate::inbox::Inbox;
pub use corecast_router::node::NodeSet;
pub use wire::{node_tag, NodeTag, Wire};

/// Subscriptions a shard asks of the mesh thread (messages go through
/// [`Mesh::wire`]).
#[derive(Debug)]
pub enum Out {
    /// Start receiving a topic from every peer (a room or user got a local
    /// member).
    Subscribe(Vec<u8>),
    Unsubscribe(Vec<u8>),
}

/// What the mesh thread hands a shard.
#[derive(Debug)]
pub enum Inbound {
    Wire(Wire),
    /// The live nodes changed (sent to every shard).
    Nodes(Arc<NodeSet>),
}

/// Settings of the mesh, validated from the configuration.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub node_id: Arc<str>,
    /// ZeroMQ endpoint the PUB socket binds (`tcp://host:port`).
    pub bind: String,
    /// Endpoint peers connect to (differs from `bind` for 0.0.0.0).
    pub advertise: String,
    /// Static peer endpoints.
    pub peers: Vec<String>,
    /// Redis URL of the node registry.
    pub registry: Option<String>,
    pub heartbeat: Duration,
    /// A peer not heard for this long is dead.
    pub node_timeout: Duration,
    /// ZeroMQ high-water mark (messages) on each socket.
    pub hwm: i32,
    /// Commands the shards may queue for the thread.
    pub queue: usize,
    /// Fault injection (tests): drop every Nth room message (0: never).
    pub drop_every: u64,
}

/// Mesh counters (written by the thread and by shards; relaxed atomics).
#[derive(Debug, Default)]
pub struct MeshMetrics {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Dropped: the shards' queue to the mesh thread was full.
    pub dropped_queue: AtomicU64,
    /// Dropped: a PUB high-water mark was reached.
    pub dropped_hwm: AtomicU64,
    /// Dropped on purpose (`--mesh-drop-every`, tests only).
    pub dropped_injected: AtomicU64,
    /// Payloads that did not parse.
    pub bad_messages: AtomicU64,
    /// Live nodes, this one included (gauge).
    pub live_nodes: AtomicU64,
    /// Times the live set changed.
    pub membership_changes: AtomicU64,
    /// Heartbeat ticks that came half an interval or more late.
    pub heartbeats_late: AtomicU64,
    /// The latest tick so far, in ms late (gauge).
    pub heartbeat_late_max_ms: AtomicU64,
    /// Publishes sent to a home on another node.
    pub forwarded: AtomicU64,
    /// Gaps in a room's seqs seen by this node.
    pub gaps: AtomicU64,
    /// Messages fetched from history to fill gaps.
    pub repaired: AtomicU64,
    /// Seqs of gaps history could not fill (skipped).
    pub unrepaired: AtomicU64,
    /// Rooms whose home moved to or from this node.
    pub rehomed: AtomicU64,
    /// Publishes refused because the nodes disagreed on the room's home.
    pub misrouted: AtomicU64,
}

struct Shared {
    /// Messages: bounded; a full queue drops (counted), as PUB/SUB may.
    tx: Sender<Wire>,
    /// Subscriptions: never dropped (a lost one would leave a room or a
    /// user deaf on this node); bounded by the rooms and users it has.
    ctl: Sender<Out>,
    /// Written to wake the thread when it sleeps in `poll`.
    wake: UnixStream,
    sleeping: AtomicBool,
    inboxes: Box<[Inbox<Inbound>]>,
}

/// A shard's handle on the mesh.
#[derive(Clone)]
pub struct Mesh {
    shared: Arc<Shared>,
    pub me: NodeTag,
    pub node_id: Arc<str>,
    pub metrics: Arc<MeshMetrics>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mesh({})", self.node_id)
    }
}

impl Mesh {
    /// Hands a subscription change to the mesh thread; never dropped.
    pub fn send(&self, out: Out) {
        if self.shared.ctl.send(out).is_ok() {
            self.shared.wake();
        }
    }

    /// Publishes `w` through the mesh thread; never blocks. False if the
    /// queue was full and the message was dropped (counted).
    pub fn wire(&self, w: Wire) -> bool {
        self.try_wire(w).is_ok()
    }

    /// [`Mesh::wire`] that gives a dropped message back, for the caller to
    /// answer it.
    pub fn try_wire(&self, w: Wire) -> Result<(), Wire> {
        match self.shared.tx.try_send(w) {
            Ok(()) => {
                self.shared.wake();
                Ok(())
            }
            Err(TrySendError::Full(w)) => {
                self.metrics.dropped_queue.fetch_add(1, Relaxed);
                Err(w)
            }
            Err(TrySendError::Disconnected(w)) => Err(w),
        }
    }

    pub fn inbox(&self, shard: usize) -> &Inbox<Inbound> {
        &self.shared.inboxes[shard]
    }
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot bind the mesh PUB socket on {addr}: {source} (is another node using it? pick another --mesh-bind)")]
    Bind { addr: String, source: zmq::Error },
    #[error("mesh: {0}")]
    Setup(String),
}

/// The running mesh thread (and registry thread, with Redis).
pub struct MeshHandle {
    stop: Arc<AtomicBool>,
    mesh: Mesh,
    threads: Vec<JoinHandle<()>>,
}

impl MeshHandle {
    /// Stops the threads (the registry entry is removed) and waits for them.
    pub fn stop(self) {
        self.stop.store(true, SeqCst);
        self.mesh.shared.sleeping.store(false, SeqCst);
        let _ = (&self.mesh.shared.wake).write(&[1]);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Binds the PUB socket and starts the mesh thread for `shards` shards.
pub fn start(config: MeshConfig, shards: usize) -> Result<(Mesh, MeshHandle), MeshError> {
    let setup = |e: std::io::Error| MeshError::Setup(e.to_string());
    let (wake_tx, wake_rx) = UnixStream::pair().map_err(setup)?;
    wake_tx.set_nonblocking(true).map_err(setup)?;
    wake_rx.set_nonblocking(true).map_err(setup)?;
    let (tx, rx) = crossbeam_channel::bounded(config.queue);
    let (ctl, ctl_rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        tx,
        ctl,
        wake: wake_tx,
        sleeping: AtomicBool::new(false),
        inboxes: (0..shards).map(|_| Inbox::new()).collect(),
    });
    let metrics = Arc::new(MeshMetrics::default());
    let mesh = Mesh {
        shared: shared.clone(),
        me: node_tag(&config.node_id),
        node_id: config.node_id.clone(),
        metrics: metrics.clone(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (reg_tx, reg_rx) = crossbeam_channel::bounded(4);
    let mut state = thread::MeshThread::bind(
        config.clone(),
        shards,
        thread::Queues {
            ctl: ctl_rx,
            rx,
            registry: reg_rx,
            wake: wake_rx,
        },
        mesh.clone(),
        stop.clone(),
    )?;
    let mut threads = vec![std::thread::Builder::new()
        .name("mesh".into())
        .spawn(move || state.run())
        .map_err(setup)?];
    if let Some(url) = config.registry.clone() {
        let r = registry::Registry::new(&config, url, reg_tx, mesh.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("mesh-registry".into())
                .spawn(move || r.run())
                .map_err(setup)?,
        );
    }
    let handle = MeshHandle {
        stop,
        mesh: mesh.clone(),
        threads,
    };
    Ok((mesh, handle))
}

impl Shared {
    fn wake(&self) {
        // SeqCst, paired with the thread's store and its look at the
        // queues: either the thread sees the command, or this sees it asleep.
        if self.sleeping.swap(false, SeqCst) {
            // Non-blocking: a full socket buffer already holds a wake-up.
            let _ = (&self.wake).write(&[1]);
        }
    }
}

impl Mesh {
    /// Wakes the mesh thread (the registry has news).
    fn wake(&self) {
        self.shared.wake();
    }
}
