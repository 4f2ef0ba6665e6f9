//! corecast benchmarks; this library is empty.
//!
//! Layout:
//! - `benches/codec.rs`: criterion micro benchmarks of the RFC 6455 codec
//!   (`corecast_ws`): masking, frame decode, frame encode.
//! - `peers/`: crate `corecast-peers`, servers corecast is measured against
//!   (`tokio-tungstenite-echo`).
//! - `echo-vs-peer.sh`: corecast's `/echo` and each peer side by side under
//!   `loadgen echo`, one core each; results land in `results/`.
