//! Who is calling: an API key, a user named by a trusted reverse proxy, or a user's OIDC access token.
//!
//! An API key and a JWT are told apart by shape (a JWT has exactly three dot-separated parts), never by
//! trying one and then the other.

mod api_key;
mod oidc;
mod proxy;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, header};

use api_key::ApiKeyEntry;
pub use api_key::new_api_key;
use oidc::OidcVerifier;

use crate::config::{AddressPattern, AuthSettings, TrustedProxySettings};

/// An authenticated caller.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A service with an API key, limited to its listed From addresses.
    ApiKey {
        name: String,
        allowed_from: Arc<[AddressPattern]>,
    },
    /// An end user, by address, as vouched for by a trusted proxy or an OIDC token.
    User { address: String, via: UserSource },
    /// No credentials, accepted only where settings allow it (the dev default).
    Anonymous,
}

/// How an end user was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSource {
    TrustedProxy,
    Oidc,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ApiKey { name, .. } => write!(f, "API key '{name}'"),
            Self::User { address, .. } => write!(f, "user {address}"),
            Self::Anonymous => f.write_str("anonymous caller"),
        }
    }
}

impl Caller {
    /// A short name for logs and metrics (no address: user addresses are personal data).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ApiKey { .. } => "api_key",
            Self::User {
                via: UserSource::TrustedProxy,
                ..
            } => "proxy_user",
            Self::User {
                via: UserSource::Oidc,
                ..
            } => "oidc_user",
            Self::Anonymous => "anonymous",
        }
    }
}

/// The caller's id for per-caller limits and idempotency scopes: `key:<API key name>`,
/// `user:<address>` or `anonymous`. The prefix keeps an API key named like an address apart
/// from that user.
pub fn caller_id(caller: &Caller) -> String {
    match caller {
        Caller::ApiKey { name, .. } => format!("key:{name}"),
        Caller::User { address, .. } => format!("user:{}", address.to_ascii_lowercase()),
        Caller::Anonymous => "anonymous".to_owned(),
    }
}

/// Why a request is not authenticated. The message is safe to show: it never repeats a credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "no credentials: send `Authorization: Bearer <API key or access token>`{}",
        if *.proxy_configured { " or come through the trusted proxy" } else { "" }
    )]
    Missing { proxy_configured: bool },
    #[error("the Authorization header must be `Bearer <credential>`")]
    Malformed,
    #[error("the API key is not valid")]
    UnknownApiKey,
    #[error("a JWT was presented but no OIDC issuer is configured (mailRelay.auth.oidc)")]
    OidcNotConfigured,
    #[error("the access token is not valid: {0}")]
    InvalidToken(String),
    #[error("the trusted proxy did not send its shared secret")]
    ProxySecretMismatch,
    #[error("the user header from the trusted proxy is not exactly one e-mail address")]
    ProxyUserInvalid,
    #[error(
        "a browser request from the origin {0} may not send as the proxy's logged-in user (cross-site request forgery); \
         an administrator can list the origin in mailRelay.cors.allowedOrigins"
    )]
    ForeignOrigin(String),
    #[error("the issuer's signing keys could not be fetched: {0}")]
    JwksUnavailable(String),
}

impl AuthError {
    /// The `error` attribute of `WWW-Authenticate` (RFC 6750) for this failure.
    pub fn bearer_error(&self) -> Option<&'static str> {
        match self {
            Self::Missing { .. } => None,
            Self::Malformed => Some("invalid_request"),
            _ => Some("invalid_token"),
        }
    }
}

/// Decides who a request comes from.
pub struct Authenticator {
    allow_anonymous: bool,
    /// Origins whose browser pages may send as the proxy's user (`mailRelay.cors.allowedOrigins`).
    allowed_origins: Vec<HeaderValue>,
    api_keys: Vec<ApiKeyEntry>,
    proxy: Option<TrustedProxySettings>,
    oidc: Option<OidcVerifier>,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> Result<Self, reqwest::Error> {
        let api_keys = settings
            .api_keys
            .iter()
            .map(|key| ApiKeyEntry {
                name: key.name.clone(),
                sha256: key.sha256,
                allowed_from: key.allowed_from.clone().into(),
            })
            .collect();
        let oidc = settings.oidc.as_ref().map(OidcVerifier::new).transpose()?;
        Ok(Self {
            allow_anonymous: settings.allow_anonymous,
            allowed_origins: Vec::new(),
            api_keys,
            proxy: settings.trusted_proxy.clone(),
            oidc,
        })
    }

    /// Browser pages from these origins may send as the trusted proxy's user; a request from any
    /// other origin is refused, since the proxy's session cookie rides along on cross-site forms.
    pub fn with_allowed_origins(mut self, origins: &[HeaderValue]) -> Self {
        self.allowed_origins = origins.to_vec();
        self
    }

    /// Authenticate a request whose TCP peer is `peer`. Always the TCP peer, never an address from
    /// `X-Forwarded-For`: the user header is believed because the proxy set it, so the proxy itself
    /// must be the one connecting (`trustedProxy.sources`).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> Result<Caller, AuthError> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let credential = bearer(value.as_bytes()).ok_or(AuthError::Malformed)?;
            return if looks_like_jwt(credential) {
                match &self.oidc {
                    Some(oidc) => oidc.verify(credential).await,
                    None => Err(AuthError::OidcNotConfigured),
                }
            } else {
                self.api_key(credential)
            };
        }
        if let Some(caller) = self.proxy_user(headers, peer)? {
            return Ok(caller);
        }
        if self.allow_anonymous {
            return Ok(Caller::Anonymous);
        }
        Err(AuthError::Missing {
            proxy_configured: self.proxy.is_some(),
        })
    }

    fn api_key(&self, presented: &str) -> Result<Caller, AuthError> {
        api_key::find(&self.api_keys, presented)
    }

    fn proxy_user(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Option<Caller>, AuthError> {
        match &self.proxy {
            Some(proxy) => proxy::user(proxy, &self.allowed_origins, headers, peer),
            None => Ok(None),
        }
    }
}

fn bearer(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, credential) = text.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

fn looks_like_jwt(credential: &str) -> bool {
    credential.split('.').count() == 3 && credential.starts_with("eyJ")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use axum::http::HeaderValue;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::config::{ApiKeySettings, ProxySecret};

    fn settings_with_key(key: &str) -> AuthSettings {
        AuthSettings {
            api_keys: vec![ApiKeySettings {
                name: "billing".into(),
                sha256: Sha256::digest(key.as_bytes()).into(),
                allowed_from: vec![AddressPattern::parse("*@contoso.com").unwrap()],
                identities: Vec::new(),
            }],
            ..AuthSettings::default()
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn a_known_api_key_authenticates_by_name() {
        let (key, _) = new_api_key();
        let auth = Authenticator::new(&settings_with_key(&key)).unwrap();
        let caller = auth
            .authenticate(
                &headers(&[("authorization", &format!("Bearer {key}"))]),
                LOCAL,
            )
            .await;
        match caller.unwrap() {
            Caller::ApiKey { name, allowed_from } => {
                assert_eq!(name, "billing");
                assert_eq!(allowed_from.len(), 1);
            }
            other => panic!("expected an API key caller, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unknown_api_key_is_refused() {
        let auth = Authenticator::new(&settings_with_key("mr_right")).unwrap();
        let result = auth
            .authenticate(&headers(&[("authorization", "Bearer mr_wrong")]), LOCAL)
            .await;
        assert_eq!(result.unwrap_err(), AuthError::UnknownApiKey);
    }

    #[tokio::test]
    async fn no_credentials_are_refused_unless_anonymous_is_allowed() {
        let auth = Authenticator::new(&AuthSettings::default()).unwrap();
        assert!(matches!(
            auth.authenticate(&HeaderMap::new(), LOCAL).await,
            Err(AuthError::Missing { .. })
        ));
        let open = Authenticator::new(&AuthSettings {
            allow_anonymous: true,
            ..AuthSettings::default()
        })
        .unwrap();
        assert!(matches!(
            open.authenticate(&HeaderMap::new(), LOCAL).await,
            Ok(Caller::Anonymous)
        ));
    }

    #[tokio::test]
    async fn a_non_bearer_authorization_is_malformed() {
        let auth = Authenticator::new(&settings_with_key("k")).unwrap();
        let result = auth
            .authenticate(&headers(&[("authorization", "Basic dXNlcjpwYXNz")]), LOCAL)
            .await;
        assert_eq!(result.unwrap_err(), AuthError::Malformed);
    }

    #[tokio::test]
    async fn a_jwt_without_oidc_settings_is_not_tried_as_an_api_key() {
        let auth = Authenticator::new(&settings_with_key("k")).unwrap();
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
        let result = auth
            .authenticate(
                &headers(&[("authorization", &format!("Bearer {jwt}"))]),
                LOCAL,
            )
            .await;
        assert_eq!(result.unwrap_err(), AuthError::OidcNotConfigured);
    }

    fn proxy_settings(secret: Option<&str>) -> AuthSettings {
        AuthSettings {
            trusted_proxy: Some(TrustedProxySettings {
                user_header: http::HeaderName::from_static("x-forwarded-email"),
                sources: vec!["10.0.0.0/8".parse().unwrap()],
                secret: secret.map(|s| ProxySecret {
                    header: http::HeaderName::from_static("x-proxy-secret"),
                    value: s.to_string().into(),
                }),
            }),
            ..AuthSettings::default()
        }
    }

    #[tokio::test]
    async fn the_proxy_header_counts_only_from_a_trusted_source() {
        let auth = Authenticator::new(&proxy_settings(None)).unwrap();
        let h = headers(&[("x-forwarded-email", "Alice@Contoso.com")]);
        let trusted = auth
            .authenticate(&h, "10.1.2.3".parse().unwrap())
            .await
            .unwrap();
        assert!(
            matches!(trusted, Caller::User { ref address, via: UserSource::TrustedProxy } if address == "alice@contoso.com")
        );
        let untrusted = auth.authenticate(&h, "192.0.2.7".parse().unwrap()).await;
        assert!(matches!(
            untrusted,
            Err(AuthError::Missing {
                proxy_configured: true
            })
        ));
    }

    #[tokio::test]
    async fn the_proxy_must_send_its_secret_when_one_is_configured() {
        let auth = Authenticator::new(&proxy_settings(Some("s3cret"))).unwrap();
        let from = "10.0.0.1".parse().unwrap();
        let without = headers(&[("x-forwarded-email", "alice@contoso.com")]);
        assert_eq!(
            auth.authenticate(&without, from).await.unwrap_err(),
            AuthError::ProxySecretMismatch
        );
        let wrong = headers(&[
            ("x-forwarded-email", "alice@contoso.com"),
            ("x-proxy-secret", "nope"),
        ]);
        assert_eq!(
            auth.authenticate(&wrong, from).await.unwrap_err(),
            AuthError::ProxySecretMismatch
        );
        let right = headers(&[
            ("x-forwarded-email", "alice@contoso.com"),
            ("x-proxy-secret", "s3cret"),
        ]);
        assert!(auth.authenticate(&right, from).await.is_ok());
    }

    #[test]
    fn caller_ids_keep_keys_and_users_apart() {
        let user = Caller::User {
            address: "Alice@Contoso.com".into(),
            via: UserSource::TrustedProxy,
        };
        assert_eq!(caller_id(&user), "user:alice@contoso.com");
        assert_eq!(
            caller_id(&Caller::ApiKey {
                name: "alice@contoso.com".into(),
                allowed_from: Arc::from(Vec::new()),
            }),
            "key:alice@contoso.com"
        );
        assert_eq!(caller_id(&Caller::Anonymous), "anonymous");
    }
}
