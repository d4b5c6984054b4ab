//! The parts the application is built from, as the settings choose them: the token cache, the
//! mail sender (with the store's shared connection slots) and the queue's workers.

use std::sync::Arc;

use crate::config::{Delivery, OAuthSettings, Settings, SmtpAuthentication};
use crate::delivery::{Fallback, MailSender, Outbox};
use crate::graph::GraphSender;
use crate::queue::{Queue, QueueDelivery};
use crate::rate_limit::mailbox_of;
use crate::smtp::{ConnectionSlots, SmtpSender};
use crate::store::Store;
use crate::token::{TokenCache, TokenProvider};

/// One token cache for the whole process, when mail goes out over SMTP with MS_OAUTH (for
/// Exchange's scope) or through Graph (for `mailRelay.graph.scopes`).
pub(super) fn token_cache_for(
    settings: &Settings,
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
    let cache = TokenCache::new(&oauth).map_err(std::io::Error::other)?;
    Ok(Some(Arc::new(cache)))
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
) -> std::io::Result<Arc<dyn MailSender>> {
    let needs_oauth = |mode: &str| {
        std::io::Error::other(format!(
            "mailRelay.delivery.mode {mode} needs smtpAuthentication MS_OAUTH"
        ))
    };
    match &settings.relay.delivery {
        Delivery::Outbox { dir } => Ok(Arc::new(Outbox::new(dir.clone()))),
        Delivery::Graph => {
            let tokens = tokens.ok_or_else(|| needs_oauth("graph"))?;
            GraphSender::new(settings, tokens)
                .map(|sender| Arc::new(sender) as Arc<dyn MailSender>)
                .map_err(std::io::Error::other)
        }
        Delivery::Auto => {
            let SmtpAuthentication::MsOAuth { username, oauth } =
                &settings.send_email.smtp_authentication
            else {
                return Err(needs_oauth("auto"));
            };
            let graph_tokens: Arc<dyn TokenProvider> = Arc::new(
                TokenCache::new(&graph_oauth(settings, oauth)).map_err(std::io::Error::other)?,
            );
            let graph = GraphSender::new(settings, graph_tokens).map_err(std::io::Error::other)?;
            let smtp = smtp_sender(settings, tokens, store)?;
            Ok(Arc::new(Fallback::new(
                smtp,
                Arc::new(graph),
                username.clone(),
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
