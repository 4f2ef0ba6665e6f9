//! Micro benchmarks of the RFC 6455 codec: masking, frame decode, frame encode.
//!
//! Throughput is in bytes on the wire (header included for frames), so the
//! numbers compare across sizes; criterion prints time per iteration too,
//! which for one frame is the per-frame cost.
//!
//! Run: `cargo bench -p corecast-benches` (add `-- --warm-up-time 1
//! --measurement-time 3` for a quick look). Record the CPU, kernel and
//! rustc with any numbers you quote.

use std::hint::black_box;

use corecast_ws::{apply_mask, encode_frame, Decoder, Limits, OpCode, Role};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Every key byte is below 0x80, so masking ASCII yields ASCII: a masked
/// text payload stays valid UTF-8 whichever way it is flipped (see `decode`).
const KEY: [u8; 4] = [0x37, 0x7a, 0x21, 0x3d];

/// The gateway's default limits: 16 MiB frames and messages.
const LIMITS: Limits = Limits {
    max_frame_bytes: 16 << 20,
    max_message_bytes: 16 << 20,
};

fn mask(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_mask");
    for size in [64usize, 1024, 64 * 1024] {
        let mut buf: Vec<u8> = (0..size).map(|i| i as u8).collect();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| apply_mask(black_box(&mut buf), black_box(KEY), 0))
        });
    }
    group.finish();
}

/// A masked client frame, as the server receives it.
fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, true, opcode, payload, Some(KEY));
    out
}

/// Decodes one whole frame in place, the gateway's hot path for small echoes.
///
/// Decoding unmasks the payload in place, and unmasking twice restores it:
/// each iteration decodes the same buffer, alternately finding the masked and
/// the clear payload, both of equal cost (and, for text, both ASCII because of
/// `KEY`). No copy per iteration, so only the decoder is timed.
fn decode(c: &mut Criterion) {
    let text: Vec<u8> = (0..64).map(|i| b'a' + (i % 26) as u8).collect();
    let binary: Vec<u8> = (0..16 * 1024).map(|i| (i * 7) as u8).collect();
    let cases = [
        ("text_64_masked", OpCode::Text, &text[..]),
        ("binary_16KiB_masked", OpCode::Binary, &binary[..]),
    ];
    let mut group = c.benchmark_group("decode");
    for (name, opcode, payload) in cases {
        let mut wire = client_frame(opcode, payload);
        let mut decoder = Decoder::new(Role::Server, LIMITS);
        // The premise of the loop below: both polarities decode whole.
        for round in 0..2 {
            let frame = decoder
                .decode(&mut wire)
                .expect("valid frame")
                .expect("whole frame");
            assert_eq!(frame.consumed, wire.len(), "{name}");
            assert_eq!(frame.opcode, opcode, "{name}");
            if round == 0 {
                assert_eq!(&wire[frame.payload], payload, "{name}");
            }
        }
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let frame = decoder.decode(black_box(&mut wire));
                black_box(frame)
            })
        });
    }
    group.finish();
}

/// Encodes one 64-byte frame into a reused buffer: unmasked as the server
/// sends it, masked as a client (the load generator) sends it.
fn encode(c: &mut Criterion) {
    let payload = [0x5au8; 64];
    let mut group = c.benchmark_group("encode_frame");
    for (name, mask) in [("binary_64", None), ("binary_64_masked", Some(KEY))] {
        let mut out = Vec::with_capacity(1024);
        encode_frame(&mut out, true, OpCode::Binary, &payload, mask);
        group.throughput(Throughput::Bytes(out.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_frame(
                    &mut out,
                    true,
                    OpCode::Binary,
                    black_box(&payload),
                    black_box(mask),
                );
                black_box(&out);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, mask, decode, encode);
criterion_main!(benches);
