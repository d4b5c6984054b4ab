//! The OpenAPI document, generated from the code; `openapi/openapi.json` is its committed copy.

use axum::Json;
use axum::extract::State;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{errors, form, health, mail, metrics};
use crate::app::AppState;
use crate::message;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mail-relay",
        description = "HTTP-to-SMTP relay for Microsoft 365: sends mail through Exchange Online with OAuth2 (SASL XOAUTH2).",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(health::live, health::ready, metrics::metrics, mail::send_mail, openapi_json),
    components(schemas(
        errors::Problem,
        errors::FieldError,
        mail::MailAccepted,
        form::MailForm,
        message::MailRequest,
        message::request::AttachmentInput,
        message::request::MailboxInput,
        message::request::NamedMailbox,
        message::request::Recipients,
        message::Priority,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "mail", description = "Sending mail"),
        (name = "health", description = "Probes for orchestrators"),
        (name = "meta", description = "This document"),
    )
)]
pub struct ApiDoc;

/// `Authorization: Bearer <API key or user access token>`, the scheme `POST /mail` requires.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from `mail-relay hash-key`, or a user's OIDC access token (JWT). \
                         Behind a trusted proxy the user may instead be named by its header.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as pretty JSON with a trailing newline, as committed in `openapi/openapi.json`.
pub fn document_json() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json(State(state): State<AppState>) -> Json<utoipa::openapi::OpenApi> {
    Json(document_for(&state.settings.relay.http.base_path))
}

/// The document as served under `base_path`: the paths stay relative, a `servers` entry adds the prefix.
pub fn document_for(base_path: &str) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    if !base_path.is_empty() {
        doc.servers = Some(vec![utoipa::openapi::Server::new(base_path)]);
    }
    doc
}
