//! The server API over real HTTP (curl): every endpoint and every error
//! status, against a running gateway with WebSocket members on both shards.

mod common;

use std::time::Duration;

use common::{api, chat::*, *};
use serde_json::json;

fn api_server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--shards", "2"];
    args.extend(api::flags());
    args.extend_from_slice(extra);
    chat_server(&args)
}

/// Connects members until both shards have one (the kernel spreads
/// connections over the shards' listeners).
fn members_on_both_shards(server: &TestServer, user: &str, room: &str) -> Vec<Chat> {
    let mut members = Vec::new();
    let mut shards = std::collections::HashSet::new();
    for _ in 0..64 {
        let mut c = Chat::connect_raw(server, Some(&token(user)));
        let w = c.recv_type("welcome");
        let conn = w["conn"].as_str().unwrap().to_string();
        shards.insert(conn.split('.').next().unwrap().to_string());
        c.join(room);
        members.push(c);
        if shards.len() == 2 && members.len() >= 2 {
            return members;
        }
    }
    panic!("64 connections all landed on one shard");
}

#[test]
fn publish_reaches_members_on_every_shard_and_is_idempotent() {
    let server = api_server(&[]);
    let a = server.api.unwrap();
    let mut members = members_on_both_shards(&server, "alice", "lobby");
    let body = r#"{"room":"lobby","body":{"text":"hello"},"id":"n-1","from":"system"}"#;
    let first = api::ok(a, "/api/publish", body);
    assert_eq!(first["seq"], 1, "{first}");
    assert_eq!(first["room"], "lobby");
    assert_eq!(first["stored"], true);
    let epoch = first["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    // The retry is the same message.
    let again = api::ok(a, "/api/publish", body);
    assert_eq!(again["seq"], 1, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["epoch"], epoch.as_str());
    for m in &mut members {
        let msg = m.recv_type("msg");
        assert_eq!(msg["seq"], 1, "{msg}");
        assert_eq!(msg["from"], "system");
        assert_eq!(msg["body"], json!({"text":"hello"}));
    }
    // Without `from` the sender is "api"; a second message follows in order.
    let second = api::ok(a, "/api/publish", r#"{"room":"lobby","body":2}"#);
    assert_eq!(second["seq"], 2);
    for m in &mut members {
        let msg = m.recv_type("msg");
        assert_eq!(
            (msg["seq"].as_u64(), msg["from"].as_str()),
            (Some(2), Some("api"))
        );
    }
    // A client's publish acks with the epoch too.
    members[0].send(json!({"type":"publish","room":"lobby","id":"c1","body":3}));
    let ack = members[0].recv_type("ack");
    assert_eq!(
        (ack["seq"].as_u64(), ack["epoch"].as_str()),
        (Some(3), Some(epoch.as_str()))
    );
    let h = api::ok(a, "/api/history", r#"{"room":"lobby","limit":10}"#);
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3], "{h}");
    assert_eq!(h["epoch"], epoch.as_str());
    let since = api::ok(a, "/api/history", r#"{"room":"lobby","since":2}"#);
    assert_eq!(since["messages"].as_array().unwrap().len(), 1, "{since}");
    server.stop().unwrap();
}

#[test]
fn broadcast_dm_presence_rooms_and_info() {
    let server = api_server(&[]);
    let a = server.api.unwrap();
    let mut alice = Chat::connect(&server, "alice");
    alice.join("r1");
    let mut bob = Chat::connect(&server, "bob");
    bob.join("r2");
    bob.join("r1");
    let b = api::ok(
        a,
        "/api/broadcast",
        r#"{"rooms":["r1","r2","r3"],"body":"notice","id":"b-1"}"#,
    );
    let results = b["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{b}");
    for (r, room) in results.iter().zip(["r1", "r2", "r3"]) {
        assert_eq!(r["room"], room, "{b}");
        assert_eq!(r["seq"], 1, "{b}");
    }
    assert_eq!(alice.recv_type("msg")["room"], "r1");
    let mut got: Vec<String> = (0..2)
        .map(|_| bob.recv_type("msg")["room"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, ["r1", "r2"]);

    let d = api::ok(
        a,
        "/api/dm",
        r#"{"to":"alice","body":{"hi":1},"from":"support"}"#,
    );
    assert_eq!(d["delivered"], 1, "{d}");
    let dm = alice.recv_type("dm");
    assert_eq!(
        (dm["from"].as_str(), &dm["body"]),
        (Some("support"), &json!({"hi":1}))
    );
    let nobody = api::ok(a, "/api/dm", r#"{"to":"carol","body":1}"#);
    assert_eq!(nobody["delivered"], 0);

    let p = api::ok(a, "/api/presence", r#"{"room":"r1"}"#);
    let mut users: Vec<&str> = p["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    users.sort();
    assert_eq!(users, ["alice", "bob"], "{p}");
    assert_eq!(p["count"], 2);
    let s = api::ok(a, "/api/presence_stats", r#"{"room":"r1"}"#);
    assert_eq!(s, json!({"room":"r1","count":2}));

    let rooms = api::ok(a, "/api/rooms", "{}");
    assert_eq!(
        rooms,
        json!({"rooms":[{"room":"r1","members":2},{"room":"r2","members":1}]})
    );
    let only = api::ok(a, "/api/rooms", r#"{"prefix":"r2"}"#);
    assert_eq!(only, json!({"rooms":[{"room":"r2","members":1}]}));

    let info = api::ok(a, "/api/info", "");
    assert_eq!(info["shards"], 2, "{info}");
    assert_eq!(info["connections"], 2, "{info}");
    assert_eq!(info["nodes"], json!([info["node"].clone()]));
    assert!(info["version"].as_str().is_some());
    server.stop().unwrap();
}

#[test]
fn disconnect_closes_every_connection_of_the_user_with_its_code() {
    let server = api_server(&[]);
    let a = server.api.unwrap();
    let mut alice: Vec<Chat> = (0..3).map(|_| Chat::connect(&server, "alice")).collect();
    let mut bob = Chat::connect(&server, "bob");
    let d = api::ok(
        a,
        "/api/disconnect",
        r#"{"user":"alice","code":4100,"reason":"banned"}"#,
    );
    assert_eq!(d["connections"], 3, "{d}");
    for c in &mut alice {
        assert_eq!(c.close_code(), (4100, "banned".to_string()));
    }
    // The default code and reason; bob was untouched until now.
    bob.send(json!({"type":"presence","room":"x"}));
    assert_eq!(bob.recv_type("presence")["room"], "x");
    let d = api::ok(a, "/api/disconnect", r#"{"user":"bob"}"#);
    assert_eq!(d["connections"], 1);
    assert_eq!(
        bob.close_code(),
        (4010, "disconnected by the server".to_string())
    );
    // Once closed, the user's home counts them gone.
    assert!(eventually(Duration::from_secs(5), || {
        api::ok(a, "/api/disconnect", r#"{"user":"alice"}"#)["connections"] == 0
    }));
    server.stop().unwrap();
}

#[test]
fn unsubscribe_takes_the_user_out_of_the_room() {
    let server = api_server(&[]);
    let a = server.api.unwrap();
    let mut alice = Chat::connect(&server, "alice");
    alice.join("lobby");
    alice.join("other");
    let mut bob = Chat::connect(&server, "bob");
    bob.join("lobby");
    let u = api::ok(a, "/api/unsubscribe", r#"{"user":"alice","room":"lobby"}"#);
    assert_eq!(u["connections"], 1, "{u}");
    let left = alice.recv_type("left");
    assert_eq!(left, json!({"type":"left","room":"lobby","by":"server"}));
    assert!(eventually(Duration::from_secs(5), || {
        api::ok(a, "/api/presence_stats", r#"{"room":"lobby"}"#)["count"] == 1
    }));
    api::ok(a, "/api/publish", r#"{"room":"lobby","body":"after"}"#);
    api::ok(a, "/api/publish", r#"{"room":"other","body":"still"}"#);
    assert_eq!(bob.recv_type("msg")["body"], "after");
    // Alice's next message is the one for the room she is still in.
    let next = alice.recv_type("msg");
    assert_eq!(
        (next["room"].as_str(), next["body"].as_str()),
        (Some("other"), Some("still"))
    );
    // She may join again.
    alice.join("lobby");
    server.stop().unwrap();
}

#[test]
fn every_error_has_its_status_and_changes_nothing() {
    let server = api_server(&["--max-body-bytes", "100", "--api-max-body-bytes", "4096"]);
    let a = server.api.unwrap();
    // Keys.
    let (s, v) = api::call_with(a, &[], "/api/info", "{}");
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let wrong = ["-H", "Authorization: apikey test-api-key-0123456780"];
    assert_eq!(api::call_with(a, &wrong, "/api/info", "{}").0, 401);
    let scheme = ["-H", "Authorization: Bearer test-api-key-0123456789"];
    assert_eq!(api::call_with(a, &scheme, "/api/info", "{}").0, 401);
    // Paths and methods.
    assert_eq!(api::refused(a, "/api/nothing", "{}", 404), "not_found");
    assert_eq!(api::refused(a, "/", "{}", 404), "not_found");
    let get = [
        "-X",
        "GET",
        "-H",
        "Authorization: apikey test-api-key-0123456789",
    ];
    let (s, v) = api::call_with(a, &get, "/api/info", "");
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    // Bodies.
    for bad in [
        "{",
        "[]",
        r#"{"room":"x"}"#,
        r#"{"room":"x","body":1,"colour":"red"}"#,
        r#"{"room":7,"body":1}"#,
    ] {
        assert_eq!(
            api::refused(a, "/api/publish", bad, 400),
            "bad_request",
            "{bad}"
        );
    }
    let long_room = format!(r#"{{"room":"{}","body":1}}"#, "r".repeat(129));
    for bad in [
        r#"{"room":"a b","body":1}"#,
        r#"{"room":"","body":1}"#,
        &long_room,
    ] {
        assert_eq!(api::refused(a, "/api/publish", bad, 400), "invalid_room");
    }
    let long_id = format!(r#"{{"room":"x","body":1,"id":"{}"}}"#, "i".repeat(65));
    assert_eq!(api::refused(a, "/api/publish", &long_id, 400), "invalid_id");
    let big = format!(r#"{{"room":"x","body":"{}"}}"#, "b".repeat(200));
    assert_eq!(api::refused(a, "/api/publish", &big, 413), "body_too_large");
    let huge = format!(r#"{{"room":"x","body":"{}"}}"#, "b".repeat(5000));
    assert_eq!(
        api::refused(a, "/api/publish", &huge, 413),
        "request_too_large"
    );
    for bad in [
        r#"{"user":"u","code":1000}"#,
        r#"{"user":"u","code":5000}"#,
        r#"{"user":"","code":4000}"#,
    ] {
        assert_eq!(
            api::refused(a, "/api/disconnect", bad, 400),
            "bad_request",
            "{bad}"
        );
    }
    let long_reason = format!(r#"{{"user":"u","reason":"{}"}}"#, "r".repeat(124));
    assert_eq!(
        api::refused(a, "/api/disconnect", &long_reason, 400),
        "bad_request"
    );
    assert_eq!(
        api::refused(a, "/api/broadcast", r#"{"rooms":[],"body":1}"#, 400),
        "bad_request"
    );
    assert_eq!(
        api::refused(a, "/api/broadcast", r#"{"rooms":["x","x"],"body":1}"#, 400),
        "bad_request"
    );
    // One bad room refuses the whole broadcast: nothing is published.
    assert_eq!(
        api::refused(
            a,
            "/api/broadcast",
            r#"{"rooms":["ok","no way"],"body":1}"#,
            400
        ),
        "invalid_room"
    );
    // Nothing above reached a room.
    for room in ["x", "ok"] {
        let h = api::ok(a, "/api/history", &format!(r#"{{"room":"{room}"}}"#));
        assert_eq!(h["messages"], json!([]), "{h}");
        assert_eq!(h["seq"], 0, "{h}");
    }
    // Counted by endpoint and status.
    let count = |labels: &str| server.metric("corecast_api_requests_total", labels);
    assert_eq!(count(r#"endpoint="publish",status="400""#), 9);
    assert_eq!(count(r#"endpoint="publish",status="413""#), 2);
    assert_eq!(count(r#"endpoint="info",status="401""#), 3);
    assert_eq!(count(r#"endpoint="other",status="404""#), 2);
    assert_eq!(count(r#"endpoint="history",status="200""#), 2);
    assert_eq!(server.metric("corecast_api_calls_in_flight", ""), 0);
    server.stop().unwrap();
}

#[test]
fn too_many_calls_in_flight_is_429_and_a_draining_node_is_503() {
    let server = api_server(&["--api-max-in-flight", "2", "--drain-delay-ms", "3000"]);
    let a = server.api.unwrap();
    let three = r#"{"rooms":["a","b","c"],"body":1}"#;
    assert_eq!(
        api::refused(a, "/api/broadcast", three, 429),
        "too_many_requests"
    );
    let two = api::ok(a, "/api/broadcast", r#"{"rooms":["a","b"],"body":1}"#);
    assert_eq!(two["results"].as_array().unwrap().len(), 2);
    // The 429 published nothing: "c" is empty, "a" has one message.
    assert_eq!(api::ok(a, "/api/history", r#"{"room":"c"}"#)["seq"], 0);
    assert_eq!(api::ok(a, "/api/history", r#"{"room":"a"}"#)["seq"], 1);
    server.begin_stop();
    assert!(eventually(Duration::from_secs(2), || {
        api::call(a, "/api/info", "{}").0 == 503
    }));
    assert_eq!(
        api::refused(a, "/api/publish", r#"{"room":"a","body":1}"#, 503),
        "shutting_down"
    );
    server.stop().unwrap();
}

#[test]
fn the_api_needs_a_key_of_some_length() {
    let e = refusal(&["--api-listen", "127.0.0.1:0"]);
    assert!(e.contains("--api-key"), "{e}");
    let e = refusal(&["--api-listen", "127.0.0.1:0", "--api-key", "short"]);
    assert!(e.contains("at least 16"), "{e}");
    let e = refusal(&["--api-key", api::KEY]);
    assert!(e.contains("--api-listen"), "{e}");
}

/// The API from a config file: its keys as a TOML list, a flag overriding
/// the file's address.
#[test]
fn the_config_file_sets_the_api_and_flags_override_it() {
    let dir = std::env::temp_dir().join(format!("corecast-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("corecast.toml");
    let port = common::cluster::free_port();
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:1\"\napi_key = [\"{}\", \"second-key-abcdefghij\"]\n",
            api::KEY
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let g = Logged::spawn(&["--config", file.to_str().unwrap(), "--api-listen", &listen]);
    let line = g.wait_for("server API listening on");
    assert!(line.contains(&listen), "{line}");
    let addr = listen.parse().unwrap();
    assert!(api::ok(addr, "/api/info", "")["shards"].as_u64().is_some());
    let second = ["-H", "Authorization: apikey second-key-abcdefghij"];
    assert_eq!(api::call_with(addr, &second, "/api/info", "").0, 200);
    assert!(g.stop());
}
