//! Capture and replay: the copy of an answer kept under its key, and the answer rebuilt from it.

use axum::body::{Body, HttpBody};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

/// Set to `true` on a replayed response, so clients and logs can tell a replay from a first send.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Largest response body kept for replay; `POST /mail` answers are far smaller.
const MAX_STORED_BODY: usize = 64 * 1024;

/// A response extension: store this answer under its key whatever its status. An SMTP send
/// whose outcome is unknown must not be tried again by a retry with the same key.
#[derive(Debug, Clone, Copy)]
pub struct ReplayAlways;

/// A response extension: never store this answer, whatever its status (a refusal that lasts
/// only a short while, so a retry with the same key should be tried again).
#[derive(Debug, Clone, Copy)]
pub struct ReplayNever;

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// Marked [`ReplayAlways`]: kept whatever its status.
    pub always: bool,
}

impl StoredResponse {
    /// Is a response with this status worth replaying? 2xx and definitive 4xx are; 5xx and the
    /// 4xx that say "try again" (408, 409, 425, 429) are not, so a retry tries again.
    pub fn is_replayable_status(status: StatusCode) -> bool {
        status.is_success()
            || (status.is_client_error()
                && !matches!(
                    status,
                    StatusCode::REQUEST_TIMEOUT
                        | StatusCode::CONFLICT
                        | StatusCode::TOO_EARLY
                        | StatusCode::TOO_MANY_REQUESTS
                ))
    }

    pub fn is_replayable(&self) -> bool {
        self.always || Self::is_replayable_status(self.status)
    }

    /// Buffer `response`'s body and return it unchanged, with a copy to store when it is
    /// replayable and its body known to be at most 64 KiB (larger or streamed bodies are not kept).
    pub async fn capture(response: Response) -> (Response, Option<StoredResponse>) {
        // Only bodies known to be small are buffered; anything else passes through unstored.
        let small = response
            .body()
            .size_hint()
            .upper()
            .is_some_and(|n| n <= MAX_STORED_BODY as u64);
        let always = response.extensions().get::<ReplayAlways>().is_some();
        let never = response.extensions().get::<ReplayNever>().is_some();
        if never || !(always || Self::is_replayable_status(response.status())) || !small {
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
                    always,
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
