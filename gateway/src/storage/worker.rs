//! The worker thread: batches writes, answers reads, runs the circuit
//! breaker and the spill file.
//!
//! # Invariants
//! - Ops are handled in the order received. Writes collected before a read
//!   are written before it is answered.
//! - Breaker closed: writes go to the store; a failed write opens it. Open
//!   or replaying: writes go to the spill file (after anything already
//!   there), so each room's messages reach the store in seq order.
//! - The breaker closes only when the spill file has been replayed to its
//!   end; loads wait for that, so a room's sequence is never read from a
//!   store that is missing spilled messages.
//! - A publish is acked `stored:true` only after its batch was written to
//!   the store or synced to the spill file.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::Release},
        Arc,
    },
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

use super::{
    spill::Spill, Backend, Inbox, Op, PresenceOp, Query, Record, Recover, Reply, StorageConfig,
    StorageMetrics, StoreError, BREAKER_CLOSED, BREAKER_OPEN, BREAKER_REPLAYING,
};
use corecast_router::{
    message::{node_tag, ConnRef, NodeTag},
    proto::{self, ErrorCode},
};

/// How often the worker wakes with nothing to do (housekeeping, probes).
const IDLE_TICK: Duration = Duration::from_millis(100);
const FIRST_PROBE: Duration = Duration::from_millis(250);
const MAX_PROBE: Duration = Duration::from_secs(2);
/// Records replayed per store call.
const REPLAY_CHUNK: usize = 1024;
/// Lost messages remembered, so a retry is not acked as stored.
const LOST_REMEMBERED: usize = 100_000;

enum State {
    Closed,
    Open {
        next_probe: Instant,
        backoff: Duration,
    },
    Replaying,
}

enum PendingAck {
    New {
        from: u16,
        /// `None`: the home acked it.
        to: Option<ConnRef>,
        index: usize,
        fanout: Option<Arc<[u8]>>,
    },
    Duplicate {
        from: u16,
        to: ConnRef,
        room: Arc<str>,
        id: Box<str>,
        seq: u64,
        epoch: Arc<str>,
    },
}

pub(super) struct Worker {
    backend: Box<dyn Backend>,
    rx: Receiver<(u16, Op)>,
    pending: Arc<[AtomicUsize]>,
    inboxes: Arc<[Inbox]>,
    metrics: Arc<StorageMetrics>,
    spill: Option<Spill>,
    config: StorageConfig,
    state: State,
    /// Replies per shard, sent at the end of each round.
    out: Vec<Vec<Reply>>,
    /// Loads waiting for the replay to finish: (home shard, room).
    held_loads: Vec<(u16, Arc<str>)>,
    /// Shared with the shards: set while nothing takes writes.
    failing: Arc<AtomicBool>,
    /// Messages neither stored nor spilled (recent ones), for duplicate acks.
    lost: HashSet<(Arc<str>, u64)>,
    lost_order: VecDeque<(Arc<str>, u64)>,
    /// Seqs the store refused as conflicts (recent ones): a retry that
    /// reaches the home before it forgot the id is refused again, never
    /// acked with a seq that holds another home's message.
    conflicted: HashSet<(Arc<str>, u64)>,
    conflicted_order: VecDeque<(Arc<str>, u64)>,
    /// Highest lost seq per room: written to the store when it is back, so
    /// those seqs are never given out again.
    lost_max: HashMap<Arc<str>, u64>,
    stopping: bool,
    /// This node's tag: acks for connections on other nodes go back to the
    /// shard that sent the op, which forwards them.
    node: NodeTag,
}

/// What the worker shares with the shards' [`super::Storage`] handle.
pub(super) struct Shared {
    pub rx: Receiver<(u16, Op)>,
    pub pending: Arc<[AtomicUsize]>,
    pub inboxes: Arc<[Inbox]>,
    pub metrics: Arc<StorageMetrics>,
    pub failing: Arc<AtomicBool>,
}

impl Worker {
    pub(super) fn new(
        backend: Box<dyn Backend>,
        shared: Shared,
        spill: Option<Spill>,
        config: StorageConfig,
    ) -> Worker {
        let Shared {
            rx,
            pending,
            inboxes,
            metrics,
            failing,
        } = shared;
        let shards = inboxes.len();
        let node = node_tag(&config.node_id);
        Worker {
            backend,
            rx,
            pending,
            inboxes,
            metrics,
            spill,
            config,
            state: State::Closed,
            out: (0..shards).map(|_| Vec::new()).collect(),
            held_loads: Vec::new(),
            failing,
            lost: HashSet::new(),
            lost_order: VecDeque::new(),
            conflicted: HashSet::new(),
            conflicted_order: VecDeque::new(),
            lost_max: HashMap::new(),
            stopping: false,
            node,
        }
    }

    pub(super) fn run(mut self) {
        log::info!(
            "storage: {}; batches of up to {}, {} queued ops per shard",
            self.backend.describe(),
            self.config.batch_max,
            self.config.queue_per_shard
        );
        match self.backend.connect() {
            Ok(()) if self.spill.as_ref().is_some_and(|s| !s.is_empty()) => {
                self.set_state(State::Replaying)
            }
            Ok(()) => {}
            Err(e) => {
                log::warn!(
                    "storage: {} is not answering ({e}); serving live traffic and spilling to {} until it does",
                    self.backend.describe(),
                    self.spill_path()
                );
                self.open_breaker(None);
            }
        }
        let mut batch = Vec::with_capacity(self.config.batch_max);
        loop {
            let first = if matches!(self.state, State::Replaying) {
                match self.rx.try_recv() {
                    Ok(op) => Some(op),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match self.rx.recv_timeout(IDLE_TICK) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            if let Some(op) = first {
                batch.push(op);
                while batch.len() < self.config.batch_max {
                    match self.rx.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                self.process(&mut batch);
            }
            self.maintain();
            self.backend.maintain();
            self.send_replies();
            if self.stopping {
                break;
            }
        }
        // Every shard is gone; everything received was handled above.
        if let Some(s) = &self.spill {
            if !s.is_empty() {
                log::warn!(
                    "storage: {} bytes remain in {}; they are replayed at the next start",
                    s.bytes(),
                    s.path().display()
                );
            }
        }
        log::info!("storage worker stopped");
    }

    fn set_state(&mut self, state: State) {
        let gauge = match state {
            State::Closed => BREAKER_CLOSED,
            State::Open { .. } => BREAKER_OPEN,
            State::Replaying => BREAKER_REPLAYING,
        };
        self.metrics.breaker.store(gauge, Relaxed);
        self.state = state;
    }

    fn spill_path(&self) -> String {
        self.spill.as_ref().map_or_else(
            || "nowhere (no spill file)".into(),
            |s| s.path().display().to_string(),
        )
    }

    fn open_breaker(&mut self, e: Option<&StoreError>) {
        if let Some(e) = e {
            log::warn!(
                "storage: {e}; breaker open: spilling to {} and probing the store",
                self.spill_path()
            );
        }
        self.metrics.breaker_opened.fetch_add(1, Relaxed);
        if let Some(s) = &mut self.spill {
            s.rewind();
        }
        self.set_state(State::Open {
            next_probe: Instant::now() + FIRST_PROBE,
            backoff: FIRST_PROBE,
        });
        // Loads held for the replay: the store cannot say now.
        for (home, room) in std::mem::take(&mut self.held_loads) {
            self.out[home as usize].push(Reply::Loaded { room, meta: None });
        }
    }

    fn reply(&mut self, to: ConnRef, frame: Vec<u8>) {
        self.reply_via(to.shard, to, frame);
    }

    /// Replies to `to`, through shard `from` when `to` is on another node.
    fn reply_via(&mut self, from: u16, to: ConnRef, frame: Vec<u8>) {
        let shard = if to.node == self.node { to.shard } else { from };
        self.out[shard as usize].push(Reply::ToConn {
            conn: to,
            frame: frame.into(),
        });
    }

    fn send_replies(&mut self) {
        for (shard, replies) in self.out.iter_mut().enumerate() {
            if !replies.is_empty() {
                self.inboxes[shard].send(std::mem::take(replies));
            }
        }
    }

    fn process(&mut self, batch: &mut Vec<(u16, Op)>) {
        let mut appends: Vec<Record> = Vec::new();
        let mut acks: Vec<PendingAck> = Vec::new();
        let mut presence: Vec<PresenceOp> = Vec::new();
        for (from, op) in batch.drain(..) {
            self.pending[from as usize].fetch_sub(1, Relaxed);
            match op {
                Op::Append {
                    record,
                    ack_to,
                    fanout,
                } => {
                    acks.push(PendingAck::New {
                        from,
                        to: ack_to,
                        index: appends.len(),
                        fanout,
                    });
                    appends.push(record);
                }
                Op::DuplicateAck {
                    room,
                    id,
                    seq,
                    epoch,
                    ack_to,
                } => acks.push(PendingAck::Duplicate {
                    from,
                    to: ack_to,
                    room,
                    id,
                    seq,
                    epoch,
                }),
                Op::Presence(p) => presence.push(p),
                Op::Stop => self.stopping = true,
                read => {
                    // A read sees every write sent before it.
                    self.flush(&mut appends, &mut acks);
                    self.flush_presence(&mut presence);
                    self.read(read);
                }
            }
        }
        self.flush(&mut appends, &mut acks);
        self.flush_presence(&mut presence);
    }

    fn flush_presence(&mut self, presence: &mut Vec<PresenceOp>) {
        if presence.is_empty() {
            return;
        }
        let n = presence.len() as u64;
        if matches!(self.state, State::Closed) {
            if let Err(e) = self.backend.presence(presence) {
                self.metrics.presence_dropped.fetch_add(n, Relaxed);
                self.open_breaker(Some(&e));
            }
        } else {
            self.metrics.presence_dropped.fetch_add(n, Relaxed);
        }
        presence.clear();
    }

    /// Writes what was collected and acks it.
    fn flush(&mut self, appends: &mut Vec<Record>, acks: &mut Vec<PendingAck>) {
        let (stored, conflicts) = if appends.is_empty() {
            (true, Vec::new())
        } else {
            self.write(appends)
        };
        for ack in acks.drain(..) {
            if let PendingAck::New {
                from, to, index, ..
            } = &ack
            {
                if conflicts.contains(index) {
                    let r = &appends[*index];
                    self.metrics.conflicts.fetch_add(1, Relaxed);
                    log::warn!(
                        "storage: room {} seq {} was numbered by another home too; refused (room_moving), reloading the room",
                        r.room,
                        r.seq
                    );
                    if self.conflicted_order.len() == LOST_REMEMBERED {
                        if let Some(old) = self.conflicted_order.pop_front() {
                            self.conflicted.remove(&old);
                        }
                    }
                    self.conflicted.insert((r.room.clone(), r.seq));
                    self.conflicted_order.push_back((r.room.clone(), r.seq));
                    self.out[*from as usize].push(Reply::Conflict {
                        room: r.room.clone(),
                        from: r.from.clone(),
                        id: r.id.clone(),
                        seq: r.seq,
                    });
                    if let Some(to) = to {
                        let frame = proto::error(ErrorCode::RoomMoving, Some(&r.id), Some(&r.room));
                        self.reply_via(*from, *to, frame);
                    }
                    continue;
                }
            }
            let (from, to, frame) = match ack {
                PendingAck::New {
                    from,
                    to,
                    index,
                    fanout,
                } => {
                    let r = &appends[index];
                    // Nothing unstored leaves the node: another home would
                    // give its seq again.
                    if let Some(frame) = fanout.filter(|_| stored) {
                        self.out[from as usize].push(Reply::Stored {
                            room: r.room.clone(),
                            seq: r.seq,
                            frame,
                        });
                    }
                    let Some(to) = to else { continue };
                    let frame = proto::ack(&r.id, &r.room, r.seq, &r.epoch, false, stored);
                    (from, to, frame)
                }
                PendingAck::Duplicate {
                    from,
                    to,
                    room,
                    id,
                    seq,
                    epoch,
                } => {
                    let key = (room.clone(), seq);
                    let frame = if self.conflicted.contains(&key) {
                        proto::error(ErrorCode::RoomMoving, Some(&id), Some(&room))
                    } else {
                        proto::ack(&id, &room, seq, &epoch, true, !self.lost.contains(&key))
                    };
                    (from, to, frame)
                }
            };
            self.reply_via(from, to, frame);
        }
        appends.clear();
    }

    /// Stores or spills `records`; false if they are in neither. Also
    /// the indexes of records the store refused as conflicts.
    fn write(&mut self, records: &[Record]) -> (bool, Vec<usize>) {
        self.metrics.batches.fetch_add(1, Relaxed);
        if matches!(self.state, State::Closed) {
            match self.backend.append(records) {
                Ok(conflicts) => {
                    self.metrics
                        .persisted
                        .fetch_add((records.len() - conflicts.len()) as u64, Relaxed);
                    self.failing.store(false, Release);
                    return (true, conflicts);
                }
                Err(e) => self.open_breaker(Some(&e)),
            }
        }
        (self.spill_write(records), Vec::new())
    }

    fn spill_write(&mut self, records: &[Record]) -> bool {
        let n = records.len() as u64;
        let written = match &mut self.spill {
            None => Err("no spill file".to_string()),
            Some(spill) => match spill.append(records) {
                Ok(()) => {
                    self.metrics.spill_bytes.store(spill.bytes(), Relaxed);
                    Ok(())
                }
                Err(e) => Err(format!(
                    "cannot write the spill file {}: {e}",
                    spill.path().display()
                )),
            },
        };
        match written {
            Ok(()) => {
                self.metrics.spilled.fetch_add(n, Relaxed);
                self.failing.store(false, Release);
                true
            }
            Err(e) => {
                log::error!(
                    "storage: {e}; {n} messages are not stored (acked stored:false); publishes are refused until the store or the spill file takes writes"
                );
                self.metrics.lost.fetch_add(n, Relaxed);
                self.failing.store(true, Release);
                for r in records {
                    self.remember_lost(r);
                }
                false
            }
        }
    }

    fn remember_lost(&mut self, r: &Record) {
        let max = self.lost_max.entry(r.room.clone()).or_insert(0);
        *max = (*max).max(r.seq);
        if self.lost_order.len() == LOST_REMEMBERED {
            if let Some(old) = self.lost_order.pop_front() {
                self.lost.remove(&old);
            }
        }
        self.lost.insert((r.room.clone(), r.seq));
        self.lost_order.push_back((r.room.clone(), r.seq));
    }

    /// Tells the store the seqs of lost messages were used. False if it
    /// failed (the breaker is open again).
    fn advance_lost_seqs(&mut self) -> bool {
        let rooms: Vec<(Arc<str>, u64)> =
            self.lost_max.iter().map(|(r, s)| (r.clone(), *s)).collect();
        for (room, seq) in rooms {
            if let Err(e) = self.backend.advance_seq(&room, seq) {
                self.open_breaker(Some(&e));
                return false;
            }
            self.lost_max.remove(&room);
        }
        true
    }

    fn read(&mut self, op: Op) {
        let closed = matches!(self.state, State::Closed);
        if !closed {
            if let Op::Load { room, home } = op {
                if matches!(self.state, State::Replaying) {
                    self.held_loads.push((home, room));
                } else {
                    self.out[home as usize].push(Reply::Loaded { room, meta: None });
                }
            } else {
                self.refuse(op);
            }
            return;
        }
        self.metrics.reads.fetch_add(1, Relaxed);
        match op {
            Op::Load { room, home } => match self.backend.load(&room) {
                Ok(meta) => self.out[home as usize].push(Reply::Loaded {
                    room,
                    meta: Some(meta),
                }),
                Err(e) => {
                    self.open_breaker(Some(&e));
                    self.out[home as usize].push(Reply::Loaded { room, meta: None });
                }
            },
            Op::History {
                room,
                query,
                upto,
                to,
            } => match self.backend.fetch(&room, query) {
                Ok((meta, mut records)) => {
                    if let Some(upto) = upto {
                        records.retain(|r| r.seq <= upto);
                    }
                    let complete = history_complete(query, meta.last_seq, &records);
                    let frame =
                        proto::history(&room, &meta.epoch, meta.last_seq, complete, &records);
                    self.reply(to, frame);
                }
                Err(e) => {
                    self.open_breaker(Some(&e));
                    self.refuse(Op::History {
                        room,
                        query,
                        upto,
                        to,
                    });
                }
            },
            Op::Recover(r) => self.recover(*r),
            Op::Repair {
                room,
                after,
                upto,
                home,
            } => {
                let kept = self.config.namespaces.load().of(&room).history_size;
                let n = (upto.saturating_sub(after)).min(kept.max(1) as u64);
                match self.backend.fetch(
                    &room,
                    Query::After {
                        after,
                        n: n as usize,
                    },
                ) {
                    Ok((_, records)) => self.repaired(room, after, upto, home, &records),
                    Err(e) => {
                        self.open_breaker(Some(&e));
                        self.repaired(room, after, upto, home, &[]);
                    }
                }
            }
            Op::PresenceQuery {
                room,
                to,
                max_members,
            } => match self.backend.presence_list(&room) {
                Ok(users) => {
                    let count = users.len() as u64;
                    let frame = if users.len() <= max_members {
                        proto::presence(&room, count, Some(users.iter().map(String::as_str)))
                    } else {
                        proto::presence(&room, count, None::<std::iter::Empty<&str>>)
                    };
                    self.reply(to, frame);
                }
                Err(e) => {
                    self.open_breaker(Some(&e));
                    self.reply(
                        to,
                        proto::error(ErrorCode::StorageUnavailable, None, Some(&room)),
                    );
                }
            },
            Op::Append { .. } | Op::DuplicateAck { .. } | Op::Presence(_) | Op::Stop => {}
        }
    }

    /// Answers a read the store cannot serve now.
    fn refuse(&mut self, op: Op) {
        self.metrics.reads_refused.fetch_add(1, Relaxed);
        match op {
            Op::History { room, to, .. } | Op::PresenceQuery { room, to, .. } => {
                self.reply(
                    to,
                    proto::error(ErrorCode::StorageUnavailable, None, Some(&room)),
                );
            }
            Op::Recover(r) => {
                let joined =
                    proto::joined(&r.room, r.upto, r.members, &r.home_epoch, Some((false, 0)));
                self.out[r.to.shard as usize].push(Reply::Recovered {
                    conn: r.to,
                    room: r.room,
                    nonce: r.nonce,
                    joined: joined.into(),
                    missed: Vec::new(),
                });
            }
            Op::Load { room, home } => {
                self.out[home as usize].push(Reply::Loaded { room, meta: None })
            }
            Op::Repair {
                room,
                after,
                upto,
                home,
            } => self.repaired(room, after, upto, home, &[]),
            Op::Append { .. } | Op::DuplicateAck { .. } | Op::Presence(_) | Op::Stop => {}
        }
    }

    /// Answers a repair with the records of its range that history has.
    fn repaired(&mut self, room: Arc<str>, after: u64, upto: u64, home: u16, records: &[Record]) {
        let mut frames = Vec::new();
        // Only an unbroken run: a hole ends what can be delivered.
        let run = (after + 1..=upto)
            .zip(records)
            .take_while(|(want, m)| m.seq == *want);
        let mut got = 0;
        for (_, m) in run {
            frames.extend_from_slice(&proto::message(
                &m.room, m.seq, &m.from, &m.id, m.ts, &m.body,
            ));
            got += 1;
        }
        self.out[home as usize].push(Reply::Repaired {
            room,
            after,
            upto,
            frames,
            got,
        });
    }

    fn recover(&mut self, r: Recover) {
        let limit = self
            .config
            .namespaces
            .load()
            .of(&r.room)
            .history_size
            .max(1) as u64;
        let gap = r.upto.saturating_sub(r.since);
        let same_epoch = *r.epoch == *r.home_epoch && r.since <= r.upto;
        // More missed than a room keeps: not recoverable; send the newest.
        let query = if gap > limit {
            Query::Last(limit as usize)
        } else {
            Query::After {
                after: r.since,
                n: gap as usize,
            }
        };
        let fetched = if gap == 0 || !same_epoch {
            Ok(None)
        } else {
            self.backend.fetch(&r.room, query).map(Some)
        };
        let (recovered, records) = match fetched {
            Ok(None) => (same_epoch, Vec::new()),
            Ok(Some((meta, mut records))) => {
                records.retain(|m| m.seq > r.since && m.seq <= r.upto);
                let contiguous = records
                    .iter()
                    .enumerate()
                    .all(|(i, m)| m.seq == r.since + 1 + i as u64);
                let whole = records.last().map(|m| m.seq) == Some(r.upto);
                (meta.epoch == r.home_epoch && contiguous && whole, records)
            }
            Err(e) => {
                self.open_breaker(Some(&e));
                (false, Vec::new())
            }
        };
        let mut missed = Vec::new();
        for m in &records {
            missed.extend_from_slice(&proto::message(
                &m.room, m.seq, &m.from, &m.id, m.ts, &m.body,
            ));
        }
        let joined = proto::joined(
            &r.room,
            r.upto,
            r.members,
            &r.home_epoch,
            Some((recovered, records.len() as u64)),
        );
        self.out[r.to.shard as usize].push(Reply::Recovered {
            conn: r.to,
            room: r.room,
            nonce: r.nonce,
            joined: joined.into(),
            missed,
        });
    }

    /// Probes an open breaker; replays the spill file when the store is back.
    fn maintain(&mut self) {
        match self.state {
            State::Closed => {}
            State::Open {
                next_probe,
                backoff,
            } => {
                if Instant::now() < next_probe {
                    return;
                }
                match self.backend.connect() {
                    Ok(()) => {
                        log::info!(
                            "storage: {} answers again; replaying {} spilled bytes",
                            self.backend.describe(),
                            self.spill.as_ref().map_or(0, |s| s.bytes())
                        );
                        self.set_state(State::Replaying);
                    }
                    Err(e) => {
                        log::debug!("storage: probe failed: {e}");
                        let backoff = (backoff * 2).min(MAX_PROBE);
                        self.state = State::Open {
                            next_probe: Instant::now() + backoff,
                            backoff,
                        };
                    }
                }
            }
            State::Replaying => self.replay_chunk(),
        }
    }

    fn replay_chunk(&mut self) {
        let Some(spill) = &mut self.spill else {
            self.set_state(State::Closed);
            return;
        };
        let (records, bytes) = match spill.peek(REPLAY_CHUNK) {
            Ok(x) => x,
            Err(e) => {
                log::error!(
                    "storage: reading the spill file {}: {e}",
                    spill.path().display()
                );
                self.open_breaker(None);
                return;
            }
        };
        if records.is_empty() && bytes == 0 {
            if !self.advance_lost_seqs() {
                return;
            }
            let Some(spill) = &mut self.spill else {
                return;
            };
            let replayed = self.metrics.replayed.load(Relaxed);
            if let Err(e) = spill.clear() {
                log::error!(
                    "storage: emptying the spill file {}: {e}",
                    spill.path().display()
                );
            }
            self.metrics.spill_bytes.store(0, Relaxed);
            log::info!("storage: spill file replayed ({replayed} messages replayed since start); breaker closed");
            self.set_state(State::Closed);
            for (home, room) in std::mem::take(&mut self.held_loads) {
                self.read(Op::Load { room, home });
            }
            return;
        }
        match self.backend.append(&records) {
            Ok(conflicts) => {
                if !conflicts.is_empty() {
                    // Acked when spilled; another home numbered these seqs
                    // while the store was away.
                    self.metrics
                        .conflicts
                        .fetch_add(conflicts.len() as u64, Relaxed);
                    log::error!(
                        "storage: {} spilled messages conflict with seqs another home stored meanwhile; they stay in no history",
                        conflicts.len()
                    );
                }
                spill.advance(bytes);
                self.metrics
                    .replayed
                    .fetch_add(records.len() as u64, Relaxed);
            }
            Err(e) => self.open_breaker(Some(&e)),
        }
    }
}

/// Does a history answer have no hole at its start?
fn history_complete(q: Query, last_seq: u64, records: &[Record]) -> bool {
    let first_wanted = match q {
        Query::Last(n) => last_seq.saturating_sub(n as u64) + 1,
        Query::After { after, .. } => after.saturating_add(1),
    };
    let contiguous = records
        .iter()
        .enumerate()
        .all(|(i, m)| m.seq == first_wanted.saturating_add(i as u64));
    match records.first() {
        Some(_) => contiguous,
        // Nothing to return is complete only if nothing was there to return.
        None => last_seq < first_wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64) -> Record {
        crate::storage::test_record("r", seq)
    }

    #[test]
    fn history_completeness() {
        let recs: Vec<_> = (8..=10).map(rec).collect();
        assert!(history_complete(Query::Last(3), 10, &recs));
        assert!(
            !history_complete(Query::Last(5), 10, &recs),
            "6 and 7 trimmed"
        );
        assert!(history_complete(Query::Last(50), 0, &[]));
        assert!(history_complete(Query::After { after: 7, n: 3 }, 10, &recs));
        assert!(!history_complete(
            Query::After { after: 2, n: 3 },
            10,
            &recs
        ));
        assert!(history_complete(Query::After { after: 10, n: 3 }, 10, &[]));
        assert!(!history_complete(Query::After { after: 9, n: 3 }, 10, &[]));
    }
}
