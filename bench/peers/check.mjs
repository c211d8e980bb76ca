// Self-check for the benchmark peers (issue 4). Starts a private redis-server on a free port,
// two instances of each peer on free ports, and drives them over raw WebSocket exactly as the
// Rust load generator will (Socket.IO: Engine.IO v4 framing by hand, no socket.io-client).
//
//   node bench/peers/check.mjs [socketio] [ws-relay] [socketioxide]     (default: all three)
//
// Needs `npm ci` done in bench/peers/socketio and bench/peers/ws-relay (ws is loaded from the
// latter), `redis-server` on PATH, and cargo for socketioxide (its build.sh builds the release
// binary if missing). `socketioxide` speaks the same Socket.IO protocol and gets the same
// assertions as `socketio`. Exits non-zero on the first failed assertion.

import { execFileSync, spawn } from "node:child_process";
import { createRequire } from "node:module";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(HERE, "ws-relay", "package.json"));
const WebSocket = require("ws");

const children = [];
let failed = false;

function log(...a) {
  console.log(...a);
}
function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}
function assert(cond, what) {
  if (!cond) throw new Error("assertion failed: " + what);
  log("  ok  " + what);
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function waitPort(port, child, what) {
  for (let i = 0; i < 150; i++) {
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`);
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, "127.0.0.1");
      s.on("connect", () => (s.destroy(), resolve(true)));
      s.on("error", () => resolve(false));
    });
    if (ok) return;
    await sleep(100);
  }
  throw new Error(`${what} not listening on ${port}`);
}

function start(cmd, args, opts, label) {
  const child = spawn(cmd, args, { ...opts, stdio: ["ignore", "pipe", "pipe"] });
  const prefix = (line) => line && log(`    [${label}] ${line}`);
  child.stdout.on("data", (d) => String(d).split("\n").forEach(prefix));
  child.stderr.on("data", (d) => String(d).split("\n").forEach(prefix));
  children.push(child);
  return child;
}

async function stopAll() {
  await Promise.all(
    children.map(
      (c) =>
        new Promise((resolve) => {
          if (c.exitCode !== null || c.signalCode !== null) return resolve();
          c.once("exit", resolve);
          c.kill("SIGTERM");
          setTimeout(() => c.kill("SIGKILL"), 3000).unref();
        }),
    ),
  );
}

// A WebSocket client that records every text frame and lets the test wait for one.
class Client {
  constructor(name, url) {
    this.name = name;
    this.frames = [];
    this.waiters = [];
    this.closed = false;
    this.ws = new WebSocket(url, { perMessageDeflate: false });
    this.ws.on("message", (data) => this.onFrame(String(data)));
    this.ws.on("close", () => (this.closed = true));
    this.opened = new Promise((resolve, reject) => {
      this.ws.once("open", resolve);
      this.ws.once("error", reject);
    });
  }
  onFrame(text) {
    this.frames.push(text);
    this.waiters = this.waiters.filter((w) => !w(text));
  }
  send(text) {
    this.ws.send(text);
  }
  // Resolve with the first frame (already received or future) for which pred(frame) is truthy.
  next(pred, what, ms = 3000) {
    const seen = this.frames.find(pred);
    if (seen !== undefined) {
      this.frames.splice(this.frames.indexOf(seen), 1);
      return Promise.resolve(seen);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name}: timed out waiting for ${what}`)), ms);
      this.waiters.push((f) => {
        if (!pred(f)) return false;
        clearTimeout(timer);
        this.frames.splice(this.frames.indexOf(f), 1);
        resolve(f);
        return true;
      });
    });
  }
  close() {
    this.ws.terminate();
  }
}

// ---- Socket.IO over raw WebSocket (Engine.IO v4 / Socket.IO v5 protocol) ----
//   server -> 0{"sid":..,"pingInterval":..}   open
//   client -> 40                                 connect to namespace "/"
//   server -> 40{"sid":..}                       connected
//   server -> 2 / client -> 3                    ping / pong (server-initiated in EIO4)
//   both   -> 42["event",payload]                event
class SioClient extends Client {
  constructor(name, port, user, { answerPings = true } = {}) {
    super(name, `ws://127.0.0.1:${port}/socket.io/?EIO=4&transport=websocket&user=${encodeURIComponent(user)}`);
    this.pings = 0;
    this.answerPings = answerPings;
  }
  onFrame(text) {
    if (text === "2") {
      this.pings++;
      if (this.answerPings) this.ws.send("3");
      return;
    }
    super.onFrame(text);
  }
  async connect() {
    await this.opened;
    const open = await this.next((f) => f[0] === "0", "EIO open packet");
    this.handshake = JSON.parse(open.slice(1));
    this.send("40");
    const ack = await this.next((f) => f.startsWith("40"), "40 connect ack");
    this.sid = JSON.parse(ack.slice(2) || "{}").sid;
  }
  emit(event, payload) {
    this.send("42" + JSON.stringify([event, payload]));
  }
  async event(name, pred = () => true, what = name) {
    const f = await this.next((f) => {
      if (!f.startsWith("42")) return false;
      const [ev, payload] = JSON.parse(f.slice(2));
      return ev === name && pred(payload);
    }, what);
    return JSON.parse(f.slice(2))[1];
  }
  events(name) {
    return this.frames.filter((f) => f.startsWith("42") && JSON.parse(f.slice(2))[0] === name);
  }
}

// ---- ws + Redis relay ----
class RelayClient extends Client {
  constructor(name, port, user) {
    super(name, `ws://127.0.0.1:${port}/?user=${encodeURIComponent(user)}`);
  }
  async connect() {
    await this.opened;
  }
  emit(type, fields) {
    this.send(JSON.stringify({ type, ...fields }));
  }
  async event(type, pred = () => true, what = type) {
    const f = await this.next((f) => {
      const m = JSON.parse(f);
      return m.type === type && pred(m);
    }, what);
    return JSON.parse(f);
  }
  events(type) {
    return this.frames.filter((f) => JSON.parse(f).type === type);
  }
}

// The same scenario for both peers: alice on node A; bob on nodes B and A (two sockets of one
// user); carol on node B, not in the room.
const SIO_KINDS = ["socketio", "socketioxide"];
const KINDS = ["socketio", "ws-relay", "socketioxide"];

async function scenario(kind, [portA, portB]) {
  const sio = SIO_KINDS.includes(kind);
  const mk = (name, port, user) => (sio ? new SioClient(name, port, user) : new RelayClient(name, port, user));
  const alice = mk("alice@A", portA, "alice");
  const bobB = mk("bob@B", portB, "bob");
  const bobA = mk("bob@A", portA, "bob");
  const carol = mk("carol@B", portB, "carol");
  const all = [alice, bobB, bobA, carol];
  try {
    await Promise.all(all.map((c) => c.connect()));
    assert(true, `${kind}: 4 clients connected (2 on :${portA}, 2 on :${portB})`);
    if (sio) {
      const h = alice.handshake;
      assert(
        Array.isArray(h.upgrades) && h.upgrades.length === 0 && h.pingInterval > 0 && h.pingTimeout > 0,
        `${kind}: open packet ${JSON.stringify(h)}`,
      );
      assert(typeof alice.sid === "string" && alice.sid.length > 0, `${kind}: 40 ack carries a sid`);
    }

    // join
    const join = (c, room) => (sio ? c.emit("join", room) : c.emit("join", { room }));
    join(alice, "r1");
    join(bobB, "r1");
    const ja = await alice.event("joined", (p) => (sio ? p === "r1" : p.room === "r1"), "joined r1");
    await bobB.event("joined", (p) => (sio ? p === "r1" : p.room === "r1"), "joined r1");
    assert(true, `${kind}: join answered with ${sio ? '42["joined","r1"]' : JSON.stringify(ja)}`);

    // room publish across nodes
    const body = { seq: 1, ts: Date.now(), text: "héllo ✓" };
    if (sio) alice.emit("publish", { room: "r1", body });
    else alice.emit("publish", { room: "r1", body });
    const got = await bobB.event("message", (m) => m.room === "r1", "room message");
    assert(
      JSON.stringify(got) === JSON.stringify({ ...(sio ? {} : { type: "message" }), room: "r1", from: "alice", body }),
      `${kind}: bob@B got room message from alice@A: ${JSON.stringify(got)}`,
    );

    // direct message across nodes, to every socket of the user
    const dbody = { seq: 2, ts: Date.now() };
    carol.emit("send", { to: "bob", body: dbody });
    const expectDirect = JSON.stringify({ ...(sio ? {} : { type: "message" }), to: "bob", from: "carol", body: dbody });
    const d1 = await bobA.event("message", (m) => m.to === "bob", "direct message");
    const d2 = await bobB.event("message", (m) => m.to === "bob", "direct message");
    assert(JSON.stringify(d1) === expectDirect, `${kind}: bob@A got direct message from carol@B: ${JSON.stringify(d1)}`);
    assert(JSON.stringify(d2) === expectDirect, `${kind}: bob@B (same user, other node) got it too`);

    // nothing leaked: no echo to the publisher, nothing to non-members
    await sleep(300);
    assert(alice.events("message").length === 0, `${kind}: publisher alice got no echo of her room message`);
    assert(carol.events("message").length === 0, `${kind}: carol (not in r1) got no room message`);
    assert(bobA.events("message").length === 0, `${kind}: bob@A (not in r1) got no room message`);
    assert(bobB.events("message").length === 0, `${kind}: bob@B got each message exactly once`);

    // a burst, to see ordering and no loss across nodes
    const N = 2000;
    for (let i = 0; i < N; i++) alice.emit("publish", { room: "r1", body: { i } });
    let last = -1;
    let inOrder = true;
    for (let i = 0; i < N; i++) {
      const m = await bobB.event("message", () => true, `burst message ${i}`);
      if (m.body.i !== last + 1) inOrder = false;
      last = m.body.i;
    }
    assert(inOrder && last === N - 1, `${kind}: burst of ${N} room messages arrived complete and in order`);

    if (sio) {
      // Heartbeat: this run uses pingInterval 500 ms / pingTimeout 500 ms. A client that answers
      // "2" with "3" stays connected; one that does not is dropped by the server.
      const mute = new SioClient("mute@A", portA, "mute", { answerPings: false });
      await mute.connect();
      await sleep(2500);
      assert(alice.pings >= 2 && !alice.closed, `${kind}: alice answered ${alice.pings} pings ("2" -> "3") and is still connected`);
      assert(mute.closed, `${kind}: a client that never answers pings is disconnected by the server`);
      alice.emit("publish", { room: "r1", body: "after-pings" });
      const m = await bobB.event("message", (m) => m.body === "after-pings", "message after pings");
      assert(m.from === "alice", `${kind}: messages still flow after the heartbeat period`);
      mute.close();
    }
  } finally {
    all.forEach((c) => c.close());
  }
}

async function main() {
  const which = process.argv.slice(2);
  const kinds = which.length ? which : KINDS;
  for (const k of kinds) if (!KINDS.includes(k)) throw new Error("unknown peer " + k);

  const redisPort = await freePort();
  const redis = spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning"], { stdio: "ignore" });
  children.push(redis);
  await waitPort(redisPort, redis, "redis-server");
  log(`private redis-server on 127.0.0.1:${redisPort}`);
  const REDIS_URL = `redis://127.0.0.1:${redisPort}`;

  for (const kind of kinds) {
    log(`\n== ${kind} ==`);
    const ports = [await freePort(), await freePort()];
    const procs = ports.map((port, i) => {
      const env = { ...process.env, PORT: String(port), REDIS_URL, NODE_ID: `${kind}-${i + 1}`, HOST: "127.0.0.1" };
      if (SIO_KINDS.includes(kind)) Object.assign(env, { SIO_PING_INTERVAL: "500", SIO_PING_TIMEOUT: "500" });
      if (kind === "socketioxide") {
        // build.sh builds the release binary if it is missing and prints its path.
        const bin = execFileSync(path.join(HERE, kind, "build.sh"), { stdio: ["ignore", "pipe", "inherit"] })
          .toString()
          .trim();
        return start(bin, [], { cwd: path.join(HERE, kind), env }, `${kind}-${i + 1}`);
      }
      return start("node", ["server.js"], { cwd: path.join(HERE, kind), env }, `${kind}-${i + 1}`);
    });
    await Promise.all(procs.map((p, i) => waitPort(ports[i], p, `${kind}-${i + 1}`)));
    await scenario(kind, ports);
    for (const p of procs) if (p.exitCode !== null) throw new Error(`${kind} instance exited early`);
  }
}

main()
  .catch((err) => {
    failed = true;
    console.error("FAIL:", err.message);
  })
  .finally(async () => {
    await stopAll();
    console.log(failed ? "\ncheck: FAILED" : "\ncheck: all passed");
    process.exit(failed ? 1 : 0);
  });
