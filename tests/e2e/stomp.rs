//! STOMP 1.2 over WebSocket (PROTOCOL.md §7), with the test client of `stomp_client`: the
//! handshake and its authentication, the destinations, receipts and refusals, framing (several
//! frames in one message, one frame over several, binary messages, escaping, NUL bodies), and
//! STOMP and JSON sessions as peers on one node and across a cluster.

use futures_util::SinkExt;
use serde_json::json;

use crate::stomp_client::{StompClient, frame};
use crate::support::{TestNode, both_modes};

both_modes! {
    /// A direct message from a JSON session reaches a STOMP session and back; rooms mix both,
    /// with presence events on the room's subscription; every node, every backend.
    async fn stomp_and_json_sessions_are_peers(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut alice = StompClient::dev(node.next_member().addr, "alice").await;
        assert_eq!(alice.connected.get("version"), "1.2");
        assert_eq!(alice.connected.get("user-name"), "alice");
        alice.subscribe("errs", "/user/queue/errors", &[]).await;
        let synced = alice.subscribe("dm", "/user/queue/messages", &[]).await;
        assert_eq!(synced.get("seq"), "0");
        let mut bob = node.connect("bob").await;

        let reply = bob.ok(json!({"type":"send","to":"alice","body":{"text":"hi"}})).await;
        let m = alice.message().await;
        assert_eq!(m.get("subscription"), "dm");
        assert_eq!(m.get("destination"), "/user/queue/messages");
        assert_eq!(m.get("message-id"), reply["mid"].as_str().unwrap());
        assert_eq!((m.seq(), m.get("stream"), m.get("from"), m.get("to")), (1, "user:alice", "bob", "alice"));
        assert_eq!(m.get("content-type"), "application/json");
        assert_eq!(m.json(), json!({"text":"hi"}));
        assert!(m.get("ts").parse::<u64>().unwrap() > 1_700_000_000_000);

        let receipt = alice.send_json("/user/bob", &json!({"text":"hello"}), "s1").await;
        assert_eq!(receipt.get("seq"), "2", "seq in alice's own stream");
        let back = bob.next_message().await;
        assert_eq!((back["from"].as_str(), back["body"]["text"].as_str()), (Some("alice"), Some("hello")));
        assert_eq!(back["mid"].as_str(), Some(receipt.get("mid")));

        let joined = alice.subscribe("room", "/topic/lobby", &[]).await;
        assert_eq!(joined.get("seq"), "0");
        bob.ok(json!({"type":"join","room":"lobby"})).await;
        let event = alice.message().await;
        assert_eq!((event.get("subscription"), event.get("event")), ("room", "join"));
        assert_eq!(event.json(), json!({"user":"bob"}));
        let presence = bob.ok(json!({"type":"presence","room":"lobby"})).await;
        assert_eq!(presence["count"], 2, "presence counts the STOMP session: {presence}");

        bob.ok(json!({"type":"publish","room":"lobby","body":"from json"})).await;
        let m = alice.message().await;
        assert_eq!((m.get("subscription"), m.get("destination"), m.seq()), ("room", "/topic/lobby", 1));
        assert_eq!(m.json(), json!("from json"));
        alice.send("SEND", &[("destination", "/topic/lobby"), ("receipt", "p1")], b"from stomp").await;
        assert_eq!(alice.receipt("p1").await.get("seq"), "2");
        let m = bob.next_message().await;
        assert_eq!((m["room"].as_str(), m["seq"].as_u64(), m["body"].as_str()), (Some("lobby"), Some(2), Some("from stomp")));

        alice.send("UNSUBSCRIBE", &[("id", "room"), ("receipt", "u1")], b"").await;
        alice.receipt("u1").await;
        let left = bob.next_frame().await;
        assert_eq!((left["event"].as_str(), left["user"].as_str()), (Some("leave"), Some("alice")));
        bob.ok(json!({"type":"publish","room":"lobby","body":"after"})).await;
        alice.silent(300).await;
        drop(bob);
        node.shutdown().await;
    }
}

both_modes! {
    /// A user with STOMP sessions on two nodes gets a direct message sent through a third once
    /// on each, in order; a `SUBSCRIBE` with `since` after a reconnection resumes with no gap and
    /// no duplicate, and `ACK` moves the read cursor that a later `SUBSCRIBE` starts from.
    async fn user_destinations_span_the_cluster_and_resume(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let first = node.next_member();
        let mut phone = StompClient::dev(first.addr, "carol").await;
        let mut laptop = StompClient::dev(node.next_member().addr, "carol").await;
        let mut dave = node.connect("dave").await;
        for device in [&mut phone, &mut laptop] {
            device.subscribe("q", "/user/queue/messages", &[("ack", "client-individual")]).await;
        }
        for i in 1..=5 {
            dave.ok(json!({"type":"send","to":"carol","body":i})).await;
        }
        for device in [&mut phone, &mut laptop] {
            for i in 1..=5u64 {
                let m = device.message().await;
                assert_eq!((m.seq(), m.json()), (i, json!(i)));
                assert_eq!(m.get("ack"), format!("user:carol/{i}"));
            }
            device.silent(100).await;
        }
        phone.send("ACK", &[("id", "user:carol/3"), ("receipt", "a3")], b"").await;
        phone.receipt("a3").await;
        phone.send("DISCONNECT", &[("receipt", "bye")], b"").await;
        phone.receipt("bye").await;
        let (_, code) = phone.closed().await;
        assert_eq!(code, Some(1000));

        for i in 6..=8 {
            dave.ok(json!({"type":"send","to":"carol","body":i})).await;
        }
        let mut phone = StompClient::dev(first.addr, "carol").await;
        let resumed = phone.subscribe("q", "/user/queue/messages", &[("since", "5")]).await;
        assert_eq!((resumed.get("seq"), resumed.get("truncated")), ("8", "false"));
        for i in 6..=8u64 {
            assert_eq!(phone.message().await.seq(), i);
        }
        phone.silent(100).await;
        let mut tablet = StompClient::dev(node.next_member().addr, "carol").await;
        tablet.subscribe("q", "/user/queue/messages", &[]).await;
        for i in 4..=8u64 {
            assert_eq!(tablet.message().await.seq(), i, "from the read cursor (3) on");
        }
        tablet.silent(100).await;
        drop(dave);
        node.shutdown().await;
    }
}

/// A refused `SEND` or `SUBSCRIBE` gets no receipt: it is reported on `/user/queue/errors` and
/// the session goes on. A frame the server cannot take (unknown command or destination, a
/// transaction) gets `ERROR`, with the `receipt-id` it asked for, and the connection closes.
#[tokio::test]
async fn refusals_are_reported_and_faults_close_with_error() {
    let node = TestNode::start(&[]).await;
    let addr = node.addr;
    let mut alice = StompClient::dev(addr, "alice").await;
    alice.subscribe("e", "/user/queue/errors", &[]).await;
    alice.send("SEND", &[("destination", "/topic/closed"), ("receipt", "x1")], b"hi").await;
    let refused = alice.message().await;
    assert_eq!((refused.get("subscription"), refused.get("destination")), ("e", "/user/queue/errors"));
    assert_eq!(refused.json()["code"], "not_member");
    assert_eq!(refused.json()["receipt"], "x1");
    let cases: [(&[(&str, &str)], &[u8], &str); 4] = [
        (&[("destination", "/user/bo b")], b"x", "bad_request"),
        (&[("destination", "/user/bob"), ("content-type", "application/json")], b"{nope", "bad_request"),
        (&[("destination", "/user/bob")], &[0xc3, 0x28], "bad_request"),
        (&[("destination", "/user/bob"), ("key", "")], b"x", "bad_request"),
    ];
    for (headers, body, code) in cases {
        alice.send("SEND", headers, body).await;
        let refused = alice.message().await;
        assert_eq!(refused.json()["code"], code, "{headers:?}: {refused:?}");
    }
    alice.send("SUBSCRIBE", &[("id", "s"), ("destination", "/topic/a b"), ("receipt", "s1")], b"").await;
    assert_eq!(alice.message().await.json()["receipt"], "s1");
    let ok = alice.send_json("/user/bob", &json!(1), "fine").await;
    assert_eq!(ok.get("seq"), "1", "the session went on");

    // Sent together: answered in order, the fault last, after the others.
    let mut together = Vec::new();
    for (destination, receipt) in
        [("/user/bob", "t1"), ("/topic/closed", "t2"), ("/user/bob", "t3"), ("/nowhere", "t4")]
    {
        together.extend(frame("SEND", &[("destination", destination), ("receipt", receipt)], b"x"));
    }
    alice.send_raw(&together, false).await;
    let (frames, code) = alice.closed().await;
    let said: Vec<(String, String)> = frames
        .iter()
        .map(|f| match f.command.as_str() {
            "MESSAGE" => ("refused".to_owned(), f.json()["receipt"].as_str().unwrap_or("").to_owned()),
            "RECEIPT" => ("receipt".to_owned(), f.get("receipt-id").to_owned()),
            other => (other.to_owned(), f.header("receipt-id").unwrap_or("").to_owned()),
        })
        .collect();
    let expected = [("receipt", "t1"), ("refused", "t2"), ("receipt", "t3"), ("ERROR", "t4")];
    assert_eq!(said, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));
    assert_eq!(frames[2].get("seq"), "3", "t1 and t3 stored, t2 not");
    assert_eq!(code, Some(1002));

    for (bad, message) in [
        (
            frame("SUBSCRIBE", &[("id", "1"), ("destination", "/queue/x"), ("receipt", "r9")], b""),
            "unknown destination",
        ),
        (frame("BEGIN", &[("transaction", "t")], b""), "transactions are not supported"),
        (b"FROB\n\n\0".to_vec(), "unknown command"),
        (frame("CONNECT", &[], b""), "already connected"),
    ] {
        let mut client = StompClient::dev(addr, "carol").await;
        client.send_raw(&bad, false).await;
        let (frames, code) = client.closed().await;
        let error = frames.iter().find(|f| f.command == "ERROR").unwrap_or_else(|| panic!("an ERROR: {frames:?}"));
        assert!(error.get("message").contains(message), "{error:?}");
        if message == "unknown destination" {
            assert_eq!(error.get("receipt-id"), "r9");
        }
        assert_eq!(code, Some(1002), "{message}");
    }
    node.shutdown().await;
}

/// The subprotocol is chosen from what the client offers and echoed; `/stomp` speaks STOMP
/// whatever is offered. Dev mode names the user in `?user=` or in `login`; with a JWT key the
/// token comes in at the upgrade, or in `CONNECT` as `passcode` or `Authorization`, and a bad
/// or missing one gets `ERROR`.
#[tokio::test]
async fn the_handshake_negotiates_and_authenticates() {
    let node = TestNode::start(&[]).await;
    let ws = format!("ws://{}/ws", node.addr);
    let c = StompClient::try_connect(&format!("{ws}?user=ann"), &["v10.stomp", "v12.stomp"], &[]).await;
    assert_eq!(c.protocol.as_deref(), Some("v12.stomp"));
    assert_eq!((c.connected.command.as_str(), c.connected.get("user-name")), ("CONNECTED", "ann"));
    let c = StompClient::try_connect(&ws, &["v11.stomp"], &[("login", "bea")]).await;
    assert_eq!((c.protocol.as_deref(), c.connected.get("user-name")), (Some("v11.stomp"), "bea"));
    let c = StompClient::try_connect(&format!("ws://{}/stomp", node.addr), &[], &[("login", "cy")]).await;
    assert_eq!((c.protocol, c.connected.get("user-name")), (None, "cy"));
    let mut c = StompClient::try_connect(&format!("ws://{}/stomp", node.addr), &[], &[]).await;
    assert_eq!(c.connected.command, "ERROR");
    assert!(c.connected.get("message").contains("dev mode"), "{:?}", c.connected);
    assert_eq!(c.closed().await.1, Some(1008));
    let mut c = StompClient::try_connect(&ws, &["v12.stomp"], &[("login", "dy"), ("accept-version", "1.0,1.1")]).await;
    assert_eq!(c.connected.command, "ERROR");
    assert_eq!(c.closed().await.1, Some(1002));
    node.shutdown().await;

    let secret = "stomp-test-secret-0123456789abcdef";
    let node = TestNode::start(&["--jwt-secret", secret]).await;
    let token = crate::auth::hs256(secret.as_bytes(), crate::auth::claims("erin", json!({})));
    let stomp = format!("ws://{}/stomp", node.addr);
    let c = StompClient::try_connect(&stomp, &[], &[("passcode", &token)]).await;
    assert_eq!(c.connected.get("user-name"), "erin");
    let bearer = format!("Bearer {token}");
    let c = StompClient::try_connect(&stomp, &[], &[("Authorization", &bearer)]).await;
    assert_eq!(c.connected.get("user-name"), "erin");
    let c = StompClient::try_connect(&format!("{stomp}?token={token}"), &[], &[]).await;
    assert_eq!(c.connected.get("user-name"), "erin");
    for headers in [&[("passcode", "not-a-token")][..], &[("login", "erin")][..]] {
        let mut c = StompClient::try_connect(&stomp, &[], headers).await;
        assert_eq!(c.connected.command, "ERROR", "{headers:?}");
        assert_eq!(c.closed().await.1, Some(1008));
    }
    node.shutdown().await;
}

/// Framing as STOMP over WebSocket allows it: several frames in one message, one frame over
/// several, binary messages, heart-beat EOLs between frames, escaped headers (a subscription id
/// with `:` and a newline comes back as it was), and a `content-length` body with NUL bytes,
/// stored as the JSON string of its text.
#[tokio::test]
async fn frames_may_be_split_batched_binary_and_escaped() {
    let node = TestNode::start(&[]).await;
    let mut alice = StompClient::dev(node.addr, "alice").await;
    let mut bob = StompClient::dev(node.addr, "bob").await;
    bob.subscribe("odd:id\nx\\", "/user/queue/messages", &[]).await;

    let mut batch = b"\n\r\n".to_vec();
    for i in 1..=3 {
        let body = json!(i).to_string();
        let receipt = format!("b{i}");
        let headers = [("destination", "/user/bob"), ("content-type", "application/json"), ("receipt", &receipt[..])];
        batch.extend(frame("SEND", &headers, body.as_bytes()));
        batch.extend_from_slice(b"\n");
    }
    alice.send_raw(&batch, false).await;
    for i in 1..=3 {
        assert_eq!(alice.receipt(&format!("b{i}")).await.get("seq"), i.to_string());
    }
    let nul = frame("SEND", &[("destination", "/user/bob"), ("content-length", "5"), ("receipt", "n")], b"a\0b\0c");
    for chunk in nul.chunks(4) {
        alice.send_raw(chunk, true).await;
    }
    alice.receipt("n").await;
    for i in 1..=3 {
        let m = bob.message().await;
        assert_eq!((m.get("subscription"), m.json()), ("odd:id\nx\\", json!(i)));
    }
    assert_eq!(bob.message().await.json(), json!("a\u{0}b\u{0}c"));
    node.shutdown().await;
}

/// Heart-beats as negotiated: with `--ping-interval 1` and `heart-beat:1000,1000` the server's
/// beats arrive about every second, a client that beats stays, and one that falls silent is
/// closed with an `ERROR` after twice the negotiated time.
#[tokio::test]
async fn heart_beats_are_sent_and_a_silent_client_is_dropped() {
    let node = TestNode::start(&["--ping-interval", "1"]).await;
    let beats = [("login", "hb"), ("heart-beat", "1000,1000")];
    let mut alive = StompClient::connect(node.addr, "", &beats).await;
    assert_eq!(alive.connected.get("heart-beat"), "1000,1000");
    let mut silent = StompClient::connect(node.addr, "", &beats).await;
    for _ in 0..4 {
        alive.send_raw(b"\n", false).await;
        alive.silent(800).await;
    }
    assert!(alive.beats >= 2, "server heart-beats seen: {}", alive.beats);
    let started = std::time::Instant::now();
    let (frames, code) = silent.closed().await;
    let error = frames.iter().find(|f| f.command == "ERROR").expect("an ERROR before the close");
    assert!(error.get("message").contains("heart-beat timeout"), "{error:?}");
    assert_eq!(code, Some(1001));
    assert!(started.elapsed() < std::time::Duration::from_secs(6), "dropped in {:?}", started.elapsed());
    let receipt = alive.send_json("/user/hb", &json!("still here"), "ok").await;
    assert_eq!(receipt.get("seq"), "1", "the beating client was kept");
    node.shutdown().await;
}

/// The node's limits hold for STOMP sessions, announced with `ERROR`: a frame over
/// `--max-message-size` closes with 1009, a flood past `--rate-limit` is refused on the error
/// queue and then closed with 1008, and `--single-session` replaces the older session (4002).
#[tokio::test]
async fn limits_apply_to_stomp_sessions() {
    let node = TestNode::start(&["--max-message-size", "4096", "--rate-limit", "5", "--single-session"]).await;
    let mut big = StompClient::dev(node.addr, "big").await;
    big.send("SEND", &[("destination", "/user/x")], &vec![b'a'; 5000]).await;
    let (frames, code) = big.closed().await;
    assert_eq!(code, Some(1009));
    assert!(frames.iter().any(|f| f.command == "ERROR"), "{frames:?}");

    let mut flood = StompClient::dev(node.addr, "flood").await;
    flood.subscribe("e", "/user/queue/errors", &[]).await;
    let mut batch = Vec::new();
    for _ in 0..12 {
        batch.extend(frame("SEND", &[("destination", "/user/x")], b"1"));
    }
    flood.send_raw(&batch, false).await;
    let refused = flood.message().await;
    assert_eq!(refused.json()["code"], "rate_limited");
    let mut closed = None;
    for _ in 0..200 {
        flood.ws.send(tokio_websockets::Message::text(String::from_utf8(batch.clone()).unwrap())).await.ok();
        if let Ok(Some(Ok(m))) =
            tokio::time::timeout(std::time::Duration::from_millis(20), futures_util::StreamExt::next(&mut flood.ws))
                .await
            && m.is_close()
        {
            closed = m.as_close().map(|(code, _)| u16::from(code));
            break;
        }
    }
    assert_eq!(closed, Some(1008), "a flood ends in a close");

    let mut first = StompClient::dev(node.addr, "solo").await;
    let _second = StompClient::dev(node.addr, "solo").await;
    let (frames, code) = first.closed().await;
    assert_eq!(code, Some(4002));
    assert!(frames.iter().any(|f| f.command == "ERROR"), "{frames:?}");
    node.shutdown().await;
}

/// A STOMP session that stops reading is closed as too slow (4003), its `ERROR` saying why once
/// it reads again, while a JSON member of the same room keeps receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stomp_reader_is_closed_with_4003() {
    let node = TestNode::start(&["--outbound-queue", "64", "--rate-limit", "0"]).await;
    let mut slow = StompClient::dev(node.addr, "slow").await;
    slow.subscribe("r", "/topic/firehose", &[]).await;
    let mut alice = node.connect("alice").await;
    alice.ok(json!({"type":"join","room":"firehose"})).await;
    let pad = "x".repeat(32 * 1024);
    let drops = "switchyard_outbound_queue_drops_total";
    let mut n = 0u64;
    while node.metric_total(drops).await < 1.0 {
        for _ in 0..25 {
            n += 1;
            alice.send_json(json!({"type":"publish","room":"firehose","body":{"n":n,"pad":pad}})).await;
        }
        assert!(n < 5000, "a STOMP reader that stopped reading was never closed");
    }
    let (frames, code) = slow.closed().await;
    assert_eq!(code, Some(4003));
    let error = frames.iter().find(|f| f.command == "ERROR").expect("an ERROR before the close");
    assert!(error.get("message").starts_with("too slow"), "{error:?}");
    let reply = alice.ok(json!({"type":"publish","room":"firehose","body":"after"})).await;
    assert!(reply["seq"].as_u64().unwrap() > n, "the room goes on");
    node.shutdown().await;
}

/// Found by wsfuzz: frames behind `CONNECT` in the same WebSocket message run at once; a
/// session that subscribes to its queue after messages came while it was not subscribed is owed
/// only what its `since` asks for (no repair brings the others back later); and a frame too large
/// closes with 1009 whether it came in one WebSocket message or several.
#[tokio::test]
async fn found_by_wsfuzz() {
    let node = TestNode::start(&["--max-message-size", "4096"]).await;
    let (mut ws, _) = StompClient::open(&format!("ws://{}/stomp", node.addr), &[]).await;
    let mut together = frame("CONNECT", &[("login", "early")], b"");
    together.extend(frame("SEND", &[("destination", "/user/x"), ("receipt", "r1")], b"hi"));
    ws.send(tokio_websockets::Message::text(String::from_utf8(together).unwrap())).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), futures_util::StreamExt::next(&mut ws))
            .await
            .expect("CONNECTED and RECEIPT without another message")
            .unwrap()
            .unwrap();
        got.extend(crate::stomp_client::parse(message.as_payload()).into_iter().flatten());
    }
    assert_eq!((got[0].command.as_str(), got[1].command.as_str()), ("CONNECTED", "RECEIPT"));
    assert_eq!(got[1].get("receipt-id"), "r1");

    let mut late = StompClient::dev(node.addr, "late").await;
    let mut sender = node.connect("sender").await;
    for i in 1..=3 {
        sender.ok(json!({"type":"send","to":"late","body":i})).await;
    }
    let receipt = late.subscribe("q", "/user/queue/messages", &[("since", "3")]).await;
    assert_eq!(receipt.get("seq"), "3");
    sender.ok(json!({"type":"send","to":"late","body":4})).await;
    assert_eq!(late.message().await.seq(), 4);
    late.silent(1500).await;

    let mut big = StompClient::dev(node.addr, "big").await;
    let frame = frame("SEND", &[("destination", "/user/x")], &vec![b'a'; 5000]);
    for chunk in frame.chunks(1000) {
        big.send_raw(chunk, false).await;
    }
    let (frames, code) = big.closed().await;
    assert_eq!(code, Some(1009));
    assert!(frames.iter().any(|f| f.command == "ERROR" && f.get("message").contains("too large")), "{frames:?}");
    node.shutdown().await;
}

/// Found by wsfuzz: a catch-up that retention cut short (`truncated`) leaves nothing owed
/// before what is kept, so the next live message is delivered, not taken for a gap that ends the
/// session with 4003; and the SENDs before a frame that does not decode are answered before the
/// ERROR.
#[tokio::test]
async fn a_truncated_catch_up_goes_on_live() {
    let node = TestNode::start(&["--history-size", "3"]).await;
    let mut sender = node.connect("sender").await;
    for i in 1..=6 {
        sender.ok(json!({"type":"send","to":"reader","body":i})).await;
    }
    let mut reader = StompClient::dev(node.addr, "reader").await;
    let receipt = reader.subscribe("q", "/user/queue/messages", &[("since", "1")]).await;
    assert_eq!((receipt.get("seq"), receipt.get("truncated")), ("6", "true"));
    for i in 4..=6 {
        assert_eq!(reader.message().await.seq(), i);
    }
    sender.ok(json!({"type":"send","to":"reader","body":7})).await;
    assert_eq!(reader.message().await.seq(), 7);
    reader.silent(1500).await;

    let mut bad = frame("SEND", &[("destination", "/user/x"), ("receipt", "kept")], b"1");
    bad.extend_from_slice(b"SEND\nno colon here\n\n\0");
    reader.send_raw(&bad, false).await;
    let (frames, code) = reader.closed().await;
    assert_eq!(frames.first().map(|f| f.command.as_str()), Some("RECEIPT"), "{frames:?}");
    assert_eq!(frames[0].get("receipt-id"), "kept");
    assert!(frames.iter().any(|f| f.command == "ERROR"), "{frames:?}");
    assert_eq!(code, Some(1002));
    node.shutdown().await;
}
