//! Bad upgrade requests get the right HTTP status and a reason in the body;
//! the side doors answer plain HTTP.

mod common;

use std::{io::Read, io::Write, time::Duration};

use common::*;

fn upgrade_with(replace: &str, with: &str) -> String {
    assert!(UPGRADE.contains(replace), "{replace}");
    UPGRADE.replacen(replace, with, 1)
}

#[test]
fn bad_handshakes_get_the_right_status() {
    let server = TestServer::start(&[]);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "version 8",
            upgrade_with("Version: 13", "Version: 8"),
            426,
            "Sec-WebSocket-Version: 13",
        ),
        (
            "no version",
            upgrade_with("Sec-WebSocket-Version: 13\r\n", ""),
            426,
            "Sec-WebSocket-Version must be 13",
        ),
        (
            "no key",
            upgrade_with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            400,
            "Sec-WebSocket-Key",
        ),
        (
            "short key",
            upgrade_with("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
            400,
            "base64 of 16 bytes",
        ),
        (
            "upgrade not websocket",
            upgrade_with("Upgrade: websocket", "Upgrade: h2c"),
            400,
            "websocket",
        ),
        (
            "connection not upgrade",
            upgrade_with("Connection: Upgrade", "Connection: keep-alive"),
            400,
            "upgrade",
        ),
        (
            "no upgrade at all",
            "GET /echo HTTP/1.1\r\nHost: t\r\n\r\n".into(),
            426,
            "Upgrade: websocket",
        ),
        ("POST", upgrade_with("GET", "POST"), 405, "Allow: GET"),
        (
            "HTTP/1.0",
            upgrade_with("HTTP/1.1", "HTTP/1.0"),
            505,
            "HTTP/1.1",
        ),
        ("no host", upgrade_with("Host: t\r\n", ""), 400, "Host"),
        (
            "unknown path",
            upgrade_with("/echo", "/nope"),
            404,
            "no such path",
        ),
        (
            "not http",
            "\x16\x03\x01\x02\x00 tls?\r\n\r\n".into(),
            400,
            "malformed",
        ),
        (
            "too many headers",
            upgrade_with("Host: t\r\n", &"Host: t\r\n".repeat(40)),
            431,
            "too large",
        ),
        (
            "headers over the byte limit",
            upgrade_with(
                "Host: t\r\n",
                &format!("Host: t\r\nX-Big: {}\r\n", "a".repeat(9000)),
            ),
            431,
            "too large",
        ),
    ];
    for (name, req, status, says) in cases {
        let (got, head, body) = http(server.addr, &req);
        assert_eq!(got, status, "{name}: {head}\n{body}");
        assert!(
            head.contains(says) || body.contains(says),
            "{name}: {head}\n{body}"
        );
        assert!(
            body.ends_with('\n') && body.len() > 5,
            "{name}: one-line reason: {body:?}"
        );
    }
    assert_eq!(
        server.metric("corecast_handshake_failures_total", "reason=\"ws_version\""),
        2
    );
    assert_eq!(
        server.metric(
            "corecast_handshake_failures_total",
            "reason=\"headers_too_large\""
        ),
        2
    );
}

#[test]
fn handshake_timeout_answers_408() {
    let server = TestServer::start(&["--handshake-timeout-ms", "300"]);
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\n").unwrap(); // and then nothing
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let (status, _, body) = split_response(&resp);
    assert_eq!(status, 408);
    assert!(body.contains("handshake timeout"));
}

#[test]
fn side_doors() {
    let server = TestServer::start(&["--shards", "2"]);
    let (status, _, body) = http(server.addr, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = http(server.addr, "GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let mut ws = connect(&server, "/echo");
    ws.send(tungstenite::Message::text("count me")).unwrap();
    ws.read().unwrap();
    let (status, head, body) = http(server.addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"));
    for series in [
        "corecast_connections{shard=\"0\"}",
        "corecast_connections{shard=\"1\"}",
        "# TYPE corecast_frames_in_total counter",
        "corecast_bytes_out_total{shard=",
        "corecast_handshake_failures_total{shard=\"0\",reason=\"timeout\",status=\"408\"}",
        "process_resident_memory_bytes ",
    ] {
        assert!(body.contains(series), "missing {series}");
    }
    assert_eq!(server.metric("corecast_websockets", ""), 1);
    assert_eq!(server.metric("corecast_messages_in_total", ""), 1);
    assert_eq!(server.metric("corecast_messages_out_total", ""), 1);
}

#[test]
fn upgrades_from_origins_not_allowed_get_403() {
    let with_origin = |path: &str, origin: &str| {
        upgrade_with("/echo", path).replacen(
            "Host: t\r\n",
            &format!("Host: t\r\nOrigin: {origin}\r\n"),
            1,
        )
    };
    let server = TestServer::start(&[
        "--allowed-origins",
        "https://chat.example.com,https://*.example.org",
    ]);
    let cases = [
        (
            "allowed",
            with_origin("/echo", "https://chat.example.com"),
            101,
        ),
        (
            "wildcard",
            with_origin("/echo", "https://a.b.example.org"),
            101,
        ),
        (
            "other site",
            with_origin("/echo", "https://evil.example.net"),
            403,
        ),
        (
            "other scheme",
            with_origin("/echo", "http://chat.example.com"),
            403,
        ),
        (
            "chat too",
            with_origin("/ws", "https://evil.example.net"),
            403,
        ),
        ("no origin: not a browser", UPGRADE.to_string(), 101),
    ];
    for (name, req, status) in cases {
        let (got, head, body) = answer_head(server.addr, &req);
        assert_eq!(got, status, "{name}: {head}\n{body}");
        if status == 403 {
            assert_eq!(
                body,
                "origin not allowed: the page's origin is not in the server's --allowed-origins\n"
            );
        }
    }
    // Side doors are plain HTTP: no origin check.
    let (got, ..) = http(
        server.addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example.net\r\n\r\n",
    );
    assert_eq!(got, 200);
    assert_eq!(
        server.metric(
            "corecast_handshake_failures_total",
            "reason=\"origin_not_allowed\""
        ),
        3
    );

    let strict = TestServer::start(&[
        "--allowed-origins",
        "https://chat.example.com",
        "--require-origin",
    ]);
    let (got, _, body) = answer_head(strict.addr, UPGRADE);
    assert_eq!(
        (got, body.as_str()),
        (403, "an Origin header is required (--require-origin)\n")
    );
    let (got, ..) = answer_head(
        strict.addr,
        &with_origin("/echo", "https://chat.example.com"),
    );
    assert_eq!(got, 101);
}

/// The response to `request`: a refusal whole (the server closes after
/// it), a 101 up to its blank line (the WebSocket stays open).
fn answer_head(addr: std::net::SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        resp.extend_from_slice(&buf[..n]);
        let head_done = resp.windows(4).any(|w| w == b"\r\n\r\n");
        if n == 0 || (head_done && resp.starts_with(b"HTTP/1.1 101")) {
            return split_response(&resp);
        }
    }
}

#[test]
fn a_bad_allowed_origin_is_refused_at_start_by_name() {
    use clap::Parser;
    let argv = ["gateway", "--allowed-origins", "https://chat.example.com/"];
    let config = corecast_gateway::Config::try_parse_from(argv).expect("parses");
    let err = config.validate().expect_err("refused").to_string();
    assert!(
        err.contains("--allowed-origins") && err.contains("https://chat.example.com/"),
        "{err}"
    );
}
