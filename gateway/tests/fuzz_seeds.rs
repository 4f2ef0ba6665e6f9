//! Replays the committed fuzz seeds (fuzz/seeds/) through the decoder, the
//! handshake parser and the UTF-8 validator on every `cargo test`, so the
//! inputs that once found bugs keep guarding against them without a
//! nightly toolchain. The fuzz targets themselves check much more; here the
//! checks are: no panic, and chunked decoding agrees with one-shot decoding.

use std::path::PathBuf;

use corecast_gateway::ws::{handshake, Decoder, Limits, Role, Utf8Validator};

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// Decoded frames (opcode, fin, payload) and the first error, if any.
type Decoded = (Vec<(u8, bool, Vec<u8>)>, Option<String>);

/// Decodes all of `wire`, `chunk` bytes at a time.
fn decode(role: Role, wire: &[u8], chunk: usize) -> Decoded {
    let limits = Limits {
        max_frame_bytes: 1 << 16,
        max_message_bytes: 1 << 17,
    };
    let mut dec = Decoder::new(role, limits);
    let (mut buf, mut frames) = (Vec::new(), Vec::new());
    for piece in wire.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    frames.push((f.opcode as u8, f.fin, buf[f.payload.clone()].to_vec()));
                    buf.drain(..f.consumed);
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(format!("{e:?}"))),
            }
        }
    }
    (frames, None)
}

#[test]
fn frame_decoder_seeds() {
    for (name, bytes) in seeds("frame_decoder") {
        // The first two bytes are the fuzz harness's settings; the decoder
        // must take them as frame bytes too.
        for wire in [&bytes[..], bytes.get(2..).unwrap_or(&[])] {
            for role in [Role::Server, Role::Client] {
                let whole = decode(role, wire, wire.len());
                for chunk in [1, 3, 7] {
                    assert_eq!(
                        decode(role, wire, chunk),
                        whole,
                        "{name} {role:?} chunk {chunk}"
                    );
                }
            }
        }
    }
}

#[test]
fn handshake_seeds() {
    for (name, bytes) in seeds("handshake") {
        let whole = handshake::parse_request(&bytes);
        if let Ok(Some((_, len))) = &whole {
            assert!(*len <= bytes.len(), "{name}");
        }
    }
}

#[test]
fn utf8_seeds() {
    for (name, bytes) in seeds("utf8") {
        let expected = std::str::from_utf8(&bytes).is_ok();
        let mut v = Utf8Validator::default();
        let ok = bytes.chunks(3).all(|c| v.feed(c).is_ok()) && v.finish().is_ok();
        assert_eq!(ok, expected, "{name}");
    }
}
