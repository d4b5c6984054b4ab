//! Settings: loading, overrides, placeholders, secrets, validation (one test per rule). Parsing,
//! unknown keys, overrides and placeholders are tested here, each other section in a module of its
//! own; the seed and the helpers below serve them all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_relay::config::cipher::{self, EncryptionKey};
use mail_relay::config::{
    ClientCredential, ConfigError, Delivery, Encryption, LoadOptions, Loaded, SmtpAuthentication,
    load, load_str,
};
use secrecy::ExposeSecret;

mod callers;
mod graph;
mod limits;
mod secrets;
mod validation;

const CLIENT_SECRET: &str = "Zx8Q~client-secret-value~42";

/// Every seed key and every `mailRelay` key, with values unlike the defaults.
const SEED: &str = r#"
spring:
  application:
    name: osweb
server:
  address: 0.0.0.0
  port: 9090
featureSwitches:
  showBanner: true
  sendEmail:
    smtpServer: smtp.office365.com
    smtpPort: 587
    smtpEncryption: TLS
    smtpAuthentication: MS_OAUTH
    smtpUsername: relay@contoso.com
    oAuthClientId: 11111111-2222-3333-4444-555555555555
    oAuthClientSecret: Zx8Q~client-secret-value~42
    oAuthTenantId: contoso.onmicrosoft.com
    oAuthTokenEndpoint: https://login.microsoftonline.com/#TenantID#/oauth2/v2.0/token
    oAuthScopes: https://outlook.office365.com/.default
    oAuthTokenGraceTimeInSeconds: 120
mailRelay:
  delivery:
    mode: smtp
    outboxDir: ./unused
  smtp:
    maxConnections: 2
    connectTimeoutSeconds: 11
    commandTimeoutSeconds: 31
    sendDeadlineSeconds: 61
    helloName: relay.contoso.com
  token:
    connectTimeoutSeconds: 6
    requestTimeoutSeconds: 16
  limits:
    maxBodyBytes: 1048576
    maxRecipients: 100
    requestTimeoutSeconds: 121
  auth:
    apiKeys:
      - name: billing
        sha256: 2f0e8ee0a3fc4ff1b0b9f7d3c8b0d1b5d2e1f5a3c7b9d0e1f2a3b4c5d6e7f809
        allowedFrom: [noreply@contoso.com, "*@billing.contoso.com"]
"#;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ok(yaml: &str, pairs: &[(&str, &str)]) -> Loaded {
    match load_str(yaml, "test.yml", &env(pairs)) {
        Ok(loaded) => loaded,
        Err(e) => panic!("expected valid settings, got {e}"),
    }
}

fn err(yaml: &str, pairs: &[(&str, &str)]) -> ConfigError {
    match load_str(yaml, "test.yml", &env(pairs)) {
        Ok(loaded) => panic!("expected an error, got {:?}", loaded.settings),
        Err(e) => e,
    }
}

/// The message of the one error about `key`.
fn error_for(yaml: &str, pairs: &[(&str, &str)], key: &str) -> String {
    let e = err(yaml, pairs);
    let found: Vec<_> = e.errors.iter().filter(|e| e.key == key).collect();
    assert_eq!(found.len(), 1, "one error for {key} expected in:\n{e}");
    found[0].message.clone()
}

fn seed_without(line_start: &str) -> String {
    let out: String = SEED
        .lines()
        .filter(|l| !l.trim_start().starts_with(line_start))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(out.len(), SEED.len(), "{line_start} not in SEED");
    out
}

fn seed_with(line_start: &str, replacement: &str) -> String {
    SEED.lines()
        .map(|l| {
            if l.trim_start().starts_with(line_start) {
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}{replacement}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn oauth(loaded: &Loaded) -> (&str, &mail_relay::config::OAuthSettings) {
    match &loaded.settings.send_email.smtp_authentication {
        SmtpAuthentication::MsOAuth { username, oauth } => (username.as_str(), oauth),
        other => panic!("expected MS_OAUTH, got {other:?}"),
    }
}

fn key_env(byte: u8) -> (String, String) {
    (cipher::ENV_KEY.to_owned(), STANDARD.encode([byte; 32]))
}

fn config_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

const HASH: &str = "2f0e8ee0a3fc4ff1b0b9f7d3c8b0d1b5d2e1f5a3c7b9d0e1f2a3b4c5d6e7f809";

/// The seed with `extra` appended under `mailRelay:` (indented two spaces).
fn seed_plus(extra: &str) -> String {
    format!("{SEED}{extra}")
}

// ---- parsing -------------------------------------------------------------------------------

#[test]
fn every_seed_key_is_parsed() {
    let loaded = ok(SEED, &[]);
    let s = &loaded.settings;
    assert_eq!(s.server.socket_addr().to_string(), "0.0.0.0:9090");
    assert_eq!(s.send_email.smtp_server, "smtp.office365.com");
    assert_eq!(s.send_email.smtp_port, 587);
    assert_eq!(s.send_email.smtp_encryption, Encryption::Tls);
    let (username, oauth) = oauth(&loaded);
    assert_eq!(username, "relay@contoso.com");
    assert_eq!(oauth.client_id, "11111111-2222-3333-4444-555555555555");
    assert_eq!(oauth.tenant_id, "contoso.onmicrosoft.com");
    match &oauth.credential {
        ClientCredential::Secret(secret) => assert_eq!(secret.expose_secret(), CLIENT_SECRET),
        other => panic!("expected a secret, got {other:?}"),
    }
    assert_eq!(
        oauth.token_endpoint.as_str(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(oauth.scopes, "https://outlook.office365.com/.default");
    assert_eq!(oauth.grace, Duration::from_secs(120));
    assert_eq!(oauth.connect_timeout, Duration::from_secs(6));
    assert_eq!(oauth.request_timeout, Duration::from_secs(16));
    let r = &s.relay;
    assert_eq!(r.delivery, Delivery::Smtp);
    assert_eq!(r.smtp.max_connections, 2);
    assert_eq!(r.smtp.connect_timeout, Duration::from_secs(11));
    assert_eq!(r.smtp.command_timeout, Duration::from_secs(31));
    assert_eq!(r.smtp.send_deadline, Duration::from_secs(61));
    assert_eq!(r.smtp.hello_name.as_deref(), Some("relay.contoso.com"));
    assert_eq!(r.smtp.ca_file, None);
    assert_eq!(r.limits.max_body_bytes, 1_048_576);
    assert_eq!(r.limits.max_recipients, 100);
    assert_eq!(r.limits.request_timeout, Duration::from_secs(121));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn absent_keys_take_their_defaults() {
    let yaml = "featureSwitches:\n  sendEmail:\n    smtpServer: smtp.office365.com\n    smtpUsername: relay@contoso.com\n    oAuthClientId: c\n    oAuthClientSecret: s\n    oAuthTenantId: t\n";
    let loaded = ok(yaml, &[]);
    let s = &loaded.settings;
    assert_eq!(s.server.socket_addr().to_string(), "127.0.0.1:8080");
    assert_eq!(s.send_email.smtp_port, 587);
    assert_eq!(s.send_email.smtp_encryption, Encryption::Tls);
    let (_, oauth) = oauth(&loaded);
    assert_eq!(
        oauth.token_endpoint.as_str(),
        "https://login.microsoftonline.com/t/oauth2/v2.0/token"
    );
    assert_eq!(oauth.scopes, "https://outlook.office365.com/.default");
    assert_eq!(oauth.grace, Duration::from_secs(300));
    assert_eq!(oauth.connect_timeout, Duration::from_secs(5));
    assert_eq!(oauth.request_timeout, Duration::from_secs(15));
    let r = &s.relay;
    assert_eq!(r.delivery, Delivery::Smtp);
    assert_eq!(r.smtp.max_connections, 3);
    assert_eq!(r.smtp.connect_timeout, Duration::from_secs(10));
    assert_eq!(r.smtp.command_timeout, Duration::from_secs(30));
    assert_eq!(r.smtp.send_deadline, Duration::from_secs(60));
    assert_eq!(r.limits.max_body_bytes, 52_428_800);
    assert_eq!(r.limits.max_recipients, 500);
    assert_eq!(r.limits.request_timeout, Duration::from_secs(120));
}

#[test]
fn encryption_accepts_names_any_case_and_enaio_numbers() {
    for (value, expected) in [
        ("0", Encryption::None),
        ("1", Encryption::Ssl),
        ("2", Encryption::Tls),
        ("tls", Encryption::Tls),
        ("Ssl", Encryption::Ssl),
        ("NONE", Encryption::None),
    ] {
        let yaml = seed_with("smtpServer:", "smtpServer: 127.0.0.1");
        let yaml = yaml.replace("smtpEncryption: TLS", &format!("smtpEncryption: {value}"));
        let loaded = ok(&yaml, &[]);
        assert_eq!(
            loaded.settings.send_email.smtp_encryption, expected,
            "{value}"
        );
    }
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let e = load(&LoadOptions {
        path: PathBuf::from("/nonexistent/osweb-prod.yml"),
        env: Vec::new(),
    })
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/osweb-prod.yml"), "{e}");
}

#[test]
fn a_file_that_is_not_yaml_is_an_error() {
    let e = err("server: [unclosed\n", &[]);
    assert!(e.errors[0].message.contains("not valid YAML"), "{e}");
}

#[test]
fn a_syntax_error_gives_line_and_column_but_never_the_lines_around_it() {
    // The parser could quote the neighbouring lines, and those may hold a secret.
    let yaml = "featureSwitches:\n  sendEmail:\n    oAuthClientSecret: Leaky5ecret\n    smtpServer: \"unclosed\n";
    let e = err(yaml, &[]);
    let message = &e.errors[0].message;
    assert!(message.contains("line 4, column 17"), "{message}");
    assert!(!e.to_string().contains("Leaky5ecret"), "{e}");
}

// ---- unknown keys --------------------------------------------------------------------------

#[test]
fn unknown_send_email_key_is_a_warning_with_the_nearest_key() {
    let yaml = SEED.replace(
        "    smtpServer: smtp.office365.com\n",
        "    smtpServer: smtp.office365.com\n    smtpSever: typo.example.com\n",
    );
    let loaded = ok(&yaml, &[]);
    assert_eq!(
        loaded.warnings,
        vec!["featureSwitches.sendEmail.smtpSever: unknown key, ignored; did you mean smtpServer?"]
    );
}

#[test]
fn unknown_mail_relay_key_is_an_error_at_any_depth() {
    let yaml = SEED.replace("    maxConnections: 2\n", "    maxConection: 2\n");
    let message = error_for(&yaml, &[], "mailRelay.smtp.maxConection");
    assert!(message.contains("unknown key"), "{message}");
    assert!(
        message.contains("mailRelay.smtp.maxConnections"),
        "{message}"
    );
    let yaml = format!("{SEED}  extra:\n    deeper:\n      key: 1\n");
    error_for(&yaml, &[], "mailRelay.extra.deeper.key");
}

#[test]
fn other_top_level_sections_are_ignored() {
    let loaded = ok(SEED, &[]);
    assert!(loaded.warnings.is_empty());
}

#[test]
fn unknown_relay_env_variable_is_a_warning() {
    let loaded = ok(SEED, &[("MAILRELAY_SMTP_MAXCONECTIONS", "2")]);
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(
        loaded.warnings[0].contains("did you mean MAILRELAY_SMTP_MAXCONNECTIONS?"),
        "{:?}",
        loaded.warnings
    );
}

// ---- overrides and placeholders ------------------------------------------------------------

#[test]
fn env_override_beats_the_file_and_sets_absent_keys() {
    let loaded = ok(
        SEED,
        &[
            ("SERVER_PORT", "7070"),
            ("FEATURESWITCHES_SENDEMAIL_SMTPSERVER", "smtp.example.net"),
            (
                "MAILRELAY_SMTP_CAFILE",
                fixture("oauth-cert.pem").to_str().unwrap(),
            ),
            ("MAILRELAY_LIMITS_MAXRECIPIENTS", "42"),
        ],
    );
    let s = &loaded.settings;
    assert_eq!(s.server.port, 7070);
    assert_eq!(s.send_email.smtp_server, "smtp.example.net");
    assert_eq!(s.relay.smtp.ca_file, Some(fixture("oauth-cert.pem")));
    assert_eq!(s.relay.limits.max_recipients, 42);
    assert!(
        loaded.masked.contains("# from env SERVER_PORT"),
        "{}",
        loaded.masked
    );
}

#[test]
fn env_override_is_validated_like_the_file() {
    let message = error_for(SEED, &[("SERVER_PORT", "eighty")], "server.port");
    assert!(
        message.contains("\"eighty\" is not a whole number"),
        "{message}"
    );
}

#[test]
fn placeholder_with_default_and_without() {
    let yaml = SEED
        .replace(
            "oAuthTenantId: contoso.onmicrosoft.com",
            "oAuthTenantId: ${TENANT}",
        )
        .replace("port: 9090", "port: ${HTTP_PORT:8181}");
    let loaded = ok(&yaml, &[("TENANT", "fabrikam.onmicrosoft.com")]);
    assert_eq!(loaded.settings.server.port, 8181);
    assert_eq!(oauth(&loaded).1.tenant_id, "fabrikam.onmicrosoft.com");
    let loaded = ok(&yaml, &[("TENANT", "x"), ("HTTP_PORT", "8282")]);
    assert_eq!(loaded.settings.server.port, 8282);
}

#[test]
fn unresolved_placeholder_names_the_key_and_the_variable() {
    let yaml = SEED.replace(
        "oAuthTenantId: contoso.onmicrosoft.com",
        "oAuthTenantId: ${TENANT}",
    );
    let message = error_for(&yaml, &[], "featureSwitches.sendEmail.oAuthTenantId");
    assert!(message.contains("TENANT is not set"), "{message}");
}

#[test]
fn placeholder_resolving_to_empty_leaves_the_key_unset() {
    let yaml = SEED.replace(
        "oAuthScopes: https://outlook.office365.com/.default",
        "oAuthScopes: ${SCOPES:}",
    );
    let loaded = ok(&yaml, &[]);
    assert_eq!(
        oauth(&loaded).1.scopes,
        "https://outlook.office365.com/.default"
    );
}
