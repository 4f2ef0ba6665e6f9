//! What the node's main thread and its shards tell each other about
//! starting and stopping ([`NodeState`], [`Stage`]), and the faults tests
//! inject into a shard ([`Fault`]). Atomics only: read and written from
//! every thread.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// A fault a test injects into one shard, to check what the node does when
/// a shard is stuck. Not for production use.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The shard waits forever before connecting its rings.
    StallStart(usize),
    /// The shard waits forever once told to stop, before it closes anything.
    IgnoreStop(usize),
}

/// What `run` and the shards tell each other about starting and stopping.
#[derive(Debug)]
pub struct NodeState {
    /// `/readyz` answers 503 `draining`; everything else goes on (set by
    /// `run`).
    pub draining: AtomicBool,
    /// Close: stop accepting, close every connection with 1001, end (set by
    /// `run`).
    pub stop: AtomicBool,
    /// Per shard, how far its start got ([`Stage`]; set by the shard).
    stages: Box<[AtomicU8]>,
}

/// How far a shard's start got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// The thread is being set up (io_uring rings, registered memory).
    Spawned,
    /// Connecting its cross-shard rings: waits for every other shard.
    Rings,
    /// Creating its epoll set and watching its listener.
    Epoll,
    /// Accepting and serving.
    Serving,
}

impl Stage {
    fn from_u8(v: u8) -> Stage {
        match v {
            0 => Stage::Spawned,
            1 => Stage::Rings,
            2 => Stage::Epoll,
            _ => Stage::Serving,
        }
    }

    pub(crate) fn doing(self) -> &'static str {
        match self {
            Stage::Spawned => "setting up its executor",
            Stage::Rings => "connecting its cross-shard rings",
            Stage::Epoll => "watching its listener",
            Stage::Serving => "serving",
        }
    }
}

impl NodeState {
    pub(crate) fn new(shards: usize) -> NodeState {
        NodeState {
            draining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            stages: (0..shards)
                .map(|_| AtomicU8::new(Stage::Spawned as u8))
                .collect(),
        }
    }

    /// Shards in the node.
    pub fn shards(&self) -> usize {
        self.stages.len()
    }

    pub fn set_stage(&self, shard: usize, stage: Stage) {
        self.stages[shard].store(stage as u8, Ordering::Release);
    }

    pub(crate) fn stage(&self, shard: usize) -> Stage {
        Stage::from_u8(self.stages[shard].load(Ordering::Acquire))
    }

    /// The node is draining or stopping.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn close(&self) {
        self.draining.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
    }
}
