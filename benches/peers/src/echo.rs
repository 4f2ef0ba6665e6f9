//! tokio-tungstenite echo server: the peer corecast's `/echo` is measured against.
//!
//! Configured as a careful user would deploy it, so the comparison is against
//! tokio-tungstenite at its best and not against its defaults:
//! - TCP_NODELAY on every accepted socket (small echoes must not wait for Nagle).
//! - A 4 KiB read buffer instead of the 128 KiB default, so a connection costs
//!   about what a gateway connection costs; a 4 KiB write threshold, and a
//!   write buffer cap that bounds a slow reader's backlog.
//! - Echoes are fed (not sent) and flushed once per batch of messages already
//!   read, so a pipelining client gets one write per batch, not one per message.
//! - Text and binary messages are echoed; tungstenite answers pings and closes
//!   itself (the reply is flushed on the next read or flush).
//!
//! Runtime: tokio's multi-thread scheduler with `--threads` workers (default:
//! one per available CPU). For the side-by-side benchmark
//! (`benches/echo-vs-peer.sh`) the whole process is pinned to one core with
//! `taskset -c 0` and runs `--threads 1`, matching corecast's `--shards 1
//! --cpus 0`: same core, same single event loop. The accept loop runs as a
//! task on that worker; the main thread only waits for a signal.
//! `--current-thread` runs tokio's single-threaded scheduler instead, to check
//! that the multi-thread scheduler is not what makes the peer slower.
//!
//! `--tls-cert` and `--tls-key` serve `wss://` with tokio-rustls (rustls
//! and its *ring* provider, as the gateway; the same cipher-suite order:
//! AES-128-GCM first, the server's order wins), for the wss:// side by side.
//!
//! SIGTERM or SIGINT exits at once with status 0 (no drain: a benchmark peer
//! has nothing to hand over).

#![forbid(unsafe_code)]

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tls::Stream;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

mod tls;
use tokio_tungstenite::{
    tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame, WebSocketConfig},
        Error as WsError, Message,
    },
    WebSocketStream,
};

/// Largest message (and frame) accepted: 16 MiB, tungstenite's own frame
/// limit and the largest message Autobahn's case 9 sends. Guards memory
/// against a client that announces a huge message. (corecast defaults to
/// 1 MiB; a limit is checked once per frame header, so it does not change the
/// cost of the small echoes benchmarked.)
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Read buffer per connection: 4 KiB. tungstenite's 128 KiB default is tuned
/// for bulk transfer and would cost 32x the memory per idle connection.
const READ_BUFFER_BYTES: usize = 4096;

/// Buffered output before tungstenite writes to the socket without a flush:
/// 4 KiB. Every batch is flushed anyway; this only caps how much one batch
/// collects before the first write.
const WRITE_BUFFER_BYTES: usize = 4096;

/// Most output one connection may buffer: the threshold, one maximal echo,
/// and slack for its header and a queued pong or close. tungstenite requires it above `WRITE_BUFFER_BYTES` plus one
/// message; past it a write fails (`WriteBufferFull`) instead of growing
/// memory without bound for a client that never reads.
const MAX_WRITE_BUFFER_BYTES: usize = MAX_MESSAGE_BYTES + 2 * WRITE_BUFFER_BYTES;

/// How long the close frame after a protocol error may take to go out.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// tokio-tungstenite echo server, the peer for corecast's side-by-side benchmarks.
#[derive(Parser, Debug)]
#[command(name = "tokio-tungstenite-echo", version)]
struct Config {
    /// Address to listen on; port 0 picks a free port (printed on stderr).
    #[arg(long, env = "PEER_LISTEN", default_value = "127.0.0.1:9002")]
    listen: SocketAddr,

    /// Worker threads of the multi-thread runtime. Default: available CPUs
    /// (as tokio would pick; honours taskset).
    #[arg(long, env = "PEER_THREADS")]
    threads: Option<usize>,

    /// Use tokio's current-thread scheduler (one thread in all) instead of
    /// the multi-thread one; --threads must then be absent.
    #[arg(long, env = "PEER_CURRENT_THREAD", conflicts_with = "threads")]
    current_thread: bool,

    #[command(flatten)]
    tls: tls::TlsArgs,
}

fn main() -> ExitCode {
    let config = Config::parse();
    let mut builder = if config.current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let threads = match config.threads {
            Some(0) => {
                eprintln!("--threads 0: give at least 1 worker thread");
                return ExitCode::from(2);
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match config.tls.acceptor() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(serve(config.listen, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Accepts until SIGTERM or SIGINT.
async fn serve(listen: SocketAddr, tls: Option<TlsAcceptor>) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};

    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e} (is another server running? pass --listen)"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("local address of {listen}: {e}"))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    eprintln!("tokio-tungstenite-echo listening on {local}");

    // On the multi-thread runtime `block_on` runs this future on the main
    // thread, not on a worker: spawn the accept loop so accepting shares the
    // worker (and its core) with the connections, as in corecast's shard.
    let accept = tokio::spawn(accept_loop(listener, tls));
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = accept => return Err(match r {
            Ok(e) => e,
            Err(e) => format!("accept loop: {e}"),
        }),
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>) -> String {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls::accept(stream, tls.as_ref()).await {
                        Ok(stream) => connection(stream, config).await,
                        Err(e) if tls.is_none() => eprintln!("TCP_NODELAY: {e}"),
                        // A failed TLS handshake is the client's problem.
                        Err(_) => {}
                    }
                });
            }
            // Out of descriptors or memory, or the peer left before accept:
            // all transient for a listener; back off briefly, keep accepting.
            Err(e) if is_transient_accept_error(&e) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => return format!("accept: {e}"),
        }
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux: out of descriptors or memory
    // for now, not for good.
    const RESOURCE_ERRNOS: [i32; 4] = [24, 23, 105, 12];
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e
        .raw_os_error()
        .is_some_and(|n| RESOURCE_ERRNOS.contains(&n))
}

async fn connection(stream: Stream, config: WebSocketConfig) {
    let mut ws = match tokio_tungstenite::accept_async_with_config(stream, Some(config)).await {
        Ok(ws) => ws,
        // A bad upgrade request is the client's problem; nothing to report.
        Err(_) => return,
    };
    let code = match echo(&mut ws).await {
        Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return,
        Err(WsError::Protocol(_)) => CloseCode::Protocol,
        Err(WsError::Utf8(_)) => CloseCode::Invalid,
        Err(WsError::Capacity(_)) => CloseCode::Size,
        Err(WsError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            return
        }
        Err(e) => {
            eprintln!("connection: {e}");
            return;
        }
    };
    // Tell the client which rule it broke (RFC 6455 §7.4.1) instead of just
    // dropping TCP; best effort, bounded so a client that stopped reading
    // cannot hold the task.
    let frame = CloseFrame {
        code,
        reason: "".into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await;
}

/// Echoes data messages until the client closes. Messages already readable
/// are fed as a batch and flushed once; a message that would block ends the
/// batch. tokio's cooperative budget ends a batch too, so one busy
/// connection cannot starve the others on the worker.
async fn echo(ws: &mut WebSocketStream<Stream>) -> Result<(), WsError> {
    while let Some(msg) = ws.next().await {
        feed_echo(ws, msg?).await?;
        while let Some(next) = ws.next().now_or_never() {
            match next {
                Some(msg) => feed_echo(ws, msg?).await?,
                None => break,
            }
        }
        ws.flush().await?;
    }
    Ok(())
}

async fn feed_echo(ws: &mut WebSocketStream<Stream>, msg: Message) -> Result<(), WsError> {
    match msg {
        Message::Text(_) | Message::Binary(_) => ws.feed(msg).await,
        // Pongs and closes are queued by tungstenite itself; a peer's pong
        // needs no answer; raw frames are never returned by a read.
        Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => Ok(()),
    }
}
