//! The cross-shard rings: one bounded single-producer ring for every ordered
//! pair of shards, built on the main thread before any shard runs.
//!
//! Why not glommio's `MeshBuilder`: its `join` registers each executor in a
//! list behind an `Rc<RwLock<..>>` that every shard thread shares (the
//! builder is `unsafe impl Send`), has the last executor to register hand
//! every other one a start notification over a channel of its own, and
//! then connects the rings one peer after the other. Every wait in it but
//! the notification busy-polls (glommio's `Connector` re-queues its waker
//! on every reactor turn), so a start with more shards than CPUs spends its
//! cores spinning while the shard that must move next waits for one. Here
//! each shard gets exactly its own halves, by value, and connects all of
//! them at once; nothing but the rings' own connect is shared.
//!
//! # Invariants
//! - `build` runs on the main thread; each [`ShardRings`] is moved to its
//!   shard and connected there once, before the shard accepts anything.
//! - After `connect` the halves are the shard's own (`!Send`, glommio's
//!   `ConnectedSender` / `ConnectedReceiver`): a ring is written by one
//!   shard and read by one shard.
//! - Bounded: a full ring answers `try_send_to` with `WouldBlock` and
//!   `send_to` waits for room (the chat outboxes queue in order meanwhile).

use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::GlommioError;

/// One shard's unconnected halves: a sender to every other shard, a
/// receiver from every other shard (`None` at its own index).
pub struct ShardRings<T: Send> {
    me: usize,
    to: Vec<Option<SharedSender<T>>>,
    from: Vec<Option<SharedReceiver<T>>>,
}

/// Builds the rings of `shards` shards, `slots` messages each; element i
/// goes to shard i.
pub fn build<T: Send + 'static>(shards: usize, slots: usize) -> Vec<ShardRings<T>> {
    let mut all: Vec<ShardRings<T>> = (0..shards)
        .map(|me| ShardRings {
            me,
            to: (0..shards).map(|_| None).collect(),
            from: (0..shards).map(|_| None).collect(),
        })
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(slots);
                all[from].to[to] = Some(tx);
                all[to].from[from] = Some(rx);
            }
        }
    }
    all
}

impl<T: Send + 'static> ShardRings<T> {
    /// Connects every half, all at once; completes when every peer has
    /// connected its side of each ring with this shard. Must run on the
    /// shard's executor.
    pub async fn connect(self) -> (Senders<T>, Receivers<T>) {
        let ShardRings { me, to, from } = self;
        let senders: Vec<_> = to
            .into_iter()
            .map(|tx| tx.map(|tx| glommio::spawn_local(tx.connect())))
            .collect();
        let receivers: Vec<_> = from
            .into_iter()
            .map(|rx| rx.map(|rx| glommio::spawn_local(rx.connect())))
            .collect();
        let mut to = Vec::with_capacity(senders.len());
        for task in senders {
            to.push(match task {
                Some(t) => Some(t.await),
                None => None,
            });
        }
        let mut from = Vec::with_capacity(receivers.len());
        for task in receivers {
            from.push(match task {
                Some(t) => Some(t.await),
                None => None,
            });
        }
        (Senders { me, to }, Receivers { from })
    }
}

/// A shard's connected senders, one per other shard.
pub struct Senders<T: Send> {
    me: usize,
    to: Vec<Option<ConnectedSender<T>>>,
}

impl<T: Send> Senders<T> {
    /// This shard's index.
    pub fn peer_id(&self) -> usize {
        self.me
    }

    /// Shards in all, this one included.
    pub fn nr_consumers(&self) -> usize {
        self.to.len()
    }

    /// Sends without waiting: `WouldBlock` gives the message back when the
    /// ring is full, `Closed` when the peer is gone.
    pub fn try_send_to(&self, to: usize, msg: T) -> Result<(), GlommioError<T>> {
        match self.to.get(to) {
            Some(Some(tx)) => tx.try_send(msg),
            _ => Err(GlommioError::Closed(glommio::ResourceType::Channel(msg))),
        }
    }

    /// Sends, waiting for room; `Closed` gives the message back when the
    /// peer is gone (or `to` is this shard, which has no ring to itself).
    pub async fn send_to(&self, to: usize, msg: T) -> Result<(), GlommioError<T>> {
        match self.to.get(to) {
            Some(Some(tx)) => tx.send(msg).await,
            _ => Err(GlommioError::Closed(glommio::ResourceType::Channel(msg))),
        }
    }
}

/// A shard's connected receivers, one per other shard.
pub struct Receivers<T: Send> {
    from: Vec<Option<ConnectedReceiver<T>>>,
}

impl<T: Send> Receivers<T> {
    /// Takes the receivers out, with the index of the shard each reads.
    pub fn streams(&mut self) -> Vec<(usize, ConnectedReceiver<T>)> {
        self.from
            .iter_mut()
            .enumerate()
            .filter_map(|(i, rx)| rx.take().map(|rx| (i, rx)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::{LocalExecutorBuilder, Placement};

    /// Four shards on whatever CPUs there are (more shards than CPUs on a
    /// small machine): every shard connects and every ring carries its
    /// messages in order, many times over.
    #[test]
    fn every_shard_connects_and_every_ring_delivers_in_order() {
        for _ in 0..20 {
            let shards = 4;
            let handles: Vec<_> = build::<(usize, u32)>(shards, 8)
                .into_iter()
                .map(|rings| {
                    LocalExecutorBuilder::new(Placement::Unbound)
                        .io_memory(1 << 16)
                        .spawn(move || async move {
                            let (tx, mut rx) = rings.connect().await;
                            let me = tx.peer_id();
                            let readers: Vec<_> = rx
                                .streams()
                                .into_iter()
                                .map(|(from, stream)| {
                                    glommio::spawn_local(async move {
                                        for n in 0..100u32 {
                                            assert_eq!(stream.recv().await, Some((from, n)));
                                        }
                                    })
                                })
                                .collect();
                            for n in 0..100u32 {
                                for to in (0..shards).filter(|&to| to != me) {
                                    tx.send_to(to, (me, n)).await.unwrap();
                                }
                            }
                            assert!(tx.try_send_to(me, (me, 0)).is_err());
                            for r in readers {
                                r.await;
                            }
                        })
                        .unwrap()
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        }
    }
}
