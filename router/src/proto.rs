//! The `corecast.v1` wire format: client frames parsed with serde, server
//! frames written straight into WebSocket frames (header included), so a
//! message is encoded once and its bytes copied to every member.
//!
//! See docs/protocol.md for every frame, error code and close code.

use std::io::Write as _;

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use corecast_ws::{self as ws, OpCode};

/// The subprotocol name clients may offer.
pub const SUBPROTOCOL: &str = "corecast.v1";
/// Longest room name, in bytes.
pub const MAX_ROOM_BYTES: usize = 128;
/// Longest client message id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Close codes of the chat endpoint (see docs/protocol.md).
pub mod close {
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const AUTH_REQUIRED: u16 = 4001;
    pub const INVALID_TOKEN: u16 = 4002;
    pub const TOKEN_EXPIRED: u16 = 4003;
    pub const TOO_MANY_CONNECTIONS: u16 = 4004;
    pub const TOO_MANY_FROM_ADDRESS: u16 = 4005;
}

/// A frame from the client.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Connect {
        token: Cow<'a, str>,
    },
    /// A fresh token for the same user, before the current one expires.
    Refresh {
        token: Cow<'a, str>,
    },
    Join {
        room: Cow<'a, str>,
        /// Resume: the last seq the client saw, and its epoch.
        since: Option<(u64, Cow<'a, str>)>,
    },
    Leave {
        room: Cow<'a, str>,
    },
    Publish {
        room: Cow<'a, str>,
        id: Option<Cow<'a, str>>,
        body: &'a RawValue,
    },
    Dm {
        to: Cow<'a, str>,
        id: Option<Cow<'a, str>>,
        body: &'a RawValue,
    },
    Presence {
        room: Cow<'a, str>,
    },
    History {
        room: Cow<'a, str>,
        since: Option<u64>,
        limit: Option<u64>,
    },
}

/// Every field any frame has. serde's internally tagged enums buffer their
/// content, which a borrowed `RawValue` cannot go through, so frames are
/// parsed flat and then checked per type.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flat<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    body: Body<'a>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default)]
    limit: Option<u64>,
}

/// A JSON value kept as its text; unlike `Option<&RawValue>`, `null` is a
/// value here and only a missing field is `None`.
#[derive(Default)]
struct Body<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Body<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'de RawValue>::deserialize(d).map(|r| Body(Some(r)))
    }
}

/// The frame is not a valid `corecast.v1` client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadFrame;

impl<'a> ClientFrame<'a> {
    pub fn parse(text: &'a [u8]) -> Result<ClientFrame<'a>, BadFrame> {
        let f: Flat<'a> = serde_json::from_slice(text).map_err(|_| BadFrame)?;
        let need = |v: Option<Cow<'a, str>>| v.ok_or(BadFrame);
        Ok(match &*f.kind {
            "connect" => ClientFrame::Connect {
                token: need(f.token)?,
            },
            "refresh" => ClientFrame::Refresh {
                token: need(f.token)?,
            },
            "join" => ClientFrame::Join {
                room: need(f.room)?,
                since: match (f.since, f.epoch) {
                    (Some(seq), Some(epoch)) => Some((seq, epoch)),
                    (None, None) => None,
                    // A resume point means nothing without its epoch.
                    _ => return Err(BadFrame),
                },
            },
            "history" => ClientFrame::History {
                room: need(f.room)?,
                since: f.since,
                limit: f.limit,
            },
            "leave" => ClientFrame::Leave {
                room: need(f.room)?,
            },
            "presence" => ClientFrame::Presence {
                room: need(f.room)?,
            },
            "publish" => ClientFrame::Publish {
                room: need(f.room)?,
                id: f.id,
                body: f.body.0.ok_or(BadFrame)?,
            },
            "dm" => ClientFrame::Dm {
                to: need(f.to)?,
                id: f.id,
                body: f.body.0.ok_or(BadFrame)?,
            },
            _ => return Err(BadFrame),
        })
    }
}

/// Why a request was refused; the connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    InvalidRoom,
    InvalidId,
    Forbidden,
    NotJoined,
    AlreadyJoined,
    TooManyRooms,
    RateLimited,
    BodyTooLarge,
    AlreadyAuthenticated,
    StorageBusy,
    StorageUnavailable,
    RoomMoving,
    InvalidToken,
    TokenUserMismatch,
    ReadOnly,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadRequest,
        ErrorCode::InvalidRoom,
        ErrorCode::InvalidId,
        ErrorCode::Forbidden,
        ErrorCode::NotJoined,
        ErrorCode::AlreadyJoined,
        ErrorCode::TooManyRooms,
        ErrorCode::RateLimited,
        ErrorCode::BodyTooLarge,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::StorageBusy,
        ErrorCode::StorageUnavailable,
        ErrorCode::RoomMoving,
        ErrorCode::InvalidToken,
        ErrorCode::TokenUserMismatch,
        ErrorCode::ReadOnly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::StorageBusy => "storage_busy",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::RoomMoving => "room_moving",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenUserMismatch => "token_user_mismatch",
            ErrorCode::ReadOnly => "read_only",
        }
    }

    fn message(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "not a corecast.v1 frame: see docs/protocol.md",
            ErrorCode::InvalidRoom => {
                "room names are 1-128 bytes of letters, digits and _ - . : @ /"
            }
            ErrorCode::InvalidId => "id must be at most 64 bytes",
            ErrorCode::Forbidden => "your token does not allow this room",
            ErrorCode::NotJoined => "join the room first",
            ErrorCode::AlreadyJoined => "already joined this room",
            ErrorCode::TooManyRooms => "too many rooms on this connection: leave one first",
            ErrorCode::RateLimited => "too many frames per second: slow down",
            ErrorCode::BodyTooLarge => "body larger than the server allows",
            ErrorCode::AlreadyAuthenticated => "already authenticated",
            ErrorCode::StorageBusy => "the store is behind: not published; retry with the same id",
            ErrorCode::StorageUnavailable => "the store is unreachable: retry later",
            ErrorCode::RoomMoving => "the room's home is moving between nodes: retry in a moment",
            ErrorCode::InvalidToken => {
                "the new token was not accepted (expired, altered or malformed): the current one still holds until it expires"
            }
            ErrorCode::TokenUserMismatch => {
                "the new token is for another user: reconnect to change users"
            }
            ErrorCode::ReadOnly => "clients may not publish to this room: only the server does",
        }
    }
}

/// Is `room` a valid room name?
pub fn valid_room(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_BYTES
        && room.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/')
        })
}

/// Builds one server text frame: reserves the header, writes the JSON, then
/// fills the header in (the JSON length is known only at the end).
pub struct FrameWriter {
    buf: Vec<u8>,
}

/// Header room for payloads up to 64 KiB - 1; longer payloads are moved.
const HEADER_RESERVE: usize = 4;

impl FrameWriter {
    pub fn new(capacity: usize) -> FrameWriter {
        let mut buf = Vec::with_capacity(capacity + HEADER_RESERVE);
        buf.extend_from_slice(&[0; HEADER_RESERVE]);
        FrameWriter { buf }
    }

    pub fn raw(&mut self, s: &str) -> &mut Self {
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// A JSON string literal, escaped.
    pub fn string(&mut self, s: &str) -> &mut Self {
        // Writing to a Vec cannot fail, and a str always serializes.
        let _ = serde_json::to_writer(&mut self.buf, s);
        self
    }

    pub fn number(&mut self, n: u64) -> &mut Self {
        let _ = write!(self.buf, "{n}");
        self
    }

    /// What every message shows of its sender, closing the object:
    /// `"from":…,"id":…,"ts":…,"body":…}`.
    fn origin(&mut self, from: &str, id: &str, ts_ms: u64, body: &str) -> &mut Self {
        self.raw(r#""from":"#)
            .string(from)
            .raw(r#","id":"#)
            .string(id)
            .raw(r#","ts":"#)
            .number(ts_ms)
            .raw(r#","body":"#)
            .raw(body)
            .raw("}")
    }

    /// The finished WebSocket frame.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() - HEADER_RESERVE;
        let mut header = Vec::with_capacity(ws::MAX_HEADER_LEN);
        ws::encode_header(&mut header, true, OpCode::Text, len, None);
        if header.len() <= HEADER_RESERVE {
            let start = HEADER_RESERVE - header.len();
            self.buf[start..HEADER_RESERVE].copy_from_slice(&header);
            self.buf.drain(..start);
            self.buf
        } else {
            header.extend_from_slice(&self.buf[HEADER_RESERVE..]);
            header
        }
    }
}

pub fn welcome(user: &str, conn: &str) -> Vec<u8> {
    let mut w = FrameWriter::new(64 + user.len());
    w.raw(r#"{"type":"welcome","user":"#)
        .string(user)
        .raw(r#","conn":"#)
        .string(conn)
        .raw("}");
    w.finish()
}

/// `resumed` is `(recovered, missed)` when the client gave a resume point.
pub fn joined(
    room: &str,
    seq: u64,
    members: u64,
    epoch: &str,
    resumed: Option<(bool, u64)>,
) -> Vec<u8> {
    let mut w = FrameWriter::new(112 + room.len() + epoch.len());
    w.raw(r#"{"type":"joined","room":"#)
        .string(room)
        .raw(r#","seq":"#)
        .number(seq)
        .raw(r#","members":"#)
        .number(members)
        .raw(r#","epoch":"#)
        .string(epoch);
    if let Some((recovered, missed)) = resumed {
        w.raw(if recovered {
            r#","recovered":true,"missed":"#
        } else {
            r#","recovered":false,"missed":"#
        })
        .number(missed);
    }
    w.raw("}");
    w.finish()
}

/// A history answer: `records` oldest first.
pub fn history(
    room: &str,
    epoch: &str,
    seq: u64,
    complete: bool,
    records: &[crate::message::Record],
) -> Vec<u8> {
    let size: usize = records
        .iter()
        .map(|r| 64 + r.from.len() + r.id.len() + r.body.len())
        .sum();
    let mut w = FrameWriter::new(96 + room.len() + epoch.len() + size);
    w.raw(r#"{"type":"history","room":"#)
        .string(room)
        .raw(r#","epoch":"#)
        .string(epoch)
        .raw(r#","seq":"#)
        .number(seq)
        .raw(if complete {
            r#","complete":true,"messages":["#
        } else {
            r#","complete":false,"messages":["#
        });
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            w.raw(",");
        }
        w.raw(r#"{"seq":"#)
            .number(r.seq)
            .raw(",")
            .origin(&r.from, &r.id, r.ts, &r.body);
    }
    w.raw("]}");
    w.finish()
}

/// The answer to a `refresh`: the new token holds until `exp` (Unix
/// seconds; `None`: it does not expire).
pub fn refreshed(exp: Option<u64>) -> Vec<u8> {
    let mut w = FrameWriter::new(48);
    w.raw(r#"{"type":"refreshed","exp":"#);
    match exp {
        Some(exp) => w.number(exp),
        None => w.raw("null"),
    };
    w.raw("}");
    w.finish()
}

pub fn left(room: &str) -> Vec<u8> {
    let mut w = FrameWriter::new(32 + room.len());
    w.raw(r#"{"type":"left","room":"#).string(room).raw("}");
    w.finish()
}

/// The server (its API) took the connection out of `room`.
pub fn unsubscribed(room: &str) -> Vec<u8> {
    let mut w = FrameWriter::new(48 + room.len());
    w.raw(r#"{"type":"left","room":"#)
        .string(room)
        .raw(r#","by":"server"}"#);
    w.finish()
}

/// A user action done (the server API's answer; never sent to a client):
/// the connections it reached on the answering node.
pub fn acted(connections: u64) -> Vec<u8> {
    let mut w = FrameWriter::new(48);
    w.raw(r#"{"type":"acted","connections":"#)
        .number(connections)
        .raw("}");
    w.finish()
}

pub fn message(room: &str, seq: u64, from: &str, id: &str, ts_ms: u64, body: &str) -> Vec<u8> {
    let mut w = FrameWriter::new(96 + room.len() + from.len() + id.len() + body.len());
    w.raw(r#"{"type":"msg","room":"#)
        .string(room)
        .raw(r#","seq":"#)
        .number(seq)
        .raw(",")
        .origin(from, id, ts_ms, body);
    w.finish()
}

/// `stored`: the message is in the store or its spill file (see
/// docs/storage.md); false only when both failed.
/// `epoch`: the epoch the home numbered the message in (a resume names it
/// with the seq).
pub fn ack(id: &str, room: &str, seq: u64, epoch: &str, duplicate: bool, stored: bool) -> Vec<u8> {
    let mut w = FrameWriter::new(112 + id.len() + room.len() + epoch.len());
    w.raw(r#"{"type":"ack","id":"#)
        .string(id)
        .raw(r#","room":"#)
        .string(room)
        .raw(r#","seq":"#)
        .number(seq)
        .raw(r#","epoch":"#)
        .string(epoch);
    if duplicate {
        w.raw(r#","duplicate":true"#);
    }
    w.raw(if stored {
        r#","stored":true}"#
    } else {
        r#","stored":false}"#
    });
    w.finish()
}

pub fn dm(from: &str, id: &str, ts_ms: u64, body: &str) -> Vec<u8> {
    let mut w = FrameWriter::new(64 + from.len() + id.len() + body.len());
    w.raw(r#"{"type":"dm","#).origin(from, id, ts_ms, body);
    w.finish()
}

pub fn dm_ack(id: &str, to: &str, delivered: u64) -> Vec<u8> {
    let mut w = FrameWriter::new(64 + id.len() + to.len());
    w.raw(r#"{"type":"ack","id":"#)
        .string(id)
        .raw(r#","to":"#)
        .string(to)
        .raw(r#","delivered":"#)
        .number(delivered)
        .raw("}");
    w.finish()
}

/// `users` is `None` when the room is over the presence limit.
pub fn presence<'a>(
    room: &str,
    count: u64,
    users: Option<impl Iterator<Item = &'a str>>,
) -> Vec<u8> {
    let mut w = FrameWriter::new(64 + room.len());
    w.raw(r#"{"type":"presence","room":"#)
        .string(room)
        .raw(r#","count":"#)
        .number(count)
        .raw(r#","users":"#);
    match users {
        None => {
            w.raw("null");
        }
        Some(users) => {
            w.raw("[");
            for (i, u) in users.enumerate() {
                if i > 0 {
                    w.raw(",");
                }
                w.string(u);
            }
            w.raw("]");
        }
    }
    w.raw("}");
    w.finish()
}

pub fn presence_event(room: &str, joined: bool, user: &str) -> Vec<u8> {
    let mut w = FrameWriter::new(64 + room.len() + user.len());
    w.raw(r#"{"type":"presence_event","room":"#)
        .string(room)
        .raw(if joined {
            r#","event":"join","user":"#
        } else {
            r#","event":"leave","user":"#
        })
        .string(user)
        .raw("}");
    w.finish()
}

pub fn error(code: ErrorCode, id: Option<&str>, room: Option<&str>) -> Vec<u8> {
    let mut w = FrameWriter::new(128);
    w.raw(r#"{"type":"error","code":""#)
        .raw(code.as_str())
        .raw(r#"","message":"#)
        .string(code.message());
    if let Some(id) = id {
        w.raw(r#","id":"#).string(id);
    }
    if let Some(room) = room {
        w.raw(r#","room":"#).string(room);
    }
    w.raw("}");
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast_ws::{Decoder, Limits, Role};

    /// Decodes a server frame as a client would and parses its JSON.
    fn json(frame: Vec<u8>) -> serde_json::Value {
        let mut buf = frame;
        let f = Decoder::new(
            Role::Client,
            Limits {
                max_frame_bytes: 1 << 20,
                max_message_bytes: 1 << 20,
            },
        )
        .decode(&mut buf)
        .unwrap()
        .unwrap();
        assert_eq!(f.consumed, buf.len(), "exactly one frame");
        assert_eq!(f.opcode, OpCode::Text);
        serde_json::from_slice(&buf[f.payload]).unwrap()
    }

    #[test]
    fn server_frames_are_valid_json_with_escaping() {
        let v = json(message(
            "lobby",
            7,
            "al\"ice",
            "c-1",
            99,
            r#"{"text":"hi"}"#,
        ));
        assert_eq!(v["type"], "msg");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["from"], "al\"ice");
        assert_eq!(v["body"]["text"], "hi");
        let v = json(ack("c-1", "lobby", 7, "e1", true, true));
        assert_eq!(v["stored"], true);
        assert_eq!(v["epoch"], "e1");
        assert_eq!(
            (v["seq"].as_u64(), v["duplicate"].as_bool()),
            (Some(7), Some(true))
        );
        let v = json(presence("r", 2, Some(["a", "b"].into_iter())));
        assert_eq!(v["users"], serde_json::json!(["a", "b"]));
        let v = json(presence("r", 5000, None::<std::iter::Empty<&str>>));
        assert!(v["users"].is_null());
        let v = json(error(ErrorCode::NotJoined, Some("x"), Some("r")));
        assert_eq!(
            (v["code"].as_str(), v["id"].as_str()),
            (Some("not_joined"), Some("x"))
        );
        for f in [
            welcome("u", "0.1"),
            joined("r", 0, 1, "e", None),
            joined("r", 9, 1, "e", Some((false, 3))),
            left("r"),
            dm("a", "", 1, "null"),
            dm_ack("i", "b", 2),
            presence_event("r", false, "b"),
        ] {
            json(f);
        }
    }

    #[test]
    fn long_frames_get_a_long_header() {
        let body = format!("\"{}\"", "x".repeat(70_000));
        let v = json(message("r", 1, "u", "", 0, &body));
        assert_eq!(v["body"].as_str().unwrap().len(), 70_000);
        let body = format!("\"{}\"", "x".repeat(200));
        assert_eq!(
            json(message("r", 1, "u", "", 0, &body))["body"]
                .as_str()
                .unwrap()
                .len(),
            200
        );
    }

    #[test]
    fn client_frames_parse_and_refuse() {
        let ok: &[&str] = &[
            r#"{"type":"connect","token":"t"}"#,
            r#"{"type":"join","room":"lobby"}"#,
            r#"{"type":"leave","room":"lobby"}"#,
            r#"{"type":"publish","room":"lobby","id":"1","body":{"a":[1,2]}}"#,
            r#"{"type":"publish","room":"lobby","body":"text"}"#,
            r#"{"type":"dm","to":"bob","body":null}"#,
            r#"{"type":"publish","room":"lobby","body":null}"#,
            r#"{"type":"presence","room":"lobby"}"#,
            r#"{"room":"lobby","type":"join"}"#,
            r#"{"type":"join","room":"lobby","since":41,"epoch":"e1"}"#,
            r#"{"type":"history","room":"lobby"}"#,
            r#"{"type":"history","room":"lobby","since":3,"limit":10}"#,
        ];
        for s in ok {
            assert!(ClientFrame::parse(s.as_bytes()).is_ok(), "{s}");
        }
        let bad: &[&str] = &[
            "",
            "[]",
            r#"{"type":"nope"}"#,
            r#"{"room":"lobby"}"#,
            r#"{"type":"join"}"#,
            r#"{"type":"join","room":5}"#,
            r#"{"type":"publish","room":"r"}"#,
            r#"{"type":"join","room":null}"#,
            r#"{"type":"join","room":"r","extra":1}"#,
            r#"{"type":"publish","room":"r","body":}"#,
            r#"{"type":"join","room":"r","since":4}"#,
            r#"{"type":"join","room":"r","since":-1,"epoch":"e"}"#,
            r#"{"type":"history","room":"r","limit":"x"}"#,
        ];
        for s in bad {
            assert!(ClientFrame::parse(s.as_bytes()).is_err(), "{s}");
        }
        // Escapes in strings are decoded.
        match ClientFrame::parse(br#"{"type":"join","room":"a\/b"}"#).unwrap() {
            ClientFrame::Join { room, since } => assert_eq!((&*room, since), ("a/b", None)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn room_names() {
        for (room, ok) in [
            ("lobby", true),
            ("team-1/general", true),
            ("a@b:c.d_e", true),
            ("", false),
            ("has space", false),
            ("é", false),
            (&"x".repeat(129), false),
            (&"x".repeat(128), true),
        ] {
            assert_eq!(valid_room(room), ok, "{room:?}");
        }
    }
}
