//! The server skeleton: probes, request ids, error format, limits.

use serde_json::Value;

use crate::helpers::{spawn_app, spawn_app_with};

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
    let response = app.get("/health/ready").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
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
        .client
        .post(app.url("/mail"))
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    tokio::spawn(mail_relay::http::serve::serve(
        listener,
        router,
        Duration::from_millis(300),
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
