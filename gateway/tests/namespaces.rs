//! Room namespaces from the config file: each option against a running
//! gateway, and SIGHUP re-reading them.

mod common;

use std::path::PathBuf;

use common::{api, chat::*, *};
use corecast_gateway::auth::Claims;
use serde_json::json;

const NAMESPACES: &str = r#"
[namespaces."typing:"]
ephemeral = true
presence = false

[namespaces."notify:"]
client_publish = false
join_requires_claim = true
max_body_bytes = 16
"#;

fn config_file(tag: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corecast-ns-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("corecast.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn server(tag: &str) -> TestServer {
    let file = config_file(tag, NAMESPACES);
    let mut args = vec!["--config", file.to_str().unwrap()];
    args.extend(api::flags());
    chat_server(&args)
}

#[test]
fn an_ephemeral_namespace_acks_at_once_and_keeps_no_history() {
    let server = server("ephemeral");
    let mut alice = Chat::connect(&server, "alice");
    let mut bob = Chat::connect(&server, "bob");
    for c in [&mut alice, &mut bob] {
        c.join("typing:lobby");
        c.join("lobby");
    }
    alice.send(json!({"type":"publish","room":"typing:lobby","id":"t1","body":{"typing":true}}));
    let ack = alice.recv_type("ack");
    assert_eq!(
        (ack["seq"].as_u64(), &ack["stored"]),
        (Some(1), &json!(false)),
        "{ack}"
    );
    let msg = bob.recv_type("msg");
    assert_eq!(
        (msg["room"].as_str(), msg["seq"].as_u64()),
        (Some("typing:lobby"), Some(1))
    );
    // A retry is still a duplicate.
    alice.send(json!({"type":"publish","room":"typing:lobby","id":"t1","body":{"typing":true}}));
    let again = alice.recv_type("ack");
    assert_eq!(
        (again["seq"].as_u64(), &again["duplicate"]),
        (Some(1), &json!(true))
    );
    // The default namespace is stored as ever.
    alice.send(json!({"type":"publish","room":"lobby","id":"m1","body":"hi"}));
    assert_eq!(alice.recv_type("ack")["stored"], true);
    alice.send(json!({"type":"history","room":"typing:lobby"}));
    let h = alice.recv_type("history");
    assert_eq!(
        (h["seq"].as_u64(), &h["messages"], &h["complete"]),
        (Some(1), &json!([]), &json!(false)),
        "{h}"
    );
    alice.send(json!({"type":"history","room":"lobby"}));
    assert_eq!(
        alice.recv_type("history")["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A resume has nothing to recover from.
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    let mut carol = Chat::connect(&server, "carol");
    carol.send(json!({"type":"join","room":"typing:lobby","since":0,"epoch":epoch}));
    let j = carol.recv_type("joined");
    assert_eq!(
        (j["seq"].as_u64(), &j["recovered"]),
        (Some(1), &json!(false)),
        "{j}"
    );
    server.stop().unwrap();
}

#[test]
fn presence_off_sends_no_events_and_answers_the_count() {
    let server = server("presence");
    let mut alice = Chat::connect(&server, "alice");
    alice.join("typing:r");
    alice.join("r");
    let mut bob = Chat::connect(&server, "bob");
    bob.join("typing:r");
    bob.join("r");
    // Alice hears bob join the default room only.
    loop {
        let ev = alice.recv_type("presence_event");
        assert_eq!(ev["room"], "r", "{ev}");
        if ev["user"] == "bob" {
            break;
        }
    }
    alice.send(json!({"type":"presence","room":"typing:r"}));
    let p = alice.recv_type("presence");
    assert_eq!(
        (p["count"].as_u64(), &p["users"]),
        (Some(2), &json!(null)),
        "{p}"
    );
    server.stop().unwrap();
}

#[test]
fn a_read_only_private_namespace_takes_the_api_and_listed_tokens_only() {
    let server = server("notify");
    let a = server.api.unwrap();
    // A token without a rooms claim may join every default room, not these.
    let mut plain = Chat::connect(&server, "plain");
    plain.send(json!({"type":"join","room":"notify:plain"}));
    assert_eq!(plain.recv_type("error")["code"], "forbidden");
    plain.send(json!({"type":"history","room":"notify:plain"}));
    assert_eq!(plain.recv_type("error")["code"], "forbidden");
    plain.join("lobby");
    let listed = token_with(Claims {
        sub: "dana".into(),
        rooms: Some(vec!["notify:dana".into(), "lobby".into()]),
        ..Default::default()
    });
    let mut dana = Chat::connect_raw(&server, Some(&listed));
    dana.recv_type("welcome");
    dana.join("notify:dana");
    dana.send(json!({"type":"join","room":"notify:other"}));
    assert_eq!(dana.recv_type("error")["code"], "forbidden");
    // Clients may not publish there; the API may.
    dana.send(json!({"type":"publish","room":"notify:dana","id":"x","body":1}));
    let e = dana.recv_type("error");
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("read_only"), Some("x")),
        "{e}"
    );
    let ok = api::ok(
        a,
        "/api/publish",
        r#"{"room":"notify:dana","body":{"n":1}}"#,
    );
    assert_eq!(ok["seq"], 1);
    assert_eq!(dana.recv_type("msg")["body"], json!({"n":1}));
    // The namespace's body limit, for the API too.
    let big = r#"{"room":"notify:dana","body":"0123456789abcdefgh"}"#;
    assert_eq!(api::refused(a, "/api/publish", big, 413), "body_too_large");
    let fine = r#"{"room":"lobby","body":"0123456789abcdefgh"}"#;
    api::ok(a, "/api/publish", fine);
    // A refresh to a token without a rooms claim leaves the private room.
    dana.send(json!({"type":"refresh","token":token("dana")}));
    assert_eq!(dana.recv_type("left")["room"], "notify:dana");
    dana.recv_type("refreshed");
    server.stop().unwrap();
}

#[test]
fn anonymous_users_cannot_join_a_namespace_that_requires_a_claim() {
    let file = config_file("anon", NAMESPACES);
    let server = chat_server(&["--config", file.to_str().unwrap(), "--allow-anonymous"]);
    let mut anon = Chat::connect_raw(&server, None);
    anon.recv_type("welcome");
    anon.send(json!({"type":"join","room":"notify:x"}));
    assert_eq!(anon.recv_type("error")["code"], "forbidden");
    anon.join("typing:x");
    server.stop().unwrap();
}

#[test]
fn sighup_rereads_the_namespaces_and_a_broken_file_changes_nothing() {
    let file = config_file("sighup", NAMESPACES);
    let port = common::cluster::free_port();
    let listen = format!("127.0.0.1:{port}");
    let g = Logged::spawn(&[
        "--config",
        file.to_str().unwrap(),
        "--listen",
        &listen,
        "--jwt-secret",
        SECRET,
    ]);
    g.wait_for("2 room namespaces");
    let addr = listen.parse().unwrap();
    let publish = |room: &str| {
        let mut c = Chat::connect_addr(addr, "erin").unwrap();
        c.join(room);
        c.send(json!({"type":"publish","room":room,"id":"p","body":1}));
        loop {
            let v = c.recv_or_close().unwrap();
            if v["type"] == "ack" || v["type"] == "error" {
                return v;
            }
        }
    };
    assert_eq!(publish("typing:a")["type"], "ack");
    // typing: becomes read-only.
    std::fs::write(
        &file,
        NAMESPACES.replace(
            "presence = false",
            "presence = false\nclient_publish = false",
        ),
    )
    .unwrap();
    g.signal("HUP");
    g.wait_for("2 room namespaces re-read");
    let refused = publish("typing:b");
    assert_eq!(refused["code"], "read_only", "{refused}");
    // A broken file is logged; the namespaces stay as they were.
    std::fs::write(&file, "[namespaces.\"typing:\"]\nclient_publsh = true\n").unwrap();
    g.signal("HUP");
    let line = g.wait_for("the old namespaces stay in use");
    assert!(line.contains("client_publsh"), "{line}");
    assert_eq!(publish("typing:c")["code"], "read_only");
    assert!(g.stop());
}

#[test]
fn config_check_names_a_bad_namespace_and_its_line() {
    let file = config_file(
        "check",
        "listen = \"127.0.0.1:0\"\n\n[namespaces.\"typing:\"]\nephemeral = true\nhistory = 3\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["config", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":5: unknown field `history`"), "{err}");
    let example = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["config", "example"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&example.stdout);
    assert!(text.contains("[namespaces.\"typing:\"]"), "{text}");
}

/// Redis stops answering: a stored room's publish waits for it (or for the
/// spill file), an ephemeral room's is acked at once and delivered.
#[test]
fn an_ephemeral_publish_never_waits_for_the_store() {
    let redis = common::redis::RedisServer::start();
    let file = config_file("stall", NAMESPACES);
    let (url, spill) = (redis.url(), redis.scratch("spill"));
    let server = chat_server(&[
        "--config",
        file.to_str().unwrap(),
        "--redis",
        &url,
        "--spill-dir",
        &spill,
    ]);
    let mut alice = Chat::connect(&server, "alice");
    let mut bob = Chat::connect(&server, "bob");
    for c in [&mut alice, &mut bob] {
        c.join("lobby");
        c.join("typing:lobby");
    }
    let stalled = redis.stall(3.0);
    alice.send(json!({"type":"publish","room":"lobby","id":"slow","body":1}));
    alice.send(json!({"type":"publish","room":"typing:lobby","id":"fast","body":2}));
    // The ephemeral one is acked while the store says nothing (a single
    // node delivers both at once; only the stored one's ack waits).
    let first = alice.recv_type("ack");
    assert_eq!(
        (first["id"].as_str(), &first["stored"]),
        (Some("fast"), &json!(false)),
        "{first}"
    );
    let mut rooms: Vec<String> = (0..2)
        .map(|_| bob.recv_type("msg")["room"].as_str().unwrap().to_string())
        .collect();
    rooms.sort();
    assert_eq!(rooms, ["lobby", "typing:lobby"]);
    let second = alice.recv_type("ack");
    assert_eq!(
        (second["id"].as_str(), &second["stored"]),
        (Some("slow"), &json!(true)),
        "{second}"
    );
    stalled.join().unwrap();
    server.stop().unwrap();
}

/// Each namespace keeps its own history, with the memory store and with
/// Redis (whose stream for the room holds no more).
#[test]
fn a_namespace_keeps_its_own_history() {
    let text =
        "[namespaces.\"short:\"]\nhistory_size = 2\n\n[namespaces.\"none:\"]\nhistory_size = 0\n";
    let file = config_file("history", text);
    let redis = common::redis::RedisServer::start();
    let (url, spill) = (redis.url(), redis.scratch("spill"));
    let config = ["--config", file.to_str().unwrap()];
    let with_redis = ["--redis", url.as_str(), "--spill-dir", spill.as_str()];
    for store in [&[][..], &with_redis[..]] {
        let mut args = config.to_vec();
        args.extend_from_slice(store);
        let server = chat_server(&args);
        let mut a = Chat::connect(&server, "alice");
        for room in ["short:r", "none:r", "r"] {
            a.join(room);
            for i in 1..=4 {
                a.send(json!({"type":"publish","room":room,"id":format!("{room}{i}"),"body":i}));
                loop {
                    let v = a.recv();
                    if v["type"] == "ack" {
                        assert_eq!(
                            (v["seq"].as_u64(), &v["stored"]),
                            (Some(i), &json!(true)),
                            "{v}"
                        );
                        break;
                    }
                }
            }
        }
        let kept = |a: &mut Chat, room: &str| -> Vec<u64> {
            a.send(json!({"type":"history","room":room,"limit":10}));
            let h = a.recv_type("history");
            assert_eq!(h["seq"], 4, "{h}");
            h["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["seq"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(kept(&mut a, "short:r"), [3, 4]);
        assert_eq!(kept(&mut a, "none:r"), Vec::<u64>::new());
        assert_eq!(kept(&mut a, "r"), [1, 2, 3, 4]);
        if !store.is_empty() {
            assert_eq!(redis.stream_seqs("short:r"), [3, 4]);
            assert!(redis.stream_seqs("none:r").is_empty());
        }
        server.stop().unwrap();
    }
}

/// A namespace's publish rate holds each connection's publishes to its
/// rooms; the refused one is answered `rate_limited` with its id.
#[test]
fn a_namespace_publish_rate_refuses_the_excess() {
    let text = "[namespaces.\"slow:\"]\npublish_rate_per_s = 1\npublish_burst = 2\n";
    let file = config_file("rate", text);
    let server = chat_server(&["--config", file.to_str().unwrap()]);
    let mut a = Chat::connect(&server, "alice");
    a.join("slow:r");
    for i in 1..=3 {
        a.send(json!({"type":"publish","room":"slow:r","id":format!("p{i}"),"body":i}));
    }
    let mut acked = Vec::new();
    let refused = loop {
        let v = a.recv();
        match v["type"].as_str() {
            Some("ack") => acked.push(v["id"].as_str().unwrap().to_string()),
            Some("error") => break v,
            _ => {}
        }
    };
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("rate_limited"), Some("p3")),
        "{refused}"
    );
    while acked.len() < 2 {
        let v = a.recv_type("ack");
        acked.push(v["id"].as_str().unwrap().to_string());
    }
    acked.sort();
    assert_eq!(acked, ["p1", "p2"]);
    server.stop().unwrap();
}
