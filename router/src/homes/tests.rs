//! The homes without sockets or executors: inputs in, effects recorded by
//! [`Rec`], the ports as vectors.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;
use crate::namespace::{Namespace, Table};

const ME: NodeTag = 1;
const OTHER: NodeTag = 2;

/// Every effect the homes had, in order, and the store's and mesh's state.
#[derive(Default)]
struct Rec {
    deliveries: Vec<(usize, Delivery)>,
    enqueued: Vec<(ConnRef, Vec<u8>)>,
    ops: Vec<Op>,
    wires: Vec<Wire>,
    subscribed: Vec<(String, bool)>,
    counts: Vec<Count>,
    /// Ops the store's queue still takes (`try_store`, `store_has_room`).
    store_room: usize,
    failing: bool,
    mesh_full: bool,
}

impl Rec {
    fn new() -> Rec {
        Rec {
            store_room: usize::MAX,
            ..Rec::default()
        }
    }

    /// The JSON of every frame sent to `conn` (this shard's connection, or
    /// through another shard's delivery), in order.
    fn frames_to(&self, conn: ConnRef) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .enqueued
            .iter()
            .filter(|(c, _)| *c == conn)
            .map(|(_, f)| json(f))
            .collect();
        out.extend(self.deliveries.iter().filter_map(|(_, d)| match d {
            Delivery::ToConn { conn: c, frame } if *c == conn => Some(json(frame)),
            _ => None,
        }));
        out
    }

    /// The seqs of the room messages delivered to shard `to`, in order.
    fn room_seqs(&self, to: usize) -> Vec<u64> {
        self.deliveries
            .iter()
            .filter(|(s, _)| *s == to)
            .filter_map(|(_, d)| match d {
                Delivery::Room { frame, .. } => Some(frames(frame)),
                _ => None,
            })
            .flatten()
            .filter(|v| v["type"] == "msg")
            .map(|v| v["seq"].as_u64().unwrap())
            .collect()
    }

    /// The seqs handed to the store as appends, in order.
    fn appended(&self) -> Vec<u64> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::Append { record, .. } => Some(record.seq),
                _ => None,
            })
            .collect()
    }

    fn loads(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| matches!(op, Op::Load { .. }))
            .count()
    }

    fn clear(&mut self) {
        let (room, failing, full) = (self.store_room, self.failing, self.mesh_full);
        *self = Rec {
            store_room: room,
            failing,
            mesh_full: full,
            ..Rec::default()
        };
    }
}

impl Ports for Rec {
    fn deliver(&mut self, to: usize, d: Delivery) {
        self.deliveries.push((to, d));
    }
    fn enqueue(&mut self, conn: ConnRef, frame: &[u8]) {
        self.enqueued.push((conn, frame.to_vec()));
    }
    fn try_store(&mut self, op: Op) -> Result<(), Op> {
        if self.store_room == 0 {
            return Err(op);
        }
        self.store_room -= 1;
        self.ops.push(op);
        Ok(())
    }
    fn try_store_load(&mut self, op: Op) -> Result<(), Op> {
        self.try_store(op)
    }
    fn store(&mut self, op: Op) -> bool {
        self.ops.push(op);
        true
    }
    fn store_has_room(&self) -> bool {
        self.store_room > 0
    }
    fn store_failing(&self) -> bool {
        self.failing
    }
    fn wire(&mut self, w: Wire) {
        self.wires.push(w);
    }
    fn try_wire(&mut self, w: Wire) -> Result<(), Wire> {
        if self.mesh_full {
            return Err(w);
        }
        self.wires.push(w);
        Ok(())
    }
    fn subscribe(&mut self, topic: Topic<'_>, on: bool) {
        let name = match topic {
            Topic::Room(r) => format!("room:{r}"),
            Topic::User(u) => format!("user:{u}"),
        };
        self.subscribed.push((name, on));
    }
    fn count(&mut self, c: Count) {
        self.counts.push(c);
    }
}

/// The JSON of one unmasked server frame.
fn json(frame: &[u8]) -> Value {
    let v = frames(frame);
    assert_eq!(v.len(), 1, "one frame expected");
    v.into_iter().next().unwrap()
}

/// The JSON of each of the concatenated unmasked server frames.
fn frames(mut bytes: &[u8]) -> Vec<Value> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (len, header) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        out.push(serde_json::from_slice(&bytes[header..header + len]).unwrap());
        bytes = &bytes[header + len..];
    }
    out
}

fn settings(clustered: bool, acks_at_home: bool) -> Settings {
    Settings {
        me: 0,
        shards: 2,
        node: ME,
        clustered,
        namespaces: Namespaces::new(Table::new(
            Namespace::default_with(100, 1 << 16),
            vec![Namespace {
                prefix: "eph:".into(),
                ephemeral: true,
                ..Namespace::default_with(100, 1 << 16)
            }],
        )),
        history_meta_ttl: Duration::from_secs(60),
        store_keeps_presence: false,
        store_acks_at_home: acks_at_home,
        max_connections_per_user: None,
        max_connections_per_ip: None,
    }
}

fn conn(shard: u16, key: u32) -> ConnRef {
    ConnRef {
        node: ME,
        shard,
        key,
        gen: 1,
    }
}

/// A clock the tests move by hand.
struct Clock(Instant, u64);

impl Clock {
    fn new() -> Clock {
        Clock(Instant::now(), 1_700_000_000_000_000)
    }
    fn now(&self) -> Now {
        Now {
            at: self.0,
            unix_us: self.1,
        }
    }
    fn advance(&mut self, d: Duration) {
        self.0 += d;
        self.1 += d.as_micros() as u64;
    }
}

fn join(room: &str, user: &str, c: ConnRef, since: Option<(u64, &str)>) -> Input {
    Input::Request(Request::Join {
        room: room.into(),
        user: user.into(),
        conn: c,
        since: since.map(|(s, e)| (s, e.into())),
        nonce: 7,
        parked: false,
    })
}

fn leave(room: &str, user: &str, shard: u16) -> Input {
    Input::Request(Request::Leave {
        room: room.into(),
        user: user.into(),
        shard,
    })
}

fn publish(room: &str, user: &str, id: &str, c: ConnRef) -> Input {
    Input::Request(Request::Publish(Publish {
        room: room.into(),
        user: user.into(),
        id: id.into(),
        body: "\"hi\"".into(),
        conn: c,
        hops: 0,
    }))
}

fn loaded(room: &str, last_seq: u64, epoch: &str) -> Input {
    Input::Loaded {
        room: room.into(),
        meta: Some(RoomMeta {
            last_seq,
            epoch: epoch.into(),
        }),
    }
}

/// A lone node's homes with `room` active: joined by a member on shard 1,
/// its sequence loaded at `last_seq`.
fn lone_room(room: &str, last_seq: u64, acks_at_home: bool) -> (Homes, Rec, Clock) {
    let mut h = Homes::new(settings(false, acks_at_home));
    let mut rec = Rec::new();
    let clock = Clock::new();
    h.handle(join(room, "m", conn(1, 9), None), clock.now(), &mut rec);
    h.handle(loaded(room, last_seq, "e1"), clock.now(), &mut rec);
    rec.clear();
    (h, rec, clock)
}

#[test]
fn a_publish_to_a_room_nobody_is_in_lingers_for_the_duplicate_window() {
    let mut h = Homes::new(settings(false, true));
    let mut rec = Rec::new();
    let mut clock = Clock::new();
    h.handle(
        publish("notify:x", "api", "n1", conn(0, 1)),
        clock.now(),
        &mut rec,
    );
    h.handle(loaded("notify:x", 0, "e1"), clock.now(), &mut rec);
    assert_eq!(rec.frames_to(conn(0, 1))[0]["seq"], 1);
    // A retry inside the window is the same message.
    clock.advance(crate::room::RECENT_IDS_TTL / 2);
    h.handle(Input::Tick, clock.now(), &mut rec);
    h.handle(
        publish("notify:x", "api", "n1", conn(0, 1)),
        clock.now(),
        &mut rec,
    );
    let acks = rec.frames_to(conn(0, 1));
    assert_eq!(
        (acks[1]["seq"].as_u64(), &acks[1]["duplicate"]),
        (Some(1), &serde_json::json!(true))
    );
    assert_eq!(h.rooms(), 1);
    // Past it the room is closed (its seq kept as for any emptied room).
    clock.advance(crate::room::RECENT_IDS_TTL);
    h.handle(Input::Tick, clock.now(), &mut rec);
    assert_eq!(h.rooms(), 0, "the idle room was buried");
    assert!(rec.counts.contains(&Count::RoomClosed));
    rec.clear();
    h.handle(
        publish("notify:x", "api", "n2", conn(0, 1)),
        clock.now(),
        &mut rec,
    );
    assert_eq!(
        rec.frames_to(conn(0, 1))[0]["seq"],
        2,
        "continues from the tombstone"
    );
    // A room someone joined meanwhile is left to its members.
    h.handle(
        join("notify:x", "m", conn(1, 9), None),
        clock.now(),
        &mut rec,
    );
    clock.advance(crate::room::RECENT_IDS_TTL * 2);
    h.handle(Input::Tick, clock.now(), &mut rec);
    assert_eq!(h.rooms(), 1);
}

/// A relay of an ephemeral room skips gaps instead of repairing them, and
/// a node that takes the room over starts it anew without the store.
#[test]
fn an_ephemeral_relay_skips_gaps_and_takes_over_without_the_store() {
    let mut h = Homes::new(settings(true, false));
    let mut rec = Rec::new();
    let clock = Clock::new();
    let set = nodes(&[ME, OTHER]);
    let room = (0..)
        .map(|i| format!("eph:room-{i}"))
        .find(|r| set.home_of(r) == OTHER)
        .unwrap();
    h.handle(Input::Nodes(set), clock.now(), &mut rec);
    h.handle(join(&room, "m", conn(1, 9), None), clock.now(), &mut rec);
    let nonce = sync_nonce(&rec, OTHER).unwrap();
    h.handle(synced(&room, OTHER, nonce, 0), clock.now(), &mut rec);
    for seq in [1, 3, 4] {
        h.handle(message(&room, OTHER, seq), clock.now(), &mut rec);
    }
    assert_eq!(rec.room_seqs(1), [1, 3, 4]);
    assert!(
        !rec.ops.iter().any(|op| matches!(op, Op::Repair { .. })),
        "{:?}",
        rec.ops
    );
    assert!(rec.counts.contains(&Count::Unrepaired(1)));
    // The home node goes: this node numbers the room, from 1, storing nothing.
    rec.clear();
    h.handle(Input::Nodes(nodes(&[ME])), clock.now(), &mut rec);
    h.handle(publish(&room, "a", "x", conn(0, 1)), clock.now(), &mut rec);
    assert!(
        !rec.ops
            .iter()
            .any(|op| matches!(op, Op::Load { .. } | Op::Append { .. })),
        "{:?}",
        rec.ops
    );
    let ack = &rec.frames_to(conn(0, 1))[0];
    assert_eq!(
        (ack["seq"].as_u64(), &ack["stored"]),
        (Some(1), &serde_json::json!(false))
    );
    assert_ne!(ack["epoch"], "e1");
}

#[test]
fn an_ephemeral_room_never_asks_the_store() {
    for clustered in [false, true] {
        let mut h = Homes::new(settings(clustered, false));
        if clustered {
            h.handle(
                Input::Nodes(Arc::new(NodeSet {
                    me: ME,
                    nodes: vec![(ME, "me".into())],
                })),
                Clock::new().now(),
                &mut Rec::new(),
            );
        }
        let mut rec = Rec::new();
        // A store that takes nothing and fails: ephemeral rooms do not care.
        rec.store_room = 0;
        rec.failing = true;
        let clock = Clock::new();
        h.handle(join("eph:r", "m", conn(1, 9), None), clock.now(), &mut rec);
        for id in ["1", "2", "1"] {
            h.handle(publish("eph:r", "a", id, conn(0, 1)), clock.now(), &mut rec);
        }
        assert!(rec.ops.is_empty(), "clustered {clustered}: {:?}", rec.ops);
        let acks: Vec<(u64, bool, bool)> = rec
            .frames_to(conn(0, 1))
            .iter()
            .map(|a| {
                (
                    a["seq"].as_u64().unwrap(),
                    a["duplicate"] == true,
                    a["stored"] == true,
                )
            })
            .collect();
        assert_eq!(
            acks,
            [(1, false, false), (2, false, false), (1, true, false)]
        );
        assert_eq!(rec.room_seqs(1), [1, 2], "clustered {clustered}");
        let wired = rec
            .wires
            .iter()
            .filter(|w| matches!(w, Wire::Message { .. }))
            .count();
        assert_eq!(wired, if clustered { 2 } else { 0 });
        // History is answered at home: nothing kept.
        rec.clear();
        h.handle(
            Input::Request(Request::History {
                room: "eph:r".into(),
                query: Query::Last(10),
                conn: conn(0, 1),
            }),
            clock.now(),
            &mut rec,
        );
        let hist = &rec.frames_to(conn(0, 1))[0];
        assert_eq!(
            (
                hist["seq"].as_u64(),
                hist["messages"].as_array().map(Vec::len)
            ),
            (Some(2), Some(0))
        );
        assert!(rec.ops.is_empty());
    }
}

#[test]
fn publishes_are_numbered_gapless_and_retries_keep_their_seq() {
    // (publishes as (user, id)), the seq each is acked with, and whether it
    // is acked as a duplicate.
    type Case = (
        &'static [(&'static str, &'static str)],
        &'static [(u64, bool)],
    );
    let cases: &[Case] = &[
        (
            &[("a", "1"), ("b", "1"), ("a", "2")],
            &[(1, false), (2, false), (3, false)],
        ),
        (
            &[("a", "1"), ("a", "1"), ("b", "2")],
            &[(1, false), (1, true), (2, false)],
        ),
        // The same id from another user is another message.
        (
            &[("a", "x"), ("b", "x"), ("a", "x")],
            &[(1, false), (2, false), (1, true)],
        ),
    ];
    for acks_at_home in [true, false] {
        for (publishes, want) in cases {
            let (mut h, mut rec, clock) = lone_room("r", 0, acks_at_home);
            for (user, id) in publishes.iter() {
                h.handle(publish("r", user, id, conn(0, 1)), clock.now(), &mut rec);
            }
            let new: Vec<u64> = want.iter().filter(|w| !w.1).map(|w| w.0).collect();
            assert_eq!(rec.appended(), new, "{publishes:?}");
            assert_eq!(
                rec.room_seqs(1),
                new,
                "members get each new seq once, in order"
            );
            let acks: Vec<(u64, bool)> = if acks_at_home {
                rec.frames_to(conn(0, 1))
                    .iter()
                    .map(|v| (v["seq"].as_u64().unwrap(), v["duplicate"] == true))
                    .collect()
            } else {
                // The store acks, after storing: the home names whom.
                rec.ops
                    .iter()
                    .filter_map(|op| match op {
                        Op::Append {
                            record,
                            ack_to: Some(_),
                            ..
                        } => Some((record.seq, false)),
                        Op::DuplicateAck { seq, .. } => Some((*seq, true)),
                        _ => None,
                    })
                    .collect()
            };
            assert_eq!(&acks, want, "{publishes:?} acks_at_home={acks_at_home}");
        }
    }
}

#[test]
fn a_sequence_continues_from_the_store_and_from_a_tombstone() {
    let (mut h, mut rec, mut clock) = lone_room("r", 41, true);
    h.handle(publish("r", "a", "1", conn(0, 1)), clock.now(), &mut rec);
    assert_eq!(rec.appended(), [42]);
    // The room empties: its last seq stays, and a refill asks no store.
    h.handle(leave("r", "m", 1), clock.now(), &mut rec);
    assert_eq!(h.rooms(), 0);
    rec.clear();
    clock.advance(Duration::from_secs(1));
    h.handle(join("r", "m", conn(1, 9), None), clock.now(), &mut rec);
    h.handle(publish("r", "a", "2", conn(0, 1)), clock.now(), &mut rec);
    assert_eq!(rec.loads(), 0);
    assert_eq!(rec.appended(), [43]);
    // Past the store's meta TTL the tombstone is not trusted.
    h.handle(leave("r", "m", 1), clock.now(), &mut rec);
    rec.clear();
    clock.advance(Duration::from_secs(61));
    h.handle(join("r", "m", conn(1, 9), None), clock.now(), &mut rec);
    assert_eq!(rec.loads(), 1);
}

#[test]
fn requests_wait_in_order_while_the_sequence_loads() {
    let mut h = Homes::new(settings(false, true));
    let mut rec = Rec::new();
    let clock = Clock::new();
    h.handle(join("r", "m", conn(1, 9), None), clock.now(), &mut rec);
    for i in 0..3 {
        h.handle(
            publish("r", "a", &i.to_string(), conn(0, 1)),
            clock.now(),
            &mut rec,
        );
    }
    assert_eq!(rec.loads(), 1);
    assert!(
        rec.appended().is_empty(),
        "nothing numbered before the load"
    );
    assert!(rec.deliveries.is_empty(), "not even the join");
    h.handle(loaded("r", 10, "e1"), clock.now(), &mut rec);
    assert_eq!(rec.appended(), [11, 12, 13]);
    let joined = rec
        .deliveries
        .iter()
        .find_map(|(_, d)| match d {
            Delivery::Joined { seq, epoch, .. } => Some((*seq, epoch.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        joined,
        (10, "e1".into()),
        "joined at the store's seq, before the publishes"
    );
}

#[test]
fn a_publish_the_store_cannot_take_is_refused_and_never_numbered() {
    // (store queue room, store failing, error code)
    let cases = [(0, false, "storage_busy"), (5, true, "storage_unavailable")];
    for (room, failing, code) in cases {
        let (mut h, mut rec, clock) = lone_room("r", 0, true);
        rec.store_room = room;
        rec.failing = failing;
        h.handle(publish("r", "a", "1", conn(0, 1)), clock.now(), &mut rec);
        assert!(rec.appended().is_empty());
        assert!(rec.room_seqs(1).is_empty());
        let frames = rec.frames_to(conn(0, 1));
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["type"], "error");
        assert_eq!(frames[0]["code"], code);
        assert_eq!(frames[0]["id"], "1");
        // Once the store takes writes again the next publish gets seq 1.
        rec.store_room = usize::MAX;
        rec.failing = false;
        h.handle(publish("r", "a", "1", conn(0, 1)), clock.now(), &mut rec);
        assert_eq!(rec.appended(), [1]);
    }
}

#[test]
fn a_conflicting_seq_is_never_acked_and_its_retry_is_numbered_anew() {
    // In a cluster the store acks after storing; a conflict refuses instead.
    let mut h = Homes::new(settings(true, false));
    let mut rec = Rec::new();
    let clock = Clock::new();
    h.handle(Input::Nodes(nodes(&[ME])), clock.now(), &mut rec);
    h.handle(join("r", "m", conn(1, 9), None), clock.now(), &mut rec);
    h.handle(loaded("r", 4, "e1"), clock.now(), &mut rec);
    h.handle(publish("r", "a", "1", conn(0, 1)), clock.now(), &mut rec);
    assert_eq!(rec.appended(), [5]);
    assert!(
        rec.room_seqs(1).is_empty(),
        "in a cluster only a stored seq goes out"
    );
    // The store had another home's message at 5.
    h.handle(
        Input::Conflict {
            room: "r".into(),
            from: "a".into(),
            id: "1".into(),
            seq: 5,
        },
        clock.now(),
        &mut rec,
    );
    rec.clear();
    // The retry is not a duplicate of the refused seq: the home reloads.
    h.handle(publish("r", "a", "1", conn(0, 1)), clock.now(), &mut rec);
    assert_eq!(rec.loads(), 1);
    assert!(rec.appended().is_empty());
    h.handle(loaded("r", 5, "e1"), clock.now(), &mut rec);
    assert_eq!(rec.appended(), [6]);
    assert!(!rec
        .ops
        .iter()
        .any(|op| matches!(op, Op::DuplicateAck { .. })));
    // Seq 5 is the other home's message, which members here never got: it
    // comes from history first.
    assert_eq!(repair_asked(&rec), [(4, 5)]);
    // Stored: now it reaches the other nodes, and the members after 5.
    h.handle(
        Input::Stored {
            room: "r".into(),
            seq: 6,
            frame: proto::message("r", 6, "a", "1", 0, "1").into(),
        },
        clock.now(),
        &mut rec,
    );
    assert!(rec
        .wires
        .iter()
        .any(|w| matches!(w, Wire::Message { seq: 6, .. })));
    assert!(rec.room_seqs(1).is_empty(), "6 waits for the repair");
    h.handle(
        Input::Repaired {
            room: "r".into(),
            after: 4,
            upto: 5,
            frames: proto::message("r", 5, "b", "9", 0, "1"),
            got: 1,
        },
        clock.now(),
        &mut rec,
    );
    assert_eq!(rec.room_seqs(1), [5, 6]);
}

#[test]
fn a_resume_asks_the_store_up_to_what_members_were_sent() {
    // (store queue room, resume the delivery says)
    for (room, want) in [(usize::MAX, Resume::Pending), (0, Resume::Refused)] {
        let (mut h, mut rec, clock) = lone_room("r", 0, true);
        for i in 1..=3 {
            h.handle(
                publish("r", "a", &i.to_string(), conn(0, 1)),
                clock.now(),
                &mut rec,
            );
        }
        rec.clear();
        rec.store_room = room;
        h.handle(
            join("r", "b", conn(0, 2), Some((1, "e1"))),
            clock.now(),
            &mut rec,
        );
        let joined = rec
            .deliveries
            .iter()
            .find_map(|(to, d)| match d {
                Delivery::Joined { seq, resume, .. } => Some((*to, *seq, *resume)),
                _ => None,
            })
            .unwrap();
        assert_eq!(joined, (0, 3, want));
        let recover = rec.ops.iter().find_map(|op| match op {
            Op::Recover(r) => Some((r.since, r.upto, r.home_epoch.clone())),
            _ => None,
        });
        match want {
            Resume::Pending => assert_eq!(recover, Some((1, 3, "e1".into()))),
            _ => assert_eq!(recover, None),
        }
    }
}

#[test]
fn a_resume_from_ahead_waits_for_this_node_to_catch_up() {
    // A relay of OTHER's room, with members here up to seq 2.
    let (mut h, mut rec, mut clock, room) = relay_at(2);
    // A client that saw seq 4 on another node resumes here: it waits.
    h.handle(
        join(&room, "b", conn(0, 2), Some((4, "e1"))),
        clock.now(),
        &mut rec,
    );
    assert!(!rec
        .deliveries
        .iter()
        .any(|(_, d)| matches!(d, Delivery::Joined { .. })));
    // Seqs 3 and 4 arrive; the next tick lets the resume go on.
    for seq in [3, 4] {
        h.handle(message(&room, OTHER, seq), clock.now(), &mut rec);
    }
    clock.advance(Duration::from_millis(300));
    h.handle(Input::Tick, clock.now(), &mut rec);
    assert_eq!(joined_seq(&rec), Some(4));
    // One that never catches up is answered as things stand after PARK_FOR.
    rec.clear();
    h.handle(
        join(&room, "c", conn(0, 3), Some((9, "e1"))),
        clock.now(),
        &mut rec,
    );
    clock.advance(PARK_FOR / 2);
    h.handle(Input::Tick, clock.now(), &mut rec);
    assert!(rec.deliveries.is_empty());
    clock.advance(PARK_FOR);
    h.handle(Input::Tick, clock.now(), &mut rec);
    assert_eq!(joined_seq(&rec), Some(4));
}

fn nodes(tags: &[NodeTag]) -> Arc<NodeSet> {
    // Node ids chosen so that room "r" is homed as the test needs: the
    // rendezvous hash decides, so the tests look the home up instead.
    Arc::new(NodeSet {
        me: ME,
        nodes: tags
            .iter()
            .map(|t| (*t, Arc::from(format!("node-{t}"))))
            .collect(),
    })
}

/// A room of `nodes` homed on `home` (found by name).
fn room_homed_on(set: &NodeSet, home: NodeTag) -> String {
    (0..)
        .map(|i| format!("room-{i}"))
        .find(|r| set.home_of(r) == home)
        .unwrap()
}

fn message(room: &str, home: NodeTag, seq: u64) -> Input {
    Input::Message {
        room: room.into(),
        home,
        seq,
        epoch: "e1".into(),
        frame: proto::message(room, seq, "a", &seq.to_string(), 0, "1").into(),
    }
}

/// A node relaying a room homed on OTHER, synced at `last_seq`, with a
/// member on shard 1; and the room's name.
fn relay_at(last_seq: u64) -> (Homes, Rec, Clock, String) {
    let mut h = Homes::new(settings(true, false));
    let mut rec = Rec::new();
    let clock = Clock::new();
    let set = nodes(&[ME, OTHER]);
    let room = room_homed_on(&set, OTHER);
    h.handle(Input::Nodes(set), clock.now(), &mut rec);
    h.handle(join(&room, "m", conn(1, 9), None), clock.now(), &mut rec);
    let nonce = sync_nonce(&rec, OTHER).expect("a relay asks the home for the room");
    assert!(
        !rec.deliveries
            .iter()
            .any(|(_, d)| matches!(d, Delivery::Joined { .. })),
        "a join waits for the first Synced"
    );
    h.handle(synced(&room, OTHER, nonce, last_seq), clock.now(), &mut rec);
    assert_eq!(joined_seq(&rec), Some(last_seq));
    rec.clear();
    (h, rec, clock, room)
}

fn sync_nonce(rec: &Rec, home: NodeTag) -> Option<u64> {
    rec.wires.iter().rev().find_map(|w| match w {
        Wire::Sync { to, nonce, .. } if *to == home => Some(*nonce),
        _ => None,
    })
}

fn synced(room: &str, home: NodeTag, nonce: u64, last_seq: u64) -> Input {
    Input::Synced {
        room: room.into(),
        home,
        nonce,
        last_seq,
        epoch: "e1".into(),
    }
}

fn joined_seq(rec: &Rec) -> Option<u64> {
    rec.deliveries.iter().find_map(|(_, d)| match d {
        Delivery::Joined { seq, .. } => Some(*seq),
        _ => None,
    })
}

fn repair_asked(rec: &Rec) -> Vec<(u64, u64)> {
    rec.ops
        .iter()
        .filter_map(|op| match op {
            Op::Repair { after, upto, .. } => Some((*after, *upto)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_relay_delivers_each_seq_once_in_order_and_repairs_gaps_from_history() {
    // Messages from the home in arrival order; the repairs asked; what the
    // members get once history answered every repair.
    type Case = (&'static [u64], &'static [(u64, u64)], &'static [u64]);
    let cases: &[Case] = &[
        (&[3, 4, 5], &[], &[3, 4, 5]),
        // Duplicates and old seqs are dropped.
        (&[3, 3, 2, 4], &[], &[3, 4]),
        // A gap: 4..=5 come from history, 7 waits for them.
        (&[3, 6, 7], &[(3, 5)], &[3, 4, 5, 6, 7]),
        // What history had also comes live: delivered once.
        (&[6, 5, 4, 7], &[(2, 5)], &[3, 4, 5, 6, 7]),
    ];
    for (arrivals, repairs, want) in cases {
        let (mut h, mut rec, clock, room) = relay_at(2);
        for seq in arrivals.iter() {
            h.handle(message(&room, OTHER, *seq), clock.now(), &mut rec);
        }
        assert_eq!(repair_asked(&rec), *repairs, "{arrivals:?}");
        for (after, upto) in repairs.iter() {
            let frames: Vec<u8> = (after + 1..=*upto)
                .flat_map(|seq| proto::message(&room, seq, "a", "h", 0, "1"))
                .collect();
            h.handle(
                Input::Repaired {
                    room: room.as_str().into(),
                    after: *after,
                    upto: *upto,
                    frames,
                    got: upto - after,
                },
                clock.now(),
                &mut rec,
            );
        }
        assert_eq!(rec.room_seqs(1), *want, "{arrivals:?}");
    }
}

#[test]
fn a_repair_history_cannot_fill_is_skipped_and_counted() {
    let (mut h, mut rec, clock, room) = relay_at(2);
    h.handle(message(&room, OTHER, 6), clock.now(), &mut rec);
    assert_eq!(repair_asked(&rec), [(2, 5)]);
    // History has only seq 5 of 3..=5.
    h.handle(
        Input::Repaired {
            room: room.as_str().into(),
            after: 2,
            upto: 5,
            frames: proto::message(&room, 5, "a", "h", 0, "1"),
            got: 1,
        },
        clock.now(),
        &mut rec,
    );
    assert_eq!(rec.room_seqs(1), [5, 6]);
    assert!(rec.counts.contains(&Count::Unrepaired(2)));
    // With no room in the store's queue there is no repair: skipped.
    rec.clear();
    rec.store_room = 0;
    h.handle(message(&room, OTHER, 9), clock.now(), &mut rec);
    assert_eq!(rec.room_seqs(1), [9]);
    assert!(rec.counts.contains(&Count::Unrepaired(2)));
}

#[test]
fn a_relay_follows_one_home_and_forwards_publishes_to_it() {
    let (mut h, mut rec, clock, room) = relay_at(2);
    // A node that is not the home is not listened to.
    h.handle(message(&room, 77, 3), clock.now(), &mut rec);
    assert!(rec.room_seqs(1).is_empty());
    h.handle(publish(&room, "a", "1", conn(0, 1)), clock.now(), &mut rec);
    assert!(rec.appended().is_empty(), "a relay numbers nothing");
    let fwd = rec.wires.iter().find_map(|w| match w {
        Wire::Publish { to, publish } => Some((*to, publish.hops)),
        _ => None,
    });
    assert_eq!(fwd, Some((OTHER, 0)));
    // A publish that already went round is refused, not sent again.
    rec.clear();
    let mut p = match publish(&room, "a", "2", conn(0, 1)) {
        Input::Request(Request::Publish(p)) => p,
        _ => unreachable!(),
    };
    p.hops = 2;
    h.handle(Input::Request(Request::Publish(p)), clock.now(), &mut rec);
    assert!(rec.wires.is_empty());
    assert_eq!(rec.frames_to(conn(0, 1))[0]["code"], "room_moving");
    // A full mesh: storage_busy, so the client retries.
    rec.clear();
    rec.mesh_full = true;
    h.handle(publish(&room, "a", "3", conn(0, 1)), clock.now(), &mut rec);
    assert_eq!(rec.frames_to(conn(0, 1))[0]["code"], "storage_busy");
}

#[test]
fn a_late_synced_is_asked_for_again() {
    let mut h = Homes::new(settings(true, false));
    let mut rec = Rec::new();
    let mut clock = Clock::new();
    let set = nodes(&[ME, OTHER]);
    let room = room_homed_on(&set, OTHER);
    h.handle(Input::Nodes(set), clock.now(), &mut rec);
    h.handle(join(&room, "m", conn(1, 9), None), clock.now(), &mut rec);
    let first = sync_nonce(&rec, OTHER).unwrap();
    clock.advance(SYNC_RETRY);
    h.handle(Input::Tick, clock.now(), &mut rec);
    let second = sync_nonce(&rec, OTHER).unwrap();
    assert_ne!(first, second);
    // The answer to the old ask is ignored; the new one lets the join in.
    h.handle(synced(&room, OTHER, first, 5), clock.now(), &mut rec);
    assert_eq!(joined_seq(&rec), None);
    h.handle(synced(&room, OTHER, second, 5), clock.now(), &mut rec);
    assert_eq!(joined_seq(&rec), Some(5));
}

#[test]
fn rooms_move_when_the_live_nodes_change() {
    // The home node goes away: this node takes the room over, continues
    // exactly from the store's last seq and repairs what the old home
    // stored but never sent here.
    let (mut h, mut rec, clock, room) = relay_at(2);
    h.handle(message(&room, OTHER, 3), clock.now(), &mut rec);
    rec.clear();
    h.handle(Input::Nodes(nodes(&[ME])), clock.now(), &mut rec);
    assert!(rec.counts.contains(&Count::Rehomed));
    assert_eq!(rec.loads(), 1);
    h.handle(publish(&room, "a", "1", conn(0, 1)), clock.now(), &mut rec);
    assert!(
        rec.appended().is_empty(),
        "no seq before the store says where"
    );
    h.handle(loaded(&room, 5, "e1"), clock.now(), &mut rec);
    assert_eq!(repair_asked(&rec), [(3, 5)]);
    assert_eq!(rec.appended(), [6]);
    // The new tenure sends what it stores; the repaired seqs go first.
    h.handle(
        Input::Stored {
            room: room.as_str().into(),
            seq: 6,
            frame: proto::message(&room, 6, "a", "1", 0, "1").into(),
        },
        clock.now(),
        &mut rec,
    );
    assert!(rec.room_seqs(1).is_empty(), "6 waits for the repair");
    let frames: Vec<u8> = (4..=5)
        .flat_map(|seq| proto::message(&room, seq, "a", "h", 0, "1"))
        .collect();
    h.handle(
        Input::Repaired {
            room: room.as_str().into(),
            after: 3,
            upto: 5,
            frames,
            got: 2,
        },
        clock.now(),
        &mut rec,
    );
    assert_eq!(rec.room_seqs(1), [4, 5, 6]);

    // The other node comes back and wins the room again: this node becomes
    // its relay and asks it for the room.
    rec.clear();
    h.handle(Input::Nodes(nodes(&[ME, OTHER])), clock.now(), &mut rec);
    assert!(rec.counts.contains(&Count::Rehomed));
    let nonce = sync_nonce(&rec, OTHER).expect("asks the new home");
    h.handle(publish(&room, "a", "2", conn(0, 1)), clock.now(), &mut rec);
    assert!(rec.appended().is_empty());
    assert!(rec
        .wires
        .iter()
        .any(|w| matches!(w, Wire::Publish { to: OTHER, .. })));
    // The new home had stored up to 8: 7..=8 come from history.
    h.handle(synced(&room, OTHER, nonce, 8), clock.now(), &mut rec);
    assert_eq!(repair_asked(&rec), [(6, 8)]);
}

#[test]
fn requests_before_the_live_nodes_are_known_wait() {
    let mut h = Homes::new(settings(true, false));
    let mut rec = Rec::new();
    let clock = Clock::new();
    assert!(!h.cluster_ready());
    h.handle(join("r", "m", conn(1, 9), None), clock.now(), &mut rec);
    assert!(rec.ops.is_empty() && rec.wires.is_empty() && rec.deliveries.is_empty());
    h.handle(Input::Nodes(nodes(&[ME])), clock.now(), &mut rec);
    assert!(h.cluster_ready());
    assert_eq!(rec.loads(), 1);
    h.handle(loaded("r", 0, "e1"), clock.now(), &mut rec);
    assert_eq!(joined_seq(&rec), Some(0));
}

#[test]
fn presence_events_and_direct_messages_reach_the_shards_with_members() {
    let (mut h, mut rec, clock) = lone_room("r", 0, true);
    h.handle(join("r", "b", conn(0, 2), None), clock.now(), &mut rec);
    let events: Vec<(usize, Value)> = rec
        .deliveries
        .iter()
        .filter_map(|(to, d)| match d {
            Delivery::Room { frame, .. } => Some((*to, json(frame))),
            _ => None,
        })
        .collect();
    assert_eq!(events.len(), 2, "both shards with members: {events:?}");
    assert!(events
        .iter()
        .all(|(_, v)| v["event"] == "join" && v["user"] == "b"));
    // A second connection of a user already present is no event.
    rec.clear();
    h.handle(join("r", "b", conn(1, 3), None), clock.now(), &mut rec);
    assert!(!rec
        .deliveries
        .iter()
        .any(|(_, d)| matches!(d, Delivery::Room { .. })));
    // Direct messages: to the shards where the user has connections.
    rec.clear();
    for shard in [0, 1] {
        h.handle(
            Input::Request(Request::UserOnline {
                user: "b".into(),
                shard,
                conn: conn(shard, 9),
            }),
            clock.now(),
            &mut rec,
        );
    }
    h.handle(
        Input::Request(Request::Direct {
            to: "b".into(),
            from: "a".into(),
            id: "d1".into(),
            body: "1".into(),
            conn: conn(0, 1),
        }),
        clock.now(),
        &mut rec,
    );
    let to: Vec<usize> = rec
        .deliveries
        .iter()
        .filter_map(|(s, d)| matches!(d, Delivery::ToUser { .. }).then_some(*s))
        .collect();
    assert_eq!(to, [0, 1]);
    assert_eq!(rec.frames_to(conn(0, 1))[0]["delivered"], 2);
    // The server API's actions go the same way, and answer how many
    // connections they reached.
    rec.clear();
    let action = UserAction::Disconnect {
        code: 4010,
        reason: "bye".into(),
    };
    h.handle(
        Input::Request(Request::Act {
            user: "b".into(),
            action: action.clone(),
            conn: conn(1, 3),
        }),
        clock.now(),
        &mut rec,
    );
    let acts: Vec<(usize, &UserAction)> = rec
        .deliveries
        .iter()
        .filter_map(|(s, d)| match d {
            Delivery::Act { user, action } if &**user == "b" => Some((*s, action)),
            _ => None,
        })
        .collect();
    assert_eq!(acts, [(0, &action), (1, &action)]);
    let answer = &rec.frames_to(conn(1, 3))[0];
    assert_eq!(
        (answer["type"].as_str(), answer["connections"].as_u64()),
        (Some("acted"), Some(2))
    );
    // Nobody online: nothing delivered, zero reached.
    rec.clear();
    h.handle(
        Input::Request(Request::Act {
            user: "nobody".into(),
            action,
            conn: conn(1, 3),
        }),
        clock.now(),
        &mut rec,
    );
    assert!(!rec
        .deliveries
        .iter()
        .any(|(_, d)| matches!(d, Delivery::Act { .. })));
    assert_eq!(rec.frames_to(conn(1, 3))[0]["connections"], 0);
}

#[test]
fn a_user_at_the_cap_gets_its_next_connection_refused_until_one_goes() {
    let mut h = Homes::new(Settings {
        max_connections_per_user: Some(2),
        ..settings(false, true)
    });
    let mut rec = Rec::new();
    let clock = Clock::new();
    let online = |shard: u16, key: u32| {
        Input::Request(Request::UserOnline {
            user: "u".into(),
            shard,
            conn: conn(shard, key),
        })
    };
    let refused = |rec: &Rec| -> Vec<(usize, ConnRef)> {
        let r = rec.deliveries.iter().filter_map(|(to, d)| match d {
            Delivery::Refused {
                conn,
                why: Refusal::TooManyForUser,
            } => Some((*to, *conn)),
            _ => None,
        });
        r.collect()
    };
    // Two connections, on two shards: both counted.
    h.handle(online(0, 1), clock.now(), &mut rec);
    h.handle(online(1, 2), clock.now(), &mut rec);
    assert!(refused(&rec).is_empty());
    // The third, wherever it is, is refused back to its own shard.
    h.handle(online(1, 3), clock.now(), &mut rec);
    assert_eq!(refused(&rec), [(1, conn(1, 3))]);
    assert_eq!(rec.counts, [Count::UserCapRefused]);
    // Another user is not affected.
    let other = Request::UserOnline {
        user: "v".into(),
        shard: 0,
        conn: conn(0, 4),
    };
    h.handle(Input::Request(other), clock.now(), &mut rec);
    assert_eq!(refused(&rec).len(), 1);
    // One goes offline: the next one is counted.
    let offline = Request::UserOffline {
        user: "u".into(),
        shard: 0,
    };
    h.handle(Input::Request(offline), clock.now(), &mut rec);
    rec.clear();
    h.handle(online(0, 5), clock.now(), &mut rec);
    assert!(refused(&rec).is_empty());
    h.handle(online(0, 6), clock.now(), &mut rec);
    assert_eq!(refused(&rec), [(0, conn(0, 6))]);
}

#[test]
fn an_address_at_the_cap_gets_its_next_connection_refused_until_one_goes() {
    let mut h = Homes::new(Settings {
        max_connections_per_ip: Some(1),
        ..settings(false, true)
    });
    let (mut rec, clock) = (Rec::new(), Clock::new());
    let a: std::net::IpAddr = "198.51.100.1".parse().unwrap();
    let b: std::net::IpAddr = "2001:db8::1".parse().unwrap();
    let mut online = |h: &mut Homes, ip, key| {
        let req = Request::PeerOnline {
            ip,
            conn: conn(1, key),
        };
        rec.clear();
        h.handle(Input::Request(req), clock.now(), &mut rec);
        let refused = rec.deliveries.iter().any(|(to, d)| {
            *to == 1
                && matches!(d, Delivery::Refused { conn: c, why: Refusal::TooManyForAddress } if *c == conn(1, key))
        });
        (refused, rec.counts.clone())
    };
    assert_eq!(online(&mut h, a, 1), (false, vec![]));
    assert_eq!(online(&mut h, a, 2), (true, vec![Count::AddressCapRefused]));
    assert_eq!(online(&mut h, b, 3), (false, vec![]), "another address");
    let offline = Request::PeerOffline { ip: a };
    h.handle(Input::Request(offline), clock.now(), &mut Rec::new());
    assert_eq!(online(&mut h, a, 4), (false, vec![]), "the slot came free");
}
