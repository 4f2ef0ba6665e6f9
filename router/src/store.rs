//! What a home shard asks of the store and what the store answers: the
//! storage worker's whole vocabulary, as plain data. The gateway's storage
//! worker carries these out; it needs nothing else of chat.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use crate::message::{ConnRef, Record};

/// Where a room's sequence stands in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomMeta {
    pub last_seq: u64,
    /// Changes whenever the store lost the room's history (a memory store
    /// restarted, a Redis key expired): seqs of another epoch mean nothing.
    pub epoch: Arc<str>,
}

/// Which messages a read wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// The last `n` messages.
    Last(usize),
    /// Up to `n` messages with seq greater than `after`, oldest first.
    After { after: u64, n: usize },
}

/// Presence kept by the store (Redis only; the memory store leaves
/// presence to the home shards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceOp {
    Add {
        room: Arc<str>,
        user: Arc<str>,
    },
    Remove {
        room: Arc<str>,
        user: Arc<str>,
    },
    /// The heartbeat: these users are still in the room.
    Refresh {
        room: Arc<str>,
        users: Vec<Arc<str>>,
    },
}

/// Work for the storage worker.
#[derive(Debug)]
pub enum Op {
    /// Store a sequenced message and then ack it to `ack_to` (`None`: the
    /// home acked it already, see `Storage::acks_at_home` in the gateway).
    Append {
        record: Record,
        ack_to: Option<ConnRef>,
        /// In a cluster: the message's frame, sent back as
        /// [`Reply::Stored`] once it is stored, for the fan-out.
        fanout: Option<Arc<[u8]>>,
    },
    /// A node missed seqs `after+1 ..= upto` of a room: fetch them for its
    /// members ([`Reply::Repaired`]).
    Repair {
        room: Arc<str>,
        after: u64,
        upto: u64,
        home: u16,
    },
    /// A retried publish: ack it with its original seq once everything
    /// before it is handled.
    DuplicateAck {
        room: Arc<str>,
        id: Box<str>,
        seq: u64,
        epoch: Arc<str>,
        ack_to: ConnRef,
    },
    /// A home shard needs a room's sequence.
    Load {
        room: Arc<str>,
        home: u16,
    },
    /// A client asked for history; answer it a `history` frame.
    History {
        room: Arc<str>,
        query: Query,
        /// The room's last seq at the home when it asked (None when the home
        /// does not have the room active).
        upto: Option<u64>,
        to: ConnRef,
    },
    /// A client joined with a resume point: what it missed, then `joined`.
    Recover(Box<Recover>),
    Presence(PresenceOp),
    /// Answer a presence query from the store.
    PresenceQuery {
        room: Arc<str>,
        to: ConnRef,
        max_members: usize,
    },
    /// The node is stopping: handle what came before, then end.
    Stop,
}

/// A resume request, answered with [`Reply::Recovered`].
#[derive(Debug)]
pub struct Recover {
    pub room: Arc<str>,
    pub since: u64,
    pub epoch: Box<str>,
    /// The room's last seq when the join was registered: live messages
    /// after it reach the client through the room, not the recovery.
    pub upto: u64,
    pub home_epoch: Arc<str>,
    pub members: u64,
    pub to: ConnRef,
    /// Tells this join from an earlier one of the same room.
    pub nonce: u32,
}

/// What the worker sends back to a shard.
#[derive(Debug)]
pub enum Reply {
    /// A frame for one connection (an ack, a history answer, an error).
    ToConn { conn: ConnRef, frame: Box<[u8]> },
    /// A room's sequence, or `None` when the store cannot say (breaker open).
    Loaded {
        room: Arc<str>,
        meta: Option<RoomMeta>,
    },
    /// Another home stored other messages under these seqs of `room`:
    /// they were refused (`room_moving`); the home must reload the room.
    Conflict {
        room: Arc<str>,
        from: Arc<str>,
        id: Box<str>,
        seq: u64,
    },
    /// A message of `Op::Append` with a fan-out frame is stored.
    Stored {
        room: Arc<str>,
        seq: u64,
        frame: Arc<[u8]>,
    },
    /// What history holds of a repair's seqs: `got` message frames, in
    /// order, concatenated.
    Repaired {
        room: Arc<str>,
        after: u64,
        upto: u64,
        frames: Vec<u8>,
        got: u64,
    },
    /// A resume answered: the `joined` frame, then the missed messages.
    Recovered {
        conn: ConnRef,
        room: Arc<str>,
        nonce: u32,
        joined: Box<[u8]>,
        missed: Vec<u8>,
    },
}

/// A fresh epoch: unique per process start and per call.
pub fn new_epoch() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mixed = (now ^ (std::process::id() as u64).rotate_left(40))
        .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    format!("{:012x}", mixed & 0xffff_ffff_ffff)
}
