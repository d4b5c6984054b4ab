//! The whole path: HTTP request -> caller -> send-as -> MIME -> token from a fake Entra ID ->
//! XOAUTH2 over STARTTLS to the real Postfix + Dovecot peer -> the Maildir, read back.

use std::time::Duration;

use base64::Engine;
use mail_parser::{MessageParser, MimeHeaders};
use mail_relay::config::Settings;
use serde_json::{Value, json};

use crate::entra::FakeEntra;
use crate::helpers::{TestApp, expect_problem, peer_oauth_settings, spawn_built};
use crate::peer::Peer;
use crate::require_peer;

/// Settings for the real thing: MS_OAUTH to the peer's STARTTLS port, tokens from `entra`.
fn relay_settings(peer: &Peer, entra: &FakeEntra) -> Settings {
    let mut settings = peer_oauth_settings(peer, entra.oauth_settings());
    settings.relay.smtp.send_deadline = Duration::from_secs(20);
    settings.relay.limits.max_body_bytes = 4 * 1024 * 1024;
    settings
}

/// `peer_oauth_settings` and its YAML twin, the settings file the process tests start the
/// binary with, send the same way: one server, login, credential, token endpoint, CA and key.
#[tokio::test]
async fn the_yaml_twin_loads_the_settings_peer_oauth_settings_builds() {
    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let built = peer_oauth_settings(&peer, entra.oauth_settings());
    let yaml = crate::process::smtp_yaml(
        &peer,
        peer.submission_port,
        std::net::Ipv4Addr::LOCALHOST,
        &entra,
        "",
        "",
    );
    let loaded = mail_relay::config::load_str(&yaml, "twin.yml", &[])
        .unwrap_or_else(|e| panic!("the twin does not load: {e}"))
        .settings;
    assert_eq!(
        format!("{:?}", loaded.send_email),
        format!("{:?}", built.send_email)
    );
    assert_eq!(loaded.relay.smtp.ca_file, built.relay.smtp.ca_file);
    assert_eq!(
        format!("{:?}", loaded.relay.auth.api_keys),
        format!("{:?}", built.relay.auth.api_keys)
    );
}

/// A fake Entra ID serving tokens the peer accepts, and a relay using it.
async fn relay_with_good_tokens(peer: &Peer) -> (TestApp, FakeEntra) {
    let entra = FakeEntra::serving_peer_tokens(peer).await;
    let app = spawn_built(relay_settings(peer, &entra)).await;
    (app, entra)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn delivered(peer: &Peer, message_id: &str) -> Vec<u8> {
    peer.wait_for_message(message_id, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!(
                "{message_id} was not delivered to {}",
                peer.maildir.display()
            )
        })
}

#[tokio::test]
async fn a_mail_posted_to_the_relay_arrives_intact_over_xoauth2() {
    let peer = require_peer!();
    let (app, entra) = relay_with_good_tokens(&peer).await;

    let report: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let logo = b"\x89PNG\r\n\x1a\n\x00\x00 not a real png".to_vec();
    let subject = "Übersicht für Jürgen – Rechnung №42 ✓";
    let body = json!({
        "from": {"name": "Zoë from Billing", "address": "billing@contoso.test"},
        "to": ["alice@contoso.test", {"name": "Bob Müller", "address": "bob@contoso.test"}],
        "bcc": "audit@contoso.test",
        "subject": subject,
        "text": "Hallo Jürgen,\nanbei die Rechnung.",
        "html": "<p>Hallo J&uuml;rgen,</p><img src=\"cid:logo\">",
        "attachments": [
            {"filename": "Rechnung März.pdf", "contentType": "application/pdf", "content": b64(&report)},
            {"filename": "logo.png", "contentType": "image/png", "content": b64(&logo), "contentId": "logo"}
        ]
    });
    let response = app.post_mail(&body).await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["acceptedRecipients"].as_array().unwrap().len(), 3);
    let message_id = accepted["messageId"].as_str().unwrap();

    let raw = delivered(&peer, message_id.trim_matches(['<', '>'])).await;
    let message = MessageParser::default().parse(&raw).unwrap();
    assert_eq!(message.subject(), Some(subject));
    assert_eq!(
        message.message_id(),
        Some(message_id.trim_matches(['<', '>']))
    );
    assert!(message.header("Bcc").is_none(), "Bcc must not be a header");
    assert!(message.body_text(0).unwrap().contains("anbei die Rechnung"));
    let pdf = message
        .attachments()
        .find(|a| a.attachment_name() == Some("Rechnung März.pdf"))
        .unwrap();
    assert_eq!(pdf.contents(), report.as_slice());
    let inline = message
        .attachments()
        .find(|a| a.content_id() == Some("logo"))
        .unwrap();
    assert_eq!(inline.contents(), logo.as_slice());
    assert_eq!(entra.fetch_count().await, 1, "one token for the mail");
}

#[tokio::test]
async fn a_10_mb_file_uploaded_as_form_data_arrives_intact_through_the_smtp_server() {
    use crate::mail::{FormPart, post_form, scrambled_bytes};

    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let mut settings = relay_settings(&peer, &entra);
    settings.relay.limits.max_body_bytes = 16 * 1024 * 1024;
    let app = spawn_built(settings).await;
    let big = scrambled_bytes(10 * 1024 * 1024);
    let mail = json!({"from": "noreply@contoso.test", "to": "alice@contoso.test",
                      "subject": "10 MB upload", "text": "see the file"})
    .to_string();
    let parts = [
        FormPart::mail(&mail),
        FormPart::file("file", "messwerte.bin", "application/octet-stream", &big),
    ];

    let response = post_form(&app, &parts).await;

    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let accepted: Value = response.json().await.unwrap();
    let message_id = accepted["messageId"]
        .as_str()
        .unwrap()
        .trim_matches(['<', '>']);
    let raw = delivered(&peer, message_id).await;
    let message = MessageParser::default().parse(&raw).unwrap();
    let file = message
        .attachments()
        .find(|a| a.attachment_name() == Some("messwerte.bin"))
        .expect("the file is attached");
    assert!(
        file.contents() == big.as_slice(),
        "the 10 MB file changed on the way"
    );
}

#[tokio::test]
async fn many_mails_share_one_token() {
    let peer = require_peer!();
    let (app, entra) = relay_with_good_tokens(&peer).await;
    let sends = (0..20).map(|i| {
        let body = json!({"from": "noreply@contoso.test", "to": "alice@contoso.test",
                          "subject": format!("shared token {i}"), "text": "hi"});
        let app = &app;
        async move { app.post_mail(&body).await.status() }
    });
    let statuses = futures_util::future::join_all(sends).await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    assert_eq!(entra.fetch_count().await, 1);
}

#[tokio::test]
async fn a_token_the_server_refuses_is_replaced_and_the_mail_still_arrives() {
    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    // The first token Entra hands out is one the SMTP server will not accept.
    entra
        .mount_token_once(
            &peer.mint_token_wrong_key(&peer.oauth_user, Duration::from_secs(3600)),
            3599,
        )
        .await;
    let app = spawn_built(relay_settings(&peer, &entra)).await;
    let body = json!({"from": "noreply@contoso.test", "to": "alice@contoso.test",
                      "subject": "after a refused token", "text": "hi"});
    let response = app.post_mail(&body).await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let message_id: Value = response.json().await.unwrap();
    delivered(
        &peer,
        message_id["messageId"]
            .as_str()
            .unwrap()
            .trim_matches(['<', '>']),
    )
    .await;
    assert_eq!(
        entra.fetch_count().await,
        2,
        "the refused token was dropped and replaced once"
    );
}

#[tokio::test]
async fn exchange_send_as_denied_is_403_and_remembered() {
    let peer = require_peer!();
    let (app, _entra) = relay_with_good_tokens(&peer).await;
    let marker = format!("sendas-{}", uuid::Uuid::new_v4());
    let body = json!({"from": peer.sendas_denied, "to": "alice@contoso.test", "subject": marker, "text": "hi"});

    let first = expect_problem(app.post_mail(&body).await, 403, "send_as_denied").await;
    let detail = first["detail"].as_str().unwrap();
    assert!(
        detail.contains("5.2.252") && detail.contains("Add-RecipientPermission"),
        "{detail}"
    );
    assert!(
        detail.contains(&peer.sendas_denied) && detail.contains(&peer.oauth_user),
        "{detail}"
    );

    // The second attempt fails fast, without uploading the message again.
    let second = expect_problem(app.post_mail(&body).await, 403, "send_as_denied").await;
    assert!(
        second["detail"].as_str().unwrap().contains("moments ago"),
        "{second:#}"
    );
    assert!(peer.find_messages(&marker).is_empty());
}

#[tokio::test]
async fn a_wrong_client_secret_is_503_token_unavailable_naming_the_fix() {
    let peer = require_peer!();
    let entra = FakeEntra::start().await;
    entra.mount_error(7000215).await;
    let app = spawn_built(relay_settings(&peer, &entra)).await;
    let body = json!({"from": "noreply@contoso.test", "to": "alice@contoso.test", "subject": "no token", "text": "hi"});
    let problem = expect_problem(app.post_mail(&body).await, 503, "token_unavailable").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("7000215") && detail.contains("value"),
        "{detail}"
    );
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), 503, "readiness reflects the token cache");
}

#[tokio::test]
async fn the_smtp_server_down_is_a_prompt_503_with_retry_after() {
    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let mut settings = relay_settings(&peer, &entra);
    settings.send_email.smtp_port = crate::peer::closed_port();
    settings.relay.smtp.send_deadline = Duration::from_secs(2);
    let app = spawn_built(settings).await;
    let body = json!({"from": "noreply@contoso.test", "to": "alice@contoso.test", "subject": "down", "text": "hi"});
    let started = std::time::Instant::now();
    let response = app.post_mail(&body).await;
    assert!(response.headers().contains_key("retry-after"));
    expect_problem(response, 503, "smtp_unavailable").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered within the deadline"
    );
}

#[tokio::test]
async fn a_from_outside_the_keys_list_never_reaches_the_server() {
    let peer = require_peer!();
    let (app, entra) = relay_with_good_tokens(&peer).await;
    let marker = format!("outside-{}", uuid::Uuid::new_v4());
    // The test key may send as *@contoso.test, *@contoso.com and *@example.com only.
    let body = json!({"from": "ceo@fabrikam.test", "to": "alice@contoso.test", "subject": marker, "text": "hi"});
    expect_problem(app.post_mail(&body).await, 403, "send_as_denied").await;
    assert!(peer.find_messages(&marker).is_empty());
    let log = std::fs::read_to_string(&peer.log).unwrap_or_default();
    assert!(
        !log.contains("ceo@fabrikam.test"),
        "the peer saw the refused sender"
    );
    assert_eq!(entra.fetch_count().await, 0, "no token was even fetched");
}

#[tokio::test]
async fn an_idempotent_retry_reaches_the_server_once() {
    let peer = require_peer!();
    let (app, _entra) = relay_with_good_tokens(&peer).await;
    let marker = format!("idempotent-{}", uuid::Uuid::new_v4());
    let body = json!({"from": "noreply@contoso.test", "to": "alice@contoso.test", "subject": marker, "text": "hi"});
    let key = uuid::Uuid::new_v4().to_string();
    let mut answers = Vec::new();
    for _ in 0..3 {
        let response = app.post_mail_with_key(&key, &body).await;
        assert_eq!(response.status(), 202);
        answers.push(response.json::<Value>().await.unwrap());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    let id = answers[0]["messageId"]
        .as_str()
        .unwrap()
        .trim_matches(['<', '>']);
    delivered(&peer, id).await;
    // Give a wrongly repeated delivery time to land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(peer.find_messages(&marker).len(), 1);
}

#[tokio::test]
async fn a_rate_limited_request_never_reaches_the_server() {
    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let mut settings = relay_settings(&peer, &entra);
    settings.relay.rate_limits.mailbox_messages_per_minute = std::num::NonZeroU32::new(1);
    let app = spawn_built(settings).await;
    let first = format!("limited-first-{}", uuid::Uuid::new_v4());
    let second = format!("limited-second-{}", uuid::Uuid::new_v4());
    let mail = |subject: &str| json!({"from": "noreply@contoso.test", "to": "alice@contoso.test", "subject": subject, "text": "hi"});
    let accepted: Value = app.post_mail(&mail(&first)).await.json().await.unwrap();
    let response = app.post_mail(&mail(&second)).await;
    assert!(response.headers().contains_key("retry-after"));
    expect_problem(response, 429, "rate_limited").await;
    delivered(
        &peer,
        accepted["messageId"]
            .as_str()
            .unwrap()
            .trim_matches(['<', '>']),
    )
    .await;
    assert!(peer.find_messages(&second).is_empty());
}

#[tokio::test]
async fn a_6_mb_json_attachment_and_a_text_of_dotted_lines_arrive_intact_through_the_smtp_server() {
    use crate::mail::scrambled_bytes;

    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let mut settings = relay_settings(&peer, &entra);
    settings.relay.limits.max_body_bytes = 12 * 1024 * 1024;
    let app = spawn_built(settings).await;
    let big = scrambled_bytes(6 * 1024 * 1024);
    let small = b"\x00.\r\n.\r\n".to_vec();
    // Every line starts with a dot, over several of the slices a large message goes out in:
    // dot-stuffing must hold across their edges.
    let text: String = (0..40_000).map(|i| format!(".line {i}\n")).collect();
    let body = json!({
        "from": "noreply@contoso.test", "to": "alice@contoso.test",
        "subject": "6 MB as JSON", "text": text,
        "attachments": [
            {"filename": "messwerte.bin", "contentType": "application/octet-stream", "content": b64(&big)},
            {"filename": "dots.bin", "contentType": "application/octet-stream", "content": b64(&small)},
        ]
    });

    let response = app.post_mail(&body).await;

    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let accepted: Value = response.json().await.unwrap();
    let message_id = accepted["messageId"]
        .as_str()
        .unwrap()
        .trim_matches(['<', '>']);
    let raw = delivered(&peer, message_id).await;
    let message = MessageParser::default().parse(&raw).unwrap();
    let file = |name: &str| {
        message
            .attachments()
            .find(|a| a.attachment_name() == Some(name))
            .unwrap_or_else(|| panic!("{name} is attached"))
            .contents()
            .to_vec()
    };
    assert!(
        file("messwerte.bin") == big,
        "the 6 MB file changed on the way"
    );
    assert_eq!(file("dots.bin"), small);
    let arrived = message.body_text(0).unwrap().replace("\r\n", "\n");
    assert_eq!(arrived.trim_end(), text.trim_end());
}
