//! What nodes say to each other, and how it is laid out on the wire.
//!
//! Every mesh message is two ZeroMQ frames: a topic, which SUB sockets
//! filter on, and a payload. Topics end with a 0 byte, so subscribing to
//! room `a` never matches room `ab` (names never contain a 0 byte: the
//! chat protocol refuses control characters in room and user names):
//! - `h\0`: heartbeats, which every node subscribes to;
//! - `n` + node tag (4 bytes, big endian) + `\0`: work for one node;
//! - `r` + room + `\0`: a room's sequenced messages and events, subscribed
//!   to by the nodes with members of the room;
//! - `u` + user + `\0`: direct messages, subscribed to by the nodes where
//!   the user has connections.
//!
//! The payload is a kind byte and the fields in order: integers little
//! endian, strings and byte strings as a u32 length and the bytes. A
//! payload that does not parse is dropped and counted, never trusted.

use std::sync::Arc;

use corecast_router::homes::UserAction;
use corecast_router::message::{ConnRef, Publish};
pub use corecast_router::{
    message::{node_tag, NodeTag},
    node::Wire,
};

const HEARTBEAT: u8 = 1;
const PUBLISH: u8 = 2;
const SYNC: u8 = 3;
const UNSYNC: u8 = 4;
const SYNCED: u8 = 5;
const MESSAGE: u8 = 6;
const EVENT: u8 = 7;
const TO_CONN: u8 = 8;
const DIRECT: u8 = 9;
const ACT: u8 = 10;
const DISCONNECT: u8 = 1;
const UNSUBSCRIBE: u8 = 2;

/// The topic every node subscribes to for heartbeats.
pub const HEARTBEAT_TOPIC: &[u8] = b"h\0";

pub fn node_topic(node: NodeTag) -> Vec<u8> {
    let mut t = vec![b'n'];
    t.extend_from_slice(&node.to_be_bytes());
    t.push(0);
    t
}

pub fn room_topic(room: &str) -> Vec<u8> {
    named_topic(b'r', room)
}

pub fn user_topic(user: &str) -> Vec<u8> {
    named_topic(b'u', user)
}

fn named_topic(kind: u8, name: &str) -> Vec<u8> {
    let mut t = Vec::with_capacity(name.len() + 2);
    t.push(kind);
    t.extend_from_slice(name.as_bytes());
    t.push(0);
    t
}

/// A [`Wire`] message's topic and bytes (the type is the router's: what
/// the nodes say; this module is how it is written).
pub trait Codec {
    /// The topic this message is published under.
    fn topic(&self) -> Vec<u8>;
    fn encode(&self) -> Vec<u8>;
}

impl Codec for Wire {
    /// The topic this message is published under.
    fn topic(&self) -> Vec<u8> {
        match self {
            Wire::Heartbeat { .. } => HEARTBEAT_TOPIC.to_vec(),
            Wire::Publish { to, .. } | Wire::Sync { to, .. } | Wire::Unsync { to, .. } => {
                node_topic(*to)
            }
            Wire::ToConn { conn, .. } => node_topic(conn.node),
            Wire::Synced { room, .. } | Wire::Message { room, .. } | Wire::Event { room, .. } => {
                room_topic(room)
            }
            Wire::Direct { user, .. } | Wire::Act { user, .. } => user_topic(user),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        match self {
            Wire::Heartbeat { node, addr, hears } => {
                w.u8(HEARTBEAT).str(node).str(addr).u32(hears.len() as u32);
                for h in hears {
                    w.u32(*h);
                }
            }
            Wire::Publish { to, publish: p } => {
                w.u8(PUBLISH)
                    .u32(*to)
                    .str(&p.room)
                    .str(&p.user)
                    .str(&p.id)
                    .str(&p.body);
                w.conn(&p.conn).u8(p.hops);
            }
            Wire::Sync {
                to,
                room,
                node,
                nonce,
            } => {
                w.u8(SYNC).u32(*to).str(room).u32(*node).u64(*nonce);
            }
            Wire::Unsync { to, room, node } => {
                w.u8(UNSYNC).u32(*to).str(room).u32(*node);
            }
            Wire::Synced {
                room,
                home,
                node,
                nonce,
                last_seq,
                epoch,
            } => {
                w.u8(SYNCED).str(room).u32(*home).u32(*node).u64(*nonce);
                w.u64(*last_seq).str(epoch);
            }
            Wire::Message {
                room,
                home,
                seq,
                epoch,
                frame,
            } => {
                w.u8(MESSAGE)
                    .str(room)
                    .u32(*home)
                    .u64(*seq)
                    .str(epoch)
                    .bytes(frame);
            }
            Wire::Event { room, frame } => {
                w.u8(EVENT).str(room).bytes(frame);
            }
            Wire::ToConn { conn, frame } => {
                w.u8(TO_CONN).conn(conn).bytes(frame);
            }
            Wire::Direct { user, frame } => {
                w.u8(DIRECT).str(user).bytes(frame);
            }
            Wire::Act { user, action } => {
                w.u8(ACT).str(user);
                match action {
                    UserAction::Disconnect { code, reason } => {
                        w.u8(DISCONNECT).u32(u32::from(*code)).str(reason);
                    }
                    UserAction::Unsubscribe { room } => {
                        w.u8(UNSUBSCRIBE).str(room);
                    }
                }
            }
        }
        w.0
    }
}

/// Parses a payload; `None` if it is not one this version writes.
pub fn decode(payload: &[u8]) -> Option<Wire> {
    let mut r = Reader(payload);
    let wire = match r.u8()? {
        HEARTBEAT => {
            let node = r.str()?;
            let addr = r.str()?;
            let n = r.u32()? as usize;
            if n > r.0.len() / 4 {
                return None;
            }
            let hears = (0..n).map(|_| r.u32()).collect::<Option<_>>()?;
            Wire::Heartbeat { node, addr, hears }
        }
        PUBLISH => Wire::Publish {
            to: r.u32()?,
            publish: Publish {
                room: r.str()?,
                user: r.str()?,
                id: r.str()?.as_ref().into(),
                body: r.str()?.as_ref().into(),
                conn: r.conn()?,
                hops: r.u8()?,
            },
        },
        SYNC => Wire::Sync {
            to: r.u32()?,
            room: r.str()?,
            node: r.u32()?,
            nonce: r.u64()?,
        },
        UNSYNC => Wire::Unsync {
            to: r.u32()?,
            room: r.str()?,
            node: r.u32()?,
        },
        SYNCED => Wire::Synced {
            room: r.str()?,
            home: r.u32()?,
            node: r.u32()?,
            nonce: r.u64()?,
            last_seq: r.u64()?,
            epoch: r.str()?,
        },
        MESSAGE => Wire::Message {
            room: r.str()?,
            home: r.u32()?,
            seq: r.u64()?,
            epoch: r.str()?,
            frame: r.bytes()?.into(),
        },
        EVENT => Wire::Event {
            room: r.str()?,
            frame: r.bytes()?.into(),
        },
        TO_CONN => Wire::ToConn {
            conn: r.conn()?,
            frame: r.bytes()?.into(),
        },
        DIRECT => Wire::Direct {
            user: r.str()?,
            frame: r.bytes()?.into(),
        },
        ACT => Wire::Act {
            user: r.str()?,
            action: match r.u8()? {
                DISCONNECT => UserAction::Disconnect {
                    code: u16::try_from(r.u32()?).ok()?,
                    reason: r.str()?,
                },
                UNSUBSCRIBE => UserAction::Unsubscribe { room: r.str()? },
                _ => return None,
            },
        },
        _ => return None,
    };
    r.0.is_empty().then_some(wire)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Writer {
        self.0.push(v);
        self
    }

    fn u32(&mut self, v: u32) -> &mut Writer {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Writer {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn bytes(&mut self, v: &[u8]) -> &mut Writer {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }

    fn str(&mut self, v: &str) -> &mut Writer {
        self.bytes(v.as_bytes())
    }

    fn conn(&mut self, c: &ConnRef) -> &mut Writer {
        self.u32(c.node).u32(c.shard as u32).u32(c.key).u32(c.gen)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }

    fn bytes(&mut self) -> Option<&[u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Option<Arc<str>> {
        std::str::from_utf8(self.bytes()?).ok().map(Arc::from)
    }

    fn conn(&mut self) -> Option<ConnRef> {
        Some(ConnRef {
            node: self.u32()?,
            shard: u16::try_from(self.u32()?).ok()?,
            key: self.u32()?,
            gen: self.u32()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ConnRef {
        ConnRef {
            node: 7,
            shard: 3,
            key: 11,
            gen: 2,
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let all = vec![
            Wire::Heartbeat {
                node: "node-1".into(),
                addr: "tcp://127.0.0.1:7001".into(),
                hears: vec![1, 2, 3],
            },
            Wire::Publish {
                to: 9,
                publish: Publish {
                    room: "lobby".into(),
                    user: "alice".into(),
                    id: "m1".into(),
                    body: r#"{"text":"hé"}"#.into(),
                    conn: conn(),
                    hops: 1,
                },
            },
            Wire::Sync {
                to: 9,
                room: "lobby".into(),
                node: 7,
                nonce: 42,
            },
            Wire::Unsync {
                to: 9,
                room: "lobby".into(),
                node: 7,
            },
            Wire::Synced {
                room: "lobby".into(),
                home: 9,
                node: 7,
                nonce: 42,
                last_seq: u64::MAX,
                epoch: "e1".into(),
            },
            Wire::Message {
                room: "lobby".into(),
                home: 9,
                seq: 5,
                epoch: "e1".into(),
                frame: Arc::from(&b"\x81\x02hi"[..]),
            },
            Wire::Event {
                room: "lobby".into(),
                frame: Arc::from(&b"ev"[..]),
            },
            Wire::ToConn {
                conn: conn(),
                frame: Box::from(&b"ack"[..]),
            },
            Wire::Direct {
                user: "bob".into(),
                frame: Arc::from(&b""[..]),
            },
            Wire::Act {
                user: "bob".into(),
                action: UserAction::Disconnect {
                    code: 4010,
                    reason: "banned".into(),
                },
            },
            Wire::Act {
                user: "bob".into(),
                action: UserAction::Unsubscribe {
                    room: "lobby".into(),
                },
            },
        ];
        for w in all {
            assert_eq!(decode(&w.encode()).as_ref(), Some(&w), "{w:?}");
        }
    }

    #[test]
    fn garbage_is_refused_not_trusted() {
        let good = Wire::Sync {
            to: 1,
            room: "r".into(),
            node: 2,
            nonce: 3,
        }
        .encode();
        for cut in 0..good.len() {
            assert_eq!(decode(&good[..cut]), None, "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), None);
        assert_eq!(decode(&[200]), None);
        // A heartbeat claiming more tags than it has bytes.
        let mut hb = vec![HEARTBEAT];
        for s in ["n", "a"] {
            hb.extend_from_slice(&1u32.to_le_bytes());
            hb.extend_from_slice(s.as_bytes());
        }
        hb.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&hb), None);
    }

    #[test]
    fn topics_do_not_prefix_each_other() {
        assert!(!room_topic("ab").starts_with(&room_topic("a")));
        assert_ne!(room_topic("x"), user_topic("x"));
        assert_eq!(node_topic(1).len(), 6);
        let t = Wire::ToConn {
            conn: conn(),
            frame: Box::from(&b""[..]),
        };
        assert_eq!(t.topic(), node_topic(7));
    }

    #[test]
    fn node_tags_are_stable() {
        assert_eq!(node_tag("node-1"), node_tag("node-1"));
        assert_ne!(node_tag("node-1"), node_tag("node-2"));
    }
}
