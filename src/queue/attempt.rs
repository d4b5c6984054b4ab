//! One attempt at one claimed mail: open and rebuild it, route it to its identity, reserve the
//! mailbox's quota, send it with the exactness mark, and record how the attempt ended (sent, a
//! retry, failed, expired or unknown).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use lettre::Address;
use lettre::address::Envelope;

use super::retry::{self, Decision};
use super::worker::{Inner, Refusal};
use super::{Attempt, Claimed, Finish};
use crate::clock::{Millis, duration_ms};
use crate::config::{QueueSettings, cipher};
use crate::delivery::{Blame, FailureKind};
use crate::message::OutgoingMail;
use crate::rate_limit::LimitError;

/// One attempt at one claimed mail.
pub(super) async fn deliver(inner: &Inner, worker: &str, mut mail: Claimed) {
    let d = &inner.delivery;
    let now = inner.now();
    if now >= mail.expires_at {
        let attempt = attempt_of(now, "expired", None, expiry_detail(&inner.settings));
        return record(inner, worker, &mail, Finish::Expired, attempt).await;
    }
    if cipher::is_sealed(&mail.mime) {
        match unseal(&inner.settings, &mail) {
            Ok(mime) => mail.mime = mime,
            Err(why) => {
                // The administrator's to fix, and no attempt: the mail waits (until it expires).
                tracing::error!(mail_id = %mail.id, %why, "a queued mail cannot be opened; it waits for the right key");
                let until = now + duration_ms(inner.settings.retry_max);
                if let Err(e) = inner.store.postpone(&mail.id, worker, until).await {
                    tracing::warn!(error = %e, "a sealed mail could not be put back; its lease will run out");
                }
                return;
            }
        }
    }
    let outgoing = match rebuild(&mut mail) {
        Ok(outgoing) => outgoing,
        Err(detail) => {
            let attempt = attempt_of(now, "invalid_request", None, detail);
            let end = Finish::Failed {
                problem: serde_json::json!({"code": "invalid_request", "detail": attempt.detail}),
            };
            return record(inner, worker, &mail, end, attempt).await;
        }
    };
    // The identity that serves the From now: the settings may have changed since it was queued.
    let identity = match d.identities.route(&mail.from) {
        Ok(identity) => identity,
        Err(no_identity) => {
            let attempt = attempt_of(now, "send_as_denied", None, no_identity.to_string());
            let end = Finish::Failed {
                problem: serde_json::json!({"code": "send_as_denied", "detail": attempt.detail}),
            };
            return record(inner, worker, &mail, end, attempt).await;
        }
    };
    let quota = match identity
        .rate_limits
        .reserve_mailbox(mail.recipients.len())
        .await
    {
        Ok(quota) => quota,
        Err(LimitError::Limited(limited)) if limited.never_fits() => {
            let attempt = attempt_of(now, "rate_limited", None, limited.to_string());
            let end = Finish::Failed {
                problem: (d.explain)(Refusal::Limit(limited)),
            };
            return record(inner, worker, &mail, end, attempt).await;
        }
        Err(LimitError::Limited(limited)) => {
            // Waiting for the mailbox's window is no attempt: nothing was tried.
            let until = now + duration_ms(limited.retry_after);
            if let Err(e) = inner.store.postpone(&mail.id, worker, until).await {
                tracing::warn!(error = %e, "a rate-limited mail could not be put back; its lease will run out");
            }
            return;
        }
        Err(LimitError::Unavailable(e)) => {
            let attempt = attempt_of(now, FailureKind::Store.as_str(), None, e);
            let end = retry_end(inner, &mail, None, now);
            return record(inner, worker, &mail, end, attempt).await;
        }
    };
    let marked = AtomicBool::new(false);
    let mark = || {
        async {
            match inner
                .store
                .mark_uploading(&mail.id, worker, inner.now())
                .await
            {
                Ok(true) => {
                    marked.store(true, Ordering::Relaxed);
                    Ok(())
                }
                Ok(false) => Err("the claim on this queued mail ran out".to_owned()),
                Err(e) => Err(e),
            }
        }
        .boxed()
    };
    let limit = d.send_deadline + Duration::from_secs(5);
    let sent = tokio::time::timeout(limit, d.sender.send_marked(&outgoing, Some(&mark))).await;
    let now = inner.now();
    let error = match sent {
        Ok(Ok(receipt)) => {
            quota.keep();
            inner.gate().passed();
            let attempt = attempt_of(
                now,
                "sent",
                Some(receipt.server_reply.clone()),
                String::new(),
            );
            let end = Finish::Sent {
                reply: receipt.server_reply,
                accepted: receipt.accepted,
            };
            return record(inner, worker, &mail, end, attempt).await;
        }
        Ok(Err(error)) => error,
        Err(_) => {
            let detail = format!("the send took longer than {limit:?}");
            let end = if marked.load(Ordering::Relaxed) {
                quota.keep();
                Finish::Unknown
            } else {
                identity.rate_limits.refund(quota).await;
                retry_end(inner, &mail, None, now)
            };
            let attempt = attempt_of(now, "timeout", None, detail);
            return record(inner, worker, &mail, end, attempt).await;
        }
    };
    d.admin.send_failure(&error, &identity.name);
    identity.settle_failed_send(&error, quota).await;
    if error.kind() == FailureKind::SendAsDenied {
        identity.send_as.remember_denied(&mail.from).await;
    }
    let attempt = attempt_of(now, error.code(), error.server_reply(), error.to_string());
    let end = match retry::decide(&error) {
        Decision::Unknown => Finish::Unknown,
        Decision::Fail => Finish::Failed {
            problem: (d.explain)(Refusal::Delivery(error)),
        },
        Decision::Retry { floor } => {
            d.metrics.queue_retry(attempt.kind.clone());
            if error.blame() != Blame::Mail {
                inner.gate().failed(&inner.settings, now, floor);
            }
            retry_end(inner, &mail, floor, now)
        }
    };
    record(inner, worker, &mail, end, attempt).await;
}

/// The next attempt after a temporary failure, or `expired` when it would come too late.
fn retry_end(inner: &Inner, mail: &Claimed, floor: Option<Duration>, now: Millis) -> Finish {
    let pause = retry::pause(&inner.settings, mail.attempts, floor, rand::random());
    let next_at = now + duration_ms(pause);
    if next_at >= mail.expires_at {
        Finish::Expired
    } else {
        Finish::Retry { next_at }
    }
}

/// Write the attempt's end, trying until the store answers or the lease runs out (then the
/// sweep decides: `unknown` if the upload had started, else queued again).
async fn record(inner: &Inner, worker: &str, mail: &Claimed, end: Finish, attempt: Attempt) {
    let outcome = end.state().as_str();
    let history = mail.history_with(attempt);
    let give_up = inner.now() + duration_ms(inner.lease());
    let mut pause = Duration::from_millis(100);
    loop {
        match inner
            .store
            .finish(&mail.id, worker, &end, &history, inner.now())
            .await
        {
            Ok(true) => {
                inner.delivery.metrics.queue_attempt(outcome);
                match &end {
                    Finish::Sent { reply, .. } => {
                        tracing::info!(mail_id = %mail.id, message_id = %mail.message_id, smtp_reply = %reply, "queued mail sent")
                    }
                    Finish::Retry { .. } => {}
                    _ => {
                        tracing::warn!(mail_id = %mail.id, outcome, "queued mail ended undelivered")
                    }
                }
                return;
            }
            Ok(false) => {
                tracing::warn!(mail_id = %mail.id, "a queued mail's claim ran out before its outcome was recorded");
                return;
            }
            Err(e) if inner.now() < give_up => {
                tracing::debug!(error = %e, "recording a queued mail's outcome; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(mail_id = %mail.id, error = %e, "a queued mail's outcome could not be recorded; its lease will run out");
                return;
            }
        }
    }
}

fn attempt_of(at: Millis, kind: &str, reply: Option<String>, detail: String) -> Attempt {
    Attempt {
        at,
        kind: kind.to_owned(),
        reply,
        detail,
    }
}

fn expiry_detail(settings: &QueueSettings) -> String {
    format!(
        "not delivered within {} s (mailRelay.delivery.maxAgeSeconds)",
        settings.max_age.as_secs()
    )
}

/// The message of a mail stored sealed (`mailRelay.delivery.encryptAtRest`).
fn unseal(settings: &QueueSettings, mail: &Claimed) -> Result<Vec<u8>, String> {
    let key = settings.at_rest.as_ref().ok_or(
        "it was stored encrypted: set mailRelay.delivery.encryptAtRest to true, with the {cipher} key that sealed it",
    )?;
    cipher::open(key, &mail.mime, mail.id.as_bytes()).map_err(|e| e.to_string())
}

/// The mail as the sender takes it, from what the store kept (the message moves out of `mail`).
fn rebuild(mail: &mut Claimed) -> Result<OutgoingMail, String> {
    let parse = |a: &str| {
        a.parse::<Address>()
            .map_err(|e| format!("the stored address {a:?} does not parse: {e}"))
    };
    let from = if mail.from.is_empty() {
        None
    } else {
        Some(parse(&mail.from)?)
    };
    let to = mail
        .recipients
        .iter()
        .map(|a| parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envelope = Envelope::new(from, to).map_err(|e| format!("the stored envelope: {e}"))?;
    Ok(OutgoingMail {
        id: mail.id.clone(),
        message_id: mail.message_id.clone(),
        envelope,
        formatted: std::mem::take(&mut mail.mime),
    })
}
