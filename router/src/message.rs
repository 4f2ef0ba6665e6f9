//! What moves between shards, nodes and the store: who a connection is
//! anywhere in the cluster ([`ConnRef`]), a publish on its way to its room's
//! home ([`Publish`]) and a sequenced message as the store keeps it
//! ([`Record`]). Plain data: the gateway's storage and mesh move these
//! without knowing what a room or a session is.

use std::sync::Arc;

/// A node's tag in the cluster: [`node_tag`] of its `--node-id`.
pub type NodeTag = u32;

/// The tag of a node id (stable across versions, like room homes).
pub fn node_tag(node_id: &str) -> NodeTag {
    (crate::room_hash(&format!("node:{node_id}")) >> 32) as NodeTag
}

/// A connection anywhere in the cluster: its node, shard, slab key and generation
/// (slab keys are reused; the generation tells a new connection from an old).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// The node's tag ([`node_tag`] of its `--node-id`).
    pub node: NodeTag,
    pub shard: u16,
    pub key: u32,
    pub gen: u32,
}

/// A publish on its way to its room's home shard, on this node or another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub room: Arc<str>,
    pub user: Arc<str>,
    /// The client's message id.
    pub id: Box<str>,
    /// The message body, as JSON text.
    pub body: Box<str>,
    /// Who published it, and gets the ack.
    pub conn: ConnRef,
    /// Times a node that is not the home forwarded it (the nodes' views of
    /// who is live disagree for a moment).
    pub hops: u8,
}

/// One stored room message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub room: Arc<str>,
    pub seq: u64,
    pub from: Arc<str>,
    /// The client message id ("" when the client gave none).
    pub id: Box<str>,
    /// Milliseconds since the Unix epoch, when the home sequenced it.
    pub ts: u64,
    /// The body as JSON text, exactly as published.
    pub body: Box<str>,
    /// The epoch the home numbered it in; the store adopts it with the
    /// record ("" from spill files of older versions: keep the store's).
    pub epoch: Arc<str>,
}

/// What the server API does to every connection of a user, on every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserAction {
    /// Close each connection with this code and reason.
    Disconnect { code: u16, reason: Arc<str> },
    /// Leave this room (the client is told `left`).
    Unsubscribe { room: Arc<str> },
}
