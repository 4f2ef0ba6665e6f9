//! One shard: an executor thread's listener, connections and sweeper, and
//! the top of the shard's layers. It builds them bottom up (`local`, the
//! connection table `conn::Conns`, the `flush` rounds, `chat`), each holding
//! `Rc`s of those below, and is the [`conn::Host`] connections call up to.
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
    cell::Cell,
    future::poll_fn,
    io,
    os::fd::{AsFd, OwnedFd},
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use glommio::timer::Timer;
use rustix::{io::Errno, net::SocketFlags};

use crate::{
    chat::{self, session, ChatShard, ConnRef, Delivery, Member, Request, Session},
    conn::{self, Conns, Host, Outcome},
    doors,
    flush::{self, Flusher},
    lifecycle::{Fault, NodeState, Stage},
    local::{Limits, Local},
    metrics::{self, ShardMetrics},
    origin::Origins,
    readiness::{self, Poller},
    rings::ShardRings,
};

/// One shard, its layers assembled: its resources, its connections, its
/// flush rounds and its chat. Each layer holds `Rc`s of those below it; the
/// shard is what connections see above them (`conn::Host`). It keeps the
/// same `Rc`s chat holds, so a connection reaches its resources in one hop
/// rather than through chat.
pub struct Shard {
    pub local: Rc<Local>,
    pub conns: Rc<Conns<Session>>,
    pub flusher: Rc<Flusher>,
    pub chat: Rc<ChatShard>,
    /// The certificate, for its expiry metric; `None` without TLS.
    pub tls: Option<crate::tls::Tls>,
    /// The server API's calls, for its metrics; `None` without the API.
    pub api: Option<Arc<crate::api::Calls>>,
    /// `--dev`: the development side doors' secret; `None` outside it.
    pub dev: Option<doors::Dev>,
}

impl Shard {
    fn conn_ref(&self, conn: &Member, key: u32) -> ConnRef {
        ConnRef {
            node: self.chat.node,
            shard: self.chat.me as u16,
            key,
            gen: conn.gen,
        }
    }
}

impl Host for Shard {
    type App = Session;

    fn local(&self) -> &Local {
        &self.local
    }

    fn conns(&self) -> &Conns<Session> {
        &self.conns
    }

    fn side_door(&self, path: &str, query: Option<&str>) -> Option<doors::Answer> {
        let (local, chat) = (&*self.local, &*self.chat);
        let node = doors::Node {
            draining: local.draining(),
            cluster_ready: chat.cluster_ready(),
            // Each subsystem renders its own series.
            metrics: || {
                let mut out = metrics::render(&local.all_metrics, local.draining());
                chat.storage.render_metrics(&mut out);
                if let Some(mesh) = chat.mesh() {
                    mesh.render_metrics(&mut out);
                }
                if let Some(tls) = &self.tls {
                    tls.render_metrics(&mut out);
                }
                if let Some(api) = &self.api {
                    api.render_metrics(&mut out);
                }
                out
            },
            dev: self.dev.as_ref(),
            unix_now_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        doors::answer(node, path, query)
    }

    fn congested(&self) -> bool {
        self.chat.congested()
    }

    fn wait_uncongested(&self, waker: &Waker, epoch: &Cell<u64>) {
        self.chat.wait_uncongested(waker, epoch);
    }

    fn wants_peer(&self) -> bool {
        self.chat.settings.max_connections_per_ip.is_some()
    }

    fn opened(
        &self,
        conn: &Member,
        key: u32,
        token: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Outcome {
        session::on_open(&self.chat, conn, self.conn_ref(conn, key), token, peer)
    }

    fn text(&self, conn: &Member, key: u32, text: &[u8]) -> Outcome {
        session::on_text(&self.chat, conn, self.conn_ref(conn, key), text)
    }

    fn closed(&self, conn: &Member, key: u32) {
        session::on_close(&self.chat, conn, self.conn_ref(conn, key));
    }

    fn deadline(app: &Session) -> Option<(Instant, u16, crate::conn::Reason)> {
        app.deadline()
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

/// A listening socket of the shard, and the TLS its connections start
/// with (`None`: plain).
pub struct Listener {
    pub fd: OwnedFd,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// What a shard starts from; built on the main thread, moved to the shard.
pub struct ShardSetup {
    pub id: usize,
    /// `--listen`, then `--tls-listen` if given.
    pub listeners: Vec<Listener>,
    /// The certificate (for its expiry metric).
    pub tls: Option<crate::tls::Tls>,
    pub limits: Limits,
    pub origins: Origins,
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
    /// The server API's calls, when `--api-listen` is given.
    pub api: Option<Arc<crate::api::Calls>>,
    /// `--dev`: what the development side doors need.
    pub dev: Option<doors::Dev>,
}

/// Runs a shard until `stop` is set and its connections have drained.
pub async fn run(setup: ShardSetup) {
    let ShardSetup {
        id,
        listeners,
        tls,
        limits,
        origins,
        all_metrics,
        node_state,
        chat: settings,
        requests,
        deliveries,
        storage,
        node,
        mesh,
        fault,
        api,
        dev,
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
    for (i, l) in listeners.iter().enumerate().take(readiness::MAX_LISTENERS) {
        if let Err(e) = poller.add(l.fd.as_fd(), readiness::listener_token(i)) {
            log::error!("shard {id}: could not watch its listener: {e}");
            return;
        }
    }
    let local = Rc::new(Local::new(
        id,
        limits,
        origins,
        all_metrics,
        node_state.clone(),
    ));
    let conns = Rc::new(Conns::default());
    let flusher = Rc::new(Flusher::default());
    let lower = chat::Lower {
        local: local.clone(),
        conns: conns.clone(),
        flusher: flusher.clone(),
    };
    let chat = ChatShard::new(settings, req_tx, del_tx, storage, node, mesh, lower);
    let shard = Rc::new(Shard {
        local,
        conns,
        flusher,
        chat: Rc::new(chat),
        tls,
        api: api.clone(),
        dev,
    });
    chat::spawn_tasks(&shard.chat, req_rx, del_rx);
    if let Some(calls) = api {
        chat::api::spawn(&shard.chat, calls);
    }
    // The epoll set belongs to these three tasks only (the flusher just
    // collects from it between slices), so it is closed when all are gone
    // (a task still waiting when the executor ends is never dropped, and
    // other tasks keep the shard alive).
    let poller = Rc::new(poller);
    let flusher = glommio::spawn_local(flush::run(
        shard.local.clone(),
        shard.conns.clone(),
        shard.flusher.clone(),
        poller.clone(),
    ));
    let dispatcher = glommio::spawn_local(dispatch(shard.clone(), poller.clone()));
    let acceptors: Vec<_> = listeners
        .into_iter()
        .take(readiness::MAX_LISTENERS)
        .enumerate()
        .map(|(i, l)| glommio::spawn_local(accept_loop(shard.clone(), poller.clone(), i, l)))
        .collect();
    drop(poller);
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
    drop(acceptors);
    for (_, c) in shard.conns.slab.borrow().iter() {
        c.shutdown.set(true);
        c.wake();
    }
    let deadline = Instant::now() + limits.drain_timeout;
    while !shard.conns.slab.borrow().is_empty() && Instant::now() < deadline {
        Timer::new(tick).await;
        sweep(&shard);
    }
    let left = shard.conns.slab.borrow().len();
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
    let local = &shard.local;
    let now = Instant::now();
    local.clock.set(now);
    local.metrics().io_buffers_lent.set(local.pool.lent());
    local
        .metrics()
        .room_feed_bytes
        .set(shard.flusher.held.get());
    for (_, c) in shard.conns.slab.borrow().iter() {
        if c.deadline.get() <= now {
            c.fired.set(true);
            c.wake();
        }
    }
}

/// Collects the epoll set's events and wakes whoever waited for them.
async fn dispatch(shard: Rc<Shard>, poller: Rc<Poller>) {
    let mut last_warning: Option<Instant> = None;
    let on_event = |token, flags| shard.conns.on_event(token, flags);
    let on_error = |what: String| warn_sometimes(&shard, &mut last_warning, &what);
    poller.dispatch(on_event, on_error).await;
}

fn warn_sometimes(shard: &Shard, last: &mut Option<Instant>, what: &str) {
    let now = Instant::now();
    if last.is_none_or(|t| now.duration_since(t) > Duration::from_secs(5)) {
        *last = Some(now);
        log::warn!("shard {}: {what}", shard.local.id);
    }
}

/// Accepts while the `i`-th listener has connections waiting; owns the
/// listener, so dropping the task closes it.
async fn accept_loop(shard: Rc<Shard>, poller: Rc<Poller>, i: usize, listener: Listener) {
    let mut last_warning: Option<Instant> = None;
    let accepting = &shard.conns.accepting[i];
    loop {
        if !accepting.io.readable.get() {
            poll_fn(|cx| {
                if accepting.io.readable.get() {
                    Poll::Ready(())
                } else {
                    accepting.register(cx.waker());
                    Poll::Pending
                }
            })
            .await;
        }
        let accepted =
            rustix::net::accept_with(&listener.fd, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC);
        match accepted {
            Ok(socket) => {
                // We coalesce writes ourselves; Nagle would only add latency.
                let _ = rustix::net::sockopt::set_tcp_nodelay(&socket, true);
                if let Err(e) = conn::spawn(&shard, &poller, socket, listener.tls.as_ref()) {
                    shard.local.metrics().accept_errors.inc();
                    warn_sometimes(
                        &shard,
                        &mut last_warning,
                        &format!("could not watch an accepted connection: {e}"),
                    );
                }
                glommio::yield_if_needed().await;
            }
            Err(Errno::AGAIN) => accepting.io.readable.set(false),
            Err(Errno::INTR | Errno::CONNABORTED) => {}
            Err(e) => {
                let e = io::Error::from(e);
                shard.local.metrics().accept_errors.inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_state_stays_small() {
        // Every idle connection holds one of these (plus its task header,
        // glommio's stream and a pending poll). The memory target is 4 KiB
        // per idle connection in all; keep the state itself well under it.
        // (Conn 208 B, of which 8 are the TLS stream's pointer, + ConnShared
        // 176 B on x86_64 today: at the bound, so a field that grows either
        // must pay for itself in `benches/idle-memory.sh`.)
        let conn = std::mem::size_of::<conn::Conn<Shard>>();
        let shared = std::mem::size_of::<Member>();
        assert!(
            conn + shared <= 384,
            "Conn {conn} B + ConnShared {shared} B"
        );
    }
}
