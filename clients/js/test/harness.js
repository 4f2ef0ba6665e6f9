// Real processes for the integration tests: gateways (one node or a
// cluster), a private redis-server, a TCP proxy that can hold and cut
// connections, and HS256 tokens.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { Client } from '../src/index.js';

const repo = resolve(fileURLToPath(new URL('../../..', import.meta.url)));
export const GATEWAY = process.env.CORECAST_GATEWAY ?? join(repo, 'target/release/gateway');
export const SECRET = 'js-client-tests-secret-0123456789abcdef';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export { sleep };

/** A TCP port free on 127.0.0.1 a moment ago. */
export async function freePort() {
  const srv = net.createServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = /** @type {net.AddressInfo} */ (srv.address());
  await new Promise((r) => srv.close(r));
  return port;
}

/**
 * Polls `check` until it is true; fails with `what` after `ms`.
 * @param {string} what
 * @param {() => boolean | Promise<boolean>} check
 */
export async function until(what, check, ms = 15000) {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

export function token(sub, ttlS = 3600) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + ttlS })}`;
  return `${head}.${createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}

/** A scratch directory removed by `cleanup`. */
export function scratch() {
  const dir = mkdtempSync(join(tmpdir(), 'corecast-js-'));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** One gateway process. `start` again after `kill`/`stop` restarts it on the same ports. */
export class Gateway {
  constructor(args, { port } = {}) {
    this.args = args;
    this.port = port;
    this.proc = null;
    this.log = '';
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  async start() {
    this.port ??= await freePort();
    // A spill directory of its own unless the args give one (the default is
    // ./corecast-spill).
    this.spill ??= this.args.includes('--spill-dir') ? [] : ['--spill-dir', mkdtempSync(join(tmpdir(), 'corecast-js-spill-'))];
    this.proc = spawn(GATEWAY, ['--listen', `127.0.0.1:${this.port}`, '--jwt-secret', SECRET, ...this.spill, ...this.args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: 'warn' },
    });
    const proc = this.proc;
    proc.stdout.on('data', (d) => (this.log += d));
    proc.stderr.on('data', (d) => (this.log += d));
    await until(`the gateway on ${this.port} to be ready (log: ${this.log})`, async () => {
      if (proc.exitCode !== null) throw new Error(`gateway exited ${proc.exitCode}: ${this.log}`);
      return (await fetch(`http://127.0.0.1:${this.port}/readyz`).catch(() => null))?.status === 200;
    });
    return this;
  }

  /** SIGKILL: no close frames, as if the machine died. */
  async kill() {
    await this._end('SIGKILL');
  }

  /** SIGTERM: the gateway drains (1001 to every client). */
  async stop() {
    await this._end('SIGTERM');
  }

  /** Stops it and removes its spill directory. */
  async remove() {
    await this.kill();
    if (this.spill?.[1]) rmSync(this.spill[1], { recursive: true, force: true });
  }

  async _end(signal) {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await exited;
  }
}

/** Three gateways in one cluster sharing `redis`. */
export async function cluster(n, redis, dir, extra = []) {
  const ports = [];
  const meshes = [];
  for (let i = 0; i < n; i++) {
    ports.push(await freePort());
    meshes.push(`tcp://127.0.0.1:${await freePort()}`);
  }
  const nodes = ports.map(
    (port, i) =>
      new Gateway(
        ['--node-id', `node-${i}`, '--mesh-bind', meshes[i], '--peers', meshes.join(','), '--redis', redis, '--shards', '2', '--spill-dir', join(dir, `spill-${i}`), ...extra],
        { port },
      ),
  );
  await Promise.all(nodes.map((g) => g.start()));
  return nodes;
}

export class Redis {
  async start(dir) {
    this.port = await freePort();
    this.proc = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
    await until('redis-server to listen', async () => {
      const ok = await new Promise((r) => {
        const s = net.connect(this.port, '127.0.0.1', () => {
          s.end();
          r(true);
        });
        s.on('error', () => r(false));
      });
      return ok;
    });
    return this;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}/`;
  }

  stop() {
    this.proc?.kill('SIGKILL');
  }
}

/**
 * A TCP proxy in front of `port`. `hold()` keeps what the server sends from
 * reaching the clients (it is discarded, as if lost in the network), `cut()`
 * drops every connection, `release()` forwards normally again.
 */
export class Proxy {
  constructor(port) {
    this.target = port;
    this.holding = false;
    /** @type {Set<net.Socket>} */
    this.sockets = new Set();
  }

  async start() {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.target, '127.0.0.1');
      this.sockets.add(client).add(upstream);
      client.on('data', (d) => upstream.write(d));
      upstream.on('data', (d) => {
        if (!this.holding) client.write(d);
      });
      const end = () => {
        client.destroy();
        upstream.destroy();
        this.sockets.delete(client);
        this.sockets.delete(upstream);
      };
      client.on('close', end).on('error', end);
      upstream.on('close', end).on('error', end);
    });
    await new Promise((r) => this.server.listen(0, '127.0.0.1', r));
    this.port = this.server.address().port;
    return this;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  hold() {
    this.holding = true;
  }

  release() {
    this.holding = false;
  }

  cut() {
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
  }

  close() {
    this.cut();
    this.server.close();
  }
}

/**
 * A client for `user` with a fresh token at every connect, and a record of
 * every message of `room` it delivered.
 */
export function chatter(url, user, options = {}) {
  const client = new Client(url, {
    WebSocket,
    getToken: () => token(user),
    minReconnectDelayMs: 100,
    maxReconnectDelayMs: 1000,
    ...options,
  });
  const seen = [];
  const joins = [];
  const rooms = new Map();
  const join = async (name, opts) => {
    const room = client.room(name);
    if (!rooms.has(name)) {
      room.on('message', (m) => seen.push(m));
      room.on('joined', (j) => joins.push(j));
      rooms.set(name, room);
    }
    await room.join(opts);
    return room;
  };
  const connected = () => new Promise((r) => (client.state === 'connected' ? r() : client.on('connected', () => r())));
  return { client, seen, joins, join, connected };
}
