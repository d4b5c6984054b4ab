//! Rate-limit windows and the quota block in SQL, counted across replicas.
//!
//! A reservation is one transaction under the store's rate-limit lock: every limit is checked,
//! then every cost is added, or nothing is. The lock serialises reservations across the
//! deployment; each holds it for a few short statements, and Exchange's own limits (30
//! messages a minute per mailbox) keep the rate far below what that allows. The decision
//! (what fits, how long to wait) is the memory limiter's own ([`wait_until_fits`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::Shared;
use super::db::locked_transaction;
use crate::clock::{Millis, duration_ms};
use crate::rate_limit::{
    Ask, LimitError, LimitKey, RateLimited, RateLimiter, Reservation, Reserved, wait_until_fits,
};

/// The advisory lock (PostgreSQL) that reservations hold: any constant the relay alone uses.
const RATE_LIMIT_LOCK: i64 = 0x6d61_696c_7265_6c01; // "mailrel" + 1
/// Buckets older than any window are deleted every this many reservations.
const SWEEP_EVERY: u64 = 1_024;

pub struct SqlRateLimiter {
    shared: Arc<Shared>,
    reservations: AtomicU64,
}

impl SqlRateLimiter {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            reservations: AtomicU64::new(0),
        }
    }
}

fn to_sql(ms: Millis) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// The first bucket start that still counts at `now` for `kind`: `expires_at(bucket) > now`.
fn oldest_counted(key: &LimitKey, now: Millis) -> i64 {
    let kind = key.kind;
    let span = duration_ms(kind.window()) + kind.bucket_ms() - 1;
    to_sql(now.saturating_sub(span)) + 1
}

/// What a reservation decided inside its transaction.
enum Decision {
    Reserve(Vec<Reserved>),
    Refuse(RateLimited),
}

#[async_trait]
impl RateLimiter for SqlRateLimiter {
    async fn check_and_reserve(
        &self,
        asks: &[Ask],
        now: Millis,
    ) -> Result<Reservation, LimitError> {
        let asks: Vec<&Ask> = asks.iter().filter(|a| a.cost > 0).collect();
        if asks.is_empty() {
            return Ok(Reservation::new(Vec::new()));
        }
        let sweep = self
            .reservations
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY);
        let decision = self
            .shared
            .run(async {
                locked_transaction!(self.shared.db(), RATE_LIMIT_LOCK, |tx| {
                    let mut refusal: Option<RateLimited> = None;
                    let mut planned = Vec::with_capacity(asks.len());
                    for ask in &asks {
                        let (kind, subject) = (ask.key.kind.label(), ask.key.subject.as_str());
                        let since = oldest_counted(&ask.key, now);
                        let blocked: Option<i64> = sqlx::query_scalar(
                            "SELECT until FROM rate_blocks \
                             WHERE kind = $1 AND subject = $2 AND until > $3",
                        )
                        .bind(kind)
                        .bind(subject)
                        .bind(to_sql(now))
                        .fetch_optional(&mut *tx)
                        .await?;
                        let total: i64 = sqlx::query_scalar(
                            "SELECT CAST(COALESCE(SUM(cost), 0) AS BIGINT) FROM rate_counts \
                             WHERE kind = $1 AND subject = $2 AND bucket >= $3",
                        )
                        .bind(kind)
                        .bind(subject)
                        .bind(since)
                        .fetch_one(&mut *tx)
                        .await?;
                        let max = ask.max.get();
                        let fits = blocked.is_none()
                            && total.saturating_add(i64::from(ask.cost)) <= i64::from(max);
                        if !fits {
                            // The rare path: read the window to tell how long until it fits.
                            let buckets: Vec<(i64, i64)> = sqlx::query_as(
                                "SELECT bucket, cost FROM rate_counts \
                                 WHERE kind = $1 AND subject = $2 AND bucket >= $3 \
                                 ORDER BY bucket",
                            )
                            .bind(kind)
                            .bind(subject)
                            .bind(since)
                            .fetch_all(&mut *tx)
                            .await?;
                            let buckets = buckets.into_iter().map(|(bucket, cost)| {
                                (
                                    u64::try_from(bucket).unwrap_or(0),
                                    u32::try_from(cost).unwrap_or(u32::MAX),
                                )
                            });
                            let blocked = blocked.and_then(|until| u64::try_from(until).ok());
                            if let Err(retry_after) =
                                wait_until_fits(ask.key.kind, buckets, blocked, ask.cost, max, now)
                            {
                                let limited = RateLimited {
                                    kind: ask.key.kind,
                                    max,
                                    cost: ask.cost,
                                    retry_after,
                                };
                                if refusal.as_ref().is_none_or(|r| {
                                    (limited.never_fits(), limited.retry_after)
                                        > (r.never_fits(), r.retry_after)
                                }) {
                                    refusal = Some(limited);
                                }
                                continue;
                            }
                        }
                        let bucket = now - now % ask.key.kind.bucket_ms();
                        planned.push(Reserved {
                            key: ask.key.clone(),
                            bucket,
                            cost: ask.cost,
                        });
                    }
                    if let Some(refusal) = refusal {
                        tx.rollback().await?;
                        return Ok(Decision::Refuse(refusal));
                    }
                    for item in &planned {
                        sqlx::query(
                            "INSERT INTO rate_counts (kind, subject, bucket, cost) \
                             VALUES ($1, $2, $3, $4) \
                             ON CONFLICT (kind, subject, bucket) \
                             DO UPDATE SET cost = rate_counts.cost + excluded.cost",
                        )
                        .bind(item.key.kind.label())
                        .bind(&item.key.subject)
                        .bind(to_sql(item.bucket))
                        .bind(i64::from(item.cost))
                        .execute(&mut *tx)
                        .await?;
                    }
                    if sweep {
                        // A day and a minute back is older than every window.
                        let day = duration_ms(std::time::Duration::from_secs(86_460));
                        sqlx::query("DELETE FROM rate_counts WHERE bucket < $1 OR cost <= 0")
                            .bind(to_sql(now.saturating_sub(day)))
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("DELETE FROM rate_blocks WHERE until <= $1")
                            .bind(to_sql(now))
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    Ok(Decision::Reserve(planned))
                })
            })
            .await
            .map_err(LimitError::Unavailable)?;
        match decision {
            Decision::Reserve(items) => Ok(Reservation::new(items)),
            Decision::Refuse(limited) => Err(LimitError::Limited(limited)),
        }
    }

    async fn release(&self, reservation: Reservation) {
        let items = reservation.items().to_vec();
        if items.is_empty() {
            return;
        }
        let released = self
            .shared
            .run(async {
                locked_transaction!(self.shared.db(), RATE_LIMIT_LOCK, |tx| {
                    for item in &items {
                        sqlx::query(
                            "UPDATE rate_counts SET cost = CASE WHEN cost > $4 THEN cost - $4 ELSE 0 END \
                             WHERE kind = $1 AND subject = $2 AND bucket = $3",
                        )
                        .bind(item.key.kind.label())
                        .bind(&item.key.subject)
                        .bind(to_sql(item.bucket))
                        .bind(i64::from(item.cost))
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await
                })
            })
            .await;
        if let Err(e) = released {
            // The quota stays taken until its window passes: the safe side of the limit.
            tracing::warn!(error = %e, "a rate-limit reservation could not be given back");
        }
    }

    async fn block(&self, key: &LimitKey, now: Millis) {
        let kind = key.kind;
        let bucket = now - now % kind.bucket_ms();
        let until = to_sql(kind.expires_at(bucket));
        let blocked = self
            .shared
            .run(async {
                locked_transaction!(self.shared.db(), RATE_LIMIT_LOCK, |tx| {
                    sqlx::query(
                        "INSERT INTO rate_blocks (kind, subject, until) VALUES ($1, $2, $3) \
                         ON CONFLICT (kind, subject) DO UPDATE SET until = excluded.until",
                    )
                    .bind(kind.label())
                    .bind(&key.subject)
                    .bind(until)
                    .execute(&mut *tx)
                    .await?;
                    // What was counted before the block frees no earlier than the block ends.
                    sqlx::query("DELETE FROM rate_counts WHERE kind = $1 AND subject = $2")
                        .bind(kind.label())
                        .bind(&key.subject)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await
                })
            })
            .await;
        if let Err(e) = blocked {
            tracing::error!(error = %e, "the mailbox's quota block could not be stored");
        }
    }
}
