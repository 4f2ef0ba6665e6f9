// corecast: the JavaScript client of the corecast.v1 chat protocol
// (docs/protocol.md). No dependencies; runs in browsers and in Node >= 20
// with any WebSocket that has the browser's interface (Node 22's global
// one, or `ws`).
//
// What it keeps for the app across reconnects (docs/protocol.md,
// "Resuming a room"): every joined room is joined again with the last seq
// and epoch it delivered, the missed messages are delivered before live
// ones and never twice, a room that could not be recovered is reported,
// and publishes that were not acked are sent again with the same id (the
// server acks a retry of a sequenced id with the original seq), after the
// missed messages, so none is lost or duplicated.

/** The subprotocol the client offers. */
export const SUBPROTOCOL = 'corecast.v1';

/**
 * @typedef {'disconnected' | 'connecting' | 'connected' | 'closed'} State
 *
 * @typedef {object} Options
 * @property {string} [token] a JWT for the whole session (it cannot be refreshed)
 * @property {() => string | Promise<string>} [getToken] asked for a token at
 *   every connect and before the current one expires
 * @property {any} [WebSocket] a WebSocket constructor (default: globalThis.WebSocket)
 * @property {number} [minReconnectDelayMs] first reconnect delay (default 500)
 * @property {number} [maxReconnectDelayMs] the delay's cap (default 20000)
 * @property {number} [connectTimeoutMs] from opening the socket to `welcome` (default 10000)
 * @property {number} [ackTimeoutMs] a publish without ack is sent again after this (default 10000)
 * @property {number} [publishTimeoutMs] a publish not acked by then is rejected `timeout` (default 60000; 0: never)
 * @property {number} [maxQueue] publishes and direct messages waiting to be sent (default 1000)
 * @property {number} [refreshMarginS] refresh this long before `exp` (default 30)
 * @property {boolean} [autoReconnect] reconnect after a lost connection (default true)
 * @property {() => number} [random] jitter source (default Math.random)
 * @property {{setTimeout: (f: () => void, ms: number) => any, clearTimeout: (t: any) => void}} [timers]
 * @property {() => number} [now] the clock in ms (default Date.now)
 *
 * @typedef {object} Message a room message (`msg`)
 * @property {string} room
 * @property {number} seq
 * @property {string} epoch the numbering `seq` belongs to
 * @property {string} from
 * @property {string} id
 * @property {number} ts
 * @property {any} body
 *
 * @typedef {object} JoinInfo what a `joined` frame said
 * @property {string} room
 * @property {number} seq the room's last seq when joined
 * @property {string} epoch
 * @property {number} members this node's connections in the room
 * @property {boolean} resumed the join asked to resume (since and epoch)
 * @property {boolean} recovered nothing was lost since the resume point
 *   (true for a join without a resume point)
 * @property {number} missed missed messages that follow this join
 *
 * @typedef {object} Ack
 * @property {string} id the message id (yours, or the one made for it)
 * @property {number} seq
 * @property {string} epoch
 * @property {boolean} stored
 * @property {boolean} duplicate a retry of a message the server had sequenced
 */

/** Errors with a `code` to branch on (server error codes and close codes). */
export class CorecastError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{closeCode?: number, retryable?: boolean, room?: string, id?: string}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'CorecastError';
    /** e.g. `forbidden`, `rate_limited`, `token_expired`, `slow_consumer`, `timeout` */
    this.code = code;
    /** the WebSocket close code that caused it, if any */
    this.closeCode = extra.closeCode;
    /** trying again later may succeed */
    this.retryable = extra.retryable ?? false;
    this.room = extra.room;
    this.id = extra.id;
  }
}

/** The longest delay setTimeout keeps (browsers and Node). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Server error codes after which a publish is sent again (same id). */
const RETRY_PUBLISH = new Set(['storage_busy', 'storage_unavailable', 'room_moving']);

/**
 * What a close code means to the client (docs/protocol.md, "Close codes").
 * `reconnect`: worth connecting again; `renew`: only with a new token.
 * @param {number} code
 * @param {string} reason
 * @returns {{error: CorecastError, reconnect: boolean, renew: boolean}}
 */
export function classifyClose(code, reason) {
  const err = (/** @type {string} */ name, retryable = true) =>
    new CorecastError(name, reason || `connection closed (${code})`, { closeCode: code, retryable });
  switch (code) {
    case 1001:
      return { error: err('going_away'), reconnect: true, renew: false };
    case 1008:
      return { error: err('slow_consumer'), reconnect: true, renew: false };
    case 1002:
    case 1003:
    case 1007:
    case 1009:
      return { error: err('protocol_error'), reconnect: true, renew: false };
    case 4001:
      return { error: err('unauthorized'), reconnect: true, renew: true };
    case 4002:
      return { error: err('invalid_token'), reconnect: true, renew: true };
    case 4003:
      return { error: err('token_expired'), reconnect: true, renew: true };
    case 4004:
    case 4005:
      return { error: err('too_many_connections', false), reconnect: false, renew: false };
    default:
      if (code >= 4000 && code <= 4999) {
        return { error: err('disconnected_by_server', false), reconnect: false, renew: false };
      }
      return { error: err('connection_lost'), reconnect: true, renew: false };
  }
}

/**
 * The delay before reconnect attempt `attempt` (0 first): exponential from
 * `min` to `max`, the upper half jittered so clients that lost one node do
 * not come back in step.
 * @param {number} attempt
 * @param {number} min
 * @param {number} max
 * @param {() => number} random
 */
export function backoffDelay(attempt, min, max, random) {
  const base = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.round(base / 2 + (random() * base) / 2);
}

/**
 * The `exp` claim of a JWT (Unix seconds), or null.
 * @param {string} token
 * @returns {number | null}
 */
export function tokenExpiry(token) {
  const part = token.split('.')[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const exp = JSON.parse(atob(padded)).exp; // atob: browsers and Node >= 16
    return typeof exp === 'number' ? exp : null;
  } catch {
    return null;
  }
}

class Emitter {
  constructor() {
    /** @type {Map<string, Set<(arg: any) => void>>} */
    this._listeners = new Map();
  }

  /**
   * Calls `fn` on every `event`; returns a function that stops it.
   * @param {string} event
   * @param {(arg: any) => void} fn
   * @returns {() => void}
   */
  on(event, fn) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /**
   * @param {string} event
   * @param {any} arg
   */
  _emit(event, arg) {
    for (const fn of this._listeners.get(event) ?? []) {
      try {
        fn(arg);
      } catch (e) {
        // A listener's bug must not stop the protocol: report it apart.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

/**
 * A publish the server has not acked yet.
 * @typedef {object} Pending
 * @property {string} id
 * @property {Room} room
 * @property {any} body
 * @property {string | null} user the user it was first sent as
 * @property {number} sentOn the connection it was last sent on (0: not yet)
 * @property {any} ackTimer
 * @property {any} deadline
 * @property {number} retries
 * @property {(a: Ack) => void} resolve
 * @property {(e: CorecastError) => void} reject
 */

/**
 * A direct message not yet acked.
 * @typedef {object} PendingDm
 * @property {string} id
 * @property {string} to
 * @property {any} body
 * @property {number} sentOn
 * @property {(a: {delivered: number}) => void} resolve
 * @property {(e: CorecastError) => void} reject
 */

/**
 * A room request without an id (join, leave, presence, history): a room
 * has one on the wire at a time, so an error that names only the room is
 * its answer.
 * @typedef {object} RoomRequest
 * @property {'join' | 'leave' | 'presence' | 'history'} kind
 * @property {() => object} frame
 * @property {(v: any) => void} resolve
 * @property {(e: CorecastError) => void} reject
 */

/** A corecast connection that reconnects and resumes by itself. */
export class Client extends Emitter {
  /**
   * @param {string | string[]} url `ws://host:8080/ws`, or several nodes of a
   *   cluster (tried in turn when one is lost)
   * @param {Options} [options]
   */
  constructor(url, options = {}) {
    super();
    this._urls = Array.isArray(url) ? url.slice() : [url];
    if (this._urls.length === 0) throw new TypeError('corecast: no url');
    this._opts = {
      minReconnectDelayMs: 500,
      maxReconnectDelayMs: 20000,
      connectTimeoutMs: 10000,
      ackTimeoutMs: 10000,
      publishTimeoutMs: 60000,
      maxQueue: 1000,
      refreshMarginS: 30,
      autoReconnect: true,
      ...options,
    };
    this._WebSocket = options.WebSocket ?? /** @type {any} */ (globalThis).WebSocket;
    if (typeof this._WebSocket !== 'function') {
      throw new TypeError("corecast: no WebSocket here: pass {WebSocket} (e.g. from the 'ws' package)");
    }
    this._random = options.random ?? Math.random;
    this._timers = options.timers ?? {
      setTimeout: (/** @type {() => void} */ f, /** @type {number} */ ms) => setTimeout(f, ms),
      clearTimeout: (/** @type {any} */ t) => clearTimeout(t),
    };
    this._now = options.now ?? Date.now;
    /** @type {State} */
    this.state = 'disconnected';
    /** the user the server named in `welcome` */
    this.user = /** @type {string | null} */ (null);
    /** this connection's id on the server */
    this.conn = /** @type {string | null} */ (null);
    /** @type {Map<string, Room>} */
    this._rooms = new Map();
    /** @type {Map<string, Pending>} publishes by id, in the order sent */
    this._pending = new Map();
    /** @type {Map<string, PendingDm>} */
    this._dms = new Map();
    this._ws = /** @type {any} */ (null);
    this._gen = 0; // which socket events belong to
    this._urlIndex = 0;
    this._attempt = 0;
    this._everConnected = false;
    this._reconnectTimer = null;
    this._connectTimer = null;
    this._refreshTimer = null;
    /** @type {{resolve: (exp: number | null) => void, reject: (e: CorecastError) => void} | null} */
    this._refreshing = null;
    this._token = options.token ?? null;
    this._idPrefix = Math.floor(this._random() * 2 ** 32).toString(36) + this._now().toString(36);
    this._idCounter = 0;
  }

  /** Opens the connection (and keeps it open until `close`). */
  connect() {
    if (this.state === 'connecting' || this.state === 'connected') return this;
    this._setState('connecting');
    this._openLogged();
    return this;
  }

  /**
   * Closes for good: no reconnect; unacked publishes and open requests are
   * rejected with `closed`.
   */
  close() {
    this._stop(new CorecastError('closed', 'the client was closed'));
    return this;
  }

  /**
   * The room `name` (one object per name).
   * @param {string} name
   */
  room(name) {
    let room = this._rooms.get(name);
    if (!room) this._rooms.set(name, (room = new Room(this, name)));
    return room;
  }

  /**
   * A direct message to every connection of `to`.
   * @param {string} to
   * @param {any} body
   * @param {{id?: string}} [opts]
   * @returns {Promise<{delivered: number}>}
   */
  dm(to, body, opts = {}) {
    const id = opts.id ?? this._newId();
    return new Promise((resolve, reject) => {
      if (this.state === 'closed') return reject(new CorecastError('closed', 'the client was closed'));
      if (this._queued() >= this._opts.maxQueue) {
        return reject(new CorecastError('queue_full', 'too many messages waiting to be sent', { retryable: true }));
      }
      const p = { id, to, body, sentOn: 0, resolve, reject };
      this._dms.set(id, p);
      if (this.state === 'connected') this._sendDm(p);
    });
  }

  /** Publishes and direct messages not yet on the current connection. */
  _queued() {
    let n = 0;
    for (const p of this._pending.values()) if (p.sentOn !== this._gen || this.state !== 'connected') n++;
    for (const d of this._dms.values()) if (d.sentOn === 0) n++;
    return n;
  }

  _newId() {
    return `${this._idPrefix}-${++this._idCounter}`;
  }

  /** @param {State} state */
  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit('state', state);
  }

  _openLogged() {
    this._open().catch((e) => this._emit('error', new CorecastError('internal', String(e))));
  }

  async _open() {
    const gen = ++this._gen;
    let token = this._token;
    if (this._opts.getToken) {
      try {
        token = await this._opts.getToken();
      } catch (e) {
        if (gen !== this._gen) return;
        const error = new CorecastError('token_unavailable', `getToken failed: ${e}`, { retryable: true });
        this._emit('error', error);
        return this._lost(gen, { error, reconnect: true, renew: false }, 0, '');
      }
      if (gen !== this._gen) return;
      this._token = token;
    }
    const base = this._urls[this._urlIndex % this._urls.length];
    const url = token ? `${base}${base.includes('?') ? '&' : '?'}token=${encodeURIComponent(token)}` : base;
    let ws;
    try {
      ws = new this._WebSocket(url, [SUBPROTOCOL]);
    } catch (e) {
      const error = new CorecastError('connection_lost', `cannot open ${base}: ${e}`, { retryable: true });
      return this._lost(gen, { error, reconnect: true, renew: false }, 0, '');
    }
    this._ws = ws;
    this._connectTimer = this._timers.setTimeout(() => {
      if (gen !== this._gen || this.state === 'connected') return;
      const error = new CorecastError('connection_lost', 'no welcome in time', { retryable: true });
      this._drop(ws);
      this._lost(gen, { error, reconnect: true, renew: false }, 0, '');
    }, this._opts.connectTimeoutMs);
    ws.onmessage = (/** @type {{data: any}} */ ev) => {
      if (gen !== this._gen) return;
      let frame;
      try {
        frame = JSON.parse(String(ev.data));
      } catch {
        return this._emit('error', new CorecastError('bad_frame', 'the server sent a frame that is not JSON'));
      }
      this._frame(frame);
    };
    ws.onclose = (/** @type {{code: number, reason: string}} */ ev) => {
      if (gen !== this._gen) return;
      this._lost(gen, classifyClose(ev.code, ev.reason), ev.code, ev.reason);
    };
    ws.onerror = () => {}; // the close that follows says what happened
  }

  /** @param {any} ws */
  _drop(ws) {
    ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(1000);
    } catch {
      // already closed
    }
  }

  /**
   * The connection `gen` is gone: forget what lived on it, then reconnect
   * or stop.
   * @param {number} gen
   * @param {{error: CorecastError, reconnect: boolean, renew: boolean}} why
   * @param {number} code
   * @param {string} reason
   */
  _lost(gen, why, code, reason) {
    if (gen !== this._gen || this.state === 'closed') return;
    this._gen++;
    this._ws = null;
    this._clearTimers();
    const wasConnected = this.state === 'connected';
    for (const room of this._rooms.values()) room._lost();
    // A direct message is not deduplicated by the server: one that was on
    // the wire may or may not have arrived. The app decides.
    for (const d of [...this._dms.values()]) {
      if (d.sentOn !== 0) {
        this._dms.delete(d.id);
        d.reject(new CorecastError('connection_lost', 'the connection was lost before the ack', { retryable: true, id: d.id }));
      }
    }
    if (this._refreshing) {
      this._refreshing.reject(new CorecastError('connection_lost', 'the connection was lost', { retryable: true }));
      this._refreshing = null;
    }
    const reconnect = this._opts.autoReconnect && why.reconnect && (!why.renew || !!this._opts.getToken);
    if (!reconnect) {
      this._emit('disconnected', { code, reason, error: why.error, reconnectInMs: null });
      this._stop(why.error);
      return;
    }
    if (!wasConnected) this._urlIndex++; // this node did not take us: try the next
    const delay = backoffDelay(this._attempt++, this._opts.minReconnectDelayMs, this._opts.maxReconnectDelayMs, this._random);
    this._setState('connecting');
    this._emit('disconnected', { code, reason, error: why.error, reconnectInMs: delay });
    this._reconnectTimer = this._timers.setTimeout(() => {
      this._reconnectTimer = null;
      if (this.state === 'connecting') this._openLogged();
    }, delay);
  }

  /** @param {CorecastError} error */
  _stop(error) {
    const wasOpen = this.state !== 'closed';
    this._setState('closed');
    this._gen++;
    this._clearTimers();
    if (this._reconnectTimer) this._timers.clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    if (this._ws) this._drop(this._ws);
    this._ws = null;
    if (!wasOpen) return;
    for (const room of this._rooms.values()) room._stop(error);
    for (const p of this._pending.values()) this._settle(p, null, error);
    for (const d of this._dms.values()) d.reject(error);
    this._dms.clear();
    if (this._refreshing) this._refreshing.reject(error);
    this._refreshing = null;
    if (error.code !== 'closed') this._emit('error', error);
  }

  _clearTimers() {
    if (this._connectTimer) this._timers.clearTimeout(this._connectTimer);
    if (this._refreshTimer) this._timers.clearTimeout(this._refreshTimer);
    this._connectTimer = this._refreshTimer = null;
  }

  /** @param {object} frame */
  _send(frame) {
    this._ws.send(JSON.stringify(frame));
  }

  /** @param {any} f a frame from the server */
  _frame(f) {
    const room = typeof f.room === 'string' ? this._rooms.get(f.room) : undefined;
    switch (f.type) {
      case 'welcome':
        return this._welcome(f);
      case 'joined':
        return room?._joined(f);
      case 'left':
        return room?._left(f);
      case 'msg':
        return room?._msg(f);
      case 'presence_event':
        return room?._emit('presence', { room: f.room, event: f.event, user: f.user });
      case 'presence':
        return room?._answer('presence', { count: f.count, users: f.users });
      case 'history':
        return room?._answer('history', {
          epoch: f.epoch,
          seq: f.seq,
          complete: f.complete,
          messages: (f.messages ?? []).map((/** @type {any} */ m) => ({ room: f.room, epoch: f.epoch, ...m })),
        });
      case 'ack':
        return f.to !== undefined ? this._dmAck(f) : this._ack(f);
      case 'dm':
        return this._emit('dm', { from: f.from, id: f.id, ts: f.ts, body: f.body });
      case 'refreshed':
        this._refreshing?.resolve(f.exp);
        this._refreshing = null;
        return this._scheduleRefresh(f.exp);
      case 'error':
        return this._error(f);
      default:
        return; // a frame type from a newer server
    }
  }

  /** @param {any} f */
  _welcome(f) {
    if (this._connectTimer) this._timers.clearTimeout(this._connectTimer);
    this._connectTimer = null;
    const reconnected = this._everConnected;
    this._everConnected = true;
    this._attempt = 0;
    this.user = f.user;
    this.conn = f.conn;
    this._setState('connected');
    this._emit('connected', { user: f.user, conn: f.conn, reconnected });
    this._scheduleRefresh(this._token ? tokenExpiry(this._token) : null);
    for (const room of this._rooms.values()) room._connected();
    for (const d of this._dms.values()) if (d.sentOn === 0) this._sendDm(d);
  }

  /** @param {number | null} exp */
  _scheduleRefresh(exp) {
    if (this._refreshTimer) this._timers.clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (exp == null || !this._opts.getToken) return;
    const left = exp * 1000 - this._now();
    const margin = Math.min(this._opts.refreshMarginS * 1000, left / 2);
    const wait = Math.max(0, left - margin);
    if (wait > MAX_TIMER_MS) {
      // Timers take at most 2^31-1 ms (a longer delay fires at once).
      this._refreshTimer = this._timers.setTimeout(() => this._scheduleRefresh(exp), MAX_TIMER_MS);
      return;
    }
    this._refreshTimer = this._timers.setTimeout(() => {
      this._refreshTimer = null;
      this.refresh().catch((e) => {
        this._emit('error', e);
        // Try again while the token still holds; at exp the server closes
        // (4003) and the reconnect asks getToken afresh.
        if (this.state === 'connected' && exp * 1000 - this._now() > 2000) this._scheduleRefresh(exp);
      });
    }, wait);
  }

  /**
   * Replaces the connection's token with a fresh one from `getToken` before
   * it expires (done by itself `refreshMarginS` before `exp`).
   * @returns {Promise<number | null>} the new `exp`
   */
  async refresh() {
    if (!this._opts.getToken) throw new CorecastError('no_token_source', 'refresh needs the getToken option');
    if (this.state !== 'connected') throw new CorecastError('not_connected', 'not connected', { retryable: true });
    if (this._refreshing) throw new CorecastError('refresh_in_progress', 'a refresh is already on its way', { retryable: true });
    const gen = this._gen;
    const token = await this._opts.getToken();
    if (gen !== this._gen || this.state !== 'connected') {
      throw new CorecastError('connection_lost', 'the connection was lost', { retryable: true });
    }
    return new Promise((resolve, reject) => {
      this._refreshing = {
        resolve: (exp) => {
          this._token = token;
          resolve(exp);
        },
        reject,
      };
      this._send({ type: 'refresh', token });
    });
  }

  /** @param {Pending} p */
  _sendPublish(p) {
    p.sentOn = this._gen;
    p.user ??= this.user;
    this._send({ type: 'publish', room: p.room.name, id: p.id, body: p.body });
    if (p.ackTimer) this._timers.clearTimeout(p.ackTimer);
    p.ackTimer = this._timers.setTimeout(() => {
      p.ackTimer = null;
      // No ack and no error: its home may have died with it. Sending it
      // again with the same id is safe: the home acks a sequenced id again.
      if (this._pending.get(p.id) === p && p.sentOn === this._gen && p.room._ready()) this._sendPublish(p);
    }, this._opts.ackTimeoutMs);
  }

  /** @param {PendingDm} d */
  _sendDm(d) {
    d.sentOn = this._gen;
    this._send({ type: 'dm', to: d.to, id: d.id, body: d.body });
  }

  /**
   * Settles a publish once.
   * @param {Pending} p
   * @param {Ack | null} ack
   * @param {CorecastError} [error]
   */
  _settle(p, ack, error) {
    if (this._pending.get(p.id) !== p) return;
    this._pending.delete(p.id);
    if (p.ackTimer) this._timers.clearTimeout(p.ackTimer);
    if (p.deadline) this._timers.clearTimeout(p.deadline);
    if (ack) p.resolve(ack);
    else p.reject(/** @type {CorecastError} */ (error));
  }

  /** @param {any} f */
  _ack(f) {
    const p = this._pending.get(f.id);
    if (!p) return; // an ack for a publish already settled
    this._settle(p, { id: p.id, seq: f.seq, epoch: f.epoch, stored: f.stored, duplicate: !!f.duplicate });
  }

  /** @param {any} f */
  _dmAck(f) {
    const d = this._dms.get(f.id);
    if (!d) return;
    this._dms.delete(f.id);
    d.resolve({ delivered: f.delivered });
  }

  /** @param {any} f */
  _error(f) {
    const error = new CorecastError(f.code, f.message, {
      retryable: RETRY_PUBLISH.has(f.code) || f.code === 'rate_limited',
      room: f.room,
      id: f.id,
    });
    const p = f.id !== undefined ? this._pending.get(f.id) : undefined;
    if (p) {
      if (RETRY_PUBLISH.has(f.code)) return this._retryPublish(p);
      return this._settle(p, null, error);
    }
    const d = f.id !== undefined ? this._dms.get(f.id) : undefined;
    if (d) {
      this._dms.delete(d.id);
      return d.reject(error);
    }
    if (this._refreshing && (f.code === 'invalid_token' || f.code === 'token_user_mismatch')) {
      this._refreshing.reject(error);
      this._refreshing = null;
      return;
    }
    const room = typeof f.room === 'string' ? this._rooms.get(f.room) : undefined;
    if (room && room._refused(error)) return;
    this._emit('error', error);
  }

  /**
   * The server could not take a publish for now: send it again with the
   * same id after a backoff, until its deadline.
   * @param {Pending} p
   */
  _retryPublish(p) {
    if (p.ackTimer) this._timers.clearTimeout(p.ackTimer);
    const gen = this._gen;
    const delay = backoffDelay(p.retries++, this._opts.minReconnectDelayMs / 5, this._opts.maxReconnectDelayMs / 4, this._random);
    p.ackTimer = this._timers.setTimeout(() => {
      p.ackTimer = null;
      if (this._pending.get(p.id) === p && gen === this._gen && p.room._ready()) this._sendPublish(p);
    }, delay);
  }

  /**
   * @param {Room} room
   * @param {any} body
   * @param {string} id
   * @returns {Promise<Ack>}
   */
  _publish(room, body, id) {
    return new Promise((resolve, reject) => {
      if (this.state === 'closed') return reject(new CorecastError('closed', 'the client was closed'));
      if (!room._wanted) return reject(new CorecastError('not_joined', 'join the room first', { room: room.name, id }));
      if (this._pending.has(id)) return reject(new CorecastError('duplicate_id', `a publish with id ${id} is already waiting`, { id }));
      if (this._queued() >= this._opts.maxQueue) {
        return reject(new CorecastError('queue_full', 'too many messages waiting to be sent', { retryable: true, room: room.name, id }));
      }
      /** @type {Pending} */
      const p = { id, room, body, user: null, sentOn: 0, ackTimer: null, deadline: null, retries: 0, resolve, reject };
      this._pending.set(id, p);
      if (this._opts.publishTimeoutMs > 0) {
        p.deadline = this._timers.setTimeout(() => {
          p.deadline = null;
          const error =
            p.sentOn === 0
              ? new CorecastError('not_sent', 'not connected in time: never sent, not published', { retryable: true, room: room.name, id })
              : new CorecastError('timeout', 'no ack in time: it may or may not have been published', { retryable: true, room: room.name, id });
          this._settle(p, null, error);
        }, this._opts.publishTimeoutMs);
      }
      if (room._ready()) this._sendPublish(p);
    });
  }

  /**
   * The room is joined again and its missed messages are in: send what it
   * has not had acked, in the order the app published it.
   * @param {Room} room
   */
  _resend(room) {
    for (const p of this._pending.values()) {
      if (p.room === room && p.sentOn !== this._gen) this._sendPublish(p);
    }
  }

  /**
   * A missed message delivered on resume may be one of ours whose ack was
   * lost with the connection: it was sequenced and stored, so it is acked.
   * @param {Room} room
   * @param {Message} m
   */
  _replayed(room, m) {
    const p = m.id ? this._pending.get(m.id) : undefined;
    if (p && p.room === room && p.user === m.from) {
      this._settle(p, { id: p.id, seq: m.seq, epoch: m.epoch, stored: true, duplicate: true });
    }
  }

  /** @param {Room} room */
  _leftRoom(room) {
    for (const p of [...this._pending.values()]) {
      if (p.room === room && p.sentOn !== this._gen) {
        this._settle(p, null, new CorecastError('not_joined', 'the room was left before this was sent', { room: room.name, id: p.id }));
      }
    }
  }
}

/** A room: its messages, its presence, and what the client keeps to resume it. */
export class Room extends Emitter {
  /**
   * @param {Client} client
   * @param {string} name
   */
  constructor(client, name) {
    super();
    this.client = client;
    this.name = name;
    /** the last seq delivered to the app (0: none yet) */
    this.seq = 0;
    /** the epoch `seq` belongs to ('' : none) */
    this.epoch = '';
    /** joined on the current connection */
    this.joined = false;
    this._wanted = false; // joined by the app (and not left)
    this._replaying = 0; // missed messages still to come after `joined`
    this._resuming = false;
    /** @type {RoomRequest[]} */
    this._queue = [];
    /** @type {RoomRequest | null} */
    this._inflight = null;
    /** @type {{resolve: (i: JoinInfo) => void, reject: (e: CorecastError) => void}[]} */
    this._joinWaiters = [];
  }

  /**
   * Joins the room (and joins it again after every reconnect). With
   * `since` and `epoch` (kept from an earlier session) the messages missed
   * after `since` come first.
   * @param {{since?: number, epoch?: string}} [opts]
   * @returns {Promise<JoinInfo>}
   */
  join(opts = {}) {
    const c = this.client;
    if (c.state === 'closed') return Promise.reject(new CorecastError('closed', 'the client was closed'));
    if ((opts.since === undefined) !== (opts.epoch === undefined)) {
      return Promise.reject(new CorecastError('bad_request', 'give both since and epoch, or neither'));
    }
    if (opts.since !== undefined) {
      this.seq = opts.since;
      this.epoch = /** @type {string} */ (opts.epoch);
    }
    const p = new Promise((resolve, reject) => this._joinWaiters.push({ resolve, reject }));
    if (!this._wanted) {
      this._wanted = true;
      if (c.state === 'connected') this._enqueueJoin(false);
    } else if (this.joined && this._replaying === 0 && this._inflight?.kind !== 'join') {
      this._settleJoin(null, new CorecastError('already_joined', 'already joined this room', { room: this.name }));
    }
    return /** @type {Promise<JoinInfo>} */ (p);
  }

  /**
   * Leaves the room (no rejoin after a reconnect).
   * @returns {Promise<void>}
   */
  leave() {
    if (!this._wanted) return Promise.resolve();
    this._wanted = false;
    this._settleJoin(null, new CorecastError('left', 'left before the join was answered', { room: this.name }));
    this._queue = this._queue.filter((r) => r.kind !== 'join');
    this.client._leftRoom(this);
    if (!this.joined && this._inflight?.kind !== 'join') return Promise.resolve();
    return this._request('leave', () => ({ type: 'leave', room: this.name }));
  }

  /**
   * Publishes `body` (any JSON value). Resolves with the ack; retried with
   * the same id across reconnects until acked.
   * @param {any} body
   * @param {{id?: string}} [opts] `id`: the message id (one is made if absent)
   * @returns {Promise<Ack>}
   */
  publish(body, opts = {}) {
    return this.client._publish(this, body, opts.id ?? this.client._newId());
  }

  /**
   * The room's last `limit` messages, or up to `limit` after `since`.
   * @param {{limit?: number, since?: number}} [opts]
   * @returns {Promise<{epoch: string, seq: number, complete: boolean, messages: Message[]}>}
   */
  history(opts = {}) {
    return this._request('history', () => ({ type: 'history', room: this.name, ...opts }));
  }

  /**
   * Who is in the room.
   * @returns {Promise<{count: number, users: string[] | null}>}
   */
  presence() {
    return this._request('presence', () => ({ type: 'presence', room: this.name }));
  }

  /** Joined on this connection, missed messages in: publishes may go. */
  _ready() {
    return this.client.state === 'connected' && this.joined && this._replaying === 0;
  }

  /**
   * @param {RoomRequest['kind']} kind
   * @param {() => object} frame
   * @param {boolean} [front]
   * @returns {Promise<any>}
   */
  _request(kind, frame, front = false) {
    return new Promise((resolve, reject) => {
      if (this.client.state === 'closed') return reject(new CorecastError('closed', 'the client was closed'));
      const r = { kind, frame, resolve, reject };
      if (front) this._queue.unshift(r);
      else this._queue.push(r);
      this._pump();
    });
  }

  _pump() {
    if (this._inflight || this.client.state !== 'connected') return;
    const r = this._queue.shift();
    if (!r) return;
    this._inflight = r;
    this.client._send(r.frame());
  }

  /**
   * @param {string} kind
   * @param {any} value
   */
  _answer(kind, value) {
    const r = this._inflight;
    if (!r || r.kind !== kind) return;
    this._inflight = null;
    r.resolve(value);
    this._pump();
  }

  /** @param {boolean} front */
  _enqueueJoin(front) {
    const resume = this.epoch !== '';
    this._resuming = resume;
    this._request(
      'join',
      () => (resume ? { type: 'join', room: this.name, since: this.seq, epoch: this.epoch } : { type: 'join', room: this.name }),
      front,
    ).catch(() => {}); // the waiters of join() hear of it
  }

  /**
   * @param {JoinInfo | null} info
   * @param {CorecastError} [error]
   */
  _settleJoin(info, error) {
    const waiters = this._joinWaiters;
    this._joinWaiters = [];
    for (const w of waiters) info ? w.resolve(info) : w.reject(/** @type {CorecastError} */ (error));
  }

  /** @param {any} f */
  _joined(f) {
    const resumed = this._resuming;
    this._resuming = false;
    if (f.epoch !== this.epoch || (f.recovered === false && f.missed === 0)) {
      // A new numbering (or nothing of the gap comes): live messages
      // follow from this seq on.
      this.seq = f.seq;
    } else if (!resumed) {
      this.seq = f.seq;
    }
    this.epoch = f.epoch;
    this.joined = true;
    this._replaying = f.missed ?? 0;
    /** @type {JoinInfo} */
    const info = {
      room: this.name,
      seq: f.seq,
      epoch: f.epoch,
      members: f.members,
      resumed,
      recovered: resumed ? f.recovered === true : true,
      missed: f.missed ?? 0,
    };
    this._settleJoin(info);
    this._emit('joined', info);
    if (resumed && !info.recovered) this._emit('unrecovered', info);
    this._answer('join', info);
    if (this._replaying === 0) this.client._resend(this);
  }

  /** @param {any} f */
  _left(f) {
    this.joined = false;
    this._replaying = 0;
    if (f.by === 'server' || this._inflight?.kind !== 'leave') {
      // The server took us out (the API, or a refreshed token that does
      // not allow the room): no rejoin.
      this._wanted = false;
      this.client._leftRoom(this);
      this._emit('left', { room: this.name, by: f.by ?? 'token' });
      return;
    }
    this._emit('left', { room: this.name, by: 'client' });
    this._answer('leave', undefined);
  }

  /** @param {any} f */
  _msg(f) {
    if (f.seq <= this.seq) {
      if (this._replaying > 0 && --this._replaying === 0) this.client._resend(this);
      return; // already delivered (a resume overlapping what we had)
    }
    this.seq = f.seq;
    /** @type {Message} */
    const m = { room: this.name, seq: f.seq, epoch: this.epoch, from: f.from, id: f.id, ts: f.ts, body: f.body };
    if (this._replaying > 0) this.client._replayed(this, m);
    this._emit('message', m);
    if (this._replaying > 0 && --this._replaying === 0) this.client._resend(this);
  }

  /**
   * An error naming this room and no id: the answer to the request on the
   * wire, if there is one.
   * @param {CorecastError} error
   * @returns {boolean} it was
   */
  _refused(error) {
    const r = this._inflight;
    if (!r) return false;
    this._inflight = null;
    if (r.kind === 'join') {
      this._resuming = false;
      if (error.retryable) {
        // Busy or moving: join again after a moment.
        this.client._timers.setTimeout(() => {
          if (this._wanted && !this.joined && this.client.state === 'connected') this._enqueueJoin(true);
        }, backoffDelay(0, this.client._opts.minReconnectDelayMs, this.client._opts.maxReconnectDelayMs, this.client._random));
      } else {
        this._wanted = false;
        this._settleJoin(null, error);
        this.client._leftRoom(this);
        this._emit('error', error);
      }
    }
    r.reject(error);
    this._pump();
    return true;
  }

  /** The connection is gone: the server forgot the join. */
  _lost() {
    this.joined = false;
    this._replaying = 0;
    const r = this._inflight;
    this._inflight = null;
    if (r?.kind === 'leave') r.resolve(undefined); // nothing left to leave
    else if (r && r.kind !== 'join') this._queue.unshift(r); // asked again on the next connection
    const kept = [];
    for (const q of this._queue) {
      if (q.kind === 'leave') q.resolve(undefined);
      else if (q.kind !== 'join') kept.push(q); // a join is sent afresh by _connected
    }
    this._queue = kept;
  }

  /** A new connection: join again where we were. */
  _connected() {
    if (this._wanted) this._enqueueJoin(true);
    else this._pump();
  }

  /** @param {CorecastError} error */
  _stop(error) {
    this.joined = false;
    this._replaying = 0;
    this._settleJoin(null, error);
    const all = this._inflight ? [this._inflight, ...this._queue] : this._queue;
    this._inflight = null;
    this._queue = [];
    for (const r of all) r.reject(error);
  }
}
