//! The mesh thread's series in `/metrics`, rendered from its own counters.

use std::fmt::Write as _;

use super::Mesh;
use crate::metrics::{write_series, AtomicSeries};

impl Mesh {
    /// Renders the mesh thread's counters and this node's id for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        let m = &self.metrics;
        let series: [AtomicSeries; 16] = [
            (
                "corecast_mesh_sent_total",
                "counter",
                "Messages published to other nodes.",
                &m.sent,
            ),
            (
                "corecast_mesh_received_total",
                "counter",
                "Messages received from other nodes (heartbeats included).",
                &m.received,
            ),
            (
                "corecast_mesh_dropped_queue_total",
                "counter",
                "Messages dropped because the shards' queue to the mesh thread was full.",
                &m.dropped_queue,
            ),
            (
                "corecast_mesh_dropped_hwm_total",
                "counter",
                "Messages the PUB socket refused to queue (at a subscriber's high-water mark PUB drops silently: those show as gaps on the receiver).",
                &m.dropped_hwm,
            ),
            (
                "corecast_mesh_dropped_injected_total",
                "counter",
                "Room messages dropped on purpose (--mesh-drop-every, tests only).",
                &m.dropped_injected,
            ),
            (
                "corecast_mesh_bad_messages_total",
                "counter",
                "Mesh payloads that did not parse (dropped).",
                &m.bad_messages,
            ),
            (
                "corecast_mesh_live_nodes",
                "gauge",
                "Nodes this node counts as live, itself included.",
                &m.live_nodes,
            ),
            (
                "corecast_mesh_membership_changes_total",
                "counter",
                "Times the set of live nodes changed.",
                &m.membership_changes,
            ),
            (
                "corecast_mesh_heartbeats_late_total",
                "counter",
                "Heartbeat ticks of this node's mesh thread that came half an interval or more late (the time is not counted against its peers).",
                &m.heartbeats_late,
            ),
            (
                "corecast_mesh_heartbeat_late_max_ms",
                "gauge",
                "The latest heartbeat tick of this node so far, in ms late.",
                &m.heartbeat_late_max_ms,
            ),
            (
                "corecast_mesh_forwarded_total",
                "counter",
                "Publishes forwarded to the room's home on another node.",
                &m.forwarded,
            ),
            (
                "corecast_mesh_gaps_total",
                "counter",
                "Gaps seen in a room's seqs from another node.",
                &m.gaps,
            ),
            (
                "corecast_mesh_repaired_total",
                "counter",
                "Messages fetched from history to fill gaps.",
                &m.repaired,
            ),
            (
                "corecast_mesh_unrepaired_total",
                "counter",
                "Seqs of gaps history could not fill (skipped).",
                &m.unrepaired,
            ),
            (
                "corecast_mesh_rehomed_total",
                "counter",
                "Rooms whose home moved to or away from this node.",
                &m.rehomed,
            ),
            (
                "corecast_mesh_misrouted_total",
                "counter",
                "Publishes refused with room_moving (nodes disagreed on the home).",
                &m.misrouted,
            ),
        ];
        let _ = writeln!(
            out,
            "# HELP corecast_mesh_node_info This node's id.\n# TYPE corecast_mesh_node_info gauge\ncorecast_mesh_node_info{{node=\"{}\"}} 1",
            self.node_id
        );
        write_series(out, &series);
    }
}
