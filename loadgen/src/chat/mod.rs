//! `loadgen chat`: the gateway's chat protocol (`corecast.v1`,
//! docs/protocol.md) under load.
//!
//! `--rooms` rooms of `--members` connections each, one user per
//! connection; the first `--publishers` members of a room also publish.
//! Every connection upgrades, waits for `welcome`, joins its room and keeps
//! `joined.seq` as its base; publishing starts only once every member of
//! every room has joined (the executors' start gate), so every member must
//! receive every message of the run: seqs `base + 1, base + 2, ...`, each
//! once, in order ([`SeqCheck`]), and from each publisher in the order it
//! published. A publish body carries its intended send time (`t`, ns since
//! the gate opened), its publisher (`p`) and its number (`n`); delivery and
//! ack latencies run from that intended time, so a stalled publisher cannot
//! hide them (coordinated omission). After the run every member should hold
//! every acked seq of its room: the shortfall is `lost`.
//!
//! A room's publishers and members must live in one process: `t` is read
//! against this process's clock.
//!
//! # Reconnecting (`--reconnect`)
//! Without it a dropped connection is a failure (`unexpected_closes`) and
//! its member stops. With it a member survives its gateway node going away.
//! When its connection drops after it joined because the server went away
//! ([`reconnectable`]: a close 1001 or 1011-1014, EOF, a reset), it
//! tries the next `--url` round-robin
//! ([`next_target`](crate::config::ConnPlan::next_target)), first at
//! once, then backing off from 100 ms to 1 s, until `--reconnect-timeout-s`
//! after the drop (then it is an unexpected close). Each try connects, waits
//! for `welcome` and joins with `since` = [`SeqCheck::resume_point`] (the
//! highest seq it holds without a hole) and the `epoch` of its last `joined`.
//! - `recovered:true`: the same [`SeqCheck`] goes on. The missed `msg`
//!   frames are checked like live ones, so a duplicate or reorder in the
//!   replay counts; seqs the replay brings again because the resume started
//!   below a hole are expected ([`SeqVerdict::Replayed`]). So a member that
//!   resumed still holds every acked seq of its room from its first base on,
//!   or the shortfall is `lost`.
//! - Anything else (`recovered:false`, or no epoch to resume in) is a resume
//!   failure, which fails the run. The check so far is closed at what it
//!   received, and a fresh one starts at the new `joined.seq`; the `missed`
//!   frames a `recovered:false` still brings are passed over. The range in
//!   between is the resume failure's, not counted again as lost. Acked seqs
//!   carry no epoch: if the room's numbering restarted, `lost` compares
//!   numbers of two epochs and means little, but the run failed already.
//!
//! Publishes in flight at the drop are never retried: they count as
//! `unacked` (and `unacked_on_drop`), not as lost, and do not fail the run
//! (their acks died with the connection). Nor, with `--reconnect`, do other
//! unacked publishes: one forwarded to a node that died with it is never
//! answered (`ChatReport::is_clean`). Publishes due while away go out
//! after the resume, their latencies still running from their intended time,
//! as do those of the missed messages. The report adds `reconnects`,
//! `resume_failures` and the longest outage (drop to the next `joined`).
//!
//! # Invariants
//! - One task per connection, on the thread that opened it. Per-thread
//!   counters, histograms and acked seqs live in an `Rc<Ctx>`; no `RefCell`
//!   borrow lives across an `.await`.
//! - Threads share only [`Shared`] (atomics: per-room highest acked seq and
//!   publishers still running, members not caught up) and the gate.
//! - A member that reconnects keeps its task and its `State`; only the
//!   socket is replaced, so its checks, publish numbers and its share of
//!   `Shared` carry over. Nothing is retried.
//! - Unacked publishes per publisher are bounded by the plan's window, so
//!   the send buffer holds at most that many frames plus control replies.
//! - No allocation per message once buffers reached their steady size:
//!   frames are parsed in place (borrowed `&str`), publishes formatted into
//!   a reused scratch buffer; one clock read per batch of received frames.
//!
//! # Layout
//! - `order`: [`SeqCheck`], the per-member check of order, gaps and duplicates.
//! - `frames`: what a chat connection sends (publish frames) and parses.
//! - `state`: the run's counters ([`Counts`]), the view threads share, and
//!   one connection's state machine (`ChatConn`).
//! - `connect`: upgrade, `welcome`, join, and [`reconnectable`].
//! - `threads`: one executor's members and publishers, and its report.
//! - `run`: starting the threads, summing their reports ([`ChatReport`]),
//!   printing them.

mod connect;
mod frames;
mod order;
mod run;
mod state;
#[cfg(test)]
mod tests;
mod threads;

use std::time::Duration;

pub use connect::reconnectable;
pub use frames::encode_publish;
pub use order::{SeqCheck, SeqVerdict};
pub use run::{execute, run, ChatReport};
pub use state::Counts;
// Each part sees the others' items through `use super::*`.
#[allow(unused_imports)]
use {connect::*, frames::*, order::*, run::*, state::*, threads::*};

/// The subprotocol offered in every upgrade.
pub const SUBPROTOCOL: &str = "corecast.v1";

/// Loop turns one connection takes per poll before it yields.
const POLL_BUDGET: usize = 32;

/// Receive buffer each connection starts with; it grows for larger frames.
const INITIAL_RX_BYTES: usize = 8 << 10;

/// Smallest frame limit: presence answers and error frames are small, but
/// not bounded by `--size`.
const MIN_FRAME_LIMIT: usize = 64 << 10;

/// Skipped-seq ranges one member tracks; past it the oldest range is
/// dropped and counted as gaps at once (a late arrival from it then counts
/// as a duplicate). Bounds memory against a server that skips wildly.
const MAX_MISSING_RANGES: usize = 1024;

/// How often a member that has not caught up looks again after publishing
/// ended (the last acks may arrive on another thread).
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// How often each thread's watcher looks at the Ctrl-C flag and, once
/// publishing ended, at whether every member caught up.
const WATCH_RUN: Duration = Duration::from_millis(50);
const WATCH_DRAIN: Duration = Duration::from_millis(2);

/// Per-connection problems logged as warnings, per thread.
const MAX_WARNINGS: u32 = 5;

/// Tokens stay valid this long after the run's planned end; the gateway
/// checks them at the upgrade only, but a run may start slowly.
const TOKEN_SLACK_S: u64 = 3600;

/// `--reconnect`: the wait after a failed try, doubling up to the maximum.
/// The first try goes out at once: the next URL is likely a live node.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a dropped connection that got a close frame may take to finish
/// the closing handshake before the reconnect: the outage should not wait
/// on a dying node.
const CLOSE_BEFORE_RECONNECT: Duration = Duration::from_millis(250);
