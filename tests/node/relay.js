// A WebSocket client on Node's `ws` package, driven over stdin/stdout by
// tests/test_websocket_node.py.
//
//   node relay.js <ws-url> [<headers as a JSON object>]
//
// Every line on stdin is one command (JSON):
//   {"text": <object>}                 send the object as JSON in a text frame
//   {"text": "<string>"}               send the string as it is in a text frame
//   {"raw_text": "<base64>"}           send these bytes in a text frame (no UTF-8 check)
//   {"binary": <object>, "data": "<base64>"}
//                                      a binary frame: the JSON, a newline, the raw data
//   {"raw_binary": "<base64>"}         send these bytes in a binary frame
//   {"close": <code>}                  start a close handshake
//   {"pause": true}, {"resume": true}  stop and restart reading from the socket
//
// Every line on stdout is one thing that happened (JSON):
//   {"kind": "open"}
//   {"kind": "text", "message": <the JSON message>}
//   {"kind": "binary", "message": <the JSON part>, "data": "<base64 of the rest>"}
//   {"kind": "refused", "status": <HTTP status>, "headers": {...}, "body": "<response body>"}
//   {"kind": "error", "message": "<what ws reported>"}
//   {"kind": "close", "code": <code>, "reason": "<reason>"}     (then the process exits)
"use strict";

const readline = require("node:readline");
const WebSocket = require("ws");

const [url, headers] = process.argv.slice(2);
const ws = new WebSocket(url, { headers: headers ? JSON.parse(headers) : {} });

function print(what) {
  process.stdout.write(JSON.stringify(what) + "\n");
}

ws.on("open", () => print({ kind: "open" }));

ws.on("unexpected-response", (request, response) => {
  const chunks = [];
  response.on("data", (chunk) => chunks.push(chunk));
  response.on("end", () => {
    const body = Buffer.concat(chunks).toString("utf8");
    print({ kind: "refused", status: response.statusCode, headers: response.headers, body });
    process.stdout.write("", () => process.exit(0));
  });
});

ws.on("message", (data, isBinary) => {
  if (!isBinary) {
    print({ kind: "text", message: JSON.parse(data.toString("utf8")) });
    return;
  }
  // docs/websocket.md: the JSON part ends at the first newline byte; the rest is the data.
  const newline = data.indexOf(0x0a);
  if (newline < 0) {
    print({ kind: "error", message: "a binary frame without a newline" });
    return;
  }
  const message = JSON.parse(data.subarray(0, newline).toString("utf8"));
  print({ kind: "binary", message, data: data.subarray(newline + 1).toString("base64") });
});

ws.on("error", (error) => print({ kind: "error", message: error.message }));

ws.on("close", (code, reason) => {
  print({ kind: "close", code, reason: reason.toString("utf8") });
  process.stdout.write("", () => process.exit(0));
});

function run(command) {
  if ("text" in command) {
    const text = command.text;
    ws.send(typeof text === "string" ? text : JSON.stringify(text));
  } else if ("raw_text" in command) {
    ws.send(Buffer.from(command.raw_text, "base64"), { binary: false });
  } else if ("binary" in command) {
    const head = Buffer.from(JSON.stringify(command.binary) + "\n", "utf8");
    ws.send(Buffer.concat([head, Buffer.from(command.data, "base64")]), { binary: true });
  } else if ("raw_binary" in command) {
    ws.send(Buffer.from(command.raw_binary, "base64"), { binary: true });
  } else if ("close" in command) {
    ws.close(command.close);
  } else if ("pause" in command) {
    ws.pause(); // stop reading the socket: the server's writes pile up
  } else if ("resume" in command) {
    ws.resume();
  } else {
    throw new Error("unknown command");
  }
}

readline
  .createInterface({ input: process.stdin })
  .on("line", (line) => {
    try {
      run(JSON.parse(line));
    } catch (error) {
      print({ kind: "error", message: `${line}: ${error.message}` });
    }
  })
  .on("close", () => ws.close()); // stdin ended: the test is done with this client
