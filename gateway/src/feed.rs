//! Room feeds: a room's frames on one shard, kept once and sent from the
//! same bytes to every local member.
//!
//! A room delivery appends the frame the home shard encoded (an `Arc`, so
//! no copy) to the room's [`Feed`] and touches no member. Each member holds
//! a [`Cursor`] into the feed of every room it is in; its connection
//! gathers what lies after the cursor, behind its own replies, into the
//! shard's gather buffer and sends it with one `send`. Members are woken
//! once per round, not once per frame: the first frame after some member
//! caught up wakes them all, and the frames that follow before anyone
//! catches up wake nobody (every member is then either scheduled already or
//! waiting for its socket to drain).
//!
//! # Invariants
//! - Owned by one shard (`Rc`, `RefCell`); reached only from that shard's
//!   room deliveries and its members' connections, never across an await.
//! - Bounded: a frame stays only while a member that was subscribed when it
//!   arrived has not sent it (a reader count per frame, the front trimmed
//!   as counts reach zero). While anyone is behind, the room's delivery
//!   looks at every member's whole queue at most once per half budget
//!   appended ([`Feed::needs_scan`]); one past the hard cap is cut off
//!   (its cursors dropped) and closed as a slow consumer, so a feed holds
//!   at most about 4.5 budgets per stalled member plus what is in flight.
//! - A cursor never points before the feed's front: the frames it has not
//!   sent still count it as a reader. Dropping the cursor releases them.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    rc::Rc,
    sync::Arc,
};

/// The frames of one room on one shard that some member has not sent yet.
#[derive(Debug, Default)]
pub struct Feed {
    inner: RefCell<Inner>,
}

/// Bytes held by all the feeds of a shard (for the `room_feed_bytes` gauge).
pub type Held = Rc<Cell<u64>>;

#[derive(Debug, Default)]
struct Inner {
    /// The shard's total, kept up to date as frames come and go.
    held: Held,
    frames: VecDeque<Entry>,
    /// Index of `frames[0]` among all frames ever appended.
    base: u64,
    /// Bytes ever appended: the stream position after the last frame.
    end: u64,
    /// Cursors open on this feed.
    readers: u32,
    /// Every member was woken since the last one caught up.
    woken: bool,
    /// Stream position at which the next lag scan is due.
    next_scan: u64,
}

#[derive(Debug)]
struct Entry {
    frame: Arc<[u8]>,
    /// Stream position of the frame's first byte.
    pos: u64,
    /// Cursors that were open when the frame arrived and have not sent it.
    readers: u32,
}

impl Inner {
    fn frame_end(&self, index: u64) -> u64 {
        let e = &self.frames[(index - self.base) as usize];
        e.pos + e.frame.len() as u64
    }

    /// The bytes a cursor at (`next`, `pos`) has not sent, frame by frame.
    fn unsent(&self, next: u64, pos: u64) -> impl Iterator<Item = &[u8]> {
        let first = (next - self.base) as usize;
        let skip = self.frames.get(first).map_or(0, |e| (pos - e.pos) as usize);
        self.frames.range(first..).enumerate().map(move |(i, e)| {
            if i == 0 {
                &e.frame[skip..]
            } else {
                &e.frame[..]
            }
        })
    }

    /// Drops the frames at the front that nobody still has to send.
    fn trim(&mut self) {
        while self.frames.front().is_some_and(|e| e.readers == 0) {
            if let Some(e) = self.frames.pop_front() {
                self.held.set(self.held.get() - e.frame.len() as u64);
            }
            self.base += 1;
        }
    }

    /// Bytes held: from the oldest frame kept to the end.
    fn retained(&self) -> u64 {
        self.frames.front().map_or(0, |e| self.end - e.pos)
    }
}

impl Feed {
    /// An empty feed whose frames count towards `held`.
    pub fn new(held: Held) -> Rc<Feed> {
        Rc::new(Feed {
            inner: RefCell::new(Inner {
                held,
                ..Inner::default()
            }),
        })
    }

    /// Opens a cursor at the end: the member gets every frame from now on.
    pub fn subscribe(self: &Rc<Self>) -> Cursor {
        let mut f = self.inner.borrow_mut();
        f.readers += 1;
        // The new member is caught up: the next frame must wake it.
        f.woken = false;
        Cursor {
            feed: self.clone(),
            next: f.base + f.frames.len() as u64,
            pos: f.end,
        }
    }

    /// Appends a frame for every open cursor. Returns whether the members
    /// must be woken: true unless every member was woken since the last one
    /// caught up.
    pub fn push(&self, frame: Arc<[u8]>) -> bool {
        let mut f = self.inner.borrow_mut();
        if f.readers == 0 {
            return false;
        }
        let pos = f.end;
        f.end += frame.len() as u64;
        f.held.set(f.held.get() + frame.len() as u64);
        let readers = f.readers;
        f.frames.push_back(Entry {
            frame,
            pos,
            readers,
        });
        !std::mem::replace(&mut f.woken, true)
    }

    /// Whether the members' queues are due a look: some member is behind
    /// and half a budget was appended since the last look. Scanning costs
    /// O(members) per half budget of traffic, and a member that stopped
    /// reading is seen before it can hold 4.5 budgets, however many rooms
    /// (each under the budget) it is in and whether or not it gets woken.
    pub fn needs_scan(&self, budget: usize) -> bool {
        let mut f = self.inner.borrow_mut();
        if f.retained() == 0 || f.end < f.next_scan {
            return false;
        }
        f.next_scan = f.end + (budget as u64 / 2).max(1);
        true
    }

    /// Bytes the feed holds for its slowest member.
    #[cfg(test)]
    fn retained(&self) -> u64 {
        self.inner.borrow().retained()
    }

    #[cfg(test)]
    fn frames_held(&self) -> usize {
        self.inner.borrow().frames.len()
    }
}

/// One member's place in a room's feed: the next byte it has to send.
#[derive(Debug)]
pub struct Cursor {
    feed: Rc<Feed>,
    /// Index of the frame holding the next byte to send.
    next: u64,
    /// Stream position of the next byte to send.
    pos: u64,
}

impl Cursor {
    pub fn feed(&self) -> &Rc<Feed> {
        &self.feed
    }

    /// Bytes appended that this member has not sent.
    pub fn lag(&self) -> usize {
        (self.feed.inner.borrow().end - self.pos) as usize
    }

    /// Tells the feed this member has sent everything: the next frame must
    /// wake the members again.
    pub fn caught_up(&self) {
        let mut f = self.feed.inner.borrow_mut();
        debug_assert_eq!(f.end, self.pos);
        f.woken = false;
    }

    /// Appends the unsent bytes to `into`, up to `into.len() == limit`.
    pub fn copy_unsent(&self, into: &mut Vec<u8>, limit: usize) {
        let f = self.feed.inner.borrow();
        for bytes in f.unsent(self.next, self.pos) {
            let room = limit.saturating_sub(into.len());
            if room == 0 {
                break;
            }
            into.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }

    /// Counts `bytes` as sent, in order; returns what is left of `bytes`
    /// past this cursor's unsent frames.
    pub fn advance(&mut self, mut bytes: usize) -> usize {
        let mut f = self.feed.inner.borrow_mut();
        while bytes > 0 && self.pos < f.end {
            let frame_end = f.frame_end(self.next);
            let step = ((frame_end - self.pos) as usize).min(bytes);
            self.pos += step as u64;
            bytes -= step;
            if self.pos == frame_end {
                let i = (self.next - f.base) as usize;
                f.frames[i].readers -= 1;
                self.next += 1;
            }
        }
        f.trim();
        bytes
    }

    /// Copies the rest of a frame this member has started to send into
    /// `out` (and moves past it), so that whatever follows on the socket
    /// starts on a frame boundary.
    pub fn finish_frame_into(&mut self, out: &mut Vec<u8>) {
        let rest = {
            let f = self.feed.inner.borrow();
            match f.frames.get((self.next - f.base) as usize) {
                Some(e) if self.pos > e.pos => {
                    let sent = (self.pos - e.pos) as usize;
                    out.extend_from_slice(&e.frame[sent..]);
                    e.frame.len() - sent
                }
                _ => 0,
            }
        };
        if rest > 0 {
            self.advance(rest);
        }
    }

    /// Copies every unsent frame into `out` and moves to the end: what the
    /// member queues next then goes after them.
    pub fn drain_into(&mut self, out: &mut Vec<u8>) {
        let lag = self.lag();
        if lag == 0 {
            return;
        }
        out.reserve(lag);
        self.copy_unsent(out, usize::MAX);
        let left = self.advance(lag);
        debug_assert_eq!(left, 0);
    }
}

impl Drop for Cursor {
    /// Releases the frames this member will not send.
    fn drop(&mut self) {
        let mut f = self.feed.inner.borrow_mut();
        let first = (self.next - f.base) as usize;
        for e in f.frames.range_mut(first..) {
            e.readers -= 1;
        }
        f.readers -= 1;
        f.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    fn unsent(c: &Cursor) -> Vec<u8> {
        let mut v = Vec::new();
        c.copy_unsent(&mut v, usize::MAX);
        v
    }

    #[test]
    fn a_member_gets_the_frames_after_it_subscribed() {
        let feed = Feed::new(Held::default());
        assert!(!feed.push(frame("nobody")), "no member: nothing kept");
        assert_eq!(feed.frames_held(), 0);
        let mut a = feed.subscribe();
        assert!(feed.push(frame("one")), "first frame wakes the members");
        let mut b = feed.subscribe();
        assert!(feed.push(frame("two")), "a new member must be woken");
        assert!(!feed.push(frame("three")), "already woken");
        assert_eq!(unsent(&a), b"onetwothree");
        assert_eq!(unsent(&b), b"twothree");
        assert_eq!((a.lag(), b.lag()), (11, 8));
        assert_eq!(a.advance(11), 0);
        assert_eq!(b.advance(8 + 5), 5, "bytes past the feed are handed back");
        assert_eq!(feed.frames_held(), 0, "all sent: nothing held");
        a.caught_up();
        assert!(feed.push(frame("four")), "caught up: wake again");
    }

    #[test]
    fn partial_sends_resume_mid_frame_and_trim_in_order() {
        let feed = Feed::new(Held::default());
        let mut fast = feed.subscribe();
        let slow = feed.subscribe();
        for s in ["abc", "def", "ghi"] {
            feed.push(frame(s));
        }
        assert_eq!(fast.advance(4), 0);
        assert_eq!(unsent(&fast), b"efghi");
        assert_eq!(feed.frames_held(), 3, "slow holds everything");
        assert_eq!(feed.retained(), 9);
        drop(slow);
        assert_eq!(feed.frames_held(), 2, "abc was only slow's to send");
        assert_eq!(feed.inner.borrow().held.get(), 6);
        assert_eq!(fast.advance(5), 0);
        assert_eq!(feed.frames_held(), 0);
        assert_eq!(feed.inner.borrow().held.get(), 0);
        assert_eq!(fast.lag(), 0);
    }

    #[test]
    fn drain_copies_what_is_unsent_and_releases_it() {
        let feed = Feed::new(Held::default());
        let mut c = feed.subscribe();
        feed.push(frame("hello "));
        feed.push(frame("world"));
        c.advance(2);
        let mut out = b"[".to_vec();
        c.drain_into(&mut out);
        assert_eq!(out, b"[llo world");
        assert_eq!((c.lag(), feed.frames_held()), (0, 0));
    }

    #[test]
    fn copies_stop_at_the_limit_even_mid_frame() {
        let feed = Feed::new(Held::default());
        let c = feed.subscribe();
        for s in ["abc", "def"] {
            feed.push(frame(s));
        }
        let mut v = b"own".to_vec();
        c.copy_unsent(&mut v, 7);
        assert_eq!(v, b"ownabcd");
        c.copy_unsent(&mut v, 7);
        assert_eq!(v, b"ownabcd", "full: nothing more");
    }

    #[test]
    fn lag_scans_are_rate_limited() {
        let feed = Feed::new(Held::default());
        let mut c = feed.subscribe();
        feed.push(Arc::from(vec![0u8; 40]));
        assert!(feed.needs_scan(100), "someone is behind");
        assert!(!feed.needs_scan(100), "just scanned");
        feed.push(Arc::from(vec![0u8; 40]));
        assert!(!feed.needs_scan(100), "less than half a budget since");
        feed.push(Arc::from(vec![0u8; 10]));
        assert!(feed.needs_scan(100), "half a budget later");
        c.advance(90);
        feed.push(Arc::from(vec![0u8; 0]));
        assert!(!feed.needs_scan(100), "nobody is behind");
    }

    #[test]
    fn a_cut_off_member_finishes_the_frame_it_started() {
        let feed = Feed::new(Held::default());
        let mut c = feed.subscribe();
        feed.push(frame("abcd"));
        feed.push(frame("efgh"));
        c.advance(1);
        let mut out = Vec::new();
        c.finish_frame_into(&mut out);
        assert_eq!(out, b"bcd", "the started frame, not the next one");
        c.finish_frame_into(&mut out);
        assert_eq!(out, b"bcd", "on a boundary: nothing to finish");
        assert_eq!(unsent(&c), b"efgh");
    }
}
