//! Black-box runs of `loadgen echo` and `loadgen hold` against an
//! independent RFC 6455 server (tungstenite, a thread per connection) on
//! loopback port 0. Short and bounded; they check correctness (no errors,
//! clean closes), never timings.

use std::{
    io::Write as _,
    net::TcpListener,
    sync::{atomic::AtomicBool, Arc},
    thread,
};

use clap::Parser as _;
use corecast_loadgen::{echo, hold, Cli, Plan};

/// Starts an echo server; it lives as long as the test process.
fn tungstenite_echo() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(stream) else {
                    return;
                };
                loop {
                    match ws.read() {
                        Ok(m) if m.is_text() || m.is_binary() => {
                            if ws.send(m).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    port
}

/// Answers every request with a 404, like a server without the path.
fn not_found() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 8\r\nConnection: close\r\n\r\nno route",
            );
        }
    });
    port
}

fn plan(args: &[&str]) -> Plan {
    let mut argv = vec!["loadgen"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv)
        .unwrap()
        .command
        .validate()
        .unwrap()
}

fn run_echo(args: &[&str]) -> echo::EchoReport {
    let Plan::Echo(p) = plan(args) else {
        panic!("not echo")
    };
    echo::execute(Arc::new(p), Arc::new(AtomicBool::new(false))).unwrap()
}

#[test]
fn echo_closed_loop_binary_and_text() {
    let url = format!("ws://127.0.0.1:{}/echo", tungstenite_echo());
    for extra in [&["--binary"][..], &["--text", "--size", "300"][..]] {
        let mut args = vec!["echo", "--url", &url, "-c", "4", "--duration-s", "0.3"];
        args.extend_from_slice(&["--window", "4"]);
        args.extend_from_slice(extra);
        let r = run_echo(&args);
        assert!(
            r.is_clean(),
            "{extra:?}: {:?} {:?}",
            r.counts,
            r.first_error
        );
        assert!(r.messages() > 0);
        assert_eq!(r.counts.connected, 4);
        assert_eq!(r.counts.unclean_closes, 0);
    }
}

#[test]
fn echo_fixed_rate_over_two_threads() {
    let url = format!("ws://127.0.0.1:{}/", tungstenite_echo());
    let r = run_echo(&[
        "echo",
        "--url",
        &url,
        "-c",
        "6",
        "--threads",
        "2",
        "--rate",
        "600",
        "--duration-s",
        "0.5",
        "--warmup-s",
        "0.1",
        "--size",
        "70000",
    ]);
    assert!(r.is_clean(), "{:?} {:?}", r.counts, r.first_error);
    assert!(r.messages() > 0);
    // Only messages sent after the warm-up are recorded, at most the rate allows.
    assert!(r.counts.sent <= 306, "{}", r.counts.sent);
}

#[test]
fn echo_reports_refused_and_404() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("ws://127.0.0.1:{port}/echo");
    let r = run_echo(&["echo", "--url", &url, "-c", "2", "--duration-s", "0.1"]);
    assert_eq!(r.counts.connect_failures, 2);
    assert!(!r.is_clean());
    let e = r.first_connect_error.unwrap();
    assert!(
        e.contains("connection refused (is the gateway running?"),
        "{e}"
    );

    let url = format!("ws://127.0.0.1:{}/nope", not_found());
    let r = run_echo(&["echo", "--url", &url, "-c", "1", "--duration-s", "0.1"]);
    let e = r.first_connect_error.unwrap();
    assert!(e.contains("404 Not Found to GET /nope"), "{e}");
}

#[test]
fn hold_opens_and_closes_cleanly() {
    let url = format!("ws://127.0.0.1:{}/echo", tungstenite_echo());
    let Plan::Hold(p) = plan(&[
        "hold",
        "--url",
        &url,
        "-c",
        "40",
        "--hold-s",
        "0.2",
        "--sources",
        "127.0.0.1,127.0.0.2",
        "--threads",
        "2",
    ]) else {
        panic!("not hold")
    };
    let r = hold::execute(Arc::new(p), Arc::new(AtomicBool::new(false))).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.counts.opened, 40);
    assert_eq!(r.open_at_end(), 40);
    assert_eq!(r.counts.closed_cleanly, 40);
}
