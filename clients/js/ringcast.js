// ringcast.js: the browser client for ringcast (docs/clients.md).
//
// One dependency-free ES module. It keeps a connection to ringcast over WebSocket and,
// where WebSocket cannot connect, over Server-Sent Events and then long-polling
// (docs/protocol.md, /sse and /poll). Per channel it remembers the last offset and epoch it
// delivered, so every reconnect resumes with `since`: no message is lost while the server's
// history (or the inbox, for `user:` channels) still has it, none is delivered twice, and
// the application is told (`subscribed` with `recovered: false`) when a gap could not be
// filled.
//
//   import { Ringcast } from './ringcast.js';
//   const rc = new Ringcast({ url: 'wss://edge.example.com/ws', token });
//   rc.on('message', ({ channel, offset, data }) => console.log(channel, offset, data));
//   rc.subscribe('news');
//   rc.connect();

const TRANSPORTS = ['websocket', 'sse', 'poll'];
const CHANNEL_RE = /^[A-Za-z0-9_.:@/=+-]{1,128}$/;
const EVENTS = ['message', 'subscribed', 'gap', 'presence', 'error', 'state'];
/** A connection that stayed open this long resets the backoff. */
const STABLE_MS = 5000;
/** Refresh a token this long (at most) before its `exp`; less for short-lived tokens. */
const REFRESH_LEAD_MS = 30000;
/** But at least this long (up to half its life): the server checks expiry in whole seconds. */
const MIN_REFRESH_LEAD_MS = 2000;

/** An error reply from the server, or an HTTP error of the SSE / long-poll endpoints. */
export class RingcastError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'RingcastError';
    /** The reply code (400, 403, 413, 503...) or HTTP status; 0 for a closed connection. */
    this.code = code;
    Object.assign(this, details);
  }
}

/** The `exp` claim (Unix seconds) of a JWT, or null when it cannot be read. */
export function tokenExpiry(token) {
  const claims = jwtClaims(token);
  return claims && typeof claims.exp === 'number' ? claims.exp : null;
}

function jwtClaims(token) {
  if (typeof token !== 'string') return null;
  const part = token.split('.')[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

/** Percent-encodes a query value but keeps the separators ringcast's lists use readable. */
function q(value) {
  return encodeURIComponent(value)
    .replace(/%3A/gi, ':')
    .replace(/%2C/gi, ',')
    .replace(/%40/gi, '@')
    .replace(/%2F/gi, '/');
}

/** `ws://h/ws` → `http://h/<path>` (the SSE and long-poll endpoints share the port). */
function siblingUrl(wsUrl, path) {
  if (!wsUrl) return null;
  const base = typeof location !== 'undefined' ? location.href : undefined;
  const u = new URL(wsUrl, base);
  u.protocol = u.protocol === 'wss:' ? 'https:' : u.protocol === 'ws:' ? 'http:' : u.protocol;
  u.pathname = u.pathname.replace(/\/ws\/?$/, '') + path;
  u.search = '';
  return u.toString();
}

/** `reconnect after <ms>ms` (the 1001 drain hint) → ms, else null. */
function drainHint(reason) {
  const m = /reconnect after (\d+)ms/.exec(reason || '');
  return m ? Number(m[1]) : null;
}

/** ringcast answers every 503 with `Retry-After: 5`. */
const DEFAULT_RETRY_AFTER_MS = 5000;

/**
 * Retry-After in seconds (the only form ringcast sends) → ms, else null. A cross-origin
 * response shows the header only when the server lists it in
 * Access-Control-Expose-Headers; a 503 without a readable one waits ringcast's 5 s.
 */
function retryAfterMs(res) {
  const v = res.headers.get('Retry-After');
  const s = v == null ? NaN : Number(v.trim());
  if (Number.isFinite(s) && s >= 0) return s * 1000;
  return res.status === 503 ? DEFAULT_RETRY_AFTER_MS : null;
}

export class Ringcast {
  /**
   * @param {object} options see docs/clients.md; `url` is the WebSocket URL (`ws://host/ws`).
   */
  constructor(options = {}) {
    const o = options;
    if (!o.url && !o.sseUrl && !o.pollUrl) {
      throw new TypeError('Ringcast: give at least `url` (ws://host:port/ws)');
    }
    this.url = o.url || null;
    this.sseUrl = o.sseUrl || siblingUrl(o.url, '/sse');
    this.pollUrl = o.pollUrl || siblingUrl(o.url, '/poll');
    this.minDelay = o.minDelay ?? 1000;
    this.maxDelay = o.maxDelay ?? 30000;
    this.fallbackAfter = o.fallbackAfter ?? 3;
    this.retryWebSocketAfter = o.retryWebSocketAfter ?? 300000;
    this.connectTimeout = o.connectTimeout ?? 10000;
    this.pollTimeout = o.pollTimeout ?? 25;
    this.idleTimeout = o.idleTimeout ?? 75000;
    this.withCredentials = Boolean(o.withCredentials);
    const wanted = o.transports || TRANSPORTS;
    for (const t of wanted) {
      if (!TRANSPORTS.includes(t)) throw new TypeError(`Ringcast: unknown transport ${t}`);
    }
    this.transports = wanted.filter(
      (t) =>
        (t === 'websocket' && this.url && typeof WebSocket !== 'undefined') ||
        (t === 'sse' && this.sseUrl && typeof fetch !== 'undefined') ||
        (t === 'poll' && this.pollUrl && typeof fetch !== 'undefined')
    );
    if (this.transports.length === 0) {
      throw new TypeError('Ringcast: no usable transport (check url, sseUrl, pollUrl)');
    }
    this._token = o.token || null;
    this._tokenAt = Date.now();
    this._getToken = o.getToken || null;
    this._handlers = new Map(EVENTS.map((e) => [e, new Set()]));
    /** channel → { offset, epoch, inbox, since } */
    this._channels = new Map();
    this._state = 'disconnected';
    this._transport = null;
    this._active = false;
    this._gen = 0;
    this._session = null;
    this._attempt = 0;
    this._failures = 0;
    this._tIndex = 0;
    this._fellBackAt = 0;
    this._probing = false;
    this._fallbackIndex = 1;
    this._wsOpened = false;
    this._timer = null;
    this._refreshTimer = null;
    this._probeTimer = null;
    this._restartQueued = false;
    this._nextId = 1;
    this._pending = new Map();
  }

  /** 'connecting' | 'connected' | 'disconnected' | 'closed'. */
  get state() {
    return this._state;
  }

  /** The transport in use or being tried: 'websocket' | 'sse' | 'poll' | null. */
  get transport() {
    return this._transport;
  }

  /** Last delivered position of `channel`: { offset, epoch } (null fields before any). */
  position(channel) {
    const ch = this._channels.get(channel);
    return ch ? { offset: ch.offset, epoch: ch.epoch } : null;
  }

  /** Adds a listener for `event`; returns this. */
  on(event, fn) {
    const set = this._handlers.get(event);
    if (!set) throw new TypeError(`Ringcast: unknown event ${event} (one of ${EVENTS.join(', ')})`);
    set.add(fn);
    return this;
  }

  /** Removes a listener added with on(); returns this. */
  off(event, fn) {
    const set = this._handlers.get(event);
    if (set) set.delete(fn);
    return this;
  }

  /** Starts connecting (and keeps reconnecting until close()); returns this. */
  connect() {
    if (this._active) return this;
    this._active = true;
    this._attempt = 0;
    this._failures = 0;
    this._open();
    return this;
  }

  /** Closes the connection and stops reconnecting. connect() may be called again. */
  close() {
    this._active = false;
    this._gen += 1;
    clearTimeout(this._timer);
    clearTimeout(this._refreshTimer);
    clearTimeout(this._probeTimer);
    this._endSession();
    this._setState('closed', this._transport);
  }

  /** Subscribes to `channel` (now, or when connected); resumes its position on reconnects. */
  subscribe(channel) {
    if (!CHANNEL_RE.test(channel)) {
      throw new TypeError(`Ringcast: invalid channel name ${JSON.stringify(channel)}`);
    }
    if (this._channels.has(channel)) return this;
    this._channels.set(channel, { offset: null, epoch: null, inbox: false, since: null });
    const s = this._session;
    if (s && s.opened && s.kind === 'websocket') this._sendSubscribe(channel);
    else if (s && s.kind !== 'websocket') this._queueRestart();
    return this;
  }

  /** Unsubscribes from `channel` and forgets its position. */
  unsubscribe(channel) {
    if (!this._channels.delete(channel)) return this;
    const s = this._session;
    if (s && s.opened && s.kind === 'websocket') {
      this._request({ cmd: 'unsubscribe', channel }).catch(() => {});
    } else if (s && s.kind !== 'websocket') {
      this._queueRestart();
    }
    return this;
  }

  /**
   * Publishes `data` (any JSON value but null) to `channel`. WebSocket only.
   * @returns {Promise<{channel: string, offset: number}>}
   */
  publish(channel, data) {
    return this._request({ cmd: 'publish', channel, data }).then((r) => ({
      channel: r.channel,
      offset: r.offset,
    }));
  }

  /**
   * Acknowledges inbox messages of a `user:` channel up to `offset`. WebSocket only.
   * @returns {Promise<{channel: string, offset: number, removed: number}>}
   */
  ack(channel, offset) {
    return this._request({ cmd: 'ack', channel, offset }).then((r) => ({
      channel: r.channel,
      offset: r.offset,
      removed: r.removed,
    }));
  }

  // ---- events -------------------------------------------------------------------------

  _emit(event, payload) {
    for (const fn of [...this._handlers.get(event)]) {
      try {
        fn(payload);
      } catch (err) {
        // A listener's bug must not break the connection; report it where it is visible.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  _setState(state, transport, extra = {}) {
    this._state = state;
    this._transport = transport;
    this._emit('state', { state, transport, ...extra });
  }

  // ---- connection lifecycle -----------------------------------------------------------

  _pickTransport() {
    if (
      this._tIndex > 0 &&
      this._fellBackAt &&
      Date.now() - this._fellBackAt >= this.retryWebSocketAfter
    ) {
      this._fallbackIndex = this._tIndex;
      this._tIndex = 0;
      this._failures = 0;
      this._probing = true;
    }
    return this.transports[this._tIndex];
  }

  async _open() {
    clearTimeout(this._timer);
    const gen = ++this._gen;
    const transport = this._pickTransport();
    this._setState('connecting', transport, { attempt: this._attempt });
    let token;
    try {
      token = await this._freshToken();
    } catch (err) {
      if (gen !== this._gen) return;
      this._emit('error', new RingcastError(0, `getToken failed: ${err && err.message}`, { cause: err }));
      this._ended(gen, { opened: false, transport });
      return;
    }
    if (gen !== this._gen || !this._active) return;
    if (transport === 'websocket') this._openWebSocket(gen, token);
    else if (transport === 'sse') this._openSse(gen, token);
    else this._openPoll(gen, token);
  }

  /** Closes the current session without reporting its end. */
  _endSession() {
    const s = this._session;
    this._session = null;
    if (s) s.close();
    for (const { reject } of this._pending.values()) {
      reject(new RingcastError(0, 'connection closed'));
    }
    this._pending.clear();
  }

  _opened(gen, session) {
    session.opened = true;
    session.openedAt = Date.now();
    if (session.kind === 'websocket') this._wsOpened = true;
    this._failures = 0;
    if (this._probing) {
      // The preferred transport works again.
      this._probing = false;
      this._fellBackAt = 0;
    }
    this._setState('connected', session.kind);
    this._scheduleRefresh();
    clearTimeout(this._probeTimer);
    if (this._tIndex > 0 && this._fellBackAt) {
      this._probeTimer = setTimeout(() => {
        if (gen !== this._gen || !this._active) return;
        this._attempt = 0; // the fallback has been up all along: no backoff after a failed probe
        this._restart();
      }, Math.max(0, this._fellBackAt + this.retryWebSocketAfter - Date.now()));
    }
  }

  /** A session ended (or failed to open): schedule the next attempt. */
  _ended(gen, { opened, openedAt, code, reason, status, retryAfter, transport }) {
    if (gen !== this._gen) return;
    this._gen += 1;
    this._endSession();
    clearTimeout(this._probeTimer);
    if (!this._active) return;
    if (opened && Date.now() - openedAt >= STABLE_MS) this._attempt = 0;
    // A 503 (busy, draining) or 401 (token) says the transport itself works.
    if (!opened && status !== 503 && status !== 401) {
      this._failures += 1;
      const last = this.transports.length - 1;
      if (this._probing) {
        // The preferred transport still fails: back to the fallback at once.
        this._probing = false;
        this._tIndex = Math.min(Math.max(this._fallbackIndex, 1), last);
        this._failures = 0;
        this._fellBackAt = Date.now();
      } else if (this._failures >= this._fallbackThreshold() && last > 0) {
        this._tIndex = this._tIndex === last ? 0 : this._tIndex + 1;
        this._failures = 0;
        this._fellBackAt = this._tIndex > 0 ? Date.now() : 0;
      }
    }
    if (code === 4401 && this._getToken) this._token = null; // expired: fetch a new one
    const hint = code === 1001 ? drainHint(reason) : null;
    let delay;
    if (hint != null) {
      // The server spread its drain; come back when it said, plus our own jitter.
      delay = hint + Math.random() * Math.min(hint, this.minDelay);
      this._attempt = 0;
    } else if (retryAfter != null) {
      delay = retryAfter + Math.random() * this.minDelay;
      this._attempt += 1;
    } else {
      const cap = Math.min(this.maxDelay, this.minDelay * 2 ** Math.min(this._attempt, 30));
      delay = Math.random() * cap;
      this._attempt += 1;
    }
    delay = Math.round(delay);
    this._setState('disconnected', transport, {
      code,
      reason,
      status,
      delay,
      attempt: this._attempt,
      next: this.transports[this._tIndex],
    });
    this._timer = setTimeout(() => this._open(), delay);
  }

  /**
   * Failed attempts before leaving the current transport. WebSocket that has worked
   * before in this client is more likely a server restart than a blocking network, so
   * it keeps its place three times longer.
   */
  _fallbackThreshold() {
    const here = this.transports[this._tIndex];
    return here === 'websocket' && this._wsOpened ? this.fallbackAfter * 3 : this.fallbackAfter;
  }

  /** Reopens at once (a channel-set change on SSE/poll, a fresh token on SSE, a probe). */
  _restart() {
    if (!this._active) return;
    this._gen += 1;
    this._endSession();
    this._open();
  }

  _queueRestart() {
    if (!this._active || this._restartQueued) return;
    this._restartQueued = true;
    queueMicrotask(() => {
      this._restartQueued = false;
      this._restart();
    });
  }

  // ---- tokens -------------------------------------------------------------------------

  async _freshToken() {
    if (!this._getToken) return this._token;
    const exp = tokenExpiry(this._token);
    if (!this._token || (exp != null && exp * 1000 - Date.now() < this._refreshLead())) {
      this._token = await this._getToken();
      this._tokenAt = Date.now();
    }
    return this._token;
  }

  _refreshLead() {
    const claims = jwtClaims(this._token);
    if (!claims || typeof claims.exp !== 'number') return 0;
    const issued = typeof claims.iat === 'number' ? claims.iat * 1000 : this._tokenAt;
    const life = Math.max(0, claims.exp * 1000 - issued);
    return Math.min(REFRESH_LEAD_MS, Math.max(life * 0.1, Math.min(MIN_REFRESH_LEAD_MS, life / 2)));
  }

  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    const exp = tokenExpiry(this._token);
    if (!this._getToken || exp == null) return;
    const wait = Math.max(exp * 1000 - this._refreshLead() - Date.now(), 1000);
    this._refreshTimer = setTimeout(() => this._refreshToken(), wait);
  }

  async _refreshToken() {
    const gen = this._gen;
    try {
      this._token = await this._getToken();
      this._tokenAt = Date.now();
    } catch (err) {
      this._emit('error', new RingcastError(0, `getToken failed: ${err && err.message}`, { cause: err }));
      if (gen === this._gen) this._refreshTimer = setTimeout(() => this._refreshToken(), 5000);
      return;
    }
    const s = this._session;
    if (gen !== this._gen || !s || !s.opened) return; // the next session takes the new token
    if (s.kind === 'websocket') {
      this._request({ cmd: 'refresh', token: this._token }).then(
        () => this._scheduleRefresh(),
        (err) => this._emit('error', err)
      );
    } else if (s.kind === 'sse') {
      this._restart(); // the token is in the stream's URL
    } else {
      this._scheduleRefresh(); // every poll carries the current token
    }
  }

  // ---- what every transport delivers ----------------------------------------------------

  /** Handles one server JSON object (a WebSocket frame, an SSE event, a poll event). */
  _onEvent(msg, session) {
    if (msg === null || typeof msg !== 'object') return;
    if (typeof msg.reply === 'string') {
      this._onReply(msg);
      return;
    }
    if (msg.type === 'gap') {
      const ch = this._channels.get(msg.channel);
      if (!ch) return;
      if (ch.offset == null || msg.to > ch.offset) ch.offset = msg.to;
      this._emit('gap', { channel: msg.channel, from: msg.from, to: msg.to });
      return;
    }
    if (msg.type === 'join' || msg.type === 'leave') {
      if (this._channels.has(msg.channel)) this._emit('presence', msg);
      return;
    }
    if (msg.type === 'close') {
      session.serverClose = { code: msg.code, reason: msg.reason };
      return;
    }
    if (typeof msg.channel === 'string' && typeof msg.offset === 'number') {
      this._onMessage(msg);
    }
  }

  _onMessage(msg) {
    const ch = this._channels.get(msg.channel);
    if (!ch) return; // unsubscribed meanwhile
    if (ch.offset != null) {
      if (msg.offset <= ch.offset) return; // already delivered
      if (msg.offset > ch.offset + 1 && !ch.inbox) {
        // Skipped without a gap notice (it should not happen; say so rather than hide it).
        this._emit('gap', { channel: msg.channel, from: ch.offset + 1, to: msg.offset - 1 });
      }
    }
    ch.offset = msg.offset;
    this._emit('message', { channel: msg.channel, offset: msg.offset, data: msg.data });
  }

  _onReply(msg) {
    const pending = msg.id != null ? this._pending.get(msg.id) : undefined;
    if (pending) this._pending.delete(msg.id);
    if (msg.reply === 'subscribe') this._onSubscribeReply(msg);
    if (pending) {
      if (msg.code === 200) pending.resolve(msg);
      else pending.reject(new RingcastError(msg.code, msg.error || `${msg.reply} failed`, { reply: msg }));
    } else if (msg.code !== 200 && msg.reply !== 'subscribe') {
      this._emit('error', new RingcastError(msg.code, msg.error || 'error reply', { reply: msg }));
    }
  }

  _onSubscribeReply(msg) {
    let ch = this._channels.get(msg.channel);
    if (!ch && msg.code === 200 && msg.id == null) {
      // A subscription the server made on its own (`subscribe_user_channel`: the user's
      // inbox channel at connect): deliver it like one the application asked for.
      ch = { offset: null, epoch: null, inbox: false, since: null };
      this._channels.set(msg.channel, ch);
    }
    if (!ch) return;
    // Already subscribed, by the server at connect: its own reply (which may come after
    // this one, once the inbox answered) is the one to read, with our `since`.
    if (msg.code === 409) return;
    const since = ch.since;
    ch.since = null;
    if (msg.code !== 200) {
      // Refused for good (403, 400): forget it so reconnects do not ask again.
      if (msg.code === 400 || msg.code === 403) this._channels.delete(msg.channel);
      this._emit(
        'error',
        new RingcastError(msg.code, msg.error || 'subscribe refused', { channel: msg.channel, reply: msg })
      );
      return;
    }
    let recovered;
    let reason;
    if (msg.inbox) {
      // Unacked messages follow the reply; `offset` is the position after them.
      ch.inbox = true;
      if (since) {
        recovered = since.epoch === msg.epoch;
        if (!recovered) reason = 'epoch_changed';
      }
      // Whatever `since` went out: in the same history, what was delivered stays
      // delivered (the server may subscribe the channel too, without our `since`).
      if (ch.offset == null || ch.epoch !== msg.epoch) {
        ch.offset = msg.inbox.unacked > 0 ? null : msg.offset;
      } else if (msg.inbox.unacked === 0 && msg.offset > ch.offset) {
        ch.offset = msg.offset;
      }
    } else if (since && msg.recovered === true) {
      recovered = true; // the missed messages follow, after since.offset
    } else {
      if (since) {
        recovered = false;
        reason = msg.reason || 'not_recovered';
      }
      ch.offset = msg.offset;
    }
    ch.epoch = msg.epoch;
    const event = { channel: msg.channel, offset: msg.offset, epoch: msg.epoch };
    if (recovered !== undefined) event.recovered = recovered;
    if (reason) event.reason = reason;
    if (msg.inbox) event.inbox = msg.inbox;
    this._emit('subscribed', event);
  }

  _positionToken() {
    const parts = [];
    for (const [name, ch] of this._channels) {
      if (ch.offset != null && ch.epoch != null) parts.push(`${name}~${ch.offset}~${ch.epoch}`);
    }
    return parts.join(',');
  }

  /** Remembers what `since` each channel is asked with, to read its reply. */
  _markSince() {
    for (const ch of this._channels.values()) {
      ch.since = ch.offset != null && ch.epoch != null ? { offset: ch.offset, epoch: ch.epoch } : null;
    }
  }

  _streamUrl(base, token, extra = {}) {
    const u = new URL(base, typeof location !== 'undefined' ? location.href : undefined);
    const params = [`channels=${q([...this._channels.keys()].join(','))}`];
    const since = this._positionToken();
    if (since) params.push(`since=${q(since)}`);
    for (const [k, v] of Object.entries(extra)) params.push(`${k}=${q(String(v))}`);
    if (token) params.push(`token=${q(token)}`);
    u.search = `?${params.join('&')}`;
    return u.toString();
  }

  _request(cmd) {
    const s = this._session;
    if (!s || !s.opened || s.kind !== 'websocket') {
      return Promise.reject(new RingcastError(0, `${cmd.cmd} needs an open WebSocket connection`));
    }
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject });
      s.send({ ...cmd, id });
    });
  }

  // ---- WebSocket ----------------------------------------------------------------------

  _openWebSocket(gen, token) {
    const u = new URL(this.url, typeof location !== 'undefined' ? location.href : undefined);
    if (token) u.searchParams.set('token', token);
    const session = { kind: 'websocket', opened: false, openedAt: 0, ws: null };
    let ws;
    try {
      ws = new WebSocket(u.toString());
    } catch (err) {
      this._emit('error', new RingcastError(0, `WebSocket: ${err && err.message}`));
      setTimeout(() => this._ended(gen, { opened: false, transport: 'websocket' }));
      return;
    }
    session.ws = ws;
    session.send = (obj) => ws.send(JSON.stringify(obj));
    session.close = () => {
      clearTimeout(timer);
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    };
    this._session = session;
    const timer = setTimeout(() => {
      if (!session.opened) ws.close(); // a handshake that hangs counts as a failure
    }, this.connectTimeout);
    ws.onopen = () => {
      if (gen !== this._gen) return;
      clearTimeout(timer);
      this._opened(gen, session);
      for (const name of this._channels.keys()) this._sendSubscribe(name);
    };
    ws.onmessage = (ev) => {
      if (gen !== this._gen) return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      this._onEvent(msg, session);
    };
    ws.onclose = (ev) => {
      clearTimeout(timer);
      this._ended(gen, {
        opened: session.opened,
        openedAt: session.openedAt,
        code: ev.code,
        reason: ev.reason,
        transport: 'websocket',
      });
    };
    ws.onerror = () => {}; // a close event follows with what can be known
  }

  _sendSubscribe(name) {
    const ch = this._channels.get(name);
    const cmd = { cmd: 'subscribe', channel: name };
    ch.since = ch.offset != null && ch.epoch != null ? { offset: ch.offset, epoch: ch.epoch } : null;
    if (ch.since) cmd.since = ch.since;
    this._request(cmd).catch(() => {}); // the reply is handled by _onSubscribeReply
  }

  // ---- Server-Sent Events (read with fetch, so the status and Retry-After are visible) ----

  _openSse(gen, token) {
    const ctrl = new AbortController();
    const session = { kind: 'sse', opened: false, openedAt: 0, serverClose: null };
    session.close = () => ctrl.abort();
    this._session = session;
    this._markSince();
    const url = this._streamUrl(this.sseUrl, token);
    let idle = setTimeout(() => ctrl.abort(), this.connectTimeout);
    const touch = () => {
      clearTimeout(idle);
      idle = setTimeout(() => ctrl.abort(), this.idleTimeout);
    };
    const end = (extra) => {
      clearTimeout(idle);
      const sc = session.serverClose;
      this._ended(gen, {
        opened: session.opened,
        openedAt: session.openedAt,
        transport: 'sse',
        ...(sc ? { code: sc.code, reason: sc.reason } : {}),
        ...extra,
      });
    };
    this._fetchOk(url, ctrl, 'text/event-stream')
      .then(async (res) => {
        if (gen !== this._gen) return;
        touch();
        this._opened(gen, session);
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        let data = [];
        for (;;) {
          const { value, done } = await reader.read();
          if (gen !== this._gen) return;
          if (done) break;
          touch();
          buf += decoder.decode(value, { stream: true });
          let nl;
          while ((nl = buf.indexOf('\n')) >= 0) {
            let line = buf.slice(0, nl);
            buf = buf.slice(nl + 1);
            if (line.endsWith('\r')) line = line.slice(0, -1);
            if (line === '') {
              if (data.length) {
                let msg;
                try {
                  msg = JSON.parse(data.join('\n'));
                } catch {
                  msg = null;
                }
                data = [];
                if (msg) this._onEvent(msg, session);
                if (gen !== this._gen) return;
              }
            } else if (line.startsWith('data:')) {
              data.push(line.slice(line.startsWith('data: ') ? 6 : 5));
            }
            // `id:` (we keep positions per channel ourselves), `retry:`, comments: nothing to do.
          }
        }
        end({});
      })
      .catch((err) => {
        if (gen !== this._gen) return;
        end({ status: err.code || undefined, retryAfter: err.retryAfter ?? undefined });
      });
  }

  async _fetchOk(url, ctrl, accept) {
    const res = await fetch(url, {
      signal: ctrl.signal,
      cache: 'no-store',
      credentials: this.withCredentials ? 'include' : 'same-origin',
      headers: { Accept: accept },
    });
    if (res.ok) return res;
    const body = (await res.text().catch(() => '')).trim();
    const err = new RingcastError(res.status, `${res.status}: ${body}`, { retryAfter: retryAfterMs(res) });
    if (res.status === 401 && this._getToken) this._token = null;
    this._emit('error', err);
    throw err;
  }

  // ---- long-poll ----------------------------------------------------------------------

  _openPoll(gen, token) {
    const session = { kind: 'poll', opened: false, openedAt: 0, serverClose: null, ctrl: null };
    session.close = () => session.ctrl && session.ctrl.abort();
    this._session = session;
    const loop = async () => {
      for (;;) {
        this._markSince();
        const ctrl = new AbortController();
        session.ctrl = ctrl;
        // The first request of a session holds for 1 s at most, so 'connected' is known soon.
        const hold = session.opened ? this.pollTimeout : 1;
        const timer = setTimeout(() => ctrl.abort(), hold * 1000 + this.connectTimeout);
        let body;
        try {
          const url = this._streamUrl(this.pollUrl, this._token || token, { timeout: hold });
          const res = await this._fetchOk(url, ctrl, 'application/json');
          body = await res.json();
        } finally {
          clearTimeout(timer);
        }
        if (gen !== this._gen) return;
        if (!session.opened) this._opened(gen, session);
        for (const ev of body.events || []) {
          this._onEvent(ev, session);
          if (gen !== this._gen) return;
        }
        this._applyPosition(body.position);
        if (session.serverClose) {
          this._ended(gen, {
            opened: true,
            openedAt: session.openedAt,
            transport: 'poll',
            code: session.serverClose.code,
            reason: session.serverClose.reason,
          });
          return;
        }
      }
    };
    loop().catch((err) => {
      if (gen !== this._gen) return;
      this._ended(gen, {
        opened: session.opened,
        openedAt: session.openedAt,
        transport: 'poll',
        status: err.code || undefined,
        retryAfter: err.retryAfter ?? undefined,
      });
    });
  }

  /** Takes the position token a poll answered with (only moves forward in one epoch). */
  _applyPosition(token) {
    if (typeof token !== 'string' || !token) return;
    for (const entry of token.split(',')) {
      const [name, off, epoch] = entry.split('~');
      const ch = this._channels.get(name);
      const offset = Number(off);
      if (!ch || !Number.isSafeInteger(offset) || !epoch) continue;
      if (ch.epoch !== epoch || ch.offset == null || offset > ch.offset) {
        ch.offset = offset;
        ch.epoch = epoch;
      }
    }
  }
}

export default Ringcast;
