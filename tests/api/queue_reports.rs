//! What the relay reports about a queued mail that ends undelivered: the completion call
//! (`mailRelay.delivery.webhook`, signed as Standard Webhooks sign, retried until a 2xx) and the
//! administrators' batched mail. The mails are really refused by the peer's Postfix.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use mail_relay::config::{AdminMailSettings, SecretBytes, WebhookSettings};
use mail_relay::queue::notify::sign;
use serde_json::Value;

use crate::admin_mail::{read_mail, unique_recipient, wait_for_count};
use crate::helpers::spawn_built;
use crate::queue::{mail, queue_settings, stores, wait_status};
use crate::require_peer;

const KEY: &[u8] = b"a webhook key of more than 16 bytes";

/// One call the receiver got.
#[derive(Debug, Clone)]
struct Call {
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A loopback receiver that answers `503` to the first `failures` calls and `204` after.
async fn receiver(failures: usize) -> (String, Arc<Mutex<Vec<Call>>>) {
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let seen = calls.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let mut calls = seen.lock().unwrap();
                calls.push(Call {
                    headers,
                    body: body.to_vec(),
                });
                if calls.len() <= failures {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

async fn wait_calls(calls: &Mutex<Vec<Call>>, count: usize, timeout: Duration) -> Vec<Call> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = calls.lock().unwrap().clone();
        if now.len() >= count || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn header<'a>(call: &'a Call, name: &str) -> &'a str {
    call.headers[name].to_str().unwrap()
}

#[tokio::test]
async fn a_failed_mail_is_reported_to_the_webhook_signed_and_again_until_a_2xx() {
    let peer = require_peer!();
    let dir = tempfile::tempdir().unwrap();
    for store in stores(&dir, "a_failed_mail_is_reported_to_the_webhook").await {
        let (url, calls) = receiver(1).await;
        let mut settings = queue_settings(&peer, peer.plain_port, &store);
        settings.relay.queue.webhook = Some(WebhookSettings {
            url: url.parse().unwrap(),
            key: SecretBytes::new(KEY.to_vec()),
        });
        let app = spawn_built(settings).await;
        app.wait_ready().await;

        let denied: Value = app
            .post_queued(&mail(&peer.sendas_denied, "webhook"))
            .await
            .json()
            .await
            .unwrap();
        let id = denied["id"].as_str().unwrap();
        wait_status(&app, id, Duration::from_secs(15), |s| {
            s["status"] == "failed"
        })
        .await;

        // The first call gets a 503; the second, a couple of seconds later, its 204.
        let got = wait_calls(&calls, 2, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 2, "{:?}: {got:?}", store.url);
        for call in &got {
            let signature = sign(
                KEY,
                header(call, "webhook-id"),
                header(call, "webhook-timestamp"),
                &call.body,
            );
            assert_eq!(header(call, "webhook-signature"), signature);
            assert_eq!(header(call, "content-type"), "application/json");
        }
        assert_eq!(
            header(&got[0], "webhook-id"),
            header(&got[1], "webhook-id"),
            "a repeat carries the same id, so the receiver can drop it"
        );
        assert!(header(&got[0], "webhook-id").starts_with(id));
        let event: Value = serde_json::from_slice(&got[1].body).unwrap();
        assert_eq!(event["type"], "mail.failed", "{event:#}");
        assert_eq!(event["data"]["id"], id);
        assert_eq!(event["data"]["status"], "failed");
        assert_eq!(event["data"]["problem"]["code"], "send_as_denied");
        assert_eq!(event["data"]["caller"], "key:tests");
        assert_eq!(event["timestamp"], event["data"]["finishedAt"]);

        // After the 2xx, no more calls.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(calls.lock().unwrap().len(), 2, "{:?}", store.url);
    }
}

#[tokio::test]
async fn undelivered_mails_reach_the_administrators_in_one_mail_not_one_each() {
    let peer = require_peer!();
    let dir = tempfile::tempdir().unwrap();
    let stores = stores(&dir, "undelivered_mails_reach_the_administrators").await;
    let store = stores.last().unwrap();
    let admin = unique_recipient("undelivered");
    let mut settings = queue_settings(&peer, peer.plain_port, store);
    settings.relay.admin_mail = Some(AdminMailSettings {
        from: "app@contoso.test".parse().unwrap(),
        recipients: vec![admin.parse().unwrap()],
    });
    let app = spawn_built(settings).await;
    app.wait_ready().await;

    let mut ids = Vec::new();
    for n in 0..5 {
        // The peer accepts only recipients @contoso.test: `554 5.7.1 Relay access denied`.
        let mut refused = mail("app@contoso.test", &format!("admin {n}"));
        refused["to"] = format!("someone-{n}@elsewhere.test").into();
        let denied: Value = app.post_queued(&refused).await.json().await.unwrap();
        let id = denied["id"].as_str();
        ids.push(id.unwrap_or_else(|| panic!("{denied}")).to_owned());
    }
    for id in &ids {
        wait_status(&app, id, Duration::from_secs(15), |s| {
            s["status"] == "failed"
        })
        .await;
    }
    let notices = wait_for_count(&peer, &admin, 1).await;
    assert_eq!(notices.len(), 1, "one notice");
    let (subject, headers, text) = read_mail(&notices[0]);
    assert!(
        subject.contains("queued mail(s) not delivered"),
        "{subject}"
    );
    assert!(
        headers.contains("Auto-Submitted: auto-generated"),
        "{headers}"
    );
    assert!(text.contains(&format!("- failed {}", ids[0])), "{text}");
    assert!(text.contains("Relay access denied"), "{text}");

    // The other failures wait for the next hour's notice: five failures, one mail.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        peer.find_messages(&admin).len(),
        1,
        "no second notice within the hour"
    );
}
