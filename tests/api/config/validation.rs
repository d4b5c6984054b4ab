//! Validation, one rule each, and the shipped settings files.

use super::*;

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
        ClientCredential::Certificate(certificate) => {
            assert!(
                certificate
                    .certificate_pem()
                    .starts_with("-----BEGIN CERTIFICATE-----")
            );
            // base64url SHA-256, unpadded: the key was parsed and belongs to the certificate.
            assert_eq!(certificate.thumbprint().len(), 43);
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
