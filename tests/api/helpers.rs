//! Spawning the application on port 0 and talking to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mail_relay::app::Application;
use mail_relay::config::{
    Delivery, Encryption, Limits, RateLimitSettings, RelaySettings, SendEmailSettings,
    ServerSettings, Settings, SmtpAuthentication, SmtpTuning,
};
use mail_relay::delivery::{MailSender, Outbox};

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
            delivery: Delivery::Outbox { dir: outbox },
            smtp: SmtpTuning {
                max_connections: 3,
                connect_timeout: Duration::from_secs(5),
                command_timeout: Duration::from_secs(10),
                send_deadline: Duration::from_secs(30),
                ca_file: None,
                hello_name: None,
            },
            limits: Limits {
                max_body_bytes: 64 * 1024,
                max_recipients: 500,
                request_timeout: Duration::from_secs(30),
            },
            auth: Default::default(),
            send_as: Default::default(),
            cors: Default::default(),
            // Off, so tests that send many mails are not refused; rate-limit tests turn them on.
            rate_limits: RateLimitSettings::OFF,
            idempotency: Default::default(),
        },
    }
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
}

/// Start an instance with the default test settings, changed by `adjust`.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let outbox = tempfile::tempdir().unwrap();
    let mut settings = test_settings(outbox.path().to_path_buf());
    adjust(&mut settings);
    let sender: Arc<dyn MailSender> = Arc::new(Outbox::new(outbox.path().to_path_buf()));
    let app = Application::build_with(Arc::new(settings), sender)
        .await
        .unwrap();
    let address = app.local_addr().unwrap();
    tokio::spawn(app.run_until(std::future::pending()));
    TestApp {
        address,
        client: reqwest::Client::new(),
        outbox,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}
