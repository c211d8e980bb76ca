//! Authentication and authorization: JWT (HS256, RS256, ES256) before the upgrade, token expiry
//! while connected, dev mode, private rooms, stream access and API keys.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::support::{TestNode, both_modes};

const SECRET: &str = "test-secret-0123456789";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(alg), claims, key).expect("token signs")
}

pub fn hs256(secret: &[u8], claims: Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(secret), &claims)
}

/// A token for `sub` valid for an hour, with extra claims merged in.
pub fn claims(sub: &str, extra: Value) -> Value {
    let mut claims = json!({"sub": sub, "exp": now() + 3600});
    if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        claims.extend(extra.clone());
    }
    claims
}

/// An unsigned token (`alg: none`).
fn unsigned(claims: &Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", b64(&json!({"alg":"none","typ":"JWT"})), b64(claims))
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// Asserts an upgrade was refused with `status` and the JSON error body of §5 with `code`.
fn assert_refused((status, body): (u16, Value), expected: u16, code: &str, what: &str) {
    assert_eq!(status, expected, "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A key pair made by the openssl CLI: (private key PEM, public key file).
struct KeyPair {
    private: Vec<u8>,
    public: PathBuf,
}

fn key_pair(dir: &Path, name: &str, algorithm: &[&str]) -> KeyPair {
    let private = format!("{name}.pem");
    let public = format!("{name}.pub.pem");
    let mut args = vec!["genpkey"];
    args.extend_from_slice(algorithm);
    args.extend_from_slice(&["-out", &private]);
    openssl(dir, &args);
    openssl(dir, &["pkey", "-in", &private, "-pubout", "-out", &public]);
    KeyPair { private: std::fs::read(dir.join(&private)).unwrap(), public: dir.join(public) }
}

fn rsa_pair(dir: &Path, name: &str) -> KeyPair {
    key_pair(dir, name, &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
}

fn ec_pair(dir: &Path, name: &str) -> KeyPair {
    key_pair(dir, name, &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
}

both_modes! {
    async fn hs256_tokens_are_checked_before_the_upgrade(mode) {
        let node = TestNode::start_mode(mode, &["--jwt-secret", SECRET]).await;
        let good = hs256(SECRET.as_bytes(), claims("alice", json!({"device":"phone"})));

        let header = node.connect_bearer(&good).await;
        assert_eq!(header.welcome["user"], "alice");
        assert_eq!(header.welcome["device"], "phone", "the `device` claim names the device");
        let query = node.connect_query(&format!("token={good}&user=mallory&device=tab")).await;
        assert_eq!(query.welcome["user"], "alice", "?user= is ignored when a token is given");
        assert_eq!(query.welcome["device"], "phone", "the claim beats ?device=");
        let no_device = hs256(SECRET.as_bytes(), claims("bob", json!({})));
        let bob = node.connect_query(&format!("token={no_device}&device=tab")).await;
        assert_eq!((&bob.welcome["user"], &bob.welcome["device"]), (&json!("bob"), &json!("tab")));

        let alice_claims = claims("alice", json!({}));
        let cases = [
            ("no token, dev-style ?user=", "/ws?user=alice".to_owned(), String::new()),
            ("wrong key", "/ws".into(), bearer(&hs256(b"another-secret-0123", claims("alice", json!({}))))),
            ("wrong key in ?token=", format!("/ws?token={}", hs256(b"another-secret", alice_claims.clone())), String::new()),
            (
                "expired beyond the leeway",
                "/ws".into(),
                bearer(&hs256(SECRET.as_bytes(), json!({"sub":"alice","exp":now() - 120}))),
            ),
            ("no exp", "/ws".into(), bearer(&hs256(SECRET.as_bytes(), json!({"sub":"alice"})))),
            ("alg none", "/ws".into(), bearer(&unsigned(&claims("alice", json!({}))))),
            ("alg none in ?token=", format!("/ws?token={}", unsigned(&claims("alice", json!({})))), String::new()),
            ("no sub", "/ws".into(), bearer(&hs256(SECRET.as_bytes(), json!({"exp":now() + 3600})))),
            (
                "not yet valid",
                "/ws".into(),
                bearer(&hs256(SECRET.as_bytes(), claims("alice", json!({"nbf": now() + 600})))),
            ),
            ("sub outside the alphabet", "/ws".into(), bearer(&hs256(SECRET.as_bytes(), claims("a b", json!({}))))),
            ("not a JWT", "/ws".into(), bearer("not.a.jwt")),
            ("tampered payload", "/ws".into(), bearer(&tamper(&good))),
        ];
        for (what, path, headers) in cases {
            assert_refused(node.refused_upgrade(&path, &headers).await, 401, "unauthorized", what);
        }
        drop((header, query, bob));
        node.shutdown().await;
    }
}

/// The token with its payload swapped for another user's, keeping the signature.
fn tamper(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims("mallory", json!({})).to_string());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

both_modes! {
    async fn rs256_public_key_accepts_its_tokens_and_refuses_key_confusion(mode) {
        let dir = tempfile::tempdir().unwrap();
        let rsa = rsa_pair(dir.path(), "rsa");
        let other = rsa_pair(dir.path(), "other");
        let ec = ec_pair(dir.path(), "ec");
        let node = TestNode::start_mode(mode, &["--jwt-public-key", rsa.public.to_str().unwrap()]).await;

        let key = EncodingKey::from_rsa_pem(&rsa.private).unwrap();
        let good = sign(Algorithm::RS256, &key, &claims("alice", json!({"device":"rsa-laptop"})));
        let alice = node.connect_bearer(&good).await;
        assert_eq!((&alice.welcome["user"], &alice.welcome["device"]), (&json!("alice"), &json!("rsa-laptop")));
        let by_query = node.connect_query(&format!("token={good}")).await;
        assert_eq!(by_query.welcome["user"], "alice");

        let public_pem = std::fs::read(&rsa.public).unwrap();
        let other_key = EncodingKey::from_rsa_pem(&other.private).unwrap();
        let ec_key = EncodingKey::from_ec_pem(&ec.private).unwrap();
        let alice_claims = claims("alice", json!({}));
        let cases = [
            ("another RSA key", sign(Algorithm::RS256, &other_key, &alice_claims)),
            ("HS256 keyed with the public key PEM", hs256(&public_pem, alice_claims.clone())),
            ("ES256", sign(Algorithm::ES256, &ec_key, &alice_claims)),
            ("RS512 with the right key", sign(Algorithm::RS512, &key, &alice_claims)),
            ("expired", sign(Algorithm::RS256, &key, &json!({"sub":"alice","exp":now() - 120}))),
            ("alg none", unsigned(&claims("alice", json!({})))),
            ("missing token", String::new()),
        ];
        for (what, token) in cases {
            let headers = if token.is_empty() { String::new() } else { bearer(&token) };
            assert_refused(node.refused_upgrade("/ws", &headers).await, 401, "unauthorized", what);
        }
        drop((alice, by_query));
        node.shutdown().await;
    }
}

both_modes! {
    async fn es256_public_key_accepts_its_tokens_and_refuses_others(mode) {
        let dir = tempfile::tempdir().unwrap();
        let ec = ec_pair(dir.path(), "ec");
        let other = ec_pair(dir.path(), "other");
        let rsa = rsa_pair(dir.path(), "rsa");
        let node = TestNode::start_mode(mode, &["--jwt-public-key", ec.public.to_str().unwrap()]).await;

        let key = EncodingKey::from_ec_pem(&ec.private).unwrap();
        let good = sign(Algorithm::ES256, &key, &claims("bob", json!({"device":"ec-phone"})));
        let bob = node.connect_bearer(&good).await;
        assert_eq!((&bob.welcome["user"], &bob.welcome["device"]), (&json!("bob"), &json!("ec-phone")));

        let public_pem = std::fs::read(&ec.public).unwrap();
        let other_key = EncodingKey::from_ec_pem(&other.private).unwrap();
        let rsa_key = EncodingKey::from_rsa_pem(&rsa.private).unwrap();
        let bob_claims = claims("bob", json!({}));
        let cases = [
            ("another P-256 key", sign(Algorithm::ES256, &other_key, &bob_claims)),
            ("HS256 keyed with the public key PEM", hs256(&public_pem, bob_claims.clone())),
            ("RS256", sign(Algorithm::RS256, &rsa_key, &bob_claims)),
            ("no sub", sign(Algorithm::ES256, &key, &json!({"exp":now() + 3600}))),
            ("expired", sign(Algorithm::ES256, &key, &json!({"sub":"bob","exp":now() - 120}))),
            ("alg none", unsigned(&claims("bob", json!({})))),
        ];
        for (what, token) in cases {
            assert_refused(node.refused_upgrade("/ws", &bearer(&token)).await, 401, "unauthorized", what);
        }
        drop(bob);
        node.shutdown().await;
    }
}

both_modes! {
    async fn a_token_that_expires_while_connected_closes_with_4001(mode) {
        let node = TestNode::start_mode(mode, &["--jwt-secret", SECRET]).await;
        // Expired 55 s ago: still inside the 60 s leeway, so accepted, and due in about 5 s.
        let token = hs256(SECRET.as_bytes(), json!({"sub":"alice","exp":now() - 55}));
        let started = Instant::now();
        let mut alice = node.connect_bearer(&token).await;
        let fresh = hs256(SECRET.as_bytes(), claims("alice", json!({})));
        let mut other = node.connect_bearer(&fresh).await;
        alice.ok(json!({"type":"ping"})).await;

        assert_eq!(alice.closed().await, (4001, Some(4001)));
        let after = started.elapsed();
        assert!(after >= Duration::from_secs(3) && after < Duration::from_secs(8), "closed after {after:?}");
        other.ok(json!({"type":"ping"})).await;
        drop((alice, other));
        node.shutdown().await;
    }
}

both_modes! {
    async fn dev_mode_checks_the_user_id(mode) {
        let node = TestNode::start_mode(mode, &[]).await;
        let long = "u".repeat(129);
        for user in ["bad%20user", "a%2Fb", "%C3%A9lodie", "a%3Fb", long.as_str(), ""] {
            let path = format!("/ws?user={user}");
            assert_refused(node.refused_upgrade(&path, "").await, 400, "bad_request", &path);
        }
        assert_refused(node.refused_upgrade("/ws", "").await, 401, "unauthorized", "no user");
        assert_refused(node.refused_upgrade("/ws?device=laptop", "").await, 401, "unauthorized", "device only");
        let edge = node.connect("A-z_0.9:x@y").await;
        assert_eq!(edge.welcome["user"], "A-z_0.9:x@y", "every character of the alphabet is accepted");
        let longest = "u".repeat(128);
        assert_eq!(node.connect(&longest).await.welcome["user"], longest.as_str());
        drop(edge);
        node.shutdown().await;
    }
}

both_modes! {
    async fn private_rooms_need_the_rooms_claim_and_streams_are_guarded(mode) {
        let node = TestNode::start_mode(mode, &["--jwt-secret", SECRET]).await;
        let token = |sub: &str, rooms: Value| hs256(SECRET.as_bytes(), claims(sub, json!({ "rooms": rooms })));
        let mut team = node.connect_bearer(&token("alice", json!(["team-*"]))).await;
        let mut exact = node.connect_bearer(&token("bob", json!(["private:x"]))).await;
        let mut prefix = node.connect_bearer(&token("carol", json!(["private:*"]))).await;
        let mut none = node.connect_bearer(&hs256(SECRET.as_bytes(), claims("dave", json!({})))).await;

        let forbidden = |answer: &Value, what: &str| {
            assert_eq!(answer["type"], "error", "{what}: {answer}");
            assert_eq!(answer["code"], "forbidden", "{what}: {answer}");
        };
        forbidden(&team.request(json!({"type":"join","room":"private:x"})).await, "team-* joins private:x");
        forbidden(&none.request(json!({"type":"join","room":"private:x"})).await, "no claim joins private:x");
        forbidden(&exact.request(json!({"type":"join","room":"private:y"})).await, "private:x joins private:y");
        forbidden(&team.request(json!({"type":"history","stream":"room:private:x"})).await, "team-* reads private:x");
        forbidden(&team.request(json!({"type":"presence","room":"private:x"})).await, "team-* asks who is in private:x");
        team.ok(json!({"type":"join","room":"team-red"})).await;

        exact.ok(json!({"type":"join","room":"private:x"})).await;
        prefix.ok(json!({"type":"join","room":"private:x"})).await;
        prefix.ok(json!({"type":"join","room":"private:y"})).await;
        let sent = exact.ok(json!({"type":"publish","room":"private:x","body":"secret"})).await;
        assert_eq!(prefix.next_message().await["mid"], sent["mid"]);
        let history = exact.ok(json!({"type":"history","stream":"room:private:x"})).await;
        assert_eq!(history["last_seq"], 1);

        // A user stream is readable by its owner only.
        team.ok(json!({"type":"send","to":"bob","body":"hi"})).await;
        forbidden(&none.request(json!({"type":"history","stream":"user:bob"})).await, "dave reads bob's stream");
        forbidden(&prefix.request(json!({"type":"history","stream":"user:alice"})).await, "carol reads alice's stream");
        let own = exact.ok(json!({"type":"history","stream":"user:bob"})).await;
        assert_eq!(own["messages"][0]["body"], "hi");

        // Publishing needs membership, whatever the room.
        let answer = none.request(json!({"type":"publish","room":"lobby","body":1})).await;
        assert_eq!((&answer["type"], &answer["code"]), (&json!("error"), &json!("not_member")), "{answer}");
        let answer = team.request(json!({"type":"publish","room":"private:x","body":1})).await;
        assert_eq!(answer["code"], "not_member", "{answer}");
        none.ok(json!({"type":"join","room":"lobby"})).await;
        none.ok(json!({"type":"publish","room":"lobby","body":1})).await;
        none.ok(json!({"type":"leave","room":"lobby"})).await;
        let answer = none.request(json!({"type":"publish","room":"lobby","body":2})).await;
        assert_eq!(answer["code"], "not_member", "after leaving: {answer}");
        drop((team, exact, prefix, none));
        node.shutdown().await;
    }
}

both_modes! {
    async fn api_keys_guard_the_server_api(mode) {
        let node = TestNode::start_mode(mode, &["--api-key", "k1-long-key", "--api-key", "k2-long-key"]).await;
        for key in [None, Some("wrong-key-123"), Some("k1-long-ke"), Some("k1-long-key-and-more"), Some("")] {
            for (method, path, body) in [
                ("GET", "/api/v1/nodes", None),
                ("GET", "/api/v1/users/alice/presence", None),
                ("POST", "/api/v1/broadcast", Some(r#"{"body":"hi"}"#)),
            ] {
                let (status, answer) = node.http(method, path, body, key).await;
                assert_eq!(status, 401, "{method} {path} with {key:?}: {answer}");
                assert_eq!(answer["error"]["code"], "unauthorized", "{method} {path} with {key:?}: {answer}");
            }
        }
        for key in ["k1-long-key", "k2-long-key"] {
            let (status, answer) = node.http("GET", "/api/v1/nodes", None, Some(key)).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["nodes"].as_array().map(Vec::len), Some(node.size()), "{answer}");
        }
        let mut alice = node.connect("alice").await;
        let (status, answer) = node.http("POST", "/api/v1/broadcast", Some(r#"{"body":"hi"}"#), Some("k1-long-key")).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(alice.next_message().await["mid"], answer["mid"]);

        let (status, doc) = node.http("GET", "/api/openapi.json", None, None).await;
        assert_eq!(status, 200);
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')), "{doc}");
        let (status, health) = node.http("GET", "/healthz", None, None).await;
        assert_eq!(status, 200, "{health}");
        drop(alice);
        node.shutdown().await;

        // With a JWT key configured and no API key, the API is closed, not open.
        let node = TestNode::start_mode(mode, &["--jwt-secret", SECRET]).await;
        let (status, answer) = node.http("GET", "/api/v1/nodes", None, Some(SECRET)).await;
        assert_eq!((status, &answer["error"]["code"]), (401, &json!("unauthorized")), "{answer}");
        node.shutdown().await;
        // Dev mode without API keys leaves it open (loopback only).
        let node = TestNode::start_mode(mode, &[]).await;
        assert_eq!(node.http("GET", "/api/v1/nodes", None, None).await.0, 200);
        node.shutdown().await;
    }
}
