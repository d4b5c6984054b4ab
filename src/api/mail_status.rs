//! `GET /mail/{id}`: where a queued mail is, for the caller that sent it.

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;

use super::ApiError;
use super::errors::Problem;
use crate::app::AppState;
use crate::caller::{Caller, caller_id};
use crate::clock::Millis;
use crate::queue::{Attempt, MailRecord};
use crate::telemetry::request_log;

/// A queued mail's delivery status.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailStatus {
    #[schema(example = "019ac3f2-6c1e-7b53-9d1a-2f4e5b6c7d8e")]
    pub id: String,
    #[schema(example = "<019ac3f2-6c1e-7b53-9d1a-2f4e5b6c7d8e@contoso.com>")]
    pub message_id: String,
    /// `queued` (waiting for its next attempt), `sending`, `sent` (the server answered 2xx to
    /// the end of DATA), `failed` (refused for good: see `problem`), `expired` (not delivered
    /// within `mailRelay.delivery.maxAgeSeconds`) or `unknown` (the message went out but no
    /// verdict came back: the server may have it; it is not sent again by itself).
    #[schema(example = "queued")]
    pub status: &'static str,
    /// When the relay accepted it (RFC 3339).
    pub created_at: String,
    /// When it expires if not delivered by then.
    pub expires_at: String,
    /// When the next attempt is due (`queued` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// When it reached its final state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Attempts so far (`attempts` lists the first and the latest 19).
    pub attempt_count: u32,
    pub attempts: Vec<AttemptStatus>,
    /// The envelope recipients the server accepted (`sent` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_recipients: Option<Vec<String>>,
    /// Why it failed and what to fix, as the synchronous answer would have said (`failed`,
    /// `unknown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Problem>)]
    pub problem: Option<serde_json::Value>,
}

/// One delivery attempt.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptStatus {
    /// When it ended (RFC 3339).
    pub at: String,
    /// `sent`, or the failure's classified kind (`smtp_thread_limit`, `smtp_unavailable`,
    /// `token_unavailable`, `send_as_denied`, ...).
    #[schema(example = "smtp_thread_limit")]
    pub kind: String,
    /// The server's reply, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")]
    pub reply: Option<String>,
    /// What happened.
    pub detail: String,
}

/// The delivery status of a queued mail.
///
/// Only the caller that sent the mail sees it; for any other caller, and for mails sent
/// synchronously or already past `mailRelay.delivery.retentionSeconds`, the answer is 404.
#[utoipa::path(get, path = "/mail/{id}", tag = "mail", security(("bearer" = [])),
    params(("id" = String, Path, description = "The `id` that `POST /mail` answered")),
    responses(
        (status = 200, description = "The mail's status and attempts", body = MailStatus),
        (status = 401, description = "`unauthorized`: no credentials, or unknown ones", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no queued mail with this id was sent by this caller", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store did not answer; retry after `Retry-After`", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn mail_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<MailStatus>, ApiError> {
    request_log::note_caller(&caller);
    let not_found = || ApiError::MailNotFound(id.chars().take(64).collect());
    // Ids are UUIDs: anything else is no mail, and never reaches the store.
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(not_found());
    }
    let Some(queue) = &state.queue else {
        return Err(not_found());
    };
    let record = queue
        .status(&caller_id(&caller), &id)
        .await
        .map_err(ApiError::StoreUnavailable)?;
    record.map(MailStatus::from).map(Json).ok_or_else(not_found)
}

/// The status of `record` as JSON, as `GET /mail/{id}` shows it (for the completion call).
pub fn describe(record: MailRecord) -> serde_json::Value {
    serde_json::to_value(MailStatus::from(record)).unwrap_or_default()
}

impl From<MailRecord> for MailStatus {
    fn from(record: MailRecord) -> Self {
        Self {
            id: record.id,
            message_id: record.message_id,
            status: record.state.as_str(),
            created_at: rfc3339(record.created_at),
            expires_at: rfc3339(record.expires_at),
            next_attempt_at: record.next_attempt_at.map(rfc3339),
            finished_at: record.finished_at.map(rfc3339),
            attempt_count: record.attempts,
            attempts: record.history.into_iter().map(attempt).collect(),
            accepted_recipients: record.accepted,
            problem: record.problem,
        }
    }
}

fn attempt(a: Attempt) -> AttemptStatus {
    AttemptStatus {
        at: rfc3339(a.at),
        kind: a.kind,
        reply: a.reply,
        detail: a.detail,
    }
}

/// Unix ms as RFC 3339, to the millisecond.
pub fn rfc3339(at: Millis) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}
