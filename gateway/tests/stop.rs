//! Starting and stopping: the drain delay load balancers need, a stop that
//! cannot hang, a start that cannot wedge silently, and refusals that come
//! before anything is bound.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use corecast_gateway::{Error, Fault};
use tungstenite::{protocol::frame::coding::CloseCode, Message};

#[test]
fn during_the_drain_delay_readyz_says_draining_and_clients_are_still_served() {
    let mut server = TestServer::start(&["--shards", "2", "--drain-delay-ms", "1500"]);
    let mut ws = connect(&server, "/echo");
    assert_eq!(
        http(server.addr, "GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n").0,
        200
    );
    let stopped_at = Instant::now();
    server.begin_stop();
    // A probe on a fresh connection sees 503 `draining` (not a refusal).
    assert!(
        eventually(Duration::from_secs(1), || {
            let (status, _, body) = http(server.addr, "GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n");
            status == 503 && body == "draining\n"
        }),
        "readyz 503 during the delay"
    );
    assert!(stopped_at.elapsed() < Duration::from_millis(1500));
    let (status, _, body) = http(server.addr, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((status, body.as_str()), (200, "ok\n"), "still alive");
    assert_eq!(server.metric("corecast_draining", ""), 1);
    // The client that was there is served, and a new one gets in.
    ws.send(Message::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("still here"));
    let mut late = connect(&server, "/echo");
    late.send(Message::text("late")).unwrap();
    assert_eq!(late.read().unwrap(), Message::text("late"));
    // After the delay: close 1001 to everyone, the listeners close, exit.
    for ws in [&mut ws, &mut late] {
        match ws.read() {
            Ok(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    assert!(stopped_at.elapsed() >= Duration::from_millis(1400));
    let addr = server.addr;
    let result = server
        .join_within(Duration::from_secs(10))
        .expect("run returned");
    assert!(result.is_ok(), "{result:?}");
    assert!(TcpStream::connect(addr).is_err(), "listeners closed");
}

#[test]
fn a_shard_that_ignores_the_stop_is_left_behind_at_the_drain_timeout() {
    let server = bind(&["--shards", "2", "--drain-timeout-ms", "300"]).inject(Fault::IgnoreStop(1));
    let mut server = TestServer::start_bound(server);
    let mut ws = connect(&server, "/echo");
    ws.send(Message::text("x")).unwrap();
    ws.read().unwrap();
    let stopped_at = Instant::now();
    server.begin_stop();
    let result = server
        .join_within(Duration::from_secs(10))
        .expect("run returns although shard 1 never stops");
    let took = stopped_at.elapsed();
    match result {
        Err(Error::StopDeadline { shards }) => assert_eq!(shards, vec![1]),
        other => panic!("expected StopDeadline, got {other:?}"),
    }
    // 300 ms of drain timeout and 500 ms of grace, and not much more.
    assert!(took >= Duration::from_millis(800), "{took:?}");
}

#[test]
fn a_start_that_cannot_finish_fails_naming_the_shard_and_what_it_was_doing() {
    let server = bind(&[
        "--shards",
        "1",
        "--start-timeout-ms",
        "300",
        "--drain-timeout-ms",
        "100",
    ])
    .inject(Fault::StallStart(0));
    let mut server = TestServer::start_bound(server);
    let result = server
        .join_within(Duration::from_secs(10))
        .expect("run returns although shard 0 never starts");
    let text = match result {
        Err(e @ Error::StartTimeout { .. }) => e.to_string(),
        other => panic!("expected StartTimeout, got {other:?}"),
    };
    assert_eq!(
        text,
        "shards [0] did not start within 300 ms (shard 0 setting up its executor); stopped the node"
    );
}

#[test]
fn head_gets_its_refusal_without_a_body() {
    let server = TestServer::start(&[]);
    for path in ["/healthz", "/echo", "/nope"] {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let text = String::from_utf8(resp).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
        assert!(head.starts_with("HTTP/1.1 405 "), "{path}: {head}");
        assert!(head.contains("\r\nAllow: GET"), "{path}: {head}");
        assert!(
            head.contains(&format!(
                "Content-Length: {}",
                "only GET is allowed\n".len()
            )),
            "{path}: {head}"
        );
        assert_eq!(body, "", "{path}: no body after a HEAD");
    }
}

#[test]
fn an_unusable_spill_dir_is_refused_before_anything_is_bound() {
    let file = std::env::temp_dir().join(format!("corecast-not-a-dir-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let spill = file.join("spill");
    let text = refusal(&[
        "--redis",
        "redis://127.0.0.1:1/",
        "--spill-dir",
        spill.to_str().unwrap(),
    ]);
    std::fs::remove_file(&file).unwrap();
    assert!(
        text.starts_with(&format!("storage: spill directory {}: ", spill.display())),
        "{text}"
    );
    assert!(text.ends_with("(pass a writable --spill-dir)"), "{text}");
}

#[test]
fn drain_flags_in_the_wrong_unit_are_refused() {
    let text = refusal(&["--drain-delay-ms", "7200000"]);
    assert_eq!(text, "invalid configuration: --drain-delay-ms (7200000) is over an hour: the value is in milliseconds");
}
