//! The node registry in Redis: how nodes find each other without a static
//! peer list, and join or leave without a restart of the others.
//!
//! Every heartbeat interval this thread writes `cc:node:<id>` = the node's
//! mesh endpoint with a TTL of one node timeout, adds the id to the set
//! `cc:nodes`, and reads every listed node's endpoint back (ids whose key
//! expired are removed from the set). The list goes to the mesh thread,
//! which connects to new endpoints. Liveness itself comes from the mesh's
//! heartbeats, not from Redis: the registry only says where to look.
//! Redis being down only stops discovery; known peers stay connected.
//!
//! # Invariants
//! - Every Redis call has a 500 ms timeout, and the thread talks to the
//!   mesh thread only through a bounded channel it never blocks on.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;

use super::{Mesh, MeshConfig};

const NODES_KEY: &str = "cc:nodes";

fn node_key(id: &str) -> String {
    format!("cc:node:{id}")
}

pub(super) struct Registry {
    url: String,
    node_id: Arc<str>,
    advertise: String,
    every: Duration,
    ttl: Duration,
    tx: Sender<Vec<(String, String)>>,
    mesh: Mesh,
    stop: Arc<AtomicBool>,
}

impl Registry {
    pub(super) fn new(
        config: &MeshConfig,
        url: String,
        tx: Sender<Vec<(String, String)>>,
        mesh: Mesh,
        stop: Arc<AtomicBool>,
    ) -> Registry {
        Registry {
            url,
            node_id: config.node_id.clone(),
            advertise: config.advertise.clone(),
            every: config.heartbeat,
            ttl: config.node_timeout,
            tx,
            mesh,
            stop,
        }
    }

    pub(super) fn run(self) {
        let mut conn: Option<redis::Connection> = None;
        let mut failing = false;
        while !self.stop.load(Relaxed) {
            let started = Instant::now();
            match self.round(&mut conn) {
                Ok(list) => {
                    if failing {
                        log::info!("mesh registry: Redis answers again");
                        failing = false;
                    }
                    if self.tx.try_send(list).is_ok() {
                        self.mesh.wake();
                    }
                }
                Err(e) => {
                    conn = None;
                    if !failing {
                        log::warn!("mesh registry: {e}; known peers stay connected, new ones are not discovered until Redis answers");
                        failing = true;
                    }
                }
            }
            let pause = self.every.saturating_sub(started.elapsed());
            let until = Instant::now() + pause;
            while !self.stop.load(Relaxed) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20).min(pause));
            }
        }
        // Leave the registry at once rather than after the TTL.
        if let Ok(mut c) = self.connect() {
            let _: Result<(), _> = redis::pipe()
                .del(node_key(&self.node_id))
                .srem(NODES_KEY, &*self.node_id)
                .query(&mut c);
        }
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let timeout = Duration::from_millis(500);
        let client = redis::Client::open(self.url.as_str())?;
        let c = client.get_connection_with_timeout(timeout)?;
        c.set_read_timeout(Some(timeout))?;
        c.set_write_timeout(Some(timeout))?;
        Ok(c)
    }

    /// Registers this node and reads the others.
    fn round(
        &self,
        conn: &mut Option<redis::Connection>,
    ) -> redis::RedisResult<Vec<(String, String)>> {
        if conn.is_none() {
            *conn = Some(self.connect()?);
        }
        let c = conn.as_mut().expect("connected above");
        let ttl_ms = self.ttl.as_millis().max(1) as u64;
        let (ids,): (Vec<String>,) = redis::pipe()
            .cmd("SET")
            .arg(node_key(&self.node_id))
            .arg(&self.advertise)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .sadd(NODES_KEY, &*self.node_id)
            .ignore()
            .smembers(NODES_KEY)
            .query(c)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| node_key(id)).collect();
        let addrs: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(c)?;
        let mut list = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        for (id, addr) in ids.into_iter().zip(addrs) {
            match addr {
                Some(a) => list.push((id, a)),
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _: () = redis::cmd("SREM").arg(NODES_KEY).arg(&gone).query(c)?;
        }
        Ok(list)
    }
}
