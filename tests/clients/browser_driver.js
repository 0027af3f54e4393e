#!/usr/bin/env node
// Drives a real headless Chromium (Debian's /usr/bin/chromium, through playwright-core)
// for ringcast's browser tests (tests/e2e/browser_client_*.rs, tests/e2e/common/browser.rs).
//
//   node browser_driver.js
//
// It serves clients/js/ at http://127.0.0.1:<port>/ and tests/clients/ at /test/ from a
// tiny static HTTP server (node's http module), launches the browser, prints
//   {"event":"ready","base":"http://127.0.0.1:<port>/","chromium":"<version>"}
// and then answers one JSON command per stdin line with one JSON line on stdout:
//   {"id":1,"cmd":"open","path":"test/browser_harness.html?url=..."}  → {"id":1,"ok":true}
//   {"id":2,"cmd":"eval","expr":"window.log.messages.length"}        → {"id":2,"ok":true,"value":3}
//   {"id":3,"cmd":"wait","expr":"...","timeout":10000}               → value of expr once truthy
//   {"id":4,"cmd":"screenshot","path":"/abs/file.png"}
//   {"id":5,"cmd":"sign","secret":"...","claims":{...}}                → an HS256 JWT (node crypto)
//   {"id":6,"cmd":"errors"}                                            → uncaught page errors
//   {"id":7,"cmd":"quit"}
// A failed command answers {"id":n,"ok":false,"error":"..."}. Browser console lines go to
// stderr. Exit status 2 when playwright-core or chromium is missing. The browser is
// /usr/bin/chromium (Debian's), or $RINGCAST_CHROMIUM.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const path = require('path');
const readline = require('readline');

const CHROMIUM = process.env.RINGCAST_CHROMIUM || '/usr/bin/chromium';
const ROOT = path.resolve(__dirname, '..', '..');
const MOUNTS = [
  ['/test/', path.join(ROOT, 'tests', 'clients')],
  ['/', path.join(ROOT, 'clients', 'js')],
];
const TYPES = {
  '.js': 'text/javascript; charset=utf-8',
  '.html': 'text/html; charset=utf-8',
  '.ts': 'text/plain; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.png': 'image/png',
};

function die(message) {
  process.stderr.write(`browser_driver.js: ${message}\n`);
  process.exit(2);
}

let chromium;
try {
  ({ chromium } = require('playwright-core'));
} catch (err) {
  die(
    "the 'playwright-core' package is not installed in tests/clients; run " +
      '`npm install --no-audit --no-fund` there (scripts/test.sh does)'
  );
}
if (!fs.existsSync(CHROMIUM)) {
  die(`${CHROMIUM} does not exist; install Debian's chromium (apt-get install chromium; scripts/test.sh does)`);
}

function serveStatic() {
  const server = http.createServer((req, res) => {
    const pathname = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    for (const [prefix, dir] of MOUNTS) {
      if (!pathname.startsWith(prefix)) continue;
      const file = path.join(dir, pathname.slice(prefix.length));
      if (!file.startsWith(dir + path.sep)) break;
      fs.readFile(file, (err, body) => {
        if (err) {
          res.writeHead(404, { 'Content-Type': 'text/plain' });
          res.end(`not found: ${pathname}\n`);
          return;
        }
        res.writeHead(200, {
          'Content-Type': TYPES[path.extname(file)] || 'application/octet-stream',
          'Cache-Control': 'no-store',
        });
        res.end(body);
      });
      return;
    }
    res.writeHead(404, { 'Content-Type': 'text/plain' });
    res.end(`not found: ${pathname}\n`);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

function b64url(buf) {
  return Buffer.from(buf).toString('base64').replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
}

function signHs256(secret, claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest();
  return `${head}.${body}.${b64url(sig)}`;
}

async function main() {
  const server = await serveStatic();
  const base = `http://127.0.0.1:${server.address().port}/`;
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  let page = null;
  const pageErrors = [];

  const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
  const shutdown = async (code) => {
    await browser.close().catch(() => {});
    server.close();
    process.exit(code);
  };

  const handlers = {
    async open({ path: target }) {
      if (page) await page.close();
      page = await context.newPage();
      page.on('console', (m) => process.stderr.write(`[page ${m.type()}] ${m.text()}\n`));
      page.on('pageerror', (e) => {
        pageErrors.push(String(e && e.stack ? e.stack : e));
        process.stderr.write(`[page error] ${e}\n`);
      });
      await page.goto(new URL(target, base).toString(), { waitUntil: 'load' });
      return null;
    },
    async eval({ expr }) {
      return page.evaluate(expr);
    },
    async wait({ expr, timeout }) {
      try {
        await page.waitForFunction(expr, null, { timeout: timeout || 10000, polling: 50 });
      } catch (err) {
        const now = await page.evaluate('JSON.stringify(window.log ?? null)').catch((e) => String(e));
        throw new Error(`${expr} not true within ${timeout} ms (${err.message.split('\n')[0]}); window.log = ${now}`);
      }
      return page.evaluate(expr);
    },
    async screenshot({ path: file }) {
      fs.mkdirSync(path.dirname(file), { recursive: true });
      await page.screenshot({ path: file, fullPage: true });
      return file;
    },
    async sign({ secret, claims }) {
      return signHs256(secret, claims);
    },
    async errors() {
      return pageErrors;
    },
    async quit() {
      out({ id: this.id, ok: true, value: null });
      await shutdown(0);
    },
  };

  out({ event: 'ready', base, chromium: browser.version() });
  const rl = readline.createInterface({ input: process.stdin });
  let queue = Promise.resolve();
  rl.on('line', (line) => {
    queue = queue.then(async () => {
      let req;
      try {
        req = JSON.parse(line);
      } catch (err) {
        out({ ok: false, error: `not JSON: ${line}` });
        return;
      }
      const handler = handlers[req.cmd];
      if (!handler) {
        out({ id: req.id, ok: false, error: `unknown cmd ${req.cmd}` });
        return;
      }
      try {
        const value = await handler.call(req, req);
        out({ id: req.id, ok: true, value: value === undefined ? null : value });
      } catch (err) {
        out({ id: req.id, ok: false, error: String(err && err.message ? err.message : err) });
      }
    });
  });
  rl.on('close', () => queue.then(() => shutdown(0)));
}

main().catch((err) => die(String(err && err.stack ? err.stack : err)));
