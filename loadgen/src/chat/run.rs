//! The run: starting the threads, summing their reports, printing them.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize},
        Arc,
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use hdrhistogram::Histogram;

use crate::{
    client::XorShift,
    config::ChatPlan,
    exec::{self, Gate},
    report::{self, JsonLine, Latency},
};

use super::*;

/// The run's result.
pub struct ChatReport {
    pub counts: Counts,
    /// Delivery latencies of publishes due after the warm-up.
    pub hist: Histogram<u64>,
    pub latency: Latency,
    pub ack_latency: Latency,
    /// Publishes' actual send time minus their intended one.
    pub send_lag: Latency,
    /// Deliveries every member should have had: acked seqs × the room's
    /// joined members.
    pub expected_deliveries: u64,
    /// Measured seconds of publishing (shorter when interrupted).
    pub measured_s: f64,
    /// From the end of publishing to the last delivery (or the drain timeout).
    pub drain_s: f64,
    pub interrupted: bool,
    /// The run survives dropped nodes (`--reconnect`): see `is_clean`.
    pub reconnect: bool,
    pub first_error: Option<String>,
    pub first_connect_error: Option<String>,
}

impl ChatReport {
    /// Deliveries recorded: those of publishes due after the warm-up.
    pub fn deliveries(&self) -> u64 {
        self.hist.len()
    }

    pub fn deliveries_per_s(&self) -> f64 {
        if self.measured_s > 0.0 {
            self.deliveries() as f64 / self.measured_s
        } else {
            0.0
        }
    }

    /// No failure. With `--reconnect`, unacked publishes are excused too: a
    /// publish on its way to a node that dies (a cluster forwards it to the
    /// room's home node) is never answered, and is not lost either. Lost
    /// acked messages still fail the run.
    pub fn is_clean(&self) -> bool {
        let c = &self.counts;
        let excused = if self.reconnect {
            c.unacked - c.unacked_on_drop
        } else {
            0
        };
        c.failures() - excused == 0
    }
}

/// Runs the chat scenario and prints its report; `Ok(false)` when the run
/// saw gaps, duplicates, reorders, losses, errors or failed connections.
pub fn run(plan: ChatPlan, interrupted: Arc<AtomicBool>) -> anyhow::Result<bool> {
    let plan = Arc::new(plan);
    report::say(plan.conn.json, &describe(&plan));
    let r = execute(plan.clone(), interrupted)?;
    report::emit(plan.conn.json, &human(&plan, &r), json(&plan, &r));
    if let Some(e) = &r.first_connect_error {
        eprintln!(
            "error: {} of {} connections failed; first: {e}",
            r.counts.connect_failures,
            plan.connections()
        );
    }
    if let Some(e) = r.first_error.as_ref().filter(|_| !r.is_clean()) {
        eprintln!("error: first problem: {e}");
    }
    Ok(r.is_clean())
}

/// Runs the chat scenario without printing anything.
pub fn execute(plan: Arc<ChatPlan>, interrupted: Arc<AtomicBool>) -> anyhow::Result<ChatReport> {
    let gate = Arc::new(Gate::new(plan.conn.threads, interrupted));
    let shared = Arc::new(Shared {
        max_acked: (0..plan.rooms).map(|_| AtomicU64::new(0)).collect(),
        pubs_left: (0..plan.rooms).map(|_| AtomicUsize::new(0)).collect(),
        members_left: AtomicUsize::new(0),
    });
    // A run tag in every publish id: the gateway drops a repeated id from
    // the same user, and user names repeat from run to run.
    let run_tag = XorShift::seeded(u64::from(std::process::id())).next_u64() as u32;
    let rooms: Vec<String> = (0..plan.rooms)
        .map(|r| format!("{}-{r}", plan.room_prefix))
        .collect();
    let tags: Vec<String> = (0..plan.rooms * plan.publishers)
        .map(|p| format!("{run_tag:08x}.{p}"))
        .collect();
    let names = Arc::new((rooms, tags));
    let planned = plan.warmup + plan.duration + plan.drain_timeout;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + planned.as_secs()
        + TOKEN_SLACK_S;
    let body = {
        let (plan, gate, shared) = (plan.clone(), gate.clone(), shared.clone());
        move |t| {
            thread_main(
                plan.clone(),
                shared.clone(),
                gate.clone(),
                names.clone(),
                exp,
                t,
            )
        }
    };
    let reports = exec::run_threads(&plan.conn, &gate, body)?;

    let mut hist = report::new_histogram();
    let mut ack_hist = report::new_histogram();
    let mut lag_hist = report::new_histogram();
    let mut counts = Counts::default();
    let mut acked: Vec<Vec<u64>> = vec![Vec::new(); plan.rooms];
    let mut members = Vec::new();
    let mut ended: Option<Instant> = None;
    let (mut first_error, mut first_connect_error) = (None, None);
    for r in reports {
        let merge = |e| anyhow::anyhow!("merging histograms: {e:?}");
        hist.add(&r.hist).map_err(merge)?;
        ack_hist.add(&r.ack_hist).map_err(merge)?;
        lag_hist.add(&r.lag_hist).map_err(merge)?;
        counts.add(&r.counts);
        for (all, mine) in acked.iter_mut().zip(r.acked) {
            all.extend(mine);
        }
        members.extend(r.members);
        ended = ended.max(r.ended);
        first_error = first_error.or(r.first_error);
        first_connect_error = first_connect_error.or(r.first_connect_error);
    }
    for a in &mut acked {
        a.sort_unstable();
        a.dedup();
    }
    let interrupted = gate.interrupted_at();
    let mut expected_deliveries = 0;
    for m in &members {
        expected_deliveries += acked[m.room].len() as u64;
        for seqs in &m.seqs {
            counts.received += seqs.received;
            counts.gaps += seqs.gaps();
            counts.duplicates += seqs.duplicates;
            counts.reorders += seqs.reorders;
            // An interrupted run stops mid-flight: shortfalls are not losses.
            if interrupted.is_none() {
                counts.lost += seqs.lost_of(&acked[m.room]);
            }
        }
    }
    let timeline = gate.released().map(|s| Timeline::new(s, &plan));
    let measured_s = match (timeline, interrupted) {
        (Some(t), Some(at)) => at
            .min(t.end)
            .saturating_duration_since(t.measure)
            .as_secs_f64(),
        (Some(_), None) if counts.joined > 0 => plan.duration.as_secs_f64(),
        _ => 0.0,
    };
    let drain_s = match (timeline, ended) {
        (Some(t), Some(e)) => e.saturating_duration_since(t.end).as_secs_f64(),
        _ => 0.0,
    };
    Ok(ChatReport {
        counts,
        latency: Latency::of(&hist),
        ack_latency: Latency::of(&ack_hist),
        send_lag: Latency::of(&lag_hist),
        hist,
        expected_deliveries,
        measured_s,
        drain_s,
        interrupted: interrupted.is_some(),
        reconnect: plan.reconnect_timeout.is_some(),
        first_error,
        first_connect_error,
    })
}

pub(super) fn describe(plan: &ChatPlan) -> String {
    let mode = match plan.rate {
        Some(r) => format!("{r} publishes/s in all"),
        None => format!("max throughput, window {}", plan.window),
    };
    format!(
        "chat {}: {} rooms × {} members ({} connections), {} publisher(s) per room, {mode}, \
         {} B bodies, {} thread(s), {}{}; {:.1} s measured after {:.1} s warm-up",
        plan.conn.urls(),
        plan.rooms,
        plan.members,
        plan.connections(),
        plan.publishers,
        plan.size,
        plan.conn.threads,
        if plan.jwt_secret.is_some() {
            "with tokens"
        } else {
            "anonymous"
        },
        match plan.reconnect_timeout {
            Some(t) => format!(", reconnecting for up to {:.1} s", t.as_secs_f64()),
            None => String::new(),
        },
        plan.duration.as_secs_f64(),
        plan.warmup.as_secs_f64()
    )
}

pub(super) fn human(plan: &ChatPlan, r: &ChatReport) -> String {
    let c = &r.counts;
    let mut s = format!(
        "published   {} ({} acked, {} unacked, {} duplicate acks) in {:.2} s\n\
         deliveries  {} = {:.0}/s measured; {} of {} expected received in all (drain {:.2} s)\n\
         latency     {}\n\
         ack latency {}\n\
         send lag    {}\n\
         order       {} gaps, {} duplicates, {} reorders, {} publisher reorders, {} lost, {} foreign\n\
         errors      {} error frames, {} bad frames, {} unexpected closes ({} other frames ignored)\n\
         connections {} of {} joined, {} failed, {} closes unanswered\n",
        c.published,
        c.acked,
        c.unacked,
        c.duplicate_acks,
        r.measured_s,
        r.deliveries(),
        r.deliveries_per_s(),
        c.received,
        r.expected_deliveries,
        r.drain_s,
        r.latency.human(),
        r.ack_latency.human(),
        match plan.rate {
            Some(_) => r.send_lag.human(),
            None => "none (closed loop: publishes go out as acks come back)".into(),
        },
        c.gaps,
        c.duplicates,
        c.reorders,
        c.publisher_reorders,
        c.lost,
        c.foreign,
        c.errors,
        c.bad_frames,
        c.unexpected_closes,
        c.other_frames,
        c.joined,
        plan.connections(),
        c.connect_failures,
        c.unclean_closes,
    );
    if plan.reconnect_timeout.is_some() {
        s.push_str(&format!(
            "reconnects  {} back after a drop, {} resume failures, longest outage {} ms, \
             {} publishes unacked at drops (not retried)\n",
            c.reconnects, c.resume_failures, c.longest_outage_ms, c.unacked_on_drop
        ));
    }
    if r.interrupted {
        s.push_str("interrupted: the run ended early; shortfalls are not counted as lost\n");
    }
    s
}

pub(super) fn json(plan: &ChatPlan, r: &ChatReport) -> String {
    let c = &r.counts;
    JsonLine::new()
        .str("scenario", "chat")
        .str("url", &plan.conn.urls())
        .u64("rooms", plan.rooms as u64)
        .u64("members", plan.members as u64)
        .u64("publishers", plan.publishers as u64)
        .u64("rate", plan.rate.map_or(0, |r| r as u64))
        .u64("window", plan.window as u64)
        .u64("size", plan.size as u64)
        .u64("threads", plan.conn.threads as u64)
        .f64("warmup_s", plan.warmup.as_secs_f64())
        .f64("duration_s", r.measured_s)
        .u64("published", c.published)
        .u64("acked", c.acked)
        .u64("deliveries", r.deliveries())
        .f64("deliveries_per_s", r.deliveries_per_s())
        .latency("", &r.latency)
        .latency("ack_", &r.ack_latency)
        .u64("send_lag_p50_us", r.send_lag.p50_us)
        .u64("send_lag_p99_us", r.send_lag.p99_us)
        .u64("send_lag_max_us", r.send_lag.max_us)
        .u64("expected_deliveries", r.expected_deliveries)
        .u64("received", c.received)
        .f64("drain_s", r.drain_s)
        .u64("gaps", c.gaps)
        .u64("duplicates", c.duplicates)
        .u64("reorders", c.reorders)
        .u64("publisher_reorders", c.publisher_reorders)
        .u64("lost", c.lost)
        .u64("unacked", c.unacked)
        .u64("duplicate_acks", c.duplicate_acks)
        .u64("foreign", c.foreign)
        .u64("errors", c.errors)
        .u64("bad_frames", c.bad_frames)
        .u64("other_frames", c.other_frames)
        .u64("unexpected_closes", c.unexpected_closes)
        .u64("joined", c.joined)
        .u64("connect_failures", c.connect_failures)
        .u64("unclean_closes", c.unclean_closes)
        .bool("reconnect", plan.reconnect_timeout.is_some())
        .u64("reconnects", c.reconnects)
        .u64("resume_failures", c.resume_failures)
        .u64("unacked_on_drop", c.unacked_on_drop)
        .u64("longest_outage_ms", c.longest_outage_ms)
        .bool("interrupted", r.interrupted)
        .finish()
}
