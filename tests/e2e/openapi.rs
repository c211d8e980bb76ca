//! The OpenAPI document served at `/api/openapi.json` describes exactly the API the node serves.

use std::collections::BTreeSet;

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
