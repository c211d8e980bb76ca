//! Direct messages, multi-device, sync and ack, idempotency.

use serde_json::json;

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
