//! Typed settings, loaded from a Spring-Boot-style YAML file (`osweb-prod.yml`).
//!
//! Raw YAML is read, overridden from the environment, resolved and decrypted by
//! [`load`], then validated into the types below. Code past this module never
//! sees an unvalidated value.

mod load;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

pub use load::{ConfigError, LoadOptions, Loaded, SettingError, load};

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
        /// The mailbox the relay logs in as (`smtpUsername`), an address.
        username: String,
        oauth: OAuthSettings,
    },
}

impl SmtpAuthentication {
    /// The SMTP login name, when there is one.
    pub fn username(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::Basic { username, .. } | Self::MsOAuth { username, .. } => Some(username),
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

/// How the relay proves itself to Entra ID: exactly one of a secret and a certificate.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    Secret(SecretString),
    Certificate {
        /// PEM of the certificate uploaded to the app registration.
        certificate_pem: String,
        /// PEM of its private key (PKCS#8 or PKCS#1 RSA).
        private_key_pem: SecretString,
    },
}

/// `mailRelay.*`: everything the relay adds to the seed's settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub delivery: Delivery,
    pub smtp: SmtpTuning,
    pub limits: Limits,
}

/// `mailRelay.delivery`: where accepted mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Hand every mail to the SMTP server of `featureSwitches.sendEmail`.
    Smtp,
    /// Write every mail as an `.eml` file into a folder (the embedded dev default).
    Outbox { dir: PathBuf },
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
    /// Longest an HTTP request may take.
    pub request_timeout: Duration,
}
