//! What every layer of a shard reads: its index, limits, origin policy,
//! coarse clock, buffer pool, metrics and the node's stop.
//!
//! The bottom of the shard's layers: connections (`conn`), flush rounds
//! (`flush`) and chat (`chat`) each hold an `Rc<Local>`; it imports none of
//! them.

use std::{
    cell::Cell,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use crate::{buf::BufPool, lifecycle::NodeState, metrics::ShardMetrics, origin::Origins};

/// Limits every connection reads; derived from the configuration once
/// (`Config::validate`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub frame: crate::ws::Limits,
    pub max_header_bytes: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub ping_interval: Option<Duration>,
    pub close_timeout: Duration,
    pub outbound_budget_bytes: usize,
    pub slow_consumer_timeout: Duration,
    pub drain_timeout: Duration,
    pub drain_delay: Duration,
    pub start_timeout: Duration,
}

/// One shard's resources, shared by its layers.
pub struct Local {
    pub id: usize,
    pub limits: Limits,
    /// Which page origins may upgrade.
    pub origins: Origins,
    /// Every shard's metrics (this shard writes only `all_metrics[id]`).
    pub all_metrics: Arc<[ShardMetrics]>,
    pub pool: BufPool,
    /// Coarse clock, refreshed every tick; read on the hot path instead of
    /// asking the kernel for the time on every read.
    pub clock: Cell<Instant>,
    /// The node's stop, as `run` sets it.
    pub node_state: Arc<NodeState>,
}

impl Local {
    pub fn new(
        id: usize,
        limits: Limits,
        origins: Origins,
        all_metrics: Arc<[ShardMetrics]>,
        node_state: Arc<NodeState>,
    ) -> Local {
        Local {
            id,
            limits,
            origins,
            all_metrics,
            pool: BufPool::default(),
            clock: Cell::new(Instant::now()),
            node_state,
        }
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.all_metrics[self.id]
    }

    /// The node is stopping: `/readyz` says 503 `draining`.
    pub fn draining(&self) -> bool {
        self.node_state.draining.load(Ordering::Acquire)
    }
}
