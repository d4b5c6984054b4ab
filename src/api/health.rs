//! Probes for orchestrators: `/health/live` and `/health/ready`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;

/// Liveness: the process is serving requests.
#[derive(Debug, Serialize, ToSchema)]
pub struct Live {
    #[schema(example = "ok")]
    pub status: &'static str,
    /// The relay's version.
    #[schema(example = "0.1.0")]
    pub version: &'static str,
}

/// Readiness: whether this instance should receive traffic, and why not.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// `ready` or `not_ready`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// Why the instance is not ready; absent when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The process is up and serving.
#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "The process serves requests", body = Live)))]
pub async fn live() -> Json<Live> {
    Json(Live {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Settings are loaded and the instance is not draining.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Ready for traffic", body = Ready),
        (status = 503, description = "Not ready (draining, or a dependency failing)", body = Ready),
    ))]
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    match state.not_ready_reason() {
        None => (
            StatusCode::OK,
            Json(Ready {
                status: "ready",
                reason: None,
            }),
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Ready {
                status: "not_ready",
                reason: Some(reason),
            }),
        ),
    }
}
