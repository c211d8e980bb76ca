//! The server API for backends (PROTOCOL.md §5): JSON over HTTP under `/api/v1`, guarded by API
//! keys compared in constant time. Every handler is a thin mapping onto a [`Node`] operation, so
//! an API call and a client command behave alike.
//!
//! The routes are registered through utoipa's `OpenApiRouter`, which builds the OpenAPI document
//! (`GET /api/openapi.json`, see [`doc`]) from the same handlers and types: a route cannot be
//! served without being documented.

mod doc;

use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::doc::{ApiDoc, ErrorBody, ErrorDetail, HistoryParams, PlainFailures, ReadFailures, WriteFailures};
use crate::node::{DirectMessage, Node, RoomMessage};
use crate::presence::SessionInfo;
use crate::protocol::{ErrorCode, HistoryQuery, ProtocolError, RoomName, StreamId, UserId, valid_name};
use crate::registry::NodeInfo;
use crate::session::raw_list;

/// An error as the API answers it: the status of §5 and `{"error":{"code","message"}}`.
pub struct ApiError(pub ProtocolError);

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}

/// The JSON error response of §5, also used before the WebSocket upgrade.
pub fn error_response(e: &ProtocolError) -> Response {
    let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(ErrorBody { error: ErrorDetail { code: e.code, message: &e.message } })).into_response()
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(ProtocolError::bad_request(message))
}

/// How much longer than `--max-message-size` a request body may be: room for the JSON around the
/// message's body (`from`, `key`).
pub(crate) const REQUEST_SLACK: usize = 4096;

/// Where the server nests [`router`].
const MOUNT: &str = "/api";

/// The routes under `/v1` (relative to it), and the document that describes them and
/// `/openapi.json` with their full paths.
fn routes() -> (Router<Arc<Node>>, utoipa::openapi::OpenApi) {
    let (v1, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(user_message))
        .routes(routes!(room_message))
        .routes(routes!(broadcast))
        .routes(routes!(user_presence))
        .routes(routes!(room_presence))
        .routes(routes!(user_history))
        .routes(routes!(room_history))
        .routes(routes!(disconnect))
        .routes(routes!(nodes))
        .split_for_parts();
    let paths = std::mem::take(&mut document.paths.paths);
    document.paths.paths = paths.into_iter().map(|(path, item)| (format!("{MOUNT}/v1{path}"), item)).collect();
    let get = vec![utoipa::openapi::HttpMethod::Get];
    document.paths.add_path_operation(format!("{MOUNT}/openapi.json"), get, document_operation());
    (v1, document)
}

/// `GET /openapi.json`, documented by hand: it is served beside the routes it describes.
fn document_operation() -> utoipa::openapi::path::Operation {
    use utoipa::openapi::path::OperationBuilder;
    use utoipa::openapi::{ContentBuilder, ObjectBuilder, ResponseBuilder};
    let document = ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::Object).build();
    OperationBuilder::new()
        .operation_id(Some("getOpenApi"))
        .summary(Some("This document"))
        .description(Some("The OpenAPI document of this API. No API key is needed."))
        .tag("meta")
        .securities(Some(Vec::<utoipa::openapi::security::SecurityRequirement>::new()))
        .response(
            "200",
            ResponseBuilder::new()
                .description("The document.")
                .content("application/json", ContentBuilder::new().schema(Some(document)).build()),
        )
        .build()
}

/// The OpenAPI document of the API, generated once.
pub fn openapi_json() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| routes().1.to_pretty_json().expect("the OpenAPI document serializes"))
}

pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.config.max_message_size + REQUEST_SLACK;
    let (v1, _) = routes();
    let v1 = v1
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        // `layer`, not `route_layer`: an unknown path under /v1 needs the key too (401, not 404).
        .layer(middleware::from_fn_with_state(node.clone(), require_key))
        .with_state(node);
    Router::new()
        .nest("/v1", v1)
        .route(
            "/openapi.json",
            axum::routing::get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .fallback(not_found)
}

async fn not_found() -> ApiError {
    ApiError(ProtocolError::new(ErrorCode::NotFound, "no such API route"))
}

/// Admits a request that carries one of the configured API keys. A dev-mode node without keys
/// leaves the API open (it listens on loopback only).
async fn require_key(State(node): State<Arc<Node>>, request: Request, next: Next) -> Response {
    use tracing::Instrument;
    // The client's address, forwarded by a trusted proxy or the peer's (`--trusted-proxy`).
    let client = request.extensions().get::<crate::server::ClientAddr>().map(|c| c.0);
    let span = tracing::debug_span!("api", client = ?client, method = %request.method(), path = %request.uri().path());
    let keys = &node.config.api_key;
    if keys.is_empty() && node.auth.dev_mode() {
        return logged(next.run(request)).instrument(span).await;
    }
    let given = crate::auth::bearer(request.headers()).unwrap_or("");
    // Compare against every key so the time taken does not tell which one nearly matched.
    let matched = keys.iter().fold(0u8, |acc, key| acc | u8::from(bool::from(key.as_bytes().ct_eq(given.as_bytes()))));
    if matched == 1 {
        logged(next.run(request)).instrument(span).await
    } else {
        span.in_scope(|| tracing::debug!("API request refused: no valid key"));
        error_response(&ProtocolError::new(
            ErrorCode::Unauthorized,
            "a valid API key is required: Authorization: Bearer <key>",
        ))
    }
}

/// A request's outcome, at debug level, in the span that names its client.
async fn logged(response: impl Future<Output = Response>) -> Response {
    let response = response.await;
    tracing::debug!(status = response.status().as_u16(), "API request");
    response
}

/// A message for a user or a room.
#[derive(Deserialize, ToSchema)]
#[schema(as = MessageRequest, example = json!({"body": {"text": "your order shipped"}, "from": "shop", "key": "order-42-shipped"}))]
struct MessageBody {
    /// The message body: any JSON value, null included, delivered as given.
    #[serde(default, deserialize_with = "crate::protocol::any_json")]
    #[schema(value_type = Value, required = true)]
    body: Option<Box<RawValue>>,
    #[schema(schema_with = doc::sender_schema)]
    from: Option<String>,
    #[schema(schema_with = doc::key_schema)]
    key: Option<String>,
}

/// A message for every session on every node. It is not stored.
#[derive(Deserialize, ToSchema)]
#[schema(as = BroadcastRequest, example = json!({"body": {"alert": "maintenance at 18:00"}}))]
struct BroadcastBody {
    /// The message body: any JSON value, null included, delivered as given.
    #[serde(default, deserialize_with = "crate::protocol::any_json")]
    #[schema(value_type = Value, required = true)]
    body: Option<Box<RawValue>>,
    #[schema(schema_with = doc::sender_schema)]
    from: Option<String>,
}

/// Parses a JSON body, mapping every failure onto the API's error format.
fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if !crate::protocol::is_object(bytes) {
        return Err(bad("malformed JSON body: expected a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|e| bad(format!("malformed JSON body: {e}")))
}

fn sender(from: Option<String>) -> Result<Arc<str>, ApiError> {
    match from {
        None => Ok(Arc::from("system")),
        Some(f) if valid_name(&f) => Ok(Arc::from(f)),
        Some(_) => Err(bad("from must be 1-128 characters of A-Z a-z 0-9 _ . : @ -")),
    }
}

fn user_path(path: Result<Path<String>, PathRejection>) -> Result<UserId, ApiError> {
    let Path(raw) = path.map_err(|e| bad(e.body_text()))?;
    Ok(UserId::parse(&raw)?)
}

fn room_path(path: Result<Path<String>, PathRejection>) -> Result<RoomName, ApiError> {
    let Path(raw) = path.map_err(|e| bad(e.body_text()))?;
    Ok(RoomName::parse(&raw)?)
}

fn body_of(bytes: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Result<Bytes, ApiError> {
    bytes.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError(ProtocolError::new(ErrorCode::TooLarge, "request body is larger than --max-message-size"))
        } else {
            bad(e.body_text())
        }
    })
}

/// A validated `{body, from?, key?}` request.
pub struct Push {
    pub from: Arc<str>,
    pub body: Arc<str>,
    pub key: Option<String>,
}

/// Parses and validates the body of a message request. Public so that the fuzz target
/// (`fuzz/fuzz_targets/api_body.rs`) runs exactly this path.
pub fn parse_push(bytes: &[u8]) -> Result<Push, ApiError> {
    let req: MessageBody = parse_body(bytes)?;
    let key = crate::protocol::checked_key(req.key)?;
    Ok(Push { key, ..push(req.body, req.from)? })
}

/// Parses and validates the body of a broadcast request, like [`parse_push`]; it has no key.
pub fn parse_broadcast(bytes: &[u8]) -> Result<Push, ApiError> {
    let req: BroadcastBody = parse_body(bytes)?;
    push(req.body, req.from)
}

fn push(body: Option<Box<RawValue>>, from: Option<String>) -> Result<Push, ApiError> {
    let body = body.ok_or_else(|| bad("the request needs `body`"))?;
    let body = crate::protocol::checked_body(body)?;
    Ok(Push { from: sender(from)?, body: Arc::from(body.get()), key: None })
}

/// Parses and validates the body of a disconnect request: the reason to close with. An empty
/// body, or JSON `null`, gives the default reason. Public for the fuzz target, like [`parse_push`].
pub fn parse_disconnect(bytes: &[u8]) -> Result<String, ApiError> {
    let empty = bytes.trim_ascii().is_empty() || bytes.trim_ascii() == b"null";
    let req: DisconnectBody = if empty { DisconnectBody::default() } else { parse_body(bytes)? };
    let reason = req.reason.unwrap_or_else(|| DEFAULT_REASON.to_owned());
    if reason.len() > MAX_REASON {
        return Err(bad("reason must be at most 100 bytes"));
    }
    Ok(reason)
}

/// The reason of a disconnect request that gives none.
const DEFAULT_REASON: &str = "disconnected by the server";

/// The longest disconnect reason, in bytes: it must fit a WebSocket close frame.
const MAX_REASON: usize = 100;

/// A stored message: its id and its seq in the stream.
#[derive(Serialize, ToSchema)]
struct Accepted {
    /// The server-made message id, unique across the cluster.
    #[schema(value_type = String)]
    mid: Arc<str>,
    /// The message's seq in its stream (for a direct message, the recipient's).
    #[schema(minimum = 1)]
    seq: u64,
}

/// A broadcast handed to every node.
#[derive(Serialize, ToSchema)]
struct BroadcastAccepted {
    /// The server-made message id, unique across the cluster.
    #[schema(value_type = String)]
    mid: Arc<str>,
}

/// Whether a user is online, and their sessions on every node.
#[derive(Serialize, ToSchema)]
struct UserPresence {
    /// Whether the user has at least one session online.
    online: bool,
    sessions: Vec<SessionInfo>,
}

/// Who is in a room.
#[derive(Serialize, ToSchema)]
struct RoomPresence {
    /// How many distinct users are in the room.
    count: usize,
    /// Up to 1000 of the room's users, sorted.
    #[schema(max_items = 1000)]
    users: Vec<UserId>,
}

/// A slice of a stream.
#[derive(Serialize, ToSchema)]
struct History {
    /// The messages, oldest first.
    #[schema(value_type = Vec<doc::MessageFrame>)]
    messages: Box<RawValue>,
    /// The seq of the stream's last message (0 if never written), whether still kept or not.
    last_seq: u64,
}

/// How many sessions a disconnect closed.
#[derive(Serialize, ToSchema)]
struct Disconnected {
    /// How many sessions the user had online, cluster-wide.
    sessions: usize,
}

/// The live nodes of the cluster.
#[derive(Serialize, ToSchema)]
struct Nodes {
    nodes: Vec<NodeInfo>,
}

/// Send a direct message to a user
///
/// Appends a message to the personal stream `user:<user>` and delivers it to every session of
/// that user on every node. The answer is the message's `mid` and its `seq` in the recipient's
/// stream. A repeated `key` from the same `from` within 10 minutes stores and delivers nothing and
/// answers the first result.
#[utoipa::path(
    post, path = "/users/{user}/messages", operation_id = "sendUserMessage", tag = "messages",
    params(("user" = UserId, Path, description = "The recipient.")),
    request_body(content = MessageBody, description = "The message."),
    responses(
        (status = 200, description = "Accepted and stored.", body = Accepted),
        WriteFailures,
    )
)]
async fn user_message(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Accepted>, ApiError> {
    let to = user_path(path)?;
    let Push { from, body, key } = parse_push(&body_of(bytes)?)?;
    Ok(accepted(node.send_direct(DirectMessage { from, sender: None, to, body, key }).await?))
}

fn accepted(appended: crate::store::Appended) -> Json<Accepted> {
    Json(Accepted { mid: appended.mid, seq: appended.seq })
}

/// Publish a message to a room
///
/// Appends a message to the stream `room:<room>` and delivers it to every session in the room on
/// every node. The backend need not be a member. A repeated `key` from the same `from` within 10
/// minutes stores and delivers nothing and answers the first result.
#[utoipa::path(
    post, path = "/rooms/{room}/messages", operation_id = "publishRoomMessage", tag = "messages",
    params(("room" = RoomName, Path, description = "The room.")),
    request_body(content = MessageBody, description = "The message."),
    responses(
        (status = 200, description = "Accepted and stored.", body = Accepted),
        WriteFailures,
    )
)]
async fn room_message(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Accepted>, ApiError> {
    let room = room_path(path)?;
    let Push { from, body, key } = parse_push(&body_of(bytes)?)?;
    Ok(accepted(node.publish_room(RoomMessage { from, sender: None, room, body, key }).await?))
}

/// Broadcast a message to everyone
///
/// Delivers a message to every session on every node, with `stream` `broadcast` and no `seq`. It
/// is not stored: sessions that are offline do not get it later.
#[utoipa::path(
    post, path = "/broadcast", operation_id = "broadcast", tag = "messages",
    request_body(content = BroadcastBody, description = "The message."),
    responses(
        (status = 200, description = "Handed to every node.", body = BroadcastAccepted),
        WriteFailures,
    )
)]
async fn broadcast(
    State(node): State<Arc<Node>>,
    bytes: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<BroadcastAccepted>, ApiError> {
    let Push { from, body, .. } = parse_broadcast(&body_of(bytes)?)?;
    Ok(Json(BroadcastAccepted { mid: node.broadcast(from, body).await? }))
}

/// A user's presence
///
/// Whether the user is online and their sessions, cluster-wide.
#[utoipa::path(
    get, path = "/users/{user}/presence", operation_id = "getUserPresence", tag = "presence",
    params(("user" = UserId, Path, description = "The user.")),
    responses(
        (status = 200, description = "The user's sessions.", body = UserPresence),
        ReadFailures,
    )
)]
async fn user_presence(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<UserPresence>, ApiError> {
    let user = user_path(path)?;
    let sessions = node.user_sessions(&user).await?;
    Ok(Json(UserPresence { online: !sessions.is_empty(), sessions }))
}

/// A room's presence
///
/// How many distinct users are in the room, and up to 1000 of them.
#[utoipa::path(
    get, path = "/rooms/{room}/presence", operation_id = "getRoomPresence", tag = "presence",
    params(("room" = RoomName, Path, description = "The room.")),
    responses(
        (status = 200, description = "The room's users.", body = RoomPresence),
        ReadFailures,
    )
)]
async fn room_presence(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RoomPresence>, ApiError> {
    let room = room_path(path)?;
    let (count, users) = node.room_presence(&room, 1000).await?;
    Ok(Json(RoomPresence { count, users }))
}

async fn history(
    node: &Node,
    stream: StreamId,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Json<History>, ApiError> {
    let Query(p) = params.map_err(|e| bad(e.body_text()))?;
    let query = HistoryQuery::from_parts(p.since, p.before, p.limit)?;
    let slice = node.history(&stream, query).await?;
    Ok(Json(History { messages: raw_list(&stream, &slice.messages), last_seq: slice.last_seq }))
}

/// Read a user's stream
///
/// Reads the kept messages of the stream `user:<user>`, oldest first. With `since`: the first
/// `limit` messages with a seq greater than `since`. With `before`: the last `limit` messages with
/// a seq less than `before`. With neither: the last `limit` messages. Giving both `since` and
/// `before` is a bad_request.
#[utoipa::path(
    get, path = "/users/{user}/history", operation_id = "getUserHistory", tag = "history",
    params(("user" = UserId, Path, description = "The user."), HistoryParams),
    responses(
        (status = 200, description = "A slice of the stream.", body = History),
        ReadFailures,
    )
)]
async fn user_history(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Json<History>, ApiError> {
    let user = user_path(path)?;
    history(&node, StreamId::User(user), params).await
}

/// Read a room's stream
///
/// Reads the kept messages of the stream `room:<room>`, oldest first, as the user history route
/// does. Giving both `since` and `before` is a bad_request.
#[utoipa::path(
    get, path = "/rooms/{room}/history", operation_id = "getRoomHistory", tag = "history",
    params(("room" = RoomName, Path, description = "The room."), HistoryParams),
    responses(
        (status = 200, description = "A slice of the stream.", body = History),
        ReadFailures,
    )
)]
async fn room_history(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Json<History>, ApiError> {
    let room = room_path(path)?;
    history(&node, StreamId::Room(room), params).await
}

/// Why the sessions are closed.
#[derive(Deserialize, Default, ToSchema)]
#[schema(as = DisconnectRequest, example = json!({"reason": "account suspended"}))]
struct DisconnectBody {
    #[schema(schema_with = doc::reason_schema)]
    reason: Option<String>,
}

/// Disconnect a user
///
/// Closes every session of the user on every node with close code 4004, after a `disconnect`
/// frame carrying the reason. An empty request body is allowed. The answer is how many sessions
/// the user had online.
#[utoipa::path(
    post, path = "/users/{user}/disconnect", operation_id = "disconnectUser", tag = "sessions",
    params(("user" = UserId, Path, description = "The user.")),
    request_body(content = Option<DisconnectBody>, description = "The reason. The body may be empty, or null."),
    responses(
        (status = 200, description = "The sessions were told to close.", body = Disconnected),
        WriteFailures,
    )
)]
async fn disconnect(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Disconnected>, ApiError> {
    let user = user_path(path)?;
    let reason = parse_disconnect(&body_of(bytes)?)?;
    Ok(Json(Disconnected { sessions: node.disconnect_user(&user, &reason).await? }))
}

/// List the cluster's nodes
///
/// The live nodes of the cluster, with their session and user counts; a single node lists itself.
#[utoipa::path(
    get, path = "/nodes", operation_id = "listNodes", tag = "cluster",
    responses(
        (status = 200, description = "The live nodes.", body = Nodes),
        PlainFailures,
    )
)]
async fn nodes(State(node): State<Arc<Node>>) -> Result<Json<Nodes>, ApiError> {
    Ok(Json(Nodes { nodes: node.nodes().await? }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal<T>(result: Result<T, ApiError>) -> String {
        match result {
            Ok(_) => panic!("accepted"),
            Err(ApiError(e)) => {
                assert_eq!(e.code, ErrorCode::BadRequest);
                e.message
            }
        }
    }

    #[test]
    fn push_bodies_are_checked() {
        let push = parse_push(br#"{"body":{"a":[1]},"from":"billing","key":"k1"}"#).map_err(|e| e.0).unwrap();
        assert_eq!((&*push.from, &*push.body, push.key.as_deref()), ("billing", r#"{"a":[1]}"#, Some("k1")));
        assert_eq!(&*parse_push(br#"{"body":1}"#).map_err(|e| e.0).unwrap().from, "system");
        assert!(refusal(parse_push(b"{}")).contains("needs `body`"));
        assert_eq!(&*parse_push(br#"{"body":null}"#).map_err(|e| e.0).unwrap().body, "null", "null is JSON too");
        assert!(refusal(parse_push(br#"{"body":1,"from":"a b"}"#)).contains("from must be"));
        assert!(refusal(parse_push(br#"{"body":1,"key":""}"#)).contains("key must be"));
        // Found by fuzzing: serde reads a struct from an array, its elements taken as the fields.
        assert!(refusal(parse_push(br#"[{"a":1},"billing"]"#)).contains("expected a JSON object"));
    }

    /// `docs/openapi.json` is the document a node serves, for readers without a node; a change
    /// to the API shows there in review. `SWITCHYARD_BLESS=1 cargo test --lib api::` rewrites it.
    #[test]
    fn the_committed_document_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        let generated = format!("{}\n", openapi_json());
        if std::env::var_os("SWITCHYARD_BLESS").is_some() {
            std::fs::write(path, &generated).expect("docs/openapi.json written");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json differs from the generated document: run SWITCHYARD_BLESS=1 cargo test --lib api::"
        );
    }

    /// Every `$ref` names a component the document has, and every operation has an id, a summary
    /// and a 200 answer.
    #[test]
    fn the_document_is_whole() {
        let document: serde_json::Value = serde_json::from_str(openapi_json()).expect("JSON");
        assert_eq!(document["openapi"], "3.1.0");
        let mut refs = Vec::new();
        fn walk<'a>(value: &'a serde_json::Value, refs: &mut Vec<&'a str>) {
            match value {
                serde_json::Value::Object(map) => {
                    if let Some(serde_json::Value::String(target)) = map.get("$ref") {
                        refs.push(target);
                    }
                    map.values().for_each(|v| walk(v, refs));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
                _ => {}
            }
        }
        walk(&document, &mut refs);
        assert!(refs.len() > 20, "{} references", refs.len());
        for target in refs {
            let pointer = target.strip_prefix('#').unwrap_or_else(|| panic!("{target} is not local"));
            assert!(document.pointer(pointer).is_some(), "{target} names nothing");
        }
        let paths = document["paths"].as_object().expect("paths");
        assert_eq!(paths.len(), 10, "the ten routes of PROTOCOL.md §5");
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("a path item") {
                let what = format!("{method} {path}");
                assert!(operation["operationId"].is_string() && operation["summary"].is_string(), "{what}");
                assert!(operation["responses"]["200"].is_object(), "{what}");
            }
        }
    }

    #[test]
    fn disconnect_bodies_are_checked() {
        assert_eq!(parse_disconnect(b"").map_err(|e| e.0).unwrap(), "disconnected by the server");
        assert_eq!(parse_disconnect(br#" {"reason":"bye"}"#).map_err(|e| e.0).unwrap(), "bye");
        assert_eq!(parse_disconnect(b" null ").map_err(|e| e.0).unwrap(), "disconnected by the server");
        let null = parse_disconnect(br#"{"reason":null}"#).map_err(|e| e.0).unwrap();
        assert_eq!(null, "disconnected by the server", "null is the default reason, as the document says");
        assert!(refusal(parse_disconnect(format!(r#"{{"reason":"{}"}}"#, "x".repeat(101)).as_bytes())).contains("100"));
        assert!(refusal(parse_disconnect(br#"["bye"]"#)).contains("expected a JSON object"));
    }
}
