//! Chat on one shard: sessions, the local members of rooms, cross-shard
//! fan-out, and the driver of the router's [`Homes`].
//!
//! A room's home shard (`corecast_router::home_shard`) owns its sequence;
//! what a home does is the router's sans-IO state machine
//! ([`corecast_router::homes`]). This module runs it: every request, store
//! reply and message from another node for a home goes through
//! [`handle`], and the machine acts through the [`Driver`], which turns its
//! ports into ring sends, storage ops and mesh sends. What stays here is the
//! I/O side of chat: the outboxes and their forwarders, the local members of
//! each room and their feeds, resumes being answered, congestion.
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
//! - Handlers never block and hold no `RefCell` borrow across an `.await`;
//!   the driver's ports never re-enter the homes (a send to this shard is
//!   queued for its own handler task).

pub mod api;
pub mod session;

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    future::poll_fn,
    rc::Rc,
    sync::{atomic::Ordering::Relaxed, Arc},
    task::{Poll, Waker},
    time::Duration,
};

use corecast_router::{
    home_shard,
    homes::{self, Count, Homes, Input, Now, Ports, Topic, UserAction},
    node::Wire,
    user_home_shard,
};
pub use corecast_router::{
    homes::{Delivery, Request, Resume},
    message::{ConnRef, Publish},
    proto,
};
use glommio::{GlommioError, ResourceType};

use corecast_router::session::Rules;

use crate::{
    conn::{self, ConnShared, Conns},
    feed::Feed,
    flush::Flusher,
    local::Local,
    mesh::{self, Inbound, Mesh, NodeTag, Out},
    rings::{Receivers, Senders},
    storage::{Op, PresenceOp, Reply, Storage},
};
pub use session::Session;

/// A connection as chat sees it: its session is the chat session.
pub type Member = ConnShared<Session>;

/// The layers of the shard below chat, which chat works through.
pub struct Lower {
    pub local: Rc<Local>,
    pub conns: Rc<Conns<Session>>,
    pub flusher: Rc<Flusher>,
}

/// Items a task handles from one batch (mesh inbox, storage replies,
/// presence refreshes) between two chances for the shard's other tasks to
/// run: a batch can be thousands long, and the sockets must not wait for it.
pub(crate) const YIELD_EVERY: usize = 64;

/// Messages queued in a shard's outboxes above which it applies
/// back-pressure, and below which it releases it.
pub const OUTBOX_HIGH: usize = 8192;
const OUTBOX_LOW: usize = OUTBOX_HIGH / 2;

/// Slots in each cross-shard ring (per ordered pair of shards).
pub const RING_SLOTS: usize = 1024;

/// Chat settings, validated from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What every connection's session is held to.
    pub session: Rules,
    /// How long a presence entry in the store lives without a heartbeat.
    pub presence_ttl: Duration,
    /// How long the store keeps an idle room's seq and epoch; a tombstone
    /// older than that is not trusted.
    pub history_meta_ttl: Duration,
    /// Most connections one user may hold on this node (`None`: no cap).
    pub max_connections_per_user: Option<usize>,
    /// Most `/ws` connections from one address on this node (`None`: no cap).
    pub max_connections_per_ip: Option<usize>,
}

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
    /// The shard's resources, connections and flush rounds.
    pub local: Rc<Local>,
    pub conns: Rc<Conns<Session>>,
    pub flusher: Rc<Flusher>,
    /// This shard's index in the meshes (the index homes are computed in).
    pub me: usize,
    /// This node's tag.
    pub node: NodeTag,
    /// The node mesh, when the node runs in a cluster.
    mesh: Option<Mesh>,
    pub shards: usize,
    pub settings: Settings,
    requests: Outbox<Request>,
    deliveries: Outbox<Delivery>,
    pub storage: Storage,
    /// The rooms and users homed here (the router's state machine).
    homes: RefCell<Homes>,
    /// Local members waiting for their resume, per room.
    recovering: RefCell<HashMap<Arc<str>, Vec<Recovering>>>,
    /// Resume answers that arrived before the home's `Joined`.
    early_recoveries: RefCell<HashMap<(Arc<str>, LocalConn), Recovered>>,
    /// Local members of each room.
    local_rooms: RefCell<HashMap<Arc<str>, LocalRoom>>,
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
    /// Server API calls waiting for the homes' answers.
    api: api::Pending,
}

impl ChatShard {
    /// Builds the shard's chat state over its ends of the two rings.
    pub fn new(
        settings: Settings,
        requests: Senders<Request>,
        deliveries: Senders<Delivery>,
        storage: Storage,
        node: NodeTag,
        mesh: Option<Mesh>,
        lower: Lower,
    ) -> ChatShard {
        let me = requests.peer_id();
        let shards = requests.nr_consumers();
        let homes = Homes::new(homes::Settings {
            me,
            shards,
            node,
            clustered: mesh.is_some(),
            namespaces: settings.session.namespaces.clone(),
            history_meta_ttl: settings.history_meta_ttl,
            store_keeps_presence: storage.keeps_presence(),
            store_acks_at_home: storage.acks_at_home(),
            max_connections_per_user: settings.max_connections_per_user,
            max_connections_per_ip: settings.max_connections_per_ip,
        });
        let Lower {
            local,
            conns,
            flusher,
        } = lower;
        ChatShard {
            local,
            conns,
            flusher,
            me,
            node,
            mesh,
            shards,
            settings,
            requests: Outbox::new(requests),
            deliveries: Outbox::new(deliveries),
            storage,
            homes: RefCell::new(homes),
            recovering: RefCell::new(HashMap::new()),
            early_recoveries: RefCell::new(HashMap::new()),
            local_rooms: RefCell::new(HashMap::new()),
            local_users: RefCell::new(HashMap::new()),
            congestion_waiters: RefCell::new(Vec::new()),
            release_epoch: Cell::new(0),
            handler_waiters: RefCell::new(Vec::new()),
            anonymous: Cell::new(0),
            api: api::Pending::default(),
        }
    }

    /// The mesh, when this node runs in a cluster.
    pub fn mesh(&self) -> Option<&Mesh> {
        self.mesh.as_ref()
    }

    /// False while a cluster node does not know the live nodes yet.
    pub fn cluster_ready(&self) -> bool {
        self.homes.borrow().cluster_ready()
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

    pub fn request(&self, to: usize, req: Request) {
        self.requests.send(to, req, self.local.metrics());
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
    fn maybe_release(&self) {
        let deliveries = self.deliveries.backlog();
        let total = self.requests.backlog() + deliveries;
        self.local.metrics().outbox_backlog.set(total as u64);
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

    pub fn add_local_member(&self, room: &Arc<str>, key: (u32, u32)) {
        let mut rooms = self.local_rooms.borrow_mut();
        let local = rooms.entry(room.clone()).or_insert_with(|| LocalRoom {
            members: Vec::new(),
            feed: Feed::new(self.flusher.held.clone()),
        });
        local.members.push(key);
        if let Some(c) = self.conns.get(key.0, key.1) {
            c.subscribe(&local.feed);
        }
        self.local.metrics().room_members.inc();
    }

    /// Removes a local membership (or a resume in progress). Linear in the
    /// room's local members: cheap for the sizes chat rooms have on one shard.
    pub fn remove_local_member(&self, room: &str, key: (u32, u32)) {
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
                self.local.metrics().room_members.sub(1);
            }
            if let Some(c) = self.conns.get(key.0, key.1) {
                c.unsubscribe(&self.local, &local.feed);
            }
            if local.members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// The connection `conn` names, if it is still open.
    fn lookup(&self, conn: ConnRef) -> Option<Rc<Member>> {
        self.conns.get(conn.key, conn.gen)
    }

    /// Queues a frame for one of this shard's connections, or completes the
    /// server API call the reference names.
    fn to_local(&self, conn: ConnRef, frame: &[u8]) {
        if self.api.complete(conn, frame) {
            return;
        }
        if let Some(c) = self.lookup(conn) {
            c.enqueue(&self.local, frame);
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

/// The homes' ports on a running shard: rings, the storage worker's queue,
/// the mesh thread, the shard's metrics.
struct Driver<'a> {
    chat: &'a ChatShard,
}

impl Ports for Driver<'_> {
    fn deliver(&mut self, to: usize, d: Delivery) {
        let chat = self.chat;
        chat.deliveries.send(to, d, self.chat.local.metrics());
    }

    fn enqueue(&mut self, conn: ConnRef, frame: &[u8]) {
        self.chat.to_local(conn, frame);
    }

    fn try_store(&mut self, op: Op) -> Result<(), Op> {
        let chat = self.chat;
        chat.storage.try_send(chat.me, op)
    }

    fn try_store_load(&mut self, op: Op) -> Result<(), Op> {
        let chat = self.chat;
        chat.storage.try_send_load(chat.me, op)
    }

    fn store(&mut self, op: Op) -> bool {
        let chat = self.chat;
        chat.storage.send(chat.me, op)
    }

    fn store_has_room(&self) -> bool {
        let chat = self.chat;
        chat.storage.has_room(chat.me)
    }

    fn store_failing(&self) -> bool {
        self.chat.storage.failing()
    }

    fn wire(&mut self, w: Wire) {
        if let Some(mesh) = &self.chat.mesh {
            mesh.wire(w);
        }
    }

    fn try_wire(&mut self, w: Wire) -> Result<(), Wire> {
        match &self.chat.mesh {
            Some(mesh) => mesh.try_wire(w),
            None => Err(w),
        }
    }

    fn subscribe(&mut self, topic: Topic<'_>, on: bool) {
        let Some(mesh) = &self.chat.mesh else {
            return;
        };
        let t = match topic {
            Topic::Room(room) => mesh::wire::room_topic(room),
            Topic::User(user) => mesh::wire::user_topic(user),
        };
        mesh.send(if on {
            Out::Subscribe(t)
        } else {
            Out::Unsubscribe(t)
        });
    }

    fn count(&mut self, c: Count) {
        let m = self.chat.local.metrics();
        let chat = self.chat;
        let mesh = chat.mesh.as_ref().map(|mesh| &mesh.metrics);
        match c {
            Count::RoomOpened => m.rooms.inc(),
            Count::RoomClosed => m.rooms.sub(1),
            Count::Published => m.publishes.inc(),
            Count::DuplicatePublish => m.duplicate_publishes.inc(),
            Count::StorageRefusal => m.storage_refusals.inc(),
            Count::DirectMessage => m.direct_messages.inc(),
            Count::ProvisionalEpoch => m.provisional_epochs.inc(),
            Count::PresenceDropped => {
                chat.storage.metrics.presence_dropped.fetch_add(1, Relaxed);
            }
            Count::Misrouted => bump(mesh.map(|x| &x.misrouted), 1),
            Count::Forwarded => bump(mesh.map(|x| &x.forwarded), 1),
            Count::Gap => bump(mesh.map(|x| &x.gaps), 1),
            Count::Repaired(n) => bump(mesh.map(|x| &x.repaired), n),
            Count::Unrepaired(n) => bump(mesh.map(|x| &x.unrepaired), n),
            Count::Rehomed => bump(mesh.map(|x| &x.rehomed), 1),
            Count::UserCapRefused => m.user_cap_refusals.inc(),
            Count::AddressCapRefused => m.address_cap_refusals.inc(),
        }
    }
}

fn bump(counter: Option<&std::sync::atomic::AtomicU64>, n: u64) {
    if let Some(c) = counter {
        c.fetch_add(n, Relaxed);
    }
}

/// Hands one input to the shard's homes.
fn handle(chat: &ChatShard, input: Input) {
    let now = Now::at(chat.local.clock.get());
    let mut driver = Driver { chat };
    chat.homes.borrow_mut().handle(input, now, &mut driver);
}

fn handle_request(chat: &ChatShard, req: Request) {
    handle(chat, Input::Request(req));
}

/// Starts the tasks that drain the outboxes and handle what arrives.
pub fn spawn_tasks(
    chat: &Rc<ChatShard>,
    mut requests: Receivers<Request>,
    mut deliveries: Receivers<Delivery>,
) {
    for peer in 0..chat.shards {
        if peer == chat.me {
            continue;
        }
        spawn_forwarder(chat, peer, |c| &c.requests);
        spawn_forwarder(chat, peer, |c| &c.deliveries);
    }
    // Requests: from each peer's ring, and from this shard's own queue.
    for (_, stream) in requests.streams() {
        let s = chat.clone();
        glommio::spawn_local(async move {
            while let Some(req) = stream.recv().await {
                handle_request(&s, req);
                pause_while_congested(&s).await;
            }
        })
        .detach();
    }
    let s = chat.clone();
    glommio::spawn_local(async move {
        loop {
            let req = s.requests.queues[s.me].pop().await;
            handle_request(&s, req);
            s.maybe_release();
            pause_while_congested(&s).await;
        }
    })
    .detach();
    for (_, stream) in deliveries.streams() {
        let s = chat.clone();
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
    let s = chat.clone();
    glommio::spawn_local(async move {
        loop {
            let replies = poll_fn(|cx| s.storage.inbox(s.me).poll_recv(cx)).await;
            for (i, r) in replies.into_iter().enumerate() {
                handle_reply(&s, r);
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    glommio::yield_if_needed().await;
                }
            }
            s.maybe_release();
            glommio::yield_if_needed().await;
        }
    })
    .detach();
    if chat.storage.keeps_presence() {
        spawn_presence_heartbeat(chat);
    }
    spawn_mesh_tasks(chat);
    let s = chat.clone();
    glommio::spawn_local(async move {
        loop {
            let d = s.deliveries.queues[s.me].pop().await;
            handle_delivery(&s, d);
            s.maybe_release();
            glommio::yield_if_needed().await;
        }
    })
    .detach();
}

/// Drains one outbox's queue for `peer` into the ring, waiting for space.
fn spawn_forwarder<T: Send + 'static>(
    chat: &Rc<ChatShard>,
    peer: usize,
    outbox: fn(&ChatShard) -> &Outbox<T>,
) {
    let s = chat.clone();
    glommio::spawn_local(async move {
        let outbox = outbox(&s);
        loop {
            let msg = outbox.queues[peer].pop().await;
            outbox.in_flight[peer].set(true);
            let sent = outbox.senders.send_to(peer, msg).await;
            outbox.in_flight[peer].set(false);
            s.maybe_release();
            if sent.is_err() {
                return;
            }
        }
    })
    .detach();
}

/// Refreshes the store's presence entries of the rooms homed here, three
/// times per presence TTL, so they outlive no node by more than the TTL.
fn spawn_presence_heartbeat(chat: &Rc<ChatShard>) {
    let s = chat.clone();
    let every = (s.settings.presence_ttl / 3).max(Duration::from_millis(100));
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(every).await;
            let rooms = s.homes.borrow().presence();
            for (i, (room, users)) in rooms.into_iter().enumerate() {
                let op = Op::Presence(PresenceOp::Refresh { room, users });
                if s.storage.try_send(s.me, op).is_err() {
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

/// In a cluster: the inbox from the mesh thread, and the timer that asks
/// homes again when a `Synced` is late and releases parked resumes.
fn spawn_mesh_tasks(chat: &Rc<ChatShard>) {
    let Some(mesh) = chat.mesh.clone() else {
        // Alone, the homes' timer only buries rooms the server API left
        // lingering.
        let s = chat.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_secs(1)).await;
                handle(&s, Input::Tick);
                glommio::yield_if_needed().await;
            }
        })
        .detach();
        return;
    };
    let s = chat.clone();
    glommio::spawn_local(async move {
        loop {
            let batch = poll_fn(|cx| mesh.inbox(s.me).poll_recv(cx)).await;
            // A batch holds up to a SUB socket's high-water mark: give the
            // shard's sockets a turn between slices of it.
            for (i, inbound) in batch.into_iter().enumerate() {
                on_inbound(&s, inbound);
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    glommio::yield_if_needed().await;
                }
            }
            s.maybe_release();
            glommio::yield_if_needed().await;
        }
    })
    .detach();
    let s = chat.clone();
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(homes::SYNC_RETRY / 2).await;
            handle(&s, Input::Tick);
            glommio::yield_if_needed().await;
        }
    })
    .detach();
}

/// Hands what the mesh thread brought to the homes (or, for a frame to one
/// of this shard's connections, straight to it).
fn on_inbound(chat: &ChatShard, inbound: Inbound) {
    let input = match inbound {
        Inbound::Nodes(set) => Input::Nodes(set),
        Inbound::Wire(w) => match w {
            Wire::Publish { publish, .. } => Input::Request(Request::Publish(publish)),
            Wire::Sync {
                room, node, nonce, ..
            } => Input::Request(Request::Sync { room, node, nonce }),
            Wire::Unsync { room, node, .. } => Input::Request(Request::Unsync { room, node }),
            Wire::Synced {
                room,
                home,
                node,
                nonce,
                last_seq,
                epoch,
            } if node == chat.node => Input::Synced {
                room,
                home,
                nonce,
                last_seq,
                epoch,
            },
            Wire::Message {
                room,
                home,
                seq,
                epoch,
                frame,
            } => Input::Message {
                room,
                home,
                seq,
                epoch,
                frame,
            },
            Wire::Event { room, frame } => Input::Event { room, frame },
            Wire::Direct { user, frame } => Input::Direct { user, frame },
            Wire::Act { user, action } => Input::Act { user, action },
            Wire::ToConn { conn, frame } => {
                chat.to_local(conn, &frame);
                return;
            }
            Wire::Synced { .. } | Wire::Heartbeat { .. } => return,
        },
    };
    handle(chat, input);
}

async fn pause_while_congested(chat: &Rc<ChatShard>) {
    poll_fn(|cx| {
        if chat.deliveries_congested() {
            let mut w = chat.handler_waiters.borrow_mut();
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

/// Applies a delivery to this shard's connections. Never sends across shards
/// except to undo a join nobody wants any more.
fn handle_delivery(chat: &ChatShard, d: Delivery) {
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
            let live = chat.lookup(conn);
            let wanted = live.as_ref().is_some_and(|c| {
                c.app
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
                            c.enqueue(&chat.local, &joined);
                            c.enqueue(&chat.local, &missed);
                            chat.add_local_member(&room, key);
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
                            chat.add_local_member(&room, key);
                            c.enqueue(
                                &chat.local,
                                &proto::joined(&room, seq, members, &epoch, resumed),
                            );
                        }
                    }
                }
                // The client left (or went away) before the join completed.
                _ => chat.request(
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
            hold_for_recovering(chat, &room, &frame);
            // Scheduling, cutting off and timing members touches only their
            // own flags and cursors, never the room table, so the borrow
            // can stay.
            let rooms = chat.local_rooms.borrow();
            let Some(local) = rooms.get(&room) else {
                return;
            };
            chat.local
                .metrics()
                .deliveries
                .add(local.members.len() as u64);
            chat.flusher.appended(frame.len());
            if local.feed.push(frame) {
                for &(key, gen) in &local.members {
                    if let Some(c) = chat.conns.get(key, gen) {
                        chat.flusher.schedule(&c, key, gen);
                    }
                }
            }
            let budget = chat.local.limits.outbound_budget_bytes;
            if local.feed.needs_scan(budget) {
                check_lag(chat, local, budget);
            }
        }
        Delivery::ToConn { conn, frame } => chat.to_local(conn, &frame),
        Delivery::Refused { conn, why } => {
            // The session's deadline becomes now; the connection's timer,
            // fired at once, closes it with the refusal's code.
            let Some(c) = chat.lookup(conn) else { return };
            if let Some(session) = c.app.borrow_mut().as_mut() {
                session.refuse(why, chat.local.clock.get());
            }
            c.fired.set(true);
            c.wake();
        }
        Delivery::ToUser { user, frame } => {
            let users = chat.local_users.borrow();
            for &(key, gen) in users.get(&user).map_or(&[][..], |v| v.as_slice()) {
                if let Some(c) = chat.conns.get(key, gen) {
                    c.enqueue(&chat.local, &frame);
                }
            }
        }
        Delivery::Act { user, action } => {
            // Unsubscribing changes the user's table (never its connections),
            // so the keys are copied out first.
            let keys = chat.local_users.borrow().get(&user).cloned();
            for (key, gen) in keys.unwrap_or_default() {
                let Some(c) = chat.conns.get(key, gen) else {
                    continue;
                };
                let me = ConnRef {
                    node: chat.node,
                    shard: chat.me as u16,
                    key,
                    gen,
                };
                session::on_act(chat, &c, me, &action);
            }
        }
    }
}

/// Looks at how much each member of a room has queued, in all its rooms
/// and its own output: past the hard cap it is cut off from its feeds and
/// closed as a slow consumer (so no feed holds frames for it any more),
/// past the budget its slow-consumer clock starts. A member that reads
/// sends its frames and never gets there.
fn check_lag(chat: &ChatShard, local: &LocalRoom, budget: usize) {
    let hard_cap = conn::hard_cap(&chat.local);
    for &(key, gen) in &local.members {
        let Some(c) = chat.conns.get(key, gen) else {
            continue;
        };
        match c.queued() {
            q if q > hard_cap => c.cut_off(&chat.local),
            q if q > budget => c.over_budget(&chat.local),
            _ => {}
        }
    }
}

/// Keeps a room frame for the members whose resume is still being
/// answered; one that would hold more than its hard cap is closed.
fn hold_for_recovering(chat: &ChatShard, room: &Arc<str>, frame: &Arc<[u8]>) {
    let mut recovering = chat.recovering.borrow_mut();
    if recovering.is_empty() {
        return;
    }
    let Some(list) = recovering.get_mut(room) else {
        return;
    };
    let cap = conn::hard_cap(&chat.local);
    for r in list.iter_mut() {
        r.bytes += frame.len();
        if r.bytes > cap {
            if let Some(c) = chat.conns.get(r.key.0, r.key.1) {
                c.cut_off(&chat.local);
            }
            r.held = Vec::new();
        } else {
            r.held.push(frame.clone());
        }
    }
}

/// Handles what the storage worker sent back.
fn handle_reply(chat: &ChatShard, reply: Reply) {
    match reply {
        Reply::ToConn { conn, frame } => {
            let mut driver = Driver { chat };
            chat.homes.borrow().to_conn(&mut driver, conn, frame);
        }
        Reply::Loaded { room, meta } => handle(chat, Input::Loaded { room, meta }),
        Reply::Stored { room, seq, frame } => handle(chat, Input::Stored { room, seq, frame }),
        Reply::Conflict {
            room,
            from,
            id,
            seq,
        } => handle(
            chat,
            Input::Conflict {
                room,
                from,
                id,
                seq,
            },
        ),
        Reply::Repaired {
            room,
            after,
            upto,
            frames,
            got,
        } => handle(
            chat,
            Input::Repaired {
                room,
                after,
                upto,
                frames,
                got,
            },
        ),
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
            let Some(c) = chat.lookup(conn) else {
                return;
            };
            match entry {
                Some(r) => {
                    if r.bytes > conn::hard_cap(&chat.local) {
                        return;
                    }
                    c.enqueue(&chat.local, &joined);
                    c.enqueue(&chat.local, &missed);
                    for f in &r.held {
                        c.enqueue(&chat.local, f);
                    }
                    chat.add_local_member(&room, key);
                }
                // The home's `Joined` is still on its way.
                None => {
                    let waiting = c
                        .app
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
