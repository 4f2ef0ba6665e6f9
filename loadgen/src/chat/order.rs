//! Ordering: the per-member sequence check.

use std::ops::Range;

use super::*;

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
    pub(super) base: u64,
    /// One past the highest seq received.
    pub(super) next: u64,
    /// Seqs skipped (a higher one arrived first) and not received since:
    /// ascending, disjoint, non-empty ranges.
    pub(super) missing: Vec<Range<u64>>,
    /// Skipped seqs no longer tracked (see [`MAX_MISSING_RANGES`]).
    pub(super) untracked: u64,
    /// Lowest seq of those untracked ranges (meaningful while `untracked` >
    /// 0): a resume must start below it, since nothing says which are held.
    pub(super) untracked_from: u64,
    /// After a resume from below `next`: the seq the replay should bring
    /// next. Seqs it brings in order that are held already are
    /// [`SeqVerdict::Replayed`]; without it they would read as duplicates.
    pub(super) replay: Option<u64>,
    /// A failed resume ended this check: acked seqs past what it received
    /// are the resume failure's, not lost by this check.
    pub(super) closed: bool,
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
    pub(super) fn missing_index(&self, seq: u64) -> Option<usize> {
        // Recent gaps are the likely ones to fill: search from the end.
        (seq > self.base)
            .then(|| self.missing.iter().rposition(|r| r.contains(&seq)))
            .flatten()
    }

    /// `seq`, skipped before and found in `missing[i]`, arrived late.
    pub(super) fn fill(&mut self, i: usize, seq: u64) -> SeqVerdict {
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
