//! `mailRelay.delivery.mode: graph` against the fake Graph and the fake Entra token endpoint:
//! the same API and the same message as over SMTP, and every Graph error class answered as the
//! SMTP path answers the same meaning.

use std::time::{Duration, Instant};

use mail_relay::config::{Delivery, Settings, SmtpAuthentication};
use mail_relay::diagnose::{SendTest, Status, Step};
use serde_json::json;

use crate::entra::{FakeEntra, field, form_fields};
use crate::graph::{FakeGraph, Mailbox, SCOPE, Scripted};
use crate::helpers::{TestApp, expect_problem, spawn_built, test_settings};

const MAILBOX: &str = "relay@contoso.com";

struct Setup {
    app: TestApp,
    graph: FakeGraph,
    entra: FakeEntra,
}

fn settings(graph: &FakeGraph, entra: &FakeEntra) -> Settings {
    let mut settings = test_settings(std::env::temp_dir());
    settings.relay.delivery = Delivery::Graph;
    settings.relay.graph.base_url = graph.base_url();
    settings.relay.limits.max_body_bytes = 16 * 1024 * 1024;
    settings.relay.smtp.send_deadline = Duration::from_secs(10);
    settings.send_email.smtp_authentication = SmtpAuthentication::MsOAuth {
        username: MAILBOX.parse().unwrap(),
        oauth: entra.oauth_settings(),
    };
    settings
}

/// A fake Graph that knows [`MAILBOX`] as `mailbox` says, and a fake Entra handing out its
/// tokens with `roles`.
async fn fakes(mailbox: Mailbox, roles: &[&str]) -> (FakeGraph, FakeEntra) {
    let graph = FakeGraph::start(MAILBOX, mailbox).await;
    let entra = FakeEntra::start().await;
    entra
        .mount_token(&graph.mint_token(roles, Duration::from_secs(3600)), 3599)
        .await;
    (graph, entra)
}

/// An instance sending through a fake Graph that knows [`MAILBOX`] as `mailbox` says, with
/// tokens carrying `roles`.
async fn setup(mailbox: Mailbox, roles: &[&str]) -> Setup {
    let (graph, entra) = fakes(mailbox, roles).await;
    let app = spawn_built(settings(&graph, &entra)).await;
    Setup { app, graph, entra }
}

/// The body of a `202`, failing with the problem otherwise.
async fn accepted(response: reqwest::Response) -> serde_json::Value {
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{body:#}");
    body
}

fn mail(from: &str) -> serde_json::Value {
    json!({
        "from": from,
        "to": [{"name": "Ann Example", "address": "ann@example.com"}],
        "cc": "cc@example.com",
        "bcc": "hidden@example.com",
        "subject": "Graph test",
        "text": "Sent through Microsoft Graph.",
        "attachments": [{"filename": "a.txt", "contentType": "text/plain", "content": "aGVsbG8="}],
    })
}

#[tokio::test]
async fn a_mail_goes_out_through_graph_as_the_relays_own_mime_with_bcc_known_only_to_graph() {
    let s = setup(Mailbox::default(), &["Mail.Send"]).await;
    let body = accepted(s.app.post_mail(&mail(MAILBOX)).await).await;

    let delivered = s.graph.deliveries();
    assert_eq!(delivered.len(), 1);
    let d = &delivered[0];
    assert_eq!(d.mailbox, MAILBOX);
    assert_eq!(
        d.recipients,
        ["ann@example.com", "cc@example.com", "hidden@example.com"]
    );
    let text = String::from_utf8(d.mime.clone()).unwrap();
    let message_id = body["messageId"].as_str().unwrap();
    assert!(
        text.contains(&format!("Message-ID: {message_id}")),
        "{text}"
    );
    assert!(text.contains("Subject: Graph test"), "{text}");
    assert!(
        !text.contains("hidden@example.com"),
        "Bcc delivered: {text}"
    );
    // Graph received the relay's message with one Bcc line in front, nothing else changed.
    let received = String::from_utf8(d.received.clone()).unwrap();
    assert_eq!(
        received.strip_prefix("Bcc: hidden@example.com\r\n"),
        Some(text.as_str())
    );
    assert_eq!(s.graph.maildir_files().len(), 1);

    let seen = s.graph.seen();
    assert_eq!(seen[0].content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        seen[0].client_request_id.as_deref(),
        body["id"].as_str(),
        "the mail's id is Graph's client-request-id"
    );
    // The token was asked for Graph's scope, not Exchange's.
    let requests = s.entra.requests().await;
    assert_eq!(requests.len(), 1);
    assert_eq!(field(&form_fields(&requests[0]), "scope"), Some(SCOPE));
}

#[tokio::test]
async fn graph_refusals_answer_with_the_smtp_paths_codes_for_the_same_meaning() {
    // The fake's own checks: Send As, the Mail.Send role, the mailbox.
    let s = setup(Mailbox::default(), &["Mail.Send"]).await;
    let body = expect_problem(
        s.app.post_mail(&mail("ceo@contoso.com")).await,
        403,
        "send_as_denied",
    )
    .await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("ErrorSendAsDenied") && detail.contains("request-id"),
        "{detail}"
    );

    let s = setup(Mailbox::default(), &["User.Read.All"]).await;
    let body = expect_problem(
        s.app.post_mail(&mail(MAILBOX)).await,
        502,
        "smtp_auth_failed",
    )
    .await;
    let text = body.to_string();
    assert!(
        text.contains("ErrorAccessDenied") && text.contains("Mail.Send"),
        "{text}"
    );

    let scoped_out = Mailbox {
        out_of_scope: true,
        ..Mailbox::default()
    };
    let s = setup(scoped_out, &["Mail.Send"]).await;
    let body = expect_problem(
        s.app.post_mail(&mail(MAILBOX)).await,
        502,
        "smtp_auth_failed",
    )
    .await;
    assert!(body.to_string().contains("CustomResourceScope"), "{body}");

    let on_premises = Mailbox {
        not_enabled: true,
        ..Mailbox::default()
    };
    let s = setup(on_premises, &["Mail.Send"]).await;
    let body = expect_problem(
        s.app.post_mail(&mail(MAILBOX)).await,
        503,
        "smtp_unavailable",
    )
    .await;
    assert!(
        body.to_string().contains("MailboxNotEnabledForRESTAPI"),
        "{body}"
    );
    // Not one of them was tried twice.
    assert_eq!(s.graph.seen().len(), 1);
}

#[tokio::test]
async fn scripted_graph_errors_map_to_their_answers_and_none_is_sent_twice() {
    let cases: [(u16, &str, u16, &str); 4] = [
        (403, "ErrorQuotaExceeded", 429, "rate_limited"),
        (400, "ErrorMessageSizeExceeded", 413, "payload_too_large"),
        (
            400,
            "ErrorMimeContentInvalidBase64String",
            502,
            "smtp_rejected",
        ),
        (404, "ResourceNotFound", 503, "smtp_unavailable"),
    ];
    for (status, code, want_status, want_code) in cases {
        let s = setup(Mailbox::default(), &["Mail.Send"]).await;
        s.graph.script(Scripted::error(status, code, "scripted"));
        let body = expect_problem(
            s.app.post_mail(&mail(MAILBOX)).await,
            want_status,
            want_code,
        )
        .await;
        assert!(body["detail"].as_str().unwrap().contains(code), "{body}");
        assert_eq!(s.graph.seen().len(), 1, "{code} was retried");
        assert!(s.graph.deliveries().is_empty());
    }
}

#[tokio::test]
async fn a_5xx_after_the_request_went_out_is_outcome_unknown_and_never_resent() {
    for status in [504u16, 500] {
        let s = setup(Mailbox::default(), &["Mail.Send"]).await;
        // Graph has been seen to answer 504 and deliver anyway.
        s.graph.script(Scripted {
            deliver: true,
            ..Scripted::error(status, "UnknownError", "")
        });
        let body = expect_problem(
            s.app.post_mail(&mail(MAILBOX)).await,
            502,
            "smtp_outcome_unknown",
        )
        .await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("do not send it again"),
            "{body}"
        );
        assert_eq!(s.graph.seen().len(), 1, "{status} was resent");
        assert_eq!(s.graph.deliveries().len(), 1);
    }
}

#[tokio::test]
async fn only_202_is_success_and_a_200_to_a_send_is_outcome_unknown() {
    let s = setup(Mailbox::default(), &["Mail.Send"]).await;
    // Graph has been seen to answer 200 to a MIME send it did not take.
    s.graph.script(Scripted::error(200, "", ""));
    let body = expect_problem(
        s.app.post_mail(&mail(MAILBOX)).await,
        502,
        "smtp_outcome_unknown",
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not 202 Accepted"),
        "{body}"
    );
    assert_eq!(s.graph.seen().len(), 1, "resent after a 200");
}

#[tokio::test]
async fn a_timeout_after_the_request_went_out_is_outcome_unknown() {
    let (graph, entra) = fakes(Mailbox::default(), &["Mail.Send"]).await;
    let mut settings = settings(&graph, &entra);
    settings.relay.graph.request_timeout = Duration::from_secs(1);
    let app = spawn_built(settings).await;
    graph.script(Scripted {
        delay: Duration::from_secs(3),
        ..Scripted::error(503, "ServiceUnavailable", "late")
    });
    let started = Instant::now();
    expect_problem(
        app.post_mail(&mail(MAILBOX)).await,
        502,
        "smtp_outcome_unknown",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the request timeout did not cut it"
    );
}

#[tokio::test]
async fn throttling_is_waited_out_within_the_deadline_after_graphs_retry_after() {
    let s = setup(Mailbox::default(), &["Mail.Send"]).await;
    for code in ["ApplicationThrottled", "MailboxConcurrency"] {
        s.graph.script(Scripted {
            retry_after: Some(1),
            ..Scripted::error(
                429,
                code,
                "Application is over its MailboxConcurrency limit.",
            )
        });
    }
    s.graph.script(Scripted {
        retry_after: Some(1),
        ..Scripted::error(503, "ServiceUnavailable", "Service unavailable")
    });
    let started = Instant::now();
    accepted(s.app.post_mail(&mail(MAILBOX)).await).await;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "Retry-After not honoured"
    );
    assert_eq!(s.graph.seen().len(), 4);
    assert_eq!(s.graph.deliveries().len(), 1);

    // A wait past the deadline ends the send with Graph's own Retry-After.
    s.graph.script(Scripted {
        retry_after: Some(120),
        ..Scripted::error(429, "ApplicationThrottled", "throttled")
    });
    let response = s.app.post_mail(&mail(MAILBOX)).await;
    assert_eq!(response.headers()["retry-after"], "120");
    expect_problem(response, 503, "smtp_unavailable").await;
}

#[tokio::test]
async fn a_token_graph_calls_invalid_is_fetched_anew_once() {
    let s = setup(Mailbox::default(), &["Mail.Send"]).await;
    s.graph.script(Scripted::error(
        401,
        "InvalidAuthenticationToken",
        "Lifetime validation failed, the token is expired.",
    ));
    accepted(s.app.post_mail(&mail(MAILBOX)).await).await;
    assert_eq!(s.entra.fetch_count().await, 2, "one refetch");
    assert_eq!(s.graph.deliveries().len(), 1);

    // Refused again with a fresh token: the login is refused, no third fetch.
    for _ in 0..2 {
        s.graph.script(Scripted::error(
            401,
            "InvalidAuthenticationToken",
            "Access token validation failure.",
        ));
    }
    expect_problem(
        s.app.post_mail(&mail(MAILBOX)).await,
        502,
        "smtp_auth_failed",
    )
    .await;
    assert_eq!(s.entra.fetch_count().await, 3);
}

#[tokio::test]
async fn a_token_for_exchange_is_refused_by_the_fakes_audience_check() {
    let graph = FakeGraph::start(MAILBOX, Mailbox::default()).await;
    let entra = FakeEntra::start().await;
    entra
        .mount_token(&graph.mint_token_for("https://outlook.office365.com"), 3599)
        .await;
    let app = spawn_built(settings(&graph, &entra)).await;
    let body = expect_problem(app.post_mail(&mail(MAILBOX)).await, 502, "smtp_auth_failed").await;
    assert!(body.to_string().contains("Invalid audience"), "{body}");
}

fn attachment_b64(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

/// An instance for mails up to 64 MiB, the fake's tenant limit raised to 150 MB.
async fn large_setup(roles: &[&str]) -> Setup {
    let (graph, entra) = fakes(Mailbox::default(), roles).await;
    graph.set_max_message_bytes(150 * 1024 * 1024);
    let mut settings = settings(&graph, &entra);
    settings.relay.limits.max_body_bytes = 64 << 20;
    settings.relay.limits.max_message_bytes = 64 << 20;
    settings.relay.smtp.send_deadline = Duration::from_secs(25);
    let app = spawn_built(settings).await;
    Setup { app, graph, entra }
}

#[tokio::test]
async fn a_30_mb_attachment_goes_through_a_draft_and_an_upload_session_in_ranges_under_4_mb() {
    let s = large_setup(&["Mail.Send", "Mail.ReadWrite"]).await;
    let big: Vec<u8> = (0..30_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let small = vec![42u8; 300_000];
    let mut request = mail(MAILBOX);
    request["attachments"] = json!([
        {"filename": "report.pdf", "contentType": "application/pdf", "content": attachment_b64(&big)},
        {"filename": "small.bin", "contentType": "application/octet-stream", "content": attachment_b64(&small)},
    ]);
    let body = accepted(s.app.post_mail(&request).await).await;

    let delivered = s.graph.deliveries();
    assert_eq!(delivered.len(), 1);
    let d = &delivered[0];
    assert_eq!(
        d.recipients,
        ["ann@example.com", "cc@example.com", "hidden@example.com"]
    );
    let parsed = mail_parser::MessageParser::default()
        .parse(&d.mime)
        .unwrap();
    assert_eq!(
        parsed.message_id().map(|id| format!("<{id}>")).as_deref(),
        body["messageId"].as_str()
    );
    assert_eq!(parsed.subject(), Some("Graph test"));
    assert_eq!(
        parsed.body_text(0).as_deref(),
        Some("Sent through Microsoft Graph.")
    );
    let mut attachments: Vec<(String, Vec<u8>)> = parsed
        .attachments()
        .map(|a| {
            (
                mail_parser::MimeHeaders::attachment_name(a)
                    .unwrap_or("")
                    .to_owned(),
                a.contents().to_vec(),
            )
        })
        .collect();
    attachments.sort();
    let names: Vec<&str> = attachments.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["report.pdf", "small.bin"]);
    assert_eq!(attachments[0].1, big, "the 30 MB attachment arrived intact");
    assert_eq!(attachments[1].1, small);

    let seen = s.graph.seen();
    assert!(
        seen.iter()
            .all(|r| r.body_bytes <= crate::graph::MAX_REQUEST_BYTES),
        "a request over 4 MB"
    );
    let count = |p: &str| seen.iter().filter(|r| r.path.ends_with(p)).count();
    assert_eq!(count("/messages"), 1, "{seen:#?}");
    assert_eq!(count("/createUploadSession"), 1);
    assert_eq!(
        count("PUT /upload"),
        30_000_000usize.div_ceil(10 * 320 * 1024)
    );
    assert_eq!(count("/send"), 1);
    assert!(
        seen.iter()
            .all(|r| r.client_request_id.as_deref() == body["id"].as_str())
    );
    assert!(s.graph.drafts().is_empty());
}

#[tokio::test]
async fn an_expired_upload_session_is_started_afresh_once() {
    let big = vec![9u8; 7_000_000];
    let mut request = mail(MAILBOX);
    request["attachments"] = json!([{"filename": "big.bin", "contentType": "application/octet-stream", "content": attachment_b64(&big)}]);
    let sessions = |s: &Setup| {
        s.graph
            .seen()
            .iter()
            .filter(|r| r.path.ends_with("/createUploadSession"))
            .count()
    };

    // The first session is gone by its first range: a new one carries the attachment.
    let s = large_setup(&["Mail.Send", "Mail.ReadWrite"]).await;
    s.graph.expire_upload_sessions(1);
    accepted(s.app.post_mail(&request).await).await;
    assert_eq!(sessions(&s), 2);
    let delivered = s.graph.deliveries();
    let parsed = mail_parser::MessageParser::default()
        .parse(&delivered[0].mime)
        .unwrap();
    assert_eq!(parsed.attachments().next().unwrap().contents(), &big[..]);

    // Twice: nothing was sent, the draft is deleted, and the answer says so (not a mailbox
    // problem, which a 404 would otherwise mean).
    let s = large_setup(&["Mail.Send", "Mail.ReadWrite"]).await;
    s.graph.expire_upload_sessions(2);
    let problem = expect_problem(s.app.post_mail(&request).await, 503, "smtp_unavailable").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("expired twice"),
        "{problem}"
    );
    assert_eq!(sessions(&s), 2);
    assert!(s.graph.deliveries().is_empty());
    assert!(s.graph.drafts().is_empty(), "the draft was left behind");
}

#[tokio::test]
async fn the_draft_path_names_mail_readwrite_and_leaves_no_draft_when_a_step_fails() {
    let big = attachment_b64(&vec![7u8; 3_500_000]);
    let mut request = mail(MAILBOX);
    request["attachments"] =
        json!([{"filename": "big.bin", "contentType": "application/octet-stream", "content": big}]);

    let s = large_setup(&["Mail.Send"]).await;
    let problem = expect_problem(s.app.post_mail(&request).await, 502, "smtp_auth_failed").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Mail.ReadWrite"),
        "{problem}"
    );
    assert!(s.graph.deliveries().is_empty());

    // The draft exists when creating the upload session fails: it is deleted again.
    let s = large_setup(&["Mail.Send", "Mail.ReadWrite"]).await;
    s.graph.script_for(
        "createUploadSession",
        Scripted::error(
            400,
            "ErrorInvalidRequest",
            "The attachment item is not valid.",
        ),
    );
    let problem = expect_problem(s.app.post_mail(&request).await, 502, "smtp_rejected").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("ErrorInvalidRequest"),
        "{problem}"
    );
    assert!(s.graph.deliveries().is_empty());
    assert!(s.graph.drafts().is_empty(), "the draft was left behind");
    assert!(s.graph.seen().iter().any(|r| r.path.starts_with("DELETE ")));
}

#[tokio::test]
async fn a_body_over_the_request_limit_without_attachments_is_refused_before_anything_is_sent() {
    let s = large_setup(&["Mail.Send", "Mail.ReadWrite"]).await;
    let mut request = mail(MAILBOX);
    request["attachments"] = json!([]);
    request["text"] = json!("x".repeat(3_300_000));
    let body = expect_problem(s.app.post_mail(&request).await, 413, "payload_too_large").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("one Microsoft Graph request"),
        "{body}"
    );
    assert!(s.graph.seen().is_empty());
}

/// `diagnose` runs the steps in order and collects them.
async fn diagnose(settings: &Settings, send_test: Option<&SendTest>) -> Vec<Step> {
    let mut steps = Vec::new();
    mail_relay::diagnose::run(settings, send_test, &mut |step: &Step| {
        steps.push(step.clone())
    })
    .await;
    steps
}

fn step<'a>(steps: &'a [Step], name: &str) -> &'a Step {
    steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} step in {steps:#?}"))
}

#[tokio::test]
async fn diagnose_checks_graphs_token_roles_and_sends_a_test_mail_through_graph() {
    let (graph, entra) = fakes(Mailbox::default(), &["Mail.Send"]).await;
    let first = settings(&graph, &entra);
    let test = SendTest {
        from: MAILBOX.into(),
        to: "ann@example.com".into(),
    };
    let steps = diagnose(&first, Some(&test)).await;
    assert_eq!(step(&steps, "auth").status, Status::Skip);
    let token = step(&steps, "token");
    assert_eq!(token.status, Status::Pass, "{token:#?}");
    assert!(
        token
            .summary
            .contains("audience https://graph.microsoft.com, roles Mail.Send"),
        "{token:#?}"
    );
    let roles = step(&steps, "graph-roles");
    assert_eq!(roles.status, Status::Pass);
    assert!(roles.summary.contains("not Mail.ReadWrite"), "{roles:#?}");
    let sent = step(&steps, "send-test");
    assert_eq!(sent.status, Status::Pass, "{sent:#?}");
    assert_eq!(graph.deliveries().len(), 1);

    // Without Mail.Send: the roles step names the permission and RBAC for Applications.
    let (graph, entra) = fakes(Mailbox::default(), &["Mail.ReadBasic.All"]).await;
    let steps = diagnose(&settings(&graph, &entra), Some(&test)).await;
    let roles = step(&steps, "graph-roles");
    assert_eq!(roles.status, Status::Fail);
    assert!(
        roles.fix[0].contains("Mail.Send") && roles.fix[0].contains("CustomResourceScope"),
        "{roles:#?}"
    );
    let sent = step(&steps, "send-test");
    assert_eq!(sent.status, Status::Fail);
    assert!(
        sent.cause.as_deref().unwrap().contains("ErrorAccessDenied"),
        "{sent:#?}"
    );
}

#[tokio::test]
async fn auto_mode_sends_through_graph_once_the_server_refuses_smtp_auth_and_says_so_once() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use crate::smtp::exchange_replies::{Script, serve};

    let script = Arc::new(Script::default());
    script.auth.lock().unwrap().push_back(vec![
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
    ]);
    let port = serve(Arc::clone(&script)).await;
    // The fake SMTP server takes any token; the fake Graph checks its own.
    let (graph, entra) = fakes(Mailbox::default(), &["Mail.Send"]).await;
    let mut settings = settings(&graph, &entra);
    settings.relay.delivery = Delivery::Auto;
    settings.send_email.smtp_server = "127.0.0.1".into();
    settings.send_email.smtp_port = port;
    let app = spawn_built(settings).await;

    let (_, ready) = app.get_ready().await;
    assert_eq!(
        ready["components"]["smtp"]["transport"], "smtp",
        "{ready:#}"
    );

    // The login is refused before any mail is named: the mail goes through Graph at once.
    let first = accepted(app.post_mail(&mail(MAILBOX)).await).await;
    assert_eq!(graph.deliveries().len(), 1);
    assert_eq!(script.delivered.load(Ordering::SeqCst), 0);
    let delivered = String::from_utf8(graph.deliveries()[0].mime.clone()).unwrap();
    assert!(delivered.contains(first["messageId"].as_str().unwrap()));

    // The next mail goes straight to Graph: no SMTP login, no refused AUTH per mail.
    accepted(app.post_mail(&mail(MAILBOX)).await).await;
    assert_eq!(graph.deliveries().len(), 2);
    assert_eq!(script.connections.load(Ordering::SeqCst), 1);

    let (_, ready) = app.get_ready().await;
    let smtp = &ready["components"]["smtp"];
    assert_eq!(smtp["transport"], "graph", "{ready:#}");
    assert!(smtp["graphFallbackSince"].is_string(), "{ready:#}");
    assert_eq!(
        ready["status"], "ready",
        "Graph works: the instance stays ready"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("mail_relay_transport{transport=\"graph\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mail_relay_transport{transport=\"smtp\"} 0"),
        "{metrics}"
    );
    // Both scopes were asked for: Exchange's for SMTP, Graph's for the fallback.
    let scopes: Vec<String> = entra
        .requests()
        .await
        .iter()
        .filter_map(|r| field(&form_fields(r), "scope").map(str::to_owned))
        .collect();
    assert!(scopes.iter().any(|s| s == SCOPE), "{scopes:?}");
    assert!(
        scopes.iter().any(|s| s == crate::entra::SCOPE),
        "{scopes:?}"
    );
}

#[tokio::test]
async fn a_managed_identity_sends_through_graph_with_no_secret_configured() {
    use crate::managed_identity::FakeIdentity;
    use mail_relay::config::ManagedIdentity;

    let graph = FakeGraph::start(MAILBOX, Mailbox::default()).await;
    let identity =
        FakeIdentity::start(&graph.mint_token(&["Mail.Send"], Duration::from_secs(3600))).await;
    let entra = FakeEntra::start().await;
    let mut settings = settings(&graph, &entra);
    settings.send_email.smtp_authentication = SmtpAuthentication::MsOAuth {
        username: MAILBOX.parse().unwrap(),
        oauth: FakeIdentity::oauth(
            identity.imds_url(),
            ManagedIdentity::Imds,
            "",
            crate::entra::SCOPE,
        ),
    };
    let app = spawn_built(settings).await;

    let body = accepted(app.post_mail(&mail(MAILBOX)).await).await;

    let delivered = graph.deliveries();
    assert_eq!(delivered.len(), 1);
    let text = String::from_utf8(delivered[0].mime.clone()).unwrap();
    assert!(text.contains(body["messageId"].as_str().unwrap()), "{text}");
    // The Graph token came from the identity endpoint, for Graph's resource; Entra saw nothing.
    let seen = identity.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].query["resource"], "https://graph.microsoft.com");
    assert!(entra.requests().await.is_empty());
}

#[tokio::test]
async fn with_mail_read_a_lost_answer_is_settled_in_sent_items_and_never_sent_twice() {
    let s = setup(Mailbox::default(), &["Mail.Send", "Mail.Read"]).await;
    // A 504 that delivered: Sent Items holds the mail, so it is sent, and only once.
    s.graph.script(Scripted {
        deliver: true,
        ..Scripted::error(504, "UnknownError", "")
    });

    accepted(s.app.post_mail(&mail(MAILBOX)).await).await;

    assert_eq!(s.graph.deliveries().len(), 1);
    let paths: Vec<String> = s.graph.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            format!("/v1.0/users/{MAILBOX}/sendMail"),
            format!("GET /v1.0/users/{MAILBOX}/mailFolders/sentitems/messages"),
        ]
    );
}

#[tokio::test]
async fn with_mail_read_a_lost_answer_not_in_sent_items_is_sent_once_more() {
    let (graph, entra) = fakes(Mailbox::default(), &["Mail.Send", "Mail.ReadWrite"]).await;
    let mut settings = settings(&graph, &entra);
    settings.relay.graph.sent_items_lookup = Duration::from_secs(2);
    let app = spawn_built(settings).await;
    // A 500 that did not deliver.
    graph.script(Scripted::error(500, "UnknownError", ""));

    let started = Instant::now();
    accepted(app.post_mail(&mail(MAILBOX)).await).await;

    assert_eq!(graph.deliveries().len(), 1);
    let seen = graph.seen();
    let sends = seen
        .iter()
        .filter(|r| r.path.ends_with("/sendMail"))
        .count();
    let lookups = seen.iter().filter(|r| r.path.contains("sentitems")).count();
    assert_eq!((sends, lookups), (2, 2), "{seen:?}");
    // Looked after 1 s and again at the end of the 2 s lookup time, not longer.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_sent_items_lookup_that_fails_leaves_the_outcome_unknown() {
    let s = setup(Mailbox::default(), &["Mail.Send", "Mail.Read"]).await;
    s.graph.script(Scripted::error(504, "UnknownError", ""));
    s.graph.script_for(
        "sentitems",
        Scripted::error(500, "UnknownError", "lookup failed"),
    );

    let body = expect_problem(
        s.app.post_mail(&mail(MAILBOX)).await,
        502,
        "smtp_outcome_unknown",
    )
    .await;

    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Sent Items could not be searched"),
        "{body}"
    );
    let sends = s
        .graph
        .seen()
        .iter()
        .filter(|r| r.path.ends_with("/sendMail"))
        .count();
    assert_eq!(sends, 1, "resent without knowing");
}

#[tokio::test]
async fn diagnose_in_auto_mode_checks_graph_too_and_sends_the_test_through_it_when_smtp_auth_is_off()
 {
    use std::sync::Arc;

    use crate::smtp::exchange_replies::{Script, serve};

    let script = Arc::new(Script::default());
    script.auth.lock().unwrap().push_back(vec![
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
    ]);
    let port = serve(Arc::clone(&script)).await;
    let (graph, entra) = fakes(Mailbox::default(), &["Mail.Send", "Mail.Read"]).await;
    let mut settings = settings(&graph, &entra);
    settings.relay.delivery = Delivery::Auto;
    settings.send_email.smtp_server = "127.0.0.1".into();
    settings.send_email.smtp_port = port;
    let test = SendTest {
        from: MAILBOX.into(),
        to: "ann@example.com".into(),
    };

    let steps = diagnose(&settings, Some(&test)).await;

    assert_eq!(step(&steps, "connect").status, Status::Pass);
    // SMTP AUTH off is what auto is for: not a failure, Graph stands in.
    let auth = step(&steps, "auth");
    assert_eq!(auth.status, Status::Skip, "{auth:#?}");
    assert!(auth.summary.contains("5.7.139"), "{auth:#?}");
    let token = step(&steps, "graph-token");
    assert_eq!(token.status, Status::Pass, "{token:#?}");
    assert!(
        token
            .summary
            .contains("audience https://graph.microsoft.com")
    );
    let roles = step(&steps, "graph-roles");
    assert!(
        roles.summary.contains("looked up in Sent Items"),
        "{roles:#?}"
    );
    let sent = step(&steps, "send-test");
    assert_eq!(sent.status, Status::Pass, "{sent:#?}");
    assert!(sent.summary.contains("Microsoft Graph took the test mail"));
    assert_eq!(graph.deliveries().len(), 1);
    assert!(steps.iter().all(|s| s.status != Status::Fail), "{steps:#?}");
}

#[tokio::test]
async fn diagnose_reads_the_mailbox_without_sending_when_the_token_may_read_it() {
    // Without Mail.Read: skipped, saying what would check it.
    let (graph, entra) = fakes(Mailbox::default(), &["Mail.Send"]).await;
    let steps = diagnose(&settings(&graph, &entra), None).await;
    let mailbox = step(&steps, "graph-mailbox");
    assert_eq!(mailbox.status, Status::Skip, "{mailbox:#?}");
    assert!(mailbox.summary.contains("Mail.Read"), "{mailbox:#?}");

    let (graph, entra) = fakes(Mailbox::default(), &["Mail.Send", "Mail.Read"]).await;
    let steps = diagnose(&settings(&graph, &entra), None).await;
    assert_eq!(step(&steps, "graph-mailbox").status, Status::Pass);
    assert!(graph.deliveries().is_empty(), "diagnose sent a mail");

    // Not an Exchange Online mailbox, or outside the app's RBAC scope: named, with the fix.
    for (mailbox, code) in [
        (
            Mailbox {
                not_enabled: true,
                ..Mailbox::default()
            },
            "MailboxNotEnabledForRESTAPI",
        ),
        (
            Mailbox {
                out_of_scope: true,
                ..Mailbox::default()
            },
            "ErrorAccessDenied",
        ),
    ] {
        let (graph, entra) = fakes(mailbox, &["Mail.Send", "Mail.Read"]).await;
        let steps = diagnose(&settings(&graph, &entra), None).await;
        let step = step(&steps, "graph-mailbox");
        assert_eq!(step.status, Status::Fail, "{step:#?}");
        assert!(step.cause.as_deref().unwrap().contains(code), "{step:#?}");
        assert!(!step.fix.is_empty(), "{step:#?}");
    }
}
