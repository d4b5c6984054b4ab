//! Who is calling: an API key, a user named by a trusted reverse proxy, or a user's OIDC access token.
//!
//! An API key and a JWT are told apart by shape (a JWT has exactly three dot-separated parts), never by
//! trying one and then the other.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::RngCore;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AddressPattern, AuthSettings, OidcSettings, TrustedProxySettings};
use crate::message::EmailAddress;

/// Prefix of keys made by `mail-relay hash-key`, so they are recognisable in secret scanners.
const API_KEY_PREFIX: &str = "mr_";
/// An unknown `kid` triggers at most one JWKS refetch per this interval.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Keys are refetched after this even when every `kid` is known (key rotation).
const JWKS_MAX_AGE: Duration = Duration::from_secs(3600);

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

struct ApiKeyEntry {
    name: String,
    sha256: [u8; 32],
    allowed_from: Arc<[AddressPattern]>,
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
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare with every key, in constant time, so timing tells nothing about near matches.
        let mut found = None;
        for entry in &self.api_keys {
            if bool::from(entry.sha256.ct_eq(&digest)) {
                found = Some(entry);
            }
        }
        found
            .map(|entry| Caller::ApiKey {
                name: entry.name.clone(),
                allowed_from: entry.allowed_from.clone(),
            })
            .ok_or(AuthError::UnknownApiKey)
    }

    /// The proxy's user header counts only from a configured source; from anywhere else it is ignored.
    fn proxy_user(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Option<Caller>, AuthError> {
        let Some(proxy) = &self.proxy else {
            return Ok(None);
        };
        let Some(value) = headers.get(&proxy.user_header) else {
            return Ok(None);
        };
        if !proxy.sources.iter().any(|net| net.contains(&peer)) {
            tracing::warn!(%peer, header = %proxy.user_header, "user header from an untrusted address ignored");
            return Ok(None);
        }
        if let Some(secret) = &proxy.secret {
            let sent = headers
                .get(&secret.header)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !bool::from(sent.ct_eq(secret.value.expose_secret().as_bytes())) {
                return Err(AuthError::ProxySecretMismatch);
            }
        }
        // A proxy that appends rather than replaces would let the client's own header come first.
        if headers.get_all(&proxy.user_header).iter().count() != 1 {
            return Err(AuthError::ProxyUserInvalid);
        }
        let address = value
            .to_str()
            .map_err(|_| AuthError::ProxyUserInvalid)?
            .trim();
        if address.contains([',', ';', '<', '>', '"']) {
            return Err(AuthError::ProxyUserInvalid);
        }
        // Parsed as From addresses are, so an IDN domain compares in the same (punycode) form.
        let address = EmailAddress::parse(address).map_err(|_| AuthError::ProxyUserInvalid)?;
        // Form posts are "simple" requests that browsers send cross-site without asking, with
        // the proxy's cookie: only listed origins may send as the logged-in user.
        if let Some(origin) = headers.get(header::ORIGIN)
            && !self.allowed_origins.contains(origin)
        {
            return Err(AuthError::ForeignOrigin(
                String::from_utf8_lossy(origin.as_bytes()).into_owned(),
            ));
        }
        Ok(Some(Caller::User {
            address: address.as_str().to_ascii_lowercase(),
            via: UserSource::TrustedProxy,
        }))
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

/// A new random API key and the SHA-256 (hex) to put in the settings: `(key, hash)`.
pub fn new_api_key() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("{API_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    (key, hash)
}

/// Validates user access tokens against the issuer's JWKS, fetched over HTTPS and cached.
struct OidcVerifier {
    settings: OidcSettings,
    client: reqwest::Client,
    keys: RwLock<CachedKeys>,
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct CachedKeys {
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched: Option<Instant>,
    /// Last fetch attempt, failed ones too: the refetch limit counts from it.
    attempted: Option<Instant>,
}

/// Asymmetric algorithms only: an HMAC `alg` with a public key is the classic confusion attack.
const ACCEPTED_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
];

impl OidcVerifier {
    fn new(settings: &OidcSettings) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("mail-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            settings: settings.clone(),
            client,
            keys: RwLock::new(CachedKeys::default()),
            refresh: tokio::sync::Mutex::new(()),
        })
    }

    async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        if !ACCEPTED_ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::InvalidToken(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError::InvalidToken("the token has no `kid`".into()))?;
        let (key, key_alg) = self.key(&kid).await?;
        if key_alg.is_some_and(|alg| alg != header.alg) {
            return Err(AuthError::InvalidToken(
                "the token's algorithm does not match its key".into(),
            ));
        }
        let mut validation = Validation::new(header.alg);
        // jsonwebtoken checks `iss` and `aud` only when present: require them.
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.settings.clock_skew.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&[&self.settings.audience]);
        validation.set_issuer(&[&self.settings.issuer]);
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(|e| AuthError::InvalidToken(e.to_string()))?
        .claims;
        let address = claims
            .get(&self.settings.user_claim)
            .and_then(serde_json::Value::as_str)
            .and_then(|a| EmailAddress::parse(a).ok())
            .ok_or_else(|| {
                AuthError::InvalidToken(format!(
                    "the claim `{}` is missing or not an e-mail address",
                    self.settings.user_claim
                ))
            })?;
        // `email` can be set by users themselves in some directories (Entra's "nOAuth"): only a
        // verified one names the user.
        if self.settings.user_claim == "email"
            && claims.get("email_verified") != Some(&serde_json::Value::Bool(true))
        {
            return Err(AuthError::InvalidToken(
                "the `email` claim is not marked `email_verified: true`; use preferred_username or upn".into(),
            ));
        }
        Ok(Caller::User {
            address: address.as_str().to_ascii_lowercase(),
            via: UserSource::Oidc,
        })
    }

    /// The key for `kid`, refetching the JWKS when the `kid` is unknown (key rotation) or the set is old.
    async fn key(&self, kid: &str) -> Result<(DecodingKey, Option<Algorithm>), AuthError> {
        if let Some(found) = self.cached(kid, JWKS_MAX_AGE) {
            return Ok(found);
        }
        // Single flight: one fetch at a time; whoever waited re-checks the cache first.
        let _guard = self.refresh.lock().await;
        if let Some(found) = self.cached(kid, JWKS_MAX_AGE) {
            return Ok(found);
        }
        let recently = self
            .read_keys()
            .attempted
            .is_some_and(|at| at.elapsed() < JWKS_MIN_REFRESH);
        if !recently {
            let fetched = self.fetch().await;
            let mut keys = self
                .keys
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            keys.attempted = Some(Instant::now());
            match fetched {
                Ok(fetched) => *keys = fetched,
                // While the issuer is unreachable, the keys already known still verify tokens.
                Err(e) if keys.by_kid.contains_key(kid) => {
                    tracing::warn!(error = %e, "JWKS refresh failed; using the keys fetched before");
                }
                Err(e) => return Err(e),
            }
        }
        self.cached(kid, Duration::MAX).ok_or_else(|| {
            AuthError::InvalidToken("signed by a key the issuer does not publish".into())
        })
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, CachedKeys> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, kid: &str, max_age: Duration) -> Option<(DecodingKey, Option<Algorithm>)> {
        let keys = self.read_keys();
        let fresh = keys.fetched.is_some_and(|at| at.elapsed() < max_age);
        fresh.then(|| keys.by_kid.get(kid).cloned()).flatten()
    }

    async fn fetch(&self) -> Result<CachedKeys, AuthError> {
        let unavailable =
            |e: reqwest::Error| AuthError::JwksUnavailable(e.without_url().to_string());
        let set: JwkSet = self
            .client
            .get(self.settings.jwks_uri.clone())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)?;
        let by_kid = set
            .keys
            .iter()
            // Encryption keys never verify a signature.
            .filter(|jwk| {
                jwk.common.public_key_use != Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            })
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                let alg = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse::<Algorithm>().ok());
                DecodingKey::from_jwk(jwk).ok().map(|key| (kid, (key, alg)))
            })
            .collect();
        Ok(CachedKeys {
            by_kid,
            fetched: Some(Instant::now()),
            attempted: Some(Instant::now()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use axum::http::HeaderValue;

    use super::*;
    use crate::config::{ApiKeySettings, ProxySecret};

    fn settings_with_key(key: &str) -> AuthSettings {
        AuthSettings {
            api_keys: vec![ApiKeySettings {
                name: "billing".into(),
                sha256: Sha256::digest(key.as_bytes()).into(),
                allowed_from: vec![AddressPattern::parse("*@contoso.com").unwrap()],
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
    fn new_api_keys_are_random_and_hash_to_their_hash() {
        let (a, hash_a) = new_api_key();
        let (b, _) = new_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with(API_KEY_PREFIX) && !a.contains('.'));
        assert_eq!(hash_a, hex::encode(Sha256::digest(a.as_bytes())));
    }

    mod oidc {
        use jsonwebtoken::{EncodingKey, Header};
        use serde_json::json;
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};

        use super::*;

        const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        const ISSUER: &str = "https://login.example.test/tenant/v2.0";
        const AUDIENCE: &str = "api://mail-relay";

        async fn jwks_server(expected_fetches: u64) -> MockServer {
            let server = MockServer::start().await;
            let jwks = std::fs::read_to_string(format!("{FIXTURES}/oidc-jwks.json")).unwrap();
            Mock::given(method("GET"))
                .and(path("/keys"))
                .respond_with(ResponseTemplate::new(200).set_body_raw(jwks, "application/json"))
                .expect(expected_fetches)
                .mount(&server)
                .await;
            server
        }

        fn authenticator(server: &MockServer) -> Authenticator {
            Authenticator::new(&AuthSettings {
                oidc: Some(OidcSettings {
                    issuer: ISSUER.into(),
                    audience: AUDIENCE.into(),
                    jwks_uri: format!("{}/keys", server.uri()).parse().unwrap(),
                    user_claim: "preferred_username".into(),
                    clock_skew: Duration::from_secs(30),
                }),
                ..AuthSettings::default()
            })
            .unwrap()
        }

        fn token(key_file: &str, kid: &str, claims: serde_json::Value) -> String {
            let pem = std::fs::read(format!("{FIXTURES}/{key_file}")).unwrap();
            let mut header = Header::new(Algorithm::RS256);
            header.kid = Some(kid.into());
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap())
                .unwrap()
        }

        fn claims(aud: &str, exp_offset: i64) -> serde_json::Value {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            json!({"iss": ISSUER, "aud": aud, "iat": now, "nbf": now - 5, "exp": now + exp_offset,
                   "preferred_username": "Alice@Contoso.com"})
        }

        async fn verify(auth: &Authenticator, jwt: &str) -> Result<Caller, AuthError> {
            auth.authenticate(
                &headers(&[("authorization", &format!("Bearer {jwt}"))]),
                LOCAL,
            )
            .await
        }

        #[tokio::test]
        async fn a_valid_token_names_the_user_and_the_keys_are_fetched_once() {
            let server = jwks_server(1).await;
            let auth = authenticator(&server);
            for _ in 0..3 {
                let jwt = token("oidc-signing-key.pem", "test-key-1", claims(AUDIENCE, 600));
                let caller = verify(&auth, &jwt).await.unwrap();
                assert!(
                    matches!(caller, Caller::User { ref address, via: UserSource::Oidc } if address == "alice@contoso.com")
                );
            }
        }

        #[tokio::test]
        async fn a_wrong_audience_is_refused() {
            let server = jwks_server(1).await;
            let jwt = token(
                "oidc-signing-key.pem",
                "test-key-1",
                claims("api://someone-else", 600),
            );
            let err = verify(&authenticator(&server), &jwt).await.unwrap_err();
            assert!(
                matches!(err, AuthError::InvalidToken(ref m) if m.contains("Audience")),
                "{err}"
            );
        }

        #[tokio::test]
        async fn a_token_without_audience_or_issuer_is_refused() {
            let server = jwks_server(1).await;
            let auth = authenticator(&server);
            for missing in ["aud", "iss"] {
                let mut claims = claims(AUDIENCE, 600);
                claims.as_object_mut().unwrap().remove(missing);
                let jwt = token("oidc-signing-key.pem", "test-key-1", claims);
                let err = verify(&auth, &jwt).await.unwrap_err();
                assert!(
                    matches!(err, AuthError::InvalidToken(_)),
                    "{missing}: {err}"
                );
            }
        }

        #[tokio::test]
        async fn an_expired_token_is_refused() {
            let server = jwks_server(1).await;
            let jwt = token(
                "oidc-signing-key.pem",
                "test-key-1",
                claims(AUDIENCE, -3600),
            );
            let err = verify(&authenticator(&server), &jwt).await.unwrap_err();
            assert!(
                matches!(err, AuthError::InvalidToken(ref m) if m.contains("Expired")),
                "{err}"
            );
        }

        #[tokio::test]
        async fn a_token_signed_by_an_unpublished_key_is_refused() {
            let server = jwks_server(1).await;
            let auth = authenticator(&server);
            let unknown_kid = token("oidc-unknown-key.pem", "rotated-key", claims(AUDIENCE, 600));
            let err = verify(&auth, &unknown_kid).await.unwrap_err();
            assert!(
                matches!(err, AuthError::InvalidToken(ref m) if m.contains("does not publish")),
                "{err}"
            );
            // Same kid as the published key, but another key signed it.
            let forged = token("oidc-unknown-key.pem", "test-key-1", claims(AUDIENCE, 600));
            let err = verify(&auth, &forged).await.unwrap_err();
            assert!(
                matches!(err, AuthError::InvalidToken(ref m) if m.contains("InvalidSignature")),
                "{err}"
            );
        }

        #[tokio::test]
        async fn an_hmac_token_is_refused_without_fetching_keys() {
            let server = jwks_server(0).await;
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some("test-key-1".into());
            let jwt = jsonwebtoken::encode(
                &header,
                &claims(AUDIENCE, 600),
                &EncodingKey::from_secret(b"k"),
            )
            .unwrap();
            let err = verify(&authenticator(&server), &jwt).await.unwrap_err();
            assert!(
                matches!(err, AuthError::InvalidToken(ref m) if m.contains("not accepted")),
                "{err}"
            );
        }
    }
}
