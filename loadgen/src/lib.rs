//! corecast load generator: drives WebSocket servers (the gateway, or any
//! RFC 6455 server) from glommio executors, one per `--threads`, with the
//! gateway's own sans-IO codec in the client role.
//!
//! # Layout
//! - `config`: the command line (clap, `LOADGEN_*` env) and its validation
//!   into read-only plans: URL, CPU list, sources, open-files check.
//! - `exec`: executor threads, the start gate they pass together, paced
//!   connection spawning, the Ctrl-C watch.
//! - `client`: one client connection: bound non-blocking connect, the
//!   upgrade handshake, buffered frame I/O, pings, the closing handshake.
//! - `echo`: `loadgen echo`, round-trip throughput and latency.
//! - `hold`: `loadgen hold`, many idle connections held open.
//! - `chat`: `loadgen chat`, the gateway's chat protocol: rooms, publishers,
//!   ordering and delivery checks, delivery and ack latency, reconnect and
//!   resume after a node goes away. A folder, one file per part: `order`
//!   (the sequence check), `frames`, `state` (counters and one connection's
//!   state machine), `connect`, `threads`, `run` (start, sum, print).
//! - `reactor`: each executor's epoll set of client sockets and the task
//!   that wakes the connections (so the server is not charged for
//!   interrupting loadgen).
//! - `scan`: the fast path that reads `msg` frames without serde (serde
//!   still reads everything else, and anything unusual).
//! - `report`: percentiles, the human lines and the one-line JSON record.
//! - `sys`: the crate's only `unsafe`: socket and rlimit knobs.
//! - [`tls`]: wss:// (`--ca`, `--insecure`): the rustls client a
//!   connection's bytes go through when its URL is `wss://`.
//!
//! # Output
//! The human-readable report goes to stdout. With `--json` it goes to stderr
//! and stdout carries exactly one JSON line (keys in a fixed order; see
//! `loadgen/README.md`). Exit status: 0 for a clean run, 1 when anything
//! failed during the run, 2 for a bad command line.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod chat;
pub mod client;
pub mod config;
pub mod echo;
pub mod exec;
pub mod hold;
mod reactor;
pub mod report;
mod scan;
mod sys;
pub mod tls;

use std::sync::{atomic::AtomicBool, Arc};

pub use config::{Cli, Command};

/// A validated scenario, ready to run.
#[derive(Debug, Clone)]
pub enum Plan {
    Echo(config::EchoPlan),
    Hold(config::HoldPlan),
    Chat(config::ChatPlan),
}

impl Command {
    /// Checks every flag once, before anything connects.
    pub fn validate(&self) -> anyhow::Result<Plan> {
        Ok(match self {
            Command::Echo(a) => Plan::Echo(a.validate()?),
            Command::Hold(a) => Plan::Hold(a.validate()?),
            Command::Chat(a) => Plan::Chat(a.validate()?),
        })
    }
}

/// Runs one scenario to its end and prints its report. `interrupted` is the
/// shutdown signal: once set (Ctrl-C), the run winds down early and still
/// closes every connection with a close frame. `Ok(false)` means the run
/// completed but saw errors or failed connections.
pub fn run(plan: Plan, interrupted: Arc<AtomicBool>) -> anyhow::Result<bool> {
    match plan {
        Plan::Echo(p) => echo::run(p, interrupted),
        Plan::Hold(p) => hold::run(p, interrupted),
        Plan::Chat(p) => chat::run(p, interrupted),
    }
}
