//! corecast router: where a room lives.
//!
//! # Layout
//! - [`home`]: the pure functions that give every room one home, so that one
//!   place assigns its sequence numbers: a shard within a node (hash modulo
//!   shard count) and a node within the cluster (rendezvous hashing over the
//!   live nodes, so a node leaving moves only its own rooms).
//! - [`room`]: a room's state at its home shard: the gapless sequence,
//!   membership per shard and per user, the duplicate window.
//! - [`message`]: what moves between shards, nodes and the store
//!   (`ConnRef`, `Publish`, `Record`): plain data, so the gateway's storage
//!   and mesh move it without importing anything of chat.
//! - [`proto`]: the `corecast.v1` wire format: client frames parsed, server
//!   frames written straight into WebSocket frames (`corecast-ws` headers).
//! - [`ratelimit`]: the token bucket behind per-connection rate limits.
//! - [`auth`]: HS256 JWT access tokens: verify, mint, room permissions
//!   (the gateway checks them at the upgrade, loadgen mints them).
//!
//! The cross-shard wiring (glommio channel mesh) lives in the gateway's
//! `chat` module; the ZeroMQ mesh and the storage worker will join here.
#![forbid(unsafe_code)]

pub mod auth;
pub mod home;
pub mod message;
pub mod proto;
pub mod ratelimit;
pub mod room;

pub use home::{home_node, home_node_by, home_shard, room_hash, user_home_shard};
