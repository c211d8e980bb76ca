//! `--trusted-proxy`: the client's address (for `--max-connections-per-ip` and logs) is read from
//! `X-Forwarded-For` / `Forwarded` only when the peer is a trusted proxy; anyone else's forwarding
//! headers change nothing.

use serde_json::Value;
use tokio::net::TcpStream;

use crate::support::{TestNode, metric, raw_upgrade_status};

const PER_IP: &str = "switchyard_rejected_connections_total{reason=\"per_ip\"}";

/// Opens a session whose upgrade carries `headers` (each ending in CRLF); answers the status and,
/// when it was accepted, the open stream (which holds the session).
async fn open(node: &TestNode, user: &str, headers: &str) -> (u16, Option<TcpStream>) {
    let (status, stream) = raw_upgrade_status(node.addr, &format!("user={user}"), headers).await;
    (status, (status == 101).then_some(stream))
}

async fn refused(node: &TestNode, user: &str, headers: &str) -> Value {
    let (status, body) = node.refused_upgrade(&format!("/ws?user={user}"), headers).await;
    assert_eq!(status, 429, "{user} with {headers:?}: {body}");
    body
}

#[tokio::test]
async fn an_untrusted_client_cannot_spoof_its_address_with_forwarding_headers() {
    // The trusted network is elsewhere: the loopback peer's headers are not believed.
    let node = TestNode::start(&["--max-connections-per-ip", "2", "--trusted-proxy", "10.0.0.0/8"]).await;
    let (status, _a) = open(&node, "a", "X-Forwarded-For: 1.2.3.4\r\n").await;
    assert_eq!(status, 101);
    let (status, _b) = open(&node, "b", "Forwarded: for=5.6.7.8\r\n").await;
    assert_eq!(status, 101);
    // Two sessions from 127.0.0.1 whatever they claimed: a third fresh claim is still refused.
    let body = refused(&node, "c", "X-Forwarded-For: 9.9.9.9\r\n").await;
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    refused(&node, "d", "Forwarded: for=\"[2001:db8::9]:443\"\r\nX-Forwarded-For: 10.0.0.7, 9.9.9.8\r\n").await;
    assert_eq!(metric(&node.metrics().await, PER_IP), 2.0);
    node.shutdown().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_address_gets_its_own_allowance() {
    let node = TestNode::start(&["--max-connections-per-ip", "2", "--trusted-proxy", "127.0.0.1/32"]).await;
    let mut held = Vec::new();
    // Client 1.2.3.4 behind the proxy: two sessions, then refused.
    for user in ["a1", "a2"] {
        let (status, stream) = open(&node, user, "X-Forwarded-For: 1.2.3.4\r\n").await;
        assert_eq!(status, 101, "{user}");
        held.push(stream);
    }
    refused(&node, "a3", "X-Forwarded-For: 1.2.3.4\r\n").await;
    // The client's own left-hand claim does not help it: the proxy's right-most entry counts.
    refused(&node, "a4", "X-Forwarded-For: 7.7.7.7, 1.2.3.4\r\n").await;
    // Nor does a trusted hop between (skipped), nor the port a proxy may add.
    refused(&node, "a5", "X-Forwarded-For: 1.2.3.4:5555, 127.0.0.1\r\n").await;
    // Client 5.6.7.8 has an allowance of its own, however its proxy writes the address.
    let (status, stream) = open(&node, "b1", "X-Forwarded-For: 5.6.7.8\r\n").await;
    assert_eq!(status, 101);
    held.push(stream);
    let (status, stream) = open(&node, "b2", "Forwarded: for=5.6.7.8;proto=http\r\n").await;
    assert_eq!(status, 101);
    held.push(stream);
    refused(&node, "b3", "Forwarded: for=\"5.6.7.8:80\"\r\n").await;
    // IPv6 in RFC 7239's quoted form.
    let (status, stream) = open(&node, "c1", "Forwarded: for=\"[2001:db8:cafe::17]:4711\"\r\n").await;
    assert_eq!(status, 101);
    held.push(stream);
    // Unusable headers count as the proxy itself (127.0.0.1), which has its own two places.
    for (user, headers) in [("p1", "X-Forwarded-For: garbage\r\n"), ("p2", "Forwarded: for=unknown\r\n")] {
        let (status, stream) = open(&node, user, headers).await;
        assert_eq!(status, 101, "{user}");
        held.push(stream);
    }
    refused(&node, "p3", "").await;
    assert_eq!(metric(&node.metrics().await, PER_IP), 5.0);
    // Closing one of 1.2.3.4's sessions gives that address a place back.
    drop(held.remove(0));
    let mut reopened = None;
    for _ in 0..100 {
        let (status, stream) = open(&node, "a6", "X-Forwarded-For: 1.2.3.4\r\n").await;
        if status == 101 {
            reopened = stream;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(reopened.is_some(), "1.2.3.4 got its place back");
    node.shutdown().await;
}
