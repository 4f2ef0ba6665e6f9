//! Incremental UTF-8 validation across frame pieces and fragments.
//!
//! A text message may arrive split at any byte: across TCP reads inside one
//! frame, and across continuation frames. Each piece is checked as soon as it
//! arrives so an invalid message fails fast (RFC 6455 §8.1), without waiting
//! for the rest. Only the up-to-3 bytes of a code point cut by a split are
//! carried between pieces.

/// Validation state for one text message.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Validator {
    /// INVARIANT: `carry[..carry_len]` is a proper prefix of a valid
    /// multi-byte sequence (so `carry_len` is 0..=3).
    carry: [u8; 4],
    carry_len: u8,
}

/// The text seen so far can never become valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Length of the sequence a lead byte starts; 0 for a byte that cannot lead.
fn sequence_width(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

impl Utf8Validator {
    /// Checks the next piece of the message.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidUtf8> {
        if self.carry_len > 0 {
            let have = self.carry_len as usize;
            let width = sequence_width(self.carry[0]);
            debug_assert!(width > have, "carry holds a proper prefix");
            let take = (width - have).min(bytes.len());
            let mut seq = self.carry;
            seq[have..have + take].copy_from_slice(&bytes[..take]);
            match simdutf8::compat::from_utf8(&seq[..have + take]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() => {
                    self.carry = seq;
                    self.carry_len = (have + take) as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
            bytes = &bytes[take..];
        }
        match simdutf8::compat::from_utf8(bytes) {
            Ok(_) => Ok(()),
            // `error_len() == None` means the input ended inside a sequence
            // that is valid so far: keep it for the next piece.
            Err(e) if e.error_len().is_none() => {
                let tail = &bytes[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// The message ended: valid only if no code point was left unfinished.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let complete = self.carry_len == 0;
        self.carry_len = 0;
        if complete {
            Ok(())
        } else {
            Err(InvalidUtf8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_split_everywhere(bytes: &[u8]) -> bool {
        let expected = std::str::from_utf8(bytes).is_ok();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let mut v = Utf8Validator::default();
                let ok = v.feed(&bytes[..a]).is_ok()
                    && v.feed(&bytes[a..b]).is_ok()
                    && v.feed(&bytes[b..]).is_ok()
                    && v.finish().is_ok();
                assert_eq!(ok, expected, "{bytes:x?} split at {a},{b}");
            }
        }
        expected
    }

    #[test]
    fn table() {
        let cases: &[(&str, &[u8], bool)] = &[
            ("empty", b"", true),
            ("ascii", b"hello", true),
            ("two byte", "héllo".as_bytes(), true),
            ("three byte", "κόσμε".as_bytes(), true),
            ("four byte", "𝄞 clef".as_bytes(), true),
            ("max code point", &[0xf4, 0x8f, 0xbf, 0xbf], true),
            ("above max", &[0xf4, 0x90, 0x80, 0x80], false),
            ("surrogate", &[0xed, 0xa0, 0x80], false),
            ("overlong", &[0xc0, 0xaf], false),
            ("lone continuation", &[0x80], false),
            ("truncated at end", &[0x61, 0xe2, 0x82], false),
            ("bad lead", &[0xff], false),
        ];
        for (name, bytes, valid) in cases {
            assert_eq!(check_split_everywhere(bytes), *valid, "{name}");
        }
    }

    #[test]
    fn fails_fast_before_the_message_ends() {
        // Autobahn 6.4.2: a valid prefix, then a byte that can never follow.
        let mut v = Utf8Validator::default();
        assert!(v.feed("κόσμε".as_bytes()).is_ok());
        assert!(v.feed(&[0xf4]).is_ok());
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
    }
}
