//! Administrative e-mails (`mailRelay.adminMail`): notices to the administrators at start-up,
//! at shutdown, and when sends start failing for a reason only an administrator can fix.
//!
//! Notices go through the relay's own [`MailSender`] (the pool and the token cache), from
//! `smtpUsername` (the one address the SMTP mailbox may always use). They never hold up a
//! request: [`AdminNotifier::send_failure`] spawns a task and returns at once. A notice that
//! cannot be sent is logged, never retried and never reported by another notice. A failure
//! notice goes out at most once an hour, however many sends fail.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::clock::{Clock, SystemClock};
use crate::config::{AdminMailSettings, Settings};
use crate::delivery::{DeliveryError, MailSender};
use crate::message::{EmailAddress, MailRequest, MessageLimits, OutgoingMail};

/// At most one failure notice per this interval.
pub const FAILURE_NOTICE_INTERVAL: Duration = Duration::from_secs(3600);

/// Sends the administrative notices; a no-op when `mailRelay.adminMail` is off. Cheap to clone.
#[derive(Clone, Default)]
pub struct AdminNotifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    settings: AdminMailSettings,
    sender: Arc<dyn MailSender>,
    limits: MessageLimits,
    host: String,
    clock: Arc<dyn Clock>,
    /// When the last failure notice was started.
    /// Per sending identity: one broken mailbox does not silence another's notice.
    last_failure_notice: Mutex<std::collections::HashMap<String, SystemTime>>,
    /// Longest the shutdown notice may hold up the exit.
    shutdown_wait: Duration,
}

/// The kind of notice, for subjects and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notice {
    Startup,
    Shutdown,
    Failure,
    Undelivered,
}

impl Notice {
    fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Shutdown => "shutdown",
            Self::Failure => "failure",
            Self::Undelivered => "undelivered",
        }
    }
}

impl AdminNotifier {
    /// From the settings: off unless `mailRelay.adminMail.enabled`.
    pub fn new(settings: &Settings, sender: Arc<dyn MailSender>) -> Self {
        Self::with_clock(settings, sender, Arc::new(SystemClock))
    }

    /// As [`AdminNotifier::new`], reading the time from `clock` (tests cross the hour without waiting).
    pub fn with_clock(
        settings: &Settings,
        sender: Arc<dyn MailSender>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let Some(admin) = &settings.relay.admin_mail else {
            return Self::default();
        };
        let host = lettre::transport::smtp::extension::ClientId::default().to_string();
        Self {
            inner: Some(Arc::new(Inner {
                settings: admin.clone(),
                sender,
                limits: MessageLimits::from(&settings.relay.limits),
                host,
                clock,
                last_failure_notice: Mutex::default(),
                shutdown_wait: settings.relay.smtp.send_deadline,
            })),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Mails the start-up notice in the background: version, host, address, and the effective
    /// settings with secrets masked (`masked` is [`crate::config::Loaded::masked`]).
    pub fn started(&self, masked: &str, listening: Option<SocketAddr>) {
        let Some(inner) = &self.inner else { return };
        let listening = listening.map_or_else(|| "an unknown address".into(), |a| a.to_string());
        let subject = format!("mail-relay started on {}", inner.host);
        let text = format!(
            "mail-relay {version} started on {host} at {at}, listening on {listening}.\n\n\
             Effective settings (secrets shown as ****):\n\n{masked}",
            version = env!("CARGO_PKG_VERSION"),
            host = inner.host,
            at = httpdate::fmt_http_date(inner.clock.now()),
        );
        let inner = Arc::clone(inner);
        tokio::spawn(async move { inner.send(Notice::Startup, subject, text).await });
    }

    /// Mails the shutdown notice and waits for it, at most `mailRelay.smtp.sendDeadlineSeconds`
    /// (called after the last request, before the SMTP connections are closed).
    pub async fn stopping(&self) {
        let Some(inner) = &self.inner else { return };
        let subject = format!("mail-relay stopping on {}", inner.host);
        let text = format!(
            "mail-relay {version} on {host} is shutting down at {at} (SIGTERM or Ctrl-C); \
             requests in flight have finished.\n",
            version = env!("CARGO_PKG_VERSION"),
            host = inner.host,
            at = httpdate::fmt_http_date(inner.clock.now()),
        );
        let send = inner.send(Notice::Shutdown, subject, text);
        if tokio::time::timeout(inner.shutdown_wait, send)
            .await
            .is_err()
        {
            tracing::error!(
                notice = "shutdown",
                "administrative notice not sent within mailRelay.smtp.sendDeadlineSeconds"
            );
        }
    }

    /// For the mail handler after a failed send: when `error` is one an administrator must
    /// fix ([`DeliveryError::needs_administrator`]) and no failure notice went out in the last hour, mails
    /// one in the background. Returns at once; true when a notice was started.
    pub fn send_failure(&self, error: &DeliveryError, identity: &str) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        if !error.needs_administrator() {
            return false;
        }
        let now = inner.clock.now();
        {
            let mut last = inner
                .last_failure_notice
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let recent = last.get(identity).is_some_and(|&at| {
                now.duration_since(at)
                    .is_ok_and(|since| since < FAILURE_NOTICE_INTERVAL)
                    // A clock set back counts as recent: no burst of notices.
                    || now < at
            });
            if recent {
                tracing::debug!(
                    identity,
                    "failure notice already sent within the hour; not mailing again"
                );
                return false;
            }
            last.insert(identity.to_owned(), now);
        }
        let subject = format!(
            "mail-relay on {}: sending as {identity} fails ({})",
            inner.host,
            error.code()
        );
        let fix = error.remedy();
        let text = format!(
            "mail-relay {version} on {host} could not send a mail as the identity {identity} at {at}, \
             for a reason an administrator must fix:\n\n{error}\n\n{fix}\
             Run `mail-relay diagnose --config <settings file> --identity {identity}` on the host for a \
             step-by-step check.\n\n\
             Further failures of this identity are not mailed until {next}; the log has every one.\n",
            version = env!("CARGO_PKG_VERSION"),
            host = inner.host,
            at = httpdate::fmt_http_date(now),
            fix = fix.map_or_else(String::new, |fix| format!("What to do: {fix}\n\n")),
            next = httpdate::fmt_http_date(now + FAILURE_NOTICE_INTERVAL),
        );
        let inner = Arc::clone(inner);
        tokio::spawn(async move { inner.send(Notice::Failure, subject, text).await });
        true
    }
}

impl AdminNotifier {
    /// Mails the administrators that `total` queued mails ended undelivered (`failed`, `expired`
    /// or `unknown`), naming those of `lines`, and waits for it. The queue calls it at most once an
    /// hour per replica.
    pub async fn undelivered(&self, lines: &[String], total: usize) {
        let Some(inner) = &self.inner else { return };
        let now = inner.clock.now();
        let subject = format!(
            "mail-relay on {}: {total} queued mail(s) not delivered",
            inner.host
        );
        let unnamed = total.saturating_sub(lines.len());
        let more = if unnamed > 0 {
            format!(
                "\n... and {unnamed} more: `mail-relay queue list --state failed` (or expired, unknown) shows them.\n"
            )
        } else {
            String::new()
        };
        let text = format!(
            "mail-relay {version} on {host}, at {at}: these queued mails ended without being \
             delivered since the last notice.\n\n{list}\n{more}\n\
             failed: refused for good; the reason says what to fix. expired: not delivered within \
             mailRelay.delivery.maxAgeSeconds. unknown: the connection was lost after the message \
             went out; look for its Message-ID in the mailbox or the message trace, and resend it \
             with `mail-relay queue retry ID` only when it is not there.\n\n\
             The next notice comes an hour after this one at the earliest.\n",
            version = env!("CARGO_PKG_VERSION"),
            host = inner.host,
            at = httpdate::fmt_http_date(now),
            list = lines.join("\n"),
        );
        inner.send(Notice::Undelivered, subject, text).await;
    }
}

impl Inner {
    async fn send(&self, notice: Notice, subject: String, text: String) {
        let request = serde_json::json!({
            "from": self.settings.from.as_str(),
            "to": self.settings.recipients.iter().map(EmailAddress::as_str).collect::<Vec<_>>(),
            "subject": subject,
            "text": text,
            // RFC 3834: auto-responders must not answer it.
            "headers": {"Auto-Submitted": "auto-generated"},
        });
        let mail = serde_json::from_value::<MailRequest>(request)
            .map_err(|e| e.to_string())
            .and_then(|r| OutgoingMail::from_request(r, &self.limits).map_err(|e| e.to_string()));
        let mail = match mail {
            Ok(mail) => mail,
            Err(error) => {
                tracing::error!(notice = notice.as_str(), %error, "administrative notice could not be built");
                return;
            }
        };
        // Only logged: a notice about a failing notice would fail the same way.
        match self.sender.send(&mail).await {
            Ok(_) => tracing::info!(
                notice = notice.as_str(),
                message_id = %mail.message_id,
                recipients = self.settings.recipients.len(),
                "administrative notice sent"
            ),
            Err(error) => tracing::error!(
                notice = notice.as_str(),
                %error,
                "administrative notice could not be sent"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{EntraError, TokenError};

    #[test]
    fn a_disabled_notifier_does_nothing() {
        let notifier = AdminNotifier::default();
        assert!(!notifier.is_enabled());
        let entra = DeliveryError::Token(TokenError::Rejected(Box::new(EntraError {
            status: 401,
            error: "invalid_client".into(),
            error_codes: vec![7000215],
            description: String::new(),
            trace_id: None,
            correlation_id: None,
            timestamp: None,
        })));
        assert!(!notifier.send_failure(&entra, "default"));
    }
}
