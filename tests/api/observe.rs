//! Metrics, request logs and readiness, seen from outside.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mail_relay::app::Application;
use mail_relay::config::{
    ConfigError, Delivery, Encryption, Loaded, Settings, SmtpAuthentication, load_str,
};
use mail_relay::delivery::{DeliveryError, MailSender};
use mail_relay::smtp::{SmtpError, Stage};
use mail_relay::telemetry::{self, LogFormat};
use serde_json::{Value, json};

use crate::entra::{CLIENT_SECRET, FakeEntra};
use crate::fakes::{Answer, FakeSender};
use crate::helpers::{
    TEST_API_KEY, TestApp, authenticated_client, peer_oauth_settings, spawn_app, spawn_app_with,
    spawn_app_with_sender, spawn_built, test_settings,
};

fn mail() -> Value {
    json!({"from": "alice@contoso.com", "to": "bob@example.com", "subject": "hi", "text": "hello"})
}

/// The samples of a Prometheus text page: `name{labels}` -> value (comments skipped).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line has a value");
            (
                series.to_owned(),
                value.parse().expect("a sample value is a number"),
            )
        })
        .collect()
}

async fn scrape(app: &TestApp) -> (String, HashMap<String, f64>) {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let samples = samples(&text);
    (text, samples)
}

#[tokio::test]
async fn metrics_count_requests_and_mails_without_addresses_or_secrets() {
    let app = spawn_app().await;
    for _ in 0..2 {
        assert_eq!(app.post_mail(&mail()).await.status(), 202);
    }
    let invalid = json!({"from": "alice@contoso.com", "to": "not-an-address", "text": "x"});
    assert_eq!(app.post_mail(&invalid).await.status(), 400);
    let anonymous = app.post_mail_as(None, &mail()).await;
    assert_eq!(anonymous.status(), 401);
    assert_eq!(app.get("/nowhere/carol@example.com").await.status(), 404);

    let (text, samples) = scrape(&app).await;
    let get = |series: &str| samples.get(series).copied();
    assert_eq!(
        get(r#"mail_relay_http_requests_total{route="/mail",method="POST",status="202"}"#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        get(r#"mail_relay_http_requests_total{route="/mail",method="POST",status="400"}"#),
        Some(1.0)
    );
    assert_eq!(
        get(r#"mail_relay_http_requests_total{route="/mail",method="POST",status="401"}"#),
        Some(1.0)
    );
    // An unknown path is one series, whatever the path was.
    assert_eq!(
        get(r#"mail_relay_http_requests_total{route="unmatched",method="GET",status="404"}"#),
        Some(1.0)
    );
    assert_eq!(
        get(r#"mail_relay_http_request_duration_seconds_count{route="/mail",method="POST"}"#),
        Some(4.0)
    );
    // Only mails that reached the sender count as mails.
    assert_eq!(
        get(r#"mail_relay_mails_total{outcome="sent",code="ok"}"#),
        Some(2.0)
    );
    assert!(!text.contains(r#"code="invalid_request""#), "{text}");
    assert_eq!(
        get(r#"mail_relay_smtp_send_duration_seconds_count{outcome="ok",identity="default"}"#),
        Some(2.0)
    );
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains('@'), "an address in a label: {line}");
    }
    assert!(!text.contains(TEST_API_KEY));
    assert!(!text.contains("tests"), "the API key's name is no label");

    // Counting on: a second scrape sees the first.
    let (_, again) = scrape(&app).await;
    assert_eq!(
        again.get(r#"mail_relay_http_requests_total{route="/metrics",method="GET",status="200"}"#),
        Some(&1.0)
    );
}

#[tokio::test]
async fn two_apps_in_one_process_count_apart() {
    let a = spawn_app().await;
    let b = spawn_app().await;
    assert_eq!(a.post_mail(&mail()).await.status(), 202);
    let (_, a_samples) = scrape(&a).await;
    let (_, b_samples) = scrape(&b).await;
    let sent = r#"mail_relay_mails_total{outcome="sent",code="ok"}"#;
    assert_eq!(a_samples.get(sent), Some(&1.0));
    assert_eq!(b_samples.get(sent), None);
}

#[tokio::test]
async fn metrics_on_a_listener_of_their_own_leave_the_main_one() {
    let outbox = tempfile::tempdir().unwrap();
    let mut settings = test_settings(outbox.path().to_path_buf());
    settings.relay.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let app = Application::build(settings).await.unwrap();
    let main = app.local_addr().unwrap();
    let metrics = app.metrics_addr().expect("a metrics listener");
    assert_ne!(main.port(), metrics.port());
    tokio::spawn(app.run_until(std::future::pending()));
    let client = authenticated_client();

    let on_main = client
        .get(format!("http://{main}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(on_main.status(), 404);
    let response = client
        .post(format!("http://{main}/mail"))
        .json(&mail())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let text = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = samples(&text);
    assert_eq!(
        samples.get(r#"mail_relay_mails_total{outcome="sent",code="ok"}"#),
        Some(&1.0),
        "{text}"
    );
}

/// Log lines written by the subscriber under test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Capture, on this thread (the test's current-thread runtime runs the app too), what the
    /// production JSON subscriber writes with `filter`.
    fn start(filter: &str) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = telemetry::subscriber(LogFormat::Json, filter, move || writer.clone());
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// Every line, parsed: each one must be a JSON object.
    fn lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    fn requests(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["message"] == "request finished")
            .collect()
    }
}

#[tokio::test]
async fn each_request_is_one_json_line_with_its_id_and_no_secret() {
    let (logs, _guard) = Captured::start("info");
    let app = spawn_app().await;

    let response = app.post_mail(&mail()).await;
    assert_eq!(response.status(), 202);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let wrong_key = "mr_a-wrong-key-that-must-not-be-logged";
    let refused = reqwest::Client::new()
        .post(app.url("/mail"))
        .bearer_auth(wrong_key)
        .json(&mail())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // Probes are debug lines: not at info.
    assert_eq!(app.get("/health/live").await.status(), 200);

    let requests = logs.requests();
    assert_eq!(requests.len(), 2, "one line per request: {requests:#?}");
    let sent = &requests[0];
    assert_eq!(sent["level"], "INFO");
    assert_eq!(sent["request_id"], request_id.as_str());
    assert_eq!(sent["route"], "/mail");
    assert_eq!(sent["status"], 202);
    assert_eq!(sent["code"], "ok");
    assert_eq!(sent["caller"], "api_key");
    assert_eq!(sent["caller_name"], "tests");
    assert_eq!(sent["from_domain"], "contoso.com");
    assert!(sent.get("from").is_none(), "the full From only at debug");
    assert!(sent["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(sent["mail_id"].is_string());
    assert_eq!(sent["recipients"], 1);
    assert!(sent["bytes"].as_u64().unwrap() > 100);
    let refused = &requests[1];
    assert_eq!(refused["status"], 401);
    assert_eq!(refused["code"], "unauthorized");
    assert_eq!(refused["level"], "INFO", "4xx are not errors");

    let text = logs.text();
    assert!(!text.contains(TEST_API_KEY), "{text}");
    assert!(!text.contains(wrong_key), "{text}");
    assert!(!text.contains("alice@contoso.com"), "{text}");
    assert!(!text.contains("Bearer"), "{text}");
}

#[tokio::test]
async fn at_debug_level_the_full_from_address_is_logged() {
    let (logs, _guard) = Captured::start("info,mail_relay=debug");
    let app = spawn_app().await;
    assert_eq!(app.post_mail(&mail()).await.status(), 202);
    let requests = logs.requests();
    let sent = requests
        .iter()
        .find(|l| l["route"] == "/mail")
        .expect("the mail's line");
    assert_eq!(sent["from"], "alice@contoso.com");
    assert!(!logs.text().contains(TEST_API_KEY));
}

/// A sender that fails as `make` says (until told otherwise).
fn failing(make: fn() -> DeliveryError) -> Arc<FakeSender> {
    Arc::new(FakeSender::failing(make))
}

fn disk_full() -> DeliveryError {
    DeliveryError::Outbox {
        path: "/var/spool/mail-relay".into(),
        source: std::io::Error::other("No space left on device"),
    }
}

fn server_down() -> DeliveryError {
    DeliveryError::Smtp(SmtpError::rejected(
        Stage::Greeting,
        421,
        "4.3.2 Service not available, closing transmission channel",
    ))
}

fn unknown_recipient() -> DeliveryError {
    DeliveryError::Smtp(SmtpError::rejected(
        Stage::EndOfData,
        550,
        "5.1.1 User unknown",
    ))
}

#[tokio::test]
async fn a_failed_send_is_logged_once_with_its_cause_chain() {
    let (logs, _guard) = Captured::start("info");
    let sender = failing(disk_full);
    let app = spawn_app_with_sender(|_| {}, Some(sender as Arc<dyn MailSender>)).await;
    let response = app.post_mail(&mail()).await;
    assert_eq!(response.status(), 500);
    let body: Value = response.json().await.unwrap();
    assert!(!body.to_string().contains("No space left"), "{body}");

    let errors: Vec<Value> = logs
        .lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "logged once: {errors:#?}");
    let line = &errors[0];
    assert_eq!(line["message"], "request finished");
    assert_eq!(line["code"], "internal_error");
    assert_eq!(line["status"], 500);
    let cause = line["cause"].as_str().unwrap();
    assert!(cause.contains("/var/spool/mail-relay"), "{cause}");
    assert!(cause.contains("No space left on device"), "{cause}");
    assert!(logs.text().matches("No space left on device").count() == 1);
}

#[tokio::test]
async fn an_smtp_reply_code_is_in_the_line_and_the_failure_in_the_metrics() {
    let (logs, _guard) = Captured::start("info");
    let sender = failing(unknown_recipient);
    let app = spawn_app_with_sender(|_| {}, Some(sender as Arc<dyn MailSender>)).await;
    assert_eq!(app.post_mail(&mail()).await.status(), 502);
    let line = logs
        .requests()
        .into_iter()
        .find(|l| l["route"] == "/mail")
        .unwrap();
    assert_eq!(line["smtp_reply"], 550);
    assert_eq!(line["code"], "smtp_rejected");
    assert_eq!(line["level"], "ERROR");
    let (text, samples) = scrape(&app).await;
    assert_eq!(
        samples.get(r#"mail_relay_mails_total{outcome="failed",code="smtp_rejected"}"#),
        Some(&1.0),
        "{text}"
    );
}

#[tokio::test]
async fn readiness_shows_each_component() {
    let app = spawn_app().await;
    let (status, body) = app.get_ready().await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["draining"], false);
    assert!(body.get("reason").is_none());
    assert_eq!(body["components"]["token"]["status"], "unused");
    assert_eq!(body["components"]["smtp"]["status"], "ok");
    assert_eq!(body["components"]["smtp"]["lastError"], Value::Null);
}

#[tokio::test]
async fn smtp_sends_failing_make_readiness_503_until_one_succeeds() {
    let (logs, _guard) = Captured::start("info");
    let sender = failing(server_down);
    let app = spawn_app_with_sender(|_| {}, Some(sender.clone() as Arc<dyn MailSender>)).await;
    // A refused recipient says nothing about the server; a refused connection does.
    for attempt in 1..=3 {
        assert_eq!(app.post_mail(&mail()).await.status(), 503);
        let (status, body) = app.get_ready().await;
        let expected = if attempt < 3 { 200 } else { 503 };
        assert_eq!(status, expected, "after {attempt} failures: {body:#}");
    }
    let (_, body) = app.get_ready().await;
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["components"]["smtp"]["status"], "failing");
    let last_error = &body["components"]["smtp"]["lastError"];
    assert_eq!(last_error["kind"], "smtp_unavailable", "{body:#}");
    assert_eq!(last_error["replyCode"], 421);
    assert_eq!(last_error["enhancedCode"], "4.3.2");
    assert_eq!(last_error["stage"], "greeting");
    assert!(body["components"]["smtp"]["lastErrorAt"].is_string());
    assert_eq!(
        body["reason"],
        "smtp: the last 3 sends failed within 60s: smtp_unavailable (421 4.3.2 at greeting)",
        "{body:#}"
    );
    // Liveness stays simple: restarting cannot fix the server.
    assert_eq!(app.get("/health/live").await.status(), 200);
    // One error line per failed mail; the probe's 503 is its answer, not an error.
    let lines = logs.requests();
    let errors: Vec<&Value> = lines.iter().filter(|l| l["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors
            .iter()
            .all(|l| l["route"] == "/mail" && l["smtp_reply"] == 421)
    );
    assert!(lines.iter().all(|l| l["route"] != "/health/ready"));

    sender.answer_always(Answer::Accept);
    assert_eq!(app.post_mail(&mail()).await.status(), 202);
    let (status, body) = app.get_ready().await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["components"]["smtp"]["status"], "ok");
    assert_eq!(
        body["components"]["smtp"]["lastError"]["replyCode"], 421,
        "the last error stays visible"
    );
}

fn refused_naming_addresses() -> DeliveryError {
    DeliveryError::Smtp(SmtpError::rejected(
        Stage::RcptTo("bob@example.com".into()),
        421,
        "4.3.2 Service not available for <bob@example.com> from <alice@contoso.com>",
    ))
}

#[tokio::test]
async fn the_public_readiness_body_shows_kinds_and_codes_but_no_address_or_server_text() {
    let (logs, _guard) = Captured::start("info");
    let sender = failing(refused_naming_addresses);
    let app = spawn_app_with_sender(|_| {}, Some(sender as Arc<dyn MailSender>)).await;
    for _ in 0..3 {
        assert_eq!(app.post_mail(&mail()).await.status(), 503);
    }
    let response = app.get("/health/ready").await;
    assert_eq!(response.status(), 503);
    let text = response.text().await.unwrap();
    for secret in [
        "bob@example.com",
        "alice@contoso.com",
        "Service not available",
        "RCPT TO",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["components"]["smtp"]["status"], "failing");
    let last_error = &body["components"]["smtp"]["lastError"];
    assert_eq!(last_error["kind"], "smtp_unavailable", "{body:#}");
    assert_eq!(last_error["stage"], "rcpt_to");
    assert_eq!(last_error["replyCode"], 421);
    assert_eq!(last_error["enhancedCode"], "4.3.2");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .ends_with("smtp_unavailable (421 4.3.2 at rcpt_to)"),
        "{body:#}"
    );
    // The operator still gets the whole reply: once when readiness turns, and on each request.
    let log = logs.text();
    let turned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("/health/ready answers 503"))
        .collect();
    assert_eq!(turned.len(), 1, "{log}");
    assert!(turned[0].contains("Service not available"), "{}", turned[0]);
}

#[tokio::test]
async fn refusals_of_single_mails_keep_the_instance_ready() {
    let sender = failing(unknown_recipient);
    let app = spawn_app_with_sender(|_| {}, Some(sender as Arc<dyn MailSender>)).await;
    for _ in 0..4 {
        assert_eq!(app.post_mail(&mail()).await.status(), 502);
    }
    let (status, body) = app.get_ready().await;
    assert_eq!(status, 200, "{body:#}");
}

/// MS_OAUTH with tokens from `entra`, to an SMTP port where nobody listens.
fn oauth_settings_to_closed_port(entra: &FakeEntra) -> Settings {
    let mut settings = test_settings(std::env::temp_dir());
    settings.relay.delivery = Delivery::Smtp;
    settings.send_email.smtp_server = "127.0.0.1".into();
    settings.send_email.smtp_port = crate::peer::closed_port();
    settings.send_email.smtp_encryption = Encryption::None;
    settings.send_email.smtp_authentication = SmtpAuthentication::MsOAuth {
        username: "relay@contoso.com".parse().unwrap(),
        oauth: entra.oauth_settings(),
    };
    settings.relay.smtp.connect_timeout = Duration::from_secs(1);
    settings.relay.smtp.send_deadline = Duration::from_secs(1);
    settings
}

#[tokio::test]
async fn readiness_turns_503_when_no_token_can_be_had_and_back_when_entra_recovers() {
    let entra = FakeEntra::start().await;
    entra.mount_error(7000215).await;
    let app = spawn_built(oauth_settings_to_closed_port(&entra)).await;

    // No token needed yet: ready.
    let (status, body) = app.get_ready().await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["components"]["token"]["status"], "ok");
    assert_eq!(body["components"]["token"]["fetchCount"], 0);

    assert_eq!(app.post_mail(&mail()).await.status(), 503);
    let (status, body) = app.get_ready().await;
    assert_eq!(status, 503, "{body:#}");
    let token = &body["components"]["token"];
    assert_eq!(token["status"], "failing");
    assert_eq!(token["expiresInSeconds"], Value::Null);
    assert!(token["fetchCount"].as_u64().unwrap() >= 1);
    assert_eq!(
        token["lastError"]["kind"], "token_invalid_client_secret",
        "{body:#}"
    );
    assert_eq!(
        body["reason"],
        "token: no valid access token: token_invalid_client_secret"
    );
    assert!(!body.to_string().contains("AADSTS"), "{body:#}");
    assert!(!body.to_string().contains(CLIENT_SECRET));
    let (_, samples) = scrape(&app).await;
    assert!(samples[r#"mail_relay_token_fetches_total{outcome="failure"}"#] >= 1.0);
    assert_eq!(samples["mail_relay_ready"], 0.0);

    // Entra answers again: the probe itself fetches (no traffic reaches an unready instance).
    entra.server.reset().await;
    entra.mount_token("tok-recovered", 3600).await;
    let mut last = (0, Value::Null);
    for _ in 0..50 {
        last = app.get_ready().await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = last;
    assert_eq!(status, 200, "{body:#}");
    let token = &body["components"]["token"];
    assert_eq!(token["status"], "ok");
    assert!(token["expiresInSeconds"].as_u64().unwrap() > 3500);
    assert!(!body.to_string().contains("tok-recovered"));
    let (text, samples) = scrape(&app).await;
    assert_eq!(
        samples[r#"mail_relay_token_fetches_total{outcome="success"}"#], 1.0,
        "{text}"
    );
    assert!(samples["mail_relay_token_expires_in_seconds"] > 3500.0);
    assert_eq!(samples["mail_relay_ready"], 1.0);
    assert!(!text.contains("tok-recovered"));
}

#[tokio::test]
async fn a_closed_smtp_port_makes_readiness_503_with_the_smtp_error() {
    let outbox = tempfile::tempdir().unwrap();
    let mut settings = test_settings(outbox.path().to_path_buf());
    let port = crate::peer::closed_port();
    settings.relay.delivery = Delivery::Smtp;
    settings.send_email.smtp_port = port;
    settings.relay.smtp.connect_timeout = Duration::from_secs(1);
    settings.relay.smtp.send_deadline = Duration::from_secs(1);
    let app = spawn_built(settings).await;
    for _ in 0..3 {
        assert_eq!(app.post_mail(&mail()).await.status(), 503);
    }
    let (status, body) = app.get_ready().await;
    assert_eq!(status, 503, "{body:#}");
    let smtp = &body["components"]["smtp"];
    assert_eq!(smtp["status"], "failing");
    assert_eq!(smtp["openConnections"], 0);
    assert!(smtp["failed"].as_u64().unwrap() >= 3);
    assert_eq!(smtp["lastError"]["kind"], "smtp_unavailable", "{body:#}");
    assert_eq!(smtp["lastError"]["stage"], "connect");
    assert_eq!(smtp["lastError"]["replyCode"], Value::Null);
    assert!(!body.to_string().contains(&port.to_string()), "{body:#}");
}

#[tokio::test]
async fn draining_is_not_ready() {
    let outbox = tempfile::tempdir().unwrap();
    let app = Application::build(test_settings(outbox.path().to_path_buf()))
        .await
        .unwrap();
    app.state().start_draining();
    let address = app.local_addr().unwrap();
    tokio::spawn(app.run_until(std::future::pending()));
    let response = reqwest::get(format!("http://{address}/health/ready"))
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["draining"], true);
    assert!(body["reason"].as_str().unwrap().starts_with("draining"));
}

// ---- mailRelay.metrics.* and mailRelay.log.* ----------------------------------------------

const DEV: &str = r#"
mailRelay:
  delivery:
    mode: outbox
  auth:
    allowAnonymous: true
"#;

fn load_with(yaml: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    load_str(yaml, "test.yml", &env)
}

#[test]
fn observe_settings_default_to_the_main_listener_and_json_at_info() {
    let loaded = load_with(DEV, &[]).unwrap();
    let relay = &loaded.settings.relay;
    assert_eq!(relay.metrics.listen, None);
    assert_eq!(relay.log.format, LogFormat::Json);
    assert_eq!(relay.log.filter, "info");
    assert!(
        loaded.masked.contains("format: json # default"),
        "{}",
        loaded.masked
    );
}

#[test]
fn observe_settings_are_read_from_the_file_and_the_environment() {
    let yaml = format!(
        "{DEV}  metrics:\n    port: 9100\n  log:\n    format: text\n    level: warn,mail_relay=debug\n"
    );
    let loaded = load_with(&yaml, &[]).unwrap();
    let relay = &loaded.settings.relay;
    // Without an address, the metrics listener takes server.address.
    assert_eq!(
        relay.metrics.listen,
        Some("127.0.0.1:9100".parse().unwrap())
    );
    assert_eq!(relay.log.format, LogFormat::Text);
    assert_eq!(relay.log.filter, "warn,mail_relay=debug");
    assert!(loaded.masked.contains("port: 9100"), "{}", loaded.masked);

    let loaded = load_with(
        &yaml,
        &[
            ("MAILRELAY_METRICS_ADDRESS", "0.0.0.0"),
            ("MAILRELAY_METRICS_PORT", "9200"),
            ("MAILRELAY_LOG_FORMAT", "JSON"),
            ("MAILRELAY_LOG_LEVEL", "debug"),
        ],
    )
    .unwrap();
    let relay = &loaded.settings.relay;
    assert_eq!(relay.metrics.listen, Some("0.0.0.0:9200".parse().unwrap()));
    assert_eq!(relay.log.format, LogFormat::Json);
    assert_eq!(relay.log.filter, "debug");
    assert!(
        loaded
            .masked
            .contains("level: \"debug\" # from env MAILRELAY_LOG_LEVEL"),
        "{}",
        loaded.masked
    );
}

#[test]
fn invalid_observe_settings_name_the_key_and_the_fix() {
    /// Environment, the key at fault, words its message must have.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case] = &[
        (
            &[("MAILRELAY_METRICS_PORT", "nine")],
            "mailRelay.metrics.port",
            "not a whole number",
        ),
        (
            &[("MAILRELAY_METRICS_PORT", "70000")],
            "mailRelay.metrics.port",
            "0..=65535",
        ),
        (
            &[
                ("MAILRELAY_METRICS_PORT", "9100"),
                ("MAILRELAY_METRICS_ADDRESS", "metrics.local"),
            ],
            "mailRelay.metrics.address",
            "not an IP address",
        ),
        (
            &[("MAILRELAY_METRICS_ADDRESS", "0.0.0.0")],
            "mailRelay.metrics.address",
            "mailRelay.metrics.port is not",
        ),
        (
            &[("MAILRELAY_METRICS_PORT", "8080"), ("SERVER_PORT", "8080")],
            "mailRelay.metrics.port",
            "different ports",
        ),
        (
            &[("MAILRELAY_LOG_FORMAT", "xml")],
            "mailRelay.log.format",
            "json, text",
        ),
        (
            &[("MAILRELAY_LOG_LEVEL", "info,mail_relay=loud")],
            "mailRelay.log.level",
            "RUST_LOG-style",
        ),
    ];
    for (env, key, words) in cases {
        let e = load_with(DEV, env).unwrap_err();
        let found: Vec<_> = e.errors.iter().filter(|e| e.key == *key).collect();
        assert_eq!(found.len(), 1, "{env:?}: one error for {key} in {e}");
        assert!(
            found[0].message.contains(words),
            "{env:?}: {}",
            found[0].message
        );
    }
}

fn fall_over() -> DeliveryError {
    panic!("the sender fell over");
}

#[tokio::test]
async fn a_panic_is_one_error_line_naming_it() {
    let (logs, _guard) = Captured::start("info");
    let app = spawn_app_with_sender(|_| {}, Some(failing(fall_over) as Arc<dyn MailSender>)).await;
    let response = app.post_mail(&mail()).await;
    assert_eq!(response.status(), 500);
    assert!(!response.text().await.unwrap().contains("fell over"));
    let errors: Vec<Value> = logs
        .lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(
        errors[0]["cause"],
        "the handler panicked: the sender fell over"
    );
}

// ---- against the real SMTP peer ------------------------------------------------------------

#[tokio::test]
async fn a_real_send_shows_in_the_log_line_the_metrics_and_readiness() {
    let peer = crate::require_peer!();
    let entra = FakeEntra::start().await;
    let token = peer.mint_token(&peer.oauth_user, Duration::from_secs(3600));
    entra.mount_token(&token, 3599).await;
    let mut settings = peer_oauth_settings(&peer, entra.oauth_settings());
    settings.relay.smtp.send_deadline = Duration::from_secs(20);

    let (logs, _guard) = Captured::start("info");
    let app = spawn_built(settings).await;
    // The peer delivers to contoso.test.
    let body = json!({"from": "noreply@contoso.test", "to": "alice@contoso.test", "text": "hi"});
    let response = app.post_mail(&body).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();

    let line = logs
        .requests()
        .into_iter()
        .find(|l| l["route"] == "/mail")
        .unwrap();
    assert_eq!(line["smtp_reply"], 250);
    assert_eq!(line["code"], "ok");
    assert_eq!(line["message_id"], accepted["messageId"]);
    // At info the request's line is the mail's only line: the SMTP sender's reply line and
    // span are debug detail.
    let about_mail: Vec<Value> = logs
        .lines()
        .into_iter()
        .filter(|l| l.to_string().contains(accepted["id"].as_str().unwrap()))
        .collect();
    assert_eq!(about_mail.len(), 1, "{about_mail:#?}");
    let text = logs.text();
    assert!(!text.contains("SMTP server took the mail"), "{text}");
    assert!(!text.contains(&token), "the access token is never logged");
    assert!(!text.contains(CLIENT_SECRET));

    let (metrics, samples) = scrape(&app).await;
    assert_eq!(
        samples["mail_relay_smtp_connections_open"], 1.0,
        "{metrics}"
    );
    assert_eq!(
        samples[r#"mail_relay_token_fetches_total{outcome="success"}"#],
        1.0
    );
    assert!(samples["mail_relay_token_expires_in_seconds"] > 3000.0);
    assert!(!metrics.contains(&token));

    let (status, body) = app.get_ready().await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["components"]["smtp"]["openConnections"], 1);
    assert_eq!(body["components"]["smtp"]["sent"], 1);
    assert_eq!(body["components"]["token"]["status"], "ok");
    assert_eq!(body["components"]["token"]["fetchCount"], 1);
    assert!(!body.to_string().contains(&token));
}

fn quota_used_up() -> DeliveryError {
    DeliveryError::Smtp(SmtpError::rejected(
        Stage::EndOfData,
        554,
        "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
    ))
}

/// Stands in for the rate-limit wiring: names its limit inside the request, then refuses.
fn named_limit() -> DeliveryError {
    telemetry::metrics::rate_limited("mailbox_minute");
    quota_used_up()
}

#[tokio::test]
async fn every_429_counts_as_a_rate_limit_rejection_by_scope() {
    let exchange =
        spawn_app_with_sender(|_| {}, Some(failing(quota_used_up) as Arc<dyn MailSender>)).await;
    assert_eq!(exchange.post_mail(&mail()).await.status(), 429);
    let (text, samples) = scrape(&exchange).await;
    assert_eq!(
        samples.get(r#"mail_relay_rate_limited_total{scope="exchange_quota"}"#),
        Some(&1.0),
        "{text}"
    );

    let named =
        spawn_app_with_sender(|_| {}, Some(failing(named_limit) as Arc<dyn MailSender>)).await;
    assert_eq!(named.post_mail(&mail()).await.status(), 429);
    assert_eq!(named.post_mail(&mail()).await.status(), 429);
    let (text, samples) = scrape(&named).await;
    assert_eq!(
        samples.get(r#"mail_relay_rate_limited_total{scope="mailbox_minute"}"#),
        Some(&2.0),
        "{text}"
    );
    assert!(!text.contains("exchange_quota"), "counted once: {text}");
}

#[tokio::test]
async fn a_users_address_is_logged_only_at_debug_level() {
    fn behind_proxy(settings: &mut Settings) {
        settings.relay.auth.trusted_proxy = Some(mail_relay::config::TrustedProxySettings {
            user_header: http::HeaderName::from_static("x-forwarded-email"),
            sources: vec!["127.0.0.1/32".parse().unwrap()],
            secret: None,
        });
    }
    async fn send_as_user(app: &TestApp) {
        let response = app
            .post_mail_as(
                Some("carol@contoso.com"),
                &json!({"from": "carol@contoso.com", "to": "bob@example.com", "text": "hi"}),
            )
            .await;
        assert_eq!(response.status(), 202);
    }

    for (filter, shown) in [("info", false), ("info,mail_relay=debug", true)] {
        let (logs, _guard) = Captured::start(filter);
        let app = spawn_app_with(behind_proxy).await;
        send_as_user(&app).await;
        let line = logs
            .requests()
            .into_iter()
            .find(|l| l["route"] == "/mail")
            .unwrap();
        assert_eq!(line["caller"], "proxy_user");
        assert_eq!(line["from_domain"], "contoso.com");
        assert_eq!(
            logs.text().contains("carol@contoso.com"),
            shown,
            "{filter}: {line}"
        );
        if shown {
            assert_eq!(line["caller_name"], "carol@contoso.com");
        }
    }
}
