//! Abuse and resource limits: frame size, UTF-8, malformed commands, rate limiting, slow readers,
//! idle connections, the connection cap, and the welcome frame.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_websockets::{ClientBuilder, Message};

use crate::support::{
    TestNode, both_modes, client_frame, metric, raw_close_code, raw_next_json, raw_upgrade, raw_upgrade_status,
    rss_kib, run_alone,
};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;

/// Messages a paced flood may be ahead of its reader: well inside `--outbound-queue 16`.
const READER_LEAD: usize = 8;

const DROPS: &str = "switchyard_outbound_queue_drops_total";

/// A `ping` command with id 1, padded with spaces to exactly `len` bytes.
fn padded_ping(len: usize) -> Vec<u8> {
    let mut text = br#"{"type":"ping","id":1}"#.to_vec();
    assert!(len >= text.len());
    text.resize(len, b' ');
    text
}

fn assert_bad_request(frame: &Value, id: Option<Value>, what: &str) {
    assert_eq!(frame["type"], "error", "{what}: {frame}");
    assert_eq!(frame["code"], "bad_request", "{what}: {frame}");
    assert!(frame["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: an error says why: {frame}");
    match id {
        Some(id) => assert_eq!(frame["id"], id, "{what}: the error carries the command's id: {frame}"),
        None => assert!(frame.get("id").is_none_or(Value::is_null), "{what}: no id to echo: {frame}"),
    }
}

both_modes! {
    async fn frames_and_fragmented_messages_above_the_size_limit_close_with_1009(mode) {
        let node = TestNode::start_mode(mode, &["--max-message-size", "1024"]).await;

        // At the limit, whole or in fragments, a command is served.
        let mut ws = raw_upgrade(&node, "user=alice").await;
        assert_eq!(raw_next_json(&mut ws).await["type"], "welcome");
        ws.write_all(&client_frame(TEXT, true, &padded_ping(1024))).await.unwrap();
        assert_eq!(raw_next_json(&mut ws).await["type"], "reply");
        let ping = padded_ping(1000);
        ws.write_all(&client_frame(TEXT, false, &ping[..500])).await.unwrap();
        ws.write_all(&client_frame(CONTINUATION, true, &ping[500..])).await.unwrap();
        assert_eq!(raw_next_json(&mut ws).await["type"], "reply", "fragments are reassembled");

        // One frame above the limit.
        ws.write_all(&client_frame(TEXT, true, &padded_ping(1025))).await.unwrap();
        assert_eq!(raw_close_code(&mut ws).await, 1009);

        // Fragments each under the limit whose sum is above it.
        let mut ws = raw_upgrade(&node, "user=bob").await;
        assert_eq!(raw_next_json(&mut ws).await["type"], "welcome");
        let big = padded_ping(1500);
        ws.write_all(&client_frame(TEXT, false, &big[..700])).await.unwrap();
        ws.write_all(&client_frame(CONTINUATION, false, &big[700..1400])).await.unwrap();
        ws.write_all(&client_frame(CONTINUATION, true, &big[1400..])).await.unwrap();
        assert_eq!(raw_close_code(&mut ws).await, 1009, "the limit holds for the whole message, not per fragment");
        node.shutdown().await;
    }
}

both_modes! {
    async fn invalid_utf8_in_a_text_frame_closes_with_1007(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut ws = raw_upgrade(&node, "user=alice").await;
        assert_eq!(raw_next_json(&mut ws).await["type"], "welcome");
        ws.write_all(&client_frame(TEXT, true, b"{\"type\":\"ping\",\"id\":\"\xff\xfe\"}")).await.unwrap();
        assert_eq!(raw_close_code(&mut ws).await, 1007);

        // Split across fragments too.
        let mut ws = raw_upgrade(&node, "user=bob").await;
        assert_eq!(raw_next_json(&mut ws).await["type"], "welcome");
        ws.write_all(&client_frame(TEXT, false, b"{\"type\":\"ping\",")).await.unwrap();
        ws.write_all(&client_frame(CONTINUATION, true, b"\"id\":\"\xc3\x28\"}")).await.unwrap();
        assert_eq!(raw_close_code(&mut ws).await, 1007);
        node.shutdown().await;
    }
}

both_modes! {
    async fn a_binary_frame_is_a_bad_request_and_the_session_goes_on(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut alice = node.connect("alice").await;
        alice.ws.send(Message::binary(&br#"{"type":"ping","id":1}"#[..])).await.unwrap();
        let error = alice.next_frame().await;
        assert_bad_request(&error, None, "binary frame");
        alice.ok(json!({"type":"ping"})).await;

        // The same from a raw client, for good measure: the frame's opcode is what counts.
        let mut ws = raw_upgrade(&node, "user=bob").await;
        assert_eq!(raw_next_json(&mut ws).await["type"], "welcome");
        ws.write_all(&client_frame(BINARY, true, b"\x00\x01\x02")).await.unwrap();
        assert_bad_request(&raw_next_json(&mut ws).await, None, "raw binary frame");
        ws.write_all(&client_frame(TEXT, true, br#"{"type":"ping","id":"after"}"#)).await.unwrap();
        let reply = raw_next_json(&mut ws).await;
        assert_eq!((&reply["type"], &reply["id"]), (&json!("reply"), &json!("after")));
        drop((alice, ws));
        node.shutdown().await;
    }
}

both_modes! {
    async fn malformed_commands_get_bad_request_and_the_session_goes_on(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut alice = node.connect("alice").await;
        let long_name = "r".repeat(129);
        let cases: Vec<(String, Option<Value>)> = vec![
            ("not json".into(), None),
            ("[1,2,3]".into(), None),
            (r#"{"type":"ping","id":1"#.into(), None),
            (r#"{"type":"fly","id":1}"#.into(), Some(json!(1))),
            (r#"{"id":"no-type"}"#.into(), Some(json!("no-type"))),
            (r#"{"type":"send","id":2,"body":{"a":1}}"#.into(), Some(json!(2))),
            (r#"{"type":"send","id":3,"to":"bob"}"#.into(), Some(json!(3))),
            (r#"{"type":"join","id":4}"#.into(), Some(json!(4))),
            (r#"{"type":"ack","id":5}"#.into(), Some(json!(5))),
            (r#"{"type":"send","id":6,"to":"bad user","body":1}"#.into(), Some(json!(6))),
            (r#"{"type":"send","id":7,"to":"","body":1}"#.into(), Some(json!(7))),
            (r#"{"type":"send","id":8,"to":"bob/../x","body":1}"#.into(), Some(json!(8))),
            (r#"{"type":"join","id":"r1","room":"lobby!"}"#.into(), Some(json!("r1"))),
            (json!({"type":"join","id":"r2","room":long_name}).to_string(), Some(json!("r2"))),
            (r#"{"type":"publish","id":9,"room":"a b","body":1}"#.into(), Some(json!(9))),
            (r#"{"type":"presence","id":10,"users":["ok","not ok"]}"#.into(), Some(json!(10))),
            (r#"{"type":"history","id":11,"stream":"lobby"}"#.into(), Some(json!(11))),
            (r#"{"type":"history","id":12,"stream":"room:lobby","limit":1001}"#.into(), Some(json!(12))),
            (r#"{"type":"history","id":13,"stream":"room:lobby","since":1,"before":5}"#.into(), Some(json!(13))),
            // Well-formed JSON whose fields have the wrong type: the id is still readable.
            (r#"{"type":"join","id":14,"room":5}"#.into(), Some(json!(14))),
            (r#"{"type":"ack","id":15,"seq":-1}"#.into(), Some(json!(15))),
        ];
        for (text, id) in cases {
            alice.send_text(&text).await;
            let frame = alice.next_frame().await;
            assert_bad_request(&frame, id, &text);
        }
        // Still usable: a good command is served and nothing else is pending.
        let reply = alice.ok(json!({"type":"join","room":"lobby"})).await;
        assert_eq!(reply["room"], "lobby");
        alice.expect_silence(100).await;
        drop(alice);
        node.shutdown().await;
    }
}

both_modes! {
    async fn rate_limit_refuses_a_burst_then_closes_a_flood_with_1008(mode) {
        let node = TestNode::start_mode(mode, &["--rate-limit", "5"]).await;
        let mut flooder = node.connect("alice&device=flood").await;
        // Same user, other session: the limit is per session.
        let mut steady = node.connect("alice&device=steady").await;

        let flood = async {
            // A burst of 15: the first 2N = 10 are served, then refusals that carry the id.
            for id in 1..=15 {
                flooder.send_json(json!({"type":"ping","id":id})).await;
            }
            let mut refused = Vec::new();
            for id in 1..=15 {
                let answer = flooder.next_frame().await;
                assert_eq!(answer["id"], id, "one answer per command, in order: {answer}");
                if answer["type"] == "error" {
                    assert_eq!(answer["code"], "rate_limited", "{answer}");
                    refused.push(id);
                } else {
                    assert!(id <= 12, "command {id} of a burst of 15 was served: {answer}");
                }
            }
            assert!(!refused.is_empty() && refused[0] > 10, "the burst allowance is 2N = 10: refused {refused:?}");
            // Keep flooding: the session is closed for abuse.
            for id in 16..200 {
                if flooder.ws.send(Message::text(json!({"type":"ping","id":id}).to_string())).await.is_err() {
                    break;
                }
            }
            assert_eq!(flooder.closed().await, (1008, Some(1008)));
        };
        let under_the_limit = async {
            // 4 per second for 3.5 s: more than the burst in total, never refused.
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            for _ in 0..15 {
                tick.tick().await;
                steady.ok(json!({"type":"ping"})).await;
            }
        };
        tokio::join!(flood, under_the_limit);
        steady.ok(json!({"type":"ping"})).await;
        drop((flooder, steady));
        node.shutdown().await;
    }
}

both_modes! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_reader_is_closed_with_4003_and_others_keep_receiving(mode) {
        let node = TestNode::start_mode(mode, &["--outbound-queue", "64", "--rate-limit", "0", "--history-size", "1000"]).await;
        let mut alice = node.connect("alice").await;
        let mut slow = node.connect("bob").await;
        let mut carol = node.connect("carol").await;
        for client in [&mut carol, &mut slow, &mut alice] {
            client.ok(json!({"type":"join","room":"firehose"})).await;
        }
        assert_eq!(node.metric_total(DROPS).await, 0.0);

        // Alice floods the room with 32 KiB messages; bob stops reading, carol keeps reading.
        let pad = "x".repeat(32 * 1024);
        let flood = async {
            let mut n = 0u64;
            loop {
                n += 1;
                alice.send_json(json!({"type":"publish","room":"firehose","body":{"n":n,"pad":pad}})).await;
                if n.is_multiple_of(25) && node.metric_total(DROPS).await >= 1.0 {
                    break;
                }
                assert!(n < 5000, "a reader that stopped reading was never closed");
            }
            let last = alice.ok(json!({"type":"publish","room":"firehose","body":{"n":n + 1,"last":true}})).await;
            last["seq"].as_u64().unwrap()
        };
        let read = async {
            let mut seq = 0;
            loop {
                let m = carol.next_message().await;
                seq += 1;
                assert_eq!(m["seq"], seq, "carol gets every message, in order");
                if m["body"]["last"] == true {
                    return seq;
                }
            }
        };
        let (last, carol_last) = tokio::join!(flood, read);
        assert_eq!(carol_last, last);

        // Bob reads again: what was on the wire, then the `disconnect` and the close, 4003.
        assert_eq!(slow.closed().await, (4003, Some(4003)));
        assert_eq!(node.metric_total(DROPS).await, 1.0, "one session dropped: bob");
        carol.ok(json!({"type":"ping"})).await;
        let reply = alice.ok(json!({"type":"publish","room":"firehose","body":"after"})).await;
        assert_eq!(carol.next_message().await["seq"], reply["seq"]);
        drop((alice, slow, carol));
        node.shutdown().await;
    }
}

/// Posts `count` broadcasts of `body` over one keep-alive HTTP connection.
/// Broadcasts `count` messages through the API, one request at a time. With `read`, a message is
/// sent only while fewer than [`READER_LEAD`] are unread by that reader.
async fn broadcast_many(
    node: &TestNode,
    count: usize,
    body: &str,
    read: Option<&std::cell::Cell<usize>>,
    mut each: impl FnMut(usize),
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let mut stream = BufReader::new(stream);
    let payload = json!({"body":{"pad":body}}).to_string();
    let request = format!(
        "POST /api/v1/broadcast HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{payload}",
        node.addr,
        payload.len()
    );
    for i in 0..count {
        while read.is_some_and(|read| i >= read.get() + READER_LEAD) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stream.get_mut().write_all(request.as_bytes()).await.unwrap();
        let mut length = 0;
        let mut status = String::new();
        stream.read_line(&mut status).await.unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "broadcast accepted: {status}");
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut answer = vec![0; length];
        stream.read_exact(&mut answer).await.unwrap();
        each(i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_a_client_that_does_not_read_is_flooded() {
    // RSS is the whole process's: measure in a process that runs nothing else.
    if !run_alone("limits::memory_stays_bounded_while_a_client_that_does_not_read_is_flooded") {
        return;
    }
    // Broadcasts belong to no stream, so the store holds nothing and what the node keeps in
    // memory is what it queued for sessions.
    let node = TestNode::start(&["--outbound-queue", "16"]).await;
    let mut stalled = raw_upgrade(&node, "user=bob").await;
    let mut reader = node.connect("carol").await;
    let pad = "x".repeat(48 * 1024);
    const COUNT: usize = 3000;

    // Warm up allocator and buffers so the baseline is not the cold start.
    broadcast_many(&node, 20, &pad, None, |_| {}).await;
    for _ in 0..20 {
        reader.next_message().await;
    }
    let baseline = rss_kib();
    let mut peak = baseline;
    let started = Instant::now();
    // The reader has the same small queue as bob: the flood waits for it, so that only bob,
    // who reads nothing, fills his queue.
    let read_count = std::cell::Cell::new(0);
    let read = async {
        for _ in 0..COUNT {
            reader.next_message().await;
            read_count.set(read_count.get() + 1);
        }
    };
    // ~140 MiB in total: an unbounded queue would hold most of it for bob.
    let flood = broadcast_many(&node, COUNT, &pad, Some(&read_count), |i| {
        if i.is_multiple_of(50) {
            peak = peak.max(rss_kib());
        }
    });
    tokio::join!(flood, read);
    peak = peak.max(rss_kib());
    let elapsed = started.elapsed();
    let grown_mib = (peak.saturating_sub(baseline)) / 1024;
    eprintln!("flood of {COUNT} x 48 KiB took {elapsed:?}; RSS {baseline} KiB -> peak {peak} KiB (+{grown_mib} MiB)");
    // The flood must be faster than the write timeout, or bob would be closed for stalled writes
    // and the test would not tell a bounded queue from an unbounded one.
    assert!(elapsed < Duration::from_secs(9), "flood too slow to be meaningful: {elapsed:?}");
    assert!(grown_mib < 40, "RSS grew by {grown_mib} MiB while flooding a client that does not read");
    assert_eq!(metric(&node.metrics().await, DROPS), 1.0, "bob was dropped for a full queue");
    assert_eq!(raw_close_code(&mut stalled).await, 4003);
    node.shutdown().await;
}

both_modes! {
    async fn a_client_that_never_answers_pings_is_closed_and_a_reading_one_stays(mode) {
        let node = TestNode::start_mode(mode, &["--ping-interval", "1"]).await;
        let mut live = node.connect("alice").await;
        let connected = Instant::now();
        // Raw TCP answers no pings; this client never writes after the upgrade.
        let mut mute = raw_upgrade(&node, "user=bob").await;

        let idle = async {
            assert_eq!(raw_next_json(&mut mute).await["type"], "welcome");
            let disconnect = raw_next_json(&mut mute).await;
            assert_eq!(disconnect, json!({"type":"disconnect","code":1001,"reason":"ping timeout"}));
            assert_eq!(raw_close_code(&mut mute).await, 1001);
            let after = connected.elapsed();
            assert!(after >= Duration::from_millis(1900) && after < Duration::from_secs(5), "closed after {after:?}");
        };
        // The library client answers pings while it reads.
        let reading = live.expect_silence(4500);
        tokio::join!(idle, reading);
        live.ok(json!({"type":"ping"})).await;
        drop((live, mute));
        node.shutdown().await;
    }
}

both_modes! {
    async fn max_connections_refuses_with_503_until_a_session_closes(mode) {
        let node = TestNode::start_mode(mode, &["--max-connections", "2"]).await;
        // The cap is per node: everything happens on one.
        let first = node.on(0);
        let mut alice = first.connect("alice").await;
        let mut bob = first.connect("bob").await;

        let (status, body) = first.refused_upgrade("/ws?user=carol", "").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        assert_eq!(metric(&first.metrics().await, "switchyard_rejected_connections_total{reason=\"capacity\"}"), 1.0);
        if mode.clustered() {
            // A full node does not make the others refuse.
            let mut elsewhere = node.on(1).connect("carol").await;
            elsewhere.ok(json!({"type":"ping"})).await;
        }
        // A refused upgrade did not use up a slot.
        let (status, _) = first.refused_upgrade("/ws?user=carol", "").await;
        assert_eq!(status, 503);

        alice.ws.close().await.unwrap();
        // The slot frees once the session has finished closing: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut carol = loop {
            let builder = ClientBuilder::new().uri(&first.ws_url("user=carol")).unwrap();
            if let Ok((ws, _)) = builder.connect().await {
                break ws;
            }
            assert!(Instant::now() < deadline, "a slot never freed after a session closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        use futures_util::StreamExt;
        let welcome = carol.next().await.unwrap().unwrap();
        assert!(welcome.as_text().unwrap().contains("\"welcome\""));
        let (status, _) = first.refused_upgrade("/ws?user=dave", "").await;
        assert_eq!(status, 503, "two sessions again: bob and carol");
        bob.ok(json!({"type":"ping"})).await;
        drop((alice, bob, carol));
        node.shutdown().await;
    }
}

both_modes! {
    async fn welcome_names_session_user_device_node_and_ping_interval(mode) {
        let node = TestNode::start_mode(mode, &["--node-id", "edge-7", "--ping-interval", "9"]).await;
        let laptop = node.connect("alice&device=laptop").await;
        let phone = node.connect("alice&device=phone").await;
        let w = &laptop.welcome;
        assert_eq!(w["type"], "welcome");
        assert_eq!(w["user"], "alice");
        assert_eq!(w["device"], "laptop");
        assert_eq!(w["node"], node.node_id(laptop.node), "the node the client is connected to");
        let expected_id = if !mode.clustered() { "edge-7".to_owned() } else { format!("edge-7-{}", laptop.node) };
        assert_eq!(w["node"], expected_id.as_str());
        assert_eq!(phone.welcome["node"], node.node_id(phone.node));
        assert_eq!(w["ping_interval"], 9);
        assert!(w["session"].as_str().is_some_and(|s| !s.is_empty()), "{w}");
        assert_ne!(laptop.session(), phone.session(), "each session has its own id");
        assert_eq!(phone.welcome["device"], "phone");

        let (status, presence) = node.http("GET", "/api/v1/users/alice/presence", None, None).await;
        assert_eq!(status, 200, "{presence}");
        let mut sessions: Vec<String> =
            presence["sessions"].as_array().unwrap().iter().map(|s| s["session"].as_str().unwrap().to_owned()).collect();
        sessions.sort();
        let mut expected = vec![laptop.session(), phone.session()];
        expected.sort();
        assert_eq!(sessions, expected, "the welcome's session id is the one the server knows");
        drop((laptop, phone));
        node.shutdown().await;
    }
}

/// The status of an upgrade request sent with these extra headers.
async fn upgrade_status(node: &TestNode, extra_headers: &str) -> u16 {
    raw_upgrade_status(node.server(0).addr, "user=origin", extra_headers).await.0
}

#[tokio::test]
async fn a_browser_from_an_origin_not_allowed_is_refused_with_403() {
    let node = TestNode::start(&["--allowed-origin", "https://chat.example.com,https://admin.example.com"]).await;
    let (status, body) = node.refused_upgrade("/ws?user=eve", "Origin: https://evil.example\r\n").await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    assert_eq!(upgrade_status(&node, "Origin: https://admin.example.com\r\n").await, 101);
    assert_eq!(upgrade_status(&node, "Origin: HTTPS://CHAT.EXAMPLE.COM\r\n").await, 101, "origins compare case-blind");
    // Not a browser: no Origin header, no check.
    let mut bob = node.connect("bob").await;
    bob.ok(json!({"type": "ping"})).await;
    assert_eq!(metric(&node.metrics().await, "switchyard_rejected_connections_total{reason=\"origin\"}"), 1.0);
    node.shutdown().await;
}

#[tokio::test]
async fn one_address_holds_at_most_its_connection_limit_and_gets_a_place_back_on_close() {
    let node = TestNode::start(&["--max-connections-per-ip", "2"]).await;
    let mut first = node.connect("a").await;
    let mut second = node.connect("b").await;
    let (status, body) = node.refused_upgrade("/ws?user=c", "").await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")), "{body}");
    assert_eq!(metric(&node.metrics().await, "switchyard_rejected_connections_total{reason=\"per_ip\"}"), 1.0);
    second.ok(json!({"type": "ping"})).await;
    first.ws.close().await.unwrap();
    drop(first);
    // The place comes back once the server has seen the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = upgrade_status(&node, "").await;
        if status == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused ({status}) after a session closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_session_joins_at_most_max_rooms_per_session() {
    let node = TestNode::start(&["--max-rooms-per-session", "3"]).await;
    let mut alice = node.connect("alice").await;
    for room in ["r1", "r2", "r3"] {
        alice.ok(json!({"type": "join", "room": room})).await;
    }
    let refused = alice.request(json!({"type": "join", "room": "r4"})).await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    // Joining a room it is already in is no new room; leaving makes space.
    alice.ok(json!({"type": "join", "room": "r2"})).await;
    alice.ok(json!({"type": "leave", "room": "r1"})).await;
    alice.ok(json!({"type": "join", "room": "r4"})).await;
    let mut bob = node.connect("bob").await;
    let room = bob.request(json!({"type": "presence", "room": "r4"})).await;
    assert_eq!(room["count"], 1, "{room}");
    node.shutdown().await;
}

#[tokio::test]
async fn a_handshake_sent_too_slowly_is_dropped_and_others_connect() {
    use tokio::io::AsyncReadExt;
    let node = TestNode::start(&["--handshake-timeout", "1"]).await;
    let mut slow = tokio::net::TcpStream::connect(node.server(0).addr).await.unwrap();
    slow.write_all(b"GET /ws?user=slow HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    // The server gives up on the headers and closes (after an HTTP 408, if it sends one).
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a slow handshake still holds its socket after 5 s");
    let after = started.elapsed();
    assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(3), "dropped after {after:?}");
    let mut bob = node.connect("bob").await;
    bob.ok(json!({"type": "ping"})).await;
    node.shutdown().await;
}

#[tokio::test]
async fn deeply_nested_json_and_huge_presence_lists_are_bad_requests_and_the_session_goes_on() {
    let node = TestNode::start(&[]).await;
    let mut alice = node.connect("alice").await;
    let nested = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    alice.send_text(&format!(r#"{{"type":"send","id":1,"to":"bob","body":{nested}}}"#)).await;
    let answer = alice.next_frame().await;
    assert_eq!((answer["type"].as_str(), answer["code"].as_str()), (Some("error"), Some("bad_request")), "{answer}");
    let users: Vec<String> = (0..5000).map(|i| format!("u{i}")).collect();
    let refused = alice.request(json!({"type": "presence", "users": users})).await;
    assert_eq!(refused["code"], "bad_request", "{refused}");
    let sent = alice.ok(json!({"type": "send", "to": "bob", "body": "still here"})).await;
    assert_eq!(sent["seq"], 1, "{sent}");
    node.shutdown().await;
}

/// The response head to `request`, sent as it is over raw TCP.
async fn response_head(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            other => panic!("no complete response head to {request:?}: {other:?} after {head:?}"),
        }
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[tokio::test]
async fn improper_upgrade_requests_get_an_http_error_not_101() {
    let node = TestNode::start(&[]).await;
    let addr = node.server(0).addr;
    let request = |method: &str, version: &str, extra: &str| {
        format!("{method} /ws?user=k {version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n")
    };
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let v13 = "Sec-WebSocket-Version: 13\r\n";
    // RFC 6455 §4.2.1: an HTTP/1.1 GET, whose key is 16 bytes in base64, given once.
    let refused = [
        ("a HEAD request", request("HEAD", "HTTP/1.1", &format!("{v13}{key}"))),
        ("an HTTP/1.0 request", request("GET", "HTTP/1.0", &format!("{v13}{key}"))),
        ("a key of 15 bytes", request("GET", "HTTP/1.1", &format!("{v13}Sec-WebSocket-Key: BwcHBwcHBwcHBwcHBwcH\r\n"))),
        ("a key that is not base64", request("GET", "HTTP/1.1", &format!("{v13}Sec-WebSocket-Key: not*a*key\r\n"))),
        ("an empty key", request("GET", "HTTP/1.1", &format!("{v13}Sec-WebSocket-Key: \r\n"))),
        ("two keys", request("GET", "HTTP/1.1", &format!("{v13}{key}Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"))),
    ];
    for (what, request) in refused {
        let head = response_head(addr, &request).await;
        assert_eq!(&head[9..12], "400", "{what}: {head}");
    }
    // A version it does not speak: refused, naming the one it does (RFC 6455 §4.4).
    let head = response_head(addr, &request("GET", "HTTP/1.1", &format!("Sec-WebSocket-Version: 8\r\n{key}"))).await;
    assert!(&head[9..12] == "400" && head.contains("\r\nsec-websocket-version: 13\r\n"), "{head}");
    let head = response_head(addr, &request("GET", "HTTP/1.1", &format!("{v13}{key}"))).await;
    assert!(head.starts_with("http/1.1 101") && head.contains("s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    node.shutdown().await;
}

/// Publishes sent together (appended together, see `commands_sent_back_to_back_are_answered_in_order`)
/// meet the rate limit one by one: the burst allowance is served, the rest refused in its place,
/// and only what was served is delivered.
#[tokio::test]
async fn publishes_sent_together_meet_the_rate_limit_one_by_one() {
    let node = TestNode::start(&["--rate-limit", "5", "--quiet-prefix", "q:"]).await;
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    alice.ok(json!({"type":"join","room":"q:limited"})).await;
    bob.ok(json!({"type":"join","room":"q:limited"})).await;
    // Two commands of the burst allowance went to the joins.
    let burst: Vec<Value> = (1..=15).map(|id| json!({"type":"publish","room":"q:limited","body":id,"id":id})).collect();
    alice.send_together(&burst).await;
    let mut served = Vec::new();
    for id in 1..=15 {
        let answer = alice.next_frame().await;
        assert_eq!(answer["id"], id, "one answer per command, in order: {answer}");
        if answer["type"] == "reply" {
            assert!(served.len() as u64 + 1 == answer["seq"].as_u64().unwrap(), "{answer}");
            served.push(id);
        } else {
            assert_eq!(answer["code"], "rate_limited", "{answer}");
        }
    }
    assert!((7..=10).contains(&served.len()), "the burst allowance (2N = 10, less the join) was served: {served:?}");
    assert_eq!(served, (1..=served.len() as u64).collect::<Vec<_>>(), "the first ones were served");
    for id in &served {
        assert_eq!(bob.next_message().await["body"], *id);
    }
    bob.expect_silence(200).await;
}
