//! Fuzz target: HTTP request parsing and the opening handshake.
//!
//! The input is the bytes a client sent. Checked: no panic; a complete
//! request's length is within the input; bytes after it (the client's first
//! frames, or garbage) change nothing; the same bytes split across reads give
//! the same answer (every prefix either says "need more" or answers as the
//! whole does); an accepted upgrade carries exactly one key that is canonical
//! base64 of 16 bytes and an accept value of 28 base64 characters equal to
//! tungstenite's.
#![no_main]

use corecast_ws::handshake::{parse_request, MAX_HEADERS};
use libfuzzer_sys::fuzz_target;

/// What a client may send behind its request: a masked frame, then garbage.
const TRAILERS: [&[u8]; 2] = [
    b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
    b"\r\n\r\nGET / HTTP/1.1\r\n\x00\xff garbage",
];

/// Inputs up to this size are checked at every prefix; longer ones at a few.
const EVERY_PREFIX_UP_TO: usize = 256;

fuzz_target!(|data: &[u8]| {
    let whole = parse_request(data);
    if let Ok(Some((req, len))) = &whole {
        assert!(
            *len > 0 && *len <= data.len(),
            "length {len} of {}",
            data.len()
        );
        assert!(!req.path.contains('?'), "query left in the path");
        if let Some(Ok(up)) = &req.upgrade {
            check_accept(&data[..*len], &up.accept);
        }
    }

    // Bytes after a complete request or a refusal are not looked at.
    if !matches!(whole, Ok(None)) {
        for t in TRAILERS {
            let mut longer = data.to_vec();
            longer.extend_from_slice(t);
            assert_eq!(
                parse_request(&longer),
                whole,
                "trailing bytes changed the result"
            );
        }
    }

    // The same bytes arriving over several reads.
    let cuts: Vec<usize> = if data.len() <= EVERY_PREFIX_UP_TO {
        (0..data.len()).collect()
    } else {
        let mut c: Vec<usize> = (0..16).map(|k| data.len() * k / 16).collect();
        if let Ok(Some((_, len))) = &whole {
            c.extend([len - 1, *len]);
        }
        c
    };
    for cut in cuts {
        let part = parse_request(&data[..cut]);
        match (&part, &whole) {
            (Ok(None), _) => {}
            (_, Ok(Some((_, len)))) if cut < *len => {
                panic!("prefix of {cut} bytes answered {part:?} before the request ended at {len}")
            }
            _ => assert_eq!(&part, &whole, "prefix of {cut} bytes answered differently"),
        }
    }
});

/// An accepted upgrade: one well-formed key, and the accept value RFC 6455
/// §4.2.2 derives from it, as tungstenite computes it.
fn check_accept(request: &[u8], accept: &str) {
    assert_eq!(accept.len(), 28, "accept value {accept:?}");
    assert!(
        accept[..27].bytes().all(is_base64) && accept.ends_with('='),
        "accept value {accept:?} is not base64 of 20 bytes"
    );
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    assert!(matches!(
        req.parse(request),
        Ok(httparse::Status::Complete(_))
    ));
    let mut keys = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"));
    let key = keys
        .next()
        .expect("upgrade without a key")
        .value
        .trim_ascii();
    assert!(keys.next().is_none(), "upgrade with two keys");
    // 16 bytes are 22 base64 characters and "=="; the last character
    // carries 2 bits of data and 4 that must be zero.
    assert!(
        key.len() == 24
            && key[..22].iter().all(|&c| is_base64(c))
            && b"AQgw".contains(&key[21])
            && &key[22..] == b"==",
        "accepted key {:?}",
        String::from_utf8_lossy(key)
    );
    assert_eq!(accept, tungstenite::handshake::derive_accept_key(key));
}

fn is_base64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'+' || c == b'/'
}
