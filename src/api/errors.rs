//! One error type for the HTTP boundary, rendered as RFC 9457 `application/problem+json`.
//! Every variant maps to one status and one stable `code` here, and nowhere else.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::delivery::{DeliveryError, FailureKind};
use crate::idempotency::{IdempotencyError, Replay};
pub use crate::message::FieldError;
use crate::message::MailError;
use crate::queue::{QueueError, Refusal};
use crate::rate_limit::LimitError;
use crate::telemetry::request_log::{self, Failure};

/// Seconds a client should wait before retrying a 503 when the cause names no better time.
const DEFAULT_RETRY_AFTER: u64 = 5;
/// Seconds to wait when other mails hold the relay's memory budget.
const BUSY_RETRY_AFTER: u64 = 2;
/// Exchange's recipient quota is per rolling day: an hour is a fair first wait.
const QUOTA_RETRY_AFTER: u64 = 3600;
/// Most field errors a problem lists in `errors`; the rest are counted in `errorsOmitted`. A
/// client fixes the first ones and sends again, and the answer stays a few KiB, however many
/// fields a request got wrong.
pub const MAX_LISTED_ERRORS: usize = 20;

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
    /// For validation errors: each field and what is wrong with it, the first 20 of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// How many more field errors there were than the 20 listed in `errors`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = 480)]
    pub errors_omitted: Option<usize>,
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
    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },
    /// No queued mail with this id was sent by this caller.
    #[error(
        "no queued mail {0} was sent by this caller (mails sent synchronously, and finished ones past mailRelay.delivery.retentionSeconds, have no status)"
    )]
    MailNotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error(
        "the request body is larger than the limit of {limit} bytes (mailRelay.limits.maxBodyBytes): send large files as multipart/form-data parts (no base64: a third smaller), or fewer of them"
    )]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error(
        "the request took longer than {0:?} (mailRelay.limits.requestTimeoutSeconds); the mail may or may not have gone out: retry with the same Idempotency-Key so that it goes out once"
    )]
    Timeout(std::time::Duration),
    #[error("internal error; see the logs under this request id")]
    Internal,
    /// More recipients than one mail may have, or than a rate limit allows in a whole window:
    /// no retry can help (`setting` names the limit).
    #[error(
        "the mail has {count} recipients (to + cc + bcc); at most {limit} are allowed ({setting}): split it into several mails"
    )]
    TooManyRecipients {
        count: usize,
        limit: usize,
        setting: &'static str,
    },
    #[error(
        "the encoded mail is {size} bytes, more than the limit of {limit} bytes (mailRelay.limits.maxMessageBytes; attachments grow by about a third when base64-encoded): send smaller or fewer attachments"
    )]
    MessageTooLarge { size: usize, limit: usize },
    /// Exchange refused this From moments ago; asked again after a pause (not replayed).
    #[error("{0}")]
    SendAsDeniedForNow(String),
    /// The SMTP server refused the mail as too large.
    #[error("{0}")]
    ServerTooLarge(String),
    /// The From address may not be used: by the relay's policy or by Exchange (SendAsDenied).
    #[error("{0}")]
    SendAsDenied(String),
    /// The SMTP server refused the relay's login (token rejected).
    #[error("{0}")]
    SmtpAuthFailed(String),
    /// SMTP AUTH (or the chosen mechanism) is switched off for the tenant or mailbox.
    #[error("{0}")]
    SmtpAuthDisabled(String),
    /// A sending quota or rate limit is used up.
    #[error("{detail}")]
    RateLimited { detail: String, retry_after: u64 },
    /// The same Idempotency-Key came with a different request.
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// A request with the same Idempotency-Key is still running.
    #[error("{0}")]
    IdempotencyInProgress(String),
    /// Other requests hold the bytes of mail the relay may hold at once (`maxInFlightBytes`).
    #[error("{0}")]
    Busy(String),
    /// One request larger than all the bytes of mail the relay may hold at once.
    #[error("{0}")]
    OverBudget(String),
    /// A store the relay needs (rate limits, idempotency keys) could not be asked.
    #[error("{0}")]
    StoreUnavailable(String),
    /// The SMTP server could not be reached or answered "try later".
    #[error("{detail}")]
    SmtpUnavailable {
        detail: String,
        retry_after: Option<u64>,
    },
    /// The connection was lost after the mail went out: the server may or may not have it.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// The SMTP server refused the mail for good; the detail carries its reply.
    #[error("{0}")]
    SmtpRejected(String),
    /// No access token for the SMTP login could be had from Entra ID.
    #[error("{detail}")]
    TokenUnavailable {
        detail: String,
        retry_after: Option<u64>,
    },
}

impl ApiError {
    /// The HTTP status of this answer.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::InvalidRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid request",
            ),
            Self::NotFound { .. } | Self::MailNotFound(_) => {
                (StatusCode::NOT_FOUND, "not_found", "Not found")
            }
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
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "Internal error",
            ),
            Self::TooManyRecipients { .. } => (
                StatusCode::BAD_REQUEST,
                "too_many_recipients",
                "Too many recipients",
            ),
            Self::MessageTooLarge { .. } | Self::ServerTooLarge(_) | Self::OverBudget(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
            ),
            Self::SendAsDenied(_) | Self::SendAsDeniedForNow(_) => {
                (StatusCode::FORBIDDEN, "send_as_denied", "Send as denied")
            }
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            Self::SmtpAuthFailed(_) => (
                StatusCode::BAD_GATEWAY,
                "smtp_auth_failed",
                "SMTP authentication failed",
            ),
            Self::SmtpAuthDisabled(_) => (
                StatusCode::BAD_GATEWAY,
                "smtp_auth_disabled",
                "SMTP authentication disabled",
            ),
            Self::IdempotencyKeyReused(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "Idempotency-Key reused",
            ),
            Self::IdempotencyInProgress(_) => (
                StatusCode::CONFLICT,
                "idempotency_in_progress",
                "Request in progress",
            ),
            Self::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy", "Relay busy"),
            Self::StoreUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "Store unavailable",
            ),
            Self::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Rate limited",
            ),
            Self::SmtpUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "smtp_unavailable",
                "SMTP server unavailable",
            ),
            Self::OutcomeUnknown(_) => (
                StatusCode::BAD_GATEWAY,
                "smtp_outcome_unknown",
                "SMTP outcome unknown",
            ),
            Self::SmtpRejected(_) => (
                StatusCode::BAD_GATEWAY,
                "smtp_rejected",
                "SMTP server rejected the mail",
            ),
            Self::TokenUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "token_unavailable",
                "Access token unavailable",
            ),
        }
    }

    /// Seconds for `Retry-After`: every 503 and 429 has one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            // The first request is usually done within a second or two.
            Self::IdempotencyInProgress(_) => Some(1),
            // A large mail ahead takes about a second to go out.
            Self::Busy(_) => Some(BUSY_RETRY_AFTER),
            Self::SmtpUnavailable { retry_after, .. }
            | Self::TokenUnavailable { retry_after, .. } => {
                Some(retry_after.unwrap_or(DEFAULT_RETRY_AFTER))
            }
            _ if self.parts().0 == StatusCode::SERVICE_UNAVAILABLE => Some(DEFAULT_RETRY_AFTER),
            _ => None,
        }
    }

    /// Whether a retry with the same Idempotency-Key gets this answer again or tries again:
    /// decided here, once per variant, and nowhere else.
    pub fn replay(&self) -> Replay {
        match self {
            // Retrying the same request cannot change these.
            Self::InvalidRequest { .. }
            | Self::Unauthorized(_)
            | Self::NotFound { .. }
            | Self::MailNotFound(_)
            | Self::MethodNotAllowed(_)
            | Self::PayloadTooLarge { .. }
            | Self::UnsupportedMediaType(_)
            | Self::TooManyRecipients { .. }
            | Self::MessageTooLarge { .. }
            | Self::OverBudget(_)
            | Self::ServerTooLarge(_)
            | Self::SendAsDenied(_)
            | Self::IdempotencyKeyReused(_) => Replay::Store,
            // The server may have the mail: a retry must not send it again.
            Self::OutcomeUnknown(_) => Replay::Store,
            // Transient, short-lived or the administrator's to fix: a retry tries again.
            Self::Timeout(_)
            | Self::Internal
            | Self::Busy(_)
            | Self::SendAsDeniedForNow(_)
            | Self::SmtpAuthFailed(_)
            | Self::SmtpAuthDisabled(_)
            | Self::RateLimited { .. }
            | Self::IdempotencyInProgress(_)
            | Self::StoreUnavailable(_)
            | Self::SmtpUnavailable { .. }
            | Self::SmtpRejected(_)
            | Self::TokenUnavailable { .. } => Replay::Skip,
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
            Self::InvalidRequest { errors, .. } => {
                errors.iter().take(MAX_LISTED_ERRORS).cloned().collect()
            }
            // A client showing errors beside its fields gets this one beside the recipients.
            Self::TooManyRecipients { count, limit, .. } => vec![FieldError {
                field: "to".into(),
                message: format!(
                    "{count} recipients in to, cc and bcc together; at most {limit} are allowed"
                ),
            }],
            _ => Vec::new(),
        };
        let omitted = match self {
            Self::InvalidRequest { errors: all, .. } => all.len().saturating_sub(errors.len()),
            _ => 0,
        };
        Problem {
            r#type: format!("https://mail-relay.dev/problems/{code}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: self.to_string(),
            code: code.to_string(),
            request_id: None,
            errors,
            errors_omitted: (omitted > 0).then_some(omitted),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, _) = self.parts();
        let mut response = (status, Json(self.problem())).into_response();
        // Logged once, by the request's log line: server errors with their detail.
        response.extensions_mut().insert(Failure {
            code,
            detail: status.is_server_error().then(|| self.to_string()),
        });
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response.extensions_mut().insert(self.replay());
        if let Self::Unauthorized(e) = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, www_authenticate(e));
        }
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
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

impl From<crate::send_as::SendAsRefusal> for ApiError {
    fn from(refusal: crate::send_as::SendAsRefusal) -> Self {
        match refusal {
            crate::send_as::SendAsRefusal::RecentlyDeniedByExchange { .. } => {
                Self::SendAsDeniedForNow(refusal.to_string())
            }
            crate::send_as::SendAsRefusal::StoreUnavailable(e) => Self::StoreUnavailable(e),
            _ => Self::SendAsDenied(refusal.to_string()),
        }
    }
}

impl From<crate::identity::NoIdentity> for ApiError {
    fn from(no_identity: crate::identity::NoIdentity) -> Self {
        Self::SendAsDenied(format!(
            "{no_identity}: add the address (or its domain) to an identity's from, or send from an address one of them serves"
        ))
    }
}

impl From<IdempotencyError> for ApiError {
    fn from(e: IdempotencyError) -> Self {
        let detail = e.to_string();
        match e {
            IdempotencyError::InvalidKey(_) => Self::InvalidRequest {
                errors: vec![FieldError {
                    field: "headers.Idempotency-Key".into(),
                    message: detail.clone(),
                }],
                detail,
            },
            IdempotencyError::KeyReused => Self::IdempotencyKeyReused(detail),
            IdempotencyError::InProgress => Self::IdempotencyInProgress(detail),
            IdempotencyError::Unavailable(_) => Self::StoreUnavailable(detail),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Full { .. } => Self::Busy(e.to_string()),
            QueueError::Unavailable(_) => Self::StoreUnavailable(e.to_string()),
        }
    }
}

/// The problem object of a queued mail that ended `failed`: what the synchronous answer to the
/// same refusal would have been (for `GET /mail/{id}`).
pub fn refusal_problem(refusal: Refusal) -> serde_json::Value {
    let error = match refusal {
        Refusal::Delivery(e) => ApiError::from(e),
        Refusal::Limit(limited) => ApiError::from(LimitError::Limited(limited)),
    };
    serde_json::to_value(error.problem()).unwrap_or_default()
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match e {
            // A mail larger than a whole window of the limit: 429 would invite retries.
            LimitError::Limited(limited) if limited.never_fits() => Self::TooManyRecipients {
                count: limited.cost as usize,
                limit: limited.max as usize,
                setting: limited.limit(),
            },
            LimitError::Limited(limited) => Self::RateLimited {
                detail: limited.to_string(),
                retry_after: limited.retry_after_secs(),
            },
            LimitError::Unavailable(_) => Self::StoreUnavailable(e.to_string()),
        }
    }
}

impl From<MailError> for ApiError {
    fn from(e: MailError) -> Self {
        match e {
            MailError::Invalid(errors) => {
                // The detail names the first few; `errors` the first MAX_LISTED_ERRORS.
                const SHOWN: usize = 5;
                let mut detail = format!(
                    "the mail request has {} invalid field(s): {}",
                    errors.len(),
                    errors
                        .iter()
                        .take(SHOWN)
                        .map(|e| format!("{}: {}", e.field, e.message))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                if errors.len() > SHOWN {
                    detail.push_str(&format!(
                        "; and {} more (see errors, and errorsOmitted beyond {MAX_LISTED_ERRORS})",
                        errors.len() - SHOWN
                    ));
                }
                Self::InvalidRequest { detail, errors }
            }
            MailError::TooManyRecipients { count, limit } => Self::TooManyRecipients {
                count,
                limit,
                setting: "mailRelay.limits.maxRecipients",
            },
            MailError::TooLarge { size, limit } => Self::MessageTooLarge { size, limit },
            MailError::Build(detail) => {
                request_log::note_cause_text(format!(
                    "a validated mail could not be built: {detail}"
                ));
                Self::Internal
            }
        }
    }
}

/// The one table from delivery failures to answers (also in the README):
///
/// | kind                                        | answer                                  |
/// |---------------------------------------------|-----------------------------------------|
/// | (the server may have the mail)              | 502 `smtp_outcome_unknown`              |
/// | SendAsDenied                                | 403 `send_as_denied`                    |
/// | LoginRefused                                | 502 `smtp_auth_failed`                  |
/// | AuthDisabled, BasicAuthRefused              | 502 `smtp_auth_disabled`                |
/// | QuotaExceeded                               | 429 `rate_limited` (Retry-After 3600)   |
/// | TooLarge                                    | 413 `payload_too_large`                 |
/// | Throttled, Unavailable, Certificate, Setup  | 503 `smtp_unavailable` (Retry-After)    |
/// | Token                                       | 503 `token_unavailable` (Retry-After)   |
/// | MailboxFull, Rejected                       | 502 `smtp_rejected`                     |
/// | Local (the outbox folder)                   | 500 `internal_error`                    |
/// | Store (the shared connection slots)         | 503 `store_unavailable` (Retry-After)   |
impl From<DeliveryError> for ApiError {
    fn from(e: DeliveryError) -> Self {
        if e.outcome_unknown() {
            return Self::OutcomeUnknown(format!(
                "{e}. The SMTP server may or may not have the mail: do not send it again \
                 blindly (a retry with the same Idempotency-Key gets this answer again)"
            ));
        }
        let kind = e.kind();
        let detail = e.to_string();
        match kind {
            // The path and OS error are for the operator (the request's log line has them,
            // noted by the sender), not the caller.
            FailureKind::Local => Self::Internal,
            FailureKind::Store => Self::StoreUnavailable(detail),
            FailureKind::Token => Self::TokenUnavailable {
                detail: format!(
                    "the relay could not get an access token from Entra ID for the SMTP login: {detail}"
                ),
                retry_after: e.retry_after().map(|d| d.as_secs().max(1)),
            },
            FailureKind::SendAsDenied => Self::SendAsDenied(detail),
            FailureKind::LoginRefused => Self::SmtpAuthFailed(detail),
            FailureKind::AuthDisabled | FailureKind::BasicAuthRefused => {
                Self::SmtpAuthDisabled(detail)
            }
            FailureKind::QuotaExceeded => Self::RateLimited {
                detail,
                retry_after: QUOTA_RETRY_AFTER,
            },
            FailureKind::TooLarge => Self::ServerTooLarge(detail),
            FailureKind::Throttled
            | FailureKind::Unavailable
            | FailureKind::Certificate
            | FailureKind::Setup => Self::SmtpUnavailable {
                detail,
                // Graph's own Retry-After, when it gave one; SMTP gives none.
                retry_after: e.retry_after().map(|d| d.as_secs().max(1)),
            },
            FailureKind::MailboxFull | FailureKind::Rejected => Self::SmtpRejected(detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::{SmtpError, Stage};
    use crate::token::TokenError;

    fn answer(e: impl Into<ApiError>) -> (u16, &'static str, Option<u64>) {
        let e = e.into();
        (e.parts().0.as_u16(), e.code(), e.retry_after())
    }

    #[test]
    fn delivery_failures_map_to_one_answer_each() {
        let outbox = DeliveryError::Outbox {
            path: "/var/outbox".into(),
            source: std::io::Error::other("disk full"),
        };
        assert_eq!(answer(outbox), (500, "internal_error", None));
        let token = DeliveryError::Token(TokenError::Timeout {
            endpoint: "https://login.example.test/token".into(),
            timeout: std::time::Duration::from_secs(15),
            setting: "mailRelay.token.requestTimeoutSeconds",
        });
        assert_eq!(answer(token), (503, "token_unavailable", Some(5)));
        let smtp = DeliveryError::Smtp(SmtpError::rejected(
            Stage::MailFrom("a@b.c".into()),
            451,
            "4.3.0 try later",
        ));
        assert_eq!(answer(smtp), (503, "smtp_unavailable", Some(5)));
    }

    #[test]
    fn a_refusal_for_a_short_while_is_never_replayed_an_unknown_outcome_always() {
        let for_now = ApiError::from(crate::send_as::SendAsRefusal::RecentlyDeniedByExchange {
            caller: "API key 'billing'".into(),
            address: "ceo@contoso.com".into(),
            smtp_user: "relay@contoso.com".into(),
        })
        .into_response();
        assert_eq!(for_now.status(), StatusCode::FORBIDDEN);
        assert_eq!(for_now.extensions().get(), Some(&Replay::Skip));
        let unknown = ApiError::OutcomeUnknown("lost".into()).into_response();
        assert_eq!(unknown.extensions().get(), Some(&Replay::Store));
    }

    #[tokio::test]
    async fn idempotency_keeps_or_skips_answers_as_they_are_marked() {
        use crate::idempotency::StoredResponse;
        let for_now = ApiError::SendAsDeniedForNow("later".into()).into_response();
        assert!(StoredResponse::capture(for_now).await.1.is_none());
        let denied = ApiError::SendAsDenied("no".into()).into_response();
        assert!(StoredResponse::capture(denied).await.1.is_some());
        let unknown = ApiError::OutcomeUnknown("lost".into()).into_response();
        assert!(StoredResponse::capture(unknown).await.1.is_some());
    }

    #[test]
    fn exchange_replies_map_to_one_answer_each() {
        let cases = [
            (
                554,
                "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as ceo@contoso.com",
                403,
                "send_as_denied",
            ),
            (
                535,
                "5.7.3 Authentication unsuccessful",
                502,
                "smtp_auth_failed",
            ),
            (
                535,
                "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant",
                502,
                "smtp_auth_disabled",
            ),
            (
                550,
                "5.7.30 Basic authentication is not supported for Client Submission",
                502,
                "smtp_auth_disabled",
            ),
            (
                432,
                "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
                503,
                "smtp_unavailable",
            ),
            (
                554,
                "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
                429,
                "rate_limited",
            ),
            (554, "5.2.2 mailbox full", 502, "smtp_rejected"),
            (
                552,
                "5.3.4 Message size exceeds fixed maximum message size",
                413,
                "payload_too_large",
            ),
            (550, "5.1.1 User unknown", 502, "smtp_rejected"),
        ];
        for (code, text, status, api_code) in cases {
            let (got_status, got_code, _) = answer(DeliveryError::from(SmtpError::rejected(
                Stage::EndOfData,
                code,
                text,
            )));
            assert_eq!((got_status, got_code), (status, api_code), "{code} {text}");
        }
    }

    #[test]
    fn every_upstream_variant_has_its_status_and_code() {
        let d = || "detail".to_string();
        let cases = [
            (ApiError::SendAsDenied(d()), 403, "send_as_denied", None),
            (ApiError::SmtpAuthFailed(d()), 502, "smtp_auth_failed", None),
            (
                ApiError::SmtpAuthDisabled(d()),
                502,
                "smtp_auth_disabled",
                None,
            ),
            (
                ApiError::RateLimited {
                    detail: d(),
                    retry_after: 3600,
                },
                429,
                "rate_limited",
                Some(3600),
            ),
            (
                ApiError::SmtpUnavailable {
                    detail: d(),
                    retry_after: Some(30),
                },
                503,
                "smtp_unavailable",
                Some(30),
            ),
            (ApiError::SmtpRejected(d()), 502, "smtp_rejected", None),
            (
                ApiError::OutcomeUnknown(d()),
                502,
                "smtp_outcome_unknown",
                None,
            ),
            (
                ApiError::IdempotencyKeyReused(d()),
                422,
                "idempotency_key_reused",
                None,
            ),
            (
                ApiError::IdempotencyInProgress(d()),
                409,
                "idempotency_in_progress",
                Some(1),
            ),
            (
                ApiError::StoreUnavailable(d()),
                503,
                "store_unavailable",
                Some(5),
            ),
            (
                ApiError::MessageTooLarge { size: 2, limit: 1 },
                413,
                "payload_too_large",
                None,
            ),
            (ApiError::Busy(d()), 503, "busy", Some(2)),
            (ApiError::OverBudget(d()), 413, "payload_too_large", None),
            (
                ApiError::TooManyRecipients {
                    count: 501,
                    limit: 500,
                    setting: "mailRelay.limits.maxRecipients",
                },
                400,
                "too_many_recipients",
                None,
            ),
        ];
        for (error, status, code, retry_after) in cases {
            assert_eq!(answer(error), (status, code, retry_after));
        }
    }

    #[test]
    fn the_outbox_path_and_os_error_stay_out_of_the_answer() {
        let e: ApiError = DeliveryError::Outbox {
            path: "/secret/place".into(),
            source: std::io::Error::other("disk full"),
        }
        .into();
        let problem = serde_json::to_string(&e.problem()).unwrap();
        assert!(!problem.contains("/secret/place"));
        assert!(!problem.contains("disk full"));
    }

    #[test]
    fn field_errors_are_listed_in_the_detail_and_the_body() {
        let e: ApiError =
            MailError::Invalid(vec![FieldError::new("to[2]", "not an e-mail address")]).into();
        let problem = e.problem();
        assert_eq!(problem.code, "invalid_request");
        assert_eq!(problem.errors[0].field, "to[2]");
        assert!(problem.detail.contains("to[2]: not an e-mail address"));
    }

    #[test]
    fn a_problem_lists_the_first_20_field_errors_and_counts_the_rest() {
        let errors = (0..500)
            .map(|i| FieldError::new(format!("headers.X-{i}"), "not a header name"))
            .collect();
        let problem = ApiError::from(MailError::Invalid(errors)).problem();
        assert_eq!(problem.status, 400);
        assert_eq!(problem.errors.len(), MAX_LISTED_ERRORS);
        assert_eq!(problem.errors[19].field, "headers.X-19");
        assert_eq!(problem.errors_omitted, Some(480));
        let json = serde_json::to_value(&problem).unwrap();
        assert_eq!(json["errorsOmitted"], 480);
        // A stored refusal keeps as many, so its replay lists what the first answer listed.
        assert_eq!(
            MAX_LISTED_ERRORS,
            crate::idempotency::MAX_STORED_FIELD_ERRORS
        );
        // Nothing omitted, nothing said.
        let one = ApiError::from(MailError::Invalid(vec![FieldError::new("to", "x")])).problem();
        assert!(
            serde_json::to_value(&one)
                .unwrap()
                .get("errorsOmitted")
                .is_none()
        );
    }
}
