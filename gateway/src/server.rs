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
    sync::{atomic::Ordering, mpsc, Arc},
    time::{Duration, Instant},
};

use glommio::{LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    chat,
    config::{Config, ShardPlan},
    lifecycle::{Fault, NodeState, Stage},
    local::Limits,
    metrics::ShardMetrics,
    rings, shard,
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
    origins: crate::origin::Origins,
    plan: ShardPlan,
    chat: crate::chat::Settings,
    key_files: Option<crate::keys::KeyFiles>,
    storage: crate::storage::StorageConfig,
    mesh: Option<crate::mesh::MeshConfig>,
    listeners: Vec<OwnedFd>,
    local_addr: SocketAddr,
    /// The certificate, and the listeners of `--tls-listen` (none when
    /// `--listen` itself speaks TLS).
    tls: Option<crate::tls::Tls>,
    tls_listeners: Vec<OwnedFd>,
    tls_addr: Option<SocketAddr>,
    /// The server API's settings and bound listener.
    api: Option<(crate::api::ApiSettings, std::net::TcpListener)>,
    namespace_file: crate::config::namespaces::NamespaceFile,
    /// `--dev`: the development side doors' secret.
    dev: Option<crate::doors::Dev>,
    fault: Option<Fault>,
}

impl Server {
    /// Validates the configuration and binds one listener per shard.
    pub fn bind(config: Config) -> Result<Server, Error> {
        let crate::config::Settings {
            limits,
            origins,
            plan,
            chat,
            key_files,
            storage,
            mesh,
            tls,
            api,
            namespace_file,
            dev,
        } = config.validate()?;
        crate::storage::check(&storage)?;
        let (listeners, local_addr) =
            bind_all(config.listen(), plan.shards, config.node.backlog, false)?;
        let (tls_listeners, tls_addr) = match (&tls, config.tls.tls_listen) {
            (Some(_), Some(addr)) => {
                let (l, a) = bind_all(addr, plan.shards, config.node.backlog, true)?;
                (l, Some(a))
            }
            _ => (Vec::new(), None),
        };
        let api = match api {
            Some(settings) => {
                let listener = crate::api::bind(&settings)?;
                Some((settings, listener))
            }
            None => None,
        };
        Ok(Server {
            config,
            limits,
            origins,
            plan,
            chat,
            key_files,
            storage,
            mesh,
            listeners,
            local_addr,
            tls,
            tls_listeners,
            tls_addr,
            api,
            namespace_file,
            dev,
            fault: None,
        })
    }

    /// The room namespaces and their file (SIGHUP re-reads it).
    pub fn namespace_file(&self) -> crate::config::namespaces::NamespaceFile {
        self.namespace_file.clone()
    }

    /// Where the server API listens, if it does.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|(_, l)| l.local_addr().ok())
    }

    /// The certificate files, to reload them (on SIGHUP) while the node
    /// runs; `None` without `--tls-cert`.
    pub fn tls(&self) -> Option<crate::tls::Tls> {
        self.tls.clone()
    }

    /// The address `--tls-listen` is bound to (useful with port 0); `None`
    /// when there is no separate TLS listener.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The public-key files behind RS256/ES256 tokens, to reload them (on
    /// SIGHUP) while the node runs; `None` without `--jwt-public-key` or
    /// `--jwt-jwks`.
    pub fn key_files(&self) -> Option<crate::keys::KeyFiles> {
        self.key_files.clone()
    }

    /// Injects a fault into one shard (tests only).
    #[doc(hidden)]
    pub fn inject(mut self, fault: Fault) -> Server {
        self.fault = Some(fault);
        self
    }

    /// The address the listeners are bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Runs the shards until `shutdown` completes, then drains: `/readyz`
    /// answers 503 for the drain delay while everything else goes on, then
    /// the shards stop accepting, close every WebSocket with 1001 and wait
    /// up to the drain timeout. A shard still running half a second after
    /// that is left behind and named in [`Error::StopDeadline`].
    pub fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Server {
            config,
            limits,
            origins,
            plan,
            chat,
            key_files,
            storage,
            mesh,
            listeners,
            local_addr,
            tls,
            tls_listeners,
            tls_addr,
            api,
            namespace_file,
            dev,
            fault,
        } = self;
        if let Some(d) = &dev {
            warn_dev_mode(d, local_addr, tls.is_some() && tls_addr.is_none());
        }
        let spaces = namespace_file.namespaces.load().spaces().len();
        if spaces > 0 {
            log::info!("{spaces} room namespaces (SIGHUP re-reads them)");
        }
        if let Some(t) = &tls {
            let served = match tls_addr {
                Some(a) => format!("wss:// on {a} (ws:// stays on {local_addr})"),
                None => format!("wss:// on {local_addr} (TLS only)"),
            };
            log::info!(
                "TLS: {served}; {} (SIGHUP reloads it)",
                crate::tls::Tls::describe(&t.current())
            );
        }
        let mut tls_listeners = tls_listeners.into_iter();
        if let Some(files) = &key_files {
            log::info!(
                "RS256/ES256 tokens: {} public keys loaded (SIGHUP reloads them)",
                files.count()
            );
        }
        log::info!(
            "corecast gateway {} listening on {local_addr}: {} shards, {}; backlog {}",
            env!("CARGO_PKG_VERSION"),
            plan.shards,
            match &plan.pinned {
                Some(cpus) => format!("pinned to CPUs {cpus:?}"),
                None => "not pinned (more shards than CPUs)".to_string(),
            },
            config.node.backlog
        );
        log::info!(
            "limits: max_frame_bytes={} max_message_bytes={} max_header_bytes={} handshake_timeout_ms={} idle_timeout_ms={} ping_interval_ms={} close_timeout_ms={} outbound_budget_bytes={} slow_consumer_timeout_ms={} drain_delay_ms={} drain_timeout_ms={}",
            config.conn.max_frame_bytes,
            config.conn.max_message_bytes,
            config.conn.max_header_bytes,
            config.conn.handshake_timeout_ms,
            config.conn.idle_timeout_ms,
            config.conn.ping_interval_ms,
            config.conn.close_timeout_ms,
            config.conn.outbound_budget_bytes,
            config.conn.slow_consumer_timeout_ms,
            config.node.drain_delay_ms,
            config.node.drain_timeout_ms
        );
        let metrics: Arc<[ShardMetrics]> =
            (0..plan.shards).map(|_| ShardMetrics::default()).collect();
        let chat_settings = chat;
        if chat_settings.session.verifier.is_none() && !chat_settings.session.allow_anonymous {
            log::warn!("no --jwt-secret, --jwt-public-key, --jwt-jwks or --allow-anonymous: /ws will refuse every client");
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
        let calls = api
            .as_ref()
            .map(|_| Arc::new(crate::api::Calls::new(plan.shards)));
        let mut requests = rings::build(plan.shards, chat::RING_SLOTS).into_iter();
        let mut deliveries = rings::build(plan.shards, chat::RING_SLOTS).into_iter();
        let node_state = Arc::new(NodeState::new(plan.shards));
        let (exited, any_exited) = shutdown::channel();
        let (exits_tx, exits) = mpsc::channel();
        let mut handles = Vec::with_capacity(plan.shards);
        for (id, listener) in listeners.into_iter().enumerate() {
            let placement = match &plan.pinned {
                Some(cpus) => Placement::Fixed(cpus[id]),
                None => Placement::Unbound,
            };
            let guard = ExitGuard {
                id,
                exits: exits_tx.clone(),
                fired: exited.clone(),
            };
            let tls_config = tls.as_ref().map(|t| t.config().clone());
            let mut shard_listeners = vec![shard::Listener {
                fd: listener,
                tls: if tls_addr.is_none() {
                    tls_config.clone()
                } else {
                    None
                },
            }];
            if let Some(fd) = tls_listeners.next() {
                shard_listeners.push(shard::Listener {
                    fd,
                    tls: tls_config,
                });
            }
            let setup = shard::ShardSetup {
                id,
                listeners: shard_listeners,
                tls: tls.clone(),
                limits,
                origins: origins.clone(),
                all_metrics: metrics.clone(),
                node_state: node_state.clone(),
                chat: chat_settings.clone(),
                requests: requests.next().expect("one set of rings per shard"),
                deliveries: deliveries.next().expect("one set of rings per shard"),
                storage: store.clone(),
                node,
                mesh: mesh.clone(),
                fault,
                api: calls.clone(),
                dev: dev.clone(),
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
                    node_state.close();
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
        drop(exits_tx);
        if let Err(e) = wait_for_start(&node_state, &exits, limits.start_timeout) {
            node_state.close();
            let _ = wait_for_shards(handles, None, &exits, limits.drain_timeout + STOP_GRACE);
            worker.stop(&store);
            if let Some(t) = mesh_thread {
                t.stop();
            }
            return Err(e);
        }
        // The API takes calls once every shard drains its inbox.
        let api_thread = match (api, calls) {
            (Some((settings, listener)), Some(calls)) => {
                let addr = listener.local_addr().ok();
                let node = crate::api::NodeView {
                    node_id: storage.node_id.as_str().into(),
                    metrics: metrics.clone(),
                    state: node_state.clone(),
                };
                match crate::api::start(settings, listener, calls, node) {
                    Ok(t) => {
                        if let Some(a) = addr {
                            log::info!("server API listening on http://{a}/api/ (docs/api.md)");
                        }
                        Some(t)
                    }
                    Err(e) => {
                        log::error!("cannot start the API thread: {e}; the API is not served");
                        None
                    }
                }
            }
            _ => None,
        };
        let mut early_exit = futures_lite::future::block_on(futures_lite::future::or(
            async {
                shutdown.await;
                false
            },
            async {
                any_exited.await;
                true
            },
        ));
        let mut ended_early = None;
        if !early_exit && !limits.drain_delay.is_zero() {
            node_state.draining.store(true, Ordering::Release);
            log::info!(
                "draining: /readyz answers 503 for {} ms while the listeners stay open and clients are served",
                limits.drain_delay.as_millis()
            );
            // A shard that ends during the delay ends it.
            match exits.recv_timeout(limits.drain_delay) {
                Ok(id) => {
                    ended_early = Some(id);
                    early_exit = true;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => early_exit = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        if early_exit {
            log::error!("a shard stopped unexpectedly; shutting the node down");
        } else {
            log::info!(
                "shutting down: closing connections (waiting up to {} ms)",
                limits.drain_timeout.as_millis()
            );
        }
        node_state.close();
        // Calls now would wait for shards that are stopping.
        if let Some(t) = api_thread {
            t.stop();
        }
        let unfinished = wait_for_shards(
            handles,
            ended_early,
            &exits,
            limits.drain_timeout + STOP_GRACE,
        );
        let mut result = match unfinished {
            Ok(()) => Ok(()),
            Err(Unfinished::Failed { shard, message }) => {
                Err(Error::ShardFailed { shard, message })
            }
            Err(Unfinished::Running(shards)) => {
                log::error!(
                    "shards {shards:?} did not stop within the drain timeout ({} ms) plus {} ms: exiting without them",
                    limits.drain_timeout.as_millis(),
                    STOP_GRACE.as_millis()
                );
                Err(Error::StopDeadline { shards })
            }
        };
        // The shards are gone (or left behind): the worker writes what it
        // holds, then stops. The store first: the other nodes take this
        // node's rooms over once the mesh stops, and must find every message
        // it sequenced stored.
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

/// The loud warning a `--dev` node starts with: what it turns on, and where
/// the demo page is. `tls`: `--listen` speaks TLS only.
fn warn_dev_mode(dev: &crate::doors::Dev, addr: SocketAddr, tls: bool) {
    let secret = match dev.secret_generated {
        true => "a generated token secret",
        false => "the configured --jwt-secret",
    };
    // A browser cannot open 0.0.0.0 everywhere; this machine's loopback is
    // the same listener.
    let page = match addr.ip().is_unspecified() {
        true => SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port())),
        false => addr,
    };
    let scheme = if tls { "https" } else { "http" };
    log::warn!(
        "DEVELOPMENT MODE (--dev): anonymous users, {secret}, tokens for any user at /dev/token, the demo page at {scheme}://{page}/ -- not for production"
    );
    if !addr.ip().is_loopback() {
        log::warn!(
            "--dev is listening on {addr}, not only on loopback: anyone who reaches it can mint a token for any user"
        );
    }
}

/// Waits until every shard serves. A shard that ends first, or one still
/// starting at `limit`, fails the start.
fn wait_for_start(
    state: &NodeState,
    exits: &mpsc::Receiver<usize>,
    limit: Duration,
) -> Result<(), Error> {
    let shards = state.shards();
    let deadline = Instant::now() + limit;
    loop {
        if (0..shards).all(|i| state.stage(i) == Stage::Serving) {
            log::info!("all {shards} shards serving");
            return Ok(());
        }
        match exits.recv_timeout(Duration::from_millis(2)) {
            Ok(id) => {
                return Err(Error::ShardFailed {
                    shard: id,
                    message: format!("ended while {}", state.stage(id).doing()),
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::ShardFailed {
                    shard: usize::MAX,
                    message: "every shard ended while starting".into(),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= deadline {
            let stuck: Vec<usize> = (0..shards)
                .filter(|&i| state.stage(i) != Stage::Serving)
                .collect();
            let doing = stuck
                .iter()
                .map(|&i| format!("shard {i} {}", state.stage(i).doing()))
                .collect::<Vec<_>>()
                .join(", ");
            log::error!(
                "start failed: {doing} after {} ms; stopping the node",
                limit.as_millis()
            );
            return Err(Error::StartTimeout {
                shards: stuck,
                timeout_ms: limit.as_millis() as u64,
                stuck: doing,
            });
        }
    }
}

/// How long past the drain timeout `run` waits for a shard's thread: the
/// shard gives up on close handshakes at the drain timeout itself, and its
/// executor then only drops what is left.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// Says when a shard's thread ends, however it ends (including a panic).
struct ExitGuard {
    id: usize,
    exits: mpsc::Sender<usize>,
    fired: Trigger,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = self.exits.send(self.id);
        self.fired.fire();
    }
}

enum Unfinished {
    /// A shard's thread panicked.
    Failed { shard: usize, message: String },
    /// These shards were still running at the deadline.
    Running(Vec<usize>),
}

/// Joins every shard thread that ends within `limit`; the others are
/// detached and named.
fn wait_for_shards(
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    ended: Option<usize>,
    exits: &mpsc::Receiver<usize>,
    limit: Duration,
) -> Result<(), Unfinished> {
    let deadline = Instant::now() + limit;
    let mut done = vec![false; handles.len()];
    if let Some(id) = ended {
        done[id] = true;
    }
    while done.iter().any(|d| !d) {
        match exits.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(id) => done[id] = true,
            Err(_) => break,
        }
    }
    let mut failed = None;
    let mut running = Vec::new();
    for (id, h) in handles.into_iter().enumerate() {
        if !done[id] {
            running.push(id);
            continue;
        }
        // Its guard is gone, so the thread is at its very end.
        if let Err(e) = h.join() {
            failed.get_or_insert(Unfinished::Failed {
                shard: id,
                message: e.to_string(),
            });
        }
    }
    match failed {
        Some(f) => Err(f),
        None if running.is_empty() => Ok(()),
        None => Err(Unfinished::Running(running)),
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

/// Binds one listener per shard on `addr` (SO_REUSEPORT), after checking
/// that no other socket listens there; returns them and the address bound.
/// `tls` says which flag gave the address (`--tls-listen` or `--listen`).
fn bind_all(
    addr: SocketAddr,
    shards: usize,
    backlog: u32,
    tls: bool,
) -> Result<(Vec<OwnedFd>, SocketAddr), Error> {
    let bind_err = |source: io::Error| {
        let in_use = if tls {
            " (is another gateway running? pass --tls-listen)"
        } else {
            " (is another gateway running? pass --listen)"
        };
        Error::bind(addr, source, in_use)
    };
    if addr.port() != 0 {
        // SO_REUSEPORT would let us share the port with another process
        // of the same user; bind once without it to catch that.
        probe_free(addr).map_err(bind_err)?;
    }
    let first = listen_socket(addr, backlog).map_err(bind_err)?;
    let local_addr = first
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| bind_err(io::Error::other("no local address")))?;
    let mut listeners: Vec<OwnedFd> = vec![first.into()];
    for _ in 1..shards {
        listeners.push(listen_socket(local_addr, backlog).map_err(bind_err)?.into());
    }
    Ok((listeners, local_addr))
}

/// Runs a gateway node until `shutdown` completes. See [`Server`].
pub fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    Server::bind(config)?.run(shutdown)
}
