//! The OpenAPI document served at `/api/openapi.json` describes exactly the API the node serves.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::support::{TestNode, both_modes};

/// Every route of PROTOCOL.md §5, as (method, path template).
const ROUTES: &[(&str, &str)] = &[
    ("post", "/api/v1/users/{user}/messages"),
    ("post", "/api/v1/rooms/{room}/messages"),
    ("post", "/api/v1/broadcast"),
    ("get", "/api/v1/users/{user}/presence"),
    ("get", "/api/v1/rooms/{room}/presence"),
    ("get", "/api/v1/users/{user}/history"),
    ("get", "/api/v1/rooms/{room}/history"),
    ("post", "/api/v1/users/{user}/disconnect"),
    ("get", "/api/v1/nodes"),
    ("get", "/api/openapi.json"),
];

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// A concrete path for a template, with sample names.
fn sample(template: &str) -> String {
    template.replace("{user}", "alice").replace("{room}", "lobby")
}

both_modes! {
    async fn openapi_document_lists_exactly_the_served_routes(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let (status, doc) = node.http("GET", "/api/openapi.json", None, None).await;
        assert_eq!(status, 200, "{doc}");
        let version = doc["openapi"].as_str().expect("an `openapi` version string");
        assert!(version.starts_with("3."), "openapi version {version}");

        let paths = doc["paths"].as_object().expect("a `paths` object");
        let documented: BTreeSet<(String, String)> = paths
            .iter()
            .flat_map(|(path, item)| {
                let item = item.as_object().expect("a path item object");
                item.keys()
                    .filter(|k| METHODS.contains(&k.as_str()))
                    .map(|m| (m.clone(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let expected: BTreeSet<(String, String)> =
            ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        assert_eq!(documented, expected, "documented routes differ from the routes of PROTOCOL.md §5");

        // The document itself needs no key; every /api/v1 route is guarded by the global scheme.
        assert!(doc["security"].as_array().is_some_and(|s| !s.is_empty()), "a global security requirement");
        assert_eq!(doc["paths"]["/api/openapi.json"]["get"]["security"], serde_json::json!([]));

        // Every documented route is really served (the dev-mode node leaves the API open).
        for (method, template) in ROUTES {
            let path = sample(template);
            let body = match (*method, *template) {
                ("get", _) => None,
                (_, "/api/v1/users/{user}/disconnect") => Some(r#"{"reason":"openapi test"}"#),
                _ => Some(r#"{"body":{"text":"hi"},"key":"openapi-test"}"#),
            };
            let (status, answer) = node.http(&method.to_uppercase(), &path, body, None).await;
            assert!(status != 404 && status != 405, "{} {path} is not served: {status} {answer}", method.to_uppercase());
            assert_eq!(status, 200, "{} {path}: {answer}", method.to_uppercase());
        }
        // History with its query parameters.
        for path in ["/api/v1/users/alice/history?since=0&limit=10", "/api/v1/rooms/lobby/history?before=5&limit=1000"] {
            let (status, answer) = node.http("GET", path, None, None).await;
            assert_eq!(status, 200, "GET {path}: {answer}");
            assert!(answer["messages"].is_array() && answer["last_seq"].is_u64(), "GET {path}: {answer}");
        }
        node.shutdown().await;
    }
}

const KEY: &str = "openapi-test-key";

/// A documented operation: method, path template and the error statuses its responses list.
struct Operation {
    method: String,
    template: String,
    errors: BTreeSet<u16>,
}

/// Every `/api/v1` operation of the document the node serves.
async fn operations(node: &TestNode) -> Vec<Operation> {
    let (status, doc) = node.http("GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, 200, "{doc}");
    let mut found = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        if !template.starts_with("/api/v1/") {
            continue;
        }
        for (method, operation) in item.as_object().expect("a path item") {
            let responses = operation["responses"].as_object().expect("responses");
            let errors = responses.keys().map(|s| s.parse().expect("a status")).filter(|s| *s >= 400).collect();
            found.push(Operation { method: method.to_uppercase(), template: template.clone(), errors });
        }
    }
    assert_eq!(found.len(), ROUTES.len() - 1, "every /api/v1 route of PROTOCOL.md §5");
    found
}

/// A well-formed body for a route: `None` for a GET.
fn good_body(method: &str, template: &str) -> Option<String> {
    match (method, template.ends_with("/disconnect")) {
        ("GET", _) => None,
        (_, true) => Some(r#"{"reason":"openapi"}"#.to_owned()),
        _ => Some(r#"{"body":{"text":"hi"}}"#.to_owned()),
    }
}

/// Asserts the error body of §5: only `error`, with the code of `status` and a message.
fn error_body(what: &str, status: u16, body: &Value) {
    let code = body["error"]["code"].as_str().unwrap_or_else(|| panic!("{what}: no error code in {body}"));
    let expected = match status {
        400 => "bad_request",
        401 => "unauthorized",
        413 => "too_large",
        503 => "unavailable",
        other => panic!("{what}: unexpected status {other}: {body}"),
    };
    assert_eq!(code, expected, "{what}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{what}: nothing but the error: {body}");
}

/// Every error status the document lists for a route (500 aside, which nothing here can cause,
/// and 503, see the next test) is what the route answers to the request that should cause it,
/// with the error body of §5; and the route gives no error status the document does not list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_error_status_is_given_with_the_error_body_of_section_5() {
    let node = TestNode::start(&["--api-key", KEY, "--max-message-size", "1024"]).await;
    for op in operations(&node).await {
        let Operation { method, template, errors } = &op;
        let mut given = BTreeSet::new();
        let mut answer = |what: String, expected: u16, (status, body): (u16, Value)| {
            assert_eq!(status, expected, "{what}: {body}");
            error_body(&what, status, &body);
            given.insert(status);
        };
        let path = sample(template);
        let body = good_body(method, template);

        let what = format!("{method} {path} without a key");
        answer(what, 401, node.http(method, &path, body.as_deref(), None).await);

        if template.contains('{') {
            let bad = template.replace("{user}", "not%20a%20name").replace("{room}", "not%20a%20name");
            answer(format!("{method} {bad}"), 400, node.http(method, &bad, body.as_deref(), Some(KEY)).await);
            let empty = template.replace("{user}", "").replace("{room}", "");
            answer(format!("{method} {empty}"), 400, node.http(method, &empty, body.as_deref(), Some(KEY)).await);
        } else if method == "POST" {
            answer(format!("{method} {path} with [1]"), 400, node.http(method, &path, Some("[1]"), Some(KEY)).await);
        }
        if template.ends_with("/history") {
            let both = format!("{path}?since=1&before=5");
            answer(format!("{method} {both}"), 400, node.http(method, &both, None, Some(KEY)).await);
        }
        if method == "POST" {
            // --max-message-size and the 4096 bytes the API allows around a message's body.
            let large = format!(r#"{{"body":"{}"}}"#, "x".repeat(1024 + 4096));
            let what = format!("{method} {path} with {} bytes", large.len());
            answer(what, 413, node.http(method, &path, Some(&large), Some(KEY)).await);
        }
        let (status, ok) = node.http(method, &path, body.as_deref(), Some(KEY)).await;
        assert_eq!(status, 200, "{method} {path}: {ok}");

        let documented: BTreeSet<u16> = errors.iter().copied().filter(|s| ![500, 503].contains(s)).collect();
        assert_eq!(given, documented, "{method} {template}: the statuses given and those documented");
    }
    node.shutdown().await;
}

/// While the node's backends are out of reach, every route that documents 503 answers it with the
/// error body of §5, and every route documents it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_503_while_the_backends_are_out_of_reach() {
    use std::time::{Duration, Instant};
    let Some((cluster, proxy)) = crate::procs::Cluster::start_behind_proxy("openapi503") else { return };
    let node = cluster.node("n1").await;
    assert_eq!(node.readyz(Duration::from_secs(5)).await, Some(200));
    let reference = TestNode::start(&[]).await;
    let operations = operations(&reference).await;
    reference.shutdown().await;

    proxy.refuse(true);
    proxy.cut();
    crate::cluster::until("/readyz 503 with Redis out of reach", Instant::now(), Duration::from_secs(15), || async {
        node.readyz(Duration::from_secs(3)).await == Some(503)
    })
    .await;
    for Operation { method, template, errors } in operations {
        assert!(errors.contains(&503), "{method} {template} documents 503");
        let path = sample(&template);
        let body = good_body(&method, &template).map(|b| serde_json::from_str(&b).expect("JSON"));
        let what = format!("{method} {path} with Redis out of reach");
        let (status, answer) = node.http(&method, &path, body.as_ref()).await;
        assert_eq!(status, 503, "{what}: {answer}");
        error_body(&what, status, &answer);
    }
    proxy.refuse(false);
    proxy.heal();
}
