//! What a worker does after a failed attempt, and how long it waits before the next one.

use std::time::Duration;

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
/// further failure up to `retryMaxSeconds`, times a jitter in 0.8..1.2 (`unit` in 0..1) so that
/// mails failing together do not come back together; never shorter than `floor`.
pub fn pause(
    settings: &QueueSettings,
    failures: u32,
    floor: Option<Duration>,
    unit: f64,
) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    let base = settings
        .retry_min
        .saturating_mul(1u32 << doublings)
        .min(settings.retry_max);
    let jittered = base.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0));
    jittered.max(floor.unwrap_or_default())
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
}
