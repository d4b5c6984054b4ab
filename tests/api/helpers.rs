//! Spawning the application on port 0 and talking to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mail_relay::app::Application;
use mail_relay::config::{
    AddressPattern, ApiKeySettings, AuthSettings, Delivery, Encryption, Limits, OAuthSettings,
    RateLimitSettings, RelaySettings, SendEmailSettings, ServerSettings, Settings,
    SmtpAuthentication, SmtpTuning,
};
use mail_relay::delivery::{MailSender, Outbox};
use sha2::{Digest, Sha256};

/// Settings for a test instance: loopback, port 0, outbox delivery into `outbox`.
pub fn test_settings(outbox: PathBuf) -> Settings {
    Settings {
        server: ServerSettings {
            address: [127, 0, 0, 1].into(),
            port: 0,
        },
        send_email: SendEmailSettings {
            smtp_server: "127.0.0.1".into(),
            smtp_port: 25,
            smtp_encryption: Encryption::None,
            smtp_authentication: SmtpAuthentication::None,
        },
        relay: RelaySettings {
            cloud: Default::default(),
            delivery: Delivery::Outbox { dir: outbox },
            smtp: SmtpTuning {
                max_connections: 3,
                connect_timeout: Duration::from_secs(5),
                command_timeout: Duration::from_secs(10),
                send_deadline: Duration::from_secs(30),
                ca_file: None,
                hello_name: None,
                source_address: None,
            },
            limits: Limits {
                max_body_bytes: 64 * 1024,
                max_recipients: 500,
                max_message_bytes: 35 * 1024 * 1024,
                request_timeout: Duration::from_secs(30),
                max_in_flight_bytes: 100 * 1024 * 1024,
            },
            auth: AuthSettings {
                api_keys: vec![test_api_key()],
                ..AuthSettings::default()
            },
            graph: Default::default(),
            send_as: Default::default(),
            cors: Default::default(),
            // Off, so tests that send many mails are not refused; rate-limit tests turn them on.
            rate_limits: RateLimitSettings::OFF,
            idempotency: Default::default(),
            store: Default::default(),
            queue: Default::default(),
            http: Default::default(),
            shutdown: Default::default(),
            admin_mail: None,
            metrics: Default::default(),
            log: Default::default(),
            identities: Default::default(),
        },
    }
}

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

/// The test key's settings: it may send as anyone at the test domains.
pub fn test_api_key() -> ApiKeySettings {
    ApiKeySettings {
        name: "tests".into(),
        sha256: Sha256::digest(TEST_API_KEY.as_bytes()).into(),
        allowed_from: ["*@contoso.com", "*@contoso.test", "*@example.com"]
            .iter()
            .map(|p| AddressPattern::parse(p).unwrap())
            .collect(),
        identities: Vec::new(),
    }
}

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
