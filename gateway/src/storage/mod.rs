//! The storage worker: room history, sequence recovery and presence, kept
//! off the hot path.
//!
//! Shards hand [`Op`]s to one worker thread over a bounded crossbeam channel
//! and never wait for it: a home shard sequences and delivers a message at
//! once (in a cluster: once the worker says it is stored, so that no other
//! node can number it again), and the publisher's ack comes back later,
//! from the worker, once the message is stored. Answers reach a shard through its [`Inbox`], which
//! wakes the shard's inbox task.
//!
//! # Invariants
//! - A shard never blocks on storage. Each shard may have at most
//!   `queue_per_shard` ops in flight; above that a publish is refused
//!   (`storage_busy`) before it is sequenced, so nothing is delivered that
//!   the store did not accept, and no ack claims a write that was not made.
//! - Ops from one shard are handled in the order sent (one FIFO channel,
//!   one worker), so a read a home shard sends after its writes sees them.
//! - An ack with `"stored":true` means the message is in the backend, or in
//!   the spill file (fsynced) to be replayed into it; see docs/storage.md.

mod exposition;
pub mod memory;
pub mod redis_backend;
pub mod spill;
mod worker;

use std::{
    fmt,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::Sender;

pub use corecast_router::{
    message::{ConnRef, Record},
    store::{new_epoch, Op, PresenceOp, Query, Recover, Reply, RoomMeta},
};

/// A plain record for the storage unit tests.
#[cfg(test)]
pub(crate) fn test_record(room: &str, seq: u64) -> Record {
    Record {
        room: Arc::from(room),
        seq,
        from: Arc::from("u"),
        id: format!("m{seq}").into(),
        ts: seq,
        body: "null".into(),
        epoch: Arc::from(""),
    }
}

/// A store failed; the worker opens its breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the worker needs from a store. Appends are idempotent by seq: a
/// record whose seq is not above the room's stored last seq is skipped, so
/// replaying a batch that was partly written stores each message once. A
/// skipped record that is not the stored message of its seq (same sender,
/// id and time) is a conflict: another home numbered the room.
pub trait Backend: Send {
    fn describe(&self) -> String;
    /// (Re)connects and checks the store answers.
    fn connect(&mut self) -> Result<(), StoreError>;
    /// Stores records (any rooms, each room's in seq order); returns the
    /// indexes of the conflicting ones, which were not stored.
    fn append(&mut self, records: &[Record]) -> Result<Vec<usize>, StoreError>;
    /// The room's last seq and epoch (creating the epoch if it has none).
    fn load(&mut self, room: &str) -> Result<RoomMeta, StoreError>;
    /// Messages of a room, oldest first, with the room's meta.
    fn fetch(&mut self, room: &str, q: Query) -> Result<(RoomMeta, Vec<Record>), StoreError>;
    /// Does this store keep presence (so presence queries go to it)?
    fn keeps_presence(&self) -> bool;
    /// Can no write fail, and none conflict outside a cluster (the store
    /// lives in this process)? Then a message handed to the worker is as
    /// good as stored, and homes outside a cluster ack it themselves.
    fn writes_cannot_fail(&self) -> bool {
        false
    }
    fn presence(&mut self, ops: &[PresenceOp]) -> Result<(), StoreError>;
    /// Users present in a room (each once).
    fn presence_list(&mut self, room: &str) -> Result<Vec<String>, StoreError>;
    /// Periodic housekeeping (expiry of a memory store).
    fn maintain(&mut self) {}
    /// Seqs up to `seq` were given out (and lost): never give them again.
    fn advance_seq(&mut self, room: &str, seq: u64) -> Result<(), StoreError>;
}

/// A shard's mailbox from the worker.
pub type Inbox = crate::inbox::Inbox<Reply>;

/// Storage counters, written by the worker (and the queue gauge by shards).
#[derive(Debug, Default)]
pub struct StorageMetrics {
    pub batches: AtomicU64,
    pub persisted: AtomicU64,
    pub spilled: AtomicU64,
    pub replayed: AtomicU64,
    /// Messages neither stored nor spilled (the spill file failed too).
    pub lost: AtomicU64,
    pub spill_bytes: AtomicU64,
    /// 0 closed, 1 open, 2 replaying the spill file.
    pub breaker: AtomicU64,
    pub breaker_opened: AtomicU64,
    /// Presence updates dropped: store unreachable, or a shard's queue full.
    pub presence_dropped: AtomicU64,
    pub reads: AtomicU64,
    pub reads_refused: AtomicU64,
    /// Messages refused because another home had stored its seq.
    pub conflicts: AtomicU64,
}

pub const BREAKER_CLOSED: u64 = 0;
pub const BREAKER_OPEN: u64 = 1;
pub const BREAKER_REPLAYING: u64 = 2;

/// Which store, from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis { url: String },
}

/// Storage settings, validated from the configuration.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub kind: StoreKind,
    /// Messages kept per room (the default namespace's; a room's comes
    /// from its namespace).
    pub history_size: usize,
    /// A room's history expires this long after its last message (the
    /// default namespace's).
    pub history_ttl: Duration,
    /// The rooms' namespaces: how much history each room keeps, how long.
    pub namespaces: corecast_router::namespace::Namespaces,
    /// A room's sequence and epoch expire this long after its last message.
    pub meta_ttl: Duration,
    pub batch_max: usize,
    pub queue_per_shard: usize,
    pub spill_dir: PathBuf,
    pub redis_timeout: Duration,
    pub node_id: String,
    pub presence_ttl: Duration,
}

/// Why storage could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("bad --redis URL {url:?}: {reason} (expected redis://HOST:PORT/DB)")]
    BadUrl { url: String, reason: String },
    #[error("spill directory {dir}: {source} (pass a writable --spill-dir)")]
    SpillDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the storage thread: {0}")]
    Thread(std::io::Error),
}

/// The shards' side of the worker: cloneable and `Send`.
#[derive(Clone)]
pub struct Storage {
    tx: Sender<(u16, Op)>,
    pending: Arc<[AtomicUsize]>,
    inboxes: Arc<[Inbox]>,
    cap: usize,
    keeps_presence: bool,
    acks_at_home: bool,
    /// Set by the worker while neither the store nor the spill file takes
    /// writes: shards refuse publishes instead of sequencing them.
    failing: Arc<AtomicBool>,
    pub metrics: Arc<StorageMetrics>,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage").field("cap", &self.cap).finish()
    }
}

impl Storage {
    /// May shard `from` hand over one more op that counts against its queue?
    pub fn has_room(&self, from: usize) -> bool {
        self.pending[from].load(Ordering::Acquire) < self.cap
    }

    /// Hands `op` over if shard `from` is under its queue bound; gives it
    /// back otherwise. Only shard `from` adds to its own count, so the check
    /// cannot race. (The op comes back by value, as it went in: its size
    /// costs a move, not an allocation.)
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, from: usize, op: Op) -> Result<(), Op> {
        if !self.has_room(from) {
            return Err(op);
        }
        self.send(from, op);
        Ok(())
    }

    /// Hands over a room-sequence load: allowed up to twice the queue
    /// bound, so that loads cannot starve writes of the channel, nor fill it.
    #[allow(clippy::result_large_err)]
    pub fn try_send_load(&self, from: usize, op: Op) -> Result<(), Op> {
        if self.pending[from].load(Ordering::Acquire) >= self.cap * 2 {
            return Err(op);
        }
        self.send(from, op);
        Ok(())
    }

    /// Hands `op` over after the caller checked [`Storage::has_room`] (or,
    /// for loads, the doubled bound). Every op is gated so, which keeps the
    /// channel (room for twice the bound per shard, and more) from filling:
    /// this never blocks. False if the op was dropped all the same (a bound
    /// was not checked, or the worker is gone).
    pub fn send(&self, from: usize, op: Op) -> bool {
        self.pending[from].fetch_add(1, Ordering::AcqRel);
        let Err(e) = self.tx.try_send((from as u16, op)) else {
            return true;
        };
        self.pending[from].fetch_sub(1, Ordering::AcqRel);
        if e.is_full() {
            log::error!(
                "storage: channel full, an operation was dropped (a bound was not checked)"
            );
        }
        false
    }

    /// Neither the store nor the spill file takes writes.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    pub fn queued(&self, from: usize) -> usize {
        self.pending[from].load(Ordering::Relaxed)
    }

    pub fn inbox(&self, shard: usize) -> &Inbox {
        &self.inboxes[shard]
    }

    pub fn keeps_presence(&self) -> bool {
        self.keeps_presence
    }

    /// Writes cannot fail, nor conflict outside a cluster (the embedded
    /// memory store): a home that is not in a cluster acks a publish
    /// `stored:true` as soon as it has handed the message to the worker,
    /// instead of after the worker's round trip. A `history` sent after such
    /// an ack still sees the message: its read enters the worker's one FIFO
    /// channel after the write did.
    pub fn acks_at_home(&self) -> bool {
        self.acks_at_home
    }
}

/// The running worker.
pub struct WorkerHandle {
    thread: JoinHandle<()>,
}

impl WorkerHandle {
    /// Stops the worker once it handled everything sent before this call
    /// (call it after the shards stopped), and waits for it.
    pub fn stop(self, storage: &Storage) {
        storage.send(0, Op::Stop);
        if self.thread.join().is_err() {
            log::error!("storage worker panicked");
        }
    }
}

/// Checks what can be checked before the node binds anything: the spill
/// directory of the `redis` store must be writable and not locked by
/// another gateway.
pub fn check(config: &StorageConfig) -> Result<(), StartError> {
    match &config.kind {
        StoreKind::Memory => Ok(()),
        StoreKind::Redis { .. } => {
            spill::check(&config.spill_dir, &config.node_id).map_err(|source| {
                StartError::SpillDir {
                    dir: config.spill_dir.clone(),
                    source,
                }
            })
        }
    }
}

/// Starts the worker for `shards` shards.
pub fn start(config: &StorageConfig, shards: usize) -> Result<(Storage, WorkerHandle), StartError> {
    let backend: Box<dyn Backend> = match &config.kind {
        StoreKind::Memory => Box::new(memory::MemoryStore::new(
            config.namespaces.clone(),
            config.meta_ttl,
        )),
        StoreKind::Redis { url } => Box::new(redis_backend::RedisStore::new(url, config)?),
    };
    start_with(backend, config, shards)
}

/// Starts the worker on a given store (tests use this with a failing one).
pub fn start_with(
    backend: Box<dyn Backend>,
    config: &StorageConfig,
    shards: usize,
) -> Result<(Storage, WorkerHandle), StartError> {
    let cap = config.queue_per_shard.max(1);
    // Slack for ops sent past the bound (loads, acks of retries).
    let (tx, rx) = crossbeam_channel::bounded(shards * cap * 2 + 1024);
    let pending: Arc<[AtomicUsize]> = (0..shards).map(|_| AtomicUsize::new(0)).collect();
    let inboxes: Arc<[Inbox]> = (0..shards).map(|_| Inbox::new()).collect();
    let metrics = Arc::new(StorageMetrics::default());
    let keeps_presence = backend.keeps_presence();
    let acks_at_home = backend.writes_cannot_fail();
    let failing = Arc::new(AtomicBool::new(false));
    let spill = match &config.kind {
        StoreKind::Memory => None,
        StoreKind::Redis { .. } => Some(
            spill::Spill::open(&config.spill_dir, &config.node_id).map_err(|source| {
                StartError::SpillDir {
                    dir: config.spill_dir.clone(),
                    source,
                }
            })?,
        ),
    };
    let shared = worker::Shared {
        rx,
        pending: pending.clone(),
        inboxes: inboxes.clone(),
        metrics: metrics.clone(),
        failing: failing.clone(),
    };
    let w = worker::Worker::new(backend, shared, spill, config.clone());
    let thread = std::thread::Builder::new()
        .name("storage".into())
        .spawn(move || w.run())
        .map_err(StartError::Thread)?;
    Ok((
        Storage {
            tx,
            pending,
            inboxes,
            cap,
            keeps_presence,
            acks_at_home,
            failing,
            metrics,
        },
        WorkerHandle { thread },
    ))
}
