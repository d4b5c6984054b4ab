//! What follows a queued mail that ended `failed`, `expired` or `unknown`: the completion call
//! (`mailRelay.delivery.webhook`) and the administrators' mail (`mailRelay.adminMail`).
//!
//! Both are driven by columns of the mail's row, set in the statement that ended it, so a
//! replica that dies loses neither and no two replicas report one mail:
//! - a call is claimed for a lease; a 2xx clears it, anything else sets the next back-off
//!   (2 s doubled up to an hour), and a day after the mail ended it is abandoned;
//! - the administrators get one mail per replica at most every hour, naming the mails that
//!   ended since the last one (the first 50 in full), so a broken setup cannot flood them.
//!
//! The call is signed as Standard Webhooks (standardwebhooks.com) specify: `webhook-id`,
//! `webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">`, so the receiver can use their libraries as they are.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::watch;

use super::{MailRecord, QueueStore, retry};
use crate::admin::{AdminNotifier, FAILURE_NOTICE_INTERVAL};
use crate::clock::{Clock, Millis, duration_ms};
use crate::config::WebhookSettings;
use crate::telemetry::metrics::Metrics;

/// How often a replica looks for calls and notices due.
const EVERY: Duration = Duration::from_secs(2);
/// Calls claimed at once, made one after another.
const CALLS_AT_ONCE: u32 = 4;
/// A claimed call's lease: longer than the claimed calls may take, so only a dead replica lets
/// one expire.
const CALL_LEASE: Duration = Duration::from_secs(60);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const _: () = assert!(CALL_LEASE.as_secs() > CALLS_AT_ONCE as u64 * CALL_TIMEOUT.as_secs());
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_secs(2);
const LONGEST_RETRY: Duration = Duration::from_secs(3_600);
/// Calls and notices are made at most this long after the mail ended.
const REPORT_WITHIN: Millis = 86_400_000;
/// Mails one administrators' notice takes, and names in full.
const NOTICE_TAKES: u32 = 1_000;
const NOTICE_NAMES: usize = 50;

/// The completion call's endpoint, key and HTTP client.
pub(super) struct Webhook {
    settings: WebhookSettings,
    http: reqwest::Client,
}

impl Webhook {
    pub(super) fn new(settings: WebhookSettings) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            // The receiver is configured; a redirect would send the mails' details elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(crate::USER_AGENT)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { settings, http })
    }

    /// One call; `Err` says why it did not get a 2xx.
    async fn call(&self, id: &str, body: Vec<u8>, now: Millis) -> Result<(), String> {
        let timestamp = (now / 1_000).to_string();
        let signature = sign(self.settings.key.expose(), id, &timestamp, &body);
        let response = self
            .http
            .post(self.settings.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", &timestamp)
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| crate::causes::line(&e))?;
        // The body is not read: nothing in it matters, and a slow one must not hold the call.
        match response.status() {
            s if s.is_success() => Ok(()),
            s => Err(format!("the receiver answered {s}")),
        }
    }
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` (Standard Webhooks).
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in [id.as_bytes(), b".", timestamp.as_bytes(), b".", body] {
        mac.update(part);
    }
    let tag = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// The reporting of one replica.
pub(super) struct Notifier {
    pub store: Arc<dyn QueueStore>,
    pub webhook: Option<Webhook>,
    pub admin: AdminNotifier,
    /// The mail as `GET /mail/{id}` shows it.
    pub describe: fn(MailRecord) -> serde_json::Value,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
}

impl Notifier {
    fn active(&self) -> bool {
        self.webhook.is_some() || self.admin.is_enabled()
    }

    /// Until `stop`: the calls and notices due, every [`EVERY`].
    pub(super) async fn run(self, mut stop: watch::Receiver<bool>) {
        if !self.active() {
            return;
        }
        let mut last_notice: Option<Millis> = None;
        while !*stop.borrow() {
            let now = self.clock.now_ms();
            if let Some(webhook) = &self.webhook {
                // A call cut off by the shutdown comes back when its lease runs out.
                tokio::select! {
                    () = self.calls(webhook, now) => {}
                    _ = stop.changed() => break,
                }
            }
            let notice_due = last_notice
                .is_none_or(|at| now.saturating_sub(at) >= duration_ms(FAILURE_NOTICE_INTERVAL));
            if self.admin.is_enabled() && notice_due && self.notice(now).await {
                last_notice = Some(now);
            }
            tokio::select! {
                () = tokio::time::sleep(EVERY) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Makes the calls due; each ends delivered, due again later, or abandoned.
    async fn calls(&self, webhook: &Webhook, now: Millis) {
        let since = now.saturating_sub(REPORT_WITHIN);
        let lease = now + duration_ms(CALL_LEASE);
        let claimed = match self
            .store
            .claim_webhooks(now, since, lease, CALLS_AT_ONCE)
            .await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::debug!(error = %e, "completion calls could not be claimed; next time");
                return;
            }
        };
        for (mail, calls) in claimed {
            let ended = mail.finished_at.unwrap_or(now);
            let (id, body) = event(&mail, self.describe);
            let mail_id = mail.id;
            let next = match webhook.call(&id, body, self.clock.now_ms()).await {
                Ok(()) => {
                    self.metrics.queue_webhook("delivered");
                    tracing::info!(mail_id, calls, "completion call delivered");
                    None
                }
                Err(error) => {
                    let pause = retry::doubled(FIRST_RETRY, LONGEST_RETRY, calls, rand::random());
                    let at = self.clock.now_ms() + duration_ms(pause);
                    if at > ended + REPORT_WITHIN {
                        self.metrics.queue_webhook("abandoned");
                        tracing::error!(mail_id, calls, %error, "completion call abandoned: no 2xx within a day of the mail's end");
                        None
                    } else {
                        self.metrics.queue_webhook("retry");
                        tracing::warn!(mail_id, calls, %error, retry_in_seconds = pause.as_secs(), "completion call failed; it will be made again");
                        Some(at)
                    }
                }
            };
            if let Err(e) = self.store.webhook_done(&mail_id, next).await {
                // The lease brings the call back: at worst the receiver gets it twice, with
                // the same webhook-id.
                tracing::debug!(error = %e, "a completion call's outcome could not be stored");
            }
        }
    }

    /// Mails the administrators about the mails that ended since the last notice; `true` when
    /// one went out (or was attempted).
    async fn notice(&self, now: Millis) -> bool {
        let since = now.saturating_sub(REPORT_WITHIN);
        let mails = match self.store.take_admin_batch(now, since, NOTICE_TAKES).await {
            Ok(mails) if mails.is_empty() => return false,
            Ok(mails) => mails,
            Err(e) => {
                tracing::debug!(error = %e, "undelivered mails could not be read; next time");
                return false;
            }
        };
        let lines: Vec<String> = mails.iter().take(NOTICE_NAMES).map(line).collect();
        self.admin.undelivered(&lines, mails.len()).await;
        true
    }
}

/// The webhook-id and body of the call for `mail`: `{"type": "mail.<state>", "timestamp", "data"}`,
/// `data` being the status `GET /mail/{id}` answers plus the caller. The id is the same on every
/// call for this end of this mail, so a receiver can drop a repeat.
fn event(mail: &MailRecord, describe: fn(MailRecord) -> serde_json::Value) -> (String, Vec<u8>) {
    let ended = mail.finished_at.unwrap_or_default();
    let id = format!("{}.{ended}", mail.id);
    let mut data = describe(mail.clone());
    if let Some(object) = data.as_object_mut() {
        object.insert("caller".into(), mail.caller.clone().into());
    }
    let body = serde_json::json!({
        "type": format!("mail.{}", mail.state.as_str()),
        "timestamp": data["finishedAt"].clone(),
        "data": data,
    });
    (id, serde_json::to_vec(&body).unwrap_or_default())
}

/// One mail in the administrators' notice.
fn line(mail: &MailRecord) -> String {
    let problem = mail.problem.as_ref().map_or_else(String::new, |p| {
        format!(
            "\n    {}: {}",
            p["code"].as_str().unwrap_or("?"),
            p["detail"].as_str().unwrap_or_default()
        )
    });
    format!(
        "- {state} {id} {message_id}, from caller {caller} to {to}, after {attempts} attempt(s){problem}",
        state = mail.state.as_str(),
        id = mail.id,
        message_id = mail.message_id,
        caller = mail.caller,
        to = mail.recipients.join(", "),
        attempts = mail.attempts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_standard_webhooks_v1() {
        // The example of Standard Webhooks' reference libraries: secret
        // whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, id msg_p5jXN8AQM9LWM0D4loKWxJek, timestamp
        // 1614265330, body {"test": 2432232314}; the expected value checked with Python's hmac.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                "1614265330",
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
