//! A shard's mailbox from a helper thread (the storage worker, the mesh
//! thread): a channel plus the waker of the shard task that drains it,
//! woken from the other thread with no lock on either side.
//!
//! # Invariants
//! - The channel itself is unbounded; what bounds it is upstream: the
//!   storage worker answers only the ops a shard's queue bound let in, and
//!   the mesh thread hands over at most what its SUB sockets' high-water
//!   marks let in per round.

use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

pub struct Inbox<T> {
    tx: Sender<Vec<T>>,
    rx: Receiver<Vec<T>>,
    waker: AtomicWaker,
}

impl<T> Default for Inbox<T> {
    fn default() -> Inbox<T> {
        Inbox::new()
    }
}

impl<T> Inbox<T> {
    pub fn new() -> Inbox<T> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Inbox {
            tx,
            rx,
            waker: AtomicWaker::new(),
        }
    }

    /// Sends a batch (helper thread side) and wakes the shard's task.
    pub fn send(&self, items: Vec<T>) {
        if self.tx.send(items).is_ok() {
            self.waker.wake();
        }
    }

    /// Polls for the next batch (shard side).
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Vec<T>> {
        match self.rx.try_recv() {
            Ok(r) => return Poll::Ready(r),
            Err(TryRecvError::Disconnected) => return Poll::Pending,
            Err(TryRecvError::Empty) => {}
        }
        self.waker.register(cx.waker());
        // A batch sent between the first look and the registration.
        match self.rx.try_recv() {
            Ok(r) => Poll::Ready(r),
            Err(_) => Poll::Pending,
        }
    }
}
