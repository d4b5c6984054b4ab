//! Users' OIDC access tokens: validated against the issuer's signing keys (JWKS), fetched over
//! HTTPS and cached, with a bounded refetch for an unknown `kid`.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::{AuthError, Caller, UserSource};
use crate::config::OidcSettings;
use crate::message::EmailAddress;

/// An unknown `kid` triggers at most one JWKS refetch per this interval.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Keys are refetched after this even when every `kid` is known (key rotation).
const JWKS_MAX_AGE: Duration = Duration::from_secs(3600);

/// Validates user access tokens against the issuer's JWKS, fetched over HTTPS and cached.
pub(super) struct OidcVerifier {
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
    pub(super) fn new(settings: &OidcSettings) -> Result<Self, reqwest::Error> {
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

    pub(super) async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
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
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use std::net::{IpAddr, Ipv4Addr};

    use axum::http::{HeaderMap, HeaderValue};

    use super::*;
    use crate::caller::{AuthError, Authenticator, Caller};
    use crate::config::AuthSettings;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

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
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
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
