//! Secrets from files and `{cipher}` values, and the masked `check-config` output.

use super::*;

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
