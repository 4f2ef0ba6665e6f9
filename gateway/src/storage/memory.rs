//! The embedded store: the last N messages of each room, in this process's
//! memory. Everything is lost when the process ends, which the epoch tells
//! resuming clients (it is new at every start).
//!
//! # Invariants
//! - Bounded: at most `history_size` messages per room; a room's messages
//!   are dropped `history_ttl` after its last one, and the room itself
//!   (its last seq) `meta_ttl` after it.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{new_epoch, Backend, PresenceOp, Query, Record, RoomMeta, StoreError};

struct Room {
    last_seq: u64,
    messages: VecDeque<Record>,
    touched: Instant,
}

pub struct MemoryStore {
    rooms: HashMap<Arc<str>, Room>,
    epoch: Arc<str>,
    history_size: usize,
    history_ttl: Duration,
    meta_ttl: Duration,
    last_sweep: Instant,
}

impl MemoryStore {
    pub fn new(history_size: usize, history_ttl: Duration, meta_ttl: Duration) -> MemoryStore {
        MemoryStore {
            rooms: HashMap::new(),
            epoch: Arc::from(new_epoch()),
            history_size,
            history_ttl,
            meta_ttl,
            last_sweep: Instant::now(),
        }
    }

    fn meta(&self, room: Option<&Room>) -> RoomMeta {
        RoomMeta {
            last_seq: room.map_or(0, |r| r.last_seq),
            epoch: self.epoch.clone(),
        }
    }
}

impl Backend for MemoryStore {
    fn describe(&self) -> String {
        format!(
            "memory (last {} messages per room, history ttl {} s)",
            self.history_size,
            self.history_ttl.as_secs()
        )
    }

    fn connect(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let now = Instant::now();
        for r in records {
            let room = self.rooms.entry(r.room.clone()).or_insert_with(|| Room {
                last_seq: 0,
                messages: VecDeque::new(),
                touched: now,
            });
            if r.seq <= room.last_seq {
                continue;
            }
            room.last_seq = r.seq;
            room.touched = now;
            if self.history_size == 0 {
                continue;
            }
            if room.messages.len() == self.history_size {
                room.messages.pop_front();
            }
            room.messages.push_back(r.clone());
        }
        Ok(())
    }

    fn load(&mut self, room: &str) -> Result<RoomMeta, StoreError> {
        Ok(self.meta(self.rooms.get(room)))
    }

    fn fetch(&mut self, room: &str, q: Query) -> Result<(RoomMeta, Vec<Record>), StoreError> {
        let r = self.rooms.get(room);
        let meta = self.meta(r);
        let Some(r) = r else {
            return Ok((meta, Vec::new()));
        };
        let msgs = &r.messages;
        let out = match q {
            Query::Last(n) => msgs
                .iter()
                .skip(msgs.len().saturating_sub(n))
                .cloned()
                .collect(),
            Query::After { after, n } => {
                // Seqs are ascending: find the first one after `after`.
                let start = msgs.partition_point(|m| m.seq <= after);
                msgs.iter().skip(start).take(n).cloned().collect()
            }
        };
        Ok((meta, out))
    }

    fn keeps_presence(&self) -> bool {
        false
    }

    fn presence(&mut self, _ops: &[PresenceOp]) -> Result<(), StoreError> {
        Ok(())
    }

    fn presence_list(&mut self, _room: &str) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    fn maintain(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < Duration::from_secs(1) {
            return;
        }
        self.last_sweep = now;
        let (history_ttl, meta_ttl) = (self.history_ttl, self.meta_ttl);
        self.rooms.retain(|_, r| {
            let idle = now.duration_since(r.touched);
            if idle >= history_ttl {
                r.messages = VecDeque::new();
            }
            idle < meta_ttl
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(room: &str, seq: u64) -> Record {
        Record {
            room: Arc::from(room),
            seq,
            from: Arc::from("u"),
            id: format!("m{seq}").into(),
            ts: seq,
            body: "null".into(),
        }
    }

    #[test]
    fn keeps_the_last_n_and_skips_replayed_seqs() {
        let mut s = MemoryStore::new(3, Duration::from_secs(60), Duration::from_secs(600));
        s.append(&(1..=5).map(|i| rec("a", i)).collect::<Vec<_>>())
            .unwrap();
        s.append(&[rec("a", 4), rec("b", 1)]).unwrap();
        let (meta, last) = s.fetch("a", Query::Last(10)).unwrap();
        assert_eq!(meta.last_seq, 5);
        assert_eq!(
            last.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let (_, after) = s.fetch("a", Query::After { after: 3, n: 1 }).unwrap();
        assert_eq!(after.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4]);
        let (_, none) = s.fetch("a", Query::After { after: 5, n: 9 }).unwrap();
        assert!(none.is_empty());
        assert_eq!(s.load("b").unwrap().last_seq, 1);
        assert_eq!(s.load("nope").unwrap().last_seq, 0);
    }

    #[test]
    fn epochs_differ_between_stores() {
        let a = MemoryStore::new(1, Duration::from_secs(1), Duration::from_secs(1));
        let b = MemoryStore::new(1, Duration::from_secs(1), Duration::from_secs(1));
        assert_ne!(a.epoch, b.epoch);
    }
}
