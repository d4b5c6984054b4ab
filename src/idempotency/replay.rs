//! Capture and replay: the copy of an answer kept under its key, and the answer rebuilt from it.

use axum::body::{Body, HttpBody};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

/// Set to `true` on a replayed response, so clients and logs can tell a replay from a first send.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Largest response body kept for replay; `POST /mail` answers are far smaller.
const MAX_STORED_BODY: usize = 64 * 1024;

/// Whether an answer is kept under its Idempotency-Key, carried as a response extension by
/// whoever built the answer: each kind of failure says it once (`ApiError::replay`), and
/// [`Replay::of`] is the one place that reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Keep it: a retry cannot change the answer, or must not try (the SMTP server may have
    /// the mail).
    Store,
    /// Do not: the failure is transient or the refusal short-lived, so a retry tries again.
    Skip,
}

impl Replay {
    /// The answer's own mark; unmarked, a success is kept (its mail went out and must not go
    /// out again) and anything else is not.
    pub fn of(response: &Response) -> Self {
        match response.extensions().get::<Self>() {
            Some(replay) => *replay,
            None if response.status().is_success() => Self::Store,
            None => Self::Skip,
        }
    }
}

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl StoredResponse {
    /// Buffer `response`'s body and return it unchanged, with a copy to store when
    /// [`Replay::of`] says so and its body known to be at most 64 KiB (larger or streamed bodies are not kept).
    pub async fn capture(response: Response) -> (Response, Option<StoredResponse>) {
        // Only bodies known to be small are buffered; anything else passes through unstored.
        let small = response
            .body()
            .size_hint()
            .upper()
            .is_some_and(|n| n <= MAX_STORED_BODY as u64);
        if Replay::of(&response) == Replay::Skip || !small {
            return (response, None);
        }
        let (parts, body) = response.into_parts();
        match axum::body::to_bytes(body, MAX_STORED_BODY).await {
            Ok(bytes) => {
                let headers = parts
                    .headers
                    .iter()
                    .filter(|(name, _)| keep_header(name))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                let stored = StoredResponse {
                    status: parts.status,
                    headers,
                    body: bytes.clone(),
                };
                (Response::from_parts(parts, Body::from(bytes)), Some(stored))
            }
            Err(e) => {
                // Too large or broken: the client gets an error either way; nothing to replay.
                tracing::warn!(error = %e, "response not kept for idempotent replay");
                let mut failed = Response::new(Body::empty());
                *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                (failed, None)
            }
        }
    }
}

/// Headers that describe the result; per-response ones (request id, date, length) are not replayed.
fn keep_header(name: &HeaderName) -> bool {
    name != header::DATE
        && name != header::CONTENT_LENGTH
        && name != header::TRANSFER_ENCODING
        && name != header::CONNECTION
        && name != header::SET_COOKIE
        && *name != crate::app::REQUEST_ID
}

impl IntoResponse for StoredResponse {
    /// The stored response, marked `Idempotent-Replayed: true`.
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn capture_keeps_the_response_and_a_replayable_copy() {
        let original = (
            StatusCode::ACCEPTED,
            [("x-request-id", "req-1"), ("location", "/mail/m-1")],
            "{\"id\":\"m-1\"}",
        )
            .into_response();
        let (response, stored) = StoredResponse::capture(original).await;
        let stored = stored.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"{\"id\":\"m-1\"}");
        assert!(stored.headers.iter().any(|(n, _)| n == header::LOCATION));
        assert!(!stored.headers.iter().any(|(n, _)| n == "x-request-id"));

        let replayed = stored.into_response();
        assert_eq!(replayed.status(), StatusCode::ACCEPTED);
        assert_eq!(replayed.headers()[IDEMPOTENT_REPLAYED], "true");
        assert_eq!(replayed.headers()[header::LOCATION], "/mail/m-1");
        let body = axum::body::to_bytes(replayed.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"{\"id\":\"m-1\"}");

        let (_, stored) =
            StoredResponse::capture(StatusCode::SERVICE_UNAVAILABLE.into_response()).await;
        assert!(stored.is_none());

        // Too large to keep: passed through whole, not stored.
        let big = "x".repeat(MAX_STORED_BODY + 1);
        let (response, stored) = StoredResponse::capture(big.clone().into_response()).await;
        assert!(stored.is_none());
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(body.len(), big.len());
    }
}
