//! `mailRelay.delivery.queue` and its neighbours: when `POST /mail` queues a mail instead of
//! sending it at once, and how the delivery workers retry, give up and forget.

use std::time::Duration;

use super::StoreUrl;
use super::validate::Ctx;

const QUEUE: &str = "mailRelay.delivery.queue";
const RETRY_MIN: &str = "mailRelay.delivery.retryMinSeconds";
const RETRY_MAX: &str = "mailRelay.delivery.retryMaxSeconds";

/// `mailRelay.delivery.queue`: which requests are queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueMode {
    /// Those that ask with `Prefer: respond-async`, when the store is durable (the default).
    Prefer,
    /// Every request: `202` means "committed to the store".
    Always,
    /// None: `Prefer: respond-async` is ignored, every mail is sent while the client waits.
    Never,
}

/// The queued-delivery settings.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub mode: QueueMode,
    /// `workers`: mails one replica sends at once; 0 means `mailRelay.smtp.maxConnections`.
    pub workers: usize,
    /// `maxAgeSeconds`: a mail not delivered by then ends `expired` (Postfix's
    /// `maximal_queue_lifetime`, 5 days).
    pub max_age: Duration,
    /// `retentionSeconds`: finished mails (sent, failed, expired, unknown) and their MIME are
    /// deleted this long after they finished.
    pub retention: Duration,
    /// `retryMinSeconds` and `retryMaxSeconds`: the first pause after a temporary failure, and
    /// the longest; each failure doubles the pause in between, with ±20 % jitter.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// `maxQueuedBytes`: the MIME all queued mails may hold in the store; past it new mails
    /// get `503 busy` (the sum is read every few seconds, so it may run over by a few seconds'
    /// worth of mail).
    pub max_queued_bytes: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            mode: QueueMode::Prefer,
            workers: 0,
            max_age: Duration::from_secs(5 * 86_400),
            retention: Duration::from_secs(7 * 86_400),
            retry_min: Duration::from_secs(30),
            retry_max: Duration::from_secs(1_800),
            max_queued_bytes: 1 << 30,
        }
    }
}

impl QueueSettings {
    /// Whether a mail may be queued at all: only a durable store keeps what `202` promised.
    pub fn available(&self, store: &StoreUrl) -> bool {
        self.mode != QueueMode::Never && *store != StoreUrl::Memory
    }
}

pub(super) fn queue(ctx: &mut Ctx<'_>, store: &StoreUrl) -> QueueSettings {
    let defaults = QueueSettings::default();
    let mode = ctx.one_of(
        QUEUE,
        defaults.mode,
        &[
            ("prefer", QueueMode::Prefer),
            ("always", QueueMode::Always),
            ("never", QueueMode::Never),
        ],
        "prefer, always, never",
    );
    if mode == QueueMode::Always && *store == StoreUrl::Memory {
        ctx.error(
            QUEUE,
            "always needs a durable store: set mailRelay.store.url to sqlite:/path/file.db or postgres://… (with the memory store a queued mail would die with the process)",
        );
    }
    let seconds = |ctx: &mut Ctx<'_>, key: &str, default: Duration, max: u64| {
        Duration::from_secs(ctx.number(key, default.as_secs(), 1..=max))
    };
    let settings = QueueSettings {
        mode,
        workers: ctx.number("mailRelay.delivery.workers", defaults.workers, 0..=100),
        max_age: seconds(
            ctx,
            "mailRelay.delivery.maxAgeSeconds",
            defaults.max_age,
            30 * 86_400,
        ),
        retention: seconds(
            ctx,
            "mailRelay.delivery.retentionSeconds",
            defaults.retention,
            365 * 86_400,
        ),
        retry_min: seconds(ctx, RETRY_MIN, defaults.retry_min, 86_400),
        retry_max: seconds(ctx, RETRY_MAX, defaults.retry_max, 86_400),
        max_queued_bytes: ctx.number(
            "mailRelay.delivery.maxQueuedBytes",
            defaults.max_queued_bytes,
            1_048_576..=1 << 40,
        ),
    };
    if settings.retry_min > settings.retry_max {
        ctx.error(
            RETRY_MIN,
            format!(
                "is {} s, more than {RETRY_MAX} ({} s); the first pause cannot be longer than the longest",
                settings.retry_min.as_secs(),
                settings.retry_max.as_secs()
            ),
        );
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_durable_store_queues() {
        let settings = QueueSettings::default();
        assert!(!settings.available(&StoreUrl::Memory));
        assert!(settings.available(&StoreUrl::Sqlite("/data/relay.db".into())));
        let never = QueueSettings {
            mode: QueueMode::Never,
            ..settings
        };
        assert!(!never.available(&StoreUrl::Sqlite("/data/relay.db".into())));
    }
}
