// Helpers of the Node.js client scripts: checks that print one PASS/FAIL line each and a summary,
// an inbox to await what callbacks deliver, a @stomp/stompjs session with receipts awaited as
// promises, a client of the JSON protocol (PROTOCOL.md §3-4) over `ws`, and HS256 tokens.

import crypto from 'node:crypto';
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

// Node.js 20 has no global WebSocket; stompjs opens `brokerURL` with the global one, as it does
// in a browser. `ws` is the implementation stompjs documents for Node.js.
globalThis.WebSocket ??= WebSocket;

/** How long anything that must come is awaited. */
export const WAIT_MS = 5_000;

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function assert(cond, message) {
  if (!cond) throw new Error(message);
}

export function equal(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${what}: got ${a}, expected ${e}`);
}

/** Numbered checks: `PASS name` / `FAIL name: why`, then `LABEL: N passed, M failed`. */
export class Checks {
  constructor(label) {
    this.label = label;
    this.passed = 0;
    this.failed = 0;
  }

  async check(name, fn) {
    try {
      await fn();
      this.passed++;
      console.log(`PASS ${name}`);
    } catch (err) {
      this.failed++;
      console.log(`FAIL ${name}: ${err && err.stack ? err.stack : err}`);
    }
  }

  /** A server behaviour that contradicts PROTOCOL.md and is reported, not asserted. */
  known(message) {
    console.log(`KNOWN: ${message}`);
  }

  /** Prints the summary and ends the process: 0 only when every check passed. */
  finish() {
    console.log(`${this.label}: ${this.passed} passed, ${this.failed} failed`);
    process.exit(this.failed > 0 || this.passed === 0 ? 1 : 0);
  }
}

/** Items pushed by callbacks, taken in order by whoever awaits them. */
export class Inbox {
  constructor(name) {
    this.name = name;
    this.items = [];
    this.waiters = [];
  }

  push(item) {
    const at = this.waiters.findIndex((w) => w.pred(item));
    if (at >= 0) {
      const [waiter] = this.waiters.splice(at, 1);
      waiter.resolve(item);
    } else {
      this.items.push(item);
    }
  }

  /** The first item that `pred` accepts (others stay, in order), within `ms`. */
  next(pred = () => true, ms = WAIT_MS) {
    const at = this.items.findIndex(pred);
    if (at >= 0) return Promise.resolve(this.items.splice(at, 1)[0]);
    return new Promise((resolve, reject) => {
      const waiter = { pred, resolve: null };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        reject(new Error(`${this.name}: nothing came within ${ms} ms`));
      }, ms);
      waiter.resolve = (item) => {
        clearTimeout(timer);
        resolve(item);
      };
      this.waiters.push(waiter);
    });
  }

  /** Fails if anything `pred` accepts is here or comes within `ms`. */
  async nothing(ms, pred = () => true) {
    await sleep(ms);
    const extra = this.items.find(pred);
    assert(extra === undefined, `${this.name}: unexpected ${describe(extra)}`);
  }
}

function describe(item) {
  if (item && item.command) return `${item.command} ${JSON.stringify(item.headers)} ${item.body}`;
  return JSON.stringify(item);
}

let counter = 0;

/** A connected @stomp/stompjs client, with what it received. */
export class StompSession {
  /**
   * Connects with `headers` in CONNECT (a `url` of `/ws` or `/stomp`); rejects with the ERROR
   * frame's message or the close that came instead of CONNECTED.
   */
  static open(url, { headers = {}, heartbeat = [0, 0], disconnectReceipt, factory } = {}) {
    return new Promise((resolve, reject) => {
      const session = new StompSession();
      let settled = false;
      const client = new Client({
        brokerURL: factory ? undefined : url,
        webSocketFactory: factory,
        connectHeaders: headers,
        disconnectHeaders: disconnectReceipt ? { receipt: disconnectReceipt } : {},
        reconnectDelay: 0,
        heartbeatIncoming: heartbeat[0],
        heartbeatOutgoing: heartbeat[1],
        debug: (line) => session.debugLines.push(line),
        onConnect: (frame) => {
          settled = true;
          session.connected = frame;
          resolve(session);
        },
        onStompError: (frame) => {
          session.errors.push(frame);
          if (!settled) {
            settled = true;
            reject(Object.assign(new Error(`ERROR: ${frame.headers.message}`), { frame, session }));
          }
        },
        onDisconnect: (frame) => session.disconnected.push(frame),
        onWebSocketClose: (event) => {
          session.closes.push({ code: event.code, reason: event.reason });
          if (!settled) {
            settled = true;
            reject(new Error(`closed (${event.code} ${event.reason}) before CONNECTED`));
          }
        },
        onUnhandledMessage: (message) => session.unhandled.push(message),
        onHeartbeatReceived: () => session.beats++,
      });
      session.client = client;
      client.activate();
    });
  }

  constructor() {
    this.client = null;
    this.connected = null;
    this.errors = [];
    this.debugLines = [];
    this.disconnected = new Inbox('DISCONNECT receipts');
    this.closes = new Inbox('WebSocket closes');
    this.unhandled = new Inbox('unhandled MESSAGEs');
    this.beats = 0;
  }

  get user() {
    return this.connected.headers['user-name'];
  }

  /** Resolves with the RECEIPT of `id`; watch before the frame that asks for it is sent. */
  receipt(id, ms = WAIT_MS) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.user}: no RECEIPT ${id} within ${ms} ms`)), ms);
      this.client.watchForReceipt(id, (frame) => {
        clearTimeout(timer);
        resolve(frame);
      });
    });
  }

  /** SUBSCRIBE with a receipt: `{id, inbox, receipt, subscription}` once the RECEIPT came. */
  async subscribe(destination, headers = {}) {
    const id = headers.id ?? `sub-${++counter}`;
    const inbox = new Inbox(`${this.user} on ${destination}`);
    const receiptId = `r-${id}`;
    const receipt = this.receipt(receiptId);
    const subscription = this.client.subscribe(destination, (m) => inbox.push(m), { ...headers, id, receipt: receiptId });
    return { id, inbox, receipt: await receipt, subscription };
  }

  /** SEND of JSON `body` with a receipt; resolves with the RECEIPT. */
  send(destination, body, headers = {}) {
    const receiptId = `s-${++counter}`;
    const receipt = this.receipt(receiptId);
    this.client.publish({
      destination,
      body: JSON.stringify(body),
      headers: { 'content-type': 'application/json', receipt: receiptId, ...headers },
    });
    return receipt;
  }

  /** DISCONNECT (with the receipt given to `open`) and the close of the WebSocket. */
  async close() {
    await this.client.deactivate();
  }
}

/** A session of the JSON protocol over `ws`, as PROTOCOL.md §2-4 describe. */
export class JsonSession {
  static open(url) {
    return new Promise((resolve, reject) => {
      const session = new JsonSession(new WebSocket(url));
      session.ws.once('error', reject);
      session.frames.next((f) => f.type === 'welcome').then((welcome) => {
        session.welcome = welcome;
        resolve(session);
      }, reject);
    });
  }

  constructor(ws) {
    this.ws = ws;
    this.frames = new Inbox('JSON frames');
    this.nextId = 0;
    ws.on('message', (data) => this.frames.push(JSON.parse(data.toString())));
  }

  /** Sends `command` with an id; resolves with its reply, rejects with its error. */
  async request(command) {
    const id = ++this.nextId;
    const answer = this.frames.next((f) => (f.type === 'reply' || f.type === 'error') && f.id === id);
    this.ws.send(JSON.stringify({ ...command, id }));
    const frame = await answer;
    if (frame.type === 'error') throw new Error(`${command.type}: ${frame.code} ${frame.message}`);
    return frame;
  }

  close() {
    this.ws.close(1000);
  }
}

/** An HS256 token for `sub`, valid ten minutes, as a backend would sign it. */
export function token(secret, sub) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const signed = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ sub, exp: Math.floor(Date.now() / 1000) + 600 })}`;
  return `${signed}.${crypto.createHmac('sha256', secret).update(signed).digest('base64url')}`;
}
