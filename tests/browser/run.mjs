// End-to-end test of the demo page (demo/index.html) in headless Chromium.
//
// Starts one dev-mode node on a free loopback port with a temporary data dir, opens the page as
// alice (two devices) and bob, and drives it as a person would: direct messages, a room, presence,
// errors, and catch-up after bob's connection drops. Then @stomp/stompjs, loaded into a page
// from node_modules, talks STOMP to the node's /stomp from the browser. Prints one PASS/FAIL line
// per check and a final `browser: N passed, M failed`; exits non-zero on any failure. The node
// and the browser are always stopped.
//
// Environment: SWITCHYARD_BIN (default ../../target/debug/switchyard from this directory),
// CHROMIUM (default /usr/bin/chromium).

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const BIN = path.resolve(here, process.env.SWITCHYARD_BIN || '../../target/debug/switchyard');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const STEP_TIMEOUT_MS = 10_000;
// Hard cap on the whole run, so a hang can never keep CI waiting.
const RUN_TIMEOUT_MS = 120_000;

let node = null;
let nodeLog = '';
let browser = null;
let dataDir = null;
let passed = 0;
let failed = 0;

async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`PASS ${name}`);
  } catch (err) {
    failed++;
    console.log(`FAIL ${name}: ${String(err && err.message || err).split('\n')[0]}`);
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function startNode() {
  assert(fs.existsSync(BIN), `no switchyard binary at ${BIN} (run cargo build, or set SWITCHYARD_BIN)`);
  const port = await freePort();
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchyard-browser-'));
  node = spawn(BIN, ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const keep = (chunk) => { nodeLog = (nodeLog + chunk).slice(-20_000); };
  node.stdout.on('data', keep);
  node.stderr.on('data', keep);
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    assert(node.exitCode === null && node.signalCode === null, `node exited early:\n${nodeLog}`);
    try {
      const res = await fetch(`${base}/healthz`);
      if (res.ok) return base;
    } catch { /* not listening yet */ }
    await sleep(100);
  }
  throw new Error(`node not healthy within 20 s:\n${nodeLog}`);
}

async function stopAll() {
  if (browser) await browser.close().catch(() => {});
  if (node && node.exitCode === null && node.signalCode === null) {
    const exited = new Promise((r) => node.once('exit', r));
    node.kill('SIGTERM');
    const timer = setTimeout(() => node.kill('SIGKILL'), 5_000);
    await exited;
    clearTimeout(timer);
  }
  if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
}

// ---- Page helpers --------------------------------------------------------------------------

async function openAs(base, user, device) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  page.on('pageerror', (err) => console.log(`  [${user}/${device}] page error: ${err.message}`));
  await page.goto(base + '/');
  await page.fill('#signin-user', user);
  await page.fill('#signin-device', device);
  await page.click('#connect-btn');
  await page.waitForSelector('#status[data-state=connected]');
  return page;
}

const lines = (page, list, text) => page.locator(`#${list} li`, { hasText: text });

async function waitLine(page, list, text) {
  try {
    await lines(page, list, text).first().waitFor();
  } catch {
    throw new Error(`"${text}" never showed in #${list} (${STEP_TIMEOUT_MS / 1000} s)`);
  }
}

async function sendDirect(page, to, text) {
  await page.fill('#dm-to', to);
  await page.fill('#dm-body', text);
  await page.click('#dm-send');
}

async function joinRoom(page, room) {
  await page.fill('#room-name', room);
  await page.click('#room-join');
  await page.waitForSelector(`#room-select option[value="${room}"]`, { state: 'attached' });
}

async function publish(page, text) {
  await page.fill('#room-body', text);
  await page.click('#room-send');
}

/** Every message line of a log, as "stream#seq", to find duplicates. */
function seqKeys(page, list) {
  return page.$$eval(`#${list} li[data-seq]`, (lis) =>
    lis.filter((li) => li.dataset.seq !== '').map((li) => `${li.dataset.stream}#${li.dataset.seq}`));
}

async function assertNoDuplicates(page, list) {
  const keys = await seqKeys(page, list);
  const dup = keys.find((k, i) => keys.indexOf(k) !== i);
  assert(!dup, `${list} shows ${dup} twice`);
}

async function assertOnce(page, list, text) {
  await waitLine(page, list, text);
  // Give a duplicate the chance to show up before counting.
  await sleep(500);
  const n = await lines(page, list, text).count();
  assert(n === 1, `"${text}" shows ${n} times in #${list}`);
}

// ---- The run ---------------------------------------------------------------------------------

async function run() {
  const base = await startNode();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
  const tag = Date.now().toString(36);
  let alice, alicePhone, bob;

  await check('alice (two devices) and bob sign in and see their welcome', async () => {
    alice = await openAs(base, 'alice', 'laptop');
    alicePhone = await openAs(base, 'alice', 'phone');
    bob = await openAs(base, 'bob', 'web');
    for (const page of [alice, alicePhone, bob]) {
      const session = await page.getAttribute('#welcome', 'data-session');
      const nodeId = await page.getAttribute('#welcome', 'data-node');
      assert(session && nodeId, 'welcome shows no session or node');
    }
  });

  await check('a direct message from alice shows on bob\'s page', async () => {
    await sendDirect(alice, 'bob', `hi bob ${tag}`);
    await assertOnce(bob, 'dm-log', `hi bob ${tag}`);
    await waitLine(alice, 'dm-log', `hi bob ${tag}`);
  });

  await check('alice\'s other device gets the copy of her direct message', async () => {
    await assertOnce(alicePhone, 'dm-log', `hi bob ${tag}`);
  });

  await check('bob\'s reply shows on both of alice\'s devices', async () => {
    await sendDirect(bob, 'alice', `hi alice ${tag}`);
    await assertOnce(alice, 'dm-log', `hi alice ${tag}`);
    await assertOnce(alicePhone, 'dm-log', `hi alice ${tag}`);
  });

  await check('both join a room; alice sees bob\'s presence event and who is in the room', async () => {
    await joinRoom(alice, 'lobby');
    await joinRoom(bob, 'lobby');
    await alice.locator('#room-log li[data-presence=join][data-user=bob]').first().waitFor();
    await alice.click('#room-who');
    await alice.waitForSelector('#room-members[data-count="2"]');
    const text = await alice.textContent('#room-members');
    assert(text.includes('alice') && text.includes('bob'), `members: ${text}`);
  });

  await check('room messages show on the other page', async () => {
    await publish(alice, `room hello from alice ${tag}`);
    await assertOnce(bob, 'room-log', `room hello from alice ${tag}`);
    await publish(bob, `room hello from bob ${tag}`);
    await assertOnce(alice, 'room-log', `room hello from bob ${tag}`);
  });

  await check('the online check shows bob online and nobody offline', async () => {
    await alice.fill('#online-users', 'bob, nobody');
    await alice.click('#online-check');
    await alice.waitForSelector('#online-result li[data-user=bob][data-online=true]');
    await alice.waitForSelector('#online-result li[data-user=nobody][data-online=false]');
  });

  await check('an error frame is shown on the page', async () => {
    await sendDirect(alice, 'not a valid id', 'never delivered');
    await alice.waitForSelector('#errors li[data-code=bad_request]');
  });

  await check('after a dropped connection bob reconnects and catches up exactly once', async () => {
    const before = await bob.getAttribute('#welcome', 'data-session');
    // Keep bob away for 3 s so alice's messages are sent while he is disconnected.
    await bob.evaluate(() => window.switchyardDemo.dropConnection(3000));
    await bob.waitForSelector('#status[data-state=reconnecting]');
    await sendDirect(alice, 'bob', `while away ${tag}`);
    await waitLine(alice, 'dm-log', `while away ${tag}`);
    await publish(alice, `room while away ${tag}`);
    await waitLine(alice, 'room-log', `room while away ${tag}`);
    const state = await bob.getAttribute('#status', 'data-state');
    assert(state === 'reconnecting', `bob was ${state} when alice sent, not disconnected`);

    await bob.waitForSelector('#status[data-state=connected]');
    const after = await bob.getAttribute('#welcome', 'data-session');
    assert(after && after !== before, 'bob did not get a new session');
    await assertOnce(bob, 'dm-log', `while away ${tag}`);
    await assertOnce(bob, 'room-log', `room while away ${tag}`);
    // Nothing from before the drop came back a second time.
    await assertOnce(bob, 'dm-log', `hi bob ${tag}`);
    await assertOnce(bob, 'room-log', `room hello from alice ${tag}`);
    await assertNoDuplicates(bob, 'dm-log');
    await assertNoDuplicates(bob, 'room-log');
    // The page resumes from the last seq it holds without a gap: the highest one it shows.
    for (const [list, name] of [['dm-log', 'user:bob'], ['room-log', 'room:lobby']]) {
      const keys = await seqKeys(bob, list);
      const shown = Math.max(...keys.filter((k) => k.startsWith(`${name}#`)).map((k) => Number(k.split('#')[1])));
      const mark = await bob.evaluate((n) => window.switchyardDemo.lastSeq(n), name);
      assert(mark === shown, `bob's last seq for ${name} is ${mark}, but the page shows up to ${shown}`);
    }
  });

  await check('live messages reach bob after the reconnect', async () => {
    await sendDirect(alice, 'bob', `after return ${tag}`);
    await assertOnce(bob, 'dm-log', `after return ${tag}`);
    await publish(alice, `room after return ${tag}`);
    await assertOnce(bob, 'room-log', `room after return ${tag}`);
    const errors = await bob.locator('#errors li').allTextContents();
    const unexpected = errors.filter((e) => !e.includes('connection lost'));
    assert(unexpected.length === 0, `bob's page shows errors: ${unexpected.join('; ')}`);
  });

  await stompjsChecks(base);
}

// ---- @stomp/stompjs in the page --------------------------------------------------------------

const STOMPJS = path.join(here, 'node_modules/@stomp/stompjs/bundles/stomp.umd.min.js');

/**
 * In a page of the node's origin with the stompjs UMD bundle: sue and tom connect over ws:// to
 * /stomp, subscribe to the user queue and a room, and exchange a direct message and room messages.
 * Answers what each saw, as plain data.
 */
async function stompjsInPage(base, tag) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  page.on('pageerror', (err) => console.log(`  [stompjs page] page error: ${err.message}`));
  await page.goto(`${base}/healthz`);
  await page.addScriptTag({ path: STOMPJS });
  return page.evaluate(async ({ url, tag, wait }) => {
    const { Client } = window.StompJs;
    const plain = (m) => ({ headers: { ...m.headers }, body: m.body });
    const timeout = (what) => new Promise((_, reject) => setTimeout(() => reject(new Error(`${what}: nothing within ${wait} ms`)), wait));
    const connect = (user) => new Promise((resolve, reject) => {
      const client = new Client({
        brokerURL: url,
        connectHeaders: { login: user },
        reconnectDelay: 0,
        onConnect: (frame) => resolve({ client, connected: plain(frame), got: [] }),
        onStompError: (frame) => reject(new Error(`ERROR ${frame.headers.message}`)),
        onWebSocketClose: (event) => reject(new Error(`closed ${event.code} before CONNECTED`)),
      });
      client.activate();
    });
    const receipt = (s, id) => Promise.race([new Promise((resolve) => s.client.watchForReceipt(id, (f) => resolve(plain(f)))), timeout(`RECEIPT ${id}`)]);
    const subscribe = async (s, destination, id) => {
      const done = receipt(s, `r-${id}`);
      s.client.subscribe(destination, (m) => s.got.push(plain(m)), { id, receipt: `r-${id}` });
      return done;
    };
    const send = (s, destination, body, id) => {
      const done = receipt(s, id);
      s.client.publish({ destination, body: JSON.stringify(body), headers: { 'content-type': 'application/json', receipt: id } });
      return done;
    };
    const until = async (s, count, what) => {
      const deadline = Date.now() + wait;
      while (s.got.filter((m) => !m.headers.event).length < count) {
        if (Date.now() > deadline) throw new Error(`${what}: ${s.got.length} MESSAGEs within ${wait} ms`);
        await new Promise((r) => setTimeout(r, 20));
      }
    };
    const room = `/topic/page-${tag}`;
    const sue = await connect(`sue-${tag}`);
    const tom = await connect(`tom-${tag}`);
    await subscribe(sue, '/user/queue/messages', 'sue-q');
    await subscribe(sue, room, 'sue-room');
    await subscribe(tom, room, 'tom-room');
    const dm = await send(tom, `/user/sue-${tag}`, { text: 'hi sue' }, 'dm-1');
    await until(sue, 1, 'the direct message');
    const fromTom = await send(tom, room, { text: 'room from tom' }, 'room-1');
    await until(sue, 2, 'tom\'s room message');
    const fromSue = await send(sue, room, { text: 'room from sue' }, 'room-2');
    await until(tom, 1, 'sue\'s room message');
    const out = {
      sue: { connected: sue.connected, got: sue.got }, tom: { connected: tom.connected, got: tom.got },
      receipts: { dm, fromTom, fromSue }, protocol: sue.client.webSocket.protocol,
    };
    await Promise.all([sue.client.deactivate(), tom.client.deactivate()]);
    return out;
  }, { url: `${base.replace(/^http/, 'ws')}/stomp`, tag, wait: STEP_TIMEOUT_MS });
}

async function stompjsChecks(base) {
  const tag = Date.now().toString(36);
  let seen = null;
  await check('stompjs in the page connects to /stomp, subscribes to the user queue and a room, sends and receives', async () => {
    assert(fs.existsSync(STOMPJS), `no ${STOMPJS}: npm ci in tests/browser`);
    seen = await stompjsInPage(base, tag);
    const c = seen.sue.connected.headers;
    assert(c.version === '1.2' && c['user-name'] === `sue-${tag}`, `CONNECTED ${JSON.stringify(c)}`);
    assert(seen.protocol === 'v12.stomp', `subprotocol ${seen.protocol}`);
  });

  await check('stompjs in the page: the direct message and the room messages carry their headers, in order', async () => {
    assert(seen, 'the page did not run');
    const { sue, tom, receipts } = seen;
    const messages = (s) => s.got.filter((m) => !m.headers.event);
    const [dm, roomMsg] = messages(sue);
    assert(dm.headers.subscription === 'sue-q' && dm.headers.destination === '/user/queue/messages'
      && dm.headers['message-id'] === receipts.dm.headers.mid && dm.headers.seq === '1'
      && dm.headers.from === `tom-${tag}` && JSON.parse(dm.body).text === 'hi sue', `DM ${JSON.stringify(dm)}`);
    assert(roomMsg.headers.subscription === 'sue-room' && roomMsg.headers.destination === `/topic/page-${tag}`
      && roomMsg.headers.seq === receipts.fromTom.headers.seq && roomMsg.headers.seq === '1'
      && JSON.parse(roomMsg.body).text === 'room from tom', `room message ${JSON.stringify(roomMsg)}`);
    const [back] = messages(tom);
    assert(back.headers.subscription === 'tom-room' && back.headers.seq === '2' && back.headers.from === `sue-${tag}`
      && JSON.parse(back.body).text === 'room from sue', `tom got ${JSON.stringify(back)}`);
    assert(messages(sue).length === 2 && messages(tom).length === 1, 'an echo or a duplicate');
    const join = sue.got.find((m) => m.headers.event === 'join');
    assert(join && JSON.parse(join.body).user === `tom-${tag}`, `no join event of tom: ${JSON.stringify(sue.got)}`);
  });
}

const watchdog = setTimeout(() => {
  console.log(`FAIL the run took longer than ${RUN_TIMEOUT_MS / 1000} s`);
  failed++;
  stopAll().finally(() => finish());
}, RUN_TIMEOUT_MS);

function finish() {
  clearTimeout(watchdog);
  if (failed > 0 && nodeLog) console.log(`--- node log (tail) ---\n${nodeLog.slice(-4000)}`);
  console.log(`browser: ${passed} passed, ${failed} failed`);
  process.exit(failed > 0 || passed === 0 ? 1 : 0);
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => { failed++; stopAll().finally(finish); });
}

try {
  await run();
} catch (err) {
  failed++;
  console.log(`FAIL setup: ${err && err.message || err}`);
} finally {
  await stopAll();
  finish();
}
