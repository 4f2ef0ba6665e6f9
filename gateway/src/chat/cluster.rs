//! Rooms across nodes: relaying a room from its home node, re-homing when
//! nodes come and go, and filling gaps from history.
//!
//! On every node, a room's home shard (a pure function of its name) keeps
//! the room's [`Home`]. On the room's home node (a rendezvous hash over the
//! live nodes) that shard sequences the room; on every other node with
//! members it is a relay: it forwards publishes to the home node, asks the
//! home for the room (`Sync`, answered by `Synced` on the room's topic,
//! which proves the subscription is in place), and hands each message it
//! receives once to each local shard with members.
//!
//! # Invariants
//! - A home node sends a message to other nodes only once the store has it
//!   (`Reply::Stored`), and the store's last seq is where a new home goes
//!   on: no node ever sees two messages with one seq of one epoch.
//! - A relay delivers a room's seqs in order, each once: a message past the
//!   next expected seq starts a repair from history ([`Repair`]), and later
//!   messages wait for it. A message at or below `delivered` is dropped.
//! - A relay follows one home at a time (`Relay::home`); messages from
//!   another node are ignored until the live set says it is the home.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use super::{
    broadcast, deliver_to_user, handle_request, lookup, proto, ChatShard, Home, Request, SeqState,
};
use crate::{
    mesh::{wire, Inbound, Mesh, NodeSet, NodeTag, Out, Wire},
    shard::Shard,
    storage::Op,
};

/// How long a relay waits for `Synced` before asking again.
const SYNC_RETRY: Duration = Duration::from_millis(500);
/// Longest a resume waits for this node to deliver up to its `since`;
/// then it is answered as it stands (`recovered:false`).
pub(super) const PARK_FOR: Duration = Duration::from_secs(2);

/// A node's cross-node state, on each shard.
pub(super) struct Cluster {
    pub mesh: Mesh,
    /// The live nodes (None until the mesh thread has settled).
    live: std::cell::RefCell<Option<Arc<NodeSet>>>,
    /// Room requests that came before the live nodes were known.
    pub waiting: std::cell::RefCell<VecDeque<Request>>,
    nonce: std::cell::Cell<u64>,
}

impl Cluster {
    pub fn new(mesh: Mesh) -> Cluster {
        Cluster {
            mesh,
            live: std::cell::RefCell::new(None),
            waiting: std::cell::RefCell::new(VecDeque::new()),
            nonce: std::cell::Cell::new(0),
        }
    }

    /// The room's home node, once the live nodes are known.
    pub fn home_of(&self, room: &str) -> Option<NodeTag> {
        self.live.borrow().as_ref().map(|l| l.home_of(room))
    }

    fn next_nonce(&self) -> u64 {
        self.nonce.set(self.nonce.get() + 1);
        self.nonce.get()
    }
}

/// A room relayed from another node.
pub(super) struct Relay {
    pub home: NodeTag,
    nonce: u64,
    /// The home answered our latest `Sync`.
    synced: bool,
    /// `delivered` and the epoch come from some home (now or before).
    ever_synced: bool,
    sent: Instant,
    /// Joins waiting for the first `Synced`.
    waiting: VecDeque<Request>,
}

/// Seqs `after+1 ..= upto` are being fetched from history; messages that
/// arrive meanwhile wait in `held`, in arrival order.
pub(super) struct Repair {
    upto: u64,
    held: Vec<(u64, Arc<str>, Arc<[u8]>)>,
}

impl ChatShard {
    /// The mesh, when this node runs in a cluster.
    pub fn mesh(&self) -> Option<&Mesh> {
        self.cluster.as_ref().map(|c| &c.mesh)
    }

    /// False while a cluster node does not know the live nodes yet.
    pub fn cluster_ready(&self) -> bool {
        self.cluster
            .as_ref()
            .is_none_or(|c| c.live.borrow().is_some())
    }

    /// Starts (`on`) or stops receiving a room's or user's topic (`topic`
    /// of `name`) from the other nodes. Nothing to do on a lone node.
    pub(super) fn subscribe(&self, topic: fn(&str) -> Vec<u8>, name: &str, on: bool) {
        if let Some(c) = &self.cluster {
            let t = topic(name);
            c.mesh.send(if on {
                Out::Subscribe(t)
            } else {
                Out::Unsubscribe(t)
            });
        }
    }

    /// Sends a message to a room's home node.
    pub(super) fn tell_home(&self, home: NodeTag, msg: impl FnOnce(NodeTag) -> Wire) {
        if let Some(c) = &self.cluster {
            c.mesh.wire(msg(home));
        }
    }

    fn send_sync(&self, room: &Arc<str>, relay: &mut Relay) {
        let Some(c) = &self.cluster else {
            return;
        };
        relay.nonce = c.next_nonce();
        relay.synced = false;
        relay.sent = Instant::now();
        c.mesh.wire(Wire::Sync {
            to: relay.home,
            room: room.clone(),
            node: self.node,
            nonce: relay.nonce,
        });
    }
}

/// A request for a room homed on another node.
pub(super) fn relay_request(shard: &Shard, req: Request, home_node: NodeTag) {
    let chat = &shard.chat;
    let Some(c) = &chat.cluster else {
        return;
    };
    match req {
        Request::Publish(mut p) => {
            // Our view and the sender's disagree for a moment; a publish
            // never circles.
            if p.hops >= 2 {
                c.mesh.metrics.misrouted.fetch_add(1, Relaxed);
                let frame = proto::error(proto::ErrorCode::RoomMoving, Some(&p.id), Some(&p.room));
                chat.to_conn(shard, p.conn, frame);
                return;
            }
            p.hops += u8::from(p.conn.node != chat.node);
            match c.mesh.try_wire(Wire::Publish {
                to: home_node,
                publish: p,
            }) {
                Ok(()) => {
                    c.mesh.metrics.forwarded.fetch_add(1, Relaxed);
                }
                Err(Wire::Publish { publish: p, .. }) => {
                    let frame =
                        proto::error(proto::ErrorCode::StorageBusy, Some(&p.id), Some(&p.room));
                    chat.to_conn(shard, p.conn, frame);
                }
                Err(_) => {}
            }
        }
        Request::Join { ref room, .. } => {
            let mut homes = chat.homes.borrow_mut();
            let home = homes.entry(room.clone()).or_insert_with(|| {
                shard.metrics().rooms.inc();
                chat.subscribe(wire::room_topic, room, true);
                let mut relay = Relay {
                    home: home_node,
                    nonce: 0,
                    synced: false,
                    ever_synced: false,
                    sent: Instant::now(),
                    waiting: VecDeque::new(),
                };
                chat.send_sync(room, &mut relay);
                let mut h = Home::new(chat.shards, 0, Arc::from(""), SeqState::Known);
                h.relay = Some(relay);
                h
            });
            if let Some(r) = home.relay.as_mut().filter(|r| !r.ever_synced) {
                r.waiting.push_back(req);
                return;
            }
            drop(homes);
            super::dispatch_request(shard, req);
        }
        // Only the home answers these; our view will catch up and the
        // sender asks again.
        Request::Sync { .. } | Request::Unsync { .. } => {}
        // Membership, presence and history are this node's business.
        other => super::dispatch_request(shard, other),
    }
}

/// At the home: another node wants a room's messages.
pub(super) fn on_sync(shard: &Shard, room: Arc<str>, node: NodeTag, nonce: u64) {
    let chat = &shard.chat;
    let mut homes = chat.homes.borrow_mut();
    let Some(home) = homes.get_mut(&room) else {
        return;
    };
    if !home.remote.contains(&node) {
        home.remote.push(node);
    }
    let w = Wire::Synced {
        room: room.clone(),
        home: chat.node,
        node,
        nonce,
        last_seq: home.delivered,
        epoch: home.epoch.clone(),
    };
    drop(homes);
    if let Some(c) = &chat.cluster {
        c.mesh.wire(w);
    }
}

/// At the home: another node has no members of the room any more.
pub(super) fn on_unsync(shard: &Shard, room: Arc<str>, node: NodeTag) {
    let chat = &shard.chat;
    let mut homes = chat.homes.borrow_mut();
    let Some(home) = homes.get_mut(&room) else {
        return;
    };
    home.remote.retain(|n| *n != node);
    if home.idle() && matches!(home.seq, SeqState::Known) {
        if let Some(home) = homes.remove(&room) {
            drop(homes);
            chat.bury(room, home, shard.metrics());
        }
    }
}

/// At the home: the store has a message; now it goes out.
pub(super) fn on_stored(shard: &Shard, room: Arc<str>, seq: u64, frame: Arc<[u8]>) {
    let chat = &shard.chat;
    let mut homes = chat.homes.borrow_mut();
    let Some(home) = homes.get_mut(&room) else {
        return;
    };
    // Always out: the PUB socket sends it only to subscribed nodes, and a
    // relay that lost and regained its link must not depend on `remote`.
    if home.relay.is_none() {
        if let Some(c) = &chat.cluster {
            c.mesh.wire(Wire::Message {
                room: room.clone(),
                home: chat.node,
                seq,
                epoch: home.epoch.clone(),
                frame: frame.clone(),
            });
        }
    }
    let epoch = home.epoch.clone();
    accept(shard, &room, home, seq, epoch, frame);
}

/// At a home: the store holds another home's messages under seqs this
/// home gave out. Stop numbering until the store says where the room is.
pub(super) fn on_conflict(shard: &Shard, room: Arc<str>, user: &Arc<str>, id: &str, seq: u64) {
    let mut homes = shard.chat.homes.borrow_mut();
    let Some(home) = homes.get_mut(&room) else {
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
    shard: &Shard,
    room: Arc<str>,
    from: NodeTag,
    seq: u64,
    epoch: Arc<str>,
    frame: Arc<[u8]>,
) {
    let mut homes = shard.chat.homes.borrow_mut();
    let Some(home) = homes.get_mut(&room) else {
        return;
    };
    match &home.relay {
        Some(r) if r.home == from && r.ever_synced => {}
        _ => return,
    }
    accept(shard, &room, home, seq, epoch, frame);
}

/// Delivers a message to this node's members in seq order: drops what
/// they already had, holds it while a repair runs, starts a repair when
/// seqs are missing.
fn accept(
    shard: &Shard,
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
    if seq > home.delivered + 1 {
        if let Some(c) = &shard.chat.cluster {
            c.mesh.metrics.gaps.fetch_add(1, Relaxed);
        }
        start_repair(shard, room, home, seq - 1);
        if let Some(r) = &mut home.repair {
            r.held.push((seq, home.epoch.clone(), frame));
            return;
        }
    }
    home.delivered = seq;
    broadcast(shard, room, home.room.shards(), frame);
}

/// Fetches seqs `home.delivered+1 ..= upto` from history for this node's
/// members; without room in the store's queue, the gap is skipped (counted).
pub(super) fn start_repair(shard: &Shard, room: &Arc<str>, home: &mut Home, upto: u64) {
    let chat = &shard.chat;
    let op = Op::Repair {
        room: room.clone(),
        after: home.delivered,
        upto,
        home: chat.me as u16,
    };
    if chat.storage.try_send(chat.me, op).is_ok() {
        home.repair = Some(Repair {
            upto,
            held: Vec::new(),
        });
    } else {
        if let Some(c) = &chat.cluster {
            let n = upto - home.delivered;
            c.mesh.metrics.unrepaired.fetch_add(n, Relaxed);
        }
        home.delivered = upto;
    }
}

/// The store answered a repair: deliver what it had, then what waited.
pub(super) fn on_repaired(
    shard: &Shard,
    room: Arc<str>,
    after: u64,
    upto: u64,
    frames: Vec<u8>,
    got: u64,
) {
    let chat = &shard.chat;
    let mut homes = chat.homes.borrow_mut();
    let Some(home) = homes.get_mut(&room) else {
        return;
    };
    let Some(repair) = home.repair.take_if(|r| r.upto == upto) else {
        return;
    };
    if let Some(c) = &chat.cluster {
        c.mesh.metrics.repaired.fetch_add(got, Relaxed);
        let missing = (upto - after).saturating_sub(got);
        if missing > 0 {
            c.mesh.metrics.unrepaired.fetch_add(missing, Relaxed);
            log::warn!(
                "room {room}: seqs {}..={upto} missing from history; {missing} skipped",
                after + 1
            );
        }
    }
    if !frames.is_empty() {
        broadcast(shard, &room, home.room.shards(), frames);
    }
    home.delivered = home.delivered.max(upto);
    for (seq, epoch, frame) in repair.held {
        accept(shard, &room, home, seq, epoch, frame);
    }
}

/// At a relay: the home answered our `Sync`.
fn on_synced(
    shard: &Shard,
    room: Arc<str>,
    from: NodeTag,
    nonce: u64,
    last_seq: u64,
    epoch: Arc<str>,
) {
    let chat = &shard.chat;
    let mut homes = chat.homes.borrow_mut();
    let Some(home) = homes.get_mut(&room) else {
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
        start_repair(shard, &room, home, last_seq);
    }
    drop(homes);
    for req in waiting {
        handle_request(shard, req);
    }
}

/// The live nodes changed: rooms move to their new homes.
fn on_nodes(shard: &Shard, set: Arc<NodeSet>) {
    let chat = &shard.chat;
    let Some(c) = &chat.cluster else {
        return;
    };
    let first = c.live.replace(Some(set.clone())).is_none();
    // A tombstone may predate a time another node was the home.
    chat.tombstones.borrow_mut().clear();
    let mut again: Vec<Request> = Vec::new();
    let rooms: Vec<Arc<str>> = chat.homes.borrow().keys().cloned().collect();
    for room in rooms {
        let new = set.home_of(&room);
        let mut homes = chat.homes.borrow_mut();
        let Some(home) = homes.get_mut(&room) else {
            continue;
        };
        match home.relay.as_mut() {
            None if new == chat.node => home.remote.retain(|n| set.is_live(*n)),
            None => {
                c.mesh.metrics.rehomed.fetch_add(1, Relaxed);
                if let SeqState::Loading(q) = std::mem::replace(&mut home.seq, SeqState::Known) {
                    again.extend(q);
                }
                home.remote.clear();
                if home.idle() {
                    if let Some(h) = homes.remove(&room) {
                        drop(homes);
                        shard.metrics().rooms.sub(1);
                        chat.subscribe(wire::room_topic, &room, false);
                        drop(h);
                    }
                    continue;
                }
                let mut relay = Relay {
                    home: new,
                    nonce: 0,
                    synced: false,
                    ever_synced: true,
                    sent: Instant::now(),
                    waiting: VecDeque::new(),
                };
                chat.send_sync(&room, &mut relay);
                home.relay = Some(relay);
            }
            Some(r) if new == chat.node => {
                c.mesh.metrics.rehomed.fetch_add(1, Relaxed);
                let waiting = std::mem::take(&mut r.waiting);
                if !r.ever_synced {
                    home.delivered = 0;
                }
                home.relay = None;
                home.restart = true;
                let load = Op::Load {
                    room: room.clone(),
                    home: chat.me as u16,
                };
                home.seq = if chat.storage.try_send_load(chat.me, load).is_ok() {
                    SeqState::Loading(waiting)
                } else {
                    again.extend(waiting);
                    SeqState::Unknown
                };
            }
            Some(r) if r.home != new => {
                r.home = new;
                chat.send_sync(&room, r);
            }
            Some(_) => {}
        }
    }
    if first {
        again.extend(c.waiting.borrow_mut().drain(..));
    }
    for req in again {
        handle_request(shard, req);
    }
}

/// Handles what the mesh thread brought.
fn on_inbound(shard: &Shard, inbound: Inbound) {
    let chat = &shard.chat;
    match inbound {
        Inbound::Nodes(set) => on_nodes(shard, set),
        Inbound::Wire(w) => match w {
            Wire::Publish { publish, .. } => handle_request(shard, Request::Publish(publish)),
            Wire::Sync {
                room, node, nonce, ..
            } => handle_request(shard, Request::Sync { room, node, nonce }),
            Wire::Unsync { room, node, .. } => {
                handle_request(shard, Request::Unsync { room, node })
            }
            Wire::Synced {
                room,
                home,
                node,
                nonce,
                last_seq,
                epoch,
            } if node == chat.node => on_synced(shard, room, home, nonce, last_seq, epoch),
            Wire::Message {
                room,
                home,
                seq,
                epoch,
                frame,
            } => on_message(shard, room, home, seq, epoch, frame),
            Wire::Event { room, frame } => {
                let homes = chat.homes.borrow();
                if let Some(h) = homes.get(&room) {
                    broadcast(shard, &room, h.room.shards(), frame);
                }
            }
            Wire::ToConn { conn, frame } => {
                if let Some(c) = lookup(shard, conn) {
                    c.enqueue(shard, &frame);
                }
            }
            Wire::Direct { user, frame } => {
                let counts = chat.user_homes.borrow().get(&user).cloned();
                if let Some(counts) = counts {
                    deliver_to_user(shard, &user, &counts, &frame);
                }
            }
            Wire::Synced { .. } | Wire::Heartbeat { .. } => {}
        },
    }
}

/// Starts the shard's mesh tasks: the inbox from the mesh thread, and the
/// timer that asks homes again when a `Synced` is late.
pub(super) fn spawn_tasks(shard: &std::rc::Rc<Shard>) {
    use super::YIELD_EVERY;
    let Some(c) = &shard.chat.cluster else {
        return;
    };
    let mesh = c.mesh.clone();
    let s = shard.clone();
    glommio::spawn_local(async move {
        loop {
            let batch = std::future::poll_fn(|cx| mesh.inbox(s.chat.me).poll_recv(cx)).await;
            // A batch holds up to a SUB socket's high-water mark: give the
            // shard's sockets a turn between slices of it.
            for (i, inbound) in batch.into_iter().enumerate() {
                on_inbound(&s, inbound);
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    glommio::yield_if_needed().await;
                }
            }
            s.chat.maybe_release(&s);
            glommio::yield_if_needed().await;
        }
    })
    .detach();
    let s = shard.clone();
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(SYNC_RETRY / 2).await;
            let released = resync_and_release(&s);
            for req in released {
                handle_request(&s, req);
            }
            glommio::yield_if_needed().await;
        }
    })
    .detach();
}

/// Asks homes again for late `Synced`s; returns the parked resumes that
/// may go on (caught up, or waited long enough).
fn resync_and_release(shard: &Shard) -> Vec<Request> {
    let chat = &shard.chat;
    let mut released = Vec::new();
    let mut homes = chat.homes.borrow_mut();
    for (room, home) in homes.iter_mut() {
        if let Some(r) = home.relay.as_mut() {
            if !r.synced && r.sent.elapsed() >= SYNC_RETRY {
                chat.send_sync(room, r);
            }
        }
        if !home.parked.is_empty() {
            let delivered = home.delivered;
            let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut home.parked)
                .into_iter()
                .partition(|(at, req)| {
                    let caught_up =
                        matches!(req, Request::Join { since: Some((s, _)), .. } if *s <= delivered);
                    caught_up || at.elapsed() >= PARK_FOR
                });
            home.parked = wait;
            released.extend(ready.into_iter().map(|(_, req)| req));
        }
    }
    released
}
