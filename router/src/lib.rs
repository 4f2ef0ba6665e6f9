//! corecast router: where a room lives and what its home does.
//!
//! # Layout
//! - [`home`]: the pure functions that give every room one home, so that one
//!   place assigns its sequence numbers: a shard within a node (hash modulo
//!   shard count) and a node within the cluster (rendezvous hashing over the
//!   live nodes, so a node leaving moves only its own rooms).
//! - [`room`]: a room's state at its home shard: the gapless sequence,
//!   membership per shard and per user, the duplicate window.
//! - [`homes`]: a shard's homes as a sans-IO state machine: sequencing,
//!   joins and resumes, relays of rooms homed on other nodes, re-homing and
//!   gap repair. `Homes::handle(input, now, ports)`; the gateway drives it.
//! - [`session`]: one chat connection's session as a sans-IO state
//!   machine: authentication, rate limit, the rooms it asked for, and what
//!   each client frame asks of the homes. `Session::text(.., ports)`.
//! - [`store`], [`node`]: what a home asks of the store and says to other
//!   nodes, and what comes back: plain data the gateway's storage worker and
//!   mesh thread carry out.
//! - [`message`]: what moves between shards, nodes and the store
//!   (`ConnRef`, `Publish`, `Record`): plain data, so the gateway's storage
//!   and mesh move it without importing anything of chat.
//! - [`namespace`]: room namespaces (a prefix and its options), one table
//!   shared by sessions, homes, the storage worker and the API.
//! - [`proto`]: the `corecast.v1` wire format: client frames parsed, server
//!   frames written straight into WebSocket frames (`corecast-ws` headers).
//! - [`ratelimit`]: the token bucket behind per-connection rate limits.
//! - [`auth`]: JWT access tokens: verify (HS256, and RS256/ES256 against
//!   public keys that can be swapped while running), mint (HS256), room permissions
//!   (the gateway checks them at the upgrade, loadgen mints them).
//!
//! Nothing here does I/O or knows an executor: the rings, the storage
//! worker and the ZeroMQ mesh live in the gateway, which turns the homes'
//! ports into them.
#![forbid(unsafe_code)]

pub mod auth;
pub mod home;
pub mod homes;
pub mod message;
pub mod namespace;
pub mod node;
pub mod proto;
pub mod ratelimit;
pub mod room;
pub mod session;
pub mod store;

pub use home::{home_node, home_node_by, home_shard, peer_home_shard, room_hash, user_home_shard};
