//! Connection lifecycle: keepalive, idle and slow-consumer closes, draining
//! on shutdown, and many connections over several shards.

mod common;

use std::{
    io::Write,
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use tungstenite::{protocol::frame::coding::CloseCode, Message};

const KEY: Option<[u8; 4]> = Some([9, 8, 7, 6]);

#[test]
fn silent_client_is_pinged_then_closed_as_idle() {
    let server = TestServer::start(&["--ping-interval-ms", "200", "--idle-timeout-ms", "700"]);
    let mut s = raw_ws(server.addr);
    let started = Instant::now();
    let (b0, payload) = read_raw_frame(&mut s).unwrap();
    assert_eq!(b0, 0x89, "a ping first");
    assert!(payload.is_empty());
    // We do not answer; the idle timeout closes us with 1001.
    let (b0, payload) = read_raw_frame(&mut s).unwrap();
    assert_eq!(b0, 0x88);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
    assert_eq!(&payload[2..], b"idle timeout");
    assert!(started.elapsed() >= Duration::from_millis(600));
    s.write_all(&raw_frame(0x88, &1001u16.to_be_bytes(), KEY))
        .unwrap();
    assert_closed(&mut s);
}

#[test]
fn a_client_that_sends_and_hangs_up_at_once_is_dropped() {
    // The frame and the FIN often arrive under one readiness edge: the
    // server must read on past the frame to the end of stream instead of
    // waiting for an edge that never comes (it would hold the connection
    // until the idle timeout, 90 s here).
    let server = TestServer::start(&[]);
    for i in 0..20u8 {
        let mut s = raw_ws(server.addr);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&raw_frame(0x81, &[b'a' + i], KEY)).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let (b0, payload) = read_raw_frame(&mut s).unwrap();
        assert_eq!((b0, payload), (0x81, vec![b'a' + i]), "the echo first");
        assert_closed(&mut s);
    }
    assert!(
        eventually(Duration::from_secs(5), || server
            .metric("corecast_websockets", "")
            == 0),
        "every WebSocket dropped"
    );
}

#[test]
fn answering_pings_keeps_the_connection() {
    let server = TestServer::start(&["--ping-interval-ms", "100", "--idle-timeout-ms", "400"]);
    let mut ws = connect(&server, "/echo");
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let end = Instant::now() + Duration::from_millis(1200);
    let mut pings = 0;
    while Instant::now() < end {
        match ws.read() {
            // tungstenite queues the pong and sends it on the next flush.
            Ok(Message::Ping(_)) => {
                pings += 1;
                ws.flush().unwrap();
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("connection lost: {e}"),
        }
    }
    assert!(pings >= 2, "pinged {pings} times");
    ws.send(Message::text("still here")).unwrap();
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("still here"));
}

#[test]
fn slow_consumer_is_closed_and_counted() {
    let server = TestServer::start(&[
        "--outbound-budget-bytes",
        "65536",
        "--slow-consumer-timeout-ms",
        "300",
        "--close-timeout-ms",
        "300",
    ]);
    let s = raw_ws(server.addr);
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(4096)
        .unwrap();
    let mut writer = s.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Send echo requests and never read the echoes.
    let frame = raw_frame(0x82, &[0x5a; 16 * 1024], KEY);
    // Loopback socket buffers may autotune to tens of MiB, so keep going
    // (bounded) until the server's close resets the connection.
    let sender = std::thread::spawn(move || {
        for _ in 0..20_000 {
            if let Err(e) = writer.write_all(&frame) {
                return Some(e.kind());
            }
        }
        None
    });
    assert!(
        eventually(Duration::from_secs(10), || server
            .metric("corecast_slow_consumer_closes_total", "")
            == 1),
        "slow consumer not closed"
    );
    let stopped_by = sender.join().unwrap();
    assert!(
        matches!(
            stopped_by,
            Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
        ),
        "the server dropped the socket: {stopped_by:?}"
    );
    assert_eq!(
        server.metric(
            "corecast_ws_closes_total",
            "code=\"1008\",initiator=\"server\""
        ),
        1
    );
    // Everyone else is unaffected.
    let mut ws = connect(&server, "/echo");
    ws.send(Message::text("fine")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("fine"));
}

#[test]
fn shutdown_closes_every_client_with_1001_and_returns() {
    let server = TestServer::start(&["--shards", "2"]);
    let mut clients: Vec<_> = (0..20).map(|_| connect(&server, "/echo")).collect();
    for ws in &mut clients {
        ws.send(Message::text("x")).unwrap();
        ws.read().unwrap();
    }
    let addr = server.addr;
    let reader = std::thread::spawn(move || {
        clients
            .into_iter()
            .map(|mut ws| loop {
                match ws.read() {
                    Ok(Message::Close(Some(f))) => break f.code,
                    Ok(_) => continue,
                    Err(e) => panic!("{e}"),
                }
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(100));
    server.stop().expect("clean exit");
    let codes = reader.join().unwrap();
    assert_eq!(codes.len(), 20);
    assert!(codes.iter().all(|c| *c == CloseCode::Away), "{codes:?}");
    assert!(TcpStream::connect(addr).is_err(), "listener closed");
}

#[test]
fn bind_conflict_is_a_clear_error() {
    let server = TestServer::start(&[]);
    let config = <corecast_gateway::Config as clap::Parser>::try_parse_from([
        "gateway",
        "--listen",
        &server.addr.to_string(),
    ])
    .unwrap();
    let err = corecast_gateway::Server::bind(config)
        .err()
        .expect("port is taken");
    let text = err.to_string();
    assert_eq!(
        text,
        format!(
            "bind {}: address in use (is another gateway running? pass --listen)",
            server.addr
        )
    );
}
