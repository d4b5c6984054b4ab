//! One replica's side of the queue: committing mails, the delivery workers that claim and send
//! them, and the housekeeping that sweeps dead claims, expires old mails and forgets finished
//! ones.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt as _;
use lettre::Address;
use lettre::address::Envelope;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::notify::{Notifier, Webhook};
use super::retry::{self, Decision};
use super::{Attempt, Claimed, Depth, Enqueued, Finish, MailRecord, NewMail, QueueStore};
use crate::admin::AdminNotifier;
use crate::clock::{Clock, Millis, duration_ms};
use crate::config::{QueueSettings, cipher};
use crate::delivery::{Blame, DeliveryError, FailureKind, MailSender};
use crate::idempotency::Fingerprint;
use crate::identity::Identities;
use crate::message::OutgoingMail;
use crate::rate_limit::{LimitError, RateLimited};
use crate::telemetry::metrics::Metrics;

/// How long an idle worker waits before it asks the store again (mails accepted by this replica
/// wake it at once; other replicas' within this).
const POLL: Duration = Duration::from_millis(500);
/// How often the housekeeping sweeps dead claims and reads the queue's depth.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How often finished mails past their retention are deleted.
const FORGET_EVERY_MS: Millis = 60_000;
/// What a claim's lease allows beyond the send's own deadline, to record the outcome.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// What the workers need of the rest of the relay; `app.rs` wires it.
pub struct QueueDelivery {
    /// Routes each mail to its identity's sender.
    pub sender: Arc<dyn MailSender>,
    /// Each mail's mailbox limits and Send As memory are its identity's.
    pub identities: Arc<Identities>,
    pub admin: AdminNotifier,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    /// The problem object that the synchronous answer to a refusal would have carried.
    pub explain: fn(Refusal) -> serde_json::Value,
    /// A mail as `GET /mail/{id}` shows it: the completion call's data.
    pub describe: fn(MailRecord) -> serde_json::Value,
    /// `mailRelay.smtp.sendDeadlineSeconds`: no send takes longer.
    pub send_deadline: Duration,
}

/// Why a queued mail ended `failed`.
#[derive(Debug)]
pub enum Refusal {
    Delivery(DeliveryError),
    Limit(RateLimited),
}

/// Why a mail could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue holds `mailRelay.delivery.maxQueuedBytes` of mail waiting.
    #[error(
        "the queue holds {waiting} bytes of mail still to deliver, the most mailRelay.delivery.maxQueuedBytes ({max}) allows; retry later"
    )]
    Full { waiting: u64, max: u64 },
    #[error("the queue's store could not take the mail: {0}")]
    Unavailable(String),
}

/// The queue of this replica. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn QueueStore>,
    settings: QueueSettings,
    delivery: QueueDelivery,
    /// This process, in claims (`<replica>/<worker>`).
    replica: String,
    wake: Notify,
    stop: watch::Sender<bool>,
    /// The bytes still to deliver as last read (`maxQueuedBytes`), and the depth for `/metrics`.
    depth: Mutex<Depth>,
    waiting_bytes: AtomicU64,
    last_forget: AtomicU64,
    /// Closed after the upstream failed: no worker claims until it opens again.
    gate: Mutex<retry::Gate>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Queue {
    /// The queue on `store`, with `workers` delivery workers and the housekeeping running.
    pub fn start(
        store: Arc<dyn QueueStore>,
        settings: QueueSettings,
        workers: usize,
        delivery: QueueDelivery,
    ) -> Self {
        let (stop, _) = watch::channel(false);
        let notifier = Notifier {
            store: Arc::clone(&store),
            webhook: settings.webhook.clone().and_then(|webhook| {
                Webhook::new(webhook)
                    .inspect_err(|error| tracing::error!(%error, "the completion calls' HTTP client could not be built; mailRelay.delivery.webhook is not called"))
                    .ok()
            }),
            admin: delivery.admin.clone(),
            describe: delivery.describe,
            clock: Arc::clone(&delivery.clock),
            metrics: Arc::clone(&delivery.metrics),
        };
        let notifying = tokio::spawn(notifier.run(stop.subscribe()));
        let inner = Arc::new(Inner {
            store,
            settings,
            delivery,
            replica: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            wake: Notify::new(),
            stop,
            depth: Mutex::default(),
            waiting_bytes: AtomicU64::new(0),
            last_forget: AtomicU64::new(0),
            gate: Mutex::default(),
            tasks: Mutex::default(),
        });
        let mut tasks = Vec::with_capacity(workers + 1);
        tasks.push(tokio::spawn(housekeeping(Arc::clone(&inner))));
        tasks.push(notifying);
        for n in 0..workers.max(1) {
            tasks.push(tokio::spawn(work(Arc::clone(&inner), n)));
        }
        *inner.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
        Self { inner }
    }

    /// Commit `mail` for `caller` (its `caller_id`): when this returns `Ok`, the mail is durable.
    /// With `idempotency` (the request's key and fingerprint), the caller's mail committed
    /// earlier under the same key is the answer instead ([`Enqueued::Earlier`]).
    pub async fn enqueue(
        &self,
        caller: &str,
        mail: &OutgoingMail,
        idempotency: Option<(&str, &Fingerprint)>,
    ) -> Result<Enqueued, QueueError> {
        let inner = &self.inner;
        let waiting = inner.waiting_bytes.load(Ordering::Relaxed);
        let max = inner.settings.max_queued_bytes;
        if waiting.saturating_add(mail.formatted.len() as u64) > max {
            return Err(QueueError::Full { waiting, max });
        }
        let now = inner.delivery.clock.now_ms();
        let recipients: Vec<String> = mail.envelope.to().iter().map(ToString::to_string).collect();
        let from = mail
            .envelope
            .from()
            .map(ToString::to_string)
            .unwrap_or_default();
        let sealed = match &inner.settings.at_rest {
            Some(key) => Some(
                cipher::seal(key, &mail.formatted, mail.id.as_bytes())
                    .map_err(|e| QueueError::Unavailable(e.to_string()))?,
            ),
            None => None,
        };
        let enqueued = inner
            .store
            .enqueue(NewMail {
                id: &mail.id,
                caller,
                message_id: &mail.message_id,
                from: &from,
                recipients: &recipients,
                mime: sealed.as_deref().unwrap_or(&mail.formatted),
                now,
                expires_at: now + duration_ms(inner.settings.max_age),
                idempotency: idempotency.map(|(key, print)| (key, &print.as_bytes()[..])),
            })
            .await
            .map_err(QueueError::Unavailable)?;
        if enqueued == Enqueued::New {
            inner
                .waiting_bytes
                .fetch_add(mail.formatted.len() as u64, Ordering::Relaxed);
            inner.wake.notify_one();
        }
        Ok(enqueued)
    }

    /// The mail `id` if `caller` sent it; another caller's mail is as absent as none.
    pub async fn status(&self, caller: &str, id: &str) -> Result<Option<MailRecord>, String> {
        let record = self.inner.store.get(id).await?;
        Ok(record.filter(|r| r.caller == caller))
    }

    /// The depth as the housekeeping last read it.
    pub fn depth(&self) -> Depth {
        self.inner
            .depth
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stop claiming (at shutdown): idle workers end at once, busy ones after their mail.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }

    /// Wait for the workers to end after [`Queue::stop`], then give back any claim that did
    /// not start its upload.
    pub async fn stopped(&self) {
        self.stop();
        let tasks = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for task in tasks {
            let _ = task.await;
        }
        match self.inner.store.release(&self.inner.replica).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "queued mails given back at shutdown"),
            Err(e) => {
                tracing::warn!(error = %e, "claims could not be given back; their leases will run out")
            }
        }
    }
}

impl Inner {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    fn now(&self) -> Millis {
        self.delivery.clock.now_ms()
    }

    fn lease(&self) -> Duration {
        self.delivery.send_deadline + LEASE_MARGIN
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, retry::Gate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Claim, send, record; until stopped.
async fn work(inner: Arc<Inner>, n: usize) {
    let worker = format!("{}/{n}", inner.replica);
    let mut stop = inner.stop.subscribe();
    let mut failures = 0u32;
    while !inner.stopping() {
        let now = inner.now();
        let closed_until = inner.gate().closed_until();
        if closed_until > now {
            let wait = Duration::from_millis(closed_until - now).min(POLL * 4);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let claimed = inner
            .store
            .claim(&worker, now, now + duration_ms(inner.lease()))
            .await;
        let pause = match claimed {
            Ok(Some(mail)) => {
                failures = 0;
                deliver(&inner, &worker, mail).await;
                continue;
            }
            Ok(None) => POLL,
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, "the queue's store did not answer a claim; retrying");
                }
                POLL * failures.min(10)
            }
        };
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
}

/// One attempt at one claimed mail.
async fn deliver(inner: &Inner, worker: &str, mut mail: Claimed) {
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
    if error.outcome_unknown() {
        quota.keep();
    } else {
        identity.rate_limits.refund(quota).await;
    }
    match error.kind() {
        FailureKind::QuotaExceeded => identity.rate_limits.mailbox_quota_exceeded().await,
        FailureKind::SendAsDenied => {
            identity.send_as.remember_denied(&mail.from).await;
        }
        _ => {}
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
                    Finish::Sent { .. } | Finish::Retry { .. } => {}
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

/// Sweep dead claims and expired mails, read the depth, forget finished mails; until stopped.
async fn housekeeping(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    while !inner.stopping() {
        let now = inner.now();
        match inner.store.sweep(now).await {
            Ok(swept) => {
                let metrics = &inner.delivery.metrics;
                for (outcome, n) in [
                    ("requeued", swept.requeued),
                    ("unknown", swept.unknown),
                    ("expired", swept.expired),
                ] {
                    if n > 0 {
                        metrics.queue_swept(outcome, n);
                    }
                }
                if swept.unknown > 0 {
                    tracing::warn!(
                        mails = swept.unknown,
                        "queued mails whose worker died while uploading are now unknown: the server may have them"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "queue sweep failed; next time"),
        }
        if let Ok(depth) = inner.store.depth().await {
            inner
                .waiting_bytes
                .store(depth.waiting_bytes(), Ordering::Relaxed);
            *inner.depth.lock().unwrap_or_else(PoisonError::into_inner) = depth;
        }
        let last = inner.last_forget.load(Ordering::Relaxed);
        let retention = duration_ms(inner.settings.retention);
        if now.saturating_sub(last) >= FORGET_EVERY_MS.min(retention) {
            inner.last_forget.store(now, Ordering::Relaxed);
            let before = now.saturating_sub(retention);
            match inner.store.forget_finished(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    mails = n,
                    "finished queued mails past their retention deleted"
                ),
                Err(e) => tracing::debug!(error = %e, "retention sweep failed; next time"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
}
