//! The server API for backends (PROTOCOL.md §5): JSON over HTTP under `/api/v1`, guarded by API
//! keys compared in constant time. Every handler is a thin mapping onto a [`Node`] operation, so
//! an API call and a client command behave alike.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::node::{DirectMessage, Node, RoomMessage};
use crate::protocol::{ErrorCode, HistoryQuery, ProtocolError, RoomName, StreamId, UserId, valid_name};
use crate::session::raw_list;

const OPENAPI: &str = include_str!("openapi.json");

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
    let body = serde_json::json!({"error": {"code": e.code.as_str(), "message": e.message}});
    (status, Json(body)).into_response()
}

type ApiResult = Result<Response, ApiError>;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(ProtocolError::bad_request(message))
}

/// How much longer than `--max-message-size` a request body may be: room for the JSON around the
/// message's body (`from`, `key`).
pub(crate) const REQUEST_SLACK: usize = 4096;

pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.config.max_message_size + REQUEST_SLACK;
    let v1 = Router::new()
        .route("/users/{user}/messages", post(user_message))
        .route("/rooms/{room}/messages", post(room_message))
        .route("/broadcast", post(broadcast))
        .route("/users/{user}/presence", get(user_presence))
        .route("/rooms/{room}/presence", get(room_presence))
        .route("/users/{user}/history", get(user_history))
        .route("/rooms/{room}/history", get(room_history))
        .route("/users/{user}/disconnect", post(disconnect))
        .route("/nodes", get(nodes))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        // `layer`, not `route_layer`: an unknown path under /v1 needs the key too (401, not 404).
        .layer(middleware::from_fn_with_state(node.clone(), require_key))
        .with_state(node);
    Router::new()
        .nest("/v1", v1)
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
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

#[derive(Deserialize)]
struct MessageBody {
    #[serde(default, deserialize_with = "crate::protocol::any_json")]
    body: Option<Box<RawValue>>,
    from: Option<String>,
    key: Option<String>,
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

fn key(key: Option<String>) -> Result<Option<String>, ApiError> {
    match key {
        Some(k) if k.is_empty() || k.len() > 256 => Err(bad("key must be 1-256 bytes")),
        other => Ok(other),
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

fn push_request(bytes: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Result<Push, ApiError> {
    parse_push(&body_of(bytes)?)
}

/// Parses and validates the body of a message or broadcast request. Public so that the fuzz
/// target (`fuzz/fuzz_targets/api_body.rs`) runs exactly this path.
pub fn parse_push(bytes: &[u8]) -> Result<Push, ApiError> {
    let req: MessageBody = parse_body(bytes)?;
    let body = req.body.ok_or_else(|| bad("the request needs `body`"))?;
    let body = crate::protocol::checked_body(body)?;
    Ok(Push { from: sender(req.from)?, body: Arc::from(body.get()), key: key(req.key)? })
}

/// Parses and validates the body of a disconnect request: the reason to close with. An empty
/// body gives the default reason. Public for the fuzz target, like [`parse_push`].
pub fn parse_disconnect(bytes: &[u8]) -> Result<String, ApiError> {
    let req: DisconnectBody = if bytes.is_empty() { DisconnectBody::default() } else { parse_body(bytes)? };
    let reason = req.reason.unwrap_or_else(|| "disconnected by the server".to_owned());
    if reason.len() > 100 {
        return Err(bad("reason must be at most 100 bytes"));
    }
    Ok(reason)
}

fn accepted(appended: crate::store::Appended) -> Response {
    Json(serde_json::json!({"mid": appended.mid, "seq": appended.seq})).into_response()
}

async fn user_message(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let to = user_path(path)?;
    let Push { from, body, key } = push_request(bytes)?;
    Ok(accepted(node.send_direct(DirectMessage { from, sender: None, to, body, key }).await?))
}

async fn room_message(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let room = room_path(path)?;
    let Push { from, body, key } = push_request(bytes)?;
    Ok(accepted(node.publish_room(RoomMessage { from, sender: None, room, body, key }).await?))
}

async fn broadcast(
    State(node): State<Arc<Node>>,
    bytes: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let Push { from, body, .. } = push_request(bytes)?;
    let mid = node.broadcast(from, body).await?;
    Ok(Json(serde_json::json!({"mid": mid})).into_response())
}

async fn user_presence(State(node): State<Arc<Node>>, path: Result<Path<String>, PathRejection>) -> ApiResult {
    let user = user_path(path)?;
    let sessions = node.user_sessions(&user).await?;
    Ok(Json(serde_json::json!({"online": !sessions.is_empty(), "sessions": sessions})).into_response())
}

async fn room_presence(State(node): State<Arc<Node>>, path: Result<Path<String>, PathRejection>) -> ApiResult {
    let room = room_path(path)?;
    let (count, users) = node.room_presence(&room, 1000).await?;
    Ok(Json(serde_json::json!({"count": count, "users": users})).into_response())
}

#[derive(Deserialize)]
struct HistoryParams {
    since: Option<u64>,
    before: Option<u64>,
    limit: Option<u64>,
}

async fn history(node: &Node, stream: StreamId, params: Result<Query<HistoryParams>, QueryRejection>) -> ApiResult {
    let Query(p) = params.map_err(|e| bad(e.body_text()))?;
    let query = HistoryQuery::from_parts(p.since, p.before, p.limit)?;
    let slice = node.history(&stream, query).await?;
    let body = serde_json::json!({"messages": raw_list(&stream, &slice.messages), "last_seq": slice.last_seq});
    Ok(Json(body).into_response())
}

async fn user_history(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> ApiResult {
    let user = user_path(path)?;
    history(&node, StreamId::User(user), params).await
}

async fn room_history(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> ApiResult {
    let room = room_path(path)?;
    history(&node, StreamId::Room(room), params).await
}

#[derive(Deserialize, Default)]
struct DisconnectBody {
    reason: Option<String>,
}

async fn disconnect(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let user = user_path(path)?;
    let reason = parse_disconnect(&body_of(bytes)?)?;
    let sessions = node.disconnect_user(&user, &reason).await?;
    Ok(Json(serde_json::json!({"sessions": sessions})).into_response())
}

async fn nodes(State(node): State<Arc<Node>>) -> ApiResult {
    let nodes = node.nodes().await?;
    Ok(Json(serde_json::json!({"nodes": nodes})).into_response())
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

    #[test]
    fn disconnect_bodies_are_checked() {
        assert_eq!(parse_disconnect(b"").map_err(|e| e.0).unwrap(), "disconnected by the server");
        assert_eq!(parse_disconnect(br#" {"reason":"bye"}"#).map_err(|e| e.0).unwrap(), "bye");
        let null = parse_disconnect(br#"{"reason":null}"#).map_err(|e| e.0).unwrap();
        assert_eq!(null, "disconnected by the server", "null is the default reason, as the document says");
        assert!(refusal(parse_disconnect(format!(r#"{{"reason":"{}"}}"#, "x".repeat(101)).as_bytes())).contains("100"));
        assert!(refusal(parse_disconnect(br#"["bye"]"#)).contains("expected a JSON object"));
    }
}
