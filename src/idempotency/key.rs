//! The `Idempotency-Key` header and the fingerprint that tells "the same request" from another.

use std::fmt;

use axum::http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use super::IdempotencyError;

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// A valid `Idempotency-Key`: 1 to 255 visible ASCII characters (a UUID is the usual choice).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(value: &[u8]) -> Result<Self, IdempotencyError> {
        // Structured-field strings arrive quoted (`"abc"`); plain tokens are common too. Accept both.
        let value = match value {
            [b'"', inner @ .., b'"'] => inner,
            other => other,
        };
        if value.is_empty() || value.len() > MAX_KEY_LEN {
            return Err(IdempotencyError::InvalidKey(format!(
                "it has {} characters",
                value.len()
            )));
        }
        match value.iter().position(|b| !b.is_ascii_graphic()) {
            Some(i) => Err(IdempotencyError::InvalidKey(format!(
                "character {} is not visible ASCII",
                i + 1
            ))),
            None => Ok(Self(String::from_utf8_lossy(value).into_owned())),
        }
    }

    /// The key in `headers`, if there is one.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, IdempotencyError> {
        let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(IdempotencyError::InvalidKey(
                "it is sent more than once".into(),
            ));
        }
        Self::parse(first.as_bytes()).map(Some)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of what makes a request "the same request". The store keys records by caller and key,
/// so together they compare the SHA-256 of caller and body.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a request body (JSON: its raw bytes).
    pub fn of(body: &[u8]) -> Self {
        Self::of_parts([body])
    }

    /// The 32 bytes, as a store keeps them.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fingerprint read back from a store; `None` unless it is 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The fingerprint of a request read in parts, e.g. a `multipart/form-data` mail: its `mail`
    /// JSON part, then each file's name, type and content. Hashing the parts rather than the raw
    /// body keeps a retry with a new multipart boundary the same request.
    pub fn of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut hash = Sha256::new();
        for part in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        Self(hash.finalize().into())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex::encode(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn keys_are_1_to_255_visible_ascii_characters() {
        for good in [
            "a",
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
            &"x".repeat(255),
            "a!~\"",
        ] {
            assert!(IdempotencyKey::parse(good.as_bytes()).is_ok(), "{good}");
        }
        assert_eq!(key("\"quoted-key\"").as_str(), "quoted-key");
        for bad in [
            "",
            &"x".repeat(256),
            "with space",
            "tab\there",
            "caf\u{e9}",
            "\"\"",
        ] {
            let err = IdempotencyKey::parse(bad.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("1 to 255 visible ASCII"), "{err}");
        }
    }

    #[test]
    fn a_key_sent_twice_is_refused_and_none_is_fine() {
        let mut headers = HeaderMap::new();
        assert_eq!(IdempotencyKey::from_headers(&headers), Ok(None));
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(IdempotencyKey::from_headers(&headers), Ok(Some(key("a"))));
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
        assert!(IdempotencyKey::from_headers(&headers).is_err());
    }

    #[test]
    fn the_fingerprint_covers_every_byte_and_part_boundary() {
        let base = Fingerprint::of(b"body");
        assert_eq!(base, Fingerprint::of(b"body"));
        assert_ne!(base, Fingerprint::of(b"body "));
        assert_ne!(
            Fingerprint::of_parts([&b"ab"[..], b"c"]),
            Fingerprint::of_parts([&b"a"[..], b"bc"])
        );
        assert_ne!(
            Fingerprint::of_parts([&b"mail"[..]]),
            Fingerprint::of_parts([&b"mail"[..], b""])
        );
    }
}
