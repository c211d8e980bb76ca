//! The server API for backends (PROTOCOL.md §5), against a live node and live clients.

use serde_json::{Value, json};

use crate::support::{TestNode, WAIT, both_modes};

const KEY: &str = "test-api-key-1";

both_modes! {
    async fn backends_push_direct_and_room_messages(mode) {
        let node = TestNode::start_mode(mode, &["--api-key", KEY]).await;
        let mut bob = node.connect("bob").await;
        let (status, body) =
            node.http("POST", "/api/v1/users/bob/messages", Some(r#"{"body":{"n":1},"from":"billing"}"#), Some(KEY)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["seq"], 1);
        let m = bob.next_message().await;
        assert_eq!((m["from"].as_str(), m["to"].as_str(), m["stream"].as_str()), (Some("billing"), Some("bob"), Some("user:bob")));
        assert_eq!(m["mid"], body["mid"]);

        bob.ok(json!({"type":"join","room":"news"})).await;
        let (status, body) = node.http("POST", "/api/v1/rooms/news/messages", Some(r#"{"body":"extra"}"#), Some(KEY)).await;
        assert_eq!((status, body["seq"].as_u64()), (200, Some(1)));
        let m = bob.next_message().await;
        assert_eq!((m["from"].as_str(), m["room"].as_str()), (Some("system"), Some("news")));

        // Idempotent retries through the API.
        let req = r#"{"body":"once","key":"job-7"}"#;
        let (_, first) = node.http("POST", "/api/v1/rooms/news/messages", Some(req), Some(KEY)).await;
        let (_, again) = node.http("POST", "/api/v1/rooms/news/messages", Some(req), Some(KEY)).await;
        assert_eq!(first, again);
        assert_eq!(bob.next_message().await["body"], "once");
        bob.expect_silence(200).await;
    }
}

both_modes! {
    /// PROTOCOL.md §3: a body is any JSON, `null` included; it is stored and delivered as
    /// `"body": null`, through the API and over WebSocket alike.
    async fn a_null_body_is_stored_and_delivered(mode) {
        let node = TestNode::start_mode(mode, &["--api-key", KEY]).await;
        let mut bob = node.connect("bob").await;
        bob.ok(json!({"type":"join","room":"nulls"})).await;
        let mut amy = node.connect("amy").await;
        amy.ok(json!({"type":"join","room":"nulls"})).await;
        bob.next_frame().await; // amy's presence

        for (path, stream) in [("/api/v1/users/bob/messages", "user:bob"), ("/api/v1/rooms/nulls/messages", "room:nulls")] {
            let (status, answer) = node.http("POST", path, Some(r#"{"body":null}"#), Some(KEY)).await;
            assert_eq!(status, 200, "{path}: {answer}");
            let m = bob.next_message().await;
            assert_eq!((m["stream"].as_str(), m.get("body")), (Some(stream), Some(&Value::Null)), "{m}");
        }
        let (status, answer) = node.http("POST", "/api/v1/broadcast", Some(r#"{"body":null}"#), Some(KEY)).await;
        assert_eq!(status, 200, "{answer}");
        let m = bob.next_message().await;
        assert_eq!(m.get("body"), Some(&Value::Null), "{m}");
        amy.next_message().await;
        amy.next_message().await;

        amy.ok(json!({"type":"send","to":"bob","body":null})).await;
        let m = bob.next_message().await;
        assert_eq!((m["from"].as_str(), m.get("body")), (Some("amy"), Some(&Value::Null)), "{m}");
        amy.ok(json!({"type":"publish","room":"nulls","body":null})).await;
        let m = bob.next_message().await;
        assert_eq!((m["room"].as_str(), m.get("body")), (Some("nulls"), Some(&Value::Null)), "{m}");

        let (_, history) = node.http("GET", "/api/v1/users/bob/history", None, Some(KEY)).await;
        let bodies: Vec<&Value> = history["messages"].as_array().unwrap().iter().map(|m| &m["body"]).collect();
        assert_eq!(bodies, [&Value::Null, &Value::Null], "stored as null: {history}");
        let (_, history) = node.http("GET", "/api/v1/rooms/nulls/history", None, Some(KEY)).await;
        assert!(history["messages"].as_array().unwrap().iter().all(|m| m.get("body") == Some(&Value::Null)), "{history}");
        let (status, answer) = node.http("POST", "/api/v1/users/bob/messages", Some(r#"{"from":"x"}"#), Some(KEY)).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("bad_request")), "a missing body is still refused");
    }
}

both_modes! {
    /// PROTOCOL.md §2 shows `device` in every welcome: a session whose client gave no label is
    /// welcomed as `default`, the label presence knows it by.
    async fn a_session_without_a_device_label_is_welcomed_and_listed_as_default(mode) {
        let node = TestNode::start_mode(mode, &["--api-key", KEY]).await;
        let plain = node.connect("carol").await;
        let labelled = node.connect("carol&device=phone").await;
        assert_eq!(plain.welcome["device"], "default", "{}", plain.welcome);
        assert_eq!(labelled.welcome["device"], "phone");
        let (_, p) = node.http("GET", "/api/v1/users/carol/presence", None, Some(KEY)).await;
        let device_of = |client: &crate::support::Client| {
            let session = p["sessions"].as_array().unwrap().iter().find(|s| s["session"] == json!(client.session()));
            session.map(|s| s["device"].clone())
        };
        assert_eq!((device_of(&plain), device_of(&labelled)), (Some(json!("default")), Some(json!("phone"))), "{p}");
    }
}

both_modes! {
    async fn api_errors_are_json_with_the_protocol_codes(mode) {
        let node = TestNode::start_mode(mode, &["--api-key", KEY, "--max-message-size", "1024"]).await;
        let cases: [(&str, &str, Option<String>, u16, &str); 9] = [
            ("POST", "/api/v1/users/bad%20id/messages", Some(r#"{"body":1}"#.into()), 400, "bad_request"),
            ("POST", "/api/v1/users/bob/messages", Some("{not json".into()), 400, "bad_request"),
            ("POST", "/api/v1/users/bob/messages", Some(r#"{"from":"x"}"#.into()), 400, "bad_request"),
            ("POST", "/api/v1/users/bob/messages", Some(format!(r#"{{"body":"{}"}}"#, "x".repeat(8000))), 413, "too_large"),
            ("GET", "/api/v1/rooms/r/history?since=1&before=2", None, 400, "bad_request"),
            ("GET", "/api/v1/rooms/r/history?limit=5000", None, 400, "bad_request"),
            ("GET", "/api/v1/rooms/r/history?since=9223372036854775808", None, 400, "bad_request"),
            ("GET", "/api/v1/users/bob/history?before=18446744073709551615", None, 400, "bad_request"),
            ("GET", "/api/v1/nothing-here", None, 404, "not_found"),
        ];
        for (method, path, body, status, code) in cases {
            let (got, answer) = node.http(method, path, body.as_deref(), Some(KEY)).await;
            assert_eq!(got, status, "{method} {path}: {answer}");
            assert_eq!(answer["error"]["code"], code, "{method} {path}");
            assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let (status, answer) = node.http("GET", "/api/v1/rooms/r/history?since=9223372036854775807", None, Some(KEY)).await;
        assert_eq!((status, &answer["messages"]), (200, &serde_json::json!([])), "the largest int64 is a seq: {answer}");
        let (status, answer) = node.http("POST", "/api/v1/users/bob/disconnect", Some(r#"{"reason":null}"#), Some(KEY)).await;
        assert_eq!((status, &answer["sessions"]), (200, &serde_json::json!(0)), "a null reason is the default: {answer}");
        let (status, answer) = node.http("GET", "/api/v1/nodes", None, Some("wrong-key-123")).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (401, Some("unauthorized")));
        let (status, _) = node.http("GET", "/api/v1/nodes", None, None).await;
        assert_eq!(status, 401);
    }
}

both_modes! {
    async fn presence_history_nodes_and_disconnect(mode) {
        let node = TestNode::start_mode(mode, &["--api-key", KEY, "--node-id", "n1"]).await;
        let mut phone = node.connect("bob&device=phone").await;
        let mut laptop = node.connect("bob&device=laptop").await;
        phone.ok(json!({"type":"join","room":"r"})).await;
        phone.ok(json!({"type":"publish","room":"r","body":1})).await;
        phone.ok(json!({"type":"send","to":"amy","body":2})).await;

        let (status, p) = node.http("GET", "/api/v1/users/bob/presence", None, Some(KEY)).await;
        assert_eq!(status, 200);
        assert_eq!(p["online"], true);
        let sessions = p["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 2);
        // In a cluster, phone and laptop are on different nodes (n1-0 and n1-1).
        let node_of = |session: &serde_json::Value| {
            let client = [&phone, &laptop].into_iter().find(|c| session == &json!(c.session())).expect("a known session");
            node.node_id(client.node)
        };
        for s in sessions {
            assert_eq!(s["node"], node_of(&s["session"]), "{s}");
            assert!(s["session"].is_string() && s["connected_at"].as_u64().unwrap() > 0);
        }
        let mut devices: Vec<_> = sessions.iter().map(|s| s["device"].as_str().unwrap()).collect();
        devices.sort();
        assert_eq!(devices, ["laptop", "phone"]);

        let (_, p) = node.http("GET", "/api/v1/users/nobody/presence", None, Some(KEY)).await;
        assert_eq!(p, json!({"online": false, "sessions": []}));
        let (_, r) = node.http("GET", "/api/v1/rooms/r/presence", None, Some(KEY)).await;
        assert_eq!(r, json!({"count": 1, "users": ["bob"]}));

        let (_, h) = node.http("GET", "/api/v1/rooms/r/history", None, Some(KEY)).await;
        assert_eq!((h["last_seq"].as_u64(), h["messages"][0]["body"].as_u64()), (Some(1), Some(1)));
        let (_, h) = node.http("GET", "/api/v1/users/amy/history?since=0&limit=10", None, Some(KEY)).await;
        assert_eq!(h["messages"][0]["from"], "bob");

        // Every node, with the sessions and users it holds. Other nodes' counts come from their
        // heartbeats (every 2 s), so they may take a moment to show.
        let mut expected: Vec<(String, String, u64, u64)> = node
            .members()
            .iter()
            .map(|m| {
                let here = [&phone, &laptop].iter().filter(|c| c.node == m.index).count() as u64;
                (node.node_id(m.index), m.addr.to_string(), here, here.min(1))
            })
            .collect();
        expected.sort();
        if !mode.clustered() {
            assert_eq!(expected, [("n1".to_owned(), node.addr.to_string(), 2, 1)]);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, nodes) = node.http("GET", "/api/v1/nodes", None, Some(KEY)).await;
            let mut listed: Vec<(String, String, u64, u64)> = nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    let text = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
                    let count = |k: &str| n[k].as_u64().unwrap_or(u64::MAX);
                    (text("id"), text("address"), count("sessions"), count("users"))
                })
                .collect();
            listed.sort();
            if listed == expected {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "nodes {nodes}, expected {expected:?}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }

        let (status, d) = node.http("POST", "/api/v1/users/bob/disconnect", Some(r#"{"reason":"banned"}"#), Some(KEY)).await;
        assert_eq!((status, d["sessions"].as_u64()), (200, Some(2)));
        for c in [&mut phone, &mut laptop] {
            assert_eq!(c.closed().await, (4004, Some(4004)));
        }
    }
}

/// A disconnect request may come with no body, `null`, or a null reason: each closes the user's
/// sessions with the default reason, which the `disconnect` frame carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_without_a_reason_sends_the_default_one() {
    let node = TestNode::start(&["--api-key", KEY]).await;
    for body in [None, Some("null"), Some(r#"{"reason":null}"#), Some(r#"{}"#)] {
        let mut bob = node.connect("bob").await;
        let (status, answer) = node.http("POST", "/api/v1/users/bob/disconnect", body, Some(KEY)).await;
        assert_eq!((status, answer["sessions"].as_u64()), (200, Some(1)), "body {body:?}: {answer}");
        let frame = bob.next_frame().await;
        assert_eq!(frame["type"], "disconnect", "body {body:?}: {frame}");
        assert_eq!(frame["reason"], "disconnected by the server", "body {body:?}: {frame}");
        assert_eq!(bob.closed().await.0, 4004, "body {body:?}");
    }
    let (status, answer) = node.http("POST", "/api/v1/users/bob/disconnect", Some("[]"), Some(KEY)).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("bad_request")), "{answer}");
    node.shutdown().await;
}

both_modes! {
    async fn a_dev_node_without_keys_leaves_the_api_open(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let (status, _) = node.http("GET", "/api/v1/nodes", None, None).await;
        assert_eq!(status, 200);
    }
}
