//! Chat: sessions, rooms homed on shards, cross-shard fan-out; and, in a
//! cluster, rooms homed on nodes ([`cluster`]).
//!
//! A room's home shard (`corecast_router::home_shard`) owns its sequence:
//! every publish travels there, is numbered, encoded once into a WebSocket
//! frame, and sent once to each shard that has members, which copies the same
//! bytes to each of its local members. Direct messages travel the same way
//! through the recipient's user-home shard, which knows on which shards the
//! user has connections. In a cluster the room's home shard on each node
//! either numbers the room (on the room's home node) or relays it from
//! there; see `cluster.rs`.
//!
//! # Invariants
//! - [`ChatShard`] is owned by one shard (`!Send`). Other shards reach it only
//!   through [`Request`]s (to a home) and [`Delivery`]s (from a home), carried
//!   by two sets of rings (`rings`); other nodes and the storage worker only
//!   through the shard's inboxes, drained by its own tasks. A request handler may send deliveries; a
//!   delivery handler never sends anything across shards. So every chain is
//!   connection → request mesh → home → delivery mesh → connection: a DAG.
//! - Every cross-shard send goes through an [`Outbox`]: it tries the ring
//!   and otherwise queues locally, in order, for a forwarder task. Order from
//!   one shard to another is FIFO, so a room's messages reach every shard in
//!   seq order, and a sender's direct messages arrive in the order sent.
//! - Bounded: above [`OUTBOX_HIGH`] queued messages a shard's chat
//!   connections stop reading, and above it in queued deliveries its request
//!   handlers pause, so back-pressure reaches the publishers instead of
//!   memory growing. Handlers wait only on deliveries, which drain through
//!   delivery handlers that never wait: no two shards can wait on each other.
//! - Handlers never block and hold no `RefCell` borrow across an `.await`.

mod cluster;
pub mod session;

pub use corecast_router::{
    message::{ConnRef, Publish},
    proto,
};

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    future::poll_fn,
    rc::Rc,
    sync::Arc,
    task::{Poll, Waker},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use corecast_router::{
    home_shard,
    room::{HomeRoom, Sequenced},
    user_home_shard,
};
use glommio::{GlommioError, ResourceType};

use crate::{
    auth::Verifier,
    conn::ConnShared,
    feed::{self, Feed},
    mesh::{Mesh, NodeTag},
    rings::{Receivers, Senders},
    shard::Shard,
    storage::{self, Op, PresenceOp, Query, Record, Recover, Reply, RoomMeta, Storage},
};
pub use session::Session;

/// Items a task handles from one batch (mesh inbox, storage replies,
/// presence refreshes) between two chances for the shard's other tasks to
/// run: a batch can be thousands long, and the sockets must not wait for it.
pub(crate) const YIELD_EVERY: usize = 64;

/// Messages queued in a shard's outboxes above which it applies
/// back-pressure, and below which it releases it.
pub const OUTBOX_HIGH: usize = 8192;
const OUTBOX_LOW: usize = OUTBOX_HIGH / 2;
/// Emptied rooms whose last seq a shard remembers. Past it an arbitrary one
/// is forgotten (its seq restarts at 1 if it fills again) so that clients
/// cycling through room names cannot grow a shard's memory without bound;
/// durable sequences come with the storage worker.
pub const MAX_TOMBSTONES: usize = 100_000;

/// Requests a room may queue while its sequence loads from the store;
/// publishes past it are refused (`storage_busy`).
pub const MAX_QUEUED_WHILE_LOADING: usize = 1024;

/// Resumes a room may hold waiting for this node to catch up (cluster).
pub const MAX_PARKED: usize = 1024;

/// Slots in each cross-shard ring (per ordered pair of shards).
pub const RING_SLOTS: usize = 1024;

/// Work for a home shard (a room's, or a user's).
#[derive(Debug)]
pub enum Request {
    Join {
        room: Arc<str>,
        user: Arc<str>,
        conn: ConnRef,
        /// Resume point: last seq seen and its epoch.
        since: Option<(u64, Box<str>)>,
        /// The connection's number for this join (see `Session`).
        nonce: u32,
        /// It already waited for this node to catch up (see `Home::parked`).
        parked: bool,
    },
    Leave {
        room: Arc<str>,
        user: Arc<str>,
        shard: u16,
    },
    Publish(Publish),
    /// Another node has members of a homed room and wants its messages.
    Sync {
        room: Arc<str>,
        node: NodeTag,
        nonce: u64,
    },
    /// Another node has no members of a homed room any more.
    Unsync {
        room: Arc<str>,
        node: NodeTag,
    },
    Presence {
        room: Arc<str>,
        conn: ConnRef,
    },
    History {
        room: Arc<str>,
        query: Query,
        conn: ConnRef,
    },
    UserOnline {
        user: Arc<str>,
        shard: u16,
    },
    UserOffline {
        user: Arc<str>,
        shard: u16,
    },
    Direct {
        to: Arc<str>,
        from: Arc<str>,
        id: Box<str>,
        body: Box<str>,
        conn: ConnRef,
    },
}

impl Request {
    /// The room a request is about, if any.
    fn room(&self) -> Option<&Arc<str>> {
        match self {
            Request::Join { room, .. }
            | Request::Leave { room, .. }
            | Request::Publish(Publish { room, .. })
            | Request::Presence { room, .. }
            | Request::History { room, .. }
            | Request::Sync { room, .. }
            | Request::Unsync { room, .. } => Some(room),
            _ => None,
        }
    }
}

/// What a join with a resume point became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// No resume point: answer `joined` at once.
    No,
    /// The store is fetching what the client missed: hold the room's live
    /// messages for this connection until [`Reply::Recovered`] arrives.
    Pending,
    /// The store's queue is full: `joined` with `recovered:false`.
    Refused,
}

/// Work a home sends to the shards that hold connections.
#[derive(Debug)]
pub enum Delivery {
    /// The home registered the join: from now on the shard gets the room.
    Joined {
        room: Arc<str>,
        user: Arc<str>,
        conn: ConnRef,
        seq: u64,
        members: u64,
        epoch: Arc<str>,
        resume: Resume,
        nonce: u32,
    },
    /// A frame for every local member of the room (a message, a presence event).
    Room { room: Arc<str>, frame: Arc<[u8]> },
    /// A frame for one connection (an ack, an error, a presence answer).
    ToConn { conn: ConnRef, frame: Box<[u8]> },
    /// A frame for every local connection of a user (a direct message).
    ToUser { user: Arc<str>, frame: Arc<[u8]> },
}

/// Chat settings, validated from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub verifier: Option<Verifier>,
    pub allow_anonymous: bool,
    pub max_rooms_per_connection: usize,
    pub rate_limit_per_s: f64,
    pub rate_limit_burst: f64,
    pub max_body_bytes: usize,
    pub presence_max_members: usize,
    /// How long a presence entry in the store lives without a heartbeat.
    pub presence_ttl: Duration,
    /// How long the store keeps an idle room's seq and epoch; a tombstone
    /// older than that is not trusted.
    pub history_meta_ttl: Duration,
    /// Most messages one `history` request returns.
    pub history_max_limit: usize,
}

/// Where a home room's sequence stands.
enum SeqState {
    Known,
    /// Asked the store; these requests wait for the answer, in order.
    Loading(VecDeque<Request>),
    /// The store could not say (breaker open): membership works, publishes
    /// ask the store again.
    Unknown,
}

/// A room on its home shard: sequenced here, or (in a cluster) relayed
/// here from the room's home node to this node's members.
struct Home {
    /// This node's members (per shard, per user); the sequence and the
    /// duplicate window when this node is the room's home.
    room: HomeRoom,
    /// The store's epoch for the room's seqs ("" while unknown).
    epoch: Arc<str>,
    seq: SeqState,
    /// The last seq this node's members were sent: every later message
    /// reaches them live, so joins and resumes are answered up to it.
    delivered: u64,
    /// Some when another node is the room's home.
    relay: Option<cluster::Relay>,
    /// When this node is the home: the other nodes that asked for the room.
    remote: Vec<NodeTag>,
    /// A gap being filled from history: later messages wait here.
    repair: Option<cluster::Repair>,
    /// The next load starts a new tenure (a takeover, or a conflict in the
    /// store): the sequence continues exactly from the store's last seq.
    restart: bool,
    /// In a cluster: resumes from a seq this node has not delivered yet
    /// (the client came from a node ahead of this one). They wait, up to
    /// [`cluster::PARK_FOR`], for `delivered` to catch up.
    parked: Vec<(std::time::Instant, Request)>,
}

impl Home {
    fn new(shards: usize, last_seq: u64, epoch: Arc<str>, seq: SeqState) -> Home {
        Home {
            room: HomeRoom::new(shards, last_seq),
            epoch,
            seq,
            delivered: last_seq,
            relay: None,
            remote: Vec::new(),
            repair: None,
            restart: false,
            parked: Vec::new(),
        }
    }

    /// Nobody needs the room here any more: no local member, no other node
    /// that asked for it, no resume waiting.
    fn idle(&self) -> bool {
        self.room.is_empty() && self.remote.is_empty() && self.parked.is_empty()
    }
}

/// An emptied room's last seq and epoch, and when it emptied.
type Tombstone = (u64, Arc<str>, std::time::Instant);
/// A resume answer: the join's nonce, the `joined` frame and the missed
/// messages' frames.
type Recovered = (u32, Box<[u8]>, Vec<u8>);

/// A local member whose resume is being answered by the store: the room's
/// live frames wait here so that they follow what it missed.
struct Recovering {
    key: LocalConn,
    nonce: u32,
    held: Vec<Arc<[u8]>>,
    bytes: usize,
}

/// A FIFO queue for one consumer task on this shard.
struct LocalQueue<T> {
    items: RefCell<VecDeque<T>>,
    waker: RefCell<Option<Waker>>,
}

impl<T> LocalQueue<T> {
    fn new() -> LocalQueue<T> {
        LocalQueue {
            items: RefCell::new(VecDeque::new()),
            waker: RefCell::new(None),
        }
    }

    fn push(&self, item: T) {
        self.items.borrow_mut().push_back(item);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn len(&self) -> usize {
        self.items.borrow().len()
    }

    async fn pop(&self) -> T {
        poll_fn(|cx| match self.items.borrow_mut().pop_front() {
            Some(item) => Poll::Ready(item),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// Ordered sends to every shard (this one included) for one mesh.
pub struct Outbox<T: Send> {
    me: usize,
    senders: Senders<T>,
    /// Per destination: messages waiting for ring space, in order. For `me`,
    /// the local handler's queue.
    queues: Vec<LocalQueue<T>>,
    /// Per destination: a forwarder holds a popped message it is still
    /// sending; the fast path must not overtake it.
    in_flight: Vec<Cell<bool>>,
}

impl<T: Send> Outbox<T> {
    fn new(senders: Senders<T>) -> Outbox<T> {
        let n = senders.nr_consumers();
        Outbox {
            me: senders.peer_id(),
            senders,
            queues: (0..n).map(|_| LocalQueue::new()).collect(),
            in_flight: (0..n).map(|_| Cell::new(false)).collect(),
        }
    }

    /// Sends `msg` to shard `to`, in order after everything sent to it before.
    fn send(&self, to: usize, msg: T, metrics: &crate::metrics::ShardMetrics) {
        if to == self.me {
            self.queues[to].push(msg);
            return;
        }
        metrics.cross_shard_messages.inc();
        if self.queues[to].len() == 0 && !self.in_flight[to].get() {
            match self.senders.try_send_to(to, msg) {
                Ok(()) => {}
                Err(GlommioError::WouldBlock(ResourceType::Channel(msg))) => {
                    metrics.ring_full.inc();
                    self.queues[to].push(msg);
                    metrics.outbox_backlog.add(1);
                }
                // The peer is gone: the node is shutting down.
                Err(_) => {}
            }
        } else {
            self.queues[to].push(msg);
            metrics.outbox_backlog.add(1);
        }
    }

    /// Messages queued: waiting for ring space to other shards, and waiting
    /// for this shard's own handler.
    fn backlog(&self) -> usize {
        self.queues.iter().map(|q| q.len()).sum()
    }
}

/// A local connection: slab key and generation.
pub type LocalConn = (u32, u32);
/// Room or user name to this shard's connections.
type LocalTable = HashMap<Arc<str>, Vec<LocalConn>>;

/// A room's members on this shard and the feed their frames are sent from.
#[derive(Debug)]
pub struct LocalRoom {
    members: Vec<LocalConn>,
    feed: Rc<Feed>,
}

/// One shard's chat state.
pub struct ChatShard {
    /// This shard's index in the meshes (the index homes are computed in).
    pub me: usize,
    /// This node's tag.
    pub node: NodeTag,
    /// The cross-node side, when the node runs in a cluster.
    cluster: Option<cluster::Cluster>,
    pub shards: usize,
    pub settings: Settings,
    requests: Outbox<Request>,
    deliveries: Outbox<Delivery>,
    pub storage: Storage,
    /// Rooms homed here that have members (or a sequence being loaded).
    homes: RefCell<HashMap<Arc<str>, Home>>,
    /// Last seq and epoch of rooms homed here that emptied, so a room that
    /// fills again continues without asking the store. Bounded by
    /// [`MAX_TOMBSTONES`].
    tombstones: RefCell<HashMap<Arc<str>, Tombstone>>,
    /// Local members waiting for their resume, per room.
    recovering: RefCell<HashMap<Arc<str>, Vec<Recovering>>>,
    /// Resume answers that arrived before the home's `Joined`.
    early_recoveries: RefCell<HashMap<(Arc<str>, LocalConn), Recovered>>,
    /// Users homed here: connections per shard.
    user_homes: RefCell<HashMap<Arc<str>, Vec<u32>>>,
    /// Local members of each room.
    local_rooms: RefCell<HashMap<Arc<str>, LocalRoom>>,
    /// Bytes the rooms' feeds hold for members that have not sent them.
    pub feed_bytes: feed::Held,
    /// Local connections of each user.
    local_users: RefCell<LocalTable>,
    /// Connections waiting for the whole backlog to drain.
    congestion_waiters: RefCell<Vec<Waker>>,
    /// Bumped at every release of `congestion_waiters`, so a connection
    /// registers once per congestion instead of scanning the list.
    release_epoch: Cell<u64>,
    /// Request handlers waiting for the delivery backlog to drain.
    handler_waiters: RefCell<Vec<Waker>>,
    anonymous: Cell<u64>,
}

/// Milliseconds since the Unix epoch, for message timestamps.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ChatShard {
    /// Joins the two meshes (every shard must call this) and builds the state.
    pub fn new(
        settings: Settings,
        requests: Senders<Request>,
        deliveries: Senders<Delivery>,
        storage: Storage,
        node: NodeTag,
        mesh: Option<Mesh>,
    ) -> ChatShard {
        let me = requests.peer_id();
        let shards = requests.nr_consumers();
        ChatShard {
            me,
            node,
            cluster: mesh.map(cluster::Cluster::new),
            shards,
            settings,
            requests: Outbox::new(requests),
            deliveries: Outbox::new(deliveries),
            storage,
            homes: RefCell::new(HashMap::new()),
            tombstones: RefCell::new(HashMap::new()),
            recovering: RefCell::new(HashMap::new()),
            early_recoveries: RefCell::new(HashMap::new()),
            user_homes: RefCell::new(HashMap::new()),
            local_rooms: RefCell::new(HashMap::new()),
            feed_bytes: feed::Held::default(),
            local_users: RefCell::new(HashMap::new()),
            congestion_waiters: RefCell::new(Vec::new()),
            release_epoch: Cell::new(0),
            handler_waiters: RefCell::new(Vec::new()),
            anonymous: Cell::new(0),
        }
    }

    pub fn room_home(&self, room: &str) -> usize {
        home_shard(room, self.shards)
    }

    pub fn user_home(&self, user: &str) -> usize {
        user_home_shard(user, self.shards)
    }

    pub fn next_anonymous(&self) -> u64 {
        let n = self.anonymous.get() + 1;
        self.anonymous.set(n);
        n
    }

    pub fn request(&self, shard: &Shard, to: usize, req: Request) {
        self.requests.send(to, req, shard.metrics());
    }

    fn deliver(&self, shard: &Shard, to: usize, d: Delivery) {
        self.deliveries.send(to, d, shard.metrics());
    }

    /// Sends one frame to one connection, through its shard (and node).
    fn to_conn(&self, shard: &Shard, conn: ConnRef, frame: Vec<u8>) {
        self.to_conn_frame(shard, conn, frame.into());
    }

    fn to_conn_frame(&self, shard: &Shard, conn: ConnRef, frame: Box<[u8]>) {
        if conn.node != self.node {
            if let Some(c) = &self.cluster {
                c.mesh.wire(crate::mesh::Wire::ToConn { conn, frame });
            }
            return;
        }
        if conn.shard as usize == self.me {
            if let Some(c) = lookup(shard, conn) {
                c.enqueue(shard, &frame);
            }
            return;
        }
        self.deliver(shard, conn.shard as usize, Delivery::ToConn { conn, frame });
    }

    /// Too much is queued: connections stop reading new work.
    pub fn congested(&self) -> bool {
        self.requests.backlog() + self.deliveries.backlog() > OUTBOX_HIGH
    }

    /// Registers a connection to be woken once the backlog is below the low
    /// mark; `registered` is the connection's own record, so registering is
    /// O(1) however many connections wait.
    pub fn wait_uncongested(&self, waker: &Waker, registered: &Cell<u64>) {
        let epoch = self.release_epoch.get() + 1;
        if registered.get() != epoch {
            registered.set(epoch);
            self.congestion_waiters.borrow_mut().push(waker.clone());
        }
    }

    /// Too many deliveries are queued: request handlers pause. They wait on
    /// deliveries only, which drain through handlers that never wait, so no
    /// two shards can wait on each other.
    fn deliveries_congested(&self) -> bool {
        self.deliveries.backlog() > OUTBOX_HIGH
    }

    /// Updates the backlog gauge and wakes whoever waits for the backlog.
    fn maybe_release(&self, shard: &Shard) {
        let deliveries = self.deliveries.backlog();
        let total = self.requests.backlog() + deliveries;
        shard.metrics().outbox_backlog.set(total as u64);
        if deliveries <= OUTBOX_LOW && !self.handler_waiters.borrow().is_empty() {
            let waiters = std::mem::take(&mut *self.handler_waiters.borrow_mut());
            waiters.into_iter().for_each(Waker::wake);
        }
        if total <= OUTBOX_LOW && !self.congestion_waiters.borrow().is_empty() {
            self.release_epoch.set(self.release_epoch.get() + 1);
            let waiters = std::mem::take(&mut *self.congestion_waiters.borrow_mut());
            waiters.into_iter().for_each(Waker::wake);
        }
    }

    /// A room becomes active here: continue its sequence from its tombstone,
    /// or ask the store where it stands.
    fn revive(&self, room: &Arc<str>, m: &crate::metrics::ShardMetrics) -> Home {
        m.rooms.inc();
        self.subscribe(crate::mesh::wire::room_topic, room, true);
        let ttl = self.settings.history_meta_ttl;
        match self.tombstones.borrow_mut().remove(room) {
            Some((last_seq, epoch, at)) if at.elapsed() < ttl => {
                Home::new(self.shards, last_seq, epoch, SeqState::Known)
            }
            _ => {
                let load = Op::Load {
                    room: room.clone(),
                    home: self.me as u16,
                };
                let seq = match self.storage.try_send_load(self.me, load) {
                    Ok(()) => SeqState::Loading(VecDeque::new()),
                    // Too many loads queued: publishes will ask again.
                    Err(_) => SeqState::Unknown,
                };
                Home::new(self.shards, 0, Arc::from(""), seq)
            }
        }
    }

    /// A room emptied: forget its members and duplicate window, keep its
    /// last seq and epoch (if the store told them).
    fn bury(&self, room: Arc<str>, home: Home, m: &crate::metrics::ShardMetrics) {
        m.rooms.sub(1);
        self.subscribe(crate::mesh::wire::room_topic, &room, false);
        if let Some(relay) = &home.relay {
            self.tell_home(relay.home, |to| crate::mesh::Wire::Unsync {
                to,
                room: room.clone(),
                node: self.node,
            });
            return;
        }
        if !matches!(home.seq, SeqState::Known) {
            return;
        }
        let mut t = self.tombstones.borrow_mut();
        if t.len() >= MAX_TOMBSTONES {
            if let Some(k) = t.keys().next().cloned() {
                t.remove(&k);
            }
        }
        t.insert(
            room,
            (home.room.last_seq(), home.epoch, std::time::Instant::now()),
        );
    }

    pub fn add_local_member(&self, shard: &Shard, room: &Arc<str>, key: (u32, u32)) {
        let mut rooms = self.local_rooms.borrow_mut();
        let local = rooms.entry(room.clone()).or_insert_with(|| LocalRoom {
            members: Vec::new(),
            feed: Feed::new(self.feed_bytes.clone()),
        });
        local.members.push(key);
        if let Some(c) = lookup_key(shard, key.0, key.1) {
            c.subscribe(&local.feed);
        }
        shard.metrics().room_members.inc();
    }

    /// Removes a local membership (or a resume in progress). Linear in the
    /// room's local members: cheap for the sizes chat rooms have on one shard.
    pub fn remove_local_member(&self, shard: &Shard, room: &str, key: (u32, u32)) {
        {
            let mut rec = self.recovering.borrow_mut();
            if let Some(list) = rec.get_mut(room) {
                list.retain(|r| r.key != key);
                if list.is_empty() {
                    rec.remove(room);
                }
            }
        }
        let mut rooms = self.local_rooms.borrow_mut();
        if let Some(local) = rooms.get_mut(room) {
            if let Some(i) = local.members.iter().position(|k| *k == key) {
                local.members.swap_remove(i);
                shard.metrics().room_members.sub(1);
            }
            if let Some(c) = lookup_key(shard, key.0, key.1) {
                c.unsubscribe(shard, &local.feed);
            }
            if local.members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    pub fn add_local_user(&self, user: &Arc<str>, key: (u32, u32)) {
        self.local_users
            .borrow_mut()
            .entry(user.clone())
            .or_default()
            .push(key);
    }

    pub fn remove_local_user(&self, user: &str, key: (u32, u32)) {
        let mut users = self.local_users.borrow_mut();
        if let Some(conns) = users.get_mut(user) {
            if let Some(i) = conns.iter().position(|k| *k == key) {
                conns.swap_remove(i);
            }
            if conns.is_empty() {
                users.remove(user);
            }
        }
    }
}

/// Starts the tasks that drain the outboxes and handle what arrives.
pub fn spawn_tasks(
    shard: &Rc<Shard>,
    mut requests: Receivers<Request>,
    mut deliveries: Receivers<Delivery>,
) {
    let chat = &shard.chat;
    for peer in 0..chat.shards {
        if peer == chat.me {
            continue;
        }
        spawn_forwarder(shard, peer, |c| &c.requests);
        spawn_forwarder(shard, peer, |c| &c.deliveries);
    }
    // Requests: from each peer's ring, and from this shard's own queue.
    for (_, stream) in requests.streams() {
        let s = shard.clone();
        glommio::spawn_local(async move {
            while let Some(req) = stream.recv().await {
                handle_request(&s, req);
                pause_while_congested(&s).await;
            }
        })
        .detach();
    }
    let s = shard.clone();
    glommio::spawn_local(async move {
        loop {
            let req = s.chat.requests.queues[s.chat.me].pop().await;
            handle_request(&s, req);
            s.chat.maybe_release(&s);
            pause_while_congested(&s).await;
        }
    })
    .detach();
    for (_, stream) in deliveries.streams() {
        let s = shard.clone();
        glommio::spawn_local(async move {
            while let Some(d) = stream.recv().await {
                handle_delivery(&s, d);
                // A busy ring must not keep the shard's connections from
                // flushing what was just queued for them.
                glommio::yield_if_needed().await;
            }
        })
        .detach();
    }
    let s = shard.clone();
    glommio::spawn_local(async move {
        loop {
            let replies = poll_fn(|cx| s.chat.storage.inbox(s.chat.me).poll_recv(cx)).await;
            for (i, r) in replies.into_iter().enumerate() {
                handle_reply(&s, r);
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    glommio::yield_if_needed().await;
                }
            }
            s.chat.maybe_release(&s);
            glommio::yield_if_needed().await;
        }
    })
    .detach();
    if chat.storage.keeps_presence() {
        spawn_presence_heartbeat(shard);
    }
    cluster::spawn_tasks(shard);
    let s = shard.clone();
    glommio::spawn_local(async move {
        loop {
            let d = s.chat.deliveries.queues[s.chat.me].pop().await;
            handle_delivery(&s, d);
            s.chat.maybe_release(&s);
            glommio::yield_if_needed().await;
        }
    })
    .detach();
}

/// Drains one outbox's queue for `peer` into the ring, waiting for space.
fn spawn_forwarder<T: Send + 'static>(
    shard: &Rc<Shard>,
    peer: usize,
    outbox: fn(&ChatShard) -> &Outbox<T>,
) {
    let s = shard.clone();
    glommio::spawn_local(async move {
        let outbox = outbox(&s.chat);
        loop {
            let msg = outbox.queues[peer].pop().await;
            outbox.in_flight[peer].set(true);
            let sent = outbox.senders.send_to(peer, msg).await;
            outbox.in_flight[peer].set(false);
            s.chat.maybe_release(&s);
            if sent.is_err() {
                return;
            }
        }
    })
    .detach();
}

/// Hands a presence update to the store; presence is soft state, so a full
/// queue drops it (counted) and the next heartbeat repairs it.
fn send_presence(chat: &ChatShard, op: Op) {
    if chat.storage.try_send(chat.me, op).is_err() {
        chat.storage
            .metrics
            .presence_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Refreshes the store's presence entries of the rooms homed here, three
/// times per presence TTL, so they outlive no node by more than the TTL.
fn spawn_presence_heartbeat(shard: &Rc<Shard>) {
    let s = shard.clone();
    let every = (s.chat.settings.presence_ttl / 3).max(Duration::from_millis(100));
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(every).await;
            let rooms: Vec<(Arc<str>, Vec<Arc<str>>)> = s
                .chat
                .homes
                .borrow()
                .iter()
                .map(|(room, h)| (room.clone(), h.room.users().cloned().collect()))
                .collect();
            for (i, (room, users)) in rooms.into_iter().enumerate() {
                let op = Op::Presence(PresenceOp::Refresh { room, users });
                if s.chat.storage.try_send(s.chat.me, op).is_err() {
                    break;
                }
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    glommio::yield_if_needed().await;
                }
            }
        }
    })
    .detach();
}

async fn pause_while_congested(shard: &Rc<Shard>) {
    poll_fn(|cx| {
        if shard.chat.deliveries_congested() {
            let mut w = shard.chat.handler_waiters.borrow_mut();
            if !w.iter().any(|x| x.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    glommio::yield_if_needed().await;
}

/// Handles a request at its home shard. Requests for a room whose sequence
/// is loading from the store wait, in order, until it is known.
fn handle_request(shard: &Shard, req: Request) {
    let chat = &shard.chat;
    if let Some(room) = req.room().cloned() {
        if let Some(c) = &chat.cluster {
            match c.home_of(&room) {
                // The live nodes are not known yet.
                None => {
                    c.waiting.borrow_mut().push_back(req);
                    return;
                }
                Some(node) if node != chat.node => {
                    cluster::relay_request(shard, req, node);
                    return;
                }
                Some(_) => {}
            }
        }
        let mut homes = chat.homes.borrow_mut();
        if !homes.contains_key(&room)
            && matches!(
                req,
                Request::Join { .. } | Request::Publish(_) | Request::Sync { .. }
            )
        {
            let home = chat.revive(&room, shard.metrics());
            homes.insert(room.clone(), home);
        }
        if let Some(home) = homes.get_mut(&room) {
            let publish = matches!(req, Request::Publish(_));
            match &mut home.seq {
                SeqState::Loading(queue) => {
                    if publish && queue.len() >= MAX_QUEUED_WHILE_LOADING {
                        drop(homes);
                        if let Request::Publish(p) = &req {
                            refuse_publish(shard, p, proto::ErrorCode::StorageBusy);
                        }
                    } else {
                        queue.push_back(req);
                    }
                    return;
                }
                // A relay's Sync must learn the real seq and epoch too.
                SeqState::Unknown if publish || matches!(req, Request::Sync { .. }) => {
                    let load = Op::Load {
                        room,
                        home: chat.me as u16,
                    };
                    if chat.storage.try_send_load(chat.me, load).is_ok() {
                        home.seq = SeqState::Loading(VecDeque::from([req]));
                    } else {
                        drop(homes);
                        if let Request::Publish(p) = &req {
                            refuse_publish(shard, p, proto::ErrorCode::StorageBusy);
                        }
                    }
                    return;
                }
                _ => {}
            }
        }
    }
    dispatch_request(shard, req);
}

/// Answers a publish that was not sequenced.
fn refuse_publish(shard: &Shard, p: &Publish, code: proto::ErrorCode) {
    shard.metrics().storage_refusals.inc();
    shard.chat.to_conn(
        shard,
        p.conn,
        proto::error(code, Some(&p.id), Some(&p.room)),
    );
}

/// The store answered where a room's sequence stands: run what waited.
fn on_loaded(shard: &Shard, room: Arc<str>, meta: Option<RoomMeta>) {
    let chat = &shard.chat;
    let mut homes = chat.homes.borrow_mut();
    let Some(home) = homes.get_mut(&room) else {
        return;
    };
    if !matches!(home.seq, SeqState::Loading(_)) {
        return;
    }
    let (had_epoch, had_delivered) = (home.epoch.clone(), home.delivered);
    let restart = std::mem::take(&mut home.restart);
    match meta {
        Some(m) if restart => {
            home.room.restart_at(m.last_seq);
            home.epoch = m.epoch;
        }
        Some(m) => {
            home.room.resume_from(m.last_seq);
            home.epoch = m.epoch;
        }
        // The store cannot say (unreachable): live traffic goes on in a new
        // epoch whose seqs start far above any the store can hold. The
        // store adopts the epoch when the spilled messages reach it.
        None => {
            home.room.restart_at(storage::provisional_seq_base());
            home.epoch = Arc::from(storage::new_epoch());
            shard.metrics().provisional_epochs.inc();
        }
    }
    let last = home.room.last_seq();
    home.delivered = last;
    // This node took the room over: its members may have missed what the
    // old home stored last; they get it from history first.
    if restart && had_epoch == home.epoch && had_delivered < last && home.repair.is_none() {
        home.delivered = had_delivered;
        cluster::start_repair(shard, &room, home, last);
    }
    let SeqState::Loading(waiting) = std::mem::replace(&mut home.seq, SeqState::Known) else {
        return;
    };
    drop(homes);
    for req in waiting {
        handle_request(shard, req);
    }
}

fn dispatch_request(shard: &Shard, req: Request) {
    let chat = &shard.chat;
    let m = shard.metrics();
    let presence_max = chat.settings.presence_max_members;
    match req {
        Request::Join {
            room,
            user,
            conn,
            since,
            nonce,
            parked,
        } => {
            let mut homes = chat.homes.borrow_mut();
            let Some(home) = homes.get_mut(&room) else {
                return;
            };
            let ahead = since
                .as_ref()
                .is_some_and(|(s, e)| *s > home.delivered && **e == *home.epoch);
            if ahead && !parked && chat.cluster.is_some() && home.parked.len() < MAX_PARKED {
                let join = Request::Join {
                    room: room.clone(),
                    user,
                    conn,
                    since,
                    nonce,
                    parked: true,
                };
                home.parked.push((std::time::Instant::now(), join));
                return;
            }
            let change = home.room.join(conn.shard as usize, &user);
            let (seq, members) = (home.delivered, home.room.connections());
            let epoch = home.epoch.clone();
            let event =
                (change.user_changed && home.room.user_count() <= presence_max).then(|| {
                    (
                        home.room.shards().collect::<Vec<_>>(),
                        proto::presence_event(&room, true, &user),
                    )
                });
            drop(homes);
            if change.user_changed && chat.storage.keeps_presence() {
                let op = Op::Presence(PresenceOp::Add {
                    room: room.clone(),
                    user: user.clone(),
                });
                send_presence(chat, op);
            }
            let resume = match since {
                None => Resume::No,
                Some((since, client_epoch)) => {
                    let op = Op::Recover(Box::new(Recover {
                        room: room.clone(),
                        since,
                        epoch: client_epoch,
                        upto: seq,
                        home_epoch: epoch.clone(),
                        members,
                        to: conn,
                        nonce,
                    }));
                    match chat.storage.try_send(chat.me, op) {
                        Ok(()) => Resume::Pending,
                        Err(_) => Resume::Refused,
                    }
                }
            };
            chat.deliver(
                shard,
                conn.shard as usize,
                Delivery::Joined {
                    room: room.clone(),
                    user,
                    conn,
                    seq,
                    members,
                    epoch,
                    resume,
                    nonce,
                },
            );
            if let Some((shards, frame)) = event {
                broadcast_event(shard, &room, shards, frame);
            }
        }
        Request::Leave {
            room,
            user,
            shard: from,
        } => {
            let mut homes = chat.homes.borrow_mut();
            let Some(home) = homes.get_mut(&room) else {
                return;
            };
            let change = home.room.leave(from as usize, &user);
            let event = (change.user_changed && home.room.user_count() < presence_max).then(|| {
                (
                    home.room.shards().collect::<Vec<_>>(),
                    proto::presence_event(&room, false, &user),
                )
            });
            if home.idle() {
                if let Some(home) = homes.remove(&room) {
                    drop(homes);
                    chat.bury(room.clone(), home, m);
                }
            } else {
                drop(homes);
            }
            if change.user_changed && chat.storage.keeps_presence() {
                let op = Op::Presence(PresenceOp::Remove {
                    room: room.clone(),
                    user,
                });
                send_presence(chat, op);
            }
            if let Some((shards, frame)) = event {
                broadcast_event(shard, &room, shards, frame);
            }
        }
        Request::Publish(p) => {
            let refusal = if !chat.storage.has_room(chat.me) {
                Some(proto::ErrorCode::StorageBusy)
            } else if chat.storage.failing() {
                Some(proto::ErrorCode::StorageUnavailable)
            } else {
                None
            };
            if let Some(code) = refusal {
                refuse_publish(shard, &p, code);
                return;
            }
            let Publish {
                room,
                user,
                id,
                body,
                conn,
                ..
            } = p;
            let mut homes = chat.homes.borrow_mut();
            let Some(home) = homes.get_mut(&room) else {
                return;
            };
            // Acking here saves the worker's round trip, which a publisher
            // with a window of publishes in flight waits for.
            let ack_here = chat.cluster.is_none() && chat.storage.acks_at_home();
            match home.room.sequence(&user, &id, shard.clock.get()) {
                Sequenced::New(seq) => {
                    m.publishes.inc();
                    let ts = now_ms();
                    let frame = proto::message(&room, seq, &user, &id, ts, &body);
                    // In a cluster a message leaves its home only once it is
                    // stored, so a node that takes the room over continues
                    // after every seq anyone has seen.
                    let fanout = if chat.cluster.is_some() {
                        Some(Arc::from(frame))
                    } else {
                        // Delivering only queues: the room table may stay borrowed.
                        broadcast(shard, &room, home.room.shards(), frame);
                        home.delivered = seq;
                        None
                    };
                    let epoch = home.epoch.clone();
                    drop(homes);
                    let ack = ack_here.then(|| (id.clone(), room.clone()));
                    let record = Record {
                        room,
                        seq,
                        from: user,
                        id,
                        ts,
                        body,
                        epoch,
                    };
                    // The ack comes from the worker once the message is
                    // stored, or from here once the worker has it.
                    let handed = chat.storage.send(
                        chat.me,
                        Op::Append {
                            record,
                            ack_to: (!ack_here).then_some(conn),
                            fanout,
                        },
                    );
                    if let Some((id, room)) = ack {
                        let frame = proto::ack(&id, &room, seq, false, handed);
                        chat.to_conn(shard, conn, frame);
                    }
                }
                Sequenced::Duplicate(seq) => {
                    drop(homes);
                    m.duplicate_publishes.inc();
                    if ack_here {
                        chat.to_conn(shard, conn, proto::ack(&id, &room, seq, true, true));
                        return;
                    }
                    chat.storage.send(
                        chat.me,
                        Op::DuplicateAck {
                            room,
                            id,
                            seq,
                            ack_to: conn,
                        },
                    );
                }
            }
        }
        Request::Presence { room, conn } => {
            if chat.storage.keeps_presence() {
                let op = Op::PresenceQuery {
                    room: room.clone(),
                    to: conn,
                    max_members: presence_max,
                };
                if chat.storage.try_send(chat.me, op).is_err() {
                    let frame = proto::error(proto::ErrorCode::StorageBusy, None, Some(&room));
                    chat.to_conn(shard, conn, frame);
                }
                return;
            }
            let homes = chat.homes.borrow();
            let frame = match homes.get(&room).map(|h| &h.room) {
                Some(h) if h.user_count() <= presence_max => {
                    proto::presence(&room, h.user_count() as u64, Some(h.users().map(|u| &**u)))
                }
                Some(h) => {
                    proto::presence(&room, h.user_count() as u64, None::<std::iter::Empty<&str>>)
                }
                None => proto::presence(&room, 0, Some(std::iter::empty())),
            };
            drop(homes);
            chat.to_conn(shard, conn, frame);
        }
        Request::Sync { room, node, nonce } => cluster::on_sync(shard, room, node, nonce),
        Request::Unsync { room, node } => cluster::on_unsync(shard, room, node),
        Request::History { room, query, conn } => {
            let upto = chat
                .homes
                .borrow()
                .get(&room)
                .filter(|h| matches!(h.seq, SeqState::Known))
                .map(|h| h.delivered);
            let op = Op::History {
                room: room.clone(),
                query,
                upto,
                to: conn,
            };
            if chat.storage.try_send(chat.me, op).is_err() {
                let frame = proto::error(proto::ErrorCode::StorageBusy, None, Some(&room));
                chat.to_conn(shard, conn, frame);
            }
        }
        Request::UserOnline { user, shard: at } => {
            let n = chat.shards;
            let mut homes = chat.user_homes.borrow_mut();
            if !homes.contains_key(&user) {
                chat.subscribe(crate::mesh::wire::user_topic, &user, true);
            }
            homes.entry(user).or_insert_with(|| vec![0; n])[at as usize] += 1;
        }
        Request::UserOffline { user, shard: at } => {
            let mut homes = chat.user_homes.borrow_mut();
            if let Some(counts) = homes.get_mut(&user) {
                counts[at as usize] = counts[at as usize].saturating_sub(1);
                if counts.iter().all(|&c| c == 0) {
                    homes.remove(&user);
                    chat.subscribe(crate::mesh::wire::user_topic, &user, false);
                }
            }
        }
        Request::Direct {
            to,
            from,
            id,
            body,
            conn,
        } => {
            let counts = chat
                .user_homes
                .borrow()
                .get(&to)
                .cloned()
                .unwrap_or_default();
            let delivered: u64 = counts.iter().map(|&c| c as u64).sum();
            let remote = chat.cluster.is_some();
            if delivered > 0 || remote {
                m.direct_messages.inc();
                let frame: Arc<[u8]> = proto::dm(&from, &id, now_ms(), &body).into();
                deliver_to_user(shard, &to, &counts, &frame);
                if let Some(c) = &chat.cluster {
                    // The nodes where the user has connections subscribe.
                    c.mesh.wire(crate::mesh::Wire::Direct {
                        user: to.clone(),
                        frame,
                    });
                }
            }
            let ack = proto::dm_ack(&id, &to, delivered);
            chat.to_conn(shard, conn, ack);
        }
    }
}

/// Sends a direct message to this node's connections of `user`.
fn deliver_to_user(shard: &Shard, user: &Arc<str>, counts: &[u32], frame: &Arc<[u8]>) {
    for (s, _) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
        shard.chat.deliver(
            shard,
            s,
            Delivery::ToUser {
                user: user.clone(),
                frame: frame.clone(),
            },
        );
    }
}

/// Sends a room event (presence) to every shard that has members of
/// `room`, and to the other nodes with members.
fn broadcast_event(
    shard: &Shard,
    room: &Arc<str>,
    shards: impl IntoIterator<Item = usize>,
    frame: Vec<u8>,
) {
    let frame: Arc<[u8]> = frame.into();
    if let Some(c) = &shard.chat.cluster {
        c.mesh.wire(crate::mesh::Wire::Event {
            room: room.clone(),
            frame: frame.clone(),
        });
    }
    broadcast(shard, room, shards, frame);
}

/// Sends one frame to every shard that has members of `room`.
fn broadcast(
    shard: &Shard,
    room: &Arc<str>,
    shards: impl IntoIterator<Item = usize>,
    frame: impl Into<Arc<[u8]>>,
) {
    let frame: Arc<[u8]> = frame.into();
    for s in shards {
        shard.chat.deliver(
            shard,
            s,
            Delivery::Room {
                room: room.clone(),
                frame: frame.clone(),
            },
        );
    }
}

/// Applies a delivery to this shard's connections. Never sends across shards
/// except to undo a join nobody wants any more.
fn handle_delivery(shard: &Shard, d: Delivery) {
    let chat = &shard.chat;
    match d {
        Delivery::Joined {
            room,
            user,
            conn,
            seq,
            members,
            epoch,
            resume,
            nonce,
        } => {
            let live = lookup(shard, conn);
            let wanted = live.as_ref().is_some_and(|c| {
                c.chat
                    .borrow_mut()
                    .as_mut()
                    .is_some_and(|s| s.mark_joined(&room, nonce))
            });
            let key = (conn.key, conn.gen);
            let early = chat
                .early_recoveries
                .borrow_mut()
                .remove(&(room.clone(), key))
                .filter(|(n, _, _)| *n == nonce);
            match live {
                Some(c) if wanted => {
                    match (resume, early) {
                        (Resume::Pending, Some((_, joined, missed))) => {
                            c.enqueue(shard, &joined);
                            c.enqueue(shard, &missed);
                            chat.add_local_member(shard, &room, key);
                        }
                        (Resume::Pending, None) => {
                            chat.recovering.borrow_mut().entry(room).or_default().push(
                                Recovering {
                                    key,
                                    nonce,
                                    held: Vec::new(),
                                    bytes: 0,
                                },
                            );
                        }
                        (resume, _) => {
                            let resumed = (resume == Resume::Refused).then_some((false, 0));
                            chat.add_local_member(shard, &room, key);
                            c.enqueue(shard, &proto::joined(&room, seq, members, &epoch, resumed));
                        }
                    }
                }
                // The client left (or went away) before the join completed.
                _ => chat.request(
                    shard,
                    chat.room_home(&room),
                    Request::Leave {
                        room,
                        user,
                        shard: conn.shard,
                    },
                ),
            }
        }
        Delivery::Room { room, frame } => {
            // Members still resuming hold the frame, whether or not the
            // shard has members that already receive the room.
            hold_for_recovering(shard, &room, &frame);
            // Scheduling, cutting off and timing members touches only their
            // own flags and cursors, never the room table, so the borrow
            // can stay.
            let rooms = chat.local_rooms.borrow();
            let Some(local) = rooms.get(&room) else {
                return;
            };
            shard.metrics().deliveries.add(local.members.len() as u64);
            shard.flusher.appended(frame.len());
            if local.feed.push(frame) {
                for &(key, gen) in &local.members {
                    if let Some(c) = lookup_key(shard, key, gen) {
                        shard.flusher.schedule(&c, key, gen);
                    }
                }
            }
            let budget = shard.limits.outbound_budget_bytes;
            if local.feed.needs_scan(budget) {
                check_lag(shard, local, budget);
            }
        }
        Delivery::ToConn { conn, frame } => {
            if let Some(c) = lookup(shard, conn) {
                c.enqueue(shard, &frame);
            }
        }
        Delivery::ToUser { user, frame } => {
            let users = chat.local_users.borrow();
            for &(key, gen) in users.get(&user).map_or(&[][..], |v| v.as_slice()) {
                if let Some(c) = lookup_key(shard, key, gen) {
                    c.enqueue(shard, &frame);
                }
            }
        }
    }
}

/// Looks at how much each member of a room has queued, in all its rooms
/// and its own output: past the hard cap it is cut off from its feeds and
/// closed as a slow consumer (so no feed holds frames for it any more),
/// past the budget its slow-consumer clock starts. A member that reads
/// sends its frames and never gets there.
fn check_lag(shard: &Shard, local: &LocalRoom, budget: usize) {
    let hard_cap = ConnShared::hard_cap(shard);
    for &(key, gen) in &local.members {
        let Some(c) = lookup_key(shard, key, gen) else {
            continue;
        };
        match c.queued() {
            q if q > hard_cap => c.cut_off(shard),
            q if q > budget => c.over_budget(shard),
            _ => {}
        }
    }
}

/// Keeps a room frame for the members whose resume is still being
/// answered; one that would hold more than its hard cap is closed.
fn hold_for_recovering(shard: &Shard, room: &Arc<str>, frame: &Arc<[u8]>) {
    let mut recovering = shard.chat.recovering.borrow_mut();
    if recovering.is_empty() {
        return;
    }
    let Some(list) = recovering.get_mut(room) else {
        return;
    };
    let cap = ConnShared::hard_cap(shard);
    for r in list.iter_mut() {
        r.bytes += frame.len();
        if r.bytes > cap {
            if let Some(c) = lookup_key(shard, r.key.0, r.key.1) {
                c.cut_off(shard);
            }
            r.held = Vec::new();
        } else {
            r.held.push(frame.clone());
        }
    }
}

/// Handles what the storage worker sent back.
fn handle_reply(shard: &Shard, reply: Reply) {
    let chat = &shard.chat;
    match reply {
        Reply::ToConn { conn, frame } => chat.to_conn_frame(shard, conn, frame),
        Reply::Loaded { room, meta } => on_loaded(shard, room, meta),
        Reply::Stored { room, seq, frame } => cluster::on_stored(shard, room, seq, frame),
        Reply::Conflict {
            room,
            from,
            id,
            seq,
        } => cluster::on_conflict(shard, room, &from, &id, seq),
        Reply::Repaired {
            room,
            after,
            upto,
            frames,
            got,
        } => cluster::on_repaired(shard, room, after, upto, frames, got),
        Reply::Recovered {
            conn,
            room,
            nonce,
            joined,
            missed,
        } => {
            let key = (conn.key, conn.gen);
            let entry = {
                let mut rec = chat.recovering.borrow_mut();
                let entry = rec.get_mut(&room).and_then(|list| {
                    let i = list.iter().position(|r| r.key == key && r.nonce == nonce)?;
                    Some(list.swap_remove(i))
                });
                if rec.get(&room).is_some_and(Vec::is_empty) {
                    rec.remove(&room);
                }
                entry
            };
            let Some(c) = lookup(shard, conn) else {
                return;
            };
            match entry {
                Some(r) => {
                    if r.bytes > ConnShared::hard_cap(shard) {
                        return;
                    }
                    c.enqueue(shard, &joined);
                    c.enqueue(shard, &missed);
                    for f in &r.held {
                        c.enqueue(shard, f);
                    }
                    chat.add_local_member(shard, &room, key);
                }
                // The home's `Joined` is still on its way.
                None => {
                    let waiting = c
                        .chat
                        .borrow()
                        .as_ref()
                        .is_some_and(|s| s.awaits_join(&room, nonce));
                    if waiting {
                        chat.early_recoveries
                            .borrow_mut()
                            .insert((room, key), (nonce, joined, missed));
                    }
                }
            }
        }
    }
}

fn lookup(shard: &Shard, conn: ConnRef) -> Option<Rc<ConnShared>> {
    lookup_key(shard, conn.key, conn.gen)
}

fn lookup_key(shard: &Shard, key: u32, gen: u32) -> Option<Rc<ConnShared>> {
    shard
        .conns
        .borrow()
        .get(key as usize)
        .filter(|c| c.gen == gen)
        .cloned()
}
