//! Why no token could be had, with Entra ID's error codes explained to the operator.

use std::fmt;
use std::time::Duration;

use crate::remedy::{KNOWN_ENTRA_CODES, KnownCode};

/// Why no token could be had.
///
/// `Clone` because one failed fetch answers every caller that waited for it (single flight).
/// No variant ever carries the client secret, the private key or an access token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// Entra ID answered with its error JSON (HTTP 400/401): a setup problem, not retried.
    #[error("{0}")]
    Rejected(Box<EntraError>),
    /// No HTTP answer: DNS, refused connection, TLS failure.
    #[error(
        "the token endpoint {endpoint} could not be reached: {detail}; check oAuthTokenEndpoint and that this host can reach it (proxy, firewall, DNS)"
    )]
    Network { endpoint: String, detail: String },
    /// No connection or no complete answer within `setting`
    /// (`mailRelay.token.connectTimeoutSeconds` or `requestTimeoutSeconds`).
    #[error(
        "the token endpoint {endpoint} did not answer within {timeout:?} ({setting}); it may be overloaded or unreachable: check that this host reaches it, or raise {setting}"
    )]
    Timeout {
        endpoint: String,
        timeout: Duration,
        setting: &'static str,
    },
    /// HTTP 429: Entra ID throttles this client.
    #[error("the token endpoint is throttling this client (HTTP 429){}", RetryHint(*.retry_after))]
    Throttled { retry_after: Option<Duration> },
    /// HTTP 5xx: Entra ID (or a proxy before it) failed.
    #[error("the token endpoint failed with HTTP {status}{}{}", RetryHint(*.retry_after), Ids(.trace_id.as_deref(), .correlation_id.as_deref()))]
    Unavailable {
        status: u16,
        retry_after: Option<Duration>,
        trace_id: Option<String>,
        correlation_id: Option<String>,
    },
    /// An answer that is not what a token endpoint sends: not JSON, or JSON without a token.
    #[error(
        "the token endpoint answered HTTP {status} with {detail}; check that oAuthTokenEndpoint is Entra ID's v2.0 token URL and that no proxy rewrites the answer"
    )]
    InvalidResponse {
        status: u16,
        detail: String,
        /// A garbled answer (HTML from a proxy, cut body) may be gone on the next try;
        /// a well-formed answer that lacks the token will not.
        transient: bool,
    },
    /// The certificate or private key could not be used to sign the client assertion.
    #[error("the client certificate cannot be used: {0}")]
    Credential(String),
    /// The token endpoint is plain `http` on a host that is not loopback.
    #[error(
        "oAuthTokenEndpoint {endpoint} must use https (plain http is allowed only for loopback hosts, in tests)"
    )]
    InsecureEndpoint { endpoint: String },
    /// The managed identity endpoint refused (a 4xx other than 404, 410 and 429): no identity
    /// matches, or the request is not what it takes. Not retried.
    #[error("the managed identity endpoint refused the token request (HTTP {status}): {description}; fix: {}", managed_fix(*.no_identity))]
    ManagedIdentityRefused {
        status: u16,
        description: String,
        /// No managed identity matches (none turned on, or not the `client_id` asked for).
        no_identity: bool,
    },
    /// The HTTP client could not be built (TLS set-up).
    #[error("the HTTP client for the token endpoint could not be built: {0}")]
    Setup(String),
}

impl TokenError {
    /// Worth trying again later (network, timeout, garbled answer, 429, 5xx); Entra's 4xx are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network { .. }
            | Self::Timeout { .. }
            | Self::Throttled { .. }
            | Self::Unavailable { .. } => true,
            Self::InvalidResponse { transient, .. } => *transient,
            Self::Rejected(_)
            | Self::Credential(_)
            | Self::InsecureEndpoint { .. }
            | Self::ManagedIdentityRefused { .. }
            | Self::Setup(_) => false,
        }
    }

    /// How long the endpoint asked us to wait (`Retry-After` on 429 and 503).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after } | Self::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A stable short name for API problem codes, logs and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Rejected(e) => e.known().map_or("token_rejected", |k| k.code),
            Self::Network { .. } => "token_endpoint_unreachable",
            Self::Timeout { .. } => "token_endpoint_timeout",
            Self::Throttled { .. } => "token_endpoint_throttled",
            Self::Unavailable { .. } => "token_endpoint_unavailable",
            Self::InvalidResponse { .. } => "token_invalid_response",
            Self::Credential(_) => "token_certificate_unusable",
            Self::InsecureEndpoint { .. } => "token_endpoint_insecure",
            Self::ManagedIdentityRefused {
                no_identity: true, ..
            } => "token_managed_identity_not_found",
            Self::ManagedIdentityRefused { .. } => "token_managed_identity_refused",
            Self::Setup(_) => "token_client_setup",
        }
    }

    /// The identity endpoint's refusal, its text first-line only.
    pub fn managed_identity_refused(status: u16, description: String) -> Self {
        // IMDS says "Identity not found"; App Service "Unable to load the proper Managed Identity".
        let lower = description.to_ascii_lowercase();
        let no_identity = lower.contains("identity not found")
            || lower.contains("proper managed identity")
            || lower.contains("no managed identity");
        Self::ManagedIdentityRefused {
            status,
            description,
            no_identity,
        }
    }

    /// Entra's error details, when Entra answered with one.
    pub fn entra(&self) -> Option<&EntraError> {
        match self {
            Self::Rejected(e) => Some(e),
            _ => None,
        }
    }
}

/// Entra ID's error answer, as documented (`error`, `error_codes`, `trace_id`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraError {
    /// The HTTP status it came with (400 or 401).
    pub status: u16,
    /// OAuth2 error, e.g. `invalid_client`.
    pub error: String,
    /// `AADSTS` numbers, e.g. `[7000215]`.
    pub error_codes: Vec<u64>,
    /// Entra's text, first line only (the rest repeats the ids below).
    pub description: String,
    pub trace_id: Option<String>,
    pub correlation_id: Option<String>,
    pub timestamp: Option<String>,
}

impl EntraError {
    /// The first of `error_codes` that this relay can explain.
    pub fn known(&self) -> Option<&'static KnownCode> {
        self.error_codes
            .iter()
            .find_map(|c| KNOWN_ENTRA_CODES.iter().find(|k| k.number == *c))
    }
}

impl fmt::Display for EntraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes = self
            .error_codes
            .iter()
            .map(|c| format!("AADSTS{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let codes = if codes.is_empty() {
            self.error.clone()
        } else {
            format!("{codes}, {}", self.error)
        };
        match self.known() {
            Some(k) => write!(
                f,
                "Entra ID refused the token request ({codes}): {}; fix: {}",
                k.meaning, k.fix
            )?,
            None => write!(
                f,
                "Entra ID refused the token request ({codes}): {}",
                self.description
            )?,
        }
        write!(
            f,
            "{}",
            Ids(self.trace_id.as_deref(), self.correlation_id.as_deref())
        )
    }
}

fn managed_fix(no_identity: bool) -> &'static str {
    if no_identity {
        "turn on the system-assigned managed identity of this VM, app or container app, or assign the user-assigned one and set featureSwitches.sendEmail.oAuthClientId to its client id (leave it empty for the system-assigned identity)"
    } else {
        "check featureSwitches.sendEmail.oAuthManagedIdentity (imds or appService), oAuthTokenEndpoint and oAuthClientId"
    }
}

/// Renders `; retry after Ns` when the endpoint said so.
struct RetryHint(Option<Duration>);

impl fmt::Display for RetryHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, "; it asks to retry after {}s", d.as_secs()),
            None => Ok(()),
        }
    }
}

/// Renders the ids Microsoft support asks for.
struct Ids<'a>(Option<&'a str>, Option<&'a str>);

impl fmt::Display for Ids<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(t), Some(c)) => write!(f, " (trace id {t}, correlation id {c})"),
            (Some(t), None) => write!(f, " (trace id {t})"),
            (None, Some(c)) => write!(f, " (correlation id {c})"),
            (None, None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entra(codes: Vec<u64>) -> EntraError {
        EntraError {
            status: 401,
            error: "invalid_client".into(),
            error_codes: codes,
            description: "AADSTS7000215: Invalid client secret provided.".into(),
            trace_id: Some("t-1".into()),
            correlation_id: Some("c-1".into()),
            timestamp: None,
        }
    }

    #[test]
    fn known_code_explains_cause_and_fix_with_ids() {
        let e = TokenError::Rejected(Box::new(entra(vec![7000215])));
        let text = e.to_string();
        assert!(text.contains("the client secret is wrong"), "{text}");
        assert!(text.contains("value, not its ID"), "{text}");
        assert!(text.contains("AADSTS7000215"), "{text}");
        assert!(text.contains("trace id t-1, correlation id c-1"), "{text}");
        assert_eq!(e.code(), "token_invalid_client_secret");
        assert!(!e.is_transient());
    }

    #[test]
    fn unknown_code_keeps_entras_text() {
        let mut inner = entra(vec![1234567]);
        inner.description = "AADSTS1234567: Something new.".into();
        let e = TokenError::Rejected(Box::new(inner));
        assert!(e.to_string().contains("AADSTS1234567: Something new."));
        assert_eq!(e.code(), "token_rejected");
    }

    #[test]
    fn every_known_code_has_a_distinct_name() {
        let mut names: Vec<_> = KNOWN_ENTRA_CODES.iter().map(|k| k.code).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KNOWN_ENTRA_CODES.len());
    }

    #[test]
    fn transient_kinds() {
        let throttled = TokenError::Throttled {
            retry_after: Some(Duration::from_secs(7)),
        };
        assert!(throttled.is_transient());
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(7)));
        assert!(throttled.to_string().contains("retry after 7s"));
        let garbled = TokenError::InvalidResponse {
            status: 200,
            detail: "x".into(),
            transient: true,
        };
        assert!(garbled.is_transient());
        assert!(!TokenError::Credential("x".into()).is_transient());
    }
}
