//! Typed settings, loaded from a Spring-Boot-style YAML file (`osweb-prod.yml`).
//!
//! Raw YAML is read, overridden from the environment, resolved and decrypted by
//! [`load`], then validated into the types below. Code past this module never
//! sees an unvalidated value.

mod access;
mod callers;
mod certificate;
pub mod cipher;
mod cloud;
mod identities;
mod keys;
mod load;
mod mask;
mod observe;
mod placeholders;
mod proxy;
mod queue;
mod raw;
mod read;
mod resolve;
mod send_email;
mod store;
mod trust;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use crate::message::EmailAddress;

pub use access::{
    AddressPattern, ApiKeySettings, AuthSettings, CorsSettings, Delegate, OidcSettings,
    ProxySecret, SendAsSettings, TrustedProxySettings,
};
pub use certificate::{Certificate, CertificateCredential, CertificateError, PrivateKey};
pub use cloud::Cloud;
pub use keys::env_name;
pub use keys::table::markdown as key_table;
pub use load::{ConfigError, LoadOptions, Loaded, SettingError, listener, load, load_str};
pub use observe::{LogFormat, LogSettings, MetricsSettings};
pub use proxy::{ForwardedHeader, HttpSettings, ShutdownSettings};
pub use queue::{QueueMode, QueueSettings, SecretBytes, WebhookSettings};
pub use send_email::IMDS_TOKEN_ENDPOINT;
pub use store::{StoreSettings, StoreUrl};
pub use trust::{is_host_local, is_loopback_host, read_ca_certificates};

/// The embedded dev settings (`config/dev.yml`): outbox delivery, no Microsoft 365 needed.
pub const DEV_DEFAULT: &str = include_str!("../../config/dev.yml");

/// Everything the relay needs to run, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Spring's `server.*`.
    pub server: ServerSettings,
    /// The seed's `featureSwitches.sendEmail.*`.
    pub send_email: SendEmailSettings,
    /// The relay's own `mailRelay.*`.
    pub relay: RelaySettings,
}

impl Settings {
    /// The names of the sending identities, the default first.
    pub fn identity_names(&self) -> Vec<&str> {
        let all = &self.relay.identities;
        std::iter::once(all.default_name.as_str())
            .chain(all.others.iter().map(|i| i.name.as_str()))
            .collect()
    }

    /// The settings as the identity `name` sees them: its `sendEmail`, transport and mailbox
    /// limits in place of the default's; `None` when no identity has that name.
    pub fn for_identity(&self, name: &str) -> Option<Settings> {
        if name == self.relay.identities.default_name {
            return Some(self.clone());
        }
        let identity = self
            .relay
            .identities
            .others
            .iter()
            .find(|i| i.name == name)?;
        let mut view = self.clone();
        view.send_email = identity.send_email.clone();
        view.relay.delivery = identity.delivery.clone();
        view.relay.rate_limits = identity.rate_limits;
        Some(view)
    }
}

/// Where the HTTP listener binds.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub address: IpAddr,
    pub port: u16,
}

impl ServerSettings {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

/// `featureSwitches.sendEmail`: how to reach the SMTP server.
#[derive(Debug, Clone)]
pub struct SendEmailSettings {
    pub smtp_server: String,
    pub smtp_port: u16,
    pub smtp_encryption: Encryption,
    pub smtp_authentication: SmtpAuthentication,
}

/// `smtpEncryption`: `NONE`/`0`, `SSL`/`1` (implicit TLS), `TLS`/`2` (STARTTLS required).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    None,
    Ssl,
    Tls,
}

impl Encryption {
    /// Every spelling `smtpEncryption` accepts, any case; the first of each is its name.
    pub const CHOICES: &[(&str, Encryption)] = &[
        ("NONE", Encryption::None),
        ("SSL", Encryption::Ssl),
        ("TLS", Encryption::Tls),
        ("0", Encryption::None),
        ("1", Encryption::Ssl),
        ("2", Encryption::Tls),
    ];

    /// The spelling `check-config` prints.
    pub fn name(self) -> &'static str {
        read::name_in(Self::CHOICES, &self)
    }
}

/// `smtpAuthentication` with the values each mode needs.
// Built once at start-up: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SmtpAuthentication {
    None,
    Basic {
        username: String,
        password: SecretString,
    },
    MsOAuth {
        /// The mailbox the relay logs in as (`smtpUsername`): under MS_OAUTH always an address.
        username: EmailAddress,
        oauth: OAuthSettings,
    },
}

/// `smtpAuthentication`'s spellings: the modes without the values each needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    None,
    Basic,
    MsOAuth,
}

impl AuthMode {
    /// Every spelling `smtpAuthentication` accepts, any case.
    pub const CHOICES: &[(&str, AuthMode)] = &[
        ("NONE", AuthMode::None),
        ("BASIC", AuthMode::Basic),
        ("MS_OAUTH", AuthMode::MsOAuth),
    ];

    /// The spelling `check-config` prints.
    pub fn name(self) -> &'static str {
        read::name_in(Self::CHOICES, &self)
    }
}

impl SmtpAuthentication {
    /// The mode, whose name `smtpAuthentication` is.
    pub fn mode(&self) -> AuthMode {
        match self {
            Self::None => AuthMode::None,
            Self::Basic { .. } => AuthMode::Basic,
            Self::MsOAuth { .. } => AuthMode::MsOAuth,
        }
    }

    /// The SMTP login name, when there is one.
    pub fn username(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::Basic { username, .. } => Some(username),
            Self::MsOAuth { username, .. } => Some(username.as_str()),
        }
    }
}

/// Client-credentials settings for Entra ID.
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    pub tenant_id: String,
    pub client_id: String,
    pub credential: ClientCredential,
    /// `oAuthTokenEndpoint` with `#TenantID#` already replaced.
    pub token_endpoint: Url,
    /// `oAuthScopes`, space-separated as sent.
    pub scopes: String,
    /// `oAuthTokenGraceTimeInSeconds`: a token is stale this long before it expires.
    pub grace: Duration,
    /// Outbound HTTP timeouts for the token endpoint (`mailRelay.token.*`).
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// How the relay proves itself to Entra ID: exactly one of a secret, a certificate, a
/// federated token file and a managed identity.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    Secret(SecretString),
    /// Workload identity federation: a token another issuer (Kubernetes) wrote to this file,
    /// read again for every token request because it is rotated; sent as the client assertion.
    FederatedTokenFile(PathBuf),
    /// The certificate uploaded to the app registration and its RSA private key, parsed and
    /// checked to belong together.
    Certificate(CertificateCredential),
    /// No credential of ours: the platform's identity endpoint (`OAuthSettings::token_endpoint`)
    /// issues the tokens. `OAuthSettings::client_id` names a user-assigned identity; empty means
    /// the system-assigned one.
    ManagedIdentity(ManagedIdentity),
}

/// Which managed identity endpoint the platform offers (`oAuthManagedIdentity`).
#[derive(Debug, Clone)]
pub enum ManagedIdentity {
    /// Azure's Instance Metadata Service (VMs, scale sets, AKS nodes without workload identity).
    Imds,
    /// App Service, Azure Functions and Container Apps: `IDENTITY_ENDPOINT`, answering only
    /// requests that carry `IDENTITY_HEADER`.
    AppService { identity_header: SecretString },
}

impl ManagedIdentity {
    /// The kind, whose name `oAuthManagedIdentity` is.
    pub fn kind(&self) -> ManagedKind {
        match self {
            Self::Imds => ManagedKind::Imds,
            Self::AppService { .. } => ManagedKind::AppService,
        }
    }
}

/// `oAuthManagedIdentity`'s spellings: the endpoints without the header App Service needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagedKind {
    Imds,
    AppService,
}

impl ManagedKind {
    /// Every spelling `oAuthManagedIdentity` accepts, any case.
    pub const CHOICES: &[(&str, ManagedKind)] = &[
        ("imds", ManagedKind::Imds),
        ("appService", ManagedKind::AppService),
    ];

    /// The spelling `check-config` prints.
    pub fn name(self) -> &'static str {
        read::name_in(Self::CHOICES, &self)
    }
}

/// `mailRelay.*`: everything the relay adds to the seed's settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// `mailRelay.cloud`: which Microsoft cloud the endpoints' defaults come from.
    pub cloud: Cloud,
    pub delivery: Delivery,
    pub smtp: SmtpTuning,
    /// `mailRelay.graph.*`: the Microsoft Graph transport (used with `delivery.mode: graph`).
    pub graph: GraphSettings,
    pub limits: Limits,
    pub auth: AuthSettings,
    pub send_as: SendAsSettings,
    pub cors: CorsSettings,
    pub rate_limits: RateLimitSettings,
    pub idempotency: IdempotencySettings,
    /// `mailRelay.store.*`: where shared state lives.
    pub store: StoreSettings,
    /// `mailRelay.delivery.queue` and the delivery workers' retries.
    pub queue: QueueSettings,
    pub http: HttpSettings,
    pub shutdown: ShutdownSettings,
    /// `mailRelay.adminMail`: notices to administrators; `None` when off (the default).
    pub admin_mail: Option<AdminMailSettings>,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
    /// `mailRelay.identities` and `mailRelay.defaultIdentity`: which mailbox sends which From.
    pub identities: IdentitiesSettings,
}

/// The sending identities: `featureSwitches.sendEmail` (the default) and `mailRelay.identities`.
#[derive(Debug, Clone)]
pub struct IdentitiesSettings {
    /// `mailRelay.defaultIdentity.name` (`default`): what `featureSwitches.sendEmail` is called.
    pub default_name: String,
    /// `mailRelay.defaultIdentity.from`: the From addresses the default serves. Empty: every
    /// From, which only happens without other identities.
    pub default_from: Vec<AddressPattern>,
    pub others: Vec<IdentitySettings>,
}

impl Default for IdentitiesSettings {
    /// The default identity alone, serving every From.
    fn default() -> Self {
        Self {
            default_name: read::from_presets(|ctx| {
                ctx.text_or_preset("mailRelay.defaultIdentity.name")
                    .to_owned()
            }),
            default_from: Vec::new(),
            others: Vec::new(),
        }
    }
}

/// One entry of `mailRelay.identities`, its missing keys taken from `featureSwitches.sendEmail`.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub name: String,
    /// The From addresses and domains it sends as.
    pub from: Vec<AddressPattern>,
    pub send_email: SendEmailSettings,
    /// `transport`, else `mailRelay.delivery.mode`.
    pub delivery: Delivery,
    /// `mailRelay.rateLimits`, its mailbox limits replaced by the entry's own.
    pub rate_limits: RateLimitSettings,
}

/// `mailRelay.adminMail`: who gets the relay's notices (start, stop, sends failing for a
/// configuration reason), and from which address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminMailSettings {
    /// The sender: `smtpUsername` itself, the one address the SMTP mailbox may always use.
    pub from: EmailAddress,
    /// At least one address.
    pub recipients: Vec<EmailAddress>,
}

/// `mailRelay.delivery`: where accepted mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Hand every mail to the SMTP server of `featureSwitches.sendEmail`.
    Smtp,
    /// Write every mail as an `.eml` file into a folder (the embedded dev default).
    Outbox { dir: PathBuf },
    /// Hand every mail to Microsoft Graph's `sendMail` for the `smtpUsername` mailbox.
    Graph,
    /// SMTP first; Graph for the mailbox while the server refuses SMTP AUTH for a reason only
    /// the setup can fix (`535 5.7.139`, `550 5.7.30`).
    Auto,
}

/// `mailRelay.delivery.mode`'s spellings (an identity's `transport` takes the remote ones):
/// the deliveries without the outbox's folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Smtp,
    Graph,
    Auto,
    Outbox,
}

impl DeliveryMode {
    /// Every spelling `mailRelay.delivery.mode` accepts, any case.
    pub const CHOICES: &[(&str, DeliveryMode)] = &[
        ("smtp", DeliveryMode::Smtp),
        ("graph", DeliveryMode::Graph),
        ("auto", DeliveryMode::Auto),
        ("outbox", DeliveryMode::Outbox),
    ];

    /// The spelling `check-config` prints.
    pub fn name(self) -> &'static str {
        read::name_in(Self::CHOICES, &self)
    }

    /// The delivery to a real mailbox this mode names; `None` for the outbox, which needs its
    /// folder.
    pub fn remote(self) -> Option<Delivery> {
        match self {
            Self::Smtp => Some(Delivery::Smtp),
            Self::Graph => Some(Delivery::Graph),
            Self::Auto => Some(Delivery::Auto),
            Self::Outbox => None,
        }
    }
}

impl Delivery {
    /// The mode, whose name `mailRelay.delivery.mode` is.
    pub fn mode(&self) -> DeliveryMode {
        match self {
            Self::Smtp => DeliveryMode::Smtp,
            Self::Graph => DeliveryMode::Graph,
            Self::Auto => DeliveryMode::Auto,
            Self::Outbox { .. } => DeliveryMode::Outbox,
        }
    }

    /// Mail reaches a real mailbox (SMTP or Graph), so callers must be known and the
    /// mailbox's credentials are required.
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Smtp | Self::Graph | Self::Auto)
    }

    /// The SMTP server's settings are used (`smtp` and `auto`).
    pub fn uses_smtp(&self) -> bool {
        matches!(self, Self::Smtp | Self::Auto)
    }

    /// Microsoft Graph may be used (`graph` and `auto`), so the login must be MS_OAUTH.
    pub fn uses_graph(&self) -> bool {
        matches!(self, Self::Graph | Self::Auto)
    }
}

/// `mailRelay.graph.*`: the Microsoft Graph transport.
#[derive(Debug, Clone)]
pub struct GraphSettings {
    /// The API root, e.g. `https://graph.microsoft.com/v1.0` (https; http only on loopback).
    pub base_url: Url,
    /// The token scope for Graph, `https://graph.microsoft.com/.default`.
    pub scopes: String,
    pub connect_timeout: Duration,
    /// One HTTP request to Graph at most; the whole send keeps `smtp.sendDeadlineSeconds`.
    pub request_timeout: Duration,
    /// Requests in flight for the mailbox at once (Outlook allows 4).
    pub max_concurrent_requests: usize,
    /// After a send whose answer was lost, how long to look for it in Sent Items (with
    /// `Mail.Read`) before sending it once more; zero never looks, and never resends.
    pub sent_items_lookup: Duration,
}

impl Default for GraphSettings {
    fn default() -> Self {
        read::from_presets(|ctx| validate::graph(ctx, Cloud::Global))
    }
}

/// `mailRelay.smtp.*`: connection handling for the SMTP side.
#[derive(Debug, Clone)]
pub struct SmtpTuning {
    /// Open connections per SMTP mailbox, at most (Exchange allows 3).
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// A whole send, retries included, must finish within this.
    pub send_deadline: Duration,
    /// Extra CA certificates (PEM) to trust, for private servers.
    pub ca_file: Option<PathBuf>,
    /// Name sent in EHLO; the machine's host name when unset.
    pub hello_name: Option<String>,
    /// Local address SMTP connections are made from (`mailRelay.smtp.sourceAddress`);
    /// the system's choice when unset. For multi-homed hosts, and for tests that count
    /// their connections on the server.
    pub source_address: Option<IpAddr>,
}

/// `mailRelay.limits.*`: request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most recipients (to + cc + bcc) in one mail (Exchange allows 500).
    pub max_recipients: usize,
    /// Largest formatted message in bytes, after base64 (`maxMessageBytes`, default 35 MiB,
    /// Exchange Online's default limit).
    pub max_message_bytes: usize,
    /// Longest an HTTP request may take.
    pub request_timeout: Duration,
    /// Bytes of mail (request bodies) all requests together may hold at once
    /// (`maxInFlightBytes`); a request past it waits briefly, then gets 503.
    pub max_in_flight_bytes: usize,
}

/// `mailRelay.rateLimits.*`: how much mail may go out; `None` = that limit is off (setting 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// Messages per rolling minute through the SMTP mailbox (Exchange Online allows 30).
    pub mailbox_messages_per_minute: Option<NonZeroU32>,
    /// Recipients per rolling 24 hours through the SMTP mailbox (Exchange Online allows 10,000).
    pub mailbox_recipients_per_day: Option<NonZeroU32>,
    /// Messages per rolling minute for each caller (API key or user).
    pub caller_messages_per_minute: Option<NonZeroU32>,
    /// Recipients per rolling 24 hours for each caller (API key or user).
    pub caller_recipients_per_day: Option<NonZeroU32>,
}

impl RateLimitSettings {
    /// Exchange Online's own limits per mailbox (EXCHANGE.md section 4).
    pub const EXCHANGE_MESSAGES_PER_MINUTE: u32 = 30;
    pub const EXCHANGE_RECIPIENTS_PER_DAY: u32 = 10_000;

    /// Every limit off (tests and benchmarks against a local server).
    pub const OFF: Self = Self {
        mailbox_messages_per_minute: None,
        mailbox_recipients_per_day: None,
        caller_messages_per_minute: None,
        caller_recipients_per_day: None,
    };

    /// A caller's default share of a mailbox limit: a quarter, so that one caller (an API key,
    /// a proxy or OIDC user) cannot use up the mailbox's day and at least four must together.
    /// Off when the mailbox limit is off.
    pub fn caller_share(mailbox: Option<NonZeroU32>) -> Option<NonZeroU32> {
        mailbox.map(|max| NonZeroU32::new(max.get() / 4).unwrap_or(NonZeroU32::MIN))
    }
}

impl Default for RateLimitSettings {
    /// Exchange Online's limits for the mailbox; a quarter of them for each caller.
    fn default() -> Self {
        read::from_presets(|ctx| {
            let max_recipients = ctx.whole("mailRelay.limits.maxRecipients");
            validate::rate_limits(ctx, max_recipients, &Delivery::Smtp)
        })
    }
}

/// `mailRelay.idempotency.*`: how long and how many `Idempotency-Key` results are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencySettings {
    /// A key's result is replayed for this long after the first request began.
    pub ttl: Duration,
    /// Most keys remembered; beyond it the oldest are forgotten first.
    pub max_entries: usize,
    /// Most bytes the remembered answers may hold; beyond it the oldest are forgotten first.
    pub max_bytes: usize,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        read::from_presets(validate::idempotency)
    }
}
