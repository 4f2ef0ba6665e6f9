//! Socket readiness for one executor: its client sockets in one
//! edge-triggered epoll set (the gateway's [`readiness`] module), collected
//! by one dispatcher task per executor.
//!
//! Why not glommio's socket streams: glommio 0.9 arms a one-shot io_uring
//! poll per socket and sets its rings up without `COOP_TASKRUN`, so every
//! frame the server sends while loadgen runs interrupts loadgen's core (a
//! reschedule IPI), and on loopback the server pays for sending it: about
//! one IPI per server `send`, some 15% of a fan-out server's CPU. With the
//! epoll set an arrival only links the socket into the ready list while the
//! executor is busy; the load generator then measures the server, not the
//! cost of waking itself.
//!
//! # Invariants
//! - One reactor per executor thread, created on first use there; `!Send`.
//! - A socket's [`Waiter`] lives in the reactor's table from
//!   [`Registration::new`] until the registration drops (the connection
//!   drops it just before closing the socket). Tokens carry a generation,
//!   so an event for a slot that was reused is ignored.
//! - Never blocks: the dispatcher collects with `epoll_wait(0)` after
//!   glommio reported the set readable.
//!
//! [`readiness`]: corecast_readiness

use std::{
    cell::{Cell, RefCell},
    io,
    os::fd::BorrowedFd,
    rc::Rc,
    task::Context,
};

use corecast_readiness::{self as readiness, Io, Poller, Waiter};
use slab::Slab;

struct Reactor {
    poller: Poller,
    waiters: RefCell<Slab<(u32, Rc<Waiter>)>>,
    next_gen: Cell<u32>,
}

thread_local! {
    static REACTOR: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

/// This executor's reactor; the first call starts its dispatcher task.
fn reactor() -> io::Result<Rc<Reactor>> {
    REACTOR.with(|slot| {
        if let Some(r) = slot.borrow().as_ref() {
            return Ok(r.clone());
        }
        let r = Rc::new(Reactor {
            poller: Poller::new()?,
            waiters: RefCell::new(Slab::new()),
            next_gen: Cell::new(0),
        });
        *slot.borrow_mut() = Some(r.clone());
        glommio::spawn_local(dispatch(r.clone())).detach();
        Ok(r)
    })
}

async fn dispatch(r: Rc<Reactor>) {
    let on_event = |token, flags| {
        let (key, gen) = readiness::split_token(token);
        let waiters = r.waiters.borrow();
        if let Some((_, w)) = waiters.get(key).filter(|(g, _)| *g == gen) {
            if w.io.set(flags) {
                w.wake();
            }
        }
    };
    let on_error = |what: String| log::warn!("{what}");
    r.poller.dispatch(on_event, on_error).await;
}

/// A socket in its executor's epoll set, and the task waiting on it.
pub struct Registration {
    reactor: Rc<Reactor>,
    key: usize,
    waiter: Rc<Waiter>,
}

impl Registration {
    /// Adds a non-blocking socket to this executor's set. Must run on an
    /// executor thread.
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Registration> {
        let reactor = reactor()?;
        let gen = reactor.next_gen.get().wrapping_add(1);
        reactor.next_gen.set(gen);
        let waiter = Rc::new(Waiter::default());
        let key = reactor.waiters.borrow_mut().insert((gen, waiter.clone()));
        if let Err(e) = reactor.poller.add(fd, readiness::conn_token(key, gen)) {
            reactor.waiters.borrow_mut().remove(key);
            return Err(e);
        }
        Ok(Registration {
            reactor,
            key,
            waiter,
        })
    }

    /// The socket's readiness flags.
    pub fn io(&self) -> &Io {
        &self.waiter.io
    }

    /// Wakes the task polling with `cx` at the socket's next edge.
    pub fn wait(&self, cx: &Context<'_>) {
        self.waiter.register(cx.waker());
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.reactor.waiters.borrow_mut().try_remove(self.key);
    }
}
