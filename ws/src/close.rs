//! Close frame payloads (RFC 6455 §5.5.1, §7.4).

use super::ProtocolError;

/// Close codes this gateway sends, named after what happened.
pub mod code {
    /// The purpose of the connection was fulfilled.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down, or the connection was idle too long.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke a framing rule.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Not sent on the wire: the connection ended without a close frame.
    pub const ABNORMAL: u16 = 1006;
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The peer broke a policy (e.g. it stopped reading: slow consumer).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame or message was over the configured size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server met an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// May `code` appear in a close frame on the wire?
///
/// 1000-1003 and 1007-1014 are defined by the RFC and IANA's registry;
/// 3000-4999 belong to libraries and applications. 1004-1006 and 1015 are
/// reserved and must never be sent; everything else is unassigned.
pub fn is_valid_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A parsed close payload: no payload at all, or a code with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    pub code: u16,
    pub reason: &'a str,
}

/// Validates a close frame's payload; `Ok(None)` for an empty payload.
pub fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame<'_>>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason = simdutf8::basic::from_utf8(reason)
                .map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        type Expect = Result<Option<(u16, &'static str)>, ProtocolError>;
        let cases: &[(&str, &[u8], Expect)] = &[
            ("empty", b"", Ok(None)),
            ("one byte", &[0x03], Err(ProtocolError::InvalidClosePayload)),
            ("normal", &[0x03, 0xe8], Ok(Some((1000, "")))),
            ("with reason", b"\x03\xe9bye", Ok(Some((1001, "bye")))),
            ("app code", &[0x0f, 0xa0], Ok(Some((4000, "")))),
            ("1012 registered", &[0x03, 0xf4], Ok(Some((1012, "")))),
            ("zero", &[0, 0], Err(ProtocolError::InvalidCloseCode(0))),
            (
                "999",
                &[0x03, 0xe7],
                Err(ProtocolError::InvalidCloseCode(999)),
            ),
            (
                "1004 reserved",
                &[0x03, 0xec],
                Err(ProtocolError::InvalidCloseCode(1004)),
            ),
            (
                "1005 never on wire",
                &[0x03, 0xed],
                Err(ProtocolError::InvalidCloseCode(1005)),
            ),
            (
                "1006 never on wire",
                &[0x03, 0xee],
                Err(ProtocolError::InvalidCloseCode(1006)),
            ),
            (
                "1015 never on wire",
                &[0x03, 0xf7],
                Err(ProtocolError::InvalidCloseCode(1015)),
            ),
            (
                "1016 unassigned",
                &[0x03, 0xf8],
                Err(ProtocolError::InvalidCloseCode(1016)),
            ),
            (
                "2999 unassigned",
                &[0x0b, 0xb7],
                Err(ProtocolError::InvalidCloseCode(2999)),
            ),
            (
                "5000 out of range",
                &[0x13, 0x88],
                Err(ProtocolError::InvalidCloseCode(5000)),
            ),
            (
                "bad reason",
                b"\x03\xe8\xff",
                Err(ProtocolError::InvalidCloseReason),
            ),
        ];
        for (name, payload, expected) in cases {
            let got = parse_close(payload).map(|o| o.map(|c| (c.code, c.reason)));
            assert_eq!(&got, expected, "{name}");
        }
    }
}
