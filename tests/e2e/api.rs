//! The server API for backends (PROTOCOL.md §5), against a live node and live clients.

use serde_json::json;

use crate::support::TestNode;

const KEY: &str = "test-api-key-1";

#[tokio::test]
async fn backends_push_direct_and_room_messages() {
    let node = TestNode::start(&["--api-key", KEY]).await;
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

#[tokio::test]
async fn api_errors_are_json_with_the_protocol_codes() {
    let node = TestNode::start(&["--api-key", KEY, "--max-message-size", "1024"]).await;
    let cases: [(&str, &str, Option<String>, u16, &str); 7] = [
        ("POST", "/api/v1/users/bad%20id/messages", Some(r#"{"body":1}"#.into()), 400, "bad_request"),
        ("POST", "/api/v1/users/bob/messages", Some("{not json".into()), 400, "bad_request"),
        ("POST", "/api/v1/users/bob/messages", Some(r#"{"from":"x"}"#.into()), 400, "bad_request"),
        ("POST", "/api/v1/users/bob/messages", Some(format!(r#"{{"body":"{}"}}"#, "x".repeat(8000))), 413, "too_large"),
        ("GET", "/api/v1/rooms/r/history?since=1&before=2", None, 400, "bad_request"),
        ("GET", "/api/v1/rooms/r/history?limit=5000", None, 400, "bad_request"),
        ("GET", "/api/v1/nothing-here", None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, answer) = node.http(method, path, body.as_deref(), Some(KEY)).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{method} {path}");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, answer) = node.http("GET", "/api/v1/nodes", None, Some("wrong-key-123")).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (401, Some("unauthorized")));
    let (status, _) = node.http("GET", "/api/v1/nodes", None, None).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn presence_history_nodes_and_disconnect() {
    let node = TestNode::start(&["--api-key", KEY, "--node-id", "n1"]).await;
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
    for s in sessions {
        assert_eq!(s["node"], "n1");
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

    let (_, nodes) = node.http("GET", "/api/v1/nodes", None, Some(KEY)).await;
    let n = &nodes["nodes"][0];
    assert_eq!((n["id"].as_str(), n["sessions"].as_u64(), n["users"].as_u64()), (Some("n1"), Some(2), Some(1)));
    assert_eq!(n["address"], node.addr.to_string());

    let (status, d) = node.http("POST", "/api/v1/users/bob/disconnect", Some(r#"{"reason":"banned"}"#), Some(KEY)).await;
    assert_eq!((status, d["sessions"].as_u64()), (200, Some(2)));
    for c in [&mut phone, &mut laptop] {
        assert_eq!(c.closed().await, (4004, Some(4004)));
    }
}

#[tokio::test]
async fn a_dev_node_without_keys_leaves_the_api_open() {
    let node = TestNode::start(&[]).await;
    let (status, _) = node.http("GET", "/api/v1/nodes", None, None).await;
    assert_eq!(status, 200);
}
