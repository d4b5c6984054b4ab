//! Spawning the application on port 0 and talking to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mail_relay::app::Application;
use mail_relay::config::{
    Delivery, Encryption, OAuthSettings, SendEmailSettings, Settings, SmtpAuthentication,
};
use mail_relay::delivery::{MailSender, Outbox};
use sha2::{Digest, Sha256};

/// Settings for a test instance: the embedded dev default (`config/dev.yml`, as `serve`
/// loads it) with these overrides, given as the environment would give them: port 0, outbox
/// delivery into `outbox`, the test API key instead of anonymous callers, short timeouts, a
/// 64 KiB body limit and no rate limits (rate-limit tests turn them on).
pub fn test_settings(outbox: PathBuf) -> Settings {
    let key = hex::encode(Sha256::digest(TEST_API_KEY.as_bytes()));
    let overrides = [
        ("SERVER_PORT", "0".to_owned()),
        ("MAILRELAY_DELIVERY_OUTBOXDIR", outbox.display().to_string()),
        ("MAILRELAY_AUTH_ALLOWANONYMOUS", "false".into()),
        (
            "MAILRELAY_AUTH_APIKEYS",
            format!("[{{name: tests, sha256: {key}, allowedFrom: {TEST_KEY_FROM:?}}}]"),
        ),
        ("FEATURESWITCHES_SENDEMAIL_SMTPSERVER", "127.0.0.1".into()),
        ("FEATURESWITCHES_SENDEMAIL_SMTPPORT", "25".into()),
        ("FEATURESWITCHES_SENDEMAIL_SMTPENCRYPTION", "NONE".into()),
        (
            "FEATURESWITCHES_SENDEMAIL_SMTPAUTHENTICATION",
            "NONE".into(),
        ),
        ("MAILRELAY_SMTP_CONNECTTIMEOUTSECONDS", "5".into()),
        ("MAILRELAY_SMTP_COMMANDTIMEOUTSECONDS", "10".into()),
        ("MAILRELAY_SMTP_SENDDEADLINESECONDS", "30".into()),
        ("MAILRELAY_LIMITS_MAXBODYBYTES", "65536".into()),
        ("MAILRELAY_LIMITS_REQUESTTIMEOUTSECONDS", "30".into()),
        ("MAILRELAY_RATELIMITS_MAILBOXMESSAGESPERMINUTE", "0".into()),
        ("MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY", "0".into()),
        // The production default, not the dev one (0): the drain tests need the delay.
        ("MAILRELAY_SHUTDOWN_DRAINDELAYSECONDS", "5".into()),
    ];
    let env: Vec<(String, String)> = overrides
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    match mail_relay::config::load_str(mail_relay::config::DEV_DEFAULT, "config/dev.yml", &env) {
        Ok(loaded) => loaded.settings,
        Err(e) => panic!("the test settings do not load: {e}"),
    }
}

/// What the test API key may send as.
pub const TEST_KEY_FROM: [&str; 3] = ["*@contoso.com", "*@contoso.test", "*@example.com"];

/// The test settings sending to the real SMTP peer: MS_OAUTH as the peer's OAuth user over
/// STARTTLS to its submission port, trusting its CA, with `oauth` for the token (usually
/// `FakeEntra::oauth_settings`). Tests add their own overrides on top.
pub fn peer_oauth_settings(peer: &crate::peer::Peer, oauth: OAuthSettings) -> Settings {
    let mut settings = test_settings(std::env::temp_dir());
    settings.relay.delivery = Delivery::Smtp;
    settings.send_email = SendEmailSettings {
        smtp_server: peer.host.clone(),
        smtp_port: peer.submission_port,
        smtp_encryption: Encryption::Tls,
        smtp_authentication: SmtpAuthentication::MsOAuth {
            username: peer.oauth_user.parse().unwrap(),
            oauth,
        },
    };
    settings.relay.smtp.ca_file = Some(peer.ca_path().to_path_buf());
    settings
}

/// A running instance and a client for it.
#[allow(dead_code)]
pub struct TestApp {
    pub address: SocketAddr,
    pub client: reqwest::Client,
    /// Where the outbox sender writes; kept alive as long as the app.
    pub outbox: tempfile::TempDir,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request failed")
    }

    /// `POST /mail` with the test key, for a test to finish: headers, a raw body, `send`.
    pub fn mail_request(&self) -> reqwest::RequestBuilder {
        self.client.post(self.url("/mail"))
    }

    /// `POST /mail` with `body` as JSON.
    pub async fn post_mail(&self, body: &serde_json::Value) -> reqwest::Response {
        self.mail_request()
            .json(body)
            .send()
            .await
            .expect("request failed")
    }

    /// `POST /mail` with `body` as JSON without the test API key: as the proxy user `user`
    /// (`X-Forwarded-Email`, for apps that trust a proxy on loopback), or anonymously.
    pub async fn post_mail_as(
        &self,
        user: Option<&str>,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        let headers: Vec<(&str, &str)> =
            user.map(|u| ("x-forwarded-email", u)).into_iter().collect();
        self.post_mail_without_key(&headers, body).await
    }

    /// `POST /mail` with `body` as JSON, these headers (a name may come twice) and no API key.
    pub async fn post_mail_without_key(
        &self,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> reqwest::Response {
        let mut request = reqwest::Client::new().post(self.url("/mail")).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("request failed")
    }

    /// `POST /mail` with `body` as JSON and an `Idempotency-Key`.
    pub async fn post_mail_with_key(
        &self,
        key: &str,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        self.mail_request()
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .expect("request failed")
    }

    /// `POST /mail` with `body` as JSON and `Prefer: respond-async`.
    pub async fn post_queued(&self, body: &serde_json::Value) -> reqwest::Response {
        self.mail_request()
            .header("prefer", "respond-async")
            .json(body)
            .send()
            .await
            .expect("request failed")
    }

    /// `GET /mail/{id}`: a queued mail's status.
    pub async fn get_status(&self, id: &str) -> reqwest::Response {
        self.get(&format!("/mail/{id}")).await
    }

    /// `GET /health/ready`: the status code and the body.
    pub async fn get_ready(&self) -> (u16, serde_json::Value) {
        let response = self.get("/health/ready").await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON body"))
    }

    /// Poll `GET /health/ready` until it answers 200, or panic after 20 seconds.
    pub async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.get("/health/ready").await.status() != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "the relay did not get ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The API key the test client sends; `test_settings` holds its hash.
pub const TEST_API_KEY: &str = "mr_integration-tests-key";

/// A client that authenticates with [`TEST_API_KEY`] on every request.
pub fn authenticated_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TEST_API_KEY}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Start an instance with the default test settings, changed by `adjust`, sending with `sender`
/// (the outbox in a temporary folder when `None`).
pub async fn spawn_app_with_sender(
    adjust: impl FnOnce(&mut Settings),
    sender: Option<Arc<dyn MailSender>>,
) -> TestApp {
    let outbox = tempfile::tempdir().unwrap();
    let mut settings = test_settings(outbox.path().to_path_buf());
    adjust(&mut settings);
    let sender = sender.unwrap_or_else(|| {
        Arc::new(Outbox::new(outbox.path().to_path_buf())) as Arc<dyn MailSender>
    });
    let app = Application::build_with(Arc::new(settings), sender)
        .await
        .unwrap();
    let address = app.local_addr().unwrap();
    tokio::spawn(app.run_until(std::future::pending()));
    TestApp {
        address,
        client: authenticated_client(),
        outbox,
    }
}

/// Start an instance the way production does (`Application::build`: the token cache and the
/// SMTP sender from `settings`), on port 0.
pub async fn spawn_built(settings: Settings) -> TestApp {
    let app = Application::build(settings).await.unwrap();
    let address = app.local_addr().unwrap();
    tokio::spawn(app.run_until(std::future::pending()));
    TestApp {
        address,
        client: authenticated_client(),
        outbox: tempfile::tempdir().unwrap(),
    }
}

/// Start an instance with the default test settings, changed by `adjust`.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with_sender(adjust, None).await
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// The problem body, after checking the status, the media type and the code.
pub async fn expect_problem(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body:#}");
    assert_eq!(body["status"], status);
    assert!(body["requestId"].is_string());
    body
}

/// The files the outbox sender wrote.
pub fn outbox_files(app: &TestApp) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(app.outbox.path()) {
        Ok(dir) => dir.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}
