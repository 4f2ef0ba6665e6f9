//! Connecting: upgrade, welcome, join, and when a drop may be resumed.

use std::{cell::Cell, io::Write as _};

use corecast_router::auth::{self, Claims};
use corecast_ws::{encode_frame, Event, OpCode};
use futures_lite::future::or;
use glommio::timer::Timer;

use crate::{
    client::{Conn, ConnFailure, ConnOptions},
    config::Target,
};

use super::*;

pub(super) fn user_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-u{index}")
}

/// Advice for an error frame a load test can cause.
pub(super) fn error_hint(code: Option<&str>) -> &'static str {
    match code {
        Some("rate_limited") => {
            " (each publisher is one connection: raise the gateway's --rate-limit-per-s and \
             --rate-limit-burst, or spread --rate over more --publishers)"
        }
        Some("body_too_large") => " (lower --size or raise the gateway's --max-body-bytes)",
        _ => "",
    }
}

/// Advice for a close during the welcome/join exchange.
pub(super) fn close_hint(code: Option<u16>) -> &'static str {
    match code {
        Some(4001) => " (no token: pass --jwt-secret, or run the gateway with --allow-anonymous)",
        Some(4002) | Some(4003) => " (is --jwt-secret the gateway's --jwt-secret?)",
        _ => "",
    }
}

/// What a `joined` said.
#[derive(Debug)]
pub(super) struct Joined {
    pub(super) seq: u64,
    /// Empty when the server had no epoch for the room.
    pub(super) epoch: String,
    /// `(recovered, missed)`, when the join carried a resume point.
    pub(super) resumed: Option<(bool, u64)>,
}

/// Whether `--reconnect` may bring a member back after `failure`: the
/// server went away (a close without code, 1001 going away, 1011-1014
/// server error, restart, try again later, bad gateway; EOF; a socket
/// error). Not after a framing error or a close that blames this client
/// (1002, 1003, 1007, 1008 slow consumer, 1009, 4xxx): a reconnect would
/// hide it.
pub fn reconnectable(failure: ConnFailure) -> bool {
    match failure {
        ConnFailure::Protocol(_) => false,
        ConnFailure::ServerClosed(None) => true,
        ConnFailure::ServerClosed(Some(code)) => matches!(code, 1001 | 1011..=1014),
        ConnFailure::Eof | ConnFailure::Io(_) => true,
    }
}

/// After the upgrade: waits for `welcome`, joins `room` (resuming from
/// `(since, epoch)` if given), waits for `joined` and consumes it; frames
/// after it (a resume's missed messages) stay buffered.
pub(super) async fn join(
    conn: &mut Conn,
    room: &str,
    resume: Option<(u64, &str)>,
    welcomed: &Cell<bool>,
) -> Result<Joined, String> {
    loop {
        // Frames that came with the upgrade response (the welcome often
        // does) are already buffered: handle them before reading more.
        loop {
            let welcome = match conn.next_event() {
                Ok(None) => break,
                Err(e) => return Err(ConnFailure::Protocol(e).to_string()),
                Ok(Some(Event::Close { code, reason })) => {
                    return Err(format!(
                        "the server closed with code {} ({reason:?}) before joined{}",
                        code.map_or("none".into(), |c| c.to_string()),
                        close_hint(code)
                    ));
                }
                Ok(Some(Event::Message {
                    opcode: OpCode::Text,
                    data,
                })) => {
                    let m: Incoming = serde_json::from_slice(data).map_err(|e| {
                        format!(
                            "unreadable frame before joined ({e}): {}",
                            String::from_utf8_lossy(&data[..data.len().min(120)])
                        )
                    })?;
                    match m.kind {
                        "welcome" if !welcomed.get() => true,
                        "joined" if welcomed.get() && m.room == Some(room) => {
                            let seq = m.seq.ok_or_else(|| "joined without a seq".to_string())?;
                            return Ok(Joined {
                                seq,
                                epoch: m.epoch.unwrap_or("").to_string(),
                                resumed: m.recovered.map(|r| (r, m.missed.unwrap_or(0))),
                            });
                        }
                        "error" => {
                            return Err(format!(
                                "error {} before joined: {}",
                                m.code.unwrap_or("(no code)"),
                                m.message.as_deref().unwrap_or("")
                            ))
                        }
                        // Anything else before joined (a presence event, a
                        // message of the room) is passed over.
                        _ => false,
                    }
                }
                Ok(Some(_)) => false,
            };
            if welcome {
                welcomed.set(true);
                let mut join = Vec::with_capacity(96);
                let _ = write!(join, r#"{{"type":"join","room":"{room}""#);
                if let Some((since, epoch)) = resume {
                    let _ = write!(join, r#","since":{since},"epoch":"#);
                    let _ = serde_json::to_writer(&mut join, epoch);
                }
                join.push(b'}');
                let mask = conn.mask();
                encode_frame(conn.tx_mut(), true, OpCode::Text, &join, Some(mask));
            }
        }
        conn.flush()
            .await
            .map_err(|e| format!("sending: {}", ConnFailure::Io(e.kind())))?;
        match conn.fill().await {
            Ok(0) => return Err(format!("{} before joined", ConnFailure::Eof)),
            Ok(_) => {}
            Err(e) => return Err(format!("{} before joined", ConnFailure::Io(e.kind()))),
        }
    }
}

/// Opens connection `index` to `--url` number `slot`, with a token for its
/// user if there is a secret, and joins its room (resuming from `resume`,
/// if given).
pub(super) async fn open(
    ctx: &Ctx,
    index: usize,
    slot: usize,
    exp: u64,
    resume: Option<(u64, &str)>,
) -> Result<(Conn, Joined), String> {
    let plan = &ctx.plan;
    let c = &plan.conn;
    let target: Target = match &plan.jwt_secret {
        Some(secret) => {
            let claims = Claims {
                sub: user_name(&plan.room_prefix, index),
                exp: Some(exp),
                ..Default::default()
            };
            c.target(slot)
                .with_query("token", &auth::mint(secret, &claims))
        }
        None => c.target(slot).clone(),
    };
    let opts = ConnOptions {
        max_frame_bytes: (plan.size + 4096).max(MIN_FRAME_LIMIT),
        initial_rx_bytes: INITIAL_RX_BYTES,
        protocol: Some(SUBPROTOCOL),
    };
    let (mut conn, _) = Conn::connect(
        &target,
        c.source(index),
        index as u64,
        c.connect_timeout,
        opts,
    )
    .await
    .map_err(|e| e.to_string())?;
    let room = &ctx.rooms[ctx.room_of(index)];
    let welcomed = Cell::new(false);
    let joined = async { Some(join(&mut conn, room, resume, &welcomed).await) };
    let timer = async {
        Timer::new(c.connect_timeout).await;
        None
    };
    match or(joined, timer).await {
        Some(Ok(joined)) => Ok((conn, joined)),
        Some(Err(e)) => Err(format!("{}: {e}", target.url)),
        None if welcomed.get() => Err(format!(
            "{}: no joined within {} ms of the join (server overloaded? raise \
             --connect-timeout-ms or lower --connect-rate)",
            target.url,
            c.connect_timeout.as_millis()
        )),
        None => Err(format!(
            "{}: no welcome within {} ms of the upgrade{}",
            target.url,
            c.connect_timeout.as_millis(),
            if plan.jwt_secret.is_none() {
                " (no token was sent: a gateway without --allow-anonymous waits for one; \
                 pass --jwt-secret)"
            } else {
                " (server overloaded? raise --connect-timeout-ms or lower --connect-rate)"
            }
        )),
    }
}
