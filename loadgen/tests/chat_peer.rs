//! Black-box runs of `loadgen chat` against an independent chat server:
//! tungstenite, a thread per connection, one lock over the rooms, speaking
//! the part of `corecast.v1` the load generator uses (welcome, join/joined
//! with resume, publish/ack/msg). It may listen as two "nodes" sharing the
//! rooms, like a cluster sharing a store, and kill one mid-run. Faults
//! injected on purpose must show up in the report; a clean server must give
//! a clean run. Short and bounded; they check counts, never timings.

use std::{
    collections::HashMap,
    io::ErrorKind,
    net::TcpListener,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Parser as _;
use corecast_loadgen::{chat, Cli, Plan};
use corecast_router::auth::Verifier;
use serde_json::{json, Value};
use tungstenite::{
    handshake::server::{Request, Response},
    http::HeaderValue,
    Message,
};

/// What the fake server gets wrong on purpose.
#[derive(Clone, Copy)]
enum Fault {
    None,
    /// Skips every nth delivery (counting over all members).
    DropEvery(u64),
    /// Sends every nth delivery twice.
    DupEvery(u64),
    /// After this many publishes in all, node 1 closes its connections with
    /// 1001 and accepts no more. With `resumable` false every resume is
    /// answered `recovered:false`, followed by the messages it asked for
    /// (as a store answers when part of them is gone).
    KillNode {
        after: u64,
        resumable: bool,
    },
}

/// The fake's only epoch: its store never loses a room.
const EPOCH: &str = "e1";

#[derive(Default)]
struct Room {
    seq: u64,
    members: Vec<mpsc::Sender<String>>,
    /// `msg` frames, seq `i + 1` at `i`: what resumes replay.
    history: Vec<String>,
}

struct Fake {
    rooms: Mutex<HashMap<String, Room>>,
    deliveries: AtomicU64,
    fault: Fault,
    secret: Option<Vec<u8>>,
    users: AtomicU64,
    publishes: AtomicU64,
    /// Node 1 is dead (`Fault::KillNode`).
    killed: AtomicBool,
}

/// Starts the fake chat server on loopback; it lives as long as the test process.
fn fake_chat(fault: Fault, secret: Option<&[u8]>) -> u16 {
    fake_cluster(fault, secret, 1)[0]
}

/// Starts `nodes` listeners sharing one set of rooms; returns their ports.
fn fake_cluster(fault: Fault, secret: Option<&[u8]>, nodes: usize) -> Vec<u16> {
    let fake = Arc::new(Fake {
        rooms: Mutex::default(),
        deliveries: AtomicU64::new(0),
        fault,
        secret: secret.map(<[u8]>::to_vec),
        users: AtomicU64::new(0),
        publishes: AtomicU64::new(0),
        killed: AtomicBool::new(false),
    });
    (0..nodes)
        .map(|node| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            listener.set_nonblocking(true).unwrap();
            let fake = fake.clone();
            thread::spawn(move || loop {
                if fake.is_dead(node) {
                    // Dropping the listener: connects are refused from now on.
                    return;
                }
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let fake = fake.clone();
                        thread::spawn(move || serve(&fake, stream, node));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => return,
                }
            });
            port
        })
        .collect()
}

impl Fake {
    fn is_dead(&self, node: usize) -> bool {
        node == 1 && self.killed.load(Ordering::Acquire)
    }
}

// tungstenite's handshake callback returns its (large) `ErrorResponse`.
#[allow(clippy::result_large_err)]
fn serve(fake: &Fake, stream: std::net::TcpStream, node: usize) {
    let mut token = None;
    let callback = |req: &Request, mut resp: Response| {
        token = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
            .map(str::to_string);
        let offered = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .any(|v| v.to_str().unwrap_or("").contains("corecast.v1"));
        if offered {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static("corecast.v1"),
            );
        }
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, callback) else {
        return;
    };
    let user = match (&fake.secret, token) {
        (None, _) => format!("anon-{}", fake.users.fetch_add(1, Ordering::Relaxed)),
        (Some(secret), Some(token)) => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            match Verifier::new(secret, 0).verify(&token, now.as_secs()) {
                Ok(claims) => claims.sub,
                Err(_) => return close(ws, 4002),
            }
        }
        (Some(_), None) => return close(ws, 4001),
    };
    // Short reads, so that one thread both reads and forwards fan-out.
    let _ = ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(1)));
    let (tx, rx) = mpsc::channel::<String>();
    let _ = ws.send(Message::text(
        json!({"type": "welcome", "user": user, "conn": "0.1"}).to_string(),
    ));
    loop {
        if fake.is_dead(node) {
            return close(ws, 1001);
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                let reply = on_frame(fake, &m, &tx);
                if ws.send(Message::text(reply.to_string())).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        let mut wrote = false;
        while let Ok(m) = rx.try_recv() {
            wrote = true;
            if ws.write(Message::text(m)).is_err() {
                return;
            }
        }
        if wrote && ws.flush().is_err() {
            break;
        }
    }
}

fn close(mut ws: tungstenite::WebSocket<std::net::TcpStream>, code: u16) {
    let frame = tungstenite::protocol::CloseFrame {
        code: code.into(),
        reason: "refused".into(),
    };
    let _ = ws.close(Some(frame));
    while ws.read().is_ok() {}
}

/// Join and publish; fan-out goes through the members' channels, under the
/// rooms lock, so that every member sees one order.
fn on_frame(fake: &Fake, m: &Value, me: &mpsc::Sender<String>) -> Value {
    let room = m["room"].as_str().unwrap_or("").to_string();
    let mut rooms = fake.rooms.lock().unwrap();
    match m["type"].as_str() {
        Some("join") => {
            let r = rooms.entry(room.clone()).or_default();
            // Missed messages go out before any live one: both through the
            // member's channel, which it joins only after them.
            let resumed = m["since"].as_u64().map(|since| {
                assert_eq!(m["epoch"], EPOCH, "a resume names the epoch of its joined");
                let missed = &r.history[(since as usize).min(r.history.len())..];
                for msg in missed {
                    let _ = me.send(msg.clone());
                }
                let recovered = !matches!(
                    fake.fault,
                    Fault::KillNode {
                        resumable: false,
                        ..
                    }
                );
                (recovered, missed.len())
            });
            r.members.push(me.clone());
            let mut joined = json!({"type": "joined", "room": room, "seq": r.seq,
                                    "members": r.members.len(), "epoch": EPOCH});
            if let Some((recovered, missed)) = resumed {
                joined["recovered"] = recovered.into();
                joined["missed"] = missed.into();
            }
            joined
        }
        Some("publish") => {
            let r = rooms.entry(room.clone()).or_default();
            r.seq += 1;
            let msg = json!({"type": "msg", "room": room, "seq": r.seq, "from": "x",
                             "id": m["id"], "ts": 1, "body": m["body"]})
            .to_string();
            r.history.push(msg.clone());
            let published = fake.publishes.fetch_add(1, Ordering::Relaxed) + 1;
            if let Fault::KillNode { after, .. } = fake.fault {
                if published == after {
                    fake.killed.store(true, Ordering::Release);
                }
            }
            for member in &r.members {
                let n = fake.deliveries.fetch_add(1, Ordering::Relaxed) + 1;
                match fake.fault {
                    Fault::DropEvery(k) if n.is_multiple_of(k) => continue,
                    Fault::DupEvery(k) if n.is_multiple_of(k) => {
                        let _ = member.send(msg.clone());
                    }
                    _ => {}
                }
                let _ = member.send(msg.clone());
            }
            json!({"type": "ack", "id": m["id"], "room": room, "seq": r.seq})
        }
        _ => json!({"type": "error", "code": "bad_request", "message": "unknown type"}),
    }
}

fn run_chat(args: &[&str]) -> chat::ChatReport {
    let mut argv = vec!["loadgen", "chat"];
    argv.extend_from_slice(args);
    let Plan::Chat(p) = Cli::try_parse_from(argv)
        .unwrap()
        .command
        .validate()
        .unwrap()
    else {
        panic!("not chat")
    };
    chat::execute(Arc::new(p), Arc::new(AtomicBool::new(false))).unwrap()
}

#[test]
fn clean_server_clean_run() {
    let url = format!("ws://127.0.0.1:{}/ws", fake_chat(Fault::None, None));
    for mode in [&["--rate", "400"][..], &["--window", "4"][..]] {
        let mut args = vec!["--url", &url, "--rooms", "3", "--members", "5"];
        args.extend_from_slice(&["--publishers", "2", "--duration-s", "0.4"]);
        args.extend_from_slice(&["--threads", "2", "--room-prefix", "clean"]);
        args.extend_from_slice(mode);
        let r = run_chat(&args);
        let c = &r.counts;
        assert!(r.is_clean(), "{mode:?}: {c:?} {:?}", r.first_error);
        assert_eq!(c.joined, 15);
        assert!(c.acked > 0 && c.acked == c.published, "{c:?}");
        // Every member of a room gets every acked publish of that room.
        assert_eq!(r.expected_deliveries, c.acked * 5);
        assert_eq!(c.received, r.expected_deliveries);
        assert!(r.deliveries() > 0);
        assert_eq!(c.unclean_closes, 0);
    }
}

#[test]
fn tokens_name_the_users() {
    let secret = b"0123456789abcdef0123456789abcdef";
    let url = format!("ws://127.0.0.1:{}/ws", fake_chat(Fault::None, Some(secret)));
    let base = ["--url", &url, "--rooms", "1", "--members", "2"];
    let mut args = base.to_vec();
    args.extend_from_slice(&[
        "--duration-s",
        "0.2",
        "--jwt-secret",
        "0123456789abcdef0123456789abcdef",
    ]);
    let r = run_chat(&args);
    assert!(r.is_clean(), "{:?} {:?}", r.counts, r.first_error);

    // Without a token the server refuses: the hint names the fix.
    let mut args = base.to_vec();
    args.extend_from_slice(&["--duration-s", "0.2"]);
    let r = run_chat(&args);
    assert_eq!(r.counts.connect_failures, 2);
    let e = r.first_connect_error.unwrap();
    assert!(e.contains("code 4001") && e.contains("--jwt-secret"), "{e}");
}

#[test]
fn dropped_deliveries_are_gaps_and_losses() {
    let url = format!("ws://127.0.0.1:{}/ws", fake_chat(Fault::DropEvery(7), None));
    let r = run_chat(&[
        "--url",
        &url,
        "--rooms",
        "2",
        "--members",
        "4",
        "--rate",
        "200",
        "--duration-s",
        "0.3",
        "--drain-timeout-ms",
        "300",
    ]);
    let c = &r.counts;
    assert!(!r.is_clean());
    assert!(c.gaps > 0 && c.lost >= c.gaps, "{c:?}");
    assert_eq!(c.received + c.lost, r.expected_deliveries, "{c:?}");
    assert_eq!((c.duplicates, c.reorders, c.errors), (0, 0, 0), "{c:?}");
}

#[test]
fn duplicated_deliveries_are_counted() {
    let url = format!("ws://127.0.0.1:{}/ws", fake_chat(Fault::DupEvery(5), None));
    let r = run_chat(&[
        "--url",
        &url,
        "--rooms",
        "2",
        "--members",
        "4",
        "--rate",
        "200",
        "--duration-s",
        "0.3",
    ]);
    let c = &r.counts;
    assert!(!r.is_clean());
    assert!(c.duplicates > 0, "{c:?}");
    assert_eq!((c.gaps, c.lost, c.reorders), (0, 0, 0), "{c:?}");
}

/// Two nodes; node 1 dies a fifth into the run. Its members (connections
/// 1, 3, 5, 7) are dropped with 1001.
fn kill_run(resumable: bool, reconnect: bool) -> chat::ChatReport {
    let ports = fake_cluster(
        Fault::KillNode {
            after: 25,
            resumable,
        },
        None,
        2,
    );
    let urls = format!(
        "ws://127.0.0.1:{}/ws,ws://127.0.0.1:{}/ws",
        ports[0], ports[1]
    );
    let mut args = vec!["--url", &urls, "--rooms", "2", "--members", "4"];
    args.extend_from_slice(&["--publishers", "2", "--rate", "200", "--duration-s", "0.6"]);
    args.extend_from_slice(&["--drain-timeout-ms", "1000"]);
    if reconnect {
        args.extend_from_slice(&["--reconnect", "--reconnect-timeout-s", "3"]);
    }
    run_chat(&args)
}

#[test]
fn members_of_a_killed_node_resume_elsewhere() {
    let r = kill_run(true, true);
    let c = &r.counts;
    assert!(r.is_clean(), "{c:?} {:?}", r.first_error);
    assert_eq!(
        (c.joined, c.reconnects, c.resume_failures),
        (8, 4, 0),
        "{c:?}"
    );
    assert_eq!(
        (c.gaps, c.lost, c.duplicates, c.reorders),
        (0, 0, 0, 0),
        "{c:?}"
    );
    assert_eq!(c.unexpected_closes, 0, "{c:?}");
    assert!(c.acked > 25, "publishers went on after the resume: {c:?}");
    // Every member holds every acked seq; publishes in flight at the kill
    // may have been sequenced too.
    assert!(c.received >= r.expected_deliveries, "{c:?}");
    assert!(c.unacked_on_drop <= c.unacked, "{c:?}");

    // Without --reconnect the same kill fails the run.
    let r = kill_run(true, false);
    let c = &r.counts;
    assert!(!r.is_clean());
    assert_eq!((c.unexpected_closes, c.reconnects), (4, 0), "{c:?}");
}

#[test]
fn failed_resumes_fail_the_run_without_counting_twice() {
    let r = kill_run(false, true);
    let c = &r.counts;
    assert!(!r.is_clean());
    assert_eq!((c.reconnects, c.resume_failures), (4, 4), "{c:?}");
    // The replay a recovered:false still brings is passed over, and what
    // the members missed is the resume failures', not lost.
    assert_eq!(
        (c.gaps, c.lost, c.duplicates, c.reorders),
        (0, 0, 0, 0),
        "{c:?}"
    );
    assert_eq!(c.unexpected_closes, 0, "{c:?}");
    let e = r.first_error.unwrap();
    assert!(e.contains("recovered:false"), "{e}");
}
