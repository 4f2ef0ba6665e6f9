//! The HTTP side doors every port answers next to the WebSocket endpoints:
//! `/healthz` (the process runs), `/readyz` (it takes new connections:
//! not draining, and in a cluster the live nodes are known) and `/metrics`
//! (Prometheus text); in `--dev` also the demo chat page and its files and
//! `/dev/token`. A connection asks [`answer`] once it has parsed a
//! request for a path that is not an upgrade, with what the doors report
//! ([`Node`]); the answer is plain data, and the connection writes it and
//! closes. Nothing here knows a shard or a socket.

use std::{fmt, sync::Arc};

/// A side door's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JSON: &str = "application/json";

/// The files `--dev` serves, built into the binary so that `gateway --dev`
/// needs nothing beside it: (path, content type, bytes).
const DEV_FILES: [(&str, &str, &[u8]); 4] = [
    (
        "/",
        HTML,
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../clients/demo/index.html"
        )),
    ),
    (
        "/app.js",
        JAVASCRIPT,
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../clients/demo/app.js"
        )),
    ),
    (
        "/app.css",
        CSS,
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../clients/demo/app.css"
        )),
    ),
    (
        "/corecast.js",
        JAVASCRIPT,
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../clients/js/src/index.js"
        )),
    ),
];

/// How long a `/dev/token` token lives, in seconds. The demo page asks for
/// a new one to `refresh` with before it runs out.
pub const DEV_TOKEN_TTL_S: u64 = 600;

/// The longest user name `/dev/token` mints for.
const DEV_USER_MAX_BYTES: usize = 32;

/// `--dev`: what the development doors need. Built once at start.
#[derive(Clone)]
pub struct Dev {
    /// The HS256 secret `/dev/token` signs with: `--jwt-secret`, or the
    /// one generated at start.
    pub token_secret: Arc<[u8]>,
    /// The secret was generated at start (no `--jwt-secret`), for the log.
    pub secret_generated: bool,
}

impl fmt::Debug for Dev {
    // Hand-written so the secret never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dev")
            .field("token_secret", &"<hidden>")
            .field("secret_generated", &self.secret_generated)
            .finish()
    }
}

/// What the side doors report on, as the connection's shard sees it.
pub struct Node<'a, F: FnOnce() -> String> {
    /// The node is stopping (`/readyz` says 503 `draining`).
    pub draining: bool,
    /// In a cluster: the live nodes are known.
    pub cluster_ready: bool,
    /// Renders `/metrics` (only called for that path).
    pub metrics: F,
    /// `Some` in `--dev`: the demo page, its files and `/dev/token` are
    /// served. `None`: those paths are 404 like any unknown one.
    pub dev: Option<&'a Dev>,
    /// Now, in Unix seconds: a `/dev/token` token's `iat` and `exp`.
    pub unix_now_s: u64,
}

/// The answer for `path` (and its `query`, without `?`), or `None` if no
/// side door has that path.
pub fn answer<F: FnOnce() -> String>(
    node: Node<'_, F>,
    path: &str,
    query: Option<&str>,
) -> Option<Answer> {
    let text = |status, body: &[u8]| Answer {
        status,
        content_type: TEXT,
        body: body.to_vec(),
    };
    Some(match path {
        "/healthz" => text(200, b"ok\n"),
        "/readyz" if node.draining => text(503, b"draining\n"),
        "/readyz" if !node.cluster_ready => text(
            503,
            b"joining the cluster: the live nodes are not known yet\n",
        ),
        "/readyz" => text(200, b"ready\n"),
        "/metrics" => Answer {
            status: 200,
            content_type: PROMETHEUS,
            body: (node.metrics)().into_bytes(),
        },
        "/dev/token" => dev_token(node.dev?, query, node.unix_now_s),
        _ => {
            node.dev?;
            let (_, content_type, body) = DEV_FILES.iter().find(|(p, _, _)| *p == path)?;
            Answer {
                status: 200,
                content_type,
                body: body.to_vec(),
            }
        }
    })
}

/// `/dev/token?user=NAME`: an HS256 token for NAME, any room, for
/// [`DEV_TOKEN_TTL_S`].
fn dev_token(dev: &Dev, query: Option<&str>, now: u64) -> Answer {
    let text = |status, body: &[u8]| Answer {
        status,
        content_type: TEXT,
        body: body.to_vec(),
    };
    let user = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("user="))
        .filter(|u| valid_dev_user(u));
    let Some(user) = user else {
        return text(400, b"user must be 1-32 letters, digits, _ - or .\n");
    };
    let exp = now + DEV_TOKEN_TTL_S;
    let claims = crate::auth::Claims {
        sub: user.to_string(),
        exp: Some(exp),
        iat: Some(now),
        rooms: Some(vec!["*".to_string()]),
        ..Default::default()
    };
    let token = crate::auth::mint(&dev.token_secret, &claims);
    let body = serde_json::json!({ "token": token, "user": user, "exp": exp });
    Answer {
        status: 200,
        content_type: JSON,
        body: body.to_string().into_bytes(),
    }
}

/// A user name `/dev/token` mints for: 1-32 bytes of ASCII letters,
/// digits, `_`, `-` and `.` (nothing to escape in JSON, a URL or a log).
fn valid_dev_user(user: &str) -> bool {
    (1..=DEV_USER_MAX_BYTES).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(path: &str, draining: bool, cluster_ready: bool) -> Option<(u16, String)> {
        let node = Node {
            draining,
            cluster_ready,
            metrics: || "corecast_up 1\n".to_string(),
            dev: None,
            unix_now_s: NOW,
        };
        answer(node, path, None).map(|a| (a.status, String::from_utf8(a.body).unwrap()))
    }

    const NOW: u64 = 1_700_000_000;

    fn ask_dev(dev: Option<&Dev>, path: &str, query: Option<&str>) -> Option<Answer> {
        let node = Node {
            draining: false,
            cluster_ready: true,
            metrics: String::new,
            dev,
            unix_now_s: NOW,
        };
        answer(node, path, query)
    }

    fn dev() -> Dev {
        Dev {
            token_secret: b"dev-secret-0123456789abcdef0123456789".as_slice().into(),
            secret_generated: true,
        }
    }

    #[test]
    fn the_dev_files_are_served_only_in_dev_mode() {
        let dev = dev();
        // (path, its content type in --dev)
        let cases = [
            ("/", HTML),
            ("/app.js", JAVASCRIPT),
            ("/app.css", CSS),
            ("/corecast.js", JAVASCRIPT),
        ];
        for (path, content_type) in cases {
            assert_eq!(ask_dev(None, path, None), None, "{path} outside --dev");
            let a = ask_dev(Some(&dev), path, None).unwrap_or_else(|| panic!("{path}"));
            assert_eq!((a.status, a.content_type), (200, content_type), "{path}");
        }
        let page = ask_dev(Some(&dev), "/", None).unwrap().body;
        assert_eq!(page, DEV_FILES[0].2, "the page as built in");
        for path in ["/index.html", "/dev", "/dev/token/", "/app.js/", "//"] {
            assert_eq!(ask_dev(Some(&dev), path, None), None, "{path}");
        }
        assert_eq!(ask_dev(None, "/dev/token", Some("user=alice")), None);
        // The other doors are as ever.
        let h = ask_dev(Some(&dev), "/healthz", None).unwrap();
        assert_eq!((h.status, h.body.as_slice()), (200, &b"ok\n"[..]));
    }

    #[test]
    fn dev_tokens_are_minted_for_good_names_only() {
        let dev = dev();
        let bad = "user must be 1-32 letters, digits, _ - or .\n";
        let long = "a".repeat(33);
        let longest = "b".repeat(32);
        let long_query = format!("user={long}");
        let longest_query = format!("user={longest}");
        // (query, Ok(the user) or Err(the 400 body))
        let cases: &[(Option<&str>, Result<&str, &str>)] = &[
            (Some("user=alice"), Ok("alice")),
            (Some("x=1&user=A.b-c_9&y"), Ok("A.b-c_9")),
            (Some("user=alice&user=bob"), Ok("alice")),
            (Some(&longest_query), Ok(&longest)),
            (None, Err(bad)),
            (Some(""), Err(bad)),
            (Some("user="), Err(bad)),
            (Some("user"), Err(bad)),
            (Some("name=alice"), Err(bad)),
            (Some("xuser=alice"), Err(bad)),
            (Some(&long_query), Err(bad)),
            (Some("user=al%20ice"), Err(bad)),
            (Some("user=al ice"), Err(bad)),
            (Some("user=\u{e9}"), Err(bad)),
            (Some("user=a/b"), Err(bad)),
            (Some("user=a\"b"), Err(bad)),
        ];
        let verifier = crate::auth::Verifier::new(b"dev-secret-0123456789abcdef0123456789", 0);
        for (query, want) in cases {
            let a = ask_dev(Some(&dev), "/dev/token", *query).unwrap();
            match want {
                Ok(user) => {
                    assert_eq!((a.status, a.content_type), (200, JSON), "{query:?}");
                    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
                    assert_eq!(v["user"], *user, "{query:?}");
                    assert_eq!(v["exp"], NOW + DEV_TOKEN_TTL_S, "{query:?}");
                    let claims = verifier.verify(v["token"].as_str().unwrap(), NOW).unwrap();
                    assert_eq!(claims.sub, *user);
                    assert_eq!(claims.exp, Some(NOW + DEV_TOKEN_TTL_S));
                    assert_eq!(claims.rooms, Some(vec!["*".to_string()]));
                    assert!(claims.may_join("anything") && claims.may_publish("typing:x"));
                }
                Err(body) => {
                    assert_eq!((a.status, a.content_type), (400, TEXT), "{query:?}");
                    assert_eq!(String::from_utf8(a.body).unwrap(), *body, "{query:?}");
                }
            }
        }
        let other = crate::auth::Verifier::new(b"another-secret-0123456789abcdef01234", 0);
        let a = ask_dev(Some(&dev), "/dev/token", Some("user=alice")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert!(other.verify(v["token"].as_str().unwrap(), NOW).is_err());
    }

    #[test]
    fn each_door_answers_what_the_node_reports() {
        // (path, draining, cluster ready, the answer)
        type Case = (&'static str, bool, bool, Option<(u16, &'static str)>);
        let cases: &[Case] = &[
            ("/healthz", false, true, Some((200, "ok\n"))),
            ("/healthz", true, false, Some((200, "ok\n"))),
            ("/readyz", false, true, Some((200, "ready\n"))),
            ("/readyz", true, true, Some((503, "draining\n"))),
            ("/readyz", true, false, Some((503, "draining\n"))),
            (
                "/readyz",
                false,
                false,
                Some((
                    503,
                    "joining the cluster: the live nodes are not known yet\n",
                )),
            ),
            ("/metrics", true, false, Some((200, "corecast_up 1\n"))),
            ("/", false, true, None),
            ("/healthz/", false, true, None),
        ];
        for (path, draining, ready, want) in cases {
            let got = ask(path, *draining, *ready);
            let want = want.map(|(s, b)| (s, b.to_string()));
            assert_eq!(got, want, "{path} draining={draining} ready={ready}");
        }
    }
}
