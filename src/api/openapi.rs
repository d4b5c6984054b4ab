//! The OpenAPI document, generated from the code; `openapi/openapi.json` is its committed copy.

use axum::Json;
use utoipa::OpenApi;

use super::{errors, form, health, mail};
use crate::message;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mail-relay",
        description = "HTTP-to-SMTP relay for Microsoft 365: sends mail through Exchange Online with OAuth2 (SASL XOAUTH2).",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(health::live, health::ready, mail::send_mail, openapi_json),
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
    tags(
        (name = "mail", description = "Sending mail"),
        (name = "health", description = "Probes for orchestrators"),
        (name = "meta", description = "This document"),
    )
)]
pub struct ApiDoc;

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
