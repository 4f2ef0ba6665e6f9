//! One chat connection's session: who it is, which rooms it is in, its rate
//! limit, and what each client frame does.
//!
//! # Invariants
//! - Lives in the connection's `ConnShared` (so delivery handlers can see
//!   which joins are still wanted); borrowed briefly, never across `.await`.
//! - Handling a frame never delivers to another connection synchronously:
//!   everything that leaves the connection goes through the outboxes, so no
//!   handler re-enters another connection's state.

use std::{sync::Arc, time::Instant};

use corecast_router::ratelimit::TokenBucket;

use super::{
    proto::{self, close, ClientFrame, ErrorCode},
    ConnRef, Publish, Request,
};
use crate::{
    auth::{AuthError, Claims},
    conn::ConnShared,
    shard::Shard,
    storage::Query,
};

#[derive(Debug)]
struct RoomEntry {
    room: Arc<str>,
    /// The home confirmed the join (until then deliveries are not ours).
    joined: bool,
    /// Which join of the room this is (a client may leave and join again
    /// before the first join's answers arrive).
    nonce: u32,
}

/// A chat connection's state.
#[derive(Debug)]
pub struct Session {
    user: Option<Arc<str>>,
    claims: Option<Box<Claims>>,
    rooms: Vec<RoomEntry>,
    joins: u32,
    bucket: TokenBucket,
    /// Until an authenticated user is known: when to give up (4001).
    pub auth_deadline: Option<Instant>,
}

/// What the connection must do after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Close(u16, &'static str),
}

impl Session {
    pub fn new(shard: &Shard, now: Instant) -> Session {
        let s = &shard.chat.settings;
        Session {
            user: None,
            claims: None,
            rooms: Vec::new(),
            joins: 0,
            bucket: TokenBucket::new(s.rate_limit_per_s, s.rate_limit_burst, now),
            auth_deadline: None,
        }
    }

    pub fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    /// Is this join of `room` asked for and not yet confirmed by the home?
    pub fn awaits_join(&self, room: &str, nonce: u32) -> bool {
        self.rooms
            .iter()
            .any(|e| &*e.room == room && e.nonce == nonce && !e.joined)
    }

    /// The home confirmed a join; `false` if this connection no longer wants
    /// it (it left meanwhile, perhaps joining again since).
    pub fn mark_joined(&mut self, room: &str, nonce: u32) -> bool {
        match self
            .rooms
            .iter_mut()
            .find(|e| &*e.room == room && e.nonce == nonce && !e.joined)
        {
            Some(e) => {
                e.joined = true;
                true
            }
            None => false,
        }
    }
}

/// Closes for a token that failed verification.
pub fn auth_close(e: AuthError) -> Outcome {
    let code = match e {
        AuthError::Missing => close::AUTH_REQUIRED,
        AuthError::Expired | AuthError::NotYetValid => close::TOKEN_EXPIRED,
        _ => close::INVALID_TOKEN,
    };
    Outcome::Close(code, e.reason())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Right after the upgrade: authenticate from the request's token, or
/// anonymously, or start waiting for a `connect` frame.
pub fn on_open(shard: &Shard, conn: &ConnShared, me: ConnRef, token: Option<&str>) -> Outcome {
    let mut session = Session::new(shard, shard.clock.get());
    let outcome = match token {
        Some(t) => match verify(shard, t) {
            Ok(claims) => {
                authenticate(
                    shard,
                    conn,
                    me,
                    &mut session,
                    Arc::from(claims.sub.as_str()),
                    Some(claims),
                );
                Outcome::Continue
            }
            Err(e) => {
                shard.metrics().auth_failed(e);
                auth_close(e)
            }
        },
        None if shard.chat.settings.allow_anonymous => {
            // Unique in a cluster too: the node's name goes in.
            let user = match shard.chat.mesh() {
                Some(m) => format!(
                    "anon-{}.{}.{}",
                    m.node_id,
                    shard.chat.me,
                    shard.chat.next_anonymous()
                ),
                None => format!("anon-{}.{}", shard.chat.me, shard.chat.next_anonymous()),
            };
            authenticate(shard, conn, me, &mut session, Arc::from(user), None);
            Outcome::Continue
        }
        None => {
            session.auth_deadline = Some(shard.clock.get() + shard.limits.handshake_timeout);
            Outcome::Continue
        }
    };
    *conn.chat.borrow_mut() = Some(Box::new(session));
    outcome
}

fn verify(shard: &Shard, token: &str) -> Result<Claims, AuthError> {
    match &shard.chat.settings.verifier {
        Some(v) => v.verify(token, unix_now()),
        // No secret configured: no token can be checked.
        None => Err(AuthError::BadSignature),
    }
}

fn authenticate(
    shard: &Shard,
    conn: &ConnShared,
    me: ConnRef,
    session: &mut Session,
    user: Arc<str>,
    claims: Option<Claims>,
) {
    let chat = &shard.chat;
    session.auth_deadline = None;
    session.claims = claims.map(Box::new);
    chat.add_local_user(&user, (me.key, me.gen));
    chat.request(
        shard,
        chat.user_home(&user),
        Request::UserOnline {
            user: user.clone(),
            shard: chat.me as u16,
        },
    );
    conn.push_own(
        shard,
        &proto::welcome(&user, &format!("{}.{}", chat.me, me.key)),
    );
    session.user = Some(user);
}

/// Handles one text message from the client.
pub fn on_text(shard: &Shard, conn: &ConnShared, me: ConnRef, text: &[u8]) -> Outcome {
    let mut guard = conn.chat.borrow_mut();
    let Some(session) = guard.as_mut() else {
        return Outcome::Continue;
    };
    let m = shard.metrics();
    if !session.bucket.try_take(shard.clock.get()) {
        m.rate_limited.inc();
        conn.push_own(shard, &proto::error(ErrorCode::RateLimited, None, None));
        return Outcome::Continue;
    }
    let frame = match ClientFrame::parse(text) {
        Ok(f) => f,
        Err(_) => {
            if session.user.is_none() {
                return Outcome::Close(
                    close::AUTH_REQUIRED,
                    "authentication required: send connect first",
                );
            }
            m.chat_errors.inc();
            conn.push_own(shard, &proto::error(ErrorCode::BadRequest, None, None));
            return Outcome::Continue;
        }
    };
    let Some(user) = session.user.clone() else {
        return match frame {
            ClientFrame::Connect { token } => match verify(shard, &token) {
                Ok(claims) => {
                    authenticate(
                        shard,
                        conn,
                        me,
                        session,
                        Arc::from(claims.sub.as_str()),
                        Some(claims),
                    );
                    Outcome::Continue
                }
                Err(e) => {
                    m.auth_failed(e);
                    auth_close(e)
                }
            },
            _ => Outcome::Close(
                close::AUTH_REQUIRED,
                "authentication required: send connect first",
            ),
        };
    };
    let chat = &shard.chat;
    let settings = &chat.settings;
    let error = |code: ErrorCode, id: Option<&str>, room: Option<&str>| {
        m.chat_errors.inc();
        conn.push_own(shard, &proto::error(code, id, room));
        Outcome::Continue
    };
    match frame {
        ClientFrame::Connect { .. } => error(ErrorCode::AlreadyAuthenticated, None, None),
        ClientFrame::Join { room, since } => {
            if !proto::valid_room(&room) {
                return error(ErrorCode::InvalidRoom, None, None);
            }
            if session.claims.as_ref().is_some_and(|c| !c.may_join(&room)) {
                return error(ErrorCode::Forbidden, None, Some(&room));
            }
            if session.rooms.iter().any(|e| *e.room == *room) {
                return error(ErrorCode::AlreadyJoined, None, Some(&room));
            }
            if session.rooms.len() >= settings.max_rooms_per_connection {
                return error(ErrorCode::TooManyRooms, None, Some(&room));
            }
            let room: Arc<str> = Arc::from(&*room);
            session.joins = session.joins.wrapping_add(1);
            let nonce = session.joins;
            session.rooms.push(RoomEntry {
                room: room.clone(),
                joined: false,
                nonce,
            });
            chat.request(
                shard,
                chat.room_home(&room),
                Request::Join {
                    room,
                    user,
                    conn: me,
                    since: since.map(|(seq, epoch)| (seq, epoch.into())),
                    nonce,
                    parked: false,
                },
            );
            Outcome::Continue
        }
        ClientFrame::Leave { room } => {
            let Some(i) = session.rooms.iter().position(|e| *e.room == *room) else {
                return error(ErrorCode::NotJoined, None, Some(&room));
            };
            let entry = session.rooms.swap_remove(i);
            // A join still in flight is undone when its confirmation arrives.
            if entry.joined {
                leave_joined(shard, me, entry.room.clone(), user);
            }
            conn.push_own(shard, &proto::left(&entry.room));
            Outcome::Continue
        }
        ClientFrame::Publish { room, id, body } => {
            let id = id.as_deref().unwrap_or("");
            if id.len() > proto::MAX_ID_BYTES {
                return error(ErrorCode::InvalidId, None, Some(&room));
            }
            let Some(entry) = session.rooms.iter().find(|e| *e.room == *room) else {
                return error(ErrorCode::NotJoined, Some(id), Some(&room));
            };
            if session
                .claims
                .as_ref()
                .is_some_and(|c| !c.may_publish(&room))
            {
                return error(ErrorCode::Forbidden, Some(id), Some(&room));
            }
            if body.get().len() > settings.max_body_bytes {
                return error(ErrorCode::BodyTooLarge, Some(id), Some(&room));
            }
            let room = entry.room.clone();
            chat.request(
                shard,
                chat.room_home(&room),
                Request::Publish(Publish {
                    room,
                    user,
                    id: id.into(),
                    body: body.get().into(),
                    conn: me,
                    hops: 0,
                }),
            );
            Outcome::Continue
        }
        ClientFrame::Dm { to, id, body } => {
            let id = id.as_deref().unwrap_or("");
            if id.len() > proto::MAX_ID_BYTES {
                return error(ErrorCode::InvalidId, None, None);
            }
            if to.is_empty()
                || to.len() > crate::auth::MAX_SUBJECT_BYTES
                || to.chars().any(char::is_control)
            {
                return error(ErrorCode::BadRequest, Some(id), None);
            }
            if body.get().len() > settings.max_body_bytes {
                return error(ErrorCode::BodyTooLarge, Some(id), None);
            }
            let to: Arc<str> = Arc::from(&*to);
            chat.request(
                shard,
                chat.user_home(&to),
                Request::Direct {
                    to,
                    from: user,
                    id: id.into(),
                    body: body.get().into(),
                    conn: me,
                },
            );
            Outcome::Continue
        }
        ClientFrame::History { room, since, limit } => {
            if !proto::valid_room(&room) {
                return error(ErrorCode::InvalidRoom, None, None);
            }
            if session.claims.as_ref().is_some_and(|c| !c.may_join(&room)) {
                return error(ErrorCode::Forbidden, None, Some(&room));
            }
            let max = settings.history_max_limit;
            let n = limit.map_or(max.min(100), |l| (l as usize).min(max));
            let query = match since {
                Some(after) => Query::After { after, n },
                None => Query::Last(n),
            };
            let room: Arc<str> = Arc::from(&*room);
            chat.request(
                shard,
                chat.room_home(&room),
                Request::History {
                    room,
                    query,
                    conn: me,
                },
            );
            Outcome::Continue
        }
        ClientFrame::Presence { room } => {
            if !proto::valid_room(&room) {
                return error(ErrorCode::InvalidRoom, None, None);
            }
            if session.claims.as_ref().is_some_and(|c| !c.may_join(&room)) {
                return error(ErrorCode::Forbidden, None, Some(&room));
            }
            let room: Arc<str> = Arc::from(&*room);
            chat.request(
                shard,
                chat.room_home(&room),
                Request::Presence { room, conn: me },
            );
            Outcome::Continue
        }
    }
}

/// Leaves a room the home confirmed: local membership now, the home's count
/// through a request.
fn leave_joined(shard: &Shard, me: ConnRef, room: Arc<str>, user: Arc<str>) {
    let chat = &shard.chat;
    chat.remove_local_member(shard, &room, (me.key, me.gen));
    let home = chat.room_home(&room);
    chat.request(
        shard,
        home,
        Request::Leave {
            room,
            user,
            shard: chat.me as u16,
        },
    );
}

/// The connection is going away: leave its rooms, go offline.
pub fn on_close(shard: &Shard, conn: &ConnShared, me: ConnRef) {
    let Some(session) = conn.chat.borrow_mut().take() else {
        return;
    };
    let Some(user) = session.user else { return };
    let chat = &shard.chat;
    for entry in session.rooms {
        if entry.joined {
            leave_joined(shard, me, entry.room, user.clone());
        }
    }
    chat.remove_local_user(&user, (me.key, me.gen));
    chat.request(
        shard,
        chat.user_home(&user),
        Request::UserOffline {
            user,
            shard: chat.me as u16,
        },
    );
}
