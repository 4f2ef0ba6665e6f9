//! corecast router: where a room lives.
//!
//! # Layout
//! - [`home`]: the pure functions that give every room one home, so that one
//!   place assigns its sequence numbers: a shard within a node (hash modulo
//!   shard count) and a node within the cluster (rendezvous hashing over the
//!   live nodes, so a node leaving moves only its own rooms).
//!
//! Per-shard room tables, sequencing, cross-shard rings, the ZeroMQ mesh and
//! the storage worker will live here as they are built (see DESIGN.md).
#![forbid(unsafe_code)]

pub mod home;

pub use home::{home_node, home_shard, room_hash};
