//! The queue in SQL: one row per mail (`queued_mails`), every change one statement guarded by
//! the mail's state and its claim, so that two workers never hold one mail and a late worker
//! cannot overwrite what the sweep decided.

use std::sync::Arc;

use async_trait::async_trait;

use super::Shared;
use super::db::{Db, to_sql};
use super::sql;
use crate::clock::Millis;
use crate::queue::{
    Attempt, Claimed, Depth, Enqueued, Finish, MailRecord, MailState, NewMail, QueueStore, Swept,
};

/// The claim: the queued mail due longest, taken by one worker. PostgreSQL skips rows another
/// claim holds locked ([`for_db`]); SQLite has one writer at a time, so the statement is atomic
/// as it is.
const CLAIM: &str = "UPDATE queued_mails SET state = 'sending', claimed_by = $1, claim_until = $2, \
     uploading_at = NULL, attempts = attempts + 1 \
     WHERE id = (SELECT id FROM queued_mails WHERE state = 'queued' AND next_attempt_at <= $3 \
                 ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
     RETURNING id, caller, message_id, mail_from, recipients, mime, attempts, created_at, expires_at, history";

/// The completion calls due, finished after `$2`, moved to the claim's lease `$3`.
const CLAIM_WEBHOOKS: &str = "UPDATE queued_mails SET webhook_due_at = $3, \
     webhook_attempts = webhook_attempts + 1 \
     WHERE id IN (SELECT id FROM queued_mails WHERE webhook_due_at <= $1 AND finished_at > $2 \
                  AND state IN ('failed', 'expired', 'unknown') \
                  ORDER BY webhook_due_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
     RETURNING id, webhook_attempts";

/// The administrators' notices due, finished after `$2`, taken (at most `$3`).
const TAKE_ADMIN_BATCH: &str = "UPDATE queued_mails SET admin_due_at = NULL \
     WHERE id IN (SELECT id FROM queued_mails WHERE admin_due_at <= $1 AND finished_at > $2 \
                  AND state IN ('failed', 'expired', 'unknown') \
                  ORDER BY finished_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
     RETURNING id";

/// `sql` for this database: SQLite has no row locks to skip (one writer at a time makes the
/// statement atomic as it is).
fn for_db(db: &Db, sql: &'static str) -> std::borrow::Cow<'static, str> {
    match db {
        Db::Postgres(_) => sql.into(),
        Db::Sqlite(_) => sql.replace(" FOR UPDATE SKIP LOCKED", "").into(),
    }
}

const RECORD_COLUMNS: &str = "id, caller, message_id, state, recipients, bytes, created_at, \
     expires_at, next_attempt_at, attempts, history, accepted, problem, finished_at";

/// What the sweep writes for a mail whose worker died while uploading it.
const DIED_UPLOADING: &str = r#"{"code":"smtp_outcome_unknown","title":"SMTP outcome unknown","status":502,"detail":"the worker sending this mail stopped while the message was going out: the server may or may not have it. Look for its Message-ID in the recipient's mailbox or the server's message trace before sending it again."}"#;

type ClaimRow = (
    String,
    String,
    String,
    String,
    String,
    Vec<u8>,
    i32,
    i64,
    i64,
    String,
);

type RecordRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i32,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
);

pub struct SqlQueue {
    shared: Arc<Shared>,
}

impl SqlQueue {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Run one statement that changes rows; how many it changed.
    async fn change(&self, sql: &str, binds: Binds<'_>) -> Result<u64, String> {
        sql!(self.shared, |pool| {
            let mut query = sqlx::query(sql);
            for bind in binds.0 {
                query = match bind {
                    Bind::Int(v) => query.bind(*v),
                    Bind::Text(v) => query.bind(*v),
                    Bind::NullInt => query.bind(None::<i64>),
                    Bind::NullText => query.bind(None::<String>),
                };
            }
            query.execute(pool).await.map(|r| r.rows_affected())
        })
        .await
    }
}

/// Parameters for [`SqlQueue::change`], in order.
struct Binds<'a>(&'a [Bind<'a>]);

enum Bind<'a> {
    Int(i64),
    Text(&'a str),
    NullInt,
    NullText,
}

fn text(value: Option<&str>) -> Bind<'_> {
    value.map_or(Bind::NullText, Bind::Text)
}

fn millis(value: i64) -> Millis {
    u64::try_from(value).unwrap_or(0)
}

fn json_list<T: serde::de::DeserializeOwned>(text: &str) -> Vec<T> {
    serde_json::from_str(text).unwrap_or_default()
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn record(row: RecordRow) -> MailRecord {
    let (id, caller, message_id, state, recipients, bytes, created, expires, next, attempts) = (
        row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7, row.8, row.9,
    );
    let state = MailState::parse(&state).unwrap_or(MailState::Unknown);
    MailRecord {
        id,
        caller,
        message_id,
        state,
        recipients: json_list(&recipients),
        bytes: millis(bytes),
        created_at: millis(created),
        expires_at: millis(expires),
        next_attempt_at: (state == MailState::Queued).then(|| millis(next)),
        attempts: u32::try_from(attempts).unwrap_or(0),
        history: json_list(&row.10),
        accepted: row.11.as_deref().map(json_list),
        problem: row.12.and_then(|p| serde_json::from_str(&p).ok()),
        finished_at: row.13.map(millis),
    }
}

#[async_trait]
impl QueueStore for SqlQueue {
    async fn enqueue(&self, mail: NewMail<'_>) -> Result<Enqueued, String> {
        let recipients = to_json(&mail.recipients);
        let (now, expires) = (to_sql(mail.now), to_sql(mail.expires_at));
        let bytes = to_sql(mail.mime.len() as u64);
        let (key, fingerprint) = mail.idempotency.unzip();
        // One statement: a key already queued for this caller leaves the row as it is.
        let inserted = sql!(self.shared, |pool| {
            sqlx::query(
            "INSERT INTO queued_mails (id, caller, message_id, mail_from, recipients, mime, bytes, \
             state, created_at, expires_at, next_attempt_at, idempotency_key, fingerprint) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9, $8, $10, $11) \
             ON CONFLICT (caller, idempotency_key) DO NOTHING"
        )
        .bind(mail.id)
        .bind(mail.caller)
        .bind(mail.message_id)
        .bind(mail.from)
        .bind(&recipients)
        .bind(mail.mime)
        .bind(bytes)
        .bind(now)
        .bind(expires)
        .bind(key)
        .bind(fingerprint)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
        })
        .await?;
        if inserted == 1 {
            return Ok(Enqueued::New);
        }
        let earlier: Option<(String, String, Option<Vec<u8>>)> =
            sql!(self.shared, |pool| sqlx::query_as(
                "SELECT id, message_id, fingerprint FROM queued_mails \
                 WHERE caller = $1 AND idempotency_key = $2"
            )
            .bind(mail.caller)
            .bind(key)
            .fetch_optional(pool)
            .await)
            .await?;
        // Deleted in between (retention, or an operator's drop): the key's mail is gone.
        let (id, message_id, stored) = earlier.ok_or_else(|| {
            "the mail queued with this Idempotency-Key was deleted just now".to_owned()
        })?;
        Ok(Enqueued::Earlier {
            id,
            message_id,
            same_request: stored.as_deref() == fingerprint,
        })
    }

    async fn claim(
        &self,
        worker: &str,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<Claimed>, String> {
        let statement = for_db(self.shared.db(), CLAIM);
        let row: Option<ClaimRow> = sql!(self.shared, |pool| sqlx::query_as(&statement)
            .bind(worker)
            .bind(to_sql(lease_until))
            .bind(to_sql(now))
            .fetch_optional(pool)
            .await)
        .await?;
        Ok(row.map(|r| Claimed {
            id: r.0,
            caller: r.1,
            message_id: r.2,
            from: r.3,
            recipients: json_list(&r.4),
            mime: r.5,
            attempts: u32::try_from(r.6).unwrap_or(1),
            created_at: millis(r.7),
            expires_at: millis(r.8),
            history: json_list(&r.9),
        }))
    }

    async fn mark_uploading(&self, id: &str, worker: &str, now: Millis) -> Result<bool, String> {
        let changed = self
            .change(
                "UPDATE queued_mails SET uploading_at = $3 \
                 WHERE id = $1 AND claimed_by = $2 AND state = 'sending'",
                Binds(&[Bind::Text(id), Bind::Text(worker), Bind::Int(to_sql(now))]),
            )
            .await?;
        Ok(changed == 1)
    }

    async fn finish(
        &self,
        id: &str,
        worker: &str,
        end: &Finish,
        history: &[Attempt],
        now: Millis,
    ) -> Result<bool, String> {
        let history = to_json(&history);
        let state = end.state().as_str();
        let (accepted, problem, next_at) = match end {
            Finish::Sent { accepted, .. } => (Some(to_json(accepted)), None, None),
            Finish::Failed { problem } => (None, Some(to_json(problem)), None),
            Finish::Retry { next_at } => (None, None, Some(to_sql(*next_at))),
            Finish::Expired | Finish::Unknown => (None, None, None),
        };
        let (accepted, problem) = (text(accepted.as_deref()), text(problem.as_deref()));
        // A retry is queued again (its upload mark cleared); every other end is final.
        let (next, finished) = match next_at {
            Some(at) => (Bind::Int(at), Bind::NullInt),
            None => (Bind::NullInt, Bind::Int(to_sql(now))),
        };
        let changed = self
            .change(
                "UPDATE queued_mails SET state = $3, history = $4, accepted = $5, problem = $6, \
                 next_attempt_at = COALESCE($7, next_attempt_at), finished_at = $8, \
                 claimed_by = NULL, claim_until = NULL, \
                 webhook_due_at = CASE WHEN $3 IN ('failed', 'expired', 'unknown') THEN $8 END, \
                 admin_due_at = CASE WHEN $3 IN ('failed', 'expired', 'unknown') THEN $8 END, \
                 uploading_at = CASE WHEN $8 IS NULL THEN NULL ELSE uploading_at END \
                 WHERE id = $1 AND claimed_by = $2 AND state = 'sending'",
                Binds(&[
                    Bind::Text(id),
                    Bind::Text(worker),
                    Bind::Text(state),
                    Bind::Text(&history),
                    accepted,
                    problem,
                    next,
                    finished,
                ]),
            )
            .await?;
        Ok(changed == 1)
    }

    async fn postpone(&self, id: &str, worker: &str, until: Millis) -> Result<bool, String> {
        let changed = self
            .change(
                "UPDATE queued_mails SET state = 'queued', next_attempt_at = $3, \
                 attempts = attempts - 1, claimed_by = NULL, claim_until = NULL, uploading_at = NULL \
                 WHERE id = $1 AND claimed_by = $2 AND state = 'sending'",
                Binds(&[Bind::Text(id), Bind::Text(worker), Bind::Int(to_sql(until))]),
            )
            .await?;
        Ok(changed == 1)
    }

    async fn release(&self, worker: &str) -> Result<u64, String> {
        let pattern = format!("{worker}/%");
        self.change(
            "UPDATE queued_mails SET state = 'queued', attempts = attempts - 1, \
             claimed_by = NULL, claim_until = NULL \
             WHERE state = 'sending' AND claimed_by LIKE $1 AND uploading_at IS NULL",
            Binds(&[Bind::Text(&pattern)]),
        )
        .await
    }

    async fn sweep(&self, now: Millis) -> Result<Swept, String> {
        let now = to_sql(now);
        let requeued = self
            .change(
                "UPDATE queued_mails SET state = 'queued', claimed_by = NULL, claim_until = NULL \
                 WHERE state = 'sending' AND claim_until <= $1 AND uploading_at IS NULL",
                Binds(&[Bind::Int(now)]),
            )
            .await?;
        let unknown = self
            .change(
                "UPDATE queued_mails SET state = 'unknown', problem = $2, finished_at = $1, \
                 claimed_by = NULL, claim_until = NULL, webhook_due_at = $1, admin_due_at = $1 \
                 WHERE state = 'sending' AND claim_until <= $1 AND uploading_at IS NOT NULL",
                Binds(&[Bind::Int(now), Bind::Text(DIED_UPLOADING)]),
            )
            .await?;
        let expired = self
            .change(
                "UPDATE queued_mails SET state = 'expired', finished_at = $1, \
                 webhook_due_at = $1, admin_due_at = $1 \
                 WHERE state = 'queued' AND expires_at <= $1",
                Binds(&[Bind::Int(now)]),
            )
            .await?;
        Ok(Swept {
            requeued,
            unknown,
            expired,
        })
    }

    async fn forget_finished(&self, before: Millis) -> Result<u64, String> {
        self.change(
            "DELETE FROM queued_mails WHERE finished_at IS NOT NULL AND finished_at < $1",
            Binds(&[Bind::Int(to_sql(before))]),
        )
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<MailRecord>, String> {
        let sql = format!("SELECT {RECORD_COLUMNS} FROM queued_mails WHERE id = $1");
        let row: Option<RecordRow> = sql!(self.shared, |pool| sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await)
        .await?;
        Ok(row.map(record))
    }

    async fn list(&self, state: Option<MailState>, limit: u32) -> Result<Vec<MailRecord>, String> {
        let filter = if state.is_some() {
            "WHERE state = $2"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM queued_mails {filter} ORDER BY created_at DESC LIMIT $1"
        );
        let rows: Vec<RecordRow> = sql!(self.shared, |pool| {
            let query = sqlx::query_as(&sql).bind(i64::from(limit));
            match state {
                Some(state) => query.bind(state.as_str()),
                None => query,
            }
            .fetch_all(pool)
            .await
        })
        .await?;
        Ok(rows.into_iter().map(record).collect())
    }

    async fn requeue(&self, id: &str, now: Millis, expires_at: Millis) -> Result<bool, String> {
        let changed = self
            .change(
                "UPDATE queued_mails SET state = 'queued', next_attempt_at = $2, expires_at = $3, \
                 finished_at = NULL, problem = NULL, uploading_at = NULL, \
                 webhook_due_at = NULL, webhook_attempts = 0, admin_due_at = NULL \
                 WHERE id = $1 AND state IN ('queued', 'failed', 'expired', 'unknown')",
                Binds(&[
                    Bind::Text(id),
                    Bind::Int(to_sql(now)),
                    Bind::Int(to_sql(expires_at)),
                ]),
            )
            .await?;
        Ok(changed == 1)
    }

    async fn remove(&self, id: &str) -> Result<bool, String> {
        let changed = self
            .change(
                "DELETE FROM queued_mails WHERE id = $1 AND state <> 'sending'",
                Binds(&[Bind::Text(id)]),
            )
            .await?;
        Ok(changed == 1)
    }

    async fn claim_webhooks(
        &self,
        now: Millis,
        since: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> Result<Vec<(MailRecord, u32)>, String> {
        let statement = for_db(self.shared.db(), CLAIM_WEBHOOKS);
        let claimed: Vec<(String, i32)> = sql!(self.shared, |pool| sqlx::query_as(&statement)
            .bind(to_sql(now))
            .bind(to_sql(since))
            .bind(to_sql(lease_until))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)
        .await?;
        let mut out = Vec::with_capacity(claimed.len());
        for (id, calls) in claimed {
            // Deleted in between (an operator's drop): nothing left to report.
            if let Some(record) = self.get(&id).await? {
                out.push((record, u32::try_from(calls).unwrap_or(1)));
            }
        }
        Ok(out)
    }

    async fn webhook_done(&self, id: &str, next_at: Option<Millis>) -> Result<(), String> {
        let next = next_at.map_or(Bind::NullInt, |at| Bind::Int(to_sql(at)));
        self.change(
            "UPDATE queued_mails SET webhook_due_at = $2 WHERE id = $1",
            Binds(&[Bind::Text(id), next]),
        )
        .await
        .map(|_| ())
    }

    async fn take_admin_batch(
        &self,
        now: Millis,
        since: Millis,
        limit: u32,
    ) -> Result<Vec<MailRecord>, String> {
        let statement = for_db(self.shared.db(), TAKE_ADMIN_BATCH);
        let taken: Vec<String> = sql!(self.shared, |pool| sqlx::query_scalar(&statement)
            .bind(to_sql(now))
            .bind(to_sql(since))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)
        .await?;
        let mut out = Vec::with_capacity(taken.len());
        for id in taken {
            if let Some(record) = self.get(&id).await? {
                out.push(record);
            }
        }
        out.sort_by_key(|r| r.finished_at);
        Ok(out)
    }

    async fn depth(&self) -> Result<Depth, String> {
        let rows: Vec<(String, i64, i64)> = sql!(self.shared, |pool| sqlx::query_as(
            "SELECT state, COUNT(*), CAST(COALESCE(SUM(bytes), 0) AS BIGINT) \
             FROM queued_mails GROUP BY state"
        )
        .fetch_all(pool)
        .await)
        .await?;
        let oldest: Option<i64> = sql!(self.shared, |pool| sqlx::query_scalar(
            "SELECT MIN(created_at) FROM queued_mails WHERE state IN ('queued', 'sending')"
        )
        .fetch_one(pool)
        .await)
        .await?;
        Ok(Depth {
            by_state: rows
                .into_iter()
                .filter_map(|(state, count, bytes)| {
                    Some((MailState::parse(&state)?, millis(count), millis(bytes)))
                })
                .collect(),
            oldest_waiting: oldest.map(millis),
        })
    }
}
