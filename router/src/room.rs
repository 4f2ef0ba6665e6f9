//! A room's state at its home shard: the sequence, who is in it, and the
//! recent client message ids (for idempotent retries).
//!
//! # Invariants
//! - Owned by the room's home shard only; nothing else assigns its seqs.
//! - Seqs are u64, start at 1 and have no gaps: `last_seq` only moves by +1,
//!   and only for a publish that was not a duplicate.
//! - Memory is bounded: membership is counted per shard and per user (not
//!   per connection), and the duplicate window holds at most
//!   `RECENT_IDS_PER_ROOM` ids.

use std::{
    collections::{hash_map::Entry, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

/// Client message ids remembered per room for duplicate detection.
pub const RECENT_IDS_PER_ROOM: usize = 4096;
/// How long a client message id is remembered (a retry later than this is
/// treated as a new message).
pub const RECENT_IDS_TTL: Duration = Duration::from_secs(300);

/// What a publish became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequenced {
    /// A new message with this seq.
    New(u64),
    /// A retry of a message already sequenced with this seq: do not deliver
    /// it again, answer with the original ack.
    Duplicate(u64),
}

/// What a join or leave changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberChange {
    /// The shard's first member arrived (join) or its last one left (leave):
    /// deliveries to that shard start or stop.
    pub shard_changed: bool,
    /// The user's first connection in the room arrived, or its last one
    /// left: this is a presence join or leave event.
    pub user_changed: bool,
}

#[derive(Debug)]
pub struct HomeRoom {
    last_seq: u64,
    /// Member connections per shard (index = shard).
    per_shard: Vec<u32>,
    /// Connections per user, for presence.
    users: HashMap<Arc<str>, u32>,
    recent: HashMap<(Arc<str>, Box<str>), u64>,
    recent_order: VecDeque<(Arc<str>, Box<str>, Instant)>,
}

impl HomeRoom {
    /// A new room on a node with `shards` shards; `last_seq` is where the
    /// sequence resumes (0 for a room never seen).
    pub fn new(shards: usize, last_seq: u64) -> HomeRoom {
        HomeRoom {
            last_seq,
            per_shard: vec![0; shards],
            users: HashMap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The store says the sequence stands at `last_seq`: continue from
    /// there (never backwards, so no seq is given twice).
    pub fn resume_from(&mut self, last_seq: u64) {
        self.last_seq = self.last_seq.max(last_seq);
    }

    /// This home starts a new tenure at `last_seq` (the store's word after
    /// a takeover or a conflict): its own earlier count no longer holds.
    pub fn restart_at(&mut self, last_seq: u64) {
        self.last_seq = last_seq;
    }

    /// Member connections in all.
    pub fn connections(&self) -> u64 {
        self.per_shard.iter().map(|&n| n as u64).sum()
    }

    /// Distinct users in the room.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The users in the room, in no particular order.
    pub fn users(&self) -> impl Iterator<Item = &Arc<str>> {
        self.users.keys()
    }

    /// Shards that have at least one member: where a message must go.
    pub fn shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.per_shard
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, _)| i)
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn join(&mut self, shard: usize, user: &Arc<str>) -> MemberChange {
        let on_shard = &mut self.per_shard[shard];
        *on_shard += 1;
        let shard_changed = *on_shard == 1;
        let count = self.users.entry(user.clone()).or_insert(0);
        *count += 1;
        MemberChange {
            shard_changed,
            user_changed: *count == 1,
        }
    }

    /// Removes one connection of `user` on `shard`; a leave of someone who is
    /// not a member changes nothing.
    pub fn leave(&mut self, shard: usize, user: &Arc<str>) -> MemberChange {
        let Entry::Occupied(mut e) = self.users.entry(user.clone()) else {
            return MemberChange::default();
        };
        if self.per_shard[shard] == 0 {
            return MemberChange::default();
        }
        self.per_shard[shard] -= 1;
        *e.get_mut() -= 1;
        let user_changed = *e.get() == 0;
        if user_changed {
            e.remove();
        }
        MemberChange {
            shard_changed: self.per_shard[shard] == 0,
            user_changed,
        }
    }

    /// Assigns the next seq to a publish, unless `(user, id)` was seen
    /// recently. An empty `id` is never deduplicated.
    pub fn sequence(&mut self, user: &Arc<str>, id: &str, now: Instant) -> Sequenced {
        self.expire(now);
        if !id.is_empty() {
            if let Some(&seq) = self.recent.get(&(user.clone(), Box::from(id))) {
                return Sequenced::Duplicate(seq);
            }
        }
        self.last_seq += 1;
        if !id.is_empty() {
            if self.recent_order.len() == RECENT_IDS_PER_ROOM {
                if let Some((u, i, _)) = self.recent_order.pop_front() {
                    self.recent.remove(&(u, i));
                }
            }
            self.recent
                .insert((user.clone(), Box::from(id)), self.last_seq);
            self.recent_order
                .push_back((user.clone(), Box::from(id), now));
        }
        Sequenced::New(self.last_seq)
    }

    /// The store refused `seq` (another home had stored it): a retry of
    /// `(user, id)` is a new publish, not a duplicate of that seq.
    pub fn forget(&mut self, user: &Arc<str>, id: &str, seq: u64) {
        let key = (user.clone(), Box::from(id));
        if self.recent.get(&key) == Some(&seq) {
            self.recent.remove(&key);
            self.recent_order
                .retain(|(u, i, _)| !(u == user && &**i == id));
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((_, _, at)) = self.recent_order.front() {
            if now.duration_since(*at) < RECENT_IDS_TTL {
                break;
            }
            let (u, i, _) = self.recent_order.pop_front().expect("front exists");
            self.recent.remove(&(u, i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn seqs_start_at_one_and_have_no_gaps() {
        let mut r = HomeRoom::new(2, 0);
        let now = Instant::now();
        let a = user("a");
        let seqs: Vec<_> = (0..5)
            .map(|i| r.sequence(&a, &format!("m{i}"), now))
            .collect();
        assert_eq!(seqs, (1..=5).map(Sequenced::New).collect::<Vec<_>>());
        let mut resumed = HomeRoom::new(2, 41);
        assert_eq!(resumed.sequence(&a, "", now), Sequenced::New(42));
        resumed.resume_from(40);
        assert_eq!(
            resumed.sequence(&a, "", now),
            Sequenced::New(43),
            "never backwards"
        );
        resumed.resume_from(99);
        assert_eq!(resumed.sequence(&a, "", now), Sequenced::New(100));
    }

    #[test]
    fn retries_get_the_original_seq_and_take_none() {
        let mut r = HomeRoom::new(1, 0);
        let now = Instant::now();
        let (a, b) = (user("a"), user("b"));
        assert_eq!(r.sequence(&a, "x", now), Sequenced::New(1));
        assert_eq!(
            r.sequence(&b, "x", now),
            Sequenced::New(2),
            "ids are per user"
        );
        assert_eq!(r.sequence(&a, "x", now), Sequenced::Duplicate(1));
        assert_eq!(r.sequence(&a, "", now), Sequenced::New(3));
        assert_eq!(
            r.sequence(&a, "", now),
            Sequenced::New(4),
            "no id, no dedup"
        );
        assert_eq!(r.sequence(&a, "y", now), Sequenced::New(5));
        let later = now + RECENT_IDS_TTL;
        assert_eq!(
            r.sequence(&a, "x", later),
            Sequenced::New(6),
            "forgotten after the TTL"
        );
    }

    #[test]
    fn duplicate_window_is_bounded() {
        let mut r = HomeRoom::new(1, 0);
        let now = Instant::now();
        let a = user("a");
        for i in 0..RECENT_IDS_PER_ROOM + 10 {
            r.sequence(&a, &i.to_string(), now);
        }
        assert_eq!(r.recent.len(), RECENT_IDS_PER_ROOM);
        assert_eq!(r.recent_order.len(), RECENT_IDS_PER_ROOM);
        assert!(
            matches!(r.sequence(&a, "0", now), Sequenced::New(_)),
            "oldest evicted"
        );
    }

    #[test]
    fn membership_tracks_shards_and_users() {
        let mut r = HomeRoom::new(3, 0);
        let (a, b) = (user("a"), user("b"));
        assert_eq!(
            r.join(0, &a),
            MemberChange {
                shard_changed: true,
                user_changed: true
            }
        );
        assert_eq!(
            r.join(2, &a),
            MemberChange {
                shard_changed: true,
                user_changed: false
            }
        );
        assert_eq!(
            r.join(2, &b),
            MemberChange {
                shard_changed: false,
                user_changed: true
            }
        );
        assert_eq!(r.shards().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!((r.connections(), r.user_count()), (3, 2));
        assert_eq!(
            r.leave(2, &a),
            MemberChange {
                shard_changed: false,
                user_changed: false
            }
        );
        assert_eq!(
            r.leave(2, &b),
            MemberChange {
                shard_changed: true,
                user_changed: true
            }
        );
        assert_eq!(r.leave(1, &b), MemberChange::default(), "not a member");
        assert_eq!(r.shards().collect::<Vec<_>>(), vec![0]);
        assert_eq!(
            r.leave(0, &a),
            MemberChange {
                shard_changed: true,
                user_changed: true
            }
        );
        assert!(r.is_empty());
    }

    #[test]
    fn a_refused_seq_is_forgotten_so_its_retry_is_new() {
        let mut r = HomeRoom::new(1, 0);
        let now = Instant::now();
        let a = user("a");
        assert_eq!(r.sequence(&a, "m1", now), Sequenced::New(1));
        // The store refused seq 1 (another home had it); the store says 1.
        r.forget(&a, "m1", 1);
        r.restart_at(1);
        assert_eq!(r.sequence(&a, "m1", now), Sequenced::New(2));
        // Forgetting a seq the id no longer maps to changes nothing.
        r.forget(&a, "m1", 1);
        assert_eq!(r.sequence(&a, "m1", now), Sequenced::Duplicate(2));
    }
}
