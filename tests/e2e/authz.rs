//! Authorization, end to end: a user never reads another user's stream, never enters a private
//! room without the `rooms` claim, never publishes to a room their session has not joined; the
//! server API answers only to its keys, and client tokens and API keys are not interchangeable.
//!
//! Every deployment runs with an HS256 secret (so the `rooms` claim applies) and an API key. In a
//! cluster the clients of one test sit on different nodes, the victim on one and the attacker on
//! the others, and every refusal is checked twice: the exact error code, and that nothing of what
//! was refused reaches the one refused, once the sessions that should get it have.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::support::{Client, Member, Mode, TestNode, both_modes, raw_http};

const SECRET: &str = "authz-secret-0123456789";
const KEY: &str = "authz-api-key-0123456789";

/// How long a session must stay silent to show that a message did not leak to it.
const QUIET_MS: u64 = 300;

/// The deployment under test: JWT mode with [`SECRET`], the API guarded by [`KEY`].
async fn start(mode: Mode) -> TestNode {
    TestNode::start_mode(mode, &["--jwt-secret", SECRET, "--api-key", KEY]).await
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

/// A token for `sub`, valid for an hour, with `rooms` as its `rooms` claim (none when empty).
fn token(sub: &str, rooms: &[&str]) -> String {
    let mut claims = json!({"sub": sub, "exp": now() + 3600});
    if !rooms.is_empty() {
        claims["rooms"] = json!(rooms);
    }
    sign(SECRET, &claims)
}

fn sign(secret: &str, claims: &Value) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes())).expect("token signs")
}

/// Node `i` of the deployment, wrapping around: in single mode every index is the one node.
fn at(node: &TestNode, i: usize) -> Member {
    node.on(i % node.size())
}

/// Connects `user` with the `rooms` claim to node `i`.
async fn connect(node: &TestNode, i: usize, user: &str, rooms: &[&str]) -> Client {
    at(node, i).connect_bearer(&token(user, rooms)).await
}

/// One session of `user` with the `rooms` claim on every node.
async fn everywhere(node: &TestNode, user: &str, rooms: &[&str]) -> Vec<Client> {
    let mut clients = Vec::new();
    for member in node.members() {
        clients.push(member.connect_bearer(&token(user, rooms)).await);
    }
    clients
}

/// Asserts every client stays silent for [`QUIET_MS`], all at once.
async fn all_silent(clients: &mut [Client]) {
    futures_util::future::join_all(clients.iter_mut().map(|c| c.expect_silence(QUIET_MS))).await;
}

/// Asserts `answer` is the error `code` and carries nothing else: no seq, no messages.
#[track_caller]
fn refused(answer: &Value, code: &str, what: &str) {
    assert_eq!((answer["type"].as_str(), answer["code"].as_str()), (Some("error"), Some(code)), "{what}: {answer}");
    let mut fields: Vec<&str> = answer.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    fields.sort_unstable();
    assert_eq!(fields, ["code", "id", "message", "type"], "{what}: an error carries nothing but itself: {answer}");
}

/// `command` with the fields of `extra` added.
fn with(mut command: Value, extra: &Value) -> Value {
    if let (Some(command), Some(extra)) = (command.as_object_mut(), extra.as_object()) {
        command.extend(extra.clone());
    }
    command
}

/// The bodies of a history answer's messages, in order.
fn bodies(history: &Value) -> Vec<Value> {
    history["messages"].as_array().map(|list| list.iter().map(|m| m["body"].clone()).collect()).unwrap_or_default()
}

/// The history of `stream` (`users/<id>` or `rooms/<name>`) through the API.
async fn api_history(node: &TestNode, stream: &str) -> Value {
    let (status, history) = node.http("GET", &format!("/api/v1/{stream}/history?since=0"), None, Some(KEY)).await;
    assert_eq!(status, 200, "{stream}: {history}");
    history
}

/// An API request on `member` with raw `headers` (each ending in CRLF).
async fn api_raw(member: Member, method: &str, path: &str, body: Option<&str>, headers: &str) -> (u16, Value) {
    let (status, text) = raw_http(member.addr, method, path, headers, body.unwrap_or("")).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Asserts an HTTP answer is 401 with exactly the JSON error body of §5.
#[track_caller]
fn unauthorized((status, body): (u16, Value), what: &str) {
    assert_eq!(status, 401, "{what}: {body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{what}: nothing but the error: {body}");
}

/// Every `/api/v1/` route of the OpenAPI document the node serves, as (method, sample path,
/// body), so that a route added later is guarded by these tests without editing them.
async fn api_routes(node: &TestNode) -> Vec<(String, String, Option<&'static str>)> {
    let (status, doc) = node.http("GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, 200, "{doc}");
    let mut routes = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        if !template.starts_with("/api/v1/") {
            continue;
        }
        let methods = item.as_object().expect("a path item").keys().filter(|k| ["get", "post"].contains(&k.as_str()));
        for method in methods {
            let path = template.replace("{user}", "bob").replace("{room}", "lobby");
            let body = match (method.as_str(), path.ends_with("/disconnect")) {
                ("get", _) => None,
                (_, true) => Some(r#"{"reason":"authz"}"#),
                _ => Some(r#"{"body":{"authz":true}}"#),
            };
            routes.push((method.to_uppercase(), path, body));
        }
    }
    assert!(routes.len() >= 9, "at least the nine routes of PROTOCOL.md §5: {routes:?}");
    routes
}

fn bearer(credential: &str) -> String {
    format!("Authorization: Bearer {credential}\r\n")
}

// --- Streams over WebSocket -------------------------------------------------------------------

both_modes! {
    /// `history` of another user's stream is `forbidden` from every node, whatever the query
    /// (none, `since`, `before`, `limit`), and the error carries none of the stream; the owner
    /// reads it, and user presence, which §3 leaves public, is still answered.
    async fn another_users_stream_cannot_be_read_with_history_from_any_node(mode) {
        let node = start(mode).await;
        let mut alice = connect(&node, 0, "alice", &[]).await;
        let mut bob = connect(&node, 1, "bob", &[]).await;
        for i in 1..=3 {
            alice.ok(json!({"type":"send","to":"bob","body":{"secret":i}})).await;
            assert_eq!(bob.next_message().await["body"]["secret"], i);
        }
        let mut carols = everywhere(&node, "carol", &[]).await;
        let queries = [json!({}), json!({"since":0}), json!({"before":4}), json!({"since":0,"limit":1000})];
        for carol in &mut carols {
            for stream in ["user:bob", "user:alice", "user:BOB"] {
                for query in &queries {
                    let command = with(json!({"type":"history","stream":stream}), query);
                    refused(&carol.request(command.clone()).await, "forbidden", &command.to_string());
                }
            }
            let own = carol.ok(json!({"type":"history","stream":"user:carol","since":0})).await;
            assert_eq!((own["last_seq"].as_u64(), bodies(&own).len()), (Some(0), 0), "{own}");
            let presence = carol.ok(json!({"type":"presence","users":["bob"]})).await;
            assert_eq!(presence["users"]["bob"], json!({"online":true,"sessions":1}), "{presence}");
        }
        let history = bob.ok(json!({"type":"history","stream":"user:bob","since":0})).await;
        assert_eq!(bodies(&history), [json!({"secret":1}), json!({"secret":2}), json!({"secret":3})]);
        all_silent(&mut carols).await;
    }
}

both_modes! {
    /// `sync` replays the caller's own stream and nothing else: carol, on every node, gets her
    /// one message and none of bob's, also when the frame names bob in fields `sync` does not
    /// take (they are ignored); the reply's `seq` is her stream's, not bob's.
    async fn sync_yields_only_the_callers_own_stream(mode) {
        let node = start(mode).await;
        let mut alice = connect(&node, 0, "alice", &[]).await;
        for i in 1..=3 {
            alice.ok(json!({"type":"send","to":"bob","body":{"for":"bob","n":i}})).await;
        }
        let mut dave = connect(&node, 1, "dave", &[]).await;
        let to_carol = dave.ok(json!({"type":"send","to":"carol","body":{"for":"carol"}})).await;

        let frames = [
            json!({"type":"sync","since":0}),
            json!({"type":"sync"}),
            json!({"type":"sync","since":0,"stream":"user:bob"}),
            json!({"type":"sync","since":0,"to":"bob"}),
            json!({"type":"sync","since":0,"user":"bob","room":"user:bob"}),
        ];
        for (i, frame) in frames.into_iter().enumerate() {
            let mut carol = connect(&node, i, "carol", &[]).await;
            let reply = carol.ok(frame.clone()).await;
            let answer = (reply["seq"].as_u64(), reply["truncated"].as_bool());
            assert_eq!(answer, (Some(1), Some(false)), "{frame}: {reply}");
            let message = carol.next_message().await;
            assert_eq!((&message["stream"], &message["to"]), (&json!("user:carol"), &json!("carol")), "{frame}");
            assert_eq!(message["mid"], to_carol["mid"], "{frame}");
            carol.expect_silence(QUIET_MS).await;
        }

        let mut bob = connect(&node, 2, "bob", &[]).await;
        let reply = bob.ok(json!({"type":"sync","since":0})).await;
        assert_eq!(reply["seq"], 3, "{reply}");
        for n in 1..=3 {
            assert_eq!(bob.next_message().await["body"], json!({"for":"bob","n":n}));
        }
        bob.expect_silence(QUIET_MS).await;
    }
}

both_modes! {
    /// `user:bob` is a valid room name (`:` is in the alphabet of §1), so `join` of it answers an
    /// ordinary open room, stream `room:user:bob`: it never carries bob's direct messages, and
    /// publishing in it never writes to bob's stream.
    async fn a_room_named_like_a_user_stream_is_just_a_room(mode) {
        let node = start(mode).await;
        let mut alice = connect(&node, 0, "alice", &[]).await;
        let mut carol = connect(&node, 1, "carol", &[]).await;
        let mut bob = connect(&node, 2, "bob", &[]).await;

        let joined = carol.ok(json!({"type":"join","room":"user:bob"})).await;
        assert_eq!((joined["room"].as_str(), joined["seq"].as_u64()), (Some("user:bob"), Some(0)), "{joined}");
        let dm = alice.ok(json!({"type":"send","to":"bob","body":"for bob only"})).await;
        assert_eq!(bob.next_message().await["mid"], dm["mid"]);
        carol.expect_silence(QUIET_MS).await;

        let published = carol.ok(json!({"type":"publish","room":"user:bob","body":"in the room"})).await;
        assert_eq!(published["seq"], 1, "{published}");
        bob.expect_silence(QUIET_MS).await;

        let own = bob.ok(json!({"type":"history","stream":"user:bob","since":0})).await;
        assert_eq!((own["last_seq"].as_u64(), bodies(&own)), (Some(1), vec![json!("for bob only")]), "{own}");
        let room = carol.ok(json!({"type":"history","stream":"room:user:bob","since":0})).await;
        assert_eq!((room["last_seq"].as_u64(), bodies(&room)), (Some(1), vec![json!("in the room")]), "{room}");
        let stream = carol.request(json!({"type":"history","stream":"user:bob"})).await;
        refused(&stream, "forbidden", "the stream user:bob, not the room");
    }
}

both_modes! {
    /// A direct message reaches every session of its recipient on every node and every other
    /// session of its sender, and no session of anyone else anywhere.
    async fn a_direct_message_reaches_both_parties_devices_and_no_one_else(mode) {
        let node = start(mode).await;
        let mut sender = connect(&node, 0, "alice", &[]).await;
        let mut other_device = connect(&node, 1, "alice", &[]).await;
        let mut bobs = everywhere(&node, "bob", &[]).await;
        let mut carols = everywhere(&node, "carol", &[]).await;

        let reply = sender.ok(json!({"type":"send","to":"bob","body":"private"})).await;
        for bob in &mut bobs {
            let m = bob.next_message().await;
            assert_eq!((&m["mid"], &m["stream"], &m["to"]), (&reply["mid"], &json!("user:bob"), &json!("bob")), "{m}");
        }
        let copy = other_device.next_message().await;
        assert_eq!((&copy["mid"], &copy["stream"]), (&reply["mid"], &json!("user:alice")), "{copy}");
        all_silent(&mut carols).await;
        all_silent(&mut bobs).await;
        sender.expect_silence(QUIET_MS).await;
    }
}

// --- Private rooms over WebSocket -------------------------------------------------------------

both_modes! {
    /// Without a matching `rooms` claim, `join` (with or without `since`), `history` (whatever
    /// the query) and room `presence` of a private room are `forbidden` on every node, for claims
    /// that only look close; `publish` and `leave` are `not_member`. The refused user is not
    /// counted in the room, its member hears no presence event about her, and the room's messages
    /// never reach her.
    async fn a_private_room_without_the_claim_is_forbidden_on_every_node(mode) {
        let node = start(mode).await;
        let mut owner = connect(&node, 0, "owner", &["private:vault"]).await;
        owner.ok(json!({"type":"join","room":"private:vault"})).await;
        owner.ok(json!({"type":"publish","room":"private:vault","body":"kept"})).await;

        let near_misses: [&[&str]; 8] = [
            &[],
            &["lobby", "team-*"],
            &["private:"],
            &["private:vaul"],
            &["PRIVATE:vault", "private:VAULT"],
            &["private:vault2", "private:vault-*"],
            &["vault", "room:private:vault"],
            &["private:vault "],
        ];
        let room = json!({"room":"private:vault"});
        let stream = json!({"stream":"room:private:vault"});
        let mut eves = Vec::new();
        for (i, claim) in near_misses.into_iter().enumerate() {
            let mut eve = connect(&node, i, "eve", claim).await;
            for command in [
                with(json!({"type":"join"}), &room),
                with(json!({"type":"join","since":0}), &room),
                with(json!({"type":"history"}), &stream),
                with(json!({"type":"history","since":0,"limit":1000}), &stream),
                with(json!({"type":"history","before":2}), &stream),
                with(json!({"type":"presence"}), &room),
            ] {
                refused(&eve.request(command.clone()).await, "forbidden", &format!("{claim:?}: {command}"));
            }
            for command in [with(json!({"type":"publish","body":"x"}), &room), with(json!({"type":"leave"}), &room)] {
                refused(&eve.request(command.clone()).await, "not_member", &format!("{claim:?}: {command}"));
            }
            eves.push(eve);
        }

        owner.ok(json!({"type":"publish","room":"private:vault","body":"after"})).await;
        let (status, presence) = node.http("GET", "/api/v1/rooms/private:vault/presence", None, Some(KEY)).await;
        assert_eq!((status, presence), (200, json!({"count":1,"users":["owner"]})));
        assert_eq!(bodies(&api_history(&node, "rooms/private:vault").await), [json!("kept"), json!("after")]);
        all_silent(&mut eves).await;
        owner.expect_silence(QUIET_MS).await;
    }
}

both_modes! {
    /// A claim without a star opens exactly the room it names: `private:a` opens neither
    /// `private:ab` nor `private:a:b` nor `private:A`. A claim ending in `*` opens every room
    /// starting with what precedes it: `private:a*` opens `private:a`, `private:ab` and
    /// `private:a:b`, not `private:A` or `private:b`; `private:*` opens them all. `join`,
    /// `history` and room `presence` agree on every room.
    async fn a_claim_opens_one_room_exactly_or_a_prefix_when_it_ends_in_a_star(mode) {
        let node = start(mode).await;
        let rooms = ["private:a", "private:ab", "private:a:b", "private:A", "private:b"];
        let cases: [(&[&str], [bool; 5]); 4] = [
            (&["private:a"], [true, false, false, false, false]),
            (&["private:a*"], [true, true, true, false, false]),
            (&["private:*"], [true; 5]),
            (&["private:ab", "private:b"], [false, true, false, false, true]),
        ];
        for (i, (claim, opens)) in cases.into_iter().enumerate() {
            let mut client = connect(&node, i, &format!("user{i}"), claim).await;
            for (room, open) in rooms.into_iter().zip(opens) {
                for command in [
                    json!({"type":"history","stream":format!("room:{room}")}),
                    json!({"type":"presence","room":room}),
                    json!({"type":"join","room":room,"since":0}),
                ] {
                    let answer = client.request(command.clone()).await;
                    let what = format!("{claim:?}: {command}");
                    if open {
                        assert_eq!(answer["type"], "reply", "{what}: {answer}");
                    } else {
                        refused(&answer, "forbidden", &what);
                    }
                }
            }
        }
    }
}

both_modes! {
    /// A user without the claim, connected to every node for the whole test, never receives a
    /// message of the private room, whether a member published it or a backend posted it, while
    /// the members on every node get every one; her sessions are live all along (a direct
    /// message published after the room's reaches each of them, and only that).
    async fn a_user_without_the_claim_never_receives_the_private_rooms_messages(mode) {
        let node = start(mode).await;
        let mut members = Vec::new();
        for i in 0..node.size().max(2) {
            let mut member = connect(&node, i, &format!("m{i}"), &["private:vault"]).await;
            member.ok(json!({"type":"join","room":"private:vault"})).await;
            members.push(member);
        }
        let mut eves = everywhere(&node, "eve", &[]).await;
        for eve in &mut eves {
            refused(&eve.request(json!({"type":"join","room":"private:vault"})).await, "forbidden", "eve joins");
        }

        let first = members[0].ok(json!({"type":"publish","room":"private:vault","body":"ws-0"})).await;
        let (status, api) = node
            .http("POST", "/api/v1/rooms/private:vault/messages", Some(r#"{"body":"api","from":"backend"}"#), Some(KEY))
            .await;
        assert_eq!(status, 200, "{api}");
        let last = members[1].ok(json!({"type":"publish","room":"private:vault","body":"ws-1"})).await;
        // Every member gets every message but the one it published itself (its reply).
        let sent = [(first, Some(0)), (api, None), (last, Some(1))];
        for (i, member) in members.iter_mut().enumerate() {
            for (seq, (reply, publisher)) in (1..).zip(&sent) {
                if *publisher != Some(i) {
                    let m = member.next_message().await;
                    assert_eq!((m["seq"].as_u64(), &m["mid"]), (Some(seq), &reply["mid"]), "member {i}: {m}");
                }
            }
        }

        let dm = members[0].ok(json!({"type":"send","to":"eve","body":"are you there"})).await;
        for eve in &mut eves {
            let m = eve.next_frame().await;
            assert_eq!((&m["type"], &m["stream"]), (&json!("message"), &json!("user:eve")), "{m}");
            assert_eq!(m["mid"], dm["mid"], "{m}");
        }
        all_silent(&mut eves).await;
    }
}

both_modes! {
    /// A session that was in the private room and comes back (on another node) with a token
    /// without the claim cannot catch up: `join` with or without `since` and `history` are
    /// `forbidden`, `sync` replays only its own stream, and what was published while it was away,
    /// or after, never reaches it. A token with the claim still catches up, so the refusal is the
    /// claim's doing.
    async fn a_reconnect_without_the_claim_cannot_catch_up_on_the_private_room(mode) {
        let node = start(mode).await;
        let mut alice = connect(&node, 0, "alice", &["private:vault"]).await;
        alice.ok(json!({"type":"join","room":"private:vault"})).await;
        let mut bob = connect(&node, 0, "bob", &["private:vault"]).await;
        bob.ok(json!({"type":"join","room":"private:vault"})).await;
        alice.ok(json!({"type":"publish","room":"private:vault","body":1})).await;
        assert_eq!(bob.next_message().await["seq"], 1);
        drop(bob);
        for body in [2, 3] {
            alice.ok(json!({"type":"publish","room":"private:vault","body":body})).await;
        }

        let mut back = connect(&node, 1, "bob", &[]).await;
        for command in [
            json!({"type":"join","room":"private:vault","since":1}),
            json!({"type":"join","room":"private:vault","since":0}),
            json!({"type":"join","room":"private:vault"}),
            json!({"type":"history","stream":"room:private:vault","since":1}),
        ] {
            refused(&back.request(command.clone()).await, "forbidden", &command.to_string());
        }
        let synced = back.ok(json!({"type":"sync","since":0})).await;
        assert_eq!(synced["seq"], 0, "bob's own stream is empty: {synced}");
        alice.ok(json!({"type":"publish","room":"private:vault","body":4})).await;
        back.expect_silence(QUIET_MS).await;

        let mut with_claim = connect(&node, 2, "bob", &["private:vault"]).await;
        let joined = with_claim.ok(json!({"type":"join","room":"private:vault","since":1})).await;
        assert_eq!(joined["seq"], 4, "{joined}");
        for seq in 2..=4 {
            assert_eq!(with_claim.next_message().await["seq"], seq);
        }
        back.expect_silence(QUIET_MS).await;
    }
}

both_modes! {
    /// Claims go with the token, not the user: bob's laptop, whose token has the claim, is in the
    /// private room; his phone, whose token lacks it, is refused and never gets the room's
    /// messages, though it gets bob's direct messages like any of his devices.
    async fn a_claim_belongs_to_the_token_not_to_the_user(mode) {
        let node = start(mode).await;
        let mut laptop = connect(&node, 0, "bob", &["private:vault"]).await;
        let mut phone = connect(&node, 1, "bob", &[]).await;
        let mut alice = connect(&node, 2, "alice", &["private:vault"]).await;
        laptop.ok(json!({"type":"join","room":"private:vault"})).await;
        alice.ok(json!({"type":"join","room":"private:vault"})).await;

        refused(&phone.request(json!({"type":"join","room":"private:vault"})).await, "forbidden", "phone joins");
        let read = phone.request(json!({"type":"history","stream":"room:private:vault"})).await;
        refused(&read, "forbidden", "phone reads");
        let publish = phone.request(json!({"type":"publish","room":"private:vault","body":"x"})).await;
        refused(&publish, "not_member", "phone publishes where the laptop is a member");

        let room = alice.ok(json!({"type":"publish","room":"private:vault","body":"room"})).await;
        assert_eq!(laptop.next_message().await["mid"], room["mid"]);
        let dm = alice.ok(json!({"type":"send","to":"bob","body":"direct"})).await;
        assert_eq!(laptop.next_message().await["mid"], dm["mid"]);
        let m = phone.next_frame().await;
        assert_eq!((&m["type"], &m["mid"]), (&json!("message"), &dm["mid"]), "the phone gets only the DM: {m}");
        phone.expect_silence(QUIET_MS).await;
    }
}

// --- Publishing needs membership --------------------------------------------------------------

both_modes! {
    /// A session that has not joined a room gets `not_member` when it publishes there, on every
    /// node, with or without a `key`, even to a private room its claim opens; the members hear
    /// nothing and nothing is stored: the room's history is unchanged, the next publish takes the
    /// next seq, and the refused publish's key was not used up.
    async fn publishing_without_joining_is_not_member_and_stores_nothing(mode) {
        let node = start(mode).await;
        let mut first = connect(&node, 0, "m0", &["private:vault"]).await;
        let mut second = connect(&node, 1, "m1", &["private:vault"]).await;
        for member in [&mut first, &mut second] {
            member.ok(json!({"type":"join","room":"lobby"})).await;
            member.ok(json!({"type":"join","room":"private:vault"})).await;
        }
        for room in ["lobby", "private:vault"] {
            first.ok(json!({"type":"publish","room":room,"body":"first"})).await;
            assert_eq!(second.next_message().await["seq"], 1);
        }

        let mut eves = everywhere(&node, "eve", &["private:*"]).await;
        for eve in &mut eves {
            for command in [
                json!({"type":"publish","room":"lobby","body":"forged"}),
                json!({"type":"publish","room":"lobby","body":"forged","key":"k1"}),
                json!({"type":"publish","room":"private:vault","body":"forged"}),
            ] {
                refused(&eve.request(command.clone()).await, "not_member", &command.to_string());
            }
        }
        all_silent(std::slice::from_mut(&mut second)).await;
        for room in ["rooms/lobby", "rooms/private:vault"] {
            let history = api_history(&node, room).await;
            assert_eq!((history["last_seq"].as_u64(), bodies(&history)), (Some(1), vec![json!("first")]), "{room}");
        }

        let next = first.ok(json!({"type":"publish","room":"lobby","body":"second"})).await;
        assert_eq!(next["seq"], 2, "{next}");
        assert_eq!(second.next_message().await["seq"], 2);
        let eve = &mut eves[0];
        eve.ok(json!({"type":"join","room":"lobby"})).await;
        let keyed = eve.ok(json!({"type":"publish","room":"lobby","body":"legit","key":"k1"})).await;
        assert_eq!(keyed["seq"], 3, "the refused publish did not use up its key: {keyed}");
        assert_eq!(second.next_message().await["body"], "legit");
    }
}

both_modes! {
    /// `leave` ends the session's membership at once: its publish is `not_member` and stores
    /// nothing, a second `leave` is `not_member`, and the room's messages stop reaching it;
    /// another session of the same user, on another node, stays a member with both rights.
    async fn after_leave_a_session_can_neither_publish_nor_hear_the_room(mode) {
        let node = start(mode).await;
        let mut alice = connect(&node, 0, "alice", &[]).await;
        let mut left = connect(&node, 1, "bob", &[]).await;
        let mut stays = connect(&node, 2, "bob", &[]).await;
        for client in [&mut alice, &mut left, &mut stays] {
            client.ok(json!({"type":"join","room":"r"})).await;
        }
        alice.ok(json!({"type":"publish","room":"r","body":1})).await;
        assert_eq!(left.next_message().await["seq"], 1);
        assert_eq!(stays.next_message().await["seq"], 1);

        left.ok(json!({"type":"leave","room":"r"})).await;
        refused(&left.request(json!({"type":"publish","room":"r","body":"late"})).await, "not_member", "publish");
        refused(&left.request(json!({"type":"leave","room":"r"})).await, "not_member", "leave twice");
        alice.ok(json!({"type":"publish","room":"r","body":2})).await;
        assert_eq!(stays.next_message().await["seq"], 2);
        let own = stays.ok(json!({"type":"publish","room":"r","body":3})).await;
        assert_eq!(own["seq"], 3, "{own}");
        assert_eq!(alice.next_message().await["body"], 3);
        left.expect_silence(QUIET_MS).await;
        let history = api_history(&node, "rooms/r").await;
        assert_eq!(bodies(&history), [json!(1), json!(2), json!(3)]);
    }
}

both_modes! {
    /// Membership is per room and per session: a session in `team` (and in `private:a`, with a
    /// claim for `private:*`) cannot publish to `Team`, `team2`, `team:x`, `private:b`, nor to
    /// `other`, which another session of the same user has joined; each is `not_member`, the
    /// members of those rooms hear nothing, and nothing is stored.
    async fn membership_of_one_room_opens_no_other(mode) {
        let node = start(mode).await;
        let mut alice = connect(&node, 0, "alice", &["private:*"]).await;
        let mut phone = connect(&node, 1, "alice", &["private:*"]).await;
        let mut carol = connect(&node, 2, "carol", &["private:*"]).await;
        alice.ok(json!({"type":"join","room":"team"})).await;
        alice.ok(json!({"type":"join","room":"private:a"})).await;
        phone.ok(json!({"type":"join","room":"other"})).await;
        let targets = ["Team", "team2", "team:x", "private:b", "other"];
        for room in targets {
            carol.ok(json!({"type":"join","room":room})).await;
        }

        for room in targets {
            let answer = alice.request(json!({"type":"publish","room":room,"body":"forged"})).await;
            refused(&answer, "not_member", room);
        }
        let own = alice.ok(json!({"type":"publish","room":"team","body":"ok"})).await;
        assert_eq!(own["seq"], 1, "{own}");
        carol.expect_silence(QUIET_MS).await;
        for room in targets {
            let history = api_history(&node, &format!("rooms/{room}")).await;
            assert_eq!(history["last_seq"], 0, "{room}: {history}");
        }
    }
}

// --- The server API ---------------------------------------------------------------------------

both_modes! {
    /// Every `/api/v1/` route of the served OpenAPI document answers 401 with the §5 error body,
    /// on every node, unless the request carries exactly `Authorization: Bearer <key>`: not with
    /// no key, another key, the key in another case, cut short, with a prefix, suffix, quotes or
    /// an extra space, under another scheme or header, or in the query string. None of the
    /// refused requests did anything; the exact key is accepted by every route.
    async fn every_api_route_needs_the_exact_key_as_a_bearer_credential(mode) {
        let node = start(mode).await;
        let mut bobs = everywhere(&node, "bob", &[]).await;
        for bob in &mut bobs {
            bob.ok(json!({"type":"join","room":"lobby"})).await;
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"));
        let credentials = [
            ("no Authorization", String::new(), ""),
            ("another key", bearer("another-key-0123456789"), ""),
            ("the key in upper case", bearer(&KEY.to_uppercase()), ""),
            ("the key cut short", bearer(&KEY[..KEY.len() - 1]), ""),
            ("the key with a prefix", bearer(&format!("x{KEY}")), ""),
            ("the key with a suffix", bearer(&format!("{KEY}x")), ""),
            ("the key in quotes", bearer(&format!("\"{KEY}\"")), ""),
            ("the key after two spaces", format!("Authorization: Bearer  {KEY}\r\n"), ""),
            ("an empty bearer", "Authorization: Bearer\r\n".to_owned(), ""),
            ("the key without a scheme", format!("Authorization: {KEY}\r\n"), ""),
            ("the key as Basic credentials", format!("Authorization: Basic {basic}\r\n"), ""),
            ("the key as a Token", format!("Authorization: Token {KEY}\r\n"), ""),
            ("the key in X-API-Key", format!("X-API-Key: {KEY}\r\n"), ""),
            ("the key in the query", String::new(), "api_key"),
            ("the key as ?token=", String::new(), "token"),
        ];
        let routes = api_routes(&node).await;
        for (i, (what, headers, query)) in credentials.iter().enumerate() {
            let member = at(&node, i);
            for (method, path, body) in &routes {
                let path = if query.is_empty() { path.clone() } else { format!("{path}?{query}={KEY}") };
                let answer = api_raw(member, method, &path, *body, headers).await;
                unauthorized(answer, &format!("{method} {path} on node {} with {what}", member.index));
            }
        }

        all_silent(&mut bobs).await;
        for stream in ["users/bob", "rooms/lobby"] {
            assert_eq!(api_history(&node, stream).await["last_seq"], 0, "{stream}");
        }
        for (method, path, body) in &routes {
            let (status, answer) = node.http(method, path, *body, Some(KEY)).await;
            assert_eq!(status, 200, "{method} {path} with the key: {answer}");
        }
        // A path under /api/v1/ that is no route tells nothing without the key either.
        for member in node.members() {
            let answer = api_raw(member, "GET", "/api/v1/no/such/route", None, "").await;
            unauthorized(answer, &format!("an unknown route on node {} without the key", member.index));
            let (status, body) = api_raw(member, "GET", "/api/v1/no/such/route", None, &bearer(KEY)).await;
            assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")), "{body}");
            // The scheme name is case-insensitive (RFC 9110); the key is not.
            let lower = format!("Authorization: bearer {KEY}\r\n");
            let (status, body) = api_raw(member, "GET", "/api/v1/nodes", None, &lower).await;
            assert_eq!(status, 200, "scheme in lower case on node {}: {body}", member.index);
        }
    }
}

both_modes! {
    /// `/healthz`, `/readyz`, `/metrics` and `/api/openapi.json` answer 200 on every node without
    /// a key, and a wrong key does not close them either.
    async fn the_open_endpoints_need_no_key_on_any_node(mode) {
        let node = start(mode).await;
        for member in node.members() {
            for headers in [String::new(), bearer("wrong-key-0123456789")] {
                for path in ["/healthz", "/readyz", "/metrics", "/api/openapi.json"] {
                    let (status, body) = api_raw(member, "GET", path, None, &headers).await;
                    assert_eq!(status, 200, "{path} on node {} with {headers:?}: {body}", member.index);
                }
                let (_, doc) = api_raw(member, "GET", "/api/openapi.json", None, &headers).await;
                assert!(doc["paths"].is_object(), "{doc}");
                let (_, metrics) = api_raw(member, "GET", "/metrics", None, &headers).await;
                assert!(metrics.as_str().is_some_and(|m| m.contains("# TYPE")), "{metrics}");
            }
        }
    }
}

both_modes! {
    /// A backend's message to a private room (the API needs no claim: backends are trusted)
    /// reaches the sessions joined to it on every node and no other: not one whose token would
    /// open the room but has not joined, not one whose token would not.
    async fn an_api_message_to_a_private_room_reaches_only_its_joined_sessions(mode) {
        let node = start(mode).await;
        let mut members = everywhere(&node, "member", &["private:vault"]).await;
        for member in &mut members {
            member.ok(json!({"type":"join","room":"private:vault"})).await;
        }
        let mut idle = everywhere(&node, "idle", &["private:*"]).await;
        let mut eves = everywhere(&node, "eve", &[]).await;
        for eve in &mut eves {
            refused(&eve.request(json!({"type":"join","room":"private:vault"})).await, "forbidden", "eve joins");
        }

        let body = r#"{"body":{"secret":true},"from":"backend"}"#;
        let (status, sent) = node.http("POST", "/api/v1/rooms/private:vault/messages", Some(body), Some(KEY)).await;
        assert_eq!((status, sent["seq"].as_u64()), (200, Some(1)), "{sent}");
        for member in &mut members {
            let m = member.next_message().await;
            assert_eq!((&m["mid"], &m["room"], &m["from"]), (&sent["mid"], &json!("private:vault"), &json!("backend")));
        }
        all_silent(&mut idle).await;
        all_silent(&mut eves).await;
    }
}

both_modes! {
    /// A backend's direct message to bob reaches every bob session on every node and nobody
    /// else, also when it names carol as `from`: carol's sessions and stream get no copy.
    async fn an_api_message_to_a_user_reaches_only_that_user(mode) {
        let node = start(mode).await;
        let mut bobs = everywhere(&node, "bob", &[]).await;
        let mut carols = everywhere(&node, "carol", &[]).await;
        let mut alice = connect(&node, 0, "alice", &[]).await;

        let body = r#"{"body":"for bob","from":"carol"}"#;
        let (status, sent) = node.http("POST", "/api/v1/users/bob/messages", Some(body), Some(KEY)).await;
        assert_eq!((status, sent["seq"].as_u64()), (200, Some(1)), "{sent}");
        for bob in &mut bobs {
            let m = bob.next_message().await;
            assert_eq!((&m["stream"], &m["from"]), (&json!("user:bob"), &json!("carol")), "{m}");
            assert_eq!(m["mid"], sent["mid"], "{m}");
        }
        all_silent(&mut carols).await;
        alice.expect_silence(QUIET_MS).await;
        assert_eq!(api_history(&node, "users/carol").await["last_seq"], 0);
        let synced = carols[0].ok(json!({"type":"sync","since":0})).await;
        assert_eq!(synced["seq"], 0, "{synced}");
        carols[0].expect_silence(QUIET_MS).await;
    }
}

both_modes! {
    /// A client token is not an API key and an API key is not a client token: a valid JWT (or
    /// the JWT secret) as the API's bearer credential is 401 on every route, and the API key, or
    /// a token signed with it, is refused before the upgrade with 401 and the §5 body, as a
    /// header or as `?token=`, on every node. Each credential works where it belongs.
    async fn client_tokens_and_api_keys_are_not_interchangeable(mode) {
        let node = start(mode).await;
        let jwt = token("alice", &["private:*"]);
        let routes = api_routes(&node).await;
        for (i, credential) in [jwt.as_str(), SECRET].into_iter().enumerate() {
            let member = at(&node, i);
            for (method, path, body) in &routes {
                let answer = api_raw(member, method, path, *body, &bearer(credential)).await;
                unauthorized(answer, &format!("{method} {path} with a client credential"));
            }
        }

        let signed_with_key = sign(KEY, &json!({"sub":"alice","exp":now() + 3600}));
        for member in node.members() {
            for (what, path, headers) in [
                ("the key as ?token=", format!("/ws?token={KEY}"), String::new()),
                ("the key as a bearer", "/ws".to_owned(), bearer(KEY)),
                ("the key with ?user=", "/ws?user=alice".to_owned(), bearer(KEY)),
                ("a token signed with the key", format!("/ws?token={signed_with_key}"), String::new()),
            ] {
                let answer = member.refused_upgrade(&path, &headers).await;
                unauthorized(answer, &format!("{what} on node {}", member.index));
            }
        }

        let client = at(&node, 1).connect_bearer(&jwt).await;
        assert_eq!(client.welcome["user"], "alice");
        let (status, answer) = node.http("GET", "/api/v1/nodes", None, Some(KEY)).await;
        assert_eq!(status, 200, "{answer}");
    }
}
