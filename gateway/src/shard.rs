//! One shard: an executor thread's listener, connections and sweeper.
//!
//! # Invariants
//! - Owned by one glommio executor thread; `!Send` by construction (`Rc`,
//!   `RefCell`). Other threads see only its metrics (atomics, single writer)
//!   and set only the node-wide stop flag it polls on every tick.
//! - Never blocks. The sweeper visits every connection once per tick and only
//!   wakes those whose deadline passed: timers cost no allocation and no
//!   per-message work.
//! - Socket readiness comes from the shard's epoll set (`readiness`): one
//!   dispatcher task collects its events and wakes the connections (or the
//!   acceptor) that were waiting for them.
//! - No `RefCell` borrow is held across an `.await`.

use std::{
    cell::{Cell, RefCell},
    future::poll_fn,
    io,
    os::fd::{AsFd, OwnedFd},
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    task::Poll,
    time::{Duration, Instant},
};

use glommio::timer::Timer;
use rustix::{io::Errno, net::SocketFlags};
use slab::Slab;

use crate::{
    buf::BufPool,
    chat::{self, ChatShard, Delivery, Request},
    conn::{self, ConnShared},
    flush::{self, Flusher},
    lifecycle::{Fault, NodeState, Stage},
    metrics::ShardMetrics,
    readiness::{self, Poller, Waiter},
    rings::ShardRings,
};

/// Limits every connection reads; derived from the configuration once
/// (`Config::limits`).
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

/// State every connection of the shard shares.
pub struct Shard {
    pub id: usize,
    pub limits: Limits,
    /// Every shard's metrics (this shard writes only `all_metrics[id]`).
    pub all_metrics: Arc<[ShardMetrics]>,
    pub pool: BufPool,
    /// Live connections, for the sweeper and the drain.
    pub conns: RefCell<Slab<Rc<ConnShared>>>,
    /// Coarse clock, refreshed every tick; read on the hot path instead of
    /// asking the kernel for the time on every read.
    pub clock: Cell<Instant>,
    /// The node's stop, as `run` sets it.
    pub node_state: Arc<NodeState>,
    /// Generation of the last connection accepted (see `ConnShared::gen`).
    pub next_gen: Cell<u32>,
    pub chat: ChatShard,
    /// The listener's readiness and the acceptor waiting on it.
    pub accepting: Waiter,
    /// Room members waiting for the next flush round.
    pub flusher: Flusher,
}

impl Shard {
    pub fn metrics(&self) -> &ShardMetrics {
        &self.all_metrics[self.id]
    }

    /// The node is stopping: `/readyz` says 503 `draining`.
    pub fn draining(&self) -> bool {
        self.node_state.draining.load(Ordering::Acquire)
    }
}

/// Hands one epoll event to whoever waits for it: the acceptor, or the
/// connection the token names (if it is still the same connection).
pub fn on_event(shard: &Shard, token: u64, flags: rustix::event::epoll::EventFlags) {
    if token == readiness::LISTENER {
        if shard.accepting.io.set(flags) {
            shard.accepting.wake();
        }
        return;
    }
    let (key, gen) = readiness::split_token(token);
    let conns = shard.conns.borrow();
    if let Some(c) = conns.get(key).filter(|c| c.gen == gen) {
        if c.ready.io.set(flags) {
            c.wake();
        }
    }
}

/// How often the sweeper runs: a tenth of the shortest timeout, within
/// 10-100 ms. Timeouts fire at most one tick late.
fn tick(limits: &Limits) -> Duration {
    let shortest = [
        Some(limits.handshake_timeout),
        Some(limits.idle_timeout),
        limits.ping_interval,
        Some(limits.close_timeout),
        Some(limits.slow_consumer_timeout),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(Duration::from_secs(1));
    (shortest / 10).clamp(Duration::from_millis(10), Duration::from_millis(100))
}

/// What a shard starts from; built on the main thread, moved to the shard.
pub struct ShardSetup {
    pub id: usize,
    pub listener: OwnedFd,
    pub limits: Limits,
    pub all_metrics: Arc<[ShardMetrics]>,
    pub node_state: Arc<NodeState>,
    pub chat: chat::Settings,
    pub requests: ShardRings<Request>,
    pub deliveries: ShardRings<Delivery>,
    pub storage: crate::storage::Storage,
    /// This node's tag, and the mesh when the node runs in a cluster.
    pub node: corecast_router::message::NodeTag,
    pub mesh: Option<crate::mesh::Mesh>,
    pub fault: Option<Fault>,
}

/// Runs a shard until `stop` is set and its connections have drained.
pub async fn run(setup: ShardSetup) {
    let ShardSetup {
        id,
        listener,
        limits,
        all_metrics,
        node_state,
        chat: settings,
        requests,
        deliveries,
        storage,
        node,
        mesh,
        fault,
    } = setup;
    if fault == Some(Fault::StallStart(id)) {
        std::future::pending::<()>().await;
    }
    // Every shard connects its rings before any accepts: a connect
    // completes once the peer on the other end connected too.
    node_state.set_stage(id, Stage::Rings);
    let (req_tx, req_rx) = requests.connect().await;
    let (del_tx, del_rx) = deliveries.connect().await;
    node_state.set_stage(id, Stage::Epoll);
    let poller = match Poller::new() {
        Ok(p) => p,
        Err(e) => {
            log::error!("shard {id}: could not create its epoll set: {e}");
            return;
        }
    };
    if let Err(e) = poller.add(listener.as_fd(), readiness::LISTENER) {
        log::error!("shard {id}: could not watch its listener: {e}");
        return;
    }
    let shard = Rc::new(Shard {
        id,
        limits,
        all_metrics,
        pool: BufPool::default(),
        conns: RefCell::new(Slab::new()),
        clock: Cell::new(Instant::now()),
        node_state: node_state.clone(),
        next_gen: Cell::new(0),
        chat: ChatShard::new(settings, req_tx, del_tx, storage, node, mesh),
        accepting: Waiter::default(),
        flusher: Flusher::default(),
    });
    chat::spawn_tasks(&shard, req_rx, del_rx);
    // The epoll set belongs to these three tasks only (the flusher just
    // collects from it between slices), so it is closed when all are gone
    // (a task still waiting when the executor ends is never dropped, and
    // other tasks keep the shard alive).
    let poller = Rc::new(poller);
    let flusher = glommio::spawn_local(flush::run(shard.clone(), poller.clone()));
    let dispatcher = glommio::spawn_local(dispatch(shard.clone(), poller.clone()));
    let acceptor = glommio::spawn_local(accept_loop(shard.clone(), poller, listener));
    node_state.set_stage(id, Stage::Serving);
    let tick = tick(&limits);
    while !node_state.stop.load(Ordering::Acquire) {
        Timer::new(tick).await;
        sweep(&shard);
    }
    if fault == Some(Fault::IgnoreStop(id)) {
        std::future::pending::<()>().await;
    }

    // Drain: stop accepting (dropping the task closes the listener; the
    // kernel moves new connections to the other shards' listeners while
    // they last), then ask every connection to close with 1001.
    drop(acceptor);
    for (_, c) in shard.conns.borrow().iter() {
        c.shutdown.set(true);
        c.wake();
    }
    let deadline = Instant::now() + limits.drain_timeout;
    while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
        Timer::new(tick).await;
        sweep(&shard);
    }
    let left = shard.conns.borrow().len();
    if left > 0 {
        log::warn!(
            "shard {id}: {left} connections did not finish the close handshake within the drain timeout ({} ms); dropping them",
            limits.drain_timeout.as_millis()
        );
    }
    // The dispatcher holds the epoll set and glommio's poll on it: stop it
    // here. Returning ends the executor, which drops every remaining
    // connection task and with it its socket.
    dispatcher.cancel().await;
    flusher.cancel().await;
}

/// Refreshes the clock and wakes the connections whose deadline passed.
fn sweep(shard: &Shard) {
    let now = Instant::now();
    shard.clock.set(now);
    shard.metrics().io_buffers_lent.set(shard.pool.lent());
    shard
        .metrics()
        .room_feed_bytes
        .set(shard.chat.feed_bytes.get());
    for (_, c) in shard.conns.borrow().iter() {
        if c.deadline.get() <= now {
            c.fired.set(true);
            c.wake();
        }
    }
}

/// Collects the epoll set's events and wakes whoever waited for them.
async fn dispatch(shard: Rc<Shard>, poller: Rc<Poller>) {
    let mut last_warning: Option<Instant> = None;
    let on_event = |token, flags| on_event(&shard, token, flags);
    let on_error = |what: String| warn_sometimes(&shard, &mut last_warning, &what);
    poller.dispatch(on_event, on_error).await;
}

fn warn_sometimes(shard: &Shard, last: &mut Option<Instant>, what: &str) {
    let now = Instant::now();
    if last.is_none_or(|t| now.duration_since(t) > Duration::from_secs(5)) {
        *last = Some(now);
        log::warn!("shard {}: {what}", shard.id);
    }
}

/// Accepts while the listener has connections waiting; owns the listener,
/// so dropping the task closes it.
async fn accept_loop(shard: Rc<Shard>, poller: Rc<Poller>, listener: OwnedFd) {
    let mut last_warning: Option<Instant> = None;
    loop {
        if !shard.accepting.io.readable.get() {
            poll_fn(|cx| {
                if shard.accepting.io.readable.get() {
                    Poll::Ready(())
                } else {
                    shard.accepting.register(cx.waker());
                    Poll::Pending
                }
            })
            .await;
        }
        let accepted =
            rustix::net::accept_with(&listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC);
        match accepted {
            Ok(socket) => {
                // We coalesce writes ourselves; Nagle would only add latency.
                let _ = rustix::net::sockopt::set_tcp_nodelay(&socket, true);
                if let Err(e) = conn::spawn(&shard, &poller, socket) {
                    shard.metrics().accept_errors.inc();
                    warn_sometimes(
                        &shard,
                        &mut last_warning,
                        &format!("could not watch an accepted connection: {e}"),
                    );
                }
                glommio::yield_if_needed().await;
            }
            Err(Errno::AGAIN) => shard.accepting.io.readable.set(false),
            Err(Errno::INTR | Errno::CONNABORTED) => {}
            Err(e) => {
                let e = io::Error::from(e);
                shard.metrics().accept_errors.inc();
                warn_sometimes(
                    &shard,
                    &mut last_warning,
                    &format!("accept failed: {e} (out of file descriptors? raise `ulimit -n`, or run more gateway processes)"),
                );
                // Back off instead of spinning on a persistent error.
                Timer::new(Duration::from_millis(20)).await;
            }
        }
    }
}
