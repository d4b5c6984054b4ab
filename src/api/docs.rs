//! `GET /docs`: the API reference page, Swagger UI on this relay's OpenAPI document.
//!
//! Everything the page loads is compiled into the binary (`docs/swagger-ui/`, vendored from the
//! npm package `swagger-ui-dist`, see `docs/refresh-swagger-ui.sh`), so the page works where
//! no CDN can be reached. `mailRelay.http.docs: false` removes these routes.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::app::AppState;

/// The vendored Swagger UI's version (`swagger-ui-dist` on npm).
pub const SWAGGER_UI_VERSION: &str = include_str!("docs/swagger-ui/VERSION");

const INDEX_HTML: &str = include_str!("docs/index.html");
const INIT_JS: &str = include_str!("docs/init.js");
const SWAGGER_UI_CSS: &str = include_str!("docs/swagger-ui/swagger-ui.css");
const SWAGGER_UI_BUNDLE_JS: &str = include_str!("docs/swagger-ui/swagger-ui-bundle.js");

/// The page may load and call only this origin: no inline script, no other host, no framing.
/// `data:` images are Swagger UI's own icons, embedded in its stylesheet.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; font-src 'self'; connect-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page and its assets, under the same base path as every other route.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/docs", get(docs_page))
        .route("/docs/init.js", get(init_js))
        .route("/docs/swagger-ui.css", get(swagger_ui_css))
        .route("/docs/swagger-ui-bundle.js", get(swagger_ui_bundle_js))
}

/// This API's reference page, with "try it out".
#[utoipa::path(get, path = "/docs", tag = "meta",
    responses((status = 200, description = "The API reference page (Swagger UI, served by the relay itself; off with `mailRelay.http.docs: false`)",
        body = String, content_type = "text/html")))]
pub async fn docs_page() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn init_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", INIT_JS)
}

async fn swagger_ui_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", SWAGGER_UI_CSS)
}

async fn swagger_ui_bundle_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SWAGGER_UI_BUNDLE_JS)
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // Revalidate each time: after an upgrade the page and its script must match.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                HeaderName::from_static("cross-origin-resource-policy"),
                HeaderValue::from_static("same-origin"),
            ),
        ],
        body,
    )
}
