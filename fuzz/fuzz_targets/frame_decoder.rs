//! Fuzz target: the frame decoder, driven the way the gateway drives it.
//!
//! Input layout (make-seeds.py writes its seeds in it):
//! - byte 0: bit 0 role (0 server, 1 client); bits 1-3 index `max_frame_bytes`
//!   in [`LIMITS`]; bits 4-6 index `max_message_bytes`.
//! - byte 1: `n = byte % 8`, then `n` bytes of chunk sizes, used in turn
//!   (0 = call `decode` again with nothing new, as after a spurious wake-up).
//! - the rest: bytes as they arrive on the socket.
//!
//! The bytes are decoded twice, in one piece and in those chunks, by a loop
//! that appends to a buffer and drops `frame.consumed` bytes from its front.
//! Checked on every call: no panic; `Ok(None)` only for a frame that is
//! really incomplete, with its header untouched and only its payload
//! unmasked; every frame's header, payload range and `consumed` agree with
//! an independent header parse, and its payload with an independent
//! unmasking of the wire bytes; text messages are UTF-8, close payloads are
//! valid. Across the two runs: the same frames, the same first error, the
//! same leftover state. Finally the frames, assembled into messages, are
//! compared with what tungstenite's `WebSocket` reads from the same bytes.
#![no_main]

use std::io::{self, Cursor, Read, Write};

use corecast_ws::{Decoder, Limits, OpCode, ProtocolError, Role};
use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::frame::{coding::CloseCode, FrameHeader};
use tungstenite::protocol::{Role as TRole, WebSocket, WebSocketConfig};

/// Size limits the input picks from: the edges of each length encoding,
/// tiny ones that refuse most frames, and none at all.
const LIMITS: [u64; 8] = [0, 1, 125, 126, 1000, 65535, 65536, u64::MAX];

/// tungstenite refuses frames over this; it also bounds what it reserves.
const TUNGSTENITE_MAX_FRAME: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&n, rest)) = rest.split_first() else {
        return;
    };
    let n = (n % 8) as usize;
    if rest.len() < n {
        return;
    }
    let (chunks, wire) = rest.split_at(n);
    let role = if flags & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let limits = Limits {
        max_frame_bytes: LIMITS[(flags >> 1 & 7) as usize],
        max_message_bytes: LIMITS[(flags >> 4 & 7) as usize],
    };
    let mut chunks: Vec<usize> = chunks.iter().map(|&c| c as usize).collect();
    if chunks.iter().all(|&c| c == 0) {
        chunks.clear();
    }

    let whole = run(role, limits, wire, &[], true);
    let pieces = run(role, limits, wire, &chunks, false);
    assert_eq!(whole.frames, pieces.frames, "frames differ by chunking");
    assert_eq!(whole.error, pieces.error, "first error differs by chunking");
    assert_eq!(
        whole.error_at, pieces.error_at,
        "error at a different frame"
    );
    assert_eq!(whole.tail, pieces.tail, "end state differs by chunking");

    compare_with_tungstenite(role, &whole, wire);
});

/// What one run decoded.
#[derive(Debug)]
struct Run {
    /// opcode, fin, message kind, unmasked payload.
    frames: Vec<(OpCode, bool, OpCode, Vec<u8>)>,
    error: Option<ProtocolError>,
    /// Offset in the wire bytes of the frame the error is about.
    error_at: usize,
    /// Without an error: bytes left unconsumed, `is_mid_message`, `frame_len_hint`.
    tail: Option<(usize, bool, Option<usize>)>,
}

/// A header as RFC 6455 §5.2 lays it out, parsed without our decoder.
struct Header {
    fin: bool,
    rsv: u8,
    opcode: u8,
    len: usize,
    payload: u64,
    mask: Option<[u8; 4]>,
}

/// `None` while the header is incomplete.
fn parse_header(b: &[u8]) -> Option<Header> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (ext, payload) = match b[1] & 0x7f {
        126 => (2, u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as u64),
        127 => (8, u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)),
        n => (0, n as u64),
    };
    let len = 2 + ext + if masked { 4 } else { 0 };
    let mask = if masked {
        Some(b.get(len - 4..len)?.try_into().ok()?)
    } else {
        None
    };
    if b.len() < len {
        return None;
    }
    Some(Header {
        fin: b[0] & 0x80 != 0,
        rsv: b[0] & 0x70,
        opcode: b[0] & 0x0f,
        len,
        payload,
        mask,
    })
}

/// Byte `i` of a payload as it should read once unmasked.
fn unmasked(raw: u8, mask: Option<[u8; 4]>, i: usize) -> u8 {
    match mask {
        Some(k) => raw ^ k[i % 4],
        None => raw,
    }
}

/// RFC 6455 §7.4 plus IANA's registry: the codes a close frame may carry.
fn close_code_ok(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Decodes `wire` fed in `chunks` (all at once if empty), checking every
/// call against the decoder's contract.
fn run(role: Role, limits: Limits, wire: &[u8], chunks: &[usize], tungstenite: bool) -> Run {
    let mut dec = Decoder::new(role, limits);
    let mut buf: Vec<u8> = Vec::new();
    // Offset in `wire` of `buf[0]`, and how much of `wire` was appended.
    let mut base = 0usize;
    let mut fed = 0usize;
    // `buf[..verified]` was checked after the last `Ok(None)`.
    let mut verified = 0usize;
    let mut next_chunk = 0usize;
    let mut text: Option<Vec<u8>> = None;
    let mut message_len = 0u64;
    let mut out = Run {
        frames: Vec::new(),
        error: None,
        error_at: 0,
        tail: None,
    };
    loop {
        let want = if chunks.is_empty() {
            wire.len()
        } else {
            next_chunk += 1;
            chunks[(next_chunk - 1) % chunks.len()]
        };
        let n = want.min(wire.len() - fed);
        buf.extend_from_slice(&wire[fed..fed + n]);
        fed += n;
        loop {
            match dec.decode(&mut buf) {
                Err(e) => {
                    out.error = Some(e);
                    out.error_at = base;
                    return out;
                }
                Ok(None) => {
                    let here = &wire[base..base + buf.len()];
                    match parse_header(here) {
                        None => assert_eq!(buf, here, "incomplete header was changed"),
                        Some(h) => {
                            assert!(
                                ((buf.len() - h.len) as u64) < h.payload,
                                "Ok(None) with a whole frame in the buffer"
                            );
                            assert_eq!(buf[..h.len], here[..h.len], "header was changed");
                            for i in verified.max(h.len)..buf.len() {
                                assert_eq!(
                                    buf[i],
                                    unmasked(here[i], h.mask, i - h.len),
                                    "payload byte {} not unmasked in place",
                                    i - h.len
                                );
                            }
                        }
                    }
                    verified = buf.len();
                    break;
                }
                Ok(Some(f)) => {
                    let here = &wire[base..base + buf.len()];
                    assert!(f.consumed > 0, "frame consumed nothing");
                    assert!(f.consumed <= buf.len(), "consumed past the buffer");
                    assert!(f.payload.start <= f.payload.end && f.payload.end <= f.consumed);
                    let h = parse_header(here).expect("frame without a whole header");
                    assert_eq!(f.payload.start, h.len, "payload starts after the header");
                    assert_eq!(f.payload.len() as u64, h.payload, "payload length");
                    assert_eq!(f.consumed, f.payload.end, "frame ends at its payload");
                    assert_eq!(f.fin, h.fin);
                    assert_eq!(f.opcode as u8, h.opcode);
                    assert_eq!(h.rsv, 0, "reserved bits accepted");
                    assert_eq!(h.mask.is_some(), role == Role::Server, "masking rule");
                    assert!(h.payload <= limits.max_frame_bytes, "frame over the limit");
                    let payload = &buf[f.payload.clone()];
                    for (i, &b) in payload.iter().enumerate() {
                        assert_eq!(b, unmasked(here[h.len + i], h.mask, i), "unmasking");
                    }
                    if tungstenite {
                        check_header_with_tungstenite(here, &h);
                    }
                    if f.opcode.is_control() {
                        assert!(f.fin && payload.len() <= 125, "control frame rules");
                        assert_eq!(f.message, f.opcode);
                        if f.opcode == OpCode::Close {
                            match payload {
                                [] => {}
                                [_] => panic!("one-byte close payload accepted"),
                                [hi, lo, reason @ ..] => {
                                    let code = u16::from_be_bytes([*hi, *lo]);
                                    assert!(close_code_ok(code), "close code {code} accepted");
                                    assert!(std::str::from_utf8(reason).is_ok(), "close reason");
                                }
                            }
                        }
                    } else {
                        assert!(matches!(f.message, OpCode::Text | OpCode::Binary));
                        message_len += payload.len() as u64;
                        assert!(message_len <= limits.max_message_bytes, "message limit");
                        if f.message == OpCode::Text {
                            text.get_or_insert_with(Vec::new).extend_from_slice(payload);
                        }
                        if f.fin {
                            if let Some(t) = text.take() {
                                assert!(std::str::from_utf8(&t).is_ok(), "text not UTF-8");
                            }
                            message_len = 0;
                        }
                    }
                    out.frames
                        .push((f.opcode, f.fin, f.message, payload.to_vec()));
                    buf.drain(..f.consumed);
                    base += f.consumed;
                    verified = 0;
                }
            }
        }
        if fed == wire.len() && (chunks.is_empty() || next_chunk >= chunks.len()) {
            break;
        }
    }
    if let Some(hint) = dec.frame_len_hint() {
        let h = parse_header(&wire[base..]).expect("a length hint without a header");
        assert_eq!(hint as u64, h.len as u64 + h.payload, "frame_len_hint");
    }
    out.tail = Some((buf.len(), dec.is_mid_message(), dec.frame_len_hint()));
    out
}

/// tungstenite must read the same header from the same (still masked) bytes.
fn check_header_with_tungstenite(here: &[u8], h: &Header) {
    let mut cur = Cursor::new(here);
    let (th, len) = FrameHeader::parse(&mut cur)
        .expect("tungstenite refuses a header we accepted")
        .expect("tungstenite finds the header incomplete");
    assert_eq!(cur.position() as usize, h.len, "tungstenite header length");
    assert_eq!(len, h.payload, "tungstenite payload length");
    assert_eq!(th.is_final, h.fin);
    assert_eq!(th.mask, h.mask);
    assert_eq!(u8::from(th.opcode), h.opcode);
    assert!(!(th.rsv1 || th.rsv2 || th.rsv3));
}

/// A whole message, in the form both decoders can be brought to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// tungstenite answers a code it does not allow with 1002, "Protocol violation".
    Close(Option<(u16, Vec<u8>)>),
}

/// In-memory socket: reads `wire`, then EOF; writes (pongs, close replies) vanish.
struct Mem(Cursor<Vec<u8>>);

impl Read for Mem {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Mem {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tungstenite_close_code(code: u16) -> (u16, bool) {
    let allowed = CloseCode::from(code).is_allowed();
    (if allowed { code } else { 1002 }, allowed)
}

/// Our frames as tungstenite would hand them out: up to the first close.
fn our_messages(frames: &[(OpCode, bool, OpCode, Vec<u8>)]) -> (Vec<Msg>, bool) {
    let mut msgs = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    for (op, fin, message, p) in frames {
        let m = match op {
            OpCode::Ping => Msg::Ping(p.clone()),
            OpCode::Pong => Msg::Pong(p.clone()),
            OpCode::Close => {
                let close = match p.as_slice() {
                    [] => None,
                    [hi, lo, reason @ ..] => {
                        let (code, allowed) =
                            tungstenite_close_code(u16::from_be_bytes([*hi, *lo]));
                        Some(if allowed {
                            (code, reason.to_vec())
                        } else {
                            (code, b"Protocol violation".to_vec())
                        })
                    }
                    [_] => unreachable!("checked in run"),
                };
                msgs.push(Msg::Close(close));
                return (msgs, true);
            }
            _ => {
                partial.extend_from_slice(p);
                if !fin {
                    continue;
                }
                let data = std::mem::take(&mut partial);
                if *message == OpCode::Text {
                    Msg::Text(data)
                } else {
                    Msg::Binary(data)
                }
            }
        };
        msgs.push(m);
    }
    (msgs, false)
}

/// Reads `wire` with tungstenite until it errors or hands out a close.
fn tungstenite_messages(role: Role, wire: &[u8]) -> (Vec<Msg>, Option<tungstenite::Error>) {
    let config = WebSocketConfig::default()
        .max_frame_size(Some(TUNGSTENITE_MAX_FRAME))
        .max_message_size(None);
    let trole = match role {
        Role::Server => TRole::Server,
        Role::Client => TRole::Client,
    };
    let mut ws = WebSocket::from_raw_socket(Mem(Cursor::new(wire.to_vec())), trole, Some(config));
    let mut msgs = Vec::new();
    // Every read takes at least one frame (two bytes) or fails.
    for _ in 0..wire.len() / 2 + 2 {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => msgs.push(Msg::Text(t.as_bytes().to_vec())),
            Ok(tungstenite::Message::Binary(b)) => msgs.push(Msg::Binary(b.to_vec())),
            Ok(tungstenite::Message::Ping(b)) => msgs.push(Msg::Ping(b.to_vec())),
            Ok(tungstenite::Message::Pong(b)) => msgs.push(Msg::Pong(b.to_vec())),
            Ok(tungstenite::Message::Close(c)) => {
                msgs.push(Msg::Close(
                    c.map(|c| (u16::from(c.code), c.reason.as_bytes().to_vec())),
                ));
                return (msgs, None);
            }
            Ok(tungstenite::Message::Frame(_)) => unreachable!("read never returns raw frames"),
            Err(e) => return (msgs, Some(e)),
        }
    }
    panic!("tungstenite read more messages than the input has frames");
}

fn is_prefix(a: &[Msg], b: &[Msg]) -> bool {
    b.starts_with(a) || a.starts_with(b)
}

/// Someone else's reading of RFC 6455 must agree with ours on every message
/// both accept, and neither may hand out a message the other refused.
fn compare_with_tungstenite(role: Role, ours: &Run, wire: &[u8]) {
    let (mine, closed) = our_messages(&ours.frames);
    let (theirs, terr) = tungstenite_messages(role, wire);
    // tungstenite's frame cap is not ours: past it, only a common prefix is owed.
    let capacity = matches!(terr, Some(tungstenite::Error::Capacity(_)));
    let verdict = if closed {
        Some(None)
    } else {
        ours.error.map(Some)
    };
    let ok = match verdict {
        // No error up to a close or the end of the input.
        None | Some(None) => {
            if capacity {
                theirs.len() <= mine.len() && mine.starts_with(&theirs)
            } else {
                theirs == mine
            }
        }
        // Our limits are not tungstenite's: it may read on past ours.
        Some(Some(ProtocolError::FrameTooLarge | ProtocolError::MessageTooLarge)) => {
            if capacity {
                is_prefix(&mine, &theirs)
            } else {
                theirs.starts_with(&mine)
            }
        }
        // tungstenite does not refuse close codes; it answers them with 1002
        // (unless the reason is not UTF-8, which it does refuse).
        Some(Some(ProtocolError::InvalidCloseCode(_))) => {
            let mut with_close = mine.clone();
            with_close.push(Msg::Close(Some((1002, b"Protocol violation".to_vec()))));
            theirs == mine || theirs == with_close
        }
        Some(Some(_)) => {
            if capacity {
                mine.starts_with(&theirs)
            } else {
                theirs == mine && terr.is_some()
            }
        }
    };
    assert!(
        ok,
        "tungstenite disagrees\n ours: {mine:?} then {:?}\n tungstenite: {theirs:?} then {terr:?}",
        ours.error
    );
}
