//! The checks every bus passes, one per test (see `bus_suite!`). They take every node of a
//! cluster (one for the memory bus) and publish from the last one, so that on a cluster the
//! events cross from one node to another.

use super::*;

/// An event published right after `subscribe` returned reaches the subscriber: subscribing
/// waits until the node receives the topic's events.
pub(crate) async fn subscribe_returns_once_events_of_the_topic_are_received(nodes: &[BusNode]) {
    let (first, publisher) = (&nodes[0], nodes.last().unwrap());
    for i in 0..10 {
        let topic = if i % 2 == 0 { room_topic(&format!("sub-{i}")) } else { user_topic(&format!("u{i}")) };
        first.bus.subscribe(&topic).await.unwrap();
        publisher.bus.publish(topic.clone(), event(&format!("e{i}"))).await.unwrap();
        assert!(first.sink.received(&topic, &format!("e{i}")).await, "{topic:?}: the first event was lost");
    }
}

/// A topic's event reaches every node subscribed to it, once, and no other node; an event of a
/// topic nobody subscribed to reaches nobody.
pub(crate) async fn an_event_reaches_every_subscribed_node_and_only_those(nodes: &[BusNode]) {
    let (some, none) = (user_topic("alice"), room_topic("nobody"));
    let subscribed = |i: usize| i % 2 == 0;
    for (i, node) in nodes.iter().enumerate() {
        if subscribed(i) {
            node.bus.subscribe(&some).await.unwrap();
        }
    }
    let publisher = nodes.last().unwrap();
    publisher.bus.publish(some.clone(), event("to-some")).await.unwrap();
    publisher.bus.publish(none.clone(), event("to-none")).await.unwrap();
    fence(nodes, publisher).await;
    for (i, node) in nodes.iter().enumerate() {
        let expected: &[&str] = if subscribed(i) { &["to-some"] } else { &[] };
        assert_eq!(node.sink.labels(&some), expected, "node {i}");
        assert!(node.sink.labels(&none).is_empty(), "node {i} received an event of a topic nobody subscribed to");
    }
}

/// Two local interests in a topic: removing one keeps delivery, removing the last stops it.
pub(crate) async fn unsubscribe_stops_delivery_when_the_last_local_interest_goes(nodes: &[BusNode]) {
    let (first, publisher, topic) = (&nodes[0], nodes.last().unwrap(), room_topic("leaving"));
    first.bus.subscribe(&topic).await.unwrap();
    first.bus.subscribe(&topic).await.unwrap();
    first.bus.unsubscribe(&topic).await.unwrap();
    publisher.bus.publish(topic.clone(), event("still")).await.unwrap();
    assert!(first.sink.received(&topic, "still").await, "one interest is left");

    // The contract says delivery stops, not that it stops before `unsubscribe` returns: publish
    // until an event is no longer delivered, then once more to see that it stays so.
    first.bus.unsubscribe(&topic).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    for round in 0.. {
        let label = format!("after-{round}");
        publisher.bus.publish(topic.clone(), event(&label)).await.unwrap();
        fence(nodes, publisher).await;
        if !first.sink.labels(&topic).contains(&label) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still delivered {WAIT:?} after the last unsubscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.bus.publish(topic.clone(), event("gone")).await.unwrap();
    fence(nodes, publisher).await;
    assert!(!first.sink.labels(&topic).iter().any(|l| l == "gone"), "delivered after the last unsubscribe");
}

/// A broadcast reaches every node, whichever node publishes it, with no subscription.
pub(crate) async fn a_publish_to_all_reaches_every_node(nodes: &[BusNode]) {
    for (from, node) in nodes.iter().enumerate() {
        node.bus.publish(Topic::All, event(&format!("all-from-{from}"))).await.unwrap();
    }
    for (i, node) in nodes.iter().enumerate() {
        for from in 0..nodes.len() {
            assert!(node.sink.received(&Topic::All, &format!("all-from-{from}")).await, "node {i}, from {from}");
        }
    }
}

/// One publisher's events of a topic arrive in the order it published them.
pub(crate) async fn events_of_one_topic_arrive_in_publish_order(nodes: &[BusNode]) {
    let (first, publisher, topic) = (&nodes[0], nodes.last().unwrap(), room_topic("ordered"));
    first.bus.subscribe(&topic).await.unwrap();
    let sent: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    for label in &sent {
        publisher.bus.publish(topic.clone(), event(label)).await.unwrap();
    }
    assert!(first.sink.until(|| first.sink.labels(&topic).len() >= sent.len()).await, "events were lost");
    assert_eq!(first.sink.labels(&topic), sent);
}
