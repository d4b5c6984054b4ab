//! Settings: loading, overrides, placeholders, secrets, validation (one test per rule).

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
        SmtpAuthentication::MsOAuth { username, oauth } => (username, oauth),
        other => panic!("expected MS_OAUTH, got {other:?}"),
    }
}

fn key_env(byte: u8) -> (String, String) {
    (cipher::ENV_KEY.to_owned(), STANDARD.encode([byte; 32]))
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

// ---- secrets from files and {cipher} -------------------------------------------------------

#[test]
fn secret_from_a_file_with_trailing_newline_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client-secret");
    std::fs::write(&path, "from-the-mount\n").unwrap();
    let yaml = seed_with(
        "oAuthClientSecret:",
        &format!("oAuthClientSecretFile: {}", path.display()),
    );
    let loaded = ok(&yaml, &[]);
    match &oauth(&loaded).1.credential {
        ClientCredential::Secret(s) => assert_eq!(s.expose_secret(), "from-the-mount"),
        other => panic!("{other:?}"),
    }
    assert!(!loaded.masked.contains("from-the-mount"));
    // The same through the environment.
    let loaded = ok(
        &seed_without("oAuthClientSecret:"),
        &[(
            "FEATURESWITCHES_SENDEMAIL_OAUTHCLIENTSECRETFILE",
            path.to_str().unwrap(),
        )],
    );
    assert!(matches!(
        oauth(&loaded).1.credential,
        ClientCredential::Secret(_)
    ));
}

#[test]
fn secret_and_its_file_form_together_are_an_error() {
    let message = error_for(
        SEED,
        &[(
            "FEATURESWITCHES_SENDEMAIL_OAUTHCLIENTSECRETFILE",
            "/run/secrets/x",
        )],
        "featureSwitches.sendEmail.oAuthClientSecret",
    );
    assert!(message.contains("set only one"), "{message}");
}

#[test]
fn unreadable_secret_file_is_an_error_naming_the_file_key() {
    let yaml = seed_with(
        "oAuthClientSecret:",
        "oAuthClientSecretFile: /nonexistent/secret",
    );
    let message = error_for(
        &yaml,
        &[],
        "featureSwitches.sendEmail.oAuthClientSecretFile",
    );
    assert!(message.contains("/nonexistent/secret"), "{message}");
}

#[test]
fn cipher_value_round_trip() {
    let key = EncryptionKey::from_bytes(&[5; 32]);
    let encrypted = cipher::encrypt(&key, CLIENT_SECRET).unwrap();
    let yaml = seed_with(
        "oAuthClientSecret:",
        &format!("oAuthClientSecret: \"{encrypted}\""),
    );
    let (name, value) = key_env(5);
    let loaded = ok(&yaml, &[(&name, &value)]);
    match &oauth(&loaded).1.credential {
        ClientCredential::Secret(s) => assert_eq!(s.expose_secret(), CLIENT_SECRET),
        other => panic!("{other:?}"),
    }
    assert!(!loaded.masked.contains(CLIENT_SECRET));
    assert!(!loaded.masked.contains(&encrypted));
}

#[test]
fn cipher_value_under_a_wrong_key_names_the_setting_not_the_secret() {
    let encrypted = cipher::encrypt(&EncryptionKey::from_bytes(&[5; 32]), CLIENT_SECRET).unwrap();
    let yaml = seed_with(
        "oAuthClientSecret:",
        &format!("oAuthClientSecret: \"{encrypted}\""),
    );
    let (name, value) = key_env(6);
    let e = err(&yaml, &[(&name, &value)]);
    let message = error_for(
        &yaml,
        &[(&name, &value)],
        "featureSwitches.sendEmail.oAuthClientSecret",
    );
    assert!(message.contains("cannot decrypt"), "{message}");
    let shown = e.to_string();
    assert!(!shown.contains(CLIENT_SECRET), "{shown}");
    assert!(!shown.contains(&encrypted), "{shown}");
}

#[test]
fn an_invalid_cipher_value_is_reported_without_its_clear_text() {
    // Encrypted, then found invalid: the operator hid it, so the error must not show it.
    let key = EncryptionKey::from_bytes(&[5; 32]);
    let (name, value) = key_env(5);
    for (setting, clear) in [
        ("smtpUsername", "not-an-address"),
        ("smtpEncryption", "STARTTLS-please"),
        (
            "oAuthTokenEndpoint",
            "http://login.example.com/#TenantID#/token",
        ),
    ] {
        let encrypted = cipher::encrypt(&key, clear).unwrap();
        let yaml = seed_with(
            &format!("{setting}:"),
            &format!("{setting}: \"{encrypted}\""),
        );
        let e = err(&yaml, &[(&name, &value)]);
        let shown = e.to_string();
        assert!(
            shown.contains(&format!("featureSwitches.sendEmail.{setting}")),
            "{shown}"
        );
        assert!(!shown.contains(clear), "{shown}");
    }
}

#[test]
fn cipher_value_without_a_key_says_which_variable_to_set() {
    let encrypted = cipher::encrypt(&EncryptionKey::from_bytes(&[5; 32]), "x").unwrap();
    let yaml = seed_with(
        "oAuthClientSecret:",
        &format!("oAuthClientSecret: \"{encrypted}\""),
    );
    let message = error_for(&yaml, &[], "featureSwitches.sendEmail.oAuthClientSecret");
    assert!(message.contains("MAIL_RELAY_ENCRYPT_KEY"), "{message}");
}

// ---- masking -------------------------------------------------------------------------------

#[test]
fn secrets_are_absent_from_masked_output_and_debug() {
    let loaded = ok(SEED, &[]);
    assert!(!loaded.masked.contains(CLIENT_SECRET), "{}", loaded.masked);
    assert!(
        loaded.masked.contains("oAuthClientSecret: \"****\""),
        "{}",
        loaded.masked
    );
    assert!(loaded.masked.contains("smtpServer: \"smtp.office365.com\""));
    let debug = format!("{:?}", loaded.settings);
    assert!(!debug.contains(CLIENT_SECRET), "{debug}");
    assert!(!format!("{loaded:?}").contains(CLIENT_SECRET));
    let options = LoadOptions {
        path: PathBuf::from("osweb-prod.yml"),
        env: vec![("OAUTH_CLIENT_SECRET".into(), CLIENT_SECRET.into())],
    };
    let debug = format!("{options:?}");
    assert!(debug.contains("OAUTH_CLIENT_SECRET"), "{debug}");
    assert!(!debug.contains(CLIENT_SECRET), "{debug}");
}

#[test]
fn masked_output_is_yaml_that_loads_back() {
    let loaded = ok(SEED, &[]);
    // Secrets are masked, so put the real one back through the environment.
    let again = ok(
        &loaded
            .masked
            .replace("oAuthClientSecret: \"****\"", "oAuthClientSecret: x"),
        &[],
    );
    assert_eq!(again.masked.lines().count(), loaded.masked.lines().count());
    assert_eq!(again.settings.server.port, 9090);
}

#[test]
fn basic_password_is_masked() {
    let yaml = "featureSwitches:\n  sendEmail:\n    smtpServer: mail.example.com\n    smtpAuthentication: BASIC\n    smtpUsername: relay\n    smtpPassword: hunter2-password\n";
    let loaded = ok(yaml, &[]);
    assert!(!loaded.masked.contains("hunter2-password"));
    assert!(!format!("{:?}", loaded.settings).contains("hunter2-password"));
    assert!(matches!(
        loaded.settings.send_email.smtp_authentication,
        SmtpAuthentication::Basic { .. }
    ));
}

// ---- validation, one rule each -------------------------------------------------------------

#[test]
fn smtp_server_is_required_for_smtp_delivery() {
    let message = error_for(
        &seed_without("smtpServer:"),
        &[],
        "featureSwitches.sendEmail.smtpServer",
    );
    assert!(message.contains("is required"), "{message}");
}

#[test]
fn ms_oauth_requires_tenant_client_and_username() {
    for key in ["oAuthTenantId", "oAuthClientId", "smtpUsername"] {
        let message = error_for(
            &seed_without(&format!("{key}:")),
            &[],
            &format!("featureSwitches.sendEmail.{key}"),
        );
        assert!(
            message.contains("is required with smtpAuthentication MS_OAUTH"),
            "{message}"
        );
    }
}

#[test]
fn basic_requires_username_and_password() {
    let yaml = "featureSwitches:\n  sendEmail:\n    smtpServer: mail.example.com\n    smtpAuthentication: BASIC\n";
    let e = err(yaml, &[]);
    let keys: Vec<&str> = e.errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "featureSwitches.sendEmail.smtpUsername",
            "featureSwitches.sendEmail.smtpPassword"
        ],
        "{e}"
    );
}

#[test]
fn port_outside_the_range_is_an_error() {
    let message = error_for(
        &seed_with("smtpPort:", "smtpPort: 70000"),
        &[],
        "featureSwitches.sendEmail.smtpPort",
    );
    assert_eq!(message, "\"70000\" is out of range; allowed 1..=65535");
    let message = error_for(
        &seed_with("smtpPort:", "smtpPort: 0"),
        &[],
        "featureSwitches.sendEmail.smtpPort",
    );
    assert!(message.contains("1..=65535"), "{message}");
}

#[test]
fn unknown_encryption_lists_the_allowed_values() {
    let message = error_for(
        &seed_with("smtpEncryption:", "smtpEncryption: FOO"),
        &[],
        "featureSwitches.sendEmail.smtpEncryption",
    );
    assert_eq!(message, "\"FOO\" is not one of NONE, SSL, TLS (or 0, 1, 2)");
}

#[test]
fn unknown_authentication_lists_the_allowed_values() {
    let message = error_for(
        &seed_with("smtpAuthentication:", "smtpAuthentication: OAUTH"),
        &[],
        "featureSwitches.sendEmail.smtpAuthentication",
    );
    assert_eq!(message, "\"OAUTH\" is not one of NONE, BASIC, MS_OAUTH");
}

#[test]
fn ms_oauth_username_must_be_an_address() {
    let message = error_for(
        &seed_with("smtpUsername:", "smtpUsername: relay"),
        &[],
        "featureSwitches.sendEmail.smtpUsername",
    );
    assert!(
        message.contains("\"relay\" is not an e-mail address"),
        "{message}"
    );
}

#[test]
fn ms_oauth_needs_exactly_one_of_secret_and_certificate() {
    let message = error_for(
        &seed_without("oAuthClientSecret:"),
        &[],
        "featureSwitches.sendEmail.oAuthClientSecret",
    );
    assert!(
        message.contains(
            "exactly one of oAuthClientSecret, oAuthCertificate (with oAuthPrivateKey) and oAuthFederatedTokenFile"
        ),
        "{message}"
    );
    assert!(message.contains("none is set"), "{message}");
    let cert = fixture("oauth-cert.pem");
    let message = error_for(
        SEED,
        &[(
            "FEATURESWITCHES_SENDEMAIL_OAUTHCERTIFICATEFILE",
            cert.to_str().unwrap(),
        )],
        "featureSwitches.sendEmail.oAuthClientSecret",
    );
    assert!(message.contains("both are set"), "{message}");
}

#[test]
fn certificate_and_key_from_files_parse() {
    let yaml = seed_with(
        "oAuthClientSecret:",
        &format!(
            "oAuthCertificateFile: {}\n    oAuthPrivateKeyFile: {}",
            fixture("oauth-cert.pem").display(),
            fixture("oauth-key.pem").display()
        ),
    );
    let loaded = ok(&yaml, &[]);
    match &oauth(&loaded).1.credential {
        ClientCredential::Certificate {
            certificate_pem,
            private_key_pem,
        } => {
            assert!(certificate_pem.starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(
                private_key_pem
                    .expose_secret()
                    .starts_with("-----BEGIN PRIVATE KEY-----")
            );
        }
        other => panic!("{other:?}"),
    }
    let key_text = std::fs::read_to_string(fixture("oauth-key.pem")).unwrap();
    let body_line = key_text.lines().nth(1).unwrap();
    assert!(!loaded.masked.contains(body_line));
    assert!(!format!("{:?}", loaded.settings).contains(body_line));
}

#[test]
fn a_private_key_of_another_certificate_is_a_settings_error() {
    let other = crate::token::make_certificate();
    let dir = tempfile::tempdir().unwrap();
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(&other_key, &other.private_key_pem).unwrap();
    let yaml = seed_with(
        "oAuthClientSecret:",
        &format!(
            "oAuthCertificateFile: {}\n    oAuthPrivateKeyFile: {}",
            fixture("oauth-cert.pem").display(),
            other_key.display()
        ),
    );
    let message = error_for(&yaml, &[], "featureSwitches.sendEmail.oAuthPrivateKey");
    assert!(
        message.contains("does not belong to the certificate"),
        "{message}"
    );
    assert!(!message.contains("PRIVATE KEY"), "{message}");
}

#[test]
fn broken_certificate_is_an_error_naming_the_key() {
    let yaml = seed_with(
        "oAuthClientSecret:",
        &format!(
            "oAuthCertificate: not a certificate\n    oAuthPrivateKeyFile: {}",
            fixture("oauth-key.pem").display()
        ),
    );
    let message = error_for(&yaml, &[], "featureSwitches.sendEmail.oAuthCertificate");
    assert!(message.contains("is not a PEM certificate"), "{message}");
}

#[test]
fn broken_or_non_rsa_private_key_is_an_error_without_its_text() {
    for key_file in ["ec-key.pem", "oauth-cert.pem"] {
        let yaml = seed_with(
            "oAuthClientSecret:",
            &format!(
                "oAuthCertificateFile: {}\n    oAuthPrivateKeyFile: {}",
                fixture("oauth-cert.pem").display(),
                fixture(key_file).display()
            ),
        );
        let message = error_for(&yaml, &[], "featureSwitches.sendEmail.oAuthPrivateKey");
        assert!(
            message.contains("is not a PEM RSA private key"),
            "{message}"
        );
        assert!(!message.contains("BEGIN PRIVATE KEY-----\n"), "{message}");
    }
}

#[test]
fn certificate_without_private_key_is_an_error() {
    let yaml = seed_with(
        "oAuthClientSecret:",
        &format!(
            "oAuthCertificateFile: {}",
            fixture("oauth-cert.pem").display()
        ),
    );
    let message = error_for(&yaml, &[], "featureSwitches.sendEmail.oAuthPrivateKey");
    assert!(
        message.contains("is required with oAuthCertificate"),
        "{message}"
    );
}

#[test]
fn token_endpoint_must_be_an_https_url_unless_loopback() {
    let key = "featureSwitches.sendEmail.oAuthTokenEndpoint";
    let message = error_for(
        SEED,
        &[("FEATURESWITCHES_SENDEMAIL_OAUTHTOKENENDPOINT", "not a url")],
        key,
    );
    assert!(message.contains("is not a URL"), "{message}");
    let message = error_for(
        SEED,
        &[(
            "FEATURESWITCHES_SENDEMAIL_OAUTHTOKENENDPOINT",
            "http://login.example.com/token",
        )],
        key,
    );
    assert!(message.contains("must be an https URL"), "{message}");
    for loopback in [
        "http://127.0.0.1:9999/#TenantID#/token",
        "http://localhost/t",
        "http://[::1]:80/t",
    ] {
        let loaded = ok(
            SEED,
            &[("FEATURESWITCHES_SENDEMAIL_OAUTHTOKENENDPOINT", loopback)],
        );
        assert_eq!(oauth(&loaded).1.token_endpoint.scheme(), "http");
    }
}

#[test]
fn ssl_on_office365_is_a_warning() {
    let loaded = ok(
        &seed_with("smtpEncryption:", "smtpEncryption: SSL")
            .replace("smtpPort: 587", "smtpPort: 465"),
        &[],
    );
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(
        loaded.warnings[0].contains("smtp.office365.com, which offers none"),
        "{:?}",
        loaded.warnings
    );
    assert!(
        loaded.warnings[0].contains("use TLS"),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn no_encryption_with_credentials_only_on_loopback() {
    let yaml = seed_with("smtpEncryption:", "smtpEncryption: NONE");
    let message = error_for(&yaml, &[], "featureSwitches.sendEmail.smtpEncryption");
    assert!(message.contains("in clear"), "{message}");
    assert!(message.contains("loopback"), "{message}");
    for host in ["localhost", "127.0.0.2", "::1"] {
        let yaml = seed_with("smtpServer:", &format!("smtpServer: \"{host}\""))
            .replace("smtpEncryption: TLS", "smtpEncryption: NONE");
        ok(&yaml, &[]);
    }
    // Without credentials nothing secret crosses the network.
    let yaml = "featureSwitches:\n  sendEmail:\n    smtpServer: mail.example.com\n    smtpPort: 25\n    smtpEncryption: NONE\n    smtpAuthentication: NONE\n";
    ok(yaml, &[]);
}

#[test]
fn grace_time_is_at_most_3000_seconds() {
    let message = error_for(
        &seed_with(
            "oAuthTokenGraceTimeInSeconds:",
            "oAuthTokenGraceTimeInSeconds: 3600",
        ),
        &[],
        "featureSwitches.sendEmail.oAuthTokenGraceTimeInSeconds",
    );
    assert!(message.contains("0..=3000"), "{message}");
}

#[test]
fn timeouts_must_be_positive() {
    for key in [
        "mailRelay.smtp.connectTimeoutSeconds",
        "mailRelay.smtp.commandTimeoutSeconds",
        "mailRelay.smtp.sendDeadlineSeconds",
        "mailRelay.token.connectTimeoutSeconds",
        "mailRelay.token.requestTimeoutSeconds",
        "mailRelay.limits.requestTimeoutSeconds",
    ] {
        let var = mail_relay::config::env_name(key);
        let message = error_for(SEED, &[(&var, "0")], key);
        assert!(
            message.contains("out of range; allowed 1..="),
            "{key}: {message}"
        );
    }
}

#[test]
fn max_connections_is_1_to_100() {
    let key = "mailRelay.smtp.maxConnections";
    for bad in ["0", "101"] {
        let message = error_for(SEED, &[("MAILRELAY_SMTP_MAXCONNECTIONS", bad)], key);
        assert!(message.contains("allowed 1..=100"), "{message}");
    }
}

#[test]
fn ca_file_must_be_readable_pem() {
    let key = "mailRelay.smtp.caFile";
    let message = error_for(
        SEED,
        &[("MAILRELAY_SMTP_CAFILE", "/nonexistent/ca.pem")],
        key,
    );
    assert!(
        message.contains("cannot read /nonexistent/ca.pem"),
        "{message}"
    );
    let not_pem = fixture("ec-key.pem");
    let message = error_for(
        SEED,
        &[("MAILRELAY_SMTP_CAFILE", not_pem.to_str().unwrap())],
        key,
    );
    assert!(message.contains("holds no PEM certificate"), "{message}");
}

#[test]
fn server_address_must_be_an_ip_address() {
    let message = error_for(SEED, &[("SERVER_ADDRESS", "example.com")], "server.address");
    assert!(message.contains("is not an IP address"), "{message}");
}

#[test]
fn outbox_mode_needs_no_smtp_settings() {
    let yaml = "mailRelay:\n  delivery:\n    mode: outbox\n    outboxDir: /tmp/mails\n";
    let loaded = ok(yaml, &[]);
    assert_eq!(
        loaded.settings.relay.delivery,
        Delivery::Outbox {
            dir: PathBuf::from("/tmp/mails")
        }
    );
    assert!(matches!(
        loaded.settings.send_email.smtp_authentication,
        SmtpAuthentication::None
    ));
}

#[test]
fn all_errors_are_reported_at_once() {
    let e = err(
        &seed_without("oAuthTenantId:"),
        &[
            ("SERVER_PORT", "x"),
            ("FEATURESWITCHES_SENDEMAIL_SMTPENCRYPTION", "FOO"),
            ("MAILRELAY_SMTP_MAXCONNECTIONS", "0"),
            ("FEATURESWITCHES_SENDEMAIL_SMTPUSERNAME", "nobody"),
            (
                "FEATURESWITCHES_SENDEMAIL_OAUTHTOKENENDPOINT",
                "http://login.example.com/#TenantID#/token",
            ),
        ],
    );
    let keys: Vec<&str> = e.errors.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "server.port",
        "featureSwitches.sendEmail.smtpEncryption",
        "mailRelay.smtp.maxConnections",
        "featureSwitches.sendEmail.smtpUsername",
        "featureSwitches.sendEmail.oAuthTenantId",
        // Checked even though the tenant to put in it is missing.
        "featureSwitches.sendEmail.oAuthTokenEndpoint",
    ] {
        assert!(keys.contains(&key), "{key} missing in {e}");
    }
    assert!(
        e.to_string().starts_with("invalid settings in test.yml:"),
        "{e}"
    );
}

// ---- the shipped files ---------------------------------------------------------------------

fn config_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

#[test]
fn production_example_passes_with_its_placeholders_set() {
    let loaded = load(&LoadOptions {
        path: config_file("osweb-prod.yml"),
        env: env(&[
            ("SMTP_USERNAME", "relay@contoso.com"),
            ("OAUTH_CLIENT_ID", "11111111-2222-3333-4444-555555555555"),
            ("OAUTH_CLIENT_SECRET", CLIENT_SECRET),
            ("OAUTH_TENANT_ID", "contoso.onmicrosoft.com"),
            ("OSWEB_API_KEY_SHA256", &"ab".repeat(32)),
            ("MAIL_DOMAIN", "contoso.com"),
        ]),
    })
    .unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.settings.relay.delivery, Delivery::Smtp);
    assert!(!loaded.masked.contains(CLIENT_SECRET));
    assert_eq!(oauth(&loaded).0, "relay@contoso.com");
}

#[test]
fn production_example_without_its_env_names_the_missing_variables() {
    let e = load(&LoadOptions {
        path: config_file("osweb-prod.yml"),
        env: Vec::new(),
    })
    .unwrap_err();
    let text = e.to_string();
    for var in ["SMTP_USERNAME", "OAUTH_CLIENT_ID", "OAUTH_TENANT_ID"] {
        assert!(text.contains(var), "{var} missing in {text}");
    }
}

#[test]
fn dev_file_selects_the_outbox_and_is_embedded() {
    let loaded = load(&LoadOptions {
        path: config_file("dev.yml"),
        env: Vec::new(),
    })
    .unwrap();
    assert_eq!(
        loaded.settings.server.socket_addr().to_string(),
        "127.0.0.1:8080"
    );
    assert_eq!(
        loaded.settings.relay.delivery,
        Delivery::Outbox {
            dir: PathBuf::from("./outbox")
        }
    );
    assert!(loaded.settings.relay.auth.allow_anonymous);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(
        std::fs::read_to_string(config_file("dev.yml")).unwrap(),
        mail_relay::config::DEV_DEFAULT
    );
}

// ---- mailRelay.auth, sendAs, cors ----------------------------------------------------------

const HASH: &str = "2f0e8ee0a3fc4ff1b0b9f7d3c8b0d1b5d2e1f5a3c7b9d0e1f2a3b4c5d6e7f809";

/// The seed with `extra` appended under `mailRelay:` (indented two spaces).
fn seed_plus(extra: &str) -> String {
    format!("{SEED}{extra}")
}

#[test]
fn api_keys_are_parsed() {
    let loaded = ok(SEED, &[]);
    let keys = &loaded.settings.relay.auth.api_keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].name, "billing");
    assert_eq!(hex::encode(keys[0].sha256), HASH);
    let from: Vec<String> = keys[0]
        .allowed_from
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(from, ["noreply@contoso.com", "*@billing.contoso.com"]);
    assert!(!loaded.settings.relay.auth.allow_anonymous);
    assert!(
        loaded.masked.contains("- name: \"billing\""),
        "{}",
        loaded.masked
    );
}

#[test]
fn api_keys_from_env_as_yaml_flow_text() {
    let value = format!(
        "[{{name: a, sha256: {HASH}, allowedFrom: [a@contoso.com]}}, {{name: b, sha256: '{}', allowedFrom: ['*@contoso.com']}}]",
        "cd".repeat(32)
    );
    let loaded = ok(SEED, &[("MAILRELAY_AUTH_APIKEYS", &value)]);
    let names: Vec<&str> = loaded
        .settings
        .relay
        .auth
        .api_keys
        .iter()
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn api_key_errors_name_the_entry_and_field() {
    let yaml = SEED.replace(HASH, "not-hex");
    let message = error_for(&yaml, &[], "mailRelay.auth.apiKeys[0].sha256");
    assert!(message.contains("64 hex digits"), "{message}");
    let yaml = SEED.replace(
        "        allowedFrom: [noreply@contoso.com, \"*@billing.contoso.com\"]\n",
        "        allowFrom: [a@contoso.com]\n",
    );
    let e = err(&yaml, &[]);
    let keys: Vec<&str> = e.errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "mailRelay.auth.apiKeys[0].allowFrom",
            "mailRelay.auth.apiKeys[0].allowedFrom"
        ],
        "{e}"
    );
    let yaml = SEED.replace("noreply@contoso.com,", "not-an-address,");
    let message = error_for(&yaml, &[], "mailRelay.auth.apiKeys[0].allowedFrom");
    assert!(
        message.contains("\"not-an-address\" is not an address"),
        "{message}"
    );
}

#[test]
fn an_unset_placeholder_in_an_api_key_is_one_error_not_three() {
    let yaml = SEED.replace(HASH, "${BILLING_KEY_SHA256}").replace(
        "[noreply@contoso.com, \"*@billing.contoso.com\"]",
        "[\"*@${MAIL_DOMAIN}\"]",
    );
    let e = err(&yaml, &[]);
    let keys: Vec<&str> = e.errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "mailRelay.auth.apiKeys[0].allowedFrom[0]",
            "mailRelay.auth.apiKeys[0].sha256"
        ],
        "{e}"
    );
    assert!(
        e.to_string().contains("BILLING_KEY_SHA256 is not set"),
        "{e}"
    );
    assert!(
        !e.warnings.iter().any(|w| w.contains("no apiKeys")),
        "{:?}",
        e.warnings
    );
}

#[test]
fn api_key_names_must_be_unique() {
    let value = format!(
        "[{{name: a, sha256: {HASH}, allowedFrom: [a@contoso.com]}}, {{name: a, sha256: '{}', allowedFrom: [a@contoso.com]}}]",
        "cd".repeat(32)
    );
    let message = error_for(
        SEED,
        &[("MAILRELAY_AUTH_APIKEYS", &value)],
        "mailRelay.auth.apiKeys[1].name",
    );
    assert!(message.contains("unique"), "{message}");
}

#[test]
fn anonymous_callers_are_refused_with_smtp_delivery() {
    let message = error_for(
        SEED,
        &[("MAILRELAY_AUTH_ALLOWANONYMOUS", "true")],
        "mailRelay.auth.allowAnonymous",
    );
    assert!(
        message.contains("refused with mailRelay.delivery.mode smtp"),
        "{message}"
    );
    let loaded = ok(
        "mailRelay:\n  delivery:\n    mode: outbox\n  auth:\n    allowAnonymous: true\n",
        &[],
    );
    assert!(loaded.settings.relay.auth.allow_anonymous);
}

#[test]
fn smtp_delivery_without_any_caller_auth_is_a_warning() {
    let yaml = SEED.split("  auth:\n").next().unwrap().to_owned();
    let loaded = ok(&yaml, &[]);
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(loaded.warnings[0].contains("every POST /mail will be refused"));
}

#[test]
fn trusted_proxy_is_parsed_with_its_secret_masked() {
    let yaml = seed_plus(
        "    trustedProxy:\n      userHeader: X-Forwarded-Email\n      sources: [10.0.0.0/8, 192.168.1.7]\n      secretHeader: X-Proxy-Secret\n      secret: proxy-shared-secret-123\n",
    );
    let loaded = ok(&yaml, &[]);
    let proxy = loaded.settings.relay.auth.trusted_proxy.as_ref().unwrap();
    assert_eq!(proxy.user_header.as_str(), "x-forwarded-email");
    let sources: Vec<String> = proxy.sources.iter().map(ToString::to_string).collect();
    assert_eq!(sources, ["10.0.0.0/8", "192.168.1.7/32"]);
    let secret = proxy.secret.as_ref().unwrap();
    assert_eq!(secret.header.as_str(), "x-proxy-secret");
    assert_eq!(secret.value.expose_secret(), "proxy-shared-secret-123");
    assert!(
        !loaded.masked.contains("proxy-shared-secret-123"),
        "{}",
        loaded.masked
    );
    assert!(!format!("{:?}", loaded.settings).contains("proxy-shared-secret-123"));
}

#[test]
fn trusted_proxy_needs_sources_and_valid_cidrs() {
    let yaml = seed_plus("    trustedProxy:\n      userHeader: X-Forwarded-Email\n");
    let message = error_for(&yaml, &[], "mailRelay.auth.trustedProxy.sources");
    assert!(message.contains("is required"), "{message}");
    let e = err(
        &yaml,
        &[("MAILRELAY_AUTH_TRUSTEDPROXY_SOURCES", "10.0.0.0/8,nonsense")],
    );
    assert!(
        e.to_string()
            .contains("\"nonsense\" is not an IP address or CIDR block"),
        "{e}"
    );
    let loaded = ok(
        &yaml,
        &[("MAILRELAY_AUTH_TRUSTEDPROXY_SOURCES", "10.0.0.0/8, ::1")],
    );
    assert_eq!(
        loaded
            .settings
            .relay
            .auth
            .trusted_proxy
            .unwrap()
            .sources
            .len(),
        2
    );
}

#[test]
fn oidc_is_parsed_and_its_keys_url_must_be_https() {
    let yaml = seed_plus(
        "    oidc:\n      issuer: https://login.microsoftonline.com/t/v2.0\n      audience: api://mail-relay\n      jwksUri: https://login.microsoftonline.com/t/discovery/v2.0/keys\n      userClaim: upn\n",
    );
    let loaded = ok(&yaml, &[]);
    let oidc = loaded.settings.relay.auth.oidc.as_ref().unwrap();
    assert_eq!(oidc.issuer, "https://login.microsoftonline.com/t/v2.0");
    assert_eq!(oidc.audience, "api://mail-relay");
    assert_eq!(oidc.user_claim, "upn");
    assert_eq!(oidc.clock_skew, Duration::from_secs(60));
    let message = error_for(
        &yaml,
        &[(
            "MAILRELAY_AUTH_OIDC_JWKSURI",
            "http://keys.example.com/keys",
        )],
        "mailRelay.auth.oidc.jwksUri",
    );
    assert!(message.contains("must be an https URL"), "{message}");
    let message = error_for(
        &yaml,
        &[("MAILRELAY_AUTH_OIDC_USERCLAIM", "sub")],
        "mailRelay.auth.oidc.userClaim",
    );
    assert_eq!(message, "sub is not one of preferred_username, upn, email");
    let message = error_for(
        &seed_plus("    oidc:\n      issuer: x\n"),
        &[],
        "mailRelay.auth.oidc.audience",
    );
    assert!(
        message.contains("is required with mailRelay.auth.oidc"),
        "{message}"
    );
}

#[test]
fn send_as_delegates_groups_and_grants() {
    let yaml = seed_plus(
        "  sendAs:\n    delegates:\n      team@contoso.com: [alice@contoso.com, \"group:support\"]\n    groups:\n      support: [bob@contoso.com]\n    denialMemorySeconds: 30\n",
    );
    let loaded = ok(
        &yaml,
        &[(
            "MAILRELAY_SENDAS_EXCHANGEGRANTS",
            "team@contoso.com, *@sales.contoso.com",
        )],
    );
    let send_as = &loaded.settings.relay.send_as;
    assert_eq!(
        send_as.delegates,
        vec![(
            "team@contoso.com".to_owned(),
            vec!["alice@contoso.com".to_owned(), "group:support".to_owned()]
        )]
    );
    assert_eq!(
        send_as.groups,
        vec![("support".to_owned(), vec!["bob@contoso.com".to_owned()])]
    );
    let grants: Vec<String> = send_as
        .exchange_grants
        .as_ref()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(grants, ["team@contoso.com", "*@sales.contoso.com"]);
    assert_eq!(send_as.denial_memory, Duration::from_secs(30));
    // Unset: not checked, and a default memory.
    let loaded = ok(SEED, &[]);
    assert!(loaded.settings.relay.send_as.exchange_grants.is_none());
    assert_eq!(
        loaded.settings.relay.send_as.denial_memory,
        Duration::from_secs(300)
    );
}

#[test]
fn delegate_of_an_undefined_group_is_an_error() {
    let yaml = seed_plus("  sendAs:\n    delegates:\n      team@contoso.com: [\"group:nobody\"]\n");
    let message = error_for(&yaml, &[], "mailRelay.sendAs.delegates.team@contoso.com");
    assert!(
        message.contains("group \"nobody\" is not defined under mailRelay.sendAs.groups"),
        "{message}"
    );
}

#[test]
fn cors_origins_are_exact_origins() {
    let loaded = ok(
        SEED,
        &[(
            "MAILRELAY_CORS_ALLOWEDORIGINS",
            "https://app.contoso.com/, http://localhost:3000",
        )],
    );
    let origins: Vec<&str> = loaded
        .settings
        .relay
        .cors
        .allowed_origins
        .iter()
        .map(|o| o.to_str().unwrap())
        .collect();
    assert_eq!(
        origins,
        ["https://app.contoso.com", "http://localhost:3000"]
    );
    let message = error_for(
        SEED,
        &[(
            "MAILRELAY_CORS_ALLOWEDORIGINS",
            "https://app.contoso.com/path",
        )],
        "mailRelay.cors.allowedOrigins",
    );
    assert!(message.contains("is not an origin"), "{message}");
}

#[test]
fn unknown_key_in_auth_is_an_error() {
    let message = error_for(&seed_plus("    apiKey: x\n"), &[], "mailRelay.auth.apiKey");
    assert!(
        message.contains("did you mean mailRelay.auth.apiKeys?"),
        "{message}"
    );
}

#[test]
fn an_empty_env_variable_does_not_override_the_file() {
    let loaded = ok(SEED, &[("FEATURESWITCHES_SENDEMAIL_SMTPSERVER", "")]);
    assert_eq!(loaded.settings.send_email.smtp_server, "smtp.office365.com");
}

// ---- rate limits and idempotency -----------------------------------------------------------

fn limit(n: u32) -> Option<std::num::NonZeroU32> {
    std::num::NonZeroU32::new(n)
}

#[test]
fn rate_limits_and_idempotency_default_to_exchange_limits_and_a_day() {
    let loaded = ok(SEED, &[]);
    let r = &loaded.settings.relay;
    assert_eq!(r.rate_limits.mailbox_messages_per_minute, limit(30));
    assert_eq!(r.rate_limits.mailbox_recipients_per_day, limit(10_000));
    // A quarter of the mailbox's for each caller.
    assert_eq!(r.rate_limits.caller_messages_per_minute, limit(7));
    assert_eq!(r.rate_limits.caller_recipients_per_day, limit(2_500));
    assert_eq!(r.idempotency.ttl, Duration::from_secs(86_400));
    assert_eq!(r.idempotency.max_entries, 100_000);
    assert_eq!(r.idempotency.max_bytes, 32 * 1024 * 1024);
    for line in [
        "mailboxMessagesPerMinute: 30 # default",
        "mailboxRecipientsPerDay: 10000 # default",
        "callerMessagesPerMinute: 7 # default",
        "callerRecipientsPerDay: 2500 # default",
        "ttlSeconds: 86400 # default",
        "maxEntries: 100000 # default",
        "maxBytes: 33554432 # default",
    ] {
        assert!(loaded.masked.contains(line), "{line} in\n{}", loaded.masked);
    }
}

#[test]
fn rate_limits_and_idempotency_are_read_from_file_and_env() {
    let yaml = seed_plus(
        "  rateLimits:\n    mailboxMessagesPerMinute: 20\n    mailboxRecipientsPerDay: 0\n    callerMessagesPerMinute: 5\n  idempotency:\n    ttlSeconds: 600\n    maxEntries: 50\n    maxBytes: 2097152\n",
    );
    let loaded = ok(&yaml, &[]);
    let r = &loaded.settings.relay;
    assert_eq!(r.rate_limits.mailbox_messages_per_minute, limit(20));
    assert_eq!(r.rate_limits.mailbox_recipients_per_day, None, "0 is off");
    assert_eq!(r.rate_limits.caller_messages_per_minute, limit(5));
    // The mailbox's day is off, and so is the caller's share of it.
    assert_eq!(r.rate_limits.caller_recipients_per_day, None);
    assert_eq!(r.idempotency.ttl, Duration::from_secs(600));
    assert_eq!(r.idempotency.max_entries, 50);
    assert_eq!(r.idempotency.max_bytes, 2 * 1024 * 1024);
    // Off is written back as 0, and the masked output loads back to the same settings.
    assert!(
        loaded.masked.contains("mailboxRecipientsPerDay: 0\n"),
        "{}",
        loaded.masked
    );
    let again = ok(
        &loaded.masked,
        &[("FEATURESWITCHES_SENDEMAIL_OAUTHCLIENTSECRET", CLIENT_SECRET)],
    );
    assert_eq!(again.settings.relay.rate_limits, r.rate_limits);
    assert_eq!(again.settings.relay.idempotency, r.idempotency);

    let loaded = ok(
        &yaml,
        &[
            ("MAILRELAY_RATELIMITS_CALLERMESSAGESPERMINUTE", "0"),
            ("MAILRELAY_RATELIMITS_MAILBOXMESSAGESPERMINUTE", "10"),
            ("MAILRELAY_IDEMPOTENCY_TTLSECONDS", "3600"),
        ],
    );
    let r = &loaded.settings.relay;
    assert_eq!(r.rate_limits.caller_messages_per_minute, None);
    assert_eq!(r.rate_limits.mailbox_messages_per_minute, limit(10));
    assert_eq!(r.idempotency.ttl, Duration::from_secs(3_600));
    assert!(
        loaded
            .masked
            .contains("# from env MAILRELAY_RATELIMITS_MAILBOXMESSAGESPERMINUTE"),
        "{}",
        loaded.masked
    );
}

#[test]
fn rate_limit_and_idempotency_values_out_of_range_name_the_key() {
    for (var, value, key, expected) in [
        (
            "MAILRELAY_RATELIMITS_MAILBOXMESSAGESPERMINUTE",
            "-1",
            "mailRelay.rateLimits.mailboxMessagesPerMinute",
            "out of range; allowed 0..=100000",
        ),
        (
            "MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY",
            "lots",
            "mailRelay.rateLimits.mailboxRecipientsPerDay",
            "is not a whole number",
        ),
        (
            "MAILRELAY_RATELIMITS_CALLERMESSAGESPERMINUTE",
            "100001",
            "mailRelay.rateLimits.callerMessagesPerMinute",
            "out of range; allowed 0..=100000",
        ),
        (
            "MAILRELAY_RATELIMITS_CALLERRECIPIENTSPERDAY",
            "10000001",
            "mailRelay.rateLimits.callerRecipientsPerDay",
            "out of range; allowed 0..=10000000",
        ),
        (
            "MAILRELAY_IDEMPOTENCY_TTLSECONDS",
            "0",
            "mailRelay.idempotency.ttlSeconds",
            "out of range; allowed 1..=604800",
        ),
        (
            "MAILRELAY_IDEMPOTENCY_MAXENTRIES",
            "0",
            "mailRelay.idempotency.maxEntries",
            "out of range; allowed 1..=10000000",
        ),
        (
            "MAILRELAY_IDEMPOTENCY_MAXBYTES",
            "1000",
            "mailRelay.idempotency.maxBytes",
            "out of range; allowed 1048576..=1073741824",
        ),
    ] {
        let message = error_for(SEED, &[(var, value)], key);
        assert!(message.contains(expected), "{key}: {message}");
    }
}

#[test]
fn a_daily_recipient_limit_below_the_per_mail_limit_is_an_error() {
    // SEED allows 100 recipients per mail.
    let key = "mailRelay.rateLimits.mailboxRecipientsPerDay";
    let message = error_for(
        SEED,
        &[("MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY", "99")],
        key,
    );
    assert!(
        message.contains("below mailRelay.limits.maxRecipients (100)"),
        "{message}"
    );
    assert!(message.contains("set it to 0 (off)"), "{message}");
    ok(
        SEED,
        &[("MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY", "100")],
    );

    let key = "mailRelay.rateLimits.callerRecipientsPerDay";
    let message = error_for(
        SEED,
        &[("MAILRELAY_RATELIMITS_CALLERRECIPIENTSPERDAY", "99")],
        key,
    );
    assert!(
        message.contains("below mailRelay.limits.maxRecipients (100)"),
        "{message}"
    );
    // The default share is never below one mail's recipients: a quarter of 200 would be 50.
    let loaded = ok(
        SEED,
        &[("MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY", "200")],
    );
    let limits = &loaded.settings.relay.rate_limits;
    assert_eq!(limits.caller_recipients_per_day, limit(100));
}

#[test]
fn limits_above_exchange_online_are_a_warning_for_office365_only() {
    let above = [
        ("MAILRELAY_RATELIMITS_MAILBOXMESSAGESPERMINUTE", "0"),
        ("MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY", "20000"),
    ];
    let loaded = ok(SEED, &above);
    assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
    assert!(
        loaded.warnings[0].contains("mailboxMessagesPerMinute"),
        "{:?}",
        loaded.warnings
    );
    assert!(
        loaded.warnings[0].contains("30 messages per minute"),
        "{:?}",
        loaded.warnings
    );
    assert!(
        loaded.warnings[1].contains("mailboxRecipientsPerDay"),
        "{:?}",
        loaded.warnings
    );
    assert!(
        loaded.warnings[1].contains("SubmissionQuotaExceeded"),
        "{:?}",
        loaded.warnings
    );

    let mut other_host = above.to_vec();
    other_host.push(("FEATURESWITCHES_SENDEMAIL_SMTPSERVER", "smtp.example.net"));
    let loaded = ok(SEED, &other_host);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn production_example_sets_the_exchange_limits() {
    let loaded = load(&LoadOptions {
        path: config_file("osweb-prod.yml"),
        env: env(&[
            ("SMTP_USERNAME", "relay@contoso.com"),
            ("OAUTH_CLIENT_ID", "11111111-2222-3333-4444-555555555555"),
            ("OAUTH_CLIENT_SECRET", CLIENT_SECRET),
            ("OAUTH_TENANT_ID", "contoso.onmicrosoft.com"),
            ("OSWEB_API_KEY_SHA256", &"ab".repeat(32)),
            ("MAIL_DOMAIN", "contoso.com"),
        ]),
    })
    .unwrap();
    let r = &loaded.settings.relay;
    assert_eq!(r.rate_limits, Default::default());
    assert_eq!(r.idempotency, Default::default());
    // Every value in the example is written, not defaulted.
    assert!(
        loaded.masked.contains("mailboxMessagesPerMinute: 30\n"),
        "{}",
        loaded.masked
    );
    assert!(
        loaded.masked.contains("maxEntries: 100000\n"),
        "{}",
        loaded.masked
    );
}

#[test]
fn settings_that_break_exchange_or_drain_promises_are_warned_about() {
    let yaml = "featureSwitches:\n  sendEmail:\n    smtpServer: smtp.office365.com\n    smtpAuthentication: NONE\n\
                mailRelay:\n  smtp:\n    maxConnections: 5\n  shutdown:\n    drainDelaySeconds: 5\n    deadlineSeconds: 30\n";
    let loaded = mail_relay::config::load_str(yaml, "test.yml", &[]).unwrap();
    let warnings = loaded.warnings.join("\n");
    assert!(
        warnings.contains("maxConnections is 5") && warnings.contains("432"),
        "{warnings}"
    );
    assert!(
        warnings.contains("deadlineSeconds (30 s)") && warnings.contains("65 s"),
        "{warnings}"
    );
    // A deadline not above the drain delay is one error, not an error and a warning too.
    let broken = yaml.replace("deadlineSeconds: 30", "deadlineSeconds: 5");
    let e = mail_relay::config::load_str(&broken, "test.yml", &[]).unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e}");
    assert_eq!(e.errors[0].key, "mailRelay.shutdown.deadlineSeconds");
    assert!(
        !e.warnings.iter().any(|w| w.contains("deadlineSeconds")),
        "{e}"
    );
}

#[test]
fn the_webhook_needs_an_https_url_and_a_key_of_16_bytes_never_shown() {
    let (url, secret) = (
        "MAILRELAY_DELIVERY_WEBHOOK",
        "MAILRELAY_DELIVERY_WEBHOOKSECRET",
    );
    let https = "https://app.contoso.com/hooks/mail";
    let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let loaded = ok(SEED, &[(url, https), (secret, whsec)]);
    let webhook = loaded.settings.relay.queue.webhook.as_ref().unwrap();
    assert_eq!(webhook.url.as_str(), https);
    assert_eq!(
        webhook.key.expose().len(),
        24,
        "whsec_ is base64 of the key"
    );
    assert!(
        loaded.masked.contains(&format!("webhook: \"{https}\"")),
        "{}",
        loaded.masked
    );
    assert!(loaded.masked.contains("webhookSecret: \"****\""));
    for shown in [loaded.masked.clone(), format!("{:?}", loaded.settings)] {
        assert!(
            !shown.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            "{shown}"
        );
    }

    let message = error_for(
        SEED,
        &[(url, "http://app.contoso.com/hook"), (secret, whsec)],
        "mailRelay.delivery.webhook",
    );
    assert!(message.contains("https"), "{message}");
    let message = error_for(SEED, &[(url, https)], "mailRelay.delivery.webhookSecret");
    assert!(message.contains("required"), "{message}");
    let message = error_for(SEED, &[(secret, whsec)], "mailRelay.delivery.webhookSecret");
    assert!(message.contains("is set but"), "{message}");
    let message = error_for(
        SEED,
        &[(url, https), (secret, "short-key")],
        "mailRelay.delivery.webhookSecret",
    );
    assert!(
        message.contains("shorter than 16 bytes") && !message.contains("short-key"),
        "{message}"
    );
    let message = error_for(
        SEED,
        &[(url, https), (secret, "whsec_not base64!")],
        "mailRelay.delivery.webhookSecret",
    );
    assert!(message.contains("not base64"), "{message}");
}

#[test]
fn encrypt_at_rest_needs_the_cipher_key() {
    let on = ("MAILRELAY_DELIVERY_ENCRYPTATREST", "true");
    let message = error_for(SEED, &[on], "mailRelay.delivery.encryptAtRest");
    assert!(message.contains("MAIL_RELAY_ENCRYPT_KEY"), "{message}");
    let (name, key) = key_env(9);
    let loaded = ok(SEED, &[on, (name.as_str(), key.as_str())]);
    assert!(loaded.settings.relay.queue.at_rest.is_some());
    assert!(
        loaded.masked.contains("encryptAtRest: true"),
        "{}",
        loaded.masked
    );
    assert!(ok(SEED, &[]).settings.relay.queue.at_rest.is_none());
    let message = error_for(
        SEED,
        &[("MAILRELAY_DELIVERY_ENCRYPTATREST", "yes")],
        "mailRelay.delivery.encryptAtRest",
    );
    assert!(message.contains("true, false"), "{message}");
}

// ---- Microsoft Graph -----------------------------------------------------------------------

#[test]
fn graph_mode_needs_no_smtp_server_and_takes_graphs_defaults() {
    let yaml =
        seed_with("mode: smtp", "mode: graph").replace("    smtpServer: smtp.office365.com\n", "");
    let loaded = ok(&yaml, &[]);
    let s = &loaded.settings;
    assert_eq!(s.relay.delivery, mail_relay::config::Delivery::Graph);
    assert_eq!(
        s.relay.graph.base_url.as_str(),
        "https://graph.microsoft.com/v1.0/"
    );
    assert_eq!(s.relay.graph.scopes, "https://graph.microsoft.com/.default");
    assert_eq!(s.relay.graph.max_concurrent_requests, 4);
    // Exchange's 30 a minute are SMTP submission's; Graph's own limit is 10,000 per 10 minutes.
    assert_eq!(
        s.relay
            .rate_limits
            .mailbox_messages_per_minute
            .map(|n| n.get()),
        Some(1000)
    );
    assert_eq!(oauth(&loaded).0, "relay@contoso.com");

    let yaml = format!(
        "{}  graph:\n    baseUrl: http://127.0.0.1:8443/v1.0\n    requestTimeoutSeconds: 7\n",
        seed_with("mode: smtp", "mode: graph")
    );
    let loaded = ok(&yaml, &[]);
    assert_eq!(
        loaded.settings.relay.graph.base_url.as_str(),
        "http://127.0.0.1:8443/v1.0/"
    );
    assert_eq!(
        loaded.settings.relay.graph.request_timeout,
        Duration::from_secs(7)
    );
}

#[test]
fn graph_mode_refuses_a_login_other_than_ms_oauth_and_a_plain_http_graph() {
    let basic = seed_with("mode: smtp", "mode: graph").replace(
        "smtpAuthentication: MS_OAUTH",
        "smtpAuthentication: BASIC\n    smtpPassword: pw",
    );
    let message = error_for(&basic, &[], "featureSwitches.sendEmail.smtpAuthentication");
    assert!(
        message.contains("must be MS_OAUTH with mailRelay.delivery.mode graph"),
        "{message}"
    );

    let yaml = format!(
        "{}  graph:\n    baseUrl: http://graph.contoso.com/v1.0\n",
        seed_with("mode: smtp", "mode: graph")
    );
    let message = error_for(&yaml, &[], "mailRelay.graph.baseUrl");
    assert!(message.contains("must be an https URL"), "{message}");
}

#[test]
fn auto_mode_needs_the_smtp_server_and_ms_oauth_for_its_graph_fallback() {
    let loaded = ok(&seed_with("mode: smtp", "mode: auto"), &[]);
    assert_eq!(
        loaded.settings.relay.delivery,
        mail_relay::config::Delivery::Auto
    );
    // SMTP first: Exchange's SMTP limit is the default.
    assert_eq!(
        loaded
            .settings
            .relay
            .rate_limits
            .mailbox_messages_per_minute
            .map(|n| n.get()),
        Some(30)
    );
    let no_server =
        seed_with("mode: smtp", "mode: auto").replace("    smtpServer: smtp.office365.com\n", "");
    let message = error_for(&no_server, &[], "featureSwitches.sendEmail.smtpServer");
    assert!(message.contains("smtp or auto"), "{message}");
    let basic = seed_with("mode: smtp", "mode: auto").replace(
        "smtpAuthentication: MS_OAUTH",
        "smtpAuthentication: BASIC\n    smtpPassword: pw",
    );
    let message = error_for(&basic, &[], "featureSwitches.sendEmail.smtpAuthentication");
    assert!(message.contains("graph or auto"), "{message}");
}

#[test]
fn a_federated_token_file_is_a_credential_of_its_own_and_azure_workload_identity_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "eyJ.projected.token").unwrap();
    let path = file.display().to_string();
    let federated = seed_with(
        "oAuthClientSecret:",
        &format!("oAuthFederatedTokenFile: {path}"),
    );
    let loaded = ok(&federated, &[]);
    assert!(
        matches!(&oauth(&loaded).1.credential, mail_relay::config::ClientCredential::FederatedTokenFile(p) if *p == file)
    );

    // Azure Workload Identity's variable, when no credential is configured.
    let bare = seed_without("oAuthClientSecret:");
    let loaded = ok(&bare, &[("AZURE_FEDERATED_TOKEN_FILE", &path)]);
    assert!(matches!(
        &oauth(&loaded).1.credential,
        mail_relay::config::ClientCredential::FederatedTokenFile(_)
    ));
    // A configured secret wins over the variable.
    let loaded = ok(SEED, &[("AZURE_FEDERATED_TOKEN_FILE", &path)]);
    assert!(matches!(
        &oauth(&loaded).1.credential,
        mail_relay::config::ClientCredential::Secret(_)
    ));

    let both = seed_with(
        "oAuthClientSecret:",
        &format!("oAuthClientSecret: x\n    oAuthFederatedTokenFile: {path}"),
    );
    let message = error_for(
        &both,
        &[],
        "featureSwitches.sendEmail.oAuthFederatedTokenFile",
    );
    assert!(message.contains("exactly one of"), "{message}");
    let missing = seed_with(
        "oAuthClientSecret:",
        "oAuthFederatedTokenFile: /nonexistent/token",
    );
    let message = error_for(
        &missing,
        &[],
        "featureSwitches.sendEmail.oAuthFederatedTokenFile",
    );
    assert!(message.contains("cannot be read"), "{message}");
}

#[test]
fn the_cloud_sets_login_graph_smtp_and_scopes_together_and_explicit_settings_win() {
    let yaml = seed_without("smtpServer:")
        .replace("    oAuthTokenEndpoint: https://login.microsoftonline.com/#TenantID#/oauth2/v2.0/token\n", "")
        .replace("    oAuthScopes: https://outlook.office365.com/.default\n", "")
        .replace("mailRelay:\n", "mailRelay:\n  cloud: usGovHigh\n");
    let loaded = ok(&yaml, &[]);
    let s = &loaded.settings;
    assert_eq!(s.send_email.smtp_server, "smtp.office365.us");
    let (_, app) = oauth(&loaded);
    assert_eq!(
        app.token_endpoint.as_str(),
        "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(app.scopes, "https://outlook.office365.us/.default");
    assert_eq!(
        s.relay.graph.base_url.as_str(),
        "https://graph.microsoft.us/v1.0/"
    );
    assert_eq!(s.relay.graph.scopes, "https://graph.microsoft.us/.default");

    // The seed's explicit endpoint and scope win over the cloud's.
    let loaded = ok(
        &SEED.replace("mailRelay:\n", "mailRelay:\n  cloud: china\n"),
        &[],
    );
    assert_eq!(loaded.settings.send_email.smtp_server, "smtp.office365.com");
    assert_eq!(
        oauth(&loaded).1.scopes,
        "https://outlook.office365.com/.default"
    );
    assert_eq!(
        loaded.settings.relay.graph.base_url.as_str(),
        "https://microsoftgraph.chinacloudapi.cn/v1.0/"
    );

    let message = error_for(
        &SEED.replace("mailRelay:\n", "mailRelay:\n  cloud: azure\n"),
        &[],
        "mailRelay.cloud",
    );
    assert!(
        message.contains("global, usGovHigh, usGovDoD, china"),
        "{message}"
    );
}

/// The seed with its app registration's credential, tenant, client and endpoint replaced by
/// `oAuthManagedIdentity: <kind>` and `extra` lines.
fn managed_seed(kind: &str, extra: &str) -> String {
    SEED.lines()
        .filter(|l| {
            let l = l.trim_start();
            !(l.starts_with("oAuthClientId:")
                || l.starts_with("oAuthTenantId:")
                || l.starts_with("oAuthTokenEndpoint:"))
        })
        .map(|l| {
            if l.trim_start().starts_with("oAuthClientSecret:") {
                format!("    oAuthManagedIdentity: {kind}\n{extra}")
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

#[test]
fn a_managed_identity_needs_no_tenant_client_or_secret_and_defaults_to_the_platforms_endpoint() {
    use mail_relay::config::{ClientCredential, ManagedIdentity};

    // IMDS's link-local address is only the default here: nothing is sent to it.
    let loaded = ok(&managed_seed("imds", ""), &[]);
    let (_, settings) = oauth(&loaded);
    assert!(matches!(
        settings.credential,
        ClientCredential::ManagedIdentity(ManagedIdentity::Imds)
    ));
    assert_eq!(
        settings.token_endpoint.as_str(),
        mail_relay::config::IMDS_TOKEN_ENDPOINT
    );
    assert!(
        matches!(settings.token_endpoint.host(), Some(url::Host::Ipv4(ip)) if ip.is_link_local()),
        "{}",
        settings.token_endpoint
    );
    assert_eq!(
        settings.token_endpoint.path(),
        "/metadata/identity/oauth2/token"
    );
    assert_eq!(settings.client_id, "");
    // SMTP with a managed identity is not what Exchange documents: said once, not refused.
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("oAuthManagedIdentity") && w.contains("SMTP.SendAsApp")),
        "{:?}",
        loaded.warnings
    );

    // App Service: the platform's variables, the header kept secret.
    let platform = [
        ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
        ("IDENTITY_HEADER", "a1b2c3-identity-header"),
    ];
    let loaded = ok(
        &managed_seed(
            "appService",
            "    oAuthClientId: 7d3e9b1a-2c4f-4e8d-9a6b-5f0c1e2d3a4b\n",
        ),
        &platform,
    );
    let (_, settings) = oauth(&loaded);
    assert_eq!(
        settings.token_endpoint.as_str(),
        "http://localhost:42356/msi/token"
    );
    assert_eq!(settings.client_id, "7d3e9b1a-2c4f-4e8d-9a6b-5f0c1e2d3a4b");
    assert!(matches!(
        settings.credential,
        ClientCredential::ManagedIdentity(ManagedIdentity::AppService { .. })
    ));
    assert!(!format!("{:?}", loaded.settings).contains("a1b2c3-identity-header"));
}

#[test]
fn a_managed_identity_set_up_wrongly_names_the_field() {
    let message = error_for(
        &managed_seed("appService", ""),
        &[("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token")],
        "IDENTITY_HEADER",
    );
    assert!(message.contains("appService"), "{message}");
    let message = error_for(
        &managed_seed("appService", ""),
        &[("IDENTITY_HEADER", "h")],
        "featureSwitches.sendEmail.oAuthTokenEndpoint",
    );
    assert!(message.contains("IDENTITY_ENDPOINT"), "{message}");
    let message = error_for(
        &managed_seed("imds", "    oAuthClientSecret: also-a-secret\n"),
        &[],
        "featureSwitches.sendEmail.oAuthManagedIdentity",
    );
    assert!(message.contains("oAuthClientSecret"), "{message}");
    let message = error_for(
        &managed_seed("vm", ""),
        &[],
        "featureSwitches.sendEmail.oAuthManagedIdentity",
    );
    assert!(message.contains("imds"), "{message}");
    let message = error_for(
        &managed_seed("imds", "    oAuthTokenEndpoint: http://203.0.113.7/token\n"),
        &[],
        "featureSwitches.sendEmail.oAuthTokenEndpoint",
    );
    assert!(message.contains("link-local"), "{message}");
}
