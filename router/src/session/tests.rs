//! A session without sockets or executors: client frames in, effects
//! recorded by [`Rec`].

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::*;
use crate::auth::mint;
use crate::namespace::{Namespace, Table};

const SECRET: &[u8] = b"a test secret that is long enough, 32+ bytes";
const SHARDS: usize = 4;
/// Wall clock 2026-01-01 (tokens are checked against it).
const UNIX_S: u64 = 1_767_225_600;

fn rules() -> Rules {
    Rules {
        verifier: Some(Verifier::new(SECRET, 0)),
        allow_anonymous: false,
        max_rooms_per_connection: 2,
        rate_limit_per_s: 1.0,
        rate_limit_burst: 1000.0,
        max_body_bytes: 64,
        namespaces: Namespaces::new(Table::new(
            Namespace::default_with(1000, 64),
            vec![
                Namespace {
                    prefix: "ro:".into(),
                    client_publish: false,
                    ..Namespace::default_with(1000, 64)
                },
                Namespace {
                    prefix: "priv:".into(),
                    join_requires_claim: true,
                    ..Namespace::default_with(1000, 64)
                },
                Namespace {
                    prefix: "small:".into(),
                    ..Namespace::default_with(1000, 4)
                },
                Namespace {
                    prefix: "slow:".into(),
                    publish_rate: Some(crate::namespace::Rate { per_s: 1, burst: 2 }),
                    ..Namespace::default_with(1000, 64)
                },
            ],
        )),
        history_max_limit: 500,
        auth_timeout: Duration::from_secs(5),
    }
}

const ME: ConnRef = ConnRef {
    node: 7,
    shard: 1,
    key: 42,
    gen: 3,
};

fn place() -> Place {
    Place {
        me: ME,
        shards: SHARDS,
    }
}

fn token(sub: &str, rooms: Option<&[&str]>, publish: Option<&[&str]>) -> String {
    let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    let claims = Claims {
        sub: sub.into(),
        exp: Some(UNIX_S + 60),
        rooms: rooms.map(list),
        publish: publish.map(list),
        ..Claims::default()
    };
    mint(SECRET, &claims)
}

/// Every effect the session had, in order.
#[derive(Default)]
struct Rec {
    replies: Vec<Value>,
    requests: Vec<(usize, Request)>,
    users: Vec<String>,
    removed_members: Vec<String>,
    counts: Vec<Count>,
    anonymous: u32,
}

impl Ports for Rec {
    fn reply(&mut self, frame: &[u8]) {
        // One unmasked server text frame, under 64 KiB.
        assert_eq!(frame[0], 0x81);
        let (len, header) = match frame[1] & 0x7f {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => panic!("replies here are short"),
            n => (n as usize, 2),
        };
        assert_eq!(frame.len(), header + len, "one frame");
        let json = serde_json::from_slice(&frame[header..]).unwrap();
        self.replies.push(json);
    }
    fn request(&mut self, to: usize, req: Request) {
        self.requests.push((to, req));
    }
    fn add_local_user(&mut self, user: &Arc<str>) {
        self.users.push(user.to_string());
    }
    fn remove_local_user(&mut self, user: &str) {
        self.users.retain(|u| u != user);
    }
    fn remove_local_member(&mut self, room: &str) {
        self.removed_members.push(room.into());
    }
    fn anonymous_name(&mut self) -> String {
        self.anonymous += 1;
        format!("anon-{}", self.anonymous)
    }
    fn count(&mut self, what: Count) {
        self.counts.push(what);
    }
    fn unix_s(&mut self) -> u64 {
        UNIX_S
    }
}

/// One connection's session, its clock and what it did.
struct Client {
    rules: Rules,
    at: Instant,
    s: Session,
    rec: Rec,
}

impl Client {
    /// Opens a session with `token` in the upgrade request.
    fn open(rules: Rules, token: Option<&str>) -> (Client, Outcome) {
        let (at, mut rec) = (Instant::now(), Rec::default());
        let (s, out) = Session::open(&rules, place(), token, None, at, &mut rec);
        (Client { rules, at, s, rec }, out)
    }

    /// A session authenticated as `sub`, with these room patterns.
    fn authed(sub: &str, rooms: Option<&[&str]>, publish: Option<&[&str]>) -> Client {
        let t = token(sub, rooms, publish);
        let (c, out) = Client::open(rules(), Some(&t));
        assert_eq!(out, Outcome::Continue);
        c
    }

    fn send(&mut self, frame: &str) -> Outcome {
        let Client { rules, at, s, rec } = self;
        s.text(rules, place(), frame.as_bytes(), *at, rec)
    }

    fn last_error(&self) -> Option<&str> {
        let last = self.rec.replies.last();
        last.filter(|v| v["type"] == "error")
            .and_then(|v| v["code"].as_str())
    }

    fn last_request(&self) -> &(usize, Request) {
        self.rec.requests.last().expect("a request")
    }

    /// Sends each frame and checks the error it gets (`None`: no reply at
    /// all, the home answers it).
    fn expect(&mut self, cases: &[(&str, Option<&str>)]) {
        for (frame, error) in cases {
            let before = self.rec.replies.len();
            assert_eq!(self.send(frame), Outcome::Continue, "{frame}");
            match error {
                Some(code) => assert_eq!(self.last_error(), Some(*code), "{frame}"),
                None => assert_eq!(self.rec.replies.len(), before, "{frame}: no reply"),
            }
        }
    }

    fn user(&self) -> Option<&str> {
        self.s.user().map(|u| &**u)
    }
}

#[test]
fn a_token_in_the_request_authenticates_at_once() {
    let c = Client::authed("alice", None, None);
    assert_eq!(c.user(), Some("alice"));
    assert_eq!(
        c.s.deadline().map(|d| d.0),
        Some(c.at + Duration::from_secs(60)),
        "exp"
    );
    assert_eq!(c.rec.replies.len(), 1);
    let welcome = &c.rec.replies[0];
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["conn"], "1.42");
    assert_eq!(c.rec.users, ["alice"]);
    let (to, req) = &c.rec.requests[0];
    assert_eq!(*to, user_home_shard("alice", SHARDS));
    assert!(
        matches!(req, Request::UserOnline { user, shard: 1, conn } if &**user == "alice" && *conn == ME)
    );
}

#[test]
fn a_bad_token_closes_with_its_own_code() {
    let claims = |exp| Claims {
        sub: "bob".into(),
        exp,
        ..Claims::default()
    };
    let expired = mint(SECRET, &claims(Some(UNIX_S - 1)));
    let forged = mint(b"another secret, also 32 bytes or more", &claims(None));
    let cases = [
        (expired.as_str(), close::TOKEN_EXPIRED, AuthError::Expired),
        (&forged, close::INVALID_TOKEN, AuthError::BadSignature),
        ("not.a.token", close::INVALID_TOKEN, AuthError::Malformed),
    ];
    for (t, code, error) in cases {
        let (c, out) = Client::open(rules(), Some(t));
        assert!(
            matches!(out, Outcome::Close(x, _) if x == code),
            "{t}: {out:?}"
        );
        assert_eq!(c.rec.counts, [Count::AuthFailed(error)], "{t}");
        assert!(c.user().is_none() && c.rec.requests.is_empty() && c.rec.replies.is_empty());
    }
    // No secret configured: no token passes.
    let no_secret = Rules {
        verifier: None,
        ..rules()
    };
    let t = token("alice", None, None);
    let (_, out) = Client::open(no_secret, Some(&t));
    assert!(matches!(out, Outcome::Close(close::INVALID_TOKEN, _)));
}

#[test]
fn without_a_token_only_connect_is_accepted_before_the_deadline() {
    let (mut c, out) = Client::open(rules(), None);
    assert_eq!(out, Outcome::Continue);
    assert_eq!(
        c.s.deadline(),
        Some((
            c.at + c.rules.auth_timeout,
            close::AUTH_REQUIRED,
            Reason::Fixed(AUTH_TIMED_OUT)
        ))
    );
    assert!(c.rec.replies.is_empty() && c.rec.requests.is_empty());
    // Anything but connect closes with 4001, garbage too.
    for frame in [r#"{"type":"join","room":"r"}"#, "not json"] {
        let (mut other, _) = Client::open(rules(), None);
        let out = other.send(frame);
        assert!(
            matches!(out, Outcome::Close(close::AUTH_REQUIRED, _)),
            "{frame}"
        );
    }
    let connect = format!(
        r#"{{"type":"connect","token":"{}"}}"#,
        token("carol", None, None)
    );
    assert_eq!(c.send(&connect), Outcome::Continue);
    assert_eq!(c.user(), Some("carol"));
    assert_eq!(c.s.deadline().map(|d| d.1), Some(close::TOKEN_EXPIRED));
    assert_eq!(c.rec.replies.last().unwrap()["type"], "welcome");
    // A second connect is an error, not a new identity.
    c.expect(&[(&connect, Some("already_authenticated"))]);
    assert_eq!(c.user(), Some("carol"));
}

#[test]
fn anonymous_mode_names_each_user() {
    let rules = Rules {
        allow_anonymous: true,
        ..rules()
    };
    let (at, mut rec) = (Instant::now(), Rec::default());
    let (a, _) = Session::open(&rules, place(), None, None, at, &mut rec);
    let (b, _) = Session::open(&rules, place(), None, None, at, &mut rec);
    assert_eq!(a.user().map(|u| &**u), Some("anon-1"));
    assert_eq!(b.user().map(|u| &**u), Some("anon-2"));
    assert_eq!(a.deadline(), None, "anonymous users hold no token");
    // Nor can they take one on, even one for their own name.
    let mut c = Client {
        rules,
        at,
        s: a,
        rec,
    };
    let own = mint(
        SECRET,
        &Claims {
            sub: "anon-1".into(),
            ..Claims::default()
        },
    );
    c.expect(&[(
        &format!(r#"{{"type":"refresh","token":"{own}"}}"#),
        Some("token_user_mismatch"),
    )]);
}

#[test]
fn joins_are_checked_then_asked_of_the_rooms_home() {
    let mut c = Client::authed("dave", Some(&["team-*"]), None);
    c.expect(&[
        (r#"{"type":"join","room":""}"#, Some("invalid_room")),
        (r#"{"type":"join","room":"other"}"#, Some("forbidden")),
        (r#"{"type":"join","room":"team-a"}"#, None),
        (r#"{"type":"join","room":"team-a"}"#, Some("already_joined")),
        (
            r#"{"type":"join","room":"team-b","since":5,"epoch":"e1"}"#,
            None,
        ),
        (r#"{"type":"join","room":"team-c"}"#, Some("too_many_rooms")),
    ]);
    let joins: Vec<_> = c
        .rec
        .requests
        .iter()
        .filter_map(|(to, r)| match r {
            Request::Join {
                room,
                since,
                nonce,
                conn,
                ..
            } => Some((*to, &**room, since.clone(), *nonce, *conn)),
            _ => None,
        })
        .collect();
    assert_eq!(
        joins,
        [
            (home_shard("team-a", SHARDS), "team-a", None, 1, ME),
            (
                home_shard("team-b", SHARDS),
                "team-b",
                Some((5, "e1".into())),
                2,
                ME
            ),
        ],
        "each join has its own nonce"
    );
    let errors = c.rec.counts.iter().filter(|x| **x == Count::Error).count();
    assert_eq!(errors, 4);
}

#[test]
fn a_leave_before_the_home_confirmed_undoes_nothing_locally() {
    let (join, leave) = (
        r#"{"type":"join","room":"r"}"#,
        r#"{"type":"leave","room":"r"}"#,
    );
    let mut c = Client::authed("alice", None, None);
    c.send(join);
    assert!(c.s.awaits_join("r", 1));
    c.send(leave);
    assert_eq!(c.rec.replies.last().unwrap()["type"], "left");
    assert!(c.rec.removed_members.is_empty());
    let left = |c: &Client| {
        c.rec
            .requests
            .iter()
            .any(|(_, r)| matches!(r, Request::Leave { .. }))
    };
    assert!(!left(&c), "the home never counted the join");
    // The confirmation that arrives now is not wanted: the caller undoes it.
    assert!(!c.s.mark_joined("r", 1));
    // Joined again: the old nonce is stale, the new one is wanted.
    c.send(join);
    assert!(!c.s.mark_joined("r", 1));
    assert!(c.s.mark_joined("r", 2));
    assert!(!c.s.awaits_join("r", 2), "confirmed");
    c.send(leave);
    assert_eq!(c.rec.removed_members, ["r"]);
    let (to, req) = c.last_request();
    assert_eq!(*to, home_shard("r", SHARDS));
    assert!(matches!(req, Request::Leave { room, user, shard: 1 }
        if &**room == "r" && &**user == "alice"));
    c.expect(&[(leave, Some("not_joined"))]);
}

#[test]
fn namespaces_decide_who_publishes_joins_and_how_much() {
    let mut c = Client::authed("alice", None, None);
    c.send(r#"{"type":"join","room":"ro:news"}"#);
    c.send(r#"{"type":"join","room":"small:x"}"#);
    assert!(c.s.mark_joined("ro:news", 1) && c.s.mark_joined("small:x", 2));
    c.expect(&[
        (
            r#"{"type":"publish","room":"ro:news","body":1}"#,
            Some("read_only"),
        ),
        (
            r#"{"type":"publish","room":"small:x","body":"12345"}"#,
            Some("body_too_large"),
        ),
        (r#"{"type":"publish","room":"small:x","body":12}"#, None),
        // Without a rooms claim, not a room that requires one.
        (r#"{"type":"join","room":"priv:a"}"#, Some("forbidden")),
        (r#"{"type":"presence","room":"priv:a"}"#, Some("forbidden")),
    ]);
    // A token that lists it may.
    let mut d = Client::authed("dana", Some(&["priv:*"]), None);
    d.expect(&[(r#"{"type":"join","room":"priv:a"}"#, None)]);
}

#[test]
fn a_namespace_rate_limits_each_connections_publishes_to_it() {
    let mut c = Client::authed("alice", None, None);
    c.rules.max_rooms_per_connection = 8;
    for (room, nonce) in [("slow:a", 1), ("slow:b", 2), ("fast", 3)] {
        c.send(&format!(r#"{{"type":"join","room":"{room}"}}"#));
        assert!(c.s.mark_joined(room, nonce));
    }
    // A burst of two over all of the namespace's rooms, then refused; other
    // rooms are not held back.
    c.expect(&[
        (r#"{"type":"publish","room":"slow:a","body":1}"#, None),
        (r#"{"type":"publish","room":"slow:b","body":1}"#, None),
        (
            r#"{"type":"publish","room":"slow:a","id":"x","body":1}"#,
            Some("rate_limited"),
        ),
        (r#"{"type":"publish","room":"fast","body":1}"#, None),
    ]);
    // A second later one more token.
    c.at += Duration::from_secs(1);
    c.expect(&[(r#"{"type":"publish","room":"slow:b","body":1}"#, None)]);
    assert!(c.rec.counts.contains(&Count::RateLimited));
}

#[test]
fn the_server_api_unsubscribes_and_disconnects() {
    let mut c = Client::authed("alice", None, None);
    c.send(r#"{"type":"join","room":"r"}"#);
    assert!(c.s.mark_joined("r", 1));
    assert!(!c.s.unsubscribe(place(), "elsewhere", &mut c.rec));
    assert!(c.s.unsubscribe(place(), "r", &mut c.rec));
    let left = c.rec.replies.last().unwrap();
    assert_eq!(
        (left["type"].as_str(), left["by"].as_str()),
        (Some("left"), Some("server"))
    );
    assert_eq!(c.rec.removed_members, ["r"]);
    assert!(matches!(&c.last_request().1, Request::Leave { room, .. } if &**room == "r"));
    // Out of the room: a publish to it is refused as for a client that left.
    c.expect(&[(
        r#"{"type":"publish","room":"r","body":1}"#,
        Some("not_joined"),
    )]);
    // A disconnect is a deadline of now with the API's code and reason.
    let now = c.at + Duration::from_secs(1);
    c.s.disconnect(4100, "banned".into(), now);
    let (at, code, reason) = c.s.deadline().unwrap();
    assert_eq!((at, code, &*reason), (now, 4100, "banned"));
}

#[test]
fn publishes_are_checked_then_asked_of_the_rooms_home() {
    let mut c = Client::authed("erin", None, Some(&["loud"]));
    c.send(r#"{"type":"join","room":"quiet"}"#);
    c.send(r#"{"type":"join","room":"loud"}"#);
    let long_id = "i".repeat(proto::MAX_ID_BYTES + 1);
    let big = "b".repeat(c.rules.max_body_bytes);
    let publish = |room: &str, id: &str, body: &str| {
        format!(r#"{{"type":"publish","room":"{room}","id":"{id}","body":{body}}}"#)
    };
    c.expect(&[
        (&publish("elsewhere", "1", "1"), Some("not_joined")),
        (&publish("quiet", "2", "1"), Some("forbidden")),
        (&publish("loud", &long_id, "1"), Some("invalid_id")),
        (
            &publish("loud", "3", &format!("\"{big}\"")),
            Some("body_too_large"),
        ),
        (&publish("loud", "4", r#"{"t":"hi"}"#), None),
    ]);
    let publishes: Vec<_> = c
        .rec
        .requests
        .iter()
        .filter_map(|(to, r)| match r {
            Request::Publish(p) => Some((*to, p)),
            _ => None,
        })
        .collect();
    assert_eq!(publishes.len(), 1);
    let (to, p) = publishes[0];
    assert_eq!(to, home_shard("loud", SHARDS));
    assert_eq!((&*p.room, &*p.user, &*p.id), ("loud", "erin", "4"));
    assert_eq!(&*p.body, r#"{"t":"hi"}"#);
    assert_eq!((p.conn, p.hops), (ME, 0));
}

#[test]
fn the_rate_limit_answers_rate_limited_and_refills() {
    let t = token("alice", None, None);
    let rules = Rules {
        rate_limit_per_s: 10.0,
        rate_limit_burst: 2.0,
        ..rules()
    };
    let (mut c, _) = Client::open(rules, Some(&t));
    let presence = r#"{"type":"presence","room":"r"}"#;
    c.expect(&[(presence, None), (presence, None)]);
    assert_eq!(
        c.send(presence),
        Outcome::Continue,
        "rate limiting never closes"
    );
    assert_eq!(c.last_error(), Some("rate_limited"));
    assert_eq!(c.rec.counts, [Count::RateLimited]);
    let asked = |c: &Client| {
        let presence = |r: &&(usize, Request)| matches!(r.1, Request::Presence { .. });
        c.rec.requests.iter().filter(presence).count()
    };
    assert_eq!(asked(&c), 2);
    // A tenth of a second later one more frame is allowed.
    c.at += Duration::from_millis(100);
    c.expect(&[(presence, None)]);
    assert_eq!(asked(&c), 3);
}

#[test]
fn direct_messages_go_to_the_users_home() {
    let mut c = Client::authed("alice", None, None);
    let dm = |to: &str, id: &str, body: &str| {
        format!(r#"{{"type":"dm","to":"{to}","id":"{id}","body":"{body}"}}"#)
    };
    let (long_to, big) = ("u".repeat(MAX_SUBJECT_BYTES + 1), "b".repeat(64));
    c.expect(&[
        (&dm("", "1", "x"), Some("bad_request")),
        (&dm(&long_to, "2", "x"), Some("bad_request")),
        (&dm("bob", "3", &big), Some("body_too_large")),
        (&dm("bob", "4", "hey"), None),
    ]);
    assert_eq!(c.rec.requests.len(), 2, "online, then the one good dm");
    let (to, req) = c.last_request();
    assert_eq!(*to, user_home_shard("bob", SHARDS));
    assert!(matches!(req, Request::Direct { to, from, id, .. }
        if &**to == "bob" && &**from == "alice" && &**id == "4"));
}

#[test]
fn history_limits_are_clamped_and_permissions_checked() {
    let mut c = Client::authed("frank", Some(&["mine"]), None);
    let cases = [
        (r#"{"type":"history","room":"mine"}"#, Query::Last(100)),
        (
            r#"{"type":"history","room":"mine","limit":7}"#,
            Query::Last(7),
        ),
        (
            r#"{"type":"history","room":"mine","limit":100000}"#,
            Query::Last(500),
        ),
        (
            r#"{"type":"history","room":"mine","since":9,"limit":3}"#,
            Query::After { after: 9, n: 3 },
        ),
    ];
    for (frame, want) in cases {
        c.send(frame);
        let (to, req) = c.last_request();
        assert_eq!(*to, home_shard("mine", SHARDS));
        assert!(
            matches!(req, Request::History { query, .. } if *query == want),
            "{frame}: {req:?}"
        );
    }
    c.expect(&[
        (r#"{"type":"history","room":"theirs"}"#, Some("forbidden")),
        (r#"{"type":"presence","room":"theirs"}"#, Some("forbidden")),
    ]);
}

#[test]
fn closing_leaves_the_joined_rooms_and_goes_offline() {
    let mut c = Client::authed("alice", None, None);
    c.send(r#"{"type":"join","room":"a"}"#);
    c.send(r#"{"type":"join","room":"b"}"#);
    assert!(c.s.mark_joined("a", 1));
    let Client { s, mut rec, .. } = c;
    rec.requests.clear();
    s.close(place(), &mut rec);
    assert_eq!(rec.removed_members, ["a"], "b was still joining");
    assert!(rec.users.is_empty());
    assert_eq!(rec.requests.len(), 2);
    assert!(matches!(&rec.requests[0].1, Request::Leave { room, .. } if &**room == "a"));
    let (to, off) = &rec.requests[1];
    assert_eq!(*to, user_home_shard("alice", SHARDS));
    assert!(matches!(off, Request::UserOffline { user, shard: 1 } if &**user == "alice"));
    // A session that never authenticated leaves nothing to undo.
    let (Client { s, mut rec, .. }, _) = Client::open(rules(), None);
    s.close(place(), &mut rec);
    assert!(rec.requests.is_empty());
}

#[test]
fn garbage_after_authentication_is_a_bad_request() {
    let mut c = Client::authed("alice", None, None);
    c.expect(&[
        ("{", Some("bad_request")),
        (r#"{"type":"nope"}"#, Some("bad_request")),
        (r#"{"type":"join"}"#, Some("bad_request")),
    ]);
}

/// A token for `sub` that expires `ttl_s` after [`UNIX_S`] (`None`: never).
fn token_for(sub: &str, ttl_s: Option<u64>, rooms: Option<&[&str]>) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: ttl_s.map(|t| UNIX_S + t),
        rooms: rooms.map(|l| l.iter().map(|s| s.to_string()).collect()),
        ..Claims::default()
    };
    mint(SECRET, &claims)
}

fn refresh(token: &str) -> String {
    format!(r#"{{"type":"refresh","token":"{token}"}}"#)
}

#[test]
fn a_token_expires_at_exp_plus_the_leeway() {
    let leeway = Rules {
        verifier: Some(Verifier::new(SECRET, 5)),
        ..rules()
    };
    let cases = [
        (rules(), Some(60), Some(60)),
        (leeway.clone(), Some(60), Some(65)),
        (leeway, Some(0), Some(5)),
        (rules(), None, None),
    ];
    for (rules, ttl, expires_in) in cases {
        let t = token_for("alice", ttl, None);
        let (c, out) = Client::open(rules, Some(&t));
        assert_eq!(out, Outcome::Continue);
        let want = expires_in.map(|s| {
            (
                c.at + Duration::from_secs(s),
                close::TOKEN_EXPIRED,
                Reason::Fixed(TOKEN_RAN_OUT),
            )
        });
        assert_eq!(c.s.deadline(), want, "ttl {ttl:?}");
    }
}

#[test]
fn refresh_moves_the_expiry_and_only_for_the_same_user() {
    let mut c = Client::authed("alice", None, None);
    let first = c.s.deadline();
    // Refused: the session keeps its expiry and goes on.
    let cases = [
        (
            refresh(&token_for("mallory", Some(600), None)),
            "token_user_mismatch",
        ),
        (refresh(&token_for("alice", Some(0), None)), "invalid_token"),
        (refresh("not.a.token"), "invalid_token"),
    ];
    for (frame, code) in &cases {
        c.expect(&[(frame, Some(code))]);
        assert_eq!(c.s.deadline(), first, "{code}");
    }
    let failed: Vec<_> = c
        .rec
        .counts
        .iter()
        .filter(|x| matches!(x, Count::AuthFailed(_)))
        .collect();
    assert_eq!(
        failed,
        [
            &Count::AuthFailed(AuthError::Expired),
            &Count::AuthFailed(AuthError::Malformed)
        ]
    );
    assert_eq!(
        c.send(&refresh(&token_for("alice", Some(600), None))),
        Outcome::Continue
    );
    let last = c.rec.replies.last().unwrap();
    assert_eq!(
        (&last["type"], &last["exp"]),
        (&Value::from("refreshed"), &Value::from(UNIX_S + 600))
    );
    assert_eq!(
        c.s.deadline().map(|d| d.0),
        Some(c.at + Duration::from_secs(600))
    );
    // A token without exp: the connection no longer expires.
    c.send(&refresh(&token_for("alice", None, None)));
    assert_eq!(c.rec.replies.last().unwrap()["exp"], Value::Null);
    assert_eq!(c.s.deadline(), None);
    // Before authentication a refresh is like any frame but connect.
    let (mut anonymous, _) = Client::open(rules(), None);
    let out = anonymous.send(&refresh(&token_for("alice", Some(600), None)));
    assert!(matches!(out, Outcome::Close(close::AUTH_REQUIRED, _)));
}

#[test]
fn a_refreshed_tokens_room_claims_apply_from_then_on() {
    let t = token_for("alice", Some(60), Some(&["a", "b", "c"]));
    let (mut c, _) = Client::open(rules(), Some(&t));
    c.send(r#"{"type":"join","room":"a"}"#);
    c.send(r#"{"type":"join","room":"b"}"#);
    assert!(c.s.mark_joined("a", 1));
    c.rec.requests.clear();
    c.send(&refresh(&token_for("alice", Some(600), Some(&["b", "c"]))));
    // `a` is left as if the client had left it; `b` (still joining) stays.
    let types: Vec<_> = c
        .rec
        .replies
        .iter()
        .rev()
        .take(2)
        .map(|v| v["type"].clone())
        .collect();
    assert_eq!(types, ["refreshed", "left"]);
    assert_eq!(c.rec.replies[c.rec.replies.len() - 2]["room"], "a");
    assert_eq!(c.rec.removed_members, ["a"]);
    assert!(matches!(&c.rec.requests[..], [(_, Request::Leave { room, .. })] if &**room == "a"));
    assert!(c.s.awaits_join("b", 2));
    c.expect(&[
        (r#"{"type":"join","room":"a"}"#, Some("forbidden")),
        (r#"{"type":"join","room":"c"}"#, None),
    ]);
}

#[test]
fn a_connection_the_users_home_refused_closes_now_and_never_goes_offline() {
    let mut c = Client::authed("alice", None, None);
    c.send(r#"{"type":"join","room":"a"}"#);
    assert!(c.s.mark_joined("a", 1));
    let later = c.at + Duration::from_millis(5);
    c.s.refuse(Refusal::TooManyForUser, later);
    let (at, code, reason) = c.s.deadline().unwrap();
    assert_eq!((at, code), (later, close::TOO_MANY_CONNECTIONS));
    assert!(reason.contains("too many connections"), "{reason}");
    let Client { s, mut rec, .. } = c;
    rec.requests.clear();
    s.close(place(), &mut rec);
    assert_eq!(rec.removed_members, ["a"], "its rooms are left as usual");
    assert!(rec.users.is_empty(), "and the local user table forgets it");
    let offline = rec
        .requests
        .iter()
        .any(|(_, r)| matches!(r, Request::UserOffline { .. }));
    assert!(!offline, "the home never counted it");
}

#[test]
fn the_address_is_counted_at_its_home_and_released_unless_refused() {
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let home = peer_home_shard(ip, SHARDS);
    let peer_requests = |rec: &Rec| -> Vec<(usize, String)> {
        let r = rec.requests.iter().filter_map(|(to, r)| match r {
            Request::PeerOnline { ip, conn } if *conn == ME => Some((*to, format!("on {ip}"))),
            Request::PeerOffline { ip } => Some((*to, format!("off {ip}"))),
            _ => None,
        });
        r.collect()
    };
    // Counted at open, before any token, and released at close.
    let at = Instant::now();
    let mut rec = Rec::default();
    let (s, _) = Session::open(&rules(), place(), None, Some(ip), at, &mut rec);
    s.close(place(), &mut rec);
    let on_off = [
        (home, "on 192.0.2.7".to_string()),
        (home, "off 192.0.2.7".into()),
    ];
    assert_eq!(peer_requests(&rec), on_off);
    // Refused by the address's home: 4005, and nothing to release there.
    let mut rec = Rec::default();
    let t = token("alice", None, None);
    let (mut s, _) = Session::open(&rules(), place(), Some(&t), Some(ip), at, &mut rec);
    s.refuse(Refusal::TooManyForAddress, at);
    let (_, code, reason) = s.deadline().unwrap();
    assert_eq!(code, close::TOO_MANY_FROM_ADDRESS, "{reason}");
    s.close(place(), &mut rec);
    assert_eq!(peer_requests(&rec), [(home, "on 192.0.2.7".to_string())]);
    let offline = rec
        .requests
        .iter()
        .any(|(_, r)| matches!(r, Request::UserOffline { .. }));
    assert!(offline, "the user's home did count it: it is told");
    // Refused by the user's home only: the address's count is released.
    let mut rec = Rec::default();
    let (mut s, _) = Session::open(&rules(), place(), Some(&t), Some(ip), at, &mut rec);
    s.refuse(Refusal::TooManyForUser, at);
    s.close(place(), &mut rec);
    assert_eq!(peer_requests(&rec), on_off);
    // Without an address (no per-address cap) nothing is counted.
    let mut rec = Rec::default();
    let (s, _) = Session::open(&rules(), place(), None, None, at, &mut rec);
    s.close(place(), &mut rec);
    assert!(peer_requests(&rec).is_empty());
}

#[test]
fn a_session_stays_small() {
    // Every chat connection holds one (boxed). Until a per-address cap or
    // claims are in use it is this struct alone: keep it in a 128-byte
    // allocation (120 bytes plus the allocator's 8).
    let size = std::mem::size_of::<Session>();
    assert!(size <= 120, "Session is {size} bytes");
}
