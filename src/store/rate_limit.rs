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
use super::db::to_sql;
use crate::clock::{Millis, duration_ms};
use crate::rate_limit::{
    Ask, LimitError, LimitKey, LimitKind, RateLimited, RateLimiter, Reservation, Reserved,
    wait_until_fits,
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

/// The width of one stored counter: at least a second. The memory limiter counts per-minute
/// limits per millisecond; rows per millisecond would make every reservation sum a row per
/// mail of the last minute. A coarse counter counts until its last millisecond is a window
/// old, so no rolling window holds more than the limit; the price is up to a second's wait.
fn bucket_ms(kind: LimitKind) -> Millis {
    kind.bucket_ms().max(1_000)
}

/// The stored counter `now` falls in.
fn bucket_of(kind: LimitKind, now: Millis) -> Millis {
    now - now % bucket_ms(kind)
}

/// The first counter start that still counts at `now`: its last millisecond is less than a
/// window old.
fn oldest_counted(key: &LimitKey, now: Millis) -> i64 {
    let kind = key.kind;
    let span = duration_ms(kind.window()) + bucket_ms(kind) - 1;
    to_sql(now.saturating_sub(span)) + 1
}

/// The block and the count of `n` limits at `$1` (now), each given as (index, kind, subject,
/// oldest counted bucket) from `$2` on; one row per limit.
fn window_sql(n: usize) -> String {
    let asks: Vec<String> = (0..n)
        .map(|i| {
            let p = 2 + 4 * i;
            format!(
                "(CAST(${} AS BIGINT), CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS BIGINT))",
                p,
                p + 1,
                p + 2,
                p + 3
            )
        })
        .collect();
    format!(
        "WITH asks (i, kind, subject, since) AS (VALUES {}) \
         SELECT a.i, \
           (SELECT MAX(b.until) FROM rate_blocks b \
             WHERE b.kind = a.kind AND b.subject = a.subject AND b.until > $1), \
           (SELECT CAST(COALESCE(SUM(c.cost), 0) AS BIGINT) FROM rate_counts c \
             WHERE c.kind = a.kind AND c.subject = a.subject AND c.bucket >= a.since) \
         FROM asks a ORDER BY a.i",
        asks.join(", ")
    )
}

/// Add `n` costs (kind, subject, bucket, cost each) in one statement.
fn insert_sql(n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            let p = 1 + 4 * i;
            format!("(${}, ${}, ${}, ${})", p, p + 1, p + 2, p + 3)
        })
        .collect();
    format!(
        "INSERT INTO rate_counts (kind, subject, bucket, cost) VALUES {} \
         ON CONFLICT (kind, subject, bucket) DO UPDATE SET cost = rate_counts.cost + excluded.cost",
        rows.join(", ")
    )
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
        let window_sql = window_sql(asks.len());
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
                    // Every limit's block and count in one round trip.
                    let mut windows =
                        sqlx::query_as::<_, (i64, Option<i64>, i64)>(&window_sql).bind(to_sql(now));
                    for (i, ask) in asks.iter().enumerate() {
                        windows = windows
                            .bind(i64::try_from(i).unwrap_or(0))
                            .bind(ask.key.kind.label())
                            .bind(ask.key.subject.as_str())
                            .bind(oldest_counted(&ask.key, now));
                    }
                    let windows = windows.fetch_all(&mut *tx).await?;
                    for (i, blocked, total) in windows {
                        let Some(ask) = usize::try_from(i).ok().and_then(|i| asks.get(i)) else {
                            continue;
                        };
                        let (kind, subject) = (ask.key.kind.label(), ask.key.subject.as_str());
                        let since = oldest_counted(&ask.key, now);
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
                            // Each counter as if all of it came at its last millisecond, the
                            // moment the memory limiter's own counters would free it.
                            let shift = bucket_ms(ask.key.kind) - ask.key.kind.bucket_ms();
                            let buckets = buckets.into_iter().map(|(bucket, cost)| {
                                (
                                    u64::try_from(bucket).unwrap_or(0) + shift,
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
                        let bucket = bucket_of(ask.key.kind, now);
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
                    if !planned.is_empty() {
                        let insert_sql = insert_sql(planned.len());
                        let mut insert = sqlx::query(&insert_sql);
                        for item in &planned {
                            insert = insert
                                .bind(item.key.kind.label())
                                .bind(&item.key.subject)
                                .bind(to_sql(item.bucket))
                                .bind(i64::from(item.cost));
                        }
                        insert.execute(&mut *tx).await?;
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
        let bucket = bucket_of(kind, now);
        let until = to_sql(kind.expires_at(bucket + bucket_ms(kind) - kind.bucket_ms()));
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
