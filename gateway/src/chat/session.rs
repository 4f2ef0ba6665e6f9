//! A chat connection's session, driven on its shard.
//!
//! What the session does with each client frame is the router's sans-IO
//! state machine ([`corecast_router::session`]); this module runs it with
//! the shard's [`Driver`] as its ports: replies go into the connection's
//! own output, requests into the outboxes towards the homes, and the local
//! tables (a user's connections, a room's members) are this shard's.
//!
//! # Invariants
//! - Lives in the connection's `ConnShared::app` (so delivery handlers can
//!   see which joins are still wanted); borrowed briefly, never across
//!   `.await`.
//! - Handling a frame never delivers to another connection synchronously:
//!   everything that leaves the connection goes through the outboxes, so no
//!   handler re-enters another connection's state.

use std::{sync::Arc, time::Instant};

pub use corecast_router::session::Session;
use corecast_router::session::{Count, Outcome, Place, Ports};

use super::{ChatShard, ConnRef, Member, Request, UserAction};

/// The session's ports on this shard, for one connection.
struct Driver<'a> {
    chat: &'a ChatShard,
    conn: &'a Member,
    me: ConnRef,
}

impl Ports for Driver<'_> {
    fn reply(&mut self, frame: &[u8]) {
        self.conn.push_own(&self.chat.local, frame);
    }

    fn request(&mut self, to: usize, req: Request) {
        self.chat.request(to, req);
    }

    fn add_local_user(&mut self, user: &Arc<str>) {
        self.chat.add_local_user(user, (self.me.key, self.me.gen));
    }

    fn remove_local_user(&mut self, user: &str) {
        self.chat
            .remove_local_user(user, (self.me.key, self.me.gen));
    }

    fn remove_local_member(&mut self, room: &str) {
        self.chat
            .remove_local_member(room, (self.me.key, self.me.gen));
    }

    fn anonymous_name(&mut self) -> String {
        // Unique in a cluster too: the node's name goes in.
        let (chat, n) = (self.chat, self.chat.next_anonymous());
        match chat.mesh() {
            Some(m) => format!("anon-{}.{}.{n}", m.node_id, chat.me),
            None => format!("anon-{}.{n}", chat.me),
        }
    }

    fn unix_s(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    fn count(&mut self, what: Count) {
        let m = self.chat.local.metrics();
        match what {
            Count::RateLimited => m.rate_limited.inc(),
            Count::Error => m.chat_errors.inc(),
            Count::AuthFailed(e) => m.auth_failed(e),
        }
    }
}

fn place(chat: &ChatShard, me: ConnRef) -> Place {
    Place {
        me,
        shards: chat.shards,
    }
}

fn now(chat: &ChatShard) -> Instant {
    chat.local.clock.get()
}

/// Right after the upgrade: authenticate from the request's token, or
/// anonymously, or start waiting for a `connect` frame.
pub fn on_open(
    chat: &ChatShard,
    conn: &Member,
    me: ConnRef,
    token: Option<&str>,
    peer: Option<std::net::IpAddr>,
) -> Outcome {
    let mut driver = Driver { chat, conn, me };
    let rules = &chat.settings.session;
    let place = place(chat, me);
    let (session, outcome) = Session::open(rules, place, token, peer, now(chat), &mut driver);
    *conn.app.borrow_mut() = Some(Box::new(session));
    outcome
}

/// Handles one text message from the client.
pub fn on_text(chat: &ChatShard, conn: &Member, me: ConnRef, text: &[u8]) -> Outcome {
    let mut guard = conn.app.borrow_mut();
    let Some(session) = guard.as_mut() else {
        return Outcome::Continue;
    };
    let mut driver = Driver { chat, conn, me };
    let rules = &chat.settings.session;
    session.text(rules, place(chat, me), text, now(chat), &mut driver)
}

/// The server API acts on this connection: closes it now (its timer,
/// fired at once, sends the close frame) or takes it out of a room.
pub fn on_act(chat: &ChatShard, conn: &Member, me: ConnRef, action: &UserAction) {
    let mut guard = conn.app.borrow_mut();
    let Some(session) = guard.as_mut() else {
        return;
    };
    match action {
        UserAction::Disconnect { code, reason } => {
            session.disconnect(*code, reason.clone(), now(chat));
            drop(guard);
            conn.fired.set(true);
            conn.wake();
        }
        UserAction::Unsubscribe { room } => {
            let mut driver = Driver { chat, conn, me };
            if session.unsubscribe(place(chat, me), room, &mut driver) {
                drop(guard);
                // It flushes the `left` frame.
                conn.wake();
            }
        }
    }
}

/// The connection is going away: leave its rooms, go offline.
pub fn on_close(chat: &ChatShard, conn: &Member, me: ConnRef) {
    let Some(session) = conn.app.borrow_mut().take() else {
        return;
    };
    session.close(place(chat, me), &mut Driver { chat, conn, me });
}
