//! The limits a mail is held to, how a refusal reads, and the handler's view of them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::{Ask, InMemoryRateLimiter, LimitKey, RateLimiter, Reservation};
use crate::caller::{Caller, caller_id};
use crate::clock::{Clock, Millis, SystemClock, duration_ms};
use crate::config::{RateLimitSettings, Settings};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
/// The daily count is kept per minute: at most 1,440 counters per mailbox instead of one per mail.
const DAY_BUCKET_MS: Millis = 60_000;

/// Which limit: each has its own window and setting key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Messages per rolling minute through the SMTP mailbox.
    MailboxMessages,
    /// Recipients per rolling 24 hours through the SMTP mailbox.
    MailboxRecipients,
    /// Messages per rolling minute for one caller.
    CallerMessages,
    /// Recipients per rolling 24 hours for one caller.
    CallerRecipients,
}

impl LimitKind {
    /// The `scope` label of `mail_relay_rate_limited_total`.
    pub fn metric_scope(self) -> &'static str {
        match self {
            Self::MailboxMessages => "mailbox_minute",
            Self::MailboxRecipients => "mailbox_day",
            Self::CallerMessages => "caller",
            Self::CallerRecipients => "caller_day",
        }
    }

    /// The setting that configures this limit.
    pub fn setting_key(self) -> &'static str {
        match self {
            Self::MailboxMessages => "mailRelay.rateLimits.mailboxMessagesPerMinute",
            Self::MailboxRecipients => "mailRelay.rateLimits.mailboxRecipientsPerDay",
            Self::CallerMessages => "mailRelay.rateLimits.callerMessagesPerMinute",
            Self::CallerRecipients => "mailRelay.rateLimits.callerRecipientsPerDay",
        }
    }

    /// A stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::MailboxMessages => "mailbox_messages_per_minute",
            Self::MailboxRecipients => "mailbox_recipients_per_day",
            Self::CallerMessages => "caller_messages_per_minute",
            Self::CallerRecipients => "caller_recipients_per_day",
        }
    }

    /// How far back the limit counts.
    pub fn window(self) -> Duration {
        match self {
            Self::MailboxMessages | Self::CallerMessages => MINUTE,
            Self::MailboxRecipients | Self::CallerRecipients => DAY,
        }
    }

    /// Width of one counter: per-minute limits count each millisecond exactly, the daily one per minute.
    pub fn bucket_ms(self) -> Millis {
        match self {
            Self::MailboxMessages | Self::CallerMessages => 1,
            Self::MailboxRecipients | Self::CallerRecipients => DAY_BUCKET_MS,
        }
    }

    /// When a cost counted in the bucket starting at `bucket` stops counting. A coarse bucket
    /// counts until its *last* millisecond is a full window old, so no rolling window ever holds
    /// more than the limit; the price is up to one bucket of extra wait.
    pub fn expires_at(self, bucket: Millis) -> Millis {
        bucket
            .saturating_add(duration_ms(self.window()))
            .saturating_add(self.bucket_ms() - 1)
    }

    fn what(self, max: u32) -> String {
        match self {
            Self::MailboxMessages => format!(
                "the relay's SMTP mailbox sends at most {max} messages per minute (Exchange Online allows 30)"
            ),
            Self::MailboxRecipients => format!(
                "the relay's SMTP mailbox sends to at most {max} recipients per rolling 24 hours (Exchange Online allows 10,000)"
            ),
            Self::CallerMessages => {
                format!("each caller may send at most {max} messages per minute")
            }
            Self::CallerRecipients => format!(
                "each caller may send to at most {max} recipients per rolling 24 hours, its share of the mailbox's day"
            ),
        }
    }
}

/// A limit is reached: nothing may be sent now. The message is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RateLimited {
    pub kind: LimitKind,
    /// The configured limit.
    pub max: u32,
    /// What this request would have cost on that limit.
    pub cost: u32,
    /// How long until the request would fit (the `Retry-After` header).
    pub retry_after: Duration,
}

impl RateLimited {
    /// The setting key of the limit that refused.
    pub fn limit(&self) -> &'static str {
        self.kind.setting_key()
    }

    /// The request costs more than the limit allows in a whole window: retrying cannot help.
    pub fn never_fits(&self) -> bool {
        self.cost > self.max
    }

    /// `retry_after` in whole seconds, rounded up and at least 1, for `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        let ms = duration_ms(self.retry_after);
        ms.div_ceil(1000).max(1)
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = self.kind.what(self.max);
        let key = self.limit();
        if self.never_fits() {
            write!(
                f,
                "this mail has {} recipients, more than {what} (setting {key}); split it into smaller mails",
                self.cost
            )
        } else {
            write!(
                f,
                "rate limit reached: {what} (setting {key}); nothing was sent; retry after {} s",
                self.retry_after_secs()
            )
        }
    }
}

/// Why a reservation was not made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LimitError {
    #[error(transparent)]
    Limited(#[from] RateLimited),
    /// A shared store could not be asked; nothing was reserved.
    #[error("the rate-limit store is unavailable: {0}")]
    Unavailable(String),
}

/// The relay's limits, as the `POST /mail` handler uses them. Cheap to clone.
#[derive(Clone)]
pub struct RateLimits {
    limiter: Arc<dyn RateLimiter>,
    clock: Arc<dyn Clock>,
    settings: RateLimitSettings,
    mailbox: Arc<str>,
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimits")
            .field("settings", &self.settings)
            .field("mailbox", &self.mailbox)
            .finish_non_exhaustive()
    }
}

impl RateLimits {
    /// Limits for the SMTP mailbox `mailbox`, counted by `limiter`, timed by `clock`.
    pub fn new(
        settings: RateLimitSettings,
        mailbox: &str,
        limiter: Arc<dyn RateLimiter>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            limiter,
            clock,
            settings,
            mailbox: mailbox.to_ascii_lowercase().into(),
        }
    }

    /// In-memory limits from the settings, on the system clock.
    pub fn in_memory(settings: &Settings) -> Self {
        Self::new(
            settings.relay.rate_limits,
            &mailbox_of(settings),
            Arc::new(InMemoryRateLimiter::new()),
            Arc::new(SystemClock),
        )
    }

    pub fn settings(&self) -> &RateLimitSettings {
        &self.settings
    }

    /// Reserve one message with `recipients` recipients for `caller` on every limit that is on.
    pub async fn reserve(
        &self,
        caller: &Caller,
        recipients: usize,
    ) -> Result<Reservation, LimitError> {
        self.reserve_on(Some(caller), true, recipients).await
    }

    /// Reserve on the caller's own limits only: a queued mail takes its share of the caller's
    /// windows when it is accepted, and the mailbox's when a worker sends it.
    pub async fn reserve_caller(
        &self,
        caller: &Caller,
        recipients: usize,
    ) -> Result<Reservation, LimitError> {
        self.reserve_on(Some(caller), false, recipients).await
    }

    /// Reserve on the mailbox's limits only (a queued mail, as a worker sends it).
    pub async fn reserve_mailbox(&self, recipients: usize) -> Result<Reservation, LimitError> {
        self.reserve_on(None, true, recipients).await
    }

    /// A mail with `recipients` recipients could ever fit the mailbox's day: one that cannot is
    /// refused when it is accepted, not left in the queue.
    pub fn mailbox_fits(&self, recipients: usize) -> Result<(), RateLimited> {
        let cost = u32::try_from(recipients).unwrap_or(u32::MAX);
        match self.settings.mailbox_recipients_per_day {
            Some(max) if cost > max.get() => Err(RateLimited {
                kind: LimitKind::MailboxRecipients,
                max: max.get(),
                cost,
                retry_after: LimitKind::MailboxRecipients.window(),
            }),
            _ => Ok(()),
        }
    }

    async fn reserve_on(
        &self,
        caller: Option<&Caller>,
        mailbox_limits: bool,
        recipients: usize,
    ) -> Result<Reservation, LimitError> {
        let recipients = u32::try_from(recipients).unwrap_or(u32::MAX);
        let mailbox = |kind| LimitKey {
            kind,
            subject: self.mailbox.to_string(),
        };
        let s = &self.settings;
        let mut limits = Vec::with_capacity(4);
        if let Some(caller) = caller {
            let subject = caller_id(caller);
            limits.push((
                s.caller_messages_per_minute,
                1,
                LimitKey {
                    kind: LimitKind::CallerMessages,
                    subject: subject.clone(),
                },
            ));
            limits.push((
                s.caller_recipients_per_day,
                recipients,
                LimitKey {
                    kind: LimitKind::CallerRecipients,
                    subject,
                },
            ));
        }
        if mailbox_limits {
            limits.push((
                s.mailbox_messages_per_minute,
                1,
                mailbox(LimitKind::MailboxMessages),
            ));
            limits.push((
                s.mailbox_recipients_per_day,
                recipients,
                mailbox(LimitKind::MailboxRecipients),
            ));
        }
        let asks: Vec<Ask> = limits
            .into_iter()
            .filter_map(|(max, cost, key)| max.map(|max| Ask { key, cost, max }))
            .collect();
        if asks.is_empty() {
            return Ok(Reservation::default());
        }
        let result = self
            .limiter
            .check_and_reserve(&asks, self.clock.now_ms())
            .await;
        if let Err(LimitError::Limited(limited)) = &result {
            tracing::info!(
                limit = limited.kind.label(),
                max = limited.max,
                retry_after_s = limited.retry_after_secs(),
                "rate limit reached"
            );
        }
        result
    }

    /// Exchange refused a mail for the mailbox's daily recipient quota (`554 5.2.0 ...
    /// SubmissionQuotaExceededException`): refuse further mail here for the next 24 hours
    /// instead of sending each one into the same refusal. Nothing happens when the daily
    /// limit is off.
    pub async fn mailbox_quota_exceeded(&self) {
        if self.settings.mailbox_recipients_per_day.is_none() {
            return;
        }
        tracing::warn!(
            "the SMTP server reports the mailbox's daily recipient quota used up; refusing mail for 24 hours"
        );
        let key = LimitKey {
            kind: LimitKind::MailboxRecipients,
            subject: self.mailbox.to_string(),
        };
        self.limiter.block(&key, self.clock.now_ms()).await;
    }

    /// Give the quota back: the send failed before the server accepted the mail.
    pub async fn refund(&self, reservation: Reservation) {
        if !reservation.items().is_empty() {
            self.limiter.release(reservation).await;
        }
    }
}

/// The mailbox whose limits apply: `smtpUsername`, else the SMTP host (no login), else the outbox,
/// so a dev instance limits the way production does.
pub fn mailbox_of(settings: &Settings) -> String {
    let send_email = &settings.send_email;
    match send_email.smtp_authentication.username() {
        Some(user) => user.to_owned(),
        None if settings.relay.delivery.uses_smtp() => {
            format!("smtp:{}", send_email.smtp_server)
        }
        None => "outbox".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::Arc;

    use super::*;
    use crate::caller::UserSource;
    use crate::clock::ManualClock;

    const T0: Millis = 1_700_000_000_000;

    fn settings(per_minute: u32, per_day: u32, per_caller: u32) -> RateLimitSettings {
        RateLimitSettings {
            mailbox_messages_per_minute: NonZeroU32::new(per_minute),
            mailbox_recipients_per_day: NonZeroU32::new(per_day),
            caller_messages_per_minute: NonZeroU32::new(per_caller),
            caller_recipients_per_day: None,
        }
    }

    fn limits(settings: RateLimitSettings) -> (RateLimits, ManualClock) {
        let clock = ManualClock::new(T0);
        let limits = RateLimits::new(
            settings,
            "Relay@Contoso.com",
            Arc::new(InMemoryRateLimiter::new()),
            Arc::new(clock.clone()),
        );
        (limits, clock)
    }

    fn key(name: &str) -> Caller {
        Caller::ApiKey {
            name: name.into(),
            allowed_from: Arc::from(Vec::new()),
        }
    }

    fn limited(result: Result<Reservation, LimitError>) -> RateLimited {
        match result {
            Err(LimitError::Limited(l)) => l,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_31st_message_in_a_minute_is_refused_until_the_first_leaves_the_window() {
        // The mailbox's default limit, with one caller: its own share is not what this is about.
        let (limits, clock) = limits(RateLimitSettings {
            caller_messages_per_minute: None,
            caller_recipients_per_day: None,
            ..RateLimitSettings::default()
        });
        let caller = key("billing");
        for _ in 0..30 {
            limits.reserve(&caller, 1).await.unwrap().keep();
            clock.advance(Duration::from_millis(1_000));
        }
        // Now T0 + 30 s; the first message (at T0) leaves the window at T0 + 60 s.
        let refusal = limited(limits.reserve(&caller, 1).await);
        assert_eq!(refusal.kind, LimitKind::MailboxMessages);
        assert_eq!(refusal.retry_after, Duration::from_secs(30));
        assert_eq!(refusal.retry_after_secs(), 30);
        let text = refusal.to_string();
        assert!(text.contains("at most 30 messages per minute"), "{text}");
        assert!(
            text.contains("mailRelay.rateLimits.mailboxMessagesPerMinute"),
            "{text}"
        );
        assert!(text.contains("retry after 30 s"), "{text}");

        // One millisecond early is still refused, with the wait counted exactly.
        clock.set(T0 + 59_999);
        assert_eq!(
            limited(limits.reserve(&caller, 1).await).retry_after,
            Duration::from_millis(1)
        );
        assert_eq!(
            limited(limits.reserve(&caller, 1).await).retry_after_secs(),
            1
        );
    }

    #[tokio::test]
    async fn the_window_slides_one_message_at_a_time() {
        let (limits, clock) = limits(settings(30, 0, 0));
        let caller = key("billing");
        for _ in 0..30 {
            limits.reserve(&caller, 1).await.unwrap().keep();
            clock.advance(Duration::from_millis(1_000));
        }
        clock.set(T0 + 60_000);
        limits.reserve(&caller, 1).await.unwrap().keep();
        // The message of T0 + 1 s is next to leave.
        let refusal = limited(limits.reserve(&caller, 1).await);
        assert_eq!(refusal.retry_after, Duration::from_secs(1));
        clock.set(T0 + 61_000);
        limits.reserve(&caller, 1).await.unwrap().keep();
        assert!(limits.reserve(&caller, 1).await.is_err());
        // A whole window later every message has left: 30 fit again.
        clock.set(T0 + 200_000);
        for _ in 0..30 {
            limits.reserve(&caller, 1).await.unwrap().keep();
        }
        assert!(limits.reserve(&caller, 1).await.is_err());
    }

    #[tokio::test]
    async fn ten_thousand_recipients_per_rolling_day() {
        let (limits, clock) = limits(settings(0, 10_000, 0));
        let caller = key("newsletter");
        // 20 mails of 500 recipients, one per hour.
        for _ in 0..20 {
            limits.reserve(&caller, 500).await.unwrap().keep();
            clock.advance(Duration::from_secs(3_600));
        }
        // T0 + 20 h: the day is full, even for one recipient.
        let refusal = limited(limits.reserve(&caller, 1).await);
        assert_eq!(refusal.kind, LimitKind::MailboxRecipients);
        // The first mail's counter is the minute holding T0 (20 s into it); it counts until its
        // last millisecond is 24 h old.
        assert_eq!(T0 % 60_000, 20_000);
        let first_bucket = T0 - 20_000;
        let frees_at = first_bucket + 86_400_000 + 59_999;
        assert_eq!(
            refusal.retry_after,
            Duration::from_millis(frees_at - clock.now_ms())
        );
        assert!(
            refusal
                .to_string()
                .contains("10000 recipients per rolling 24 hours")
        );
        assert!(refusal.to_string().contains("mailboxRecipientsPerDay"));
        // 1,000 recipients need the first two mails gone.
        let refusal = limited(limits.reserve(&caller, 1_000).await);
        let second_bucket = (T0 + 3_600_000) - (T0 + 3_600_000) % 60_000;
        assert_eq!(
            refusal.retry_after,
            Duration::from_millis(second_bucket + 86_400_000 + 59_999 - clock.now_ms())
        );

        clock.set(frees_at - 1);
        assert!(limits.reserve(&caller, 1).await.is_err());
        clock.set(frees_at);
        limits.reserve(&caller, 500).await.unwrap().keep();
        assert!(limits.reserve(&caller, 1).await.is_err());
    }

    #[tokio::test]
    async fn a_mail_larger_than_the_daily_limit_never_fits() {
        let (limits, _clock) = limits(settings(0, 100, 0));
        let refusal = limited(limits.reserve(&key("a"), 101).await);
        assert!(refusal.never_fits());
        assert_eq!(refusal.retry_after, DAY);
        assert!(refusal.to_string().contains("split it"), "{refusal}");
        // And it reserved nothing.
        limits.reserve(&key("a"), 100).await.unwrap().keep();
    }

    #[tokio::test]
    async fn a_refund_gives_the_quota_back() {
        let (limits, clock) = limits(settings(30, 10_000, 0));
        let caller = key("billing");
        let mut kept = Vec::new();
        for _ in 0..29 {
            kept.push(limits.reserve(&caller, 10).await.unwrap());
        }
        let failed = limits.reserve(&caller, 9_000).await.unwrap();
        assert!(limits.reserve(&caller, 1).await.is_err());
        limits.refund(failed).await;
        // Both the message and its 9,000 recipients are free again.
        limits.reserve(&caller, 9_000).await.unwrap().keep();
        assert!(limits.reserve(&caller, 1).await.is_err());

        // Past the minute, a late refund gives back its recipients (the day still counts them)
        // but no message slot (that one already left the window).
        clock.advance(Duration::from_secs(61));
        limits.refund(kept.pop().unwrap()).await;
        for _ in 0..30 {
            limits.reserve(&caller, 1).await.unwrap().keep();
        }
        let refusal = limited(limits.reserve(&caller, 1).await);
        assert_eq!(refusal.kind, LimitKind::MailboxMessages);
        // Recipients today: 280 + 9,000 + 30 = 9,310; 690 are left.
        clock.advance(Duration::from_secs(61));
        limits.reserve(&caller, 690).await.unwrap().keep();
        let refusal = limited(limits.reserve(&caller, 1).await);
        assert_eq!(refusal.kind, LimitKind::MailboxRecipients);
    }

    #[tokio::test]
    async fn the_per_caller_limit_is_per_caller() {
        let (limits, _clock) = limits(settings(30, 0, 2));
        let (a, b) = (key("a"), key("b"));
        let user = Caller::User {
            address: "Alice@Contoso.com".into(),
            via: UserSource::Oidc,
        };
        for _ in 0..2 {
            limits.reserve(&a, 1).await.unwrap().keep();
        }
        let refusal = limited(limits.reserve(&a, 1).await);
        assert_eq!(refusal.kind, LimitKind::CallerMessages);
        assert!(refusal.to_string().contains("callerMessagesPerMinute"));
        for _ in 0..2 {
            limits.reserve(&b, 1).await.unwrap().keep();
            limits.reserve(&user, 1).await.unwrap().keep();
        }
        // The refusal of `a` took nothing from the mailbox: 6 of its 30 are used.
        for i in 0..24 {
            limits
                .reserve(&key(&format!("other-{i}")), 1)
                .await
                .unwrap()
                .keep();
        }
        let refusal = limited(limits.reserve(&key("fresh"), 1).await);
        assert_eq!(refusal.kind, LimitKind::MailboxMessages);
    }

    #[tokio::test]
    async fn by_default_one_caller_gets_a_quarter_of_the_mailboxs_day() {
        let (limits, clock) = limits(RateLimitSettings::default());
        let (newsletter, billing) = (key("newsletter"), key("billing"));
        // 500 recipients a mail, one a minute: the fifth fills its 2,500.
        for _ in 0..5 {
            limits.reserve(&newsletter, 500).await.unwrap().keep();
            clock.advance(Duration::from_secs(60));
        }
        let refusal = limited(limits.reserve(&newsletter, 500).await);
        assert_eq!(refusal.kind, LimitKind::CallerRecipients);
        assert_eq!(refusal.max, 2_500);
        let text = refusal.to_string();
        assert!(
            text.contains("mailRelay.rateLimits.callerRecipientsPerDay"),
            "{text}"
        );
        assert!(refusal.retry_after > Duration::from_secs(80_000));
        // The mailbox has 7,500 left, and another caller still sends.
        limits.reserve(&billing, 500).await.unwrap().keep();
        // And per minute a caller gets a quarter of 30 messages: six more make seven.
        for _ in 0..6 {
            limits.reserve(&billing, 1).await.unwrap().keep();
        }
        let refusal = limited(limits.reserve(&billing, 1).await);
        assert_eq!(refusal.kind, LimitKind::CallerMessages);
        assert_eq!(refusal.max, 7);
    }

    #[tokio::test]
    async fn a_quota_reported_by_exchange_blocks_the_mailbox_for_a_day() {
        let (limits, clock) = limits(settings(30, 10_000, 0));
        let caller = key("a");
        limits.reserve(&caller, 10).await.unwrap().keep();
        clock.advance(Duration::from_secs(120));
        limits.mailbox_quota_exceeded().await;
        let refusal = limited(limits.reserve(&caller, 1).await);
        assert_eq!(refusal.kind, LimitKind::MailboxRecipients);
        // Free once the saturating minute is a day old, though the first mail's minute is older.
        let now = clock.now_ms();
        let frees_at = now - now % 60_000 + 86_400_000 + 59_999;
        assert_eq!(refusal.retry_after, Duration::from_millis(frees_at - now));
        clock.set(frees_at - 1);
        limited(limits.reserve(&caller, 1).await);
        clock.set(frees_at);
        limits.reserve(&caller, 10_000).await.unwrap().keep();

        // With the daily limit off there is nothing to block.
        let (off, _) = self::limits(settings(30, 0, 0));
        off.mailbox_quota_exceeded().await;
        off.reserve(&caller, 500).await.unwrap().keep();
    }

    #[tokio::test]
    async fn refunds_after_exchange_reported_the_quota_do_not_reopen_it() {
        let (limits, clock) = limits(settings(30, 10_000, 0));
        let caller = key("a");
        // Two sends under way; the first is refused for the quota, both give their cost back.
        let refused = limits.reserve(&caller, 5).await.unwrap();
        let in_flight = limits.reserve(&caller, 7).await.unwrap();
        limits.mailbox_quota_exceeded().await;
        limits.refund(refused).await;
        limits.refund(in_flight).await;
        let refusal = limited(limits.reserve(&caller, 1).await);
        assert_eq!(refusal.kind, LimitKind::MailboxRecipients);
        clock.advance(Duration::from_secs(12 * 3600));
        limited(limits.reserve(&caller, 1).await);
    }

    #[tokio::test]
    async fn limits_set_to_zero_are_off() {
        let (limits, _clock) = limits(settings(0, 0, 0));
        for _ in 0..1_000 {
            limits.reserve(&key("a"), 500).await.unwrap().keep();
        }
    }

    #[tokio::test]
    async fn the_longest_wait_is_reported_when_several_limits_refuse() {
        let (limits, clock) = limits(settings(1, 10, 0));
        limits.reserve(&key("a"), 10).await.unwrap().keep();
        clock.advance(Duration::from_secs(1));
        // Both refuse: the minute frees in 59 s, the day in about 24 h; the day is what counts.
        let refusal = limited(limits.reserve(&key("a"), 1).await);
        assert_eq!(refusal.kind, LimitKind::MailboxRecipients);
        assert!(refusal.retry_after > Duration::from_secs(86_000));
        // One limit alone says its own wait.
        clock.advance(Duration::from_secs(86_400 + 60));
        limits.reserve(&key("a"), 1).await.unwrap().keep();
        let refusal = limited(limits.reserve(&key("a"), 1).await);
        assert_eq!(refusal.kind, LimitKind::MailboxMessages);
        assert_eq!(refusal.retry_after, Duration::from_secs(60));
    }

    #[tokio::test]
    async fn a_clock_stepping_back_neither_panics_nor_frees_quota() {
        let (limits, clock) = limits(settings(2, 0, 0));
        limits.reserve(&key("a"), 1).await.unwrap().keep();
        clock.set(T0 - 10_000);
        limits.reserve(&key("a"), 1).await.unwrap().keep();
        assert!(limits.reserve(&key("a"), 1).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_never_exceed_the_limit() {
        let (limits, _clock) = limits(settings(30, 100, 0));
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let limits = limits.clone();
                tokio::spawn(async move {
                    let caller = key(&format!("c{}", i % 7));
                    limits.reserve(&caller, 3).await.map(Reservation::keep)
                })
            })
            .collect();
        let mut granted = 0;
        for task in tasks {
            if task.await.unwrap().is_ok() {
                granted += 1;
            }
        }
        // 100 recipients / 3 per mail = 33, but only 30 messages per minute.
        assert_eq!(granted, 30);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_and_refunds_keep_the_count_exact() {
        let (limits, _clock) = limits(settings(50, 0, 0));
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let limits = limits.clone();
                tokio::spawn(async move {
                    let Ok(reservation) = limits.reserve(&key("a"), 1).await else {
                        return false;
                    };
                    if i % 2 == 0 {
                        limits.refund(reservation).await;
                        false
                    } else {
                        reservation.keep();
                        true
                    }
                })
            })
            .collect();
        let mut kept = 0;
        for task in tasks {
            if task.await.unwrap() {
                kept += 1;
            }
        }
        // Whatever the interleaving, what is left is exactly what was not kept.
        let mut left = 0;
        while limits.reserve(&key("a"), 1).await.is_ok() {
            left += 1;
        }
        assert!(kept > 0);
        assert_eq!(kept + left, 50);
    }

    #[test]
    fn the_mailbox_is_the_smtp_login_else_the_server_else_the_outbox() {
        let load = |yaml: &str| {
            crate::config::load_str(yaml, "t.yml", &[])
                .unwrap()
                .settings
        };
        let oauth = "featureSwitches:\n  sendEmail:\n    smtpServer: smtp.office365.com\n    smtpUsername: Relay@Contoso.com\n    oAuthClientId: c\n    oAuthClientSecret: s\n    oAuthTenantId: t\nmailRelay:\n  auth:\n    allowAnonymous: false\n";
        // The login as parsed: its local part as given, its domain in lower case.
        assert_eq!(mailbox_of(&load(oauth)), "Relay@contoso.com");
        let plain = "featureSwitches:\n  sendEmail:\n    smtpServer: localhost\n    smtpEncryption: NONE\n    smtpAuthentication: NONE\n";
        assert_eq!(mailbox_of(&load(plain)), "smtp:localhost");
        let outbox = "mailRelay:\n  delivery:\n    mode: outbox\n";
        assert_eq!(mailbox_of(&load(outbox)), "outbox");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = |ms| RateLimited {
            kind: LimitKind::CallerMessages,
            max: 1,
            cost: 1,
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(r(0).retry_after_secs(), 1);
        assert_eq!(r(1).retry_after_secs(), 1);
        assert_eq!(r(1_000).retry_after_secs(), 1);
        assert_eq!(r(1_001).retry_after_secs(), 2);
    }
}
