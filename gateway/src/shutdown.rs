//! A one-shot, thread-safe "stop now" signal with an awaitable side.
//!
//! # Invariants
//! - Used off the shards: by the signal thread, tests and `run`'s waiting
//!   thread. Shards never await it; they poll an `AtomicBool` on their tick.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

#[derive(Debug, Default)]
struct Inner {
    fired: bool,
    wakers: Vec<Waker>,
}

/// Fires the signal; clones fire the same one.
#[derive(Debug, Clone, Default)]
pub struct Trigger(Arc<Mutex<Inner>>);

/// Completes once the paired [`Trigger`] fired (or immediately if it did).
#[derive(Debug, Clone)]
pub struct Fired(Arc<Mutex<Inner>>);

/// A new, unfired signal.
pub fn channel() -> (Trigger, Fired) {
    let t = Trigger::default();
    let f = Fired(t.0.clone());
    (t, f)
}

impl Trigger {
    pub fn fire(&self) {
        let wakers = {
            let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
            inner.fired = true;
            std::mem::take(&mut inner.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    pub fn is_fired(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).fired
    }
}

impl Future for Fired {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if inner.fired {
            return Poll::Ready(());
        }
        if !inner.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            inner.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_across_threads() {
        let (t, f) = channel();
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.fire());
        futures_lite::future::block_on(f);
        h.join().unwrap();
        assert!(t.is_fired());
    }
}
