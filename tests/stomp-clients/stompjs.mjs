// @stomp/stompjs under Node.js against real switchyard nodes (PROTOCOL.md §7), as an application
// would use it: brokerURL, connectHeaders, subscribe, publish with receipts, message.ack(),
// deactivate(), heart-beats. Also a client of the JSON protocol and a stompjs client as peers.
//
//   JWT_SECRET=S node stompjs.mjs DEV_URL JWT_URL
//
// DEV_URL is a dev-mode node started with `--ping-interval 1`, JWT_URL one started with
// `--jwt-secret S` (both http://HOST:PORT). Prints a PASS/FAIL line per scenario, `KNOWN: ...`
// for a server bug that is reported rather than asserted, and `stompjs: N passed, M failed` last;
// exits 0 only when all passed. tests/e2e/stomp_clients.rs runs it.

import { Checks, JsonSession, StompSession, WAIT_MS, assert, equal, sleep, token } from './lib.mjs';
import WebSocket from 'ws';

const [devUrl, jwtUrl] = process.argv.slice(2);
const secret = process.env.JWT_SECRET;
if (!devUrl || !jwtUrl || !secret) {
  console.error('usage: JWT_SECRET=S node stompjs.mjs DEV_URL JWT_URL');
  process.exit(2);
}
const dev = devUrl.replace(/^http/, 'ws');
const jwt = jwtUrl.replace(/^http/, 'ws');
const checks = new Checks('stompjs');
// Names of this run, so that a rerun against the same node starts from empty streams.
const tag = Date.now().toString(36);
const open = [];

/** A dev-mode stompjs session of `user` on `/stomp`, `login` naming the user. */
async function login(user, options = {}) {
  const session = await StompSession.open(`${dev}/stomp`, { headers: { login: `${user}-${tag}` }, ...options });
  open.push(session);
  return session;
}

const me = (user) => `${user}-${tag}`;

/** The MESSAGE headers that every stream message carries, checked against what was sent. */
function checkMessage(m, { destination, subscription, stream, seq, from, mid, body }) {
  const h = m.headers;
  equal(h.destination, destination, 'destination');
  equal(h.subscription, subscription, 'subscription');
  equal(h.stream, stream, 'stream');
  equal(h.seq, String(seq), 'seq');
  equal(h.from, from, 'from');
  if (mid !== undefined) equal(h['message-id'], mid, 'message-id');
  assert(h['message-id'], 'no message-id');
  equal(h['content-type'], 'application/json', 'content-type');
  equal(Number(h['content-length']), Buffer.byteLength(m.body), 'content-length');
  assert(Number(h.ts) > 1_700_000_000_000, `ts ${h.ts}`);
  equal(JSON.parse(m.body), body, 'body');
}

const isEvent = (m) => m.headers.event !== undefined;

async function run() {
  await checks.check('connect: CONNECTED 1.2 on /stomp (login) and on /ws (v12.stomp, ?user=), subscriptions answer receipts', async () => {
    const ann = await login('ann');
    const c = ann.connected.headers;
    equal(c.version, '1.2', 'version');
    equal(c['user-name'], me('ann'), 'user-name');
    assert(c.session, 'no session header');
    assert(/^\d+,\d+$/.test(c['heart-beat']), `heart-beat ${c['heart-beat']}`);
    const queue = await ann.subscribe('/user/queue/messages');
    equal(queue.receipt.headers.seq, '0', 'seq of an empty user stream');
    await ann.subscribe('/user/queue/errors');
    const room = await ann.subscribe(`/topic/hall-${tag}`);
    equal(room.receipt.headers.seq, '0', 'seq of an empty room');

    const viaWs = await StompSession.open(`${dev}/ws?user=${me('ann')}&device=node`);
    open.push(viaWs);
    equal(viaWs.client.webSocket.protocol, 'v12.stomp', 'subprotocol chosen on /ws');
    equal(viaWs.connected.headers['user-name'], me('ann'), 'user-name from ?user=');
    equal(viaWs.connected.headers.version, '1.2', 'version');
  });

  await checks.check('direct message: SEND /user/<id> gets a RECEIPT with mid and seq; the MESSAGE has every header and the JSON body; the sender\'s other device gets its copy', async () => {
    const bob = await login('bob');
    const cat = await login('cat');
    const catPhone = await login('cat');
    const bobQ = await bob.subscribe('/user/queue/messages');
    const catQ = await cat.subscribe('/user/queue/messages');
    const phoneQ = await catPhone.subscribe('/user/queue/messages', { id: 'phone-q' });
    const body = { text: 'hi bob', n: 1, list: [1, 'two'], nested: { 'a:b': 'c\nd' } };
    const receipt = await cat.send(`/user/${me('bob')}`, body);
    equal(receipt.headers.seq, '1', 'seq in the sender\'s own stream');
    assert(receipt.headers.mid, 'no mid on the RECEIPT');
    const m = await bobQ.inbox.next();
    checkMessage(m, {
      destination: '/user/queue/messages', subscription: bobQ.id, stream: `user:${me('bob')}`, seq: 1,
      from: me('cat'), mid: receipt.headers.mid, body,
    });
    equal(m.headers.to, me('bob'), 'to');
    const copy = await phoneQ.inbox.next();
    checkMessage(copy, {
      destination: '/user/queue/messages', subscription: 'phone-q', stream: `user:${me('cat')}`, seq: 1,
      from: me('cat'), mid: receipt.headers.mid, body,
    });
    const reply = await bob.send(`/user/${me('cat')}`, 'hi cat');
    for (const q of [catQ, phoneQ]) {
      const back = await q.inbox.next();
      equal([back.headers.seq, back.headers.from, JSON.parse(back.body)], ['2', me('bob'), 'hi cat'], 'reply');
      equal(back.headers['message-id'], reply.headers.mid, 'message-id of the reply');
    }
    await catQ.inbox.nothing(300);
  });

  await checks.check('rooms: two subscribers of /topic/<room> get a third\'s messages in order; event:join and event:leave arrive', async () => {
    const room = `/topic/r-${tag}`;
    const [dan, eli, fay] = [await login('dan'), await login('eli'), await login('fay')];
    const danR = await dan.subscribe(room);
    const eliR = await eli.subscribe(room);
    let event = await danR.inbox.next(isEvent);
    equal([event.headers.event, event.headers.subscription, JSON.parse(event.body)], ['join', danR.id, { user: me('eli') }], 'join event');
    const fayR = await fay.subscribe(room);
    for (const r of [danR, eliR]) {
      event = await r.inbox.next((m) => isEvent(m) && JSON.parse(m.body).user === me('fay'));
      equal(event.headers.event, 'join', 'join event of the third');
    }
    // Five SENDs at once: their receipts come in order, seqs 1..5.
    const receipts = [1, 2, 3, 4, 5].map((n) => fay.send(room, { n }));
    equal((await Promise.all(receipts)).map((r) => r.headers.seq), ['1', '2', '3', '4', '5'], 'receipt seqs');
    for (const r of [danR, eliR]) {
      for (let n = 1; n <= 5; n++) {
        const m = await r.inbox.next((x) => !isEvent(x));
        checkMessage(m, { destination: room, subscription: r.id, stream: `room:r-${tag}`, seq: n, from: me('fay'), body: { n } });
      }
    }
    await dan.send(room, 'from dan');
    for (const r of [eliR, fayR]) {
      const m = await r.inbox.next((x) => !isEvent(x));
      equal([m.headers.seq, m.headers.from, JSON.parse(m.body)], ['6', me('dan'), 'from dan'], 'dan\'s message');
    }
    const unsubscribed = eli.receipt('u-eli');
    eliR.subscription.unsubscribe({ receipt: 'u-eli' });
    await unsubscribed;
    event = await danR.inbox.next((m) => isEvent(m) && m.headers.event === 'leave');
    equal(JSON.parse(event.body), { user: me('eli') }, 'leave event');
    await danR.inbox.nothing(300, (m) => !isEvent(m));
  });

  await checks.check('ack client-individual: message.ack() moves the read cursor; a new SUBSCRIBE without since starts after it', async () => {
    const [gus, hal] = [await login('gus'), await login('hal')];
    const q = await gus.subscribe('/user/queue/messages', { ack: 'client-individual' });
    for (let n = 1; n <= 5; n++) await hal.send(`/user/${me('gus')}`, { n });
    const got = [];
    for (let n = 1; n <= 5; n++) {
      const m = await q.inbox.next();
      equal([m.headers.seq, JSON.parse(m.body)], [String(n), { n }], 'delivery');
      equal(m.headers.ack, `user:${me('gus')}/${n}`, 'ack header');
      got.push(m);
    }
    got[0].ack();
    got[1].ack();
    const acked = gus.receipt('ack-3');
    got[2].ack({ receipt: 'ack-3' });
    await acked;
    await gus.close();
    const again = await login('gus');
    const q2 = await again.subscribe('/user/queue/messages', { ack: 'client-individual' });
    equal([q2.receipt.headers.seq, q2.receipt.headers.truncated], ['5', 'false'], 'receipt of the new subscription');
    for (const n of [4, 5]) equal((await q2.inbox.next()).headers.seq, String(n), 'after the read cursor');
    await q2.inbox.nothing(300);
  });

  await checks.check('DISCONNECT with a receipt closes cleanly (1000, event:leave); SUBSCRIBE with since then gets exactly the missed messages, in order', async () => {
    const room = `/topic/resume-${tag}`;
    const ida = await login('ida', { disconnectReceipt: 'bye-ida' });
    const jon = await login('jon');
    let q = await ida.subscribe('/user/queue/messages');
    let r = await ida.subscribe(room);
    const jonR = await jon.subscribe(room);
    for (let n = 1; n <= 2; n++) {
      await jon.send(`/user/${me('ida')}`, { dm: n });
      await jon.send(room, { room: n });
    }
    for (let n = 1; n <= 2; n++) {
      equal((await q.inbox.next()).headers.seq, String(n), 'live DM');
      equal((await r.inbox.next((m) => !isEvent(m))).headers.seq, String(n), 'live room message');
    }
    await ida.close();
    const receipt = await ida.disconnected.next();
    equal(receipt.headers['receipt-id'], 'bye-ida', 'RECEIPT of DISCONNECT');
    equal((await ida.closes.next()).code, 1000, 'close code after DISCONNECT');
    const left = await jonR.inbox.next((m) => m.headers.event === 'leave');
    equal(JSON.parse(left.body), { user: me('ida') }, 'leave event after DISCONNECT');

    for (let n = 3; n <= 5; n++) {
      await jon.send(`/user/${me('ida')}`, { dm: n });
      await jon.send(room, { room: n });
    }
    const back = await login('ida');
    q = await back.subscribe('/user/queue/messages', { since: '2' });
    equal([q.receipt.headers.seq, q.receipt.headers.truncated], ['5', 'false'], 'receipt of the user queue');
    r = await back.subscribe(room, { since: '2' });
    equal([r.receipt.headers.seq, r.receipt.headers.truncated], ['5', 'false'], 'receipt of the room');
    for (let n = 3; n <= 5; n++) {
      const m = await q.inbox.next();
      equal([m.headers.seq, JSON.parse(m.body)], [String(n), { dm: n }], 'missed DM');
      const rm = await r.inbox.next((x) => !isEvent(x));
      equal([rm.headers.seq, JSON.parse(rm.body)], [String(n), { room: n }], 'missed room message');
    }
    await jon.send(`/user/${me('ida')}`, { dm: 6 });
    equal((await q.inbox.next()).headers.seq, '6', 'live again, no gap');
    await q.inbox.nothing(300);
    await r.inbox.nothing(0, (m) => !isEvent(m));
  });

  await checks.check('refusals arrive on /user/queue/errors (SEND: not_member, bad_request; SUBSCRIBE: forbidden) with no RECEIPT; the connection stays usable', async () => {
    const kit = await login('kit');
    const errors = await kit.subscribe('/user/queue/errors', { id: 'errs' });
    let receipted = false;
    kit.client.watchForReceipt('x1', () => { receipted = true; });
    kit.client.publish({ destination: `/topic/never-joined-${tag}`, body: 'hello?', headers: { receipt: 'x1' } });
    const refused = await errors.inbox.next();
    equal([refused.headers.destination, refused.headers.subscription], ['/user/queue/errors', 'errs'], 'where the refusal came');
    const body = JSON.parse(refused.body);
    equal([body.code, body.receipt], ['not_member', 'x1'], 'refusal');
    assert(typeof body.message === 'string' && body.message.length > 0, 'refusal without a message');
    kit.client.publish({ destination: `/user/${me('lou')}`, body: '{nope', headers: { 'content-type': 'application/json' } });
    equal(JSON.parse((await errors.inbox.next()).body).code, 'bad_request', 'invalid JSON');
    kit.client.watchForReceipt('x2', () => { receipted = true; });
    kit.client.subscribe(`/topic/private:vault-${tag}`, () => {}, { id: 'vault', receipt: 'x2' });
    const forbidden = JSON.parse((await errors.inbox.next()).body);
    equal([forbidden.code, forbidden.receipt], ['forbidden', 'x2'], 'refused SUBSCRIBE to a private room');
    const ok = await kit.send(`/user/${me('lou')}`, 'still here');
    equal(ok.headers.seq, '1', 'a SEND after the refusals');
    assert(!receipted, 'a refused frame got a RECEIPT');
    assert(kit.client.connected && kit.closes.items.length === 0 && kit.errors.length === 0, 'the connection did not stay');
  });

  await checks.check('broadcast: /broadcast gets what the server API broadcasts, with no seq', async () => {
    const pia = await login('pia');
    const b = await pia.subscribe('/broadcast', { id: 'all' });
    const res = await fetch(`${devUrl}/api/v1/broadcast`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ body: { notice: tag }, from: 'ops' }),
    });
    equal(res.status, 200, 'HTTP status of the broadcast');
    const { mid } = await res.json();
    const m = (await b.inbox.next((x) => JSON.parse(x.body).notice === tag));
    const h = m.headers;
    equal([h.destination, h.subscription, h.stream, h['message-id'], h.from, h.seq], ['/broadcast', 'all', 'broadcast', mid, 'ops', undefined], 'broadcast MESSAGE');
  });

  await checks.check('heart-beats 1000,1000 against --ping-interval 1: the connection stays up 5 s and the server\'s beats arrive; a client whose beats stop gets ERROR and 1001', async () => {
    let raw = 0;
    const factory = () => {
      const ws = new WebSocket(`${dev}/stomp`, ['v12.stomp']);
      ws.addEventListener('message', (e) => {
        if (e.data === '\n' || e.data === '\r\n') raw++;
      });
      return ws;
    };
    const mo = await StompSession.open(`${dev}/stomp`, { headers: { login: me('mo') }, heartbeat: [1000, 1000], factory });
    open.push(mo);
    equal(mo.connected.headers['heart-beat'], '1000,1000', 'the server offers the ping interval both ways');
    const q = await mo.subscribe('/user/queue/messages');
    await sleep(5_000);
    assert(mo.client.connected && mo.closes.items.length === 0, `closed: ${JSON.stringify(mo.closes.items)}`);
    const pongs = mo.debugLines.filter((l) => l === '<<< PONG').length;
    const pings = mo.debugLines.filter((l) => l === '>>> PING').length;
    assert(mo.beats >= 3 && pongs >= 3 && raw >= 3, `server beats in 5 s: ${mo.beats} (debug ${pongs}, raw ${raw})`);
    assert(pings >= 3, `client beats sent in 5 s: ${pings}`);
    const ray = await login('ray');
    await ray.send(`/user/${me('mo')}`, 'still there?');
    equal(JSON.parse((await q.inbox.next()).body), 'still there?', 'usable after 5 s');
    equal((await mo.send(`/user/${me('ray')}`, 'yes')).headers.seq, '2', 'SEND after 5 s');
    console.log(`  server heart-beats in 5 s: ${mo.beats} (raw \\n messages ${raw}), client beats: ${pings}`);

    // The other way: a client that promised beats every second and stops sending them is closed
    // after two intervals, with an ERROR first.
    const quiet = await StompSession.open(`${dev}/stomp`, { headers: { login: me('quiet') }, heartbeat: [0, 1000] });
    open.push(quiet);
    const socket = quiet.client.webSocket;
    const send = socket.send.bind(socket);
    socket.send = (data) => (data === '\n' ? undefined : send(data));
    const closed = await quiet.closes.next(() => true, 4 * 1000 + WAIT_MS);
    equal(closed.code, 1001, 'close code of a client whose beats stopped');
    assert(quiet.errors.length === 1 && /heart-beat/.test(quiet.errors[0].headers.message), `ERROR before the close: ${JSON.stringify(quiet.errors.map((e) => e.headers))}`);
  });

  await checks.check('JWT: the token as passcode, as Authorization: Bearer and at the upgrade; a bad token gets ERROR and the close', async () => {
    const lee = await StompSession.open(`${jwt}/stomp`, { headers: { passcode: token(secret, me('lee')) } });
    open.push(lee);
    equal(lee.connected.headers['user-name'], me('lee'), 'user from passcode');
    const mia = await StompSession.open(`${jwt}/stomp`, { headers: { Authorization: `Bearer ${token(secret, me('mia'))}` } });
    open.push(mia);
    equal(mia.connected.headers['user-name'], me('mia'), 'user from Authorization');
    const ned = await StompSession.open(`${jwt}/ws?token=${token(secret, me('ned'))}`);
    open.push(ned);
    equal(ned.connected.headers['user-name'], me('ned'), 'user from ?token=');
    const q = await mia.subscribe('/user/queue/messages');
    const receipt = await lee.send(`/user/${me('mia')}`, { secret: false });
    const m = await q.inbox.next();
    equal([m.headers.from, m.headers['message-id']], [me('lee'), receipt.headers.mid], 'DM between token users');

    for (const headers of [{ passcode: 'not-a-token' }, { login: me('lee') }, { passcode: token('another-secret-entirely', me('lee')) }]) {
      let error = null;
      try {
        open.push(await StompSession.open(`${jwt}/stomp`, { headers }));
      } catch (e) {
        error = e;
      }
      assert(error && error.frame, `${JSON.stringify(headers)}: no ERROR frame (${error})`);
      assert(error.frame.headers.message, 'ERROR without a message header');
      equal((await error.session.closes.next()).code, 1008, `${JSON.stringify(headers)}: close code`);
    }
  });

  await checks.check('mixed: a JSON-protocol client (ws) and a stompjs client exchange direct messages and share a room', async () => {
    const ivy = await JsonSession.open(`${dev}/ws?user=${me('ivy')}`);
    equal(ivy.welcome.user, me('ivy'), 'welcome');
    const jay = await login('jay');
    const q = await jay.subscribe('/user/queue/messages');
    const sent = await ivy.request({ type: 'send', to: me('jay'), body: { text: 'hi from json' } });
    const m = await q.inbox.next();
    checkMessage(m, {
      destination: '/user/queue/messages', subscription: q.id, stream: `user:${me('jay')}`, seq: 1,
      from: me('ivy'), mid: sent.mid, body: { text: 'hi from json' },
    });
    const receipt = await jay.send(`/user/${me('ivy')}`, { text: 'hi from stomp' });
    const back = await ivy.frames.next((f) => f.type === 'message');
    equal([back.stream, back.seq, back.from, back.to, back.mid, back.body], [`user:${me('ivy')}`, 2, me('jay'), me('ivy'), receipt.headers.mid, { text: 'hi from stomp' }], 'JSON message');

    const room = `mixed-${tag}`;
    await ivy.request({ type: 'join', room });
    const r = await jay.subscribe(`/topic/${room}`);
    const joined = await ivy.frames.next((f) => f.type === 'presence');
    equal([joined.room, joined.event, joined.user], [room, 'join', me('jay')], 'presence of the STOMP session');
    const presence = await ivy.request({ type: 'presence', room });
    equal(presence.count, 2, 'presence counts both protocols');
    await ivy.request({ type: 'publish', room, body: 'json to room' });
    const rm = await r.inbox.next((x) => !isEvent(x));
    equal([rm.headers.seq, rm.headers.from, JSON.parse(rm.body)], ['1', me('ivy'), 'json to room'], 'room message from JSON');
    await jay.send(`/topic/${room}`, 'stomp to room');
    const jm = await ivy.frames.next((f) => f.type === 'message' && f.room === room);
    equal([jm.seq, jm.from, jm.body], [2, me('jay'), 'stomp to room'], 'room message from STOMP');
    ivy.close();
  });
}

// A hang must never keep CI waiting: the Rust test kills the script later, this reports first.
const watchdog = setTimeout(() => {
  console.log('FAIL the run took longer than 60 s');
  checks.failed++;
  checks.finish();
}, 60_000);

try {
  await run();
} catch (err) {
  checks.failed++;
  console.log(`FAIL run: ${err && err.stack ? err.stack : err}`);
}
clearTimeout(watchdog);
await Promise.race([Promise.all(open.map((s) => s.client.deactivate().catch(() => {}))), sleep(WAIT_MS)]);
checks.finish();
