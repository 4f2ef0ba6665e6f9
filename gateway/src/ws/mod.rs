//! RFC 6455 WebSocket protocol, sans-IO: handshake, framing, masking,
//! close payloads and UTF-8 checks. Used by the server (role `Server`) and by
//! the load generator (role `Client`); nothing here touches a socket.

pub mod close;
pub mod frame;
pub mod handshake;
mod mask;
mod utf8;

pub use frame::{
    encode_close, encode_frame, encode_header, is_control_frame_start, Decoder, Frame, Limits,
    OpCode, ProtocolError, Role, MAX_HEADER_LEN,
};
pub use mask::apply_mask;
pub use utf8::{InvalidUtf8, Utf8Validator};
