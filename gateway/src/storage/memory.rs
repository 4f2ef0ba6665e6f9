//! The embedded store: the last N messages of each room, in this process's
//! memory. Everything is lost when the process ends, which the epoch tells
//! resuming clients: a room's epoch is made when the store first sees the
//! room, so it is new after a restart, and new if the store forgot the room.
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

use corecast_router::namespace::Namespaces;

use super::{new_epoch, Backend, PresenceOp, Query, Record, RoomMeta, StoreError};

struct Room {
    last_seq: u64,
    epoch: Arc<str>,
    messages: VecDeque<Record>,
    touched: Instant,
}

pub struct MemoryStore {
    rooms: HashMap<Arc<str>, Room>,
    /// How much history each room keeps, and how long (its namespace's).
    namespaces: Namespaces,
    meta_ttl: Duration,
    last_sweep: Instant,
}

impl MemoryStore {
    pub fn new(namespaces: Namespaces, meta_ttl: Duration) -> MemoryStore {
        MemoryStore {
            rooms: HashMap::new(),
            namespaces,
            meta_ttl,
            last_sweep: Instant::now(),
        }
    }

    /// The room's entry, made (with a new epoch) if the store has none.
    fn room(&mut self, room: &str) -> &mut Room {
        if !self.rooms.contains_key(room) {
            self.rooms.insert(
                Arc::from(room),
                Room {
                    last_seq: 0,
                    epoch: Arc::from(new_epoch()),
                    messages: VecDeque::new(),
                    touched: Instant::now(),
                },
            );
        }
        self.rooms.get_mut(room).expect("inserted above")
    }
}

impl Backend for MemoryStore {
    fn describe(&self) -> String {
        let table = self.namespaces.load();
        let d = table.default_namespace();
        format!(
            "memory (last {} messages per room, history ttl {} s, unless a namespace says otherwise)",
            d.history_size,
            d.history_ttl.as_secs()
        )
    }

    fn connect(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn append(&mut self, records: &[Record]) -> Result<Vec<usize>, StoreError> {
        let now = Instant::now();
        let mut conflicts = Vec::new();
        let table = self.namespaces.load();
        for (k, r) in records.iter().enumerate() {
            let history_size = table.of(&r.room).history_size;
            let room = self.room(&r.room);
            if r.seq <= room.last_seq {
                let same = room
                    .messages
                    .iter()
                    .any(|m| m.seq == r.seq && m.from == r.from && m.id == r.id && m.ts == r.ts);
                if !same {
                    conflicts.push(k);
                }
                continue;
            }
            room.last_seq = r.seq;
            room.touched = now;
            if !r.epoch.is_empty() && r.epoch != room.epoch {
                room.epoch = r.epoch.clone();
            }
            if history_size == 0 {
                continue;
            }
            // A namespace made smaller (SIGHUP) trims on the next message.
            while room.messages.len() >= history_size {
                room.messages.pop_front();
            }
            room.messages.push_back(r.clone());
        }
        Ok(conflicts)
    }

    fn load(&mut self, room: &str) -> Result<RoomMeta, StoreError> {
        let r = self.room(room);
        Ok(RoomMeta {
            last_seq: r.last_seq,
            epoch: r.epoch.clone(),
        })
    }

    fn fetch(&mut self, room: &str, q: Query) -> Result<(RoomMeta, Vec<Record>), StoreError> {
        let r = self.room(room);
        let meta = RoomMeta {
            last_seq: r.last_seq,
            epoch: r.epoch.clone(),
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

    /// Appends only push to a map in this process. A conflict takes two
    /// homes numbering one room, which only a cluster has, and homes in a
    /// cluster never ack at home.
    fn writes_cannot_fail(&self) -> bool {
        true
    }

    fn presence(&mut self, _ops: &[PresenceOp]) -> Result<(), StoreError> {
        Ok(())
    }

    fn presence_list(&mut self, _room: &str) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    fn advance_seq(&mut self, room: &str, seq: u64) -> Result<(), StoreError> {
        let r = self.room(room);
        r.last_seq = r.last_seq.max(seq);
        Ok(())
    }

    fn maintain(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < Duration::from_secs(1) {
            return;
        }
        self.last_sweep = now;
        let meta_ttl = self.meta_ttl;
        let table = self.namespaces.load();
        self.rooms.retain(|name, r| {
            let idle = now.duration_since(r.touched);
            if idle >= table.of(name).history_ttl {
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
        crate::storage::test_record(room, seq)
    }

    /// A store keeping `size` messages per room for `ttl` (and `short:`
    /// rooms one message).
    fn store(size: usize, ttl: Duration, meta_ttl: Duration) -> MemoryStore {
        use corecast_router::namespace::{Namespace, Table};
        let default = Namespace {
            history_size: size,
            history_ttl: ttl,
            ..Namespace::default_with(1000, 1 << 16)
        };
        let short = Namespace {
            prefix: "short:".into(),
            history_size: 1,
            ..default.clone()
        };
        MemoryStore::new(Namespaces::new(Table::new(default, vec![short])), meta_ttl)
    }

    #[test]
    fn a_namespace_keeps_its_own_history_size() {
        let mut s = store(3, Duration::from_secs(60), Duration::from_secs(600));
        let recs: Vec<Record> = (1..=4)
            .flat_map(|i| [rec("a", i), rec("short:a", i)])
            .collect();
        s.append(&recs).unwrap();
        let seqs = |s: &mut MemoryStore, room: &str| -> Vec<u64> {
            s.fetch(room, Query::Last(10))
                .unwrap()
                .1
                .iter()
                .map(|r| r.seq)
                .collect()
        };
        assert_eq!(seqs(&mut s, "a"), [2, 3, 4]);
        assert_eq!(seqs(&mut s, "short:a"), [4]);
    }

    #[test]
    fn keeps_the_last_n_and_skips_replayed_seqs() {
        let mut s = store(3, Duration::from_secs(60), Duration::from_secs(600));
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
    fn epochs_are_per_room_and_new_when_the_room_is_forgotten() {
        let mut a = store(1, Duration::from_secs(1), Duration::ZERO);
        let mut b = store(1, Duration::from_secs(1), Duration::from_secs(1));
        let first = a.load("r").unwrap().epoch;
        assert_eq!(a.load("r").unwrap().epoch, first, "stable while kept");
        assert_ne!(
            b.load("r").unwrap().epoch,
            first,
            "another store (a restart)"
        );
        a.append(&[rec("r", 1)]).unwrap();
        a.last_sweep -= Duration::from_secs(2);
        a.maintain();
        let again = a.load("r").unwrap();
        assert_eq!(again.last_seq, 0, "forgotten after the meta ttl");
        assert_ne!(again.epoch, first, "so its seqs start a new epoch");
    }
}
