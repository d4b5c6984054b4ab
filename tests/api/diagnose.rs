//! `mail-relay diagnose` through the built binary, against the real Postfix + Dovecot peer and
//! the fake Entra ID: every step passes, and each failure names its cause and fix.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::entra::{CLIENT_ID, CLIENT_SECRET, FakeEntra, TENANT_ID};
use crate::helpers::TEST_API_KEY;
use crate::peer::{Peer, closed_port};
use crate::require_peer;

const BIN: &str = env!("CARGO_BIN_EXE_mail-relay");

/// What the binary printed and how it ended.
struct Run {
    code: i32,
    stdout: String,
}

impl Run {
    /// The step's first line, e.g. `FAIL token ...`, with its cause and fix lines.
    fn step(&self, name: &str) -> String {
        let mut lines = self.stdout.lines();
        let mut found = Vec::new();
        while let Some(line) = lines.next() {
            let mut words = line.split_whitespace();
            let (_, step) = (words.next(), words.next());
            if step == Some(name) && line.starts_with(['P', 'F', 'S']) {
                found.push(line.to_owned());
                found.extend(
                    lines
                        .clone()
                        .take_while(|l| l.starts_with("     "))
                        .map(str::to_owned),
                );
                break;
            }
        }
        assert!(!found.is_empty(), "no step {name} in:\n{}", self.stdout);
        found.join("\n")
    }

    fn assert_step(&self, status: &str, name: &str) -> String {
        let step = self.step(name);
        assert!(
            step.starts_with(status),
            "expected {status} {name}, got:\n{}",
            self.stdout
        );
        step
    }
}

/// Settings for the peer's STARTTLS port and the fake Entra ID, as an operator writes them.
fn yaml(peer: &Peer, entra: &FakeEntra, port: u16, encryption: &str) -> String {
    let key_hash = hex::encode(Sha256::digest(TEST_API_KEY.as_bytes()));
    format!(
        r#"featureSwitches:
  sendEmail:
    smtpServer: localhost
    smtpPort: {port}
    smtpEncryption: {encryption}
    smtpAuthentication: MS_OAUTH
    smtpUsername: {user}
    oAuthClientId: {CLIENT_ID}
    oAuthClientSecret: "{CLIENT_SECRET}"
    oAuthTenantId: {TENANT_ID}
    oAuthTokenEndpoint: {endpoint}
mailRelay:
  smtp:
    caFile: {ca}
    connectTimeoutSeconds: 5
    commandTimeoutSeconds: 10
  auth:
    apiKeys:
      - name: tests
        sha256: {key_hash}
        allowedFrom: ["*@contoso.test"]
"#,
        user = peer.oauth_user,
        endpoint = entra.token_url(),
        ca = peer.ca_path().display(),
    )
}

async fn diagnose(dir: &Path, yaml: &str, args: &[&str]) -> Run {
    let path = dir.join("osweb-prod.yml");
    std::fs::write(&path, yaml).unwrap();
    // tokio's Command: the fake Entra ID answers from this test's runtime meanwhile.
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(BIN)
            .env_clear()
            .arg("diagnose")
            .arg("--config")
            .arg(&path)
            .args(args)
            .output(),
    )
    .await
    .expect("diagnose finished within a minute")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.trim().is_empty(),
        "diagnose wrote to stderr: {stderr}"
    );
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout,
    }
}

fn assert_no_secret(run: &Run, token: &str) {
    assert!(!run.stdout.contains(CLIENT_SECRET), "{}", run.stdout);
    assert!(!run.stdout.contains(token), "{}", run.stdout);
    // Not even the token's signature part.
    let signature = token.rsplit('.').next().unwrap();
    assert!(!run.stdout.contains(signature), "{}", run.stdout);
}

#[tokio::test]
async fn every_step_passes_against_the_peer_and_fake_entra() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    let token = peer.mint_token(&peer.oauth_user, Duration::from_secs(3600));
    entra.mount_token(&token, 3599).await;
    let dir = tempfile::tempdir().unwrap();

    let run = diagnose(
        dir.path(),
        &yaml(&peer, &entra, peer.submission_port, "TLS"),
        &[],
    )
    .await;

    assert_eq!(run.code, 0, "{}", run.stdout);
    run.assert_step("PASS", "settings");
    let connect = run.assert_step("PASS", "connect");
    assert!(connect.contains("127.0.0.1"), "{connect}");
    let tls = run.assert_step("PASS", "tls");
    assert!(tls.contains("STARTTLS"), "{tls}");
    assert!(tls.contains("subject CN=localhost"), "{tls}");
    assert!(tls.contains("names localhost 127.0.0.1"), "{tls}");
    assert!(tls.contains("issuer CN=mail-relay test peer CA"), "{tls}");
    assert!(tls.contains("expires 20"), "{tls}");
    let ehlo = run.assert_step("PASS", "ehlo");
    assert!(ehlo.contains("XOAUTH2"), "{ehlo}");
    let token_line = run.assert_step("PASS", "token");
    let fingerprint =
        mail_relay::token::AccessToken::new(token.clone().into(), std::time::SystemTime::now())
            .fingerprint();
    assert!(token_line.contains(&fingerprint), "{token_line}");
    let auth = run.assert_step("PASS", "auth");
    assert!(
        auth.contains(&format!("XOAUTH2 as {}", peer.oauth_user)),
        "{auth}"
    );
    run.assert_step("SKIP", "send-test");
    assert!(run.stdout.contains("all checks passed"));
    assert_no_secret(&run, &token);
    assert_eq!(entra.fetch_count().await, 1);
}

#[tokio::test]
async fn implicit_tls_passes_on_the_smtps_port() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    let token = peer.mint_token(&peer.oauth_user, Duration::from_secs(3600));
    entra.mount_token(&token, 3599).await;
    let dir = tempfile::tempdir().unwrap();

    let run = diagnose(
        dir.path(),
        &yaml(&peer, &entra, peer.smtps_port, "SSL"),
        &[],
    )
    .await;

    assert_eq!(run.code, 0, "{}", run.stdout);
    let tls = run.assert_step("PASS", "tls");
    assert!(tls.contains("implicit TLS (TLSv1."), "{tls}");
    assert!(tls.contains("subject CN=localhost"), "{tls}");
    run.assert_step("PASS", "auth");
}

#[tokio::test]
async fn a_wrong_client_secret_is_named_with_its_fix() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    entra.mount_error(7000215).await;
    let dir = tempfile::tempdir().unwrap();

    let run = diagnose(
        dir.path(),
        &yaml(&peer, &entra, peer.submission_port, "TLS"),
        &[],
    )
    .await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    run.assert_step("PASS", "ehlo");
    let token = run.assert_step("FAIL", "token");
    assert!(token.contains("AADSTS7000215"), "{token}");
    assert!(
        token.contains("cause: the client secret is wrong"),
        "{token}"
    );
    assert!(
        token.contains("fix:   set oAuthClientSecret to the secret's value, not its ID"),
        "{token}"
    );
    assert!(token.contains(crate::entra::CORRELATION_ID), "{token}");
    let auth = run.assert_step("SKIP", "auth");
    assert!(auth.contains("no access token"), "{auth}");
    assert!(!run.stdout.contains(CLIENT_SECRET));
}

#[tokio::test]
async fn an_unknown_tenant_is_named_with_its_fix() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    entra.mount_error(90002).await;
    let dir = tempfile::tempdir().unwrap();

    let run = diagnose(
        dir.path(),
        &yaml(&peer, &entra, peer.submission_port, "TLS"),
        &[],
    )
    .await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    let token = run.assert_step("FAIL", "token");
    assert!(token.contains("AADSTS90002"), "{token}");
    assert!(
        token.contains("cause: the tenant does not exist"),
        "{token}"
    );
    assert!(token.contains("check oAuthTenantId"), "{token}");
}

#[tokio::test]
async fn a_token_the_server_refuses_gets_the_exchange_setup_checklist() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    let token = peer.mint_token_wrong_key(&peer.oauth_user, Duration::from_secs(3600));
    entra.mount_token(&token, 3599).await;
    let dir = tempfile::tempdir().unwrap();

    let run = diagnose(
        dir.path(),
        &yaml(&peer, &entra, peer.submission_port, "TLS"),
        &[],
    )
    .await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    run.assert_step("PASS", "token");
    let auth = run.assert_step("FAIL", "auth");
    // Dovecot answers a 334 challenge and then 535: a refused token, like Exchange's 535 5.7.3.
    assert!(auth.contains("535"), "{auth}");
    assert!(auth.contains("roles lack SMTP.SendAsApp"), "{auth}");
    assert!(
        auth.contains("SMTP.SendAsApp, with admin consent"),
        "{auth}"
    );
    assert!(
        auth.contains(&format!("New-ServicePrincipal -AppId {CLIENT_ID}")),
        "{auth}"
    );
    assert!(
        auth.contains(&format!(
            "Add-MailboxPermission -Identity {}",
            peer.oauth_user
        )),
        "{auth}"
    );
    assert!(
        auth.contains("-SmtpClientAuthenticationDisabled $false"),
        "{auth}"
    );
    run.assert_step("SKIP", "send-test");
    assert_no_secret(&run, &token);
}

#[tokio::test]
async fn a_closed_port_fails_at_connect_and_the_token_is_still_checked() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    let token = peer.mint_token(&peer.oauth_user, Duration::from_secs(3600));
    entra.mount_token(&token, 3599).await;
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();

    let run = diagnose(dir.path(), &yaml(&peer, &entra, port, "TLS"), &[]).await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    let connect = run.assert_step("FAIL", "connect");
    assert!(connect.contains(&format!("localhost:{port}")), "{connect}");
    assert!(connect.to_lowercase().contains("refused"), "{connect}");
    assert!(connect.contains("nothing listens on"), "{connect}");
    assert!(
        connect.contains("featureSwitches.sendEmail.smtpPort"),
        "{connect}"
    );
    run.assert_step("SKIP", "tls");
    run.assert_step("SKIP", "ehlo");
    // The token does not depend on the SMTP server: it is still checked.
    run.assert_step("PASS", "token");
    run.assert_step("SKIP", "auth");
}

#[tokio::test]
async fn send_test_delivers_a_real_mail() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    entra
        .mount_token(
            &peer.mint_token(&peer.oauth_user, Duration::from_secs(3600)),
            3599,
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let to = format!("diag-{}@contoso.test", uuid::Uuid::new_v4().simple());

    let run = diagnose(
        dir.path(),
        &yaml(&peer, &entra, peer.submission_port, "TLS"),
        &["--send-test", "--from", "billing@contoso.test", "--to", &to],
    )
    .await;

    assert_eq!(run.code, 0, "{}", run.stdout);
    let sent = run.assert_step("PASS", "send-test");
    assert!(sent.contains("250"), "{sent}");
    let mail = peer
        .wait_for_message(&to, Duration::from_secs(10))
        .await
        .expect("the test mail arrived");
    let text = String::from_utf8_lossy(&mail);
    assert!(
        text.contains("Subject: mail-relay diagnose: test mail"),
        "{text}"
    );
    assert!(text.contains("From: billing@contoso.test"), "{text}");
}

#[tokio::test]
async fn send_test_as_a_denied_sender_explains_send_as() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    entra
        .mount_token(
            &peer.mint_token(&peer.oauth_user, Duration::from_secs(3600)),
            3599,
        )
        .await;
    let dir = tempfile::tempdir().unwrap();

    let run = diagnose(
        dir.path(),
        &yaml(&peer, &entra, peer.submission_port, "TLS"),
        &[
            "--send-test",
            "--from",
            &peer.sendas_denied,
            "--to",
            "alice@contoso.test",
        ],
    )
    .await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    run.assert_step("PASS", "auth");
    let sent = run.assert_step("FAIL", "send-test");
    assert!(
        sent.contains(&format!(
            "SendAsDenied: {} may not send as {}",
            peer.oauth_user, peer.sendas_denied
        )),
        "{sent}"
    );
    assert!(sent.contains("5.2.252"), "{sent}");
    assert!(
        sent.contains(&format!(
            "Add-RecipientPermission -Identity {} -Trustee {}",
            peer.sendas_denied, peer.oauth_user
        )),
        "{sent}"
    );
}

#[tokio::test]
async fn invalid_settings_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = diagnose(
        dir.path(),
        "featureSwitches:\n  sendEmail:\n    smtpServer: smtp.office365.com\n    smtpPort: 99999\n",
        &[],
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    let settings = run.assert_step("FAIL", "settings");
    assert!(
        settings.contains("featureSwitches.sendEmail.smtpPort"),
        "{settings}"
    );
}

#[tokio::test]
async fn send_test_needs_from_and_to() {
    let output = tokio::process::Command::new(BIN)
        .env_clear()
        .args(["diagnose", "--send-test", "--to", "a@contoso.test"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--from"));
}
