//! Time-driven behaviour with the clock paused: tokio advances it whenever every task waits, so
//! the production intervals (a 25 s ping, a token valid for an hour) are tested as they are, in
//! no real time.

use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

use crate::support::{TestNode, raw_close_code_within, raw_upgrade};

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_after_two_default_ping_intervals() {
    let node = TestNode::start(&[]).await;
    let started = tokio::time::Instant::now();
    let mut silent = raw_upgrade(&node, "user=silent").await;
    let code = raw_close_code_within(&mut silent, Duration::from_secs(300)).await;
    let waited = started.elapsed();
    assert_eq!(code, 1001);
    assert!(waited >= Duration::from_secs(50), "closed only after 2 x 25 s of silence, not {waited:?}");
    assert!(waited <= Duration::from_secs(80), "closed by the third ping, not {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn a_session_closes_with_4001_when_its_token_expires() {
    let node = TestNode::start(&["--jwt-secret", "paused-secret"]).await;
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let token =
        encode(&Header::default(), &json!({"sub": "hour", "exp": exp}), &EncodingKey::from_secret(b"paused-secret"))
            .unwrap();
    let started = tokio::time::Instant::now();
    let mut client = node.connect_bearer(&token).await;
    // A pong keeps the session alive through every ping interval of the hour.
    let closed = client.closed_within(Duration::from_secs(4000)).await;
    let waited = started.elapsed();
    assert_eq!(closed, (4001, Some(4001)));
    assert!(waited >= Duration::from_secs(3600), "not before exp: {waited:?}");
    assert!(waited <= Duration::from_secs(3600 + 61), "at exp plus the 60 s leeway: {waited:?}");
}
