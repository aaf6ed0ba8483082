// Baseline for the WebSocket benchmarks: Node's `ws` broadcasting to every subscriber.
//
//     node benchmarks/node/server.js PORT
//
// Started by run.py pinned to the server core like tidings. The `ws` README's broadcast idiom
// and nothing else: no history, no durability, no envelope, no per-subscriber queue.
//
// - /sub: a subscriber. It joins the set, then gets one welcome message so the load generator
//   knows it is in the set before anything is published.
// - /pub: a publisher. Every message it sends goes to every subscriber as received (same bytes,
//   same frame type) with `client.send`.
// - GET /healthz: {"status": "ok", "subscribers": N} for the runner.
//
// No permessage-deflate (tidings has none by default); ws's optional native add-ons
// (bufferutil, utf-8-validate) are not installed.
"use strict";

const http = require("node:http");
const { WebSocketServer } = require("ws");

const port = Number(process.argv[2]);
const WELCOME = '{"op":"subscribed"}';
const subscribers = new Set();

const server = http.createServer((req, res) => {
  if (req.url === "/healthz") {
    const body = JSON.stringify({ status: "ok", subscribers: subscribers.size });
    res.writeHead(200, {
      "content-type": "application/json",
      "content-length": Buffer.byteLength(body),
    });
    res.end(body);
  } else {
    res.writeHead(404, { "content-length": 0 });
    res.end();
  }
});

const wss = new WebSocketServer({ server, perMessageDeflate: false, clientTracking: false });

wss.on("connection", (ws, req) => {
  if (req.url === "/pub") {
    ws.on("message", (data, isBinary) => {
      for (const client of subscribers) {
        client.send(data, { binary: isBinary });
      }
    });
    return;
  }
  subscribers.add(ws);
  ws.on("close", () => subscribers.delete(ws));
  ws.on("error", () => subscribers.delete(ws));
  ws.send(WELCOME);
});

server.listen(port, "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));
