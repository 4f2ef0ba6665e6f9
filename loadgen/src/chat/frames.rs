//! Frames: what a chat connection sends and parses.

use std::io::Write as _;

use corecast_ws::{encode_frame, OpCode};
use serde::Deserialize;

use crate::scan::Body;

/// The fields of a server frame this client reads; the rest is skipped.
/// Strings are borrowed from the frame: the gateway escapes nothing in room
/// names, ids, types or codes; an escaped one fails the parse and counts as
/// a bad frame.
#[derive(Debug, Deserialize)]
pub(super) struct Incoming<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'a str,
    #[serde(borrow)]
    pub(super) room: Option<&'a str>,
    pub(super) seq: Option<u64>,
    #[serde(borrow)]
    pub(super) id: Option<&'a str>,
    pub(super) body: Option<Body>,
    #[serde(borrow)]
    pub(super) code: Option<&'a str>,
    /// Error texts may be escaped: owned, and only error frames carry one.
    pub(super) message: Option<String>,
    #[serde(default)]
    pub(super) duplicate: bool,
    /// `joined`: the numbering its seq belongs to, kept for a resume.
    #[serde(borrow)]
    pub(super) epoch: Option<&'a str>,
    /// `joined` after a join with a resume point.
    pub(super) recovered: Option<bool>,
    pub(super) missed: Option<u64>,
}

/// Appends one masked `publish` text frame whose `body` is `size` bytes
/// (or its fixed fields, if longer). `scratch` is reused between calls.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    room: &str,
    tag: &str,
    p: u64,
    n: u64,
    t_ns: u64,
    size: usize,
    mask: [u8; 4],
) {
    scratch.clear();
    let _ = write!(
        scratch,
        r#"{{"type":"publish","room":"{room}","id":"{tag}-{n}","body":"#
    );
    let body_at = scratch.len();
    let _ = write!(scratch, r#"{{"t":{t_ns},"p":{p},"n":{n},"pad":""#);
    // The body closes with `"}`.
    let fixed = scratch.len() - body_at + 2;
    scratch.resize(scratch.len() + size.saturating_sub(fixed), b'x');
    scratch.extend_from_slice(b"\"}}");
    encode_frame(out, true, OpCode::Text, scratch, Some(mask));
}

/// The publish number in an ack's or error's `id`, if `id` is `<tag>-<n>`.
pub(super) fn publish_number(id: &str, tag: &str) -> Option<u64> {
    let n = id.strip_prefix(tag)?.strip_prefix('-')?;
    n.parse().ok()
}
