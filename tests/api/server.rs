//! The server skeleton: probes, request ids, error format, limits.

use std::time::{Duration, Instant};

use mail_relay::app::Application;
use mail_relay::http::serve::{ConnectionLimits, Connections};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, spawn_app, spawn_app_with, test_settings};

#[tokio::test]
async fn live_answers_200_with_json() {
    let app = spawn_app().await;
    let response = app.get("/health/live").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn ready_answers_200_when_settings_are_loaded() {
    let app = spawn_app().await;
    let (status, body) = app.get_ready().await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ready");
}

#[tokio::test]
async fn a_given_request_id_is_echoed_back() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/health/live"))
        .header("x-request-id", "test-id-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "test-id-123");
}

#[tokio::test]
async fn a_request_id_is_made_when_none_is_given() {
    let app = spawn_app().await;
    let response = app.get("/health/live").await;
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID, got {id}");
}

#[tokio::test]
async fn unknown_route_is_404_problem_json_with_request_id() {
    let app = spawn_app().await;
    let response = app.get("/no/such/thing").await;
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    assert_eq!(body["status"], 404);
    assert_eq!(body["requestId"], id.as_str());
    assert!(body["detail"].as_str().unwrap().contains("/no/such/thing"));
}

#[tokio::test]
async fn body_over_the_limit_is_413_problem_json() {
    let app = spawn_app_with(|s| s.relay.limits.max_body_bytes = 1024).await;
    let response = app
        .mail_request()
        .header("content-type", "application/json")
        .body(vec![b' '; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "payload_too_large");
    assert!(body["detail"].as_str().unwrap().contains("1024"));
}

#[tokio::test]
async fn openapi_is_served_and_matches_the_committed_copy() {
    let app = spawn_app().await;
    let served: Value = app.get("/openapi.json").await.json().await.unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .unwrap_or_default();
    let generated = mail_relay::api::openapi::document_json();
    assert!(
        committed == generated,
        "openapi/openapi.json is out of date: regenerate it with \
         `cargo run -- openapi > openapi/openapi.json` and commit it"
    );
    assert_eq!(served, serde_json::from_str::<Value>(&committed).unwrap());
}

#[test]
fn every_error_answer_of_post_mail_is_documented_with_an_example_of_its_own_status() {
    let doc: Value = serde_json::from_str(&mail_relay::api::openapi::document_json()).unwrap();
    let responses = doc["paths"]["/mail"]["post"]["responses"]
        .as_object()
        .unwrap();
    let mut codes = Vec::new();
    for (status, response) in responses {
        if !status.starts_with('4') && !status.starts_with('5') {
            continue;
        }
        let examples = response["content"]["application/problem+json"]["examples"]
            .as_object()
            .unwrap_or_else(|| panic!("{status} has no examples"));
        let description = response["description"].as_str().unwrap();
        for (name, example) in examples {
            let value = &example["value"];
            assert_eq!(value["status"].to_string(), *status, "{name}");
            let code = value["code"].as_str().unwrap();
            assert!(
                description.contains(&format!("`{code}`")),
                "{status}'s description does not name {code}"
            );
            assert!(!value["detail"].as_str().unwrap().is_empty(), "{name}");
            codes.push(code.to_owned());
        }
    }
    // The codes the README's error table lists for POST /mail, each with an example.
    for code in [
        "invalid_request",
        "too_many_recipients",
        "unauthorized",
        "send_as_denied",
        "payload_too_large",
        "idempotency_in_progress",
        "idempotency_key_reused",
        "rate_limited",
        "smtp_auth_failed",
        "smtp_auth_disabled",
        "smtp_rejected",
        "smtp_outcome_unknown",
        "smtp_unavailable",
        "token_unavailable",
        "store_unavailable",
        "timeout",
        "busy",
    ] {
        assert!(codes.iter().any(|c| c == code), "no example for {code}");
    }
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_without_reading_it() {
    let app = spawn_app_with(|s| s.relay.limits.max_body_bytes = 1024).await;
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    // Announce a gigabyte and send none of it: the answer must come from the header alone.
    let head = format!(
        "POST /mail HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n",
        app.address,
        crate::helpers::TEST_API_KEY
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("an answer before any body byte was sent")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_is_cut_off_while_others_are_served() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    tokio::spawn(mail_relay::http::serve::serve(
        listener,
        router,
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            max_header_bytes: 16 * 1024,
        },
        Connections::new("main", 16),
        std::future::pending(),
    ));

    // Slowloris: a head that never ends.
    let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        .await
        .unwrap();
    let started = Instant::now();
    // Meanwhile a normal client gets its answer.
    let body = reqwest::get(format!("http://{address}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "ok");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the slow connection was not closed");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the timeout"
    );
}

// ---- what one connection may hold: mailRelay.http.headerReadTimeoutSeconds, maxConnections,
// maxHeaderBytes ---------------------------------------------------------------------------

/// The start of every HTTP/2 connection (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An app whose connections may go 1 s without a request.
async fn spawn_impatient_app() -> TestApp {
    spawn_app_with(|s| s.relay.http.header_read_timeout = Duration::from_secs(1)).await
}

/// Reads until the server closes `stream` (or resets it); `None` when it is still open after
/// `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut sink = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut sink)).await {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_head_timeout() {
    let app = spawn_impatient_app().await;
    let mut silent = TcpStream::connect(app.address).await.unwrap();
    let after = closed_within(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent connection is closed");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
    // The timeout is per connection: others are served meanwhile and after.
    assert_eq!(app.get("/health/live").await.status(), 200);
}

#[tokio::test]
async fn a_connection_that_sent_only_the_http2_preface_is_closed() {
    let app = spawn_impatient_app().await;
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    let after = closed_within(&mut stream, Duration::from_secs(5))
        .await
        .expect("a connection stuck after the preface is closed");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_cut_off_even_before_its_protocol_is_known() {
    let app = spawn_impatient_app().await;
    let stream = TcpStream::connect(app.address).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // Slowloris on the preface: hyper cannot yet tell HTTP/1 from HTTP/2, so its own HTTP/1
    // head timer has not started.
    let dribble = tokio::spawn(async move {
        for byte in &H2_PREFACE[..H2_PREFACE.len() - 1] {
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::future::pending::<()>().await;
    });
    let started = Instant::now();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(4), read.read_to_end(&mut sink)).await;
    dribble.abort();
    assert!(closed.is_ok(), "the dribbling connection was not closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_slow_http1_head_is_cut_off_at_the_configured_timeout() {
    let app = spawn_impatient_app().await;
    let mut slow = TcpStream::connect(app.address).await.unwrap();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: relay\r\nX-Slow: 1")
        .await
        .unwrap();
    let after = closed_within(&mut slow, Duration::from_secs(5))
        .await
        .expect("the slow connection is closed");
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
}

#[tokio::test]
async fn a_kept_alive_http1_connection_is_closed_when_idle_for_the_timeout() {
    let app = spawn_impatient_app().await;
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 1024];
    let n = stream.read(&mut answer).await.unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
    let after = closed_within(&mut stream, Duration::from_secs(5))
        .await
        .expect("an idle kept-alive connection is closed");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
}

/// An HTTP/2 connection (prior knowledge, as gRPC-style clients and nginx's `grpc_pass` do).
async fn h2_connect(
    app: &TestApp,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(app.address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    (client, tokio::spawn(connection))
}

async fn h2_get(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    app: &TestApp,
    header: Option<(&str, String)>,
) -> Result<u16, h2::Error> {
    let mut request = http::Request::get(format!("http://{}/health/live", app.address));
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let ready = client.clone().ready().await?;
    *client = ready;
    let (response, _) = client.send_request(request.body(()).unwrap(), true)?;
    Ok(response.await?.status().as_u16())
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_and_a_busy_one_is_not() {
    let app = spawn_impatient_app().await;
    let (mut client, connection) = h2_connect(&app).await;
    // Requests 0.5 s apart keep it open past the timeout.
    for _ in 0..4 {
        assert_eq!(h2_get(&mut client, &app, None).await.unwrap(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!connection.is_finished(), "closed while in use");
    // Then nothing: the server says GOAWAY and closes.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn a_20_kib_header_gets_431_and_a_4_kib_one_is_served() {
    let app = spawn_app().await;
    let get = |size: usize| {
        app.client
            .get(app.url("/health/live"))
            .header("x-big", "a".repeat(size))
            .send()
    };
    assert_eq!(get(4 * 1024).await.unwrap().status(), 200);
    let refused = get(20 * 1024).await.unwrap();
    assert_eq!(refused.status(), 431);
    assert_eq!(get(4 * 1024).await.unwrap().status(), 200);
}

#[tokio::test]
async fn an_http2_header_list_over_the_setting_is_answered_431() {
    // Below hyper's own HTTP/2 default (16 KiB), so that the setting is what refuses it.
    let app = spawn_app_with(|s| s.relay.http.max_header_bytes = 8 * 1024).await;
    let (mut client, _connection) = h2_connect(&app).await;
    let small = Some(("x-big", "a".repeat(4 * 1024)));
    assert_eq!(h2_get(&mut client, &app, small).await.unwrap(), 200);
    let big = Some(("x-big", "a".repeat(12 * 1024)));
    let outcome = h2_get(&mut client, &app, big).await;
    assert_eq!(outcome.unwrap(), 431);
}

#[tokio::test]
async fn beyond_max_connections_new_ones_are_closed_at_once_and_counted() {
    const CAP: usize = 3;
    let outbox = tempfile::tempdir().unwrap();
    let mut settings = test_settings(outbox.path().to_path_buf());
    settings.relay.http.max_connections = CAP;
    settings.relay.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let app = Application::build(settings).await.unwrap();
    let address = app.local_addr().unwrap();
    let metrics = app.metrics_addr().unwrap();
    tokio::spawn(app.run_until(std::future::pending()));

    const REQUEST: &[u8] = b"GET /health/live HTTP/1.1\r\nHost: relay\r\n\r\n";
    async fn answered(stream: &mut TcpStream) -> bool {
        if stream.write_all(REQUEST).await.is_err() {
            return false;
        }
        let mut answer = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await {
            Ok(Ok(n)) => answer[..n].starts_with(b"HTTP/1.1 200"),
            _ => false,
        }
    }
    let mut open = Vec::new();
    for _ in 0..CAP {
        let mut stream = TcpStream::connect(address).await.unwrap();
        assert!(answered(&mut stream).await);
        open.push(stream);
    }
    for _ in 0..2 {
        let mut extra = TcpStream::connect(address).await.unwrap();
        assert!(
            !answered(&mut extra).await,
            "a connection over the cap was served"
        );
        let closed = closed_within(&mut extra, Duration::from_secs(2)).await;
        assert!(closed.is_some(), "a connection over the cap stayed open");
    }
    // The first ones still work.
    for stream in &mut open {
        assert!(answered(stream).await);
    }
    // Scrapes go to a listener with a cap of its own.
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("mail_relay_http_connections_refused_total{listener=\"main\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "mail_relay_http_connections_open{{listener=\"main\"}} {CAP}\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("mail_relay_http_connections_open{listener=\"metrics\"} 1\n"),
        "{text}"
    );
    // A place freed is a place to take.
    drop(open.pop());
    let mut retried = false;
    for _ in 0..20 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        if answered(&mut stream).await {
            retried = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(retried, "a freed place was not reused");
}
