//! corecast gateway: a thread-per-core WebSocket server (glommio executors on
//! io_uring; each shard's sockets in one edge-triggered epoll set).
//!
//! # Layout
//! - [`auth`]: JWT access tokens, HS256, RS256 and ES256 (the router crate's
//!   `auth`, re-exported).
//! - [`config`]: command line and environment, validated into each subsystem's settings
//!   (the shards' [`Limits`], chat, storage, mesh, API); `config::namespaces`
//!   reads the file's room namespaces (and re-reads them on SIGHUP).
//! - [`server`]: binds the per-shard listeners, starts the shards, drains.
//! - [`keys`]: the public-key files RS256/ES256 tokens are checked against,
//!   and their reload.
//! - `lifecycle`: what the main thread and the shards tell each other about
//!   starting and stopping (atomics), and the faults tests inject.
//! - A shard's layers, each importing only those below it: `shard` (the
//!   layers assembled, the accept loop, epoll dispatcher and sweeper; the
//!   `conn::Host` a connection calls up to), [`chat`], `flush`, `conn` (one
//!   connection: HTTP request, upgrade, echo, close handshake,
//!   back-pressure; the shard's connection table), `local` (limits, clock,
//!   buffer pool, metrics).
//! - `origin`: which page origins may upgrade (`--allowed-origins`).
//! - `doors`: the HTTP side doors (`/healthz`, `/readyz`, `/metrics`; with
//!   `--dev` the demo page, its files and `/dev/token`): what each answers,
//!   as data the connection writes.
//! - `feed`: a room's frames on one shard, sent from the same bytes to
//!   every local member.
//! - `flush`: flush rounds: room members are woken a slice at a time, and
//!   connections with input are read between slices.
//! - [`chat`]: the `corecast.v1` chat endpoint on a shard: sessions, each
//!   room's local members and feed, the outboxes over the rings, and the
//!   driver that runs the router's `Homes` state machine through its ports.
//! - [`storage`]: the storage worker thread: history, resume, sequences
//!   and presence in memory or Redis, circuit breaker and spill file.
//! - [`mesh`]: the cross-node ZeroMQ PUB/SUB mesh thread, node liveness
//!   and the Redis node registry.
//! - [`api`]: the server API's thread (hyper, `--api-listen`): calls
//!   checked there and handed to the shards' call inboxes; `chat::api` is
//!   the shard's side.
//! - `rings`: the cross-shard rings, one per ordered pair of shards,
//!   built before the shards start.
//! - `inbox`: a shard's mailbox from a helper thread.
//! - [`readiness`]: a shard's epoll set: which sockets have input or room
//!   (the `corecast-readiness` crate, shared with loadgen's executors).
//! - `buf`: per-shard buffer pools, so idle connections hold no buffers.
//! - [`tls`]: the certificate files, their reload and the rustls
//!   configuration; `tls::stream`, one connection's TLS under the codec
//!   (rustls' unbuffered API, fed from the pooled buffers).
//! - [`ws`]: the sans-IO RFC 6455 codec and session rules (the `corecast-ws`
//!   crate, shared with loadgen and the fuzz targets).
//! - [`metrics`]: per-shard counters, their Prometheus rendering, and the
//!   writer the storage worker and the mesh render their own series with.
//! - [`shutdown`]: the "stop now" signal `run` waits on.
#![deny(unsafe_code)]

pub mod api;
mod buf;
pub mod chat;
pub mod config;
mod conn;
mod doors;
mod feed;
mod flush;
mod inbox;
pub mod keys;
mod lifecycle;
mod local;
pub mod mesh;
pub mod metrics;
mod origin;
mod rings;
pub mod server;
mod shard;
pub mod shutdown;
pub mod storage;
pub mod tls;

pub use corecast_readiness as readiness;
pub use corecast_router::auth;
pub use corecast_router::namespace;
pub use corecast_ws as ws;

use std::net::SocketAddr;

pub use config::Config;
pub use lifecycle::Fault;
pub use local::Limits;
pub use server::{run, Server};

/// Why the gateway could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("bind {addr}: {what}{hint}")]
    Bind {
        addr: SocketAddr,
        /// What the kernel said, in words.
        what: String,
        hint: &'static str,
    },
    #[error("storage: {0}")]
    Storage(#[from] storage::StartError),
    #[error("{0}")]
    Mesh(#[from] mesh::MeshError),
    #[error("starting shard {shard}: {message}")]
    Executor { shard: usize, message: String },
    #[error("shard {shard} failed: {message}")]
    ShardFailed { shard: usize, message: String },
    #[error("shards {shards:?} did not start within {timeout_ms} ms ({stuck}); stopped the node")]
    StartTimeout {
        shards: Vec<usize>,
        timeout_ms: u64,
        stuck: String,
    },
    #[error("shards {shards:?} did not stop within the drain timeout; exited without them (the log says what they were doing)")]
    StopDeadline { shards: Vec<usize> },
}

impl Error {
    /// A bind that failed, in words; `in_use` is the hint for a taken port.
    pub(crate) fn bind(addr: SocketAddr, source: std::io::Error, in_use: &'static str) -> Error {
        use std::io::ErrorKind;
        let (what, hint) = match source.kind() {
            ErrorKind::AddrInUse => ("address in use".to_string(), in_use),
            ErrorKind::PermissionDenied => (
                "permission denied".to_string(),
                " (ports below 1024 need privileges; pick another port)",
            ),
            ErrorKind::AddrNotAvailable => (
                "address not available".to_string(),
                " (that address is not on this machine)",
            ),
            _ => (source.to_string(), ""),
        };
        Error::Bind { addr, what, hint }
    }
}
