//! The token cache against a fake Entra ID.

use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::join_all;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mail_relay::clock::{Clock, ManualClock};
use mail_relay::config::{
    CertificateCredential, CertificateError, ClientCredential, OAuthSettings,
};
use mail_relay::token::{
    ASSERTION_TYPE, AssertionClaims, CacheOptions, RetryPolicy, TokenCache, TokenError,
    TokenProvider,
};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use wiremock::ResponseTemplate;

use crate::entra::{
    CLIENT_ID, CLIENT_SECRET, CORRELATION_ID, FakeEntra, SCOPE, TRACE_ID, error_response, field,
    form_fields, token_response,
};

/// Short back-off so retry tests take milliseconds.
fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        max_wait: Duration::from_secs(5),
    }
}

fn cache_with(oauth: &OAuthSettings, clock: Option<&ManualClock>) -> Arc<TokenCache> {
    let mut options = CacheOptions {
        retry: fast_retry(),
        ..CacheOptions::default()
    };
    if let Some(clock) = clock {
        options.clock = Arc::new(clock.clone());
    }
    Arc::new(TokenCache::with_options(oauth, options).unwrap())
}

async fn wait_for_fetches(cache: &TokenCache, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.state().fetch_count < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} fetches, saw {}",
            cache.state().fetch_count
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_on_an_empty_cache_cause_exactly_one_request() {
    let entra = FakeEntra::start().await;
    FakeEntra::token_request()
        .respond_with(token_response("tok-one", 3599).set_delay(Duration::from_millis(200)))
        .expect(1)
        .mount(&entra.server)
        .await;
    let cache = cache_with(&entra.oauth_settings(), None);

    let results = join_all((0..200).map(|_| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.token().await })
    }))
    .await;

    let tokens: Vec<_> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert!(tokens.iter().all(|t| t.same_as(&tokens[0])));
    assert_eq!(tokens[0].expose(), "tok-one");
    assert_eq!(cache.state().fetch_count, 1);
    entra.server.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_failed_fetch() {
    let entra = FakeEntra::start().await;
    FakeEntra::token_request()
        .respond_with(error_response(7000215).set_delay(Duration::from_millis(200)))
        .expect(1)
        .mount(&entra.server)
        .await;
    let cache = cache_with(&entra.oauth_settings(), None);

    let results = join_all((0..100).map(|_| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.token().await })
    }))
    .await;

    for result in results {
        assert_eq!(
            result.unwrap().unwrap_err().code(),
            "token_invalid_client_secret"
        );
    }
    entra.server.verify().await;
}

#[tokio::test]
async fn after_a_failure_callers_get_the_error_without_a_request_until_the_back_off_ends() {
    let entra = FakeEntra::start().await;
    entra.mount_error(7000215).await;
    let clock = ManualClock::at(SystemTime::now());
    let cache = cache_with(&entra.oauth_settings(), Some(&clock));

    assert!(cache.token().await.is_err());
    assert!(cache.token().await.is_err());
    assert_eq!(entra.fetch_count().await, 1);
    let state = cache.state();
    assert!(!state.has_token);
    assert_eq!(state.fetch_count, 1);
    assert!(state.last_error.unwrap().contains("AADSTS7000215"));

    clock.advance(Duration::from_secs(1));
    assert!(cache.token().await.is_err());
    assert_eq!(entra.fetch_count().await, 2);
}

#[tokio::test]
async fn a_fresh_token_is_reused_and_one_inside_its_grace_time_is_replaced() {
    let entra = FakeEntra::start().await;
    entra.mount_token_once("tok-1", 3600).await;
    entra.mount_token("tok-2", 3600).await;
    let clock = ManualClock::at(SystemTime::now());
    let cache = cache_with(&entra.oauth_settings(), Some(&clock));

    let first = cache.token().await.unwrap();
    assert_eq!(first.expose(), "tok-1");
    let state = cache.state();
    assert!(state.has_token);
    assert_eq!(
        state.expires_at,
        Some(clock.now() + Duration::from_secs(3600))
    );

    // Well before expiry - grace (and before the refresh-ahead point): reused.
    clock.advance(Duration::from_secs(600));
    assert!(cache.token().await.unwrap().same_as(&first));
    assert_eq!(entra.fetch_count().await, 1);

    // 200 s before expiry, inside the 300 s grace time: a new one.
    clock.advance(Duration::from_secs(2800));
    let second = cache.token().await.unwrap();
    assert_eq!(second.expose(), "tok-2");
    assert_eq!(entra.fetch_count().await, 2);
}

#[tokio::test]
async fn the_refresher_fetches_ahead_while_callers_keep_the_fresh_token() {
    let entra = FakeEntra::start().await;
    entra.mount_token_once("tok-1", 3600).await;
    entra.mount_token("tok-2", 3600).await;
    let clock = ManualClock::at(SystemTime::now());
    let cache = cache_with(&entra.oauth_settings(), Some(&clock));
    let first = cache.token().await.unwrap();

    // Past the refresh-ahead point (80 % of the 3300 s before the grace time), not yet stale.
    clock.advance(Duration::from_secs(3000));
    let during = cache.token().await.unwrap();
    assert!(
        during.same_as(&first),
        "the caller must not wait for the refresh"
    );

    wait_for_fetches(&cache, 2).await;
    // Wait until the new token is in place (the fetch count rises before it is stored).
    let deadline = Instant::now() + Duration::from_secs(5);
    let next = loop {
        let t = cache.token().await.unwrap();
        if !t.same_as(&first) {
            break t;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(next.expose(), "tok-2");
    assert_eq!(entra.fetch_count().await, 2);
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_valid_token_and_an_expired_one_gives_the_typed_error() {
    let entra = FakeEntra::start().await;
    entra.mount_token_once("tok-1", 3600).await;
    entra.mount_error(7000222).await;
    let clock = ManualClock::at(SystemTime::now());
    let cache = cache_with(&entra.oauth_settings(), Some(&clock));
    let first = cache.token().await.unwrap();

    // Inside the grace time: the refresh fails, the still-valid token is served.
    clock.advance(Duration::from_secs(3400));
    let kept = cache.token().await.unwrap();
    assert!(kept.same_as(&first));
    assert_eq!(entra.fetch_count().await, 2);
    let state = cache.state();
    assert!(state.has_token);
    assert!(
        state.last_error.as_deref().unwrap().contains("has expired"),
        "{state:?}"
    );
    // Backing off: the next caller gets the valid token without a new request.
    assert!(cache.token().await.unwrap().same_as(&first));
    assert_eq!(entra.fetch_count().await, 2);

    // Expired: no token to fall back on, the caller gets Entra's error.
    clock.advance(Duration::from_secs(300));
    let error = cache.token().await.unwrap_err();
    assert_eq!(error.code(), "token_client_secret_expired");
    assert!(!error.is_transient());
    assert!(!cache.state().has_token);
    // 400-class errors are not retried.
    assert_eq!(entra.fetch_count().await, 3);
}

#[tokio::test]
async fn throttling_with_retry_after_is_retried_after_waiting() {
    let entra = FakeEntra::start().await;
    FakeEntra::token_request()
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&entra.server)
        .await;
    entra.mount_token("tok-after-429", 3599).await;
    let cache = cache_with(&entra.oauth_settings(), None);

    let started = Instant::now();
    let token = cache.token().await.unwrap();
    assert_eq!(token.expose(), "tok-after-429");
    assert_eq!(entra.fetch_count().await, 2);
    // Retry-After is a lower bound: the second request may not come sooner.
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_long_retry_after_fails_at_once_and_is_honoured_by_later_callers() {
    let entra = FakeEntra::start().await;
    FakeEntra::token_request()
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "120"))
        .expect(1)
        .mount(&entra.server)
        .await;
    let cache = cache_with(&entra.oauth_settings(), None);

    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, TokenError::Throttled { .. }), "{error:?}");
    assert!(error.is_transient());
    assert_eq!(error.retry_after(), Some(Duration::from_secs(120)));
    let again = cache.token().await.unwrap_err();
    assert!(matches!(again, TokenError::Throttled { .. }));
    entra.server.verify().await;
}

#[tokio::test]
async fn server_errors_are_retried_with_back_off() {
    let entra = FakeEntra::start().await;
    FakeEntra::token_request()
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&entra.server)
        .await;
    entra.mount_token("tok-after-503", 3599).await;
    let cache = cache_with(&entra.oauth_settings(), None);

    assert_eq!(cache.token().await.unwrap().expose(), "tok-after-503");
    assert_eq!(entra.fetch_count().await, 3);
}

#[tokio::test]
async fn persistent_server_errors_give_up_after_the_attempts() {
    let entra = FakeEntra::start().await;
    FakeEntra::token_request()
        .respond_with(
            ResponseTemplate::new(500).set_body_raw(
                format!(r#"{{"error":"server_error","trace_id":"{TRACE_ID}","correlation_id":"{CORRELATION_ID}"}}"#),
                "application/json",
            ),
        )
        .expect(3)
        .mount(&entra.server)
        .await;
    let cache = cache_with(&entra.oauth_settings(), None);

    let error = cache.token().await.unwrap_err();
    assert!(
        matches!(error, TokenError::Unavailable { status: 500, .. }),
        "{error:?}"
    );
    assert!(error.is_transient());
    assert!(error.to_string().contains(TRACE_ID));
    entra.server.verify().await;
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_transient_network_error_after_the_attempts() {
    let entra = FakeEntra::start().await;
    let mut oauth = entra.oauth_settings();
    // Nothing listens on a port just freed.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    oauth.token_endpoint = format!("http://127.0.0.1:{port}/t/oauth2/v2.0/token")
        .parse()
        .unwrap();
    let cache = cache_with(&oauth, None);

    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, TokenError::Network { .. }), "{error:?}");
    assert!(error.is_transient());
    assert_eq!(error.code(), "token_endpoint_unreachable");
    assert_eq!(cache.state().fetch_count, 3);
}

#[tokio::test]
async fn a_slow_endpoint_is_a_timeout() {
    let entra = FakeEntra::start().await;
    FakeEntra::token_request()
        .respond_with(token_response("late", 3599).set_delay(Duration::from_secs(3)))
        .mount(&entra.server)
        .await;
    let mut oauth = entra.oauth_settings();
    oauth.request_timeout = Duration::from_millis(300);
    let cache = Arc::new(
        TokenCache::with_options(
            &oauth,
            CacheOptions {
                retry: RetryPolicy {
                    attempts: 1,
                    ..fast_retry()
                },
                ..CacheOptions::default()
            },
        )
        .unwrap(),
    );

    let error = cache.token().await.unwrap_err();
    assert!(
        matches!(error, TokenError::Timeout { timeout, .. } if timeout == Duration::from_millis(300)),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("raise mailRelay.token.requestTimeoutSeconds"),
        "{error}"
    );
    assert!(error.is_transient());
}

#[tokio::test]
async fn each_entra_error_is_typed_explained_and_not_retried() {
    let cases: &[(u64, &str, &str)] = &[
        (
            7000215,
            "token_invalid_client_secret",
            "the client secret is wrong; fix: set oAuthClientSecret to the secret's value, not its ID",
        ),
        (
            7000222,
            "token_client_secret_expired",
            "create a new client secret",
        ),
        (700016, "token_application_not_found", "check oAuthClientId"),
        (90002, "token_tenant_not_found", "check oAuthTenantId"),
        (
            70011,
            "token_invalid_scope",
            "https://outlook.office365.com/.default",
        ),
        (
            500011,
            "token_resource_principal_not_found",
            "Exchange Online",
        ),
        (700027, "token_invalid_client_assertion", "does not match"),
        (7000112, "token_application_disabled", "disabled"),
        (
            53003,
            "token_blocked_by_conditional_access",
            "Conditional Access",
        ),
        (
            900144,
            "token_request_missing_parameter",
            "bug in mail-relay",
        ),
    ];
    for (code, name, fix) in cases {
        let entra = FakeEntra::start().await;
        FakeEntra::token_request()
            .respond_with(error_response(*code))
            .expect(1)
            .mount(&entra.server)
            .await;
        let cache = cache_with(&entra.oauth_settings(), None);

        let error = cache.token().await.unwrap_err();
        assert_eq!(error.code(), *name, "{code}");
        assert!(!error.is_transient(), "{code}");
        let entra_error = error.entra().expect("an Entra error");
        assert_eq!(entra_error.error_codes, vec![*code]);
        assert_eq!(entra_error.trace_id.as_deref(), Some(TRACE_ID));
        assert_eq!(entra_error.correlation_id.as_deref(), Some(CORRELATION_ID));
        assert!(
            entra_error
                .description
                .starts_with(&format!("AADSTS{code}:"))
        );
        let text = error.to_string();
        assert!(text.contains(fix), "{code}: {text}");
        assert!(text.contains(&format!("AADSTS{code}")), "{text}");
        assert!(
            text.contains(TRACE_ID) && text.contains(CORRELATION_ID),
            "{text}"
        );
        assert!(!text.contains(CLIENT_SECRET));
        entra.server.verify().await;
    }
}

#[tokio::test]
async fn an_unknown_entra_code_keeps_entras_text() {
    let entra = FakeEntra::start().await;
    entra.mount_error(9999999).await;
    let cache = cache_with(&entra.oauth_settings(), None);
    let error = cache.token().await.unwrap_err();
    assert_eq!(error.code(), "token_rejected");
    assert!(
        error
            .to_string()
            .contains("AADSTS9999999: Something the relay has no explanation for"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_forces_exactly_one_new_fetch_under_concurrency() {
    let entra = FakeEntra::start().await;
    entra.mount_token_once("tok-old", 3599).await;
    FakeEntra::token_request()
        .respond_with(token_response("tok-new", 3599).set_delay(Duration::from_millis(100)))
        .mount(&entra.server)
        .await;
    let cache = cache_with(&entra.oauth_settings(), None);
    let old = cache.token().await.unwrap();

    // Every SMTP connection that used the old token reports it at once.
    let results = join_all((0..50).map(|_| {
        let (cache, old) = (cache.clone(), old.clone());
        tokio::spawn(async move {
            cache.invalidate(&old);
            cache.token().await
        })
    }))
    .await;
    let tokens: Vec<_> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert!(tokens.iter().all(|t| t.expose() == "tok-new"));
    assert!(tokens.iter().all(|t| t.same_as(&tokens[0])));
    assert_eq!(entra.fetch_count().await, 2);

    // A late invalidate of the replaced token changes nothing.
    cache.invalidate(&old);
    assert!(cache.token().await.unwrap().same_as(&tokens[0]));
    assert_eq!(entra.fetch_count().await, 2);

    // Invalidating the current one does.
    cache.invalidate(&tokens[0]);
    let newest = cache.token().await.unwrap();
    assert!(!newest.same_as(&tokens[0]));
    assert_eq!(entra.fetch_count().await, 3);
}

#[tokio::test]
async fn invalidate_fetches_at_once_even_while_backing_off_from_a_failed_refresh() {
    let entra = FakeEntra::start().await;
    entra.mount_token_once("tok-1", 3600).await;
    FakeEntra::token_request()
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&entra.server)
        .await;
    entra.mount_token("tok-2", 3600).await;
    let clock = ManualClock::at(SystemTime::now());
    let cache = cache_with(&entra.oauth_settings(), Some(&clock));
    let first = cache.token().await.unwrap();

    clock.advance(Duration::from_secs(3400));
    assert!(cache.token().await.unwrap().same_as(&first));
    assert_eq!(entra.fetch_count().await, 2);

    cache.invalidate(&first);
    assert_eq!(cache.token().await.unwrap().expose(), "tok-2");
    assert_eq!(entra.fetch_count().await, 3);
}

#[tokio::test]
async fn expires_in_as_a_string_is_accepted() {
    let entra = FakeEntra::start().await;
    FakeEntra::token_request()
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            r#"{"token_type":"Bearer","expires_in":"3599","ext_expires_in":"3599","access_token":"tok-str"}"#,
            "application/json",
        ))
        .mount(&entra.server)
        .await;
    let clock = ManualClock::at(SystemTime::now());
    let cache = cache_with(&entra.oauth_settings(), Some(&clock));
    let token = cache.token().await.unwrap();
    assert_eq!(token.expose(), "tok-str");
    assert_eq!(token.expires_at(), clock.now() + Duration::from_secs(3599));
}

#[tokio::test]
async fn a_200_without_access_token_is_an_error() {
    let entra = FakeEntra::start().await;
    FakeEntra::token_request()
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599}"#,
            "application/json",
        ))
        .expect(1)
        .mount(&entra.server)
        .await;
    let cache = cache_with(&entra.oauth_settings(), None);
    let error = cache.token().await.unwrap_err();
    assert!(
        matches!(error, TokenError::InvalidResponse { status: 200, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("access_token"));
    assert!(!error.is_transient());
    entra.server.verify().await;
}

#[tokio::test]
async fn secret_mode_posts_the_client_credentials_form() {
    let entra = FakeEntra::start().await;
    entra.mount_token("tok", 3599).await;
    let cache = cache_with(&entra.oauth_settings(), None);
    cache.token().await.unwrap();

    let requests = entra.requests().await;
    let request = &requests[0];
    let content_type = request
        .headers
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(content_type, "application/x-www-form-urlencoded");
    let agent = request.headers.get("user-agent").unwrap().to_str().unwrap();
    assert_eq!(agent, concat!("mail-relay/", env!("CARGO_PKG_VERSION")));
    let fields = form_fields(request);
    assert_eq!(field(&fields, "grant_type"), Some("client_credentials"));
    assert_eq!(field(&fields, "client_id"), Some(CLIENT_ID));
    assert_eq!(field(&fields, "client_secret"), Some(CLIENT_SECRET));
    assert_eq!(field(&fields, "scope"), Some(SCOPE));
    assert_eq!(field(&fields, "client_assertion"), None);
    assert_eq!(fields.len(), 4);
}

#[tokio::test]
async fn a_remote_plain_http_endpoint_is_refused() {
    let entra = FakeEntra::start().await;
    let mut oauth = entra.oauth_settings();
    oauth.token_endpoint = "http://login.example.com/t/oauth2/v2.0/token"
        .parse()
        .unwrap();
    let error = TokenCache::new(&oauth).unwrap_err();
    assert_eq!(error.code(), "token_endpoint_insecure");
}

/// A throw-away RSA key and self-signed certificate, made with the `openssl` CLI for this test only.
pub(crate) struct TestCertificate {
    pub(crate) certificate_pem: String,
    pub(crate) private_key_pem: String,
    der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestCertificate {
    /// The pair as the settings hold it, parsed and checked.
    pub(crate) fn credential(&self) -> ClientCredential {
        ClientCredential::Certificate(
            CertificateCredential::from_pem(
                &self.certificate_pem,
                &SecretString::from(self.private_key_pem.clone()),
            )
            .unwrap(),
        )
    }
}

pub(crate) fn make_certificate() -> TestCertificate {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let cert = dir.path().join("cert.pem");
    let der = dir.path().join("cert.der");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=mail-relay test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let status = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&cert)
        .arg("-out")
        .arg(&der)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    TestCertificate {
        certificate_pem: std::fs::read_to_string(&cert).unwrap(),
        private_key_pem: std::fs::read_to_string(&key).unwrap(),
        der: std::fs::read(&der).unwrap(),
        _dir: dir,
    }
}

#[tokio::test]
async fn certificate_mode_sends_a_signed_client_assertion() {
    let certificate = make_certificate();
    let entra = FakeEntra::start().await;
    entra.mount_token("tok-cert", 3599).await;
    let oauth = entra.oauth_settings_with(certificate.credential());
    let cache = cache_with(&oauth, None);
    assert_eq!(cache.token().await.unwrap().expose(), "tok-cert");

    let requests = entra.requests().await;
    let fields = form_fields(&requests[0]);
    assert_eq!(field(&fields, "grant_type"), Some("client_credentials"));
    assert_eq!(field(&fields, "client_id"), Some(CLIENT_ID));
    assert_eq!(field(&fields, "scope"), Some(SCOPE));
    assert_eq!(field(&fields, "client_secret"), None);
    assert_eq!(
        field(&fields, "client_assertion_type"),
        Some(ASSERTION_TYPE)
    );
    let assertion = field(&fields, "client_assertion").unwrap();

    let header = jsonwebtoken::decode_header(assertion).unwrap();
    assert_eq!(header.alg, Algorithm::PS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let thumbprint = URL_SAFE_NO_PAD.encode(Sha256::digest(&certificate.der));
    assert_eq!(header.x5t_s256.as_deref(), Some(thumbprint.as_str()));

    let public = DecodingKey::from_rsa_pem(certificate.certificate_pem.as_bytes()).unwrap();
    let token_url = entra.token_url().to_string();
    let mut validation = Validation::new(Algorithm::PS256);
    validation.set_audience(&[&token_url]);
    validation.set_issuer(&[CLIENT_ID]);
    validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
    let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &public, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims.aud, token_url);
    assert_eq!(claims.sub, CLIENT_ID);
    assert!(uuid::Uuid::parse_str(&claims.jti).is_ok());
    let lifetime = claims.exp - claims.nbf;
    assert!((300..=600).contains(&lifetime), "{lifetime}");
}

/// The token client takes the pair parsed and checked, so a mismatch never reaches it: the
/// settings refuse it (`config::validation`), before any request to Entra ID.
#[test]
fn a_key_that_does_not_belong_to_the_certificate_is_refused_at_start() {
    let (one, other) = (make_certificate(), make_certificate());
    let error = CertificateCredential::from_pem(
        &one.certificate_pem,
        &SecretString::from(other.private_key_pem.clone()),
    )
    .unwrap_err();
    assert_eq!(error, CertificateError::Mismatch);
    assert!(error.to_string().contains("does not belong"), "{error}");
    assert!(!error.to_string().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn dropping_the_cache_stops_its_refresher() {
    let entra = FakeEntra::start().await;
    // 4 s lifetime: grace clamps to 2 s, refresh point at about 1.5 s.
    entra.mount_token("tok-short", 4).await;
    let kept = cache_with(&entra.oauth_settings(), None);
    kept.token().await.unwrap();
    // Kept alive, the refresher renews on its own, without any caller.
    wait_for_fetches(&kept, 2).await;
    drop(kept);

    let dropped = cache_with(&entra.oauth_settings(), None);
    dropped.token().await.unwrap();
    let before = entra.fetch_count().await;
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(entra.fetch_count().await, before);
}

/// A `Write` into a shared buffer, for a capturing subscriber.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_log_line_or_debug_output_contains_a_secret_or_token() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let certificate = make_certificate();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let debug_output = runtime.block_on(async {
        let entra = FakeEntra::start().await;
        entra.mount_token_once("tok-secret-1", 3600).await;
        entra.mount_error(7000215).await;
        let clock = ManualClock::at(SystemTime::now());
        let cache = cache_with(&entra.oauth_settings(), Some(&clock));
        let token = cache.token().await.unwrap();
        clock.advance(Duration::from_secs(3400));
        cache.token().await.unwrap();
        cache.invalidate(&token);
        let error = cache.token().await.unwrap_err();

        let entra_cert = FakeEntra::start().await;
        entra_cert.mount_token("tok-secret-2", 3600).await;
        let cert_cache = cache_with(
            &entra_cert.oauth_settings_with(certificate.credential()),
            None,
        );
        let cert_token = cert_cache.token().await.unwrap();
        format!(
            "{token:?} {error:?} {error} {cache:?} {cert_token:?} {cert_cache:?} {:?}",
            entra.oauth_settings()
        )
    });

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("fetched access token"),
        "capture works: {logs}"
    );
    assert!(logs.contains("token refresh failed"), "{logs}");
    let key_body: String = certificate
        .private_key_pem
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    for secret in [
        "tok-secret-1",
        "tok-secret-2",
        CLIENT_SECRET,
        key_body.as_str(),
    ] {
        assert!(!logs.contains(secret), "{secret} in logs: {logs}");
        assert!(
            !debug_output.contains(secret),
            "{secret} in Debug: {debug_output}"
        );
    }
}

#[tokio::test]
async fn a_federated_token_file_is_read_again_for_every_token_request() {
    use mail_relay::config::ClientCredential;
    use mail_relay::token::{ASSERTION_TYPE, TokenClient};

    let entra = crate::entra::FakeEntra::start().await;
    entra.mount_token("graph-or-exchange-token", 3599).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, "eyJhbGciOiJSUzI1NiJ9.first-projected-token.sig\n").unwrap();
    let client = TokenClient::new(
        &entra.oauth_settings_with(ClientCredential::FederatedTokenFile(file.clone())),
    )
    .unwrap();

    client.fetch(std::time::SystemTime::now()).await.unwrap();
    // Kubernetes rotates the projected token in place.
    std::fs::write(&file, "eyJhbGciOiJSUzI1NiJ9.rotated-projected-token.sig").unwrap();
    client.fetch(std::time::SystemTime::now()).await.unwrap();

    let requests = entra.requests().await;
    let sent: Vec<(Option<String>, Option<String>, Option<String>)> = requests
        .iter()
        .map(|r| {
            let f = crate::entra::form_fields(r);
            let get = |k| crate::entra::field(&f, k).map(str::to_owned);
            (
                get("client_assertion_type"),
                get("client_assertion"),
                get("client_secret"),
            )
        })
        .collect();
    assert_eq!(
        sent,
        [
            (
                Some(ASSERTION_TYPE.to_owned()),
                Some("eyJhbGciOiJSUzI1NiJ9.first-projected-token.sig".to_owned()),
                None
            ),
            (
                Some(ASSERTION_TYPE.to_owned()),
                Some("eyJhbGciOiJSUzI1NiJ9.rotated-projected-token.sig".to_owned()),
                None
            ),
        ]
    );

    // A file gone is a token failure naming it, not a crash.
    std::fs::remove_file(&file).unwrap();
    let error = client
        .fetch(std::time::SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("azure-identity-token"),
        "{error}"
    );
}
