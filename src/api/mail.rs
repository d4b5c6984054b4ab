//! `POST /mail`: the endpoint web clients call.

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::ApiError;
use super::budget::{self, Charge};
use super::errors::Problem;
use super::form::{self, MailForm};
use super::json;
use crate::app::AppState;
use crate::caller::{Caller, caller_id};
use crate::config::QueueMode;
use crate::delivery::{DeliveryError, FailureKind};
use crate::idempotency::{Fingerprint, IDEMPOTENT_REPLAYED, IdempotencyError, IdempotencyKey};
use crate::identity::Identity;
use crate::message::{Mail, MailRequest, MessageLimits, OutgoingMail, UploadedFile};
use crate::queue::{Enqueued, Queue};
use crate::rate_limit::{LimitError, Reservation};
use crate::telemetry::{metrics, request_log};

/// Mails whose attachments are larger than this are encoded on the blocking pool, so that
/// base64 of megabytes does not stall other requests on the same worker.
const BLOCKING_BUILD_BYTES: usize = 256 * 1024;

/// The SMTP server took the mail.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailAccepted {
    /// The relay's id for this mail (in its logs, and the local part of the Message-ID).
    #[schema(example = "019ac3f2-6c1e-7b53-9d1a-2f4e5b6c7d8e")]
    pub id: String,
    /// The `Message-ID` header the relay set, with angle brackets.
    #[schema(example = "<019ac3f2-6c1e-7b53-9d1a-2f4e5b6c7d8e@contoso.com>")]
    pub message_id: String,
    /// The envelope recipients (to, cc and bcc) the server accepted.
    #[schema(example = json!(["alice@example.com", "bob@example.com", "audit@contoso.com"]))]
    pub accepted_recipients: Vec<String>,
}

/// The mail is committed to the relay's queue; workers deliver it (`GET /mail/{id}` follows it).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailQueued {
    /// The relay's id for this mail: `GET /mail/{id}` answers its delivery status.
    #[schema(example = "019ac3f2-6c1e-7b53-9d1a-2f4e5b6c7d8e")]
    pub id: String,
    /// The `Message-ID` header the relay set, with angle brackets.
    #[schema(example = "<019ac3f2-6c1e-7b53-9d1a-2f4e5b6c7d8e@contoso.com>")]
    pub message_id: String,
    /// Always `queued`.
    #[schema(example = "queued")]
    pub status: &'static str,
}

/// The RFC 7240 preference that asks for queued delivery.
const RESPOND_ASYNC: &str = "respond-async";

/// Send one mail.
///
/// Synchronous by default: answers 202 only after the SMTP server accepted the mail (250
/// after DATA). With `Prefer: respond-async` (or `mailRelay.delivery.queue: always`) and a
/// durable store, the mail is checked and built the same way, committed to the relay's queue,
/// and 202 comes with `"status": "queued"` and a `Location` to follow it; workers deliver it
/// with retries. Bcc recipients go into the envelope only. The relay sets `Message-ID` and
/// `Date`.
#[utoipa::path(post, path = "/mail", tag = "mail", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "1 to 255 visible ASCII characters (a UUID is best). A retry with the same key and body returns the first answer (marked `Idempotent-Replayed: true`) without sending again."),
        ("Prefer" = Option<String>, Header,
        description = "`respond-async` (RFC 7240): queue the mail and answer once it is committed, instead of waiting for the SMTP server. Honoured when the relay has a durable store (`mailRelay.store.url` sqlite or postgres) and `mailRelay.delivery.queue` is not `never`; the answer then carries `Preference-Applied: respond-async`.")),
    request_body(description = "The mail: JSON with base64 attachments, or a form with a `mail` JSON part and file parts",
        content((MailRequest = "application/json"), (MailForm = "multipart/form-data"))),
    responses(
        (status = 202, description = "The SMTP server accepted the mail (`MailAccepted`), or, queued, the relay committed it to its queue (`MailQueued`)", body = inline(MailAnswer),
            headers(("Idempotent-Replayed" = bool, description = "`true` when this is the stored answer to an earlier request with the same Idempotency-Key"),
                ("Location" = String, description = "Queued only: the mail's status, `GET /mail/{id}`"),
                ("Preference-Applied" = String, description = "`respond-async` when the request's `Prefer: respond-async` was honoured"))),
        (status = 400, description = "`invalid_request`: malformed JSON, or invalid fields, each listed in `errors`; `too_many_recipients`: more than `mailRelay.limits.maxRecipients` in to + cc + bcc, or more than `mailRelay.rateLimits.mailboxRecipientsPerDay` allows in a whole day",
            body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: no credentials, or an unknown API key or invalid access token; see `WWW-Authenticate`", body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"mail-relay\"`, with `error=\"invalid_token\"` when a credential was refused"))),
        (status = 403, description = "`send_as_denied`: the caller may not send as the From address (the relay's policy), or Exchange answered SendAsDenied; the detail names the caller, the address and what an administrator must change", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over `mailRelay.limits.maxBodyBytes` or over all of `mailRelay.limits.maxInFlightBytes`, or the encoded mail over `mailRelay.limits.maxMessageBytes` (or the server's limit)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is neither `application/json` nor `multipart/form-data`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`idempotency_in_progress`: a request with this Idempotency-Key is still running; retry after `Retry-After` to get its answer", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 422, description = "`idempotency_key_reused`: this Idempotency-Key came with a different request; use a new key for a new mail", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`: a rate limit of the relay (`mailRelay.rateLimits.*`, Exchange's 30 mails a minute and 10,000 recipients a day per mailbox) or Exchange's own quota; nothing was sent; see `Retry-After`", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 500, description = "`internal_error`: see the logs under the request id", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "`smtp_auth_failed`, `smtp_auth_disabled` (the relay's SMTP login was refused; an administrator must act) `smtp_rejected` (the server refused the mail for good; the detail has its reply) or `smtp_outcome_unknown` (the connection was lost after the mail went out: the server may have it; do not send it again blindly)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`smtp_unavailable` or `token_unavailable`: a transient upstream failure; `timeout`: the request took longer than `mailRelay.limits.requestTimeoutSeconds`; `store_unavailable`: a shared rate-limit or idempotency store could not be asked; `busy`: other mails in flight hold the bytes `mailRelay.limits.maxInFlightBytes` allows at once; try again after `Retry-After`", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn send_mail(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    submission: Submission,
) -> Result<Response, ApiError> {
    request_log::note_caller(&caller);
    let key = IdempotencyKey::from_headers(&headers)?;
    let queued = queue_mode(&state, &headers).map(|preferred| Queued {
        preferred,
        key: key.clone(),
    });
    let fingerprint = submission.fingerprint;
    // The send runs as a task of its own: when the client goes away or the request times out,
    // a send past DATA still finishes and its answer is stored under the Idempotency-Key, so a
    // retry replays it instead of sending the mail a second time.
    let send = request_log::carry_notes(async move {
        state
            .idempotency
            .run(&caller, key, fingerprint, || async {
                deliver(&state, &caller, submission, queued)
                    .await
                    .into_response()
            })
            .await
    });
    match tokio::spawn(send).await {
        Ok(answer) => Ok(answer?),
        // A panic in the send stays a panic of this request (the panic layer answers it).
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => {
            request_log::note_cause_text(format!("the send task was cancelled: {e}"));
            Err(ApiError::Internal)
        }
    }
}

/// A request that goes into the queue: whether the client asked for it, and its key.
struct Queued {
    preferred: bool,
    key: Option<IdempotencyKey>,
}

/// How this request is delivered: `None` synchronously; `Some(preferred)` queued, `preferred`
/// when the client asked with `Prefer: respond-async` (which the answer then says it applied).
fn queue_mode(state: &AppState, headers: &HeaderMap) -> Option<bool> {
    state.queue.as_ref()?;
    let preferred = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            let token = p.split([';', '=']).next().unwrap_or_default().trim();
            token.eq_ignore_ascii_case(RESPOND_ASYNC)
        });
    match state.settings.relay.queue.mode {
        QueueMode::Always => Some(preferred),
        QueueMode::Prefer if preferred => Some(true),
        _ => None,
    }
}

/// Validate, check send-as, build, take the rate-limit quota, hand over (or queue).
async fn deliver(
    state: &AppState,
    caller: &Caller,
    submission: Submission,
    queued: Option<Queued>,
) -> Result<Response, ApiError> {
    let limits = MessageLimits::from(&state.settings.relay.limits);
    // Held to the end of the send, on every path out of this function.
    let _charge = submission.charge;
    let fingerprint = submission.fingerprint;
    let mail = submission
        .request
        .validate_with_files(&limits, submission.files)?;
    let from = mail.from.address.clone();
    request_log::note_from(from.as_str());
    let identity = state.identities.route(from.as_str())?;
    request_log::note_identity(&identity.name);
    may_use(state, caller, identity, from.as_str())?;
    identity.send_as.check(caller, &from).await?;
    let outgoing = build(mail, limits).await?;
    if let (Some(queue), Some(queued)) = (&state.queue, queued) {
        let idempotency = queued.key.as_ref().map(|key| (key.as_str(), &fingerprint));
        let committed = enqueue(identity, queue, caller, outgoing, idempotency).await?;
        return Ok(queued_answer(state, committed, queued.preferred));
    }
    let quota = identity
        .rate_limits
        .reserve(caller, outgoing.envelope.to().len())
        .await
        .inspect_err(|e| {
            if let LimitError::Limited(limited) = e {
                metrics::rate_limited(limited.kind.metric_scope());
            }
        })?;
    let receipt = match state.sender.send(&outgoing).await {
        Ok(receipt) => {
            quota.keep();
            receipt
        }
        Err(e) => return Err(refused(state, identity, e, quota, caller, from.as_str()).await),
    };
    // The request's one log line carries these, with the caller and the From domain.
    request_log::note_mail(
        &outgoing.id,
        &outgoing.message_id,
        receipt.accepted.len(),
        outgoing.formatted.len(),
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(MailAccepted {
            id: outgoing.id,
            message_id: outgoing.message_id,
            accepted_recipients: receipt.accepted,
        }),
    )
        .into_response())
}

/// An API key restricted to some identities (`apiKeys[].identities`) may use only those.
fn may_use(
    state: &AppState,
    caller: &Caller,
    identity: &Identity,
    from: &str,
) -> Result<(), ApiError> {
    let Caller::ApiKey { name, .. } = caller else {
        return Ok(());
    };
    let Some(key) = state
        .settings
        .relay
        .auth
        .api_keys
        .iter()
        .find(|k| k.name == *name)
    else {
        return Ok(());
    };
    if key.identities.is_empty() || key.identities.iter().any(|i| **i == *identity.name) {
        return Ok(());
    }
    Err(ApiError::SendAsDenied(format!(
        "API key '{name}' may send only through the identities {}; {from} is sent by the identity {}. An administrator can add it to this key's identities in mailRelay.auth.apiKeys",
        key.identities.join(", "),
        identity.name
    )))
}

/// Commit the mail to the queue, or find the one its Idempotency-Key committed before (a retry
/// whose first request's replica died before storing the answer). The caller's own limits are
/// taken now; the mailbox's when a worker sends it (a mail that could never fit the mailbox's
/// day is refused here).
async fn enqueue(
    identity: &Identity,
    queue: &Queue,
    caller: &Caller,
    outgoing: OutgoingMail,
    idempotency: Option<(&str, &Fingerprint)>,
) -> Result<Committed, ApiError> {
    let recipients = outgoing.envelope.to().len();
    identity
        .rate_limits
        .mailbox_fits(recipients)
        .map_err(|limited| ApiError::from(LimitError::Limited(limited)))?;
    let quota = identity
        .rate_limits
        .reserve_caller(caller, recipients)
        .await
        .inspect_err(|e| {
            if let LimitError::Limited(limited) = e {
                metrics::rate_limited(limited.kind.metric_scope());
            }
        })?;
    let committed = match queue
        .enqueue(&caller_id(caller), &outgoing, idempotency)
        .await
    {
        Ok(Enqueued::New) => {
            quota.keep();
            Committed {
                id: outgoing.id,
                message_id: outgoing.message_id,
                earlier: false,
            }
        }
        Ok(Enqueued::Earlier {
            id,
            message_id,
            same_request,
        }) => {
            identity.rate_limits.refund(quota).await;
            if !same_request {
                return Err(IdempotencyError::KeyReused.into());
            }
            Committed {
                id,
                message_id,
                earlier: true,
            }
        }
        Err(e) => {
            identity.rate_limits.refund(quota).await;
            return Err(e.into());
        }
    };
    request_log::note_mail(
        &committed.id,
        &committed.message_id,
        recipients,
        outgoing.formatted.len(),
    );
    Ok(committed)
}

/// The queued mail a request answers with.
struct Committed {
    id: String,
    message_id: String,
    /// Committed by an earlier request with the same key: the answer is a replay.
    earlier: bool,
}

/// `202` with `"status": "queued"` and the mail's `Location`; `Preference-Applied` when the
/// client asked for it.
fn queued_answer(state: &AppState, mail: Committed, preferred: bool) -> Response {
    let location = format!("{}/mail/{}", state.settings.relay.http.base_path, mail.id);
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(MailQueued {
            id: mail.id,
            message_id: mail.message_id,
            status: "queued",
        }),
    )
        .into_response();
    let headers = response.headers_mut();
    if preferred {
        headers.insert(
            "preference-applied",
            axum::http::HeaderValue::from_static(RESPOND_ASYNC),
        );
    }
    if mail.earlier {
        headers.insert(
            IDEMPOTENT_REPLAYED,
            axum::http::HeaderValue::from_static("true"),
        );
    }
    response
}

/// What `POST /mail` answers with 202: one of the two bodies, as they are (no tag).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum MailAnswer {
    Sent(MailAccepted),
    Queued(MailQueued),
}

/// What a failed hand-over means beyond its answer: quota back unless the server may have
/// the mail, Exchange's quota and send-as refusals remembered.
async fn refused(
    state: &AppState,
    identity: &Identity,
    error: DeliveryError,
    quota: Reservation,
    caller: &Caller,
    from: &str,
) -> ApiError {
    // Failures an administrator must fix (login, TLS, token) are mailed to them, at most hourly.
    state.admin.send_failure(&error, &identity.name);
    identity.settle_failed_send(&error, quota).await;
    if error.kind() == FailureKind::SendAsDenied {
        let reply = error.server_reply().unwrap_or_else(|| error.to_string());
        return identity
            .send_as
            .remember_exchange_denial(caller, from, &reply)
            .await
            .into();
    }
    error.into()
}

/// The request as sent: JSON, or a form with files beside it.
pub struct Submission {
    request: MailRequest,
    files: Vec<UploadedFile>,
    /// What makes two requests "the same" for Idempotency-Key.
    fingerprint: Fingerprint,
    /// The body's bytes in the memory budget, given back when the send is over.
    charge: Charge,
}

impl FromRequest<AppState> for Submission {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let limits = &state.settings.relay.limits;
        // Charged before the body is read: the budget bounds what all requests hold at once.
        let (request, charge, refused) =
            budget::admit(request, &state.budget, limits.max_body_bytes).await?;
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case("multipart/form-data") {
            let form_data = Multipart::from_request(request, state).await.map_err(|e| {
                ApiError::InvalidRequest {
                    detail: format!(
                        "the multipart/form-data body could not be read: {}",
                        e.body_text()
                    ),
                    errors: vec![crate::message::FieldError::new("body", e.body_text())],
                }
            })?;
            let (request, files, fingerprint) = form::read(form_data, limits)
                .await
                .map_err(|e| budget::take(&refused).unwrap_or(e))?;
            return Ok(Self {
                request,
                files,
                fingerprint,
                charge,
            });
        }
        match json::body(request, state).await {
            Ok(bytes) => {
                let fingerprint = Fingerprint::of(&bytes);
                let request = json::parse(&bytes)?;
                // Attachments were decoded straight from the body's text while it was parsed;
                // the raw body goes now, before the message is built beside the decoded bytes.
                drop(bytes);
                Ok(Self {
                    request,
                    files: Vec::new(),
                    fingerprint,
                    charge,
                })
            }
            Err(ApiError::UnsupportedMediaType(_)) => Err(ApiError::UnsupportedMediaType(format!(
                "POST /mail takes Content-Type application/json or multipart/form-data (got {})",
                if content_type.is_empty() {
                    "no Content-Type"
                } else {
                    &content_type
                }
            ))),
            Err(e) => Err(budget::take(&refused).unwrap_or(e)),
        }
    }
}

async fn build(mail: Mail, limits: MessageLimits) -> Result<OutgoingMail, ApiError> {
    let attached: usize = mail.attachments.iter().map(|a| a.content.len()).sum();
    if attached < BLOCKING_BUILD_BYTES {
        return Ok(mail.build(&limits)?);
    }
    tokio::task::spawn_blocking(move || mail.build(&limits))
        .await
        .map_err(|e| {
            request_log::note_cause_text(format!("building the message panicked: {e}"));
            ApiError::Internal
        })?
        .map_err(ApiError::from)
}
