//! Node start-up and shutdown: binds the listeners, starts one executor per
//! shard, waits for the shutdown signal, drains.
//!
//! # Invariants
//! - Runs on the caller's thread, never on a shard; it may block (it joins
//!   the shard threads).
//! - Every listener is bound and listening before `Server::bind` returns, so
//!   a client may connect as soon as it has the address.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use glommio::{channels::channel_mesh::MeshBuilder, LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    chat,
    config::{Config, Limits, ShardPlan},
    metrics::ShardMetrics,
    shard,
    shutdown::{self, Trigger},
    Error,
};

/// io_uring memory per shard. glommio locks it, and it keeps three rings per
/// executor: 1 MiB each keeps 2 shards well under an 8 MiB memlock limit.
const IO_MEMORY_BYTES: usize = 1 << 20;

/// A gateway node whose listeners are bound but whose shards are not running.
pub struct Server {
    config: Config,
    limits: Limits,
    plan: ShardPlan,
    storage: crate::storage::StorageConfig,
    mesh: Option<crate::mesh::MeshConfig>,
    listeners: Vec<OwnedFd>,
    local_addr: SocketAddr,
}

impl Server {
    /// Validates the configuration and binds one listener per shard.
    pub fn bind(config: Config) -> Result<Server, Error> {
        let limits = config.limits()?;
        let plan = config.placement()?;
        let storage = config.storage()?;
        let mesh = config.mesh(&storage)?;
        let addr = config.listen;
        let bind_err = |source: io::Error| {
            let hint = match source.kind() {
                io::ErrorKind::AddrInUse => " (is another gateway running? pass --listen)",
                io::ErrorKind::PermissionDenied => {
                    " (ports below 1024 need privileges; pick another port)"
                }
                io::ErrorKind::AddrNotAvailable => " (that address is not on this machine)",
                _ => "",
            };
            Error::Bind { addr, source, hint }
        };
        if addr.port() != 0 {
            // SO_REUSEPORT would let us share the port with another process
            // of the same user; bind once without it to catch that.
            probe_free(addr).map_err(bind_err)?;
        }
        let first = listen_socket(addr, config.backlog).map_err(bind_err)?;
        let local_addr = first
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| bind_err(io::Error::other("no local address")))?;
        let mut listeners: Vec<OwnedFd> = vec![first.into()];
        for _ in 1..plan.shards {
            listeners.push(
                listen_socket(local_addr, config.backlog)
                    .map_err(bind_err)?
                    .into(),
            );
        }
        Ok(Server {
            config,
            limits,
            plan,
            storage,
            mesh,
            listeners,
            local_addr,
        })
    }

    /// The address the listeners are bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Runs the shards until `shutdown` completes, then drains: stops
    /// accepting, closes every WebSocket with 1001, waits up to the drain
    /// timeout, returns.
    pub fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Server {
            config,
            limits,
            plan,
            storage,
            mesh,
            listeners,
            local_addr,
        } = self;
        log::info!(
            "corecast gateway {} listening on {local_addr}: {} shards, {}; backlog {}",
            env!("CARGO_PKG_VERSION"),
            plan.shards,
            match &plan.pinned {
                Some(cpus) => format!("pinned to CPUs {cpus:?}"),
                None => "not pinned (more shards than CPUs)".to_string(),
            },
            config.backlog
        );
        log::info!(
            "limits: max_frame_bytes={} max_message_bytes={} max_header_bytes={} handshake_timeout_ms={} idle_timeout_ms={} ping_interval_ms={} close_timeout_ms={} outbound_budget_bytes={} slow_consumer_timeout_ms={} drain_timeout_ms={}",
            config.max_frame_bytes,
            config.max_message_bytes,
            config.max_header_bytes,
            config.handshake_timeout_ms,
            config.idle_timeout_ms,
            config.ping_interval_ms,
            config.close_timeout_ms,
            config.outbound_budget_bytes,
            config.slow_consumer_timeout_ms,
            config.drain_timeout_ms
        );
        let metrics: Arc<[ShardMetrics]> =
            (0..plan.shards).map(|_| ShardMetrics::default()).collect();
        let chat_settings = config.chat_settings();
        if chat_settings.verifier.is_none() && !chat_settings.allow_anonymous {
            log::warn!("no --jwt-secret and no --allow-anonymous: /ws will refuse every client");
        }
        let (store, worker) = crate::storage::start(&storage, plan.shards)?;
        let node = crate::mesh::node_tag(&storage.node_id);
        let (mesh, mesh_thread) = match mesh {
            Some(m) => match crate::mesh::start(m, plan.shards) {
                Ok((mesh, t)) => (Some(mesh), Some(t)),
                Err(e) => {
                    worker.stop(&store);
                    return Err(e.into());
                }
            },
            None => (None, None),
        };
        let requests = MeshBuilder::full(plan.shards, chat::RING_SLOTS);
        let deliveries = MeshBuilder::full(plan.shards, chat::RING_SLOTS);
        let stop = Arc::new(AtomicBool::new(false));
        let (exited, any_exited) = shutdown::channel();
        let mut handles = Vec::with_capacity(plan.shards);
        for (id, listener) in listeners.into_iter().enumerate() {
            let placement = match &plan.pinned {
                Some(cpus) => Placement::Fixed(cpus[id]),
                None => Placement::Unbound,
            };
            let guard = ExitGuard(exited.clone());
            let setup = shard::ShardSetup {
                id,
                listener,
                limits,
                all_metrics: metrics.clone(),
                stop: stop.clone(),
                chat: chat_settings.clone(),
                requests: requests.clone(),
                deliveries: deliveries.clone(),
                storage: store.clone(),
                node,
                mesh: mesh.clone(),
            };
            let spawned = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{id}"))
                .io_memory(IO_MEMORY_BYTES)
                .spawn(move || async move {
                    let _guard = guard;
                    shard::run(setup).await;
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Release);
                    for h in handles {
                        let _ = h.join();
                    }
                    if let Some(t) = mesh_thread {
                        t.stop();
                    }
                    worker.stop(&store);
                    return Err(Error::Executor {
                        shard: id,
                        message: format!(
                            "{e} (io_uring needs locked memory: 3 MiB per shard; check `ulimit -l`, or lower --shards)"
                        ),
                    });
                }
            }
        }
        let early_exit = futures_lite::future::block_on(futures_lite::future::or(
            async {
                shutdown.await;
                false
            },
            async {
                any_exited.await;
                true
            },
        ));
        if early_exit {
            log::error!("a shard stopped unexpectedly; shutting the node down");
        } else {
            log::info!(
                "shutting down: closing connections (waiting up to {} ms)",
                limits.drain_timeout.as_millis()
            );
        }
        stop.store(true, Ordering::Release);
        let mut result = Ok(());
        for (id, h) in handles.into_iter().enumerate() {
            if let Err(e) = h.join() {
                result = Err(Error::ShardFailed {
                    shard: id,
                    message: e.to_string(),
                });
            }
        }
        // The shards are gone: the worker writes what it holds, then stops.
        // The store first: the other nodes take this node's rooms over once
        // the mesh stops, and must find every message it sequenced stored.
        worker.stop(&store);
        if let Some(t) = mesh_thread {
            t.stop();
        }
        if early_exit && result.is_ok() {
            result = Err(Error::ShardFailed {
                shard: usize::MAX,
                message: "exited before shutdown was requested".into(),
            });
        }
        if result.is_ok() {
            log::info!("all shards stopped");
        }
        result
    }
}

/// Fires when a shard's thread ends, however it ends (including a panic).
struct ExitGuard(Trigger);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.fire();
    }
}

/// Binds `addr` without SO_REUSEPORT and releases it: fails if some other
/// socket is listening there.
fn probe_free(addr: SocketAddr) -> io::Result<()> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
}

fn listen_socket(addr: SocketAddr, backlog: u32) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nodelay(true)?;
    // The shard accepts when its epoll set says so, until EAGAIN.
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s)
}

/// Runs a gateway node until `shutdown` completes. See [`Server`].
pub fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    Server::bind(config)?.run(shutdown)
}
