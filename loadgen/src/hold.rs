//! `loadgen hold`: open many WebSocket connections at a paced rate, keep
//! them idle (answering pings) for a while, then close them all with close
//! frames. Used to measure the server's memory per idle connection.
//!
//! # Invariants
//! - One task per connection, on the thread that opened it; it starts idling
//!   (reading, answering pings) as soon as its upgrade completes, so a slow
//!   connect phase cannot get early connections timed out.
//! - Per-thread counters live in an `Rc<Ctx>`; no borrow across an `.await`.
//!   The only cross-thread state is the gate and two progress atomics.
//! - An idle connection holds a small receive buffer (it grows only for a
//!   large frame) and an empty send buffer.

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use corecast_ws::Event;
use futures_lite::future::or;
use glommio::{sync::Semaphore, timer::Timer};
use hdrhistogram::Histogram;

use crate::{
    client::{CloseOutcome, Conn, ConnFailure, ConnOptions},
    config::HoldPlan,
    exec::{self, Gate},
    report::{self, JsonLine, Latency},
};

/// Receive buffer of an idle connection: enough for control frames and
/// small pushes without growing.
const INITIAL_RX_BYTES: usize = 512;

/// Largest frame accepted on a held connection.
const MAX_FRAME_BYTES: usize = 1 << 20;

/// How often the hold wait looks at the Ctrl-C flag.
const HOLD_POLL: Duration = Duration::from_millis(100);

const MAX_WARNINGS: u32 = 5;

/// Counters one thread keeps and the run adds up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub opened: u64,
    pub failed: u64,
    /// Connections the server closed or dropped while held.
    pub dropped: u64,
    pub closed_cleanly: u64,
    /// Closes the server did not answer before `--close-timeout-ms`.
    pub unclean_closes: u64,
    pub pings: u64,
    /// Data messages received (an idle connection expects none).
    pub messages: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.opened += o.opened;
        self.failed += o.failed;
        self.dropped += o.dropped;
        self.closed_cleanly += o.closed_cleanly;
        self.unclean_closes += o.unclean_closes;
        self.pings += o.pings;
        self.messages += o.messages;
    }
}

/// Progress all threads add to, read once by thread 0 for the status line.
#[derive(Default)]
struct Progress {
    opened: AtomicU64,
    failed: AtomicU64,
}

struct Ctx {
    plan: Arc<HoldPlan>,
    counts: RefCell<Counts>,
    /// Upgrade times, microseconds.
    handshake: RefCell<Histogram<u64>>,
    last_opened: Cell<Option<Instant>>,
    first_connect_error: RefCell<Option<String>>,
    first_drop: RefCell<Option<String>>,
    warnings: Cell<u32>,
    progress: Arc<Progress>,
    /// Signalled once per finished connection attempt.
    attempted: Semaphore,
    /// Closed when the hold ends (or on Ctrl-C): every connection closes.
    stop: Rc<Semaphore>,
    close_until: Cell<Option<Instant>>,
}

impl Ctx {
    fn count(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.counts.borrow_mut());
    }
}

pub struct ThreadReport {
    counts: Counts,
    handshake: Histogram<u64>,
    last_opened: Option<Instant>,
    first_connect_error: Option<String>,
    first_drop: Option<String>,
}

/// Reads and answers until the server ends the connection; returns why.
async fn idle(conn: &mut Conn, ctx: &Ctx) -> ConnFailure {
    loop {
        // Frames may have come with the upgrade response: handle what is
        // buffered before reading more.
        loop {
            match conn.next_event() {
                Ok(None) => break,
                Err(e) => return ConnFailure::Protocol(e),
                Ok(Some(Event::Ping(_))) => ctx.count(|c| c.pings += 1),
                Ok(Some(Event::Pong(_))) => {}
                Ok(Some(Event::Message { .. })) => ctx.count(|c| c.messages += 1),
                Ok(Some(Event::Close { code, .. })) => return ConnFailure::ServerClosed(code),
            }
        }
        if let Err(e) = conn.flush().await {
            return ConnFailure::Io(e.kind());
        }
        match conn.fill().await {
            Ok(0) => return ConnFailure::Eof,
            Ok(_) => {}
            Err(e) => return ConnFailure::Io(e.kind()),
        }
    }
}

async fn hold_conn(ctx: Rc<Ctx>, index: usize) {
    let c = &ctx.plan.conn;
    let opts = ConnOptions {
        max_frame_bytes: MAX_FRAME_BYTES,
        initial_rx_bytes: INITIAL_RX_BYTES,
        protocol: None,
    };
    let r = Conn::connect(
        c.target(index),
        c.source(index),
        index as u64,
        c.connect_timeout,
        opts,
    )
    .await;
    ctx.attempted.signal(1);
    let mut conn = match r {
        Ok((conn, took)) => {
            ctx.count(|c| c.opened += 1);
            ctx.progress.opened.fetch_add(1, Ordering::Relaxed);
            ctx.handshake
                .borrow_mut()
                .saturating_record(took.as_micros() as u64);
            ctx.last_opened.set(Some(Instant::now()));
            conn
        }
        Err(e) => {
            ctx.count(|c| c.failed += 1);
            ctx.progress.failed.fetch_add(1, Ordering::Relaxed);
            ctx.first_connect_error
                .borrow_mut()
                .get_or_insert_with(|| e.to_string());
            return;
        }
    };
    let ended = {
        let held = async { Some(idle(&mut conn, &ctx).await) };
        let stop = async {
            let _ = ctx.stop.acquire(1).await;
            None
        };
        or(held, stop).await
    };
    let close_timeout = ctx.plan.conn.close_timeout;
    match ended {
        Some(failure) => {
            ctx.count(|c| c.dropped += 1);
            let n = ctx.warnings.get();
            if n < MAX_WARNINGS {
                ctx.warnings.set(n + 1);
                log::warn!("connection {index}: {failure}");
            }
            ctx.first_drop
                .borrow_mut()
                .get_or_insert_with(|| format!("connection {index}: {failure}"));
            if matches!(
                failure,
                ConnFailure::Protocol(_) | ConnFailure::ServerClosed(_)
            ) {
                conn.close("", Instant::now() + close_timeout).await;
            }
        }
        None => {
            let until = ctx
                .close_until
                .get()
                .unwrap_or_else(|| Instant::now() + close_timeout);
            match conn.close("loadgen hold done", until).await {
                CloseOutcome::Clean => ctx.count(|c| c.closed_cleanly += 1),
                CloseOutcome::NoReply | CloseOutcome::Failed => {
                    ctx.count(|c| c.unclean_closes += 1)
                }
            }
        }
    }
}

async fn thread_main(
    plan: Arc<HoldPlan>,
    gate: Arc<Gate>,
    progress: Arc<Progress>,
    thread: usize,
) -> ThreadReport {
    let stop = Rc::new(Semaphore::new(0));
    let ctx = Rc::new(Ctx {
        plan: plan.clone(),
        counts: RefCell::new(Counts::default()),
        handshake: RefCell::new(report::new_histogram()),
        last_opened: Cell::new(None),
        first_connect_error: RefCell::new(None),
        first_drop: RefCell::new(None),
        warnings: Cell::new(0),
        progress: progress.clone(),
        attempted: Semaphore::new(0),
        stop: stop.clone(),
        close_until: Cell::new(None),
    });
    let done = Rc::new(Cell::new(false));
    let watcher = exec::watch_interrupt(gate.clone(), stop.clone(), done.clone());
    let tasks = exec::spawn_paced(
        &plan.conn,
        &gate,
        plan.conn.indices(thread, plan.connections),
        |index| glommio::spawn_local(hold_conn(ctx.clone(), index)),
    )
    .await;
    let _ = ctx.attempted.acquire(tasks.len() as u64).await;
    if let Some(released) = gate.arrive().await {
        if thread == 0 {
            let opened = progress.opened.load(Ordering::Relaxed);
            let failed = progress.failed.load(Ordering::Relaxed);
            report::say(
                plan.conn.json,
                &format!(
                    "opened {opened} of {} ({failed} failed) in {:.2} s; holding for {:.1} s",
                    plan.connections,
                    released.saturating_duration_since(gate.t0).as_secs_f64(),
                    plan.hold.as_secs_f64()
                ),
            );
        }
        let hold_end = released + plan.hold;
        loop {
            let now = Instant::now();
            if now >= hold_end || gate.is_interrupted() {
                break;
            }
            Timer::new((hold_end - now).min(HOLD_POLL)).await;
        }
    }
    ctx.close_until
        .set(Some(Instant::now() + plan.conn.close_timeout));
    stop.close();
    for task in tasks {
        task.await;
    }
    done.set(true);
    watcher.cancel().await;
    let counts = *ctx.counts.borrow();
    let first_connect_error = ctx.first_connect_error.take();
    let first_drop = ctx.first_drop.take();
    ThreadReport {
        counts,
        handshake: ctx.handshake.replace(report::new_histogram()),
        last_opened: ctx.last_opened.get(),
        first_connect_error,
        first_drop,
    }
}

/// The run's result.
#[derive(Debug)]
pub struct HoldReport {
    pub counts: Counts,
    /// Upgrade times.
    pub handshake: Latency,
    /// From the first attempt to the last connection opened.
    pub connect_s: f64,
    /// Seconds actually held (shorter than `--hold-s` when interrupted).
    pub held_s: f64,
    pub interrupted: bool,
    pub first_connect_error: Option<String>,
    pub first_drop: Option<String>,
}

impl HoldReport {
    pub fn open_at_end(&self) -> u64 {
        self.counts.opened - self.counts.dropped
    }

    pub fn is_clean(&self) -> bool {
        self.counts.failed == 0 && self.counts.dropped == 0
    }
}

/// Runs the hold scenario and prints its report; `Ok(false)` when
/// connections failed to open or were dropped while held.
pub fn run(plan: HoldPlan, interrupted: Arc<AtomicBool>) -> anyhow::Result<bool> {
    let plan = Arc::new(plan);
    let from = if plan.conn.sources.is_empty() {
        String::new()
    } else {
        let s: Vec<_> = plan.conn.sources.iter().map(|s| s.to_string()).collect();
        format!(", from {}", s.join(","))
    };
    report::say(
        plan.conn.json,
        &format!(
            "hold {}: {} connections at {} per second, {} thread(s){from}",
            plan.conn.urls(),
            plan.connections,
            plan.conn.connect_rate,
            plan.conn.threads,
        ),
    );
    let r = execute(plan.clone(), interrupted)?;
    let c = &r.counts;
    let mut human = format!(
        "opened      {} of {} ({} failed) in {:.2} s; upgrade {}\n\
         held        {:.1} s; {} dropped by the server, {} open at the end, {} pings answered\n\
         closed      {} cleanly, {} without a close reply\n",
        c.opened,
        plan.connections,
        c.failed,
        r.connect_s,
        r.handshake.human(),
        r.held_s,
        c.dropped,
        r.open_at_end(),
        c.pings,
        c.closed_cleanly,
        c.unclean_closes,
    );
    if r.interrupted {
        human.push_str("interrupted: the hold ended early\n");
    }
    let line = JsonLine::new()
        .str("scenario", "hold")
        .str("url", &plan.conn.urls())
        .u64("connections", plan.connections as u64)
        .u64("threads", plan.conn.threads as u64)
        .u64("opened", c.opened)
        .u64("failed", c.failed)
        .f64("connect_s", r.connect_s)
        .latency("handshake_", &r.handshake)
        .f64("hold_s", r.held_s)
        .u64("dropped", c.dropped)
        .u64("open_at_end", r.open_at_end())
        .u64("pings", c.pings)
        .u64("messages", c.messages)
        .u64("closed_cleanly", c.closed_cleanly)
        .u64("unclean_closes", c.unclean_closes)
        .bool("interrupted", r.interrupted)
        .finish();
    report::emit(plan.conn.json, &human, line);
    if let Some(e) = &r.first_connect_error {
        eprintln!(
            "error: {} of {} connections failed; first: {e}",
            c.failed, plan.connections
        );
    }
    if let Some(e) = &r.first_drop {
        eprintln!("error: {} connections dropped; first: {e}", c.dropped);
    }
    Ok(r.is_clean())
}

/// Runs the hold scenario without printing its report (thread 0 still
/// prints the one progress line when the hold starts).
pub fn execute(plan: Arc<HoldPlan>, interrupted: Arc<AtomicBool>) -> anyhow::Result<HoldReport> {
    let gate = Arc::new(Gate::new(plan.conn.threads, interrupted));
    let progress = Arc::new(Progress::default());
    let body = {
        let (plan, gate, progress) = (plan.clone(), gate.clone(), progress.clone());
        move |t| thread_main(plan.clone(), gate.clone(), progress.clone(), t)
    };
    let reports = exec::run_threads(&plan.conn, &gate, body)?;
    let mut counts = Counts::default();
    let mut handshake = report::new_histogram();
    let mut last_opened: Option<Instant> = None;
    let (mut first_connect_error, mut first_drop) = (None, None);
    for r in reports {
        counts.add(&r.counts);
        handshake
            .add(&r.handshake)
            .map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
        last_opened = last_opened.max(r.last_opened);
        first_connect_error = first_connect_error.or(r.first_connect_error);
        first_drop = first_drop.or(r.first_drop);
    }
    let held_s = match (gate.released(), gate.interrupted_at()) {
        (Some(r), Some(i)) => i.saturating_duration_since(r).min(plan.hold).as_secs_f64(),
        (Some(_), None) => plan.hold.as_secs_f64(),
        (None, _) => 0.0,
    };
    Ok(HoldReport {
        counts,
        handshake: Latency::of(&handshake),
        connect_s: last_opened.map_or(0.0, |t| t.saturating_duration_since(gate.t0).as_secs_f64()),
        held_s,
        interrupted: gate.interrupted_at().is_some(),
        first_connect_error,
        first_drop,
    })
}
