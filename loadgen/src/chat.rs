//! `loadgen chat`: the gateway's chat protocol (`corecast.v1`,
//! docs/protocol.md) under load.
//!
//! `--rooms` rooms of `--members` connections each, one user per
//! connection; the first `--publishers` members of a room also publish.
//! Every connection upgrades, waits for `welcome`, joins its room and keeps
//! `joined.seq` as its base; publishing starts only once every member of
//! every room has joined (the executors' start gate), so every member must
//! receive every message of the run: seqs `base + 1, base + 2, ...`, each
//! once, in order ([`SeqCheck`]), and from each publisher in the order it
//! published. A publish body carries its intended send time (`t`, ns since
//! the gate opened), its publisher (`p`) and its number (`n`); delivery and
//! ack latencies run from that intended time, so a stalled publisher cannot
//! hide them (coordinated omission). After the run every member should hold
//! every acked seq of its room: the shortfall is `lost`.
//!
//! A room's publishers and members must live in one process: `t` is read
//! against this process's clock.
//!
//! # Reconnecting (`--reconnect`)
//! Without it a dropped connection is a failure (`unexpected_closes`) and
//! its member stops. With it a member survives its gateway node going away.
//! When its connection drops after it joined because the server went away
//! ([`reconnectable`]: a close 1001 or 1011-1014, EOF, a reset), it
//! tries the next `--url` round-robin
//! ([`next_target`](crate::config::ConnPlan::next_target)), first at
//! once, then backing off from 100 ms to 1 s, until `--reconnect-timeout-s`
//! after the drop (then it is an unexpected close). Each try connects, waits
//! for `welcome` and joins with `since` = [`SeqCheck::resume_point`] (the
//! highest seq it holds without a hole) and the `epoch` of its last `joined`.
//! - `recovered:true`: the same [`SeqCheck`] goes on. The missed `msg`
//!   frames are checked like live ones, so a duplicate or reorder in the
//!   replay counts; seqs the replay brings again because the resume started
//!   below a hole are expected ([`SeqVerdict::Replayed`]). So a member that
//!   resumed still holds every acked seq of its room from its first base on,
//!   or the shortfall is `lost`.
//! - Anything else (`recovered:false`, or no epoch to resume in) is a resume
//!   failure, which fails the run. The check so far is closed at what it
//!   received, and a fresh one starts at the new `joined.seq`; the `missed`
//!   frames a `recovered:false` still brings are passed over. The range in
//!   between is the resume failure's, not counted again as lost. Acked seqs
//!   carry no epoch: if the room's numbering restarted, `lost` compares
//!   numbers of two epochs and means little, but the run failed already.
//!
//! Publishes in flight at the drop are never retried: they count as
//! `unacked` (and `unacked_on_drop`), not as lost, and do not fail the run
//! (their acks died with the connection). Nor, with `--reconnect`, do other
//! unacked publishes: one forwarded to a node that died with it is never
//! answered (`ChatReport::is_clean`). Publishes due while away go out
//! after the resume, their latencies still running from their intended time,
//! as do those of the missed messages. The report adds `reconnects`,
//! `resume_failures` and the longest outage (drop to the next `joined`).
//!
//! # Invariants
//! - One task per connection, on the thread that opened it. Per-thread
//!   counters, histograms and acked seqs live in an `Rc<Ctx>`; no `RefCell`
//!   borrow lives across an `.await`.
//! - Threads share only [`Shared`] (atomics: per-room highest acked seq and
//!   publishers still running, members not caught up) and the gate.
//! - A member that reconnects keeps its task and its `State`; only the
//!   socket is replaced, so its checks, publish numbers and its share of
//!   `Shared` carry over. Nothing is retried.
//! - Unacked publishes per publisher are bounded by the plan's window, so
//!   the send buffer holds at most that many frames plus control replies.
//! - No allocation per message once buffers reached their steady size:
//!   frames are parsed in place (borrowed `&str`), publishes formatted into
//!   a reused scratch buffer; one clock read per batch of received frames.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    fmt,
    future::{poll_fn, Future},
    io::Write as _,
    ops::Range,
    pin::Pin,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use corecast_router::auth::{self, Claims};
use corecast_ws::{encode_frame, Event, OpCode};
use futures_lite::future::or;
use glommio::{sync::Semaphore, timer::Timer};
use hdrhistogram::Histogram;
use serde::Deserialize;

use crate::{
    client::{CloseOutcome, Conn, ConnFailure, ConnOptions, XorShift},
    config::{ChatPlan, Target},
    exec::{self, Gate},
    report::{self, JsonLine, Latency},
    scan::{self, Body},
};

/// The subprotocol offered in every upgrade.
pub const SUBPROTOCOL: &str = "corecast.v1";

/// Loop turns one connection takes per poll before it yields.
const POLL_BUDGET: usize = 32;

/// Receive buffer each connection starts with; it grows for larger frames.
const INITIAL_RX_BYTES: usize = 8 << 10;

/// Smallest frame limit: presence answers and error frames are small, but
/// not bounded by `--size`.
const MIN_FRAME_LIMIT: usize = 64 << 10;

/// Skipped-seq ranges one member tracks; past it the oldest range is
/// dropped and counted as gaps at once (a late arrival from it then counts
/// as a duplicate). Bounds memory against a server that skips wildly.
const MAX_MISSING_RANGES: usize = 1024;

/// How often a member that has not caught up looks again after publishing
/// ended (the last acks may arrive on another thread).
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// How often each thread's watcher looks at the Ctrl-C flag and, once
/// publishing ended, at whether every member caught up.
const WATCH_RUN: Duration = Duration::from_millis(50);
const WATCH_DRAIN: Duration = Duration::from_millis(2);

/// Per-connection problems logged as warnings, per thread.
const MAX_WARNINGS: u32 = 5;

/// Tokens stay valid this long after the run's planned end; the gateway
/// checks them at the upgrade only, but a run may start slowly.
const TOKEN_SLACK_S: u64 = 3600;

/// `--reconnect`: the wait after a failed try, doubling up to the maximum.
/// The first try goes out at once: the next URL is likely a live node.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a dropped connection that got a close frame may take to finish
/// the closing handshake before the reconnect: the outage should not wait
/// on a dying node.
const CLOSE_BEFORE_RECONNECT: Duration = Duration::from_millis(250);

// ---------------------------------------------------------------------------
// Ordering

/// How one `msg` seq relates to what the member received before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// Exactly the previous + 1.
    InOrder,
    /// Higher than expected: this many seqs were skipped (so far).
    Gap(u64),
    /// Lower than expected but never received: it arrived after a later one.
    Reordered,
    /// Already received (or at or below the join base).
    Duplicate,
    /// Already received, brought again in order by a resume that started
    /// below a hole ([`SeqCheck::on_resume`]): expected, not a duplicate.
    Replayed,
}

/// One member's view of its room's sequence: every `msg` seq must be exactly
/// the previous + 1, starting at `joined.seq + 1`. A resume with
/// `recovered:true` continues it; a failed one closes it ([`SeqCheck::close`])
/// and the member starts a new one.
#[derive(Debug, Clone)]
pub struct SeqCheck {
    /// `joined.seq`: everything after it must arrive.
    base: u64,
    /// One past the highest seq received.
    next: u64,
    /// Seqs skipped (a higher one arrived first) and not received since:
    /// ascending, disjoint, non-empty ranges.
    missing: Vec<Range<u64>>,
    /// Skipped seqs no longer tracked (see [`MAX_MISSING_RANGES`]).
    untracked: u64,
    /// Lowest seq of those untracked ranges (meaningful while `untracked` >
    /// 0): a resume must start below it, since nothing says which are held.
    untracked_from: u64,
    /// After a resume from below `next`: the seq the replay should bring
    /// next. Seqs it brings in order that are held already are
    /// [`SeqVerdict::Replayed`]; without it they would read as duplicates.
    replay: Option<u64>,
    /// A failed resume ended this check: acked seqs past what it received
    /// are the resume failure's, not lost by this check.
    closed: bool,
    /// Distinct seqs received.
    pub received: u64,
    pub duplicates: u64,
    pub reorders: u64,
}

impl SeqCheck {
    pub fn new(base: u64) -> SeqCheck {
        SeqCheck {
            base,
            next: base + 1,
            missing: Vec::new(),
            untracked: 0,
            untracked_from: u64::MAX,
            replay: None,
            closed: false,
            received: 0,
            duplicates: 0,
            reorders: 0,
        }
    }

    pub fn on_seq(&mut self, seq: u64) -> SeqVerdict {
        if let Some(r) = self.replay {
            if seq == r {
                self.replay = (r + 1 < self.next).then_some(r + 1);
                return match self.missing_index(seq) {
                    Some(i) => self.fill(i, seq),
                    None => SeqVerdict::Replayed,
                };
            }
            if seq >= self.next {
                // The replay stopped short: what it skipped stays missing.
                self.replay = None;
            }
        }
        if seq == self.next {
            self.next += 1;
            self.received += 1;
            return SeqVerdict::InOrder;
        }
        if seq > self.next {
            let skipped = seq - self.next;
            if self.missing.len() == MAX_MISSING_RANGES {
                let dropped = self.missing.remove(0);
                self.untracked += dropped.end - dropped.start;
                self.untracked_from = self.untracked_from.min(dropped.start);
            }
            self.missing.push(self.next..seq);
            self.next = seq + 1;
            self.received += 1;
            return SeqVerdict::Gap(skipped);
        }
        let Some(i) = self.missing_index(seq) else {
            self.duplicates += 1;
            return SeqVerdict::Duplicate;
        };
        self.fill(i, seq)
    }

    /// The missing range holding `seq`, if it is one of the tracked skipped seqs.
    fn missing_index(&self, seq: u64) -> Option<usize> {
        // Recent gaps are the likely ones to fill: search from the end.
        (seq > self.base)
            .then(|| self.missing.iter().rposition(|r| r.contains(&seq)))
            .flatten()
    }

    /// `seq`, skipped before and found in `missing[i]`, arrived late.
    fn fill(&mut self, i: usize, seq: u64) -> SeqVerdict {
        let r = self.missing[i].clone();
        match (seq == r.start, seq + 1 == r.end) {
            (true, true) => {
                self.missing.remove(i);
            }
            (true, false) => self.missing[i].start += 1,
            (false, true) => self.missing[i].end -= 1,
            (false, false) => {
                self.missing[i].end = seq;
                self.missing.insert(i + 1, seq + 1..r.end);
            }
        }
        self.reorders += 1;
        self.received += 1;
        SeqVerdict::Reordered
    }

    /// Seqs skipped and never received since.
    pub fn gaps(&self) -> u64 {
        self.untracked + self.missing.iter().map(|r| r.end - r.start).sum::<u64>()
    }

    /// The highest seq such that every seq from the base up to it was
    /// received: where a resume starts (`since`), so that its replay also
    /// brings what the live stream skipped. The base if nothing came.
    pub fn resume_point(&self) -> u64 {
        let mut upto = self.next - 1;
        if let Some(r) = self.missing.first() {
            upto = upto.min(r.start - 1);
        }
        if self.untracked > 0 {
            upto = upto.min(self.untracked_from - 1);
        }
        upto
    }

    /// A resume from `since` (a [`SeqCheck::resume_point`]) was answered
    /// `recovered:true`: the replay brings every seq after `since` in order,
    /// the ones held already included.
    pub fn on_resume(&mut self, since: u64) {
        debug_assert!(since >= self.base && since < self.next);
        self.replay = (since + 1 < self.next).then_some(since + 1);
    }

    /// A resume failed: this check answers only for what it received; the
    /// member goes on in a new one.
    pub fn close(&mut self) {
        self.closed = true;
        self.replay = None;
    }

    /// Holds every seq from the base up to and including `seq`.
    pub fn has_all_up_to(&self, seq: u64) -> bool {
        self.next > seq && self.untracked == 0 && self.missing.first().is_none_or(|r| r.start > seq)
    }

    /// Of `acked` (ascending, no repeats), the seqs after the base that this
    /// member never received (a closed check: up to the highest it received).
    pub fn lost_of(&self, acked: &[u64]) -> u64 {
        let count_in = |lo: u64, hi: u64| {
            (acked.partition_point(|&s| s < hi) - acked.partition_point(|&s| s < lo)) as u64
        };
        let tail = match self.closed {
            true => 0,
            false => count_in(self.next.max(self.base + 1), u64::MAX),
        };
        let holes: u64 = self.missing.iter().map(|r| count_in(r.start, r.end)).sum();
        tail + holes
    }
}

// ---------------------------------------------------------------------------
// Frames

/// The fields of a server frame this client reads; the rest is skipped.
/// Strings are borrowed from the frame: the gateway escapes nothing in room
/// names, ids, types or codes; an escaped one fails the parse and counts as
/// a bad frame.
#[derive(Debug, Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    room: Option<&'a str>,
    seq: Option<u64>,
    #[serde(borrow)]
    id: Option<&'a str>,
    body: Option<Body>,
    #[serde(borrow)]
    code: Option<&'a str>,
    /// Error texts may be escaped: owned, and only error frames carry one.
    message: Option<String>,
    #[serde(default)]
    duplicate: bool,
    /// `joined`: the numbering its seq belongs to, kept for a resume.
    #[serde(borrow)]
    epoch: Option<&'a str>,
    /// `joined` after a join with a resume point.
    recovered: Option<bool>,
    missed: Option<u64>,
}

/// Appends one masked `publish` text frame whose `body` is `size` bytes
/// (or its fixed fields, if longer). `scratch` is reused between calls.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    room: &str,
    tag: &str,
    p: u64,
    n: u64,
    t_ns: u64,
    size: usize,
    mask: [u8; 4],
) {
    scratch.clear();
    let _ = write!(
        scratch,
        r#"{{"type":"publish","room":"{room}","id":"{tag}-{n}","body":"#
    );
    let body_at = scratch.len();
    let _ = write!(scratch, r#"{{"t":{t_ns},"p":{p},"n":{n},"pad":""#);
    // The body closes with `"}`.
    let fixed = scratch.len() - body_at + 2;
    scratch.resize(scratch.len() + size.saturating_sub(fixed), b'x');
    scratch.extend_from_slice(b"\"}}");
    encode_frame(out, true, OpCode::Text, scratch, Some(mask));
}

/// The publish number in an ack's or error's `id`, if `id` is `<tag>-<n>`.
fn publish_number(id: &str, tag: &str) -> Option<u64> {
    let n = id.strip_prefix(tag)?.strip_prefix('-')?;
    n.parse().ok()
}

// ---------------------------------------------------------------------------
// Run state

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
    fn add(&mut self, o: &Counts) {
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
struct Timeline {
    /// The gate opened: the epoch of every `t`.
    start: Instant,
    /// End of the warm-up: latencies of publishes due from here on are recorded.
    measure: Instant,
    /// No publish is due from here on.
    end: Instant,
    /// Acks and deliveries still missing now are unacked and lost.
    drain_until: Instant,
}

impl Timeline {
    fn new(start: Instant, plan: &ChatPlan) -> Timeline {
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
struct Shared {
    /// Highest acked seq per room.
    max_acked: Vec<AtomicU64>,
    /// Publishers per room that may still publish or wait for an ack.
    pubs_left: Vec<AtomicUsize>,
    /// Members not yet holding every acked seq of their room after
    /// publishing ended (or failed); the drain ends at 0.
    members_left: AtomicUsize,
}

/// What one member hands back at the end, for the loss count.
struct MemberEnd {
    room: usize,
    /// Its checks: one, or one more per failed resume.
    seqs: Vec<SeqCheck>,
}

/// One thread's state.
struct Ctx {
    plan: Arc<ChatPlan>,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    /// Room names, by index.
    rooms: Vec<String>,
    /// Tags publishers put in their ids (`<run>.<p>`), by global publisher index.
    tags: Vec<String>,
    hist: RefCell<Histogram<u64>>,
    ack_hist: RefCell<Histogram<u64>>,
    /// How late publishes went out against their intended time: above a
    /// few hundred µs, this process (not the server) is falling behind.
    lag_hist: RefCell<Histogram<u64>>,
    counts: RefCell<Counts>,
    /// Acked seqs per room, from this thread's publishers.
    acked: RefCell<Vec<Vec<u64>>>,
    members: RefCell<Vec<MemberEnd>>,
    first_error: RefCell<Option<String>>,
    first_connect_error: RefCell<Option<String>>,
    warnings: Cell<u32>,
    /// Signalled once per finished connection attempt (joined or failed).
    attempted: Semaphore,
    /// Closed when the gate opens (or the run is aborted); `timeline` is
    /// set just before.
    started: Semaphore,
    timeline: Cell<Option<Timeline>>,
    /// Closed when the run ends (drained, drain timeout, or Ctrl-C).
    end: Semaphore,
    /// Closing handshakes still unfinished then are abandoned.
    close_until: Cell<Option<Instant>>,
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

    fn room_of(&self, index: usize) -> usize {
        index / self.plan.members
    }

    /// Global publisher index of connection `index`, if it publishes.
    fn publisher_of(&self, index: usize) -> Option<usize> {
        let member = index % self.plan.members;
        (member < self.plan.publishers).then(|| self.room_of(index) * self.plan.publishers + member)
    }
}

/// A publishing member's side of its connection.
struct Publisher {
    /// Global publisher index, the body's `p`.
    p: usize,
    /// Fixed rate only: interval between this publisher's publishes and its
    /// offset in the first interval, in seconds.
    interval_s: f64,
    phase_s: f64,
    next_n: u64,
    /// Number and intended send instant of each unacked publish, oldest first.
    inflight: VecDeque<(u64, Instant)>,
    sending: bool,
    /// Reported to `Shared::pubs_left` as done.
    finished: bool,
    scratch: Vec<u8>,
}

/// One connection's run: publishing (if a publisher) and receiving.
struct ChatConn {
    /// Replaced when the member reconnects.
    conn: Conn,
    /// Index of the `--url` `conn` went to; a reconnect tries the next one.
    slot: usize,
    st: State,
    /// Frames buffered before the run (or with a resume's `joined`) were handled.
    primed: bool,
}

/// Everything but the socket, so that a frame borrowed from the socket's
/// buffer can be handled with `&mut State`.
struct State {
    ctx: Rc<Ctx>,
    index: usize,
    room: usize,
    t: Timeline,
    /// The gate opened: `t` is the run's, publishing may start.
    started: bool,
    seqs: SeqCheck,
    /// Checks closed by failed resumes, oldest first.
    closed: Vec<SeqCheck>,
    /// `epoch` of the last `joined`, for the next resume; empty when the
    /// server had none (then there is no resume point).
    epoch: String,
    /// After a failed resume: `missed` frames (seqs up to `skip_upto`) the
    /// server still sends. They belong to the closed check, not the new one,
    /// and are passed over.
    skip: u64,
    skip_upto: u64,
    /// Per publisher of the room: one past the last `n` received, 0 = none yet.
    next_n: Vec<u64>,
    publisher: Option<Publisher>,
    caught_up: bool,
    timer: Timer,
    /// What `timer` is set for; re-armed only when that changes.
    armed: Option<Instant>,
}

impl ChatConn {
    /// A joined connection, not started yet: it only reads until
    /// [`State::begin`].
    fn new(conn: Conn, ctx: Rc<Ctx>, index: usize, slot: usize, joined: Joined) -> ChatConn {
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
    fn resumed(&mut self, conn: Conn, joined: Joined, since: u64, away: Duration) {
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
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<ConnFailure> {
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
    fn top_up(&mut self, now: Instant) {
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
    fn on_bytes(&mut self, now: Instant) -> Result<(), ConnFailure> {
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
    fn on_drop(&mut self) {
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
    fn begin(&mut self, t: Timeline) {
        self.t = t;
        self.started = true;
        self.armed = None;
    }

    fn bad_frame(&self, what: &dyn fmt::Display) {
        self.ctx.count(|c| c.bad_frames += 1);
        self.ctx.note(self.index, what);
    }

    /// One whole text message from the server.
    fn on_message(&mut self, bytes: &[u8], now: Instant) {
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

    fn on_msg(&mut self, m: &scan::Msg, now: Instant) {
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

    fn on_ack(&mut self, m: &Incoming, now: Instant) {
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
    fn check_progress(&mut self, now: Instant) {
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
    fn next_wake(&self, now: Instant) -> Option<Instant> {
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
    fn poll_wake(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
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
    fn retire(&mut self, count_unacked: bool) {
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

// ---------------------------------------------------------------------------
// Connecting

fn user_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-u{index}")
}

/// Advice for an error frame a load test can cause.
fn error_hint(code: Option<&str>) -> &'static str {
    match code {
        Some("rate_limited") => {
            " (each publisher is one connection: raise the gateway's --rate-limit-per-s and \
             --rate-limit-burst, or spread --rate over more --publishers)"
        }
        Some("body_too_large") => " (lower --size or raise the gateway's --max-body-bytes)",
        _ => "",
    }
}

/// Advice for a close during the welcome/join exchange.
fn close_hint(code: Option<u16>) -> &'static str {
    match code {
        Some(4001) => " (no token: pass --jwt-secret, or run the gateway with --allow-anonymous)",
        Some(4002) | Some(4003) => " (is --jwt-secret the gateway's --jwt-secret?)",
        _ => "",
    }
}

/// What a `joined` said.
#[derive(Debug)]
struct Joined {
    seq: u64,
    /// Empty when the server had no epoch for the room.
    epoch: String,
    /// `(recovered, missed)`, when the join carried a resume point.
    resumed: Option<(bool, u64)>,
}

/// Whether `--reconnect` may bring a member back after `failure`: the
/// server went away (a close without code, 1001 going away, 1011-1014
/// server error, restart, try again later, bad gateway; EOF; a socket
/// error). Not after a framing error or a close that blames this client
/// (1002, 1003, 1007, 1008 slow consumer, 1009, 4xxx): a reconnect would
/// hide it.
pub fn reconnectable(failure: ConnFailure) -> bool {
    match failure {
        ConnFailure::Protocol(_) => false,
        ConnFailure::ServerClosed(None) => true,
        ConnFailure::ServerClosed(Some(code)) => matches!(code, 1001 | 1011..=1014),
        ConnFailure::Eof | ConnFailure::Io(_) => true,
    }
}

/// After the upgrade: waits for `welcome`, joins `room` (resuming from
/// `(since, epoch)` if given), waits for `joined` and consumes it; frames
/// after it (a resume's missed messages) stay buffered.
async fn join(
    conn: &mut Conn,
    room: &str,
    resume: Option<(u64, &str)>,
    welcomed: &Cell<bool>,
) -> Result<Joined, String> {
    loop {
        // Frames that came with the upgrade response (the welcome often
        // does) are already buffered: handle them before reading more.
        loop {
            let welcome = match conn.next_event() {
                Ok(None) => break,
                Err(e) => return Err(ConnFailure::Protocol(e).to_string()),
                Ok(Some(Event::Close { code, reason })) => {
                    return Err(format!(
                        "the server closed with code {} ({reason:?}) before joined{}",
                        code.map_or("none".into(), |c| c.to_string()),
                        close_hint(code)
                    ));
                }
                Ok(Some(Event::Message {
                    opcode: OpCode::Text,
                    data,
                })) => {
                    let m: Incoming = serde_json::from_slice(data).map_err(|e| {
                        format!(
                            "unreadable frame before joined ({e}): {}",
                            String::from_utf8_lossy(&data[..data.len().min(120)])
                        )
                    })?;
                    match m.kind {
                        "welcome" if !welcomed.get() => true,
                        "joined" if welcomed.get() && m.room == Some(room) => {
                            let seq = m.seq.ok_or_else(|| "joined without a seq".to_string())?;
                            return Ok(Joined {
                                seq,
                                epoch: m.epoch.unwrap_or("").to_string(),
                                resumed: m.recovered.map(|r| (r, m.missed.unwrap_or(0))),
                            });
                        }
                        "error" => {
                            return Err(format!(
                                "error {} before joined: {}",
                                m.code.unwrap_or("(no code)"),
                                m.message.as_deref().unwrap_or("")
                            ))
                        }
                        // Anything else before joined (a presence event, a
                        // message of the room) is passed over.
                        _ => false,
                    }
                }
                Ok(Some(_)) => false,
            };
            if welcome {
                welcomed.set(true);
                let mut join = Vec::with_capacity(96);
                let _ = write!(join, r#"{{"type":"join","room":"{room}""#);
                if let Some((since, epoch)) = resume {
                    let _ = write!(join, r#","since":{since},"epoch":"#);
                    let _ = serde_json::to_writer(&mut join, epoch);
                }
                join.push(b'}');
                let mask = conn.mask();
                encode_frame(conn.tx_mut(), true, OpCode::Text, &join, Some(mask));
            }
        }
        conn.flush()
            .await
            .map_err(|e| format!("sending: {}", ConnFailure::Io(e.kind())))?;
        match conn.fill().await {
            Ok(0) => return Err(format!("{} before joined", ConnFailure::Eof)),
            Ok(_) => {}
            Err(e) => return Err(format!("{} before joined", ConnFailure::Io(e.kind()))),
        }
    }
}

/// Opens connection `index` to `--url` number `slot`, with a token for its
/// user if there is a secret, and joins its room (resuming from `resume`,
/// if given).
async fn open(
    ctx: &Ctx,
    index: usize,
    slot: usize,
    exp: u64,
    resume: Option<(u64, &str)>,
) -> Result<(Conn, Joined), String> {
    let plan = &ctx.plan;
    let c = &plan.conn;
    let target: Target = match &plan.jwt_secret {
        Some(secret) => {
            let claims = Claims {
                sub: user_name(&plan.room_prefix, index),
                exp: Some(exp),
                ..Default::default()
            };
            c.target(slot)
                .with_query("token", &auth::mint(secret, &claims))
        }
        None => c.target(slot).clone(),
    };
    let opts = ConnOptions {
        max_frame_bytes: (plan.size + 4096).max(MIN_FRAME_LIMIT),
        initial_rx_bytes: INITIAL_RX_BYTES,
        protocol: Some(SUBPROTOCOL),
    };
    let (mut conn, _) = Conn::connect(
        &target,
        c.source(index),
        index as u64,
        c.connect_timeout,
        opts,
    )
    .await
    .map_err(|e| e.to_string())?;
    let room = &ctx.rooms[ctx.room_of(index)];
    let welcomed = Cell::new(false);
    let joined = async { Some(join(&mut conn, room, resume, &welcomed).await) };
    let timer = async {
        Timer::new(c.connect_timeout).await;
        None
    };
    match or(joined, timer).await {
        Some(Ok(joined)) => Ok((conn, joined)),
        Some(Err(e)) => Err(format!("{}: {e}", target.url)),
        None if welcomed.get() => Err(format!(
            "{}: no joined within {} ms of the join (server overloaded? raise \
             --connect-timeout-ms or lower --connect-rate)",
            target.url,
            c.connect_timeout.as_millis()
        )),
        None => Err(format!(
            "{}: no welcome within {} ms of the upgrade{}",
            target.url,
            c.connect_timeout.as_millis(),
            if plan.jwt_secret.is_none() {
                " (no token was sent: a gateway without --allow-anonymous waits for one; \
                 pass --jwt-secret)"
            } else {
                " (server overloaded? raise --connect-timeout-ms or lower --connect-rate)"
            }
        )),
    }
}

// ---------------------------------------------------------------------------
// Threads

/// How a member's connection ended.
enum Ending {
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
async fn member(ctx: Rc<Ctx>, index: usize, exp: u64) {
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
async fn drive(ctx: &Ctx, c: &mut ChatConn) -> Option<ConnFailure> {
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
async fn reconnect(
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
async fn within<T>(ctx: &Ctx, deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
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
async fn watch_end(ctx: Rc<Ctx>, t: Timeline) -> Instant {
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
struct ThreadReport {
    hist: Histogram<u64>,
    ack_hist: Histogram<u64>,
    lag_hist: Histogram<u64>,
    counts: Counts,
    acked: Vec<Vec<u64>>,
    members: Vec<MemberEnd>,
    ended: Option<Instant>,
    first_error: Option<String>,
    first_connect_error: Option<String>,
}

async fn thread_main(
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

// ---------------------------------------------------------------------------
// The run

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

fn describe(plan: &ChatPlan) -> String {
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

fn human(plan: &ChatPlan, r: &ChatReport) -> String {
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

fn json(plan: &ChatPlan, r: &ChatReport) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use corecast_ws::{Decoder, Limits, Role};

    #[test]
    fn seq_check() {
        use SeqVerdict::*;
        // name, base, seqs in, verdicts, [received, gaps, duplicates, reorders]
        type Case = (
            &'static str,
            u64,
            &'static [u64],
            &'static [SeqVerdict],
            [u64; 4],
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("in order", 41, &[42, 43, 44], &[InOrder, InOrder, InOrder], [3, 0, 0, 0]),
            ("from zero", 0, &[1, 2], &[InOrder, InOrder], [2, 0, 0, 0]),
            ("gap", 0, &[1, 4, 5], &[InOrder, Gap(2), InOrder], [3, 2, 0, 0]),
            ("first seq skipped", 10, &[12], &[Gap(1)], [1, 1, 0, 0]),
            ("duplicate", 0, &[1, 2, 2], &[InOrder, InOrder, Duplicate], [2, 0, 1, 0]),
            ("at or below base", 5, &[5, 3, 6], &[Duplicate, Duplicate, InOrder], [1, 0, 2, 0]),
            ("swap", 0, &[2, 1, 3], &[Gap(1), Reordered, InOrder], [3, 0, 0, 1]),
            ("late arrivals split a gap", 0, &[1, 6, 3, 3, 2, 5, 4],
             &[InOrder, Gap(4), Reordered, Duplicate, Reordered, Reordered, Reordered],
             [6, 0, 1, 4]),
            ("two gaps, one filled", 0, &[2, 5, 1, 6],
             &[Gap(1), Gap(2), Reordered, InOrder], [4, 2, 0, 1]),
            ("late duplicate of a filled hole", 0, &[3, 1, 2, 1, 4],
             &[Gap(2), Reordered, Reordered, Duplicate, InOrder], [4, 0, 1, 2]),
        ];
        for (name, base, seqs, verdicts, [received, gaps, dups, reorders]) in cases {
            let mut c = SeqCheck::new(*base);
            let got: Vec<_> = seqs.iter().map(|&s| c.on_seq(s)).collect();
            assert_eq!(&got, verdicts, "{name}");
            assert_counts(&c, name, [*received, *gaps, *dups, *reorders]);
        }
    }

    /// Received, gaps, duplicates and reorders of a checker.
    fn assert_counts(c: &SeqCheck, name: &str, [received, gaps, dups, reorders]: [u64; 4]) {
        assert_eq!(c.received, received, "{name}: received");
        assert_eq!(c.gaps(), gaps, "{name}: gaps");
        assert_eq!(c.duplicates, dups, "{name}: duplicates");
        assert_eq!(c.reorders, reorders, "{name}: reorders");
    }

    #[test]
    fn seq_check_loss_and_catch_up() {
        let mut c = SeqCheck::new(10);
        for s in [11, 12, 14, 15] {
            c.on_seq(s);
        }
        assert!(c.has_all_up_to(12));
        assert!(!c.has_all_up_to(15), "13 is missing");
        // Acked: 11..=17; 13 missing, 16 and 17 never came.
        let acked: Vec<u64> = (11..=17).collect();
        assert_eq!(c.lost_of(&acked), 3);
        // Seqs at or below the base are not expected.
        assert_eq!(c.lost_of(&[3, 9, 10]), 0);
        c.on_seq(13);
        c.on_seq(16);
        c.on_seq(17);
        assert!(c.has_all_up_to(17));
        assert_eq!(c.lost_of(&acked), 0);
    }

    #[test]
    fn seq_check_bounds_missing_ranges() {
        let mut c = SeqCheck::new(0);
        for i in 0..(MAX_MISSING_RANGES as u64 + 10) {
            c.on_seq(2 * i + 2);
        }
        assert_eq!(c.missing.len(), MAX_MISSING_RANGES);
        assert_eq!(c.gaps(), MAX_MISSING_RANGES as u64 + 10);
        // The oldest hole is no longer tracked: its late seq reads as a duplicate.
        assert_eq!(c.on_seq(1), SeqVerdict::Duplicate);
        assert!(!c.has_all_up_to(1));
    }

    #[test]
    fn resume_points() {
        // name, base, seqs in, resume point
        let cases: &[(&str, u64, &[u64], u64)] = &[
            ("nothing received", 41, &[], 41),
            ("in order", 41, &[42, 43, 44], 44),
            ("below the first hole", 0, &[1, 2, 5, 6], 2),
            ("first seq skipped", 10, &[12, 13], 10),
            ("hole filled", 0, &[1, 3, 2, 4], 4),
            ("two holes", 0, &[1, 3, 5], 1),
        ];
        for (name, base, seqs, want) in cases {
            let mut c = SeqCheck::new(*base);
            for &s in *seqs {
                c.on_seq(s);
            }
            assert_eq!(c.resume_point(), *want, "{name}");
        }
        // Untracked holes: the resume starts below the oldest of them.
        let mut c = SeqCheck::new(0);
        for i in 0..(MAX_MISSING_RANGES as u64 + 3) {
            c.on_seq(10 * i + 10);
        }
        assert_eq!(c.resume_point(), 0);
    }

    #[test]
    fn resume_replay() {
        use SeqVerdict::*;
        // name, base, seqs before the drop, seqs after the resume, verdicts
        // after, [received, gaps, duplicates, reorders] in the end
        type Case = (
            &'static str,
            u64,
            &'static [u64],
            &'static [u64],
            &'static [SeqVerdict],
            [u64; 4],
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("up to date", 10, &[11, 12], &[13, 14], &[InOrder, InOrder], [4, 0, 0, 0]),
            ("nothing missed, then live", 10, &[11], &[12], &[InOrder], [2, 0, 0, 0]),
            ("the replay fills a hole", 0, &[1, 3, 4], &[2, 3, 4, 5],
             &[Reordered, Replayed, Replayed, InOrder], [5, 0, 0, 1]),
            ("a duplicate in the replay", 0, &[1, 3], &[2, 2, 3, 4],
             &[Reordered, Duplicate, Replayed, InOrder], [4, 0, 1, 1]),
            ("a duplicate of the live stream", 0, &[1, 2], &[3, 3], &[InOrder, Duplicate],
             [3, 0, 1, 0]),
            ("the replay stops short", 0, &[1, 3, 4], &[5], &[InOrder], [4, 1, 0, 0]),
            ("the replay skips", 0, &[1, 2, 3], &[5], &[Gap(1)], [4, 1, 0, 0]),
        ];
        for (name, base, before, after, verdicts, [received, gaps, dups, reorders]) in cases {
            let mut c = SeqCheck::new(*base);
            for &s in *before {
                c.on_seq(s);
            }
            let since = c.resume_point();
            c.on_resume(since);
            let got: Vec<_> = after.iter().map(|&s| c.on_seq(s)).collect();
            assert_eq!(&got, verdicts, "{name}");
            assert_counts(&c, name, [*received, *gaps, *dups, *reorders]);
        }
    }

    #[test]
    fn resumed_member_holds_every_acked_seq() {
        let acked: Vec<u64> = (11..=20).collect();
        let mut c = SeqCheck::new(10);
        for s in 11..=14 {
            c.on_seq(s);
        }
        // Dropped; 15..=17 were sequenced meanwhile and come with the resume.
        c.on_resume(c.resume_point());
        for s in 15..=20 {
            assert_eq!(c.on_seq(s), SeqVerdict::InOrder);
        }
        assert!(c.has_all_up_to(20));
        assert_eq!(c.lost_of(&acked), 0);
    }

    #[test]
    fn closed_check_counts_only_what_it_covered() {
        let acked: Vec<u64> = (1..=10).collect();
        let mut old = SeqCheck::new(0);
        for s in [1, 2, 4] {
            old.on_seq(s);
        }
        old.close();
        // 3 is a hole it saw; 5..=10 belong to the failed resume.
        assert_eq!(old.lost_of(&acked), 1);
        let mut fresh = SeqCheck::new(8);
        fresh.on_seq(9);
        assert!(fresh.has_all_up_to(8) && !fresh.has_all_up_to(10));
        assert_eq!(fresh.lost_of(&acked), 1, "10 never came");
    }

    #[test]
    fn reconnectable_failures() {
        use corecast_ws::ProtocolError;
        use std::io::ErrorKind;
        let cases = [
            ("going away", ConnFailure::ServerClosed(Some(1001)), true),
            ("server error", ConnFailure::ServerClosed(Some(1011)), true),
            ("restart", ConnFailure::ServerClosed(Some(1012)), true),
            (
                "try again later",
                ConnFailure::ServerClosed(Some(1013)),
                true,
            ),
            ("no code", ConnFailure::ServerClosed(None), true),
            ("eof", ConnFailure::Eof, true),
            ("reset", ConnFailure::Io(ErrorKind::ConnectionReset), true),
            ("normal close", ConnFailure::ServerClosed(Some(1000)), false),
            (
                "protocol error",
                ConnFailure::ServerClosed(Some(1002)),
                false,
            ),
            (
                "slow consumer",
                ConnFailure::ServerClosed(Some(1008)),
                false,
            ),
            ("too big", ConnFailure::ServerClosed(Some(1009)), false),
            (
                "token expired",
                ConnFailure::ServerClosed(Some(4003)),
                false,
            ),
            (
                "framing",
                ConnFailure::Protocol(ProtocolError::ReservedBitsSet),
                false,
            ),
        ];
        for (name, failure, want) in cases {
            assert_eq!(reconnectable(failure), want, "{name}");
        }
    }

    #[test]
    fn publish_frames() {
        for size in [0, 10, 60, 128, 5000] {
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            let tag = "0000abcd.3";
            encode_publish(
                &mut out,
                &mut scratch,
                "lg-1",
                tag,
                3,
                77,
                123_456_789,
                size,
                [9, 8, 7, 6],
            );
            let mut dec = Decoder::new(
                Role::Server,
                Limits {
                    max_frame_bytes: 1 << 20,
                    max_message_bytes: 1 << 20,
                },
            );
            let f = dec.decode(&mut out).unwrap().unwrap();
            assert_eq!(f.opcode, OpCode::Text);
            let v: serde_json::Value = serde_json::from_slice(&out[f.payload.clone()]).unwrap();
            assert_eq!(v["type"], "publish");
            assert_eq!(v["room"], "lg-1");
            assert_eq!(v["id"], "0000abcd.3-77");
            assert_eq!(v["body"]["t"], 123_456_789);
            assert_eq!(v["body"]["p"], 3);
            assert_eq!(v["body"]["n"], 77);
            let body = v["body"].to_string();
            assert!(body.len() >= size, "size {size}: {body}");
            if size >= 60 {
                assert_eq!(body.len(), size, "size {size}");
            }
            let id = v["id"].as_str().unwrap();
            assert_eq!(publish_number(id, tag), Some(77));
            assert_eq!(publish_number(id, "0000abcd.30"), None);
            assert_eq!(publish_number("other-77", tag), None);
        }
    }

    #[test]
    fn parses_server_frames() {
        let msg = br#"{"type":"msg","room":"lg-0","seq":42,"from":"lg-u0","id":"x.0-5","ts":1764190000123,"body":{"t":99,"p":0,"n":5,"pad":"xxxx"}}"#;
        let m: Incoming = serde_json::from_slice(msg).unwrap();
        assert_eq!((m.kind, m.room, m.seq), ("msg", Some("lg-0"), Some(42)));
        let b = m.body.unwrap();
        assert_eq!((b.t, b.p, b.n), (Some(99), Some(0), Some(5)));
        let ack = br#"{"type":"ack","id":"x.0-5","room":"lg-0","seq":42,"duplicate":true}"#;
        let m: Incoming = serde_json::from_slice(ack).unwrap();
        assert!(m.duplicate);
        let err =
            br#"{"type":"error","code":"not_joined","message":"say \"join\" first","id":"x.0-5"}"#;
        let m: Incoming = serde_json::from_slice(err).unwrap();
        assert_eq!(m.message.as_deref(), Some("say \"join\" first"));
        let presence =
            br#"{"type":"presence","room":"lg-0","count":2,"users":["a","b"],"body":null}"#;
        let m: Incoming = serde_json::from_slice(presence).unwrap();
        assert_eq!(m.kind, "presence");
        let joined = br#"{"type":"joined","room":"lg-0","seq":47,"members":12,"epoch":"18c2f4a9e03b","recovered":true,"missed":6}"#;
        let m: Incoming = serde_json::from_slice(joined).unwrap();
        assert_eq!(m.epoch, Some("18c2f4a9e03b"));
        assert_eq!((m.recovered, m.missed), (Some(true), Some(6)));
    }
}
