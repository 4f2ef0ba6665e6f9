//! wss:// end to end: echo and chat over TLS with tungstenite (rustls) and
//! Python `websockets`, handshakes that must fail cleanly and be counted,
//! and the certificate reloaded while connections stay open. The
//! certificates are `scripts/tls-certs.sh`'s, in `tests/testdata/tls`.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{chat::*, *};
use serde_json::{json, Value};
use tungstenite::{client::IntoClientRequest, stream::MaybeTlsStream, Connector, Message};

type Wss = tungstenite::WebSocket<MaybeTlsStream<TcpStream>>;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/tls")).join(name)
}

fn arg(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A rustls client that trusts only the test CA.
fn client_config() -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fixture("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A gateway serving ws:// on `--listen` and wss:// on `--tls-listen`.
fn tls_server(
    cert: &std::path::Path,
    key: &std::path::Path,
    extra: &[&str],
) -> (TestServer, SocketAddr) {
    let mut args = vec![
        "--jwt-secret",
        SECRET,
        "--tls-cert",
        arg(cert),
        "--tls-key",
        arg(key),
        "--tls-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let server = bind(&args);
    let tls = server.tls_addr().expect("a TLS listener");
    (TestServer::start_bound(server), tls)
}

/// Connects with wss:// to `host` (the name the certificate is checked
/// against and sent as SNI) at `addr`.
fn wss(addr: SocketAddr, host: &str, path: &str, protocol: Option<&str>) -> Wss {
    try_wss(addr, host, path, protocol).expect("wss handshake")
}

fn try_wss(
    addr: SocketAddr,
    host: &str,
    path: &str,
    protocol: Option<&str>,
) -> Result<Wss, String> {
    let mut req = format!("wss://{host}:{}{path}", addr.port())
        .into_client_request()
        .unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    tungstenite::client_tls_with_config(req, stream, None, Some(Connector::Rustls(client_config())))
        .map(|(ws, resp)| {
            assert_eq!(resp.status(), 101);
            ws
        })
        .map_err(|e| e.to_string())
}

/// `GET /healthz` over TLS to `localhost` at `addr`: the status, and the
/// client's connection (to ask what was negotiated).
fn https_healthz(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> (u16, rustls::ClientConnection) {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut s = rustls::Stream::new(&mut conn, &mut sock);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    (split_response(&resp).0, conn)
}

/// The leaf certificate the server presented.
fn served_cert(ws: &Wss) -> Vec<u8> {
    match ws.get_ref() {
        MaybeTlsStream::Rustls(s) => s.conn.peer_certificates().unwrap()[0].to_vec(),
        _ => panic!("not TLS"),
    }
}

fn leaf_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::pem_file_iter(fixture(pem))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn echo(ws: &mut Wss, text: &str) {
    ws.send(Message::text(text)).unwrap();
    match ws.read().unwrap() {
        Message::Text(t) => assert_eq!(t.as_str(), text),
        other => panic!("unexpected {other:?}"),
    }
}

fn recv_json(ws: &mut Wss, kind: &str) -> Value {
    loop {
        if let Message::Text(t) = ws
            .read()
            .unwrap_or_else(|e| panic!("waiting for {kind}: {e}"))
        {
            let v: Value = serde_json::from_str(&t).unwrap();
            let wanted = ["ack", "msg"].contains(&v["type"].as_str().unwrap_or_default());
            if v["type"] == kind || (kind.is_empty() && wanted) {
                return v;
            }
        }
    }
}

#[test]
fn echo_and_chat_over_wss_next_to_plain_ws() {
    let (server, tls) = tls_server(&fixture("cert.pem"), &fixture("key.pem"), &[]);
    // By name (SNI localhost) and by address (no SNI).
    for host in ["localhost", "127.0.0.1"] {
        let mut ws = wss(tls, host, "/echo", None);
        echo(&mut ws, "hello over TLS");
        // Messages larger than a TLS record (16 KiB) both ways, and many
        // small ones in one flight.
        let big = "x".repeat(300_000);
        echo(&mut ws, &big);
        for i in 0..200 {
            ws.send(Message::text(format!("m{i}"))).unwrap();
        }
        for i in 0..200 {
            assert_eq!(ws.read().unwrap(), Message::text(format!("m{i}")));
        }
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    // Plain ws:// on --listen is untouched.
    let mut plain = connect(&server, "/echo");
    plain.send(Message::text("plain")).unwrap();
    assert_eq!(plain.read().unwrap(), Message::text("plain"));

    // Chat: one member over wss, one over ws, both see the message.
    let mut a = wss(
        tls,
        "localhost",
        &format!("/ws?token={}", token("alice")),
        Some("corecast.v1"),
    );
    assert_eq!(recv_json(&mut a, "welcome")["user"], "alice");
    a.send(Message::text(json!({"type":"join","room":"r"}).to_string()))
        .unwrap();
    recv_json(&mut a, "joined");
    let mut b = Chat::connect(&server, "bob");
    b.join("r");
    a.send(Message::text(
        json!({"type":"publish","room":"r","id":"p1","body":{"hi":1}}).to_string(),
    ))
    .unwrap();
    // The ack and the member's copy of the message come in either order.
    let mut got = std::collections::BTreeMap::new();
    while got.len() < 2 {
        let v = recv_json(&mut a, "");
        got.insert(v["type"].as_str().unwrap().to_string(), v);
    }
    assert_eq!(got["ack"]["seq"], 1);
    assert_eq!(got["msg"]["body"]["hi"], 1);
    assert_eq!(b.recv_type("msg")["body"]["hi"], 1);

    // Side doors answer over TLS too.
    let (status, conn) = https_healthz(tls, client_config());
    assert_eq!(status, 200);
    assert_eq!(conn.alpn_protocol(), None, "no ALPN offered, none chosen");

    assert!(server.metric("corecast_tls_handshakes_total", "") >= 4);
    assert!(server.metric("corecast_tls_cert_expiry_seconds", "") > 2_000_000_000);
}

#[test]
fn alpn_http_1_1_is_chosen_when_offered() {
    let (server, tls) = tls_server(&fixture("cert.pem"), &fixture("key.pem"), &[]);
    let mut config = (*client_config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut sock = TcpStream::connect(tls).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.complete_io(&mut sock).unwrap();
    assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    // h2 alone: nothing in common, refused and counted.
    let mut h2 = (*client_config()).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut refused = rustls::ClientConnection::new(Arc::new(h2), name).unwrap();
    let mut sock2 = TcpStream::connect(tls).unwrap();
    sock2
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let e = refused.complete_io(&mut sock2).unwrap_err();
    assert!(e.to_string().contains("NoApplicationProtocol"), "{e}");
    let counted = server.metric(
        "corecast_tls_handshake_failures_total",
        "reason=\"incompatible\"",
    );
    assert_eq!(counted, 1);
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[test]
fn tls_1_2_is_served_too() {
    let (_server, tls) = tls_server(&fixture("cert2.pem"), &fixture("key2.pem"), &[]);
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    roots
        .add(CertificateDer::from_pem_file(fixture("ca.pem")).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (status, conn) = https_healthz(tls, Arc::new(config));
    assert_eq!(status, 200);
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

/// Sends `bytes` and reads until the server closes; returns what it sent.
/// Fails if the server holds the connection open past `within`.
fn send_and_read_to_close(addr: SocketAddr, bytes: &[u8], within: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    let start = Instant::now();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still open after {:?}: {e}", start.elapsed()),
        }
    }
    got
}

/// A TLS 1.0 ClientHello: no supported_versions, one TLS 1.0 suite.
fn tls10_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x01];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // TLS_RSA_WITH_AES_128_CBC_SHA
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0, 0, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0, hs.len() as u8];
    record.extend_from_slice(&hs);
    record
}

#[test]
fn bad_handshakes_get_a_clean_close_and_are_counted() {
    let (server, tls) = tls_server(
        &fixture("cert.pem"),
        &fixture("key.pem"),
        &["--handshake-timeout-ms", "400"],
    );
    let within = Duration::from_secs(5);
    let failures = |reason: &str| {
        server.metric(
            "corecast_tls_handshake_failures_total",
            &format!("reason=\"{reason}\""),
        )
    };

    // Plain HTTP to the TLS port: a readable 400.
    let got = send_and_read_to_close(tls, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", within);
    let (status, _, body) = split_response(&got);
    assert_eq!(status, 400);
    assert!(body.contains("this port speaks TLS"), "{body}");
    assert_eq!(failures("plain_http"), 1);

    // Garbage: closed.
    send_and_read_to_close(tls, &[0x00, 0xff, 0x13, 0x37, 0x42], within);
    // A record that claims to be a handshake but is not one.
    send_and_read_to_close(tls, b"\x16\x03\x01\x00\x05hello", within);
    assert_eq!(failures("malformed"), 2);

    // TLS 1.0: refused with an alert (a record of type 21).
    let got = send_and_read_to_close(tls, &tls10_client_hello(), within);
    assert_eq!(got.first(), Some(&0x15), "{got:?}");
    assert_eq!(
        failures("version"),
        1,
        "{}",
        http(server.addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").2
    );

    // A server name the certificate does not cover.
    let e = try_wss(tls, "example.com", "/echo", None).unwrap_err();
    assert!(e.contains("AccessDenied") || e.contains("alert"), "{e}");
    assert_eq!(failures("sni"), 1);

    // Silence, and half a ClientHello: closed at the handshake timeout.
    send_and_read_to_close(tls, b"", within);
    send_and_read_to_close(tls, &tls10_client_hello()[..20], within);
    assert_eq!(failures("timeout"), 2);

    // A client that gives up mid-handshake.
    drop(TcpStream::connect(tls).unwrap());
    let end = Instant::now() + within;
    while failures("closed") == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(failures("closed"), 1);

    // None of it stuck: no connection is left open, and a good client
    // still gets in.
    let end = Instant::now() + within;
    while server.metric("corecast_connections", "") > 1 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.metric("corecast_connections", ""),
        1,
        "only the metrics request"
    );
    echo(&mut wss(tls, "localhost", "/echo", None), "still fine");
}

#[test]
fn a_reload_serves_the_new_certificate_to_new_connections_only() {
    let dir = std::env::temp_dir().join(format!("corecast-tls-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(fixture("cert.pem"), &cert).unwrap();
    std::fs::copy(fixture("key.pem"), &key).unwrap();
    let server = bind(&[
        "--tls-cert",
        arg(&cert),
        "--tls-key",
        arg(&key),
        "--tls-listen",
        "127.0.0.1:0",
    ]);
    let files = server.tls().unwrap();
    let tls = server.tls_addr().unwrap();
    let _server = TestServer::start_bound(server);

    let mut old = wss(tls, "localhost", "/echo", None);
    assert_eq!(served_cert(&old), leaf_der("cert.pem"));
    std::fs::copy(fixture("cert2.pem"), &cert).unwrap();
    std::fs::copy(fixture("key2.pem"), &key).unwrap();
    files.reload().unwrap();
    let mut new = wss(tls, "localhost", "/echo", None);
    assert_eq!(served_cert(&new), leaf_der("cert2.pem"));
    echo(&mut old, "the old connection keeps its session");
    echo(&mut new, "the new one has the new certificate");

    // A broken file: the reload fails and the certificate in use stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    assert!(files.reload().is_err());
    let mut after = wss(tls, "localhost", "/echo", None);
    assert_eq!(served_cert(&after), leaf_der("cert2.pem"));
    echo(&mut after, "still served");
    echo(&mut old, "and the first connection still echoes");
}

#[test]
fn listen_alone_speaks_tls_when_no_tls_listen_is_given() {
    let server = bind(&[
        "--tls-cert",
        arg(&fixture("cert.pem")),
        "--tls-key",
        arg(&fixture("key.pem")),
    ]);
    assert_eq!(server.tls_addr(), None);
    let addr = server.local_addr();
    let _server = TestServer::start_bound(server);
    echo(
        &mut wss(addr, "localhost", "/echo", None),
        "tls on --listen",
    );
    let got = send_and_read_to_close(
        addr,
        b"GET /healthz HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(split_response(&got).0, 400);
}

#[test]
fn python_websockets_with_an_ssl_context_echoes_and_chats() {
    let (_server, tls) = tls_server(&fixture("cert.pem"), &fixture("key.pem"), &[]);
    let script = r#"
import asyncio, json, ssl, sys
from websockets.asyncio.client import connect
port, ca, tok = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
async def main():
    async with connect(f"wss://localhost:{port}/echo", ssl=ctx) as ws:
        for m in ["one", "two" * 10000]:
            await ws.send(m)
            assert await ws.recv() == m
    async with connect(f"wss://localhost:{port}/ws?token={tok}", ssl=ctx, subprotocols=["corecast.v1"]) as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"type": "join", "room": "py"}))
        await ws.send(json.dumps({"type": "publish", "room": "py", "id": "x", "body": "hi"}))
        seen = set()
        while not {"joined", "ack", "msg"} <= seen:
            seen.add(json.loads(await ws.recv())["type"])
    print("ok", ws.transport.get_extra_info("ssl_object").version())
asyncio.run(main())
"#;
    let python = std::env::var("CORECAST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args([
            "-c",
            script,
            &tls.port().to_string(),
            arg(&fixture("ca.pem")),
            &token("py"),
        ])
        .output()
        .expect("python3 runs (scripts/deps.sh installs websockets)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ok TLSv1.3"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_binary_reloads_on_sighup_and_when_the_files_change() {
    let dir = std::env::temp_dir().join(format!("corecast-tls-hup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(fixture("cert.pem"), &cert).unwrap();
    std::fs::copy(fixture("key.pem"), &key).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let gw = Logged::spawn(&[
        "--listen",
        &addr.to_string(),
        "--shards",
        "1",
        "--tls-cert",
        arg(&cert),
        "--tls-key",
        arg(&key),
        "--tls-reload-interval-s",
        "1",
    ]);
    let line = gw.wait_for("TLS: wss:// on");
    assert!(line.contains("expires at Unix time 2112013487"), "{line}");
    gw.wait_for("shards serving");
    let mut old = wss(addr, "localhost", "/echo", None);

    // The interval check sees new files (mtime) and reloads them.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::copy(fixture("key2.pem"), &key).unwrap();
    std::fs::copy(fixture("cert2.pem"), &cert).unwrap();
    gw.wait_for("TLS certificate reloaded");
    assert_eq!(
        served_cert(&wss(addr, "localhost", "/echo", None)),
        leaf_der("cert2.pem")
    );
    echo(&mut old, "untouched");

    // SIGHUP with a broken key: logged, the old certificate stays.
    std::fs::write(&key, "garbage").unwrap();
    gw.signal("HUP");
    let line = gw.wait_for("the old TLS certificate stays in use");
    assert!(line.contains("--tls-key"), "{line}");
    assert_eq!(
        served_cert(&wss(addr, "localhost", "/echo", None)),
        leaf_der("cert2.pem")
    );
    assert!(gw.stop(), "a clean stop after the reloads");
}
