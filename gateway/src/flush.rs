//! Flush rounds: when a shard's room members send what their rooms queued.
//!
//! A room's frame does not wake its members' tasks directly. The members go
//! on the shard's list for the next round, and one flusher task wakes them
//! a slice at a time. Between slices it collects the shard's socket events,
//! so connections with input (publishers) are read before the rest of the
//! round is sent. Without that, under load, a publisher is read once per
//! round: every member's `send` carries at most what the room's publishers
//! could have unacked (their windows), and the kernel's per-`send` cost
//! (three quarters of the shard's CPU in a fan-out benchmark) is paid for
//! that many frames. Reading publishers during the round lets the frames of
//! several of their turns ride in each member's one `send`.
//!
//! The interleaving is a preference, not a promise: a read between slices
//! starts only while less than half an outbound budget of room frames was
//! appended on the shard since the round began, or the shard's feeds hold
//! less than half a budget in all (see [`Flusher::interleave`]); otherwise
//! the rest of the round runs as if publishers were read once per round, as
//! before flush rounds. A member that keeps reading sent everything up to
//! its slice of the last round, so what it has queued is what came after:
//! the extra turns of a round add at most about half a budget to it; and
//! feeds that hold less than half a budget hold less than that for anyone.
//! That is a soft bound, not a hard one (one read can take in more than the
//! rest of the half budget); the hard bounds stay where they were: the
//! outbound budget, the slow-consumer timeout and the 4× cap. Counting what
//! the round appended, not only what the feeds hold, keeps one member that
//! stopped reading (whose backlog the feeds hold until it is closed) from
//! turning the interleaving off for the whole shard.
//!
//! # Invariants
//! - Owned by one shard; `!Send` (`RefCell`, `Rc`).
//! - A connection is on the list at most once (`ConnShared::flush_pending`):
//!   one entry per connection per round, plus the entries of connections
//!   that closed since (the round skips them by generation). It never
//!   refuses.
//! - The flusher wakes each listed member once per round, in list order; a
//!   member scheduled by a frame that arrives after its slice was woken goes
//!   on the next round's list. (A member may also send in between, woken by
//!   its own input or socket: the flusher's wake then finds little to do.)
//! - Only wakes: a member's task does its own `send`, so its output order,
//!   its back-pressure and its slow-consumer clock are unchanged.
//! - Never blocks: the collect between slices is `epoll_wait` with a zero
//!   timeout; no `RefCell` borrow is held across an `.await`.

use std::{
    cell::{Cell, RefCell},
    future::poll_fn,
    rc::Rc,
    task::{Poll, Waker},
};

use crate::{
    conn::{ConnShared, Conns},
    feed,
    local::Local,
    readiness::Poller,
};

/// Members woken between two looks at the shard's sockets.
const SLICE: usize = 64;

/// The next round's members and the flusher task's waker.
#[derive(Default)]
pub struct Flusher {
    /// `(slab key, generation)` of each member to wake.
    next: RefCell<Vec<(u32, u32)>>,
    waker: RefCell<Option<Waker>>,
    /// Bytes of room frames ever appended to the shard's feeds, and the
    /// count when the current round began.
    appended: Cell<u64>,
    round_began: Cell<u64>,
    /// Bytes the shard's feeds hold for members that have not sent them
    /// (every feed of the shard adds to it, see `feed::Held`).
    pub held: feed::Held,
}

impl Flusher {
    /// Puts a member with newly queued room frames on the next round.
    pub fn schedule<A>(&self, c: &ConnShared<A>, key: u32, gen: u32) {
        if c.flush_pending.replace(true) {
            return;
        }
        self.next.borrow_mut().push((key, gen));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Takes the members of the round that starts now.
    fn begin_round(&self) -> Vec<(u32, u32)> {
        self.round_began.set(self.appended.get());
        std::mem::take(&mut *self.next.borrow_mut())
    }

    /// Counts a room frame appended to one of the shard's feeds.
    pub fn appended(&self, bytes: usize) {
        self.appended.set(self.appended.get() + bytes as u64);
    }

    /// Whether to read input between slices now: while the round has seen
    /// less than half an outbound budget of room frames appended, or the
    /// shard's feeds (`held`) hold less than that in all. Either keeps
    /// reading members' backlogs small (a soft bound, see the module's
    /// doc); the first also while one member that stopped reading makes the
    /// feeds hold a lot.
    fn interleave(&self, budget: usize, held: u64) -> bool {
        let half = (budget / 2) as u64;
        self.appended.get() - self.round_began.get() < half || held < half
    }
}

/// The shard's flusher task: one round after another, for as long as the
/// shard runs.
pub async fn run<A>(
    local: Rc<Local>,
    conns: Rc<Conns<A>>,
    flusher: Rc<Flusher>,
    poller: Rc<Poller>,
) {
    loop {
        poll_fn(|cx| {
            if flusher.next.borrow().is_empty() {
                *flusher.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        let round = flusher.begin_round();
        let m = local.metrics();
        m.flush_rounds.inc();
        let slices = round.len().div_ceil(SLICE);
        for (i, slice) in round.chunks(SLICE).enumerate() {
            wake_slice(&conns, slice);
            if i + 1 == slices {
                break;
            }
            if flusher.interleave(local.limits.outbound_budget_bytes, flusher.held.get()) {
                m.flush_reads_between_slices.inc();
                // Errors are the dispatcher's to report; it collects next.
                let _ = poller.collect(|token, flags| conns.on_event(token, flags));
            }
            // Behind the woken members and readers: they run first.
            yield_now().await;
        }
    }
}

fn wake_slice<A>(conns: &Conns<A>, slice: &[(u32, u32)]) {
    let conns = conns.slab.borrow();
    for &(key, gen) in slice {
        if let Some(c) = conns.get(key as usize).filter(|c| c.gen == gen) {
            c.flush_pending.set(false);
            c.wake();
        }
    }
}

/// Goes to the back of the shard's run queue once.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_round_appends_stops_the_reads_between_slices() {
        let budget = 64 * 1024;
        // The feeds hold a stalled member's backlog: more than the budget.
        let held = 4 * budget as u64;
        let f = Flusher::default();
        // A backlog appended before the round does not count against it.
        f.appended(10 * budget);
        f.begin_round();
        assert!(f.interleave(budget, held));
        f.appended(budget / 2 - 1);
        assert!(f.interleave(budget, held), "under half a budget this round");
        f.appended(1);
        assert!(!f.interleave(budget, held), "half a budget this round");
        assert!(
            f.interleave(budget, budget as u64 / 2 - 1),
            "the feeds hold little: members have little queued"
        );
        f.begin_round();
        assert!(
            f.interleave(budget, held),
            "the next round starts from zero"
        );
    }
}
