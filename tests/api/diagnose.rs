//! `mail-relay diagnose` through the built binary, against the real Postfix + Dovecot peer and
//! the fake Entra ID: every step passes, and each failure names its cause and fix.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::entra::{CLIENT_ID, CLIENT_SECRET, FakeEntra, TENANT_ID};
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
    yaml_for(
        "localhost",
        port,
        encryption,
        &peer.oauth_user,
        Some(peer.ca_path()),
        entra,
    )
}

fn yaml_for(
    server: &str,
    port: u16,
    encryption: &str,
    user: &str,
    ca: Option<&Path>,
    entra: &FakeEntra,
) -> String {
    let key_hash = crate::process::test_key_sha256();
    let ca = ca.map_or_else(String::new, |ca| format!("    caFile: {}\n", ca.display()));
    format!(
        r#"featureSwitches:
  sendEmail:
    smtpServer: {server}
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
{ca}    connectTimeoutSeconds: 5
    commandTimeoutSeconds: 10
  auth:
    apiKeys:
      - name: tests
        sha256: {key_hash}
        allowedFrom: ["*@contoso.test"]
"#,
        endpoint = entra.token_url(),
    )
}

/// `diagnose` with the peer's settings (`yaml`) on `port`.
async fn diagnose_peer(
    peer: &Peer,
    entra: &FakeEntra,
    port: u16,
    encryption: &str,
    args: &[&str],
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    diagnose(dir.path(), &yaml(peer, entra, port, encryption), args).await
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

    let run = diagnose_peer(&peer, &entra, peer.submission_port, "TLS", &[]).await;

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
    // The documented fingerprint: the first 8 hex digits of the token's SHA-256.
    let fingerprint = hex::encode(&Sha256::digest(token.as_bytes())[..4]);
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

    let run = diagnose_peer(&peer, &entra, peer.smtps_port, "SSL", &[]).await;

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

    let run = diagnose_peer(&peer, &entra, peer.submission_port, "TLS", &[]).await;

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

    let run = diagnose_peer(&peer, &entra, peer.submission_port, "TLS", &[]).await;

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

    let run = diagnose_peer(&peer, &entra, peer.submission_port, "TLS", &[]).await;

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
    let port = closed_port();

    let run = diagnose_peer(&peer, &entra, port, "TLS", &[]).await;

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
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let to = format!("diag-{}@contoso.test", uuid::Uuid::new_v4().simple());

    let run = diagnose_peer(
        &peer,
        &entra,
        peer.submission_port,
        "TLS",
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
    let entra = FakeEntra::serving_peer_tokens(&peer).await;

    let run = diagnose_peer(
        &peer,
        &entra,
        peer.submission_port,
        "TLS",
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

#[tokio::test]
async fn an_untrusted_certificate_is_shown_with_the_ca_file_fix() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    entra.mount_token("unused", 3599).await;
    let dir = tempfile::tempdir().unwrap();
    let without_ca = yaml(&peer, &entra, peer.submission_port, "TLS")
        .replace(&format!("    caFile: {}\n", peer.ca_path().display()), "");

    let run = diagnose(dir.path(), &without_ca, &[]).await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    let tls = run.assert_step("FAIL", "tls");
    assert!(tls.contains("STARTTLS with localhost"), "{tls}");
    assert!(
        tls.contains("the server showed: subject CN=localhost, names localhost 127.0.0.1, issuer CN=mail-relay test peer CA"),
        "{tls}"
    );
    assert!(
        tls.contains("fix:   the certificate's issuer (CN=mail-relay test peer CA) is not trusted here: put that CA's PEM certificate in mailRelay.smtp.caFile"),
        "{tls}"
    );
    run.assert_step("SKIP", "ehlo");
    run.assert_step("SKIP", "auth");
}

#[tokio::test]
async fn a_server_name_missing_from_the_certificate_is_named() {
    let peer = require_peer!();
    // 127.0.0.2 is this machine too, but not a name in the peer's certificate (localhost,
    // 127.0.0.1): a forwarder there reaches the peer under a name it does not carry.
    let host = "127.0.0.2";
    let forwarder = tokio::net::TcpListener::bind((host, 0)).await.unwrap();
    let port = forwarder.local_addr().unwrap().port();
    let target = peer.submission_port;
    tokio::spawn(async move {
        while let Ok((mut client, _)) = forwarder.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    let entra = FakeEntra::start().await;
    entra.mount_token("unused", 3599).await;
    let dir = tempfile::tempdir().unwrap();
    let by_host_name = yaml(&peer, &entra, port, "TLS")
        .replace("smtpServer: localhost", &format!("smtpServer: {host}"));

    let run = diagnose(dir.path(), &by_host_name, &[]).await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    let tls = run.assert_step("FAIL", "tls");
    assert!(
        tls.contains(&format!(
            "fix:   featureSwitches.sendEmail.smtpServer \"{host}\" is not a name in the certificate (localhost, 127.0.0.1)"
        )),
        "{tls}"
    );
}

/// EHLO as Exchange Online answers it after STARTTLS.
const EXCHANGE_EHLO: &str = "250-fake.outlook.test Hello\r\n250-SIZE 157286400\r\n250-AUTH LOGIN XOAUTH2\r\n250 8BITMIME\r\n";

/// A plain-text SMTP server answering EHLO with `ehlo` (`EXCHANGE_EHLO`: as Exchange Online
/// after STARTTLS) and every AUTH with `auth_reply`.
async fn smtp_fake(ehlo: &'static str, auth_reply: &'static str) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write
                    .write_all(b"220 fake.outlook.test Microsoft ESMTP MAIL Service ready\r\n")
                    .await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line
                        .split(' ')
                        .next()
                        .unwrap_or_default()
                        .to_ascii_uppercase();
                    let reply = match verb.as_str() {
                        "EHLO" => ehlo.to_owned(),
                        "AUTH" => format!("{auth_reply}\r\n"),
                        "QUIT" => {
                            let _ = write
                                .write_all(b"221 2.0.0 Service closing transmission channel\r\n")
                                .await;
                            return;
                        }
                        _ => "250 2.0.0 OK\r\n".to_owned(),
                    };
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

async fn diagnose_against_exchange_like(auth_reply: &'static str) -> (Run, String) {
    // smtpEncryption NONE is allowed with a login on loopback only; TLS is not the point here.
    diagnose_against_fake(EXCHANGE_EHLO, auth_reply, "NONE").await
}

/// `diagnose` against `smtp_fake(ehlo, auth_reply)` with `encryption`, and the token it got.
async fn diagnose_against_fake(
    ehlo: &'static str,
    auth_reply: &'static str,
    encryption: &str,
) -> (Run, String) {
    let entra = FakeEntra::start().await;
    let token = "opaque-access-token-not-a-jwt-6f1d";
    entra.mount_token(token, 3599).await;
    let port = smtp_fake(ehlo, auth_reply).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = yaml_for(
        "127.0.0.1",
        port,
        encryption,
        "relay@contoso.com",
        None,
        &entra,
    );
    (diagnose(dir.path(), &settings, &[]).await, token.to_owned())
}

#[tokio::test]
async fn a_server_without_xoauth2_fails_at_ehlo_naming_what_ms_oauth_needs() {
    let (run, _) = diagnose_against_fake(
        "250-mail.example.test Hello\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n",
        "535 5.7.8 not reached",
        "NONE",
    )
    .await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    let ehlo = run.assert_step("FAIL", "ehlo");
    assert!(ehlo.contains("offers AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(ehlo.contains("MS_OAUTH needs AUTH XOAUTH2"), "{ehlo}");
    assert!(ehlo.contains("smtpAuthentication BASIC"), "{ehlo}");
}

#[tokio::test]
async fn a_port_without_starttls_fails_at_tls_with_the_implicit_tls_fix() {
    // An EHLO without STARTTLS, as a plain relay port sends it.
    let (run, _) = diagnose_against_fake(
        "250-mail.example.test Hello\r\n250-AUTH LOGIN XOAUTH2\r\n250 8BITMIME\r\n",
        "235 2.7.0 not reached",
        "TLS",
    )
    .await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    let tls = run.assert_step("FAIL", "tls");
    assert!(tls.contains("does not offer STARTTLS"), "{tls}");
    assert!(
        tls.contains("smtpEncryption SSL for an implicit-TLS port"),
        "{tls}"
    );
}

#[tokio::test]
async fn smtp_auth_disabled_for_the_tenant_says_to_enable_it() {
    let (run, token) = diagnose_against_exchange_like(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
    )
    .await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    run.assert_step("SKIP", "tls");
    let ehlo = run.assert_step("PASS", "ehlo");
    assert!(
        ehlo.contains("fake.outlook.test offers AUTH LOGIN XOAUTH2"),
        "{ehlo}"
    );
    let auth = run.assert_step("FAIL", "auth");
    assert!(auth.contains("5.7.139"), "{auth}");
    assert!(
        auth.contains("fix:   enable Authenticated SMTP for relay@contoso.com"),
        "{auth}"
    );
    assert!(
        auth.contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false"),
        "{auth}"
    );
    assert!(!auth.contains("New-ServicePrincipal"), "{auth}");
    assert!(!run.stdout.contains(&token));
}

#[tokio::test]
async fn exchanges_535_5_7_3_gets_the_setup_checklist() {
    let (run, token) =
        diagnose_against_exchange_like("535 5.7.3 Authentication unsuccessful").await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    let auth = run.assert_step("FAIL", "auth");
    assert!(
        auth.contains("the server refused AUTH: 535 5.7.3 Authentication unsuccessful"),
        "{auth}"
    );
    assert!(
        auth.contains("1. Authenticated SMTP is on for the mailbox relay@contoso.com"),
        "{auth}"
    );
    assert!(
        auth.contains("SMTP.SendAsApp, with admin consent"),
        "{auth}"
    );
    assert!(
        auth.contains(&format!("New-ServicePrincipal -AppId {CLIENT_ID}")),
        "{auth}"
    );
    assert!(auth.contains("-AccessRights FullAccess"), "{auth}");
    // An opaque token has no readable roles: no guess about them.
    assert!(!auth.contains("most likely"), "{auth}");
    assert!(!run.stdout.contains(&token));
}

#[tokio::test]
async fn basic_login_on_the_peer_passes_without_a_token() {
    let peer = require_peer!();
    let dir = tempfile::tempdir().unwrap();
    let key_hash = crate::process::test_key_sha256();
    let settings = format!(
        r#"featureSwitches:
  sendEmail:
    smtpServer: localhost
    smtpPort: {port}
    smtpEncryption: TLS
    smtpAuthentication: BASIC
    smtpUsername: {user}
    smtpPassword: "{password}"
mailRelay:
  smtp:
    caFile: {ca}
  auth:
    apiKeys: [{{name: tests, sha256: {key_hash}, allowedFrom: ["*@contoso.test"]}}]
"#,
        port = peer.submission_port,
        user = peer.basic_user,
        password = peer.basic_password,
        ca = peer.ca_path().display(),
    );

    let run = diagnose(dir.path(), &settings, &[]).await;

    assert_eq!(run.code, 0, "{}", run.stdout);
    run.assert_step("PASS", "ehlo");
    let token = run.assert_step("SKIP", "token");
    assert!(token.contains("BASIC"), "{token}");
    let auth = run.assert_step("PASS", "auth");
    assert!(
        auth.contains(&format!("PLAIN/LOGIN as {}", peer.basic_user)),
        "{auth}"
    );
    assert!(!run.stdout.contains(&peer.basic_password));
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_named() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    let dir = tempfile::tempdir().unwrap();
    let closed = format!("http://127.0.0.1:{}/token", closed_port());
    let settings = yaml(&peer, &entra, peer.submission_port, "TLS")
        .replace(&entra.token_url().to_string(), &closed);

    let run = diagnose(dir.path(), &settings, &[]).await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    run.assert_step("PASS", "ehlo");
    let token = run.assert_step("FAIL", "token");
    assert!(token.contains("could not be reached"), "{token}");
    assert!(
        token.contains("fix:   check featureSwitches.sendEmail.oAuthTokenEndpoint"),
        "{token}"
    );
    run.assert_step("SKIP", "auth");
}

#[tokio::test]
async fn a_silent_server_fails_at_the_greeting_with_the_implicit_tls_hint() {
    let entra = FakeEntra::start().await;
    entra.mount_token("unused", 3599).await;
    let (address, _server) = crate::peer::silent_server().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = yaml_for(
        "127.0.0.1",
        address.port(),
        "TLS",
        "relay@contoso.com",
        None,
        &entra,
    )
    .replace("commandTimeoutSeconds: 10", "commandTimeoutSeconds: 1");

    let run = diagnose(dir.path(), &settings, &[]).await;

    assert_eq!(run.code, 1, "{}", run.stdout);
    run.assert_step("PASS", "connect");
    let tls = run.assert_step("FAIL", "tls");
    assert!(tls.contains("no SMTP greeting from 127.0.0.1"), "{tls}");
    assert!(tls.contains("commandTimeoutSeconds"), "{tls}");
    assert!(
        tls.contains("use featureSwitches.sendEmail.smtpEncryption SSL there"),
        "{tls}"
    );
}

#[tokio::test]
async fn each_identity_is_checked_in_turn_or_one_alone_against_the_peers_two_mailboxes() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    entra
        .mount_token(
            &peer.mint_token(&peer.oauth_user, Duration::from_secs(3600)),
            3599,
        )
        .await;
    // The default logs in with XOAUTH2 as the OAuth mailbox; `basic` as the peer's other
    // mailbox, with a password.
    let yaml = format!(
        "{}  identities:\n    - name: basic\n      from: [\"{}\"]\n      smtpAuthentication: BASIC\n      smtpUsername: {}\n      smtpPassword: \"{}\"\n",
        yaml(&peer, &entra, peer.submission_port, "TLS"),
        peer.basic_user,
        peer.basic_user,
        peer.basic_password,
    );
    let dir = tempfile::tempdir().unwrap();

    let all = diagnose(dir.path(), &yaml, &[]).await;
    assert_eq!(all.code, 0, "{}", all.stdout);
    assert!(
        all.stdout
            .contains(&format!("identity default ({})", peer.oauth_user)),
        "{}",
        all.stdout
    );
    assert!(
        all.stdout
            .contains(&format!("identity basic ({})", peer.basic_user)),
        "{}",
        all.stdout
    );
    assert_eq!(all.stdout.matches("PASS auth").count(), 2, "{}", all.stdout);

    let one = diagnose(dir.path(), &yaml, &["--identity", "basic"]).await;
    assert_eq!(one.code, 0, "{}", one.stdout);
    assert!(!one.stdout.contains("identity default"), "{}", one.stdout);
    assert_eq!(one.stdout.matches("PASS auth").count(), 1, "{}", one.stdout);
    assert!(!one.stdout.contains(&peer.basic_password), "{}", one.stdout);

    let none = diagnose(dir.path(), &yaml, &["--identity", "nowhere"]).await;
    assert_eq!(none.code, 2, "{}", none.stdout);
    assert!(
        none.stdout.contains("the identities are default, basic"),
        "{}",
        none.stdout
    );
}
