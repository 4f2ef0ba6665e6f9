//! The HTTP side doors every port answers next to the WebSocket endpoints:
//! `/healthz` (the process runs), `/readyz` (it takes new connections:
//! not draining, and in a cluster the live nodes are known) and `/metrics`
//! (Prometheus text). A connection asks [`answer`] once it has parsed a
//! request for a path that is not an upgrade, with what the doors report
//! ([`Node`]); the answer is plain data, and the connection writes it and
//! closes. Nothing here knows a shard or a socket.

/// A side door's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the side doors report on, as the connection's shard sees it.
pub struct Node<F: FnOnce() -> String> {
    /// The node is stopping (`/readyz` says 503 `draining`).
    pub draining: bool,
    /// In a cluster: the live nodes are known.
    pub cluster_ready: bool,
    /// Renders `/metrics` (only called for that path).
    pub metrics: F,
}

/// The answer for `path`, or `None` if no side door has that path.
pub fn answer<F: FnOnce() -> String>(node: Node<F>, path: &str) -> Option<Answer> {
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
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(path: &str, draining: bool, cluster_ready: bool) -> Option<(u16, String)> {
        let node = Node {
            draining,
            cluster_ready,
            metrics: || "corecast_up 1\n".to_string(),
        };
        answer(node, path).map(|a| (a.status, String::from_utf8(a.body).unwrap()))
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
