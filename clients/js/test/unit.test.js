// The client's state machine against a scripted server: a fake WebSocket
// and a fake clock, so every reconnect, resume and retry is exact.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Client, CorecastError, backoffDelay, classifyClose, tokenExpiry } from '../src/index.js';

class Clock {
  constructor() {
    this.t = 1_000_000;
    /** @type {{at: number, fn: () => void, id: number}[]} */
    this.timers = [];
    this.nextId = 1;
    this.timerApi = {
      setTimeout: (fn, ms) => {
        const id = this.nextId++;
        this.timers.push({ at: this.t + ms, fn, id });
        return id;
      },
      clearTimeout: (id) => {
        this.timers = this.timers.filter((x) => x.id !== id);
      },
    };
  }
  now = () => this.t;
  /** Runs every timer due within `ms`, in time order. */
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      this.timers.sort((a, b) => a.at - b.at || a.id - b.id);
      const next = this.timers[0];
      if (!next || next.at > end) break;
      this.timers.shift();
      this.t = next.at;
      next.fn();
    }
    this.t = end;
  }
}

/** A WebSocket whose server side the test plays. */
function fakeSockets() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.sent = [];
      this.closed = null;
      sockets.push(this);
    }
    send(text) {
      assert.equal(this.closed, null, 'sent on a closed socket');
      this.sent.push(JSON.parse(text));
    }
    close(code) {
      this.closed = code ?? 1005;
    }
    // the server's side
    frame(f) {
      this.onmessage?.({ data: JSON.stringify(f) });
    }
    drop(code = 1006, reason = '') {
      this.closed = code;
      this.onclose?.({ code, reason });
    }
    take() {
      const s = this.sent;
      this.sent = [];
      return s;
    }
  }
  return { FakeWebSocket, sockets, last: () => sockets[sockets.length - 1] };
}

const flush = () => new Promise((r) => setImmediate(r));

function setup(options = {}) {
  const clock = new Clock();
  const fake = fakeSockets();
  const client = new Client(options.url ?? 'ws://gw/ws', {
    WebSocket: fake.FakeWebSocket,
    timers: clock.timerApi,
    now: clock.now,
    random: () => 0.5,
    ...options,
  });
  const events = [];
  for (const e of ['state', 'connected', 'disconnected', 'error', 'dm']) client.on(e, (a) => events.push([e, a]));
  return { clock, fake, client, events };
}

/** Connects and says welcome. */
async function connected(options = {}) {
  const s = setup(options);
  s.client.connect();
  await flush();
  s.fake.last().frame({ type: 'welcome', user: options.user ?? 'alice', conn: '0.1' });
  return s;
}

/**
 * The connection drops with `code`; after the backoff the next socket says
 * welcome. Returns that socket.
 */
async function reconnected(s, code = 1006) {
  s.fake.last().drop(code);
  s.clock.advance(20_000);
  await flush();
  const ws = s.fake.last();
  ws.frame({ type: 'welcome', user: 'alice', conn: '0.2' });
  return ws;
}

/** A joined room at `seq` in `epoch`. */
async function joinedRoom(s, name = 'lobby', seq = 10, epoch = 'e1') {
  const room = s.client.room(name);
  const messages = [];
  room.on('message', (m) => messages.push(m));
  const joined = room.join();
  assert.deepEqual(s.fake.last().take(), [{ type: 'join', room: name }]);
  s.fake.last().frame({ type: 'joined', room: name, seq, members: 1, epoch });
  const info = await joined;
  return { room, messages, info };
}

const msg = (room, seq, from = 'bob', id = '') => ({ type: 'msg', room, seq, from, id, ts: 1, body: { n: seq } });

test('backoff doubles from min to max, jittered in the upper half', () => {
  for (let attempt = 0; attempt < 12; attempt++) {
    const base = Math.min(20000, 500 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, 500, 20000, () => 0), base / 2);
    assert.equal(backoffDelay(attempt, 500, 20000, () => 1), base);
  }
  assert.equal(backoffDelay(1000, 500, 20000, () => 1), 20000, 'huge attempts stay capped');
});

test('close codes map to typed errors and a reconnect decision', () => {
  const cases = [
    [1001, 'going_away', true, false],
    [1006, 'connection_lost', true, false],
    [1008, 'slow_consumer', true, false],
    [1002, 'protocol_error', true, false],
    [1009, 'protocol_error', true, false],
    [4001, 'unauthorized', true, true],
    [4002, 'invalid_token', true, true],
    [4003, 'token_expired', true, true],
    [4004, 'too_many_connections', false, false],
    [4005, 'too_many_connections', false, false],
    [4010, 'disconnected_by_server', false, false],
    [4321, 'disconnected_by_server', false, false],
  ];
  for (const [code, name, reconnect, renew] of cases) {
    const c = classifyClose(code, 'why');
    assert.ok(c.error instanceof CorecastError);
    assert.deepEqual([c.error.code, c.error.closeCode, c.reconnect, c.renew], [name, code, reconnect, renew], `close ${code}`);
    assert.equal(c.error.message, 'why');
  }
});

test('tokenExpiry reads exp from a JWT and null from anything else', () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  assert.equal(tokenExpiry(`${b64({ alg: 'HS256' })}.${b64({ sub: 'a', exp: 1767229200 })}.sig`), 1767229200);
  assert.equal(tokenExpiry(`${b64({})}.${b64({ sub: 'a' })}.sig`), null);
  assert.equal(tokenExpiry('not a token'), null);
  assert.equal(tokenExpiry('a.%%%.c'), null);
});

test('connects with the token on the URL and the corecast.v1 subprotocol', async () => {
  const s = setup({ token: 'T+k/1', url: 'ws://gw/ws?x=1' });
  s.client.connect();
  await flush();
  const ws = s.fake.last();
  assert.equal(ws.url, 'ws://gw/ws?x=1&token=T%2Bk%2F1');
  assert.deepEqual(ws.protocols, ['corecast.v1']);
  assert.equal(s.client.state, 'connecting');
  ws.frame({ type: 'welcome', user: 'alice', conn: '1.2' });
  assert.equal(s.client.state, 'connected');
  assert.deepEqual(s.events.find((e) => e[0] === 'connected')[1], { user: 'alice', conn: '1.2', reconnected: false });
  assert.equal(s.client.user, 'alice');
});

test('a join resolves with what joined said, and messages arrive in order', async () => {
  const s = await connected();
  const { room, messages, info } = await joinedRoom(s);
  assert.deepEqual(info, { room: 'lobby', seq: 10, epoch: 'e1', members: 1, resumed: false, recovered: true, missed: 0 });
  s.fake.last().frame(msg('lobby', 11));
  s.fake.last().frame(msg('lobby', 12));
  assert.deepEqual(messages.map((m) => [m.seq, m.epoch]), [[11, 'e1'], [12, 'e1']]);
  assert.equal(room.seq, 12);
});

test('after a lost connection every room is joined again from its last seq and epoch', async () => {
  const s = await connected();
  const { messages } = await joinedRoom(s);
  s.fake.last().frame(msg('lobby', 11));
  s.fake.last().drop(1006);
  assert.equal(s.client.state, 'connecting');
  const lost = s.events.find((e) => e[0] === 'disconnected')[1];
  assert.equal(lost.code, 1006);
  assert.equal(lost.error.code, 'connection_lost');
  assert.equal(lost.reconnectInMs, backoffDelay(0, 500, 20000, () => 0.5));
  const before = s.fake.sockets.length;
  s.clock.advance(lost.reconnectInMs - 1);
  assert.equal(s.fake.sockets.length, before, 'no reconnect before the delay');
  s.clock.advance(1);
  await flush();
  const ws = s.fake.last();
  assert.equal(s.fake.sockets.length, before + 1);
  ws.frame({ type: 'welcome', user: 'alice', conn: '0.2' });
  assert.deepEqual(ws.take(), [{ type: 'join', room: 'lobby', since: 11, epoch: 'e1' }]);
  const joins = [];
  s.client.room('lobby').on('joined', (i) => joins.push(i));
  ws.frame({ type: 'joined', room: 'lobby', seq: 13, members: 1, epoch: 'e1', recovered: true, missed: 2 });
  ws.frame(msg('lobby', 12));
  ws.frame(msg('lobby', 13));
  ws.frame(msg('lobby', 14));
  assert.deepEqual(messages.map((m) => m.seq), [11, 12, 13, 14], 'missed first, then live, no gap');
  assert.equal(joins[0].resumed, true);
  assert.equal(joins[0].recovered, true);
  assert.equal(s.events.filter((e) => e[0] === 'connected').at(-1)[1].reconnected, true);
});

test('messages at or below the last seq are not delivered twice', async () => {
  const s = await connected();
  const { messages } = await joinedRoom(s);
  s.fake.last().frame(msg('lobby', 11));
  s.fake.last().frame(msg('lobby', 11));
  s.fake.last().frame(msg('lobby', 9));
  assert.deepEqual(messages.map((m) => m.seq), [11]);
});

test('a room that could not be recovered is reported, and live messages follow its new seq', async () => {
  const s = await connected();
  const { room, messages } = await joinedRoom(s, 'lobby', 40, 'old');
  const unrecovered = [];
  room.on('unrecovered', (i) => unrecovered.push(i));
  const ws = await reconnected(s, 1001);
  assert.deepEqual(ws.take(), [{ type: 'join', room: 'lobby', since: 40, epoch: 'old' }]);
  ws.frame({ type: 'joined', room: 'lobby', seq: 3, members: 1, epoch: 'new', recovered: false, missed: 0 });
  assert.equal(unrecovered.length, 1);
  assert.deepEqual([unrecovered[0].recovered, unrecovered[0].epoch], [false, 'new']);
  ws.frame(msg('lobby', 4));
  assert.deepEqual(messages.map((m) => [m.seq, m.epoch]), [[4, 'new']]);
  assert.deepEqual([room.seq, room.epoch], [4, 'new']);
});

test('an unacked publish is sent again with the same id after the missed messages', async () => {
  const s = await connected();
  const { room } = await joinedRoom(s);
  const acked = room.publish({ text: 'hi' });
  const [sent] = s.fake.last().take();
  assert.equal(sent.type, 'publish');
  const ws = await reconnected(s);
  ws.take();
  ws.frame({ type: 'joined', room: 'lobby', seq: 11, members: 1, epoch: 'e1', recovered: true, missed: 1 });
  assert.deepEqual(ws.take(), [], 'not before the missed messages are in');
  ws.frame(msg('lobby', 11, 'bob', 'other'));
  assert.deepEqual(ws.take(), [{ type: 'publish', room: 'lobby', id: sent.id, body: { text: 'hi' } }]);
  ws.frame({ type: 'ack', id: sent.id, room: 'lobby', seq: 12, epoch: 'e1', stored: true, duplicate: false });
  assert.deepEqual(await acked, { id: sent.id, seq: 12, epoch: 'e1', stored: true, duplicate: false });
});

test('a publish whose ack was lost but that comes back among the missed messages is acked by it', async () => {
  const s = await connected();
  const { room } = await joinedRoom(s);
  const acked = room.publish('hello', { id: 'm-1' });
  s.fake.last().take();
  const ws = await reconnected(s);
  ws.take();
  ws.frame({ type: 'joined', room: 'lobby', seq: 11, members: 1, epoch: 'e1', recovered: true, missed: 1 });
  ws.frame(msg('lobby', 11, 'alice', 'm-1'));
  assert.deepEqual(await acked, { id: 'm-1', seq: 11, epoch: 'e1', stored: true, duplicate: true });
  assert.deepEqual(ws.take(), [], 'no second send: it was sequenced');
});

test('publishes while disconnected wait in a bounded queue and go out in order', async () => {
  const s = await connected({ maxQueue: 2 });
  const { room } = await joinedRoom(s);
  s.fake.last().drop(1006);
  const a = room.publish('a', { id: 'a' });
  const b = room.publish('b', { id: 'b' });
  await assert.rejects(room.publish('c', { id: 'c' }), (e) => e instanceof CorecastError && e.code === 'queue_full' && e.retryable);
  s.clock.advance(20_000);
  await flush();
  const ws = s.fake.last();
  ws.frame({ type: 'welcome', user: 'alice', conn: '0.2' });
  ws.take();
  ws.frame({ type: 'joined', room: 'lobby', seq: 10, members: 1, epoch: 'e1', recovered: true, missed: 0 });
  assert.deepEqual(ws.take().map((f) => f.id), ['a', 'b']);
  ws.frame({ type: 'ack', id: 'b', room: 'lobby', seq: 12, epoch: 'e1', stored: true });
  ws.frame({ type: 'ack', id: 'a', room: 'lobby', seq: 11, epoch: 'e1', stored: true });
  assert.equal((await a).seq, 11);
  assert.equal((await b).seq, 12);
});

test('server errors become typed rejections; a busy store is retried with the same id', async () => {
  const s = await connected();
  const { room } = await joinedRoom(s);
  const refused = room.publish('x', { id: 'f' });
  s.fake.last().take();
  s.fake.last().frame({ type: 'error', code: 'rate_limited', message: 'slow down', id: 'f', room: 'lobby' });
  await assert.rejects(refused, (e) => e.code === 'rate_limited' && e.room === 'lobby' && e.id === 'f');

  const busy = room.publish('y', { id: 'g' });
  s.fake.last().take();
  s.fake.last().frame({ type: 'error', code: 'storage_busy', message: 'behind', id: 'g', room: 'lobby' });
  s.clock.advance(5_000);
  assert.deepEqual(s.fake.last().take(), [{ type: 'publish', room: 'lobby', id: 'g', body: 'y' }]);
  s.fake.last().frame({ type: 'ack', id: 'g', room: 'lobby', seq: 11, epoch: 'e1', stored: true });
  assert.equal((await busy).seq, 11);
});

test('a publish without ack or error is sent again after ackTimeoutMs, and rejected at publishTimeoutMs', async () => {
  const s = await connected({ ackTimeoutMs: 1000, publishTimeoutMs: 2500 });
  const { room } = await joinedRoom(s);
  const p = room.publish('z', { id: 'z' });
  assert.equal(s.fake.last().take().length, 1);
  s.clock.advance(1000);
  assert.deepEqual(s.fake.last().take().map((f) => f.id), ['z']);
  s.clock.advance(1500);
  await assert.rejects(p, (e) => e.code === 'timeout' && e.retryable);
});

test('publishing to a room that was never joined is refused at once', async () => {
  const s = await connected();
  await assert.rejects(s.client.room('nowhere').publish('x'), (e) => e.code === 'not_joined');
});

test('close 4010 ends the client: no reconnect, waiting publishes rejected', async () => {
  const s = await connected();
  const { room } = await joinedRoom(s);
  const p = room.publish('x');
  const sockets = s.fake.sockets.length;
  s.fake.last().drop(4010, 'disconnected by the server');
  await assert.rejects(p, (e) => e.code === 'disconnected_by_server' && e.closeCode === 4010);
  assert.equal(s.client.state, 'closed');
  s.clock.advance(600_000);
  await flush();
  assert.equal(s.fake.sockets.length, sockets, 'no reconnect');
  assert.ok(s.events.some((e) => e[0] === 'error' && e[1].code === 'disconnected_by_server'));
});

test('a refused token ends a client with a fixed token, and a getToken client asks again', async () => {
  const fixed = setup({ token: 'bad' });
  fixed.client.connect();
  await flush();
  fixed.fake.last().drop(4002, 'bad token signature: log in again');
  assert.equal(fixed.client.state, 'closed');

  let asked = 0;
  const renewing = setup({ getToken: async () => `t${++asked}` });
  renewing.client.connect();
  await flush();
  assert.match(renewing.fake.last().url, /token=t1$/);
  renewing.fake.last().drop(4003, 'token expired: log in again');
  assert.equal(renewing.client.state, 'connecting');
  renewing.clock.advance(20_000);
  await flush();
  assert.match(renewing.fake.last().url, /token=t2$/);
});

test('the token is refreshed before exp, and the next refresh follows the new exp', async () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const clock0 = 1_000_000; // the fake clock's start, in ms
  const tok = (exp) => `${b64({ alg: 'HS256' })}.${b64({ sub: 'alice', exp })}.sig`;
  let next = tok(clock0 / 1000 + 100);
  const s = await connected({ getToken: async () => next });
  next = tok(clock0 / 1000 + 400);
  s.clock.advance(69_000);
  await flush();
  assert.deepEqual(s.fake.last().take(), [], 'not yet');
  s.clock.advance(1_000);
  await flush();
  assert.deepEqual(s.fake.last().take(), [{ type: 'refresh', token: next }]);
  s.fake.last().frame({ type: 'refreshed', exp: clock0 / 1000 + 400 });
  s.clock.advance(299_000); // 70 s + 299 s < 400 s - 30 s
  await flush();
  assert.deepEqual(s.fake.last().take(), []);
  s.clock.advance(1_000);
  await flush();
  assert.equal(s.fake.last().take()[0].type, 'refresh');
});

test('a refused refresh rejects refresh() with its code', async () => {
  const s = await connected({ getToken: async () => 'other' });
  const r = s.client.refresh();
  await flush();
  s.fake.last().take();
  s.fake.last().frame({ type: 'error', code: 'token_user_mismatch', message: 'another user' });
  await assert.rejects(r, (e) => e.code === 'token_user_mismatch');
});

test('room requests go one at a time, so an error naming only the room answers the one on the wire', async () => {
  const s = await connected();
  const room = s.client.room('lobby');
  const presence = room.presence();
  const history = room.history({ limit: 5 });
  assert.deepEqual(s.fake.last().take(), [{ type: 'presence', room: 'lobby' }]);
  s.fake.last().frame({ type: 'error', code: 'forbidden', message: 'no', room: 'lobby' });
  await assert.rejects(presence, (e) => e.code === 'forbidden');
  assert.deepEqual(s.fake.last().take(), [{ type: 'history', room: 'lobby', limit: 5 }]);
  s.fake.last().frame({ type: 'history', room: 'lobby', epoch: 'e', seq: 7, complete: true, messages: [{ seq: 7, from: 'bob', id: '', ts: 3, body: 'x' }] });
  assert.deepEqual(await history, {
    epoch: 'e',
    seq: 7,
    complete: true,
    messages: [{ room: 'lobby', epoch: 'e', seq: 7, from: 'bob', id: '', ts: 3, body: 'x' }],
  });
});

test('a query on the wire when the connection drops is asked again on the next one', async () => {
  const s = await connected();
  const p = s.client.room('lobby').presence();
  s.fake.last().take();
  const ws = await reconnected(s);
  assert.deepEqual(ws.take(), [{ type: 'presence', room: 'lobby' }]);
  ws.frame({ type: 'presence', room: 'lobby', count: 1, users: ['alice'] });
  assert.deepEqual(await p, { count: 1, users: ['alice'] });
});

test('a left room is not joined again after a reconnect; a refused join is not retried', async () => {
  const s = await connected();
  const { room } = await joinedRoom(s);
  const left = room.leave();
  assert.deepEqual(s.fake.last().take(), [{ type: 'leave', room: 'lobby' }]);
  s.fake.last().frame({ type: 'left', room: 'lobby' });
  await left;
  const secret = s.client.room('secret');
  const refused = secret.join();
  s.fake.last().take();
  s.fake.last().frame({ type: 'error', code: 'forbidden', message: 'no', room: 'secret' });
  await assert.rejects(refused, (e) => e.code === 'forbidden');
  await reconnected(s);
  assert.deepEqual(s.fake.last().take(), []);
});

test('a room the server took us out of is reported and not joined again', async () => {
  const s = await connected();
  const { room } = await joinedRoom(s);
  const left = [];
  room.on('left', (l) => left.push(l));
  s.fake.last().frame({ type: 'left', room: 'lobby', by: 'server' });
  assert.deepEqual(left, [{ room: 'lobby', by: 'server' }]);
  assert.equal(room.joined, false);
  await reconnected(s);
  assert.deepEqual(s.fake.last().take(), []);
});

test('direct messages: queued while down, a sent one lost with the connection is rejected', async () => {
  const s = await connected();
  const first = s.client.dm('bob', 'one', { id: 'd1' });
  assert.deepEqual(s.fake.last().take(), [{ type: 'dm', to: 'bob', id: 'd1', body: 'one' }]);
  s.fake.last().drop(1006);
  await assert.rejects(first, (e) => e.code === 'connection_lost' && e.retryable);
  const second = s.client.dm('bob', 'two', { id: 'd2' });
  s.clock.advance(20_000);
  await flush();
  const ws = s.fake.last();
  ws.frame({ type: 'welcome', user: 'alice', conn: '0.2' });
  assert.deepEqual(ws.take(), [{ type: 'dm', to: 'bob', id: 'd2', body: 'two' }]);
  ws.frame({ type: 'ack', id: 'd2', to: 'bob', delivered: 2 });
  assert.deepEqual(await second, { delivered: 2 });
  ws.frame({ type: 'dm', from: 'bob', id: 'x', ts: 5, body: 'back' });
  assert.deepEqual(s.events.filter((e) => e[0] === 'dm').map((e) => e[1].body), ['back']);
});

test('with several URLs a node that does not answer is passed over', async () => {
  const s = setup({ url: ['ws://a/ws', 'ws://b/ws'] });
  s.client.connect();
  await flush();
  assert.equal(s.fake.last().url, 'ws://a/ws');
  s.fake.last().drop(1006);
  s.clock.advance(500); // the first delay, before the connect timeout of the next
  await flush();
  assert.equal(s.fake.last().url, 'ws://b/ws');
});

test('no welcome within connectTimeoutMs: the socket is dropped and another tried', async () => {
  const s = setup({ connectTimeoutMs: 1000 });
  s.client.connect();
  await flush();
  const first = s.fake.last();
  s.clock.advance(1000);
  assert.equal(first.closed, 1000);
  assert.equal(s.client.state, 'connecting');
  s.clock.advance(20_000);
  await flush();
  assert.notEqual(s.fake.last(), first);
});

test('close() rejects what waits and stops reconnecting', async () => {
  const s = await connected();
  const { room } = await joinedRoom(s);
  const p = room.publish('x');
  const q = room.presence();
  s.client.close();
  await assert.rejects(p, (e) => e.code === 'closed');
  await assert.rejects(q, (e) => e.code === 'closed');
  assert.equal(s.client.state, 'closed');
  assert.equal(s.fake.last().closed, 1000);
});

test('a token that lives longer than a timer can wait is not refreshed early', async () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const exp = 1_000_000 / 1000 + 60 * 86400; // 60 days: beyond setTimeout's 2^31-1 ms
  let asked = 0;
  const s = await connected({ getToken: async () => (asked++, `${b64({})}.${b64({ sub: 'alice', exp })}.sig`) });
  assert.ok(s.clock.timers.every((t) => t.at - s.clock.t <= 2 ** 31 - 1), 'no timer beyond what setTimeout keeps');
  s.clock.advance(30 * 86400 * 1000);
  await flush();
  assert.deepEqual(s.fake.last().take(), [], 'no refresh 30 days before exp');
  assert.equal(asked, 1, 'only the connect asked for a token');
  s.clock.advance((30 * 86400 - 30) * 1000);
  await flush();
  assert.equal(s.fake.last().take()[0]?.type, 'refresh');
});

test('a publish never sent before its deadline is rejected not_sent, not timeout', async () => {
  const s = await connected({ publishTimeoutMs: 1000, maxReconnectDelayMs: 100_000, minReconnectDelayMs: 50_000 });
  const { room } = await joinedRoom(s);
  s.fake.last().drop(1006);
  const p = room.publish('x', { id: 'x' });
  s.clock.advance(1000);
  await assert.rejects(p, (e) => e.code === 'not_sent' && e.retryable && e.id === 'x');
});
