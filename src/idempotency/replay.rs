//! Capture and replay: the copy of an answer kept under its key, and the answer rebuilt from it.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

/// Set to `true` on a replayed response, so clients and logs can tell a replay from a first send.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Most field errors a stored refusal keeps: as many as a problem body lists
/// (`api::errors::MAX_LISTED_ERRORS`), so a replay shows what the first answer showed.
pub const MAX_STORED_FIELD_ERRORS: usize = 20;

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
    /// Bytes held by this answer, as the store counts them.
    pub fn size(&self) -> usize {
        // Each header costs its text and a slot in the list.
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        self.body.len() + headers
    }

    /// Buffer `response`'s body and return it unchanged, with a copy to store when
    /// [`Replay::of`] says so. A success is kept whatever its size: its mail went out, and a
    /// retry must get this answer rather than send again. A refusal is kept compactly
    /// (`compact_problem`). The bodies are the relay's own, already in memory.
    pub async fn capture(response: Response) -> (Response, Option<StoredResponse>) {
        if Replay::of(&response) == Replay::Skip {
            return (response, None);
        }
        let (parts, body) = response.into_parts();
        match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => {
                let headers = parts
                    .headers
                    .iter()
                    .filter(|(name, _)| keep_header(name))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                let kept = if parts.status.is_success() || !is_problem(&parts.headers) {
                    bytes.clone()
                } else {
                    compact_problem(&bytes).unwrap_or_else(|| bytes.clone())
                };
                let stored = StoredResponse {
                    status: parts.status,
                    headers,
                    body: kept,
                };
                (Response::from_parts(parts, Body::from(bytes)), Some(stored))
            }
            Err(e) => {
                // A broken body: the client gets an error either way; nothing to replay.
                tracing::warn!(error = %e, "response not kept for idempotent replay");
                let mut failed = Response::new(Body::empty());
                *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                (failed, None)
            }
        }
    }
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"))
}

/// A problem+json refusal as kept for replay: its kind, status, code and detail, and the first
/// [`MAX_STORED_FIELD_ERRORS`] field errors with the count of the rest. Whatever else it
/// carried is dropped, so a stored refusal stays a few KiB however much the request got wrong.
/// `None` when the body is not a JSON object (then it is kept as it is).
fn compact_problem(body: &[u8]) -> Option<Bytes> {
    let serde_json::Value::Object(mut problem) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    let mut kept = serde_json::Map::new();
    for name in ["type", "title", "status", "code", "detail"] {
        if let Some(value) = problem.remove(name) {
            kept.insert(name.to_owned(), value);
        }
    }
    let mut omitted = problem
        .get("errorsOmitted")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if let Some(serde_json::Value::Array(mut errors)) = problem.remove("errors") {
        if errors.len() > MAX_STORED_FIELD_ERRORS {
            omitted += (errors.len() - MAX_STORED_FIELD_ERRORS) as u64;
            errors.truncate(MAX_STORED_FIELD_ERRORS);
        }
        if !errors.is_empty() {
            kept.insert("errors".to_owned(), errors.into());
        }
    }
    if omitted > 0 {
        kept.insert("errorsOmitted".to_owned(), omitted.into());
    }
    serde_json::to_vec(&kept).ok().map(Bytes::from)
}

/// Headers that describe the result; per-response ones (request id, date, length) are not replayed.
fn keep_header(name: &HeaderName) -> bool {
    name != header::DATE
        && name != header::CONTENT_LENGTH
        && name != header::TRANSFER_ENCODING
        && name != header::CONNECTION
        && name != header::SET_COOKIE
        && *name != crate::telemetry::request_log::REQUEST_ID
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
    }

    #[tokio::test]
    async fn a_success_is_kept_whatever_its_size() {
        // Larger than the 64 KiB a stored answer used to be limited to: its mail went out, so a
        // retry must replay it, not send again.
        let big = format!("{{\"id\":\"{}\"}}", "x".repeat(200 * 1024));
        let (response, stored) =
            StoredResponse::capture((StatusCode::ACCEPTED, big.clone()).into_response()).await;
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(body.len(), big.len());
        let replayed = stored.expect("a 202 is kept").into_response();
        assert_eq!(replayed.status(), StatusCode::ACCEPTED);
        let body = axum::body::to_bytes(replayed.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(body, big.as_bytes());
    }

    #[tokio::test]
    async fn a_refusal_is_kept_compactly() {
        let errors: Vec<_> = (0..500)
            .map(|i| serde_json::json!({"field": format!("headers.X-{i}"), "message": "x".repeat(100)}))
            .collect();
        let problem = serde_json::json!({
            "type": "https://mail-relay.dev/problems/invalid_request", "title": "Invalid request",
            "status": 400, "code": "invalid_request", "detail": "500 invalid fields",
            "errors": errors, "debug": "y".repeat(10_000),
        });
        let mut original = (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/problem+json")],
            serde_json::to_vec(&problem).unwrap(),
        )
            .into_response();
        // As `ApiError` marks a refusal that a retry cannot change.
        original.extensions_mut().insert(Replay::Store);
        let (response, stored) = StoredResponse::capture(original).await;
        // The client gets the answer as it was.
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            problem
        );
        let stored = stored.expect("a 400 is kept");
        assert!(stored.size() < 4 * 1024, "{} bytes", stored.size());
        let kept: serde_json::Value = serde_json::from_slice(&stored.body).unwrap();
        assert_eq!(kept["code"], "invalid_request");
        assert_eq!(kept["status"], 400);
        assert_eq!(kept["detail"], "500 invalid fields");
        assert_eq!(
            kept["errors"].as_array().unwrap().len(),
            MAX_STORED_FIELD_ERRORS
        );
        assert_eq!(kept["errors"][0], problem["errors"][0]);
        assert_eq!(kept["errorsOmitted"], 480);
        assert!(kept.get("debug").is_none());
    }
}
