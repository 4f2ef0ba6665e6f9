//! What nodes say to each other ([`Wire`]) and who is live ([`NodeSet`]), as
//! plain data. The gateway's mesh thread writes and reads these
//! (`mesh::wire`) and routes them to shards; what they mean is the homes'
//! business ([`crate::homes`]).

use std::sync::Arc;

use crate::message::{ConnRef, NodeTag, Publish};

/// A message between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wire {
    /// "I am alive, here is where my PUB listens, these are the nodes I
    /// hear." A node counts a peer as live only when it hears the peer and
    /// the peer hears it.
    Heartbeat {
        node: Arc<str>,
        addr: Arc<str>,
        hears: Vec<NodeTag>,
    },
    /// A publish travelling to the room's home node.
    Publish { to: NodeTag, publish: Publish },
    /// A node has members of `room` and wants its messages: the home
    /// answers with `Synced` on the room's topic, which proves that the
    /// node's subscription reached the home.
    Sync {
        to: NodeTag,
        room: Arc<str>,
        node: NodeTag,
        nonce: u64,
    },
    /// A node has no members of `room` any more.
    Unsync {
        to: NodeTag,
        room: Arc<str>,
        node: NodeTag,
    },
    /// The home's answer to `Sync`: messages after `last_seq` follow on
    /// the room's topic.
    Synced {
        room: Arc<str>,
        home: NodeTag,
        node: NodeTag,
        nonce: u64,
        last_seq: u64,
        epoch: Arc<str>,
    },
    /// A sequenced (and stored) room message, as its WebSocket frame.
    Message {
        room: Arc<str>,
        /// The node that sequenced it (relays follow one home at a time).
        home: NodeTag,
        seq: u64,
        epoch: Arc<str>,
        frame: Arc<[u8]>,
    },
    /// An unsequenced room frame (a presence event).
    Event { room: Arc<str>, frame: Arc<[u8]> },
    /// A frame for one connection on node `conn.node` (an ack, an error).
    ToConn { conn: ConnRef, frame: Box<[u8]> },
    /// A direct message for every connection of `user`.
    Direct { user: Arc<str>, frame: Arc<[u8]> },
    /// The server API acts on every connection of `user`.
    Act {
        user: Arc<str>,
        action: crate::message::UserAction,
    },
}

/// The nodes a node counts as live, itself included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSet {
    pub me: NodeTag,
    /// (tag, node id), sorted by id.
    pub nodes: Vec<(NodeTag, Arc<str>)>,
}

impl NodeSet {
    /// The live node that owns `room` (rendezvous hashing over node ids).
    pub fn home_of(&self, room: &str) -> NodeTag {
        crate::home_node_by(room, self.nodes.iter().map(|(t, id)| (*t, &**id))).unwrap_or(self.me)
    }

    pub fn is_live(&self, tag: NodeTag) -> bool {
        self.nodes.iter().any(|(t, _)| *t == tag)
    }
}
