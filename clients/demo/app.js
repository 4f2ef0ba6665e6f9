// The demo chat page `gateway --dev` serves at /. Plain DOM, no build step:
// it uses the corecast JavaScript client exactly as published
// (clients/js/src/index.js, served as /corecast.js) and gets its tokens from
// the development door /dev/token (anyone may be anyone: never in production).

import { Client } from '/corecast.js';

const USER_RE = /^[A-Za-z0-9_.-]{1,32}$/;
// Room names are 1-128 bytes of letters, digits and _ - . : @ / (docs/protocol.md);
// `typing:<room>` must stay within that, so a chat room keeps 7 bytes free.
const ROOM_RE = /^[A-Za-z0-9_.:@/-]{1,121}$/;
const TYPING_PREFIX = 'typing:';
const HISTORY_LIMIT = 50;
const TYPING_SEND_EVERY_MS = 2000;
const TYPING_SHOW_MS = 3000;

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));

const params = new URLSearchParams(location.search);
const userName = USER_RE.test(params.get('user') ?? '')
  ? /** @type {string} */ (params.get('user'))
  : `guest-${1000 + Math.floor(Math.random() * 9000)}`;
const askedRoom = params.get('room') ?? '';
const firstRoom = ROOM_RE.test(askedRoom) && !askedRoom.startsWith(TYPING_PREFIX) ? askedRoom : 'lobby';

const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;

async function getToken() {
  const r = await fetch('/dev/token?user=' + encodeURIComponent(userName));
  if (!r.ok) throw new Error(`/dev/token answered ${r.status}: ${(await r.text()).trim()}`);
  const j = await r.json();
  return j.token;
}

const client = new Client(wsUrl, { getToken });
/** For poking at from the console. */
Object.assign(globalThis, { corecast: client });

// ---------------------------------------------------------------- helpers

/**
 * @param {string} tag
 * @param {Record<string, string>} [attrs]
 * @param {(Node | string)[]} [children]
 */
function el(tag, attrs = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

/** A stable color per user name. */
function hue(/** @type {string} */ name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function avatar(/** @type {string} */ name) {
  const a = el('span', { class: 'avatar', 'aria-hidden': 'true' }, [name.slice(0, 1).toUpperCase()]);
  a.style.setProperty('--hue', String(hue(name)));
  return a;
}

function timeText(/** @type {number} */ ts) {
  return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

/** What a message body shows: `{text}` from this page, anything else as JSON. */
function bodyText(/** @type {any} */ body) {
  if (body && typeof body === 'object' && typeof body.text === 'string') return body.text;
  if (typeof body === 'string') return body;
  return JSON.stringify(body);
}

let toastTimer = 0;
function toast(/** @type {string} */ text) {
  const t = $('toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (t.hidden = true), 5000);
}

/** Reports a failure that needs no other handling (never an unhandled rejection). */
const report = (/** @type {string} */ what) => (/** @type {any} */ e) => {
  console.warn(`${what}:`, e);
  toast(`${what}: ${e?.message ?? e}`);
};

const idPrefix = `${userName}.${Math.random().toString(36).slice(2, 8)}.${Date.now().toString(36)}`;
let idCounter = 0;
const newId = () => `${idPrefix}.${++idCounter}`;

// ---------------------------------------------------------------- rooms

/**
 * An entry of a room's message list.
 * @typedef {object} Item
 * @property {string} key `epoch:seq`, or `pending:<id>`
 * @property {number} order the epoch's place among the room's epochs
 * @property {number} seq 0 while pending
 * @property {string} id
 * @property {HTMLElement} el
 * @property {boolean} [fromAck] made from our ack, before our own copy came
 */

class RoomView {
  /** @param {string} name */
  constructor(name) {
    this.name = name;
    this.room = client.room(name);
    this.typingRoom = client.room(TYPING_PREFIX + name);
    /** @type {Map<string, Item>} messages by `epoch:seq` */
    this.items = new Map();
    /** @type {Item[]} confirmed messages (and epoch dividers), in order */
    this.sorted = [];
    /** @type {Map<string, Item>} our publishes not acked yet, by id */
    this.pending = new Map();
    /** @type {Map<string, number>} the epochs seen, in order */
    this.epochs = new Map();
    /** @type {Set<string> | null} null: too many to list */
    this.people = new Set();
    this.peopleCount = 0;
    this.presenceFresh = false;
    /** @type {Map<string, number>} who is typing, and the timer that forgets them */
    this.typers = new Map();
    this.lastTypingSent = 0;
    this.unread = 0;
    this.unrecovered = false;
    this.list = el('ol', { class: 'message-list' });
    this.empty = el('li', { class: 'empty' }, ['No messages yet. Say hello!']);
    this.list.append(this.empty);
    this.entry = this.sidebarEntry();
    this.offs = [
      this.room.on('message', (m) => this.onMessage(m)),
      this.room.on('joined', (info) => this.onJoined(info)),
      this.room.on('unrecovered', () => this.onUnrecovered()),
      this.room.on('presence', (e) => this.onPresence(e)),
      this.room.on('left', (e) => this.onLeft(e)),
      // A refused join also rejects join(), which reports it.
      this.room.on('error', (e) => console.warn(`#${name}:`, e)),
      this.typingRoom.on('message', (m) => this.onTyping(m)),
    ];
  }

  sidebarEntry() {
    const li = el('li', { class: 'room', 'data-room': this.name });
    const open = el('button', { type: 'button', class: 'room-open', title: `show #${this.name}` }, [
      el('span', { class: 'hash' }, ['#']),
      el('span', { class: 'room-name' }, [this.name]),
      el('span', { class: 'warn', title: 'messages may be missing', hidden: '' }, ['!']),
      el('span', { class: 'unread', hidden: '' }),
    ]);
    open.addEventListener('click', () => showRoom(this.name));
    const leave = el('button', { type: 'button', class: 'room-leave', title: `leave #${this.name}`, 'aria-label': `leave ${this.name}` }, ['×']);
    leave.addEventListener('click', () => leaveRoom(this.name));
    li.append(open, leave);
    return li;
  }

  join() {
    this.room.join().catch((e) => {
      if (e?.code === 'left' || e?.code === 'closed') return;
      report(`cannot join #${this.name}`)(e);
      if (!e?.retryable) dropRoom(this.name);
    });
    // The typing indicator's room: ephemeral, so it never recovers (ignored).
    this.typingRoom.join().catch((e) => {
      if (e?.code !== 'left' && e?.code !== 'closed') console.warn(`typing indicator of #${this.name}:`, e);
    });
  }

  leave() {
    for (const off of this.offs) off();
    for (const t of this.typers.values()) clearTimeout(t);
    this.room.leave().catch(() => {});
    this.typingRoom.leave().catch(() => {});
  }

  get isCurrent() {
    return current === this;
  }

  // -- messages

  /** The place of `epoch` among the numberings this room has shown. */
  orderOf(/** @type {string} */ epoch) {
    let o = this.epochs.get(epoch);
    if (o === undefined) {
      o = this.epochs.size;
      this.epochs.set(epoch, o);
      if (o > 0) {
        // The server started a new numbering (it lost the room: a restart).
        const div = el('li', { class: 'divider', role: 'separator' }, [
          el('span', {}, ['the server restarted the room: earlier messages may be missing']),
        ]);
        this.insertSorted({ key: `epoch:${epoch}`, order: o, seq: -1, id: '', el: div });
      }
    }
    return o;
  }

  /** @param {Item} item */
  insertSorted(item) {
    const s = this.sorted;
    let i = s.length;
    while (i > 0 && (s[i - 1].order > item.order || (s[i - 1].order === item.order && s[i - 1].seq > item.seq))) i--;
    s.splice(i, 0, item);
    const next = s[i + 1]?.el ?? this.list.querySelector('.pending') ?? null;
    this.list.insertBefore(item.el, next);
    this.empty.remove();
  }

  /**
   * @param {{from: string, ts: number, text: string, status: string, seq?: number, epoch?: string}} m
   */
  renderMessage(m) {
    const mine = m.from === userName;
    const li = el('li', {
      class: `msg${mine ? ' mine' : ''}${m.status === 'sent' ? '' : ' pending'}`,
      'data-testid': 'message',
      'data-from': m.from,
      'data-seq': m.seq ? String(m.seq) : '',
      'data-epoch': m.epoch ?? '',
      'data-status': m.status,
    });
    const time = el('time', { datetime: new Date(m.ts).toISOString(), title: new Date(m.ts).toLocaleString() }, [timeText(m.ts)]);
    const status = el('span', { class: 'status' }, [m.status === 'sending' ? 'sending…' : '']);
    const meta = el('div', { class: 'meta' }, [el('span', { class: 'from' }, [m.from + (mine ? ' (you)' : '')]), time, status]);
    const text = el('div', { class: 'text', 'data-testid': 'text' }, [m.text]);
    li.append(avatar(m.from), el('div', { class: 'bubble' }, [meta, text]));
    return li;
  }

  /**
   * A message with its place in the room's order (live, from history or from
   * our ack); shown once whatever way it comes.
   * @param {{epoch: string, seq: number, from: string, id: string, ts: number, body: any}} m
   * @param {boolean} [fromAck]
   * @returns {boolean} it was new
   */
  addConfirmed(m, fromAck = false) {
    const key = `${m.epoch}:${m.seq}`;
    const have = this.items.get(key);
    if (have) {
      if (have.fromAck && !fromAck) {
        // Our own copy after our ack: it has the server's time.
        have.fromAck = false;
        const t = have.el.querySelector('time');
        if (t) t.textContent = timeText(m.ts);
      }
      return false;
    }
    const mine = m.from === userName;
    const pending = mine && m.id ? this.pending.get(m.id) : undefined;
    if (pending) {
      this.pending.delete(m.id);
      pending.el.remove();
    }
    const stick = this.isCurrent && nearBottom();
    const item = {
      key,
      order: this.orderOf(m.epoch),
      seq: m.seq,
      id: m.id,
      fromAck,
      el: this.renderMessage({ from: m.from, ts: m.ts, text: bodyText(m.body), status: 'sent', seq: m.seq, epoch: m.epoch }),
    };
    this.items.set(key, item);
    this.insertSorted(item);
    if (stick || (pending && this.isCurrent)) scrollToBottom();
    return true;
  }

  /** @param {import('/corecast.js').Message} m */
  onMessage(m) {
    const fresh = this.addConfirmed(m);
    this.stopTyping(m.from);
    if (this.isCurrent) renderRoomInfo();
    if (fresh && !this.isCurrent && m.from !== userName) {
      this.unread++;
      this.renderEntry();
    }
  }

  /** @param {string} text */
  send(text) {
    const id = newId();
    const el = this.renderMessage({ from: userName, ts: Date.now(), text, status: 'sending' });
    el.classList.add('pending');
    /** @type {Item} */
    const item = { key: `pending:${id}`, order: Infinity, seq: 0, id, el };
    this.pending.set(id, item);
    this.list.append(el);
    this.empty.remove();
    scrollToBottom();
    this.publish(text, id, item);
  }

  /**
   * @param {string} text
   * @param {string} id
   * @param {Item} item
   */
  publish(text, id, item) {
    this.room.publish({ text }, { id }).then(
      (ack) => {
        if (this.pending.get(id) !== item) return; // our own copy came first
        this.addConfirmed({ epoch: ack.epoch, seq: ack.seq, from: userName, id, ts: Date.now(), body: { text } }, true);
      },
      (e) => {
        if (this.pending.get(id) !== item) return;
        // Not sent (left the room, closed, refused, or no ack in time):
        // offer to send it again with the same id (never delivered twice).
        item.el.dataset.status = 'failed';
        const status = /** @type {HTMLElement} */ (item.el.querySelector('.status'));
        status.textContent = `not sent (${e?.code ?? e}) · `;
        const retry = el('button', { type: 'button', class: 'link' }, ['retry']);
        retry.addEventListener('click', () => {
          item.el.dataset.status = 'sending';
          status.textContent = 'sending…';
          this.publish(text, id, item);
        });
        status.append(retry);
      },
    );
  }

  /** @param {{epoch: string, messages: any[], complete: boolean}} h */
  addHistory(h) {
    for (const m of h.messages) this.addConfirmed({ ...m, epoch: h.epoch });
  }

  loadHistory() {
    this.room
      .history({ limit: HISTORY_LIMIT })
      .then((h) => {
        const stick = this.isCurrent;
        this.addHistory(h);
        if (stick) scrollToBottom();
      })
      .catch((e) => {
        if (e?.code !== 'closed') report(`history of #${this.name}`)(e);
      });
  }

  /** @param {import('/corecast.js').JoinInfo} info */
  onJoined(info) {
    // A first join, or a resume that lost messages: (re)load the last ones.
    // A recovered resume gets what it missed as ordinary messages.
    if (!info.resumed || !info.recovered) this.loadHistory();
    this.refreshPresence();
    if (this.isCurrent) renderRoomInfo();
  }

  onUnrecovered() {
    this.unrecovered = true;
    this.renderEntry();
    if (this.isCurrent) renderNotice();
  }

  /** @param {{by: string}} e */
  onLeft(e) {
    if (e.by === 'client') return;
    toast(`you were taken out of #${this.name}`);
    dropRoom(this.name);
  }

  // -- presence

  refreshPresence() {
    this.room
      .presence()
      .then((p) => {
        this.people = p.users ? new Set(p.users) : null;
        this.peopleCount = p.count;
        this.presenceFresh = true;
        if (this.isCurrent) renderPresence();
      })
      .catch((e) => {
        if (e?.code !== 'closed') report(`presence of #${this.name}`)(e);
      });
  }

  /** @param {{event: string, user: string}} e */
  onPresence(e) {
    if (!this.people) return;
    if (e.event === 'join') this.people.add(e.user);
    else if (e.event === 'leave') {
      this.people.delete(e.user);
      this.stopTyping(e.user);
    }
    this.peopleCount = this.people.size;
    if (this.isCurrent) renderPresence();
  }

  // -- typing

  /** The composer changed: tell the room, at most every 2 s. */
  typed() {
    const now = Date.now();
    if (now - this.lastTypingSent < TYPING_SEND_EVERY_MS) return;
    if (client.state !== 'connected' || !this.typingRoom.joined) return; // stale once sent
    this.lastTypingSent = now;
    this.typingRoom.publish({ typing: true }).catch(() => {}); // best effort
  }

  /** @param {import('/corecast.js').Message} m */
  onTyping(m) {
    if (m.from === userName) return; // ourselves (here or in another tab)
    if (!m.body || m.body.typing !== true) return this.stopTyping(m.from);
    clearTimeout(this.typers.get(m.from));
    this.typers.set(m.from, setTimeout(() => this.stopTyping(m.from), TYPING_SHOW_MS));
    if (this.isCurrent) renderTyping();
  }

  /** @param {string} user */
  stopTyping(user) {
    if (!this.typers.has(user)) return;
    clearTimeout(this.typers.get(user));
    this.typers.delete(user);
    if (this.isCurrent) renderTyping();
  }

  renderEntry() {
    const unread = /** @type {HTMLElement} */ (this.entry.querySelector('.unread'));
    unread.hidden = this.unread === 0;
    unread.textContent = String(this.unread);
    /** @type {HTMLElement} */ (this.entry.querySelector('.warn')).hidden = !this.unrecovered;
    this.entry.classList.toggle('current', this.isCurrent);
  }
}

/** @type {Map<string, RoomView>} */
const views = new Map();
/** @type {RoomView} */
let current;

function openRoom(/** @type {string} */ name) {
  let v = views.get(name);
  if (!v) {
    v = new RoomView(name);
    views.set(name, v);
    $('rooms').append(v.entry);
    v.join();
  }
  showRoom(name);
}

function showRoom(/** @type {string} */ name) {
  const v = views.get(name);
  if (!v) return;
  const before = current;
  current = v;
  v.unread = 0;
  for (const x of views.values()) x.renderEntry();
  $('messages').replaceChildren(v.list);
  $('room-title').textContent = `#${name}`;
  /** @type {HTMLInputElement} */ ($('composer')).placeholder = `Message #${name} — Enter to send`;
  $('presence-room').textContent = `#${name}`;
  renderRoomInfo();
  renderPresence();
  renderTyping();
  renderNotice();
  scrollToBottom();
  document.body.classList.remove('menu-open');
  if (before !== v) /** @type {HTMLInputElement} */ ($('composer')).focus({ preventScroll: true });
  const url = new URL(location.href);
  url.searchParams.set('user', userName);
  url.searchParams.set('room', name);
  history.replaceState(null, '', url);
}

function leaveRoom(/** @type {string} */ name) {
  if (views.size <= 1) return toast('this is your only room: join another one first');
  dropRoom(name);
}

function dropRoom(/** @type {string} */ name) {
  const v = views.get(name);
  if (!v) return;
  v.leave();
  views.delete(name);
  v.entry.remove();
  if (current === v) {
    const next = views.values().next().value;
    if (next) showRoom(next.name);
    else openRoom('lobby');
  }
}

// ---------------------------------------------------------------- rendering

function nearBottom() {
  const box = $('messages');
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToBottom() {
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
}

function renderPresence() {
  const v = current;
  const ul = $('presence');
  ul.classList.toggle('stale', !v.presenceFresh || client.state !== 'connected');
  if (!v.people) {
    ul.replaceChildren(el('li', { class: 'many' }, [`${v.peopleCount} people`]));
    $('presence-count').textContent = String(v.peopleCount);
    return;
  }
  const users = [...v.people].sort((a, b) => (a === userName ? -1 : b === userName ? 1 : a.localeCompare(b)));
  ul.replaceChildren(
    ...users.map((u) =>
      el('li', { class: `person${u === userName ? ' me' : ''}`, 'data-testid': 'presence-user', 'data-user': u }, [
        avatar(u),
        el('span', { class: 'name' }, [u]),
        ...(u === userName ? [el('span', { class: 'you' }, ['you'])] : []),
      ]),
    ),
  );
  $('presence-count').textContent = String(users.length);
}

function renderTyping() {
  const names = [...current.typers.keys()];
  const line = $('typing');
  line.textContent =
    names.length === 0
      ? ''
      : names.length === 1
        ? `${names[0]} is typing…`
        : names.length === 2
          ? `${names[0]} and ${names[1]} are typing…`
          : `${names.length} people are typing…`;
  line.classList.toggle('on', names.length > 0);
}

function renderNotice() {
  $('unrecovered').hidden = !current.unrecovered;
}

function renderRoomInfo() {
  const r = current.room;
  $('room-info').textContent = r.joined ? `epoch ${r.epoch || '—'} · seq ${r.seq}` : r.epoch ? 'rejoining…' : 'joining…';
}

// The connection badge: connected / reconnecting (in …) / closed.
let reconnectAt = 0;
let hadConnection = false;
let badgeTimer = 0;

function renderState() {
  const badge = $('state');
  const s = client.state;
  let text;
  let kind;
  if (s === 'connected') {
    text = 'connected';
    kind = 'connected';
  } else if (s === 'closed') {
    text = 'closed';
    kind = 'closed';
  } else if (!hadConnection && reconnectAt === 0) {
    text = 'connecting…';
    kind = 'connecting';
  } else {
    const left = reconnectAt - Date.now();
    text = left > 0 ? `reconnecting in ${(left / 1000).toFixed(1)} s` : 'reconnecting…';
    kind = 'reconnecting';
  }
  badge.textContent = text;
  badge.dataset.state = kind;
  document.body.dataset.state = kind;
  clearTimeout(badgeTimer);
  if (kind === 'reconnecting' && reconnectAt > Date.now()) badgeTimer = setTimeout(renderState, 100);
  $('reconnect-now').hidden = kind !== 'closed';
}

// ---------------------------------------------------------------- wiring

client.on('state', () => {
  renderState();
  if (current) {
    renderPresence();
    renderRoomInfo();
  }
});
client.on('connected', () => {
  hadConnection = true;
  reconnectAt = 0;
  renderState();
});
client.on('disconnected', (/** @type {{reconnectInMs: number | null, error: any}} */ d) => {
  reconnectAt = d.reconnectInMs == null ? 0 : Date.now() + d.reconnectInMs;
  if (d.reconnectInMs == null) toast(`disconnected for good: ${d.error?.message ?? d.error?.code}`);
  for (const v of views.values()) {
    // Whoever was typing may have stopped; presence is asked again on rejoin.
    for (const u of [...v.typers.keys()]) v.stopTyping(u);
    v.presenceFresh = false;
  }
  renderState();
  if (current) renderPresence();
});
client.on('error', (/** @type {any} */ e) => {
  // Reported here too: failed token fetches while the server is away, refused requests.
  console.warn('corecast:', e?.code, e?.message);
  if (e?.code !== 'token_unavailable') toast(`${e?.code}: ${e?.message}`);
});
client.on('dm', (/** @type {any} */ d) => toast(`direct message from ${d.from}: ${bodyText(d.body)}`));

$('me').textContent = userName;
document.title = `${userName} · corecast demo chat`;
const nameInput = /** @type {HTMLInputElement} */ ($('user-name'));
nameInput.value = userName;
$('who-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = nameInput.value.trim();
  if (!USER_RE.test(name)) return toast('a user name is 1-32 letters, digits, _ - or .');
  if (name === userName) return;
  const url = new URL(location.href);
  url.searchParams.set('user', name);
  url.searchParams.set('room', current.name);
  location.href = url.toString(); // a new page, a new connection as that user
});

const joinInput = /** @type {HTMLInputElement} */ ($('join-name'));
$('join-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = joinInput.value.trim().replace(/^#/, '');
  if (!name) return;
  if (!ROOM_RE.test(name)) return toast('room names are letters, digits and _ - . : @ / (at most 121)');
  if (name.startsWith(TYPING_PREFIX)) return toast('typing: rooms carry typing indicators: pick another name');
  joinInput.value = '';
  openRoom(name);
});

const composer = /** @type {HTMLInputElement} */ ($('composer'));
$('composer-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = composer.value.trim();
  if (!text) return;
  composer.value = '';
  current.send(text);
});
composer.addEventListener('input', () => {
  if (composer.value.trim()) current.typed();
});

$('unrecovered-close').addEventListener('click', () => {
  current.unrecovered = false;
  current.renderEntry();
  renderNotice();
});

$('menu').addEventListener('click', () => {
  const open = document.body.classList.toggle('menu-open');
  $('menu').setAttribute('aria-expanded', String(open));
});

const reconnectNow = el('button', { type: 'button', id: 'reconnect-now', class: 'link', hidden: '' }, ['reload']);
reconnectNow.addEventListener('click', () => location.reload());
$('state').after(reconnectNow);

openRoom(firstRoom);
renderState();
client.connect();
