//! A shard's homes: every room and user whose home is this shard, as one
//! sans-IO state machine.
//!
//! A room's home shard ([`crate::home_shard`]) owns its sequence: every
//! publish travels there, is numbered, encoded once into a WebSocket frame,
//! and sent once to each shard that has members. Direct messages travel the
//! same way through the recipient's user-home shard, which knows on which
//! shards the user has connections. In a cluster the room's home shard on
//! each node either numbers the room (on the room's home node) or relays it
//! from there: it forwards publishes to the home node, asks the home for the
//! room (`Sync`, answered by `Synced` on the room's topic, which proves the
//! subscription is in place), and hands each message it receives once to
//! each local shard with members.
//!
//! [`Homes::handle`] takes one [`Input`] (a request from a connection's
//! shard, a store reply, a message from another node, a timer tick) and
//! acts through [`Ports`]: deliveries to shards, frames to connections,
//! operations for the store, messages for other nodes, counters. The gateway
//! implements the ports over its rings, storage worker and mesh thread; the
//! tests here implement them with vectors.
//!
//! # Invariants
//! - Seqs of a room are gapless and given once per epoch: only the room's
//!   home numbers it, and a home that starts (or takes over) continues from
//!   the store's last seq.
//! - A home node sends a message to other nodes only once the store has it
//!   ([`Input::Stored`]), so a node that takes the room over continues after
//!   every seq anyone has seen.
//! - A relay delivers a room's seqs in order, each once: a message past the
//!   next expected seq starts a repair from history, and later messages wait
//!   for it. A message at or below `delivered` is dropped.
//! - A relay follows one home at a time; messages from another node are
//!   ignored until the live set says it is the home.
//! - A publish the store refused (a conflict) is forgotten by the duplicate
//!   window, so its retry is numbered anew: a refused seq is never acked.
//! - Bounded: requests queued while a room's sequence loads
//!   ([`MAX_QUEUED_WHILE_LOADING`]), parked resumes ([`MAX_PARKED`]),
//!   remembered emptied rooms ([`MAX_TOMBSTONES`]).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub use crate::message::UserAction;
use crate::{
    message::{ConnRef, NodeTag, Publish, Record},
    namespace::Namespaces,
    node::{NodeSet, Wire},
    proto,
    room::{HomeRoom, Sequenced},
    store::{self, Op, PresenceOp, Query, Recover, RoomMeta},
};

/// Emptied rooms whose last seq a shard remembers. Past it an arbitrary one
/// is forgotten (its seq restarts at 1 if it fills again, or the store says
/// where it stands) so that clients cycling through room names cannot grow a
/// shard's memory without bound.
pub const MAX_TOMBSTONES: usize = 100_000;

/// Requests a room may queue while its sequence loads from the store;
/// publishes past it are refused (`storage_busy`).
pub const MAX_QUEUED_WHILE_LOADING: usize = 1024;

/// Resumes a room may hold waiting for this node to catch up (cluster).
pub const MAX_PARKED: usize = 1024;

/// How long a relay waits for `Synced` before asking again.
pub const SYNC_RETRY: Duration = Duration::from_millis(500);

/// Longest a resume waits for this node to deliver up to its `since`;
/// then it is answered as it stands (`recovered:false`).
pub const PARK_FOR: Duration = Duration::from_secs(2);

/// Work for a home shard (a room's, or a user's).
#[derive(Debug)]
pub enum Request {
    Join {
        room: Arc<str>,
        user: Arc<str>,
        conn: ConnRef,
        /// Resume point: last seq seen and its epoch.
        since: Option<(u64, Box<str>)>,
        /// The connection's number for this join (see the gateway's session).
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
    /// A connection of `user` authenticated on shard `shard`. Over the
    /// node's per-user cap, the home answers [`Delivery::Refused`] instead
    /// of counting it.
    UserOnline {
        user: Arc<str>,
        shard: u16,
        conn: ConnRef,
    },
    UserOffline {
        user: Arc<str>,
        shard: u16,
    },
    /// A `/ws` connection from `ip` opened (sent to the address's home
    /// shard, [`crate::home::peer_home_shard`], when a per-address cap is
    /// set). Over the cap the home answers [`Delivery::Refused`].
    PeerOnline {
        ip: IpAddr,
        conn: ConnRef,
    },
    /// A connection the address's home counted closed.
    PeerOffline {
        ip: IpAddr,
    },
    Direct {
        to: Arc<str>,
        from: Arc<str>,
        id: Box<str>,
        body: Box<str>,
        conn: ConnRef,
    },
    /// The server API acts on every connection of `user` (sent to the
    /// user's home shard; answered [`proto::acted`] with the connections
    /// it reached on this node).
    Act {
        user: Arc<str>,
        action: UserAction,
        conn: ConnRef,
    },
}

impl Request {
    /// The room a request is about, if any.
    pub fn room(&self) -> Option<&Arc<str>> {
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
    /// messages for this connection until the store's answer arrives.
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
    /// The user's home did not count this connection online (the user is at
    /// `max_connections_per_user`): close it.
    Refused { conn: ConnRef, why: Refusal },
    /// Do this to every local connection of a user (the server API).
    Act { user: Arc<str>, action: UserAction },
}

/// Why a home refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user has `max_connections_per_user` connections on this node.
    TooManyForUser,
    /// The address has `max_connections_per_ip` connections on this node.
    TooManyForAddress,
}

/// A topic a node subscribes to on the other nodes' PUB sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    Room(&'a str),
    User(&'a str),
}

/// What the homes count (the gateway's metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// A room became active on this shard (gauge +1) ...
    RoomOpened,
    /// ... or stopped being (gauge -1).
    RoomClosed,
    Published,
    DuplicatePublish,
    /// A publish answered `storage_busy` or `storage_unavailable`.
    StorageRefusal,
    DirectMessage,
    /// The store could not say where a room stands: a provisional epoch.
    ProvisionalEpoch,
    /// A presence update the store's queue had no room for.
    PresenceDropped,
    /// A publish that went round between nodes (`room_moving`).
    Misrouted,
    /// A publish sent on to its home node.
    Forwarded,
    /// A relay saw a seq past the next one it expected.
    Gap,
    /// Seqs a repair got from history.
    Repaired(u64),
    /// Seqs no repair could get.
    Unrepaired(u64),
    /// A room changed home node.
    Rehomed,
    /// A connection refused: its user is at the per-user cap.
    UserCapRefused,
    /// A connection refused: its address is at the per-address cap.
    AddressCapRefused,
}

/// Where the homes act: implemented by the gateway over its rings, store
/// queue and mesh thread, and by the tests with vectors.
pub trait Ports {
    /// Sends a delivery to shard `to` (this one included), in order after
    /// everything sent to it before.
    fn deliver(&mut self, to: usize, d: Delivery);
    /// Queues a frame on one of this shard's connections (if it is still
    /// there).
    fn enqueue(&mut self, conn: ConnRef, frame: &[u8]);
    /// Hands an op to the store if this shard is under its queue bound;
    /// gives it back otherwise.
    #[allow(clippy::result_large_err)]
    fn try_store(&mut self, op: Op) -> Result<(), Op>;
    /// A sequence load: allowed up to twice the queue bound.
    #[allow(clippy::result_large_err)]
    fn try_store_load(&mut self, op: Op) -> Result<(), Op>;
    /// Hands an op over after [`Ports::store_has_room`] said yes; false if
    /// it was dropped all the same.
    fn store(&mut self, op: Op) -> bool;
    fn store_has_room(&self) -> bool;
    /// Neither the store nor its spill file takes writes.
    fn store_failing(&self) -> bool;
    /// A message for other nodes (dropped, counted, if the mesh is full).
    fn wire(&mut self, w: Wire);
    /// A message for other nodes, given back if the mesh is full.
    #[allow(clippy::result_large_err)]
    fn try_wire(&mut self, w: Wire) -> Result<(), Wire>;
    /// Starts (`on`) or stops receiving a topic from the other nodes.
    fn subscribe(&mut self, topic: Topic<'_>, on: bool);
    fn count(&mut self, c: Count);
}

/// The homes' settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This shard's index, and the node's shard count.
    pub me: usize,
    pub shards: usize,
    /// This node's tag.
    pub node: NodeTag,
    /// The node runs in a cluster (rooms are homed on nodes).
    pub clustered: bool,
    /// Each room's options (presence limit, ephemeral); the default
    /// namespace holds the flags' values.
    pub namespaces: Namespaces,
    /// How long the store keeps an idle room's seq and epoch; a tombstone
    /// older than that is not trusted.
    pub history_meta_ttl: Duration,
    /// The store keeps presence (presence queries go to it).
    pub store_keeps_presence: bool,
    /// The store's writes cannot fail (the embedded memory store): outside
    /// a cluster a home acks a publish as soon as the store has it.
    pub store_acks_at_home: bool,
    /// Most connections one user may hold on this node (`None`: no cap).
    pub max_connections_per_user: Option<usize>,
    /// Most `/ws` connections from one address on this node (`None`: no cap).
    pub max_connections_per_ip: Option<usize>,
}

/// The time an input is handled at.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// The shard's coarse clock.
    pub at: Instant,
    /// Microseconds since the Unix epoch (message timestamps, provisional
    /// sequences).
    pub unix_us: u64,
}

impl Now {
    /// `at` and the system's wall clock.
    pub fn at(at: Instant) -> Now {
        let unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Now { at, unix_us }
    }

    fn unix_ms(&self) -> u64 {
        self.unix_us / 1000
    }
}

/// What arrives at the homes.
#[derive(Debug)]
pub enum Input {
    /// From a connection's shard (or another node's, for publishes).
    Request(Request),
    /// The store: where a room's sequence stands (`None`: it cannot say).
    Loaded {
        room: Arc<str>,
        meta: Option<RoomMeta>,
    },
    /// The store has a message that carried a fan-out frame.
    Stored {
        room: Arc<str>,
        seq: u64,
        frame: Arc<[u8]>,
    },
    /// The store holds another home's message under a seq this home gave.
    Conflict {
        room: Arc<str>,
        from: Arc<str>,
        id: Box<str>,
        seq: u64,
    },
    /// What history had of a repair's seqs (`got` frames, concatenated).
    Repaired {
        room: Arc<str>,
        after: u64,
        upto: u64,
        frames: Vec<u8>,
        got: u64,
    },
    /// The live nodes changed.
    Nodes(Arc<NodeSet>),
    /// A home answered this node's `Sync`.
    Synced {
        room: Arc<str>,
        home: NodeTag,
        nonce: u64,
        last_seq: u64,
        epoch: Arc<str>,
    },
    /// A sequenced message from a room's home node.
    Message {
        room: Arc<str>,
        home: NodeTag,
        seq: u64,
        epoch: Arc<str>,
        frame: Arc<[u8]>,
    },
    /// An unsequenced room frame from another node (a presence event).
    Event { room: Arc<str>, frame: Arc<[u8]> },
    /// A direct message from another node for a user homed here.
    Direct { user: Arc<str>, frame: Arc<[u8]> },
    /// The server API on another node acts on a user homed here.
    Act { user: Arc<str>, action: UserAction },
    /// Time passed: ask homes again for late `Synced`s, release parked
    /// resumes. Every [`SYNC_RETRY`]` / 2` or so.
    Tick,
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

/// A room relayed from another node.
struct Relay {
    home: NodeTag,
    nonce: u64,
    /// The home answered our latest `Sync`.
    synced: bool,
    /// `delivered` and the epoch come from some home (now or before).
    ever_synced: bool,
    sent: Instant,
    /// Joins waiting for the first `Synced`.
    waiting: VecDeque<Request>,
}

impl Relay {
    /// A relay of `home`'s room; `ever_synced` when this node's members
    /// already have the room's seqs from an earlier home.
    fn new(home: NodeTag, ever_synced: bool, now: Now) -> Relay {
        Relay {
            home,
            nonce: 0,
            synced: false,
            ever_synced,
            sent: now.at,
            waiting: VecDeque::new(),
        }
    }
}

/// Seqs `after+1 ..= upto` are being fetched from history; messages that
/// arrive meanwhile wait in `held`, in arrival order.
struct Repair {
    upto: u64,
    held: Vec<(u64, Arc<str>, Arc<[u8]>)>,
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
    relay: Option<Relay>,
    /// When this node is the home: the other nodes that asked for the room.
    remote: Vec<NodeTag>,
    /// A gap being filled from history: later messages wait here.
    repair: Option<Repair>,
    /// The next load starts a new tenure (a takeover, or a conflict in the
    /// store): the sequence continues exactly from the store's last seq.
    restart: bool,
    /// In a cluster: resumes from a seq this node has not delivered yet
    /// (the client came from a node ahead of this one). They wait, up to
    /// [`PARK_FOR`], for `delivered` to catch up.
    parked: Vec<(Instant, Request)>,
    /// The room's namespace is ephemeral (decided when the room opened
    /// here): its messages are not stored.
    ephemeral: bool,
    /// Idle since a publish at this time (see `Homes::lingering`).
    lingering: Option<Instant>,
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
            ephemeral: false,
            lingering: None,
        }
    }

    /// Nobody needs the room here any more: no local member, no other node
    /// that asked for it, no resume waiting.
    fn idle(&self) -> bool {
        self.room.is_empty() && self.remote.is_empty() && self.parked.is_empty()
    }
}

/// An emptied room's last seq and epoch, and when it emptied.
type Tombstone = (u64, Arc<str>, Instant);

/// The cross-node view, in a cluster.
struct ClusterView {
    /// The live nodes (None until the mesh has settled).
    live: Option<Arc<NodeSet>>,
    /// Room requests that came before the live nodes were known.
    waiting: VecDeque<Request>,
    nonce: u64,
}

/// One shard's homes.
pub struct Homes {
    settings: Settings,
    cluster: Option<ClusterView>,
    /// Rooms homed here that have members (or a sequence being loaded).
    rooms: HashMap<Arc<str>, Home>,
    /// Last seq and epoch of rooms homed here that emptied, so a room that
    /// fills again continues without asking the store.
    tombstones: HashMap<Arc<str>, Tombstone>,
    /// Rooms opened by a publish with nobody in them (the server API), in
    /// the order they were left so: buried once idle for
    /// [`crate::room::RECENT_IDS_TTL`], so a retry still finds its seq.
    lingering: VecDeque<(Arc<str>, Instant)>,
    /// Users homed here: connections per shard.
    users: HashMap<Arc<str>, Vec<u32>>,
    /// Open connections per address homed here (only with a per-address cap).
    peers: HashMap<IpAddr, usize>,
}

impl Homes {
    pub fn new(settings: Settings) -> Homes {
        let cluster = settings.clustered.then(|| ClusterView {
            live: None,
            waiting: VecDeque::new(),
            nonce: 0,
        });
        Homes {
            settings,
            cluster,
            rooms: HashMap::new(),
            tombstones: HashMap::new(),
            lingering: VecDeque::new(),
            users: HashMap::new(),
            peers: HashMap::new(),
        }
    }

    /// False while a cluster node does not know the live nodes yet.
    pub fn cluster_ready(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.live.is_some())
    }

    /// The live nodes as this shard knows them (`None` outside a cluster or
    /// before the mesh has settled).
    pub fn live_nodes(&self) -> Option<Arc<NodeSet>> {
        self.cluster.as_ref().and_then(|c| c.live.clone())
    }

    /// Rooms active here.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Every room homed here with its users: the store's presence
    /// heartbeat refreshes these.
    pub fn presence(&self) -> Vec<(Arc<str>, Vec<Arc<str>>)> {
        self.rooms
            .iter()
            .map(|(room, h)| (room.clone(), h.room.users().cloned().collect()))
            .collect()
    }

    /// Handles one input; acts through `ports`.
    pub fn handle(&mut self, input: Input, now: Now, ports: &mut dyn Ports) {
        match input {
            Input::Request(req) => self.request(req, now, ports),
            Input::Loaded { room, meta } => self.on_loaded(room, meta, now, ports),
            Input::Stored { room, seq, frame } => self.on_stored(room, seq, frame, ports),
            Input::Conflict {
                room,
                from,
                id,
                seq,
            } => self.on_conflict(room, &from, &id, seq),
            Input::Repaired {
                room,
                after,
                upto,
                frames,
                got,
            } => self.on_repaired(room, after, upto, frames, got, ports),
            Input::Nodes(set) => self.on_nodes(set, now, ports),
            Input::Synced {
                room,
                home,
                nonce,
                last_seq,
                epoch,
            } => self.on_synced(room, home, nonce, last_seq, epoch, now, ports),
            Input::Message {
                room,
                home,
                seq,
                epoch,
                frame,
            } => self.on_message(room, home, seq, epoch, frame, ports),
            Input::Event { room, frame } => {
                if let Some(h) = self.rooms.get(&room) {
                    broadcast(ports, &room, h.room.shards(), frame);
                }
            }
            Input::Direct { user, frame } => {
                if let Some(counts) = self.users.get(&user) {
                    deliver_to_user(ports, &user, counts, &frame);
                }
            }
            Input::Act { user, action } => {
                if let Some(counts) = self.users.get(&user) {
                    act_on_user(ports, &user, counts, &action);
                }
            }
            Input::Tick => {
                if self.cluster.is_some() {
                    for req in self.resync_and_release(now, ports) {
                        self.request(req, now, ports);
                    }
                }
                self.bury_lingering(now, ports);
            }
        }
    }

    /// Sends one frame to one connection, wherever it is: this shard (the
    /// ports' `enqueue`), another shard (a delivery) or another node.
    pub fn to_conn(&self, ports: &mut dyn Ports, conn: ConnRef, frame: impl Into<Box<[u8]>>) {
        to_conn(&self.settings, ports, conn, frame.into());
    }

    /// Handles a request at its home shard. Requests for a room whose
    /// sequence is loading from the store wait, in order, until it is known.
    fn request(&mut self, req: Request, now: Now, ports: &mut dyn Ports) {
        if let Some(room) = req.room().cloned() {
            if let Some(c) = &mut self.cluster {
                match c.live.as_ref().map(|l| l.home_of(&room)) {
                    // The live nodes are not known yet.
                    None => {
                        c.waiting.push_back(req);
                        return;
                    }
                    Some(node) if node != self.settings.node => {
                        self.relay_request(req, node, now, ports);
                        return;
                    }
                    Some(_) => {}
                }
            }
            if !self.rooms.contains_key(&room)
                && matches!(
                    req,
                    Request::Join { .. } | Request::Publish(_) | Request::Sync { .. }
                )
            {
                let home = self.revive(&room, now, ports);
                self.rooms.insert(room.clone(), home);
            }
            let me = self.settings.me as u16;
            if let Some(home) = self.rooms.get_mut(&room) {
                let publish = matches!(req, Request::Publish(_));
                match &mut home.seq {
                    SeqState::Loading(queue) => {
                        if publish && queue.len() >= MAX_QUEUED_WHILE_LOADING {
                            if let Request::Publish(p) = &req {
                                refuse_publish(
                                    &self.settings,
                                    ports,
                                    p,
                                    proto::ErrorCode::StorageBusy,
                                );
                            }
                        } else {
                            queue.push_back(req);
                        }
                        return;
                    }
                    // A relay's Sync must learn the real seq and epoch too.
                    SeqState::Unknown if publish || matches!(req, Request::Sync { .. }) => {
                        let load = Op::Load { room, home: me };
                        if ports.try_store_load(load).is_ok() {
                            home.seq = SeqState::Loading(VecDeque::from([req]));
                        } else if let Request::Publish(p) = &req {
                            refuse_publish(&self.settings, ports, p, proto::ErrorCode::StorageBusy);
                        }
                        return;
                    }
                    _ => {}
                }
            }
        }
        self.dispatch(req, now, ports);
    }

    /// A room becomes active here: continue its sequence from its tombstone,
    /// or ask the store where it stands.
    fn revive(&mut self, room: &Arc<str>, now: Now, ports: &mut dyn Ports) -> Home {
        ports.count(Count::RoomOpened);
        ports.subscribe(Topic::Room(room), true);
        let ttl = self.settings.history_meta_ttl;
        let shards = self.settings.shards;
        if self.settings.namespaces.load().of(room).ephemeral {
            // Nothing of the room is in the store: it continues from the
            // tombstone, or starts at 1 in an epoch of its own (a seq is
            // never given twice in one epoch).
            let (last_seq, epoch) = match self.tombstones.remove(room) {
                Some((last_seq, epoch, at)) if now.at.saturating_duration_since(at) < ttl => {
                    (last_seq, epoch)
                }
                _ => (0, Arc::from(store::new_epoch())),
            };
            let mut home = Home::new(shards, last_seq, epoch, SeqState::Known);
            home.ephemeral = true;
            return home;
        }
        match self.tombstones.remove(room) {
            Some((last_seq, epoch, at)) if now.at.saturating_duration_since(at) < ttl => {
                Home::new(shards, last_seq, epoch, SeqState::Known)
            }
            _ => {
                let load = Op::Load {
                    room: room.clone(),
                    home: self.settings.me as u16,
                };
                let seq = match ports.try_store_load(load) {
                    Ok(()) => SeqState::Loading(VecDeque::new()),
                    // Too many loads queued: publishes will ask again.
                    Err(_) => SeqState::Unknown,
                };
                Home::new(shards, 0, Arc::from(""), seq)
            }
        }
    }

    /// A room a publish left idle (nobody in it) lingers, so its duplicate
    /// window outlives retries; `bury_lingering` closes it later.
    fn linger(&mut self, room: &Arc<str>, now: Now) {
        if let Some(h) = self.rooms.get_mut(room) {
            if h.lingering.is_none() && h.idle() && h.relay.is_none() {
                h.lingering = Some(now.at);
                self.lingering.push_back((room.clone(), now.at));
            }
        }
    }

    /// Buries the rooms that lingered idle for the duplicate window.
    fn bury_lingering(&mut self, now: Now, ports: &mut dyn Ports) {
        while let Some((room, at)) = self.lingering.front().cloned() {
            if now.at.saturating_duration_since(at) < crate::room::RECENT_IDS_TTL {
                return;
            }
            self.lingering.pop_front();
            let Some(h) = self.rooms.get_mut(&room) else {
                continue;
            };
            if h.lingering != Some(at) {
                continue;
            }
            h.lingering = None;
            if !h.idle() {
                // Someone joined: it is buried when they leave.
                continue;
            }
            if matches!(h.seq, SeqState::Loading(_)) {
                // Its publishes wait for the store: look again later.
                h.lingering = Some(now.at);
                self.lingering.push_back((room, now.at));
                continue;
            }
            if let Some(home) = self.rooms.remove(&room) {
                self.bury(room, home, now, ports);
            }
        }
    }

    /// A room emptied: forget its members and duplicate window, keep its
    /// last seq and epoch (if the store told them).
    fn bury(&mut self, room: Arc<str>, home: Home, now: Now, ports: &mut dyn Ports) {
        ports.count(Count::RoomClosed);
        ports.subscribe(Topic::Room(&room), false);
        if let Some(relay) = &home.relay {
            ports.wire(Wire::Unsync {
                to: relay.home,
                room,
                node: self.settings.node,
            });
            return;
        }
        if !matches!(home.seq, SeqState::Known) {
            return;
        }
        let t = &mut self.tombstones;
        if t.len() >= MAX_TOMBSTONES {
            if let Some(k) = t.keys().next().cloned() {
                t.remove(&k);
            }
        }
        t.insert(room, (home.room.last_seq(), home.epoch, now.at));
    }

    /// The store answered where a room's sequence stands: run what waited.
    fn on_loaded(
        &mut self,
        room: Arc<str>,
        meta: Option<RoomMeta>,
        now: Now,
        ports: &mut dyn Ports,
    ) {
        let Some(home) = self.rooms.get_mut(&room) else {
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
            // The store cannot say (unreachable): live traffic goes on in a
            // new epoch whose seqs start far above any the store can hold.
            // The store adopts the epoch when the spilled messages reach it.
            None => {
                // Far above any count of messages (the clock in µs), so it
                // cannot meet a seq the store already gave.
                home.room.restart_at(now.unix_us);
                home.epoch = Arc::from(store::new_epoch());
                ports.count(Count::ProvisionalEpoch);
            }
        }
        let last = home.room.last_seq();
        home.delivered = last;
        // This node took the room over: its members may have missed what the
        // old home stored last; they get it from history first.
        if restart && had_epoch == home.epoch && had_delivered < last && home.repair.is_none() {
            home.delivered = had_delivered;
            start_repair(&self.settings, ports, &room, home, last);
        }
        let SeqState::Loading(waiting) = std::mem::replace(&mut home.seq, SeqState::Known) else {
            return;
        };
        for req in waiting {
            self.request(req, now, ports);
        }
    }

    fn dispatch(&mut self, req: Request, now: Now, ports: &mut dyn Ports) {
        let presence_max = {
            let table = self.settings.namespaces.load();
            match req.room() {
                Some(room) => table.of(room).presence_max_members,
                None => table.default_namespace().presence_max_members,
            }
        };
        match req {
            Request::Join {
                room,
                user,
                conn,
                since,
                nonce,
                parked,
            } => {
                let clustered = self.cluster.is_some();
                let Some(home) = self.rooms.get_mut(&room) else {
                    return;
                };
                let ahead = since
                    .as_ref()
                    .is_some_and(|(s, e)| *s > home.delivered && **e == *home.epoch);
                if ahead && !parked && clustered && home.parked.len() < MAX_PARKED {
                    let join = Request::Join {
                        room: room.clone(),
                        user,
                        conn,
                        since,
                        nonce,
                        parked: true,
                    };
                    home.parked.push((now.at, join));
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
                if change.user_changed && self.settings.store_keeps_presence {
                    let op = Op::Presence(PresenceOp::Add {
                        room: room.clone(),
                        user: user.clone(),
                    });
                    send_presence(ports, op);
                }
                let resume = match since {
                    None => Resume::No,
                    // Nothing to recover from: the client is told so.
                    Some(_) if home.ephemeral => Resume::Refused,
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
                        match ports.try_store(op) {
                            Ok(()) => Resume::Pending,
                            Err(_) => Resume::Refused,
                        }
                    }
                };
                ports.deliver(
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
                    broadcast_event(&self.settings, ports, &room, shards, frame);
                }
            }
            Request::Leave {
                room,
                user,
                shard: from,
            } => {
                let Some(home) = self.rooms.get_mut(&room) else {
                    return;
                };
                let change = home.room.leave(from as usize, &user);
                let event =
                    (change.user_changed && home.room.user_count() < presence_max).then(|| {
                        (
                            home.room.shards().collect::<Vec<_>>(),
                            proto::presence_event(&room, false, &user),
                        )
                    });
                if home.idle() {
                    if let Some(home) = self.rooms.remove(&room) {
                        self.bury(room.clone(), home, now, ports);
                    }
                }
                if change.user_changed && self.settings.store_keeps_presence {
                    let op = Op::Presence(PresenceOp::Remove {
                        room: room.clone(),
                        user,
                    });
                    send_presence(ports, op);
                }
                if let Some((shards, frame)) = event {
                    broadcast_event(&self.settings, ports, &room, shards, frame);
                }
            }
            Request::Publish(p) => {
                let room = p.room.clone();
                self.publish(p, now, ports);
                self.linger(&room, now);
            }
            Request::Presence { room, conn } => {
                if self.settings.store_keeps_presence {
                    let op = Op::PresenceQuery {
                        room: room.clone(),
                        to: conn,
                        max_members: presence_max,
                    };
                    if ports.try_store(op).is_err() {
                        let frame = proto::error(proto::ErrorCode::StorageBusy, None, Some(&room));
                        self.to_conn(ports, conn, frame);
                    }
                    return;
                }
                let frame = match self.rooms.get(&room).map(|h| &h.room) {
                    Some(h) if h.user_count() <= presence_max => {
                        proto::presence(&room, h.user_count() as u64, Some(h.users().map(|u| &**u)))
                    }
                    Some(h) => proto::presence(
                        &room,
                        h.user_count() as u64,
                        None::<std::iter::Empty<&str>>,
                    ),
                    None => proto::presence(&room, 0, Some(std::iter::empty())),
                };
                self.to_conn(ports, conn, frame);
            }
            Request::Sync { room, node, nonce } => self.on_sync(room, node, nonce, ports),
            Request::Unsync { room, node } => self.on_unsync(room, node, now, ports),
            Request::History { room, query, conn } => {
                let ephemeral = match self.rooms.get(&room) {
                    Some(h) => h.ephemeral,
                    None => self.settings.namespaces.load().of(&room).ephemeral,
                };
                if ephemeral {
                    // Kept nowhere: where the room stands (its home, or what
                    // this shard remembers of it), complete only if nothing
                    // was ever sent.
                    let (seq, epoch) = match (self.rooms.get(&room), self.tombstones.get(&room)) {
                        (Some(h), _) => (h.delivered, h.epoch.clone()),
                        (None, Some((seq, epoch, _))) => (*seq, epoch.clone()),
                        (None, None) => (0, Arc::from("")),
                    };
                    let frame = proto::history(&room, &epoch, seq, seq == 0, &[]);
                    self.to_conn(ports, conn, frame);
                    return;
                }
                let upto = self
                    .rooms
                    .get(&room)
                    .filter(|h| matches!(h.seq, SeqState::Known))
                    .map(|h| h.delivered);
                let op = Op::History {
                    room: room.clone(),
                    query,
                    upto,
                    to: conn,
                };
                if ports.try_store(op).is_err() {
                    let frame = proto::error(proto::ErrorCode::StorageBusy, None, Some(&room));
                    self.to_conn(ports, conn, frame);
                }
            }
            Request::UserOnline {
                user,
                shard: at,
                conn,
            } => {
                let n = self.settings.shards;
                let counts = self.users.get(&user);
                let open: usize = counts.map_or(0, |c| c.iter().map(|&x| x as usize).sum());
                if at_cap(self.settings.max_connections_per_user, open) {
                    refuse(ports, conn, Refusal::TooManyForUser);
                } else {
                    if counts.is_none() {
                        ports.subscribe(Topic::User(&user), true);
                    }
                    self.users.entry(user).or_insert_with(|| vec![0; n])[at as usize] += 1;
                }
            }
            Request::PeerOnline { ip, conn } => {
                let open = self.peers.get(&ip).copied().unwrap_or(0);
                if at_cap(self.settings.max_connections_per_ip, open) {
                    refuse(ports, conn, Refusal::TooManyForAddress);
                } else {
                    *self.peers.entry(ip).or_insert(0) += 1;
                }
            }
            Request::PeerOffline { ip } => {
                if let Some(open) = self.peers.get_mut(&ip) {
                    *open = open.saturating_sub(1);
                    if *open == 0 {
                        self.peers.remove(&ip);
                    }
                }
            }
            Request::UserOffline { user, shard: at } => {
                if let Some(counts) = self.users.get_mut(&user) {
                    counts[at as usize] = counts[at as usize].saturating_sub(1);
                    if counts.iter().all(|&c| c == 0) {
                        self.users.remove(&user);
                        ports.subscribe(Topic::User(&user), false);
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
                let counts = self.users.get(&to).cloned().unwrap_or_default();
                let delivered: u64 = counts.iter().map(|&c| c as u64).sum();
                let clustered = self.cluster.is_some();
                if delivered > 0 || clustered {
                    ports.count(Count::DirectMessage);
                    let frame: Arc<[u8]> = proto::dm(&from, &id, now.unix_ms(), &body).into();
                    deliver_to_user(ports, &to, &counts, &frame);
                    if clustered {
                        // The nodes where the user has connections subscribe.
                        ports.wire(Wire::Direct {
                            user: to.clone(),
                            frame,
                        });
                    }
                }
                let ack = proto::dm_ack(&id, &to, delivered);
                self.to_conn(ports, conn, ack);
            }
            Request::Act { user, action, conn } => {
                let counts = self.users.get(&user).cloned().unwrap_or_default();
                act_on_user(ports, &user, &counts, &action);
                if self.cluster.is_some() {
                    // The nodes where the user has connections subscribe.
                    ports.wire(Wire::Act {
                        user: user.clone(),
                        action,
                    });
                }
                let reached: u64 = counts.iter().map(|&c| c as u64).sum();
                self.to_conn(ports, conn, proto::acted(reached));
            }
        }
    }

    /// Numbers a publish (or answers a retry with its first seq), hands it
    /// to the store, and sends it to the members (outside a cluster at
    /// once; in a cluster once the store has it).
    fn publish(&mut self, p: Publish, now: Now, ports: &mut dyn Ports) {
        if self.rooms.get(&p.room).is_some_and(|h| h.ephemeral) {
            self.publish_ephemeral(p, now, ports);
            return;
        }
        let refusal = if !ports.store_has_room() {
            Some(proto::ErrorCode::StorageBusy)
        } else if ports.store_failing() {
            Some(proto::ErrorCode::StorageUnavailable)
        } else {
            None
        };
        if let Some(code) = refusal {
            refuse_publish(&self.settings, ports, &p, code);
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
        let clustered = self.cluster.is_some();
        // Acking here saves the worker's round trip, which a publisher with
        // a window of publishes in flight waits for.
        let ack_here = !clustered && self.settings.store_acks_at_home;
        let Some(home) = self.rooms.get_mut(&room) else {
            return;
        };
        match home.room.sequence(&user, &id, now.at) {
            Sequenced::New(seq) => {
                ports.count(Count::Published);
                let ts = now.unix_ms();
                let frame = proto::message(&room, seq, &user, &id, ts, &body);
                // In a cluster a message leaves its home only once it is
                // stored, so a node that takes the room over continues after
                // every seq anyone has seen.
                let fanout = if clustered {
                    Some(Arc::from(frame))
                } else {
                    broadcast(ports, &room, home.room.shards(), frame);
                    home.delivered = seq;
                    None
                };
                let epoch = home.epoch.clone();
                let ack = ack_here.then(|| (id.clone(), room.clone(), epoch.clone()));
                let record = Record {
                    room,
                    seq,
                    from: user,
                    id,
                    ts,
                    body,
                    epoch,
                };
                // The ack comes from the store once the message is stored,
                // or from here once the store has it.
                let handed = ports.store(Op::Append {
                    record,
                    ack_to: (!ack_here).then_some(conn),
                    fanout,
                });
                if let Some((id, room, epoch)) = ack {
                    let frame = proto::ack(&id, &room, seq, &epoch, false, handed);
                    self.to_conn(ports, conn, frame);
                }
            }
            Sequenced::Duplicate(seq) => {
                ports.count(Count::DuplicatePublish);
                if ack_here {
                    let frame = proto::ack(&id, &room, seq, &home.epoch, true, true);
                    self.to_conn(ports, conn, frame);
                    return;
                }
                ports.store(Op::DuplicateAck {
                    room,
                    id,
                    seq,
                    epoch: home.epoch.clone(),
                    ack_to: conn,
                });
            }
        }
    }

    /// Numbers a publish to an ephemeral room and sends it on at once: to
    /// the members, in a cluster to the other nodes, and the ack
    /// (`"stored":false`) to the publisher. Never waits for the store.
    fn publish_ephemeral(&mut self, p: Publish, now: Now, ports: &mut dyn Ports) {
        let Publish {
            room,
            user,
            id,
            body,
            conn,
            ..
        } = p;
        let clustered = self.cluster.is_some();
        let Some(home) = self.rooms.get_mut(&room) else {
            return;
        };
        let (seq, duplicate) = match home.room.sequence(&user, &id, now.at) {
            Sequenced::New(seq) => {
                ports.count(Count::Published);
                let frame = proto::message(&room, seq, &user, &id, now.unix_ms(), &body);
                if clustered {
                    let frame: Arc<[u8]> = Arc::from(frame);
                    ports.wire(Wire::Message {
                        room: room.clone(),
                        home: self.settings.node,
                        seq,
                        epoch: home.epoch.clone(),
                        frame: frame.clone(),
                    });
                    let epoch = home.epoch.clone();
                    accept(&self.settings, ports, &room, home, seq, epoch, frame);
                } else {
                    broadcast(ports, &room, home.room.shards(), frame);
                    home.delivered = seq;
                }
                (seq, false)
            }
            Sequenced::Duplicate(seq) => {
                ports.count(Count::DuplicatePublish);
                (seq, true)
            }
        };
        let frame = proto::ack(&id, &room, seq, &home.epoch, duplicate, false);
        self.to_conn(ports, conn, frame);
    }

    /// A request for a room homed on another node.
    fn relay_request(&mut self, req: Request, home_node: NodeTag, now: Now, ports: &mut dyn Ports) {
        match req {
            Request::Publish(mut p) => {
                // Our view and the sender's disagree for a moment; a publish
                // never circles.
                if p.hops >= 2 {
                    ports.count(Count::Misrouted);
                    let frame =
                        proto::error(proto::ErrorCode::RoomMoving, Some(&p.id), Some(&p.room));
                    self.to_conn(ports, p.conn, frame);
                    return;
                }
                p.hops += u8::from(p.conn.node != self.settings.node);
                match ports.try_wire(Wire::Publish {
                    to: home_node,
                    publish: p,
                }) {
                    Ok(()) => ports.count(Count::Forwarded),
                    Err(Wire::Publish { publish: p, .. }) => {
                        let frame =
                            proto::error(proto::ErrorCode::StorageBusy, Some(&p.id), Some(&p.room));
                        self.to_conn(ports, p.conn, frame);
                    }
                    Err(_) => {}
                }
            }
            Request::Join { ref room, .. } => {
                if !self.rooms.contains_key(room) {
                    ports.count(Count::RoomOpened);
                    ports.subscribe(Topic::Room(room), true);
                    let mut relay = Relay::new(home_node, false, now);
                    send_sync(
                        &self.settings,
                        &mut self.cluster,
                        ports,
                        room,
                        &mut relay,
                        now,
                    );
                    let mut h = Home::new(self.settings.shards, 0, Arc::from(""), SeqState::Known);
                    h.relay = Some(relay);
                    h.ephemeral = self.settings.namespaces.load().of(room).ephemeral;
                    self.rooms.insert(room.clone(), h);
                }
                let home = self.rooms.get_mut(room).expect("inserted above");
                if let Some(r) = home.relay.as_mut().filter(|r| !r.ever_synced) {
                    r.waiting.push_back(req);
                    return;
                }
                self.dispatch(req, now, ports);
            }
            // Only the home answers these; our view will catch up and the
            // sender asks again.
            Request::Sync { .. } | Request::Unsync { .. } => {}
            // Membership, presence and history are this node's business.
            other => self.dispatch(other, now, ports),
        }
    }

    /// At the home: another node wants a room's messages.
    fn on_sync(&mut self, room: Arc<str>, node: NodeTag, nonce: u64, ports: &mut dyn Ports) {
        let Some(home) = self.rooms.get_mut(&room) else {
            return;
        };
        if !home.remote.contains(&node) {
            home.remote.push(node);
        }
        ports.wire(Wire::Synced {
            room,
            home: self.settings.node,
            node,
            nonce,
            last_seq: home.delivered,
            epoch: home.epoch.clone(),
        });
    }

    /// At the home: another node has no members of the room any more.
    fn on_unsync(&mut self, room: Arc<str>, node: NodeTag, now: Now, ports: &mut dyn Ports) {
        let Some(home) = self.rooms.get_mut(&room) else {
            return;
        };
        home.remote.retain(|n| *n != node);
        if home.idle() && matches!(home.seq, SeqState::Known) {
            if let Some(home) = self.rooms.remove(&room) {
                self.bury(room, home, now, ports);
            }
        }
    }

    /// At the home: the store has a message; now it goes out.
    fn on_stored(&mut self, room: Arc<str>, seq: u64, frame: Arc<[u8]>, ports: &mut dyn Ports) {
        let Some(home) = self.rooms.get_mut(&room) else {
            return;
        };
        // Always out: the PUB socket sends it only to subscribed nodes, and
        // a relay that lost and regained its link must not depend on
        // `remote`.
        if home.relay.is_none() && self.cluster.is_some() {
            ports.wire(Wire::Message {
                room: room.clone(),
                home: self.settings.node,
                seq,
                epoch: home.epoch.clone(),
                frame: frame.clone(),
            });
        }
        let epoch = home.epoch.clone();
        accept(&self.settings, ports, &room, home, seq, epoch, frame);
    }

    /// At a home: the store holds another home's messages under seqs this
    /// home gave out. Stop numbering until the store says where the room is.
    fn on_conflict(&mut self, room: Arc<str>, user: &Arc<str>, id: &str, seq: u64) {
        let Some(home) = self.rooms.get_mut(&room) else {
            return;
        };
        // Refused, not stored: its retry must be numbered anew.
        home.room.forget(user, id, seq);
        if home.relay.is_none() && matches!(home.seq, SeqState::Known) {
            home.seq = SeqState::Unknown;
            home.restart = true;
        }
    }

    /// At a relay: a message from the home node.
    fn on_message(
        &mut self,
        room: Arc<str>,
        from: NodeTag,
        seq: u64,
        epoch: Arc<str>,
        frame: Arc<[u8]>,
        ports: &mut dyn Ports,
    ) {
        let Some(home) = self.rooms.get_mut(&room) else {
            return;
        };
        match &home.relay {
            Some(r) if r.home == from && r.ever_synced => {}
            _ => return,
        }
        accept(&self.settings, ports, &room, home, seq, epoch, frame);
    }

    /// The store answered a repair: deliver what it had, then what waited.
    fn on_repaired(
        &mut self,
        room: Arc<str>,
        after: u64,
        upto: u64,
        frames: Vec<u8>,
        got: u64,
        ports: &mut dyn Ports,
    ) {
        let Some(home) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(repair) = home.repair.take_if(|r| r.upto == upto) else {
            return;
        };
        ports.count(Count::Repaired(got));
        let missing = (upto - after).saturating_sub(got);
        if missing > 0 {
            ports.count(Count::Unrepaired(missing));
            log::warn!(
                "room {room}: seqs {}..={upto} missing from history; {missing} skipped",
                after + 1
            );
        }
        if !frames.is_empty() {
            broadcast(ports, &room, home.room.shards(), frames);
        }
        home.delivered = home.delivered.max(upto);
        for (seq, epoch, frame) in repair.held {
            accept(&self.settings, ports, &room, home, seq, epoch, frame);
        }
    }

    /// At a relay: the home answered our `Sync`.
    #[allow(clippy::too_many_arguments)]
    fn on_synced(
        &mut self,
        room: Arc<str>,
        from: NodeTag,
        nonce: u64,
        last_seq: u64,
        epoch: Arc<str>,
        now: Now,
        ports: &mut dyn Ports,
    ) {
        let Some(home) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(relay) = home.relay.as_mut() else {
            return;
        };
        if relay.home != from || relay.nonce != nonce || relay.synced {
            return;
        }
        relay.synced = true;
        let waiting = std::mem::take(&mut relay.waiting);
        if !relay.ever_synced || epoch != home.epoch {
            relay.ever_synced = true;
            home.epoch = epoch;
            home.delivered = last_seq;
        } else if last_seq > home.delivered && home.repair.is_none() {
            // A new home: what the old one stored last and we never got.
            start_repair(&self.settings, ports, &room, home, last_seq);
        }
        for req in waiting {
            self.request(req, now, ports);
        }
    }

    /// The live nodes changed: rooms move to their new homes.
    fn on_nodes(&mut self, set: Arc<NodeSet>, now: Now, ports: &mut dyn Ports) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        let first = c.live.replace(set.clone()).is_none();
        // A tombstone may predate a time another node was the home.
        self.tombstones.clear();
        let mut again: Vec<Request> = Vec::new();
        let me = self.settings.node;
        let rooms: Vec<Arc<str>> = self.rooms.keys().cloned().collect();
        for room in rooms {
            let new = set.home_of(&room);
            let Some(home) = self.rooms.get_mut(&room) else {
                continue;
            };
            match home.relay.as_mut() {
                None if new == me => home.remote.retain(|n| set.is_live(*n)),
                None => {
                    ports.count(Count::Rehomed);
                    if let SeqState::Loading(q) = std::mem::replace(&mut home.seq, SeqState::Known)
                    {
                        again.extend(q);
                    }
                    home.remote.clear();
                    if home.idle() {
                        self.rooms.remove(&room);
                        ports.count(Count::RoomClosed);
                        ports.subscribe(Topic::Room(&room), false);
                        continue;
                    }
                    let mut relay = Relay::new(new, true, now);
                    send_sync(
                        &self.settings,
                        &mut self.cluster,
                        ports,
                        &room,
                        &mut relay,
                        now,
                    );
                    home.relay = Some(relay);
                }
                Some(r) if new == me => {
                    ports.count(Count::Rehomed);
                    let waiting = std::mem::take(&mut r.waiting);
                    if !r.ever_synced {
                        home.delivered = 0;
                    }
                    home.relay = None;
                    if home.ephemeral {
                        // Nothing in the store: a new tenure starts at 1 in
                        // an epoch of its own.
                        home.room.restart_at(0);
                        home.epoch = Arc::from(store::new_epoch());
                        home.delivered = 0;
                        home.seq = SeqState::Known;
                        again.extend(waiting);
                        continue;
                    }
                    home.restart = true;
                    let load = Op::Load {
                        room: room.clone(),
                        home: self.settings.me as u16,
                    };
                    home.seq = if ports.try_store_load(load).is_ok() {
                        SeqState::Loading(waiting)
                    } else {
                        again.extend(waiting);
                        SeqState::Unknown
                    };
                }
                Some(r) if r.home != new => {
                    r.home = new;
                    send_sync(&self.settings, &mut self.cluster, ports, &room, r, now);
                }
                Some(_) => {}
            }
        }
        if first {
            if let Some(c) = &mut self.cluster {
                again.extend(c.waiting.drain(..));
            }
        }
        for req in again {
            self.request(req, now, ports);
        }
    }

    /// Asks homes again for late `Synced`s; returns the parked resumes that
    /// may go on (caught up, or waited long enough).
    fn resync_and_release(&mut self, now: Now, ports: &mut dyn Ports) -> Vec<Request> {
        let mut released = Vec::new();
        for (room, home) in self.rooms.iter_mut() {
            if let Some(r) = home.relay.as_mut() {
                if !r.synced && now.at.saturating_duration_since(r.sent) >= SYNC_RETRY {
                    send_sync(&self.settings, &mut self.cluster, ports, room, r, now);
                }
            }
            if !home.parked.is_empty() {
                let delivered = home.delivered;
                let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut home.parked)
                    .into_iter()
                    .partition(|(at, req)| {
                        let caught_up = matches!(
                            req,
                            Request::Join { since: Some((s, _)), .. } if *s <= delivered
                        );
                        caught_up || now.at.saturating_duration_since(*at) >= PARK_FOR
                    });
                home.parked = wait;
                released.extend(ready.into_iter().map(|(_, req)| req));
            }
        }
        released
    }
}

/// Sends a frame to one connection, through its shard (and node).
fn to_conn(s: &Settings, ports: &mut dyn Ports, conn: ConnRef, frame: Box<[u8]>) {
    if conn.node != s.node {
        if s.clustered {
            ports.wire(Wire::ToConn { conn, frame });
        }
        return;
    }
    if conn.shard as usize == s.me {
        ports.enqueue(conn, &frame);
        return;
    }
    ports.deliver(conn.shard as usize, Delivery::ToConn { conn, frame });
}

/// Answers a publish that was not sequenced.
fn refuse_publish(s: &Settings, ports: &mut dyn Ports, p: &Publish, code: proto::ErrorCode) {
    ports.count(Count::StorageRefusal);
    let frame = proto::error(code, Some(&p.id), Some(&p.room));
    to_conn(s, ports, p.conn, frame.into());
}

/// Hands a presence update to the store; presence is soft state, so a full
/// queue drops it (counted) and the next heartbeat repairs it.
fn send_presence(ports: &mut dyn Ports, op: Op) {
    if ports.try_store(op).is_err() {
        ports.count(Count::PresenceDropped);
    }
}

/// Asks a relay's home for the room (again), under a new nonce.
fn send_sync(
    s: &Settings,
    cluster: &mut Option<ClusterView>,
    ports: &mut dyn Ports,
    room: &Arc<str>,
    relay: &mut Relay,
    now: Now,
) {
    let Some(c) = cluster else {
        return;
    };
    c.nonce += 1;
    relay.nonce = c.nonce;
    relay.synced = false;
    relay.sent = now.at;
    ports.wire(Wire::Sync {
        to: relay.home,
        room: room.clone(),
        node: s.node,
        nonce: relay.nonce,
    });
}

/// Sends a direct message to this node's connections of `user`.
/// Whether `open` connections already fill `cap`.
fn at_cap(cap: Option<usize>, open: usize) -> bool {
    cap.is_some_and(|cap| open >= cap)
}

/// Tells a connection's shard that a home did not count it, and counts that.
fn refuse(ports: &mut dyn Ports, conn: ConnRef, why: Refusal) {
    ports.count(match why {
        Refusal::TooManyForUser => Count::UserCapRefused,
        Refusal::TooManyForAddress => Count::AddressCapRefused,
    });
    ports.deliver(conn.shard as usize, Delivery::Refused { conn, why });
}

fn deliver_to_user(ports: &mut dyn Ports, user: &Arc<str>, counts: &[u32], frame: &Arc<[u8]>) {
    for (s, _) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
        ports.deliver(
            s,
            Delivery::ToUser {
                user: user.clone(),
                frame: frame.clone(),
            },
        );
    }
}

fn act_on_user(ports: &mut dyn Ports, user: &Arc<str>, counts: &[u32], action: &UserAction) {
    for (s, _) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
        ports.deliver(
            s,
            Delivery::Act {
                user: user.clone(),
                action: action.clone(),
            },
        );
    }
}

/// Sends a room event (presence) to every shard that has members of
/// `room`, and to the other nodes with members.
fn broadcast_event(
    s: &Settings,
    ports: &mut dyn Ports,
    room: &Arc<str>,
    shards: impl IntoIterator<Item = usize>,
    frame: Vec<u8>,
) {
    let frame: Arc<[u8]> = frame.into();
    if s.clustered {
        ports.wire(Wire::Event {
            room: room.clone(),
            frame: frame.clone(),
        });
    }
    broadcast(ports, room, shards, frame);
}

/// Sends one frame to every shard that has members of `room`.
fn broadcast(
    ports: &mut dyn Ports,
    room: &Arc<str>,
    shards: impl IntoIterator<Item = usize>,
    frame: impl Into<Arc<[u8]>>,
) {
    let frame: Arc<[u8]> = frame.into();
    for s in shards {
        ports.deliver(
            s,
            Delivery::Room {
                room: room.clone(),
                frame: frame.clone(),
            },
        );
    }
}

/// Delivers a message to this node's members in seq order: drops what they
/// already had, holds it while a repair runs, starts a repair when seqs are
/// missing.
fn accept(
    s: &Settings,
    ports: &mut dyn Ports,
    room: &Arc<str>,
    home: &mut Home,
    seq: u64,
    epoch: Arc<str>,
    frame: Arc<[u8]>,
) {
    if let Some(r) = &mut home.repair {
        r.held.push((seq, epoch, frame));
        return;
    }
    if epoch != home.epoch {
        // The store started the room over (it had lost it): seqs restart.
        log::info!("room {room}: new epoch {epoch} at seq {seq}");
        home.epoch = epoch;
        home.delivered = seq.saturating_sub(1);
    }
    if seq <= home.delivered {
        return;
    }
    if seq > home.delivered + 1 && home.ephemeral {
        // Never stored: nothing to repair from.
        ports.count(Count::Gap);
        ports.count(Count::Unrepaired(seq - home.delivered - 1));
    } else if seq > home.delivered + 1 {
        ports.count(Count::Gap);
        start_repair(s, ports, room, home, seq - 1);
        if let Some(r) = &mut home.repair {
            r.held.push((seq, home.epoch.clone(), frame));
            return;
        }
    }
    home.delivered = seq;
    broadcast(ports, room, home.room.shards(), frame);
}

/// Fetches seqs `home.delivered+1 ..= upto` from history for this node's
/// members; without room in the store's queue, the gap is skipped (counted).
fn start_repair(s: &Settings, ports: &mut dyn Ports, room: &Arc<str>, home: &mut Home, upto: u64) {
    let op = Op::Repair {
        room: room.clone(),
        after: home.delivered,
        upto,
        home: s.me as u16,
    };
    if ports.try_store(op).is_ok() {
        home.repair = Some(Repair {
            upto,
            held: Vec::new(),
        });
    } else {
        ports.count(Count::Unrepaired(upto - home.delivered));
        home.delivered = upto;
    }
}

#[cfg(test)]
mod tests;
