//! Who may call and as whom, typed: `mailRelay.auth` (API keys, a trusted proxy, OIDC),
//! `mailRelay.sendAs`, `mailRelay.cors`, and the address patterns they and the identities list.
//! `callers.rs` builds them.

use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use crate::message::EmailAddress;

/// `mailRelay.auth`: who may call `POST /mail`.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// Accept requests without credentials (the embedded dev default only; refused with SMTP delivery).
    pub allow_anonymous: bool,
    pub api_keys: Vec<ApiKeySettings>,
    pub trusted_proxy: Option<TrustedProxySettings>,
    pub oidc: Option<OidcSettings>,
}

/// One API key: its name, the SHA-256 of the key (never the key), and the From addresses it may use.
#[derive(Debug, Clone)]
pub struct ApiKeySettings {
    pub name: String,
    pub sha256: [u8; 32],
    pub allowed_from: Vec<AddressPattern>,
    /// The sending identities this key may use (`identities`); empty: any.
    pub identities: Vec<String>,
}

/// A reverse proxy that has already logged the user in and names them in a header.
#[derive(Debug, Clone)]
pub struct TrustedProxySettings {
    /// Header carrying the user's address, e.g. `X-Forwarded-Email`.
    pub user_header: http::HeaderName,
    /// Source addresses the header is accepted from.
    pub sources: Vec<ipnet::IpNet>,
    /// Optional shared secret the proxy must send as well.
    pub secret: Option<ProxySecret>,
}

/// Header name and value a trusted proxy proves itself with.
#[derive(Debug, Clone)]
pub struct ProxySecret {
    pub header: http::HeaderName,
    pub value: SecretString,
}

/// End-user access tokens (OIDC, e.g. Entra ID) validated against the issuer's JWKS.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    pub issuer: String,
    pub audience: String,
    pub jwks_uri: Url,
    /// Claim holding the user's address: `preferred_username`, `upn` or `email`.
    pub user_claim: String,
    pub clock_skew: Duration,
}

/// `mailRelay.sendAs`: which caller may use which From address.
#[derive(Debug, Clone)]
pub struct SendAsSettings {
    /// Mailbox -> the users (or `group:NAME`) that may send as it, e.g. a shared team mailbox.
    pub delegates: Vec<(EmailAddress, Vec<Delegate>)>,
    /// Named groups of user addresses for `delegates`.
    pub groups: Vec<(String, Vec<EmailAddress>)>,
    /// Mailboxes known to have granted Send As to `smtpUsername` in Exchange; `None` = not checked here.
    pub exchange_grants: Option<Vec<AddressPattern>>,
    /// How long an Exchange SendAsDenied for a From address is remembered.
    pub denial_memory: Duration,
}

impl Default for SendAsSettings {
    /// No delegates, no grant list, and Exchange's refusals remembered as declared.
    fn default() -> Self {
        super::read::from_presets(super::callers::send_as)
    }
}

/// One of the users that may send as a mailbox under `mailRelay.sendAs.delegates`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delegate {
    User(EmailAddress),
    /// `group:NAME`: the members of `mailRelay.sendAs.groups.NAME`, a group that exists.
    Group(String),
}

impl std::fmt::Display for Delegate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(address) => address.fmt(f),
            Self::Group(name) => write!(f, "group:{name}"),
        }
    }
}

/// `mailRelay.cors`: browsers calling the relay directly.
#[derive(Debug, Clone, Default)]
pub struct CorsSettings {
    /// Exact origins (`https://app.contoso.com`); none by default.
    pub allowed_origins: Vec<http::HeaderValue>,
}

/// An address (`noreply@contoso.com`) or a whole domain (`*@contoso.com`), compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressPattern {
    Exact(String),
    Domain(String),
}

impl AddressPattern {
    /// Parse `local@domain` or `*@domain`; `None` when it is neither.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().to_ascii_lowercase();
        let (local, domain) = text.rsplit_once('@')?;
        if domain.contains(['*', '@']) || local.is_empty() {
            return None;
        }
        // The form From addresses take once parsed (punycode for an IDN), so both compare.
        let domain = crate::message::normalize_domain(domain).ok()?;
        match local {
            "*" => Some(Self::Domain(domain)),
            _ if local.contains('*') => None,
            _ => Some(Self::Exact(format!("{local}@{domain}"))),
        }
    }

    /// Does this pattern cover `address`?
    pub fn matches(&self, address: &str) -> bool {
        match self {
            Self::Exact(exact) => exact.eq_ignore_ascii_case(address),
            Self::Domain(domain) => address
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain)),
        }
    }
}

impl std::fmt::Display for AddressPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(address) => f.write_str(address),
            Self::Domain(domain) => write!(f, "*@{domain}"),
        }
    }
}
