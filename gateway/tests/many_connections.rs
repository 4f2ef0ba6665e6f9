//! Many concurrent connections over several shards, and every file
//! descriptor given back. Its own test binary: it counts this process's
//! open files, which other tests running in parallel would disturb.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use common::*;

const KEY: Option<[u8; 4]> = Some([9, 8, 7, 6]);

#[test]
fn two_thousand_connections_over_four_shards_then_fds_return_to_baseline() {
    let baseline = open_fds();
    let server = TestServer::start(&["--shards", "4"]);
    // Each shard opens its io_uring rings and event fds as it starts.
    std::thread::sleep(Duration::from_millis(300));
    let with_server = open_fds();
    let mut clients = Vec::new();
    for _ in 0..2000 {
        let s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        clients.push(s);
    }
    // Upgrade all, then echo on all, interleaved, to keep them concurrent.
    for s in &mut clients {
        s.write_all(UPGRADE.as_bytes()).unwrap();
    }
    for s in &mut clients {
        let mut head = Vec::new();
        let mut b = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
    }
    assert_eq!(server.metric("corecast_websockets", ""), 2000);
    // Every connection is upgraded and idle now, and holds no I/O buffer (the gauge is
    // refreshed every sweeper tick; the /metrics request asking may hold
    // its own two while it is served).
    let lent = || server.metric("corecast_io_buffers_lent", "");
    assert!(
        eventually(Duration::from_secs(5), || lent() <= 2),
        "2000 idle connections hold {} I/O buffers after the upgrade",
        lent()
    );
    for (i, s) in clients.iter_mut().enumerate() {
        s.write_all(&raw_frame(0x82, &(i as u32).to_be_bytes(), KEY))
            .unwrap();
    }
    for (i, s) in clients.iter_mut().enumerate() {
        assert_eq!(
            read_raw_frame(s).unwrap(),
            (0x82, (i as u32).to_be_bytes().to_vec()),
            "client {i}"
        );
    }
    let per_shard = server.metric_per_shard("corecast_connections_accepted_total");
    assert_eq!(per_shard.len(), 4);
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "every shard got connections: {per_shard:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || lent() <= 2),
        "2000 idle connections hold {} I/O buffers after an echo",
        lent()
    );
    for s in &mut clients {
        s.write_all(&raw_frame(0x88, &1000u16.to_be_bytes(), KEY))
            .unwrap();
    }
    for s in &mut clients {
        assert_eq!(read_close(s), Some(1000));
    }
    drop(clients);
    assert!(
        eventually(Duration::from_secs(10), || open_fds() <= with_server),
        "fds: baseline {baseline}, with server {with_server}, now {}",
        open_fds()
    );
    // The only connection left is the /metrics request asking.
    assert_eq!(server.metric("corecast_connections", ""), 1);
    server.stop().unwrap();
    // After the executors are gone, glommio 0.9 still holds one eventfd per
    // executor it ever started (its global sleep-notifier table) plus one
    // process-wide eventfd it creates lazily for channels whose peer is gone
    // (the cross-shard meshes use it); every socket and ring is closed.
    let glommio_globals = 4 + 1;
    let settled = eventually(Duration::from_secs(5), || {
        open_fds() <= baseline + glommio_globals
    });
    let left: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        settled,
        "fds after stop: {} > {baseline} + {glommio_globals}: {left:?}",
        open_fds()
    );
}
