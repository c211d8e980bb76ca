//! Who a connecting client is: JWT verification (HS256, RS256, ES256) or, in dev mode, the
//! `?user=` query parameter (PROTOCOL.md §2), and what rooms their token lets them into.

use std::path::Path;

use anyhow::Context;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::protocol::{ErrorCode, ProtocolError, RoomName, UserId};

/// Seconds of clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 60;

/// A verified client.
#[derive(Clone, Debug)]
pub struct Identity {
    pub user: UserId,
    pub device: Option<String>,
    /// The token's `rooms` claim: names, or prefixes ending in `*`.
    pub rooms: Vec<String>,
    /// Unix seconds after which the session must close with 4001 (`exp` plus leeway).
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Whether the token's `rooms` claim names `room` or a prefix of it.
    pub fn has_room_claim(&self, room: &RoomName) -> bool {
        self.rooms.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => room.as_str().starts_with(prefix),
            None => pattern == room.as_str(),
        })
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    rooms: Vec<String>,
}

/// Verifies tokens, or admits dev-mode users when no key is configured.
pub struct Authenticator {
    key: Option<(DecodingKey, Validation)>,
}

impl Authenticator {
    /// Dev mode: no key, `?user=` is trusted.
    pub fn dev() -> Self {
        Self { key: None }
    }

    pub fn hs256(secret: &str) -> Self {
        Self::with_key(DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
    }

    /// Reads an RS256 (RSA) or ES256 (P-256) public key in PEM.
    pub fn public_key_file(path: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read(path).with_context(|| format!("--jwt-public-key: cannot read {}", path.display()))?;
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            return Ok(Self::with_key(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            return Ok(Self::with_key(key, Algorithm::ES256));
        }
        anyhow::bail!("--jwt-public-key: {} is not an RSA or EC (P-256) public key in PEM", path.display())
    }

    fn with_key(key: DecodingKey, alg: Algorithm) -> Self {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self { key: Some((key, validation)) }
    }

    pub fn dev_mode(&self) -> bool {
        self.key.is_none()
    }

    /// Decides who is connecting. `token` comes from the Authorization header or `?token=`;
    /// `user` and `device` from the query string (used only in dev mode, or `device` as a
    /// fallback label).
    pub fn authenticate(
        &self,
        token: Option<&str>,
        user: Option<&str>,
        device: Option<&str>,
    ) -> Result<Identity, ProtocolError> {
        let device = device.filter(|d| !d.is_empty()).map(|d| d.chars().take(64).collect());
        let Some((key, validation)) = &self.key else {
            let user =
                user.ok_or_else(|| ProtocolError::new(ErrorCode::Unauthorized, "dev mode: connect with ?user=<id>"))?;
            return Ok(Identity { user: UserId::parse(user)?, device, rooms: Vec::new(), expires_at: None });
        };
        let token = token.ok_or_else(|| {
            ProtocolError::new(ErrorCode::Unauthorized, "a token is required: Authorization: Bearer <jwt> or ?token=")
        })?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| ProtocolError::new(ErrorCode::Unauthorized, format!("invalid token: {e}")))?;
        let claims = data.claims;
        let user = UserId::parse(&claims.sub)
            .map_err(|_| ProtocolError::new(ErrorCode::Unauthorized, "invalid token: `sub` is not a valid user id"))?;
        Ok(Identity {
            user,
            device: claims.device.map(|d| d.chars().take(64).collect()).or(device),
            rooms: claims.rooms,
            // Saturating: `exp` is any u64 the key signed, and u64::MAX overflowed here.
            expires_at: Some(claims.exp.saturating_add(LEEWAY_SECS)),
        })
    }
}

/// The credentials of an `Authorization: Bearer <credentials>` header. The scheme name is
/// matched without regard to case (RFC 9110 §11.1); the credentials are taken as they are.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case("bearer ").then_some(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn now() -> u64 {
        crate::protocol::now_ms() / 1000
    }

    #[test]
    fn bearer_credentials_need_the_scheme_in_any_case_and_keep_their_own() {
        let with = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            bearer(&headers).map(str::to_owned)
        };
        assert_eq!(with("Bearer k1").as_deref(), Some("k1"));
        assert_eq!(with("bEARER K1").as_deref(), Some("K1"));
        assert_eq!(with("Basic k1"), None);
        assert_eq!(with("Bearer"), None);
        assert_eq!(with("Bearerk1"), None);
        assert_eq!(bearer(&http::HeaderMap::new()), None);
    }

    #[test]
    fn hs256_tokens_are_checked() {
        let auth = Authenticator::hs256("s3cret");
        let good =
            token("s3cret", serde_json::json!({"sub":"alice","exp":now()+60,"device":"phone","rooms":["team-*"]}));
        let id = auth.authenticate(Some(&good), Some("mallory"), None).unwrap();
        assert_eq!(id.user.as_str(), "alice", "?user= is ignored when a token is given");
        assert_eq!(id.device.as_deref(), Some("phone"));
        assert!(id.has_room_claim(&RoomName::parse("team-red").unwrap()));
        assert!(!id.has_room_claim(&RoomName::parse("other").unwrap()));

        let wrong_key = token("other", serde_json::json!({"sub":"alice","exp":now()+60}));
        assert!(auth.authenticate(Some(&wrong_key), None, None).is_err());
        let expired = token("s3cret", serde_json::json!({"sub":"alice","exp":now()-120}));
        assert!(auth.authenticate(Some(&expired), None, None).is_err());
        let within_leeway = token("s3cret", serde_json::json!({"sub":"alice","exp":now()-30}));
        assert!(auth.authenticate(Some(&within_leeway), None, None).is_ok());
        let no_sub = token("s3cret", serde_json::json!({"exp":now()+60}));
        assert!(auth.authenticate(Some(&no_sub), None, None).is_err());
        let bad_sub = token("s3cret", serde_json::json!({"sub":"a b","exp":now()+60}));
        assert!(auth.authenticate(Some(&bad_sub), None, None).is_err());
        assert_eq!(auth.authenticate(None, Some("alice"), None).unwrap_err().code, ErrorCode::Unauthorized);
    }

    /// Found by fuzzing (a hand-written seed of the `jwt` target): `exp` near u64::MAX overflowed
    /// `exp + leeway` (a panic with overflow checks, an expiry in 1970 without).
    #[test]
    fn the_largest_exp_does_not_overflow() {
        let auth = Authenticator::hs256("s3cret");
        for exp in [u64::MAX, u64::MAX - LEEWAY_SECS + 1] {
            let far = token("s3cret", serde_json::json!({"sub":"alice","exp":exp}));
            assert_eq!(auth.authenticate(Some(&far), None, None).unwrap().expires_at, Some(u64::MAX));
        }
    }

    #[test]
    fn dev_mode_trusts_the_query() {
        let auth = Authenticator::dev();
        let id = auth.authenticate(None, Some("bob"), Some("tab")).unwrap();
        assert_eq!((id.user.as_str(), id.device.as_deref()), ("bob", Some("tab")));
        assert_eq!(auth.authenticate(None, Some("b b"), None).unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(auth.authenticate(None, None, None).unwrap_err().code, ErrorCode::Unauthorized);
    }
}
