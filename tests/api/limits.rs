//! Rate limits and Idempotency-Key through the real `POST /mail` (outbox sender, so the tests
//! count what was really sent). The limiters' arithmetic, with a clock moved by hand, is unit
//! tested in `src/rate_limit/` and `src/idempotency/`.

use std::num::NonZeroU32;
use std::sync::Arc;

use mail_relay::config::RateLimitSettings;
use mail_relay::delivery::DeliveryError;
use mail_relay::smtp::{SmtpError, Stage};
use serde_json::{Value, json};

use crate::fakes::{Answer, FakeSender, try_later};
use crate::helpers::{expect_problem, outbox_files, spawn_app_with, spawn_app_with_sender};

fn mail(subject: &str) -> Value {
    json!({"from": "billing@contoso.com", "to": "a@contoso.com", "subject": subject, "text": "hi"})
}

fn mailbox_per_minute(n: u32) -> RateLimitSettings {
    RateLimitSettings {
        mailbox_messages_per_minute: NonZeroU32::new(n),
        ..RateLimitSettings::OFF
    }
}

#[tokio::test]
async fn excess_mail_gets_429_with_retry_after_and_nothing_is_sent() {
    let app = spawn_app_with(|s| s.relay.rate_limits = mailbox_per_minute(3)).await;
    for i in 0..3 {
        assert_eq!(app.post_mail(&mail(&format!("m{i}"))).await.status(), 202);
    }
    let response = app.post_mail(&mail("one too many")).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let problem = expect_problem(response, 429, "rate_limited").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("mailRelay.rateLimits.mailboxMessagesPerMinute"),
        "{detail}"
    );
    assert!(detail.contains("nothing was sent"), "{detail}");
    assert_eq!(outbox_files(&app).len(), 3);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mail_relay_rate_limited_total{scope=\"mailbox_minute\"} 1")),
        "{metrics}"
    );
}

#[tokio::test]
async fn one_caller_at_its_limit_does_not_stop_another() {
    let app = spawn_app_with(|s| {
        s.relay.rate_limits = RateLimitSettings {
            caller_messages_per_minute: NonZeroU32::new(1),
            ..RateLimitSettings::OFF
        };
        s.relay.auth.trusted_proxy = Some(mail_relay::config::TrustedProxySettings {
            user_header: http::HeaderName::from_static("x-forwarded-email"),
            sources: vec!["127.0.0.0/8".parse().unwrap()],
            secret: None,
        });
    })
    .await;
    assert_eq!(app.post_mail(&mail("key 1")).await.status(), 202);
    expect_problem(app.post_mail(&mail("key 2")).await, 429, "rate_limited").await;
    // A user through the proxy is another caller with its own allowance.
    let user = app
        .post_mail_as(Some("billing@contoso.com"), &mail("user 1"))
        .await;
    assert_eq!(user.status(), 202);
    assert_eq!(outbox_files(&app).len(), 2);
}

#[tokio::test]
async fn an_idempotent_retry_sends_once_and_replays_the_first_answer() {
    let app = spawn_app_with(|_| {}).await;
    let key = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let first = app.post_mail_with_key(key, &mail("once")).await;
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let again = app.post_mail_with_key(key, &mail("once")).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        first,
        "the same mail id and Message-ID"
    );
    assert_eq!(outbox_files(&app).len(), 1);

    // The same key for another mail is a client bug.
    let problem = expect_problem(
        app.post_mail_with_key(key, &mail("other")).await,
        422,
        "idempotency_key_reused",
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains("new key"));
    // A malformed key is refused before anything happens.
    let problem = expect_problem(
        app.post_mail_with_key("has space", &mail("x")).await,
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "headers.Idempotency-Key");
    assert_eq!(outbox_files(&app).len(), 1);
}

#[tokio::test]
async fn a_failed_send_gives_back_its_quota_and_its_key() {
    let outbox = tempfile::tempdir().unwrap();
    // Down: every send fails before any server accepted anything.
    let sender = Arc::new(FakeSender::failing(try_later).writing_to(outbox.path()));
    let app = spawn_app_with_sender(
        |s| s.relay.rate_limits = mailbox_per_minute(1),
        Some(sender.clone()),
    )
    .await;

    expect_problem(
        app.post_mail_with_key("k-1", &mail("retry me")).await,
        503,
        "smtp_unavailable",
    )
    .await;
    sender.answer_always(Answer::Accept);
    // Neither the minute's only slot nor the key was used up by the failure.
    let retried = app.post_mail_with_key("k-1", &mail("retry me")).await;
    assert_eq!(retried.status(), 202);
    assert!(
        retried.headers().get("idempotent-replayed").is_none(),
        "a 503 is not replayed"
    );
    assert_eq!(std::fs::read_dir(outbox.path()).unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_with_one_key_send_once() {
    let app = Arc::new(spawn_app_with(|_| {}).await);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                app.post_mail_with_key("k-3", &mail("concurrent"))
                    .await
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    // Each is the first answer (202, original or replayed) or "still in progress" (409).
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 409),
        "{statuses:?}"
    );
    assert!(statuses.contains(&202));
    assert_eq!(outbox_files(&app).len(), 1);
}

/// The server's reply to the end of DATA was lost: the server may have the mail.
fn lost_reply() -> DeliveryError {
    DeliveryError::Smtp(SmtpError::Connection {
        kind: mail_relay::smtp::SmtpErrorKind::Transient,
        stage: Stage::EndOfData,
        server: "smtp.test:587".into(),
        detail: "connection reset".into(),
    })
}

#[tokio::test]
async fn an_unknown_outcome_is_502_and_a_retry_with_the_key_does_not_send_again() {
    let sender = Arc::new(FakeSender::failing(lost_reply));
    let app = spawn_app_with_sender(|_| {}, Some(sender.clone())).await;
    let first = app.post_mail_with_key("k-lost", &mail("lost reply")).await;
    assert!(
        first.headers().get("retry-after").is_none(),
        "not an invitation to retry"
    );
    let problem = expect_problem(first, 502, "smtp_outcome_unknown").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("may or may not")
    );
    let again = app.post_mail_with_key("k-lost", &mail("lost reply")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    expect_problem(again, 502, "smtp_outcome_unknown").await;
    assert_eq!(sender.calls(), 1, "handed over once");
}

#[tokio::test]
async fn a_mail_with_more_recipients_than_a_whole_day_allows_is_400_not_429() {
    let app = spawn_app_with(|s| {
        s.relay.rate_limits = RateLimitSettings {
            mailbox_recipients_per_day: NonZeroU32::new(2),
            ..RateLimitSettings::OFF
        };
    })
    .await;
    let body = json!({"from": "noreply@contoso.com",
                      "to": ["a@example.com", "b@example.com", "c@example.com"],
                      "subject": "s", "text": "t"});
    let response = app.post_mail(&body).await;
    assert!(response.headers().get("retry-after").is_none());
    let problem = expect_problem(response, 400, "too_many_recipients").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("at most 2"), "{detail}");
    assert!(
        detail.contains("mailRelay.rateLimits.mailboxRecipientsPerDay"),
        "{detail}"
    );
    assert!(outbox_files(&app).is_empty(), "nothing sent");
}

#[tokio::test]
async fn a_problem_with_500_field_errors_is_a_400_listing_20_and_the_count() {
    let app = spawn_app_with(|s| s.relay.limits.max_body_bytes = 1024 * 1024).await;
    // 500 refused header names of 150 characters: an answer listing them all was over 64 KiB
    // and came back as 500 internal_error.
    let headers: serde_json::Map<String, Value> = (0..500)
        .map(|i| (format!("X-Bad Name {i:03} {}", "n".repeat(135)), json!("v")))
        .collect();
    let mut body = mail("many bad headers");
    body["headers"] = Value::Object(headers);
    let first = app.post_mail_with_key("k-headers", &body).await;
    let problem = expect_problem(first, 400, "invalid_request").await;
    assert_eq!(problem["errors"].as_array().unwrap().len(), 20, "{problem}");
    assert_eq!(problem["errorsOmitted"], 480);
    assert!(problem["requestId"].is_string());
    // Its replay lists the same.
    let again = app.post_mail_with_key("k-headers", &body).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let replayed = expect_problem(again, 400, "invalid_request").await;
    assert_eq!(replayed["errors"], problem["errors"]);
    assert_eq!(replayed["errorsOmitted"], 480);
    assert!(outbox_files(&app).is_empty());
}

#[tokio::test]
async fn a_202_over_64_kib_is_replayed_and_not_sent_again() {
    let app = spawn_app_with(|s| s.relay.limits.max_body_bytes = 1024 * 1024).await;
    // 500 long recipients: the answer lists them all, about 70 KiB.
    let to: Vec<String> = (0..500)
        .map(|i| format!("{}{i:03}@{}.example.com", "a".repeat(60), "b".repeat(60)))
        .collect();
    let body =
        json!({"from": "billing@contoso.com", "to": to, "subject": "big answer", "text": "hi"});
    let first = app.post_mail_with_key("k-big", &body).await;
    assert_eq!(first.status(), 202);
    let first = first.bytes().await.unwrap();
    assert!(first.len() > 64 * 1024, "{} bytes", first.len());
    let again = app.post_mail_with_key("k-big", &body).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.bytes().await.unwrap(), first);
    assert_eq!(outbox_files(&app).len(), 1, "sent once");
}

#[tokio::test]
async fn one_caller_using_up_its_share_of_the_day_gets_429_while_another_still_sends() {
    // The default shares (a quarter of the mailbox) of a smaller day, so that the mails stay
    // small: 400 recipients for the mailbox, 100 for each caller.
    let app = spawn_app_with(|s| {
        let mailbox_recipients_per_day = NonZeroU32::new(400);
        s.relay.rate_limits = RateLimitSettings {
            mailbox_recipients_per_day,
            caller_recipients_per_day: RateLimitSettings::caller_share(mailbox_recipients_per_day),
            ..RateLimitSettings::default()
        };
        s.relay.limits.max_recipients = 20;
        s.relay.auth.trusted_proxy = Some(mail_relay::config::TrustedProxySettings {
            user_header: http::HeaderName::from_static("x-forwarded-email"),
            sources: vec!["127.0.0.0/8".parse().unwrap()],
            secret: None,
        });
    })
    .await;
    let to: Vec<String> = (0..20).map(|i| format!("r{i}@example.com")).collect();
    let body =
        json!({"from": "billing@contoso.com", "to": to, "subject": "newsletter", "text": "hi"});
    for _ in 0..5 {
        assert_eq!(app.post_mail(&body).await.status(), 202);
    }
    let problem = expect_problem(app.post_mail(&body).await, 429, "rate_limited").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("mailRelay.rateLimits.callerRecipientsPerDay"),
        "{detail}"
    );
    assert!(detail.contains("100 recipients"), "{detail}");
    // A user through the proxy is another caller, with its own share of the mailbox's day.
    let user = app.post_mail_as(Some("billing@contoso.com"), &body).await;
    assert_eq!(user.status(), 202);
    assert_eq!(outbox_files(&app).len(), 6);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mail_relay_rate_limited_total{scope=\"caller_day\"} 1")),
        "{metrics}"
    );
}
