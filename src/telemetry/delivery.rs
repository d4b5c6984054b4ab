//! Watching hand-overs to the sender: latency, the SMTP reply code for the request's log line,
//! and the recent history that tells readiness whether the SMTP side is failing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::metrics::Metrics;
use super::request_log;
use crate::delivery::{BeforeUpload, Blame, DeliveryError, MailSender, Receipt};
use crate::message::OutgoingMail;
use crate::smtp::SmtpState;

/// The SMTP side counts as failing when this many sends in a row failed on the relay's side...
pub const FAILING_AFTER: usize = 3;
/// ...and the last of them is at most this old: with no traffic to prove it fixed, an instance
/// turns ready again after this, so that it gets the requests that can show it.
pub const FAILING_FOR: Duration = Duration::from_secs(60);

/// A relay-side failure as anyone may see it (the unauthenticated readiness probe): kinds and
/// codes, never the server's text, which can repeat `MAIL FROM:<…>` and `RCPT TO:<…>`. The
/// whole error is in the failed request's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureSummary {
    /// The failure's kind: an SMTP kind (`smtp_unavailable`, `smtp_auth_failed`, …) or
    /// `outbox_unwritable`.
    pub kind: &'static str,
    /// Where in the SMTP dialogue (`connect`, `auth`, `mail_from`, …), when known.
    pub stage: Option<&'static str>,
    /// The server's reply code (`421`), when it answered.
    pub reply_code: Option<u16>,
    /// Its enhanced status code (`4.3.2`), when it gave one.
    pub enhanced_code: Option<String>,
}

impl FailureSummary {
    pub fn of(error: &DeliveryError) -> Self {
        Self {
            kind: error.code(),
            stage: error.stage(),
            reply_code: error.reply_code(),
            enhanced_code: error.enhanced_code(),
        }
    }
}

/// `smtp_unavailable (421 4.3.2 at mail_from)`.
impl std::fmt::Display for FailureSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind)?;
        let mut details = Vec::new();
        if let Some(code) = self.reply_code {
            details.push(code.to_string());
        }
        if let Some(code) = &self.enhanced_code {
            details.push(code.clone());
        }
        if let Some(stage) = self.stage {
            details.push(format!("at {stage}"));
        }
        if !details.is_empty() {
            write!(f, " ({})", details.join(" "))?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct History {
    /// The last sends: `None` for one that reached the server (even if it refused that mail),
    /// or the relay-side failure that made it fail.
    recent: VecDeque<(Instant, Option<FailureSummary>)>,
    last_error: Option<(SystemTime, FailureSummary)>,
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

    fn record(&self, at: Instant, error: Option<FailureSummary>) {
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
    pub fn record_failure(&self, error: FailureSummary) {
        self.record(Instant::now(), Some(error));
    }

    /// The relay-side failure when the last [`FAILING_AFTER`] sends all failed, the newest
    /// less than [`FAILING_FOR`] before `now`.
    pub fn failing_at(&self, now: Instant) -> Option<FailureSummary> {
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

    pub fn failing(&self) -> Option<FailureSummary> {
        self.failing_at(Instant::now())
    }

    /// The last relay-side failure and when it happened, however old.
    pub fn last_error(&self) -> Option<(SystemTime, FailureSummary)> {
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
    /// The sending identity it serves, as metrics and logs name it.
    identity: Arc<str>,
}

impl ObservedSender {
    pub fn new(
        inner: Arc<dyn MailSender>,
        metrics: Arc<Metrics>,
        history: Arc<SendHistory>,
        identity: Arc<str>,
    ) -> Self {
        Self {
            inner,
            metrics,
            history,
            identity,
        }
    }
}

#[async_trait]
impl MailSender for ObservedSender {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError> {
        self.send_marked(mail, None).await
    }

    async fn send_marked(
        &self,
        mail: &OutgoingMail,
        before_upload: Option<BeforeUpload<'_>>,
    ) -> Result<Receipt, DeliveryError> {
        let start = Instant::now();
        let result = self.inner.send_marked(mail, before_upload).await;
        self.metrics
            .smtp_send(&self.identity, start.elapsed(), result.is_ok());
        match &result {
            Ok(receipt) => {
                self.history.record_ok();
                request_log::note_handed_over(reply_code(&receipt.server_reply));
            }
            Err(error) => {
                request_log::note_handed_over(error.reply_code());
                request_log::note_cause(error);
                match error.blame() {
                    Blame::Relay => {
                        let was_failing = self.history.failing().is_some();
                        let summary = FailureSummary::of(error);
                        self.history.record_failure(summary.clone());
                        if !was_failing && self.history.failing().is_some() {
                            // The probe shows only the kind; the text is for the operator.
                            tracing::warn!(
                                identity = %self.identity,
                                kind = summary.kind,
                                error = %error,
                                "the last {FAILING_AFTER} sends failed on the relay's side: /health/ready answers 503"
                            );
                        }
                    }
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

    fn in_use(&self) -> crate::delivery::InUse {
        self.inner.in_use()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_needs_every_recent_send_failed_and_the_last_one_recent() {
        let history = SendHistory::default();
        let now = Instant::now();
        let refused = FailureSummary {
            kind: "smtp_unavailable",
            stage: Some("connect"),
            reply_code: None,
            enhanced_code: None,
        };
        for _ in 0..FAILING_AFTER - 1 {
            history.record(now, Some(refused.clone()));
        }
        assert_eq!(history.failing_at(now), None, "too few failures yet");
        history.record(now, Some(refused.clone()));
        assert_eq!(history.failing_at(now), Some(refused.clone()));
        assert_eq!(
            history.failing_at(now + FAILING_FOR),
            None,
            "old failures expire"
        );
        history.record(now, None);
        assert_eq!(history.failing_at(now), None, "one good send clears it");
        assert_eq!(
            history.last_error().map(|(_, e)| e),
            Some(refused),
            "the last error stays visible"
        );
    }

    #[test]
    fn a_summary_names_kind_codes_and_stage_but_no_address() {
        use crate::smtp::{SmtpError, Stage};
        let error = DeliveryError::Smtp(SmtpError::rejected(
            Stage::MailFrom("alice@contoso.com".into()),
            530,
            "5.7.57 Client not authenticated to send mail from <alice@contoso.com>",
        ));
        let summary = FailureSummary::of(&error);
        assert_eq!(summary.stage, Some("mail_from"));
        assert_eq!(summary.reply_code, Some(530));
        assert_eq!(summary.enhanced_code.as_deref(), Some("5.7.57"));
        let shown = summary.to_string();
        assert_eq!(shown, format!("{} (530 5.7.57 at mail_from)", summary.kind));
        assert!(error.to_string().contains("alice@contoso.com"));
    }

    #[test]
    fn reply_codes_come_from_the_start_of_the_reply() {
        assert_eq!(reply_code("250 2.0.0 OK <id>"), Some(250));
        assert_eq!(reply_code("250"), Some(250));
        assert_eq!(reply_code("/var/outbox/x.eml"), None);
        assert_eq!(reply_code("2500 x"), None);
    }
}
