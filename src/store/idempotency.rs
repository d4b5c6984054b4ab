//! Idempotency-Key records in SQL: a claim every replica sees at once, answers that any replica
//! replays and that survive restarts, the TTL and the bounds enforced by queries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;

use super::Shared;
use super::db::to_sql;
use super::sql;
use crate::clock::{Millis, duration_ms};
use crate::config::IdempotencySettings;
use crate::idempotency::{
    Fingerprint, IdempotencyError, IdempotencyKey, IdempotencyStore, Slot, StoredResponse,
};

/// Expired records are deleted, and the bounds checked, at most this often per replica: the
/// check counts the whole table, which must not happen per mail.
const TRIM_EVERY_MS: Millis = 10_000;
/// What a record costs beyond its key and answer, as the memory store counts it.
const RECORD_OVERHEAD: i64 = 256;

pub struct SqlIdempotencyStore {
    shared: Arc<Shared>,
    ttl_ms: Millis,
    /// How long a claim holds its key without an answer: longer than any request may run, so
    /// only a replica that died mid-request leaves one to expire.
    lease_ms: Millis,
    max_entries: i64,
    max_bytes: i64,
    /// When this replica last trimmed (ms).
    last_trim: AtomicU64,
}

impl SqlIdempotencyStore {
    pub(super) fn new(
        shared: Arc<Shared>,
        settings: &IdempotencySettings,
        request_timeout: Duration,
    ) -> Self {
        Self {
            shared,
            ttl_ms: duration_ms(settings.ttl),
            lease_ms: duration_ms(request_timeout + Duration::from_secs(30)),
            max_entries: i64::try_from(settings.max_entries).unwrap_or(i64::MAX),
            max_bytes: i64::try_from(settings.max_bytes).unwrap_or(i64::MAX),
            last_trim: AtomicU64::new(0),
        }
    }

    /// Forget expired records, then, beyond `maxEntries` or `maxBytes`, the oldest answers of
    /// the caller holding the most (as the memory store does), a batch at a time.
    async fn trim(&self, now: Millis) -> Result<(), String> {
        let now = to_sql(now);
        sql!(self.shared, |pool| sqlx::query(
            "DELETE FROM idempotency_records WHERE expires_at <= $1"
        )
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ()))
        .await?;
        for _ in 0..16 {
            let (count, bytes): (i64, i64) = sql!(self.shared, |pool| {
                sqlx::query_as(
                "SELECT COUNT(*), CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM idempotency_records"
            )
            .fetch_one(pool)
            .await
            })
            .await?;
            let (over_count, over_bytes) = (count - self.max_entries, bytes - self.max_bytes);
            if over_count <= 0 && over_bytes <= 0 {
                return Ok(());
            }
            let heaviest = if over_bytes > 0 {
                "SELECT scope FROM idempotency_records GROUP BY scope ORDER BY SUM(bytes) DESC LIMIT 1"
            } else {
                "SELECT scope FROM idempotency_records GROUP BY scope ORDER BY COUNT(*) DESC LIMIT 1"
            };
            let scope: Option<String> = sql!(self.shared, |pool| sqlx::query_scalar(heaviest)
                .fetch_optional(pool)
                .await)
            .await?;
            let Some(scope) = scope else { return Ok(()) };
            // At least what is over in count, and an eighth of the overflow's share in bytes.
            let batch = over_count.max(1).max(count / 8).min(1_000);
            sql!(self.shared, |pool| sqlx::query(
                "DELETE FROM idempotency_records WHERE scope = $1 AND key IN \
                     (SELECT key FROM idempotency_records WHERE scope = $1 \
                      ORDER BY status IS NULL, expires_at LIMIT $2)"
            )
            .bind(&scope)
            .bind(batch)
            .execute(pool)
            .await
            .map(|_| ()))
            .await?;
        }
        Ok(())
    }
}

/// A stored record as read back: fingerprint, status, headers (JSON), body.
type Row = (Vec<u8>, Option<i32>, Option<String>, Option<Vec<u8>>);

#[async_trait]
impl IdempotencyStore for SqlIdempotencyStore {
    async fn begin(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: Millis,
    ) -> Result<Slot, IdempotencyError> {
        let unavailable = IdempotencyError::Unavailable;
        // Claim the key, or take over a record whose time is up; either way in one statement,
        // so two replicas claiming at once cannot both win.
        let token = rand::random::<i64>() & i64::MAX;
        let claim_bytes =
            RECORD_OVERHEAD + i64::try_from(scope.len() + key.as_str().len()).unwrap_or(0);
        let at = to_sql(now);
        for _ in 0..3 {
            let claimed: Option<i64> = sql!(self.shared, |pool| sqlx::query_scalar(
                "INSERT INTO idempotency_records \
                       (scope, key, fingerprint, token, expires_at, bytes) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (scope, key) DO UPDATE SET \
                       fingerprint = excluded.fingerprint, token = excluded.token, \
                       expires_at = excluded.expires_at, status = NULL, headers = NULL, \
                       body = NULL, bytes = excluded.bytes \
                     WHERE idempotency_records.expires_at <= $7 \
                     RETURNING token"
            )
            .bind(scope)
            .bind(key.as_str())
            .bind(&fingerprint.as_bytes()[..])
            .bind(token)
            .bind(to_sql(now.saturating_add(self.lease_ms)))
            .bind(claim_bytes)
            .bind(at)
            .fetch_optional(pool)
            .await)
            .await
            .map_err(unavailable)?;
            if claimed == Some(token) {
                return Ok(Slot::New {
                    token: token.unsigned_abs(),
                });
            }
            let row: Option<Row> = sql!(self.shared, |pool| sqlx::query_as(
                "SELECT fingerprint, status, headers, body FROM idempotency_records \
                     WHERE scope = $1 AND key = $2"
            )
            .bind(scope)
            .bind(key.as_str())
            .fetch_optional(pool)
            .await)
            .await
            .map_err(unavailable)?;
            // Gone between the two statements (abandoned, trimmed): claim again.
            let Some((stored, status, headers, body)) = row else {
                continue;
            };
            if Fingerprint::from_bytes(&stored) != Some(fingerprint) {
                return Ok(Slot::Conflict);
            }
            let Some(status) = status else {
                return Ok(Slot::InProgress);
            };
            return Ok(Slot::Replay(decode(status, headers, body)));
        }
        // Claimed and released three times over while we looked: someone is working on it.
        Ok(Slot::InProgress)
    }

    async fn complete(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        token: u64,
        response: StoredResponse,
        now: Millis,
    ) {
        let bytes = RECORD_OVERHEAD
            + i64::try_from(scope.len() + key.as_str().len() + response.size()).unwrap_or(i64::MAX);
        let headers = encode_headers(&response.headers);
        let stored = sql!(self.shared, |pool| sqlx::query(
            "UPDATE idempotency_records SET status = $1, headers = $2, body = $3, \
                   bytes = $4, expires_at = $5 \
                 WHERE scope = $6 AND key = $7 AND token = $8"
        )
        .bind(i32::from(response.status.as_u16()))
        .bind(&headers)
        .bind(&response.body[..])
        .bind(bytes)
        .bind(to_sql(now.saturating_add(self.ttl_ms)))
        .bind(scope)
        .bind(key.as_str())
        .bind(to_sql(token))
        .execute(pool)
        .await
        .map(|_| ()))
        .await;
        if let Err(e) = stored {
            // The answer went to the client; a retry within the claim's lease gets 409, after it
            // the request runs again.
            tracing::error!(error = %e, "an answer could not be kept under its Idempotency-Key");
            return;
        }
        let last = self.last_trim.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= TRIM_EVERY_MS
            && self
                .last_trim
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            && let Err(e) = self.trim(now).await
        {
            tracing::warn!(error = %e, "expired idempotency records could not be deleted");
        }
    }

    fn abandon(&self, scope: &str, key: &IdempotencyKey, token: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let (scope, key) = (scope.to_owned(), key.as_str().to_owned());
        let lease = Duration::from_millis(self.lease_ms);
        // A request often fails because the store is away: keep trying until it answers, so
        // that a retry right after the store's return runs instead of waiting out the lease.
        // The task holds only the pool, and ends by the lease at the latest.
        runtime.spawn(async move {
            let started = std::time::Instant::now();
            let mut pause = Duration::from_millis(200);
            while started.elapsed() < lease {
                let removed = sql!(shared, |pool| sqlx::query(
                    "DELETE FROM idempotency_records \
                     WHERE scope = $1 AND key = $2 AND token = $3 AND status IS NULL"
                )
                .bind(&scope)
                .bind(&key)
                .bind(to_sql(token))
                .execute(pool)
                .await
                .map(|_| ()))
                .await;
                if removed.is_ok() {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        });
    }
}

fn encode_headers(headers: &[(HeaderName, HeaderValue)]) -> String {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
        .collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into())
}

fn decode(status: i32, headers: Option<String>, body: Option<Vec<u8>>) -> StoredResponse {
    let pairs: Vec<(String, String)> = headers
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    StoredResponse {
        status: u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK),
        headers: pairs
            .into_iter()
            .filter_map(|(name, value)| {
                Some((
                    HeaderName::from_bytes(name.as_bytes()).ok()?,
                    HeaderValue::from_str(&value).ok()?,
                ))
            })
            .collect(),
        body: Bytes::from(body.unwrap_or_default()),
    }
}
