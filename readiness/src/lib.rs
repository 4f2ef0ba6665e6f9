//! corecast readiness: socket readiness for one gateway shard or one
//! loadgen executor, as an edge-triggered epoll set that the executor's
//! glommio reactor waits on as one descriptor. The only I/O crate both
//! binaries share; it knows nothing of WebSocket or chat. [`cpus`] parses
//! the CPU lists both binaries pin their executors to.
//!
//! Why not glommio's own socket streams: glommio 0.9 arms a one-shot
//! io_uring poll on a socket every time a read finds it empty, and sets its
//! rings up without `IORING_SETUP_COOP_TASKRUN`. So every message that
//! arrives while the shard is busy interrupts it (a reschedule IPI, several
//! microseconds under a hypervisor) to run io_uring task work: measured at
//! 0.45 interrupts per echoed message. With an epoll set, an arrival only
//! links the socket into the set's ready list; the shard collects every
//! ready socket with one `epoll_wait` per turn, and glommio's ring holds a
//! single poll, on the epoll descriptor. glommio still runs the tasks, the
//! timers, the cross-shard rings and the inboxes.
//!
//! # Invariants
//! - Owned by one executor thread (a gateway shard, or one of loadgen's
//!   executors); `!Send`.
//! - Every socket is registered once, edge-triggered for input and output.
//!   Its owner keeps an [`Io`] pair of flags, set here when an edge arrives
//!   and cleared by [`Io::recv`] / [`Io::send`] when the kernel says the
//!   socket is drained or full. Owners read and write only through those
//!   two, and wait only while the flag is clear, so no edge is lost: one
//!   that arrives after the clear sets it again.
//! - Never blocks: `epoll_wait` is called with a zero timeout, only after
//!   glommio reported the set readable.
//! - Closing a socket removes it from the set (the kernel does, as long as
//!   nobody holds a duplicate of the descriptor). Tokens carry the
//!   connection's generation, so an event for a slab slot that was reused
//!   is ignored.
//!
//! # Layout
//! - this file: the set ([`Poller`]), a socket's flags ([`Io`]), the
//!   waiter a task parks on, tokens.
//! - `sys`: the few `epoll` and socket calls, the only `unsafe` code.
//! - [`cpus`]: CPU lists (`0-3,6`) and the CPUs this process may run on.

#![deny(unsafe_code)]

pub mod cpus;
mod sys;

use std::{
    cell::{Cell, RefCell},
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    task::Waker,
};

use rustix::{
    event::epoll,
    io::Errno,
    net::{RecvFlags, SendFlags},
};

/// Events collected per `epoll_wait`; a full batch is followed by another
/// right away, after the shard's other tasks had a turn.
const BATCH: usize = 256;

/// Token of the shard's listening socket; a second listener (a TLS port)
/// has `LISTENER - 1`, see [`listener_token`].
pub const LISTENER: u64 = u64::MAX;

/// Most listeners a shard may watch.
pub const MAX_LISTENERS: usize = 2;

/// The token of the shard's `i`-th listener.
pub fn listener_token(i: usize) -> u64 {
    debug_assert!(i < MAX_LISTENERS);
    LISTENER - i as u64
}

/// Which listener a token names, if it names one. (A connection's token
/// never does: its slab key would have to be near `u32::MAX`.)
pub fn listener_of(token: u64) -> Option<usize> {
    let i = LISTENER - token;
    (i < MAX_LISTENERS as u64).then_some(i as usize)
}

/// The token of a connection: its slab key and generation.
pub fn conn_token(key: usize, gen: u32) -> u64 {
    (u64::from(gen) << 32) | key as u64
}

/// Splits a connection token back into slab key and generation.
pub fn split_token(token: u64) -> (usize, u32) {
    ((token & 0xffff_ffff) as usize, (token >> 32) as u32)
}

/// What [`Io::peek`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peeked {
    /// The next byte of input.
    Byte(u8),
    /// No input yet.
    Nothing,
    /// The peer closed its side, or the socket failed: a `recv` says which.
    EndOrError,
}

/// What a socket's owner knows about its readiness.
#[derive(Debug)]
pub struct Io {
    /// Input (or end of stream, or an error) may be waiting.
    pub readable: Cell<bool>,
    /// The send buffer may have room.
    pub writable: Cell<bool>,
    /// The peer closed its side (or the socket failed): no edge will come
    /// after the one that said so, so reads go on until they return 0 or
    /// an error.
    hung_up: Cell<bool>,
}

impl Io {
    /// A socket that has not been tried yet: both worth a try.
    pub fn new() -> Io {
        Io {
            readable: Cell::new(true),
            writable: Cell::new(true),
            hung_up: Cell::new(false),
        }
    }

    /// One non-blocking `recv` into `into` (not empty), retried if a signal
    /// interrupts it. `EAGAIN` without a syscall while the flag is clear.
    /// A short read clears the flag (the socket is empty; its next edge
    /// says when there is more), except after a hang-up: data and the end
    /// of stream may have come under one edge, and the end of stream (a
    /// read of 0) is still to be read.
    pub fn recv(&self, fd: BorrowedFd<'_>, into: &mut [u8]) -> Result<usize, Errno> {
        if !self.readable.get() {
            return Err(Errno::AGAIN);
        }
        loop {
            match rustix::net::recv(fd, &mut *into, RecvFlags::DONTWAIT) {
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => {
                    self.readable.set(false);
                    return Err(Errno::AGAIN);
                }
                Ok((n, _)) => {
                    if n > 0 && n < into.len() && !self.hung_up.get() {
                        self.readable.set(false);
                    }
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Looks at the next byte of input, leaving it in the socket
    /// (`MSG_PEEK`). Nothing there yet clears the flag, as `recv` would.
    pub fn peek(&self, fd: BorrowedFd<'_>) -> Peeked {
        if !self.readable.get() {
            return Peeked::Nothing;
        }
        let mut byte = [0u8; 1];
        loop {
            match rustix::net::recv(fd, &mut byte, RecvFlags::DONTWAIT | RecvFlags::PEEK) {
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => {
                    self.readable.set(false);
                    return Peeked::Nothing;
                }
                Ok((1, _)) => return Peeked::Byte(byte[0]),
                Ok(_) | Err(_) => return Peeked::EndOrError,
            }
        }
    }

    /// One non-blocking `send`, retried if a signal interrupts it. `EAGAIN`
    /// without a syscall while the flag is clear; a full socket clears it.
    pub fn send(&self, fd: BorrowedFd<'_>, bytes: &[u8]) -> Result<usize, Errno> {
        if !self.writable.get() {
            return Err(Errno::AGAIN);
        }
        loop {
            match rustix::net::send(fd, bytes, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => {
                    self.writable.set(false);
                    return Err(Errno::AGAIN);
                }
                r => return r,
            }
        }
    }

    /// Records an event; true if the owner was waiting for it.
    pub fn set(&self, flags: epoll::EventFlags) -> bool {
        let broken = epoll::EventFlags::ERR | epoll::EventFlags::HUP;
        let mut news = false;
        if flags.intersects(epoll::EventFlags::RDHUP | broken) {
            self.hung_up.set(true);
        }
        if flags.intersects(epoll::EventFlags::IN | epoll::EventFlags::RDHUP | broken) {
            news |= !self.readable.replace(true);
        }
        if flags.intersects(epoll::EventFlags::OUT | broken) {
            news |= !self.writable.replace(true);
        }
        news
    }
}

impl Default for Io {
    fn default() -> Io {
        Io::new()
    }
}

/// A shard's epoll set.
pub struct Poller {
    epoll: OwnedFd,
    events: RefCell<Box<[MaybeUninit<epoll::Event>; BATCH]>>,
}

impl Poller {
    pub fn new() -> io::Result<Poller> {
        Ok(Poller {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            events: RefCell::new(Box::new([MaybeUninit::uninit(); BATCH])),
        })
    }

    /// Adds a non-blocking socket, edge-triggered for input and output.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let interest = epoll::EventFlags::IN
            | epoll::EventFlags::OUT
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::ET;
        epoll::add(&self.epoll, fd, epoll::EventData::new_u64(token), interest)?;
        Ok(())
    }

    /// Waits (through glommio's reactor) until some registered socket has
    /// an event to collect.
    pub async fn ready(&self) -> io::Result<()> {
        sys::readable(self.epoll.as_fd()).await
    }

    /// Collects the events waiting now, without blocking, and hands each to
    /// `f`. Returns how many there were; [`BATCH`] means there may be more.
    pub fn collect(&self, mut f: impl FnMut(u64, epoll::EventFlags)) -> io::Result<usize> {
        let mut events = self.events.borrow_mut();
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let (ready, _) = loop {
            match epoll::wait(&self.epoll, &mut events[..], Some(&zero)) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r?,
            }
        };
        for e in ready.iter() {
            f(e.data.u64(), e.flags);
        }
        Ok(ready.len())
    }

    pub fn is_full(n: usize) -> bool {
        n == BATCH
    }

    /// Hands every event to `on_event`, turn after turn, for as long as the
    /// task runs. A failed wait (it needs one spare descriptor, see
    /// `sys::readable`: at the process's file limit there may be none) is
    /// told to `on_error` and the set is looked at every millisecond until
    /// the wait works again; a failed collect is told and retried at the
    /// next wait.
    pub async fn dispatch(
        &self,
        mut on_event: impl FnMut(u64, epoll::EventFlags),
        mut on_error: impl FnMut(String),
    ) {
        loop {
            if let Err(e) = self.ready().await {
                on_error(format!(
                    "cannot wait for socket events ({e}); polling every 1 ms meanwhile (out of file descriptors? raise `ulimit -n`, or run more processes)"
                ));
                glommio::timer::Timer::new(std::time::Duration::from_millis(1)).await;
            }
            loop {
                match self.collect(&mut on_event) {
                    Ok(n) if Poller::is_full(n) => glommio::yield_if_needed().await,
                    Ok(_) => break,
                    Err(e) => {
                        on_error(format!("collecting socket events failed: {e}"));
                        break;
                    }
                }
            }
        }
    }
}

/// A socket's readiness and the task waiting on it.
#[derive(Debug, Default)]
pub struct Waiter {
    pub io: Io,
    waker: RefCell<Option<Waker>>,
}

impl Waiter {
    pub fn register(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    pub fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }
}
