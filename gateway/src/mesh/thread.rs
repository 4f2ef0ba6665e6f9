//! The mesh thread: the only owner of the ZeroMQ sockets.
//!
//! One loop: drain up to a batch of the shards' commands (publish,
//! subscribe), apply the registry's peer list, read what the peers sent,
//! publish a heartbeat when due (crediting the peers with however late the
//! tick came), then, when the queues are empty, sleep in `zmq::poll` on
//! every SUB socket and the wake-up socket until something arrives or the
//! next heartbeat is due. Received messages are decoded and handed,
//! batched, to the shard that owns their room or user.
//!
//! # Invariants
//! - Only this thread touches the ZeroMQ sockets.
//! - It never blocks except in `zmq::poll`, with a timeout no longer than
//!   the next heartbeat; sends are non-blocking (a full PUB drops).
//! - `sleeping` is set (SeqCst) before the last look at the queues, and
//!   shards swap it (SeqCst) after queueing: no command waits for a
//!   timeout.
//! - A node's first live set goes out only once the registry has answered
//!   (if any) and every known peer is live, or after one node timeout;
//!   until then its heartbeats say it hears nobody.

use std::{
    collections::{HashMap, HashSet},
    io::Read as _,
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::{
        atomic::{
            AtomicBool,
            Ordering::{Relaxed, SeqCst},
        },
        Arc,
    },
    time::{Duration, Instant},
};

use crossbeam_channel::Receiver;

use corecast_router::message::Publish;

use super::{
    node_tag,
    wire::{self, Codec as _, NodeTag, Wire},
    Inbound, Mesh, MeshConfig, MeshError, NodeSet, Out,
};

/// One peer endpoint and the SUB socket connected to it.
struct Link {
    addr: String,
    sock: zmq::Socket,
    /// The SUB socket's connection events: a peer process that dies closes
    /// its TCP connections, so it is dead at once, not after a timeout.
    monitor: Option<zmq::Socket>,
    /// The node behind it, once a heartbeat said.
    node: Option<(NodeTag, Arc<str>)>,
    heard: Option<Instant>,
    hears_me: bool,
    is_static: bool,
    /// Last time the registry listed it (registry links only).
    listed: Instant,
    /// The endpoint turned out to be this node itself.
    is_self: bool,
}

pub(super) struct MeshThread {
    config: MeshConfig,
    me: NodeTag,
    shards: usize,
    ctx: zmq::Context,
    publisher: zmq::Socket,
    links: Vec<Link>,
    /// Topics subscribed on every link, with the count of subscribers.
    topics: HashMap<Vec<u8>, usize>,
    ctl: Receiver<Out>,
    rx: Receiver<Wire>,
    registry: Receiver<Vec<(String, String)>>,
    wake: UnixStream,
    mesh: Mesh,
    stop: Arc<AtomicBool>,
    /// Per shard: inbound messages of this round.
    out: Vec<Vec<Inbound>>,
    live: Option<Arc<NodeSet>>,
    started: Instant,
    next_heartbeat: Instant,
    /// Node ids already reported as conflicting (logged once each).
    conflicts: HashSet<String>,
    /// Numbers the links' monitor endpoints.
    monitors: u64,
    /// Room messages published, for `drop_every`.
    messages: u64,
    /// The registry's first list arrived (or there is no registry).
    registry_seen: bool,
}

/// What the mesh thread receives on: the shards' subscriptions and
/// messages, the registry's peer lists, and the wake-up socket.
pub(super) struct Queues {
    pub ctl: Receiver<Out>,
    pub rx: Receiver<Wire>,
    pub registry: Receiver<Vec<(String, String)>>,
    pub wake: UnixStream,
}

impl MeshThread {
    pub(super) fn bind(
        config: MeshConfig,
        shards: usize,
        queues: Queues,
        mesh: Mesh,
        stop: Arc<AtomicBool>,
    ) -> Result<MeshThread, MeshError> {
        let Queues {
            ctl,
            rx,
            registry,
            wake,
        } = queues;
        let ctx = zmq::Context::new();
        let setup = |e: zmq::Error| MeshError::Setup(e.to_string());
        let publisher = ctx.socket(zmq::PUB).map_err(setup)?;
        publisher.set_sndhwm(config.hwm).map_err(setup)?;
        publisher.set_linger(0).map_err(setup)?;
        publisher
            .bind(&config.bind)
            .map_err(|source| MeshError::Bind {
                addr: config.bind.clone(),
                source,
            })?;
        let mut t = MeshThread {
            me: node_tag(&config.node_id),
            shards,
            ctx,
            publisher,
            links: Vec::new(),
            topics: HashMap::new(),
            ctl,
            rx,
            registry,
            wake,
            mesh,
            stop,
            out: (0..shards).map(|_| Vec::new()).collect(),
            live: None,
            started: Instant::now(),
            next_heartbeat: Instant::now(),
            conflicts: HashSet::new(),
            monitors: 0,
            messages: 0,
            registry_seen: config.registry.is_none(),
            config,
        };
        // Work for this node, and heartbeats, on every link.
        t.topics.insert(wire::node_topic(t.me), 1);
        t.topics.insert(wire::HEARTBEAT_TOPIC.to_vec(), 1);
        for addr in t.config.peers.clone() {
            t.link(&addr, true);
        }
        Ok(t)
    }

    pub(super) fn run(&mut self) {
        log::info!(
            "mesh: node {} publishing on {} (advertised as {}), {} static peers{}",
            self.config.node_id,
            self.config.bind,
            self.config.advertise,
            self.config.peers.len(),
            if self.config.registry.is_some() {
                ", registry in Redis"
            } else {
                ""
            }
        );
        while !self.stop.load(Relaxed) {
            self.drain_commands();
            while let Ok(list) = self.registry.try_recv() {
                self.apply_registry(list);
                self.registry_seen = true;
            }
            // Read what the peers sent on every turn, not only after a
            // sleep: while the shards keep the queues full the loop never
            // sleeps, and their heartbeats must still be heard.
            self.receive();
            let now = Instant::now();
            if now >= self.next_heartbeat {
                self.credit_own_stall(now - self.next_heartbeat, now);
                self.heartbeat();
                self.next_heartbeat = now + self.config.heartbeat;
                self.update_live(now);
            }
            // Lets the PUB socket take in new subscriptions.
            let _ = self.publisher.get_events();
            self.flush_inbound();
            self.mesh.shared.sleeping.store(true, SeqCst);
            if !self.rx.is_empty() || !self.ctl.is_empty() || !self.registry.is_empty() {
                self.mesh.shared.sleeping.store(false, SeqCst);
                continue;
            }
            self.sleep();
            self.mesh.shared.sleeping.store(false, SeqCst);
            let mut buf = [0u8; 64];
            while matches!(self.wake.read(&mut buf), Ok(n) if n > 0) {}
            self.receive();
        }
        let _ = self.publisher.set_linger(0);
        log::info!("mesh: stopped");
    }

    fn sleep(&mut self) {
        let timeout = self
            .next_heartbeat
            .saturating_duration_since(Instant::now())
            .as_millis() as i64;
        let mut items: Vec<zmq::PollItem> = self
            .links
            .iter()
            .map(|l| l.sock.as_poll_item(zmq::POLLIN))
            .collect();
        items.extend(
            self.links
                .iter()
                .filter_map(|l| l.monitor.as_ref())
                .map(|m| m.as_poll_item(zmq::POLLIN)),
        );
        items.push(zmq::PollItem::from_fd(self.wake.as_raw_fd(), zmq::POLLIN));
        if let Err(e) = zmq::poll(&mut items, timeout.max(0)) {
            if e != zmq::Error::EINTR {
                log::warn!("mesh: poll: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Commands handled per turn of the loop, so that a flood of them (a
    /// close storm's unsubscribes) cannot hold off reading and heartbeats.
    const COMMAND_BATCH: usize = 4096;

    fn drain_commands(&mut self) {
        for _ in 0..Self::COMMAND_BATCH {
            // Subscriptions first: a Sync must not overtake its subscription.
            let Ok(ctl) = self.ctl.try_recv() else {
                match self.rx.try_recv() {
                    Ok(w) => {
                        self.publish(&w);
                        continue;
                    }
                    Err(_) => return,
                }
            };
            match ctl {
                Out::Subscribe(topic) => {
                    let n = self.topics.entry(topic.clone()).or_insert(0);
                    *n += 1;
                    if *n == 1 {
                        for l in self.links.iter().filter(|l| !l.is_self) {
                            let _ = l.sock.set_subscribe(&topic);
                        }
                    }
                }
                Out::Unsubscribe(topic) => {
                    if let Some(n) = self.topics.get_mut(&topic) {
                        *n -= 1;
                        if *n == 0 {
                            self.topics.remove(&topic);
                            for l in self.links.iter().filter(|l| !l.is_self) {
                                let _ = l.sock.set_unsubscribe(&topic);
                            }
                        }
                    }
                }
            }
        }
    }

    fn publish(&mut self, w: &Wire) {
        if let (Wire::Message { .. }, n @ 1..) = (w, self.config.drop_every) {
            self.messages += 1;
            if self.messages.is_multiple_of(n) {
                self.mesh.metrics.dropped_injected.fetch_add(1, Relaxed);
                return;
            }
        }
        let topic = w.topic();
        let payload = w.encode();
        let sent = self
            .publisher
            .send(&topic[..], zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| self.publisher.send(&payload[..], zmq::DONTWAIT));
        match sent {
            Ok(()) => self.mesh.metrics.sent.fetch_add(1, Relaxed),
            Err(_) => self.mesh.metrics.dropped_hwm.fetch_add(1, Relaxed),
        };
    }

    fn heartbeat(&mut self) {
        let now = Instant::now();
        // Until this node has said who is live, it claims to hear nobody, so
        // no peer counts it live (and sends it rooms) too early.
        let hears = match self.live {
            None => Vec::new(),
            Some(_) => self
                .links
                .iter()
                .filter(|l| !l.is_self && self.heard_recently(l, now))
                .filter_map(|l| l.node.as_ref().map(|(t, _)| *t))
                .collect(),
        };
        let hb = Wire::Heartbeat {
            node: self.config.node_id.clone(),
            addr: self.config.advertise.as_str().into(),
            hears,
        };
        self.publish(&hb);
    }

    /// The heartbeat tick came `late`: this thread could not run (a busy
    /// core, a long batch) and so could not listen either. The peers'
    /// silence over that time is ours, not theirs: move every "last heard"
    /// forward by it (never past now), so a starved node does not declare
    /// its peers dead and move their rooms. A peer that really died while
    /// we were stalled closed its connection, which the link's monitor
    /// reports at once; one that hung is noticed `late` later.
    fn credit_own_stall(&mut self, late: Duration, now: Instant) {
        if late < self.config.heartbeat / 2 {
            return;
        }
        let m = &self.mesh.metrics;
        m.heartbeats_late.fetch_add(1, Relaxed);
        m.heartbeat_late_max_ms
            .fetch_max(late.as_millis() as u64, Relaxed);
        if late >= self.config.node_timeout / 4 {
            log::warn!(
                "mesh: this node's heartbeat was {} ms late (a starved or blocked mesh thread); not counting that time against its peers",
                late.as_millis()
            );
        }
        for l in &mut self.links {
            if let Some(t) = l.heard.as_mut() {
                *t = (*t + late).min(now);
            }
        }
        if self.live.is_none() {
            self.started = (self.started + late).min(now);
        }
    }

    fn heard_recently(&self, l: &Link, now: Instant) -> bool {
        l.heard
            .is_some_and(|t| now.duration_since(t) < self.config.node_timeout)
    }

    /// Opens a SUB socket to `addr` (once per address).
    fn link(&mut self, addr: &str, is_static: bool) {
        if let Some(l) = self.links.iter_mut().find(|l| l.addr == addr) {
            l.listed = Instant::now();
            l.is_static |= is_static;
            return;
        }
        if addr == self.config.advertise || addr == self.config.bind {
            return;
        }
        let sock = match self.ctx.socket(zmq::SUB) {
            Ok(s) => s,
            Err(e) => {
                log::error!("mesh: cannot open a SUB socket for {addr}: {e}");
                return;
            }
        };
        let _ = sock.set_rcvhwm(self.config.hwm);
        let _ = sock.set_linger(0);
        let _ = sock.set_reconnect_ivl(100);
        let _ = sock.set_reconnect_ivl_max(1000);
        for topic in self.topics.keys() {
            let _ = sock.set_subscribe(topic);
        }
        let monitor = self.monitor(&sock);
        if let Err(e) = sock.connect(addr) {
            log::error!("mesh: cannot connect to peer {addr}: {e} (check --peers)");
            return;
        }
        log::info!("mesh: connecting to peer {addr}");
        self.links.push(Link {
            addr: addr.to_string(),
            sock,
            monitor,
            node: None,
            heard: None,
            hears_me: false,
            is_static,
            listed: Instant::now(),
            is_self: false,
        });
    }

    /// A PAIR socket receiving `sock`'s disconnect events.
    fn monitor(&mut self, sock: &zmq::Socket) -> Option<zmq::Socket> {
        self.monitors += 1;
        let endpoint = format!("inproc://mesh-monitor-{}", self.monitors);
        let events = zmq::SocketEvent::DISCONNECTED as i32;
        let pair = self.ctx.socket(zmq::PAIR).ok()?;
        let watched = sock
            .monitor(&endpoint, events)
            .and_then(|()| pair.connect(&endpoint));
        match watched {
            Ok(()) => Some(pair),
            Err(e) => {
                log::warn!(
                    "mesh: no disconnect events ({e}); dead peers are noticed by heartbeat only"
                );
                None
            }
        }
    }

    /// The registry's list of (node id, endpoint): links to new nodes,
    /// and drops registry links that are neither listed nor heard.
    fn apply_registry(&mut self, list: Vec<(String, String)>) {
        for (id, addr) in &list {
            if **id != *self.config.node_id {
                self.link(addr, false);
            }
        }
        let now = Instant::now();
        let timeout = self.config.node_timeout;
        self.links.retain(|l| {
            let keep = l.is_static
                || now.duration_since(l.listed) < timeout
                || l.heard.is_some_and(|t| now.duration_since(t) < timeout);
            if !keep {
                log::info!("mesh: dropping peer {} (left the registry)", l.addr);
            }
            keep
        });
    }

    /// Messages taken from one link per round, so one busy peer cannot
    /// keep the thread from its heartbeats and the other links.
    const RECEIVE_BATCH: usize = 4096;

    fn receive(&mut self) {
        let mut lost = false;
        for l in &mut self.links {
            let Some(m) = &l.monitor else {
                continue;
            };
            while let Ok(event) = m.recv_multipart(zmq::DONTWAIT) {
                let code = event
                    .first()
                    .and_then(|e| e.get(..2))
                    .map(|b| u16::from_le_bytes([b[0], b[1]]));
                if code == Some(zmq::SocketEvent::DISCONNECTED as u16) && l.heard.is_some() {
                    if let Some((_, node)) = &l.node {
                        log::warn!("mesh: lost the connection to node {node} ({})", l.addr);
                    }
                    l.heard = None;
                    lost = true;
                }
            }
        }
        if lost {
            self.update_live(Instant::now());
        }
        for i in 0..self.links.len() {
            for _ in 0..Self::RECEIVE_BATCH {
                let parts = match self.links[i].sock.recv_multipart(zmq::DONTWAIT) {
                    Ok(p) => p,
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => {
                        log::warn!("mesh: receive from {}: {e}", self.links[i].addr);
                        break;
                    }
                };
                if self.links[i].is_self {
                    continue;
                }
                // Anything from a known peer says it is alive: under load its
                // heartbeat may sit behind thousands of messages.
                if self.links[i].node.is_some() && self.links[i].heard.is_some() {
                    self.links[i].heard = Some(Instant::now());
                }
                self.mesh.metrics.received.fetch_add(1, Relaxed);
                let wire = match &parts[..] {
                    [_, payload] => wire::decode(payload),
                    _ => None,
                };
                match wire {
                    Some(Wire::Heartbeat { node, addr, hears }) => {
                        self.on_heartbeat(i, node, addr, hears)
                    }
                    Some(w) => self.route(w),
                    None => {
                        self.mesh.metrics.bad_messages.fetch_add(1, Relaxed);
                    }
                }
            }
        }
    }

    fn on_heartbeat(&mut self, i: usize, node: Arc<str>, addr: Arc<str>, hears: Vec<NodeTag>) {
        let now = Instant::now();
        if node == self.config.node_id {
            let l = &mut self.links[i];
            if l.addr != *addr || !l.is_self {
                if *addr != *self.config.advertise {
                    // Another process claims our id.
                    if self.conflicts.insert(format!("{addr}")) {
                        log::error!(
                            "mesh: the node at {} also calls itself {node}: node ids must be unique (--node-id); ignoring it",
                            l.addr
                        );
                    }
                } else {
                    log::info!("mesh: {} is this node itself; not listening to it", l.addr);
                }
                l.is_self = true;
                for topic in self.topics.keys() {
                    let _ = l.sock.set_unsubscribe(topic);
                }
            }
            return;
        }
        let tag = node_tag(&node);
        let clash = self.links.iter().enumerate().any(|(j, o)| {
            j != i
                && self.heard_recently(o, now)
                && o.node
                    .as_ref()
                    .is_some_and(|(t, n)| *t == tag && *n != node)
        }) || tag == self.me;
        if clash {
            if self.conflicts.insert(node.to_string()) {
                log::error!("mesh: node id {node} hashes to the same tag as another node; rename one (--node-id)");
            }
            return;
        }
        let l = &mut self.links[i];
        if l.node.as_ref().map(|(_, n)| n) != Some(&node) {
            log::info!("mesh: peer {} is node {node}", l.addr);
        }
        l.node = Some((tag, node));
        l.heard = Some(now);
        // A node that has not announced its live set yet hears nobody on
        // the wire (see `heartbeat`); it queues room work until it does, so
        // counting it live early costs nothing, and waiting would flap.
        l.hears_me = hears.is_empty() || hears.contains(&self.me);
        self.update_live(now);
    }

    /// Recomputes the live set; tells every shard when it changed. The
    /// first set goes out once every known peer is live, or after one node
    /// timeout, so a starting node does not claim rooms it cannot see are
    /// owned elsewhere.
    fn update_live(&mut self, now: Instant) {
        let mut nodes: Vec<(NodeTag, Arc<str>)> = self
            .links
            .iter()
            .filter(|l| !l.is_self && l.hears_me && self.heard_recently(l, now))
            .filter_map(|l| l.node.clone())
            .collect();
        nodes.push((self.me, self.config.node_id.clone()));
        nodes.sort_by(|a, b| a.1.cmp(&b.1));
        nodes.dedup_by(|a, b| a.0 == b.0);
        let set = NodeSet { me: self.me, nodes };
        if self.live.as_deref() == Some(&set) {
            return;
        }
        if self.live.is_none() {
            let all_known_live = self
                .links
                .iter()
                .filter(|l| !l.is_self)
                .all(|l| l.hears_me && self.heard_recently(l, now));
            let settled = self.registry_seen && all_known_live;
            if !settled && now.duration_since(self.started) < self.config.node_timeout {
                return;
            }
        }
        let ids: Vec<&str> = set.nodes.iter().map(|(_, id)| &**id).collect();
        log::info!("mesh: live nodes: {}", ids.join(", "));
        let m = &self.mesh.metrics;
        m.live_nodes.store(set.nodes.len() as u64, Relaxed);
        if self.live.is_some() {
            m.membership_changes.fetch_add(1, Relaxed);
        }
        let set = Arc::new(set);
        self.live = Some(set.clone());
        for out in &mut self.out {
            out.push(Inbound::Nodes(set.clone()));
        }
    }

    /// Hands a message to the shard that owns its room or user.
    fn route(&mut self, w: Wire) {
        let shard = match &w {
            Wire::Publish {
                to,
                publish: Publish { room, .. },
            }
            | Wire::Sync { to, room, .. }
            | Wire::Unsync { to, room, .. } => {
                if *to != self.me {
                    return;
                }
                // A connection said to be ours must name one of our shards.
                if let Wire::Publish {
                    publish: Publish { conn, .. },
                    ..
                } = &w
                {
                    if conn.node == self.me && conn.shard as usize >= self.shards {
                        self.mesh.metrics.bad_messages.fetch_add(1, Relaxed);
                        return;
                    }
                }
                corecast_router::home_shard(room, self.shards)
            }
            Wire::Synced { room, .. } | Wire::Message { room, .. } | Wire::Event { room, .. } => {
                corecast_router::home_shard(room, self.shards)
            }
            Wire::ToConn { conn, .. } => {
                if conn.node != self.me || conn.shard as usize >= self.shards {
                    return;
                }
                conn.shard as usize
            }
            Wire::Direct { user, .. } | Wire::Act { user, .. } => {
                corecast_router::user_home_shard(user, self.shards)
            }
            Wire::Heartbeat { .. } => return,
        };
        self.out[shard].push(Inbound::Wire(w));
    }

    fn flush_inbound(&mut self) {
        for (i, out) in self.out.iter_mut().enumerate() {
            if !out.is_empty() {
                self.mesh.inbox(i).send(std::mem::take(out));
            }
        }
    }
}
