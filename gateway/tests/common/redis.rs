//! A private redis-server per test, on a free loopback port, with its data
//! in a temporary directory (append-only file fsynced on every write, so a
//! SIGKILL loses nothing Redis acknowledged).

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("corecast-test-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = RedisServer {
            port,
            dir,
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A scratch directory next to the data (e.g. for a spill dir).
    pub fn scratch(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Starts redis-server (again) on the same port and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.display().to_string()])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            // The tests stall Redis with DEBUG SLEEP.
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: run scripts/test.sh (it installs it) or apt-get install redis-server",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.client() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes Redis answer nothing for `secs`; returns once Redis has
    /// stopped answering, with a handle that ends when it answers again.
    /// Raw RESP over TCP: a client library would wait for the answer.
    pub fn stall(&self, secs: f64) -> std::thread::JoinHandle<()> {
        use std::io::{Read, Write};
        let addr = ("127.0.0.1", self.port);
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let arg = secs.to_string();
        write!(
            s,
            "*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n${}\r\n{arg}\r\n",
            arg.len()
        )
        .unwrap();
        // Asleep once a PING goes unanswered.
        loop {
            let mut p = std::net::TcpStream::connect(addr).unwrap();
            p.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            p.write_all(b"PING\r\n").unwrap();
            let mut buf = [0u8; 16];
            match p.read(&mut buf) {
                Ok(n) if n > 0 => std::thread::sleep(Duration::from_millis(2)),
                _ => break,
            }
        }
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"+OK"), "DEBUG SLEEP: {:?}", &buf[..n]);
        })
    }

    /// SIGKILL by pid, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn client(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// The seqs in a room's stream, in stream order.
    pub fn stream_seqs(&self, room: &str) -> Vec<u64> {
        let mut c = self.client().unwrap();
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(format!("cc:{{{room}}}:s"))
            .arg("-")
            .arg("+")
            .query(&mut c)
            .unwrap();
        entries
            .iter()
            .map(|(id, _)| id.split('-').next().unwrap().parse().unwrap())
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
