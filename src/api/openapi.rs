//! The OpenAPI document, generated from the code; `openapi/openapi.json` is its committed copy.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{errors, form, health, mail, metrics};
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
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
