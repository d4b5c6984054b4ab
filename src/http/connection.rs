//! What one listener's connections may hold: how many may be open, and how long one may sit
//! without a request in progress.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The open connections of one listener, at most `max`. Cheap to clone; `/metrics` reads it.
#[derive(Debug, Clone)]
pub struct Connections {
    inner: Arc<Slots>,
}

#[derive(Debug)]
struct Slots {
    listener: &'static str,
    max: usize,
    free: Arc<Semaphore>,
    refused: AtomicU64,
}

impl Connections {
    /// `listener` names it in logs and metrics (`main`, `metrics`).
    pub fn new(listener: &'static str, max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            inner: Arc::new(Slots {
                listener,
                max,
                free: Arc::new(Semaphore::new(max)),
                refused: AtomicU64::new(0),
            }),
        }
    }

    pub fn listener(&self) -> &'static str {
        self.inner.listener
    }

    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.max - self.inner.free.available_permits()
    }

    /// Connections closed at once because `max` were open, since start.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// A slot for one more connection, held until the connection ends; `None` (and counted)
    /// when all are taken.
    pub(super) fn try_open(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.inner.free.clone().try_acquire_owned().ok();
        if slot.is_none() {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
        }
        slot
    }

    /// Completes once every connection has ended.
    pub(super) async fn all_closed(&self) {
        let all = u32::try_from(self.inner.max).unwrap_or(u32::MAX);
        let _ = self.inner.free.acquire_many(all).await;
    }
}

/// Whether a connection has a request in progress, and since when it has none.
#[derive(Debug, Default)]
pub(super) struct Activity {
    in_flight: AtomicUsize,
    /// Requests begun so far: a timer that saw none begin may close the connection.
    begun: AtomicU64,
    changed: Notify,
}

impl Activity {
    /// A request's head is complete: the connection is busy until the guard is dropped (when
    /// its response has been written, or given up).
    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
        Busy(Arc::clone(self))
    }

    /// Completes once no request has been in progress for `limit`: since the connection was
    /// accepted, or since its last response.
    pub(super) async fn idle_for(&self, limit: Duration) {
        loop {
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                self.changed.notified().await;
                continue;
            }
            let begun = self.begun.load(Ordering::SeqCst);
            tokio::select! {
                () = tokio::time::sleep(limit) => {
                    if self.in_flight.load(Ordering::SeqCst) == 0
                        && self.begun.load(Ordering::SeqCst) == begun
                    {
                        return;
                    }
                }
                () = self.changed.notified() => {}
            }
        }
    }
}

/// One request in progress on a connection.
#[derive(Debug)]
pub(super) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its connection busy until it has been sent.
pub(super) struct Tracked {
    body: Body,
    busy: Option<Busy>,
}

impl Tracked {
    pub(super) fn new(body: Body, busy: Busy) -> Self {
        Self {
            body,
            busy: Some(busy),
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_refusals_too() {
        let connections = Connections::new("main", 2);
        let first = connections.try_open().unwrap();
        let _second = connections.try_open().unwrap();
        assert_eq!(connections.open(), 2);
        assert!(connections.try_open().is_none());
        assert_eq!(connections.refused(), 1);
        drop(first);
        assert_eq!(connections.open(), 1);
        assert!(connections.try_open().is_some());
    }

    #[tokio::test]
    async fn idle_counts_from_the_last_request_not_from_the_first() {
        let activity = Arc::new(Activity::default());
        let limit = Duration::from_millis(400);
        let busy = activity.begin();
        let idle = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.idle_for(limit).await })
        };
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!idle.is_finished(), "a request in progress is not idle");
        drop(busy);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!idle.is_finished(), "idle for less than the limit");
        tokio::time::timeout(Duration::from_secs(2), idle)
            .await
            .expect("idle after the limit")
            .unwrap();
    }
}
