//! History, resume and durability, with both stores: the memory store, and
//! a private redis-server per test (killed by pid in the fault test).

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{chat::*, redis::RedisServer, *};
use serde_json::{json, Value};

/// A chat gateway storing into `redis`, its spill dir beside Redis's data.
fn redis_chat_server(redis: &RedisServer, extra: &[&str]) -> TestServer {
    let (url, spill) = (redis.url(), redis.scratch("spill"));
    let mut args = vec!["--redis", url.as_str(), "--spill-dir", spill.as_str()];
    args.extend_from_slice(extra);
    chat_server(&args)
}

/// Publishes and waits for the ack; returns its seq.
fn publish(c: &mut Chat, room: &str, id: &str) -> u64 {
    c.send(json!({"type":"publish","room":room,"id":id,"body":{"n":id}}));
    let ack = c.recv_type("ack");
    assert_eq!(
        (ack["id"].as_str(), ack["stored"].as_bool()),
        (Some(id), Some(true)),
        "{ack}"
    );
    ack["seq"].as_u64().unwrap()
}

/// Joins and returns the `joined` frame.
fn join(c: &mut Chat, room: &str) -> Value {
    c.send(json!({"type":"join","room":room}));
    c.recv_type("joined")
}

fn history(c: &mut Chat, req: Value) -> (Vec<u64>, Value) {
    c.send(req);
    let h = c.recv_type("history");
    let seqs = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    (seqs, h)
}

/// Resumes with `since`/`epoch`: the `joined` frame and the seqs of the
/// message frames that follow it, up to `until` (a live message).
fn resume(c: &mut Chat, room: &str, since: u64, epoch: &str) -> Value {
    c.send(json!({"type":"join","room":room,"since":since,"epoch":epoch}));
    c.recv_type("joined")
}

fn assert_resumed(joined: &Value, recovered: bool, missed: u64) {
    assert_eq!(
        (joined["recovered"].as_bool(), joined["missed"].as_u64()),
        (Some(recovered), Some(missed)),
        "{joined}"
    );
}

fn next_msgs(c: &mut Chat, n: usize) -> Vec<u64> {
    (0..n)
        .map(|_| c.recv_type("msg")["seq"].as_u64().unwrap())
        .collect()
}

/// The same scenario on either store: history by count and by seq, a
/// resume that is complete, one in the wrong epoch, one past the window.
fn history_and_resume(server: &TestServer) {
    let mut a = Chat::connect(server, "alice");
    let j = join(&mut a, "hist");
    let epoch = j["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty(), "{j}");
    for i in 1..=10 {
        assert_eq!(publish(&mut a, "hist", &format!("m{i}")), i);
    }
    let (seqs, h) = history(&mut a, json!({"type":"history","room":"hist","limit":5}));
    assert_eq!(seqs, vec![6, 7, 8, 9, 10]);
    assert_eq!(
        (h["complete"].as_bool(), h["seq"].as_u64()),
        (Some(true), Some(10))
    );
    assert_eq!(h["epoch"], epoch.as_str());
    assert_eq!(h["messages"][0]["body"], json!({"n":"m6"}));
    assert_eq!(h["messages"][0]["from"], "alice");
    let (seqs, _) = history(
        &mut a,
        json!({"type":"history","room":"hist","since":3,"limit":4}),
    );
    assert_eq!(seqs, vec![4, 5, 6, 7]);

    // Bob missed 5..10: he gets them after `joined`, before anything live.
    let mut b = Chat::connect(server, "bob");
    let j = resume(&mut b, "hist", 4, &epoch);
    assert_eq!(
        (
            j["recovered"].as_bool(),
            j["missed"].as_u64(),
            j["seq"].as_u64()
        ),
        (Some(true), Some(6), Some(10)),
        "{j}"
    );
    assert_eq!(next_msgs(&mut b, 6), vec![5, 6, 7, 8, 9, 10]);
    assert_eq!(publish(&mut a, "hist", "m11"), 11);
    assert_eq!(next_msgs(&mut b, 1), vec![11]);

    // Another epoch: nothing can be recovered.
    let mut c = Chat::connect(server, "carol");
    let j = resume(&mut c, "hist", 4, "not-the-epoch");
    assert_resumed(&j, false, 0);
    // Up to date already: recovered, nothing missed.
    let mut d = Chat::connect(server, "dave");
    let j = resume(&mut d, "hist", 11, &epoch);
    assert_resumed(&j, true, 0);
    // The stores keep 8 messages: from seq 1 the gap is not covered.
    let mut e = Chat::connect(server, "erin");
    let j = resume(&mut e, "hist", 1, &epoch);
    assert_eq!(j["recovered"].as_bool(), Some(false), "{j}");
    let missed = j["missed"].as_u64().unwrap() as usize;
    let got = next_msgs(&mut e, missed);
    assert_eq!(
        got,
        (12 - missed as u64..=11).collect::<Vec<_>>(),
        "the newest it has, in order"
    );
    assert_eq!(publish(&mut a, "hist", "m12"), 12);
    assert_eq!(next_msgs(&mut e, 1), vec![12]);
    // A retried publish is acked again with its seq, as stored.
    a.send(json!({"type":"publish","room":"hist","id":"m12","body":1}));
    let ack = a.recv_type("ack");
    assert_eq!(
        (
            ack["seq"].as_u64(),
            ack["duplicate"].as_bool(),
            ack["stored"].as_bool()
        ),
        (Some(12), Some(true), Some(true))
    );
}

#[test]
fn history_and_resume_with_the_memory_store() {
    let server = chat_server(&["--shards", "4", "--history-size", "8"]);
    history_and_resume(&server);
}

/// The memory store's homes ack before the worker has written (it cannot
/// fail): a `history` sent after the ack, from a connection on any shard,
/// must still find the message.
#[test]
fn an_acked_message_is_in_history_at_once_with_the_memory_store() {
    let server = chat_server(&["--shards", "4"]);
    let mut publisher = Chat::connect(&server, "alice");
    let mut readers: Vec<Chat> = (0..4).map(|_| Chat::connect(&server, "bob")).collect();
    for room in 0..8 {
        join(&mut publisher, &format!("fresh-{room}"));
    }
    for round in 1..=25 {
        for room in 0..8 {
            let room = format!("fresh-{room}");
            let seq = publish(&mut publisher, &room, &format!("m{round}"));
            assert_eq!(seq, round);
            let reader = &mut readers[(round as usize + room.len()) % 4];
            let (seqs, _) = history(reader, json!({"type":"history","room":room,"limit":1}));
            assert_eq!(seqs, vec![seq], "history of {room} right after the ack");
        }
    }
}

#[test]
fn history_and_resume_with_redis() {
    let redis = RedisServer::start();
    let server = redis_chat_server(&redis, &["--shards", "4", "--history-size", "8"]);
    history_and_resume(&server);
    drop(server);
    // Redis trims streams approximately (whole nodes): at least the last 8.
    let kept = redis.stream_seqs("hist");
    assert!(kept.len() >= 8, "{kept:?}");
    assert_eq!(kept, (13 - kept.len() as u64..=12).collect::<Vec<_>>());
}

#[test]
fn sequences_and_resume_survive_a_restart_with_redis_but_not_in_memory() {
    let redis = RedisServer::start();
    let spill = redis.scratch("spill");
    let args = [
        "--shards",
        "2",
        "--redis",
        &redis.url(),
        "--spill-dir",
        &spill,
    ];
    let server = chat_server(&args);
    let mut a = Chat::connect(&server, "alice");
    let epoch = join(&mut a, "durable")["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..=5 {
        publish(&mut a, "durable", &format!("m{i}"));
    }
    drop(a);
    server.stop().unwrap();

    let server = chat_server(&args);
    let mut b = Chat::connect(&server, "bob");
    let j = resume(&mut b, "durable", 3, &epoch);
    assert_eq!(
        (
            j["recovered"].as_bool(),
            j["missed"].as_u64(),
            j["seq"].as_u64(),
            j["epoch"].as_str()
        ),
        (Some(true), Some(2), Some(5), Some(epoch.as_str())),
        "{j}"
    );
    assert_eq!(next_msgs(&mut b, 2), vec![4, 5]);
    assert_eq!(
        publish(&mut b, "durable", "after-restart"),
        6,
        "the sequence continues"
    );
    drop(b);
    server.stop().unwrap();

    // The memory store forgets: a new epoch, and seqs start again.
    let server = chat_server(&["--shards", "2"]);
    let mut a = Chat::connect(&server, "alice");
    let epoch = join(&mut a, "volatile")["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    publish(&mut a, "volatile", "x");
    drop(a);
    server.stop().unwrap();
    let server = chat_server(&["--shards", "2"]);
    let mut b = Chat::connect(&server, "bob");
    let j = resume(&mut b, "volatile", 1, &epoch);
    assert_eq!(j["recovered"].as_bool(), Some(false), "{j}");
    assert_ne!(j["epoch"].as_str(), Some(epoch.as_str()));
    assert_eq!(publish(&mut b, "volatile", "y"), 1);
}

#[test]
fn presence_is_kept_in_redis() {
    let redis = RedisServer::start();
    let server = redis_chat_server(&redis, &["--shards", "2", "--node-id", "n7"]);
    let mut a = Chat::connect(&server, "alice");
    let mut b = Chat::connect(&server, "bob");
    join(&mut a, "room");
    join(&mut b, "room");
    a.send(json!({"type":"presence","room":"room"}));
    let p = a.recv_type("presence");
    assert_eq!(
        (p["count"].as_u64(), &p["users"]),
        (Some(2), &json!(["alice", "bob"])),
        "{p}"
    );
    let mut c = redis.client().unwrap();
    let members: Vec<String> = ::redis::cmd("ZRANGE")
        .arg("cc:{room}:p")
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .unwrap();
    assert_eq!(members, vec!["n7|alice", "n7|bob"]);
    b.send(json!({"type":"leave","room":"room"}));
    b.recv_type("left");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        a.send(json!({"type":"presence","room":"room"}));
        let p = a.recv_type("presence");
        if p["users"] == json!(["alice"]) {
            break;
        }
        assert!(Instant::now() < deadline, "bob never left: {p}");
    }
}

/// Redis is down when the gateway starts: live traffic goes on, in a new
/// epoch whose seqs start far above any Redis holds; the messages are
/// spilled, acked as stored, and land in the room's stream (which adopts
/// the epoch) once Redis is back.
#[test]
fn redis_down_at_start_keeps_live_traffic_in_a_new_epoch() {
    let mut redis = RedisServer::start();
    let old_epoch = {
        let server = redis_chat_server(&redis, &["--shards", "2"]);
        let mut a = Chat::connect(&server, "alice");
        let epoch = join(&mut a, "r")["epoch"].as_str().unwrap().to_string();
        for i in 1..=3 {
            assert_eq!(publish(&mut a, "r", &format!("old{i}")), i);
        }
        epoch
    };
    redis.kill();
    let server = redis_chat_server(&redis, &["--shards", "2"]);
    let mut a = Chat::connect(&server, "alice");
    let mut b = Chat::connect(&server, "bob");
    let j = join(&mut a, "r");
    let epoch = j["epoch"].as_str().unwrap().to_string();
    let base = j["seq"].as_u64().unwrap();
    assert!(!epoch.is_empty() && epoch != old_epoch, "{j}");
    assert!(base > 1 << 40, "far above any stored seq: {j}");
    assert_eq!(join(&mut b, "r")["epoch"], epoch.as_str());
    for i in 1..=3 {
        assert_eq!(publish(&mut a, "r", &format!("new{i}")), base + i);
    }
    assert_eq!(next_msgs(&mut b, 3), vec![base + 1, base + 2, base + 3]);
    // What needs the store says so.
    a.send(json!({"type":"history","room":"r"}));
    assert_eq!(a.recv_type("error")["code"], "storage_unavailable");
    let mut c = Chat::connect(&server, "carol");
    assert_resumed(&resume(&mut c, "r", 3, &old_epoch), false, 0);
    // Direct messages do not need the store.
    a.send(json!({"type":"dm","to":"bob","id":"d","body":"hi"}));
    assert_eq!(b.recv_type("dm")["body"], "hi");
    assert_eq!(server.metric("corecast_storage_breaker", ""), 1);
    assert_eq!(server.metric("corecast_provisional_epochs_total", ""), 1);

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("corecast_storage_breaker", "") != 0 {
        assert!(Instant::now() < deadline, "the breaker never closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (seqs, h) = history(&mut a, json!({"type":"history","room":"r","limit":10}));
    assert_eq!(seqs, vec![1, 2, 3, base + 1, base + 2, base + 3]);
    assert_eq!(
        (h["epoch"].as_str(), h["seq"].as_u64()),
        (Some(epoch.as_str()), Some(base + 3))
    );
    let mut d = Chat::connect(&server, "dave");
    assert_resumed(&resume(&mut d, "r", base + 1, &epoch), true, 2);
    drop(server);
    assert_eq!(
        redis.stream_seqs("r"),
        vec![1, 2, 3, base + 1, base + 2, base + 3]
    );
}

#[test]
fn bad_storage_flags_are_refused_with_a_reason() {
    for (args, want) in [
        (&["--redis", "nope://x"][..], "bad --redis URL"),
        (
            &["--store", "memory", "--redis", "redis://127.0.0.1/"][..],
            "drop one of them",
        ),
        (
            &["--history-ttl-s", "10", "--history-meta-ttl-s", "5"][..],
            "--history-meta-ttl-s",
        ),
        (&["--node-id", "a b"][..], "--node-id"),
    ] {
        let e = refusal(args);
        assert!(e.contains(want), "{args:?}: {e}");
    }
}

/// The fault test: a publisher never stops; Redis is killed by pid and
/// restarted on the same port; every acked message must end up in the
/// room's stream exactly once, in seq order, and the listener must have
/// kept receiving live messages throughout.
#[test]
fn every_acked_message_survives_a_redis_crash_exactly_once_in_order() {
    let mut redis = RedisServer::start();
    let server = redis_chat_server(
        &redis,
        &[
            "--shards",
            "2",
            "--redis-timeout-ms",
            "300",
            "--history-size",
            "100000",
            "--rate-limit-per-s",
            "100000",
            "--rate-limit-burst",
            "100000",
        ],
    );
    let mut listener = Chat::connect(&server, "listener");
    join(&mut listener, "ledger");
    let mut publisher = Chat::connect(&server, "publisher");
    join(&mut publisher, "ledger");

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let received: Arc<Mutex<Vec<u64>>> = Arc::default();
    let pub_thread = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            // Eight in flight, so a kill is likely to cut a batch.
            let mut in_flight = 0;
            loop {
                while in_flight < 8 && !stop.load(Ordering::Relaxed) {
                    i += 1;
                    publisher.send(json!({"type":"publish","room":"ledger","id":format!("p{i}"),"body":{"i":i}}));
                    in_flight += 1;
                }
                if in_flight == 0 {
                    return;
                }
                let v = publisher.recv();
                match v["type"].as_str() {
                    Some("ack") => {
                        assert_eq!(v["stored"], true, "{v}");
                        acked.lock().unwrap().push(v["seq"].as_u64().unwrap());
                        in_flight -= 1;
                    }
                    Some("msg") | Some("presence_event") => {}
                    _ => panic!("publisher got {v}"),
                }
            }
        })
    };
    let listen_thread = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            listener
                .ws
                .get_ref()
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            loop {
                match listener.ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        if v["type"] == "msg" {
                            received.lock().unwrap().push(v["seq"].as_u64().unwrap());
                        }
                    }
                    Ok(_) => {}
                    Err(_) if stop.load(Ordering::Relaxed) => return,
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("listener: {e}"),
                }
            }
        })
    };
    let wait_acks = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < n {
            let got = acked.lock().unwrap().len();
            assert!(Instant::now() < deadline, "only {got} acks");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_acks(300);
    redis.kill();
    let at_kill = received.lock().unwrap().len();
    let n = acked.lock().unwrap().len();
    wait_acks(n + 300);
    assert_eq!(
        server.metric("corecast_storage_breaker", ""),
        1,
        "breaker open while Redis is down"
    );
    assert!(server.metric("corecast_storage_spilled_total", "") > 0);
    let during_outage = received.lock().unwrap().len() - at_kill;
    redis.restart();
    let n = acked.lock().unwrap().len();
    wait_acks(n + 300);
    stop.store(true, Ordering::Relaxed);
    pub_thread.join().unwrap();
    // Replay finishes: breaker closed, spill file empty.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("corecast_storage_breaker", "") != 0
        || server.metric("corecast_storage_spill_bytes", "") != 0
    {
        assert!(Instant::now() < deadline, "replay did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(600));
    listen_thread.join().unwrap();

    let mut acked = acked.lock().unwrap().clone();
    acked.sort_unstable();
    let n = acked.len() as u64;
    assert_eq!(
        acked,
        (1..=n).collect::<Vec<_>>(),
        "acks are the gapless seqs 1..={n}"
    );
    assert_eq!(
        redis.stream_seqs("ledger"),
        acked,
        "every acked message stored once, in order"
    );
    let received = received.lock().unwrap().clone();
    assert_eq!(
        received,
        (1..=n).collect::<Vec<_>>(),
        "the listener got every message live, in order"
    );
    assert!(during_outage > 0, "live delivery went on during the outage");
    assert!(server.metric("corecast_storage_replayed_total", "") > 0);
    assert_eq!(server.metric("corecast_storage_lost_total", ""), 0);
}

/// A store that falls behind: past --storage-queue, publishes are refused
/// before they get a seq, so nothing is delivered that was not stored, and
/// a retry with the same id goes through once the store catches up.
#[test]
fn a_full_storage_queue_refuses_publishes_before_sequencing_them() {
    let redis = RedisServer::start();
    let server = redis_chat_server(
        &redis,
        &[
            "--shards",
            "1",
            "--storage-queue",
            "4",
            "--redis-timeout-ms",
            "5000",
        ],
    );
    let mut listener = Chat::connect(&server, "listener");
    join(&mut listener, "q");
    let mut p = Chat::connect(&server, "publisher");
    join(&mut p, "q");
    assert_eq!(publish(&mut p, "q", "warm"), 1);
    // Redis stops answering; the worker waits in its write.
    let stall = redis.stall(1.0);
    for i in 0..20 {
        p.send(json!({"type":"publish","room":"q","id":format!("b{i}"),"body":i}));
    }
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    while acked.len() + refused.len() < 20 {
        let v = p.recv();
        match v["type"].as_str() {
            Some("ack") => {
                assert_eq!(v["stored"], true, "{v}");
                acked.push(v["seq"].as_u64().unwrap());
            }
            Some("error") => {
                assert_eq!(v["code"], "storage_busy", "{v}");
                refused.push(v["id"].as_str().unwrap().to_string());
            }
            _ => {}
        }
    }
    stall.join().unwrap();
    assert!(!refused.is_empty(), "the queue of 4 must overflow");
    assert!(!acked.is_empty());
    acked.sort_unstable();
    assert_eq!(
        acked,
        (2..2 + acked.len() as u64).collect::<Vec<_>>(),
        "refused publishes took no seq"
    );
    assert_eq!(
        server.metric("corecast_storage_refusals_total", ""),
        refused.len() as u64
    );
    // Retries go through now, with the next seqs.
    let first_retry = 2 + acked.len() as u64;
    for (k, id) in refused.iter().enumerate() {
        assert_eq!(publish(&mut p, "q", id), first_retry + k as u64);
    }
    // The listener saw exactly the sequenced messages, in order.
    let last = first_retry + refused.len() as u64 - 1;
    assert_eq!(
        next_msgs(&mut listener, last as usize),
        (1..=last).collect::<Vec<_>>()
    );
    drop(server);
    assert_eq!(redis.stream_seqs("q"), (1..=last).collect::<Vec<_>>());
}

/// Messages published while a resume is being answered reach the resuming
/// client after the missed ones, none lost and none twice, also when it is
/// the room's only member on its shard.
#[test]
fn messages_published_during_a_resume_follow_the_missed_ones() {
    let redis = RedisServer::start();
    let server = redis_chat_server(&redis, &["--shards", "2", "--redis-timeout-ms", "5000"]);
    let shard_of_next = |server: &TestServer, before: &[u64]| -> usize {
        let after = server.metric_per_shard("corecast_websockets");
        (0..after.len()).find(|&i| after[i] > before[i]).unwrap()
    };
    let before = server.metric_per_shard("corecast_websockets");
    let mut p = Chat::connect(&server, "publisher");
    let p_shard = shard_of_next(&server, &before);
    let epoch = join(&mut p, "live")["epoch"].as_str().unwrap().to_string();
    for i in 1..=5 {
        publish(&mut p, "live", &format!("m{i}"));
    }
    // The resumer must sit on the other shard, alone in the room there.
    let mut others = Vec::new();
    let mut r = loop {
        let before = server.metric_per_shard("corecast_websockets");
        let c = Chat::connect(&server, "resumer");
        if shard_of_next(&server, &before) != p_shard {
            break c;
        }
        others.push(c);
    };
    // Redis stops answering: the resume waits in the worker while live
    // messages go on.
    let stall = redis.stall(0.6);
    r.send(json!({"type":"join","room":"live","since":2,"epoch":epoch}));
    // The home registered the join (at seq 5) once it announces it.
    loop {
        let e = p.recv_type("presence_event");
        if e["user"] == "resumer" && e["event"] == "join" {
            break;
        }
    }
    for i in 6..=8 {
        p.send(json!({"type":"publish","room":"live","id":format!("m{i}"),"body":i}));
    }
    stall.join().unwrap();
    let j = r.recv_type("joined");
    assert_eq!(j["seq"].as_u64(), Some(5), "{j}");
    assert_resumed(&j, true, 3);
    assert_eq!(next_msgs(&mut r, 6), vec![3, 4, 5, 6, 7, 8]);
    for _ in 6..=8 {
        assert_eq!(p.recv_type("ack")["stored"], true);
    }
}

/// The store fences a room's numbering: a record whose seq another home
/// already stored (different sender, id or time) is reported as a conflict
/// and not stored; the same record written again (a spill replay) is not.
#[test]
fn the_store_refuses_a_seq_another_home_stored() {
    use corecast_gateway::storage::{
        redis_backend::RedisStore, Backend, Record, StorageConfig, StoreKind,
    };
    let redis = RedisServer::start();
    let config = StorageConfig {
        kind: StoreKind::Redis { url: redis.url() },
        history_size: 100,
        history_ttl: Duration::from_secs(60),
        namespaces: corecast_router::namespace::Namespaces::keeping(100, Duration::from_secs(60)),
        meta_ttl: Duration::from_secs(60),
        batch_max: 16,
        queue_per_shard: 16,
        spill_dir: redis.scratch("spill").into(),
        redis_timeout: Duration::from_secs(2),
        node_id: "fence".into(),
        presence_ttl: Duration::from_secs(30),
    };
    let mut store = RedisStore::new(&redis.url(), &config).unwrap();
    store.connect().unwrap();
    let record = |seq: u64, from: &str| Record {
        room: Arc::from("fenced"),
        seq,
        from: Arc::from(from),
        id: format!("{from}-{seq}").into(),
        ts: 1000 + seq,
        body: "null".into(),
        epoch: Arc::from(""),
    };
    // Home A stores 1 and 2.
    assert_eq!(
        store.append(&[record(1, "a"), record(2, "a")]).unwrap(),
        Vec::<usize>::new()
    );
    // Home B, believing the room is at 1, numbers 2 and 3: 2 conflicts.
    assert_eq!(
        store.append(&[record(2, "b"), record(3, "b")]).unwrap(),
        vec![0]
    );
    // A replays its own 2 (and 1): not conflicts, not stored twice.
    assert_eq!(
        store.append(&[record(1, "a"), record(2, "a")]).unwrap(),
        Vec::<usize>::new()
    );
    assert_eq!(redis.stream_seqs("fenced"), vec![1, 2, 3]);
    let (_, stored) = store
        .fetch(
            "fenced",
            corecast_gateway::storage::Query::After { after: 1, n: 2 },
        )
        .unwrap();
    assert_eq!(&*stored[0].from, "a", "seq 2 stays A's message");
}
