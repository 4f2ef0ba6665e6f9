//! Test harness: a real gateway in-process on 127.0.0.1:0, plus raw-socket
//! helpers for the cases an RFC-abiding client library refuses to produce.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub mod api;
pub mod chat;
pub mod cluster;
pub mod redis;

use clap::Parser;
use corecast_gateway::{shutdown, Config, Error, Server};

pub struct TestServer {
    pub addr: SocketAddr,
    /// The server API's address, with `--api-listen`.
    pub api: Option<SocketAddr>,
    trigger: shutdown::Trigger,
    handle: Option<JoinHandle<Result<(), Error>>>,
}

impl TestServer {
    /// Starts a gateway with the given extra flags.
    pub fn start(args: &[&str]) -> TestServer {
        TestServer::start_bound(bind(args))
    }

    /// Runs a server that is already bound (with a fault injected, say).
    pub fn start_bound(server: Server) -> TestServer {
        let addr = server.local_addr();
        let api = server.api_addr();
        let (trigger, fired) = shutdown::channel();
        let handle = std::thread::spawn(move || server.run(fired));
        TestServer {
            addr,
            api,
            trigger,
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Fires shutdown and waits for `run` to return.
    pub fn stop(mut self) -> Result<(), Error> {
        self.trigger.fire();
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("server thread panicked")
    }

    /// Fires shutdown (as SIGTERM does) without waiting.
    pub fn begin_stop(&self) {
        self.trigger.fire();
    }

    /// Waits up to `within` for `run` to return; None if it has not.
    pub fn join_within(&mut self, within: Duration) -> Option<Result<(), Error>> {
        let end = Instant::now() + within;
        while !self.handle.as_ref()?.is_finished() {
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(self.handle.take()?.join().expect("server thread panicked"))
    }

    /// Reads one sample from /metrics, summed over shards.
    pub fn metric(&self, name: &str, labels: &str) -> u64 {
        let (_, _, body) = http(self.addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        body.lines()
            .filter(|l| {
                (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                    && l.contains(labels)
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// Per-shard values of one metric.
    pub fn metric_per_shard(&self, name: &str) -> Vec<u64> {
        let (_, _, body) = http(self.addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{shard=")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .collect()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.trigger.fire();
        // A server that cannot stop (the test failed) is left behind rather
        // than hanging the test binary.
        let _ = self.join_within(Duration::from_secs(30));
    }
}

/// Parses the flags and binds a gateway on 127.0.0.1:0 (not running yet).
pub fn bind(args: &[&str]) -> Server {
    // RUST_LOG=info shows the gateway's log when a test is run by hand.
    let _ = env_logger::try_init();
    let mut argv = vec!["gateway", "--listen", "127.0.0.1:0"];
    argv.extend_from_slice(args);
    let config = Config::try_parse_from(argv).expect("valid test flags");
    Server::bind(config).expect("bind")
}

pub type Client = tungstenite::WebSocket<TcpStream>;

/// A tungstenite client, the independent reading of the RFC.
pub fn connect(server: &TestServer, path: &str) -> Client {
    let stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (ws, resp) = tungstenite::client(server.url(path), stream).expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends a raw HTTP request and reads the whole response (the server closes).
pub fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    split_response(&resp)
}

pub fn split_response(resp: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(resp).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_string(), body.to_string())
}

pub const UPGRADE: &str = "GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// A raw socket past the upgrade, for frames no client library would send.
pub fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(UPGRADE.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    s
}

/// Encodes a client frame by hand: masked unless `mask` is None.
pub fn raw_frame(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![b0];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Reads one (unmasked) server frame: (first byte, payload).
pub fn read_raw_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    assert_eq!(h[1] & 0x80, 0, "server frames are never masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0; len];
    s.read_exact(&mut payload)?;
    Ok((h[0], payload))
}

/// Reads frames until a close frame; returns its code (None if empty).
pub fn read_close(s: &mut TcpStream) -> Option<u16> {
    loop {
        let (b0, payload) = read_raw_frame(s).expect("a close frame");
        if b0 & 0x0f == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

/// After a close, the server must close TCP: read returns 0 (or a reset).
pub fn assert_closed(s: &mut TcpStream) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Why a gateway with these flags refuses to start.
pub fn refusal(args: &[&str]) -> String {
    let mut argv = vec!["gateway", "--listen", "127.0.0.1:0"];
    argv.extend_from_slice(args);
    let config = Config::try_parse_from(argv).expect("flags parse");
    Server::bind(config).err().expect("refused").to_string()
}

/// Polls `f` until it returns true or `within` passes.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// The gateway binary as a child process (`RUST_LOG=info`), its log read
/// line by line, for the tests that need signals or the real start-up.
pub struct Logged {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Logged {
    pub fn spawn(args: &[&str]) -> Logged {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the gateway binary starts");
        let (tx, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        Logged { child, lines }
    }

    /// The next log line containing `what` (the ones before it are skipped).
    pub fn wait_for(&self, what: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => continue,
                Err(e) => panic!("no log line with {what:?}: {e}"),
            }
        }
    }

    /// Sends a signal, as `kill -SIG` does (`"HUP"`, `"TERM"`).
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig}");
    }

    /// SIGTERM, then whether the gateway exited 0.
    pub fn stop(mut self) -> bool {
        self.signal("TERM");
        self.child.wait().unwrap().success()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
