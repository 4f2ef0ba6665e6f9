// The demo chat page in a real browser against a real `gateway --dev`:
// two users chat, see each other and each other's typing, the gateway is
// killed and started again, and every message is in both pages exactly
// once, in the same order.
//
//   cd clients/js && node test/browser.mjs
//
// Environment:
//   CORECAST_GATEWAY     the gateway binary (default ../../target/release/gateway)
//   CHROMIUM             the browser (default /usr/bin/chromium)
//   CORECAST_SCREENSHOT  where alice's page is saved (default ../../target/artifacts/demo-chat.png)
//   CORECAST_WAIT_MS     the bound of every wait (default 15000; reconnects get twice that)
//   CORECAST_PAGE_FROM_DISK=1  serve the page files from clients/ through a small
//                        proxy in front of the gateway instead of the copies built
//                        into the binary (to iterate on the page without a rebuild;
//                        not the real thing: run without it before calling it done)
// Exits 0 when every check passed, 1 otherwise.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';

const jsDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const GATEWAY = path.resolve(process.env.CORECAST_GATEWAY ?? path.join(jsDir, '../../target/release/gateway'));
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SCREENSHOT = path.resolve(process.env.CORECAST_SCREENSHOT ?? path.join(jsDir, '../../target/artifacts/demo-chat.png'));
const WAIT_MS = Number(process.env.CORECAST_WAIT_MS ?? 15000);
const RECONNECT_WAIT_MS = 2 * WAIT_MS; // the client's backoff grows while the gateway is away
const FROM_DISK = process.env.CORECAST_PAGE_FROM_DISK === '1';
// What --dev serves, and where it comes from in the repository.
const PAGE_FILES = {
  '/': ['../demo/index.html', 'text/html; charset=utf-8'],
  '/app.js': ['../demo/app.js', 'text/javascript; charset=utf-8'],
  '/app.css': ['../demo/app.css', 'text/css; charset=utf-8'],
  '/corecast.js': ['src/index.js', 'text/javascript; charset=utf-8'],
};

const t0 = Date.now();
function log(/** @type {string} */ msg) {
  const elapsed = ((Date.now() - t0) / 1000).toFixed(2).padStart(6);
  console.log(`${new Date().toISOString()} +${elapsed}s  ${msg}`);
}

class Failure extends Error {}
function check(/** @type {any} */ ok, /** @type {string} */ msg) {
  if (!ok) throw new Failure(msg);
}

const sleep = (/** @type {number} */ ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = /** @type {net.AddressInfo} */ (s.address());
      s.close(() => resolve(port));
    });
  });
}

// ------------------------------------------------------------ the gateway

class Gateway {
  /** @param {string} addr */
  constructor(addr) {
    this.addr = addr;
    /** @type {import('node:child_process').ChildProcess | null} */
    this.proc = null;
    /** @type {string[]} the last lines it wrote */
    this.lines = [];
    this.starts = 0;
  }

  async start() {
    this.starts++;
    const args = ['--dev', '--listen', this.addr, '--shards', '2'];
    log(`starting ${GATEWAY} ${args.join(' ')}`);
    const proc = spawn(GATEWAY, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc = proc;
    const run = this.starts;
    let exited = /** @type {string | null} */ (null);
    this.exited = new Promise((resolve) => {
      proc.on('exit', (code, signal) => {
        exited = `exited with ${signal ?? code}`;
        resolve(exited);
      });
      proc.on('error', (e) => {
        exited = `could not start: ${e.message}`;
        resolve(exited);
      });
    });
    for (const stream of [proc.stdout, proc.stderr]) {
      let rest = '';
      stream?.on('data', (chunk) => {
        const parts = (rest + chunk).split('\n');
        rest = /** @type {string} */ (parts.pop());
        for (const line of parts) {
          this.lines.push(`[gateway #${run}] ${line}`);
          if (this.lines.length > 300) this.lines.shift();
        }
      });
    }
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      if (exited) throw new Failure(`the gateway ${exited} before /healthz answered:\n${this.tail()}`);
      try {
        const r = await fetch(`http://${this.addr}/healthz`, { signal: AbortSignal.timeout(1000) });
        if (r.ok) break;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Failure(`timed out after ${WAIT_MS / 1000}s waiting for http://${this.addr}/healthz to answer 200\n${this.tail()}`);
      await sleep(50);
    }
    log(`gateway up (pid ${proc.pid}): /healthz answers`);
  }

  async kill() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill('SIGKILL');
    await this.exited;
    this.proc = null;
  }

  tail(n = 40) {
    return this.lines.slice(-n).join('\n') || '(the gateway wrote nothing)';
  }
}

/**
 * What the gateway serves for the page, against the files in the repository:
 * the binary embeds them when it is compiled, so it may be behind them.
 * @param {string} base
 */
async function comparePageFiles(base) {
  const stale = [];
  for (const [p, [file]] of Object.entries(PAGE_FILES)) {
    const r = await fetch(base + p, { signal: AbortSignal.timeout(WAIT_MS) });
    check(r.ok, `GET ${p} answered ${r.status}: is this a gateway with --dev?`);
    const served = Buffer.from(await r.arrayBuffer());
    const disk = fs.readFileSync(path.join(jsDir, file));
    if (p === '/' && !FROM_DISK) check(served.length > 0 && /<html/i.test(served.toString()), `GET / is not the demo page (${served.length} bytes): the binary was built before clients/demo/index.html was written; rebuild it`);
    if (!served.equals(disk)) stale.push(`${p} (served ${served.length} bytes, ${path.relative(jsDir, path.join(jsDir, file))} has ${disk.length})`);
  }
  return stale;
}

/**
 * CORECAST_PAGE_FROM_DISK: a server on its own port that answers the page's
 * files from the repository and passes everything else (/dev/token, /ws, …)
 * to the gateway, so the page is the one on disk.
 * @param {string} gatewayAddr
 */
async function pageProxy(gatewayAddr) {
  const [host, port] = gatewayAddr.split(':');
  const sockets = new Set();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const file = PAGE_FILES[/** @type {keyof PAGE_FILES} */ (url.pathname)];
    if (file) {
      res.writeHead(200, { 'content-type': file[1], 'cache-control': 'no-store' });
      return res.end(fs.readFileSync(path.join(jsDir, file[0])));
    }
    const up = http.request({ host, port, path: req.url, method: req.method, headers: req.headers }, (ur) => {
      res.writeHead(ur.statusCode ?? 502, ur.headers);
      ur.pipe(res);
    });
    up.on('error', () => {
      res.writeHead(502, { 'content-type': 'text/plain' });
      res.end('gateway down\n');
    });
    up.end();
  });
  server.on('upgrade', (req, socket, head) => {
    const up = net.connect(Number(port), host, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      up.write(lines.join('\r\n') + '\r\n\r\n');
      if (head.length) up.write(head);
      up.pipe(socket).pipe(up);
    });
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    up.on('error', () => socket.destroy());
    up.on('close', () => socket.destroy());
    socket.on('error', () => up.destroy());
  });
  const p = await freePort();
  await new Promise((r) => server.listen(p, '127.0.0.1', () => r(undefined)));
  return {
    base: `http://127.0.0.1:${p}`,
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

// ------------------------------------------------------------ the pages

/** @type {string[]} */
const pageErrors = [];

/**
 * @param {import('puppeteer-core').Browser} browser
 * @param {string} base
 * @param {string} user
 */
async function openPage(browser, base, user) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  await page.setViewport({ width: 1180, height: 760 });
  page.on('pageerror', (e) => {
    const msg = `${user}'s page: uncaught ${e instanceof Error ? e.stack ?? e.message : String(e)}`;
    pageErrors.push(msg);
    log(msg);
  });
  page.on('console', (m) => {
    if (m.type() !== 'error' && m.type() !== 'warn') return;
    log(`  [${user} console.${m.type()}] ${m.text()}`);
    // Expected while the gateway is away: failed token fetches and sockets,
    // which the browser reports itself, and the page's warnings about them.
    const expected = m.type() === 'warn' || /^(Failed to load resource|WebSocket connection to .* failed)/.test(m.text());
    if (!expected) pageErrors.push(`${user}'s page: console.error: ${m.text()}`);
  });
  const url = `${base}/?user=${user}`;
  log(`opening ${url}`);
  const r = await page.goto(url, { waitUntil: 'domcontentloaded', timeout: WAIT_MS });
  check(r?.ok(), `GET ${url} answered ${r?.status()}`);
  return { user, page };
}

/** @typedef {{user: string, page: import('puppeteer-core').Page}} P */

/** What a page shows, for failure messages. */
async function describe(/** @type {P} */ p) {
  try {
    return await p.page.evaluate(() => {
      const q = (/** @type {string} */ s) => [...document.querySelectorAll(s)];
      const state = document.querySelector('[data-testid=state]')?.textContent;
      const msgs = q('[data-testid=message]').map(
        (e) => `${/** @type {HTMLElement} */ (e).dataset.from}#${/** @type {HTMLElement} */ (e).dataset.seq || '-'}(${/** @type {HTMLElement} */ (e).dataset.status}):${e.querySelector('[data-testid=text]')?.textContent}`,
      );
      const people = q('[data-testid=presence-user]').map((e) => /** @type {HTMLElement} */ (e).dataset.user);
      const typing = document.querySelector('[data-testid=typing]')?.textContent;
      const notice = !(/** @type {HTMLElement | null} */ (document.querySelector('[data-testid=unrecovered]'))?.hidden);
      return `state=${JSON.stringify(state)} presence=[${people}] typing=${JSON.stringify(typing)} unrecovered-notice=${notice}\n      messages=[${msgs.join(', ')}]`;
    });
  } catch (e) {
    return `(could not read the page: ${e})`;
  }
}

/**
 * Waits until `fn(...args)` is true in the page, at most `ms`.
 * @param {P} p
 * @param {string} what what is awaited, for the failure message
 * @param {(...a: any[]) => any} fn
 * @param {any[]} [args]
 * @param {number} [ms]
 */
async function waitFor(p, what, fn, args = [], ms = WAIT_MS) {
  try {
    await p.page.waitForFunction(fn, { timeout: ms, polling: 50 }, ...args);
  } catch (e) {
    if (/** @type {any} */ (e)?.name !== 'TimeoutError') throw e;
    throw new Failure(`${p.user}'s page: timed out after ${ms / 1000}s waiting for ${what}\n    it shows: ${await describe(p)}`);
  }
}

const stateIs = (/** @type {string} */ s) => document.querySelector('[data-testid=state]')?.textContent === s;
const stateIsNot = (/** @type {string} */ s) => {
  const t = document.querySelector('[data-testid=state]')?.textContent;
  return t !== undefined && t !== s;
};
/** Every text is shown, acked (with a seq), and none twice. */
const showsAll = (/** @type {string[]} */ texts) => {
  const items = [...document.querySelectorAll('[data-testid=message]')].map((e) => ({
    text: e.querySelector('[data-testid=text]')?.textContent,
    seq: /** @type {HTMLElement} */ (e).dataset.seq,
    status: /** @type {HTMLElement} */ (e).dataset.status,
  }));
  return texts.every((t) => items.some((i) => i.text === t && i.seq && i.status === 'sent'));
};
const hasPresence = (/** @type {string} */ user) =>
  [...document.querySelectorAll('[data-testid=presence-user]')].some((e) => /** @type {HTMLElement} */ (e).dataset.user === user);

/** The messages a page shows, in order. */
function messagesOf(/** @type {P} */ p) {
  return p.page.$$eval('[data-testid=message]', (els) =>
    els.map((e) => ({
      text: e.querySelector('[data-testid=text]')?.textContent ?? '',
      seq: /** @type {HTMLElement} */ (e).dataset.seq ?? '',
      epoch: /** @type {HTMLElement} */ (e).dataset.epoch ?? '',
      from: /** @type {HTMLElement} */ (e).dataset.from ?? '',
      status: /** @type {HTMLElement} */ (e).dataset.status ?? '',
    })),
  );
}

/** Types `text` into the composer and presses Enter. */
async function send(/** @type {P} */ p, /** @type {string} */ text) {
  await p.page.focus('[data-testid=composer]');
  await p.page.keyboard.type(text);
  await p.page.keyboard.press('Enter');
  log(`${p.user} sent ${JSON.stringify(text)}`);
}

function checkPageErrors() {
  check(pageErrors.length === 0, `errors in the pages (uncaught, or console errors other than network failures):\n  ${pageErrors.join('\n  ')}`);
}

// ------------------------------------------------------------ the run

async function main() {
  check(fs.existsSync(GATEWAY), `no gateway binary at ${GATEWAY}: build it (cargo build --release -p gateway) or set CORECAST_GATEWAY`);
  check(fs.existsSync(CHROMIUM), `no browser at ${CHROMIUM}: install chromium or set CHROMIUM`);
  const addr = `127.0.0.1:${await freePort()}`;
  const gateway = new Gateway(addr);
  /** @type {import('puppeteer-core').Browser | null} */
  let browser = null;
  /** @type {{base: string, close: () => void} | null} */
  let proxy = null;
  try {
    await gateway.start();
    const stale = await comparePageFiles(`http://${addr}`);
    if (stale.length) {
      log(`${FROM_DISK ? 'note' : 'WARNING'}: the gateway serves page files other than the repository's (it embeds them when compiled: rebuild it to serve the current ones): ${stale.join('; ')}`);
    } else log('the gateway serves the page files as they are in the repository');
    let base = `http://${addr}`;
    if (FROM_DISK) {
      proxy = await pageProxy(addr);
      base = proxy.base;
      log(`CORECAST_PAGE_FROM_DISK: the pages load the files from disk through ${base} (not the binary's copies)`);
    }

    browser = await puppeteer.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox'],
    });
    log(`browser: ${await browser.version()}`);
    const alice = await openPage(browser, base, 'alice');
    const bob = await openPage(browser, base, 'bob');
    const both = [alice, bob];

    log('step: both pages connect');
    await Promise.all(both.map((p) => waitFor(p, 'the state badge to read "connected"', stateIs, ['connected'])));
    for (const p of both) {
      const shown = await p.page.$eval('[data-testid=user]', (e) => e.textContent);
      check(shown === p.user, `${p.user}'s page names the user ${JSON.stringify(shown)}`);
      const banner = await p.page.$eval('body', (b) => b.innerText);
      check(banner.includes('development mode: anonymous users, not for production'), `${p.user}'s page has no development-mode banner`);
    }
    checkPageErrors();

    log('step: each sees the other in the presence list');
    await waitFor(alice, 'bob in the presence list', hasPresence, ['bob']);
    await waitFor(bob, 'alice in the presence list', hasPresence, ['alice']);

    const run = Math.random().toString(36).slice(2, 7);
    const tag = (/** @type {string} */ s) => `${s} [${run}]`;
    /** @type {string[]} every text sent, in the order sent */
    const sent = [];
    const say = async (/** @type {P} */ p, /** @type {string} */ text) => {
      sent.push(text);
      await send(p, text);
    };

    log('step: alice and bob chat');
    await say(alice, tag('hello from alice'));
    await say(bob, tag('hi alice, bob here'));
    await say(alice, tag('how is it going?'));
    await say(bob, tag('fine, thanks'));
    await Promise.all(both.map((p) => waitFor(p, `all ${sent.length} messages so far, acked: ${JSON.stringify(sent)}`, showsAll, [sent])));
    await sameOrder(alice, bob, sent);
    checkPageErrors();

    log("step: bob types; alice's page shows it, bob's does not");
    const typingShown = waitFor(alice, 'the typing line to read "bob is typing…"', () =>
      /bob is typing/.test(document.querySelector('[data-testid=typing]')?.textContent ?? ''),
    );
    // Typed slowly (3 s) as a person would: the page announces it at most every 2 s.
    await bob.page.focus('[data-testid=composer]');
    await bob.page.keyboard.type('still typing...', { delay: 200 });
    await typingShown;
    const ownTyping = await bob.page.$eval('[data-testid=typing]', (e) => e.textContent ?? '');
    check(!/bob is typing/.test(ownTyping), `bob's page shows bob's own typing: ${JSON.stringify(ownTyping)}`);
    await bob.page.$eval('[data-testid=composer]', (e) => {
      /** @type {HTMLInputElement} */ (e).value = '';
    });
    log('alice sees "bob is typing…"');

    log('step: the gateway is killed (SIGKILL)');
    await gateway.kill();
    await Promise.all(both.map((p) => waitFor(p, 'the state badge to leave "connected" after the gateway died', stateIsNot, ['connected'])));
    for (const p of both) log(`${p.user}'s badge: ${JSON.stringify(await p.page.$eval('[data-testid=state]', (e) => e.textContent))}`);

    log('step: alice sends while the gateway is down');
    const offline = tag('sent while the server was down');
    await say(alice, offline);
    await waitFor(alice, `${JSON.stringify(offline)} shown as "sending…"`, (t) =>
      [...document.querySelectorAll('[data-testid=message]')].some(
        (e) =>
          e.querySelector('[data-testid=text]')?.textContent === t &&
          /** @type {HTMLElement} */ (e).dataset.status === 'sending' &&
          /sending…/.test(/** @type {HTMLElement} */ (e).innerText),
      ),
      [offline],
    );
    log('it shows as "sending…"');
    await sleep(1000); // down for a moment: both clients retry and fail at least once
    checkPageErrors();

    log('step: the gateway starts again on the same port');
    await gateway.start();
    await Promise.all(
      both.map((p) => waitFor(p, 'the state badge to read "connected" again after the restart', stateIs, ['connected'], RECONNECT_WAIT_MS)),
    );
    log('both pages are connected again');
    await Promise.all(both.map((p) => waitFor(p, `the queued message ${JSON.stringify(offline)}, acked`, showsAll, [[offline]])));
    log("alice's queued message arrived in both pages");
    // The restarted gateway's memory store lost the room: the resume cannot
    // recover it, and the page says so.
    await Promise.all(
      both.map((p) =>
        waitFor(p, 'the "messages may be missing" notice (the restarted gateway lost the room)', () => {
          const n = /** @type {HTMLElement | null} */ (document.querySelector('[data-testid=unrecovered]'));
          return !!n && !n.hidden && n.offsetParent !== null;
        }),
      ),
    );
    log('both pages show the unrecovered notice');
    await waitFor(alice, 'bob in the presence list after the restart', hasPresence, ['bob']);
    await waitFor(bob, 'alice in the presence list after the restart', hasPresence, ['alice']);

    log('step: they chat on after the restart');
    await say(bob, tag('back again'));
    await say(alice, tag('welcome back'));
    await say(bob, tag('no message lost?'));
    await Promise.all(both.map((p) => waitFor(p, `all ${sent.length} messages, acked: ${JSON.stringify(sent)}`, showsAll, [sent])));

    log('step: every message exactly once, in the same order in both pages');
    await sleep(500); // anything duplicated late would be in by now
    await sameOrder(alice, bob, sent);
    for (const p of both) {
      const shown = await messagesOf(p);
      for (const t of sent) {
        const n = shown.filter((m) => m.text === t).length;
        check(n === 1, `${p.user}'s page shows ${JSON.stringify(t)} ${n} times (want exactly once)`);
      }
      const waiting = shown.filter((m) => m.status !== 'sent');
      check(waiting.length === 0, `${p.user}'s page still has unsent messages: ${JSON.stringify(waiting)}`);
      const keys = shown.map((m) => `${m.epoch}:${m.seq}`);
      check(new Set(keys).size === keys.length, `${p.user}'s page shows one epoch:seq twice: ${keys}`);
    }
    log(`each page shows each of the ${sent.length} messages exactly once`);
    checkPageErrors();

    fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
    await alice.page.screenshot({ path: SCREENSHOT });
    log(`screenshot of alice's page: ${SCREENSHOT}`);
    if (stale.length && !FROM_DISK) log('NOTE: the checks ran against page files the binary embedded before the last edits (see WARNING above)');
    if (FROM_DISK) log('NOTE: CORECAST_PAGE_FROM_DISK: the page came from disk, not from the binary');
    log('PASS');
    return 0;
  } catch (e) {
    log(`FAIL: ${e instanceof Failure ? e.message : /** @type {any} */ (e)?.stack ?? e}`);
    log(`the gateway's last lines:\n${gateway.tail()}`);
    return 1;
  } finally {
    if (browser) await browser.close().catch(() => {});
    proxy?.close();
    await gateway.kill();
  }
}

/**
 * Both pages show the messages in `texts` in one order, each under the same
 * epoch and seq.
 * @param {P} a
 * @param {P} b
 * @param {string[]} texts
 */
async function sameOrder(a, b, texts) {
  const pick = async (/** @type {P} */ p) =>
    (await messagesOf(p)).filter((m) => texts.includes(m.text)).map((m) => `${m.epoch}:${m.seq} ${m.from}: ${m.text}`);
  const [la, lb] = [await pick(a), await pick(b)];
  check(
    JSON.stringify(la) === JSON.stringify(lb),
    `the pages show the messages in different orders:\n  ${a.user}: ${la.join(' | ')}\n  ${b.user}: ${lb.join(' | ')}`,
  );
  log(`same order in both pages: ${la.map((l) => l.split(' ')[0]).join(', ')}`);
}

process.exitCode = await main();
