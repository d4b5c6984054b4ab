//! One error type for the HTTP boundary, rendered as RFC 9457 `application/problem+json`.
//! Every variant maps to one status and one stable `code` here, and nowhere else.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// A problem+json body (RFC 9457) with the relay's stable `code`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// A URI naming the problem kind.
    #[schema(example = "https://mail-relay.dev/problems/invalid_request")]
    pub r#type: String,
    /// Short, human-readable summary of the kind.
    #[schema(example = "Invalid request")]
    pub title: String,
    /// The HTTP status code.
    #[schema(example = 400)]
    pub status: u16,
    /// What is wrong with this request, and how to fix it.
    pub detail: String,
    /// Stable machine-readable code.
    #[schema(example = "invalid_request")]
    pub code: String,
    /// The request id (also in the `X-Request-Id` header and the logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// For validation errors: each field and what is wrong with it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    /// Path of the field, e.g. `to[2]`.
    #[schema(example = "to[2]")]
    pub field: String,
    #[schema(example = "not an e-mail address")]
    pub message: String,
}

/// Every way a request can fail, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    InvalidRequest {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error(transparent)]
    Unauthorized(#[from] crate::caller::AuthError),
    #[error(transparent)]
    SendAsDenied(#[from] crate::send_as::SendAsRefusal),
    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request took longer than the limit of {0:?}")]
    Timeout(std::time::Duration),
    #[error("the service is not ready: {0}")]
    NotReady(String),
    #[error("internal error; see the logs under this request id")]
    Internal,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::InvalidRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid request",
            ),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            Self::SendAsDenied(_) => (StatusCode::FORBIDDEN, "send_as_denied", "Send-as denied"),
            Self::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            Self::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
            ),
            Self::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
            ),
            Self::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Unsupported media type",
            ),
            Self::Timeout(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "Request timed out",
            ),
            Self::NotReady(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "Service not ready",
            ),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "Internal error",
            ),
        }
    }

    /// The stable machine code of this error.
    pub fn code(&self) -> &'static str {
        self.parts().1
    }

    /// The problem+json body, without request id (the middleware adds it).
    pub fn problem(&self) -> Problem {
        let (status, code, title) = self.parts();
        let errors = match self {
            Self::InvalidRequest { errors, .. } => errors.clone(),
            _ => Vec::new(),
        };
        Problem {
            r#type: format!("https://mail-relay.dev/problems/{code}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: self.to_string(),
            code: code.to_string(),
            request_id: None,
            errors,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        if status.is_server_error() {
            tracing::error!(error = %self, code = self.code(), "request failed");
        }
        let mut response = (status, Json(self.problem())).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Self::Unauthorized(e) = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, www_authenticate(e));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

/// RFC 6750's challenge, with the error kind when credentials were sent but refused.
fn www_authenticate(error: &crate::caller::AuthError) -> HeaderValue {
    let challenge = match error.bearer_error() {
        Some(kind) => format!("Bearer realm=\"mail-relay\", error=\"{kind}\""),
        None => "Bearer realm=\"mail-relay\"".to_string(),
    };
    HeaderValue::from_str(&challenge).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}
