//! `POST /mail` against the app with the outbox sender: the written `.eml` is parsed back.

use std::sync::Arc;

use base64::Engine;
use mail_parser::{MessageParser, MimeHeaders};
use mail_relay::delivery::{DeliveryError, MailSender, Outbox};
use mail_relay::message::OutgoingMail;
use mail_relay::smtp::{SmtpError, Stage};
use mail_relay::token::TokenError;
use serde_json::{Value, json};

use crate::fakes::FakeSender;
use crate::helpers::{
    TestApp, expect_problem, outbox_files, spawn_app, spawn_app_with, spawn_app_with_sender,
};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn fields(problem: &Value) -> Vec<&str> {
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["field"].as_str().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

fn minimal() -> Value {
    json!({"from": "sender@contoso.com", "to": "alice@example.com", "text": "hello"})
}

#[tokio::test]
async fn a_full_mail_is_written_and_parses_back_intact() {
    let app = spawn_app().await;
    let pdf: Vec<u8> = (0..=255u8).cycle().take(30_000).collect();
    let png = b"\x89PNG\r\n\x1a\n not really a png \x00\x01\x02".to_vec();
    let subject = "Grüße aus Köln – Ticket #4711 ✓ with a subject long enough to need folding over several lines";
    let filename = "Bericht März 2026 – endgültige Fassung mit einem sehr langen Dateinamen.pdf";
    let body = json!({
        "from": {"name": "Zoë Support", "address": "support@contoso.com"},
        "to": ["alice@example.com", {"name": "Bob Müller", "address": "bob@example.com"}],
        "cc": "carol@example.com",
        "bcc": ["hidden@example.com"],
        "replyTo": "helpdesk@contoso.com",
        "subject": subject,
        "text": "Hallo Alice,\n\nder Bericht ist angehängt.\n",
        "html": "<p>Hallo Alice,</p><img src=\"cid:logo@contoso\">",
        "attachments": [
            {"filename": filename, "contentType": "application/pdf", "content": b64(&pdf)},
            {"filename": "logo.png", "contentType": "image/png", "content": b64(&png), "contentId": "logo@contoso"},
        ],
        "headers": {"X-Ticket-Id": "4711", "In-Reply-To": "<ticket-4711@contoso.com>"},
        "priority": "high",
    });
    let response = app.post_mail(&body).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();

    let id = accepted["id"].as_str().unwrap();
    let raw = std::fs::read(app.outbox.path().join(format!("{id}.eml"))).unwrap();
    let message = MessageParser::default().parse(&raw).unwrap();

    assert_eq!(message.subject(), Some(subject));
    let from = message.from().unwrap().first().unwrap();
    assert_eq!(from.name(), Some("Zoë Support"));
    assert_eq!(from.address(), Some("support@contoso.com"));
    let to: Vec<_> = message
        .to()
        .unwrap()
        .iter()
        .map(|a| a.address().unwrap())
        .collect();
    assert_eq!(to, ["alice@example.com", "bob@example.com"]);
    assert_eq!(
        message.to().unwrap().iter().nth(1).unwrap().name(),
        Some("Bob Müller")
    );
    // Text parts travel in canonical form: CRLF line ends.
    assert_eq!(
        message.body_text(0).unwrap().replace("\r\n", "\n"),
        "Hallo Alice,\n\nder Bericht ist angehängt.\n"
    );
    assert!(message.body_html(0).unwrap().contains("cid:logo@contoso"));

    // The Message-ID in the response is the header's.
    let message_id = accepted["messageId"].as_str().unwrap();
    assert_eq!(format!("<{}>", message.message_id().unwrap()), message_id);
    assert_eq!(message_id, format!("<{id}@contoso.com>"));
    assert!(message.date().is_some());

    // Bcc: in the envelope (accepted recipients), nowhere in the headers.
    let recipients: Vec<&str> = accepted["acceptedRecipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        recipients,
        [
            "alice@example.com",
            "bob@example.com",
            "carol@example.com",
            "hidden@example.com"
        ]
    );
    assert!(message.bcc().is_none());
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..head_end]);
    assert!(!head.contains("hidden@example.com"), "{head}");

    // Attachments: bytes equal, the non-ASCII file name decoded equal, the inline image's Content-ID.
    let parts: Vec<_> = message.attachments().collect();
    assert_eq!(parts.len(), 2);
    let report = parts
        .iter()
        .find(|p| p.attachment_name() == Some(filename))
        .expect("the PDF under its name");
    assert_eq!(report.contents(), pdf.as_slice());
    let logo = parts
        .iter()
        .find(|p| p.content_id() == Some("logo@contoso"))
        .expect("the inline image with its Content-ID");
    assert_eq!(logo.contents(), png.as_slice());
    assert!(
        logo.content_disposition().unwrap().ctype() == "inline",
        "inline disposition"
    );

    assert_eq!(
        message.header_raw("X-Ticket-Id").map(str::trim),
        Some("4711")
    );
    assert_eq!(
        message.header_raw("X-Priority").map(str::trim),
        Some("1 (Highest)")
    );
    assert_eq!(
        message.header_raw("Importance").map(str::trim),
        Some("high")
    );
    assert!(
        message
            .header_raw("Reply-To")
            .unwrap()
            .contains("helpdesk@contoso.com")
    );
}

#[tokio::test]
async fn an_idn_domain_is_sent_as_punycode() {
    let app = spawn_app().await;
    let mut body = minimal();
    body["to"] = json!("jörg@bücher.example".replace("jö", "jo"));
    let response = app.post_mail(&body).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(
        accepted["acceptedRecipients"],
        json!(["jorg@xn--bcher-kva.example"])
    );
}

#[tokio::test]
async fn a_bad_address_is_named_by_its_index() {
    let app = spawn_app().await;
    let mut body = minimal();
    body["to"] = json!(["a@example.com", "b@example.com", "not-an-address"]);
    let response = app.post_mail(&body).await;
    let problem = expect_problem(response, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["to[2]"]);
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("not an e-mail address")
    );
    assert!(problem["detail"].as_str().unwrap().contains("to[2]"));
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn crlf_in_the_subject_is_refused_not_stripped() {
    let app = spawn_app().await;
    let mut body = minimal();
    body["subject"] = json!("Hello\r\nBcc: victim@example.com");
    let problem = expect_problem(app.post_mail(&body).await, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["subject"]);
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn line_breaks_in_names_filenames_and_headers_are_refused() {
    let app = spawn_app().await;
    let body = json!({
        "from": {"name": "Eve\nBcc: x@example.com", "address": "eve@contoso.com"},
        "to": "alice@example.com",
        "text": "x",
        "attachments": [{"filename": "a\r\n.txt", "contentType": "text/plain", "content": ""}],
        "headers": {"X-Note": "a\nb"},
    });
    let problem = expect_problem(app.post_mail(&body).await, 400, "invalid_request").await;
    assert_eq!(
        fields(&problem),
        ["from.name", "attachments[0].filename", "headers.X-Note"]
    );
}

#[tokio::test]
async fn more_recipients_than_the_limit_is_too_many_recipients() {
    let app = spawn_app().await;
    let to: Vec<String> = (0..400).map(|i| format!("to{i}@example.com")).collect();
    let bcc: Vec<String> = (0..101).map(|i| format!("bcc{i}@example.com")).collect();
    let mut body = minimal();
    body["to"] = json!(to);
    body["bcc"] = json!(bcc);
    let problem = expect_problem(app.post_mail(&body).await, 400, "too_many_recipients").await;
    assert!(problem["detail"].as_str().unwrap().contains("501"));
    assert_eq!(problem["errors"][0]["field"], "to");
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("at most 500")
    );
}

#[tokio::test]
async fn exactly_the_limit_is_accepted() {
    let app = spawn_app_with(|s| s.relay.limits.max_recipients = 3).await;
    let mut body = minimal();
    body["to"] = json!(["a@example.com", "b@example.com"]);
    body["cc"] = json!("c@example.com");
    assert_eq!(app.post_mail(&body).await.status(), 202);
}

#[tokio::test]
async fn no_recipient_is_invalid() {
    let app = spawn_app().await;
    let body = json!({"from": "sender@contoso.com", "text": "hello"});
    let problem = expect_problem(app.post_mail(&body).await, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["to"]);
}

#[tokio::test]
async fn malformed_json_is_invalid_request() {
    let app = spawn_app().await;
    let response = app
        .mail_request()
        .header("content-type", "application/json")
        .body(r#"{"from": "a@example.com", "to": "#)
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["body"]);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
}

#[tokio::test]
async fn an_unknown_field_is_named() {
    let app = spawn_app().await;
    let mut body = minimal();
    body["attachments"] =
        json!([{"filename": "a", "contentType": "text/plain", "content": "", "size": 3}]);
    let problem = expect_problem(app.post_mail(&body).await, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["attachments[0].size"]);

    let mut body = minimal();
    body["too"] = json!("x@example.com");
    let problem = expect_problem(app.post_mail(&body).await, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["too"]);
}

#[tokio::test]
async fn a_wrong_type_is_named() {
    let app = spawn_app().await;
    let mut body = minimal();
    body["to"] = json!(["a@example.com", 42]);
    let problem = expect_problem(app.post_mail(&body).await, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["to[1]"]);
}

#[tokio::test]
async fn a_wrong_content_type_is_415() {
    let app = spawn_app().await;
    let response = app
        .mail_request()
        .header("content-type", "text/plain")
        .body(minimal().to_string())
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, 415, "unsupported_media_type").await;
    assert!(problem["detail"].as_str().unwrap().contains("text/plain"));

    let response = app
        .mail_request()
        .body(minimal().to_string())
        .send()
        .await
        .unwrap();
    expect_problem(response, 415, "unsupported_media_type").await;
}

#[tokio::test]
async fn invalid_base64_is_named() {
    let app = spawn_app().await;
    let mut body = minimal();
    body["attachments"] = json!([
        {"filename": "ok.txt", "contentType": "text/plain", "content": "aGk="},
        {"filename": "bad.txt", "contentType": "text/plain", "content": "not base64!"},
    ]);
    let problem = expect_problem(app.post_mail(&body).await, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["attachments[1].content"]);
}

#[tokio::test]
async fn a_header_outside_the_allow_list_is_named() {
    let app = spawn_app().await;
    let mut body = minimal();
    body["headers"] = json!({"X-MS-Exchange-Organization-SCL": "-1", "Sender": "x@example.com"});
    let problem = expect_problem(app.post_mail(&body).await, 400, "invalid_request").await;
    assert_eq!(
        fields(&problem),
        ["headers.Sender", "headers.X-MS-Exchange-Organization-SCL"]
    );
}

#[tokio::test]
async fn a_mail_over_the_message_size_limit_is_413() {
    let app = spawn_app_with(|s| {
        s.relay.limits.max_message_bytes = 20_000;
        s.relay.limits.max_body_bytes = 1024 * 1024;
    })
    .await;
    let mut body = minimal();
    // 14,500 bytes pass the early estimate as base64 (19,336) but not once encoded with
    // line breaks, headers and MIME structure; a larger one fails the estimate.
    for size in [14_500usize, 100_000] {
        body["attachments"] = json!([{
            "filename": "big.bin", "contentType": "application/octet-stream",
            "content": b64(&vec![7u8; size]),
        }]);
        let problem = expect_problem(app.post_mail(&body).await, 413, "payload_too_large").await;
        assert!(problem["detail"].as_str().unwrap().contains("20000"));
    }
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn a_text_only_mail_is_a_single_part() {
    let app = spawn_app().await;
    let response = app.post_mail(&minimal()).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let raw = std::fs::read(
        app.outbox
            .path()
            .join(format!("{}.eml", accepted["id"].as_str().unwrap())),
    )
    .unwrap();
    let message = MessageParser::default().parse(&raw).unwrap();
    assert!(message.content_type().unwrap().ctype() == "text");
    assert_eq!(message.body_text(0).unwrap().trim_end(), "hello");
}

async fn spawn_with_sender(sender: Arc<dyn MailSender>) -> TestApp {
    spawn_app_with_sender(|_| {}, Some(sender)).await
}

#[tokio::test]
async fn a_transient_smtp_failure_is_503_with_retry_after() {
    let app = spawn_with_sender(Arc::new(FakeSender::failing(|| {
        DeliveryError::Smtp(SmtpError::rejected(
            Stage::MailFrom("sender@contoso.com".into()),
            421,
            "4.3.2 Service not available",
        ))
    })))
    .await;
    let response = app.post_mail(&minimal()).await;
    assert_eq!(response.headers()["retry-after"], "5");
    expect_problem(response, 503, "smtp_unavailable").await;
}

#[tokio::test]
async fn a_token_failure_is_503_token_unavailable() {
    let app = spawn_with_sender(Arc::new(FakeSender::failing(|| {
        DeliveryError::Token(TokenError::Timeout {
            endpoint: "https://login.example.test/token".into(),
            timeout: std::time::Duration::from_secs(15),
            setting: "mailRelay.token.requestTimeoutSeconds",
        })
    })))
    .await;
    let response = app.post_mail(&minimal()).await;
    assert!(response.headers().contains_key("retry-after"));
    let problem = expect_problem(response, 503, "token_unavailable").await;
    assert!(problem["detail"].as_str().unwrap().contains("access token"));
}

#[tokio::test]
async fn an_outbox_write_failure_is_500_without_the_path() {
    let blocker = tempfile::NamedTempFile::new().unwrap();
    // A directory below a regular file cannot be created.
    let dir = blocker.path().join("outbox");
    let app = spawn_with_sender(Arc::new(Outbox::new(dir.clone()))).await;
    let response = app.post_mail(&minimal()).await;
    let problem = expect_problem(response, 500, "internal_error").await;
    assert!(!problem.to_string().contains(dir.to_str().unwrap()));
}

/// One part of a hand-built multipart/form-data body.
pub(crate) struct FormPart<'a> {
    pub(crate) name: &'a str,
    pub(crate) filename: Option<&'a str>,
    pub(crate) content_type: &'a str,
    pub(crate) content: &'a [u8],
}

impl<'a> FormPart<'a> {
    /// The `mail` part: the JSON request.
    pub(crate) fn mail(json: &'a str) -> Self {
        Self {
            name: "mail",
            filename: None,
            content_type: "application/json",
            content: json.as_bytes(),
        }
    }

    /// A file part.
    pub(crate) fn file(
        name: &'a str,
        filename: &'a str,
        content_type: &'a str,
        content: &'a [u8],
    ) -> Self {
        Self {
            name,
            filename: Some(filename),
            content_type,
            content,
        }
    }
}

/// `len` bytes of every value in a scrambled order: no run a compressor or encoder could favour.
pub(crate) fn scrambled_bytes(len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

const BOUNDARY: &str = "mail-relay-test-boundary-7f3a";

fn form_body(parts: &[FormPart<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let filename = part
            .filename
            .map(|f| format!("; filename=\"{f}\""))
            .unwrap_or_default();
        body.extend_from_slice(
            format!(
                "Content-Disposition: form-data; name=\"{}\"{filename}\r\nContent-Type: {}\r\n\r\n",
                part.name, part.content_type
            )
            .as_bytes(),
        );
        body.extend_from_slice(part.content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

pub(crate) async fn post_form(app: &TestApp, parts: &[FormPart<'_>]) -> reqwest::Response {
    app.mail_request()
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(form_body(parts))
        .send()
        .await
        .expect("request failed")
}

#[tokio::test]
async fn a_10_mb_upload_as_form_data_arrives_intact() {
    let app = spawn_app_with(|s| s.relay.limits.max_body_bytes = 16 * 1024 * 1024).await;
    let big = scrambled_bytes(10 * 1024 * 1024);
    let logo = b"\x89PNG inline".to_vec();
    let mail = json!({
        "from": "sender@contoso.com", "to": "alice@example.com",
        "subject": "Großer Anhang", "html": "<img src=\"cid:logo\">",
    })
    .to_string();
    let response = post_form(
        &app,
        &[
            FormPart::mail(&mail),
            FormPart::file("file", "daten.bin", "application/octet-stream", &big),
            FormPart::file("cid:logo", "logo.png", "image/png", &logo),
        ],
    )
    .await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let raw = std::fs::read(
        app.outbox
            .path()
            .join(format!("{}.eml", accepted["id"].as_str().unwrap())),
    )
    .unwrap();
    let message = MessageParser::default().parse(&raw).unwrap();
    assert_eq!(message.subject(), Some("Großer Anhang"));
    let data = message
        .attachments()
        .find(|p| p.attachment_name() == Some("daten.bin"))
        .unwrap();
    assert_eq!(data.contents().len(), big.len());
    assert!(data.contents() == big.as_slice(), "the 10 MB differ");
    let inline = message
        .attachments()
        .find(|p| p.content_id() == Some("logo"))
        .unwrap();
    assert_eq!(inline.contents(), logo.as_slice());
}

#[tokio::test]
async fn a_form_without_the_mail_part_is_invalid() {
    let app = spawn_app().await;
    let response = post_form(
        &app,
        &[FormPart::file("file", "a.txt", "text/plain", b"hi")],
    )
    .await;
    let problem = expect_problem(response, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["mail"]);
}

#[tokio::test]
async fn form_parts_are_validated_like_json() {
    let app = spawn_app().await;
    let mail = json!({"from": "sender@contoso.com", "to": ["ok@example.com", "bad"], "text": "x"})
        .to_string();
    let response = post_form(
        &app,
        &[
            FormPart::mail(&mail),
            FormPart::file("cid:logo", "l.png", "image/png", b"x"),
        ],
    )
    .await;
    let problem = expect_problem(response, 400, "invalid_request").await;
    assert_eq!(fields(&problem), ["to[1]", "files[0].contentId"]);
}

#[tokio::test]
async fn a_form_upload_over_the_message_limit_is_413() {
    let app = spawn_app_with(|s| {
        s.relay.limits.max_message_bytes = 30_000;
        s.relay.limits.max_body_bytes = 1024 * 1024;
    })
    .await;
    let mail = minimal().to_string();
    let big = vec![0u8; 200_000];
    let response = post_form(
        &app,
        &[
            FormPart::mail(&mail),
            FormPart::file("file", "big.bin", "application/octet-stream", &big),
        ],
    )
    .await;
    let problem = expect_problem(response, 413, "payload_too_large").await;
    assert!(problem["detail"].as_str().unwrap().contains("30000"));
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn json_with_a_charset_parameter_is_accepted() {
    let app = spawn_app().await;
    let response = app
        .mail_request()
        .header("content-type", "application/json; charset=utf-8")
        .body(minimal().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

/// Fails, but only after longer than any test's request timeout.
fn too_late() -> DeliveryError {
    DeliveryError::Outbox {
        path: "unreachable".into(),
        source: std::io::Error::other("too late"),
    }
}

#[tokio::test]
async fn a_request_over_its_time_limit_is_503_timeout_naming_the_setting() {
    let app = spawn_app_with_sender(
        |s| s.relay.limits.request_timeout = std::time::Duration::from_millis(200),
        Some(Arc::new(
            FakeSender::failing(too_late).delayed(std::time::Duration::from_secs(10)),
        )),
    )
    .await;
    let response = app.post_mail(&minimal()).await;
    assert!(response.headers().contains_key("retry-after"));
    let problem = expect_problem(response, 503, "timeout").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("200ms") && detail.contains("requestTimeoutSeconds"),
        "{detail}"
    );
}

/// What no mail may carry: a header line over RFC 5322's 998 octets, or a CR or LF that is
/// not part of a CRLF.
fn faults_of(mail: &OutgoingMail) -> Vec<String> {
    let bytes = &mail.formatted;
    let mut faults = Vec::new();
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(bytes.len());
    let longest = bytes[..head_end]
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line).len())
        .max()
        .unwrap_or_default();
    if longest > 998 {
        faults.push(format!("{}: a header line of {longest} octets", mail.id));
    }
    let lone = bytes.iter().enumerate().any(|(i, &b)| {
        (b == b'\r' && bytes.get(i + 1) != Some(&b'\n'))
            || (b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
    });
    if lone {
        faults.push(format!("{}: a lone CR or LF", mail.id));
    }
    faults
}

/// A generated corpus of requests, valid and not: quoted local parts, IDN domains, comments,
/// long words, lone CRs, odd content types and headers.
mod corpus {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn local_part() -> BoxedStrategy<String> {
        prop_oneof![
            "[a-z0-9._+-]{1,12}",
            "\"[ -~]{0,12}\"",
            "\"[a-z]{1,8}\"",
            "[a-z]{1,5}\\([ -~]{0,6}\\)",
            "(?s).{0,12}",
        ]
        .boxed()
    }

    fn any_domain() -> BoxedStrategy<String> {
        prop_oneof![
            4 => Just("contoso.com".to_owned()),
            1 => "[a-z0-9-]{1,10}\\.(com|test|example)",
            1 => "(bücher|пример|例え|straße)\\.(example|de)",
            1 => "[a-z]{1,5}\\([a-z]{0,5}\\)\\.com",
            1 => "\\[[0-9.]{1,15}\\]",
            1 => "(?s).{0,12}",
        ]
        .boxed()
    }

    /// Mostly a plain address at `domain`, else anything.
    fn address_at(domain: &'static str) -> BoxedStrategy<String> {
        prop_oneof![
            6 => "[a-z]{1,8}".prop_map(move |l| format!("{l}@{domain}")),
            1 => "\"[ -~]{1,8}\"".prop_map(move |l| format!("{l}@{domain}")),
            1 => (local_part(), any_domain()).prop_map(|(l, d)| format!("{l}@{d}")),
        ]
        .boxed()
    }

    fn text() -> BoxedStrategy<String> {
        prop_oneof![
            6 => "[ -~]{0,40}",
            1 => "[!-~]{0,2048}",
            1 => "([!-~]{0,400} ){0,5}",
            1 => "\\PC{0,80}",
            1 => "[a.\r\n]{0,30}",
            1 => "(?s).{0,40}",
        ]
        .boxed()
    }

    fn mailbox(domain: &'static str) -> BoxedStrategy<Value> {
        prop_oneof![
            2 => address_at(domain).prop_map(Value::from),
            1 => (text(), address_at(domain))
                .prop_map(|(name, address)| json!({"name": name, "address": address})),
        ]
        .boxed()
    }

    fn content_type() -> BoxedStrategy<String> {
        prop_oneof![
            6 => Just("application/pdf".to_owned()),
            1 => "application/x-[a-z]{0,600}",
            1 => "text/plain; charset=[a-z0-9-]{0,300}",
            1 => "multipart/(mixed|related)",
            1 => "[ -~]{0,30}",
            1 => "(?s).{0,20}",
        ]
        .boxed()
    }

    fn attachment() -> BoxedStrategy<Value> {
        (
            prop_oneof![4 => "[a-z]{1,8}\\.pdf", 1 => text()],
            content_type(),
            prop_oneof![
                6 => Just("aGVsbG8=".to_owned()),
                1 => "[A-Za-z0-9+/=]{0,12}",
                1 => "(?s).{0,8}",
            ],
            prop_oneof![
                6 => Just(None),
                1 => "[a-z]{1,8}".prop_map(Some),
                1 => "(?s).{0,10}".prop_map(Some),
            ],
        )
            .prop_map(|(filename, content_type, content, content_id)| {
                let mut a =
                    json!({"filename": filename, "contentType": content_type, "content": content});
                if let Some(id) = content_id {
                    a["contentId"] = Value::from(id);
                }
                a
            })
            .boxed()
    }

    fn header() -> BoxedStrategy<(String, String)> {
        prop_oneof![
            6 => ("X-[A-Za-z0-9-]{1,20}", text()),
            1 => (
                "(In-Reply-To|References|List-Id|List-Unsubscribe|Auto-Submitted|Keywords|Comments)",
                text(),
            ),
            1 => ("[ -~]{1,12}", text()),
            1 => (
                Just("References".to_owned()),
                "<[a-z]{1,1100}@example.com>( <[a-z]{1,8}@x>){0,3}",
            ),
            1 => (Just("List-Unsubscribe".to_owned()), "<https://[a-z/]{1,1100}>"),
        ]
        .boxed()
    }

    pub(super) fn request() -> BoxedStrategy<Value> {
        (
            mailbox("contoso.com"),
            proptest::collection::vec(mailbox("example.com"), 0..4),
            proptest::collection::vec(mailbox("example.com"), 0..2),
            proptest::option::of(text()),
            proptest::option::weighted(0.8, text()),
            proptest::option::of(text()),
            proptest::collection::vec(attachment(), 0..3),
            proptest::collection::btree_map(header().prop_map(|(n, _)| n), text(), 0..2),
            proptest::collection::vec(header(), 0..2),
            prop_oneof![4 => Just("normal"), 1 => Just("high"), 1 => Just("urgent")],
        )
            .prop_map(
                |(
                    from,
                    to,
                    reply_to,
                    subject,
                    text,
                    html,
                    attachments,
                    mut headers,
                    more,
                    priority,
                )| {
                    headers.extend(more);
                    let mut body = json!({
                        "from": from, "to": to, "replyTo": reply_to, "attachments": attachments,
                        "headers": headers, "priority": priority,
                    });
                    for (key, value) in [("subject", subject), ("text", text), ("html", html)] {
                        if let Some(value) = value {
                            body[key] = Value::from(value);
                        }
                    }
                    body
                },
            )
            .boxed()
    }
}

#[tokio::test]
async fn no_request_of_a_generated_corpus_gets_a_5xx() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    // tracing caches each callsite's interest for the whole process, from the subscribers alive
    // when the callsite is first reached. Reached first from this thread (no subscriber) while
    // another test's info-level capture is alive, a debug callsite was cached as never, and that
    // test's debug-level capture then missed it (observe::a_users_address_is_logged_only_at_debug_level).
    // A subscriber here that takes everything keeps every interest at least "sometimes".
    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
    let sender = Arc::new(FakeSender::accepting());
    let app = spawn_with_sender(sender.clone()).await;
    let strategy = corpus::request();
    let mut runner = TestRunner::deterministic();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..400 {
        let body = strategy.new_tree(&mut runner).unwrap().current();
        let response = app.post_mail(&body).await;
        let status = response.status();
        assert!(
            !status.is_server_error(),
            "{status} for {body}: {}",
            response.text().await.unwrap()
        );
        if status.is_success() {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    // The corpus reaches the builder and the sender, not only validation.
    assert!(
        accepted >= 20 && refused >= 20,
        "{accepted} accepted, {refused} refused"
    );
    let faults: Vec<String> = sender.mails().iter().flat_map(faults_of).collect();
    assert!(faults.is_empty(), "{faults:#?}");
}

#[tokio::test]
async fn a_quoted_local_part_that_needs_its_quotes_is_400_naming_the_field() {
    let app = spawn_app().await;
    for (from, field) in [
        (json!("\"a b\"@contoso.com"), "from"),
        (
            json!({"name": "X", "address": "\"x>y\"@contoso.com"}),
            "from.address",
        ),
    ] {
        let body = json!({"from": from, "to": "alice@example.com", "text": "hi"});
        let problem = expect_problem(app.post_mail(&body).await, 400, "invalid_request").await;
        assert_eq!(fields(&problem), [field], "{problem:#}");
    }
    assert!(outbox_files(&app).is_empty());
}
