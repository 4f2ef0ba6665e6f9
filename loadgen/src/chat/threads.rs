//! Threads: one executor's members and publishers, and its report.

use std::{
    cell::{Cell, RefCell},
    future::{poll_fn, Future},
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use futures_lite::future::or;
use glommio::{sync::Semaphore, timer::Timer};
use hdrhistogram::Histogram;

use crate::{
    client::{CloseOutcome, ConnFailure},
    config::ChatPlan,
    exec::{self, Gate},
    report::{self},
};

use super::*;

/// How a member's connection ended.
pub(super) enum Ending {
    /// The run ended (or the gate was aborted) while it was connected.
    RunEnded,
    /// It failed and was not brought back (no `--reconnect`, or a failure
    /// that blames this client).
    Failed(ConnFailure),
    /// It dropped and no try joined within `--reconnect-timeout-s`; the
    /// last try's error.
    GaveUp(ConnFailure, String),
    /// It dropped and the run ended (or was interrupted) before it was back.
    EndedAway(ConnFailure),
}

/// One connection's whole life: open and join; read while the other
/// members join (presence events of later joins, pings); publish and
/// receive; with `--reconnect`, come back after a drop as often as needed;
/// close.
pub(super) async fn member(ctx: Rc<Ctx>, index: usize, exp: u64) {
    let slot = index % ctx.plan.conn.targets.len();
    let (conn, joined) = match open(&ctx, index, slot, exp, None).await {
        Ok(c) => c,
        Err(e) => {
            ctx.count(|k| k.connect_failures += 1);
            ctx.first_connect_error.borrow_mut().get_or_insert(e);
            ctx.attempted.signal(1);
            return;
        }
    };
    ctx.count(|k| k.joined += 1);
    ctx.shared.members_left.fetch_add(1, Ordering::AcqRel);
    if ctx.publisher_of(index).is_some() {
        ctx.shared.pubs_left[ctx.room_of(index)].fetch_add(1, Ordering::AcqRel);
    }
    ctx.attempted.signal(1);
    let mut c = ChatConn::new(conn, ctx.clone(), index, slot, joined);
    let ending = loop {
        let Some(failure) = drive(&ctx, &mut c).await else {
            break Ending::RunEnded;
        };
        let Some(timeout) = ctx.plan.reconnect_timeout else {
            break Ending::Failed(failure);
        };
        if !reconnectable(failure) {
            break Ending::Failed(failure);
        }
        if let Err(ending) = reconnect(&ctx, &mut c, failure, timeout, exp).await {
            break ending;
        }
    };
    let close_timeout = ctx.plan.conn.close_timeout;
    match ending {
        Ending::Failed(failure) => {
            ctx.count(|k| k.unexpected_closes += 1);
            ctx.note(index, &failure);
            c.st.retire(true);
            if matches!(
                failure,
                ConnFailure::Protocol(_) | ConnFailure::ServerClosed(_)
            ) {
                c.conn.close("", Instant::now() + close_timeout).await;
            }
        }
        Ending::GaveUp(failure, last) => {
            ctx.count(|k| k.unexpected_closes += 1);
            ctx.note(
                index,
                &format_args!(
                    "{failure}; not back within --reconnect-timeout-s (is any --url alive?); \
                     last try: {last}"
                ),
            );
            c.st.retire(true);
        }
        Ending::EndedAway(failure) => {
            let interrupted = ctx.gate.is_interrupted();
            // Caught up before it dropped, it missed nothing the run checks.
            if !interrupted && !c.st.caught_up {
                ctx.count(|k| k.unexpected_closes += 1);
                ctx.note(
                    index,
                    &format_args!("{failure}; the run ended before it was back"),
                );
            }
            c.st.retire(!interrupted);
        }
        Ending::RunEnded => {
            // Interrupted: what is in flight is not unacked, the run just ended.
            c.st.retire(!ctx.gate.is_interrupted());
            let until = ctx
                .close_until
                .get()
                .unwrap_or_else(|| Instant::now() + close_timeout);
            if c.conn.close("loadgen done", until).await != CloseOutcome::Clean {
                ctx.count(|k| k.unclean_closes += 1);
            }
        }
    }
    let st = c.st;
    let mut seqs = st.closed;
    seqs.push(st.seqs);
    ctx.members.borrow_mut().push(MemberEnd {
        room: st.room,
        seqs,
    });
}

/// Runs a joined connection: reads while the gate is closed, then publishes
/// and receives until the run ends (`None`) or the connection fails. Called
/// again after a reconnect, at whatever stage the run is then.
pub(super) async fn drive(ctx: &Ctx, c: &mut ChatConn) -> Option<ConnFailure> {
    if !c.st.started {
        let idle = async { Some(poll_fn(|cx| c.poll_run(cx)).await) };
        let started = async {
            let _ = ctx.started.acquire(1).await;
            None
        };
        // The gate first: once it is open, no more reading in idle mode.
        let waited = or(started, idle).await;
        if waited.is_some() {
            return waited;
        }
        // `None`: the gate was aborted, nothing to run.
        c.st.begin(ctx.timeline.get()?);
    }
    let run = async { Some(poll_fn(|cx| c.poll_run(cx)).await) };
    let end = async {
        let _ = ctx.end.acquire(1).await;
        None
    };
    or(run, end).await
}

/// Brings a member whose connection dropped with `failure` back: finishes
/// the closing handshake briefly if the server started one, then tries the
/// next `--url`s round-robin, at once and then with a doubling backoff,
/// until one joins (resuming from [`SeqCheck::resume_point`] in the last
/// `joined`'s epoch), `timeout` after the drop passes, or the run ends.
pub(super) async fn reconnect(
    ctx: &Ctx,
    c: &mut ChatConn,
    failure: ConnFailure,
    timeout: Duration,
    exp: u64,
) -> Result<(), Ending> {
    let dropped = Instant::now();
    let deadline = dropped + timeout;
    log::debug!("connection {}: {failure}; reconnecting", c.st.index);
    c.st.on_drop();
    if let ConnFailure::ServerClosed(_) = failure {
        // The reply to its close is queued.
        let until = dropped + CLOSE_BEFORE_RECONNECT.min(ctx.plan.conn.close_timeout);
        c.conn.close("", until).await;
    }
    let since = c.st.seqs.resume_point();
    let epoch = c.st.epoch.clone();
    let resume = (!epoch.is_empty()).then_some((since, epoch.as_str()));
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut last = String::from("none finished");
    let given_up = loop {
        if ctx.gate.is_interrupted() {
            break Ending::EndedAway(failure);
        }
        c.slot = ctx.plan.conn.next_target(c.slot);
        let attempt = open(ctx, c.st.index, c.slot, exp, resume);
        match within(ctx, deadline, attempt).await {
            Some(Ok((conn, joined))) => {
                c.resumed(conn, joined, since, dropped.elapsed());
                return Ok(());
            }
            Some(Err(e)) => {
                log::debug!("connection {}: reconnect: {e}", c.st.index);
                last = e;
            }
            None if Instant::now() >= deadline => break Ending::GaveUp(failure, last),
            None => break Ending::EndedAway(failure),
        }
        match within(ctx, deadline, Timer::new(backoff)).await {
            Some(_) => backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX),
            None if Instant::now() >= deadline => break Ending::GaveUp(failure, last),
            None => break Ending::EndedAway(failure),
        }
    };
    let away = dropped.elapsed().as_millis() as u64;
    ctx.count(|k| k.longest_outage_ms = k.longest_outage_ms.max(away));
    Err(given_up)
}

/// `fut`'s output, unless the run ends or `deadline` passes first (`None`).
pub(super) async fn within<T>(
    ctx: &Ctx,
    deadline: Instant,
    fut: impl Future<Output = T>,
) -> Option<T> {
    let work = async { Some(fut.await) };
    let end = async {
        let _ = ctx.end.acquire(1).await;
        None
    };
    let timer = async {
        Timer::new(deadline.saturating_duration_since(Instant::now())).await;
        None
    };
    or(work, or(end, timer)).await
}

/// Ends the thread's run: on Ctrl-C, or once publishing ended and every
/// member of every room caught up, or at the end of the drain. Returns when
/// it ended.
pub(super) async fn watch_end(ctx: Rc<Ctx>, t: Timeline) -> Instant {
    loop {
        let now = Instant::now();
        let drained = now >= t.end
            && (ctx.shared.members_left.load(Ordering::Acquire) == 0 || now >= t.drain_until);
        if drained || ctx.gate.is_interrupted() {
            ctx.close_until.set(Some(now + ctx.plan.conn.close_timeout));
            ctx.end.close();
            return now;
        }
        let step = if now >= t.end { WATCH_DRAIN } else { WATCH_RUN };
        let next = (now + step).min(if now < t.end { t.end } else { t.drain_until });
        Timer::new(
            next.saturating_duration_since(now)
                .max(Duration::from_micros(100)),
        )
        .await;
    }
}

/// What one thread hands back.
pub(super) struct ThreadReport {
    pub(super) hist: Histogram<u64>,
    pub(super) ack_hist: Histogram<u64>,
    pub(super) lag_hist: Histogram<u64>,
    pub(super) counts: Counts,
    pub(super) acked: Vec<Vec<u64>>,
    pub(super) members: Vec<MemberEnd>,
    pub(super) ended: Option<Instant>,
    pub(super) first_error: Option<String>,
    pub(super) first_connect_error: Option<String>,
}

pub(super) async fn thread_main(
    plan: Arc<ChatPlan>,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    names: Arc<(Vec<String>, Vec<String>)>,
    exp: u64,
    thread: usize,
) -> ThreadReport {
    let ctx = Rc::new(Ctx {
        rooms: names.0.clone(),
        tags: names.1.clone(),
        hist: RefCell::new(report::new_histogram()),
        ack_hist: RefCell::new(report::new_histogram()),
        lag_hist: RefCell::new(report::new_histogram()),
        counts: RefCell::new(Counts::default()),
        acked: RefCell::new(vec![Vec::new(); plan.rooms]),
        members: RefCell::new(Vec::new()),
        first_error: RefCell::new(None),
        first_connect_error: RefCell::new(None),
        warnings: Cell::new(0),
        attempted: Semaphore::new(0),
        started: Semaphore::new(0),
        timeline: Cell::new(None),
        end: Semaphore::new(0),
        close_until: Cell::new(None),
        plan: plan.clone(),
        shared: shared.clone(),
        gate: gate.clone(),
    });
    let tasks = exec::spawn_paced(
        &plan.conn,
        &gate,
        plan.conn.indices(thread, plan.connections()),
        |index| glommio::spawn_local(member(ctx.clone(), index, exp)),
    )
    .await;
    // Every member of every room joined (or failed) before anyone publishes.
    let _ = ctx.attempted.acquire(tasks.len() as u64).await;
    let mut ended = None;
    match gate.arrive().await {
        Some(start) => {
            let t = Timeline::new(start, &plan);
            ctx.timeline.set(Some(t));
            ctx.started.close();
            ended = Some(glommio::spawn_local(watch_end(ctx.clone(), t)).await);
        }
        None => ctx.started.close(),
    }
    for task in tasks {
        task.await;
    }
    let counts = *ctx.counts.borrow();
    ThreadReport {
        hist: ctx.hist.replace(report::new_histogram()),
        ack_hist: ctx.ack_hist.replace(report::new_histogram()),
        lag_hist: ctx.lag_hist.replace(report::new_histogram()),
        counts,
        acked: ctx.acked.take(),
        members: ctx.members.take(),
        ended,
        first_error: ctx.first_error.take(),
        first_connect_error: ctx.first_connect_error.take(),
    }
}
