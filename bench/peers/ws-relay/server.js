"use strict";
// The "seed design" peer for the Switchyard benchmarks (issue 4): Node `ws` + a Redis pub/sub
// relay, written the straightforward way a team would. Every instance subscribes to ONE Redis
// channel; every client message is published to it; every instance receives every message and
// forwards it to its local sockets that match (room members / sockets of the addressed user).
//
// Env: PORT (default 3201), REDIS_URL (default redis://127.0.0.1:6379),
//      NODE_ID (label for logs, default "relay-<PORT>"), HOST (default 0.0.0.0),
//      CHANNEL (Redis channel, default "ws-relay").
//
// Protocol (see ../README.md): ws://host:port/?user=<id>, text frames of JSON.
//   {"type":"join","room":"r"}            -> {"type":"joined","room":"r"}
//   {"type":"publish","room":"r","body":b} -> {"type":"message","room":"r","from":user,"body":b}
//                                            to every member on every instance but the sender
//   {"type":"send","to":"u","body":b}      -> {"type":"message","to":"u","from":user,"body":b}
//                                            to every socket of user u on every instance

const http = require("http");
const crypto = require("crypto");
const { WebSocketServer, WebSocket } = require("ws");
const { createClient } = require("redis");

const PORT = parseInt(process.env.PORT || "3201", 10);
const HOST = process.env.HOST || "0.0.0.0";
const REDIS_URL = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const NODE_ID = process.env.NODE_ID || `relay-${PORT}`;
const CHANNEL = process.env.CHANNEL || "ws-relay";

// Unique per process, so a socket id is unique across instances (used to skip the sender).
const INSTANCE = crypto.randomBytes(4).toString("hex");
let nextSocketId = 1;

function log(...args) {
  console.log(`[${new Date().toISOString()}] [${NODE_ID}]`, ...args);
}

// Local state of this instance.
const rooms = new Map(); // room -> Set<ws>
const users = new Map(); // user -> Set<ws>

function addTo(map, key, ws) {
  let set = map.get(key);
  if (!set) map.set(key, (set = new Set()));
  set.add(ws);
}

function removeFrom(map, key, ws) {
  const set = map.get(key);
  if (!set) return;
  set.delete(ws);
  if (set.size === 0) map.delete(key);
}

async function main() {
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  pub.on("error", (err) => log("redis pub error:", err.message));
  sub.on("error", (err) => log("redis sub error:", err.message));
  await Promise.all([pub.connect(), sub.connect()]);

  // Every instance receives every message published by any instance (including itself).
  await sub.subscribe(CHANNEL, (raw) => {
    let m;
    try {
      m = JSON.parse(raw);
    } catch {
      return;
    }
    if (m.room != null) {
      const members = rooms.get(m.room);
      if (!members) return;
      const data = JSON.stringify({ type: "message", room: m.room, from: m.from, body: m.body });
      for (const ws of members) {
        if (ws.id !== m.src && ws.readyState === WebSocket.OPEN) ws.send(data);
      }
    } else if (m.to != null) {
      const sockets = users.get(m.to);
      if (!sockets) return;
      const data = JSON.stringify({ type: "message", to: m.to, from: m.from, body: m.body });
      for (const ws of sockets) {
        if (ws.readyState === WebSocket.OPEN) ws.send(data);
      }
    }
  });

  const publish = (obj) => {
    pub.publish(CHANNEL, JSON.stringify(obj)).catch((err) => log("publish failed:", err.message));
  };

  const httpServer = http.createServer((req, res) => {
    res.writeHead(404);
    res.end();
  });
  const wss = new WebSocketServer({ server: httpServer, perMessageDeflate: false });

  wss.on("connection", (ws, req) => {
    const url = new URL(req.url, "http://localhost");
    ws.id = `${INSTANCE}:${nextSocketId++}`;
    ws.user = url.searchParams.get("user") ?? ws.id;
    ws.rooms = new Set();
    addTo(users, ws.user, ws);

    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      let m;
      try {
        m = JSON.parse(data.toString());
      } catch {
        return;
      }
      if (!m || typeof m !== "object") return;
      switch (m.type) {
        case "join": {
          if (m.room == null) return;
          const room = String(m.room);
          ws.rooms.add(room);
          addTo(rooms, room, ws);
          ws.send(JSON.stringify({ type: "joined", room }));
          break;
        }
        case "publish":
          if (m.room == null) return;
          publish({ room: String(m.room), from: ws.user, body: m.body, src: ws.id });
          break;
        case "send":
          if (m.to == null) return;
          publish({ to: String(m.to), from: ws.user, body: m.body });
          break;
      }
    });

    ws.on("close", () => {
      removeFrom(users, ws.user, ws);
      for (const room of ws.rooms) removeFrom(rooms, room, ws);
    });
    ws.on("error", () => {});
  });

  httpServer.listen(PORT, HOST, 4096, () => {
    log(`listening on ${HOST}:${PORT} pid=${process.pid} redis=${REDIS_URL} channel=${CHANNEL}`);
  });

  let stopping = false;
  const stop = (sig) => {
    if (stopping) return;
    stopping = true;
    log(`${sig}: shutting down`);
    const force = setTimeout(() => process.exit(0), 2000);
    force.unref();
    for (const ws of wss.clients) ws.terminate();
    wss.close();
    httpServer.close(() => {
      Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
    });
  };
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
}

main().catch((err) => {
  log("fatal:", err && err.stack ? err.stack : err);
  process.exit(1);
});
