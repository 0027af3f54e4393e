#!/usr/bin/env node
// A real-browser-like subscriber fleet for ringcast's end-to-end tests, built on the `ws`
// package (the WebSocket client most Node services use).
//
//   node node_sub.js --url ws://127.0.0.1:8080/ws?channels=a,b \
//                    --subscribers 100 --messages 60 --timeout 30
//
// Opens K connections to URL, waits until each one has received M messages, and checks
// every message against docs/protocol.md: a JSON text frame with `channel`, `offset`,
// `data`, the channel one the URL subscribed to, offsets starting anywhere but then
// growing by exactly 1 per channel (no gap, no duplicate, no reordering).
//
// stdout carries two JSON lines:
//   {"event":"ready","client":"node","connected":K}   once every connection is open
//   {"event":"summary","client":"node",...,"ok":true}  at the end (see summarize())
// Exit status 0 when every subscriber got M messages with no error, 1 otherwise, 2 when
// the arguments or the environment are wrong.
'use strict';

function die(message) {
  process.stderr.write(`node_sub.js: ${message}\n`);
  process.exit(2);
}

let WebSocket;
try {
  WebSocket = require('ws');
} catch (err) {
  die(
    "the 'ws' package is not installed next to this script; " +
      'run `npm install --no-audit --no-fund` in tests/clients (scripts/test.sh does)'
  );
}

function parseArgs(argv) {
  const args = { subscribers: 1, messages: 1, timeout: 30 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i];
    const value = argv[i + 1];
    if (value === undefined) die(`missing value after ${key}`);
    switch (key) {
      case '--url':
        args.url = value;
        break;
      case '--subscribers':
        args.subscribers = Number.parseInt(value, 10);
        break;
      case '--messages':
        args.messages = Number.parseInt(value, 10);
        break;
      case '--timeout':
        args.timeout = Number.parseFloat(value);
        break;
      default:
        die(`unknown argument ${key}`);
    }
  }
  if (!args.url) die('--url is required');
  for (const key of ['subscribers', 'messages', 'timeout']) {
    if (!(args[key] > 0)) die(`--${key} must be a positive number`);
  }
  return args;
}

function channelsOf(url) {
  const list = new URL(url).searchParams.get('channels');
  return new Set(list ? list.split(',') : []);
}

const MAX_ERRORS = 20;

class Subscriber {
  constructor(index, expectedChannels) {
    this.index = index;
    this.expectedChannels = expectedChannels;
    this.received = 0;
    this.perChannel = new Map(); // channel -> {first, last, count}
    this.done = false;
  }

  check(raw, isBinary, errors) {
    const where = `subscriber ${this.index}`;
    if (isBinary) {
      errors.push(`${where}: got a binary frame, expected text`);
      return;
    }
    let msg;
    try {
      msg = JSON.parse(raw.toString('utf8'));
    } catch (err) {
      errors.push(`${where}: frame is not JSON: ${raw.toString('utf8').slice(0, 120)}`);
      return;
    }
    if (msg.reply !== undefined) return; // a command reply, not a message
    const { channel, offset } = msg;
    if (typeof channel !== 'string' || !Number.isInteger(offset) || !('data' in msg)) {
      errors.push(`${where}: not a message frame: ${JSON.stringify(msg).slice(0, 120)}`);
      return;
    }
    if (this.expectedChannels.size > 0 && !this.expectedChannels.has(channel)) {
      errors.push(`${where}: message for unsubscribed channel ${channel}`);
    }
    const seen = this.perChannel.get(channel);
    if (seen === undefined) {
      this.perChannel.set(channel, { first: offset, last: offset, count: 1 });
    } else {
      if (offset !== seen.last + 1) {
        const kind = offset <= seen.last ? 'duplicate or reordered' : 'gap';
        errors.push(`${where}: ${channel} offset ${offset} after ${seen.last} (${kind})`);
      }
      seen.last = Math.max(seen.last, offset);
      seen.count += 1;
    }
    this.received += 1;
  }
}

function summarize(args, subscribers, errors, connected) {
  const channels = {};
  const firstOffset = {};
  const lastOffset = {};
  for (const sub of subscribers) {
    for (const [name, s] of sub.perChannel) {
      const c = channels[name];
      if (c === undefined) {
        channels[name] = {
          subscribers: 1,
          first_min: s.first,
          first_max: s.first,
          last_min: s.last,
          last_max: s.last,
          count_min: s.count,
          count_max: s.count,
        };
      } else {
        c.subscribers += 1;
        c.first_min = Math.min(c.first_min, s.first);
        c.first_max = Math.max(c.first_max, s.first);
        c.last_min = Math.min(c.last_min, s.last);
        c.last_max = Math.max(c.last_max, s.last);
        c.count_min = Math.min(c.count_min, s.count);
        c.count_max = Math.max(c.count_max, s.count);
      }
      firstOffset[name] = channels[name].first_min;
      lastOffset[name] = channels[name].last_max;
    }
  }
  const counts = subscribers.map((s) => s.received);
  const complete = subscribers.filter((s) => s.received >= args.messages).length;
  return {
    event: 'summary',
    client: 'node',
    subscribers: args.subscribers,
    connected,
    complete,
    received_total: counts.reduce((a, b) => a + b, 0),
    received_min: counts.length ? Math.min(...counts) : 0,
    received_max: counts.length ? Math.max(...counts) : 0,
    first_offset: firstOffset,
    last_offset: lastOffset,
    channels,
    errors: errors.slice(0, MAX_ERRORS),
    error_count: errors.length,
    ok: errors.length === 0 && complete === args.subscribers,
  };
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const expectedChannels = channelsOf(args.url);
  const errors = [];
  const subscribers = [];
  const sockets = [];
  let connected = 0;
  let finished = 0;
  let ended = false;

  const finish = (why) => {
    if (ended) return;
    ended = true;
    if (why) errors.unshift(why);
    const summary = summarize(args, subscribers, errors, connected);
    for (const ws of sockets) ws.terminate();
    process.stdout.write(`${JSON.stringify(summary)}\n`, () => process.exit(summary.ok ? 0 : 1));
  };

  const timer = setTimeout(() => {
    const waiting = subscribers.filter((s) => !s.done).length;
    finish(`timeout after ${args.timeout}s: ${waiting} subscriber(s) still waiting`);
  }, args.timeout * 1000);

  for (let i = 0; i < args.subscribers; i += 1) {
    const sub = new Subscriber(i, expectedChannels);
    subscribers.push(sub);
    const ws = new WebSocket(args.url, { perMessageDeflate: false, handshakeTimeout: 10000 });
    sockets.push(ws);
    ws.on('open', () => {
      connected += 1;
      if (connected === args.subscribers) {
        process.stdout.write(
          `${JSON.stringify({ event: 'ready', client: 'node', connected })}\n`
        );
      }
    });
    ws.on('message', (raw, isBinary) => {
      if (sub.done) return;
      sub.check(raw, isBinary, errors);
      if (sub.received >= args.messages) {
        sub.done = true;
        finished += 1;
        if (finished === args.subscribers) {
          clearTimeout(timer);
          finish(null);
        }
      }
    });
    ws.on('error', (err) => {
      if (!sub.done) errors.push(`subscriber ${i}: ${err.message}`);
    });
    ws.on('close', (code, reason) => {
      if (!sub.done && !ended) {
        errors.push(`subscriber ${i}: closed early with ${code} ${reason.toString()}`);
        sub.done = true;
        finished += 1;
        if (finished === args.subscribers) {
          clearTimeout(timer);
          finish(null);
        }
      }
    });
  }
}

main();
