//! Messages per second the storage worker persists to Redis, at several
//! batch sizes: the worker alone, fed as fast as its queue takes messages,
//! each message counted once its ack (stored:true) comes back.
//!
//! Usage: storage-throughput --redis redis://127.0.0.1:6379/ [--messages N]
//!        [--batches 1,16,128,512] [--rooms N] [--body-bytes N]
//!
//! Prints one line per batch size and one JSON line per run on stdout.

use std::{
    future::poll_fn,
    sync::atomic::Ordering::Relaxed,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use corecast_gateway::{
    storage::ConnRef,
    storage::{self, Op, Record, Reply, StorageConfig, StoreKind},
};

struct Args {
    redis: String,
    messages: u64,
    batches: Vec<usize>,
    rooms: usize,
    body_bytes: usize,
}

fn usage(msg: &str) -> ! {
    eprintln!("storage-throughput: {msg}\nusage: storage-throughput --redis URL [--messages N] [--batches 1,16,128,512] [--rooms N] [--body-bytes N]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        redis: String::new(),
        messages: 200_000,
        batches: vec![1, 16, 128, 512],
        rooms: 10,
        body_bytes: 128,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let num = |v: String| {
            v.parse::<u64>()
                .unwrap_or_else(|_| usage(&format!("bad number {v:?}")))
        };
        match flag.as_str() {
            "--redis" => a.redis = value(),
            "--messages" => a.messages = num(value()),
            "--rooms" => a.rooms = num(value()).max(1) as usize,
            "--body-bytes" => a.body_bytes = num(value()) as usize,
            "--batches" => {
                a.batches = value()
                    .split(',')
                    .map(|b| num(b.to_string()).max(1) as usize)
                    .collect()
            }
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown flag {other}")),
        }
    }
    if a.redis.is_empty() {
        usage("--redis is required");
    }
    a
}

/// Counts the acks in a batch of replies: (acks, of which stored).
fn count(replies: Vec<Reply>) -> (u64, u64) {
    let mut acks = 0;
    let mut stored = 0;
    for r in replies {
        if let Reply::ToConn { frame, .. } = r {
            acks += 1;
            if frame.windows(13).any(|w| w == br#""stored":true"#) {
                stored += 1;
            }
        }
    }
    (acks, stored)
}

fn run(args: &Args, batch: usize) -> (f64, u64) {
    let spill = std::env::temp_dir().join(format!("corecast-storage-bench-{}", std::process::id()));
    let config = StorageConfig {
        kind: StoreKind::Redis {
            url: args.redis.clone(),
        },
        history_size: 1000,
        history_ttl: Duration::from_secs(600),
        namespaces: corecast_gateway::namespace::Namespaces::keeping(
            1000,
            Duration::from_secs(600),
        ),
        meta_ttl: Duration::from_secs(600),
        batch_max: batch,
        queue_per_shard: 16_384,
        spill_dir: spill.clone(),
        redis_timeout: Duration::from_secs(5),
        node_id: "bench".into(),
        presence_ttl: Duration::from_secs(30),
    };
    let (st, worker) = storage::start(&config, 1).unwrap_or_else(|e| usage(&e.to_string()));
    let rooms: Vec<Arc<str>> = (0..args.rooms)
        .map(|i| Arc::from(format!("bench-{}-{batch}-{i}", std::process::id())))
        .collect();
    let user: Arc<str> = Arc::from("bench");
    let epoch: Arc<str> = Arc::from(storage::new_epoch());
    let body = format!("\"{}\"", "x".repeat(args.body_bytes.saturating_sub(2)));
    let to = ConnRef {
        node: corecast_gateway::mesh::node_tag(&config.node_id),
        shard: 0,
        key: 0,
        gen: 0,
    };
    let mut noop = Context::from_waker(Waker::noop());
    let (mut sent, mut acked, mut stored) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while acked < args.messages {
        while sent < args.messages && st.has_room(0) {
            let room = &rooms[(sent % rooms.len() as u64) as usize];
            let record = Record {
                room: room.clone(),
                seq: sent / rooms.len() as u64 + 1,
                from: user.clone(),
                id: "".into(),
                ts: 0,
                body: body.as_str().into(),
                epoch: epoch.clone(),
            };
            st.send(
                0,
                Op::Append {
                    record,
                    ack_to: Some(to),
                    fanout: None,
                },
            );
            sent += 1;
        }
        let replies = match st.inbox(0).poll_recv(&mut noop) {
            Poll::Ready(r) => r,
            // Nothing yet: wait for the worker (a thread waker).
            Poll::Pending => {
                futures_lite::future::block_on(poll_fn(|cx| st.inbox(0).poll_recv(cx)))
            }
        };
        let (a, s) = count(replies);
        acked += a;
        stored += s;
    }
    let secs = start.elapsed().as_secs_f64();
    let spilled = st.metrics.spilled.load(Relaxed);
    worker.stop(&st);
    let _ = std::fs::remove_dir_all(&spill);
    if spilled > 0 || stored != acked {
        eprintln!("storage-throughput: Redis failed during the run ({spilled} spilled): the figure is not a Redis write rate");
        std::process::exit(1);
    }
    (args.messages as f64 / secs, stored)
}

fn main() {
    let args = parse_args();
    println!(
        "# {} messages of {} B over {} rooms to {}; acked when stored",
        args.messages, args.body_bytes, args.rooms, args.redis
    );
    for &batch in &args.batches {
        let (rate, stored) = run(&args, batch);
        println!("batch {batch:>5}: {rate:>10.0} msgs/s persisted ({stored} stored)");
        println!(
            "{{\"bench\":\"storage-throughput\",\"batch\":{batch},\"messages\":{},\"body_bytes\":{},\"rooms\":{},\"msgs_per_s\":{rate:.0}}}",
            args.messages, args.body_bytes, args.rooms
        );
    }
}
