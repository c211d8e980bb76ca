"use strict";
// Socket.IO 4 + @socket.io/redis-adapter peer for the Switchyard benchmarks (issue 4).
// One instance per process; run.sh starts several sharing one Redis.
//
// Env: PORT (default 3101), REDIS_URL (default redis://127.0.0.1:6379),
//      NODE_ID (label for logs, default "sio-<PORT>"), HOST (default 0.0.0.0),
//      SIO_PING_INTERVAL / SIO_PING_TIMEOUT (ms; unset = Socket.IO defaults 25000 / 20000,
//      only check.mjs shortens them to exercise the 2/3 heartbeat quickly).
//
// Protocol (see ../README.md): websocket transport only,
//   /socket.io/?EIO=4&transport=websocket&user=<id>
//   42["join","<room>"]                 -> join room, reply 42["joined","<room>"]
//   42["publish",{"room":r,"body":b}]   -> 42["message",{"room":r,"from":user,"body":b}]
//                                          to every member on every instance but the sender
//   42["send",{"to":u,"body":b}]        -> 42["message",{"to":u,"from":user,"body":b}]
//                                          to every socket of user u on every instance

const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const PORT = parseInt(process.env.PORT || "3101", 10);
const HOST = process.env.HOST || "0.0.0.0";
const REDIS_URL = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const NODE_ID = process.env.NODE_ID || `sio-${PORT}`;

function log(...args) {
  console.log(`[${new Date().toISOString()}] [${NODE_ID}]`, ...args);
}

async function main() {
  // node-redis 4.x has no per-command timeout. If this is ever bumped to node-redis >= 6,
  // add `commandOptions: { timeout: undefined }` here (v6 defaults to 5000 ms, and a timed-out
  // command under load takes the adapter down) — see ../README.md.
  const pubClient = createClient({ url: REDIS_URL });
  const subClient = pubClient.duplicate();
  // Without 'error' listeners node-redis errors are thrown as uncaught exceptions.
  pubClient.on("error", (err) => log("redis pub error:", err.message));
  subClient.on("error", (err) => log("redis sub error:", err.message));
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer((req, res) => {
    res.writeHead(404);
    res.end();
  });

  const opts = {
    transports: ["websocket"], // no long-polling; clients open the websocket directly
    allowUpgrades: false,
    perMessageDeflate: false, // the Rust client does not negotiate permessage-deflate
    httpCompression: false,
    serveClient: false,
    adapter: createAdapter(pubClient, subClient),
  };
  if (process.env.SIO_PING_INTERVAL) opts.pingInterval = parseInt(process.env.SIO_PING_INTERVAL, 10);
  if (process.env.SIO_PING_TIMEOUT) opts.pingTimeout = parseInt(process.env.SIO_PING_TIMEOUT, 10);
  const io = new Server(httpServer, opts);

  io.on("connection", (socket) => {
    const user = String(socket.handshake.query.user ?? socket.id);
    socket.join("user:" + user);

    socket.on("join", (room) => {
      room = String(room);
      socket.join(room);
      socket.emit("joined", room);
    });

    socket.on("publish", (msg) => {
      if (!msg || msg.room == null) return;
      const room = String(msg.room);
      socket.to(room).emit("message", { room, from: user, body: msg.body });
    });

    socket.on("send", (msg) => {
      if (!msg || msg.to == null) return;
      const to = String(msg.to);
      io.to("user:" + to).emit("message", { to, from: user, body: msg.body });
    });
  });

  // Wait until the adapter's Redis subscriptions are live, so that a client accepted right
  // after "listening" cannot miss a broadcast from another instance. The adapter issues
  // PSUBSCRIBE then SUBSCRIBE in its constructor; once its private response channel counts
  // a subscriber, both are in effect.
  const adapter = io.of("/").adapter;
  for (let i = 0; ; i++) {
    const n = await pubClient.pubSubNumSub(adapter.specificResponseChannel);
    if (n[adapter.specificResponseChannel] > 0) break;
    if (i > 500) throw new Error("redis adapter subscriptions not active after 5 s");
    await new Promise((r) => setTimeout(r, 10));
  }

  httpServer.listen(PORT, HOST, 4096, () => {
    log(`listening on ${HOST}:${PORT} pid=${process.pid} redis=${REDIS_URL}`);
  });

  let stopping = false;
  const stop = (sig) => {
    if (stopping) return;
    stopping = true;
    log(`${sig}: shutting down`);
    const force = setTimeout(() => process.exit(0), 2000);
    force.unref();
    io.close(() => {
      Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
    });
  };
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
}

main().catch((err) => {
  log("fatal:", err && err.stack ? err.stack : err);
  process.exit(1);
});
