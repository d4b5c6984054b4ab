//! Several sending identities (`mailRelay.identities`): each From goes to the mailbox that serves
//! it, over that mailbox's own connections, with its own limits, against two Exchange-like
//! SMTP servers and the fake Entra ID.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use mail_relay::config::{
    AddressPattern, Delivery, Encryption, IdentitiesSettings, IdentitySettings, OAuthSettings,
    RateLimitSettings, SendEmailSettings, Settings, SmtpAuthentication,
};
use serde_json::json;

use crate::entra::{FakeEntra, field, form_fields};
use crate::helpers::{expect_problem, peer_oauth_settings, spawn_built, test_settings};
use crate::smtp::exchange_replies::{Script, serve};

const DEFAULT_MAILBOX: &str = "noreply@contoso.com";
const BILLING_MAILBOX: &str = "billing@contoso.com";

fn mail(from: &str) -> serde_json::Value {
    json!({"from": from, "to": "ann@example.com", "subject": "identities", "text": "hello"})
}

fn server(port: u16, mailbox: &str, oauth: OAuthSettings) -> SendEmailSettings {
    SendEmailSettings {
        smtp_server: "127.0.0.1".into(),
        smtp_port: port,
        smtp_encryption: Encryption::None,
        smtp_authentication: SmtpAuthentication::MsOAuth {
            username: mailbox.parse().unwrap(),
            oauth,
        },
    }
}

fn patterns(list: &[&str]) -> Vec<AddressPattern> {
    list.iter()
        .map(|p| AddressPattern::parse(p).unwrap())
        .collect()
}

struct Two {
    default: Arc<Script>,
    billing: Arc<Script>,
    entra: FakeEntra,
    settings: Settings,
}

/// The default identity (noreply@ and *@contoso.com) on one server, `billing` (billing@ and
/// *@contoso.test) on another, both logged in with tokens of the same app.
async fn two_identities() -> Two {
    let default = Arc::new(Script::default());
    let billing = Arc::new(Script::default());
    let (default_port, billing_port) = (serve(default.clone()).await, serve(billing.clone()).await);
    let entra = FakeEntra::start().await;
    entra
        .mount_token("a-token-the-fake-server-takes", 3599)
        .await;
    let mut settings = test_settings(std::env::temp_dir());
    settings.relay.delivery = Delivery::Smtp;
    settings.send_email = server(default_port, DEFAULT_MAILBOX, entra.oauth_settings());
    settings.relay.identities = IdentitiesSettings {
        default_name: "default".into(),
        default_from: patterns(&[DEFAULT_MAILBOX, "*@contoso.com"]),
        others: vec![IdentitySettings {
            name: "billing".into(),
            from: patterns(&[BILLING_MAILBOX, "*@contoso.test"]),
            send_email: server(billing_port, BILLING_MAILBOX, entra.oauth_settings()),
            delivery: Delivery::Smtp,
            rate_limits: RateLimitSettings::OFF,
        }],
    };
    Two {
        default,
        billing,
        entra,
        settings,
    }
}

#[tokio::test]
async fn each_from_goes_to_the_mailbox_that_serves_it_most_specifically() {
    let two = two_identities().await;
    let app = spawn_built(two.settings.clone()).await;

    // The exact address beats the default's *@contoso.com.
    for (from, expect_default, expect_billing) in [
        (BILLING_MAILBOX, 0, 1),
        ("invoices@contoso.test", 0, 2),
        ("news@contoso.com", 1, 2),
        (DEFAULT_MAILBOX, 2, 2),
    ] {
        let response = app.post_mail(&mail(from)).await;
        assert_eq!(
            response.status(),
            202,
            "{from}: {}",
            response.text().await.unwrap()
        );
        assert_eq!(
            (
                two.default.delivered.load(Ordering::SeqCst),
                two.billing.delivered.load(Ordering::SeqCst)
            ),
            (expect_default, expect_billing),
            "{from}"
        );
    }

    // A From no identity serves is refused, naming the identities; nothing is sent.
    let problem = expect_problem(
        app.post_mail(&mail("someone@example.com")).await,
        403,
        "send_as_denied",
    )
    .await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("someone@example.com") && detail.contains("default, billing"),
        "{problem}"
    );
    assert_eq!(two.default.delivered.load(Ordering::SeqCst), 2);
    assert_eq!(two.billing.delivered.load(Ordering::SeqCst), 2);

    // Both mailboxes logged in with the same app's token: one token request.
    assert_eq!(two.entra.requests().await.len(), 1);
}

#[tokio::test]
async fn one_identitys_refused_login_leaves_the_other_sending_and_the_instance_ready() {
    let two = two_identities().await;
    two.billing
        .auth
        .lock()
        .unwrap()
        .extend((0..20).map(|_| vec!["535 5.7.3 Authentication unsuccessful"]));
    let app = spawn_built(two.settings.clone()).await;

    // Enough refusals in a row to call billing failing.
    for _ in 0..3 {
        expect_problem(
            app.post_mail(&mail(BILLING_MAILBOX)).await,
            502,
            "smtp_auth_failed",
        )
        .await;
    }
    let response = app.post_mail(&mail(DEFAULT_MAILBOX)).await;
    assert_eq!(response.status(), 202);
    assert_eq!(two.default.delivered.load(Ordering::SeqCst), 1);
    assert_eq!(two.billing.delivered.load(Ordering::SeqCst), 0);

    let (status, ready) = app.get_ready().await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready", "{ready:#}");
    let identities = ready["components"]["identities"].as_array().unwrap();
    let state = |name: &str| {
        identities
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {ready:#}"))
            .clone()
    };
    assert_eq!(state("default")["status"], "ok");
    assert_eq!(state("default")["mailbox"], DEFAULT_MAILBOX);
    let billing = state("billing");
    assert_eq!(billing["status"], "failing", "{billing:#}");
    assert_eq!(
        billing["lastError"]["kind"], "smtp_auth_failed",
        "{billing:#}"
    );
}

#[tokio::test]
async fn mailbox_limits_are_counted_per_identity() {
    let mut two = two_identities().await;
    let one = NonZeroU32::new(1);
    two.settings.relay.rate_limits.mailbox_messages_per_minute = one;
    two.settings.relay.identities.others[0]
        .rate_limits
        .mailbox_messages_per_minute = one;
    let app = spawn_built(two.settings.clone()).await;

    for from in [DEFAULT_MAILBOX, BILLING_MAILBOX] {
        assert_eq!(app.post_mail(&mail(from)).await.status(), 202, "{from}");
    }
    // Each mailbox's minute is used up by its own mail, not by the other's.
    for from in [DEFAULT_MAILBOX, BILLING_MAILBOX] {
        expect_problem(app.post_mail(&mail(from)).await, 429, "rate_limited").await;
    }
    assert_eq!(two.default.delivered.load(Ordering::SeqCst), 1);
    assert_eq!(two.billing.delivered.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn each_mailbox_keeps_to_its_own_connection_cap() {
    let two = two_identities().await;
    let app = Arc::new(spawn_built(two.settings.clone()).await);
    // 3 connections per mailbox (the test settings' cap): 12 mails at once open at most 3 each.
    let sends = (0..12).map(|i| {
        let app = Arc::clone(&app);
        let from = if i % 2 == 0 {
            DEFAULT_MAILBOX
        } else {
            BILLING_MAILBOX
        };
        tokio::spawn(async move { app.post_mail(&mail(from)).await.status() })
    });
    for send in sends {
        assert_eq!(send.await.unwrap(), 202);
    }
    for script in [&two.default, &two.billing] {
        let connections = script.connections.load(Ordering::SeqCst);
        assert!((1..=3).contains(&connections), "{connections} connections");
        assert_eq!(script.delivered.load(Ordering::SeqCst), 6);
    }
}

#[tokio::test]
async fn a_token_is_shared_only_where_the_app_is_the_same() {
    let mut two = two_identities().await;
    // Billing belongs to another tenant's app registration, with an Entra ID of its own.
    let fabrikam = FakeEntra::start().await;
    fabrikam.mount_token("another-tenants-token", 3599).await;
    let SmtpAuthentication::MsOAuth { oauth, .. } = &mut two.settings.relay.identities.others[0]
        .send_email
        .smtp_authentication
    else {
        unreachable!()
    };
    *oauth = OAuthSettings {
        tenant_id: "fabrikam.onmicrosoft.com".into(),
        client_id: "0b1e7a52-0000-4000-8000-00000000b111".into(),
        ..fabrikam.oauth_settings()
    };
    let app = spawn_built(two.settings.clone()).await;

    for from in [
        DEFAULT_MAILBOX,
        BILLING_MAILBOX,
        DEFAULT_MAILBOX,
        BILLING_MAILBOX,
    ] {
        assert_eq!(app.post_mail(&mail(from)).await.status(), 202);
    }
    // Each tenant's endpoint was asked once, for its own app: one token per app.
    let clients = |requests: Vec<wiremock::Request>| -> Vec<String> {
        requests
            .iter()
            .filter_map(|r| field(&form_fields(r), "client_id").map(str::to_owned))
            .collect()
    };
    assert_eq!(
        clients(two.entra.requests().await),
        [crate::entra::CLIENT_ID]
    );
    assert_eq!(
        clients(fabrikam.requests().await),
        ["0b1e7a52-0000-4000-8000-00000000b111"]
    );
}

// ---- the settings --------------------------------------------------------------------------

const SEED: &str = r#"
featureSwitches:
  sendEmail:
    smtpServer: smtp.office365.com
    smtpUsername: noreply@contoso.com
    oAuthClientId: 11111111-2222-3333-4444-555555555555
    oAuthClientSecret: Zx8Q~default-secret-value~42
    oAuthTenantId: contoso.onmicrosoft.com
mailRelay:
  auth:
    apiKeys:
      - name: web
        sha256: 2f0e8ee0a3fc4ff1b0b9f7d3c8b0d1b5d2e1f5a3c7b9d0e1f2a3b4c5d6e7f809
        allowedFrom: ["*@contoso.com"]
"#;

fn load(identities: &str) -> Result<mail_relay::config::Loaded, mail_relay::config::ConfigError> {
    mail_relay::config::load_str(
        &format!("{SEED}  identities:\n{identities}"),
        "test.yml",
        &[],
    )
}

fn error_for(identities: &str, key: &str) -> String {
    let error = load(identities).expect_err("settings with an error");
    let found: Vec<_> = error.errors.iter().filter(|e| e.key == key).collect();
    assert_eq!(found.len(), 1, "one error for {key} expected in:\n{error}");
    found[0].message.clone()
}

#[test]
fn an_identity_takes_the_default_identitys_keys_it_leaves_out() {
    let loaded = load(
        r#"    - name: billing
      from: [billing@contoso.com, "*@billing.contoso.com"]
      smtpUsername: billing@contoso.com
      mailboxMessagesPerMinute: 10
    - name: tenant-b
      from: ["*@fabrikam.com"]
      transport: graph
      smtpUsername: relay@fabrikam.com
      oAuthTenantId: fabrikam.onmicrosoft.com
      oAuthClientId: 99999999-2222-3333-4444-555555555555
      oAuthClientSecret: Zx8Q~fabrikam-secret~77
"#,
    )
    .unwrap();
    let all = &loaded.settings.relay.identities;
    assert_eq!(all.default_name, "default");
    // Other identities exist: the default serves its own address only, unless it names more.
    assert_eq!(all.default_from, patterns(&["noreply@contoso.com"]));
    let billing = &all.others[0];
    assert_eq!(
        billing.from,
        patterns(&["billing@contoso.com", "*@billing.contoso.com"])
    );
    assert_eq!(billing.delivery, Delivery::Smtp);
    assert_eq!(billing.send_email.smtp_server, "smtp.office365.com");
    assert_eq!(
        billing.rate_limits.mailbox_messages_per_minute,
        NonZeroU32::new(10)
    );
    let SmtpAuthentication::MsOAuth { username, oauth } = &billing.send_email.smtp_authentication
    else {
        panic!("MS_OAUTH inherited");
    };
    assert_eq!(username.as_str(), "billing@contoso.com");
    assert_eq!(oauth.client_id, "11111111-2222-3333-4444-555555555555");
    assert_eq!(
        oauth.token_endpoint.as_str(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );

    let tenant_b = &all.others[1];
    assert_eq!(tenant_b.delivery, Delivery::Graph);
    let SmtpAuthentication::MsOAuth { oauth, .. } = &tenant_b.send_email.smtp_authentication else {
        panic!("MS_OAUTH");
    };
    assert_eq!(
        oauth.token_endpoint.as_str(),
        "https://login.microsoftonline.com/fabrikam.onmicrosoft.com/oauth2/v2.0/token"
    );

    // check-config shows every identity in full, its secrets masked.
    let masked = &loaded.masked;
    assert!(masked.contains("- name: \"tenant-b\""), "{masked}");
    assert!(
        masked.contains("smtpUsername: \"relay@fabrikam.com\""),
        "{masked}"
    );
    assert!(!masked.contains("fabrikam-secret"), "{masked}");
    assert!(!masked.contains("default-secret-value"), "{masked}");
    assert!(!format!("{:?}", loaded.settings).contains("fabrikam-secret"));
}

#[test]
fn an_identity_with_a_credential_of_its_own_inherits_no_other() {
    // The default's secret is not carried over to a managed identity (which takes none).
    let loaded = load(
        r#"    - name: mi
      from: ["*@fabrikam.com"]
      smtpUsername: relay@fabrikam.com
      transport: graph
      oAuthManagedIdentity: imds
"#,
    )
    .unwrap();
    let SmtpAuthentication::MsOAuth { oauth, .. } = &loaded.settings.relay.identities.others[0]
        .send_email
        .smtp_authentication
    else {
        panic!("MS_OAUTH");
    };
    assert!(matches!(
        oauth.credential,
        mail_relay::config::ClientCredential::ManagedIdentity(_)
    ));
}

#[test]
fn a_wrong_identity_names_its_entry_and_key() {
    let message = error_for(
        "    - name: a\n      smtpUsername: a@contoso.com\n",
        "mailRelay.identities[0].from",
    );
    assert!(message.contains("is required"), "{message}");
    let message = error_for(
        "    - name: a\n      from: [a@contoso.com]\n      smtpHost: x\n",
        "mailRelay.identities[0].smtpHost",
    );
    assert!(message.contains("unknown key"), "{message}");
    let message = error_for(
        "    - name: a\n      from: [a@contoso.com]\n      smtpUsername: not-an-address\n",
        "mailRelay.identities[0].smtpUsername",
    );
    assert!(message.contains("not an e-mail address"), "{message}");
    let message = error_for(
        "    - name: a\n      from: [a@contoso.com]\n    - name: a\n      from: [b@contoso.com]\n",
        "mailRelay.identities[1].name",
    );
    assert!(message.contains("already the name"), "{message}");
    let message = error_for(
        "    - name: a\n      from: [\"*@contoso.com\"]\n    - name: b\n      from: [\"*@contoso.com\"]\n",
        "mailRelay.identities[1].from",
    );
    assert!(message.contains("served by \"a\""), "{message}");
    let message = error_for(
        "    - name: a\n      from: [a@contoso.com]\n      transport: pigeon\n",
        "mailRelay.identities[0].transport",
    );
    assert!(message.contains("smtp, graph, auto"), "{message}");
    let message = error_for(
        "    - name: a b\n      from: [a@contoso.com]\n",
        "mailRelay.identities[0].name",
    );
    assert!(message.contains("letters, digits"), "{message}");
}

#[tokio::test]
async fn a_queued_mail_is_delivered_by_the_identity_that_serves_its_from() {
    use crate::queue::wait_status;

    let mut two = two_identities().await;
    let dir = tempfile::tempdir().unwrap();
    two.settings.relay.store.url =
        mail_relay::config::StoreUrl::Sqlite(dir.path().join("relay.db"));
    let app = spawn_built(two.settings.clone()).await;
    app.wait_ready().await;

    let mut ids = Vec::new();
    for from in [BILLING_MAILBOX, DEFAULT_MAILBOX, "invoices@contoso.test"] {
        let response = app.post_queued(&mail(from)).await;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["status"], "queued", "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        wait_status(&app, id, std::time::Duration::from_secs(15), |s| {
            s["status"] == "sent"
        })
        .await;
    }
    assert_eq!(two.default.delivered.load(Ordering::SeqCst), 1);
    assert_eq!(two.billing.delivered.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_api_key_restricted_to_identities_uses_only_those() {
    let mut two = two_identities().await;
    two.settings.relay.auth.api_keys[0].identities = vec!["billing".into()];
    let app = spawn_built(two.settings.clone()).await;

    assert_eq!(app.post_mail(&mail(BILLING_MAILBOX)).await.status(), 202);
    let problem = expect_problem(
        app.post_mail(&mail(DEFAULT_MAILBOX)).await,
        403,
        "send_as_denied",
    )
    .await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("only through the identities billing") && detail.contains("default"),
        "{problem}"
    );
    assert_eq!(two.default.delivered.load(Ordering::SeqCst), 0);
}

#[test]
fn an_api_key_names_only_identities_that_exist() {
    let yaml = format!(
        "{}        identities: [billing, nowhere]\n  identities:\n    - name: billing\n      from: [billing@contoso.com]\n",
        SEED.trim_end_matches('\n').to_owned() + "\n"
    );
    let error = mail_relay::config::load_str(&yaml, "test.yml", &[]).unwrap_err();
    let found: Vec<_> = error
        .errors
        .iter()
        .filter(|e| e.key == "mailRelay.auth.apiKeys[0].identities")
        .collect();
    assert_eq!(found.len(), 1, "{error}");
    assert!(
        found[0].message.contains("\"nowhere\" is not an identity"),
        "{error}"
    );
}

#[tokio::test]
async fn against_the_peer_each_mailbox_logs_in_as_itself_and_its_mail_says_so() {
    let peer = crate::require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let mut settings = peer_oauth_settings(&peer, entra.oauth_settings());
    let peer_server = |authentication| SendEmailSettings {
        smtp_authentication: authentication,
        ..settings.send_email.clone()
    };
    settings.relay.identities = IdentitiesSettings {
        default_name: "default".into(),
        default_from: patterns(&[&peer.oauth_user]),
        others: vec![IdentitySettings {
            name: "basic".into(),
            from: patterns(&[&peer.basic_user]),
            send_email: peer_server(SmtpAuthentication::Basic {
                username: peer.basic_user.clone(),
                password: peer.basic_password.clone().into(),
            }),
            delivery: Delivery::Smtp,
            rate_limits: RateLimitSettings::OFF,
        }],
    };
    let app = spawn_built(settings).await;
    let marker = format!("identities-{}", uuid::Uuid::new_v4().simple());

    for user in [&peer.oauth_user, &peer.basic_user] {
        let mut body = mail(user);
        body["to"] = json!("alice@contoso.test");
        body["subject"] = json!(format!("{marker} {user}"));
        let response = app.post_mail(&body).await;
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    }
    for user in [&peer.oauth_user, &peer.basic_user] {
        let message = peer
            .wait_for_message(
                &format!("{marker} {user}"),
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|| panic!("{user}'s mail not delivered"));
        let text = String::from_utf8_lossy(&message);
        assert!(
            text.contains(&format!("(Authenticated sender: {user})")),
            "{user}: {text}"
        );
    }
}

#[test]
fn beside_other_identities_a_default_without_a_mailbox_must_name_its_from() {
    let yaml = "featureSwitches:\n  sendEmail:\n    smtpServer: localhost\n    smtpEncryption: NONE\n    smtpAuthentication: NONE\nmailRelay:\n  auth:\n    allowAnonymous: true\n  delivery:\n    mode: outbox\n  identities:\n    - name: billing\n      from: [billing@contoso.com]\n";
    let error = mail_relay::config::load_str(yaml, "test.yml", &[]).unwrap_err();
    let found: Vec<_> = error
        .errors
        .iter()
        .filter(|e| e.key == "mailRelay.defaultIdentity.from")
        .collect();
    assert_eq!(found.len(), 1, "{error}");
    assert!(
        found[0].message.contains("never serves every From"),
        "{error}"
    );
}

#[test]
fn an_identity_without_a_name_is_told_it_needs_one() {
    let message = error_for(
        "    - from: [a@contoso.com]\n",
        "mailRelay.identities[0].name",
    );
    assert!(message.contains("is required"), "{message}");
}
