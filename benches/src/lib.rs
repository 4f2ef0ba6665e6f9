//! corecast benchmarks; this library is empty.
//!
//! Layout:
//! - `benches/codec.rs`: criterion micro benchmarks of the RFC 6455 codec
//!   (`corecast_ws`): masking, frame decode, frame encode.
//! - `peers/`: crate `corecast-peers`, servers corecast is measured against
//!   (`tokio-tungstenite-echo`).
//! - `echo-vs-peer.sh`: corecast's `/echo` and each peer side by side under
//!   `loadgen echo`, one core each; results land in `results/`.
//! - `src/bin/storage_throughput.rs` (`storage-throughput`): the storage
//!   worker alone against Redis, by batch size.
//! - `src/bin/api_publish.rs` (`api-publish`) and `api-publish.sh`: server API
//!   publishes per second over keep-alive HTTP into one room of members, with
//!   API and delivery latency and every delivery checked for order.
//! - `namespace-latency.sh`: an ephemeral namespace's publish → delivery
//!   latency next to a stored room's, 3 nodes with Redis, under `loadgen chat`.
