//! The storage worker's series in `/metrics`, rendered from its own counters.

use std::fmt::Write as _;

use super::Storage;
use crate::metrics::{write_series, AtomicSeries};

impl Storage {
    /// Renders the worker's counters and each shard's queue for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        let name = "corecast_storage_queue";
        let _ = writeln!(
            out,
            "# HELP {name} Operations queued for the storage worker.\n# TYPE {name} gauge"
        );
        for i in 0..self.pending.len() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", self.queued(i));
        }
        let m = &self.metrics;
        let series: [AtomicSeries; 12] = [
            (
                "corecast_storage_batches_total",
                "counter",
                "Write batches handled by the storage worker.",
                &m.batches,
            ),
            (
                "corecast_storage_persisted_total",
                "counter",
                "Messages written to the store.",
                &m.persisted,
            ),
            (
                "corecast_storage_spilled_total",
                "counter",
                "Messages written to the spill file while the store was unreachable.",
                &m.spilled,
            ),
            (
                "corecast_storage_replayed_total",
                "counter",
                "Spilled messages replayed into the store.",
                &m.replayed,
            ),
            (
                "corecast_storage_lost_total",
                "counter",
                "Messages neither stored nor spilled (acked stored:false).",
                &m.lost,
            ),
            (
                "corecast_storage_spill_bytes",
                "gauge",
                "Bytes in the spill file waiting for replay.",
                &m.spill_bytes,
            ),
            (
                "corecast_storage_breaker",
                "gauge",
                "Circuit breaker: 0 closed, 1 open (spilling), 2 replaying.",
                &m.breaker,
            ),
            (
                "corecast_storage_breaker_opened_total",
                "counter",
                "Times the breaker opened.",
                &m.breaker_opened,
            ),
            (
                "corecast_storage_presence_dropped_total",
                "counter",
                "Presence updates dropped (store unreachable, or queue full); heartbeats repair them.",
                &m.presence_dropped,
            ),
            (
                "corecast_storage_reads_total",
                "counter",
                "History, resume, load and presence reads answered by the store.",
                &m.reads,
            ),
            (
                "corecast_storage_reads_refused_total",
                "counter",
                "Reads answered storage_unavailable (breaker open).",
                &m.reads_refused,
            ),
            (
                "corecast_storage_conflicts_total",
                "counter",
                "Messages refused (room_moving) because another home had stored their seq.",
                &m.conflicts,
            ),
        ];
        write_series(out, &series);
    }
}
