//! Black-box tests of /echo over loopback: tungstenite as an independent
//! client for everything an RFC-abiding client sends, raw bytes for the rest.

mod common;

use std::{io::Write, time::Duration};

use common::*;
use tungstenite::{
    protocol::{
        frame::{
            coding::{CloseCode, Data, OpCode},
            Frame,
        },
        CloseFrame,
    },
    Message,
};

const KEY: Option<[u8; 4]> = Some([0xa1, 0xb2, 0xc3, 0xd4]);

#[test]
fn echoes_text_and_binary() {
    let server = TestServer::start(&["--shards", "2"]);
    let mut ws = connect(&server, "/echo");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let messages = [
        Message::text("hello"),
        Message::text(""),
        Message::text("κόσμε 𝄞"),
        Message::binary(vec![0u8, 255, 7]),
        Message::binary(big),
    ];
    for m in messages {
        ws.send(m.clone()).unwrap();
        assert_eq!(ws.read().unwrap(), m);
    }
    ws.close(None).unwrap();
}

#[test]
fn fragmented_message_is_echoed_whole() {
    let server = TestServer::start(&[]);
    let mut ws = connect(&server, "/echo");
    ws.send(Message::Frame(Frame::message(
        "κό".as_bytes().to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .unwrap();
    ws.send(Message::Frame(Frame::ping(b"mid".to_vec())))
        .unwrap();
    // The UTF-8 sequence of σ is split across the two fragments.
    let sigma = "σμε".as_bytes();
    ws.send(Message::Frame(Frame::message(
        sigma[..1].to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        sigma[1..].to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"mid".to_vec().into()));
    assert_eq!(ws.read().unwrap(), Message::text("κόσμε"));
}

#[test]
fn ping_gets_pong_with_same_payload() {
    let server = TestServer::start(&[]);
    let mut ws = connect(&server, "/echo");
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    assert_eq!(
        ws.read().unwrap(),
        Message::Pong(b"are you there".to_vec().into())
    );
}

#[test]
fn client_close_codes_are_echoed_and_server_closes_tcp() {
    let server = TestServer::start(&[]);
    for (code, reason) in [(1000u16, ""), (1001, "bye"), (3000, "app"), (4999, "κόσμε")] {
        let mut ws = connect(&server, "/echo");
        ws.close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        }))
        .unwrap();
        loop {
            match ws.read() {
                Ok(Message::Close(Some(f))) => {
                    assert_eq!(u16::from(f.code), code);
                }
                Ok(Message::Close(None)) => panic!("close echo without code"),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(tungstenite::Error::ConnectionClosed) => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    // An empty close is answered with an empty close.
    let mut s = raw_ws(server.addr);
    s.write_all(&raw_frame(0x88, b"", KEY)).unwrap();
    assert_eq!(read_close(&mut s), None);
    assert_closed(&mut s);
    assert!(eventually(Duration::from_secs(5), || server.metric(
        "corecast_ws_closes_total",
        "code=\"1000\",initiator=\"client\""
    ) == 1));
    assert_eq!(
        server.metric("corecast_ws_closes_total", "code=\"4999\"")
            + server.metric("corecast_ws_closes_total", "code=\"other\""),
        2
    );
}

/// (name, frames sent after the upgrade, expected close code from the server)
fn violations() -> Vec<(&'static str, Vec<u8>, u16)> {
    let cat = |v: Vec<Vec<u8>>| v.concat();
    vec![
        ("unmasked frame", raw_frame(0x81, b"hi", None), 1002),
        ("reserved bit", raw_frame(0xc1, b"hi", KEY), 1002),
        ("reserved opcode", raw_frame(0x83, b"", KEY), 1002),
        ("fragmented ping", raw_frame(0x09, b"", KEY), 1002),
        ("ping over 125 bytes", raw_frame(0x89, &[0; 126], KEY), 1002),
        (
            "continuation without start",
            raw_frame(0x80, b"x", KEY),
            1002,
        ),
        (
            "text inside fragmented message",
            cat(vec![raw_frame(0x01, b"a", KEY), raw_frame(0x81, b"b", KEY)]),
            1002,
        ),
        ("close of one byte", raw_frame(0x88, &[3], KEY), 1002),
        (
            "close code 1005",
            raw_frame(0x88, &1005u16.to_be_bytes(), KEY),
            1002,
        ),
        (
            "close code 2999",
            raw_frame(0x88, &2999u16.to_be_bytes(), KEY),
            1002,
        ),
        (
            "close code 5000",
            raw_frame(0x88, &5000u16.to_be_bytes(), KEY),
            1002,
        ),
        (
            "close reason not UTF-8",
            raw_frame(0x88, &[3, 0xe8, 0xff], KEY),
            1007,
        ),
        (
            "invalid UTF-8 text",
            raw_frame(0x81, &[b'a', 0xc0, 0xaf], KEY),
            1007,
        ),
        (
            "UTF-8 cut at message end",
            cat(vec![
                raw_frame(0x01, b"a", KEY),
                raw_frame(0x80, &[0xce], KEY),
            ]),
            1007,
        ),
        ("frame over max", raw_frame(0x82, &[0; 2048], KEY), 1009),
        (
            "message over max",
            cat(vec![
                raw_frame(0x02, &[0; 1000], KEY),
                raw_frame(0x80, &[0; 1000], KEY),
            ]),
            1009,
        ),
    ]
}

#[test]
fn each_violation_closes_with_its_code() {
    let server = TestServer::start(&["--max-frame-bytes", "1024", "--max-message-bytes", "1500"]);
    for (name, bytes, code) in violations() {
        let mut s = raw_ws(server.addr);
        s.write_all(&bytes).unwrap();
        assert_eq!(read_close(&mut s), Some(code), "{name}");
        // We answer the server's close; it must then close TCP.
        let _ = s.write_all(&raw_frame(0x88, &code.to_be_bytes(), KEY));
        assert_closed(&mut s);
    }
    assert!(
        server.metric(
            "corecast_ws_closes_total",
            "code=\"1002\",initiator=\"server\""
        ) >= 11
    );
}

#[test]
fn oversize_message_from_tungstenite_gets_1009() {
    let server = TestServer::start(&["--max-frame-bytes", "1024", "--max-message-bytes", "1024"]);
    let mut ws = connect(&server, "/echo");
    ws.send(Message::binary(vec![1u8; 1024])).unwrap();
    assert_eq!(ws.read().unwrap().len(), 1024, "at the limit is fine");
    ws.send(Message::binary(vec![1u8; 1025])).unwrap();
    match ws.read().unwrap() {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Size);
            assert!(!f.reason.is_empty());
        }
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[test]
fn invalid_utf8_split_across_reads_fails_before_the_frame_ends() {
    let server = TestServer::start(&[]);
    let mut s = raw_ws(server.addr);
    let frame = raw_frame(0x81, &[b'a', b'b', 0xf4, 0x90, b'c', b'd'], KEY);
    // Header, mask and "ab\xf4": a valid prefix; nothing comes back yet.
    s.write_all(&frame[..9]).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        read_raw_frame(&mut s).is_err(),
        "no reply to a valid prefix"
    );
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // 0x90 after 0xf4 is past U+10FFFF: fail now, without the last 2 bytes.
    s.write_all(&frame[9..10]).unwrap();
    assert_eq!(read_close(&mut s), Some(1007));
}

#[test]
fn bytes_right_behind_the_handshake_are_frames() {
    let server = TestServer::start(&[]);
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = UPGRADE.as_bytes().to_vec();
    req.extend_from_slice(&raw_frame(0x81, b"eager", KEY));
    s.write_all(&req).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        std::io::Read::read_exact(&mut s, &mut b).unwrap();
        head.push(b[0]);
    }
    assert_eq!(read_raw_frame(&mut s).unwrap(), (0x81, b"eager".to_vec()));
}
