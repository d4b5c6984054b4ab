//! The Graph benchmark's far end: `POST /v1.0/users/{mailbox}/sendMail` answered `202` as fast
//! as it can, so that the relay's own cost is what the benchmark measures. Like Graph it wants a
//! bearer token and `Content-Type: text/plain`, and it decodes the base64 MIME (a body that is
//! not base64 gets Graph's `400 ErrorMimeContentInvalidBase64String`); it checks no signature
//! and keeps no mail. `GET /count` answers how many mails it took.
//!
//! ```sh
//! cargo run --release --example graph_fake -- PORT_FILE
//! ```
//! Binds 127.0.0.1 on a free port and writes the port to PORT_FILE.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;

#[derive(Clone, Default)]
struct Counts {
    sent: Arc<AtomicU64>,
    ids: Arc<AtomicU64>,
}

fn graph_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#);
    (status, [("content-type", "application/json")], body).into_response()
}

async fn send_mail(State(counts): State<Counts>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if !header("authorization").is_some_and(|v| v.starts_with("Bearer ") && v.len() > 20) {
        return graph_error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Access token is empty.",
        );
    }
    if !header("content-type").is_some_and(|v| v.starts_with("text/plain")) {
        return graph_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "text/plain expected",
        );
    }
    if base64::engine::general_purpose::STANDARD
        .decode(&body)
        .is_err()
    {
        return graph_error(
            StatusCode::BAD_REQUEST,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
        );
    }
    counts.sent.fetch_add(1, Ordering::Relaxed);
    let id = counts.ids.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::ACCEPTED,
        [("request-id", format!("00000000-0000-4000-8000-{id:012}"))],
    )
        .into_response()
}

async fn count(State(counts): State<Counts>) -> String {
    counts.sent.load(Ordering::Relaxed).to_string()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port_file = std::env::args()
        .nth(1)
        .ok_or("usage: graph_fake PORT_FILE")?;
    let app = Router::new()
        .route("/v1.0/users/{user}/sendMail", post(send_mail))
        .route("/count", get(count))
        .layer(DefaultBodyLimit::max(4 * 1024 * 1024))
        .with_state(Counts::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    std::fs::write(&port_file, listener.local_addr()?.port().to_string())?;
    axum::serve(listener, app).await?;
    Ok(())
}
