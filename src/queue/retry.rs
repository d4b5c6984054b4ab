//! What a worker does after a failed attempt, and how long it waits before the next one.

use std::time::Duration;

use crate::clock::{Millis, duration_ms};
use crate::config::QueueSettings;
use crate::delivery::{DeliveryError, FailureKind};

/// What a failed attempt means for a queued mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again later, not before `floor` when the other side said how long (`Retry-After`).
    Retry { floor: Option<Duration> },
    /// Refused for good: the mail ends `failed`.
    Fail,
    /// The message went out without a verdict: the mail ends `unknown`, never resent blindly.
    Unknown,
}

/// Decide from what the failure says of itself. Failures an administrator must fix (a refused
/// login, SMTP AUTH off, a token Entra ID refuses) keep the mail queued: the setup is broken,
/// not the mail, and the administrators are told. The quota block retries too: the next claim
/// waits for the mailbox's window without counting an attempt.
pub fn decide(error: &DeliveryError) -> Decision {
    if error.outcome_unknown() {
        return Decision::Unknown;
    }
    let waits = error.is_transient()
        || error.needs_administrator()
        || matches!(
            error.kind(),
            FailureKind::QuotaExceeded | FailureKind::Store | FailureKind::Local
        );
    if waits {
        Decision::Retry {
            floor: error.retry_after(),
        }
    } else {
        Decision::Fail
    }
}

/// The pause after `failures` failed attempts (1 for the first): `retryMinSeconds` doubled per
/// further failure up to `retryMaxSeconds`, with jitter ([`doubled`]); never shorter than `floor`.
pub fn pause(
    settings: &QueueSettings,
    failures: u32,
    floor: Option<Duration>,
    unit: f64,
) -> Duration {
    doubled(settings.retry_min, settings.retry_max, failures, unit).max(floor.unwrap_or_default())
}

/// `first` doubled per failure after the first, up to `most`, times a jitter in 0.8..1.2 (`unit`
/// in 0..1) so that what failed together does not come back together.
pub fn doubled(first: Duration, most: Duration, failures: u32, unit: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    let base = first.saturating_mul(1u32 << doublings).min(most);
    base.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

/// A replica's pause after the server, the network or Entra ID failed (not one mail): its
/// workers claim nothing until it passes, so that an outage costs a few probing attempts instead
/// of one attempt (and a longer back-off) for every mail in the queue. Like Postfix's dead
/// destination, it doubles from a second with each failure in a row, up to `retryMinSeconds`
/// (never shorter than the server's `Retry-After`), and one delivered mail clears it.
#[derive(Debug, Default)]
pub struct Gate {
    until: Millis,
    failures: u32,
}

/// The first pause of the gate.
const GATE_FIRST: Duration = Duration::from_secs(1);

impl Gate {
    /// Until when the workers wait (`0`: open).
    pub fn closed_until(&self) -> Millis {
        self.until
    }

    /// Another upstream failure at `now`.
    pub fn failed(&mut self, settings: &QueueSettings, now: Millis, floor: Option<Duration>) {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(20);
        let pause = GATE_FIRST
            .saturating_mul(1u32 << doublings)
            .min(settings.retry_min.max(GATE_FIRST))
            .max(floor.unwrap_or_default());
        self.until = self.until.max(now + duration_ms(pause));
    }

    /// A mail went through: the upstream works.
    pub fn passed(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> QueueSettings {
        QueueSettings {
            retry_min: Duration::from_secs(30),
            retry_max: Duration::from_secs(1_800),
            ..QueueSettings::default()
        }
    }

    #[test]
    fn pauses_double_up_to_the_cap_with_jitter_around_them() {
        let s = settings();
        assert_eq!(pause(&s, 1, None, 0.5), Duration::from_secs(30));
        assert_eq!(pause(&s, 2, None, 0.5), Duration::from_secs(60));
        assert_eq!(pause(&s, 4, None, 0.5), Duration::from_secs(240));
        assert_eq!(pause(&s, 40, None, 0.5), Duration::from_secs(1_800));
        assert_eq!(pause(&s, 1, None, 0.0), Duration::from_secs(24));
        assert_eq!(pause(&s, 1, None, 1.0), Duration::from_secs(36));
    }

    #[test]
    fn a_retry_after_is_a_floor() {
        let s = settings();
        let floor = Some(Duration::from_secs(120));
        assert_eq!(pause(&s, 1, floor, 0.0), Duration::from_secs(120));
        assert_eq!(pause(&s, 5, floor, 0.5), Duration::from_secs(480));
    }

    #[test]
    fn the_gate_doubles_from_a_second_up_to_the_first_retry_and_a_delivery_opens_it() {
        let s = settings();
        let mut gate = Gate::default();
        assert_eq!(gate.closed_until(), 0);
        let mut pauses = Vec::new();
        for n in 0..8 {
            let now = 1_000_000 * (n + 1);
            gate.failed(&s, now, None);
            pauses.push(gate.closed_until() - now);
        }
        assert_eq!(
            pauses,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
        gate.failed(&s, 10_000_000, Some(Duration::from_secs(120)));
        assert_eq!(gate.closed_until(), 10_120_000, "Retry-After is a floor");
        gate.passed();
        assert_eq!(gate.closed_until(), 0);
        gate.failed(&s, 20_000_000, None);
        assert_eq!(gate.closed_until(), 20_001_000, "a delivery starts it over");
    }
}
