#!/usr/bin/env node
// An SSE client of ringcast built on the npm `eventsource` package (the WHATWG
// EventSource for Node): it reconnects on its own, with the Last-Event-ID it kept, after
// the server ends the stream or cannot be reached, as a browser's EventSource does.
//
//   node node_eventsource.js --url http://127.0.0.1:8080/sse?channels=a,b \
//        [--secret S --sub alice --ttl 600] [--timeout 120]
//
// With --secret and --sub it signs an HS256 token itself (node's crypto, not ringcast's
// code) and adds it as ?token=. It prints one JSON line per thing it sees, for the test
// to judge: {"event":"open"}, {"event":"message","id":<lastEventId>,"data":<parsed
// JSON>}, {"event":"error","message":..,"code":..,"readyState":..}. It exits 0 when its
// stdin closes (the test is done with it), 1 when the EventSource gives up for good
// (readyState CLOSED) or --timeout passes, 2 when the package is missing.
'use strict';

const crypto = require('crypto');

let EventSource;
try {
  ({ EventSource } = require('eventsource'));
} catch (e) {
  process.stderr.write(
    `node_eventsource.js: cannot load the eventsource package (${e.message}); ` +
      'run `npm install` in tests/clients (scripts/test.sh does)\n'
  );
  process.exit(2);
}

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

function b64url(buf) {
  return Buffer.from(buf).toString('base64').replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
}

function sign(secret, sub, ttl) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ sub, iat: now, exp: now + ttl }));
  const mac = crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest();
  return `${head}.${body}.${b64url(mac)}`;
}

function out(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

let url = arg('url');
if (!url) {
  process.stderr.write('node_eventsource.js: --url is required\n');
  process.exit(2);
}
if (arg('secret')) {
  const token = sign(arg('secret'), arg('sub'), Number(arg('ttl', '600')));
  url += `${url.includes('?') ? '&' : '?'}token=${encodeURIComponent(token)}`;
}

const es = new EventSource(url);
es.onopen = () => out({ event: 'open' });
es.onmessage = (ev) => {
  let data;
  try {
    data = JSON.parse(ev.data);
  } catch (e) {
    data = { unparsable: ev.data };
  }
  out({ event: 'message', id: ev.lastEventId, data });
};
es.onerror = (err) => {
  out({ event: 'error', message: err && err.message, code: err && err.code, readyState: es.readyState });
  if (es.readyState === es.CLOSED) {
    process.exitCode = 1;
    process.exit(1);
  }
};

const timer = setTimeout(() => {
  out({ event: 'timeout' });
  process.exit(1);
}, Number(arg('timeout', '120')) * 1000);

process.stdin.on('end', () => {
  clearTimeout(timer);
  es.close();
  process.exit(0);
});
process.stdin.resume();
