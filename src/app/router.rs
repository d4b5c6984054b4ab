//! The router: every route under the base path, and the middleware stack every request passes
//! (request id, client address, in-flight tracking, the log line, panics, problem+json, body
//! limit, timeout, CORS).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowCredentials, AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::SetSensitiveHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use super::AppState;
use crate::api::{self, ApiError};
use crate::config::{CorsSettings, Limits};
use crate::http::drain;
use crate::http::forwarded::{self, ClientAddr, TrustedProxies};
use crate::idempotency::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use crate::telemetry::request_log::{self, REQUEST_ID};

/// The router with every route and the middleware stack.
pub fn router(state: AppState) -> Router {
    let limits = state.settings.relay.limits.clone();
    let proxies = Arc::new(TrustedProxies::new(&state.settings.relay.http));
    let middleware = ServiceBuilder::new()
        .layer(SetSensitiveHeadersLayer::new([
            header::AUTHORIZATION,
            header::PROXY_AUTHORIZATION,
            header::COOKIE,
        ]))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(axum::middleware::from_fn_with_state(
            proxies,
            forwarded::client_address,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.in_flight.clone(),
            drain::track,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                // `request_log::observe` writes the one line per request, errors included.
                .on_request(())
                .on_response(())
                .on_failure(()),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            request_log::observe,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(CatchPanicLayer::custom(
            |panic: Box<dyn std::any::Any + Send>| {
                // The request's log line names the panic; the caller sees only the request id.
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                request_log::note_cause_text(format!("the handler panicked: {message}"));
                ApiError::Internal.into_response()
            },
        ))
        .layer(axum::middleware::from_fn_with_state(
            limits.clone(),
            problem_details,
        ))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            limits.request_timeout,
        ))
        .layer(DefaultBodyLimit::disable());

    let mut routes = Router::new()
        .route("/mail", post(api::mail::send_mail))
        .route("/mail/{id}", get(api::mail_status::mail_status))
        .route("/health/live", get(api::health::live))
        .route("/health/ready", get(api::health::ready))
        .route("/openapi.json", get(api::openapi::openapi_json));
    if state.settings.relay.metrics.listen.is_none() {
        routes = routes.route("/metrics", get(api::metrics::metrics));
    }
    if state.settings.relay.http.docs {
        routes = routes.merge(api::docs::routes());
    }
    // Every route, probes included, moves under the base path: the proxy forwards the path as is.
    let base_path = state.settings.relay.http.base_path.as_str();
    let routes = if base_path.is_empty() {
        routes
    } else {
        Router::new().nest(base_path, routes)
    };
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware)
        .layer(cors(&state.settings.relay.cors))
        .with_state(state)
}

/// `/metrics` alone, for its own listener (`mailRelay.metrics.port`).
pub(super) fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(api::metrics::metrics))
        .with_state(state)
}

/// Browsers calling the relay directly: only the listed origins, none by default.
fn cors(settings: &CorsSettings) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(settings.allowed_origins.iter().cloned()))
        .allow_methods([Method::POST, Method::GET])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            REQUEST_ID,
            IDEMPOTENCY_KEY,
        ])
        .expose_headers([REQUEST_ID, header::RETRY_AFTER, IDEMPOTENT_REPLAYED])
        // Credentials only for an origin that is listed, never in answers to any other origin.
        .allow_credentials(AllowCredentials::predicate({
            let listed = settings.allowed_origins.clone();
            move |origin, _| listed.contains(origin)
        }))
        .max_age(Duration::from_secs(600))
}

fn request_span(request: &Request<Body>) -> tracing::Span {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("-");
    let client = request
        .extensions()
        .get::<ClientAddr>()
        .map(|ClientAddr(ip)| ip.to_string());
    let client = client.as_deref().unwrap_or("-");
    tracing::info_span!("request", method = %request.method(), path, request_id, client)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    }
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    ))
}

/// Makes every error one format: adds the request id to problem+json bodies, and turns
/// the plain-text errors of layers below (body limit, timeout) into problem+json.
async fn problem_details(
    State(limits): State<Limits>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .map(str::to_owned);
    let response = next.run(request).await;
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    let response = match (response.status(), is_problem) {
        (StatusCode::PAYLOAD_TOO_LARGE, false) => ApiError::PayloadTooLarge {
            limit: limits.max_body_bytes,
        }
        .into_response(),
        (StatusCode::SERVICE_UNAVAILABLE, false)
            if response.headers().get(header::CONTENT_TYPE).is_none() =>
        {
            ApiError::Timeout(limits.request_timeout).into_response()
        }
        _ => response,
    };
    match request_id {
        Some(id) => with_request_id(response, id).await,
        None => response,
    }
}

async fn with_request_id(response: Response, request_id: String) -> Response {
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !is_problem {
        return response;
    }
    // Problem bodies are built by us, in memory, so their size is known: buffering costs
    // nothing. One of unknown size passes as it is (its request id is in the header), and no
    // problem ever turns into a 500 here.
    if response.body().size_hint().exact().is_none() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::warn!(error = %e, "a problem body could not be read");
            return Response::from_parts(parts, Body::empty());
        }
    };
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("requestId".into(), serde_json::Value::String(request_id));
            serde_json::to_vec(&map).unwrap_or_else(|_| bytes.to_vec())
        }
        _ => bytes.to_vec(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
