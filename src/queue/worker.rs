//! One replica's side of the queue: committing mails, the delivery workers that claim and send
//! them (each attempt in `attempt.rs`), and the housekeeping that sweeps dead claims, expires old
//! mails and forgets finished ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::attempt::deliver;
use super::notify::{Notifier, Webhook};
use super::retry;
use super::{Depth, Enqueued, MailRecord, NewMail, QueueStore};
use crate::admin::AdminNotifier;
use crate::clock::{Clock, Millis, duration_ms};
use crate::config::{QueueSettings, cipher};
use crate::delivery::{DeliveryError, MailSender};
use crate::idempotency::Fingerprint;
use crate::identity::Identities;
use crate::message::OutgoingMail;
use crate::rate_limit::RateLimited;
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

/// What the workers need of the rest of the relay; `app/` wires it.
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

pub(super) struct Inner {
    pub(super) store: Arc<dyn QueueStore>,
    pub(super) settings: QueueSettings,
    pub(super) delivery: QueueDelivery,
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

    pub(super) fn now(&self) -> Millis {
        self.delivery.clock.now_ms()
    }

    pub(super) fn lease(&self) -> Duration {
        self.delivery.send_deadline + LEASE_MARGIN
    }

    pub(super) fn gate(&self) -> std::sync::MutexGuard<'_, retry::Gate> {
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
                // What the sender logs while it tries (a retry, a warning) names the mail.
                let span = tracing::info_span!("queued_mail", mail_id = %mail.id);
                deliver(&inner, &worker, mail).instrument(span).await;
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
