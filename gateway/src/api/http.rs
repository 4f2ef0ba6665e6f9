//! The API's HTTP side: one hyper HTTP/1.1 server on a tokio
//! current-thread runtime, the checks every call passes, and the JSON of
//! its answers and errors.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use corecast_router::{
    auth::MAX_SUBJECT_BYTES,
    home_shard,
    homes::UserAction,
    proto::{self, valid_room},
    store::Query,
    user_home_shard,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, value::RawValue, Map, Value};
use tokio::sync::{oneshot, Notify};

use super::{Answer, ApiSettings, Call, Calls, NodeView, Op, Reply};

/// Time a client has to send a request's headers, and then its body.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// API connections open at once; more are closed as they come (each holds
/// a descriptor the WebSocket listeners need too).
pub const MAX_CONNECTIONS: usize = 1024;

/// The close code `disconnect` uses when the call names none.
pub const DISCONNECT_CODE: u16 = 4010;
const DISCONNECT_REASON: &str = "disconnected by the server";

/// Who a publish or direct message is from when the call names nobody.
const API_SENDER: &str = "api";

/// The bytes of a close reason (a close frame's payload is at most 125).
const MAX_REASON_BYTES: usize = 123;

pub struct Ctx {
    settings: ApiSettings,
    calls: Arc<Calls>,
    node: NodeView,
}

impl Ctx {
    pub fn new(settings: ApiSettings, calls: Arc<Calls>, node: NodeView) -> Ctx {
        Ctx {
            settings,
            calls,
            node,
        }
    }
}

/// The API thread: serves until `stop` is notified.
pub fn run(ctx: Ctx, listener: std::net::TcpListener, stop: Arc<Notify>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("the API could not start its runtime: {e}; the API is not served");
            return;
        }
    };
    let ctx = Arc::new(ctx);
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!("the API could not watch its listener: {e}; the API is not served");
                return;
            }
        };
        loop {
            let accepted = futures_lite::future::or(
                async {
                    stop.notified().await;
                    None
                },
                async { Some(listener.accept().await) },
            )
            .await;
            let Some(accepted) = accepted else { break };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: let some close.
                    log::warn!("API accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = open.clone().try_acquire_owned() else {
                log::warn!("API: {MAX_CONNECTIONS} connections open already; closing a new one");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
                });
                let served = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    log::debug!("API connection: {e}");
                }
            });
        }
    });
}

/// A refused call: its HTTP status and the error object's code and message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    err(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut out = serde_json::to_vec(body).unwrap_or_default();
    out.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(out)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let endpoint =
        Endpoint::of(req.uri().path()).map_or(super::ENDPOINTS.len() - 1, |e| e as usize);
    let r = answer_to(ctx, req).await;
    ctx.calls.metrics.answered(endpoint, r.status().as_u16());
    r
}

async fn answer_to(ctx: &Ctx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match serve(ctx, req).await {
        Ok(v) => respond(StatusCode::OK, &v),
        Err(e) => {
            let mut r = respond(
                e.status,
                &json!({"error": {"code": e.code, "message": e.message}}),
            );
            let h = r.headers_mut();
            match e.status {
                StatusCode::METHOD_NOT_ALLOWED => {
                    h.insert(header::ALLOW, header::HeaderValue::from_static("POST"));
                }
                StatusCode::UNAUTHORIZED => {
                    h.insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("apikey"),
                    );
                }
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                    h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                }
                _ => {}
            }
            r
        }
    }
}

/// In the order of [`super::ENDPOINTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Publish,
    Broadcast,
    Dm,
    Disconnect,
    Unsubscribe,
    Presence,
    PresenceStats,
    History,
    Rooms,
    Info,
}

impl Endpoint {
    fn of(path: &str) -> Option<Endpoint> {
        Some(match path.strip_prefix("/api/")? {
            "publish" => Endpoint::Publish,
            "broadcast" => Endpoint::Broadcast,
            "dm" => Endpoint::Dm,
            "disconnect" => Endpoint::Disconnect,
            "unsubscribe" => Endpoint::Unsubscribe,
            "presence" => Endpoint::Presence,
            "presence_stats" => Endpoint::PresenceStats,
            "history" => Endpoint::History,
            "rooms" => Endpoint::Rooms,
            "info" => Endpoint::Info,
            _ => return None,
        })
    }
}

async fn serve(ctx: &Ctx, req: Request<Incoming>) -> Result<Value, ApiError> {
    authorize(&ctx.settings.keys, req.headers())?;
    let endpoint = Endpoint::of(req.uri().path()).ok_or_else(|| {
        err(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no endpoint {}: see docs/api.md for POST /api/publish, /api/broadcast, /api/dm, /api/disconnect, /api/unsubscribe, /api/presence, /api/presence_stats, /api/history, /api/rooms, /api/info",
                req.uri().path()
            ),
        )
    })?;
    if req.method() != Method::POST {
        return Err(err(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} takes POST with a JSON body", req.uri().path()),
        ));
    }
    if ctx.node.state.draining() {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the node is shutting down: call another node",
        ));
    }
    let body = read_body(ctx.settings.max_body_bytes, req).await?;
    match endpoint {
        Endpoint::Publish => publish(ctx, &body).await,
        Endpoint::Broadcast => broadcast(ctx, &body).await,
        Endpoint::Dm => dm(ctx, &body).await,
        Endpoint::Disconnect => disconnect(ctx, &body).await,
        Endpoint::Unsubscribe => unsubscribe(ctx, &body).await,
        Endpoint::Presence => presence(ctx, &body, false).await,
        Endpoint::PresenceStats => presence(ctx, &body, true).await,
        Endpoint::History => history(ctx, &body).await,
        Endpoint::Rooms => rooms(ctx, &body).await,
        Endpoint::Info => info(ctx, &body).await,
    }
}

/// `Authorization: apikey <key>`, compared with every key in constant time.
fn authorize(keys: &[Box<[u8]>], headers: &header::HeaderMap) -> Result<(), ApiError> {
    let unauthorized = |m: &str| err(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "no Authorization header: send `Authorization: apikey <key>`",
        ));
    };
    let value = value.as_bytes();
    let given = match value.iter().position(|&b| b == b' ') {
        Some(i) if value[..i].eq_ignore_ascii_case(b"apikey") => value[i + 1..].trim_ascii(),
        _ => {
            return Err(unauthorized(
                "the Authorization header must be `apikey <key>`",
            ))
        }
    };
    let mut ok = false;
    for k in keys {
        ok |= constant_time_eq(k, given);
    }
    if ok {
        Ok(())
    } else {
        Err(unauthorized("the API key is not one of --api-key"))
    }
}

/// Equal bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(max: usize, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is over {max} bytes (--api-max-body-bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), max).collect());
    match read.await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(bad(format!("could not read the request body: {e}"))),
        Err(_) => Err(err(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Parses a call's JSON body; an empty body is `{}` for calls whose fields
/// are all optional.
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let body = if body.trim_ascii().is_empty() {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| bad(format!("the request body: {e}")))
}

fn check_room(room: &str) -> Result<Arc<str>, ApiError> {
    if valid_room(room) {
        Ok(Arc::from(room))
    } else {
        Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_room",
            format!(
                "room {room:?}: room names are 1-{} bytes of letters, digits and _ - . : @ /",
                proto::MAX_ROOM_BYTES
            ),
        ))
    }
}

fn check_user(field: &str, user: &str) -> Result<Arc<str>, ApiError> {
    if user.is_empty() || user.len() > MAX_SUBJECT_BYTES || user.chars().any(char::is_control) {
        return Err(bad(format!(
            "{field}: a user is 1-{MAX_SUBJECT_BYTES} bytes without control characters"
        )));
    }
    Ok(Arc::from(user))
}

fn check_id(id: Option<String>) -> Result<Box<str>, ApiError> {
    let id = id.unwrap_or_default();
    if id.len() > proto::MAX_ID_BYTES {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("id must be at most {} bytes", proto::MAX_ID_BYTES),
        ));
    }
    Ok(id.into())
}

/// A message body of at most the room's namespace's `max_body_bytes` (for
/// a direct message, `--max-body-bytes`).
fn check_body(ctx: &Ctx, room: Option<&str>, body: &RawValue) -> Result<Box<str>, ApiError> {
    let (max, limit) = match room {
        Some(room) => {
            let table = ctx.settings.namespaces.load();
            let ns = table.of(room);
            let limit = if ns.prefix.is_empty() {
                "--max-body-bytes".to_string()
            } else {
                format!("max_body_bytes of namespace {:?}", ns.prefix)
            };
            (ns.max_body_bytes, limit)
        }
        None => (
            ctx.settings.max_message_body_bytes,
            "--max-body-bytes".into(),
        ),
    };
    if body.get().len() > max {
        return Err(err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("body is over {max} bytes ({limit})"),
        ));
    }
    Ok(body.get().into())
}

/// Counts a call's waits for shards; more than `max_in_flight` is 429.
struct InFlight<'a>(&'a AtomicUsize, usize);

impl<'a> InFlight<'a> {
    fn take(ctx: &'a Ctx, n: usize) -> Result<InFlight<'a>, ApiError> {
        let in_flight = &ctx.calls.metrics.in_flight;
        let before = in_flight.fetch_add(n, Relaxed);
        let guard = InFlight(in_flight, n);
        if before + n > ctx.settings.max_in_flight {
            return Err(err(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "more than {} API calls waiting (--api-max-in-flight): retry shortly",
                    ctx.settings.max_in_flight
                ),
            ));
        }
        Ok(guard)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Relaxed);
    }
}

/// Hands an op to shard `shard`; the receiver gets its reply.
fn send(ctx: &Ctx, shard: usize, op: Op) -> oneshot::Receiver<Reply> {
    let (tx, rx) = oneshot::channel();
    ctx.calls.inbox(shard).send(vec![Call {
        op,
        answer: Answer(tx),
    }]);
    rx
}

/// Waits for a reply until `deadline`.
async fn wait(
    ctx: &Ctx,
    deadline: tokio::time::Instant,
    rx: oneshot::Receiver<Reply>,
) -> Result<Reply, ApiError> {
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(_)) => Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the shard could not answer (the node is stopping?): retry",
        )),
        Err(_) => Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "no answer within {} ms (--api-timeout-ms); a publish may have been sequenced: retry with the same id",
                ctx.settings.timeout.as_millis()
            ),
        )),
    }
}

fn deadline(ctx: &Ctx) -> tokio::time::Instant {
    tokio::time::Instant::now() + ctx.settings.timeout
}

/// One call to one shard, answered by a frame.
async fn call(ctx: &Ctx, shard: usize, op: Op) -> Result<Map<String, Value>, ApiError> {
    let _in_flight = InFlight::take(ctx, 1)?;
    let rx = send(ctx, shard, op);
    answer(wait(ctx, deadline(ctx), rx).await?)
}

/// The object of an answer frame, without its `type`; an `error` frame
/// becomes the error with the status that fits its code.
fn answer(reply: Reply) -> Result<Map<String, Value>, ApiError> {
    let Reply::Frame(payload) = reply else {
        return Err(internal("an answer of the wrong kind"));
    };
    let Ok(Value::Object(mut o)) = serde_json::from_slice::<Value>(&payload) else {
        return Err(internal("an answer that is not a JSON object"));
    };
    if o.get("type").and_then(Value::as_str) == Some("error") {
        let code = o.get("code").and_then(Value::as_str).unwrap_or("");
        let message = o
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let (status, code) = match code {
            "invalid_room" => (StatusCode::BAD_REQUEST, "invalid_room"),
            "invalid_id" => (StatusCode::BAD_REQUEST, "invalid_id"),
            "bad_request" => (StatusCode::BAD_REQUEST, "bad_request"),
            "body_too_large" => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            "rate_limited" => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            "storage_busy" => (StatusCode::SERVICE_UNAVAILABLE, "storage_busy"),
            "storage_unavailable" => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            "room_moving" => (StatusCode::SERVICE_UNAVAILABLE, "room_moving"),
            _ => return Err(internal(&format!("the homes answered {code}: {message}"))),
        };
        return Err(err(status, code, message));
    }
    o.remove("type");
    Ok(o)
}

fn internal(what: &str) -> ApiError {
    log::error!("API: {what}");
    err(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("{what} (a bug: please report it)"),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishCall {
    room: String,
    body: Box<RawValue>,
    id: Option<String>,
    from: Option<String>,
}

async fn publish(ctx: &Ctx, body: &[u8]) -> Result<Value, ApiError> {
    let c: PublishCall = parse(body)?;
    let room = check_room(&c.room)?;
    let op = Op::Publish {
        room: room.clone(),
        from: check_user("from", c.from.as_deref().unwrap_or(API_SENDER))?,
        id: check_id(c.id)?,
        body: check_body(ctx, Some(&room), &c.body)?,
    };
    let shard = home_shard(&room, ctx.calls.shards());
    Ok(Value::Object(call(ctx, shard, op).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastCall {
    rooms: Vec<String>,
    body: Box<RawValue>,
    id: Option<String>,
    from: Option<String>,
}

async fn broadcast(ctx: &Ctx, body: &[u8]) -> Result<Value, ApiError> {
    let c: BroadcastCall = parse(body)?;
    let max = ctx.settings.max_broadcast_rooms;
    if c.rooms.is_empty() || c.rooms.len() > max {
        return Err(bad(format!("rooms: give 1-{max} rooms")));
    }
    // Every room is checked before any is published to.
    let mut rooms = Vec::with_capacity(c.rooms.len());
    for r in &c.rooms {
        let room = check_room(r)?;
        if rooms.contains(&room) {
            return Err(bad(format!("rooms: {r:?} is listed twice")));
        }
        rooms.push(room);
    }
    let from = check_user("from", c.from.as_deref().unwrap_or(API_SENDER))?;
    let id = check_id(c.id)?;
    let mut msg = None;
    for room in &rooms {
        msg = Some(check_body(ctx, Some(room), &c.body)?);
    }
    let msg = msg.unwrap_or_default();
    let _in_flight = InFlight::take(ctx, rooms.len())?;
    let shards = ctx.calls.shards();
    let waiting: Vec<_> = rooms
        .iter()
        .map(|room| {
            let op = Op::Publish {
                room: room.clone(),
                from: from.clone(),
                id: id.clone(),
                body: msg.clone(),
            };
            send(ctx, home_shard(room, shards), op)
        })
        .collect();
    let until = deadline(ctx);
    let mut results = Vec::with_capacity(rooms.len());
    for (room, rx) in rooms.iter().zip(waiting) {
        results.push(match wait(ctx, until, rx).await.and_then(answer) {
            Ok(mut o) => {
                o.remove("id");
                Value::Object(o)
            }
            Err(e) => json!({"room": &**room, "error": {"code": e.code, "message": e.message}}),
        });
    }
    Ok(json!({ "results": results }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DmCall {
    to: String,
    body: Box<RawValue>,
    id: Option<String>,
    from: Option<String>,
}

async fn dm(ctx: &Ctx, body: &[u8]) -> Result<Value, ApiError> {
    let c: DmCall = parse(body)?;
    let to = check_user("to", &c.to)?;
    let op = Op::Dm {
        to: to.clone(),
        from: check_user("from", c.from.as_deref().unwrap_or(API_SENDER))?,
        id: check_id(c.id)?,
        body: check_body(ctx, None, &c.body)?,
    };
    let shard = user_home_shard(&to, ctx.calls.shards());
    Ok(Value::Object(call(ctx, shard, op).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectCall {
    user: String,
    code: Option<u16>,
    reason: Option<String>,
}

async fn disconnect(ctx: &Ctx, body: &[u8]) -> Result<Value, ApiError> {
    let c: DisconnectCall = parse(body)?;
    let user = check_user("user", &c.user)?;
    let code = c.code.unwrap_or(DISCONNECT_CODE);
    if !(4000..=4999).contains(&code) {
        return Err(bad(format!(
            "code {code}: give a close code 4000-4999 (the range RFC 6455 leaves to applications)"
        )));
    }
    let reason = c.reason.unwrap_or_else(|| DISCONNECT_REASON.into());
    if reason.len() > MAX_REASON_BYTES {
        return Err(bad(format!(
            "reason: at most {MAX_REASON_BYTES} bytes (it goes in the close frame)"
        )));
    }
    let op = Op::Act {
        user: user.clone(),
        action: UserAction::Disconnect {
            code,
            reason: reason.into(),
        },
    };
    let shard = user_home_shard(&user, ctx.calls.shards());
    Ok(Value::Object(call(ctx, shard, op).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeCall {
    user: String,
    room: String,
}

async fn unsubscribe(ctx: &Ctx, body: &[u8]) -> Result<Value, ApiError> {
    let c: UnsubscribeCall = parse(body)?;
    let user = check_user("user", &c.user)?;
    let room = check_room(&c.room)?;
    let op = Op::Act {
        user: user.clone(),
        action: UserAction::Unsubscribe { room },
    };
    let shard = user_home_shard(&user, ctx.calls.shards());
    Ok(Value::Object(call(ctx, shard, op).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomCall {
    room: String,
}

async fn presence(ctx: &Ctx, body: &[u8], stats: bool) -> Result<Value, ApiError> {
    let c: RoomCall = parse(body)?;
    let room = check_room(&c.room)?;
    let shard = home_shard(&room, ctx.calls.shards());
    let mut o = call(ctx, shard, Op::Presence { room }).await?;
    if stats {
        o.remove("users");
    }
    Ok(Value::Object(o))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryCall {
    room: String,
    limit: Option<u64>,
    since: Option<u64>,
}

async fn history(ctx: &Ctx, body: &[u8]) -> Result<Value, ApiError> {
    let c: HistoryCall = parse(body)?;
    let room = check_room(&c.room)?;
    let max = ctx.settings.history_max_limit;
    let n = c.limit.map_or(max.min(100), |l| (l as usize).min(max));
    let query = match c.since {
        Some(after) => Query::After { after, n },
        None => Query::Last(n),
    };
    let shard = home_shard(&room, ctx.calls.shards());
    Ok(Value::Object(
        call(ctx, shard, Op::History { room, query }).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomsCall {
    #[serde(default)]
    prefix: String,
}

async fn rooms(ctx: &Ctx, body: &[u8]) -> Result<Value, ApiError> {
    let c: RoomsCall = parse(body)?;
    let shards = ctx.calls.shards();
    let _in_flight = InFlight::take(ctx, shards)?;
    let waiting: Vec<_> = (0..shards)
        .map(|s| {
            let prefix = c.prefix.as_str().into();
            send(ctx, s, Op::Rooms { prefix })
        })
        .collect();
    let until = deadline(ctx);
    let mut all: std::collections::BTreeMap<Arc<str>, u64> = Default::default();
    for rx in waiting {
        let Reply::Rooms(list) = wait(ctx, until, rx).await? else {
            return Err(internal("an answer of the wrong kind"));
        };
        for (room, n) in list {
            *all.entry(room).or_default() += n;
        }
    }
    let rooms: Vec<Value> = all
        .into_iter()
        .map(|(room, n)| json!({"room": &*room, "members": n}))
        .collect();
    Ok(json!({ "rooms": rooms }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InfoCall {}

async fn info(ctx: &Ctx, body: &[u8]) -> Result<Value, ApiError> {
    let _: InfoCall = parse(body)?;
    let nodes = {
        let _in_flight = InFlight::take(ctx, 1)?;
        let rx = send(ctx, 0, Op::Nodes);
        match wait(ctx, deadline(ctx), rx).await? {
            Reply::Nodes(n) => n,
            _ => return Err(internal("an answer of the wrong kind")),
        }
    };
    let node = &ctx.node;
    let connections: u64 = node.metrics.iter().map(|m| m.websockets_open.get()).sum();
    let nodes: Vec<&str> = match &nodes {
        Some(n) => n.iter().map(|s| &**s).collect(),
        None => vec![&*node.node_id],
    };
    Ok(json!({
        "node": &*node.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "shards": ctx.calls.shards(),
        "connections": connections,
        "nodes": nodes,
    }))
}

/// A server frame's payload (the frames the homes answer with are
/// unmasked, unfragmented text frames).
pub fn payload(frame: &[u8]) -> &[u8] {
    let Some(&len) = frame.get(1) else {
        return &[];
    };
    let (start, n): (usize, usize) = match len & 0x7f {
        126 if frame.len() >= 4 => (4, u16::from_be_bytes([frame[2], frame[3]]) as usize),
        127 if frame.len() >= 10 => (
            10,
            u64::from_be_bytes(frame[2..10].try_into().unwrap_or_default()) as usize,
        ),
        n @ 0..=125 => (2, n as usize),
        _ => return &[],
    };
    let Some(end) = start.checked_add(n) else {
        return &[];
    };
    frame.get(start..end).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_reads_every_length_form() {
        for n in [0usize, 5, 125, 126, 300, 70_000] {
            let body = vec![b'x'; n];
            let mut w = corecast_router::proto::FrameWriter::new(n);
            w.bytes(&body);
            let frame = w.finish();
            assert_eq!(payload(&frame), &body[..], "{n}");
        }
    }

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn endpoints_by_path() {
        assert_eq!(Endpoint::of("/api/publish"), Some(Endpoint::Publish));
        assert_eq!(
            Endpoint::of("/api/presence_stats"),
            Some(Endpoint::PresenceStats)
        );
        assert_eq!(Endpoint::of("/api/publish/"), None);
        assert_eq!(Endpoint::of("/publish"), None);
    }
}
