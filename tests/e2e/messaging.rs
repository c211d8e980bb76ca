//! Direct messages, multi-device, sync and ack, idempotency.

use serde_json::json;

use crate::support::TestNode;

#[tokio::test]
async fn direct_message_reaches_every_device_and_the_senders_others() {
    let node = TestNode::start(&[]).await;
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
    node.shutdown().await;
}
