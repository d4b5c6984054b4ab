//! The OpenAPI document, generated from the code; `openapi/openapi.json` is its committed copy.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::RefOr;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{budget, docs, errors, form, health, mail, mail_status, metrics};
use crate::app::AppState;
use crate::config::HttpSettings;
use crate::message;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mail-relay",
        description = "HTTP-to-SMTP relay for Microsoft 365: sends mail through Exchange Online with OAuth2 (SASL XOAUTH2).",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(health::live, health::ready, metrics::metrics, mail::send_mail, mail_status::mail_status, openapi_json, docs::docs_page),
    components(schemas(
        errors::Problem,
        errors::FieldError,
        mail::MailAccepted,
        mail::MailQueued,
        mail_status::MailStatus,
        mail_status::AttemptStatus,
        form::MailForm,
        message::MailRequest,
        message::request::AttachmentInput,
        message::request::MailboxInput,
        message::request::NamedMailbox,
        message::request::Recipients,
        message::Priority,
    )),
    modifiers(&BearerAuth, &ProblemExamples),
    tags(
        (name = "mail", description = "Sending mail"),
        (name = "health", description = "Probes for orchestrators"),
        (name = "meta", description = "This document and its reference page"),
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

/// Examples of every error `POST /mail` answers, made by the code that makes the real answers,
/// so the document cannot drift from them.
struct ProblemExamples;

impl Modify for ProblemExamples {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(operation) = openapi
            .paths
            .paths
            .get_mut("/mail")
            .and_then(|item| item.post.as_mut())
        else {
            return;
        };
        for (name, error) in problem_examples() {
            let status = error.status();
            let Some(RefOr::T(response)) = operation.responses.responses.get_mut(status.as_str())
            else {
                continue;
            };
            let Some(content) = response.content.get_mut("application/problem+json") else {
                continue;
            };
            let mut problem = error.problem();
            problem.request_id = Some("5f0c6f1e-3b8e-4a51-a4a5-0d7f3c1f7b0a".into());
            let value = serde_json::to_value(&problem).ok();
            let summary = format!("{}: {}", problem.code, problem.title);
            let example = ExampleBuilder::new().summary(summary).value(value).build();
            content.examples.insert(name.into(), RefOr::T(example));
        }
    }
}

/// One answer of each kind: the example's name, and the error behind it.
fn problem_examples() -> Vec<(&'static str, errors::ApiError)> {
    use std::time::Duration;

    use crate::caller::AuthError;
    use crate::idempotency::IdempotencyError;
    use crate::rate_limit::{LimitError, LimitKind, RateLimited};
    use crate::send_as::SendAsRefusal;
    use errors::ApiError;

    let limits = message::MessageLimits {
        max_recipients: 500,
        max_message_bytes: 36_700_160,
    };
    let invalid = serde_json::from_value::<message::MailRequest>(serde_json::json!({
        "from": "noreply@contoso.com",
        "to": ["alice@example.com", "bob@example.com", "carol.example.com"],
        "subject": "Your invoice",
        "text": "Please find your invoice attached."
    }))
    .map_err(|e| ApiError::InvalidRequest {
        detail: e.to_string(),
        errors: Vec::new(),
    })
    .and_then(|request| request.validate(&limits).map_err(ApiError::from));
    let mut examples = vec![
        (
            "too_many_recipients",
            ApiError::TooManyRecipients {
                count: 501,
                limit: 500,
                setting: "mailRelay.limits.maxRecipients",
            },
        ),
        (
            "unauthorized_no_credentials",
            ApiError::from(AuthError::Missing {
                proxy_configured: false,
            }),
        ),
        (
            "unauthorized_unknown_api_key",
            ApiError::from(AuthError::UnknownApiKey),
        ),
        (
            "send_as_denied_by_policy",
            ApiError::from(SendAsRefusal::NotListedForKey {
                caller: "API key 'billing'".into(),
                address: "ceo@contoso.com".into(),
                allowed: "invoices@contoso.com, *@billing.contoso.com".into(),
            }),
        ),
        (
            "send_as_denied_by_exchange",
            ApiError::from(SendAsRefusal::DeniedByExchange {
                caller: "user alice@contoso.com".into(),
                address: "ceo@contoso.com".into(),
                smtp_user: "relay@contoso.com".into(),
                reply: "554 5.2.252 SendAsDenied; relay@contoso.com not allowed to send as \
                        ceo@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException"
                    .into(),
            }),
        ),
        (
            "payload_too_large_body",
            ApiError::PayloadTooLarge { limit: 52_428_800 },
        ),
        (
            "payload_too_large_message",
            ApiError::MessageTooLarge {
                size: 38_112_554,
                limit: 36_700_160,
            },
        ),
        (
            "payload_too_large_in_flight",
            ApiError::from(budget::BudgetError::TooLarge {
                size: 120_000_000,
                limit: 104_857_600,
            }),
        ),
        (
            "idempotency_in_progress",
            ApiError::from(IdempotencyError::InProgress),
        ),
        (
            "idempotency_key_reused",
            ApiError::from(IdempotencyError::KeyReused),
        ),
        (
            "rate_limited",
            ApiError::from(LimitError::Limited(RateLimited {
                kind: LimitKind::MailboxMessages,
                max: 30,
                cost: 1,
                retry_after: Duration::from_secs(12),
            })),
        ),
        (
            "unsupported_media_type",
            ApiError::UnsupportedMediaType(
                "POST /mail takes Content-Type application/json or multipart/form-data (got text/plain)"
                    .into(),
            ),
        ),
        ("internal_error", ApiError::Internal),
        (
            "timeout",
            ApiError::Timeout(Duration::from_secs(120)),
        ),
        (
            "busy",
            ApiError::from(budget::BudgetError::Busy {
                wanted: 34_000_000,
                in_flight: 90_000_000,
                limit: 104_857_600,
            }),
        ),
        (
            "store_unavailable",
            ApiError::StoreUnavailable(
                "the rate-limit store is unavailable: connection refused".into(),
            ),
        ),
    ];
    for (name, failure) in crate::delivery::example_failures() {
        examples.push((name, ApiError::from(failure)));
    }
    if let Err(invalid) = invalid {
        examples.insert(0, ("invalid_request", invalid));
    }
    examples
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
pub async fn openapi_json(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.clone(),
    )
}

/// The document as served under `http.basePath`: the paths stay relative, a `servers` entry adds
/// the prefix.
pub fn document_for(http: &HttpSettings) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    if !http.base_path.is_empty() {
        doc.servers = Some(vec![utoipa::openapi::Server::new(&http.base_path)]);
    }
    doc
}
