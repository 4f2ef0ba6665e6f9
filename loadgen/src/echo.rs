//! `loadgen echo`: round-trip throughput and latency against any RFC 6455
//! echo endpoint.
//!
//! Message number `seq` of a connection carries a payload that is a pure
//! function of `seq` ([`Payload`]), so an echo is checked byte for byte
//! without keeping a copy; echoes are matched in FIFO order, which every echo
//! server keeps per connection. Latency runs from the actual send (closed
//! loop, `--rate 0`) or from the intended send time (fixed rate), so a
//! stalled sender cannot hide latency (coordinated omission).
//!
//! # Invariants
//! - One task per connection, on the thread that opened it. Per-thread
//!   counters and the histogram live in an `Rc<Ctx>`; no `RefCell` borrow
//!   lives across an `.await`.
//! - In flight per connection is bounded by `--window` (closed loop) or
//!   `--max-in-flight` (fixed rate); the send buffer therefore holds at most
//!   that many frames plus control replies.
//! - No allocation per message once the buffers reached their steady size;
//!   one clock read per batch of received frames.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    fmt,
    future::{poll_fn, Future as _},
    pin::Pin,
    rc::Rc,
    sync::{atomic::AtomicBool, Arc},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use corecast_ws::{apply_mask, encode_header, Event, OpCode};
use futures_lite::future::or;
use glommio::{sync::Semaphore, timer::Timer};
use hdrhistogram::Histogram;

use crate::{
    client::{CloseOutcome, Conn, ConnFailure, ConnOptions},
    config::EchoPlan,
    exec::{self, Gate},
    report::{self, JsonLine, Latency},
};

/// Loop turns one connection takes per poll before it yields, so that a
/// connection whose echoes keep arriving cannot starve its neighbours.
const POLL_BUDGET: usize = 32;

/// Receive buffer each connection starts with; it grows for larger frames.
const INITIAL_RX_BYTES: usize = 16 << 10;

/// Smallest frame limit: echo servers may send control frames and small
/// stray messages whatever `--size` is.
const MIN_FRAME_LIMIT: usize = 64 << 10;

/// Per-connection problems logged as warnings, per thread; the rest are
/// only counted.
const MAX_WARNINGS: u32 = 5;

/// Message payloads: the first 16 bytes (fewer for small messages) are `seq`
/// in hex, lowest digit first, the rest the alphabet starting at letter `seq + i`. ASCII, so the
/// same payloads serve text and binary messages.
pub struct Payload {
    size: usize,
    /// The alphabet repeated, `size + 26` bytes: the tail of any payload is
    /// a slice of it.
    filler: Vec<u8>,
}

impl Payload {
    pub fn new(size: usize) -> Payload {
        Payload {
            size,
            filler: (0..size + 26).map(|j| b'a' + (j % 26) as u8).collect(),
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn prefix_len(&self) -> usize {
        self.size.min(16)
    }

    fn prefix(seq: u64) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            // Lowest digit first: small messages still tell neighbours apart.
            *b = b"0123456789abcdef"[(seq >> (4 * i)) as usize & 0xf];
        }
        out
    }

    fn tail(&self, seq: u64) -> &[u8] {
        let r = (seq % 26) as usize;
        &self.filler[r..r + self.size]
    }

    /// Appends a complete masked frame carrying message `seq`.
    pub fn encode(&self, seq: u64, opcode: OpCode, mask: [u8; 4], out: &mut Vec<u8>) {
        encode_header(out, true, opcode, self.size, Some(mask));
        let at = out.len();
        let p = self.prefix_len();
        out.extend_from_slice(&Self::prefix(seq)[..p]);
        out.extend_from_slice(&self.tail(seq)[p..]);
        apply_mask(&mut out[at..], mask, 0);
    }

    /// Does `chunk`, found `off` bytes into an echo, match message `seq`?
    pub fn matches(&self, seq: u64, off: usize, chunk: &[u8]) -> bool {
        if off + chunk.len() > self.size {
            return false;
        }
        let p = self.prefix_len();
        let (mut off, mut chunk) = (off, chunk);
        if off < p {
            let n = (p - off).min(chunk.len());
            if chunk[..n] != Self::prefix(seq)[off..off + n] {
                return false;
            }
            off += n;
            chunk = &chunk[n..];
        }
        *chunk == self.tail(seq)[off..off + chunk.len()]
    }
}

/// Counters one thread keeps and the run adds up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Connections upgraded.
    pub connected: u64,
    pub connect_failures: u64,
    /// Messages sent after the warm-up.
    pub sent: u64,
    /// Echoes whose payload, length or kind differed from what was sent, and
    /// messages nobody sent.
    pub mismatches: u64,
    /// Connections failed for breaking a framing rule.
    pub protocol_errors: u64,
    /// Connections the server closed or dropped during the run.
    pub disconnects: u64,
    /// Messages not echoed by the end of the drain (or of their connection).
    pub lost: u64,
    /// Closing handshakes the server did not complete in time.
    pub unclean_closes: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.connected += o.connected;
        self.connect_failures += o.connect_failures;
        self.sent += o.sent;
        self.mismatches += o.mismatches;
        self.protocol_errors += o.protocol_errors;
        self.disconnects += o.disconnects;
        self.lost += o.lost;
        self.unclean_closes += o.unclean_closes;
    }

    /// Everything that makes the run fail, except connect failures.
    pub fn errors(&self) -> u64 {
        self.mismatches + self.protocol_errors + self.disconnects + self.lost
    }
}

/// What one thread hands back.
pub struct ThreadReport {
    hist: Histogram<u64>,
    counts: Counts,
    first_error: Option<String>,
    first_connect_error: Option<String>,
}

/// The run's result.
pub struct EchoReport {
    pub hist: Histogram<u64>,
    pub counts: Counts,
    pub latency: Latency,
    /// Measured seconds (shorter than `--duration-s` when interrupted).
    pub measured_s: f64,
    pub interrupted: bool,
    pub first_error: Option<String>,
    pub first_connect_error: Option<String>,
}

impl EchoReport {
    pub fn messages(&self) -> u64 {
        self.hist.len()
    }

    pub fn msgs_per_s(&self) -> f64 {
        if self.measured_s > 0.0 {
            self.messages() as f64 / self.measured_s
        } else {
            0.0
        }
    }

    pub fn is_clean(&self) -> bool {
        self.counts.errors() == 0 && self.counts.connect_failures == 0
    }
}

/// The instants one run goes through, the same on every thread.
#[derive(Debug, Clone, Copy)]
struct Timeline {
    start: Instant,
    /// End of the warm-up: messages sent from here on are recorded.
    measure: Instant,
    /// No message is sent from here on.
    end: Instant,
    /// Echoes still missing now are lost.
    drain_until: Instant,
    /// Closing handshakes still unfinished now are abandoned.
    close_until: Instant,
}

impl Timeline {
    fn new(start: Instant, plan: &EchoPlan) -> Timeline {
        let measure = start + plan.warmup;
        let end = measure + plan.duration;
        let drain_until = end + plan.drain_timeout;
        Timeline {
            start,
            measure,
            end,
            drain_until,
            close_until: drain_until + plan.conn.close_timeout,
        }
    }
}

/// One thread's shared state.
struct Ctx {
    plan: Arc<EchoPlan>,
    payload: Payload,
    hist: RefCell<Histogram<u64>>,
    counts: RefCell<Counts>,
    first_error: RefCell<Option<String>>,
    warnings: Cell<u32>,
    /// Closed on Ctrl-C: every connection stops and closes.
    stop: Rc<Semaphore>,
}

impl Ctx {
    fn count(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.counts.borrow_mut());
    }

    fn note(&self, index: usize, what: &dyn fmt::Display) {
        let n = self.warnings.get();
        if n < MAX_WARNINGS {
            self.warnings.set(n + 1);
            log::warn!("connection {index}: {what}");
        }
        self.first_error
            .borrow_mut()
            .get_or_insert_with(|| format!("connection {index}: {what}"));
    }
}

/// One connection's echo loop.
struct EchoConn {
    conn: Conn,
    ctx: Rc<Ctx>,
    index: usize,
    t: Timeline,
    /// Send (or intended send) instant of each unanswered message, oldest
    /// first; message numbers are implied: the front is `next_seq - len`.
    inflight: VecDeque<Instant>,
    next_seq: u64,
    sending: bool,
    /// Fixed rate (else closed loop), and the in-flight limit that goes with it.
    fixed_rate: bool,
    cap: usize,
    /// Fixed rate only: this connection's message interval and its offset in
    /// the first interval, in seconds.
    interval_s: f64,
    phase_s: f64,
    timer: Timer,
    /// What `timer` is set for; re-armed only when that changes.
    armed: Option<Instant>,
}

impl EchoConn {
    fn new(conn: Conn, ctx: Rc<Ctx>, index: usize, t: Timeline) -> EchoConn {
        let plan = &ctx.plan;
        let (interval_s, phase_s) = match plan.rate {
            Some(rate) => (plan.connections as f64 / rate, index as f64 / rate),
            None => (0.0, 0.0),
        };
        let cap = match plan.rate {
            Some(_) => plan.max_in_flight,
            None => plan.window,
        };
        EchoConn {
            conn,
            index,
            t,
            inflight: VecDeque::with_capacity(cap.min(1024)),
            next_seq: 0,
            sending: true,
            fixed_rate: plan.rate.is_some(),
            cap,
            interval_s,
            phase_s,
            timer: Timer::new(Duration::from_secs(3600)),
            armed: None,
            ctx,
        }
    }

    fn due(&self, seq: u64) -> Instant {
        self.t.start + Duration::from_secs_f64(self.phase_s + seq as f64 * self.interval_s)
    }

    fn send(&mut self, at: Instant) {
        let mask = self.conn.mask();
        let ctx = &self.ctx;
        ctx.payload
            .encode(self.next_seq, ctx.plan.opcode, mask, self.conn.tx_mut());
        self.inflight.push_back(at);
        self.next_seq += 1;
        if at >= self.t.measure {
            ctx.count(|c| c.sent += 1);
        }
    }

    /// Queues the messages that are due.
    fn top_up(&mut self, now: Instant) {
        while self.inflight.len() < self.cap {
            if !self.fixed_rate {
                self.send(now);
                continue;
            }
            let due = self.due(self.next_seq);
            if due >= self.t.end {
                self.sending = false;
                break;
            }
            if due > now {
                break;
            }
            self.send(due);
        }
    }

    /// When to wake up if no echo arrives: the next send, the end of the
    /// run, or the end of the drain.
    fn next_wake(&self) -> Instant {
        if !self.sending {
            self.t.drain_until
        } else if self.fixed_rate && self.inflight.len() < self.cap {
            self.due(self.next_seq).min(self.t.end)
        } else {
            self.t.end
        }
    }

    /// Ready when `at` has passed; otherwise arms the timer for it.
    fn poll_wake(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        if at <= now {
            return Poll::Ready(());
        }
        if self.armed == Some(at) {
            // Still registered with this task's waker.
            return Poll::Pending;
        }
        self.armed = Some(at);
        self.timer.reset(at - now);
        match Pin::new(&mut self.timer).poll(cx) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Drives the connection until every echo is back after the run (or the
    /// drain ends), or the connection fails.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnFailure>> {
        for _ in 0..POLL_BUDGET {
            let now = Instant::now();
            if self.sending && now >= self.t.end {
                self.sending = false;
            }
            if self.sending {
                self.top_up(now);
            } else if self.inflight.is_empty() {
                return Poll::Ready(Ok(()));
            } else if now >= self.t.drain_until {
                let lost = self.inflight.len() as u64;
                self.inflight.clear();
                self.ctx.count(|c| c.lost += lost);
                return Poll::Ready(Ok(()));
            }
            if self.conn.has_pending_tx() {
                if let Poll::Ready(Err(e)) = self.conn.poll_flush(cx) {
                    return Poll::Ready(Err(ConnFailure::Io(e.kind())));
                }
            }
            match self.conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(ConnFailure::Eof)),
                Poll::Ready(Ok(_)) => {
                    self.on_bytes(Instant::now())?;
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ConnFailure::Io(e.kind()))),
                Poll::Pending => {}
            }
            let wake = self.next_wake();
            if self.poll_wake(wake, cx).is_pending() {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Handles every complete frame in the receive buffer.
    fn on_bytes(&mut self, now: Instant) -> Result<(), ConnFailure> {
        loop {
            let good = match self.conn.next_event() {
                Ok(None) => return Ok(()),
                Err(e) => return Err(ConnFailure::Protocol(e)),
                // An echo, whole (reassembled by the session if it came
                // in fragments).
                Ok(Some(Event::Message { opcode, data })) => {
                    let seq = self.next_seq - self.inflight.len() as u64;
                    let ctx = &self.ctx;
                    opcode == ctx.plan.opcode
                        && data.len() == ctx.payload.size()
                        && ctx.payload.matches(seq, 0, data)
                }
                Ok(Some(Event::Ping(_) | Event::Pong(_))) => continue,
                Ok(Some(Event::Close { code, .. })) => return Err(ConnFailure::ServerClosed(code)),
            };
            self.on_echo(good, now);
        }
    }

    /// An echo arrived; `good` if it is the message sent.
    fn on_echo(&mut self, good: bool, now: Instant) {
        let bad = !good;
        let Some(at) = self.inflight.pop_front() else {
            self.ctx.count(|c| c.mismatches += 1);
            return;
        };
        if bad {
            self.ctx.count(|c| c.mismatches += 1);
            if self.ctx.counts.borrow().mismatches == 1 {
                let seq = self.next_seq - self.inflight.len() as u64 - 1;
                self.ctx.note(
                    self.index,
                    &format_args!("echo of message {seq} differs from what was sent"),
                );
            }
        } else if at >= self.t.measure {
            let us = now.saturating_duration_since(at).as_micros() as u64;
            self.ctx.hist.borrow_mut().saturating_record(us);
        }
    }
}

/// One connection's whole run: echo, drain, close.
async fn run_conn(ctx: Rc<Ctx>, conn: Conn, index: usize, t: Timeline) {
    let mut e = EchoConn::new(conn, ctx.clone(), index, t);
    let result = {
        let run = async { Some(poll_fn(|cx| e.poll_run(cx)).await) };
        let stop = async {
            let _ = ctx.stop.acquire(1).await;
            None
        };
        or(run, stop).await
    };
    let deadline = match result {
        Some(Err(failure)) => {
            let lost = e.inflight.len() as u64;
            ctx.count(|c| {
                c.lost += lost;
                match failure {
                    ConnFailure::Protocol(_) => c.protocol_errors += 1,
                    _ => c.disconnects += 1,
                }
            });
            ctx.note(index, &failure);
            match failure {
                // Send our close (or the reply to theirs) before dropping.
                ConnFailure::Protocol(_) | ConnFailure::ServerClosed(_) => {
                    Instant::now() + ctx.plan.conn.close_timeout
                }
                ConnFailure::Eof | ConnFailure::Io(_) => return,
            }
        }
        Some(Ok(())) => t.close_until,
        // Interrupted: what is in flight is not lost, the run just ended.
        None => Instant::now() + ctx.plan.conn.close_timeout,
    };
    let outcome = e.conn.close("loadgen done", deadline).await;
    if outcome != CloseOutcome::Clean && !matches!(result, Some(Err(_))) {
        ctx.count(|c| c.unclean_closes += 1);
    }
}

async fn thread_main(plan: Arc<EchoPlan>, gate: Arc<Gate>, thread: usize) -> ThreadReport {
    let stop = Rc::new(Semaphore::new(0));
    let ctx = Rc::new(Ctx {
        payload: Payload::new(plan.size),
        hist: RefCell::new(report::new_histogram()),
        counts: RefCell::new(Counts::default()),
        first_error: RefCell::new(None),
        warnings: Cell::new(0),
        stop: stop.clone(),
        plan: plan.clone(),
    });
    let done = Rc::new(Cell::new(false));
    let watcher = exec::watch_interrupt(gate.clone(), stop, done.clone());
    let opts = ConnOptions {
        max_frame_bytes: plan.size.max(MIN_FRAME_LIMIT),
        initial_rx_bytes: INITIAL_RX_BYTES.min(plan.size.max(4096) + 14),
        protocol: None,
    };
    let connecting = exec::spawn_paced(
        &plan.conn,
        &gate,
        plan.conn.indices(thread, plan.connections),
        |index| {
            let plan = plan.clone();
            glommio::spawn_local(async move {
                let c = &plan.conn;
                let r = Conn::connect(
                    c.target(index),
                    c.source(index),
                    index as u64,
                    c.connect_timeout,
                    opts,
                );
                r.await.map(|(conn, _)| (index, conn))
            })
        },
    )
    .await;
    let mut conns = Vec::with_capacity(connecting.len());
    let mut first_connect_error = None;
    for task in connecting {
        match task.await {
            Ok(c) => conns.push(c),
            Err(e) => {
                ctx.count(|c| c.connect_failures += 1);
                first_connect_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    ctx.count(|c| c.connected = conns.len() as u64);
    if let Some(start) = gate.arrive().await {
        let t = Timeline::new(start, &plan);
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|(index, conn)| glommio::spawn_local(run_conn(ctx.clone(), conn, index, t)))
            .collect();
        for task in tasks {
            task.await;
        }
    }
    done.set(true);
    watcher.cancel().await;
    let hist = ctx.hist.replace(report::new_histogram());
    let counts = *ctx.counts.borrow();
    let first_error = ctx.first_error.take();
    ThreadReport {
        hist,
        counts,
        first_error,
        first_connect_error,
    }
}

/// Runs the echo scenario and prints its report; `Ok(false)` when the run
/// had errors or failed connections.
pub fn run(plan: EchoPlan, interrupted: Arc<AtomicBool>) -> anyhow::Result<bool> {
    let plan = Arc::new(plan);
    report::say(plan.conn.json, &describe(&plan));
    let report = execute(plan.clone(), interrupted)?;
    report::emit(plan.conn.json, &human(&plan, &report), json(&plan, &report));
    if let Some(e) = &report.first_connect_error {
        eprintln!(
            "error: {} of {} connections failed; first: {e}",
            report.counts.connect_failures, plan.connections
        );
    }
    if report.counts.errors() > 0 {
        if let Some(e) = &report.first_error {
            eprintln!("error: {} errors; first: {e}", report.counts.errors());
        }
    }
    Ok(report.is_clean())
}

/// Runs the echo scenario without printing anything.
pub fn execute(plan: Arc<EchoPlan>, interrupted: Arc<AtomicBool>) -> anyhow::Result<EchoReport> {
    let gate = Arc::new(Gate::new(plan.conn.threads, interrupted));
    let body = {
        let (plan, gate) = (plan.clone(), gate.clone());
        move |t| thread_main(plan.clone(), gate.clone(), t)
    };
    let reports = exec::run_threads(&plan.conn, &gate, body)?;
    let mut hist = report::new_histogram();
    let mut counts = Counts::default();
    let (mut first_error, mut first_connect_error) = (None, None);
    for r in reports {
        hist.add(&r.hist)
            .map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
        counts.add(&r.counts);
        first_error = first_error.or(r.first_error);
        first_connect_error = first_connect_error.or(r.first_connect_error);
    }
    let interrupted = gate.interrupted_at();
    let measured_s = match (gate.released(), interrupted) {
        (Some(start), Some(at)) => {
            let t = Timeline::new(start, &plan);
            at.min(t.end)
                .saturating_duration_since(t.measure)
                .as_secs_f64()
        }
        (Some(_), None) if counts.connected > 0 => plan.duration.as_secs_f64(),
        _ => 0.0,
    };
    Ok(EchoReport {
        latency: Latency::of(&hist),
        hist,
        counts,
        measured_s,
        interrupted: interrupted.is_some(),
        first_error,
        first_connect_error,
    })
}

fn describe(plan: &EchoPlan) -> String {
    let kind = if plan.opcode == OpCode::Text {
        "text"
    } else {
        "binary"
    };
    let mode = match plan.rate {
        Some(r) => format!("{r} msgs/s in all"),
        None => format!("max throughput, window {}", plan.window),
    };
    format!(
        "echo {}: {} connections, {} B {kind} messages, {mode}, {} thread(s); \
         {:.1} s measured after {:.1} s warm-up",
        plan.conn.urls(),
        plan.connections,
        plan.size,
        plan.conn.threads,
        plan.duration.as_secs_f64(),
        plan.warmup.as_secs_f64()
    )
}

fn human(plan: &EchoPlan, r: &EchoReport) -> String {
    let c = &r.counts;
    let mut s = format!(
        "messages    {} in {:.2} s = {:.0} msgs/s (sent {})\n\
         latency     {}\n\
         errors      {} (mismatches {}, protocol {}, disconnects {}, lost {})\n\
         connections {} of {} open, {} failed, {} closes unanswered\n",
        r.messages(),
        r.measured_s,
        r.msgs_per_s(),
        c.sent,
        r.latency.human(),
        c.errors(),
        c.mismatches,
        c.protocol_errors,
        c.disconnects,
        c.lost,
        c.connected,
        plan.connections,
        c.connect_failures,
        c.unclean_closes,
    );
    if r.interrupted {
        s.push_str("interrupted: the run ended early\n");
    }
    s
}

fn json(plan: &EchoPlan, r: &EchoReport) -> String {
    let c = &r.counts;
    JsonLine::new()
        .str("scenario", "echo")
        .str("url", &plan.conn.urls())
        .u64("connections", plan.connections as u64)
        .u64("size", plan.size as u64)
        .str(
            "opcode",
            if plan.opcode == OpCode::Text {
                "text"
            } else {
                "binary"
            },
        )
        .u64("rate", plan.rate.map_or(0, |r| r as u64))
        .u64("window", plan.window as u64)
        .u64("threads", plan.conn.threads as u64)
        .f64("warmup_s", plan.warmup.as_secs_f64())
        .f64("duration_s", r.measured_s)
        .u64("messages", r.messages())
        .u64("sent", c.sent)
        .f64("msgs_per_s", r.msgs_per_s())
        .latency("", &r.latency)
        .u64("errors", c.errors())
        .u64("mismatches", c.mismatches)
        .u64("protocol_errors", c.protocol_errors)
        .u64("disconnects", c.disconnects)
        .u64("lost", c.lost)
        .u64("connect_failures", c.connect_failures)
        .u64("unclean_closes", c.unclean_closes)
        .bool("interrupted", r.interrupted)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast_ws::{Decoder, Limits, Role};

    #[test]
    fn payloads_roundtrip_and_differ() {
        for size in [0, 1, 15, 16, 17, 64, 200, 70_000] {
            let p = Payload::new(size);
            for seq in [0u64, 1, 25, 26, 12345, u64::MAX] {
                let mut out = Vec::new();
                p.encode(seq, OpCode::Binary, [1, 2, 3, 4], &mut out);
                let mut dec = Decoder::new(
                    Role::Server,
                    Limits {
                        max_frame_bytes: 1 << 20,
                        max_message_bytes: 1 << 20,
                    },
                );
                let f = dec.decode(&mut out).unwrap().unwrap();
                let body = &out[f.payload.clone()];
                assert_eq!(body.len(), size);
                assert!(body.is_ascii());
                assert!(p.matches(seq, 0, body), "size {size} seq {seq}");
                // Piecewise, as fragments would arrive.
                let mid = size / 3;
                assert!(p.matches(seq, 0, &body[..mid]));
                assert!(p.matches(seq, mid, &body[mid..]));
                if size > 0 {
                    assert!(!p.matches(seq.wrapping_add(1), 0, body), "size {size}");
                    let mut bad = body.to_vec();
                    bad[size - 1] ^= 1;
                    assert!(!p.matches(seq, 0, &bad));
                }
                assert!(!p.matches(seq, 1, body), "overlong");
            }
        }
    }
}
