//! The bytes of mail all requests hold at once (`mailRelay.limits.maxInFlightBytes`).
//!
//! A mail request holds its body, the decoded attachments and the encoded message, about twice
//! its body at the peak: without a shared budget a few large mails at once outgrow the
//! container's memory. Each request charges its body before it is read (all of Content-Length
//! at once, or frame by frame when the length is not declared) and gives the charge back when
//! its [`Charge`] is dropped, on every path: success, error, timeout, a client gone away.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::ApiError;

/// The setting every refusal names.
pub const SETTING: &str = "mailRelay.limits.maxInFlightBytes";
/// How long a request waits for others to give bytes back before it is answered 503: long
/// enough for a large mail ahead of it to finish, short enough not to pile up connections.
const WAIT: Duration = Duration::from_secs(2);

/// The shared budget; cheap to clone.
#[derive(Clone)]
pub struct MailBudget {
    inner: Arc<Inner>,
}

struct Inner {
    limit: usize,
    wait: Duration,
    in_flight: Mutex<usize>,
    /// Mirrors `in_flight` for the gauge, read without the lock.
    gauge: AtomicUsize,
    freed: Notify,
}

/// Why a request could not charge its bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "the relay is busy: {in_flight} bytes of mail are in flight and this request's {wanted} more would exceed {SETTING} ({limit}); try again after Retry-After"
    )]
    Busy {
        wanted: usize,
        in_flight: usize,
        limit: usize,
    },
    #[error(
        "the request body is {size} bytes, more than {SETTING} ({limit}), the bytes of mail this relay holds at once: send smaller or fewer attachments, or raise {SETTING}"
    )]
    TooLarge { size: usize, limit: usize },
}

impl From<BudgetError> for ApiError {
    fn from(e: BudgetError) -> Self {
        match e {
            BudgetError::Busy { .. } => Self::Busy(e.to_string()),
            BudgetError::TooLarge { .. } => Self::OverBudget(e.to_string()),
        }
    }
}

impl MailBudget {
    pub fn new(limit: usize) -> Self {
        Self::with_wait(limit, WAIT)
    }

    fn with_wait(limit: usize, wait: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                limit,
                wait,
                in_flight: Mutex::new(0),
                gauge: AtomicUsize::new(0),
                freed: Notify::new(),
            }),
        }
    }

    /// Bytes charged now, for `/metrics`.
    pub fn in_flight(&self) -> usize {
        self.inner.gauge.load(Ordering::Relaxed)
    }

    /// An empty charge, to grow as a body of unknown length is read.
    pub fn empty(&self) -> Charge {
        Charge(Arc::new(Held {
            budget: Arc::clone(&self.inner),
            bytes: AtomicUsize::new(0),
        }))
    }

    /// Charges `bytes`, waiting up to the budget's wait for others to give bytes back.
    pub async fn charge(&self, bytes: usize) -> Result<Charge, BudgetError> {
        let charge = self.empty();
        charge.grow(bytes).await?;
        Ok(charge)
    }
}

impl Inner {
    /// Adds `bytes` if they fit; else the bytes in flight now.
    fn try_add(&self, bytes: usize) -> Result<(), usize> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let total = in_flight.saturating_add(bytes);
        if total <= self.limit {
            *in_flight = total;
            self.gauge.store(total, Ordering::Relaxed);
            return Ok(());
        }
        Err(*in_flight)
    }

    fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        {
            let mut in_flight = self
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *in_flight = in_flight.saturating_sub(bytes);
            self.gauge.store(*in_flight, Ordering::Relaxed);
        }
        self.freed.notify_waiters();
    }
}

/// Bytes a request holds; given back when the last clone is dropped.
#[derive(Clone)]
pub struct Charge(Arc<Held>);

struct Held {
    budget: Arc<Inner>,
    bytes: AtomicUsize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.release(self.bytes.load(Ordering::Relaxed));
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Charge({} bytes)", self.0.bytes.load(Ordering::Relaxed))
    }
}

impl Charge {
    /// Adds `bytes` to this charge: at once when they fit, else after others gave bytes back
    /// (bounded wait). What this request holds already counts towards "larger than all of it".
    pub async fn grow(&self, bytes: usize) -> Result<(), BudgetError> {
        let budget = &self.0.budget;
        let own = self.0.bytes.load(Ordering::Relaxed);
        let size = own.saturating_add(bytes);
        if size > budget.limit {
            return Err(BudgetError::TooLarge {
                size,
                limit: budget.limit,
            });
        }
        let deadline = Instant::now() + budget.wait;
        loop {
            // Registered before the check, so a release between the two is not missed.
            let freed = budget.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match budget.try_add(bytes) {
                Ok(()) => {
                    self.0.bytes.fetch_add(bytes, Ordering::Relaxed);
                    return Ok(());
                }
                Err(in_flight) => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(BudgetError::Busy {
                            wanted: bytes,
                            in_flight,
                            limit: budget.limit,
                        });
                    }
                }
            }
        }
    }
}

/// What ended a metered body early, for the reader to answer instead of "malformed body".
pub type Refusal = Arc<Mutex<Option<ApiError>>>;

/// Charges a request's body before it is read: all of its Content-Length at once, or, for a
/// body of undeclared length, frame by frame as it is read (a refusal then ends the body with
/// an error and is kept in the [`Refusal`]).
pub async fn admit(
    request: axum::extract::Request,
    budget: &MailBudget,
    max_body_bytes: usize,
) -> Result<(axum::extract::Request, Charge, Refusal), ApiError> {
    let refused = Refusal::default();
    if let Some(declared) = declared_length(request.headers()) {
        return Ok((request, budget.charge(declared).await?, refused));
    }
    let charge = budget.empty();
    let (parts, body) = request.into_parts();
    let body = metered(body, charge.clone(), Arc::clone(&refused), max_body_bytes);
    Ok((
        axum::extract::Request::from_parts(parts, body),
        charge,
        refused,
    ))
}

/// The body's Content-Length, when it has one.
pub fn declared_length(headers: &axum::http::HeaderMap) -> Option<usize> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The error a refusal left, taken (once) in place of the reader's own.
pub fn take(refused: &Refusal) -> Option<ApiError> {
    refused
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

fn metered(body: Body, charge: Charge, refused: Refusal, max_body_bytes: usize) -> Body {
    let stream = body.into_data_stream().then(move |frame| {
        let charge = charge.clone();
        let refused = Arc::clone(&refused);
        async move {
            let keep = |error: ApiError| {
                *refused.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
            };
            let bytes: Bytes = frame.inspect_err(|e| {
                // The body limit's own error loses its type once wrapped again here.
                if is_length_limit(e) {
                    keep(ApiError::PayloadTooLarge {
                        limit: max_body_bytes,
                    });
                }
            })?;
            if let Err(e) = charge.grow(bytes.len()).await {
                let error = axum::Error::new(e.clone());
                keep(e.into());
                return Err(error);
            }
            Ok::<_, axum::Error>(bytes)
        }
    });
    Body::from_stream(stream)
}

/// Whether a body error is `RequestBodyLimitLayer`'s "length limit exceeded" (its type,
/// `http_body_util::LengthLimitError`, is not a dependency of the relay).
pub fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.to_string() == "length limit exceeded" {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_are_given_back_on_drop_and_wake_a_waiter() {
        let budget = MailBudget::with_wait(100, Duration::from_secs(5));
        let first = budget.charge(60).await.unwrap();
        assert_eq!(budget.in_flight(), 60);
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.charge(50).await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(budget.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_full_budget_answers_busy_after_the_wait_and_keeps_nothing() {
        let budget = MailBudget::with_wait(100, Duration::from_millis(50));
        let held = budget.charge(100).await.unwrap();
        let refused = budget.charge(1).await.unwrap_err();
        assert_eq!(
            refused,
            BudgetError::Busy {
                wanted: 1,
                in_flight: 100,
                limit: 100
            }
        );
        assert!(refused.to_string().contains(SETTING), "{refused}");
        drop(held);
        assert_eq!(budget.in_flight(), 0);
    }

    #[tokio::test]
    async fn more_than_the_whole_budget_is_too_large_at_once() {
        let budget = MailBudget::with_wait(100, Duration::from_secs(60));
        let began = std::time::Instant::now();
        assert_eq!(
            budget.charge(101).await.unwrap_err(),
            BudgetError::TooLarge {
                size: 101,
                limit: 100
            }
        );
        assert!(began.elapsed() < Duration::from_secs(1));
        // Growing counts what the charge already holds.
        let charge = budget.charge(60).await.unwrap();
        assert!(matches!(
            charge.grow(41).await,
            Err(BudgetError::TooLarge { size: 101, .. })
        ));
        charge.grow(40).await.unwrap();
        assert_eq!(budget.in_flight(), 100);
        let clone = charge.clone();
        drop(charge);
        assert_eq!(budget.in_flight(), 100, "a clone still holds it");
        drop(clone);
        assert_eq!(budget.in_flight(), 0);
    }
}
