//! Several gateway processes in one cluster on loopback: one order per room
//! across nodes, direct messages across nodes, gaps repaired from history,
//! and a node killed mid-stream whose clients resume on another node.
//! Needs redis-server (scripts/deps.sh installs it).

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{
    chat::Chat,
    cluster::{mesh_endpoints, wait_for_cluster, Node},
    redis::RedisServer,
};
use serde_json::{json, Value};

/// A room name whose home is `home` among `nodes` (node ids).
fn room_homed_on(home: &str, nodes: &[&str], prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|r| corecast_router::home_node(r, nodes) == Some(home))
        .unwrap()
}

/// What one member received of a room: (seq, id) in arrival order; acks
/// read on the way are kept in `acks`.
fn messages_until(
    c: &mut Chat,
    room: &str,
    count: usize,
    acks: &mut Vec<Value>,
) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < count {
        let v = c.recv();
        if v["type"] == "msg" && v["room"] == room {
            got.push((
                v["seq"].as_u64().unwrap(),
                v["id"].as_str().unwrap().to_string(),
            ));
        } else if v["type"] == "ack" {
            acks.push(v);
        }
    }
    got
}

fn three_nodes(redis: &RedisServer, extra: &[&str]) -> Vec<Node> {
    let ends = mesh_endpoints(3);
    let url = redis.url();
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let mut args = vec!["--redis", url.as_str()];
            let spill = redis.scratch(&format!("spill-{i}"));
            args.extend(["--spill-dir", spill.as_str()]);
            args.extend_from_slice(extra);
            Node::start(&format!("n{}", i + 1), &ends[i], &args)
        })
        .collect();
    wait_for_cluster(&nodes.iter().collect::<Vec<_>>());
    nodes
}

/// Nodes that find each other through the Redis registry only (no
/// --peers): members on all three, publishers on all three, rooms homed on
/// each: every member gets every message once, in one order.
#[test]
fn every_member_gets_one_order_wherever_publisher_and_home_are() {
    let redis = RedisServer::start();
    let nodes = three_nodes(&redis, &[]);
    let ids = ["n1", "n2", "n3"];
    for home in ids {
        let room = room_homed_on(home, &ids, "order");
        let mut members: Vec<Chat> = nodes
            .iter()
            .flat_map(|n| {
                (0..2).map(move |k| Chat::connect_addr(n.addr, &format!("m{k}-{}", n.id)).unwrap())
            })
            .collect();
        for m in &mut members {
            assert_eq!(m.join(&room), 0);
        }
        // One publisher per node, interleaved, 20 publishes each.
        let per = 20;
        for k in 0..per {
            for (p, m) in members.iter_mut().step_by(2).enumerate() {
                m.send(
                    json!({"type":"publish","room":room,"id":format!("p{p}-{k}"),"body":{"k":k}}),
                );
            }
        }
        let total = per * 3;
        let mut first: Option<Vec<(u64, String)>> = None;
        let mut acks: Vec<Vec<Value>> = Vec::new();
        for (i, m) in members.iter_mut().enumerate() {
            acks.push(Vec::new());
            let got = messages_until(m, &room, total, &mut acks[i]);
            let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
            assert_eq!(
                seqs,
                (1..=total as u64).collect::<Vec<_>>(),
                "member {i} of {room} (home {home}): gaps, duplicates or reorders"
            );
            // Each publisher's messages in the order it sent them.
            for p in 0..3 {
                let mine: Vec<&str> = got
                    .iter()
                    .map(|(_, id)| id.as_str())
                    .filter(|id| id.starts_with(&format!("p{p}-")))
                    .collect();
                let sent: Vec<String> = (0..per).map(|k| format!("p{p}-{k}")).collect();
                assert_eq!(mine, sent, "publisher {p}'s order at member {i}");
            }
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(&got, f, "members disagree on {room}'s order"),
            }
        }
        // Every publish was acked with the seq everybody saw.
        let order: HashMap<String, u64> =
            first.unwrap().into_iter().map(|(s, id)| (id, s)).collect();
        for (i, m) in members.iter_mut().enumerate().step_by(2) {
            while acks[i].len() < per {
                acks[i].push(m.recv_type("ack"));
            }
            for a in &acks[i] {
                assert_eq!(a["stored"], true, "{a}");
                assert_eq!(
                    Some(&a["seq"].as_u64().unwrap()),
                    order.get(a["id"].as_str().unwrap()),
                    "{a}"
                );
            }
        }
    }
    let forwarded: u64 = nodes
        .iter()
        .map(|n| n.metric("corecast_mesh_forwarded_total"))
        .sum();
    assert!(
        forwarded >= 2 * 3 * 20,
        "publishes from non-home nodes travel to the home: {forwarded}"
    );
}

/// Static peers, no Redis: a user connected to two nodes gets a sender's
/// direct messages on both, in the order sent.
#[test]
fn direct_messages_reach_a_user_on_every_node() {
    let ends = mesh_endpoints(3);
    let peers = ends.join(",");
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(&format!("d{}", i + 1), &ends[i], &["--peers", &peers]))
        .collect();
    wait_for_cluster(&nodes.iter().collect::<Vec<_>>());
    let mut bob2 = Chat::connect_addr(nodes[1].addr, "bob").unwrap();
    let mut bob3 = Chat::connect_addr(nodes[2].addr, "bob").unwrap();
    let mut alice = Chat::connect_addr(nodes[0].addr, "alice").unwrap();
    // The user subscriptions travel to alice's node; a DM sent before they
    // arrive is lost (at most once), so probe until both connections hear.
    assert!(
        common::eventually(Duration::from_secs(5), || {
            alice.send(json!({"type":"dm","to":"bob","id":"probe","body":{}}));
            alice.recv_type("ack");
            [&mut bob2, &mut bob3].into_iter().all(|b| {
                b.ws.get_ref()
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let ok = std::iter::from_fn(|| b.ws.read().ok())
                    .any(|m| m.to_text().is_ok_and(|t| t.contains("\"probe\"")));
                b.ws.get_ref()
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                ok
            })
        }),
        "bob's nodes never subscribed"
    );
    for k in 0..30 {
        alice.send(json!({"type":"dm","to":"bob","id":format!("d{k}"),"body":{"k":k}}));
    }
    for b in [&mut bob2, &mut bob3] {
        let mut ids = Vec::new();
        while ids.len() < 30 {
            let v = b.recv();
            if v["type"] == "dm" && v["id"] != "probe" {
                assert_eq!(v["from"], "alice", "{v}");
                ids.push(v["id"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(ids, (0..30).map(|k| format!("d{k}")).collect::<Vec<_>>());
    }
}

/// The home drops every 4th message it sends to the mesh (fault
/// injection, as a PUB at its high-water mark would): members on the
/// other node still get every seq, in order, repaired from history.
#[test]
fn a_node_repairs_gaps_from_history_before_delivering_later_messages() {
    let redis = RedisServer::start();
    let ends = mesh_endpoints(2);
    let peers = ends.join(",");
    let url = redis.url();
    let (spill1, spill2) = (redis.scratch("spill-g1"), redis.scratch("spill-g2"));
    let home = Node::start(
        "g1",
        &ends[0],
        &[
            "--peers",
            &peers,
            "--redis",
            &url,
            "--spill-dir",
            &spill1,
            "--mesh-drop-every",
            "4",
        ],
    );
    let relay = Node::start(
        "g2",
        &ends[1],
        &["--peers", &peers, "--redis", &url, "--spill-dir", &spill2],
    );
    wait_for_cluster(&[&home, &relay]);
    let room = room_homed_on("g1", &["g1", "g2"], "gaps");
    let mut far = Chat::connect_addr(relay.addr, "far").unwrap();
    far.join(&room);
    let mut publisher = Chat::connect_addr(home.addr, "pub").unwrap();
    publisher.join(&room);
    let n = 41;
    for k in 0..n {
        publisher.send(json!({"type":"publish","room":room,"id":format!("g{k}"),"body":{}}));
        publisher.recv_type("ack");
    }
    let got = messages_until(&mut far, &room, n, &mut Vec::new());
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
    assert_eq!(home.metric("corecast_mesh_dropped_injected_total"), 10);
    assert_eq!(relay.metric("corecast_mesh_gaps_total"), 10);
    assert_eq!(relay.metric("corecast_mesh_repaired_total"), 10);
    assert_eq!(relay.metric("corecast_mesh_unrepaired_total"), 0);
}

/// A member that follows a room through node deaths: it reconnects to
/// the next live node and resumes from its last seq.
struct Follower {
    name: String,
    addrs: Vec<SocketAddr>,
    at: usize,
    chat: Chat,
    room: String,
    epoch: String,
    seqs: Vec<u64>,
    resumes: u32,
}

impl Follower {
    fn join(addrs: Vec<SocketAddr>, at: usize, name: &str, room: &str) -> Follower {
        let mut chat = Chat::connect_addr(addrs[at], name).unwrap();
        chat.send(json!({"type":"join","room":room}));
        let j = chat.recv_type("joined");
        Follower {
            name: name.into(),
            addrs,
            at,
            chat,
            room: room.into(),
            epoch: j["epoch"].as_str().unwrap().to_string(),
            seqs: vec![j["seq"].as_u64().unwrap()],
            resumes: 0,
        }
    }

    /// Reads until `last` was received or `deadline`; reconnects when its
    /// node dies.
    fn follow(&mut self, last: &AtomicU64, deadline: Instant) {
        self.chat
            .ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        while Instant::now() < deadline {
            let target = last.load(Ordering::Acquire);
            if target > 0 && self.seqs.last() >= Some(&target) {
                return;
            }
            match self.chat.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "msg" && v["room"] == self.room {
                        self.seqs.push(v["seq"].as_u64().unwrap());
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => self.resume(deadline),
            }
        }
    }

    fn resume(&mut self, deadline: Instant) {
        while Instant::now() < deadline {
            self.at = (self.at + 1) % self.addrs.len();
            let Ok(mut chat) = Chat::connect_addr(self.addrs[self.at], &self.name) else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let since = *self.seqs.last().unwrap();
            chat.send(json!({"type":"join","room":self.room,"since":since,"epoch":self.epoch}));
            let j = chat.recv_type("joined");
            assert_eq!(
                j["recovered"], true,
                "{} resumed from {since}: {j}",
                self.name
            );
            chat.ws
                .get_ref()
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            self.chat = chat;
            self.resumes += 1;
            return;
        }
    }
}

/// Followers reading on their own threads until the last acked seq.
struct Following {
    last: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<Follower>>,
}

impl Following {
    fn start(followers: Vec<Follower>) -> Following {
        let last = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(60);
        let handles = followers
            .into_iter()
            .map(|mut f| {
                let last = last.clone();
                std::thread::spawn(move || {
                    f.follow(&last, deadline);
                    f
                })
            })
            .collect();
        Following { last, handles }
    }

    /// Waits for every follower to reach the highest acked seq; each must
    /// hold a gapless run with every acked seq after its join, and no seq
    /// may have been acked twice.
    fn check(self, acked: &[u64]) -> Vec<Follower> {
        let mut sorted = acked.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), acked.len(), "a seq was acked twice");
        self.last
            .store(*acked.iter().max().unwrap(), Ordering::Release);
        let followers: Vec<Follower> = self
            .handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        for f in &followers {
            let base = f.seqs[0];
            let run = &f.seqs[1..];
            assert_eq!(
                run,
                (base + 1..=base + run.len() as u64).collect::<Vec<_>>(),
                "{}: gaps, duplicates or reorders",
                f.name
            );
            for s in acked.iter().filter(|&&s| s > base) {
                assert!(run.contains(s), "{} lost acked seq {s}", f.name);
            }
        }
        followers
    }
}

/// A publisher on a surviving node keeps publishing while the room's home
/// node is SIGKILLed: members of the dead node resume on others; every
/// member ends up with a gapless run of seqs holding every acked one.
#[test]
fn a_killed_home_loses_no_acked_message() {
    let redis = RedisServer::start();
    let mut nodes = three_nodes(&redis, &["--rate-limit-per-s", "10000"]);
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let room = room_homed_on("n3", &["n1", "n2", "n3"], "kill");
    let followers: Vec<Follower> = [0, 1, 2, 2]
        .iter()
        .enumerate()
        .map(|(i, &at)| Follower::join(addrs.clone(), at, &format!("f{i}"), &room))
        .collect();
    let following = Following::start(followers);
    let mut publisher = Chat::connect_addr(addrs[0], "publisher").unwrap();
    publisher.join(&room);
    publisher
        .ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut acked = Vec::new();
    let mut unacked = 0;
    for k in 0..400 {
        if k == 150 {
            nodes[2].kill();
        }
        publisher.send(json!({"type":"publish","room":room,"id":format!("k{k}"),"body":{"k":k}}));
        // An ack, or nothing within a second (the home died with it).
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            if Instant::now() > until {
                unacked += 1;
                break;
            }
            let Ok(tungstenite::Message::Text(t)) = publisher.ws.read() else {
                continue;
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "ack" && v["id"] == format!("k{k}") {
                assert_eq!(v["stored"], true, "{v}");
                acked.push(v["seq"].as_u64().unwrap());
                break;
            }
            assert_ne!(v["type"], "error", "{v}");
        }
    }
    assert!(unacked < 10, "{unacked} publishes never acked");
    for (i, f) in following.check(&acked).iter().enumerate() {
        // Followers 2 and 3 were on the killed node.
        if i >= 2 {
            assert!(f.resumes >= 1, "{} was on the killed node", f.name);
        }
    }
    assert!(
        nodes[0].metric("corecast_mesh_rehomed_total")
            + nodes[1].metric("corecast_mesh_rehomed_total")
            >= 1
    );
}

/// Publishes `id` until it is acked, retrying on `room_moving`; returns the
/// seq and how many times it was refused.
fn publish_retrying(c: &mut Chat, room: &str, id: &str) -> (u64, u32) {
    let mut refused = 0;
    loop {
        c.send(json!({"type":"publish","room":room,"id":id,"body":{}}));
        loop {
            let v = c.recv();
            if v["type"] == "ack" && v["id"] == id {
                assert_eq!(v["stored"], true, "{v}");
                return (v["seq"].as_u64().unwrap(), refused);
            }
            if v["type"] == "error" {
                assert_eq!(v["code"], "room_moving", "{v}");
                refused += 1;
                break;
            }
        }
    }
}

/// Two nodes that cannot see each other (a split brain) both number one
/// room in one Redis: the store refuses every seq the other already took
/// (`room_moving`, retried), each acked message has its own seq, and each
/// node's members still get a gapless run, the other node's messages
/// filled in from history.
#[test]
fn two_homes_at_once_never_give_one_seq_twice() {
    let redis = RedisServer::start();
    let url = redis.url();
    let ends = mesh_endpoints(2);
    let (sa, sb) = (redis.scratch("spill-a"), redis.scratch("spill-b"));
    let alone = |id: &str, end: &str, spill: &str| {
        Node::start(
            id,
            end,
            &["--redis", &url, "--spill-dir", spill, "--no-registry"],
        )
    };
    let (a, b) = (
        alone("split-a", &ends[0], &sa),
        alone("split-b", &ends[1], &sb),
    );
    wait_for_cluster(&[&a]);
    wait_for_cluster(&[&b]);
    let room = "split";
    let mut a1 = Chat::connect_addr(a.addr, "a1").unwrap();
    let mut b1 = Chat::connect_addr(b.addr, "b1").unwrap();
    let mut pa = Chat::connect_addr(a.addr, "pa").unwrap();
    let mut pb = Chat::connect_addr(b.addr, "pb").unwrap();
    for c in [&mut a1, &mut b1, &mut pa, &mut pb] {
        assert_eq!(c.join(room), 0);
    }
    let mut acks = Vec::new();
    let mut refused = 0;
    for (on_a, id) in [(true, "x1"), (false, "y1"), (true, "x2"), (false, "y2")] {
        let c = if on_a { &mut pa } else { &mut pb };
        let (seq, r) = publish_retrying(c, room, id);
        acks.push((seq, id));
        refused += r;
    }
    assert_eq!(acks, vec![(1, "x1"), (2, "y1"), (3, "x2"), (4, "y2")]);
    // Each home's first publish after the other's is refused; a retry that
    // reaches the home before it heard of the refusal is refused again.
    assert!(refused >= 3, "{refused} refusals");
    assert_eq!(redis.stream_seqs(room), vec![1, 2, 3, 4]);
    let conflicts =
        a.metric("corecast_storage_conflicts_total") + b.metric("corecast_storage_conflicts_total");
    assert_eq!(conflicts, 3);
    let want = |n: usize| {
        acks[..n]
            .iter()
            .map(|(s, id)| (*s, id.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(messages_until(&mut a1, room, 3, &mut Vec::new()), want(3));
    assert_eq!(messages_until(&mut b1, room, 4, &mut Vec::new()), want(4));
}

/// A third node joins a running cluster through the Redis registry (the
/// others are not restarted) while a publisher keeps publishing in a room
/// that moves to it: every acked message has its own seq, and every member
/// gets a gapless run holding all of them.
#[test]
fn a_joining_node_takes_its_rooms_without_a_gap() {
    let redis = RedisServer::start();
    let url = redis.url();
    let ends = mesh_endpoints(3);
    let start = |i: usize| {
        let spill = redis.scratch(&format!("spill-j{i}"));
        let rate = ["--rate-limit-per-s", "10000"];
        let mut args = vec!["--redis", url.as_str(), "--spill-dir", spill.as_str()];
        args.extend(rate);
        Node::start(&format!("j{}", i + 1), &ends[i], &args)
    };
    let (n1, n2) = (start(0), start(1));
    wait_for_cluster(&[&n1, &n2]);
    let room = (0..)
        .map(|i| format!("moving-{i}"))
        .find(|r| {
            corecast_router::home_node(r, &["j1", "j2", "j3"]) == Some("j3")
                && corecast_router::home_node(r, &["j1", "j2"]) == Some("j1")
        })
        .unwrap();
    let addrs = vec![n1.addr, n2.addr];
    let followers: Vec<Follower> = [0, 0, 1, 1]
        .iter()
        .enumerate()
        .map(|(i, &at)| Follower::join(addrs.clone(), at, &format!("j{i}"), &room))
        .collect();
    let following = Following::start(followers);
    let mut publisher = Chat::connect_addr(n2.addr, "mover").unwrap();
    publisher.join(&room);
    let mut acked = Vec::new();
    let mut n3 = None;
    for k in 0..300 {
        if k == 100 {
            n3 = Some(start(2));
        }
        let (seq, _) = publish_retrying(&mut publisher, &room, &format!("mv{k}"));
        acked.push(seq);
        std::thread::sleep(Duration::from_millis(2));
    }
    let n3 = n3.unwrap();
    wait_for_cluster(&[&n1, &n2, &n3]);
    following.check(&acked);
    assert!(
        n3.metric("corecast_publishes_total") > 0,
        "the room moved to the joining node"
    );
}

#[test]
fn bad_mesh_flags_are_refused_with_a_reason() {
    let bind = ["--mesh-bind", "tcp://127.0.0.1:0"];
    for (args, want) in [
        (vec![bind[0], bind[1]], "--mesh-bind needs --node-id"),
        (vec!["--peers", "tcp://127.0.0.1:7001"], "need --mesh-bind"),
        (
            vec!["--node-id", "x", "--mesh-bind", "tcp://host:7001"],
            "expected tcp://IP:PORT",
        ),
        (
            vec!["--node-id", "x", "--mesh-bind", "tcp://0.0.0.0:7001"],
            "--mesh-advertise",
        ),
        (
            vec!["--node-id", "x", bind[0], bind[1], "--peers", "nowhere"],
            "--peers \"nowhere\"",
        ),
        (
            vec![
                "--node-id",
                "x",
                bind[0],
                bind[1],
                "--node-timeout-ms",
                "100",
            ],
            "--node-timeout-ms",
        ),
    ] {
        let e = common::refusal(&args);
        assert!(e.contains(want), "{args:?}: {e}");
    }
}

/// The server API on any node: a publish reaches members on every node
/// whichever node homes the room, and a disconnect closes the user's
/// connections on the other nodes.
#[test]
fn the_api_on_any_node_reaches_every_node() {
    use common::{api, cluster::free_port, eventually};
    let redis = RedisServer::start();
    let apis: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let ends = mesh_endpoints(3);
    let url = redis.url();
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let spill = redis.scratch(&format!("spill-{i}"));
            let listen = apis[i].to_string();
            let args = [
                "--redis",
                url.as_str(),
                "--spill-dir",
                spill.as_str(),
                "--api-listen",
                listen.as_str(),
                "--api-key",
                api::KEY,
            ];
            Node::start(&format!("n{}", i + 1), &ends[i], &args)
        })
        .collect();
    wait_for_cluster(&nodes.iter().collect::<Vec<_>>());
    let ids = ["n1", "n2", "n3"];
    for (k, home) in ids.iter().enumerate() {
        let room = room_homed_on(home, &ids, "api");
        let mut members: Vec<Chat> = nodes
            .iter()
            .map(|n| Chat::connect_addr(n.addr, &format!("m-{}", n.id)).unwrap())
            .collect();
        for m in &mut members {
            m.join(&room);
        }
        // Called on a node that is not the room's home.
        let via = apis[(k + 1) % 3];
        let body = format!(r#"{{"room":"{room}","body":{{"k":{k}}},"id":"api-{k}"}}"#);
        let first = api::ok(via, "/api/publish", &body);
        assert_eq!(first["seq"], 1, "{room} via {via}: {first}");
        let again = api::ok(apis[(k + 2) % 3], "/api/publish", &body);
        assert_eq!(
            (again["seq"].as_u64(), &again["duplicate"]),
            (Some(1), &json!(true)),
            "{again}"
        );
        for (i, m) in members.iter_mut().enumerate() {
            let msg = m.recv_type("msg");
            assert_eq!(
                (msg["room"].as_str(), msg["seq"].as_u64()),
                (Some(&*room), Some(1)),
                "member on n{}",
                i + 1
            );
        }
        // History and presence are the home's, from any node.
        let h = api::ok(via, "/api/history", &format!(r#"{{"room":"{room}"}}"#));
        assert_eq!(h["messages"].as_array().map(Vec::len), Some(1), "{h}");
        assert!(
            eventually(Duration::from_secs(5), || {
                api::ok(
                    via,
                    "/api/presence_stats",
                    &format!(r#"{{"room":"{room}"}}"#),
                )["count"]
                    == 3
            }),
            "presence of {room} never counted the 3 members"
        );
    }
    let info = api::ok(apis[0], "/api/info", "{}");
    assert_eq!(info["nodes"], json!(["n1", "n2", "n3"]), "{info}");
    // Carol on n2 and n3; the call goes to n1, where she has nothing.
    let mut carol = vec![
        Chat::connect_addr(nodes[1].addr, "carol").unwrap(),
        Chat::connect_addr(nodes[2].addr, "carol").unwrap(),
    ];
    let mut dave = Chat::connect_addr(nodes[1].addr, "dave").unwrap();
    // The nodes subscribe to carol's topic as her connections come up: a
    // direct message from the API reaches both once they have.
    for c in &mut carol {
        let stream = c.ws.get_ref().try_clone().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let reached = (0..50).any(|_| {
            api::ok(apis[0], "/api/dm", r#"{"to":"carol","body":"probe"}"#);
            matches!(c.ws.read(), Ok(tungstenite::Message::Text(t)) if t.contains("probe"))
        });
        assert!(reached, "carol's node never subscribed");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    api::ok(
        apis[0],
        "/api/disconnect",
        r#"{"user":"carol","code":4321,"reason":"bye"}"#,
    );
    for c in &mut carol {
        assert_eq!(c.close_code(), (4321, "bye".to_string()));
    }
    dave.send(json!({"type":"presence","room":"x"}));
    assert_eq!(dave.recv_type("presence")["room"], "x");
}

/// An ephemeral namespace in a cluster: sequenced by the room's home node,
/// delivered on every node in one order, never stored.
#[test]
fn ephemeral_rooms_reach_every_node_in_one_order() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("corecast-cluster-ns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("corecast.toml");
    std::fs::write(&file, "[namespaces.\"typing:\"]\nephemeral = true\n").unwrap();
    let nodes = three_nodes(&redis, &["--config", file.to_str().unwrap()]);
    let ids = ["n1", "n2", "n3"];
    let room = room_homed_on("n2", &ids, "typing:r");
    let mut members: Vec<Chat> = nodes
        .iter()
        .map(|n| Chat::connect_addr(n.addr, &format!("e-{}", n.id)).unwrap())
        .collect();
    for m in &mut members {
        m.join(&room);
    }
    // Publishers on every node, 10 each.
    for k in 0..10 {
        for (p, m) in members.iter_mut().enumerate() {
            m.send(json!({"type":"publish","room":room,"id":format!("p{p}-{k}"),"body":k}));
        }
    }
    let mut first: Option<Vec<(u64, String)>> = None;
    for (i, m) in members.iter_mut().enumerate() {
        let mut acks = Vec::new();
        let got = messages_until(m, &room, 30, &mut acks);
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>(), "member on n{}", i + 1);
        match &first {
            None => first = Some(got),
            Some(f) => assert_eq!(&got, f, "members disagree on the order"),
        }
        while acks.len() < 10 {
            let v = m.recv();
            if v["type"] == "ack" {
                acks.push(v);
            }
        }
        assert!(acks.iter().all(|a| a["stored"] == false), "{acks:?}");
    }
    // Nothing reached Redis.
    assert!(redis.stream_seqs(&room).is_empty());
}
