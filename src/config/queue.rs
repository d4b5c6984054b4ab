//! `mailRelay.delivery.queue` and its neighbours: when `POST /mail` queues a mail instead of
//! sending it at once, and how the delivery workers retry, give up and forget.

use std::fmt;
use std::time::Duration;

use secrecy::ExposeSecret;
use url::Url;

use super::StoreUrl;
use super::cipher::EncryptionKey;
use super::keys::ENCRYPT_AT_REST;
use super::read::Ctx;
use super::send_email::https_url;

const QUEUE: &str = "mailRelay.delivery.queue";
const RETRY_MIN: &str = "mailRelay.delivery.retryMinSeconds";
const RETRY_MAX: &str = "mailRelay.delivery.retryMaxSeconds";
const WEBHOOK: &str = "mailRelay.delivery.webhook";
const WEBHOOK_SECRET: &str = "mailRelay.delivery.webhookSecret";
/// Standard Webhooks' secrets carry 24 to 64 random bytes; fewer than this is guessable.
const MIN_WEBHOOK_KEY_BYTES: usize = 16;

/// `mailRelay.delivery.queue`: which requests are queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueMode {
    /// Those that ask with `Prefer: respond-async`, when the store is durable (the default).
    Prefer,
    /// Every request: `202` means "committed to the store".
    Always,
    /// None: `Prefer: respond-async` is ignored, every mail is sent while the client waits.
    Never,
}

impl QueueMode {
    /// Every spelling `mailRelay.delivery.queue` accepts, any case.
    pub const CHOICES: &[(&str, QueueMode)] = &[
        ("prefer", QueueMode::Prefer),
        ("always", QueueMode::Always),
        ("never", QueueMode::Never),
    ];

    /// The spelling `check-config` prints.
    pub fn name(self) -> &'static str {
        super::read::name_in(Self::CHOICES, &self)
    }
}

/// The queued-delivery settings.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub mode: QueueMode,
    /// `workers`: mails one replica sends at once; 0 means `mailRelay.smtp.maxConnections`.
    pub workers: usize,
    /// `maxAgeSeconds`: a mail not delivered by then ends `expired` (Postfix's
    /// `maximal_queue_lifetime`, 5 days).
    pub max_age: Duration,
    /// `retentionSeconds`: finished mails (sent, failed, expired, unknown) and their MIME are
    /// deleted this long after they finished.
    pub retention: Duration,
    /// `retryMinSeconds` and `retryMaxSeconds`: the first pause after a temporary failure, and
    /// the longest; each failure doubles the pause in between, with ±20 % jitter.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// `maxQueuedBytes`: the MIME all queued mails may hold in the store; past it new mails
    /// get `503 busy` (the sum is read every few seconds, so it may run over by a few seconds'
    /// worth of mail).
    pub max_queued_bytes: u64,
    /// `encryptAtRest`: the key that seals each stored message (the `{cipher}` key), or none.
    pub at_rest: Option<EncryptionKey>,
    /// `webhook` and `webhookSecret`: where a mail that ends `failed`, `expired` or `unknown`
    /// is reported, signed as Standard Webhooks sign.
    pub webhook: Option<WebhookSettings>,
}

/// The completion callback.
#[derive(Clone)]
pub struct WebhookSettings {
    pub url: Url,
    /// The HMAC-SHA256 key: the base64 after `whsec_` (Standard Webhooks' form), or the
    /// secret's bytes as written.
    pub key: SecretBytes,
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url.as_str())
            .field("key", &"****")
            .finish()
    }
}

/// Key bytes that never show in `Debug`.
#[derive(Clone)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        super::read::from_presets(|ctx| queue(ctx, &StoreUrl::Memory))
    }
}

impl QueueSettings {
    /// Whether a mail may be queued at all: only a durable store keeps what `202` promised.
    pub fn available(&self, store: &StoreUrl) -> bool {
        self.mode != QueueMode::Never && *store != StoreUrl::Memory
    }
}

pub(super) fn queue(ctx: &mut Ctx<'_>, store: &StoreUrl) -> QueueSettings {
    let mode = ctx.choice(QUEUE, QueueMode::CHOICES);
    if mode == QueueMode::Always && *store == StoreUrl::Memory {
        ctx.error(
            QUEUE,
            "always needs a durable store: set mailRelay.store.url to sqlite:/path/file.db or postgres://… (with the memory store a queued mail would die with the process)",
        );
    }
    let settings = QueueSettings {
        mode,
        workers: ctx.whole("mailRelay.delivery.workers"),
        max_age: ctx.seconds("mailRelay.delivery.maxAgeSeconds"),
        retention: ctx.seconds("mailRelay.delivery.retentionSeconds"),
        retry_min: ctx.seconds(RETRY_MIN),
        retry_max: ctx.seconds(RETRY_MAX),
        max_queued_bytes: ctx.whole("mailRelay.delivery.maxQueuedBytes"),
        at_rest: at_rest(ctx),
        webhook: webhook(ctx),
    };
    if settings.retry_min > settings.retry_max {
        ctx.error(
            RETRY_MIN,
            format!(
                "is {} s, more than {RETRY_MAX} ({} s); the first pause cannot be longer than the longest",
                settings.retry_min.as_secs(),
                settings.retry_max.as_secs()
            ),
        );
    }
    settings
}

fn at_rest(ctx: &mut Ctx<'_>) -> Option<EncryptionKey> {
    let on = ctx.flag(ENCRYPT_AT_REST);
    if !on {
        return None;
    }
    match ctx.values.at_rest_key.clone() {
        Some(Ok(key)) => Some(key),
        other => {
            let why = other
                .and_then(Result::err)
                .unwrap_or_else(|| "no key was loaded".into());
            ctx.error(
                ENCRYPT_AT_REST,
                format!(
                    "is true, but {why}: the queued messages are sealed with the {{cipher}} key"
                ),
            );
            None
        }
    }
}

fn webhook(ctx: &mut Ctx<'_>) -> Option<WebhookSettings> {
    let secret = ctx
        .secret(WEBHOOK_SECRET)
        .filter(|s| !s.expose_secret().is_empty());
    let Some(text) = ctx
        .text(WEBHOOK)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
    else {
        if secret.is_some() {
            ctx.error(
                WEBHOOK_SECRET,
                format!("is set but {WEBHOOK} is not: set the URL the relay reports failed mails to, or remove the secret"),
            );
        }
        return None;
    };
    let url = https_url(
        ctx,
        WEBHOOK,
        &text,
        "it carries the failed mails' addresses and reasons",
    );
    let Some(secret) = secret else {
        ctx.error(
            WEBHOOK_SECRET,
            format!("is required with {WEBHOOK}: the key that signs each call (e.g. whsec_ and 32 random bytes in base64), so the receiver can tell the relay's calls from forgeries"),
        );
        return None;
    };
    let key = webhook_key(secret.expose_secret());
    match key {
        Some(key) if key.len() >= MIN_WEBHOOK_KEY_BYTES => Some(WebhookSettings {
            url: url?,
            key: SecretBytes(key),
        }),
        Some(_) => {
            ctx.error(
                WEBHOOK_SECRET,
                format!("is shorter than {MIN_WEBHOOK_KEY_BYTES} bytes of key; use e.g. whsec_ and 32 random bytes in base64"),
            );
            None
        }
        None => {
            ctx.error(
                WEBHOOK_SECRET,
                "starts with whsec_ but what follows is not base64 (Standard Webhooks' form: whsec_ and the key's bytes in base64)",
            );
            None
        }
    }
}

/// The key bytes of a webhook secret: `whsec_<base64>` decoded, anything else as written.
fn webhook_key(secret: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    match secret.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).ok(),
        None => Some(secret.as_bytes().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_durable_store_queues() {
        let settings = QueueSettings::default();
        assert!(!settings.available(&StoreUrl::Memory));
        assert!(settings.available(&StoreUrl::Sqlite("/data/relay.db".into())));
        let never = QueueSettings {
            mode: QueueMode::Never,
            ..settings
        };
        assert!(!never.available(&StoreUrl::Sqlite("/data/relay.db".into())));
    }

    #[test]
    fn a_whsec_secret_is_its_base64_key_and_any_other_its_bytes() {
        assert_eq!(webhook_key("whsec_AAEC").unwrap(), vec![0, 1, 2]);
        assert_eq!(webhook_key("plain secret").unwrap(), b"plain secret");
        assert!(webhook_key("whsec_not base64!").is_none());
        let settings = WebhookSettings {
            url: Url::parse("https://app.contoso.com/hook").unwrap(),
            key: SecretBytes(b"0123456789abcdef".to_vec()),
        };
        assert!(!format!("{settings:?}").contains("0123456789abcdef"));
    }
}
