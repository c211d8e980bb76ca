//! Direct messages, multi-device, sync and ack, idempotency.

use serde_json::{Value, json};

use crate::support::{TestNode, both_modes};

both_modes! {
    async fn direct_message_reaches_every_device_and_the_senders_others(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut alice_laptop = node.connect("alice&device=laptop").await;
        let mut alice_phone = node.connect("alice&device=phone").await;
        let mut bob = node.connect("bob").await;
        let mut bob2 = node.connect("bob").await;
        assert_eq!(alice_laptop.welcome["device"], "laptop");
        assert_eq!(alice_laptop.welcome["ping_interval"], 25);

        let reply = alice_laptop.ok(json!({"type":"send","to":"bob","body":{"text":"hi"}})).await;
        assert_eq!(reply["seq"], 1, "seq in the sender's own stream");
        let mid = reply["mid"].clone();

        for bob in [&mut bob, &mut bob2] {
            let m = bob.next_message().await;
            assert_eq!(m["stream"], "user:bob");
            assert_eq!(m["seq"], 1);
            assert_eq!(m["mid"], mid);
            assert_eq!(m["from"], "alice");
            assert_eq!(m["to"], "bob");
            assert_eq!(m["body"]["text"], "hi");
            assert!(m["ts"].as_u64().unwrap() > 1_700_000_000_000);
        }
        let copy = alice_phone.next_message().await;
        assert_eq!(copy["stream"], "user:alice");
        assert_eq!(copy["mid"], mid);
        alice_laptop.expect_silence(200).await;
        drop((alice_laptop, alice_phone, bob, bob2));
        node.shutdown().await;
    }
}

both_modes! {
    async fn offline_messages_wait_in_the_stream_and_sync_starts_after_the_read_cursor(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut alice = node.connect("alice").await;
        for i in 1..=3 {
            let reply = alice.ok(json!({"type":"send","to":"carol","body":i})).await;
            assert_eq!(reply["seq"], i);
        }
        let mut carol = node.connect("carol&device=phone").await;
        let sync = carol.ok(json!({"type":"sync"})).await;
        assert_eq!(sync["seq"], 3);
        assert_eq!(sync["truncated"], false);
        for i in 1..=3 {
            let m = carol.next_message().await;
            assert_eq!((m["seq"].as_u64(), m["body"].as_u64()), (Some(i), Some(i)));
        }
        carol.ok(json!({"type":"ack","seq":2})).await;
        carol.ok(json!({"type":"ack","seq":1})).await;

        // A new device sees only what the user has not read; the cursor never moved back.
        let mut tablet = node.connect("carol&device=tablet").await;
        let sync = tablet.ok(json!({"type":"sync"})).await;
        assert_eq!(sync["seq"], 3);
        let m = tablet.next_message().await;
        assert_eq!(m["seq"], 3);
        tablet.expect_silence(200).await;

        // sync with since beyond the end is truncated and starts at the oldest kept message.
        let mut laptop = node.connect("carol").await;
        let sync = laptop.ok(json!({"type":"sync","since":99})).await;
        assert_eq!(sync["truncated"], true);
        assert_eq!(laptop.next_message().await["seq"], 1);
    }
}

both_modes! {
    async fn sync_skips_what_the_session_already_has(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut bob = node.connect("bob").await;
        let mut alice = node.connect("alice").await;
        alice.ok(json!({"type":"send","to":"bob","body":"before"})).await;
        // bob was connected: he gets it live, before any sync.
        assert_eq!(bob.next_message().await["seq"], 1);
        bob.ok(json!({"type":"send","to":"alice","body":"mine"})).await; // seq 2 in bob's stream
        alice.ok(json!({"type":"send","to":"bob","body":"after"})).await;
        assert_eq!(bob.next_message().await["seq"], 3);
        let sync = bob.ok(json!({"type":"sync","since":0})).await;
        assert_eq!(sync["seq"], 3);
        bob.expect_silence(300).await;
    }
}

both_modes! {
    async fn a_message_to_oneself_is_stored_once(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut phone = node.connect("dana&device=phone").await;
        let mut laptop = node.connect("dana&device=laptop").await;
        let reply = phone.ok(json!({"type":"send","to":"dana","body":"note"})).await;
        assert_eq!(reply["seq"], 1);
        let m = laptop.next_message().await;
        assert_eq!((m["seq"].as_u64(), m["stream"].as_str()), (Some(1), Some("user:dana")));
        phone.expect_silence(200).await;
        let history = phone.ok(json!({"type":"history","stream":"user:dana"})).await;
        assert_eq!(history["messages"].as_array().unwrap().len(), 1);
    }
}

both_modes! {
    async fn idempotency_keys_make_retries_safe(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut alice = node.connect("alice").await;
        let mut bob = node.connect("bob").await;
        let first = alice.ok(json!({"type":"send","to":"bob","body":1,"key":"k-1"})).await;
        assert_eq!(bob.next_message().await["mid"], first["mid"]);
        // Same key from another session of the same user: same answer, no second delivery.
        let mut alice2 = node.connect("alice").await;
        let again = alice2.ok(json!({"type":"send","to":"bob","body":1,"key":"k-1"})).await;
        assert_eq!((again["mid"].clone(), again["seq"].clone()), (first["mid"].clone(), first["seq"].clone()));
        // The first send's copy for alice's other devices is all alice2 ever sees.
        bob.expect_silence(200).await;
        // Another user may use the same key.
        let mut carol = node.connect("carol").await;
        let other = carol.ok(json!({"type":"send","to":"bob","body":2,"key":"k-1"})).await;
        assert_ne!(other["mid"], first["mid"]);
        assert_eq!(bob.next_message().await["body"], 2);
        // Room publishes too.
        alice.ok(json!({"type":"join","room":"r"})).await;
        let p1 = alice.ok(json!({"type":"publish","room":"r","body":"x","key":"p"})).await;
        let p2 = alice.ok(json!({"type":"publish","room":"r","body":"x","key":"p"})).await;
        assert_eq!(p1["seq"], p2["seq"]);
        let history = alice.ok(json!({"type":"history","stream":"room:r"})).await;
        assert_eq!(history["messages"].as_array().unwrap().len(), 1);
    }
}

both_modes! {
    async fn history_pages_forwards_and_backwards(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut publisher = node.connect("alice").await;
        publisher.ok(json!({"type":"join","room":"h"})).await;
        for i in 1..=10 {
            publisher.ok(json!({"type":"publish","room":"h","body":i})).await;
        }
        // Another session of the user reads (on another node in a cluster).
        let mut alice = node.connect("alice&device=reader").await;
        let seqs = |v: &serde_json::Value| -> Vec<u64> {
            v["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect()
        };
        let last = alice.ok(json!({"type":"history","stream":"room:h","limit":3})).await;
        assert_eq!((seqs(&last), last["last_seq"].as_u64()), (vec![8, 9, 10], Some(10)));
        let after = alice.ok(json!({"type":"history","stream":"room:h","since":4,"limit":2})).await;
        assert_eq!(seqs(&after), vec![5, 6]);
        let before = alice.ok(json!({"type":"history","stream":"room:h","before":4})).await;
        assert_eq!(seqs(&before), vec![1, 2, 3]);
        let empty = alice.ok(json!({"type":"history","stream":"room:never"})).await;
        assert_eq!((seqs(&empty), empty["last_seq"].as_u64()), (vec![], Some(0)));
        let both = alice.request(json!({"type":"history","stream":"room:h","since":1,"before":3})).await;
        assert_eq!(both["code"], "bad_request");
        let too_many = alice.request(json!({"type":"history","stream":"room:h","limit":1001})).await;
        assert_eq!(too_many["code"], "bad_request");
        let other = alice.request(json!({"type":"history","stream":"user:bob"})).await;
        assert_eq!(other["code"], "forbidden");
    }
}

both_modes! {
    async fn retention_keeps_the_last_history_size_messages_and_truncates_catch_up(mode) {
        let node = TestNode::start_mode(mode, &["--history-size", "5"]).await;
        let mut alice = node.connect("alice").await;
        alice.ok(json!({"type":"join","room":"r"})).await;
        for i in 1..=8 {
            alice.ok(json!({"type":"publish","room":"r","body":i})).await;
        }
        let mut bob = node.connect("bob").await;
        let join = bob.ok(json!({"type":"join","room":"r","since":1})).await;
        assert_eq!((join["seq"].as_u64(), join["truncated"].as_bool()), (Some(8), Some(true)));
        for seq in 4..=8 {
            assert_eq!(bob.next_message().await["seq"], seq);
        }
        let mut carol = node.connect("carol").await;
        let join = carol.ok(json!({"type":"join","room":"r","since":5})).await;
        assert_eq!(join["truncated"], false);
        for seq in 6..=8 {
            assert_eq!(carol.next_message().await["seq"], seq);
        }
    }
}

both_modes! {
    async fn history_ttl_expires_messages_but_not_seqs(mode) {
        let node = TestNode::start_mode(mode, &["--history-ttl", "1"]).await;
        let mut alice = node.connect("alice").await;
        alice.ok(json!({"type":"send","to":"bob","body":"old"})).await;
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let reply = alice.ok(json!({"type":"send","to":"bob","body":"new"})).await;
        assert_eq!(reply["seq"], 2, "seqs continue after expiry");
        let mut bob = node.connect("bob").await;
        let sync = bob.ok(json!({"type":"sync","since":0})).await;
        assert_eq!(sync["truncated"], true, "message 1 expired");
        let m = bob.next_message().await;
        assert_eq!((m["seq"].as_u64(), m["body"].as_str()), (Some(2), Some("new")));
    }
}

both_modes! {
    /// Commands sent back to back, in one write, are appended together where they are `send`s
    /// and `publish`es: each still gets its own answer, in the order sent, a refused one among
    /// them and a command of another kind in its place, and the others receive every message
    /// once, in order.
    async fn commands_sent_back_to_back_are_answered_in_order(mode) {
        let node = TestNode::start_mode(mode, &["--rate-limit", "0"]).await;
        let mut alice = node.connect("alice").await;
        let mut bob = node.next_member().connect("bob").await;
        alice.ok(json!({"type":"join","room":"pipe"})).await;
        bob.ok(json!({"type":"join","room":"pipe"})).await;
        // Bob's join may reach alice's node after his reply (RabbitMQ confirms a publish and
        // delivers it concurrently): wait for it, or it could follow her last answer.
        let joined = alice.next_frame().await;
        assert_eq!((joined["event"].as_str(), joined["user"].as_str()), (Some("join"), Some("bob")), "{joined}");
        let mut frames: Vec<Value> = (1..=70).map(|i| json!({"type":"publish","room":"pipe","body":i,"id":i})).collect();
        frames.insert(10, json!({"type":"publish","room":"elsewhere","body":"x","id":"not-member"}));
        frames.insert(20, json!({"type":"history","stream":"room:pipe","limit":1,"id":"between"}));
        frames.insert(30, json!({"type":"send","to":"bob","body":"dm","id":"dm"}));
        frames.insert(40, json!({"type":"publish","room":"pipe","body":"no id"}));
        alice.send_together(&frames).await;
        let mut room_seq = 0;
        for sent in &frames {
            if sent["type"] == "publish" && sent["room"] == "pipe" {
                room_seq += 1;
            }
            let Some(id) = sent.get("id") else { continue };
            // Presence events (bob joining) may come between the answers.
            let answer = loop {
                let frame = alice.next_frame().await;
                if frame["type"] != "presence" {
                    break frame;
                }
            };
            assert_eq!(&answer["id"], id, "answers come in the order sent: {answer}");
            match id.as_str() {
                Some("not-member") => assert_eq!(answer["code"], "not_member", "{answer}"),
                Some("between") => assert_eq!(answer["type"], "reply", "{answer}"),
                Some("dm") => assert_eq!(answer["seq"], 1, "{answer}"),
                _ => {
                    assert_eq!((&answer["type"], &answer["seq"]), (&json!("reply"), &json!(room_seq)), "{answer}");
                }
            }
        }
        assert_eq!(room_seq, 71);
        let (mut room, mut direct) = (Vec::new(), Vec::new());
        while room.len() + direct.len() < 72 {
            let message = bob.next_message().await;
            match message["room"].as_str() {
                Some("pipe") => room.push(message["seq"].as_u64().unwrap()),
                _ => direct.push(message["body"].clone()),
            }
        }
        assert_eq!(room, (1..=71).collect::<Vec<u64>>(), "every room message once, in order");
        assert_eq!(direct, [json!("dm")]);
        bob.expect_silence(200).await;
        alice.expect_silence(200).await;
    }
}

/// Commands sent together with the close frame are all answered before the server's close:
/// gathering commands sent back to back never reads past a control frame.
#[tokio::test]
async fn commands_sent_with_the_close_frame_are_answered_before_it() {
    use futures_util::SinkExt;
    let node = TestNode::start(&["--quiet-prefix", "q:"]).await;
    let mut alice = node.connect("alice").await;
    alice.ok(json!({"type":"join","room":"q:closing"})).await;
    for id in 1..=5 {
        let publish = json!({"type":"publish","room":"q:closing","body":id,"id":id});
        alice.ws.feed(tokio_websockets::Message::text(publish.to_string())).await.unwrap();
    }
    alice.ws.feed(tokio_websockets::Message::close(None, "")).await.unwrap();
    alice.ws.flush().await.unwrap();
    for id in 1..=5 {
        let answer = alice.next_frame().await;
        assert_eq!((&answer["id"], &answer["seq"]), (&json!(id), &json!(id)), "{answer}");
    }
}

both_modes! {
    /// Names may hold dots, which some buses use as separators (RabbitMQ's routing keys, NATS
    /// subjects): `a.b` is one user and one room, never `a` and `b`.
    async fn names_with_dots_are_one_name(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut dotted = node.connect("a.b").await;
        let mut a = node.connect("a").await;
        let mut b = node.connect("b").await;
        let mut sender = node.connect("sender").await;
        for (client, room) in [(&mut dotted, "x.y"), (&mut a, "x"), (&mut b, "y")] {
            client.ok(json!({"type":"join","room":room})).await;
        }
        sender.ok(json!({"type":"send","to":"a.b","body":"to a.b"})).await;
        sender.ok(json!({"type":"send","to":"a","body":"to a"})).await;
        let (status, _) = node.http("POST", "/api/v1/rooms/x.y/messages", Some(r#"{"body":"in x.y"}"#), None).await;
        assert_eq!(status, 200);
        let (status, _) = node.http("POST", "/api/v1/rooms/y/messages", Some(r#"{"body":"in y"}"#), None).await;
        assert_eq!(status, 200);

        let got = |m: Value| (m["stream"].as_str().unwrap_or_default().to_owned(), m["body"].clone());
        // Two streams: in either order (a faulty bus delays one of them).
        let mut both = vec![got(dotted.next_message().await), got(dotted.next_message().await)];
        both.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(both, [("room:x.y".to_owned(), json!("in x.y")), ("user:a.b".to_owned(), json!("to a.b"))]);
        assert_eq!(got(a.next_message().await), ("user:a".to_owned(), json!("to a")));
        assert_eq!(got(b.next_message().await), ("room:y".to_owned(), json!("in y")));
        for client in [&mut dotted, &mut a, &mut b] {
            client.expect_silence(300).await;
        }
        drop((dotted, a, b, sender));
        node.shutdown().await;
    }
}
