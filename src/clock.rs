//! Wall-clock time in milliseconds, behind a trait so tests move time by hand instead of sleeping.
//!
//! Rate limits and idempotency records use Unix milliseconds rather than [`std::time::Instant`]:
//! a shared store (Redis, a database) later compares timestamps written by several replicas,
//! and an `Instant` means nothing outside the process that took it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// Where the current time comes from; tests swap in a [`ManualClock`].
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now_ms(&self) -> Millis;

    /// The same moment as a `SystemTime` (token expiry, HTTP dates).
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.now_ms())
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        // A clock before 1970 is a broken host; counting from 0 keeps the limits working.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, duration_ms)
    }
}

/// A clock that stands still until a test advances it.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock showing `start_ms`.
    pub fn new(start_ms: Millis) -> Self {
        Self(Arc::new(AtomicU64::new(start_ms)))
    }

    /// A clock showing `start` (to the millisecond).
    pub fn at(start: SystemTime) -> Self {
        Self::new(start.duration_since(UNIX_EPOCH).map_or(0, duration_ms))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(duration_ms(by), Ordering::SeqCst);
    }

    pub fn set(&self, to_ms: Millis) {
        self.0.store(to_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// `d` in whole milliseconds, saturating.
pub fn duration_ms(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let clock = ManualClock::new(1_000);
        let other = clock.clone();
        assert_eq!(clock.now_ms(), 1_000);
        other.advance(Duration::from_millis(2_500));
        assert_eq!(clock.now_ms(), 3_500);
        clock.set(10);
        assert_eq!(other.now_ms(), 10);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}
