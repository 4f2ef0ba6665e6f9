//! Executor threads: one glommio `LocalExecutor` per `--threads`, pinned by
//! `--cpus`, a start gate they all pass together, paced connection spawning
//! and the Ctrl-C watch.
//!
//! # Invariants
//! - Each thread owns its connections and stats (`Rc`, `!Send`); threads
//!   share only the [`Gate`] (atomics) and hand their reports back through
//!   the join handle.
//! - Nothing here blocks an executor: waits are timers, never parking.

use std::{
    cell::Cell,
    future::Future,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::anyhow;
use glommio::{sync::Semaphore, timer::Timer, LocalExecutorBuilder, Placement, Task};

use crate::config::ConnPlan;

/// Memory each executor registers with io_uring. Must stay small: the
/// memlock limit on the machines this runs on is 8 MiB for the process, and
/// sockets do not use registered buffers anyway.
const IO_MEMORY_BYTES: usize = 1 << 20;

/// How often a waiting thread looks at the gate and the Ctrl-C flag.
const POLL_EVERY: Duration = Duration::from_millis(1);
const INTERRUPT_POLL_EVERY: Duration = Duration::from_millis(50);

/// Where all threads meet after connecting, so that measuring starts at one
/// instant everywhere.
pub struct Gate {
    threads: usize,
    arrived: AtomicUsize,
    released: OnceLock<Instant>,
    aborted: AtomicBool,
    /// When a thread first saw the interrupt.
    interrupted_at: OnceLock<Instant>,
    /// When the first connection attempt was due (the connect pacing origin).
    pub t0: Instant,
    /// Set by SIGINT/SIGTERM: wind down and close cleanly.
    pub interrupted: Arc<AtomicBool>,
}

impl Gate {
    pub fn new(threads: usize, interrupted: Arc<AtomicBool>) -> Gate {
        Gate {
            threads,
            arrived: AtomicUsize::new(0),
            released: OnceLock::new(),
            aborted: AtomicBool::new(false),
            interrupted_at: OnceLock::new(),
            // A little ahead, so that executor start-up does not bunch the
            // first connects.
            t0: Instant::now() + Duration::from_millis(10),
            interrupted,
        }
    }

    /// Waits until every thread arrived; returns the release instant, or
    /// `None` if the run was aborted (a thread failed to start).
    pub async fn arrive(&self) -> Option<Instant> {
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            let _ = self.released.set(Instant::now());
        }
        loop {
            if self.aborted.load(Ordering::Acquire) {
                return None;
            }
            if let Some(at) = self.released.get() {
                return Some(*at);
            }
            Timer::new(POLL_EVERY).await;
        }
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }

    pub fn is_interrupted(&self) -> bool {
        let yes = self.interrupted.load(Ordering::Relaxed);
        if yes {
            let _ = self.interrupted_at.set(Instant::now());
        }
        yes
    }

    /// When the run was interrupted, if it was.
    pub fn interrupted_at(&self) -> Option<Instant> {
        self.interrupted_at.get().copied()
    }

    /// When all threads passed the gate, if they did.
    pub fn released(&self) -> Option<Instant> {
        self.released.get().copied()
    }
}

/// Aborts the gate if a thread unwinds, so that the others do not wait for
/// it forever.
struct AbortOnPanic(Arc<Gate>);

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort();
        }
    }
}

/// Runs `body(thread_index)` on `plan.threads` executors and collects what
/// each returns, in thread order.
pub fn run_threads<T, F, Fut>(plan: &ConnPlan, gate: &Arc<Gate>, body: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + 'static,
{
    let body = Arc::new(body);
    let mut handles = Vec::with_capacity(plan.threads);
    let mut failure = None;
    for t in 0..plan.threads {
        let cpu = plan.cpus.as_ref().map(|c| c[t]);
        let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
        let body = body.clone();
        let guard = AbortOnPanic(gate.clone());
        let spawned = LocalExecutorBuilder::new(placement)
            .name("loadgen")
            .io_memory(IO_MEMORY_BYTES)
            .spawn(move || async move {
                let _guard = guard;
                body(t).await
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                gate.abort();
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                failure = Some(match cpu {
                    Some(c) => anyhow!(
                        "cannot start an executor on CPU {c}: {e} (this machine has CPUs 0-{}; \
                         fix --cpus or leave it out)",
                        cpus - 1
                    ),
                    None => anyhow!(
                        "cannot start an executor: {e} (io_uring needs locked memory: check \
                         ulimit -l)"
                    ),
                });
                break;
            }
        }
    }
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok(v) => out.push(v),
            Err(e) => {
                failure.get_or_insert_with(|| anyhow!("an executor thread failed: {e}"));
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Spawns `spawn(index)` for each connection index at its due time,
/// `t0 + index / connect_rate`, so that all threads together open
/// `--connect-rate` connections per second. Stops early on Ctrl-C.
pub async fn spawn_paced<T: 'static>(
    plan: &ConnPlan,
    gate: &Gate,
    indices: impl Iterator<Item = usize>,
    mut spawn: impl FnMut(usize) -> Task<T>,
) -> Vec<Task<T>> {
    let mut tasks = Vec::new();
    for index in indices {
        let due = gate.t0 + Duration::from_secs_f64(index as f64 / plan.connect_rate);
        let now = Instant::now();
        if due > now {
            Timer::new(due - now).await;
        }
        if gate.is_interrupted() {
            break;
        }
        tasks.push(spawn(index));
    }
    tasks
}

/// Closes `stop` (waking every task waiting on it) when Ctrl-C arrives;
/// ends once `done` is set.
pub fn watch_interrupt(gate: Arc<Gate>, stop: Rc<Semaphore>, done: Rc<Cell<bool>>) -> Task<()> {
    glommio::spawn_local(async move {
        while !done.get() {
            if gate.is_interrupted() {
                stop.close();
                return;
            }
            Timer::new(INTERRUPT_POLL_EVERY).await;
        }
    })
}
