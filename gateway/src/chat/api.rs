//! The server API's calls on a shard: each becomes the request a client
//! frame would, sent to the homes under a [`ConnRef`] of the API's key
//! range, and the frame the homes answer to that reference completes it.
//!
//! # Invariants
//! - API references never name a connection: their slab key has
//!   [`API_KEY`] set (connection keys stay far below it), so an answer for
//!   one goes to its call, never to a socket.
//! - Bounded: a call the API stopped waiting for (timed out) is dropped by
//!   the sweep within a second, answered or not.

use std::{cell::RefCell, rc::Rc, sync::Arc, time::Duration};

use corecast_router::message::Publish;
use futures_lite::future::poll_fn;
use slab::Slab;

use super::{ChatShard, ConnRef, Request, YIELD_EVERY};
use crate::api::{Answer, Call, Calls, Op, Reply};

/// Set in the slab key of every API reference.
pub const API_KEY: u32 = 1 << 31;

/// How often calls nobody waits for any more are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The calls of this shard waiting for the homes' answers.
#[derive(Default)]
pub struct Pending {
    calls: RefCell<Slab<(u32, Answer)>>,
    next_gen: std::cell::Cell<u32>,
}

impl Pending {
    /// The reference the homes answer this call under.
    fn register(&self, chat: &ChatShard, answer: Answer) -> ConnRef {
        let gen = self.next_gen.get().wrapping_add(1);
        self.next_gen.set(gen);
        let key = self.calls.borrow_mut().insert((gen, answer)) as u32;
        ConnRef {
            node: chat.node,
            shard: chat.me as u16,
            key: key | API_KEY,
            gen,
        }
    }

    /// Completes the call `conn` names with `frame`; true if `conn` is an
    /// API reference (answered, or gone).
    pub fn complete(&self, conn: ConnRef, frame: &[u8]) -> bool {
        if conn.key & API_KEY == 0 {
            return false;
        }
        let key = (conn.key & !API_KEY) as usize;
        let mut calls = self.calls.borrow_mut();
        if calls.get(key).is_some_and(|(gen, _)| *gen == conn.gen) {
            let (_, answer) = calls.remove(key);
            answer.frame(frame);
        }
        true
    }

    fn sweep(&self) {
        self.calls.borrow_mut().retain(|_, (_, a)| !a.abandoned());
    }
}

/// Starts the task that takes this shard's calls from the API thread, and
/// the sweep of abandoned ones.
pub fn spawn(chat: &Rc<ChatShard>, calls: Arc<Calls>) {
    let s = chat.clone();
    glommio::spawn_local(async move {
        loop {
            let batch = poll_fn(|cx| calls.inbox(s.me).poll_recv(cx)).await;
            for (i, call) in batch.into_iter().enumerate() {
                on_call(&s, call);
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    glommio::yield_if_needed().await;
                }
            }
            glommio::yield_if_needed().await;
        }
    })
    .detach();
    let s = chat.clone();
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(SWEEP_EVERY).await;
            s.api.sweep();
        }
    })
    .detach();
}

fn on_call(chat: &ChatShard, call: Call) {
    let Call { op, answer } = call;
    // Timed out while queued: the caller got 503 and may have retried.
    if answer.abandoned() {
        return;
    }
    let (to, req) = match op {
        Op::Publish {
            room,
            from,
            id,
            body,
        } => {
            let conn = chat.api.register(chat, answer);
            let home = chat.room_home(&room);
            let publish = Publish {
                room,
                user: from,
                id,
                body,
                conn,
                hops: 0,
            };
            (home, Request::Publish(publish))
        }
        Op::Dm { to, from, id, body } => {
            let conn = chat.api.register(chat, answer);
            let home = chat.user_home(&to);
            let req = Request::Direct {
                to,
                from,
                id,
                body,
                conn,
            };
            (home, req)
        }
        Op::Presence { room } => {
            let conn = chat.api.register(chat, answer);
            (chat.room_home(&room), Request::Presence { room, conn })
        }
        Op::History { room, query } => {
            let conn = chat.api.register(chat, answer);
            let home = chat.room_home(&room);
            (home, Request::History { room, query, conn })
        }
        Op::Act { user, action } => {
            let conn = chat.api.register(chat, answer);
            let home = chat.user_home(&user);
            (home, Request::Act { user, action, conn })
        }
        Op::Rooms { prefix } => {
            let rooms = chat
                .local_rooms
                .borrow()
                .iter()
                .filter(|(room, local)| room.starts_with(&*prefix) && !local.members.is_empty())
                .map(|(room, local)| (room.clone(), local.members.len() as u64))
                .collect();
            answer.send(Reply::Rooms(rooms));
            return;
        }
        Op::Nodes => {
            let nodes = chat
                .homes
                .borrow()
                .live_nodes()
                .map(|set| set.nodes.iter().map(|(_, id)| id.clone()).collect());
            answer.send(Reply::Nodes(nodes));
            return;
        }
    };
    chat.request(to, req);
}
