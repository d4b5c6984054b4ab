//! `mailRelay.auth`, `sendAs` and `cors`.

use super::*;
use mail_relay::config::Delegate;

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
            "team@contoso.com".parse().unwrap(),
            vec![
                Delegate::User("alice@contoso.com".parse().unwrap()),
                Delegate::Group("support".to_owned())
            ]
        )]
    );
    assert_eq!(
        send_as.groups,
        vec![(
            "support".to_owned(),
            vec!["bob@contoso.com".parse().unwrap()]
        )]
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
