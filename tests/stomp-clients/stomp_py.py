"""stomp.py against real switchyard nodes (PROTOCOL.md §7), through its WebSocket transport
(stomp.WSStompConnection over websocket-client) as an application would use it: connect (stomp.py
sends a STOMP frame, not CONNECT), subscribe, send with receipts, ack, disconnect with a receipt,
heart-beats; and a client of the JSON protocol as a peer.

    JWT_SECRET=S python3 stomp_py.py DEV_URL JWT_URL

DEV_URL is a dev-mode node started with `--ping-interval 1`, JWT_URL one started with
`--jwt-secret S` (both http://HOST:PORT). The packages come from .pydeps/ beside this file
(setup.sh installs them). Prints a PASS/FAIL line per scenario, `KNOWN: ...` for a server bug
that is reported rather than asserted, and `stomp.py: N passed, M failed` last; exits 0 only when
all passed. tests/e2e/stomp_clients.rs runs it.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import traceback
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".pydeps"))

import stomp  # noqa: E402
import websocket  # noqa: E402

WAIT = 5.0
TAG = format(int(time.time() * 1000), "x")


class Checks:
    """Numbered checks: `PASS name` / `FAIL name: why`, then `LABEL: N passed, M failed`."""

    def __init__(self, label):
        self.label = label
        self.passed = 0
        self.failed = 0

    def check(self, name, fn):
        try:
            fn()
            self.passed += 1
            print(f"PASS {name}", flush=True)
        except Exception:
            self.failed += 1
            print(f"FAIL {name}: {traceback.format_exc()}", flush=True)

    def finish(self):
        print(f"{self.label}: {self.passed} passed, {self.failed} failed", flush=True)
        os._exit(0 if self.failed == 0 and self.passed > 0 else 1)


def equal(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}: got {actual!r}, expected {expected!r}")


class Inbox:
    """Items pushed by the receiver thread, taken in order by the test."""

    def __init__(self, name):
        self.name = name
        self.items = []
        self.cond = threading.Condition()

    def push(self, item):
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def next(self, pred=lambda _: True, timeout=WAIT):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, item in enumerate(self.items):
                    if pred(item):
                        return self.items.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: nothing came within {timeout} s")
                self.cond.wait(left)

    def nothing(self, seconds, pred=lambda _: True):
        time.sleep(seconds)
        with self.cond:
            extra = [i for i in self.items if pred(i)]
        if extra:
            raise AssertionError(f"{self.name}: unexpected {extra[0]}")


class Listener(stomp.ConnectionListener):
    def __init__(self):
        self.connected = None
        self.messages = {}
        self.receipts = Inbox("RECEIPTs")
        self.errors = Inbox("ERRORs")
        self.beats = 0
        self.disconnected = threading.Event()
        # Set by CONNECTED, or by the ERROR or close that came instead.
        self.settled = threading.Event()
        self.lock = threading.Lock()

    def inbox(self, subscription):
        with self.lock:
            return self.messages.setdefault(subscription, Inbox(f"MESSAGEs of {subscription}"))

    def on_connected(self, frame):
        self.connected = frame
        self.settled.set()

    def on_message(self, frame):
        self.inbox(frame.headers.get("subscription")).push(frame)

    def on_receipt(self, frame):
        self.receipts.push(frame)

    def on_error(self, frame):
        self.errors.push(frame)
        self.settled.set()

    def on_heartbeat(self):
        self.beats += 1

    def on_disconnected(self):
        self.disconnected.set()
        self.settled.set()


OPEN = []
COUNTER = [0]


def next_id(prefix):
    COUNTER[0] += 1
    return f"{prefix}-{COUNTER[0]}"


class Refused(Exception):
    """CONNECT answered with ERROR, or the connection closed instead of CONNECTED."""


class Session:
    """A connected stomp.py WSStompConnection and what it received."""

    def __init__(self, url, path, user=None, passcode=None, headers=None, upgrade_headers=None, heartbeats=(0, 0)):
        parsed = urllib.parse.urlparse(url)
        self.conn = stomp.WSStompConnection(
            [(parsed.hostname, parsed.port)], ws_path=path, heartbeats=heartbeats, header=upgrade_headers
        )
        self.listener = Listener()
        self.conn.set_listener("test", self.listener)
        OPEN.append(self)
        # Not connect(wait=True): it waits forever for a CONNECTED that does not come.
        self.conn.connect(username=user, passcode=passcode, headers=headers or {})
        if not self.listener.settled.wait(WAIT):
            raise AssertionError(f"{path}: no CONNECTED within {WAIT} s")
        if self.listener.connected is None:
            raise Refused(path)
        self.connected = self.listener.connected

    @property
    def user(self):
        return self.connected.headers["user-name"]

    def receipt(self, receipt_id):
        return self.listener.receipts.next(lambda f: f.headers.get("receipt-id") == receipt_id)

    def subscribe(self, destination, sub_id=None, ack="auto", **headers):
        sub_id = sub_id or next_id("sub")
        receipt = f"r-{sub_id}"
        self.conn.subscribe(destination, id=sub_id, ack=ack, headers={**headers, "receipt": receipt})
        return sub_id, self.listener.inbox(sub_id), self.receipt(receipt)

    def send(self, destination, body, **headers):
        receipt = next_id("s")
        data = json.dumps(body, ensure_ascii=False).encode()
        self.conn.send(destination, data, content_type="application/json", headers={**headers, "receipt": receipt})
        return self.receipt(receipt)


def dev(user, **kwargs):
    return Session(DEV_URL, "/stomp", user=f"{user}-{TAG}", **kwargs)


def me(user):
    return f"{user}-{TAG}"


def is_event(frame):
    return "event" in frame.headers


def not_event(frame):
    return "event" not in frame.headers


def check_message(m, destination, subscription, stream, seq, sender, body, mid=None):
    h = m.headers
    equal(h.get("destination"), destination, "destination")
    equal(h.get("subscription"), subscription, "subscription")
    equal(h.get("stream"), stream, "stream")
    equal(h.get("seq"), str(seq), "seq")
    equal(h.get("from"), sender, "from")
    if mid is not None:
        equal(h.get("message-id"), mid, "message-id")
    assert h.get("message-id"), "no message-id"
    equal(h.get("content-type"), "application/json", "content-type")
    equal(int(h.get("content-length")), len(m.body.encode()), "content-length")
    assert int(h.get("ts")) > 1_700_000_000_000, f"ts {h.get('ts')}"
    equal(json.loads(m.body), body, "body")


def token(sub, secret=None):
    def part(value):
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    signed = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': sub, 'exp': int(time.time()) + 600})}"
    mac = hmac.new((secret or SECRET).encode(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def connect_scenario():
    ann = dev("ann")
    c = ann.connected.headers
    equal(c.get("version"), "1.2", "version")
    equal(c.get("user-name"), me("ann"), "user-name")
    assert c.get("session"), "no session header"
    _, _, queue = ann.subscribe("/user/queue/messages")
    equal(queue.headers.get("seq"), "0", "seq of an empty user stream")
    ann.subscribe("/user/queue/errors")
    _, _, room = ann.subscribe(f"/topic/hall-{TAG}")
    equal(room.headers.get("seq"), "0", "seq of an empty room")
    # stomp.py's transport offers no subprotocol of its own; /ws speaks STOMP when one is offered.
    via_ws = Session(DEV_URL, f"/ws?user={me('ann')}&device=python", upgrade_headers={"Sec-WebSocket-Protocol": "v12.stomp"})
    equal(via_ws.user, me("ann"), "user-name from ?user= on /ws")


def direct_scenario():
    bob, cat, cat_phone = dev("bob"), dev("cat"), dev("cat")
    bob_q, bob_in, _ = bob.subscribe("/user/queue/messages")
    cat_q, cat_in, _ = cat.subscribe("/user/queue/messages")
    phone_q, phone_in, _ = cat_phone.subscribe("/user/queue/messages")
    body = {"text": "héllo bob ✓", "n": 1, "nested": {"a:b": "c\nd"}}
    receipt = cat.send(f"/user/{me('bob')}", body)
    equal(receipt.headers.get("seq"), "1", "seq in the sender's own stream")
    mid = receipt.headers.get("mid")
    assert mid, "no mid on the RECEIPT"
    m = bob_in.next()
    check_message(m, "/user/queue/messages", bob_q, f"user:{me('bob')}", 1, me("cat"), body, mid)
    equal(m.headers.get("to"), me("bob"), "to")
    copy = phone_in.next()
    check_message(copy, "/user/queue/messages", phone_q, f"user:{me('cat')}", 1, me("cat"), body, mid)
    reply = bob.send(f"/user/{me('cat')}", "hi cat")
    for inbox in (cat_in, phone_in):
        back = inbox.next()
        equal((back.headers.get("seq"), back.headers.get("from"), json.loads(back.body)), ("2", me("bob"), "hi cat"), "reply")
        equal(back.headers.get("message-id"), reply.headers.get("mid"), "message-id of the reply")
    cat_in.nothing(0.3)


def rooms_scenario():
    room = f"/topic/r-{TAG}"
    dan, eli, fay = dev("dan"), dev("eli"), dev("fay")
    dan_r, dan_in, _ = dan.subscribe(room)
    eli_r, eli_in, _ = eli.subscribe(room)
    event = dan_in.next(is_event)
    equal((event.headers.get("event"), json.loads(event.body)), ("join", {"user": me("eli")}), "join event")
    fay.subscribe(room)
    for inbox in (dan_in, eli_in):
        inbox.next(lambda m: is_event(m) and json.loads(m.body)["user"] == me("fay"))
    for n in range(1, 6):
        equal(fay.send(room, {"n": n}).headers.get("seq"), str(n), "receipt seq")
    for sub, inbox in ((dan_r, dan_in), (eli_r, eli_in)):
        for n in range(1, 6):
            m = inbox.next(not_event)
            check_message(m, room, sub, f"room:r-{TAG}", n, me("fay"), {"n": n})
    dan_in.nothing(0.3, not_event)


def ack_scenario():
    gus, hal = dev("gus"), dev("hal")
    _, inbox, _ = gus.subscribe("/user/queue/messages", ack="client-individual")
    for n in range(1, 6):
        hal.send(f"/user/{me('gus')}", {"n": n})
    got = []
    for n in range(1, 6):
        m = inbox.next()
        equal((m.headers.get("seq"), json.loads(m.body)), (str(n), {"n": n}), "delivery")
        equal(m.headers.get("ack"), f"user:{me('gus')}/{n}", "ack header")
        got.append(m)
    gus.conn.ack(got[0].headers["ack"])
    gus.conn.ack(got[1].headers["ack"])
    gus.conn.ack(got[2].headers["ack"], receipt="ack-3")
    gus.receipt("ack-3")
    gus.conn.disconnect(receipt="bye-gus")
    again = dev("gus")
    _, inbox, receipt = again.subscribe("/user/queue/messages", ack="client-individual")
    equal((receipt.headers.get("seq"), receipt.headers.get("truncated")), ("5", "false"), "receipt of the new subscription")
    for n in (4, 5):
        equal(inbox.next().headers.get("seq"), str(n), "after the read cursor")
    inbox.nothing(0.3)


def resume_scenario():
    room = f"/topic/resume-{TAG}"
    ida, jon = dev("ida"), dev("jon")
    _, q, _ = ida.subscribe("/user/queue/messages")
    _, r, _ = ida.subscribe(room)
    jon.subscribe(room)
    for n in (1, 2):
        jon.send(f"/user/{me('ida')}", {"dm": n})
        jon.send(room, {"room": n})
    for n in (1, 2):
        equal(q.next().headers.get("seq"), str(n), "live DM")
        equal(r.next(not_event).headers.get("seq"), str(n), "live room message")
    ida.conn.disconnect(receipt="bye-ida")
    ida.receipt("bye-ida")
    assert ida.listener.disconnected.wait(WAIT), "no disconnect after the DISCONNECT receipt"
    assert not ida.conn.is_connected(), "still connected after DISCONNECT"
    for n in (3, 4, 5):
        jon.send(f"/user/{me('ida')}", {"dm": n})
        jon.send(room, {"room": n})
    back = dev("ida")
    _, q, receipt = back.subscribe("/user/queue/messages", since="2")
    equal((receipt.headers.get("seq"), receipt.headers.get("truncated")), ("5", "false"), "receipt of the user queue")
    _, r, receipt = back.subscribe(room, since="2")
    equal((receipt.headers.get("seq"), receipt.headers.get("truncated")), ("5", "false"), "receipt of the room")
    for n in (3, 4, 5):
        m = q.next()
        equal((m.headers.get("seq"), json.loads(m.body)), (str(n), {"dm": n}), "missed DM")
        m = r.next(not_event)
        equal((m.headers.get("seq"), json.loads(m.body)), (str(n), {"room": n}), "missed room message")
    jon.send(f"/user/{me('ida')}", {"dm": 6})
    equal(q.next().headers.get("seq"), "6", "live again, no gap")
    q.nothing(0.3)
    r.nothing(0, not_event)


def refused_scenario():
    kit = dev("kit")
    _, errors, _ = kit.subscribe("/user/queue/errors", sub_id="errs")
    kit.conn.send(f"/topic/never-joined-{TAG}", "hello?", headers={"receipt": "x1"})
    refused = errors.next()
    equal((refused.headers.get("destination"), refused.headers.get("subscription")), ("/user/queue/errors", "errs"), "where")
    body = json.loads(refused.body)
    equal((body["code"], body["receipt"]), ("not_member", "x1"), "refusal")
    assert body.get("message"), "refusal without a message"
    ok = kit.send(f"/user/{me('lou')}", "still here")
    equal(ok.headers.get("seq"), "1", "a SEND after the refusal")
    kit.listener.receipts.nothing(0, lambda f: f.headers.get("receipt-id") == "x1")
    assert kit.conn.is_connected(), "the connection did not stay"
    kit.listener.errors.nothing(0)


def heartbeat_scenario():
    mo = dev("mo", heartbeats=(1000, 1000))
    equal(mo.connected.headers.get("heart-beat"), "1000,1000", "the server offers the ping interval both ways")
    time.sleep(3.5)
    assert mo.conn.is_connected(), "closed while beating"
    assert mo.listener.beats >= 2, f"server beats in 3.5 s: {mo.listener.beats}"
    print(f"  server heart-beats in 3.5 s: {mo.listener.beats}", flush=True)
    _, inbox, _ = mo.subscribe("/user/queue/messages")
    dev("ray").send(f"/user/{me('mo')}", "still there?")
    equal(json.loads(inbox.next().body), "still there?", "usable after the wait")
    equal(mo.send(f"/user/{me('ray')}", "yes").headers.get("seq"), "2", "SEND after the wait")


def jwt_scenario():
    lee = Session(JWT_URL, "/stomp", passcode=token(me("lee")))
    equal(lee.user, me("lee"), "user from passcode")
    mia = Session(JWT_URL, "/stomp", headers={"Authorization": f"Bearer {token(me('mia'))}"})
    equal(mia.user, me("mia"), "user from Authorization in CONNECT")
    ned = Session(JWT_URL, "/stomp", upgrade_headers={"Authorization": f"Bearer {token(me('ned'))}"})
    equal(ned.user, me("ned"), "user from Authorization at the upgrade")
    _, inbox, _ = mia.subscribe("/user/queue/messages")
    receipt = lee.send(f"/user/{me('mia')}", {"secret": False})
    m = inbox.next()
    equal((m.headers.get("from"), m.headers.get("message-id")), (me("lee"), receipt.headers.get("mid")), "DM")
    for bad in ({"passcode": "not-a-token"}, {"user": me("lee")}, {"passcode": token(me("lee"), "another-secret")}):
        listener = None
        try:
            s = Session(JWT_URL, "/stomp", **bad)
            raise AssertionError(f"{bad}: connected as {s.user}")
        except Refused:
            listener = OPEN[-1].listener
        error = listener.errors.next()
        assert error.headers.get("message"), f"{bad}: ERROR without a message"
        assert listener.disconnected.wait(WAIT), f"{bad}: the connection stayed open"


def mixed_scenario():
    ivy = websocket.create_connection(f"{DEV_URL.replace('http', 'ws', 1)}/ws?user={me('ivy')}", timeout=WAIT)
    welcome = json.loads(ivy.recv())
    equal((welcome["type"], welcome["user"]), ("welcome", me("ivy")), "welcome")
    jay = dev("jay")
    sub, inbox, _ = jay.subscribe("/user/queue/messages")
    ivy.send(json.dumps({"type": "send", "to": me("jay"), "body": {"text": "from json"}, "id": 1}))
    reply = json.loads(ivy.recv())
    equal((reply["type"], reply["id"]), ("reply", 1), "reply")
    m = inbox.next()
    check_message(m, "/user/queue/messages", sub, f"user:{me('jay')}", 1, me("ivy"), {"text": "from json"}, reply["mid"])
    receipt = jay.send(f"/user/{me('ivy')}", {"text": "from stomp.py"})
    back = json.loads(ivy.recv())
    equal(
        (back["type"], back["from"], back["mid"], back["body"]),
        ("message", me("jay"), receipt.headers.get("mid"), {"text": "from stomp.py"}),
        "JSON message",
    )
    ivy.close()


def main():
    checks = Checks("stomp.py")
    watchdog = threading.Timer(60, lambda: (print("FAIL the run took longer than 60 s", flush=True), os._exit(1)))
    watchdog.daemon = True
    watchdog.start()
    checks.check("connect: CONNECTED 1.2 on /stomp (login) and on /ws (v12.stomp, ?user=); subscriptions answer receipts", connect_scenario)
    checks.check(
        "direct message: SEND /user/<id> gets a RECEIPT with mid and seq; the MESSAGE has every header and the "
        "UTF-8 JSON body; the sender's other device gets its copy",
        direct_scenario,
    )
    checks.check("rooms: two subscribers get a third's messages in order; event:join arrives", rooms_scenario)
    checks.check("ack client-individual: ACKed seqs are skipped by a new subscription without since", ack_scenario)
    checks.check(
        "DISCONNECT with a receipt; SUBSCRIBE with since then gets exactly the missed messages, in order", resume_scenario
    )
    checks.check(
        "a refused SEND arrives on /user/queue/errors with code not_member and no RECEIPT; the connection stays",
        refused_scenario,
    )
    checks.check("heart-beats 1000,1000 against --ping-interval 1: up 3.5 s, server beats seen", heartbeat_scenario)
    checks.check(
        "JWT: token as passcode, as Authorization in CONNECT and at the upgrade; a bad one gets ERROR", jwt_scenario
    )
    checks.check("mixed: a JSON-protocol client (websocket-client) and stomp.py exchange direct messages", mixed_scenario)
    for session in OPEN:
        try:
            if session.conn.is_connected():
                session.conn.disconnect()
        except Exception:
            pass
    checks.finish()


if __name__ == "__main__":
    if len(sys.argv) != 3 or not os.environ.get("JWT_SECRET"):
        print("usage: JWT_SECRET=S python3 stomp_py.py DEV_URL JWT_URL", file=sys.stderr)
        sys.exit(2)
    DEV_URL, JWT_URL = sys.argv[1], sys.argv[2]
    SECRET = os.environ["JWT_SECRET"]
    main()
