//! One chat connection's session as a sans-IO state machine: who it is,
//! which rooms it asked for, its rate limit, and what each client frame
//! does.
//!
//! A session turns the client's frames into replies for the client and
//! requests for the homes of rooms and users; it does both through its
//! [`Ports`], and tells the connection whether to go on or close
//! ([`Outcome`]). It holds no socket and no executor and reads no clock
//! (the caller passes the shard's), so
//! `session/tests.rs` drives it with plain values.
//!
//! # Invariants
//! - Nothing reaches another connection from here: every effect is a reply
//!   to this client, a request to a home, or a change of this shard's local
//!   tables (the user's connections, a room's local members).
//! - A join is wanted until the client leaves: [`Session::mark_joined`]
//!   says whether the home's confirmation is still wanted, so a join that
//!   arrives after a leave is undone by the caller.
//! - Until a user is known (a token in the request, anonymous mode, or a
//!   `connect` frame) the only frame accepted is `connect`.
//! - A session always knows its next deadline ([`Session::deadline`]): the
//!   end of the time to authenticate, then its token's `exp` plus the
//!   leeway. A `refresh` with a token for the same user moves it; nothing
//!   else does.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    auth::{AuthError, Claims, Verifier, MAX_SUBJECT_BYTES},
    home_shard,
    homes::{Refusal, Request},
    message::{ConnRef, Publish},
    namespace::{Namespaces, Rate},
    peer_home_shard,
    proto::{self, close, ClientFrame, ErrorCode},
    ratelimit::TokenBucket,
    store::Query,
    user_home_shard,
};

/// What every session on a node is held to.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Checks tokens; `None`: no secret configured, so no token passes.
    pub verifier: Option<Verifier>,
    pub allow_anonymous: bool,
    pub max_rooms_per_connection: usize,
    pub rate_limit_per_s: f64,
    pub rate_limit_burst: f64,
    /// Largest direct message body (a room's comes from its namespace).
    pub max_body_bytes: usize,
    /// Each room's options: who may publish and join, body sizes.
    pub namespaces: Namespaces,
    /// Most messages one `history` request returns.
    pub history_max_limit: usize,
    /// How long a connection may stay unauthenticated.
    pub auth_timeout: Duration,
}

/// Where a session runs: its connection (node, shard, key) and how many
/// shards the node has (homes are computed over them).
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub me: ConnRef,
    pub shards: usize,
}

/// What a session does to the world.
pub trait Ports {
    /// A frame for this connection's client.
    fn reply(&mut self, frame: &[u8]);
    /// A request for shard `to`: the home of a room or of a user.
    fn request(&mut self, to: usize, req: Request);
    /// The connection now belongs to `user` on this shard.
    fn add_local_user(&mut self, user: &Arc<str>);
    fn remove_local_user(&mut self, user: &str);
    /// The connection is no longer a local member of `room`.
    fn remove_local_member(&mut self, room: &str);
    /// A name for an anonymous user, unique in the cluster.
    fn anonymous_name(&mut self) -> String;
    /// The wall clock, Unix seconds (tokens' `exp` and `nbf`); asked only
    /// when a token is checked.
    fn unix_s(&mut self) -> u64;
    fn count(&mut self, what: Count);
}

/// What a session counts (the gateway's metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    RateLimited,
    /// A frame answered with an `error` frame.
    Error,
    AuthFailed(AuthError),
}

/// A close reason: one of the session's own, or one the server API gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Fixed(&'static str),
    Given(Arc<str>),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl std::ops::Deref for Reason {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Reason::Fixed(s) => s,
            Reason::Given(s) => s,
        }
    }
}

/// What the connection does after the session's step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

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
    /// Before authentication: when to give up (4001); after: when the
    /// token expires (4003). `None`: never (anonymous, or no `exp`).
    deadline: Option<Instant>,
    /// What few sessions have (boxed, so the others pay a null pointer).
    rare: Option<Box<Rare>>,
    /// A home did not count this connection (`refuse`): it closes now, and
    /// does not tell that home it went.
    refused_user: bool,
    refused_peer: bool,
}

/// A session's state that only some sessions have.
#[derive(Debug, Default)]
struct Rare {
    /// The address counted at its home shard (with a per-address cap).
    peer: Option<IpAddr>,
    /// The server API closes this connection now, with this code and reason.
    kicked: Option<(u16, Arc<str>)>,
    /// Publish buckets of the namespaces with a `publish_rate` this
    /// connection published to, by prefix.
    publish_buckets: Vec<(Box<str>, TokenBucket)>,
}

const SEND_CONNECT_FIRST: &str = "authentication required: send connect first";
const AUTH_TIMED_OUT: &str = "authentication required: no token and no connect frame in time";
const TOKEN_RAN_OUT: &str = "token expired: send refresh with a new token before exp";
const TOO_MANY: &str = "too many connections for this user: close another one first";
const TOO_MANY_FROM_ADDRESS: &str = "too many connections from this address";

/// Checks `token` and says when, on the shard's clock, it stops being
/// accepted (`None`: it has no `exp`).
fn verify(
    rules: &Rules,
    token: &str,
    now: Instant,
    ports: &mut dyn Ports,
) -> Result<(Claims, Option<Instant>), AuthError> {
    // No secret configured: no token can be checked.
    let Some(v) = &rules.verifier else {
        return Err(AuthError::BadSignature);
    };
    let unix = ports.unix_s();
    let claims = v.verify(token, unix)?;
    let expires = v
        .valid_until(&claims)
        .map(|until| now + Duration::from_secs(until.saturating_sub(unix)));
    Ok((claims, expires))
}

/// The close a token that failed verification gets.
pub fn auth_close(e: AuthError) -> Outcome {
    let code = match e {
        AuthError::Missing => close::AUTH_REQUIRED,
        AuthError::Expired | AuthError::NotYetValid => close::TOKEN_EXPIRED,
        _ => close::INVALID_TOKEN,
    };
    Outcome::Close(code, e.reason())
}

impl Session {
    /// Right after the upgrade: authenticates from the request's `token`,
    /// or anonymously, or starts waiting for a `connect` frame.
    pub fn open(
        rules: &Rules,
        place: Place,
        token: Option<&str>,
        peer: Option<IpAddr>,
        now: Instant,
        ports: &mut dyn Ports,
    ) -> (Session, Outcome) {
        let mut session = Session {
            user: None,
            claims: None,
            rooms: Vec::new(),
            joins: 0,
            bucket: TokenBucket::new(rules.rate_limit_per_s, rules.rate_limit_burst, now),
            deadline: None,
            rare: None,
            refused_user: false,
            refused_peer: false,
        };
        if let Some(ip) = peer {
            let req = Request::PeerOnline { ip, conn: place.me };
            ports.request(peer_home_shard(ip, place.shards), req);
            session.rare.get_or_insert_default().peer = Some(ip);
        }
        let outcome = match token {
            Some(t) => session.connect(rules, place, t, now, ports),
            None if rules.allow_anonymous => {
                let user = Arc::from(ports.anonymous_name());
                session.authenticate(place, user, None, None, ports);
                Outcome::Continue
            }
            None => {
                session.deadline = Some(now + rules.auth_timeout);
                Outcome::Continue
            }
        };
        (session, outcome)
    }

    /// The user, once authenticated.
    pub fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    /// When the connection must close unless the client acts first, with
    /// the close code and reason: 4001 while it has not authenticated,
    /// 4003 when its token expires without a `refresh`.
    /// The server API's disconnect closes with the code and reason it gave.
    pub fn deadline(&self) -> Option<(Instant, u16, Reason)> {
        let at = self.deadline?;
        let kicked = self.rare.as_ref().and_then(|r| r.kicked.as_ref());
        Some(if let Some((code, reason)) = kicked {
            (at, *code, Reason::Given(reason.clone()))
        } else if self.refused_peer {
            (
                at,
                close::TOO_MANY_FROM_ADDRESS,
                Reason::Fixed(TOO_MANY_FROM_ADDRESS),
            )
        } else if self.refused_user {
            (at, close::TOO_MANY_CONNECTIONS, Reason::Fixed(TOO_MANY))
        } else if self.user.is_none() {
            (at, close::AUTH_REQUIRED, Reason::Fixed(AUTH_TIMED_OUT))
        } else {
            (at, close::TOKEN_EXPIRED, Reason::Fixed(TOKEN_RAN_OUT))
        })
    }

    /// A token from the publish bucket of the namespace `prefix` (made full
    /// the first time, or when the namespace's rate changed).
    fn take_publish(&mut self, prefix: Box<str>, rate: Rate, now: Instant) -> bool {
        let buckets = &mut self.rare.get_or_insert_default().publish_buckets;
        let i = match buckets.iter().position(|(p, _)| *p == prefix) {
            Some(i) => i,
            None => {
                let b = TokenBucket::new(rate.per_s as f64, rate.burst as f64, now);
                buckets.push((prefix, b));
                buckets.len() - 1
            }
        };
        let bucket = &mut buckets[i].1;
        if !bucket.is(rate.per_s as f64, rate.burst as f64) {
            *bucket = TokenBucket::new(rate.per_s as f64, rate.burst as f64, now);
        }
        bucket.try_take(now)
    }

    /// The server API disconnects this connection: its deadline becomes
    /// now, with the API's close code and reason.
    pub fn disconnect(&mut self, code: u16, reason: Arc<str>, now: Instant) {
        self.rare.get_or_insert_default().kicked = Some((code, reason));
        self.deadline = Some(now);
    }

    /// The server API takes this connection out of `room`, as if the client
    /// had left it (answered `left` with `"by":"server"`); false if it was
    /// not in the room.
    pub fn unsubscribe(&mut self, place: Place, room: &str, ports: &mut dyn Ports) -> bool {
        let Some(user) = self.user.clone() else {
            return false;
        };
        let Some(i) = self.rooms.iter().position(|e| *e.room == *room) else {
            return false;
        };
        let entry = self.rooms.swap_remove(i);
        // A join still in flight is undone when its confirmation arrives.
        if entry.joined {
            leave_joined(place, entry.room.clone(), user, ports);
        }
        ports.reply(&proto::unsubscribed(&entry.room));
        true
    }

    /// A home refused this connection ([`Request::UserOnline`] over the
    /// per-user cap, [`Request::PeerOnline`] over the per-address cap): its
    /// deadline is now, with the refusal's close code.
    pub fn refuse(&mut self, why: Refusal, now: Instant) {
        match why {
            Refusal::TooManyForUser => self.refused_user = true,
            Refusal::TooManyForAddress => self.refused_peer = true,
        }
        self.deadline = Some(now);
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

    fn connect(
        &mut self,
        rules: &Rules,
        place: Place,
        token: &str,
        now: Instant,
        ports: &mut dyn Ports,
    ) -> Outcome {
        match verify(rules, token, now, ports) {
            Ok((claims, expires)) => {
                let user = Arc::from(claims.sub.as_str());
                self.authenticate(place, user, Some(claims), expires, ports);
                Outcome::Continue
            }
            Err(e) => {
                ports.count(Count::AuthFailed(e));
                auth_close(e)
            }
        }
    }

    fn authenticate(
        &mut self,
        place: Place,
        user: Arc<str>,
        claims: Option<Claims>,
        expires: Option<Instant>,
        ports: &mut dyn Ports,
    ) {
        self.deadline = expires;
        self.claims = claims.map(Box::new);
        ports.add_local_user(&user);
        ports.request(
            user_home_shard(&user, place.shards),
            Request::UserOnline {
                user: user.clone(),
                shard: place.me.shard,
                conn: place.me,
            },
        );
        let conn_id = format!("{}.{}", place.me.shard, place.me.key);
        ports.reply(&proto::welcome(&user, &conn_id));
        self.user = Some(user);
    }

    /// Handles one text message from the client.
    pub fn text(
        &mut self,
        rules: &Rules,
        place: Place,
        text: &[u8],
        now: Instant,
        ports: &mut dyn Ports,
    ) -> Outcome {
        if !self.bucket.try_take(now) {
            ports.count(Count::RateLimited);
            ports.reply(&proto::error(ErrorCode::RateLimited, None, None));
            return Outcome::Continue;
        }
        let Ok(frame) = ClientFrame::parse(text) else {
            if self.user.is_none() {
                return Outcome::Close(close::AUTH_REQUIRED, SEND_CONNECT_FIRST);
            }
            return refuse(ports, ErrorCode::BadRequest, None, None);
        };
        let Some(user) = self.user.clone() else {
            return match frame {
                ClientFrame::Connect { token } => self.connect(rules, place, &token, now, ports),
                _ => Outcome::Close(close::AUTH_REQUIRED, SEND_CONNECT_FIRST),
            };
        };
        let me = place.me;
        let room_home = |room: &str| home_shard(room, place.shards);
        // A room named by join, history or presence: a valid name, and one the
        // token's claims let this user join.
        // In a namespace with `join_requires_claim`, only a token whose
        // `rooms` claim lists the room.
        let may_read = |room: &str, ports: &mut dyn Ports| {
            if !proto::valid_room(room) {
                return Err(refuse(ports, ErrorCode::InvalidRoom, None, None));
            }
            if !may_enter(rules, self.claims.as_deref(), room) {
                return Err(refuse(ports, ErrorCode::Forbidden, None, Some(room)));
            }
            Ok(())
        };
        match frame {
            ClientFrame::Connect { .. } => {
                refuse(ports, ErrorCode::AlreadyAuthenticated, None, None)
            }
            ClientFrame::Refresh { token } => self.refresh(rules, place, &user, &token, now, ports),
            ClientFrame::Join { room, since } => {
                if let Err(refused) = may_read(&room, ports) {
                    return refused;
                }
                if self.rooms.iter().any(|e| *e.room == *room) {
                    return refuse(ports, ErrorCode::AlreadyJoined, None, Some(&room));
                }
                if self.rooms.len() >= rules.max_rooms_per_connection {
                    return refuse(ports, ErrorCode::TooManyRooms, None, Some(&room));
                }
                let room: Arc<str> = Arc::from(&*room);
                self.joins = self.joins.wrapping_add(1);
                let nonce = self.joins;
                self.rooms.push(RoomEntry {
                    room: room.clone(),
                    joined: false,
                    nonce,
                });
                let req = Request::Join {
                    room: room.clone(),
                    user,
                    conn: me,
                    since: since.map(|(seq, epoch)| (seq, epoch.into())),
                    nonce,
                    parked: false,
                };
                ports.request(room_home(&room), req);
                Outcome::Continue
            }
            ClientFrame::Leave { room } => {
                let Some(i) = self.rooms.iter().position(|e| *e.room == *room) else {
                    return refuse(ports, ErrorCode::NotJoined, None, Some(&room));
                };
                let entry = self.rooms.swap_remove(i);
                // A join still in flight is undone when its confirmation arrives.
                if entry.joined {
                    leave_joined(place, entry.room.clone(), user, ports);
                }
                ports.reply(&proto::left(&entry.room));
                Outcome::Continue
            }
            ClientFrame::Publish { room, id, body } => {
                let id = id.as_deref().unwrap_or("");
                if id.len() > proto::MAX_ID_BYTES {
                    return refuse(ports, ErrorCode::InvalidId, None, Some(&room));
                }
                let Some(entry) = self.rooms.iter().find(|e| *e.room == *room) else {
                    return refuse(ports, ErrorCode::NotJoined, Some(id), Some(&room));
                };
                let room_name = entry.room.clone();
                if self.claims.as_ref().is_some_and(|c| !c.may_publish(&room)) {
                    return refuse(ports, ErrorCode::Forbidden, Some(id), Some(&room));
                }
                let (client_publish, max_body, rate) = {
                    let table = rules.namespaces.load();
                    let ns = table.of(&room);
                    let rate = ns.publish_rate.map(|r| (ns.prefix.clone(), r));
                    (ns.client_publish, ns.max_body_bytes, rate)
                };
                if !client_publish {
                    return refuse(ports, ErrorCode::ReadOnly, Some(id), Some(&room));
                }
                if body.get().len() > max_body {
                    return refuse(ports, ErrorCode::BodyTooLarge, Some(id), Some(&room));
                }
                if let Some((prefix, rate)) = rate {
                    if !self.take_publish(prefix, rate, now) {
                        ports.count(Count::RateLimited);
                        return refuse(ports, ErrorCode::RateLimited, Some(id), Some(&room));
                    }
                }
                let room = room_name;
                let publish = Publish {
                    room: room.clone(),
                    user,
                    id: id.into(),
                    body: body.get().into(),
                    conn: me,
                    hops: 0,
                };
                ports.request(room_home(&room), Request::Publish(publish));
                Outcome::Continue
            }
            ClientFrame::Dm { to, id, body } => {
                let id = id.as_deref().unwrap_or("");
                if id.len() > proto::MAX_ID_BYTES {
                    return refuse(ports, ErrorCode::InvalidId, None, None);
                }
                if to.is_empty() || to.len() > MAX_SUBJECT_BYTES || to.chars().any(char::is_control)
                {
                    return refuse(ports, ErrorCode::BadRequest, Some(id), None);
                }
                if body.get().len() > rules.max_body_bytes {
                    return refuse(ports, ErrorCode::BodyTooLarge, Some(id), None);
                }
                let to: Arc<str> = Arc::from(&*to);
                let req = Request::Direct {
                    to: to.clone(),
                    from: user,
                    id: id.into(),
                    body: body.get().into(),
                    conn: me,
                };
                ports.request(user_home_shard(&to, place.shards), req);
                Outcome::Continue
            }
            ClientFrame::History { room, since, limit } => {
                if let Err(refused) = may_read(&room, ports) {
                    return refused;
                }
                let max = rules.history_max_limit;
                let n = limit.map_or(max.min(100), |l| (l as usize).min(max));
                let query = match since {
                    Some(after) => Query::After { after, n },
                    None => Query::Last(n),
                };
                let room: Arc<str> = Arc::from(&*room);
                let req = Request::History {
                    room: room.clone(),
                    query,
                    conn: me,
                };
                ports.request(room_home(&room), req);
                Outcome::Continue
            }
            ClientFrame::Presence { room } => {
                if let Err(refused) = may_read(&room, ports) {
                    return refused;
                }
                let room: Arc<str> = Arc::from(&*room);
                let req = Request::Presence {
                    room: room.clone(),
                    conn: me,
                };
                ports.request(room_home(&room), req);
                Outcome::Continue
            }
        }
    }

    /// A new token for the same user: its expiry replaces the old one's and
    /// its room claims apply from now on, so joined rooms it does not allow
    /// are left (each answered `left`, as if the client had left them).
    fn refresh(
        &mut self,
        rules: &Rules,
        place: Place,
        user: &Arc<str>,
        token: &str,
        now: Instant,
        ports: &mut dyn Ports,
    ) -> Outcome {
        let (claims, expires) = match verify(rules, token, now, ports) {
            Ok(v) => v,
            Err(e) => {
                ports.count(Count::AuthFailed(e));
                return refuse(ports, ErrorCode::InvalidToken, None, None);
            }
        };
        // An anonymous session holds no token to replace.
        if *claims.sub != **user || self.claims.is_none() {
            return refuse(ports, ErrorCode::TokenUserMismatch, None, None);
        }
        let mut i = 0;
        while i < self.rooms.len() {
            if may_enter(rules, Some(&claims), &self.rooms[i].room) {
                i += 1;
                continue;
            }
            let entry = self.rooms.swap_remove(i);
            if entry.joined {
                leave_joined(place, entry.room.clone(), user.clone(), ports);
            }
            ports.reply(&proto::left(&entry.room));
        }
        self.deadline = expires;
        ports.reply(&proto::refreshed(claims.exp));
        self.claims = Some(Box::new(claims));
        Outcome::Continue
    }

    /// The connection is going away: leave its rooms, go offline.
    pub fn close(self, place: Place, ports: &mut dyn Ports) {
        let peer = self.rare.as_ref().and_then(|r| r.peer);
        if let (Some(ip), false) = (peer, self.refused_peer) {
            ports.request(
                peer_home_shard(ip, place.shards),
                Request::PeerOffline { ip },
            );
        }
        let Some(user) = self.user else { return };
        for entry in self.rooms {
            if entry.joined {
                leave_joined(place, entry.room, user.clone(), ports);
            }
        }
        ports.remove_local_user(&user);
        if self.refused_user {
            // Never counted online at the user's home.
            return;
        }
        let home = user_home_shard(&user, place.shards);
        let req = Request::UserOffline {
            user,
            shard: place.me.shard,
        };
        ports.request(home, req);
    }
}

/// Answers the frame with an `error` frame; the connection goes on.
fn refuse(ports: &mut dyn Ports, code: ErrorCode, id: Option<&str>, room: Option<&str>) -> Outcome {
    ports.count(Count::Error);
    ports.reply(&proto::error(code, id, room));
    Outcome::Continue
}

/// Leaves a room the home confirmed: local membership now, the home's count
/// through a request.
/// May a connection with these claims (`None`: anonymous) be in `room`?
/// Its token's `rooms` claim must allow it, and in a namespace with
/// `join_requires_claim` the token must have a `rooms` claim that matches
/// it (an exact name or a pattern such as `notify:*`).
fn may_enter(rules: &Rules, claims: Option<&Claims>, room: &str) -> bool {
    let requires = || rules.namespaces.load().of(room).join_requires_claim;
    match claims {
        Some(c) => c.may_join(room) && (c.rooms.is_some() || !requires()),
        None => !requires(),
    }
}

fn leave_joined(place: Place, room: Arc<str>, user: Arc<str>, ports: &mut dyn Ports) {
    ports.remove_local_member(&room);
    let home = home_shard(&room, place.shards);
    let req = Request::Leave {
        room,
        user,
        shard: place.me.shard,
    };
    ports.request(home, req);
}

#[cfg(test)]
mod tests;
