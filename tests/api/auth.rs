//! Who may call `POST /mail`, and as whom: API keys, the trusted proxy, OIDC tokens, send-as, CORS.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mail_relay::config::{AddressPattern, OidcSettings, TrustedProxySettings};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{TestApp, expect_problem, outbox_files, spawn_app, spawn_app_with};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn mail_from(from: &str) -> Value {
    json!({"from": from, "to": "alice@example.com", "subject": "auth test", "text": "hello"})
}

#[tokio::test]
async fn a_request_without_credentials_is_401_with_a_challenge_and_nothing_is_sent() {
    let app = spawn_app().await;
    let response = app
        .post_mail_without_key(&[], &mail_from("sender@contoso.com"))
        .await;
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"mail-relay\""
    );
    let problem = expect_problem(response, 401, "unauthorized").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn a_wrong_api_key_is_401_invalid_token_and_is_not_echoed() {
    let app = spawn_app().await;
    let key = "mr_not-a-key-anyone-issued";
    let response = app
        .post_mail_without_key(
            &[("authorization", &format!("Bearer {key}"))],
            &mail_from("sender@contoso.com"),
        )
        .await;
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    let problem = expect_problem(response, 401, "unauthorized").await;
    assert!(!problem.to_string().contains(key));
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn an_api_key_sending_as_an_address_outside_its_list_is_403_and_nothing_is_sent() {
    let app = spawn_app().await;
    let problem = expect_problem(
        app.post_mail(&mail_from("ceo@fabrikam.com")).await,
        403,
        "send_as_denied",
    )
    .await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("API key 'tests'") && detail.contains("ceo@fabrikam.com"),
        "{detail}"
    );
    assert!(
        detail.contains("allowedFrom"),
        "names what to change: {detail}"
    );
    assert!(outbox_files(&app).is_empty());
}

fn trusting_loopback(settings: &mut mail_relay::config::Settings, sources: &str) {
    settings.relay.auth.trusted_proxy = Some(TrustedProxySettings {
        user_header: http::HeaderName::from_static("x-forwarded-email"),
        sources: vec![sources.parse().unwrap()],
        secret: None,
    });
}

#[tokio::test]
async fn a_user_named_by_a_trusted_proxy_may_send_as_self_but_not_as_others() {
    let app = spawn_app_with(|s| trusting_loopback(s, "127.0.0.0/8")).await;
    let user = [("x-forwarded-email", "bob@contoso.com")];
    assert_eq!(
        app.post_mail_without_key(&user, &mail_from("Bob@contoso.com"))
            .await
            .status(),
        202
    );
    let problem = expect_problem(
        app.post_mail_without_key(&user, &mail_from("alice@contoso.com"))
            .await,
        403,
        "send_as_denied",
    )
    .await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("user bob@contoso.com")
    );
    assert_eq!(outbox_files(&app).len(), 1);
}

#[tokio::test]
async fn a_user_may_send_as_a_shared_mailbox_that_lists_them_as_delegate() {
    let app = spawn_app_with(|s| {
        trusting_loopback(s, "127.0.0.1/32");
        s.relay.send_as.delegates = vec![(
            "team@contoso.com".parse().unwrap(),
            vec![mail_relay::config::Delegate::User(
                "bob@contoso.com".parse().unwrap(),
            )],
        )];
    })
    .await;
    let bob = [("x-forwarded-email", "bob@contoso.com")];
    assert_eq!(
        app.post_mail_without_key(&bob, &mail_from("team@contoso.com"))
            .await
            .status(),
        202
    );
    let eve = [("x-forwarded-email", "eve@contoso.com")];
    expect_problem(
        app.post_mail_without_key(&eve, &mail_from("team@contoso.com"))
            .await,
        403,
        "send_as_denied",
    )
    .await;
}

#[tokio::test]
async fn a_proxy_header_from_an_untrusted_address_is_ignored() {
    // Only 10.0.0.0/8 is trusted; the test client comes from 127.0.0.1.
    let app = spawn_app_with(|s| trusting_loopback(s, "10.0.0.0/8")).await;
    let response = app
        .post_mail_without_key(
            &[("x-forwarded-email", "bob@contoso.com")],
            &mail_from("bob@contoso.com"),
        )
        .await;
    expect_problem(response, 401, "unauthorized").await;
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn a_from_outside_the_exchange_grants_is_refused_before_sending() {
    let app = spawn_app_with(|s| {
        s.relay.send_as.exchange_grants =
            Some(vec![AddressPattern::parse("noreply@contoso.com").unwrap()]);
    })
    .await;
    assert_eq!(
        app.post_mail(&mail_from("noreply@contoso.com"))
            .await
            .status(),
        202
    );
    let problem = expect_problem(
        app.post_mail(&mail_from("sales@contoso.com")).await,
        403,
        "send_as_denied",
    )
    .await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Add-RecipientPermission")
    );
    assert_eq!(outbox_files(&app).len(), 1);
}

const ISSUER: &str = "https://login.example.test/tenant/v2.0";
const AUDIENCE: &str = "api://mail-relay";

async fn oidc_app() -> (TestApp, MockServer) {
    let jwks = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/keys"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            std::fs::read_to_string(format!("{FIXTURES}/oidc-jwks.json")).unwrap(),
            "application/json",
        ))
        .mount(&jwks)
        .await;
    let uri = format!("{}/keys", jwks.uri());
    let app = spawn_app_with(move |s| {
        s.relay.auth.oidc = Some(OidcSettings {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            jwks_uri: uri.parse().unwrap(),
            user_claim: "upn".into(),
            clock_skew: Duration::from_secs(30),
        });
    })
    .await;
    (app, jwks)
}

fn user_token(key_file: &str, audience: &str, lifetime: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({"iss": ISSUER, "aud": audience, "iat": now, "nbf": now - 5, "exp": now + lifetime,
                        "upn": "carol@contoso.com"});
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-key-1".into());
    let pem = std::fs::read(format!("{FIXTURES}/{key_file}")).unwrap();
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

async fn post_with_token(app: &TestApp, token: &str) -> reqwest::Response {
    app.post_mail_without_key(
        &[("authorization", &format!("Bearer {token}"))],
        &mail_from("carol@contoso.com"),
    )
    .await
}

#[tokio::test]
async fn a_user_token_signed_by_the_issuer_is_accepted_and_names_the_sender() {
    let (app, _jwks) = oidc_app().await;
    let response = post_with_token(&app, &user_token("oidc-signing-key.pem", AUDIENCE, 600)).await;
    assert_eq!(response.status(), 202);
    // The token's user may not send as someone else.
    let other = app
        .post_mail_without_key(
            &[(
                "authorization",
                &format!(
                    "Bearer {}",
                    user_token("oidc-signing-key.pem", AUDIENCE, 600)
                ),
            )],
            &mail_from("dave@contoso.com"),
        )
        .await;
    expect_problem(other, 403, "send_as_denied").await;
}

#[tokio::test]
async fn user_tokens_with_a_wrong_audience_expired_or_from_an_unknown_key_are_401() {
    let (app, _jwks) = oidc_app().await;
    for (case, token) in [
        (
            "wrong audience",
            user_token("oidc-signing-key.pem", "api://other", 600),
        ),
        (
            "expired",
            user_token("oidc-signing-key.pem", AUDIENCE, -3600),
        ),
        (
            "unknown key",
            user_token("oidc-unknown-key.pem", AUDIENCE, 600),
        ),
    ] {
        let response = post_with_token(&app, &token).await;
        assert_eq!(response.status(), 401, "{case}");
        assert!(
            response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token"),
            "{case}"
        );
    }
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn cors_preflight_allows_only_listed_origins() {
    let app = spawn_app_with(|s| {
        s.relay.cors.allowed_origins =
            vec![http::HeaderValue::from_static("https://app.contoso.com")];
    })
    .await;
    let preflight = |origin: &'static str| {
        reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, app.url("/mail"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.contoso.com").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.contoso.com"
    );
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    assert!(
        other
            .headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
}

#[tokio::test]
async fn a_cross_site_form_cannot_send_as_the_proxys_user() {
    let app = spawn_app_with(|s| {
        trusting_loopback(s, "127.0.0.0/8");
        s.relay.cors.allowed_origins =
            vec![http::HeaderValue::from_static("https://app.contoso.com")];
    })
    .await;
    // The form a forging page would post: a `mail` text field, no preflight needed.
    let form = format!(
        "--b\r\nContent-Disposition: form-data; name=\"mail\"\r\n\r\n{}\r\n--b--\r\n",
        mail_from("bob@contoso.com")
    );
    let bob = |origin: Option<&'static str>| {
        let mut request = reqwest::Client::new()
            .post(app.url("/mail"))
            .header("x-forwarded-email", "bob@contoso.com")
            .header("content-type", "multipart/form-data; boundary=b")
            .body(form.clone());
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    let forged = expect_problem(
        bob(Some("https://evil.example")).await.unwrap(),
        401,
        "unauthorized",
    )
    .await;
    assert!(
        forged["detail"]
            .as_str()
            .unwrap()
            .contains("allowedOrigins"),
        "{forged:#}"
    );
    assert!(outbox_files(&app).is_empty());
    assert_eq!(
        bob(Some("https://app.contoso.com")).await.unwrap().status(),
        202
    );
    assert_eq!(
        bob(None).await.unwrap().status(),
        202,
        "non-browser clients send no Origin"
    );
}

#[tokio::test]
async fn a_proxy_user_header_sent_twice_is_refused() {
    let app = spawn_app_with(|s| trusting_loopback(s, "127.0.0.0/8")).await;
    let response = app
        .post_mail_without_key(
            &[
                ("x-forwarded-email", "ceo@contoso.com"),
                ("x-forwarded-email", "bob@contoso.com"),
            ],
            &mail_from("ceo@contoso.com"),
        )
        .await;
    expect_problem(response, 401, "unauthorized").await;
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn an_idn_domain_in_allowed_from_matches_the_from_address_in_either_form() {
    let app = spawn_app_with(|s| {
        s.relay.auth.api_keys[0].allowed_from = vec![AddressPattern::parse("*@Bücher.de").unwrap()];
    })
    .await;
    for from in ["info@bücher.de", "info@xn--bcher-kva.de"] {
        let body = json!({"from": from, "to": "alice@example.com", "subject": "s", "text": "t"});
        let response = app.post_mail(&body).await;
        assert_eq!(
            response.status(),
            202,
            "{from}: {}",
            response.text().await.unwrap()
        );
    }
    let body =
        json!({"from": "info@buecher.de", "to": "alice@example.com", "subject": "s", "text": "t"});
    expect_problem(app.post_mail(&body).await, 403, "send_as_denied").await;
}
