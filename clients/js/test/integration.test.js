// The client against real gateway processes: order, acks, a retry across a
// dropped connection, resume after a restart (Redis and the memory store)
// and after a cluster node dies. Run from clients/js with the release
// gateway built (or CORECAST_GATEWAY=path): npm run test:integration.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { Gateway, Proxy, Redis, chatter, cluster, scratch, sleep, until } from './harness.js';

const tmp = scratch();
const cleanups = [tmp.cleanup];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** Seqs in order of arrival must be gapless and each exactly once. */
function assertGapless(seqs, what) {
  for (let i = 1; i < seqs.length; i++) {
    assert.equal(seqs[i], seqs[i - 1] + 1, `${what}: seq ${seqs[i]} after ${seqs[i - 1]} (index ${i})`);
  }
}

test('several clients publish into one room: every ack matches the one order all of them see', async () => {
  const gw = await new Gateway(['--shards', '2']).start();
  cleanups.push(() => gw.remove());
  const users = ['alice', 'bob', 'carol'].map((u) => chatter(gw.url, u));
  for (const u of users) {
    u.client.connect();
    await u.join('order');
  }
  const acks = new Map();
  await Promise.all(
    users.map(async (u) => {
      for (let i = 0; i < 40; i++) {
        const id = `${u.client.user}-${i}`;
        const ack = await u.client.room('order').publish({ i }, { id });
        acks.set(id, ack.seq);
      }
    }),
  );
  await until('120 messages at every client', () => users.every((u) => u.seen.length >= 120));
  const order = users[0].seen.map((m) => `${m.seq}:${m.id}`);
  for (const u of users) {
    assert.deepEqual(u.seen.map((m) => `${m.seq}:${m.id}`), order, `${u.client.user} saw another order`);
    assertGapless(u.seen.map((m) => m.seq), u.client.user);
  }
  for (const m of users[0].seen) assert.equal(acks.get(m.id), m.seq, `the ack of ${m.id}`);
  assert.equal(acks.size, 120);
  for (const u of users) u.client.close();
  await gw.stop();
});

test('a publish whose ack was lost with the connection is acked once, with the seq everyone saw', async () => {
  const gw = await new Gateway(['--shards', '2']).start();
  const proxy = await new Proxy(gw.port).start();
  cleanups.push(() => gw.remove(), () => proxy.close());
  const observer = chatter(gw.url, 'observer');
  observer.client.connect();
  await observer.join('retry');
  const alice = chatter(proxy.url, 'alice');
  alice.client.connect();
  const room = await alice.join('retry');
  await room.publish('before', { id: 'before' });

  proxy.hold(); // the server's answers stop reaching alice
  let acks = 0;
  const acked = room.publish('lost-ack', { id: 'lost-ack' }).then((a) => (acks++, a));
  await until('the observer to get the message', () => observer.seen.some((m) => m.id === 'lost-ack'));
  const seq = observer.seen.find((m) => m.id === 'lost-ack').seq;
  proxy.cut();
  proxy.release();
  const ack = await acked;
  assert.equal(ack.seq, seq);
  await room.publish('after', { id: 'after' });
  await until('the observer to get the next one', () => observer.seen.some((m) => m.id === 'after'));
  assert.equal(acks, 1);
  assert.deepEqual(observer.seen.map((m) => m.id), ['before', 'lost-ack', 'after'], 'delivered once each');
  assert.deepEqual(alice.seen.map((m) => m.id), ['before', 'lost-ack', 'after'], 'alice got her own once each');
  assert.equal(alice.joins.length, 2);
  assert.deepEqual([alice.joins[1].resumed, alice.joins[1].recovered], [true, true]);
  alice.client.close();
  observer.client.close();
  await gw.stop();
});

/**
 * A subscriber rides a restart of its gateway; a publisher connects to the
 * restarted one before the subscriber is back and publishes five messages.
 */
async function rideRestart(storeArgs) {
  const gw = await new Gateway(['--shards', '2', ...storeArgs]).start();
  cleanups.push(() => gw.remove());
  const sub = chatter(gw.url, 'sub', { minReconnectDelayMs: 3000, maxReconnectDelayMs: 3000 });
  const unrecovered = [];
  sub.client.connect();
  const room = await sub.join('restart');
  room.on('unrecovered', (j) => unrecovered.push(j));
  const pub = chatter(gw.url, 'pub');
  pub.client.connect();
  const proom = await pub.join('restart');
  for (let i = 0; i < 5; i++) await proom.publish(`a${i}`, { id: `a${i}` });
  await until('the first five', () => sub.seen.length === 5);
  pub.client.close();
  const epoch = room.epoch;
  await gw.stop();
  await gw.start();
  const pub2 = chatter(gw.url, 'pub');
  pub2.client.connect();
  const proom2 = await pub2.join('restart');
  for (let i = 0; i < 5; i++) await proom2.publish(`b${i}`, { id: `b${i}` });
  await until('the subscriber to be back', () => sub.joins.length === 2);
  for (let i = 0; i < 3; i++) await proom2.publish(`c${i}`, { id: `c${i}` });
  await until('the live ones', () => sub.seen.some((m) => m.id === 'c2'));
  sub.client.close();
  pub2.client.close();
  await gw.stop();
  return { sub, epoch, unrecovered, room };
}

test('after the gateway restarts with Redis the room is resumed: recovered, the missed messages first, no gap', async (t) => {
  const redis = await new Redis().start(tmp.dir);
  cleanups.push(() => redis.stop());
  const { sub, epoch, unrecovered, room } = await rideRestart(['--redis', redis.url]);
  const rejoin = sub.joins[1];
  assert.deepEqual([rejoin.resumed, rejoin.recovered, rejoin.missed, rejoin.epoch], [true, true, 5, epoch]);
  assert.equal(unrecovered.length, 0);
  assert.deepEqual(sub.seen.map((m) => m.id), ['a0', 'a1', 'a2', 'a3', 'a4', 'b0', 'b1', 'b2', 'b3', 'b4', 'c0', 'c1', 'c2']);
  assertGapless(sub.seen.map((m) => m.seq), 'sub');
  assert.equal(room.epoch, epoch);
  t.diagnostic(`resumed at seq ${rejoin.seq} with ${rejoin.missed} missed`);
});

test('after the memory store restarts the room cannot be recovered, and the app is told', async () => {
  const { sub, epoch, unrecovered, room } = await rideRestart([]);
  const rejoin = sub.joins[1];
  assert.equal(rejoin.resumed, true);
  assert.equal(rejoin.recovered, false);
  assert.notEqual(rejoin.epoch, epoch, 'a new numbering');
  assert.equal(unrecovered.length, 1);
  assert.equal(room.epoch, rejoin.epoch);
  // What was missed while away is gone; the live messages after the rejoin come.
  assert.deepEqual(sub.seen.slice(0, 5).map((m) => m.id), ['a0', 'a1', 'a2', 'a3', 'a4']);
  assert.deepEqual(sub.seen.slice(5).map((m) => m.id), ['c0', 'c1', 'c2']);
  assertGapless(sub.seen.slice(5).map((m) => m.seq), 'after the restart');
});

test("in a 3-node cluster a client whose node is killed resumes on another with no gap", async (t) => {
  const redis = await new Redis().start(tmp.dir);
  cleanups.push(() => redis.stop());
  const nodes = await cluster(3, redis.url, tmp.dir);
  cleanups.push(() => Promise.all(nodes.map((n) => n.kill())));
  // The subscriber starts on node 2; node 2 dies; the list sends it on to node 0.
  const sub = chatter([nodes[2].url, nodes[0].url, nodes[1].url], 'sub');
  sub.client.connect();
  await sub.join('failover');
  const pub = chatter([nodes[0].url, nodes[1].url], 'pub');
  pub.client.connect();
  const room = await pub.join('failover');
  const acked = new Map();
  let stop = false;
  const publishing = (async () => {
    for (let i = 0; !stop && i < 400; i++) {
      const id = `m${i}`;
      room.publish({ i }, { id }).then((a) => acked.set(id, a.seq), () => {});
      await sleep(10);
    }
  })();
  await until('some messages before the kill', () => sub.seen.length >= 50);
  await nodes[2].kill();
  await until('the subscriber to resume elsewhere', () => sub.joins.length >= 2, 20000);
  await until('messages after the resume', () => sub.seen.length >= 150, 20000);
  stop = true;
  await publishing;
  await until('every publish answered', () => pub.client._pending.size === 0, 20000);
  await until('the subscriber to have every acked message', () => {
    const ids = new Set(sub.seen.map((m) => m.id));
    return [...acked.keys()].every((id) => ids.has(id));
  }, 20000);
  const rejoin = sub.joins.at(-1);
  assert.deepEqual([rejoin.resumed, rejoin.recovered], [true, true], JSON.stringify(rejoin));
  const seqs = sub.seen.map((m) => m.seq);
  assertGapless(seqs, 'sub');
  const bySeq = new Map(sub.seen.map((m) => [m.seq, m.id]));
  for (const [id, seq] of acked) assert.equal(bySeq.get(seq), id, `acked ${id} as ${seq}`);
  t.diagnostic(`${sub.seen.length} messages, resumed at seq ${rejoin.seq} with ${rejoin.missed} missed, ${sub.joins.length - 1} rejoin(s)`);
  sub.client.close();
  pub.client.close();
  await Promise.all(nodes.map((n) => n.stop()));
});
