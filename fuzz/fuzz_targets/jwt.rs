//! Client tokens (PROTOCOL.md §2): `auth::Authenticator::authenticate` with an HS256 secret, an
//! RS256 public key and an ES256 public key (both read with `public_key_file`, as
//! `--jwt-public-key` does), and in dev mode.
//!
//! Inputs are any token string; a token known to be signed with one segment edited (raw, or its
//! decoded JSON); and header and claims of the fuzzer's choosing signed with the HS256 secret,
//! which reaches the claim checks behind the signature.
//!
//! The invariant is that nothing not signed by the key is accepted: an HS256 token only if its
//! signature is the HMAC of its first two segments, an RS256 or ES256 token only if it is one of
//! the tokens in `fuzz/keys/tokens.txt` (their private keys are gone, so the fuzzer cannot sign
//! anything new). An accepted token must also name the verifying algorithm, carry a valid `sub`
//! and an `exp` not in the past beyond the leeway, and give an expiry no earlier than `exp`.
//!
//! Input (byte 0 picks the mode, so seeds can be written by hand):
//! - 0: the rest is a token (UTF-8, as headers and query strings give it);
//! - 1: bytes 1-6 pick a signed token, a segment, an edit, a position (2 bytes) and a length;
//!   the rest is the text the edit inserts;
//! - 2: the rest is a header and claims, split at the first newline, signed with the secret;
//! - 3: dev mode, the rest is `user` and optionally `device`, split at the first newline.

#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use switchyard::auth::{Authenticator, Identity};
use switchyard::protocol::valid_name;

const SECRET: &str = "fuzz-secret-not-used-anywhere-else";
/// How far in the past `exp` may be (the server's leeway).
const LEEWAY: u64 = 60;

struct Keys {
    hs256: Authenticator,
    rs256: Authenticator,
    es256: Authenticator,
    /// Signed tokens by key: HS256, RS256, ES256.
    signed: [Vec<String>; 3],
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("switchyard-fuzz-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = |name: &str, text: &str| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let rs256 = Authenticator::public_key_file(&pem("rsa.pub.pem", include_str!("../keys/rsa.pub.pem"))).unwrap();
    let es256 = Authenticator::public_key_file(&pem("ec.pub.pem", include_str!("../keys/ec.pub.pem"))).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let lines: Vec<String> = include_str!("../keys/tokens.txt").lines().map(str::to_owned).collect();
    let hs = |claims: serde_json::Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
            .unwrap()
    };
    let signed = [
        vec![
            hs(serde_json::json!({"sub": "alice", "exp": 4_102_444_800u64})),
            hs(
                serde_json::json!({"sub": "bob", "exp": 4_102_444_800u64, "device": "phone", "rooms": ["private:team-*"]}),
            ),
        ],
        lines[..2].to_vec(),
        lines[2..4].to_vec(),
    ];
    let keys = Keys { hs256: Authenticator::hs256(SECRET), rs256, es256, signed };
    for (auth, tokens) in [&keys.hs256, &keys.rs256, &keys.es256].into_iter().zip(&keys.signed) {
        for token in tokens {
            auth.authenticate(Some(token), None, None).expect("a signed token is accepted");
        }
    }
    keys
});

enum Edit<'a> {
    Replace(&'a str),
    Insert {
        at: u16,
        text: &'a str,
    },
    Remove {
        at: u16,
        len: u8,
    },
    /// Edits the decoded segment (the header or claims JSON, or the signature bytes) and encodes
    /// it again.
    Decoded {
        at: u16,
        remove: u8,
        bytes: &'a [u8],
    },
    /// Takes the segment from another signed token (algorithm and key confusion).
    Swap(u8),
}

/// `data` cut at its first newline.
fn two(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    }
}

fuzz_target!(|data: &[u8]| {
    let keys = &*KEYS;
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            let Ok(token) = std::str::from_utf8(rest) else { return };
            check_all(keys, token);
        }
        1 => {
            let [token, segment, kind, at_lo, at_hi, len, ref text @ ..] = *rest else { return };
            let at = u16::from_le_bytes([at_lo, at_hi]);
            let Ok(text_str) = std::str::from_utf8(text) else { return };
            let edit = match kind % 5 {
                0 => Edit::Replace(text_str),
                1 => Edit::Insert { at, text: text_str },
                2 => Edit::Remove { at, len },
                3 => Edit::Decoded { at, remove: len, bytes: text },
                _ => Edit::Swap(len),
            };
            let all: Vec<&String> = keys.signed.iter().flatten().collect();
            let original = all[usize::from(token) % all.len()];
            let mut parts: Vec<String> = original.split('.').map(str::to_owned).collect();
            let i = usize::from(segment) % parts.len();
            parts[i] = edited(&parts[i], edit, |n| {
                let other = all[usize::from(n) % all.len()];
                other.split('.').nth(i).unwrap_or("").to_owned()
            });
            check_all(keys, &parts.join("."));
        }
        2 => {
            let (header, claims) = two(rest);
            let message =
                format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims.unwrap_or_default()));
            let key = EncodingKey::from_secret(SECRET.as_bytes());
            let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
            let token = format!("{message}.{signature}");
            if let Ok(identity) = keys.hs256.authenticate(Some(&token), None, None) {
                check_identity(&identity, &token, Algorithm::HS256);
            }
        }
        _ => {
            let (user, device) = two(rest);
            let Ok(user) = std::str::from_utf8(user) else { return };
            let Ok(device) = device.map(std::str::from_utf8).transpose() else { return };
            if let Ok(identity) = Authenticator::dev().authenticate(None, Some(user), device) {
                assert_eq!(identity.user.as_str(), user);
                assert!(valid_name(identity.user.as_str()));
                assert!(identity.device.as_ref().is_none_or(|d| !d.is_empty() && d.chars().count() <= 64));
                assert!(identity.rooms.is_empty() && identity.expires_at.is_none());
            }
        }
    }
});

fn edited(part: &str, edit: Edit<'_>, other: impl Fn(u8) -> String) -> String {
    let at = |at: u16, len: usize| usize::from(at) % (len + 1);
    match edit {
        Edit::Replace(text) => text.to_owned(),
        Edit::Insert { at: i, text } => {
            let mut out = part.to_owned();
            out.insert_str(at(i, part.len()), text);
            out
        }
        Edit::Remove { at: i, len } => {
            let start = at(i, part.len());
            let end = (start + usize::from(len)).min(part.len());
            format!("{}{}", &part[..start], &part[end..])
        }
        Edit::Decoded { at: i, remove, bytes } => {
            let mut decoded = URL_SAFE_NO_PAD.decode(part).unwrap_or_default();
            let start = at(i, decoded.len());
            let end = (start + usize::from(remove)).min(decoded.len());
            decoded.splice(start..end, bytes.iter().copied());
            URL_SAFE_NO_PAD.encode(decoded)
        }
        Edit::Swap(n) => other(n),
    }
}

/// Tries `token` on every key; any acceptance must be of a token that key signed.
fn check_all(keys: &Keys, token: &str) {
    if let Ok(identity) = keys.hs256.authenticate(Some(token), None, None) {
        let parts: Vec<&str> = token.split('.').collect();
        let [header, claims, signature] = parts[..] else {
            panic!("accepted an HS256 token without three segments: {token:?}");
        };
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let expected = jsonwebtoken::crypto::sign(format!("{header}.{claims}").as_bytes(), &key, Algorithm::HS256);
        assert_eq!(
            Ok(signature),
            expected.as_deref().map_err(|_| ()),
            "accepted an HS256 token not signed by the secret: {token:?}"
        );
        check_identity(&identity, token, Algorithm::HS256);
    }
    for (auth, signed, alg) in
        [(&keys.rs256, &keys.signed[1], Algorithm::RS256), (&keys.es256, &keys.signed[2], Algorithm::ES256)]
    {
        if let Ok(identity) = auth.authenticate(Some(token), None, None) {
            assert!(signed.iter().any(|t| t == token), "accepted a {alg:?} token the key never signed: {token:?}");
            check_identity(&identity, token, alg);
        }
    }
}

fn check_identity(identity: &Identity, token: &str, alg: Algorithm) {
    let header = jsonwebtoken::decode_header(token).expect("an accepted token has a header");
    assert_eq!(header.alg, alg, "a token naming another algorithm was accepted: {token:?}");
    let claims = token.split('.').nth(1).and_then(|c| URL_SAFE_NO_PAD.decode(c).ok()).expect("claims decode");
    // Only the claims checked here: serde_json does not look into the ones it skips (UTF-8,
    // number range), and neither should this check.
    #[derive(serde::Deserialize)]
    struct Seen {
        sub: String,
        exp: serde_json::Number,
    }
    let claims: Seen = serde_json::from_slice(&claims).expect("accepted claims have `sub` and `exp`");
    assert_eq!(claims.sub, identity.user.as_str(), "the user is the token's `sub`");
    assert!(valid_name(identity.user.as_str()));
    let now = jsonwebtoken::get_current_timestamp();
    let exp = claims.exp.as_u64().or_else(|| claims.exp.as_f64().map(|f| f as u64)).expect("`exp` is a number");
    assert!(exp.saturating_add(LEEWAY) >= now, "expired token accepted: exp {exp}, now {now}");
    let expires_at = identity.expires_at.expect("a token gives an expiry");
    assert!(expires_at >= exp && expires_at > now, "expiry {expires_at} for exp {exp} at {now}");
    assert!(identity.device.as_ref().is_none_or(|d| d.chars().count() <= 64));
}
