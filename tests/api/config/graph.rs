//! Microsoft Graph, the national clouds, the federated token file and managed identities.

use super::*;

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
