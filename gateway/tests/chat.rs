//! The chat protocol end to end, with tungstenite as the independent client:
//! order and exactly-once over 4 shards, idempotent retries, direct messages,
//! presence, every auth failure, errors, and a slow consumer.

mod common;

use std::{
    collections::HashMap,
    io::Write,
    net::TcpStream,
    time::{Duration, Instant},
};

use common::{chat::*, *};
use corecast_gateway::auth::{mint, Claims};
use serde_json::{json, Value};
use tungstenite::{client::IntoClientRequest, Message};

#[test]
fn every_member_on_every_shard_gets_every_message_once_in_one_order() {
    let server = chat_server(&["--shards", "4"]);
    let mut members: Vec<Chat> = (0..40)
        .map(|i| Chat::connect(&server, &format!("user-{i}")))
        .collect();
    let per_shard = server.metric_per_shard("corecast_websockets");
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "members on every shard: {per_shard:?}"
    );
    let bases: Vec<u64> = members.iter_mut().map(|m| m.join("lobby")).collect();
    assert!(
        bases.iter().all(|&b| b == 0),
        "nothing published yet: {bases:?}"
    );

    // Four publishers, interleaved, 25 messages each.
    for n in 0..25 {
        for p in 0..4 {
            members[p * 10].send(
                json!({"type":"publish","room":"lobby","id":format!("p{p}-{n}"),"body":{"n":n}}),
            );
        }
    }
    let mut acks: HashMap<String, u64> = HashMap::new();
    let mut orders = Vec::new();
    for (i, m) in members.iter_mut().enumerate() {
        orders.push(receive_in_order(m, i, 100, |v| {
            acks.insert(
                v["id"].as_str().unwrap().to_string(),
                v["seq"].as_u64().unwrap(),
            );
        }));
    }
    // Acks may trail the messages on the publishers' own connections.
    for p in 0..4 {
        while acks
            .keys()
            .filter(|k| k.starts_with(&format!("p{p}-")))
            .count()
            < 25
        {
            let v = members[p * 10].recv_type("ack");
            acks.insert(
                v["id"].as_str().unwrap().to_string(),
                v["seq"].as_u64().unwrap(),
            );
        }
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "one order for every member"
    );
    for (i, id) in orders[0].iter().enumerate() {
        assert_eq!(acks[id], i as u64 + 1, "ack of {id} carries its seq");
    }
    // Each publisher's own messages keep their order.
    for p in 0..4 {
        let mine: Vec<_> = orders[0]
            .iter()
            .filter(|id| id.starts_with(&format!("p{p}-")))
            .cloned()
            .collect();
        assert_eq!(
            mine,
            (0..25).map(|n| format!("p{p}-{n}")).collect::<Vec<_>>()
        );
    }
    assert!(server.metric("corecast_cross_shard_messages_total", "") > 0);
    assert_eq!(server.metric("corecast_publishes_total", ""), 100);
    // Deliveries: 100 messages to 40 members, plus presence events: members
    // joined one after another, so the k-th user's join event reached the k
    // members in the room by then (1 + 2 + ... + 40 = 820).
    assert_eq!(
        server.metric("corecast_deliveries_total", ""),
        100 * 40 + 820
    );
}

/// Reads member `i`'s frames until it has `count` room messages, checking
/// that their seqs run 1, 2, 3, ...; returns their ids in that order.
/// Acks go to `on_ack`, presence events are skipped.
fn receive_in_order(
    m: &mut Chat,
    i: usize,
    count: usize,
    mut on_ack: impl FnMut(&Value),
) -> Vec<String> {
    let mut order = Vec::new();
    while order.len() < count {
        let v = m.recv();
        match v["type"].as_str().unwrap() {
            "msg" => {
                assert_eq!(
                    v["seq"].as_u64().unwrap(),
                    order.len() as u64 + 1,
                    "member {i}: gapless, in order"
                );
                order.push(v["id"].as_str().unwrap().to_string());
            }
            "ack" => on_ack(&v),
            "presence_event" => {}
            other => panic!("member {i}: unexpected {other}: {v}"),
        }
    }
    order
}

#[test]
fn a_retried_publish_is_delivered_once_and_acked_twice_with_one_seq() {
    let server = chat_server(&["--shards", "4"]);
    let mut a = Chat::connect(&server, "alice");
    let mut b = Chat::connect(&server, "bob");
    a.join("r");
    b.join("r");
    a.recv_type("presence_event");
    let body = json!({"text":"once"});
    a.send(json!({"type":"publish","room":"r","id":"same","body":body}));
    a.send(json!({"type":"publish","room":"r","id":"same","body":body}));
    a.send(json!({"type":"publish","room":"r","id":"after","body":"marker"}));
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("after") {
        let v = b.recv_type("msg");
        seen.push(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, ["same", "after"]);
    let acks: Vec<Value> = (0..3).map(|_| a.recv_type("ack")).collect();
    let same: Vec<&Value> = acks.iter().filter(|v| v["id"] == "same").collect();
    assert_eq!(same.len(), 2);
    assert_eq!(same[0]["seq"], same[1]["seq"]);
    assert_eq!(same.iter().filter(|v| v["duplicate"] == true).count(), 1);
    assert_eq!(server.metric("corecast_duplicate_publishes_total", ""), 1);
    // Another user's id "same" is a different message.
    b.send(json!({"type":"publish","room":"r","id":"same","body":1}));
    assert_eq!(b.recv_type("ack")["seq"], 3);
}

#[test]
fn direct_messages_reach_every_connection_of_the_user_in_order() {
    let server = chat_server(&["--shards", "4"]);
    let mut bobs: Vec<Chat> = (0..8).map(|_| Chat::connect(&server, "bob")).collect();
    let mut alice = Chat::connect(&server, "alice");
    // UserOnline is asynchronous: wait until every bob connection counts.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        alice.send(json!({"type":"dm","to":"bob","id":"probe","body":null}));
        let ack = alice.recv_type("ack");
        if ack["delivered"] == 8 {
            break;
        }
        assert!(Instant::now() < deadline, "bob never fully online: {ack}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for n in 0..20 {
        alice.send(json!({"type":"dm","to":"bob","id":format!("d{n}"),"body":{"n":n}}));
    }
    for (i, bob) in bobs.iter_mut().enumerate() {
        let got: Vec<Value> = std::iter::repeat_with(|| bob.recv_type("dm"))
            .filter(|v| v["id"] != "probe")
            .take(20)
            .collect();
        for (n, v) in got.iter().enumerate() {
            assert_eq!(v["body"]["n"], n, "bob connection {i}: in the order sent");
            assert_eq!(v["from"], "alice");
        }
    }
    for _ in 0..20 {
        assert_eq!(alice.recv_type("ack")["delivered"], 8);
    }
    alice.send(json!({"type":"dm","to":"nobody","id":"x","body":1}));
    assert_eq!(alice.recv_type("ack")["delivered"], 0);
    let per_shard = server.metric_per_shard("corecast_websockets");
    assert!(
        per_shard.iter().filter(|&&n| n > 0).count() >= 2,
        "bob spans shards: {per_shard:?}"
    );
}

#[test]
fn presence_lists_and_events() {
    let server = chat_server(&["--shards", "4", "--presence-max-members", "2"]);
    let mut alice = Chat::connect(&server, "alice");
    alice.join("room");
    assert_eq!(
        alice.recv_type("presence_event"),
        json!({"type":"presence_event","room":"room","event":"join","user":"alice"})
    );
    let mut bob = Chat::connect(&server, "bob");
    bob.join("room");
    assert_eq!(alice.recv_type("presence_event")["user"], "bob");
    alice.send(json!({"type":"presence","room":"room"}));
    let p = alice.recv_type("presence");
    assert_eq!(p["count"], 2);
    let mut users: Vec<String> = p["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    users.sort();
    assert_eq!(users, ["alice", "bob"]);
    // A second connection of bob is not a new presence.
    let mut bob2 = Chat::connect(&server, "bob");
    bob2.join("room");
    // Above the limit: no events, count only.
    let mut carol = Chat::connect(&server, "carol");
    carol.join("room");
    alice.send(json!({"type":"presence","room":"room"}));
    let p = alice.recv_type("presence");
    assert_eq!(
        (p["count"].as_u64(), p["users"].is_null()),
        (Some(3), true),
        "{p}"
    );
    carol.send(json!({"type":"leave","room":"room"}));
    carol.recv_type("left");
    bob.send(json!({"type":"leave","room":"room"}));
    bob2.send(json!({"type":"leave","room":"room"}));
    // Back under the limit: bob's leave (his last connection) is an event.
    assert_eq!(
        alice.recv_type("presence_event"),
        json!({"type":"presence_event","room":"room","event":"leave","user":"bob"})
    );
}

#[test]
fn every_auth_failure_has_its_close_code() {
    let server = chat_server(&["--handshake-timeout-ms", "300"]);
    let expired = token_with(Claims {
        sub: "a".into(),
        exp: Some(unix_now() - 3600),
        ..Default::default()
    });
    let not_yet = token_with(Claims {
        sub: "a".into(),
        nbf: Some(unix_now() + 3600),
        ..Default::default()
    });
    let forged = mint(
        b"another-secret-0123456789abcdef0123",
        &Claims {
            sub: "a".into(),
            ..Default::default()
        },
    );
    let cases: [(&str, Option<&str>, u16); 6] = [
        ("forged", Some(&forged), 4002),
        ("expired", Some(&expired), 4003),
        ("not yet valid", Some(&not_yet), 4003),
        ("malformed", Some("not.a.jwt"), 4002),
        ("garbage", Some("x"), 4002),
        ("missing, no connect in time", None, 4001),
    ];
    for (name, tok, code) in cases {
        let mut c = Chat::connect_raw(&server, tok);
        let (got, reason) = c.close_code();
        assert_eq!(got, code, "{name}: {reason}");
        assert!(!reason.is_empty(), "{name}");
    }
    // A frame other than connect first.
    let mut c = Chat::connect_raw(&server, None);
    c.send(json!({"type":"join","room":"r"}));
    assert_eq!(c.close_code().0, 4001);
    // connect with a bad token.
    let mut c = Chat::connect_raw(&server, None);
    c.send(json!({"type":"connect","token":forged}));
    assert_eq!(c.close_code().0, 4002);
    // connect with a good one.
    let mut c = Chat::connect_raw(&server, None);
    c.send(json!({"type":"connect","token":token("dora")}));
    assert_eq!(c.recv()["user"], "dora");
    c.send(json!({"type":"connect","token":token("dora")}));
    assert_eq!(c.recv()["code"], "already_authenticated");
    // Authorization: Bearer works too.
    let mut req = server.url("/ws").into_client_request().unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token("erin")).parse().unwrap(),
    );
    let (mut ws, _) = tungstenite::client(req, TcpStream::connect(server.addr).unwrap()).unwrap();
    let Message::Text(t) = ws.read().unwrap() else {
        panic!()
    };
    assert!(t.contains(r#""user":"erin""#), "{t}");
    assert!(server.metric("corecast_auth_failures_total", "reason=\"bad_signature\"") >= 2);
    assert!(server.metric("corecast_auth_failures_total", "reason=\"expired\"") >= 1);
}

#[test]
fn room_claims_limit_join_and_publish() {
    let server = chat_server(&[]);
    let tok = token_with(Claims {
        sub: "limited".into(),
        rooms: Some(vec!["team-*".into(), "news".into()]),
        publish: Some(vec!["team-*".into()]),
        ..Default::default()
    });
    let mut c = Chat::connect_raw(&server, Some(&tok));
    c.recv_type("welcome");
    c.send(json!({"type":"join","room":"secret"}));
    assert_eq!(c.recv_type("error")["code"], "forbidden");
    c.join("team-red");
    c.join("news");
    c.send(json!({"type":"publish","room":"news","id":"1","body":1}));
    assert_eq!(c.recv_type("error")["code"], "forbidden");
    c.send(json!({"type":"publish","room":"team-red","id":"2","body":1}));
    assert_eq!(c.recv_type("ack")["seq"], 1);
}

#[test]
fn bad_requests_get_error_frames_and_the_connection_stays() {
    let server = chat_server(&[
        "--max-rooms-per-connection",
        "2",
        "--max-body-bytes",
        "100",
        "--rate-limit-per-s",
        "1",
        "--rate-limit-burst",
        "30",
    ]);
    let mut c = Chat::connect(&server, "u");
    let cases: Vec<(Value, &str)> = vec![
        (json!({"type":"publish","room":"r","body":1}), "not_joined"),
        (json!({"type":"join","room":"has space"}), "invalid_room"),
        (json!({"type":"leave","room":"r"}), "not_joined"),
        (json!({"type":"nope"}), "bad_request"),
        (json!({"type":"join"}), "bad_request"),
        (
            json!({"type":"publish","room":"a","id":"x".repeat(65),"body":1}),
            "invalid_id",
        ),
    ];
    for (frame, code) in cases {
        c.send(frame.clone());
        assert_eq!(c.recv_type("error")["code"], code, "{frame}");
    }
    c.ws.send(Message::text("not json")).unwrap();
    assert_eq!(c.recv_type("error")["code"], "bad_request");
    // Every error frame so far is counted, the unparseable ones included.
    assert_eq!(server.metric("corecast_chat_errors_total", ""), 7);
    c.join("a");
    c.send(json!({"type":"join","room":"a"}));
    assert_eq!(c.recv_type("error")["code"], "already_joined");
    c.join("b");
    c.send(json!({"type":"join","room":"c"}));
    assert_eq!(c.recv_type("error")["code"], "too_many_rooms");
    c.send(json!({"type":"publish","room":"a","body":"x".repeat(200)}));
    assert_eq!(c.recv_type("error")["code"], "body_too_large");
    // Burst of 30 frames at 1/s: the rest of a quick volley is refused.
    for i in 0..30 {
        c.send(json!({"type":"publish","room":"a","id":format!("f{i}"),"body":1}));
    }
    let mut limited = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while limited == 0 && Instant::now() < deadline {
        if c.recv()["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited > 0);
    assert!(server.metric("corecast_rate_limited_total", "") > 0);
    // Binary is not part of the protocol.
    c.ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(c.close_code().0, 1003);
}

#[test]
fn subprotocols() {
    let server = chat_server(&["--allow-anonymous"]);
    let upgrade = UPGRADE.replace("/echo", "/ws");
    let (status, _, body) = http(
        server.addr,
        &upgrade.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"),
    );
    assert_eq!(status, 400);
    assert!(body.contains("corecast.v1"));
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(upgrade.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        std::io::Read::read_exact(&mut s, &mut b).unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 101") && !head.contains("Sec-WebSocket-Protocol"),
        "{head}"
    );
    // Anonymous users are welcomed without a token.
    let (b0, payload) = read_raw_frame(&mut s).unwrap();
    assert_eq!(b0, 0x81);
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert!(v["user"].as_str().unwrap().starts_with("anon-"), "{v}");
}

#[test]
fn a_slow_consumer_is_closed_while_the_room_keeps_going() {
    let server = chat_server(&[
        "--shards",
        "2",
        "--outbound-budget-bytes",
        "65536",
        "--slow-consumer-timeout-ms",
        "300",
        "--rate-limit-per-s",
        "100000",
        "--rate-limit-burst",
        "100000",
    ]);
    // The slow one: joins, then never reads again.
    let mut slow = Chat::connect(&server, "slow");
    slow.join("busy");
    socket2::SockRef::from(slow.ws.get_ref())
        .set_recv_buffer_size(4096)
        .unwrap();
    let mut fast = Chat::connect(&server, "fast");
    fast.join("busy");
    let mut publisher = Chat::connect(&server, "pub");
    publisher.join("busy");
    // Enough to overflow the kernel's socket buffers too (the server's send
    // buffer autotunes up to 4 MiB here).
    let body = "y".repeat(8000);
    let total: u64 = 2000;
    let (progress, batches_read) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut last = 0;
        while last < total {
            let v = fast.recv_type("msg");
            assert_eq!(
                v["seq"].as_u64().unwrap(),
                last + 1,
                "fast member misses nothing"
            );
            last += 1;
            if last % 5 == 0 {
                let _ = progress.send(last);
            }
        }
        last
    });
    // Publish in batches of 5 (40 KB, under the budget even before the
    // kernel's buffers have grown); before the next batch, wait for the batch's
    // last ack (which also reads our own copies) and for the fast member to
    // have it: both are readers that keep up, however loaded the machine.
    for batch in 0..total / 5 {
        for i in batch * 5..(batch + 1) * 5 {
            publisher.send(json!({"type":"publish","room":"busy","id":i.to_string(),"body":body}));
        }
        let last = ((batch + 1) * 5 - 1).to_string();
        while publisher.recv_type("ack")["id"] != last.as_str() {}
        assert_eq!(batches_read.recv().unwrap(), (batch + 1) * 5);
    }
    assert_eq!(reader.join().unwrap(), total);
    assert!(
        eventually(Duration::from_secs(10), || server
            .metric("corecast_slow_consumer_closes_total", "")
            == 1),
        "slow consumer closed"
    );
    assert_eq!(
        server.metric(
            "corecast_ws_closes_total",
            "code=\"1008\",initiator=\"server\""
        ),
        1
    );
}

/// One shard, a 64 KiB outbound budget and a 10-minute slow-consumer
/// timeout: only the hard cap (4x the budget) can close a stalled member
/// while a test runs.
fn hard_cap_server() -> TestServer {
    chat_server(&[
        "--shards",
        "1",
        "--outbound-budget-bytes",
        "65536",
        "--slow-consumer-timeout-ms",
        "600000",
        "--rate-limit-per-s",
        "100000",
        "--rate-limit-burst",
        "100000",
    ])
}

/// Shrinks the member's receive buffer: with it never reading, the server's
/// queue for it grows at once.
fn stall(member: &Chat) {
    socket2::SockRef::from(member.ws.get_ref())
        .set_recv_buffer_size(4096)
        .unwrap();
}

/// The one stalled member was closed as a slow consumer and no room's feed
/// holds frames for it any more.
fn assert_cut_off_and_let_go(server: &TestServer, why: &str) {
    assert!(
        eventually(Duration::from_secs(5), || server
            .metric("corecast_slow_consumer_closes_total", "")
            == 1),
        "{why}: the stalled member is past its 256 KiB hard cap"
    );
    assert!(
        eventually(Duration::from_secs(5), || server
            .metric("corecast_room_feed_bytes", "")
            == 0),
        "{why}: no room holds frames for it"
    );
}

#[test]
fn a_member_past_the_hard_cap_is_cut_off_and_its_frames_let_go() {
    let server = hard_cap_server();
    let mut stalled = Chat::connect(&server, "stalled");
    stalled.join("wide");
    stall(&stalled);
    let mut publisher = Chat::connect(&server, "pub");
    publisher.join("wide");
    let body = "z".repeat(8000);
    let total = 1500;
    for i in 0..total {
        publisher.send(json!({"type":"publish","room":"wide","id":i.to_string(),"body":body}));
        // Read our own copy too: the publisher keeps up.
        while publisher.recv_type("msg")["seq"] != i + 1 {}
    }
    assert_cut_off_and_let_go(&server, "12 MB went by");
    drop(stalled);
}

#[test]
fn a_stalled_member_of_many_rooms_is_closed_and_no_room_keeps_its_frames() {
    // The stalled member is in 8 rooms; its hard cap (256 KiB) counts what
    // all of them hold for it. Once it is closed none of the rooms may keep
    // frames for it.
    let server = hard_cap_server();
    let rooms: Vec<String> = (0..8).map(|i| format!("many-{i}")).collect();
    let mut stalled = Chat::connect(&server, "stalled");
    let mut publisher = Chat::connect(&server, "pub");
    for room in &rooms {
        stalled.join(room);
        publisher.join(room);
    }
    stall(&stalled);
    let body = "w".repeat(8000);
    for i in 0..1600 {
        let room = &rooms[i % rooms.len()];
        publisher.send(json!({"type":"publish","room":room,"id":i.to_string(),"body":body}));
        while publisher.recv_type("msg")["id"] != i.to_string().as_str() {}
    }
    assert_cut_off_and_let_go(&server, "12 MB over 8 rooms");
    drop(stalled);
}

#[test]
fn a_room_that_empties_is_freed_and_keeps_its_sequence() {
    let server = chat_server(&["--shards", "2"]);
    let mut a = Chat::connect(&server, "alice");
    a.join("cycle");
    for i in 0..3 {
        a.send(json!({"type":"publish","room":"cycle","id":format!("m{i}"),"body":i}));
        a.recv_type("ack");
    }
    a.send(json!({"type":"leave","room":"cycle"}));
    a.recv_type("left");
    assert!(
        eventually(Duration::from_secs(5), || server
            .metric("corecast_rooms", "")
            == 0),
        "the emptied room is freed"
    );
    // Back again: the sequence continues after 3, it does not restart.
    let mut b = Chat::connect(&server, "bob");
    assert_eq!(b.join("cycle"), 3);
    b.send(json!({"type":"publish","room":"cycle","id":"n","body":null}));
    assert_eq!(b.recv_type("ack")["seq"], 4);
    assert_eq!(server.metric("corecast_rooms", ""), 1);
}

#[test]
fn only_one_close_frame_when_a_violation_follows_our_close() {
    let server = chat_server(&["--allow-anonymous"]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(UPGRADE.replace("/echo", "/ws").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        std::io::Read::read_exact(&mut s, &mut b).unwrap();
        head.push(b[0]);
    }
    assert_eq!(read_raw_frame(&mut s).unwrap().0, 0x81, "welcome");
    // A binary message (close 1003), then, in the same write, an unmasked
    // frame (a violation that would otherwise close again with 1002).
    let mut bytes = raw_frame(0x82, b"bin", Some([1, 2, 3, 4]));
    bytes.extend_from_slice(&raw_frame(0x81, b"x", None));
    s.write_all(&bytes).unwrap();
    let (b0, payload) = read_raw_frame(&mut s).unwrap();
    assert_eq!(b0, 0x88);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1003);
    // Nothing after it but the end of the stream.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    assert!(rest.is_empty(), "bytes after our close frame: {rest:x?}");
}

/// A room with more members on one shard than a flush round wakes at a
/// time: the round runs in slices with reads in between, and still every
/// member gets every message once, in one order.
#[test]
fn a_room_larger_than_a_flush_slice_gets_every_message_in_order() {
    let server = chat_server(&["--shards", "1"]);
    let mut members: Vec<Chat> = (0..150)
        .map(|i| Chat::connect(&server, &format!("user-{i}")))
        .collect();
    for m in members.iter_mut() {
        m.join("big");
    }
    // Three publishers, each sending its next message without waiting for
    // the acks, so they are read while earlier rounds are going out.
    let publishers = [0, 70, 149];
    for n in 0..40 {
        for &p in &publishers {
            members[p].send(
                json!({"type":"publish","room":"big","id":format!("p{p}-{n}"),"body":{"n":n}}),
            );
        }
    }
    let mut first: Option<Vec<String>> = None;
    for (i, m) in members.iter_mut().enumerate() {
        let order = receive_in_order(m, i, 120, |_| {});
        match &first {
            None => first = Some(order),
            Some(f) => assert_eq!(&order, f, "member {i}: the same order as member 0"),
        }
    }
    assert_eq!(server.metric("corecast_publishes_total", ""), 120);
    // Rounds of 150 members run in three slices, with reads in between.
    assert!(server.metric("corecast_flush_rounds_total", "") > 0);
    assert!(server.metric("corecast_flush_reads_between_slices_total", "") > 0);
}

#[test]
fn a_token_that_expires_while_connected_closes_unless_refreshed() {
    let server = chat_server(&["--jwt-leeway-s", "0"]);
    let short = |sub: &str, ttl_s: u64| {
        token_with(Claims {
            sub: sub.into(),
            exp: Some(unix_now() + ttl_s),
            ..Default::default()
        })
    };
    // Left alone, the connection closes with 4003 once exp passes.
    let mut idle = Chat::connect_raw(&server, Some(&short("ivy", 2)));
    assert_eq!(idle.recv()["type"], "welcome");
    let (code, reason) = idle.close_code();
    assert_eq!(code, 4003, "{reason}");
    assert!(reason.contains("refresh"), "{reason}");
    // Refreshed in time, it stays.
    let mut kept = Chat::connect_raw(&server, Some(&short("kim", 2)));
    assert_eq!(kept.recv()["type"], "welcome");
    kept.send(json!({"type":"refresh","token":short("someone-else", 600)}));
    assert_eq!(kept.recv()["code"], "token_user_mismatch");
    let fresh = short("kim", 600);
    kept.send(json!({"type":"refresh","token":fresh}));
    let r = kept.recv();
    assert_eq!(r["type"], "refreshed", "{r}");
    let exp = r["exp"].as_u64().unwrap();
    assert!(exp >= unix_now() + 590, "{r}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        kept.join("after-the-first-exp"),
        0,
        "still open past the old exp"
    );
    assert!(
        server.metric(
            "corecast_ws_closes_total",
            "code=\"4003\",initiator=\"server\""
        ) >= 1
    );
}

#[test]
fn a_user_over_the_per_user_cap_is_closed_with_4004() {
    let server = chat_server(&["--max-connections-per-user", "2", "--shards", "2"]);
    let mut first = Chat::connect(&server, "cap");
    let mut second = Chat::connect(&server, "cap");
    let _other_user = Chat::connect(&server, "free");
    // The third gets its welcome, then the user's home refuses it.
    let mut third = Chat::connect(&server, "cap");
    let (code, reason) = third.close_code();
    assert_eq!(code, 4004, "{reason}");
    assert!(reason.contains("too many connections"), "{reason}");
    assert_eq!(server.metric("corecast_user_cap_refusals_total", ""), 1);
    // The two counted ones are untouched.
    assert_eq!(first.join("cap-room"), 0);
    second.join("cap-room");
    // Once one goes, a new connection is counted in its place.
    first.ws.close(None).unwrap();
    while first.ws.read().is_ok() {}
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = Chat::connect(&server, "cap");
            // Long enough for a refusal to arrive first.
            std::thread::sleep(Duration::from_millis(200));
            c.send(json!({"type":"presence","room":"cap-room"}));
            c.recv_or_close().is_ok_and(|v| v["type"] == "presence")
        }),
        "a connection after one closed is not refused"
    );
}

/// A chat connection from the loopback source address `from`.
fn connect_from(server: &TestServer, from: &str, user: &str) -> Chat {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let source: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let url = format!("ws://{}/ws?token={}", server.addr, token(user));
    let (ws, _) = tungstenite::client(url, stream).expect("handshake");
    Chat {
        ws,
        user: user.into(),
    }
}

#[test]
fn an_address_over_the_per_address_cap_is_closed_with_4005() {
    let server = chat_server(&["--max-connections-per-ip", "2", "--shards", "2"]);
    let mut a1 = connect_from(&server, "127.0.0.1", "a1");
    let mut a2 = connect_from(&server, "127.0.0.1", "a2");
    assert_eq!(a1.recv()["type"], "welcome");
    assert_eq!(a2.recv()["type"], "welcome");
    // The third from the same address is closed; another address is not.
    let mut a3 = connect_from(&server, "127.0.0.1", "a3");
    let (code, reason) = a3.close_code();
    assert_eq!(code, 4005, "{reason}");
    assert!(reason.contains("this address"), "{reason}");
    let mut b1 = connect_from(&server, "127.0.0.2", "b1");
    assert_eq!(b1.recv()["type"], "welcome");
    std::thread::sleep(Duration::from_millis(200));
    b1.send(json!({"type":"presence","room":"r"}));
    assert_eq!(
        b1.recv_or_close().map(|v| v["type"].clone()),
        Ok("presence".into())
    );
    assert_eq!(server.metric("corecast_address_cap_refusals_total", ""), 1);
    // One closes: the address may connect again.
    a1.ws.close(None).unwrap();
    while a1.ws.read().is_ok() {}
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = connect_from(&server, "127.0.0.1", "a4");
            std::thread::sleep(Duration::from_millis(200));
            c.send(json!({"type":"presence","room":"r"}));
            loop {
                match c.recv_or_close() {
                    Ok(v) if v["type"] == "presence" => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
        }),
        "a slot came free"
    );
    a2.send(json!({"type":"presence","room":"r"}));
    assert_eq!(a2.recv_type("presence")["room"], "r");
}
