//! A gateway at its open-file limit keeps serving the connections it has.
//! The gateway runs as its own process under a low `ulimit -n`, so the limit
//! does not touch the test process.

mod common;

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{cluster::free_port, eventually, http, raw_frame, raw_ws, read_raw_frame};

const KEY: Option<[u8; 4]> = Some([3, 1, 4, 1]);

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, _, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

fn echo(ws: &mut TcpStream, n: u32) {
    ws.write_all(&raw_frame(0x82, &n.to_be_bytes(), KEY))
        .unwrap();
    let frame = read_raw_frame(ws).unwrap_or_else(|e| panic!("echo {n} at the file limit: {e}"));
    assert_eq!(frame, (0x82, n.to_be_bytes().to_vec()));
}

#[test]
fn at_the_file_limit_open_connections_keep_echoing() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::env::var("RUST_LOG").is_ok();
    // Two shards, so one shard's accepts can take the descriptor another
    // shard's wait for socket events needs; raw connections stay in their
    // HTTP phase (and keep their descriptors) for the whole test.
    let _gateway = Gateway(
        Command::new("sh")
            .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", &addr.to_string(), "--shards", "2"])
            .args(["--handshake-timeout-ms", "60000"])
            .stdout(Stdio::null())
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("sh runs the gateway"),
    );
    assert!(
        eventually(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()),
        "the gateway never listened on {addr}"
    );
    // Clients on both shards (the kernel spreads them), echoing all along:
    // the limit is reached while every shard is busy, when one shard's
    // accepts can take the descriptor another shard's next wait needs.
    let clients: Vec<TcpStream> = (0..8)
        .map(|_| {
            let ws = raw_ws(addr);
            ws.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            ws
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let echoing = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut clients = clients;
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for ws in &mut clients {
                    echo(ws, n);
                    n += 1;
                }
            }
            clients
        })
    };

    // More connections than descriptors: the gateway accepts until accept
    // fails, the rest wait in the backlog.
    let mut flood = Vec::new();
    for _ in 0..400 {
        match TcpStream::connect(addr) {
            Ok(s) => flood.push(s),
            Err(_) => break,
        }
    }
    // (No /metrics request now: it would wait in the backlog too.)
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut clients = echoing
        .join()
        .expect("every echo came back during the flood");
    // At the limit, every shard still serves the connections it has.
    for i in 0..50u32 {
        for ws in &mut clients {
            echo(ws, i);
        }
    }
    drop(flood);
    assert!(
        eventually(Duration::from_secs(5), || metric(
            addr,
            "corecast_accept_errors_total"
        ) > 0),
        "the gateway never reached its file limit"
    );
}
