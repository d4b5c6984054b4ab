//! Administrative e-mails: the `mailRelay.adminMail` settings, the start-up and shutdown
//! notices of the real binary, and the failure notice at most once an hour, read back from the
//! real peer's Maildir.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mail_relay::admin::AdminNotifier;
use mail_relay::clock::ManualClock;
use mail_relay::config::{AdminMailSettings, Settings, SmtpAuthentication, load_str};
use mail_relay::delivery::{DeliveryError, MailSender};
use mail_relay::smtp::{SmtpError, SmtpSender, Stage};
use mail_relay::token::{TokenCache, TokenProvider};

use crate::entra::{CLIENT_ID, CLIENT_SECRET, FakeEntra};
use crate::helpers::peer_oauth_settings;
use crate::peer::Peer;
use crate::require_peer;

const BIN: &str = env!("CARGO_BIN_EXE_mail-relay");

const BASE: &str = "featureSwitches:
  sendEmail:
    smtpServer: smtp.office365.com
    smtpAuthentication: MS_OAUTH
    smtpUsername: relay@contoso.com
    oAuthClientId: c1
    oAuthClientSecret: \"secret-value\"
    oAuthTenantId: contoso.onmicrosoft.com
";

fn load(extra: &str, env: &[(&str, &str)]) -> Result<mail_relay::config::Loaded, String> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    load_str(&format!("{BASE}{extra}"), "test.yml", &env).map_err(|e| e.to_string())
}

#[test]
fn admin_mail_is_off_by_default() {
    let loaded = load("", &[]).unwrap();
    assert_eq!(loaded.settings.relay.admin_mail, None);
    assert!(
        loaded
            .masked
            .contains("  adminMail:\n    enabled: false # default"),
        "{}",
        loaded.masked
    );
}

#[test]
fn enabled_admin_mail_sends_from_smtp_username_by_default() {
    let loaded = load(
        "mailRelay:\n  adminMail:\n    enabled: true\n    recipients: [ops@contoso.com, it@contoso.com]\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        loaded.settings.relay.admin_mail,
        Some(AdminMailSettings {
            from: "relay@contoso.com".parse().unwrap(),
            recipients: vec![
                "ops@contoso.com".parse().unwrap(),
                "it@contoso.com".parse().unwrap()
            ],
        })
    );
    assert!(
        loaded.masked.contains(
            "    enabled: true\n    from: \"relay@contoso.com\" # default\n    recipients: [\"ops@contoso.com\", \"it@contoso.com\"]"
        ),
        "{}",
        loaded.masked
    );
}

#[test]
fn admin_mail_from_the_environment() {
    let loaded = load(
        "",
        &[
            ("MAILRELAY_ADMINMAIL_ENABLED", "true"),
            (
                "MAILRELAY_ADMINMAIL_RECIPIENTS",
                "ops@contoso.com,it@contoso.com",
            ),
            ("MAILRELAY_ADMINMAIL_FROM", "Relay@Contoso.com"),
        ],
    )
    .unwrap();
    let admin = loaded.settings.relay.admin_mail.unwrap();
    assert_eq!(admin.recipients.len(), 2);
    // Parsed as every address is: the local part as given, the domain in lower case.
    assert_eq!(admin.from.as_str(), "Relay@contoso.com");
}

#[test]
fn a_from_other_than_smtp_username_names_both_keys() {
    let error = load(
        "mailRelay:\n  adminMail:\n    enabled: true\n    recipients: [ops@contoso.com]\n    from: noreply@contoso.com\n",
        &[],
    )
    .unwrap_err();
    assert!(error.contains("mailRelay.adminMail.from: \"noreply@contoso.com\" differs from featureSwitches.sendEmail.smtpUsername (\"relay@contoso.com\")"), "{error}");
}

#[test]
fn enabled_without_recipients_or_with_a_bad_one_is_an_error() {
    let error = load("mailRelay:\n  adminMail:\n    enabled: true\n", &[]).unwrap_err();
    assert!(
        error.contains(
            "mailRelay.adminMail.recipients: is required when mailRelay.adminMail.enabled is true"
        ),
        "{error}"
    );
    let error = load(
        "mailRelay:\n  adminMail:\n    enabled: true\n    recipients: [ops]\n",
        &[],
    )
    .unwrap_err();
    assert!(
        error.contains("mailRelay.adminMail.recipients: \"ops\" is not an e-mail address"),
        "{error}"
    );
    let error = load("mailRelay:\n  adminMail:\n    enabled: yes please\n", &[]).unwrap_err();
    assert!(error.contains("mailRelay.adminMail.enabled"), "{error}");
}

/// Subject, headers as sent and the decoded text body (quoted-printable lines are cut at 76).
pub(crate) fn read_mail(raw: &[u8]) -> (String, String, String) {
    let message = mail_parser::MessageParser::default().parse(raw).unwrap();
    let subject = message.subject().unwrap_or_default().to_owned();
    let headers = String::from_utf8_lossy(&raw[..message.root_part().raw_body_offset() as usize])
        .into_owned();
    let body = message.body_text(0).unwrap_or_default().into_owned();
    (subject, headers, body)
}

/// A recipient no other test uses, so the Maildir search finds only this test's notices.
pub(crate) fn unique_recipient(what: &str) -> String {
    format!(
        "admin-{what}-{}@contoso.test",
        uuid::Uuid::new_v4().simple()
    )
}

/// Waits until the Maildir holds `count` mails containing `needle`; returns them.
pub(crate) async fn wait_for_count(peer: &Peer, needle: &str, count: usize) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let found = peer.find_messages(needle);
        if found.len() >= count || tokio::time::Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_binary_mails_a_startup_and_a_shutdown_notice() {
    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let admin = unique_recipient("lifecycle");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("osweb-prod.yml");
    std::fs::write(
        &path,
        crate::process::smtp_yaml(
            &peer,
            peer.submission_port,
            std::net::Ipv4Addr::LOCALHOST,
            &entra,
            "",
            &format!("  adminMail:\n    enabled: true\n    recipients: [{admin}]\n"),
        ),
    )
    .unwrap();

    let mut child = tokio::process::Command::new(BIN)
        .env_clear()
        .args(["serve", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let started = wait_for_count(&peer, &admin, 1).await;
    assert_eq!(started.len(), 1, "no start-up notice for {admin}");
    let text = String::from_utf8_lossy(&started[0]).into_owned();
    assert!(text.contains("Subject: mail-relay started on "), "{text}");
    assert!(
        text.contains(&format!("From: {}", peer.oauth_user)),
        "{text}"
    );
    assert!(text.contains("Auto-Submitted: auto-generated"), "{text}");
    assert!(
        text.contains(&format!(
            "mail-relay {} started on",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    // The effective settings, masked.
    assert!(text.contains("oAuthClientSecret: \"****\""), "{text}");
    assert!(
        text.contains(&format!("oAuthClientId: \"{CLIENT_ID}\"")),
        "{text}"
    );
    assert!(!text.contains(CLIENT_SECRET), "{text}");

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the relay exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // The shutdown notice is sent before the process exits: it is there now (or within the
    // moment Postfix takes to deliver it).
    let both = wait_for_count(&peer, &admin, 2).await;
    assert_eq!(both.len(), 2, "no shutdown notice for {admin}");
    let (_, _, stopping) = both
        .iter()
        .map(|m| read_mail(m))
        .find(|(subject, _, _)| subject.starts_with("mail-relay stopping on "))
        .expect("a shutdown notice");
    assert!(stopping.contains("is shutting down"), "{stopping}");
}

/// MS_OAUTH to the peer with tokens from `entra`, admin mail to `admin`.
fn relay_settings(peer: &Peer, entra: &FakeEntra, admin: &str) -> Settings {
    let mut settings = peer_oauth_settings(peer, entra.oauth_settings());
    settings.send_email.smtp_server = "localhost".into();
    settings.relay.admin_mail = Some(AdminMailSettings {
        from: peer.oauth_user.parse().unwrap(),
        recipients: vec![admin.parse().unwrap()],
    });
    settings
}

#[tokio::test]
async fn a_failure_notice_goes_out_at_most_once_an_hour() {
    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let admin = unique_recipient("failure");
    let settings = relay_settings(&peer, &entra, &admin);
    let SmtpAuthentication::MsOAuth { oauth, .. } = &settings.send_email.smtp_authentication else {
        unreachable!()
    };
    let tokens: Arc<dyn TokenProvider> = Arc::new(TokenCache::new(oauth).unwrap());
    let sender: Arc<dyn MailSender> = Arc::new(SmtpSender::new(&settings, Some(tokens)).unwrap());
    let clock = ManualClock::at(SystemTime::now());
    let notifier = AdminNotifier::with_clock(&settings, sender, Arc::new(clock.clone()));

    let refused = || {
        DeliveryError::Smtp(SmtpError::rejected(
            Stage::Auth,
            535,
            "5.7.3 Authentication unsuccessful",
        ))
    };
    let transient = DeliveryError::Smtp(SmtpError::rejected(Stage::Data, 451, "4.3.0 later"));

    assert!(
        !notifier.send_failure(&transient, "default"),
        "a transient failure is not mailed"
    );
    assert!(
        notifier.send_failure(&refused(), "default"),
        "the first failure is mailed"
    );
    let first = wait_for_count(&peer, &admin, 1).await;
    assert_eq!(first.len(), 1);
    let (subject, _, text) = read_mail(&first[0]);
    assert!(
        subject.ends_with("sending as default fails (smtp_auth_failed)"),
        "{subject}"
    );
    assert!(
        text.contains("535 5.7.3 Authentication unsuccessful"),
        "{text}"
    );
    assert!(text.contains("SMTP.SendAsApp"), "{text}");
    assert!(text.contains("mail-relay diagnose"), "{text}");

    assert!(
        !notifier.send_failure(&refused(), "default"),
        "again at once: not mailed"
    );
    assert!(
        notifier.send_failure(&refused(), "billing"),
        "another identity's failure within the hour: mailed, naming it"
    );
    clock.advance(Duration::from_secs(59 * 60));
    assert!(
        !notifier.send_failure(&refused(), "default"),
        "59 minutes later: not mailed"
    );
    clock.advance(Duration::from_secs(2 * 60));
    assert!(
        !notifier.send_failure(&transient, "default"),
        "still not for a transient failure"
    );
    let tenant = DeliveryError::Token(mail_relay::token::TokenError::Rejected(Box::new(
        mail_relay::token::EntraError {
            status: 400,
            error: "invalid_request".into(),
            error_codes: vec![90002],
            description: "AADSTS90002: Tenant not found.".into(),
            trace_id: None,
            correlation_id: None,
            timestamp: None,
        },
    )));
    assert!(
        notifier.send_failure(&tenant, "default"),
        "61 minutes later: mailed again"
    );

    let all = wait_for_count(&peer, &admin, 3).await;
    assert_eq!(all.len(), 3);
    assert!(
        all.iter().any(|m| read_mail(m)
            .0
            .ends_with("sending as billing fails (smtp_auth_failed)")),
        "a notice for billing"
    );
    let (_, _, tenant_text) = all
        .iter()
        .map(|m| read_mail(m))
        .find(|(subject, _, _)| {
            subject.ends_with("sending as default fails (token_tenant_not_found)")
        })
        .expect("a notice for the unknown tenant");
    assert!(tenant_text.contains("check oAuthTenantId"), "{tenant_text}");
    // Nothing more arrives: the calls that returned false sent nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(peer.find_messages(&admin).len(), 3);
}
