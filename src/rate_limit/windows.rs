//! The counting: rolling windows per limit and subject, reserved all at once or not at all.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use super::{LimitError, LimitKind, RateLimited};
use crate::clock::Millis;

/// Idle windows are dropped every this many reservations, so departed callers cost no memory.
const SWEEP_EVERY: u64 = 4_096;

/// One counter: a limit for one mailbox or one caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LimitKey {
    pub kind: LimitKind,
    /// The mailbox address (lower case) or the caller's id ([`caller_id`](crate::caller::caller_id)).
    pub subject: String,
}

/// What a request asks of one limit.
#[derive(Debug, Clone)]
pub struct Ask {
    pub key: LimitKey,
    pub cost: u32,
    pub max: NonZeroU32,
}

/// One reserved cost, as recorded by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub key: LimitKey,
    /// Start of the counter (bucket) the cost went into.
    pub bucket: Millis,
    pub cost: u32,
}

/// Quota taken by one request. Keep it when the mail was sent; give it back with
/// [`RateLimits::refund`](super::RateLimits::refund) when the send failed before the server accepted the mail.
#[derive(Debug, Default)]
#[must_use = "a reservation is kept (mail sent) or refunded (send failed); say which"]
pub struct Reservation {
    items: Vec<Reserved>,
}

impl Reservation {
    /// A reservation of `items`, for store implementations.
    pub fn new(items: Vec<Reserved>) -> Self {
        Self { items }
    }

    pub fn items(&self) -> &[Reserved] {
        &self.items
    }

    /// Keep the quota: the mail went out.
    pub fn keep(self) {}
}

/// Counts costs per [`LimitKey`] over a rolling window.
#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Reserve every ask, or none: when any limit would be exceeded, nothing is counted and the
    /// refusal with the longest wait is returned.
    async fn check_and_reserve(&self, asks: &[Ask], now: Millis)
    -> Result<Reservation, LimitError>;

    /// Give a reservation back; costs whose window has passed are already gone.
    async fn release(&self, reservation: Reservation);

    /// Refuse every cost on `key` for a whole window from `now`, whatever is counted or given
    /// back meanwhile: the server said the quota is used up (other clients of the mailbox, a
    /// restart), and only time frees it.
    async fn block(&self, key: &LimitKey, now: Millis);
}

/// Costs within one window, oldest first, summed per bucket, and a block set by the server.
#[derive(Debug, Default)]
struct Window {
    buckets: VecDeque<(Millis, u32)>,
    total: u64,
    /// Nothing fits before this time. Kept apart from the counts, so that refunds of sends
    /// that were under way when the server refused cannot reopen the quota.
    blocked_until: Option<Millis>,
}

impl Window {
    fn expire(&mut self, kind: LimitKind, now: Millis) {
        if self.blocked_until.is_some_and(|until| until <= now) {
            self.blocked_until = None;
        }
        while let Some(&(bucket, cost)) = self.buckets.front() {
            if kind.expires_at(bucket) > now {
                break;
            }
            self.total -= u64::from(cost);
            self.buckets.pop_front();
        }
    }

    /// `Ok` when `cost` fits under `max`; otherwise how long until enough old costs expire.
    fn admit(&self, kind: LimitKind, cost: u32, max: u32, now: Millis) -> Result<(), Duration> {
        if let Some(until) = self.blocked_until {
            return Err(Duration::from_millis(until.saturating_sub(now)));
        }
        let over = (self.total + u64::from(cost)).saturating_sub(u64::from(max));
        if over == 0 {
            return Ok(());
        }
        let mut freed = 0u64;
        for &(bucket, bucket_cost) in &self.buckets {
            freed += u64::from(bucket_cost);
            if freed >= over {
                return Err(Duration::from_millis(
                    kind.expires_at(bucket).saturating_sub(now),
                ));
            }
        }
        // Only when cost > max: it never fits; a full window is the honest wait.
        Err(kind.window())
    }

    fn add(&mut self, bucket: Millis, cost: u32) {
        match self.buckets.back_mut() {
            Some((last, last_cost)) if *last == bucket => *last_cost += cost,
            _ => self.buckets.push_back((bucket, cost)),
        }
        self.total += u64::from(cost);
    }

    fn remove(&mut self, bucket: Millis, cost: u32) {
        let Ok(i) = self.buckets.binary_search_by_key(&bucket, |(b, _)| *b) else {
            return; // expired meanwhile
        };
        let entry = &mut self.buckets[i].1;
        let taken = cost.min(*entry);
        *entry -= taken;
        self.total -= u64::from(taken);
        if *entry == 0 {
            self.buckets.remove(i);
        }
    }

    fn last_bucket(&self) -> Option<Millis> {
        self.buckets.back().map(|(b, _)| *b)
    }

    fn is_idle(&self) -> bool {
        self.buckets.is_empty() && self.blocked_until.is_none()
    }
}

/// The wait before `cost` fits under `max` in a window of `buckets` (start, cost; oldest first)
/// and an optional block, as [`InMemoryRateLimiter`] decides it: for a store that keeps the
/// buckets elsewhere. `Ok` when it fits now.
pub fn wait_until_fits(
    kind: LimitKind,
    buckets: impl IntoIterator<Item = (Millis, u32)>,
    blocked_until: Option<Millis>,
    cost: u32,
    max: u32,
    now: Millis,
) -> Result<(), Duration> {
    let mut window = Window {
        blocked_until,
        ..Window::default()
    };
    for (bucket, bucket_cost) in buckets {
        window.add(bucket, bucket_cost);
    }
    window.expire(kind, now);
    window.admit(kind, cost, max, now)
}

#[derive(Debug, Default)]
struct State {
    windows: HashMap<LimitKey, Window>,
    reservations: u64,
}

/// Counts in this process: exact sliding windows for the per-minute limits, one counter per
/// minute for the daily recipient count. Right for a single replica.
#[derive(Debug, Default)]
pub struct InMemoryRateLimiter {
    // A plain mutex: it is never held across `.await`, and each reservation is a few
    // additions, so contention costs less than a sharded map would.
    state: Mutex<State>,
}

impl InMemoryRateLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    fn reserve(&self, asks: &[Ask], now: Millis) -> Result<Reservation, RateLimited> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.reservations += 1;
        if state.reservations.is_multiple_of(SWEEP_EVERY) {
            state.windows.retain(|key, window| {
                window.expire(key.kind, now);
                !window.is_idle()
            });
        }
        let mut refusal: Option<RateLimited> = None;
        let mut planned = Vec::with_capacity(asks.len());
        for ask in asks.iter().filter(|a| a.cost > 0) {
            let kind = ask.key.kind;
            let window = state.windows.entry(ask.key.clone()).or_default();
            window.expire(kind, now);
            let max = ask.max.get();
            if let Err(retry_after) = window.admit(kind, ask.cost, max, now) {
                let limited = RateLimited {
                    kind,
                    max,
                    cost: ask.cost,
                    retry_after,
                };
                if refusal.as_ref().is_none_or(|r| {
                    (limited.never_fits(), limited.retry_after) > (r.never_fits(), r.retry_after)
                }) {
                    refusal = Some(limited);
                }
                continue;
            }
            // A wall clock that stepped back must not put a bucket behind newer ones.
            let bucket = now - now % kind.bucket_ms();
            let bucket = window.last_bucket().map_or(bucket, |last| bucket.max(last));
            planned.push(Reserved {
                key: ask.key.clone(),
                bucket,
                cost: ask.cost,
            });
        }
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        for item in &planned {
            if let Some(window) = state.windows.get_mut(&item.key) {
                window.add(item.bucket, item.cost);
            }
        }
        Ok(Reservation::new(planned))
    }

    fn unreserve(&self, reservation: Reservation) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for item in reservation.items {
            if let Some(window) = state.windows.get_mut(&item.key) {
                window.remove(item.bucket, item.cost);
            }
        }
    }
}

#[async_trait]
impl RateLimiter for InMemoryRateLimiter {
    async fn check_and_reserve(
        &self,
        asks: &[Ask],
        now: Millis,
    ) -> Result<Reservation, LimitError> {
        Ok(self.reserve(asks, now)?)
    }

    async fn release(&self, reservation: Reservation) {
        self.unreserve(reservation);
    }

    async fn block(&self, key: &LimitKey, now: Millis) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let kind = key.kind;
        let window = state.windows.entry(key.clone()).or_default();
        // Until the end of a whole bucket from now, the same moment a cost counted now would free.
        let bucket = now - now % kind.bucket_ms();
        let bucket = window.last_bucket().map_or(bucket, |last| bucket.max(last));
        // What was counted before the block frees no earlier than the block ends: drop it.
        *window = Window {
            blocked_until: Some(kind.expires_at(bucket)),
            ..Window::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::duration_ms;

    const T0: Millis = 1_700_000_000_000;

    fn ask(kind: LimitKind, cost: u32, max: u32) -> Vec<Ask> {
        vec![Ask {
            key: LimitKey {
                kind,
                subject: "m".into(),
            },
            cost,
            max: NonZeroU32::new(max).unwrap(),
        }]
    }

    proptest::proptest! {
        /// Whatever the timing, costs and refunds: no rolling window (measured at the exact send
        /// times) ever holds more than the limit, and a refusal's wait is enough.
        #[test]
        fn no_rolling_window_exceeds_the_limit(
            daily in proptest::bool::ANY,
            steps in proptest::collection::vec((0u64..600_000, 1u32..40, proptest::bool::weighted(0.2)), 1..300),
        ) {
            let (kind, max) = if daily {
                (LimitKind::MailboxRecipients, 300)
            } else {
                (LimitKind::MailboxMessages, 30)
            };
            let window = duration_ms(kind.window());
            // Speed the daily case up so sequences cross several windows.
            let scale = if daily { 144 } else { 1 };
            let limiter = InMemoryRateLimiter::new();
            let mut now = T0;
            let mut kept: Vec<(Millis, u32)> = Vec::new();
            let in_window = |kept: &[(Millis, u32)], at: Millis| -> u64 {
                kept.iter()
                    .filter(|(t, _)| *t + window > at)
                    .map(|(_, c)| u64::from(*c))
                    .sum()
            };
            for (dt, cost, refund) in steps {
                now += dt / 10 * scale;
                match limiter.reserve(&ask(kind, cost, max), now) {
                    Ok(reservation) => {
                        if refund {
                            limiter.unreserve(reservation);
                        } else {
                            kept.push((now, cost));
                            proptest::prop_assert!(in_window(&kept, now) <= u64::from(max));
                        }
                    }
                    Err(limited) => {
                        if limited.never_fits() {
                            proptest::prop_assert!(cost > max);
                            continue;
                        }
                        let wait = duration_ms(limited.retry_after);
                        proptest::prop_assert!(wait > 0);
                        proptest::prop_assert!(
                            in_window(&kept, now + wait) + u64::from(cost) <= u64::from(max),
                            "waiting {wait} ms is not enough"
                        );
                    }
                }
            }
        }
    }
}
