//! Rooms: join, publish, leave, presence events, catch-up without gaps or duplicates.

use std::collections::BTreeSet;

use serde_json::json;

use crate::support::{TestNode, both_modes};

both_modes! {
    async fn members_get_room_messages_and_the_publisher_gets_a_reply(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut alice = node.connect("alice").await;
        let mut bob = node.connect("bob").await;
        let mut outsider = node.connect("eve").await;
        let join = alice.ok(json!({"type":"join","room":"lobby"})).await;
        assert_eq!((join["room"].as_str(), join["seq"].as_u64(), join["truncated"].as_bool()), (Some("lobby"), Some(0), Some(false)));
        bob.ok(json!({"type":"join","room":"lobby"})).await;
        let presence = alice.next_frame().await;
        assert_eq!(presence, json!({"type":"presence","room":"lobby","event":"join","user":"bob"}));

        let reply = alice.ok(json!({"type":"publish","room":"lobby","body":{"t":"hello"}})).await;
        assert_eq!(reply["seq"], 1);
        let m = bob.next_message().await;
        assert_eq!((m["stream"].as_str(), m["room"].as_str(), m["from"].as_str()), (Some("room:lobby"), Some("lobby"), Some("alice")));
        assert_eq!(m["mid"], reply["mid"]);
        outsider.expect_silence(200).await;

        let not_member = outsider.request(json!({"type":"publish","room":"lobby","body":1})).await;
        assert_eq!(not_member["code"], "not_member");

        bob.ok(json!({"type":"leave","room":"lobby"})).await;
        assert_eq!(alice.next_frame().await, json!({"type":"presence","room":"lobby","event":"leave","user":"bob"}));
        alice.ok(json!({"type":"publish","room":"lobby","body":2})).await;
        bob.expect_silence(200).await;
        let not_joined = bob.request(json!({"type":"leave","room":"lobby"})).await;
        assert_eq!(not_joined["code"], "not_member");
    }
}

both_modes! {
    async fn a_user_enters_a_room_once_whatever_their_sessions(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut watcher = node.connect("watcher").await;
        watcher.ok(json!({"type":"join","room":"r"})).await;
        let mut bob1 = node.connect("bob").await;
        let mut bob2 = node.connect("bob").await;
        bob1.ok(json!({"type":"join","room":"r"})).await;
        bob2.ok(json!({"type":"join","room":"r"})).await;
        assert_eq!(watcher.next_frame().await["event"], "join");
        watcher.expect_silence(200).await;
        let presence = watcher.ok(json!({"type":"presence","room":"r"})).await;
        assert_eq!(presence["count"], 2);
        assert_eq!(presence["users"], json!(["bob", "watcher"]));
        drop(bob1);
        watcher.expect_silence(300).await;
        drop(bob2);
        assert_eq!(watcher.next_frame().await, json!({"type":"presence","room":"r","event":"leave","user":"bob"}));
        let presence = watcher.ok(json!({"type":"presence","room":"r"})).await;
        assert_eq!(presence["count"], 1);
    }
}

both_modes! {
    async fn quiet_rooms_have_no_presence_events(mode) {
        let node = TestNode::start_mode(mode, &["--quiet-prefix", "live:"]).await;
        let mut a = node.connect("a").await;
        let mut b = node.connect("b").await;
        a.ok(json!({"type":"join","room":"live:show"})).await;
        b.ok(json!({"type":"join","room":"live:show"})).await;
        a.expect_silence(200).await;
        let presence = a.ok(json!({"type":"presence","room":"live:show"})).await;
        assert_eq!(presence["count"], 2, "presence is still queryable");
    }
}

both_modes! {
    async fn join_since_catches_up_then_goes_live_in_order(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut alice = node.connect("alice").await;
        alice.ok(json!({"type":"join","room":"r"})).await;
        for i in 1..=5 {
            alice.ok(json!({"type":"publish","room":"r","body":i})).await;
        }
        let mut bob = node.connect("bob").await;
        let join = bob.ok(json!({"type":"join","room":"r","since":2})).await;
        assert_eq!((join["seq"].as_u64(), join["truncated"].as_bool()), (Some(5), Some(false)));
        alice.ok(json!({"type":"publish","room":"r","body":6})).await;
        for seq in 3..=6 {
            assert_eq!(bob.next_message().await["seq"], seq);
        }
        // Without since, only what comes after the join.
        let mut carol = node.connect("carol").await;
        let join = carol.ok(json!({"type":"join","room":"r"})).await;
        assert_eq!(join["seq"], 6);
        alice.ok(json!({"type":"publish","room":"r","body":7})).await;
        assert_eq!(carol.next_message().await["seq"], 7);
    }
}

both_modes! {
    /// Publishers hammer a room while a client joins with `since: 0`: it must end with every seq
    /// exactly once, in order, whatever was stored and whatever was live at the moment of the join.
    async fn catch_up_races_with_concurrent_publishes_without_gap_or_duplicate(mode) {
        let node = TestNode::start_mode(mode, &["--rate-limit", "0", "--quiet-prefix", "race"]).await;
        const PER_PUBLISHER: u64 = 150;
        let mut publishers = Vec::new();
        for p in 0..3 {
            let mut client = node.connect(&format!("pub{p}")).await;
            client.ok(json!({"type":"join","room":"race"})).await;
            publishers.push(tokio::spawn(async move {
                for i in 0..PER_PUBLISHER {
                    client.ok(json!({"type":"publish","room":"race","body":i})).await;
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let mut reader = node.connect("reader").await;
        reader.ok(json!({"type":"join","room":"race","since":0})).await;
        let total = 3 * PER_PUBLISHER;
        let mut got = Vec::new();
        while (got.len() as u64) < total {
            got.push(reader.next_message().await["seq"].as_u64().unwrap());
        }
        for p in publishers {
            p.await.unwrap();
        }
        let expected: Vec<u64> = (1..=total).collect();
        assert_eq!(got, expected, "every seq once, in order");
        reader.expect_silence(200).await;
        let distinct: BTreeSet<_> = got.iter().collect();
        assert_eq!(distinct.len() as u64, total);
    }
}

both_modes! {
    async fn sync_races_with_concurrent_direct_messages(mode) {
        let node = TestNode::start_mode(mode, &["--rate-limit", "0"]).await;
        const COUNT: u64 = 300;
        let mut sender = node.connect("sender").await;
        let writer = tokio::spawn(async move {
            for i in 0..COUNT {
                sender.ok(json!({"type":"send","to":"target","body":i})).await;
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let mut target = node.connect("target").await;
        target.ok(json!({"type":"sync","since":0})).await;
        let mut got = Vec::new();
        while (got.len() as u64) < COUNT {
            got.push(target.next_message().await["seq"].as_u64().unwrap());
        }
        writer.await.unwrap();
        // Live messages that arrived before the sync reply may precede older catch-up ones; each
        // seq still arrives exactly once.
        let distinct: BTreeSet<_> = got.iter().copied().collect();
        assert_eq!(distinct, (1..=COUNT).collect());
        target.expect_silence(200).await;
    }
}

both_modes! {
    async fn broadcast_reaches_every_connected_session(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut a = node.connect("a").await;
        let mut b = node.connect("b").await;
        let (status, body) = node.http("POST", "/api/v1/broadcast", Some(r#"{"body":{"alert":"maintenance"}}"#), None).await;
        assert_eq!(status, 200, "{body}");
        for c in [&mut a, &mut b] {
            let m = c.next_message().await;
            assert_eq!(m["stream"], "broadcast");
            assert_eq!(m["from"], "system");
            assert_eq!(m["mid"], body["mid"]);
            assert!(m.get("seq").is_none());
        }
    }
}

both_modes! {
    async fn user_presence_counts_sessions(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let mut a = node.connect("a").await;
        let _b1 = node.connect("b").await;
        let _b2 = node.connect("b").await;
        let reply = a.ok(json!({"type":"presence","users":["a","b","c"]})).await;
        assert_eq!(reply["users"], json!({"a":{"online":true,"sessions":1},"b":{"online":true,"sessions":2},"c":{"online":false,"sessions":0}}));
    }
}

both_modes! {
    /// Joins and leaves that race each other are announced in batches (one publish for the events
    /// raised while the room's previous one was in flight): every member still hears of every user
    /// exactly once, a join before that user's leave.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_joins_and_leaves_is_announced_once_per_user(mode) {
        const USERS: usize = 16;
        let node = TestNode::start_mode(mode, &[]).await;
        let mut watcher = node.connect("watcher").await;
        watcher.ok(json!({"type":"join","room":"burst"})).await;
        let mut members = Vec::new();
        for i in 0..USERS {
            members.push(node.connect(&format!("m{i}")).await);
        }
        let users: BTreeSet<String> = (0..USERS).map(|i| format!("m{i}")).collect();

        let joins = members.iter_mut().map(|m| m.ok(json!({"type":"join","room":"burst"})));
        futures_util::future::join_all(joins).await;
        let mut joined = BTreeSet::new();
        for _ in 0..USERS {
            let event = watcher.next_frame().await;
            assert_eq!((event["type"].as_str(), event["event"].as_str()), (Some("presence"), Some("join")), "{event}");
            assert!(joined.insert(event["user"].as_str().unwrap_or_default().to_owned()), "announced twice: {event}");
        }
        assert_eq!(joined, users);
        watcher.expect_silence(200).await;

        drop(members);
        let mut left = BTreeSet::new();
        for _ in 0..USERS {
            let event = watcher.next_frame().await;
            assert_eq!((event["type"].as_str(), event["event"].as_str()), (Some("presence"), Some("leave")), "{event}");
            assert!(left.insert(event["user"].as_str().unwrap_or_default().to_owned()), "announced twice: {event}");
        }
        assert_eq!(left, users);
        watcher.expect_silence(200).await;
    }
}
