//! The Redis store: a stream per room, a small hash with the room's sequence
//! and epoch, and a sorted set for presence.
//!
//! Keys (the `{room}` hash tag keeps a room's keys on one cluster slot):
//! - `cc:{room}:s`: stream; entry id `<seq>-0`, fields `f` (sender), `i`
//!   (client message id), `t` (ms since the Unix epoch), `b` (body JSON).
//!   Capped at `--history-size` entries; expires `--history-ttl-s` after
//!   the last message.
//! - `cc:{room}:m`: hash with `seq` (last stored seq) and `epoch`; expires
//!   `--history-meta-ttl-s` after the last message.
//! - `cc:{room}:p`: sorted set of `<node>|<user>` scored by when the entry
//!   expires (ms); refreshed by the home shards' heartbeats.
//!
//! # Invariants
//! - Appends go through one Lua script per room and batch, pipelined: a
//!   record whose seq is not above the stored `seq` is skipped, so a batch
//!   replayed after a failure stores each message exactly once.
//! - Any error drops the connection; the worker reconnects when it probes.

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::Value;

use super::{
    new_epoch, Backend, PresenceOp, Query, Record, RoomMeta, StartError, StorageConfig, StoreError,
};

/// Longest a probe of an unreachable Redis may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

const APPEND: &str = r#"
local s = redis.call('HGET', KEYS[2], 'seq')
local last = 0
if s then
  last = tonumber(s)
else
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #top > 0 then last = tonumber(string.match(top[1][1], '^(%d+)')) end
end
-- ARGV[4]: the epoch the home numbered these records in ('' = keep).
local epoch = ARGV[4]
if epoch == '' then epoch = ARGV[5] end
-- Approximate trimming drops whole stream nodes (100 entries): exact below
-- that, where it costs nothing.
local trim = '~'
if tonumber(ARGV[1]) < 100 then trim = '=' end
local added = 0
-- A seq at or below the last one is either this very message written
-- before (a replay: skipped) or another home's (a conflict: reported).
local conflicts = {}
for i = 6, #ARGV, 5 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[1], 'MAXLEN', trim, ARGV[1], ARGV[i] .. '-0',
      'f', ARGV[i + 1], 'i', ARGV[i + 2], 't', ARGV[i + 3], 'b', ARGV[i + 4])
    last = seq
    added = added + 1
  else
    local e = redis.call('XRANGE', KEYS[1], ARGV[i] .. '-0', ARGV[i] .. '-0')
    local same = false
    if #e == 1 then
      local f = {}
      for j = 1, #e[1][2], 2 do f[e[1][2][j]] = e[1][2][j + 1] end
      same = f['f'] == ARGV[i + 1] and f['i'] == ARGV[i + 2] and f['t'] == ARGV[i + 3]
    end
    if not same then conflicts[#conflicts + 1] = seq end
  end
end
if added > 0 then
  redis.call('HSET', KEYS[2], 'seq', last)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'epoch', ARGV[4]) end
end
redis.call('HSETNX', KEYS[2], 'epoch', epoch)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return conflicts
"#;

const LOAD: &str = r#"
local e = redis.call('HGET', KEYS[2], 'epoch')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[2], 'epoch', e)
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local s = redis.call('HGET', KEYS[2], 'seq')
if not s then
  s = '0'
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #top > 0 then s = string.match(top[1][1], '^(%d+)') end
  -- Keep it: the stream may expire before the next message.
  redis.call('HSET', KEYS[2], 'seq', s)
end
return {s, e}
"#;

const ADVANCE: &str = r#"
local s = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if tonumber(ARGV[1]) > s then redis.call('HSET', KEYS[1], 'seq', ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

struct Live {
    conn: redis::Connection,
    append_sha: String,
    load_sha: String,
}

pub struct RedisStore {
    url: String,
    client: redis::Client,
    live: Option<Live>,
    timeout: Duration,
    /// The default namespace's history (for the log line).
    history_size: usize,
    history_ttl_ms: u64,
    /// Each room's history size and lifetime come from its namespace.
    namespaces: corecast_router::namespace::Namespaces,
    meta_ttl_ms: u64,
    node: String,
    presence_ttl_ms: u64,
}

fn err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what}: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn stream_key(room: &str) -> String {
    format!("cc:{{{room}}}:s")
}

fn meta_key(room: &str) -> String {
    format!("cc:{{{room}}}:m")
}

fn presence_key(room: &str) -> String {
    format!("cc:{{{room}}}:p")
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn bad_reply(what: &str, v: &Value) -> StoreError {
    StoreError(format!("unexpected reply to {what}: {v:?}"))
}

/// Parses XRANGE/XREVRANGE entries into records (of the room's epoch).
fn parse_entries(
    room: &std::sync::Arc<str>,
    epoch: &std::sync::Arc<str>,
    v: &Value,
) -> Result<Vec<Record>, StoreError> {
    let Value::Array(entries) = v else {
        return Err(bad_reply("XRANGE", v));
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(parts) = e else {
            return Err(bad_reply("XRANGE entry", e));
        };
        let (Some(id), Some(Value::Array(fields))) = (parts.first().and_then(text), parts.get(1))
        else {
            return Err(bad_reply("XRANGE entry", e));
        };
        let seq = id
            .split('-')
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad_reply("XRANGE id", e))?;
        let mut rec = Record {
            room: room.clone(),
            seq,
            from: std::sync::Arc::from(""),
            id: "".into(),
            ts: 0,
            body: "null".into(),
            epoch: epoch.clone(),
        };
        for kv in fields.chunks(2) {
            let (Some(k), Some(v)) = (kv.first().and_then(text), kv.get(1).and_then(text)) else {
                continue;
            };
            match k.as_str() {
                "f" => rec.from = std::sync::Arc::from(v),
                "i" => rec.id = v.into(),
                "t" => rec.ts = v.parse().unwrap_or(0),
                "b" => rec.body = v.into(),
                _ => {}
            }
        }
        out.push(rec);
    }
    Ok(out)
}

impl RedisStore {
    /// Checks the URL; does not connect (the worker does, and a refused
    /// connection only opens the breaker).
    pub fn new(url: &str, config: &StorageConfig) -> Result<RedisStore, StartError> {
        let client = redis::Client::open(url).map_err(|e| StartError::BadUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        Ok(RedisStore {
            url: url.to_string(),
            client,
            live: None,
            timeout: config.redis_timeout,
            history_size: config.history_size,
            history_ttl_ms: config.history_ttl.as_millis() as u64,
            namespaces: config.namespaces.clone(),
            meta_ttl_ms: config.meta_ttl.as_millis() as u64,
            node: config.node_id.clone(),
            presence_ttl_ms: config.presence_ttl.as_millis() as u64,
        })
    }

    fn live(&mut self) -> Result<&mut Live, StoreError> {
        self.live
            .as_mut()
            .ok_or_else(|| StoreError("not connected".into()))
    }

    /// Runs `f` on the connection; an error drops it.
    fn with<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Live) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let live = self.live()?;
        match f(live) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.live = None;
                Err(err(what, e))
            }
        }
    }

    fn meta_from(&self, v: &Value) -> Result<RoomMeta, StoreError> {
        let Value::Array(parts) = v else {
            return Err(bad_reply("load", v));
        };
        let seq = parts
            .first()
            .and_then(text)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_reply("load", v))?;
        let epoch = parts
            .get(1)
            .and_then(text)
            .ok_or_else(|| bad_reply("load", v))?;
        Ok(RoomMeta {
            last_seq: seq,
            epoch: epoch.into(),
        })
    }

    fn load_cmd(&self, pipe: &mut redis::Pipeline, sha: &str, room: &str) {
        pipe.cmd("EVALSHA")
            .arg(sha)
            .arg(2)
            .arg(stream_key(room))
            .arg(meta_key(room))
            .arg(new_epoch())
            .arg(self.meta_ttl_ms);
    }
}

impl Backend for RedisStore {
    fn describe(&self) -> String {
        format!(
            "redis at {} (last {} messages per room, history ttl {} s)",
            self.url,
            self.history_size,
            self.history_ttl_ms / 1000
        )
    }

    fn connect(&mut self) -> Result<(), StoreError> {
        self.live = None;
        // The worker probes on its own thread: a Redis that is up but stuck
        // (DEBUG SLEEP, a long save) must not hold it for a whole timeout.
        let probe = self.timeout.min(PROBE_TIMEOUT);
        let mut conn = self
            .client
            .get_connection_with_timeout(probe)
            .map_err(|e| err("connect", e))?;
        conn.set_read_timeout(Some(probe))
            .and_then(|_| conn.set_write_timeout(Some(probe)))
            .map_err(|e| err("set timeouts", e))?;
        let load = |src: &str, conn: &mut redis::Connection| -> Result<String, StoreError> {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(src)
                .query::<String>(conn)
                .map_err(|e| err("SCRIPT LOAD", e))
        };
        let append_sha = load(APPEND, &mut conn)?;
        let load_sha = load(LOAD, &mut conn)?;
        conn.set_read_timeout(Some(self.timeout))
            .and_then(|_| conn.set_write_timeout(Some(self.timeout)))
            .map_err(|e| err("set timeouts", e))?;
        self.live = Some(Live {
            conn,
            append_sha,
            load_sha,
        });
        Ok(())
    }

    fn append(&mut self, records: &[Record]) -> Result<Vec<usize>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // One script call per room and epoch, each room's records in order.
        let meta_ttl = self.meta_ttl_ms;
        let table = self.namespaces.load();
        let fresh = new_epoch();
        let mut groups: Vec<(&str, &str, Vec<usize>)> = Vec::new();
        let mut index: std::collections::HashMap<(&str, &str), usize> =
            std::collections::HashMap::new();
        for (k, r) in records.iter().enumerate() {
            let i = *index.entry((&r.room, &r.epoch)).or_insert_with(|| {
                groups.push((&r.room, &r.epoch, Vec::new()));
                groups.len() - 1
            });
            groups[i].2.push(k);
        }
        self.with("append", |live| {
            let mut pipe = redis::pipe();
            for (room, epoch, recs) in &groups {
                let ns = table.of(room);
                let (maxlen, ttl) = (ns.history_size, ns.history_ttl.as_millis() as u64);
                let c = pipe
                    .cmd("EVALSHA")
                    .arg(&live.append_sha)
                    .arg(2)
                    .arg(stream_key(room))
                    .arg(meta_key(room))
                    .arg(maxlen)
                    .arg(ttl)
                    .arg(meta_ttl)
                    .arg(*epoch)
                    .arg(&fresh);
                for r in recs.iter().map(|&k| &records[k]) {
                    c.arg(r.seq)
                        .arg(&*r.from)
                        .arg(&*r.id)
                        .arg(r.ts)
                        .arg(&*r.body);
                }
            }
            pipe.query::<Vec<Vec<u64>>>(&mut live.conn)
        })
        .map(|per_group| {
            let mut conflicts = Vec::new();
            for ((_, _, recs), seqs) in groups.iter().zip(per_group) {
                conflicts.extend(recs.iter().filter(|&&k| seqs.contains(&records[k].seq)));
            }
            conflicts
        })
    }

    fn load(&mut self, room: &str) -> Result<RoomMeta, StoreError> {
        let sha = self.live()?.load_sha.clone();
        let mut pipe = redis::pipe();
        self.load_cmd(&mut pipe, &sha, room);
        let v: Vec<Value> = self.with("load", |live| pipe.query(&mut live.conn))?;
        self.meta_from(v.first().unwrap_or(&Value::Nil))
    }

    fn fetch(&mut self, room: &str, q: Query) -> Result<(RoomMeta, Vec<Record>), StoreError> {
        let sha = self.live()?.load_sha.clone();
        let mut pipe = redis::pipe();
        self.load_cmd(&mut pipe, &sha, room);
        match q {
            Query::Last(n) => pipe
                .cmd("XREVRANGE")
                .arg(stream_key(room))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(n),
            Query::After { after, n } => pipe
                .cmd("XRANGE")
                .arg(stream_key(room))
                .arg(format!("({after}-0"))
                .arg("+")
                .arg("COUNT")
                .arg(n),
        };
        let v: Vec<Value> = self.with("fetch", |live| pipe.query(&mut live.conn))?;
        let meta = self.meta_from(v.first().unwrap_or(&Value::Nil))?;
        let room_arc: std::sync::Arc<str> = std::sync::Arc::from(room);
        let mut records = parse_entries(&room_arc, &meta.epoch, v.get(1).unwrap_or(&Value::Nil))?;
        if matches!(q, Query::Last(_)) {
            records.reverse();
        }
        Ok((meta, records))
    }

    fn keeps_presence(&self) -> bool {
        true
    }

    fn advance_seq(&mut self, room: &str, seq: u64) -> Result<(), StoreError> {
        let meta_ttl = self.meta_ttl_ms;
        self.with("advance seq", |live| {
            redis::cmd("EVAL")
                .arg(ADVANCE)
                .arg(1)
                .arg(meta_key(room))
                .arg(seq)
                .arg(meta_ttl)
                .query::<()>(&mut live.conn)
        })
    }

    fn presence(&mut self, ops: &[PresenceOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let until = now + self.presence_ttl_ms;
        let key_ttl = self.presence_ttl_ms * 2;
        let node = self.node.clone();
        self.with("presence", |live| {
            let mut pipe = redis::pipe();
            for op in ops {
                match op {
                    PresenceOp::Add { room, user } => {
                        let k = presence_key(room);
                        pipe.cmd("ZADD")
                            .arg(&k)
                            .arg(until)
                            .arg(format!("{node}|{user}"))
                            .ignore();
                        pipe.cmd("PEXPIRE").arg(&k).arg(key_ttl).ignore();
                    }
                    PresenceOp::Remove { room, user } => {
                        pipe.cmd("ZREM")
                            .arg(presence_key(room))
                            .arg(format!("{node}|{user}"))
                            .ignore();
                    }
                    PresenceOp::Refresh { room, users } => {
                        let k = presence_key(room);
                        if !users.is_empty() {
                            let c = pipe.cmd("ZADD").arg(&k);
                            for u in users {
                                c.arg(until).arg(format!("{node}|{u}"));
                            }
                            c.ignore();
                        }
                        pipe.cmd("ZREMRANGEBYSCORE")
                            .arg(&k)
                            .arg("-inf")
                            .arg(now)
                            .ignore();
                        pipe.cmd("PEXPIRE").arg(&k).arg(key_ttl).ignore();
                    }
                }
            }
            pipe.query::<()>(&mut live.conn)
        })
    }

    fn presence_list(&mut self, room: &str) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        let members: Vec<String> = self.with("presence list", |live| {
            redis::cmd("ZRANGEBYSCORE")
                .arg(presence_key(room))
                .arg(now)
                .arg("+inf")
                .query(&mut live.conn)
        })?;
        let users: BTreeSet<String> = members
            .into_iter()
            .filter_map(|m| m.split_once('|').map(|(_, u)| u.to_string()))
            .collect();
        Ok(users.into_iter().collect())
    }
}
