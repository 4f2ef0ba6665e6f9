//! RFC 6455 §5.3 payload masking, a machine word at a time.
//!
//! Masking is an XOR with a 4-byte key repeated over the payload. The key is
//! widened to 16 bytes so the main loop XORs one `u128` per step; the compiler
//! lowers that to vector instructions. No `unsafe`: `from_ne_bytes` on
//! `chunks_exact_mut` compiles to plain unaligned loads and stores.

/// XORs `buf` with `key`, as if `buf` started `offset` bytes into the payload.
///
/// `offset` lets a decoder unmask a frame's payload piece by piece as it
/// arrives (the key position depends on the byte's index in the payload).
/// Applying the same mask twice restores the input.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let k = u32::from_ne_bytes(key);
    // Rotate so that byte 0 of `buf` meets key byte `offset % 4`. On a
    // little-endian machine byte i of the u32 is its bits 8i..8i+8.
    let shift = (offset & 3) as u32 * 8;
    let k = if cfg!(target_endian = "little") {
        k.rotate_right(shift)
    } else {
        k.rotate_left(shift)
    };
    let kb = k.to_ne_bytes();
    let wide = u128::from_ne_bytes([
        kb[0], kb[1], kb[2], kb[3], kb[0], kb[1], kb[2], kb[3], kb[0], kb[1], kb[2], kb[3], kb[0],
        kb[1], kb[2], kb[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(16);
    for chunk in &mut chunks {
        let mut word = [0u8; 16];
        word.copy_from_slice(chunk);
        let v = u128::from_ne_bytes(word) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    // The remainder starts at a multiple of 16, so key byte i % 4 lines up.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= kb[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_bytewise(buf: &mut [u8], key: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[(offset + i) % 4];
        }
    }

    #[test]
    fn word_mask_matches_bytewise_at_every_length_and_offset() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..80 {
            for offset in 0..8 {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut a = data.clone();
                let mut b = data.clone();
                apply_mask(&mut a, key, offset);
                mask_bytewise(&mut b, key, offset);
                assert_eq!(a, b, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d.
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }

    #[test]
    fn piecewise_equals_whole() {
        let key = [1, 2, 3, 4];
        let data: Vec<u8> = (0..100u8).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        let mut pieces = data.clone();
        let (a, rest) = pieces.split_at_mut(13);
        let (b, c) = rest.split_at_mut(30);
        apply_mask(a, key, 0);
        apply_mask(b, key, 13);
        apply_mask(c, key, 43);
        assert_eq!(whole, pieces);
    }
}
