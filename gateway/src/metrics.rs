//! Per-shard counters and their Prometheus text rendering.
//!
//! # Invariants
//! - Each [`ShardMetrics`] is written only by its own shard's thread, so a
//!   counter update is a relaxed load and store: no locked instruction, no
//!   contention. Any thread may read them (the `/metrics` request lands on
//!   whichever shard accepted it).
//! - One [`ShardMetrics`] per cache line pair, so shards never false-share.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use crate::{auth::AuthError, tls::Failure as TlsFailure, ws::handshake::Refusal};

/// Authentication failures counted by kind.
pub const AUTH_ERRORS: [AuthError; 10] = [
    AuthError::Missing,
    AuthError::Malformed,
    AuthError::UnsupportedAlgorithm,
    AuthError::UnknownKey,
    AuthError::UnsupportedCriticalHeader,
    AuthError::BadSignature,
    AuthError::Expired,
    AuthError::NotYetValid,
    AuthError::MissingSubject,
    AuthError::InvalidSubject,
];

fn auth_label(e: AuthError) -> &'static str {
    match e {
        AuthError::Missing => "missing",
        AuthError::Malformed => "malformed",
        AuthError::UnsupportedAlgorithm => "algorithm",
        AuthError::UnknownKey => "unknown_key",
        AuthError::UnsupportedCriticalHeader => "crit_header",
        AuthError::BadSignature => "bad_signature",
        AuthError::Expired => "expired",
        AuthError::NotYetValid => "not_yet_valid",
        AuthError::MissingSubject => "missing_sub",
        AuthError::InvalidSubject => "invalid_sub",
    }
}

/// A counter or gauge with a single writer (its shard).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning shard calls this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Subtracts `n` (gauges only).
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
}

/// Close codes counted one by one; anything else is counted as "other".
pub const CLOSE_CODES: [u16; 18] = [
    1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 4001, 4002,
    4003, 0,
];

/// Who sent the first close frame (or dropped the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    Client = 0,
    Server = 1,
}

fn close_index(code: u16) -> usize {
    CLOSE_CODES
        .iter()
        .position(|&c| c == code)
        .unwrap_or(CLOSE_CODES.len() - 1)
}

/// Everything one shard counts.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// Open TCP connections (gauge), WebSocket or not.
    pub connections_open: Counter,
    /// Open WebSocket connections (gauge).
    pub websockets_open: Counter,
    pub connections_accepted: Counter,
    pub accept_errors: Counter,
    pub upgrades: Counter,
    pub http_requests: Counter,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub pings_sent: Counter,
    pub slow_consumer_closes: Counter,
    /// I/O buffers held by connections (gauge, refreshed every sweeper tick).
    pub io_buffers_lent: Counter,
    /// Rooms homed on this shard (gauge).
    pub rooms: Counter,
    /// Room memberships of this shard's connections (gauge).
    pub room_members: Counter,
    /// Bytes of room frames held for local members that have not sent
    /// them (gauge, refreshed every sweeper tick).
    pub room_feed_bytes: Counter,
    /// Flush rounds run, and the times a round read sockets with input
    /// between two of its slices (see `flush`).
    pub flush_rounds: Counter,
    pub flush_reads_between_slices: Counter,
    /// Publishes sequenced by this shard as a room's home.
    pub publishes: Counter,
    /// Retried publishes answered with their original ack.
    pub duplicate_publishes: Counter,
    /// Room frames for local members (a frame times the room's members on
    /// the shard).
    pub deliveries: Counter,
    pub direct_messages: Counter,
    /// Connections closed (4004) because their user was at
    /// `--max-connections-per-user` on this node (counted at the user's home).
    pub user_cap_refusals: Counter,
    /// Connections closed (4005): their address was at
    /// `--max-connections-per-ip` on this node (counted at its home).
    pub address_cap_refusals: Counter,
    /// Messages sent to another shard (requests and deliveries).
    pub cross_shard_messages: Counter,
    /// Sends that found a ring full and queued locally instead.
    pub ring_full: Counter,
    /// Messages waiting for ring space (gauge).
    pub outbox_backlog: Counter,
    pub rate_limited: Counter,
    /// Requests refused with an error frame.
    pub chat_errors: Counter,
    /// Publishes refused because the store could not take them.
    pub storage_refusals: Counter,
    /// Rooms started in a new epoch because the store could not say where
    /// their sequence stood.
    pub provisional_epochs: Counter,
    /// TLS handshakes completed, and TLS connections refused by reason.
    pub tls_handshakes: Counter,
    pub tls_failures: [Counter; TlsFailure::ALL.len()],
    pub auth_failures: [Counter; AUTH_ERRORS.len()],
    pub handshake_failures: [Counter; Refusal::ALL.len()],
    pub closes: [[Counter; CLOSE_CODES.len()]; 2],
}

impl ShardMetrics {
    pub fn handshake_failed(&self, r: Refusal) {
        self.handshake_failures[r as usize].inc();
    }

    pub fn tls_failed(&self, f: TlsFailure) {
        if let Some(i) = TlsFailure::ALL.iter().position(|&x| x == f) {
            self.tls_failures[i].inc();
        }
    }

    pub fn auth_failed(&self, e: AuthError) {
        if let Some(i) = AUTH_ERRORS.iter().position(|&x| x == e) {
            self.auth_failures[i].inc();
        }
    }

    /// Counts a closed WebSocket by close code and initiator.
    pub fn closed(&self, code: u16, by: Initiator) {
        self.closes[by as usize][close_index(code)].inc();
    }
}

/// Renders all shards in the Prometheus text exposition format.
pub fn render(shards: &[ShardMetrics], draining: bool) -> String {
    let mut out = String::with_capacity(8192);
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&ShardMetrics) -> &Counter,
    );
    let simple: [Series; 33] = [
        (
            "corecast_io_buffers_lent",
            "gauge",
            "Read and write buffers held by connections (an idle connection holds none; refreshed every sweeper tick).",
            |m| &m.io_buffers_lent,
        ),
        (
            "corecast_connections",
            "gauge",
            "Open TCP connections.",
            |m| &m.connections_open,
        ),
        (
            "corecast_websockets",
            "gauge",
            "Open WebSocket connections.",
            |m| &m.websockets_open,
        ),
        (
            "corecast_connections_accepted_total",
            "counter",
            "TCP connections accepted.",
            |m| &m.connections_accepted,
        ),
        (
            "corecast_accept_errors_total",
            "counter",
            "accept() failures (e.g. out of file descriptors).",
            |m| &m.accept_errors,
        ),
        (
            "corecast_upgrades_total",
            "counter",
            "Successful WebSocket upgrades.",
            |m| &m.upgrades,
        ),
        (
            "corecast_http_requests_total",
            "counter",
            "Plain HTTP requests served (healthz, metrics).",
            |m| &m.http_requests,
        ),
        (
            "corecast_frames_in_total",
            "counter",
            "WebSocket frames received.",
            |m| &m.frames_in,
        ),
        (
            "corecast_frames_out_total",
            "counter",
            "WebSocket frames sent.",
            |m| &m.frames_out,
        ),
        (
            "corecast_bytes_in_total",
            "counter",
            "Bytes read from sockets.",
            |m| &m.bytes_in,
        ),
        (
            "corecast_bytes_out_total",
            "counter",
            "Bytes written to sockets.",
            |m| &m.bytes_out,
        ),
        (
            "corecast_messages_in_total",
            "counter",
            "Text and binary messages received.",
            |m| &m.messages_in,
        ),
        (
            "corecast_messages_out_total",
            "counter",
            "Text and binary messages sent.",
            |m| &m.messages_out,
        ),
        (
            "corecast_pings_sent_total",
            "counter",
            "Keepalive pings sent.",
            |m| &m.pings_sent,
        ),
        (
            "corecast_slow_consumer_closes_total",
            "counter",
            "Connections closed for staying over their outbound budget.",
            |m| &m.slow_consumer_closes,
        ),
        (
            "corecast_rooms",
            "gauge",
            "Rooms homed on the shard.",
            |m| &m.rooms,
        ),
        (
            "corecast_room_members",
            "gauge",
            "Room memberships of the shard's connections.",
            |m| &m.room_members,
        ),
        (
            "corecast_room_feed_bytes",
            "gauge",
            "Bytes of room frames held once per shard for the local members that have not sent them yet (refreshed every sweeper tick).",
            |m| &m.room_feed_bytes,
        ),
        (
            "corecast_flush_rounds_total",
            "counter",
            "Flush rounds: passes that wake the room members with new frames, 64 at a time.",
            |m| &m.flush_rounds,
        ),
        (
            "corecast_flush_reads_between_slices_total",
            "counter",
            "Times a flush round read the sockets with input (publishers) between two of its slices.",
            |m| &m.flush_reads_between_slices,
        ),
        (
            "corecast_publishes_total",
            "counter",
            "Publishes sequenced by the shard as the room's home.",
            |m| &m.publishes,
        ),
        (
            "corecast_duplicate_publishes_total",
            "counter",
            "Retried publishes answered with the original ack.",
            |m| &m.duplicate_publishes,
        ),
        (
            "corecast_deliveries_total",
            "counter",
            "Room messages and events written to local members.",
            |m| &m.deliveries,
        ),
        (
            "corecast_direct_messages_total",
            "counter",
            "Direct messages routed by the shard as the user's home.",
            |m| &m.direct_messages,
        ),
        (
            "corecast_user_cap_refusals_total",
            "counter",
            "Connections closed with 4004: their user already had --max-connections-per-user on this node (counted by the user's home shard).",
            |m| &m.user_cap_refusals,
        ),
        (
            "corecast_address_cap_refusals_total",
            "counter",
            "Connections closed with 4005: their address already had --max-connections-per-ip on this node (counted by the address's home shard).",
            |m| &m.address_cap_refusals,
        ),
        (
            "corecast_cross_shard_messages_total",
            "counter",
            "Messages sent to other shards over the rings.",
            |m| &m.cross_shard_messages,
        ),
        (
            "corecast_ring_full_total",
            "counter",
            "Sends that found a ring full and queued locally.",
            |m| &m.ring_full,
        ),
        (
            "corecast_outbox_backlog",
            "gauge",
            "Messages waiting for ring space to other shards.",
            |m| &m.outbox_backlog,
        ),
        (
            "corecast_rate_limited_total",
            "counter",
            "Client frames dropped by the rate limit.",
            |m| &m.rate_limited,
        ),
        (
            "corecast_chat_errors_total",
            "counter",
            "Chat requests refused with an error frame.",
            |m| &m.chat_errors,
        ),
        (
            "corecast_storage_refusals_total",
            "counter",
            "Publishes refused (storage_busy, storage_unavailable) and not sequenced.",
            |m| &m.storage_refusals,
        ),
        (
            "corecast_provisional_epochs_total",
            "counter",
            "Rooms started in a new epoch, far above any stored seq, because the store was unreachable.",
            |m| &m.provisional_epochs,
        ),
    ];
    for (name, kind, help, get) in simple {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(m).get());
        }
    }
    let name = "corecast_auth_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Refused access tokens, by reason.\n# TYPE {name} counter"
    );
    for (i, m) in shards.iter().enumerate() {
        for (j, e) in AUTH_ERRORS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",reason=\"{}\"}} {}",
                auth_label(*e),
                m.auth_failures[j].get()
            );
        }
    }
    let name = "corecast_tls_handshakes_total";
    let _ = writeln!(
        out,
        "# HELP {name} TLS handshakes completed.\n# TYPE {name} counter"
    );
    for (i, m) in shards.iter().enumerate() {
        let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", m.tls_handshakes.get());
    }
    let name = "corecast_tls_handshake_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} TLS connections refused before or during the handshake (plain_http, malformed, version, incompatible, sni, alert, timeout, closed, other).\n# TYPE {name} counter"
    );
    for (i, m) in shards.iter().enumerate() {
        for (j, f) in TlsFailure::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",reason=\"{}\"}} {}",
                f.label(),
                m.tls_failures[j].get()
            );
        }
    }
    let name = "corecast_handshake_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Refused HTTP requests and upgrades, by reason.\n# TYPE {name} counter"
    );
    for (i, m) in shards.iter().enumerate() {
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",reason=\"{}\",status=\"{}\"}} {}",
                r.label(),
                r.status(),
                m.handshake_failures[r as usize].get()
            );
        }
    }
    let name = "corecast_ws_closes_total";
    let _ = writeln!(out, "# HELP {name} Closed WebSockets by close code (1005: close frame without a code, 1006: no close frame) and by who closed first.\n# TYPE {name} counter");
    for (i, m) in shards.iter().enumerate() {
        for (by, label) in [(Initiator::Client, "client"), (Initiator::Server, "server")] {
            for (j, code) in CLOSE_CODES.iter().enumerate() {
                let v = m.closes[by as usize][j].get();
                if v == 0 {
                    continue;
                }
                let code = if *code == 0 {
                    "other".to_string()
                } else {
                    code.to_string()
                };
                let _ = writeln!(
                    out,
                    "{name}{{shard=\"{i}\",code=\"{code}\",initiator=\"{label}\"}} {v}"
                );
            }
        }
    }
    let _ = writeln!(out, "# HELP corecast_draining 1 while the gateway is shutting down.\n# TYPE corecast_draining gauge\ncorecast_draining {}", draining as u8);
    if let Some(rss) = resident_bytes() {
        let _ = writeln!(out, "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}");
    }
    out
}

/// One unlabelled series a thread counts in an atomic: name, type, help.
pub type AtomicSeries<'a> = (&'a str, &'a str, &'a str, &'a AtomicU64);

/// Writes unlabelled series in the Prometheus text format: what the
/// storage worker and the mesh render their own counters with.
pub fn write_series(out: &mut String, series: &[AtomicSeries<'_>]) {
    for (name, kind, help, v) in series {
        let value = v.load(Relaxed);
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

/// Resident set size from /proc/self/statm.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_shard_series() {
        let shards: Vec<ShardMetrics> = (0..2).map(|_| ShardMetrics::default()).collect();
        shards[1].frames_in.add(5);
        shards[0].handshake_failed(Refusal::UnsupportedWsVersion);
        shards[1].closed(1009, Initiator::Server);
        shards[1].closed(4321, Initiator::Client);
        let text = render(&shards, false);
        assert!(
            text.contains("corecast_frames_in_total{shard=\"1\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("reason=\"ws_version\",status=\"426\"} 1\n"));
        assert!(text.contains("{shard=\"1\",code=\"1009\",initiator=\"server\"} 1\n"));
        assert!(text.contains("{shard=\"1\",code=\"other\",initiator=\"client\"} 1\n"));
        assert!(text.contains("corecast_draining 0\n"));
    }

    #[test]
    fn gauge_goes_down() {
        let c = Counter::default();
        c.add(3);
        c.sub(1);
        assert_eq!(c.get(), 2);
    }
}
