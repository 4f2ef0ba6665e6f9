//! Gateway nodes as separate processes (the gateway binary), so a test can
//! kill one by pid, wired into one cluster on loopback.

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{chat::SECRET, eventually, http};

/// A port for a child process to listen on. Taken below Linux's ephemeral
/// range (32768 and up): a port the kernel handed out and we released could
/// become the source port of any outgoing connection (a node's mesh or
/// Redis link) before the child binds it. Each test process walks its own
/// stretch of the range, one port per call, skipping ports in use.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 100) as u16 * 120;
    for _ in 0..120 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 120;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{base}..{}", base + 120)
}

pub struct Node {
    pub id: String,
    pub addr: SocketAddr,
    pub mesh: String,
    child: Option<Child>,
}

impl Node {
    /// Starts `gateway` as node `id` with its mesh on `mesh` and `extra`
    /// flags (peers, Redis, ...). Its log goes to the test's stderr when
    /// RUST_LOG is set.
    pub fn start(id: &str, mesh: &str, extra: &[&str]) -> Node {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::env::var("RUST_LOG").is_ok();
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", &addr.to_string(), "--shards", "2"])
            .args(["--jwt-secret", SECRET, "--node-id", id, "--mesh-bind", mesh])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("the gateway binary runs");
        let node = Node {
            id: id.into(),
            addr,
            mesh: mesh.into(),
            child: Some(child),
        };
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
                addr
            )
            .is_ok()),
            "node {id} never listened on {addr}"
        );
        node
    }

    /// One sample from /metrics, summed over series.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, _, body) = http(self.addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM, so the node leaves the registry, then wait.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            if !eventually(Duration::from_secs(5), || {
                matches!(c.try_wait(), Ok(Some(_)))
            }) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Mesh endpoints for `n` nodes on free ports.
pub fn mesh_endpoints(n: usize) -> Vec<String> {
    (0..n)
        .map(|_| format!("tcp://127.0.0.1:{}", free_port()))
        .collect()
}

/// Waits until every node counts `nodes.len()` live nodes.
pub fn wait_for_cluster(nodes: &[&Node]) {
    let n = nodes.len() as u64;
    for node in nodes {
        assert!(
            eventually(Duration::from_secs(15), || node
                .metric("corecast_mesh_live_nodes")
                == n),
            "node {} never saw {n} live nodes",
            node.id
        );
    }
}
