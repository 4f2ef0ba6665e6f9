//! corecast-ws: the WebSocket protocol (RFC 6455), sans-IO, for both ends.
//! The gateway speaks it as `Server`, loadgen as `Client`, and the fuzz
//! targets and codec benchmarks drive it directly; nothing here touches a
//! socket, a clock or a random number, and nothing here knows of chat.
//!
//! # Layout
//! - [`handshake`]: the opening handshake (§4): request parsing, the
//!   accept key, the 101 and the HTTP refusals.
//! - [`frame`]: the frame [`Decoder`] (every framing and limit rule, payload
//!   unmasked and UTF-8 checked in place) and the frame encoders.
//! - [`session`]: the rules above single frames: message reassembly, the
//!   pong and close replies the protocol obliges (returned as data), the
//!   closing handshake's state. Both binaries keep their connection's
//!   protocol state in a [`Session`].
//! - [`close`]: close codes and close payloads.
//! - `mask`, `utf8`: payload masking and incremental UTF-8 validation.
#![forbid(unsafe_code)]

pub mod close;
pub mod frame;
pub mod handshake;
mod mask;
pub mod session;
mod utf8;

pub use frame::{
    encode_close, encode_frame, encode_header, is_control_frame_start, Decoder, Frame, Limits,
    OpCode, ProtocolError, Role, MAX_HEADER_LEN,
};
pub use mask::apply_mask;
pub use session::{Event, Failure, Reply, Session, State, Step};
pub use utf8::{InvalidUtf8, Utf8Validator};
