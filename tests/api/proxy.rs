//! Behind a reverse proxy: the base path, the client address from trusted proxies, the settings,
//! and a mail sent through a real nginx (`tests/proxy/start.sh`) to the real SMTP peer.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use mail_parser::MessageParser;
use mail_relay::config::{ForwardedHeader, TrustedProxySettings, load_str};
use serde_json::{Value, json};

use crate::entra::FakeEntra;
use crate::helpers::{expect_problem, spawn_app, spawn_app_with};
use crate::peer::Peer;
use crate::process::{RelayProcess, smtp_yaml};
use crate::require_peer;

const BASE: &str = "/osweb/mail";

fn mail(from: &str, subject: &str) -> Value {
    json!({"from": from, "to": "alice@contoso.test", "subject": subject, "text": "hello"})
}

// ---- base path ------------------------------------------------------------------------------

#[tokio::test]
async fn every_route_is_served_under_the_base_path_and_not_at_the_root() {
    let app = spawn_app_with(|s| s.relay.http.base_path = BASE.into()).await;

    for probe in ["/health/live", "/health/ready"] {
        assert_eq!(
            app.get(&format!("{BASE}{probe}")).await.status(),
            200,
            "{probe}"
        );
        expect_problem(app.get(probe).await, 404, "not_found").await;
    }
    let sent = app
        .client
        .post(app.url(&format!("{BASE}/mail")))
        .json(&mail("noreply@contoso.com", "under a base path"))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202, "{}", sent.text().await.unwrap());
    let at_root = app
        .post_mail(&mail("noreply@contoso.com", "at the root"))
        .await;
    expect_problem(at_root, 404, "not_found").await;
    // The prefix alone and a look-alike prefix are not routes.
    expect_problem(app.get(BASE).await, 404, "not_found").await;
    expect_problem(app.get("/osweb/mailx/health/live").await, 404, "not_found").await;
    // Methods are still checked under the prefix.
    expect_problem(
        app.get(&format!("{BASE}/mail")).await,
        405,
        "method_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn the_openapi_document_names_the_base_path_as_its_server() {
    let app = spawn_app_with(|s| s.relay.http.base_path = BASE.into()).await;
    let doc: Value = app
        .get(&format!("{BASE}/openapi.json"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(doc["servers"], json!([{"url": BASE}]));
    // Paths stay relative to the server, as OpenAPI resolves them.
    assert!(doc["paths"]["/mail"].is_object(), "{:#}", doc["paths"]);

    let root = spawn_app().await;
    let doc: Value = root.get("/openapi.json").await.json().await.unwrap();
    assert!(doc.get("servers").is_none(), "{:#}", doc["servers"]);
}

// ---- client address ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_log_names_the_client_a_trusted_proxy_reports() {
    let outbox = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&format!(
        "server:\n  port: 0\nmailRelay:\n  delivery:\n    mode: outbox\n    outboxDir: {}\n  auth:\n    allowAnonymous: true\n  http:\n    trustedProxies: [127.0.0.2]\n  log:\n    level: info,mail_relay=debug\n",
        outbox.path().display()
    ));
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(IpAddr::from(ip))
            .build()
            .unwrap()
    };
    // Through the proxy (127.0.0.2): the left-most entry is made up by the client, the proxy
    // appended the real one.
    let response = from([127, 0, 0, 2])
        .get(relay.url("/health/live"))
        .header("x-forwarded-for", "192.0.2.1, 203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Not through the proxy: the header is the client's own word and ignored.
    let response = from([127, 0, 0, 1])
        .get(relay.url("/health/ready"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while relay.clients_for("/health/ready").is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        relay.clients_for("/health/live"),
        ["203.0.113.9"],
        "{}",
        relay.log_text()
    );
    assert_eq!(
        relay.clients_for("/health/ready"),
        ["127.0.0.1"],
        "{}",
        relay.log_text()
    );
}

#[tokio::test]
async fn the_user_header_is_checked_against_the_tcp_peer_not_a_forwarded_address() {
    // The proxy allowed to name users is 127.0.0.2; this client connects from 127.0.0.1 and claims,
    // through a trusted X-Forwarded-For, to come from 127.0.0.2. It must not be believed.
    let app = spawn_app_with(|s| {
        s.relay.http.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        s.relay.auth.trusted_proxy = Some(TrustedProxySettings {
            user_header: http::HeaderName::from_static("x-forwarded-email"),
            sources: vec!["127.0.0.2/32".parse().unwrap()],
            secret: None,
        });
    })
    .await;
    let response = app
        .post_mail_without_key(
            &[
                ("x-forwarded-for", "127.0.0.2"),
                ("x-forwarded-email", "alice@contoso.com"),
            ],
            &mail("alice@contoso.com", "spoofed proxy"),
        )
        .await;
    expect_problem(response, 401, "unauthorized").await;
    assert!(crate::helpers::outbox_files(&app).is_empty());
}

#[tokio::test]
async fn ipv4_proxies_are_recognised_on_a_dual_stack_listener() {
    // On `::` the peer 127.0.0.1 arrives as ::ffff:127.0.0.1; the settings name it as IPv4.
    let app = spawn_app_with(|s| {
        s.server.address = "::".parse().unwrap();
        s.relay.auth.trusted_proxy = Some(TrustedProxySettings {
            user_header: http::HeaderName::from_static("x-forwarded-email"),
            sources: vec!["127.0.0.1/32".parse().unwrap()],
            secret: None,
        });
    })
    .await;
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/mail", app.address.port()))
        .header("x-forwarded-email", "alice@contoso.com")
        .json(&mail("alice@contoso.com", "dual stack"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

// ---- settings ---------------------------------------------------------------------------------

const DEV: &str = "mailRelay:\n  delivery:\n    mode: outbox\n  auth:\n    allowAnonymous: true\n";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

#[test]
fn proxy_and_shutdown_settings_have_defaults() {
    let loaded = load_str(DEV, "test.yml", &[]).unwrap();
    let relay = &loaded.settings.relay;
    assert_eq!(relay.http.base_path, "");
    assert!(relay.http.trusted_proxies.is_empty());
    assert_eq!(relay.http.forwarded_header, ForwardedHeader::XForwardedFor);
    assert_eq!(relay.shutdown.drain_delay, Duration::from_secs(5));
    assert_eq!(relay.shutdown.deadline, Duration::from_secs(70));
}

#[test]
fn proxy_and_shutdown_settings_are_read_from_the_file_and_the_environment() {
    let yaml = format!(
        "{DEV}  http:\n    basePath: /osweb/mail\n    trustedProxies: [10.0.0.0/8, \"::1\"]\n    forwarded-header: forwarded\n  shutdown:\n    drainDelaySeconds: 0\n"
    );
    let loaded = load_str(
        &yaml,
        "test.yml",
        &env(&[("MAILRELAY_SHUTDOWN_DEADLINESECONDS", "45")]),
    )
    .unwrap();
    let relay = &loaded.settings.relay;
    assert_eq!(relay.http.base_path, "/osweb/mail");
    let proxies: Vec<String> = relay
        .http
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(proxies, ["10.0.0.0/8", "::1/128"]);
    assert_eq!(relay.http.forwarded_header, ForwardedHeader::Forwarded);
    assert_eq!(relay.shutdown.drain_delay, Duration::ZERO);
    assert_eq!(relay.shutdown.deadline, Duration::from_secs(45));
    for line in [
        "basePath: \"/osweb/mail\"",
        "trustedProxies: [\"10.0.0.0/8\", \"::1/128\"]",
        "forwardedHeader: \"Forwarded\"",
        "drainDelaySeconds: 0",
        "deadlineSeconds: 45 # from env MAILRELAY_SHUTDOWN_DEADLINESECONDS",
    ] {
        assert!(
            loaded.masked.contains(line),
            "{line} missing in\n{}",
            loaded.masked
        );
    }

    let from_env = load_str(
        DEV,
        "test.yml",
        &env(&[
            ("MAILRELAY_HTTP_TRUSTEDPROXIES", "10.1.0.0/16,192.0.2.7"),
            ("MAILRELAY_HTTP_BASEPATH", "/relay"),
        ]),
    )
    .unwrap();
    let proxies: Vec<String> = from_env
        .settings
        .relay
        .http
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(proxies, ["10.1.0.0/16", "192.0.2.7/32"]);
    assert_eq!(from_env.settings.relay.http.base_path, "/relay");
}

fn error_for(yaml_tail: &str, key: &str) -> String {
    let e = match load_str(&format!("{DEV}{yaml_tail}"), "test.yml", &[]) {
        Ok(_) => panic!("{yaml_tail} was accepted"),
        Err(e) => e,
    };
    let found: Vec<_> = e.errors.iter().filter(|e| e.key == key).collect();
    assert_eq!(found.len(), 1, "one error for {key} expected in:\n{e}");
    found[0].message.clone()
}

#[test]
fn bad_proxy_and_shutdown_settings_name_the_key_and_the_fix() {
    let http = "mailRelay.http.basePath";
    for (path, why) in [
        ("osweb/mail", "does not start with /"),
        ("/osweb/mail/", "ends with /"),
        ("/osweb/../admin", ".."),
    ] {
        let message = error_for(&format!("  http:\n    basePath: {path}\n"), http);
        assert!(
            message.contains(why) && message.contains("/osweb/mail"),
            "{message}"
        );
    }
    let message = error_for(
        "  http:\n    trustedProxies: [10.0.0.0/8, proxy.local]\n",
        "mailRelay.http.trustedProxies",
    );
    assert!(
        message.contains("\"proxy.local\" is not an IP address or CIDR block"),
        "{message}"
    );
    let message = error_for(
        "  http:\n    forwardedHeader: X-Real-IP\n",
        "mailRelay.http.forwardedHeader",
    );
    assert!(message.contains("X-Forwarded-For, Forwarded"), "{message}");
    let message = error_for(
        "  shutdown:\n    drainDelaySeconds: 30\n    deadlineSeconds: 30\n",
        "mailRelay.shutdown.deadlineSeconds",
    );
    assert!(message.contains("drainDelaySeconds"), "{message}");
    let message = error_for(
        "  shutdown:\n    deadlineSeconds: 0\n",
        "mailRelay.shutdown.deadlineSeconds",
    );
    assert!(message.contains("out of range"), "{message}");
}

#[test]
fn connection_limits_have_defaults_are_read_and_are_checked() {
    let defaults = load_str(DEV, "test.yml", &[]).unwrap().settings.relay.http;
    assert_eq!(defaults.header_read_timeout, Duration::from_secs(75));
    assert_eq!(defaults.max_connections, 1024);
    assert_eq!(defaults.max_header_bytes, 16 * 1024);
    let loaded = load_str(
        &format!("{DEV}  http:\n    headerReadTimeoutSeconds: 20\n    maxHeaderBytes: 32768\n"),
        "test.yml",
        &env(&[("MAILRELAY_HTTP_MAXCONNECTIONS", "200")]),
    )
    .unwrap();
    let http = &loaded.settings.relay.http;
    assert_eq!(http.header_read_timeout, Duration::from_secs(20));
    assert_eq!(http.max_connections, 200);
    assert_eq!(http.max_header_bytes, 32 * 1024);
    for (line, key, allowed) in [
        (
            "headerReadTimeoutSeconds: 0",
            "headerReadTimeoutSeconds",
            "1..=3600",
        ),
        ("maxConnections: 0", "maxConnections", "1..=1000000"),
        ("maxHeaderBytes: 4096", "maxHeaderBytes", "8192..=1048576"),
    ] {
        let message = error_for(
            &format!("  http:\n    {line}\n"),
            &format!("mailRelay.http.{key}"),
        );
        assert!(message.contains(allowed), "{message}");
    }
}

// ---- through a real nginx -----------------------------------------------------------------------

/// The nginx of `tests/proxy/start.sh`, as described by its `proxy.env`.
pub struct Nginx {
    pub url: String,
    pub base_path: String,
    /// The address nginx connects to the relay from.
    pub source: IpAddr,
}

impl Nginx {
    fn dir() -> PathBuf {
        std::env::var_os("MAIL_RELAY_PROXY_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/mail-relay-proxy"))
    }

    fn get() -> Option<Nginx> {
        let text = std::fs::read_to_string(Self::dir().join("proxy.env")).ok()?;
        let vars: std::collections::HashMap<&str, &str> =
            text.lines().filter_map(|l| l.split_once('=')).collect();
        let nginx = Nginx {
            url: vars.get("PROXY_URL")?.to_string(),
            base_path: vars.get("PROXY_BASE_PATH")?.to_string(),
            source: vars.get("PROXY_SOURCE")?.parse().ok()?,
        };
        let address = nginx.url.strip_prefix("http://")?.parse().ok()?;
        std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
        Some(nginx)
    }

    /// The running nginx; when it is missing, panics under `CI=true`, else prints `SKIPPED`.
    pub fn require(test: &str) -> Option<Nginx> {
        if let Some(nginx) = Self::get() {
            return Some(nginx);
        }
        crate::peer::missing(
            &format!(
                "nginx ({}/proxy.env missing or port closed)",
                Self::dir().display()
            ),
            "tests/proxy/start.sh",
            test,
        );
        None
    }
}

/// A relay as production runs it behind nginx: MS_OAUTH to the peer, the base path, nginx trusted
/// for X-Forwarded-For and for the user header.
fn relay_behind(nginx: &Nginx, peer: &Peer, entra: &FakeEntra) -> RelayProcess {
    RelayProcess::start(&smtp_yaml(
        peer,
        peer.submission_port,
        Ipv4Addr::new(127, 0, 43, 3),
        entra,
        &format!(
            "    trustedProxy:\n      userHeader: X-Forwarded-Email\n      sources: [{}]\n",
            nginx.source
        ),
        &format!(
            "  http:\n    basePath: {}\n    trustedProxies: [{}]\n",
            nginx.base_path, nginx.source
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_sent_through_nginx_arrives_with_the_user_nginx_named() {
    let peer = require_peer!();
    let Some(nginx) =
        Nginx::require("proxy::a_mail_sent_through_nginx_arrives_with_the_user_nginx_named")
    else {
        return;
    };
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let relay = relay_behind(&nginx, &peer, &entra);
    let relay_port = relay.address.port().to_string();
    // The browser: on 127.0.0.3, so that nginx sees a client that is not itself.
    let browser = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, 3]))
        .build()
        .unwrap();
    let url = format!("{}{}/mail", nginx.url, nginx.base_path);
    let marker = format!("via-nginx-{}", uuid::Uuid::new_v4().simple());
    let response = browser
        .post(&url)
        .header("x-test-upstream-port", &relay_port)
        .header("x-test-user", "Carol@Contoso.test")
        // Made up by the client: nginx appends the real address, the relay ignores this one.
        .header("x-forwarded-for", "192.0.2.66")
        .json(&mail("carol@contoso.test", &marker))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let accepted: Value = response.json().await.unwrap();
    let message_id = accepted["messageId"]
        .as_str()
        .unwrap()
        .trim_matches(['<', '>']);

    let raw = peer
        .wait_for_message(message_id, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("{message_id} not delivered to {}", peer.maildir.display()));
    let message = MessageParser::default().parse(&raw).unwrap();
    assert_eq!(message.subject(), Some(marker.as_str()));
    assert_eq!(
        message
            .from()
            .and_then(|f| f.first())
            .and_then(|a| a.address()),
        Some("carol@contoso.test")
    );
    let mail_path = format!("{}/mail", nginx.base_path);
    assert_eq!(
        relay.clients_for(&mail_path),
        ["127.0.0.3"],
        "{}",
        relay.log_text()
    );

    // The user named by nginx may send as themselves only.
    let other = browser
        .post(&url)
        .header("x-test-upstream-port", &relay_port)
        .header("x-test-user", "carol@contoso.test")
        .json(&mail("dave@contoso.test", "not carol"))
        .send()
        .await
        .unwrap();
    expect_problem(other, 403, "send_as_denied").await;
    // A user header the client sends itself does not pass nginx: no user, no mail.
    let spoofed = browser
        .post(&url)
        .header("x-test-upstream-port", &relay_port)
        .header("x-forwarded-email", "carol@contoso.test")
        .json(&mail("carol@contoso.test", "spoofed"))
        .send()
        .await
        .unwrap();
    expect_problem(spoofed, 401, "unauthorized").await;
    // Straight to the relay (not through nginx), the user header counts for nothing.
    let direct = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{relay_port}{}/mail",
            nginx.base_path
        ))
        .header("x-forwarded-email", "carol@contoso.test")
        .json(&mail("carol@contoso.test", "direct"))
        .send()
        .await
        .unwrap();
    expect_problem(direct, 401, "unauthorized").await;
    // The probes are reachable through nginx under the base path.
    let ready = browser
        .get(format!("{}{}/health/ready", nginx.url, nginx.base_path))
        .header("x-test-upstream-port", &relay_port)
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}
