//! The memory budget (`mailRelay.limits.maxInFlightBytes`) through the real `POST /mail`: a
//! sender that holds each mail until the test lets it go keeps requests in flight.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::fakes::{Answer, FakeSender, try_later};
use crate::helpers::{TestApp, expect_problem, spawn_app_with_sender};

const SETTING: &str = "mailRelay.limits.maxInFlightBytes";
const BUDGET: usize = 300_000;

/// Accepts each mail once the test opens the gate for it.
async fn app_with_gate() -> (TestApp, Arc<FakeSender>) {
    let gate = Arc::new(FakeSender::accepting().gated());
    let app = spawn_app_with_sender(
        |s| {
            s.relay.limits.max_in_flight_bytes = BUDGET;
            s.relay.limits.max_body_bytes = 1024 * 1024;
        },
        Some(gate.clone()),
    )
    .await;
    (app, gate)
}

/// A mail whose JSON body is a little over `attachment * 4 / 3` bytes.
fn mail_with(attachment: usize, subject: &str) -> Value {
    let content = base64::engine::general_purpose::STANDARD.encode(vec![7u8; attachment]);
    json!({"from": "billing@contoso.com", "to": "a@contoso.com", "subject": subject,
           "attachments": [{"filename": "f.bin", "contentType": "application/octet-stream",
                            "content": content}]})
}

async fn in_flight(app: &TestApp) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("mail_relay_mail_bytes_in_flight "))
        .unwrap_or_else(|| panic!("no gauge in {text}"))
        .parse()
        .unwrap()
}

/// The gauge goes back to 0 a moment after the last request ended (its send task ends last).
async fn until_empty(app: &TestApp) {
    for _ in 0..200 {
        if in_flight(app).await == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("bytes in flight stayed at {}", in_flight(app).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_budget_wait_then_get_503_busy_and_the_budget_comes_back() {
    let (app, gate) = app_with_gate().await;
    let app = Arc::new(app);
    // About 200 kB of JSON: one fits the 300 kB budget, two do not.
    let first = tokio::spawn({
        let app = app.clone();
        async move { app.post_mail(&mail_with(150_000, "first")).await }
    });
    gate.until_called(1).await;
    let held = in_flight(&app).await;
    assert!((200_000.0..=BUDGET as f64).contains(&held), "{held}");

    let began = std::time::Instant::now();
    let refused = app.post_mail(&mail_with(150_000, "second")).await;
    assert!(began.elapsed() >= Duration::from_secs(1), "it waited first");
    assert_eq!(refused.headers()["retry-after"], "2");
    let problem = expect_problem(refused, 503, "busy").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains(SETTING), "{detail}");

    gate.open(1);
    assert_eq!(first.await.unwrap().status(), 202);
    until_empty(&app).await;
    // With the first one done, the next one fits again.
    gate.open(1);
    let next = app.post_mail(&mail_with(150_000, "next")).await;
    assert_eq!(next.status(), 202);
    until_empty(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_gets_in_when_the_one_ahead_finishes_within_the_wait() {
    let (app, gate) = app_with_gate().await;
    let app = Arc::new(app);
    let first = tokio::spawn({
        let app = app.clone();
        async move { app.post_mail(&mail_with(150_000, "first")).await }
    });
    gate.until_called(1).await;
    let second = tokio::spawn({
        let app = app.clone();
        async move { app.post_mail(&mail_with(150_000, "second")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.open(2);
    assert_eq!(first.await.unwrap().status(), 202);
    assert_eq!(second.await.unwrap().status(), 202);
    until_empty(&app).await;
}

#[tokio::test]
async fn a_body_larger_than_the_whole_budget_is_413_naming_the_setting() {
    let (app, gate) = app_with_gate().await;
    let began = std::time::Instant::now();
    let response = app.post_mail(&mail_with(240_000, "too big")).await;
    let problem = expect_problem(response, 413, "payload_too_large").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains(SETTING), "{detail}");
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "no waiting for it"
    );
    assert_eq!(gate.calls(), 0);
    until_empty(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charge_is_given_back_after_errors_and_a_client_that_went_away() {
    let (app, gate) = app_with_gate().await;
    let app = Arc::new(app);
    // Refused before the send: invalid base64.
    let mut invalid = mail_with(150_000, "invalid");
    invalid["attachments"][0]["content"] = json!("!".repeat(200_000));
    expect_problem(app.post_mail(&invalid).await, 400, "invalid_request").await;
    until_empty(&app).await;

    // Refused by the server.
    gate.answer_next(Answer::Fail(try_later));
    gate.open(1);
    expect_problem(
        app.post_mail(&mail_with(150_000, "server says later"))
            .await,
        503,
        "smtp_unavailable",
    )
    .await;
    until_empty(&app).await;

    // The client goes away while the send runs: the charge stays until the send is over.
    let entered = gate.calls();
    let gone = tokio::spawn({
        let app = app.clone();
        async move { app.post_mail(&mail_with(150_000, "client gone")).await }
    });
    gate.until_called(entered + 1).await;
    gone.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        in_flight(&app).await > 0.0,
        "the send still holds its bytes"
    );
    gate.open(1);
    until_empty(&app).await;
}

/// POSTs `body` with `Transfer-Encoding: chunked` (no Content-Length), in 16 kB chunks;
/// returns the status line's code and the answer's body.
async fn post_chunked(app: &TestApp, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /mail HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        app.address,
        crate::helpers::TEST_API_KEY
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(16_000) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        // The relay may answer and close before all of it is sent.
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    (status, answer)
}

#[tokio::test]
async fn a_body_without_content_length_is_charged_as_it_is_read() {
    let (app, gate) = app_with_gate().await;
    gate.open(1);
    let fits = serde_json::to_vec(&mail_with(150_000, "chunked")).unwrap();
    let (status, answer) = post_chunked(&app, &fits).await;
    assert_eq!(status, 202, "{answer}");
    until_empty(&app).await;

    let too_big = serde_json::to_vec(&mail_with(240_000, "chunked, too big")).unwrap();
    let (status, answer) = post_chunked(&app, &too_big).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains(SETTING), "{answer}");
    assert_eq!(gate.calls(), 1);
    until_empty(&app).await;
}
