//! Fuzz target: incremental UTF-8 validation against `std::str::from_utf8`.
//!
//! Input layout (make-seeds.py writes its seeds in it):
//! - byte 0: `n = byte % 8`, then `n` bytes of piece sizes, used in turn
//!   (0 = an empty piece, as an empty continuation frame feeds one).
//! - the rest: the text message's bytes.
//!
//! Checked: fed in those pieces and finished, the validator agrees with
//! `from_utf8` on the whole; after each piece it reports an error exactly
//! when the bytes so far can no longer become valid (fail fast, RFC 6455
//! §8.1, Autobahn 6.4.x); after a successful `finish` it starts clean.
#![no_main]

use corecast_ws::Utf8Validator;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n % 8) as usize;
    if rest.len() < n {
        return;
    }
    let (sizes, text) = rest.split_at(n);
    let expected = std::str::from_utf8(text).is_ok();

    let mut v = Utf8Validator::default();
    assert_eq!(
        validate(&mut v, sizes, text),
        expected,
        "{text:x?} in pieces {sizes:?}"
    );

    // Used again for the next message, with the pieces in reverse order.
    if expected {
        let reversed: Vec<u8> = sizes.iter().rev().copied().collect();
        assert!(
            validate(&mut v, &reversed, text),
            "validator not clean after finish"
        );
    }
});

/// Feeds `text` in pieces of `sizes` (cycled; all of it at once if none are
/// non-zero), checking each step; returns whether the message was valid.
fn validate(v: &mut Utf8Validator, sizes: &[u8], text: &[u8]) -> bool {
    let sizes: Vec<usize> = if sizes.iter().any(|&s| s != 0) {
        sizes.iter().map(|&s| s as usize).collect()
    } else {
        vec![text.len()]
    };
    let mut at = 0;
    let mut step = 0;
    // Every size is used at least once, so empty pieces are fed too.
    while at < text.len() || step < sizes.len() {
        let end = (at + sizes[step % sizes.len()]).min(text.len());
        step += 1;
        let fed = v.feed(&text[at..end]);
        at = end;
        let can_still_be_valid = match std::str::from_utf8(&text[..at]) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        };
        assert_eq!(
            fed.is_ok(),
            can_still_be_valid,
            "after {at} bytes of {text:x?}: {fed:?}"
        );
        if fed.is_err() {
            return false;
        }
    }
    v.finish().is_ok()
}
