//! The opening handshake (RFC 6455 §4.2) on hyper's HTTP/1.1 upgrade: checking the client's
//! request, the `101` answer with `Sec-WebSocket-Accept`, and taking the stream back from hyper
//! once the upgrade is done.
//!
//! Whether the client may connect at all (origin, token, limits) is the server's decision, made
//! between [`accept_key`] and the upgrade; nothing here looks at it.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper_util::rt::TokioIo;

use super::{Transport, WebSocket};
use crate::protocol::ProtocolError;

/// The GUID every `Sec-WebSocket-Accept` is computed with (RFC 6455 §1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Checks the handshake (RFC 6455 §4.2.1) and answers the `Sec-WebSocket-Accept` value.
pub(crate) fn accept_key(request: &Request) -> Result<String, ProtocolError> {
    // axum routes HEAD to GET handlers, and hyper answers an HTTP/1.0 `101` but never upgrades it.
    if request.method() != Method::GET || request.version() < Version::HTTP_11 {
        return Err(ProtocolError::bad_request("a WebSocket upgrade is an HTTP/1.1 GET request"));
    }
    let headers = request.headers();
    // A list header may come as several field lines (`Connection: close` and `Connection: Upgrade`).
    let has = |name: header::HeaderName, needle: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(needle)))
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err(ProtocolError::bad_request("this endpoint needs a WebSocket upgrade"));
    }
    if !has(header::SEC_WEBSOCKET_VERSION, "13") {
        return Err(ProtocolError::bad_request("only WebSocket version 13 is supported"));
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key,
        (None, _) => return Err(ProtocolError::bad_request("missing Sec-WebSocket-Key")),
        (Some(_), Some(_)) => return Err(ProtocolError::bad_request("Sec-WebSocket-Key given more than once")),
    };
    if !base64::engine::general_purpose::STANDARD.decode(key.as_bytes()).is_ok_and(|nonce| nonce.len() == 16) {
        return Err(ProtocolError::bad_request("Sec-WebSocket-Key must be 16 bytes in base64"));
    }
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    Ok(base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes()))
}

/// Completes the answer to a refused handshake: one that names a version other than 13 also
/// says which version this server speaks (RFC 6455 §4.4).
pub(crate) fn refused(request_headers: &HeaderMap, mut response: Response) -> Response {
    let other_version = request_headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().split(|b| *b == b',').all(|t| t.trim_ascii() != b"13"));
    if other_version {
        response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
    response
}

/// The `101` answer to an accepted handshake (RFC 6455 §4.2.2).
pub(crate) fn switching_protocols(accept: &str) -> Response {
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    response
}

/// The WebSocket on the stream under an upgraded connection, starting with the bytes hyper read
/// past the handshake. `S` is the stream the connection was served on (hyper hands it back only
/// as that type); `None`, logged, when the upgrade failed or the stream is another type.
pub(crate) async fn upgraded<S: Transport + 'static>(
    on_upgrade: hyper::upgrade::OnUpgrade,
    max_payload: usize,
) -> Option<WebSocket<S>> {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
    };
    match upgraded.downcast::<TokioIo<S>>() {
        Ok(parts) => Some(WebSocket::new(parts.io.into_inner(), &parts.read_buf, max_payload)),
        Err(_) => {
            tracing::error!(
                expected = std::any::type_name::<S>(),
                "an upgraded connection is not on the expected stream"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: &str, key: &str) -> Request {
        Request::builder()
            .uri("/ws")
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::SEC_WEBSOCKET_VERSION, version)
            .header(header::SEC_WEBSOCKET_KEY, key)
            .body(axum::body::Body::empty())
            .unwrap()
    }

    #[test]
    fn the_accept_key_is_the_one_rfc_6455_gives() {
        // The example of RFC 6455 §1.3.
        assert_eq!(accept_key(&request("13", "dGhlIHNhbXBsZSBub25jZQ==")).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn another_version_is_refused_with_the_one_spoken_here() {
        let other = request("8", "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(accept_key(&other).is_err());
        let response = refused(other.headers(), StatusCode::BAD_REQUEST.into_response());
        assert_eq!(response.headers()[header::SEC_WEBSOCKET_VERSION], "13");
        let bad_key = request("13", "c2hvcnQ=");
        assert!(accept_key(&bad_key).is_err());
        let response = refused(bad_key.headers(), StatusCode::BAD_REQUEST.into_response());
        assert!(response.headers().get(header::SEC_WEBSOCKET_VERSION).is_none());
    }
}
