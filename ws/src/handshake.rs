//! The HTTP/1.1 side of a connection: request parsing and the RFC 6455 §4
//! opening handshake, sans-IO.
//!
//! Every refusal is a [`Refusal`]: an HTTP status with a one-line reason that
//! the caller writes back before closing, so a person debugging a client with
//! curl sees what was wrong.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Most headers a request may carry; more is answered with 431.
pub const MAX_HEADERS: usize = 32;

/// The GUID every accept key is derived with (RFC 6455 §1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why a request was refused; each has its HTTP status and a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not parseable as an HTTP/1.1 request line and headers.
    MalformedRequest,
    /// Header section over the byte limit, or over [`MAX_HEADERS`] headers.
    HeadersTooLarge,
    /// Only HTTP/1.1 can upgrade (RFC 6455 §4.1).
    UnsupportedHttpVersion,
    /// Only GET is served.
    MethodNotAllowed,
    /// HTTP/1.1 requires a Host header.
    MissingHost,
    /// No `Upgrade` header on a WebSocket-only path.
    UpgradeRequired,
    /// `Upgrade` present but without the `websocket` token.
    UpgradeNotWebsocket,
    /// `Connection` lacks the `upgrade` token.
    ConnectionNotUpgrade,
    /// `Sec-WebSocket-Version` missing or not 13.
    UnsupportedWsVersion,
    /// `Sec-WebSocket-Key` missing, or not base64 of 16 bytes.
    BadWsKey,
    /// The request carried a body; upgrade and side-door requests have none.
    UnexpectedBody,
    /// The client offered subprotocols, none of which this endpoint speaks.
    UnsupportedSubprotocol,
    /// No route for this path.
    NotFound,
    /// The request did not arrive within the handshake timeout.
    Timeout,
    /// A browser's upgrade from an origin the server does not allow (a
    /// page on another site trying to use the user's connection).
    OriginNotAllowed,
    /// An upgrade without `Origin` where the server requires one.
    OriginRequired,
}

impl Refusal {
    /// Every refusal, for metrics labels.
    pub const ALL: [Refusal; 16] = [
        Refusal::MalformedRequest,
        Refusal::HeadersTooLarge,
        Refusal::UnsupportedHttpVersion,
        Refusal::MethodNotAllowed,
        Refusal::MissingHost,
        Refusal::UpgradeRequired,
        Refusal::UpgradeNotWebsocket,
        Refusal::ConnectionNotUpgrade,
        Refusal::UnsupportedWsVersion,
        Refusal::BadWsKey,
        Refusal::UnexpectedBody,
        Refusal::UnsupportedSubprotocol,
        Refusal::NotFound,
        Refusal::Timeout,
        Refusal::OriginNotAllowed,
        Refusal::OriginRequired,
    ];

    pub fn status(self) -> u16 {
        match self {
            Refusal::MalformedRequest
            | Refusal::MissingHost
            | Refusal::UpgradeNotWebsocket
            | Refusal::ConnectionNotUpgrade
            | Refusal::BadWsKey
            | Refusal::UnexpectedBody
            | Refusal::UnsupportedSubprotocol => 400,
            Refusal::HeadersTooLarge => 431,
            Refusal::UnsupportedHttpVersion => 505,
            Refusal::MethodNotAllowed => 405,
            Refusal::UpgradeRequired | Refusal::UnsupportedWsVersion => 426,
            Refusal::NotFound => 404,
            Refusal::Timeout => 408,
            Refusal::OriginNotAllowed | Refusal::OriginRequired => 403,
        }
    }

    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MalformedRequest => "malformed_request",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::UnsupportedHttpVersion => "http_version",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::MissingHost => "missing_host",
            Refusal::UpgradeRequired => "upgrade_required",
            Refusal::UpgradeNotWebsocket => "upgrade_not_websocket",
            Refusal::ConnectionNotUpgrade => "connection_not_upgrade",
            Refusal::UnsupportedWsVersion => "ws_version",
            Refusal::BadWsKey => "bad_ws_key",
            Refusal::UnexpectedBody => "unexpected_body",
            Refusal::UnsupportedSubprotocol => "subprotocol",
            Refusal::NotFound => "not_found",
            Refusal::Timeout => "timeout",
            Refusal::OriginNotAllowed => "origin_not_allowed",
            Refusal::OriginRequired => "origin_required",
        }
    }

    /// What went wrong and what to do, for the response body.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MalformedRequest => "malformed HTTP request",
            Refusal::HeadersTooLarge => "request header section too large",
            Refusal::UnsupportedHttpVersion => "only HTTP/1.1 is supported",
            Refusal::MethodNotAllowed => "only GET is allowed",
            Refusal::MissingHost => "missing Host header",
            Refusal::UpgradeRequired => {
                "this endpoint speaks WebSocket only: send Upgrade: websocket"
            }
            Refusal::UpgradeNotWebsocket => "Upgrade header must contain websocket",
            Refusal::ConnectionNotUpgrade => "Connection header must contain upgrade",
            Refusal::UnsupportedWsVersion => "Sec-WebSocket-Version must be 13",
            Refusal::BadWsKey => "Sec-WebSocket-Key must be base64 of 16 bytes",
            Refusal::UnexpectedBody => "request bodies are not accepted",
            Refusal::UnsupportedSubprotocol => {
                "unsupported subprotocol: this endpoint speaks corecast.v1"
            }
            Refusal::NotFound => "no such path (try /ws, /echo, /healthz, /readyz or /metrics)",
            Refusal::Timeout => "request not received within the handshake timeout",
            Refusal::OriginNotAllowed => {
                "origin not allowed: the page's origin is not in the server's --allowed-origins"
            }
            Refusal::OriginRequired => "an Origin header is required (--require-origin)",
        }
    }

    /// Appends the full HTTP response for this refusal.
    pub fn write_response(self, out: &mut Vec<u8>) {
        self.write_response_to(out, false)
    }

    /// Appends the HTTP response for this refusal; to a `HEAD` request
    /// (`head`) without the body, which HTTP forbids there (RFC 9110 §9.3.2),
    /// but with the `Content-Length` a `GET` would have had.
    pub fn write_response_to(self, out: &mut Vec<u8>, head: bool) {
        let extra: &str = match self {
            Refusal::UnsupportedWsVersion => "Sec-WebSocket-Version: 13\r\n",
            Refusal::UpgradeRequired => "Upgrade: websocket\r\n",
            Refusal::MethodNotAllowed => "Allow: GET\r\n",
            _ => "",
        };
        let mut body = self.reason().as_bytes().to_vec();
        body.push(b'\n');
        let before = out.len();
        write_response(
            out,
            self.status(),
            extra,
            "text/plain; charset=utf-8",
            &body,
        );
        if head {
            out.truncate(out.len() - body.len());
            debug_assert!(out[before..].ends_with(b"\r\n\r\n"));
        }
    }
}

/// Whether `request` (the start of one) is a `HEAD` request.
pub fn is_head(request: &[u8]) -> bool {
    request.starts_with(b"HEAD ")
}

/// The parts of a request the gateway routes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Path without the query string.
    pub path: String,
    /// The query string, without `?`.
    pub query: Option<String>,
    /// An access token: the `token` query parameter, or the credentials of
    /// `Authorization: Bearer`.
    pub token: Option<String>,
    /// The `Origin` header (the first, if a client sent several): browsers
    /// send the page's origin; other clients usually send none.
    pub origin: Option<String>,
    /// Present when the request asks for a WebSocket upgrade and every
    /// required header is right; the caller answers with [`write_accept`].
    pub upgrade: Option<Result<Upgrade, Refusal>>,
}

/// A valid WebSocket upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The `Sec-WebSocket-Accept` value for the response.
    pub accept: String,
    /// The subprotocols the client offered, in its order of preference.
    pub protocols: Vec<String>,
}

/// Parses one request from the front of `buf`.
///
/// `Ok(None)`: incomplete, read more (unless `buf` is already at the header
/// limit, which the caller turns into [`Refusal::HeadersTooLarge`]).
/// `Ok(Some((request, len)))`: the request took `len` bytes; bytes after it
/// belong to the WebSocket stream (a client may send its first frame right
/// behind the handshake).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadersTooLarge),
        Err(_) => return Err(Refusal::MalformedRequest),
    };
    if req.version != Some(1) {
        return Err(Refusal::UnsupportedHttpVersion);
    }
    if req.method != Some("GET") {
        return Err(Refusal::MethodNotAllowed);
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let header = |name: &'static str| {
        req.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
    };
    if header("host").next().is_none() {
        return Err(Refusal::MissingHost);
    }
    let has_body = header("content-length").any(|h| h.value != b"0")
        || header("transfer-encoding").next().is_some();
    if has_body {
        return Err(Refusal::UnexpectedBody);
    }
    let token = query
        .as_deref()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
        .map(str::to_string)
        .or_else(|| {
            header("authorization").find_map(|h| {
                let v = std::str::from_utf8(h.value).ok()?.trim();
                let (scheme, cred) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| cred.trim().to_string())
            })
        });
    let origin = header("origin")
        .next()
        .map(|h| String::from_utf8_lossy(h.value.trim_ascii()).into_owned());
    let upgrade = header("upgrade").next().map(|_| {
        if !header("upgrade").any(|h| has_token(h.value, "websocket")) {
            return Err(Refusal::UpgradeNotWebsocket);
        }
        if !header("connection").any(|h| has_token(h.value, "upgrade")) {
            return Err(Refusal::ConnectionNotUpgrade);
        }
        let mut versions = header("sec-websocket-version");
        match (versions.next(), versions.next()) {
            (Some(v), None) if v.value.trim_ascii() == b"13" => {}
            _ => return Err(Refusal::UnsupportedWsVersion),
        }
        let mut keys = header("sec-websocket-key");
        let key = match (keys.next(), keys.next()) {
            (Some(k), None) => k.value.trim_ascii(),
            _ => return Err(Refusal::BadWsKey),
        };
        match base64::engine::general_purpose::STANDARD.decode(key) {
            Ok(raw) if raw.len() == 16 => {}
            _ => return Err(Refusal::BadWsKey),
        }
        let protocols = header("sec-websocket-protocol")
            .flat_map(|h| tokens(h.value))
            .map(str::to_string)
            .collect();
        Ok(Upgrade {
            accept: accept_key(key),
            protocols,
        })
    });
    Ok(Some((
        Request {
            path: path.to_string(),
            query,
            token,
            origin,
            upgrade,
        },
        len,
    )))
}

/// Comma-separated tokens of a header value, trimmed; non-UTF-8 yields none.
fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Does a comma-separated header value contain `token` (any case)?
fn has_token(value: &[u8], token: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Appends the 101 response that completes the handshake.
pub fn write_accept(out: &mut Vec<u8>, accept: &str, protocol: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(accept.as_bytes());
    if let Some(p) = protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends a complete HTTP/1.1 response that closes the connection.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    extra_headers: &str,
    content_type: &str,
    body: &[u8],
) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n{extra_headers}\r\n",
        status_text(status),
        body.len()
    );
    out.extend_from_slice(body);
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade_req(extra: &str) -> String {
        format!("GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n")
    }

    #[test]
    fn rfc_accept_key() {
        // RFC 6455 §1.3 example.
        assert_eq!(accept_key(KEY.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn table() {
        type Expect = Result<Option<Result<(), Refusal>>, Refusal>;
        let ok = Ok(Some(Ok(())));
        let cases: Vec<(&str, String, Expect)> = vec![
            ("valid upgrade", upgrade_req(""), ok),
            (
                "token list, any case",
                upgrade_req("")
                    .replace("Connection: Upgrade", "Connection: keep-alive, UPGRADE")
                    .replace("Upgrade: websocket", "Upgrade: WebSocket"),
                ok,
            ),
            (
                "plain GET",
                "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".into(),
                Ok(None),
            ),
            (
                "HTTP/1.0",
                upgrade_req("").replace("HTTP/1.1", "HTTP/1.0"),
                Err(Refusal::UnsupportedHttpVersion),
            ),
            (
                "POST",
                upgrade_req("").replace("GET", "POST"),
                Err(Refusal::MethodNotAllowed),
            ),
            (
                "no host",
                upgrade_req("").replace("Host: x\r\n", ""),
                Err(Refusal::MissingHost),
            ),
            (
                "upgrade: h2c",
                upgrade_req("").replace("Upgrade: websocket", "Upgrade: h2c"),
                Ok(Some(Err(Refusal::UpgradeNotWebsocket))),
            ),
            (
                "connection: close",
                upgrade_req("").replace("Connection: Upgrade", "Connection: close"),
                Ok(Some(Err(Refusal::ConnectionNotUpgrade))),
            ),
            (
                "version 8",
                upgrade_req("").replace("Version: 13", "Version: 8"),
                Ok(Some(Err(Refusal::UnsupportedWsVersion))),
            ),
            (
                "no version",
                upgrade_req("").replace("Sec-WebSocket-Version: 13\r\n", ""),
                Ok(Some(Err(Refusal::UnsupportedWsVersion))),
            ),
            (
                "no key",
                upgrade_req("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
                Ok(Some(Err(Refusal::BadWsKey))),
            ),
            (
                "short key",
                upgrade_req("").replace(KEY, "c2hvcnQ="),
                Ok(Some(Err(Refusal::BadWsKey))),
            ),
            (
                "key not base64",
                upgrade_req("").replace(KEY, "!!!!!!!!!!!!!!!!!!!!!!!!"),
                Ok(Some(Err(Refusal::BadWsKey))),
            ),
            (
                "body",
                upgrade_req("Content-Length: 5\r\n"),
                Err(Refusal::UnexpectedBody),
            ),
            (
                "garbage",
                "\x16\x03\x01 hello\r\n\r\n".into(),
                Err(Refusal::MalformedRequest),
            ),
            (
                "too many headers",
                upgrade_req(&"X-A: b\r\n".repeat(40)),
                Err(Refusal::HeadersTooLarge),
            ),
        ];
        for (name, req, expected) in cases {
            let got = parse_request(req.as_bytes()).map(|r| {
                let (r, len) = r.expect("complete");
                assert_eq!(len, req.len(), "{name}");
                r.upgrade.map(|u| u.map(|_| ()))
            });
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn partial_then_complete_and_trailing_bytes_are_left() {
        let req = upgrade_req("");
        assert_eq!(parse_request(&req.as_bytes()[..20]), Ok(None));
        let mut with_frame = req.clone().into_bytes();
        with_frame.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        let (r, len) = parse_request(&with_frame).unwrap().unwrap();
        assert_eq!(len, req.len());
        assert_eq!(r.path, "/echo");
    }

    #[test]
    fn path_query_and_protocols() {
        let req = upgrade_req("Sec-WebSocket-Protocol: corecast.v1, chat\r\n")
            .replace("/echo", "/ws?token=abc");
        let (r, _) = parse_request(req.as_bytes()).unwrap().unwrap();
        assert_eq!(r.path, "/ws");
        assert_eq!(r.query.as_deref(), Some("token=abc"));
        assert_eq!(r.token.as_deref(), Some("abc"));
        assert_eq!(
            r.upgrade.unwrap().unwrap().protocols,
            vec!["corecast.v1", "chat"]
        );
        let req = upgrade_req("Authorization: Bearer xyz.abc.def\r\n");
        let (r, _) = parse_request(req.as_bytes()).unwrap().unwrap();
        assert_eq!(r.token.as_deref(), Some("xyz.abc.def"));
        assert_eq!(r.origin, None);
        let req = upgrade_req("Origin: https://a.example\r\nOrigin: https://b.example\r\n");
        let (r, _) = parse_request(req.as_bytes()).unwrap().unwrap();
        assert_eq!(r.origin.as_deref(), Some("https://a.example"), "the first");
    }

    #[test]
    fn refusal_responses_say_why() {
        for r in Refusal::ALL {
            let mut out = Vec::new();
            r.write_response(&mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.starts_with(&format!("HTTP/1.1 {} ", r.status())),
                "{text}"
            );
            assert!(text.ends_with(&format!("{}\n", r.reason())), "{text}");
        }
        let mut out = Vec::new();
        Refusal::UnsupportedWsVersion.write_response(&mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Sec-WebSocket-Version: 13\r\n"));
    }
}
