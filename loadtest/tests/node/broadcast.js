// Independent WebSocket broadcast server for the ringcast-load tests, built on the `ws`
// package. Every text or binary message a client sends is rebroadcast to all *other*
// connected clients; a UDP ingest is offered too, where each datagram `<channel> <payload>`
// is broadcast (payload only) to every client.
//
// Usage: node broadcast.js <ws-port> [udp-port]
// Prints `node-broadcast ready ws=<port> udp=<port>` on stderr once both are listening.
'use strict';

const dgram = require('dgram');
const { WebSocketServer, WebSocket } = require('ws');

const wsPort = Number(process.argv[2] || 8082);
const udpPort = Number(process.argv[3] || 0);

const wss = new WebSocketServer({ host: '127.0.0.1', port: wsPort, perMessageDeflate: false });

function broadcast(data, isBinary, except) {
  for (const client of wss.clients) {
    if (client !== except && client.readyState === WebSocket.OPEN) {
      client.send(data, { binary: isBinary });
    }
  }
}

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => broadcast(data, isBinary, ws));
  ws.on('error', () => {});
});

const udp = dgram.createSocket('udp4');
udp.on('message', (msg) => {
  const space = msg.indexOf(0x20);
  if (space > 0) {
    broadcast(msg.subarray(space + 1).toString('utf8'), false, null);
  }
});

let pending = 2;
function ready() {
  pending -= 1;
  if (pending === 0) {
    process.stderr.write(`node-broadcast ready ws=${wss.address().port} udp=${udp.address().port}\n`);
  }
}
wss.on('listening', ready);
udp.bind(udpPort, '127.0.0.1', ready);

process.on('SIGTERM', () => process.exit(0));
