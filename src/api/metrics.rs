//! `GET /metrics`: the Prometheus text format.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::app::AppState;
use crate::queue::Queue;

/// Prometheus text exposition format, version 0.0.4.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The relay's metrics; the token and SMTP values are read at this moment.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format (on `mailRelay.metrics.port` instead, when that is set)",
        body = String, content_type = "text/plain; version=0.0.4")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .set_ready(super::health::check(&state).reason.is_none());
    for connections in state.listeners() {
        state.metrics.set_connections(
            connections.listener(),
            connections.open(),
            connections.refused(),
        );
    }
    state
        .metrics
        .set_mail_bytes_in_flight(state.budget.in_flight());
    state.metrics.set_transport(state.sender.in_use().transport);
    for identity in state.identities.iter() {
        state
            .metrics
            .set_identity_up(&identity.name, identity.sends.failing().is_none());
    }
    let tokens = state.tokens.as_ref().map(|t| t.state());
    let smtp = state.sender.smtp_state();
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.render(
            tokens.as_ref(),
            smtp.as_ref(),
            state.store.state().as_ref(),
            state.queue.as_ref().map(Queue::depth).as_ref(),
        ),
    )
}
