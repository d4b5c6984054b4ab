//! Watching hand-overs to the sender: latency, the SMTP reply code for the request's log line,
//! and the recent history that tells readiness whether the SMTP side is failing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::metrics::Metrics;
use super::request_log;
use crate::delivery::{Blame, DeliveryError, MailSender, Receipt};
use crate::message::OutgoingMail;
use crate::smtp::SmtpState;

/// The SMTP side counts as failing when this many sends in a row failed on the relay's side...
pub const FAILING_AFTER: usize = 3;
/// ...and the last of them is at most this old: with no traffic to prove it fixed, an instance
/// turns ready again after this, so that it gets the requests that can show it.
pub const FAILING_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct History {
    /// The last sends: `None` for one that reached the server (even if it refused that mail),
    /// or the relay-side error that made it fail.
    recent: VecDeque<(Instant, Option<String>)>,
    last_error: Option<(SystemTime, String)>,
}

/// The recent sends, as readiness needs them.
#[derive(Debug, Default)]
pub struct SendHistory {
    inner: Mutex<History>,
}

impl SendHistory {
    fn lock(&self) -> MutexGuard<'_, History> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, at: Instant, error: Option<String>) {
        let mut history = self.lock();
        if let Some(error) = &error {
            history.last_error = Some((SystemTime::now(), error.clone()));
        }
        if history.recent.len() == FAILING_AFTER {
            history.recent.pop_front();
        }
        history.recent.push_back((at, error));
    }

    /// A send that reached the SMTP server, whatever it answered about this mail.
    pub fn record_ok(&self) {
        self.record(Instant::now(), None);
    }

    /// A send that failed on the relay's side (connection, TLS, login, the mailbox's state).
    pub fn record_failure(&self, error: String) {
        self.record(Instant::now(), Some(error));
    }

    /// The relay-side error when the last [`FAILING_AFTER`] sends all failed, the newest
    /// less than [`FAILING_FOR`] before `now`.
    pub fn failing_at(&self, now: Instant) -> Option<String> {
        let history = self.lock();
        if history.recent.len() < FAILING_AFTER || history.recent.iter().any(|(_, e)| e.is_none()) {
            return None;
        }
        let (at, error) = history.recent.back()?;
        if now.saturating_duration_since(*at) < FAILING_FOR {
            error.clone()
        } else {
            None
        }
    }

    pub fn failing(&self) -> Option<String> {
        self.failing_at(Instant::now())
    }

    /// The last relay-side error and when it happened, however old.
    pub fn last_error(&self) -> Option<(SystemTime, String)> {
        self.lock().last_error.clone()
    }
}

/// The SMTP reply code at the start of a server reply (`250 2.0.0 OK ...`).
fn reply_code(reply: &str) -> Option<u16> {
    let code = reply.get(..3)?;
    code.parse().ok().filter(|c| {
        (200..600).contains(c) && reply.as_bytes().get(3).is_none_or(|b| !b.is_ascii_digit())
    })
}

/// A [`MailSender`] that watches the one it wraps.
pub struct ObservedSender {
    inner: Arc<dyn MailSender>,
    metrics: Arc<Metrics>,
    history: Arc<SendHistory>,
}

impl ObservedSender {
    pub fn new(
        inner: Arc<dyn MailSender>,
        metrics: Arc<Metrics>,
        history: Arc<SendHistory>,
    ) -> Self {
        Self {
            inner,
            metrics,
            history,
        }
    }
}

#[async_trait]
impl MailSender for ObservedSender {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError> {
        let start = Instant::now();
        let result = self.inner.send(mail).await;
        self.metrics.smtp_send(start.elapsed(), result.is_ok());
        match &result {
            Ok(receipt) => {
                self.history.record_ok();
                request_log::note_handed_over(reply_code(&receipt.server_reply));
            }
            Err(error) => {
                request_log::note_handed_over(error.reply_code());
                request_log::note_cause(error);
                match error.blame() {
                    Blame::Relay => self.history.record_failure(error.to_string()),
                    Blame::Mail => self.history.record_ok(),
                    Blame::Token => {}
                }
            }
        }
        result
    }

    async fn close(&self) {
        self.inner.close().await;
    }

    fn smtp_state(&self) -> Option<SmtpState> {
        self.inner.smtp_state()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_needs_every_recent_send_failed_and_the_last_one_recent() {
        let history = SendHistory::default();
        let now = Instant::now();
        for _ in 0..FAILING_AFTER - 1 {
            history.record(now, Some("connection refused".into()));
        }
        assert_eq!(history.failing_at(now), None, "too few failures yet");
        history.record(now, Some("connection refused".into()));
        assert_eq!(
            history.failing_at(now).as_deref(),
            Some("connection refused")
        );
        assert_eq!(
            history.failing_at(now + FAILING_FOR),
            None,
            "old failures expire"
        );
        history.record(now, None);
        assert_eq!(history.failing_at(now), None, "one good send clears it");
        assert_eq!(
            history.last_error().map(|(_, e)| e).as_deref(),
            Some("connection refused"),
            "the last error stays visible"
        );
    }

    #[test]
    fn reply_codes_come_from_the_start_of_the_reply() {
        assert_eq!(reply_code("250 2.0.0 OK <id>"), Some(250));
        assert_eq!(reply_code("250"), Some(250));
        assert_eq!(reply_code("/var/outbox/x.eml"), None);
        assert_eq!(reply_code("2500 x"), None);
    }
}
