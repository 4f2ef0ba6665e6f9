//! Sans-IO frame codec (RFC 6455 §5): a stateful decoder and frame encoders.
//!
//! # Invariants
//! - The decoder never allocates and never writes to a socket; replies the
//!   protocol obliges (pong, close echo) are the caller's to encode.
//! - Every limit is checked from the header, before the payload is awaited,
//!   so a peer cannot make the caller buffer more than `max_frame_bytes`.
//! - Between calls the decoder remembers only the frame in progress and the
//!   message in progress (a few dozen bytes).

use std::ops::Range;

use super::{close, mask::apply_mask, utf8::Utf8Validator};

/// Frame opcodes (RFC 6455 §5.2). The others are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xa,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xa => OpCode::Pong,
            _ => return None,
        })
    }

    /// Control frames (close, ping, pong) may interleave with fragments.
    pub fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }
}

/// Whether a frame whose first byte is `b0` is a control frame (opcode
/// 0x8-0xF: close, ping, pong, or a reserved one the decoder refuses), read
/// from the first byte alone.
pub fn is_control_frame_start(b0: u8) -> bool {
    b0 & 0x08 != 0
}

/// Which end of the connection this codec speaks for.
///
/// A server only accepts masked frames and a client only unmasked ones
/// (RFC 6455 §5.1); a server never masks and a client always does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// A broken framing rule. Each maps to the close code the RFC prescribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// RSV1-3 set, but no extension was negotiated that gives them meaning (§5.2).
    #[error("reserved bits set without a negotiated extension")]
    ReservedBitsSet,
    /// Opcodes 0x3-0x7 and 0xB-0xF are reserved for future use (§5.2).
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// Every frame from a client must be masked (§5.1).
    #[error("unmasked frame from client")]
    UnmaskedFrameFromClient,
    /// A server must never mask its frames (§5.1).
    #[error("masked frame from server")]
    MaskedFrameFromServer,
    /// Control frames must not be fragmented (§5.5).
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// Control frame payloads are at most 125 bytes (§5.5).
    #[error("control frame payload over 125 bytes")]
    ControlFrameTooLong,
    /// The most significant bit of a 64-bit payload length must be 0 (§5.2).
    #[error("64-bit payload length with its top bit set")]
    LengthTopBitSet,
    /// A continuation frame arrived with no fragmented message in progress (§5.4).
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A new text or binary frame arrived inside a fragmented message (§5.4).
    #[error("new data frame while a fragmented message is unfinished")]
    ExpectedContinuation,
    /// A frame's payload is over the configured `max_frame_bytes`.
    #[error("frame larger than the configured limit")]
    FrameTooLarge,
    /// A message's payload (all fragments) is over `max_message_bytes`.
    #[error("message larger than the configured limit")]
    MessageTooLarge,
    /// A text message is not valid UTF-8 (§8.1).
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A close payload of exactly one byte cannot hold a status code (§5.5.1).
    #[error("close payload of one byte")]
    InvalidClosePayload,
    /// The close status code is reserved or unassigned (§7.4).
    #[error("close code {0} may not be sent")]
    InvalidCloseCode(u16),
    /// The close reason is not valid UTF-8 (§5.5.1).
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl ProtocolError {
    /// The close code to fail the connection with (§7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            ProtocolError::FrameTooLarge | ProtocolError::MessageTooLarge => {
                close::code::MESSAGE_TOO_BIG
            }
            ProtocolError::InvalidUtf8 | ProtocolError::InvalidCloseReason => {
                close::code::INVALID_PAYLOAD
            }
            _ => close::code::PROTOCOL_ERROR,
        }
    }

    /// A short reason for the close frame, at most 123 bytes.
    pub fn reason(self) -> &'static str {
        match self {
            ProtocolError::ReservedBitsSet => "reserved bits set",
            ProtocolError::ReservedOpcode(_) => "reserved opcode",
            ProtocolError::UnmaskedFrameFromClient => "client frames must be masked",
            ProtocolError::MaskedFrameFromServer => "server frames must not be masked",
            ProtocolError::FragmentedControlFrame => "fragmented control frame",
            ProtocolError::ControlFrameTooLong => "control frame over 125 bytes",
            ProtocolError::LengthTopBitSet => "invalid 64-bit length",
            ProtocolError::UnexpectedContinuation => "unexpected continuation frame",
            ProtocolError::ExpectedContinuation => "expected continuation frame",
            ProtocolError::FrameTooLarge => "frame too large",
            ProtocolError::MessageTooLarge => "message too large",
            ProtocolError::InvalidUtf8 => "invalid UTF-8 in text message",
            ProtocolError::InvalidClosePayload => "close payload of one byte",
            ProtocolError::InvalidCloseCode(_) => "invalid close code",
            ProtocolError::InvalidCloseReason => "invalid UTF-8 in close reason",
        }
    }
}

/// Size limits the decoder enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one frame.
    pub max_frame_bytes: u64,
    /// Largest payload of one message (the sum of its fragments).
    pub max_message_bytes: u64,
}

/// One decoded frame. Its payload is already unmasked in the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    /// Where the payload sits in the buffer handed to [`Decoder::decode`].
    pub payload: Range<usize>,
    /// How many bytes the frame took: the caller drops this many from the front.
    pub consumed: usize,
    /// The message kind this frame belongs to: `Text`/`Binary` for data
    /// frames (continuations included), the opcode itself for control frames.
    pub message: OpCode,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
    /// Text or Binary for data frames; the opcode for control frames.
    message: OpCode,
}

/// Decodes frames from a byte buffer, enforcing every framing rule.
///
/// Contract: pass the unconsumed bytes, starting at the first byte of the
/// next frame. `Ok(None)` means "need more bytes": nothing was consumed, but
/// the payload bytes already present were unmasked in place (and, for text,
/// validated) so that an invalid message fails fast. Pass the same bytes
/// again, with more appended, on the next call. On `Ok(Some(frame))` drop
/// `frame.consumed` bytes from the front. After an error the connection must
/// be failed; the decoder is not reusable.
#[derive(Debug, Clone)]
pub struct Decoder {
    role: Role,
    limits: Limits,
    /// The frame whose header was parsed but whose payload is incomplete.
    partial: Option<Header>,
    /// Payload bytes of `partial` already unmasked and checked.
    done: usize,
    /// The kind of the fragmented message in progress, if any.
    message: Option<OpCode>,
    /// Payload bytes of the fragmented message received so far.
    message_len: u64,
    utf8: Utf8Validator,
}

impl Decoder {
    pub fn new(role: Role, limits: Limits) -> Decoder {
        Decoder {
            role,
            limits,
            partial: None,
            done: 0,
            message: None,
            message_len: 0,
            utf8: Utf8Validator::default(),
        }
    }

    /// Bytes the frame in progress needs in all (header and payload), when
    /// its header is known; lets the caller reserve buffer space once.
    pub fn frame_len_hint(&self) -> Option<usize> {
        self.partial.map(|h| h.header_len + h.payload_len)
    }

    /// The kind of the fragmented message in progress, if any.
    pub fn message_in_progress(&self) -> Option<OpCode> {
        self.message
    }

    /// Is a fragmented message in progress (or a frame half received)?
    pub fn is_mid_message(&self) -> bool {
        self.partial.is_some() || self.message.is_some()
    }

    /// Decodes the next frame from `buf`; see the type's contract.
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<Option<Frame>, ProtocolError> {
        let h = match self.partial {
            Some(h) => h,
            None => match self.parse_header(buf)? {
                Some(h) => {
                    self.check_sequence(&h)?;
                    self.done = 0;
                    h
                }
                None => return Ok(None),
            },
        };
        let start = h.header_len;
        let have = (buf.len() - start).min(h.payload_len);
        let fresh = start + self.done..start + have;
        if let Some(key) = h.mask {
            apply_mask(&mut buf[fresh.clone()], key, self.done);
        }
        if h.message == OpCode::Text && !fresh.is_empty() {
            self.utf8
                .feed(&buf[fresh])
                .map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        self.done = have;
        if have < h.payload_len {
            self.partial = Some(h);
            return Ok(None);
        }
        self.partial = None;
        let payload = start..start + h.payload_len;
        if h.opcode.is_control() {
            if h.opcode == OpCode::Close {
                close::parse_close(&buf[payload.clone()])?;
            }
        } else if h.fin {
            if h.message == OpCode::Text {
                self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
            }
            self.message = None;
            self.message_len = 0;
        } else {
            self.message = Some(h.message);
        }
        Ok(Some(Frame {
            fin: h.fin,
            opcode: h.opcode,
            payload,
            consumed: start + h.payload_len,
            message: h.message,
        }))
    }

    /// Parses and checks a frame header; `Ok(None)` if it is incomplete.
    fn parse_header(&self, buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(ProtocolError::ReservedBitsSet);
        }
        let fin = b0 & 0x80 != 0;
        let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(ProtocolError::ReservedOpcode(b0 & 0x0f))?;
        let masked = b1 & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrameFromClient),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrameFromServer),
            _ => {}
        }
        if opcode.is_control() && !fin {
            return Err(ProtocolError::FragmentedControlFrame);
        }
        let (len_bytes, short) = match b1 & 0x7f {
            126 => (2, 0),
            127 => (8, 0),
            n => (0, n as u64),
        };
        let mask_bytes = if masked { 4 } else { 0 };
        let header_len = 2 + len_bytes + mask_bytes;
        if buf.len() < 2 + len_bytes {
            return Ok(None);
        }
        let payload_len = match len_bytes {
            2 => u16::from_be_bytes([buf[2], buf[3]]) as u64,
            8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                let n = u64::from_be_bytes(b);
                if n >> 63 != 0 {
                    return Err(ProtocolError::LengthTopBitSet);
                }
                n
            }
            _ => short,
        };
        // The decoded length, not the 7-bit code: a control frame whose
        // length is written in a longer form than needed is still within
        // the rule (and is read, like a data frame in that form).
        if opcode.is_control() && payload_len > 125 {
            return Err(ProtocolError::ControlFrameTooLong);
        }
        if payload_len > self.limits.max_frame_bytes {
            return Err(ProtocolError::FrameTooLarge);
        }
        if buf.len() < header_len {
            return Ok(None);
        }
        let mask = masked.then(|| {
            let m = 2 + len_bytes;
            [buf[m], buf[m + 1], buf[m + 2], buf[m + 3]]
        });
        let message = match opcode {
            OpCode::Continuation => self.message.unwrap_or(OpCode::Continuation),
            other => other,
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask,
            header_len,
            // Fits: bounded by max_frame_bytes, which came from a usize.
            payload_len: payload_len as usize,
            message,
        }))
    }

    /// Fragmentation rules (§5.4) and the message size limit.
    fn check_sequence(&mut self, h: &Header) -> Result<(), ProtocolError> {
        match (h.opcode, self.message) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::ExpectedContinuation)
            }
            _ => {}
        }
        if !h.opcode.is_control() {
            let total = self.message_len + h.payload_len as u64;
            if total > self.limits.max_message_bytes {
                return Err(ProtocolError::MessageTooLarge);
            }
            self.message_len = total;
        }
        Ok(())
    }
}

/// Largest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER_LEN: usize = 14;

/// Appends a frame header to `out`.
pub fn encode_header(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) {
    let b0 = (fin as u8) << 7 | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload_len {
        0..=125 => out.extend_from_slice(&[b0, mask_bit | payload_len as u8]),
        126..=0xffff => {
            out.extend_from_slice(&[b0, mask_bit | 126]);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&[b0, mask_bit | 127]);
            out.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// Appends a whole frame to `out`, masking a copy of the payload if `mask` is set.
pub fn encode_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    out.reserve(MAX_HEADER_LEN + payload.len());
    encode_header(out, fin, opcode, payload.len(), mask);
    let at = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[at..], key, 0);
    }
}

/// Appends a close frame. The reason is cut to fit the 125-byte control
/// limit, at a character boundary.
pub fn encode_close(out: &mut Vec<u8>, code: Option<u16>, reason: &str, mask: Option<[u8; 4]>) {
    let mut payload = [0u8; 125];
    let len = match code {
        None => 0,
        Some(code) => {
            payload[..2].copy_from_slice(&code.to_be_bytes());
            let mut cut = reason.len().min(123);
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
            2 + cut
        }
    };
    encode_frame(out, true, OpCode::Close, &payload[..len], mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_are_known_from_their_first_byte() {
        let cases: &[(&str, u8, bool)] = &[
            ("close", 0x88, true),
            ("ping", 0x89, true),
            ("pong", 0x8a, true),
            ("reserved control 0xB", 0x8b, true),
            ("close without FIN (refused later)", 0x08, true),
            ("text", 0x81, false),
            ("binary", 0x82, false),
            ("continuation", 0x80, false),
            ("text fragment", 0x01, false),
            ("reserved data 0x3", 0x83, false),
        ];
        for (name, b0, control) in cases {
            assert_eq!(is_control_frame_start(*b0), *control, "{name}");
        }
    }

    const LIMITS: Limits = Limits {
        max_frame_bytes: 1000,
        max_message_bytes: 1500,
    };
    const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let op = OpCode::from_u8(opcode);
        match op {
            Some(op) => encode_frame(&mut out, fin, op, payload, Some(KEY)),
            None => {
                encode_frame(&mut out, fin, OpCode::Binary, payload, Some(KEY));
                out[0] = (out[0] & 0xf0) | opcode;
            }
        }
        out
    }

    /// Decodes every frame in `bytes`, one call per frame, as a server.
    fn decode_all(bytes: &[u8]) -> Result<Vec<(OpCode, bool, Vec<u8>)>, ProtocolError> {
        let mut dec = Decoder::new(Role::Server, LIMITS);
        let mut buf = bytes.to_vec();
        let mut out = Vec::new();
        while let Some(f) = dec.decode(&mut buf)? {
            out.push((f.opcode, f.fin, buf[f.payload.clone()].to_vec()));
            buf.drain(..f.consumed);
        }
        assert!(buf.is_empty() || dec.is_mid_message() || buf.len() < 14);
        Ok(out)
    }

    fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn table() {
        use OpCode::*;
        use ProtocolError::*;
        type Expect = Result<Vec<(OpCode, bool, Vec<u8>)>, ProtocolError>;
        let f = |op, fin, p: &[u8]| (op, fin, p.to_vec());
        let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
            (
                "text",
                masked(true, 1, b"hi"),
                Ok(vec![f(Text, true, b"hi")]),
            ),
            (
                "binary",
                masked(true, 2, &[0, 255]),
                Ok(vec![f(Binary, true, &[0, 255])]),
            ),
            (
                "empty text",
                masked(true, 1, b""),
                Ok(vec![f(Text, true, b"")]),
            ),
            ("ping", masked(true, 9, b"p"), Ok(vec![f(Ping, true, b"p")])),
            ("pong", masked(true, 10, b""), Ok(vec![f(Pong, true, b"")])),
            (
                "close",
                masked(true, 8, b"\x03\xe8"),
                Ok(vec![f(Close, true, b"\x03\xe8")]),
            ),
            (
                "16-bit length",
                masked(true, 2, &[7; 300]),
                Ok(vec![f(Binary, true, &[7; 300])]),
            ),
            (
                "fragmented text with ping between",
                cat(&[
                    masked(false, 1, b"he"),
                    masked(true, 9, b""),
                    masked(true, 0, b"llo"),
                ]),
                Ok(vec![
                    f(Text, false, b"he"),
                    f(Ping, true, b""),
                    f(Continuation, true, b"llo"),
                ]),
            ),
            (
                "utf-8 split across fragments",
                cat(&[masked(false, 1, &[0xce]), masked(true, 0, &[0xba])]),
                Ok(vec![
                    f(Text, false, &[0xce]),
                    f(Continuation, true, &[0xba]),
                ]),
            ),
            (
                "unmasked",
                vec![0x81, 0x01, b'a'],
                Err(UnmaskedFrameFromClient),
            ),
            (
                "rsv1",
                {
                    let mut v = masked(true, 1, b"a");
                    v[0] |= 0x40;
                    v
                },
                Err(ReservedBitsSet),
            ),
            (
                "rsv3",
                {
                    let mut v = masked(true, 1, b"a");
                    v[0] |= 0x10;
                    v
                },
                Err(ReservedBitsSet),
            ),
            ("opcode 3", masked(true, 3, b""), Err(ReservedOpcode(3))),
            (
                "opcode 0xb",
                masked(true, 0xb, b""),
                Err(ReservedOpcode(0xb)),
            ),
            (
                "fragmented ping",
                masked(false, 9, b""),
                Err(FragmentedControlFrame),
            ),
            (
                "long ping",
                masked(true, 9, &[0; 126]),
                Err(ControlFrameTooLong),
            ),
            (
                "long close",
                masked(true, 8, &[3; 126]),
                Err(ControlFrameTooLong),
            ),
            (
                "64-bit length top bit",
                vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4],
                Err(LengthTopBitSet),
            ),
            (
                "frame over limit",
                masked(true, 2, &[0; 1001]),
                Err(FrameTooLarge),
            ),
            (
                "message over limit",
                cat(&[masked(false, 2, &[0; 1000]), masked(true, 0, &[0; 501])]),
                Err(MessageTooLarge),
            ),
            (
                "continuation first",
                masked(true, 0, b"x"),
                Err(UnexpectedContinuation),
            ),
            (
                "text inside fragmented message",
                cat(&[masked(false, 1, b"a"), masked(true, 1, b"b")]),
                Err(ExpectedContinuation),
            ),
            ("invalid utf-8", masked(true, 1, &[0xff]), Err(InvalidUtf8)),
            (
                "utf-8 cut at message end",
                cat(&[masked(false, 1, b"a"), masked(true, 0, &[0xce])]),
                Err(InvalidUtf8),
            ),
            (
                "binary need not be utf-8",
                masked(true, 2, &[0xff]),
                Ok(vec![f(Binary, true, &[0xff])]),
            ),
            (
                "close of one byte",
                masked(true, 8, &[3]),
                Err(InvalidClosePayload),
            ),
            (
                "close code 1005",
                masked(true, 8, &[3, 0xed]),
                Err(InvalidCloseCode(1005)),
            ),
            (
                "close reason not utf-8",
                masked(true, 8, &[3, 0xe8, 0xff]),
                Err(InvalidCloseReason),
            ),
        ];
        for (name, bytes, expected) in cases {
            assert_eq!(decode_all(&bytes), expected, "{name}");
        }
    }

    #[test]
    fn error_close_codes() {
        assert_eq!(ProtocolError::FrameTooLarge.close_code(), 1009);
        assert_eq!(ProtocolError::MessageTooLarge.close_code(), 1009);
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), 1007);
        assert_eq!(ProtocolError::InvalidCloseReason.close_code(), 1007);
        assert_eq!(ProtocolError::UnmaskedFrameFromClient.close_code(), 1002);
    }

    #[test]
    fn client_role_rules() {
        let mut dec = Decoder::new(Role::Client, LIMITS);
        let mut unmasked = Vec::new();
        encode_frame(&mut unmasked, true, OpCode::Text, b"ok", None);
        let f = dec.decode(&mut unmasked).unwrap().unwrap();
        assert_eq!(&unmasked[f.payload], b"ok");
        let mut m = masked(true, 1, b"x");
        assert_eq!(
            Decoder::new(Role::Client, LIMITS).decode(&mut m),
            Err(ProtocolError::MaskedFrameFromServer)
        );
    }

    #[test]
    fn byte_at_a_time_gives_the_same_frames() {
        let wire = cat(&[
            masked(false, 1, "κό".as_bytes()),
            masked(true, 9, b"ping"),
            masked(true, 0, "σμε".as_bytes()),
            masked(true, 2, &[9; 200]),
        ]);
        let whole = decode_all(&wire).unwrap();
        let mut dec = Decoder::new(Role::Server, LIMITS);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for &b in &wire {
            buf.push(b);
            if let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push((f.opcode, f.fin, buf[f.payload.clone()].to_vec()));
                buf.drain(..f.consumed);
            }
        }
        assert_eq!(got, whole);
        assert!(buf.is_empty());
    }

    #[test]
    fn invalid_utf8_fails_before_the_frame_is_complete() {
        let wire = masked(true, 1, &[b'a', 0xff, b'b', b'c']);
        let mut dec = Decoder::new(Role::Server, LIMITS);
        // Header (6 bytes) and the first payload byte: valid so far.
        let mut buf = wire[..7].to_vec();
        assert_eq!(dec.decode(&mut buf), Ok(None));
        buf.push(wire[7]);
        assert_eq!(dec.decode(&mut buf), Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let mut dec = Decoder::new(Role::Server, LIMITS);
        // 127 => 64-bit length of 1 GiB, nothing else sent.
        let mut buf = vec![0x82, 0xff, 0, 0, 0, 0, 0x40, 0, 0, 0];
        assert_eq!(dec.decode(&mut buf), Err(ProtocolError::FrameTooLarge));
    }

    #[test]
    fn encode_lengths() {
        for (len, header) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let mut out = Vec::new();
            encode_header(&mut out, true, OpCode::Binary, len, None);
            assert_eq!(out.len(), header, "len {len}");
            let mut out = Vec::new();
            encode_header(&mut out, true, OpCode::Binary, len, Some(KEY));
            assert_eq!(out.len(), header + 4, "masked len {len}");
        }
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let mut out = Vec::new();
        let reason = "é".repeat(100);
        encode_close(&mut out, Some(1000), &reason, None);
        assert_eq!(out[1] as usize, out.len() - 2);
        assert!(out.len() - 2 <= 125);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }
}
