//! The parts the application is built from, as the settings choose them: the token cache, the
//! mail sender (with the store's shared connection slots) and the queue's workers.

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::Clock;
use crate::config::{AuthMode, Delivery, OAuthSettings, Settings, SmtpAuthentication};
use crate::delivery::{Fallback, MailSender, Outbox};
use crate::graph::GraphSender;
use crate::identity::{Identities, Identity};
use crate::queue::{Queue, QueueDelivery};
use crate::rate_limit::{RateLimits, mailbox_of};
use crate::send_as::SendAsPolicy;
use crate::smtp::{ConnectionSlots, SmtpSender};
use crate::store::Store;
use crate::telemetry::delivery::{ObservedSender, SendHistory};
use crate::telemetry::metrics::Metrics;
use crate::token::{CacheKey, TokenCache, TokenProvider};

/// The process's token caches, one per app registration and scope: identities that share an
/// app share its tokens.
#[derive(Default)]
pub(super) struct TokenCaches(HashMap<CacheKey, Arc<dyn TokenProvider>>);

impl TokenCaches {
    fn get(&mut self, oauth: &OAuthSettings) -> std::io::Result<Arc<dyn TokenProvider>> {
        let key = CacheKey::of(oauth);
        if let Some(cache) = self.0.get(&key) {
            return Ok(Arc::clone(cache));
        }
        let cache: Arc<dyn TokenProvider> =
            Arc::new(TokenCache::new(oauth).map_err(std::io::Error::other)?);
        self.0.insert(key, Arc::clone(&cache));
        Ok(cache)
    }
}

/// Every identity: the default with `sender`, the others with senders of their own.
pub(super) fn identities_for(
    settings: &Settings,
    sender: Arc<dyn MailSender>,
    store: &Store,
    caches: &mut TokenCaches,
    clock: &Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> std::io::Result<Identities> {
    // One limiter and one denial memory for all: the caller's limits count across identities.
    let limiter = store.rate_limiter();
    let denials = store.denial_memory();
    let identity = |view: &Settings, name: &str, from, sender| {
        let sends = Arc::new(SendHistory::default());
        let name: Arc<str> = name.into();
        Identity {
            name: Arc::clone(&name),
            from,
            mailbox: mailbox_of(view),
            sender: Arc::new(ObservedSender::new(
                sender,
                Arc::clone(metrics),
                Arc::clone(&sends),
                name,
            )),
            sends,
            rate_limits: RateLimits::new(
                view.relay.rate_limits,
                &mailbox_of(view),
                Arc::clone(&limiter),
                Arc::clone(clock),
            ),
            send_as: Arc::new(SendAsPolicy::with_memory(
                view.relay.send_as.clone(),
                view.send_email.smtp_authentication.username(),
                Arc::clone(&denials),
            )),
        }
    };
    let all = &settings.relay.identities;
    let default = identity(
        settings,
        &all.default_name,
        all.default_from.clone(),
        sender,
    );
    let mut others = Vec::new();
    for entry in &all.others {
        let view = settings
            .for_identity(&entry.name)
            .expect("an identity of these settings");
        let tokens = token_cache_for(&view, caches)?;
        let sender = sender_for(&view, tokens, store, caches)?;
        others.push(identity(&view, &entry.name, entry.from.clone(), sender));
    }
    Ok(Identities::new(default, others))
}

/// The token cache mail goes out with, when it goes out over SMTP with MS_OAUTH (for
/// Exchange's scope) or through Graph (for `mailRelay.graph.scopes`).
pub(super) fn token_cache_for(
    settings: &Settings,
    caches: &mut TokenCaches,
) -> std::io::Result<Option<Arc<dyn TokenProvider>>> {
    let SmtpAuthentication::MsOAuth { oauth, .. } = &settings.send_email.smtp_authentication else {
        return Ok(None);
    };
    let oauth = match &settings.relay.delivery {
        // With `auto`, SMTP's cache is the one readiness shows; Graph's is the sender's own.
        Delivery::Smtp | Delivery::Auto => oauth.clone(),
        Delivery::Graph => graph_oauth(settings, oauth),
        Delivery::Outbox { .. } => return Ok(None),
    };
    caches.get(&oauth).map(Some)
}

/// The app's OAuth settings with Graph's scope: a token cache entry of its own.
fn graph_oauth(settings: &Settings, oauth: &OAuthSettings) -> OAuthSettings {
    OAuthSettings {
        scopes: settings.relay.graph.scopes.clone(),
        ..oauth.clone()
    }
}

pub(super) fn sender_for(
    settings: &Settings,
    tokens: Option<Arc<dyn TokenProvider>>,
    store: &Store,
    caches: &mut TokenCaches,
) -> std::io::Result<Arc<dyn MailSender>> {
    let needs_oauth = || {
        std::io::Error::other(format!(
            "mailRelay.delivery.mode {} needs smtpAuthentication {}",
            settings.relay.delivery.mode().name(),
            AuthMode::MsOAuth.name()
        ))
    };
    match &settings.relay.delivery {
        Delivery::Outbox { dir } => Ok(Arc::new(Outbox::new(dir.clone()))),
        Delivery::Graph => {
            let tokens = tokens.ok_or_else(needs_oauth)?;
            GraphSender::new(settings, tokens)
                .map(|sender| Arc::new(sender) as Arc<dyn MailSender>)
                .map_err(std::io::Error::other)
        }
        Delivery::Auto => {
            let SmtpAuthentication::MsOAuth { username, oauth } =
                &settings.send_email.smtp_authentication
            else {
                return Err(needs_oauth());
            };
            let graph_tokens = caches.get(&graph_oauth(settings, oauth))?;
            let graph = GraphSender::new(settings, graph_tokens).map_err(std::io::Error::other)?;
            let smtp = smtp_sender(settings, tokens, store)?;
            Ok(Arc::new(Fallback::new(
                smtp,
                Arc::new(graph),
                username.to_string(),
            )))
        }
        Delivery::Smtp => smtp_sender(settings, tokens, store),
    }
}

fn smtp_sender(
    settings: &Settings,
    tokens: Option<Arc<dyn TokenProvider>>,
    store: &Store,
) -> std::io::Result<Arc<dyn MailSender>> {
    // With a shared store, the mailbox's connection cap holds across replicas.
    let slots = store
        .connection_slots(&mailbox_of(settings), settings.relay.smtp.max_connections)
        .map(|slots| Arc::new(StoreSlots(slots)) as Arc<dyn ConnectionSlots>);
    SmtpSender::with_slots(settings, tokens, slots)
        .map(|sender| Arc::new(sender) as Arc<dyn MailSender>)
        .map_err(std::io::Error::other)
}

/// The store's shared connection slots, as the SMTP transport asks for them.
struct StoreSlots(crate::store::SharedSlots);

#[async_trait::async_trait]
impl ConnectionSlots for StoreSlots {
    async fn try_acquire(&self) -> Result<Option<crate::smtp::Slot>, String> {
        Ok(self
            .0
            .try_acquire()
            .await?
            .map(|lock| Box::new(lock) as crate::smtp::Slot))
    }
}

/// The queue and its delivery workers, when the settings queue mail and the store can keep it.
pub(super) fn queue_for(
    settings: &Settings,
    store: &Store,
    delivery: QueueDelivery,
) -> Option<Queue> {
    let queue = &settings.relay.queue;
    if !queue.available(&settings.relay.store.url) {
        return None;
    }
    let workers = match queue.workers {
        0 => settings.relay.smtp.max_connections,
        n => n,
    };
    Some(Queue::start(
        store.queue()?,
        queue.clone(),
        workers,
        delivery,
    ))
}
