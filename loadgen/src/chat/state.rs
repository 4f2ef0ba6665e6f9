//! Run state: counters, the shared view, and one connection's state machine.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    fmt,
    future::Future,
    pin::Pin,
    rc::Rc,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use corecast_ws::{Event, OpCode};
use glommio::{sync::Semaphore, timer::Timer};
use hdrhistogram::Histogram;

use crate::{
    client::{Conn, ConnFailure},
    config::ChatPlan,
    exec::Gate,
    scan::{self},
};

use super::*;

/// Counters one thread keeps and the run adds up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Connections that joined their room.
    pub joined: u64,
    /// Connections that failed to open, authenticate or join.
    pub connect_failures: u64,
    /// Publishes sent, warm-up included.
    pub published: u64,
    /// Acks for them, warm-up included.
    pub acked: u64,
    /// Acks marked `"duplicate": true`: this client never retries.
    pub duplicate_acks: u64,
    /// Publishes neither acked nor refused by the end of the drain.
    pub unacked: u64,
    /// Distinct seqs received over all members, warm-up included.
    pub received: u64,
    /// Seqs skipped and never received (counted at the end).
    pub gaps: u64,
    pub duplicates: u64,
    pub reorders: u64,
    /// Messages from one publisher out of its publish order.
    pub publisher_reorders: u64,
    /// Messages in a room that no publisher of that room sent.
    pub foreign: u64,
    /// Acked seqs some member never received (counted at the end).
    pub lost: u64,
    /// `error` frames.
    pub errors: u64,
    /// Frames that are not JSON, lack a field this client needs, or do not
    /// fit (binary, an ack for nothing in flight, a msg for another room).
    pub bad_frames: u64,
    /// Other frames, ignored: presence events and the like.
    pub other_frames: u64,
    /// Connections the server closed or dropped during the run.
    pub unexpected_closes: u64,
    /// Closing handshakes the server did not complete in time.
    pub unclean_closes: u64,
    /// `--reconnect`: connections that dropped and joined again.
    pub reconnects: u64,
    /// Resumes answered `recovered:false` (or that had no epoch to resume
    /// in): what the member missed meanwhile went unchecked.
    pub resume_failures: u64,
    /// Of `unacked`: publishes in flight when their connection dropped.
    /// Their acks died with it and they are never retried, so they do not
    /// fail the run; what they became is checked by the members like any
    /// other message.
    pub unacked_on_drop: u64,
    /// The longest time one member was away, from its drop to its next
    /// `joined` (or to giving up), in ms. Merged by max, not added up.
    pub longest_outage_ms: u64,
}

impl Counts {
    pub(super) fn add(&mut self, o: &Counts) {
        self.joined += o.joined;
        self.connect_failures += o.connect_failures;
        self.published += o.published;
        self.acked += o.acked;
        self.duplicate_acks += o.duplicate_acks;
        self.unacked += o.unacked;
        self.received += o.received;
        self.gaps += o.gaps;
        self.duplicates += o.duplicates;
        self.reorders += o.reorders;
        self.publisher_reorders += o.publisher_reorders;
        self.foreign += o.foreign;
        self.lost += o.lost;
        self.errors += o.errors;
        self.bad_frames += o.bad_frames;
        self.other_frames += o.other_frames;
        self.unexpected_closes += o.unexpected_closes;
        self.unclean_closes += o.unclean_closes;
        self.reconnects += o.reconnects;
        self.resume_failures += o.resume_failures;
        self.unacked_on_drop += o.unacked_on_drop;
        self.longest_outage_ms = self.longest_outage_ms.max(o.longest_outage_ms);
    }

    /// Everything that makes the run fail. Unanswered closes, reconnects
    /// and publishes in flight at a drop do not.
    pub fn failures(&self) -> u64 {
        self.connect_failures
            + self.gaps
            + self.duplicates
            + self.reorders
            + self.publisher_reorders
            + self.foreign
            + self.lost
            + (self.unacked - self.unacked_on_drop)
            + self.resume_failures
            + self.duplicate_acks
            + self.errors
            + self.bad_frames
            + self.unexpected_closes
    }
}

/// The instants one run goes through, the same on every thread.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeline {
    /// The gate opened: the epoch of every `t`.
    pub(super) start: Instant,
    /// End of the warm-up: latencies of publishes due from here on are recorded.
    pub(super) measure: Instant,
    /// No publish is due from here on.
    pub(super) end: Instant,
    /// Acks and deliveries still missing now are unacked and lost.
    pub(super) drain_until: Instant,
}

impl Timeline {
    pub(super) fn new(start: Instant, plan: &ChatPlan) -> Timeline {
        let measure = start + plan.warmup;
        let end = measure + plan.duration;
        Timeline {
            start,
            measure,
            end,
            drain_until: end + plan.drain_timeout,
        }
    }
}

/// Cross-thread state: what a member needs to know it has caught up.
pub(super) struct Shared {
    /// Highest acked seq per room.
    pub(super) max_acked: Vec<AtomicU64>,
    /// Publishers per room that may still publish or wait for an ack.
    pub(super) pubs_left: Vec<AtomicUsize>,
    /// Members not yet holding every acked seq of their room after
    /// publishing ended (or failed); the drain ends at 0.
    pub(super) members_left: AtomicUsize,
}

/// What one member hands back at the end, for the loss count.
pub(super) struct MemberEnd {
    pub(super) room: usize,
    /// Its checks: one, or one more per failed resume.
    pub(super) seqs: Vec<SeqCheck>,
}

/// One thread's state.
pub(super) struct Ctx {
    pub(super) plan: Arc<ChatPlan>,
    pub(super) shared: Arc<Shared>,
    pub(super) gate: Arc<Gate>,
    /// Room names, by index.
    pub(super) rooms: Vec<String>,
    /// Tags publishers put in their ids (`<run>.<p>`), by global publisher index.
    pub(super) tags: Vec<String>,
    pub(super) hist: RefCell<Histogram<u64>>,
    pub(super) ack_hist: RefCell<Histogram<u64>>,
    /// How late publishes went out against their intended time: above a
    /// few hundred µs, this process (not the server) is falling behind.
    pub(super) lag_hist: RefCell<Histogram<u64>>,
    pub(super) counts: RefCell<Counts>,
    /// Acked seqs per room, from this thread's publishers.
    pub(super) acked: RefCell<Vec<Vec<u64>>>,
    pub(super) members: RefCell<Vec<MemberEnd>>,
    pub(super) first_error: RefCell<Option<String>>,
    pub(super) first_connect_error: RefCell<Option<String>>,
    pub(super) warnings: Cell<u32>,
    /// Signalled once per finished connection attempt (joined or failed).
    pub(super) attempted: Semaphore,
    /// Closed when the gate opens (or the run is aborted); `timeline` is
    /// set just before.
    pub(super) started: Semaphore,
    pub(super) timeline: Cell<Option<Timeline>>,
    /// Closed when the run ends (drained, drain timeout, or Ctrl-C).
    pub(super) end: Semaphore,
    /// Closing handshakes still unfinished then are abandoned.
    pub(super) close_until: Cell<Option<Instant>>,
}

impl Ctx {
    pub(super) fn count(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.counts.borrow_mut());
    }

    pub(super) fn note(&self, index: usize, what: &dyn fmt::Display) {
        let n = self.warnings.get();
        if n < MAX_WARNINGS {
            self.warnings.set(n + 1);
            log::warn!("connection {index}: {what}");
        }
        self.first_error
            .borrow_mut()
            .get_or_insert_with(|| format!("connection {index}: {what}"));
    }

    pub(super) fn room_of(&self, index: usize) -> usize {
        index / self.plan.members
    }

    /// Global publisher index of connection `index`, if it publishes.
    pub(super) fn publisher_of(&self, index: usize) -> Option<usize> {
        let member = index % self.plan.members;
        (member < self.plan.publishers).then(|| self.room_of(index) * self.plan.publishers + member)
    }
}

/// A publishing member's side of its connection.
pub(super) struct Publisher {
    /// Global publisher index, the body's `p`.
    pub(super) p: usize,
    /// Fixed rate only: interval between this publisher's publishes and its
    /// offset in the first interval, in seconds.
    pub(super) interval_s: f64,
    pub(super) phase_s: f64,
    pub(super) next_n: u64,
    /// Number and intended send instant of each unacked publish, oldest first.
    pub(super) inflight: VecDeque<(u64, Instant)>,
    pub(super) sending: bool,
    /// Reported to `Shared::pubs_left` as done.
    pub(super) finished: bool,
    pub(super) scratch: Vec<u8>,
}

/// One connection's run: publishing (if a publisher) and receiving.
pub(super) struct ChatConn {
    /// Replaced when the member reconnects.
    pub(super) conn: Conn,
    /// Index of the `--url` `conn` went to; a reconnect tries the next one.
    pub(super) slot: usize,
    pub(super) st: State,
    /// Frames buffered before the run (or with a resume's `joined`) were handled.
    pub(super) primed: bool,
}

/// Everything but the socket, so that a frame borrowed from the socket's
/// buffer can be handled with `&mut State`.
pub(super) struct State {
    pub(super) ctx: Rc<Ctx>,
    pub(super) index: usize,
    pub(super) room: usize,
    pub(super) t: Timeline,
    /// The gate opened: `t` is the run's, publishing may start.
    pub(super) started: bool,
    pub(super) seqs: SeqCheck,
    /// Checks closed by failed resumes, oldest first.
    pub(super) closed: Vec<SeqCheck>,
    /// `epoch` of the last `joined`, for the next resume; empty when the
    /// server had none (then there is no resume point).
    pub(super) epoch: String,
    /// After a failed resume: `missed` frames (seqs up to `skip_upto`) the
    /// server still sends. They belong to the closed check, not the new one,
    /// and are passed over.
    pub(super) skip: u64,
    pub(super) skip_upto: u64,
    /// Per publisher of the room: one past the last `n` received, 0 = none yet.
    pub(super) next_n: Vec<u64>,
    pub(super) publisher: Option<Publisher>,
    pub(super) caught_up: bool,
    pub(super) timer: Timer,
    /// What `timer` is set for; re-armed only when that changes.
    pub(super) armed: Option<Instant>,
}

impl ChatConn {
    /// A joined connection, not started yet: it only reads until
    /// [`State::begin`].
    pub(super) fn new(
        conn: Conn,
        ctx: Rc<Ctx>,
        index: usize,
        slot: usize,
        joined: Joined,
    ) -> ChatConn {
        let plan = &ctx.plan;
        let publisher = ctx.publisher_of(index).map(|p| {
            let total = (plan.rooms * plan.publishers) as f64;
            let (interval_s, phase_s) = match plan.rate {
                Some(rate) => (total / rate, p as f64 / rate),
                None => (0.0, 0.0),
            };
            Publisher {
                p,
                interval_s,
                phase_s,
                next_n: 0,
                inflight: VecDeque::with_capacity(plan.window.min(1024)),
                sending: true,
                finished: false,
                scratch: Vec::with_capacity(plan.size + 256),
            }
        });
        ChatConn {
            conn,
            slot,
            primed: false,
            st: State {
                room: ctx.room_of(index),
                next_n: vec![0; plan.publishers],
                seqs: SeqCheck::new(joined.seq),
                closed: Vec::new(),
                epoch: joined.epoch,
                skip: 0,
                skip_upto: 0,
                publisher,
                caught_up: false,
                timer: Timer::new(Duration::from_secs(3600)),
                armed: None,
                index,
                // Replaced when the gate opens; unused before.
                t: Timeline::new(Instant::now(), plan),
                started: false,
                ctx,
            },
        }
    }

    /// The member is back on `conn` after an outage of `away`: the resume
    /// from `since` either continues its check or closes it.
    pub(super) fn resumed(&mut self, conn: Conn, joined: Joined, since: u64, away: Duration) {
        self.conn = conn;
        self.primed = false;
        let st = &mut self.st;
        st.armed = None;
        let ctx = &st.ctx;
        ctx.count(|c| {
            c.reconnects += 1;
            c.longest_outage_ms = c.longest_outage_ms.max(away.as_millis() as u64);
        });
        let why = match joined.resumed {
            Some((true, _)) => {
                st.seqs.on_resume(since);
                st.epoch = joined.epoch;
                return;
            }
            Some((false, missed)) => {
                st.skip = missed;
                st.skip_upto = joined.seq;
                "recovered:false"
            }
            None if st.epoch.is_empty() => "no epoch to resume in (the first joined had none)",
            None => "the joined has no recovered field (does the server resume?)",
        };
        ctx.count(|c| c.resume_failures += 1);
        ctx.note(
            st.index,
            &format_args!(
                "{}: resume from seq {since} failed: {why}; going on from seq {} unchecked \
                 in between",
                ctx.rooms[st.room], joined.seq
            ),
        );
        let mut old = std::mem::replace(&mut st.seqs, SeqCheck::new(joined.seq));
        old.close();
        st.closed.push(old);
        st.epoch = joined.epoch;
    }

    /// Drives the connection until it fails; the run's end is raced against it.
    pub(super) fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<ConnFailure> {
        if !self.primed {
            // Frames that arrived with `joined` (presence events) or while
            // waiting at the gate are buffered already.
            self.primed = true;
            if let Err(f) = self.on_bytes(Instant::now()) {
                return Poll::Ready(f);
            }
        }
        for _ in 0..POLL_BUDGET {
            let now = Instant::now();
            self.top_up(now);
            self.st.check_progress(now);
            if self.conn.has_pending_tx() {
                if let Poll::Ready(Err(e)) = self.conn.poll_flush(cx) {
                    return Poll::Ready(ConnFailure::Io(e.kind()));
                }
            }
            match self.conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(ConnFailure::Eof),
                Poll::Ready(Ok(_)) => {
                    if let Err(f) = self.on_bytes(Instant::now()) {
                        return Poll::Ready(f);
                    }
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(ConnFailure::Io(e.kind())),
                Poll::Pending => {}
            }
            match self.st.next_wake(now) {
                Some(at) if self.st.poll_wake(at, cx).is_ready() => {}
                _ => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Queues the publishes that are due.
    pub(super) fn top_up(&mut self, now: Instant) {
        let st = &mut self.st;
        let Some(p) = st.publisher.as_mut().filter(|_| st.started) else {
            return;
        };
        let ctx = &st.ctx;
        let plan = &ctx.plan;
        while p.sending && p.inflight.len() < plan.window {
            let at = match plan.rate {
                None if now >= st.t.end => {
                    p.sending = false;
                    break;
                }
                None => now,
                Some(_) => {
                    let due = st.t.start
                        + Duration::from_secs_f64(p.phase_s + p.next_n as f64 * p.interval_s);
                    if due >= st.t.end {
                        p.sending = false;
                        break;
                    }
                    if due > now {
                        break;
                    }
                    due
                }
            };
            let t_ns = at.saturating_duration_since(st.t.start).as_nanos() as u64;
            let mask = self.conn.mask();
            encode_publish(
                self.conn.tx_mut(),
                &mut p.scratch,
                &ctx.rooms[st.room],
                &ctx.tags[p.p],
                p.p as u64,
                p.next_n,
                t_ns,
                plan.size,
                mask,
            );
            if plan.rate.is_some() && at >= st.t.measure {
                let lag = now.saturating_duration_since(at).as_micros() as u64;
                ctx.lag_hist.borrow_mut().saturating_record(lag);
            }
            p.inflight.push_back((p.next_n, at));
            p.next_n += 1;
            ctx.count(|c| c.published += 1);
        }
        if p.sending && plan.rate.is_some() && now >= st.t.end {
            p.sending = false;
        }
    }

    /// Handles every complete frame in the receive buffer.
    pub(super) fn on_bytes(&mut self, now: Instant) -> Result<(), ConnFailure> {
        loop {
            match self.conn.next_event() {
                Ok(None) => return Ok(()),
                Err(e) => return Err(ConnFailure::Protocol(e)),
                Ok(Some(Event::Message { opcode, data })) => {
                    if opcode == OpCode::Text {
                        self.st.on_message(data, now);
                    } else {
                        self.st.bad_frame(&"a binary message on a chat connection");
                    }
                }
                Ok(Some(Event::Ping(_) | Event::Pong(_))) => {}
                Ok(Some(Event::Close { code, .. })) => return Err(ConnFailure::ServerClosed(code)),
            }
        }
    }
}

impl State {
    /// The connection dropped and the member will try to come back: its
    /// publishes in flight will never be acked, and are not retried.
    pub(super) fn on_drop(&mut self) {
        if let Some(p) = self.publisher.as_mut() {
            let n = p.inflight.len() as u64;
            p.inflight.clear();
            self.ctx.count(|c| {
                c.unacked += n;
                c.unacked_on_drop += n;
            });
        }
    }

    /// The gate opened.
    pub(super) fn begin(&mut self, t: Timeline) {
        self.t = t;
        self.started = true;
        self.armed = None;
    }

    pub(super) fn bad_frame(&self, what: &dyn fmt::Display) {
        self.ctx.count(|c| c.bad_frames += 1);
        self.ctx.note(self.index, what);
    }

    /// One whole text message from the server.
    pub(super) fn on_message(&mut self, bytes: &[u8], now: Instant) {
        if let Some(m) = scan::msg(bytes) {
            return self.on_msg(&m, now);
        }
        let m: Incoming = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => {
                let head = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]);
                return self.bad_frame(&format_args!("unreadable frame ({e}): {head}"));
            }
        };
        match m.kind {
            "msg" => self.on_msg(
                &scan::Msg {
                    room: m.room.map(str::as_bytes),
                    seq: m.seq,
                    body: m.body,
                },
                now,
            ),
            "ack" => self.on_ack(&m, now),
            "error" => {
                self.ctx.count(|c| c.errors += 1);
                self.ctx.note(
                    self.index,
                    &format_args!(
                        "error {}: {}{}",
                        m.code.unwrap_or("(no code)"),
                        m.message.as_deref().unwrap_or(""),
                        error_hint(m.code)
                    ),
                );
                // A refused publish is answered: stop waiting for its ack.
                if let (Some(p), Some(id)) = (self.publisher.as_mut(), m.id) {
                    if let Some(n) = publish_number(id, &self.ctx.tags[p.p]) {
                        if let Some(i) = p.inflight.iter().position(|&(k, _)| k == n) {
                            p.inflight.remove(i);
                        }
                    }
                }
            }
            _ => self.ctx.count(|c| c.other_frames += 1),
        }
    }

    pub(super) fn on_msg(&mut self, m: &scan::Msg, now: Instant) {
        if !self.started {
            // The gate opened on this thread and a publisher was quicker
            // than this connection's switch to running: the message is ours.
            if let Some(t) = self.ctx.timeline.get() {
                self.begin(t);
            }
        }
        let ctx = &self.ctx;
        let room = &ctx.rooms[self.room];
        let (Some(seq), Some(body)) = (m.seq, m.body.as_ref()) else {
            return self.bad_frame(&"a msg without seq or body");
        };
        if m.room != Some(room.as_bytes()) {
            return self.bad_frame(&format_args!(
                "a msg for room {:?} on a connection in {room}",
                m.room.map(String::from_utf8_lossy)
            ));
        }
        if self.skip > 0 && seq <= self.skip_upto {
            self.skip -= 1;
            return;
        }
        match self.seqs.on_seq(seq) {
            SeqVerdict::InOrder => {}
            SeqVerdict::Gap(n) => ctx.note(
                self.index,
                &format_args!("{room}: seq {seq} after {}: {n} skipped", seq - n - 1),
            ),
            SeqVerdict::Reordered => {
                ctx.note(self.index, &format_args!("{room}: seq {seq} arrived late"));
            }
            SeqVerdict::Duplicate => {
                ctx.note(self.index, &format_args!("{room}: seq {seq} again"));
                return;
            }
            SeqVerdict::Replayed => return,
        }
        if !self.started {
            ctx.count(|c| c.foreign += 1);
            return ctx.note(
                self.index,
                &format_args!("{room}: seq {seq} before publishing started"),
            );
        }
        let first_p = (self.room * ctx.plan.publishers) as u64;
        let (Some(t), Some(p), Some(n)) = (body.t, body.p, body.n) else {
            ctx.count(|c| c.foreign += 1);
            return ctx.note(self.index, &format_args!("{room}: seq {seq} is not ours"));
        };
        let Some(slot) = p
            .checked_sub(first_p)
            .and_then(|j| self.next_n.get_mut(j as usize))
        else {
            ctx.count(|c| c.foreign += 1);
            return ctx.note(
                self.index,
                &format_args!("{room}: seq {seq} from publisher {p} of another room"),
            );
        };
        if n < *slot {
            ctx.count(|c| c.publisher_reorders += 1);
            ctx.note(
                self.index,
                &format_args!("{room}: publisher {p}'s message {n} after {}", *slot - 1),
            );
        } else {
            *slot = n + 1;
        }
        let intended = self.t.start + Duration::from_nanos(t);
        if intended >= self.t.measure {
            let us = now.saturating_duration_since(intended).as_micros() as u64;
            ctx.hist.borrow_mut().saturating_record(us);
        }
    }

    pub(super) fn on_ack(&mut self, m: &Incoming, now: Instant) {
        let ctx = &self.ctx;
        let Some(p) = self.publisher.as_mut() else {
            return self.bad_frame(&"an ack on a connection that never published");
        };
        let n = m.id.and_then(|id| publish_number(id, &ctx.tags[p.p]));
        let (Some(n), Some(seq)) = (n, m.seq) else {
            return self.bad_frame(&format_args!("an ack without our id or a seq: {:?}", m.id));
        };
        // Acks come in publish order; search only when they do not.
        let i = match p.inflight.front() {
            Some(&(k, _)) if k == n => Some(0),
            _ => p.inflight.iter().position(|&(k, _)| k == n),
        };
        let Some((_, at)) = i.and_then(|i| p.inflight.remove(i)) else {
            return self.bad_frame(&format_args!("an ack for publish {n}, not in flight"));
        };
        if m.duplicate {
            ctx.count(|c| c.duplicate_acks += 1);
            ctx.note(
                self.index,
                &format_args!("ack of publish {n} says duplicate"),
            );
        }
        ctx.count(|c| c.acked += 1);
        ctx.acked.borrow_mut()[self.room].push(seq);
        ctx.shared.max_acked[self.room].fetch_max(seq, Ordering::AcqRel);
        if at >= self.t.measure {
            let us = now.saturating_duration_since(at).as_micros() as u64;
            ctx.ack_hist.borrow_mut().saturating_record(us);
        }
    }

    /// After publishing ended: reports a publisher done once all its acks
    /// are in, and a member caught up once it holds every acked seq of its
    /// room and no publisher of the room is left.
    pub(super) fn check_progress(&mut self, now: Instant) {
        if !self.started || now < self.t.end {
            return;
        }
        let shared = &self.ctx.shared;
        if let Some(p) = self.publisher.as_mut() {
            if !p.sending && !p.finished && p.inflight.is_empty() {
                p.finished = true;
                shared.pubs_left[self.room].fetch_sub(1, Ordering::AcqRel);
            }
        }
        if !self.caught_up
            && shared.pubs_left[self.room].load(Ordering::Acquire) == 0
            && self
                .seqs
                .has_all_up_to(shared.max_acked[self.room].load(Ordering::Acquire))
        {
            self.caught_up = true;
            shared.members_left.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// When to wake up if nothing arrives: the next publish, the end of
    /// publishing, or (draining, not caught up) a short poll. `None`: only
    /// the socket or the end of the run.
    pub(super) fn next_wake(&self, now: Instant) -> Option<Instant> {
        if !self.started {
            return None;
        }
        if let Some(p) = self.publisher.as_ref().filter(|p| p.sending) {
            return Some(match self.ctx.plan.rate {
                Some(_) if p.inflight.len() < self.ctx.plan.window => {
                    let due = self.t.start
                        + Duration::from_secs_f64(p.phase_s + p.next_n as f64 * p.interval_s);
                    due.min(self.t.end)
                }
                _ => self.t.end,
            });
        }
        if self.caught_up {
            None
        } else if now < self.t.end {
            Some(self.t.end)
        } else {
            Some(now + DRAIN_POLL)
        }
    }

    /// Ready when `at` has passed; otherwise arms the timer for it.
    pub(super) fn poll_wake(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        if at <= now {
            return Poll::Ready(());
        }
        if self.armed == Some(at) {
            return Poll::Pending;
        }
        self.armed = Some(at);
        self.timer.reset(at - now);
        match Pin::new(&mut self.timer).poll(cx) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The connection is over (failed, or the run ended): whatever it still
    /// owed the drain is given up.
    pub(super) fn retire(&mut self, count_unacked: bool) {
        let shared = &self.ctx.shared;
        if let Some(p) = self.publisher.as_mut() {
            if count_unacked {
                let unacked = p.inflight.len() as u64;
                self.ctx.count(|c| c.unacked += unacked);
            }
            if !p.finished {
                p.finished = true;
                shared.pubs_left[self.room].fetch_sub(1, Ordering::AcqRel);
            }
        }
        if !self.caught_up {
            self.caught_up = true;
            shared.members_left.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
