//! Queued delivery against the real peer (Postfix's plain port) and the real stores: an SQLite
//! file, and PostgreSQL in a schema of the test's own (its workers must not claim another
//! test's mails). Mails are counted by Message-ID in the peer's Maildir.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mail_relay::config::{
    Delivery, Encryption, QueueMode, Settings, SmtpAuthentication, StoreSettings, StoreUrl,
    cipher::{self, EncryptionKey},
};
use mail_relay::queue::{Attempt, Enqueued, Finish, MailState, NewMail};
use serde_json::{Value, json};
use sqlx::Connection;

use crate::helpers::{TestApp, spawn_built, test_settings};
use crate::peer::Peer;
use crate::require_peer;
use crate::store::{now_ms, open};
use crate::store_settings::postgres;

/// The stores a test runs on: SQLite in `dir`, and PostgreSQL in a fresh schema (under
/// `CI=true` PostgreSQL must be there).
pub(crate) async fn stores(dir: &tempfile::TempDir, test: &str) -> Vec<StoreSettings> {
    let mut stores = vec![StoreSettings {
        url: StoreUrl::Sqlite(dir.path().join("queue.db")),
        ..StoreSettings::default()
    }];
    match postgres() {
        Some(settings) => stores.push(own_schema(settings).await),
        None => crate::peer::missing("PostgreSQL store", "tests/store/start.sh", test),
    }
    stores
}

/// `settings` with a `search_path` of a new schema: the relay's tables are made there.
async fn own_schema(mut settings: StoreSettings) -> StoreSettings {
    let StoreUrl::Postgres(url) = &settings.url else {
        unreachable!()
    };
    let schema = format!("q_{}", uuid::Uuid::new_v4().simple());
    let mut with_password = url.clone();
    if let Some(password) = &settings.password {
        use secrecy::ExposeSecret;
        with_password
            .set_password(Some(password.expose_secret()))
            .unwrap();
    }
    let mut connection = sqlx::PgConnection::connect(with_password.as_str())
        .await
        .unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut connection)
        .await
        .unwrap();
    let mut url = url.clone();
    url.query_pairs_mut()
        .append_pair("options", &format!("-c search_path={schema}"));
    settings.url = StoreUrl::Postgres(url);
    settings
}

/// The relay on `store`, sending to `port` on the peer's host without TLS or login (Postfix's
/// plain port keeps the Exchange-like refusals after DATA), retrying after 1 to 2 s.
pub(crate) fn queue_settings(peer: &Peer, port: u16, store: &StoreSettings) -> Settings {
    let mut settings = test_settings(std::env::temp_dir());
    settings.relay.delivery = Delivery::Smtp;
    settings.send_email.smtp_server = peer.host.clone();
    settings.send_email.smtp_port = port;
    settings.send_email.smtp_encryption = Encryption::None;
    settings.send_email.smtp_authentication = SmtpAuthentication::None;
    settings.relay.smtp.send_deadline = Duration::from_secs(5);
    settings.relay.store = store.clone();
    settings.relay.queue.retry_min = Duration::from_secs(1);
    settings.relay.queue.retry_max = Duration::from_secs(2);
    settings
}

pub(crate) fn mail(from: &str, marker: &str) -> Value {
    json!({"from": from, "to": "alice@contoso.test", "subject": marker, "text": "queued"})
}

async fn status(app: &TestApp, id: &str) -> Value {
    let response = app.get_status(id).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Poll `GET /mail/{id}` until `done` holds for the status, or panic after `timeout`.
pub(crate) async fn wait_status(
    app: &TestApp,
    id: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = status(app, id).await;
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not get there: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn copies(peer: &Peer, message_id: &str) -> usize {
    peer.find_messages(&format!("Message-ID: {message_id}"))
        .len()
}

#[tokio::test]
async fn a_queued_mail_is_committed_delivered_once_and_its_status_shown_only_to_its_caller() {
    let peer = require_peer!();
    let dir = tempfile::tempdir().unwrap();
    for store in stores(&dir, "a_queued_mail_is_committed_delivered_once").await {
        let app = spawn_built(queue_settings(&peer, peer.plain_port, &store)).await;
        app.wait_ready().await;
        let marker = format!("queued-{}", uuid::Uuid::new_v4());

        let response = app.post_queued(&mail("app@contoso.test", &marker)).await;
        assert_eq!(response.status(), 202, "{:?}", store.url);
        assert_eq!(response.headers()["preference-applied"], "respond-async");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "queued", "{body}");
        let id = body["id"].as_str().unwrap();
        assert_eq!(location, format!("/mail/{id}"));
        let message_id = body["messageId"].as_str().unwrap();

        let sent = wait_status(&app, id, Duration::from_secs(15), |s| s["status"] == "sent").await;
        assert_eq!(
            sent["acceptedRecipients"],
            json!(["alice@contoso.test"]),
            "{sent:#}"
        );
        assert_eq!(sent["attemptCount"], 1);
        assert_eq!(sent["attempts"][0]["kind"], "sent");
        assert!(
            sent["attempts"][0]["reply"]
                .as_str()
                .unwrap()
                .starts_with("250"),
            "{sent:#}"
        );
        assert!(sent["finishedAt"].is_string() && sent.get("nextAttemptAt").is_none());
        peer.wait_for_message(message_id, Duration::from_secs(10))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(copies(&peer, message_id), 1, "delivered exactly once");

        // An unknown id and a malformed one: the same 404 (another caller's: see below).
        for path in [
            format!("/mail/{}", uuid::Uuid::now_v7()),
            "/mail/..%2Fetc".to_owned(),
        ] {
            crate::helpers::expect_problem(app.get(&path).await, 404, "not_found").await;
        }

        // Without the preference the same relay still answers after the server took the mail.
        let sync = app
            .post_mail(&mail("app@contoso.test", &format!("{marker}-sync")))
            .await;
        assert_eq!(sync.status(), 202);
        assert!(sync.headers().get("preference-applied").is_none());
        let sync: Value = sync.json().await.unwrap();
        assert_eq!(sync["acceptedRecipients"], json!(["alice@contoso.test"]));
        crate::helpers::expect_problem(
            app.get_status(sync["id"].as_str().unwrap()).await,
            404,
            "not_found",
        )
        .await;
    }
}

#[tokio::test]
async fn another_caller_cannot_see_a_queued_mail() {
    let peer = require_peer!();
    let dir = tempfile::tempdir().unwrap();
    let store = stores(&dir, "another_caller_cannot_see_a_queued_mail")
        .await
        .remove(0);
    let mut settings = queue_settings(&peer, peer.plain_port, &store);
    let other_key = "mr_the-other-service";
    settings
        .relay
        .auth
        .api_keys
        .push(mail_relay::config::ApiKeySettings {
            name: "other".into(),
            sha256: <sha2::Sha256 as sha2::Digest>::digest(other_key.as_bytes()).into(),
            allowed_from: vec![
                mail_relay::config::AddressPattern::parse("*@contoso.test").unwrap(),
            ],
            identities: Vec::new(),
        });
    let app = spawn_built(settings).await;
    app.wait_ready().await;
    let body: Value = app
        .post_queued(&mail("app@contoso.test", "scoped"))
        .await
        .json()
        .await
        .unwrap();
    let id = body["id"].as_str().unwrap();
    assert_eq!(status(&app, id).await["id"], id);
    let theirs = reqwest::Client::new()
        .get(app.url(&format!("/mail/{id}")))
        .bearer_auth(other_key)
        .send()
        .await
        .unwrap();
    let problem = crate::helpers::expect_problem(theirs, 404, "not_found").await;
    assert!(
        !problem.to_string().contains("app@contoso.test"),
        "{problem}"
    );
}

#[tokio::test]
async fn a_permanent_refusal_ends_failed_with_its_fix_and_a_432_waits_for_a_later_attempt() {
    let peer = require_peer!();
    let dir = tempfile::tempdir().unwrap();
    for store in stores(&dir, "a_permanent_refusal_ends_failed").await {
        let mut settings = queue_settings(&peer, peer.plain_port, &store);
        settings.relay.queue.retry_min = Duration::from_secs(3);
        settings.relay.queue.retry_max = Duration::from_secs(3);
        let app = spawn_built(settings).await;
        app.wait_ready().await;

        let denied: Value = app
            .post_queued(&mail(&peer.sendas_denied, "denied"))
            .await
            .json()
            .await
            .unwrap();
        let failed = wait_status(
            &app,
            denied["id"].as_str().unwrap(),
            Duration::from_secs(15),
            |s| s["status"] == "failed",
        )
        .await;
        assert_eq!(failed["problem"]["code"], "send_as_denied", "{failed:#}");
        assert_eq!(failed["problem"]["status"], 403);
        assert!(
            failed["problem"]["detail"]
                .as_str()
                .unwrap()
                .contains("5.2.252"),
            "{failed:#}"
        );
        assert_eq!(failed["attempts"][0]["kind"], "send_as_denied");
        assert!(
            failed["attempts"][0]["reply"]
                .as_str()
                .unwrap()
                .starts_with("554 5.2.252")
        );

        let throttled: Value = app
            .post_queued(&mail(&peer.sender_throttled, "throttled"))
            .await
            .json()
            .await
            .unwrap();
        let id = throttled["id"].as_str().unwrap();
        let waiting = wait_status(&app, id, Duration::from_secs(15), |s| {
            s["attemptCount"] == 1 && s["status"] == "queued"
        })
        .await;
        let attempt = &waiting["attempts"][0];
        // The sender retries a 432 within the send deadline (5 s here); on a slow machine the
        // deadline may cut its last retry, and the attempt is then `smtp_unavailable` with the
        // 432 as its reply. Either way the mail waits for a later attempt.
        assert!(
            matches!(
                attempt["kind"].as_str(),
                Some("smtp_thread_limit" | "smtp_unavailable")
            ),
            "{waiting:#}"
        );
        assert!(attempt["reply"].as_str().unwrap().starts_with("432 4.3.2"));
        let at = time::OffsetDateTime::parse(
            attempt["at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let next = time::OffsetDateTime::parse(
            waiting["nextAttemptAt"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let pause = (next - at).as_seconds_f64();
        assert!(
            (2.3..=3.7).contains(&pause),
            "the back-off is 3 s ± 20 %, got {pause}"
        );
        // Not before that: the second attempt ends no sooner than the time the first set (the
        // server's own clock, so a slow test machine cannot make this pass or fail by chance).
        // (`attemptCount` counts a claim; the attempt is listed when it ended.)
        let second = wait_status(&app, id, Duration::from_secs(15), |s| {
            s["attempts"].as_array().map_or(0, Vec::len) == 2
        })
        .await;
        let second_at = time::OffsetDateTime::parse(
            second["attempts"][1]["at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert!(second_at >= next, "{second:#}");
        assert_eq!(copies(&peer, throttled["messageId"].as_str().unwrap()), 0);
    }
}

/// Accepts on `listener` and splices each connection to `target`, until aborted.
async fn forward(listener: tokio::net::TcpListener, target: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test]
async fn mails_queued_while_the_server_is_away_are_delivered_once_when_it_returns() {
    let peer = require_peer!();
    let dir = tempfile::tempdir().unwrap();
    for store in stores(&dir, "mails_queued_while_the_server_is_away").await {
        let port = crate::peer::closed_port();
        let app = spawn_built(queue_settings(&peer, port, &store)).await;
        app.wait_ready().await;
        let mut queued = Vec::new();
        for i in 0..20 {
            let body: Value = app
                .post_queued(&mail("app@contoso.test", &format!("away-{i}")))
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(body["status"], "queued");
            queued.push((
                body["id"].as_str().unwrap().to_owned(),
                body["messageId"].as_str().unwrap().to_owned(),
            ));
        }
        let (first, _) = &queued[0];
        let waiting = wait_status(&app, first, Duration::from_secs(10), |s| {
            s["attemptCount"].as_u64() >= Some(1) && s["status"] == "queued"
        })
        .await;
        assert_eq!(
            waiting["attempts"][0]["kind"], "smtp_unavailable",
            "{waiting:#}"
        );

        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let target: SocketAddr = format!("{}:{}", peer.host, peer.plain_port)
            .parse()
            .unwrap();
        let forwarder = tokio::spawn(forward(listener, target));
        for (id, message_id) in &queued {
            wait_status(&app, id, Duration::from_secs(20), |s| s["status"] == "sent").await;
            peer.wait_for_message(message_id, Duration::from_secs(10))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (_, message_id) in &queued {
            assert_eq!(copies(&peer, message_id), 1, "{message_id}");
        }
        let metrics = app.get("/metrics").await.text().await.unwrap();
        assert!(
            metrics.contains("mail_relay_queue_retries_total{kind=\"smtp_unavailable\"}"),
            "{metrics}"
        );
        assert!(
            metrics.contains("mail_relay_queue_attempts_total{outcome=\"sent\"} 20"),
            "{metrics}"
        );
        forwarder.abort();
    }
}

#[tokio::test]
async fn finished_mails_are_forgotten_after_their_retention() {
    let peer = require_peer!();
    let dir = tempfile::tempdir().unwrap();
    for store in stores(&dir, "finished_mails_are_forgotten").await {
        let mut settings = queue_settings(&peer, peer.plain_port, &store);
        settings.relay.queue.retention = Duration::from_secs(1);
        settings.relay.queue.mode = QueueMode::Always;
        let app = spawn_built(settings).await;
        app.wait_ready().await;
        // `always`: no preference needed, and none claimed as applied.
        let response = app.post_mail(&mail("app@contoso.test", "retained")).await;
        assert!(response.headers().get("preference-applied").is_none());
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "queued");
        let id = body["id"].as_str().unwrap();
        wait_status(&app, id, Duration::from_secs(15), |s| s["status"] == "sent").await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let response = app.get_status(id).await;
            if response.status() == 404 {
                break;
            }
            assert!(Instant::now() < deadline, "still there after its retention");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// `encryptAtRest`: the row holds the message sealed (nothing of it readable, bound to the
/// mail's id), and the worker still delivers it.
#[tokio::test]
async fn with_encrypt_at_rest_the_stored_message_is_sealed_and_still_delivered() {
    let peer = require_peer!();
    let dir = tempfile::tempdir().unwrap();
    let store = StoreSettings {
        url: StoreUrl::Sqlite(dir.path().join("sealed.db")),
        ..StoreSettings::default()
    };
    let mut settings = queue_settings(&peer, peer.plain_port, &store);
    settings.relay.queue.at_rest = Some(EncryptionKey::from_bytes(&[7; 32]));
    let app = spawn_built(settings).await;
    app.wait_ready().await;
    let marker = format!("sealed-{}", uuid::Uuid::new_v4());
    let body: Value = app
        .post_queued(&mail("app@contoso.test", &marker))
        .await
        .json()
        .await
        .unwrap();
    let id = body["id"].as_str().unwrap();
    wait_status(&app, id, Duration::from_secs(15), |s| s["status"] == "sent").await;
    assert!(
        peer.wait_for_message(&marker, Duration::from_secs(10))
            .await
            .is_some(),
        "delivered, readable"
    );
    let mut db = sqlx::SqliteConnection::connect(&format!(
        "sqlite:{}",
        dir.path().join("sealed.db").display()
    ))
    .await
    .unwrap();
    let (mime,): (Vec<u8>,) = sqlx::query_as("SELECT mime FROM queued_mails WHERE id = $1")
        .bind(id)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(cipher::is_sealed(&mime));
    let text = String::from_utf8_lossy(&mime);
    assert!(
        !text.contains(&marker) && !text.contains("Subject"),
        "{text}"
    );
    let key = EncryptionKey::from_bytes(&[7; 32]);
    let opened = cipher::open(&key, &mime, id.as_bytes()).unwrap();
    assert!(String::from_utf8_lossy(&opened).contains(&marker));
    assert!(cipher::open(&key, &mime, b"another-mail").is_err());
}

#[tokio::test]
async fn with_the_memory_store_a_preference_for_async_is_ignored() {
    let peer = require_peer!();
    let app = spawn_built(queue_settings(
        &peer,
        peer.plain_port,
        &StoreSettings::default(),
    ))
    .await;
    let response = app.post_queued(&mail("app@contoso.test", "memory")).await;
    assert_eq!(response.status(), 202);
    assert!(response.headers().get("preference-applied").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["acceptedRecipients"],
        json!(["alice@contoso.test"]),
        "sent at once: {body}"
    );
}

/// The exactness rules on the store itself, with two replicas' stores on one database: a mail
/// goes to one worker; a dead worker's claim comes back queued when it had not started the
/// upload, and ends unknown when it had; a late worker cannot overwrite what the sweep decided.
#[tokio::test]
async fn a_dead_workers_claim_is_queued_again_before_the_upload_and_unknown_after() {
    let dir = tempfile::tempdir().unwrap();
    for settings in stores(&dir, "a_dead_workers_claim").await {
        let (a, b) = (open(&settings).await, open(&settings).await);
        let (a, b) = (a.queue().unwrap(), b.queue().unwrap());
        let now = now_ms();
        let recipients = vec!["alice@contoso.test".to_owned()];
        for id in ["m-1", "m-2"] {
            a.enqueue(NewMail {
                id,
                caller: "key:tests",
                message_id: "<m@contoso.test>",
                from: "app@contoso.test",
                recipients: &recipients,
                mime: b"Subject: x\r\n\r\nhi\r\n",
                now,
                expires_at: now + 60_000,
                idempotency: None,
            })
            .await
            .unwrap();
        }
        let first = a.claim("a/0", now, now + 1_000).await.unwrap().unwrap();
        let second = b.claim("b/0", now, now + 1_000).await.unwrap().unwrap();
        assert_ne!(
            first.id, second.id,
            "{:?}: one mail, one worker",
            settings.url
        );
        assert!(b.claim("b/1", now, now + 1_000).await.unwrap().is_none());
        assert_eq!(first.attempts, 1);

        // `second` starts its upload; both workers die.
        assert!(b.mark_uploading(&second.id, "b/0", now).await.unwrap());
        assert!(
            !b.mark_uploading(&second.id, "a/0", now).await.unwrap(),
            "only the holder marks"
        );
        let swept = a.sweep(now + 500).await.unwrap();
        assert_eq!(swept.requeued + swept.unknown, 0, "leases still running");
        let swept = a.sweep(now + 1_000).await.unwrap();
        assert_eq!(
            (swept.requeued, swept.unknown),
            (1, 1),
            "{:?}",
            settings.url
        );
        let unknown = a.get(&second.id).await.unwrap().unwrap();
        assert_eq!(unknown.state, MailState::Unknown);
        assert_eq!(unknown.problem.unwrap()["code"], "smtp_outcome_unknown");

        // The late worker's "sent" does not count: the sweep decided.
        let sent = Finish::Sent {
            reply: "250 ok".into(),
            accepted: recipients.clone(),
        };
        let history = [Attempt {
            at: now,
            kind: "sent".into(),
            reply: None,
            detail: String::new(),
        }];
        assert!(
            !b.finish(&second.id, "b/0", &sent, &history, now + 1_001)
                .await
                .unwrap()
        );

        // The other mail is claimed again, by the other replica, and delivered.
        let again = b
            .claim("b/0", now + 1_000, now + 2_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.id, first.id);
        assert_eq!(again.attempts, 2);
        assert!(
            b.finish(&again.id, "b/0", &sent, &history, now + 1_100)
                .await
                .unwrap()
        );
        let record = a.get(&first.id).await.unwrap().unwrap();
        assert_eq!(record.state, MailState::Sent);
        assert_eq!(record.accepted, Some(recipients.clone()));

        // An operator's retry of the unknown one, and a drop.
        assert!(
            a.requeue(&second.id, now + 2_000, now + 60_000)
                .await
                .unwrap()
        );
        assert_eq!(
            a.get(&second.id).await.unwrap().unwrap().state,
            MailState::Queued
        );
        assert!(a.remove(&second.id).await.unwrap());
        assert!(a.get(&second.id).await.unwrap().is_none());
        let depth = a.depth().await.unwrap();
        assert_eq!(depth.count(MailState::Sent), 1);
        assert_eq!(a.forget_finished(now + 10_000).await.unwrap(), 1);
    }
}

/// The Idempotency-Key goes into the mail's row in the same commit: a second enqueue with the
/// caller's key (a retry whose first answer was lost with its replica) finds the first mail
/// instead of queueing another, and tells a different request body apart.
#[tokio::test]
async fn a_key_commits_one_mail_per_caller_whoever_retries_it() {
    let dir = tempfile::tempdir().unwrap();
    for settings in stores(&dir, "a_key_commits_one_mail_per_caller").await {
        let (a, b) = (open(&settings).await, open(&settings).await);
        let (a, b) = (a.queue().unwrap(), b.queue().unwrap());
        let now = now_ms();
        let recipients = vec!["alice@contoso.test".to_owned()];
        let new_mail = |id: &'static str,
                        caller: &'static str,
                        key: Option<&'static str>,
                        print: &'static [u8]| NewMail {
            id,
            caller,
            message_id: id,
            from: "app@contoso.test",
            recipients: &recipients,
            mime: b"Subject: x\r\n\r\nhi\r\n",
            now,
            expires_at: now + 60_000,
            idempotency: key.map(|k| (k, print)),
        };
        let first = a
            .enqueue(new_mail("m-1", "key:app", Some("k-1"), b"one"))
            .await;
        assert_eq!(first.unwrap(), Enqueued::New, "{:?}", settings.url);
        let retried = b
            .enqueue(new_mail("m-2", "key:app", Some("k-1"), b"one"))
            .await;
        assert_eq!(
            retried.unwrap(),
            Enqueued::Earlier {
                id: "m-1".into(),
                message_id: "m-1".into(),
                same_request: true
            },
            "{:?}: the retry finds the first mail",
            settings.url
        );
        let other_body = b
            .enqueue(new_mail("m-3", "key:app", Some("k-1"), b"two"))
            .await;
        assert!(matches!(
            other_body.unwrap(),
            Enqueued::Earlier {
                same_request: false,
                ..
            }
        ));
        // Keys are per caller; mails without one never conflict.
        for (id, caller, key) in [
            ("m-4", "key:other", Some("k-1")),
            ("m-5", "key:app", None),
            ("m-6", "key:app", None),
        ] {
            let enqueued = a.enqueue(new_mail(id, caller, key, b"one")).await;
            assert_eq!(enqueued.unwrap(), Enqueued::New, "{id}");
        }
        assert!(a.get("m-2").await.unwrap().is_none());
        assert_eq!(a.depth().await.unwrap().count(MailState::Queued), 4);
    }
}

/// `mail-relay queue list|show|retry|drop`, through the built binary on an SQLite store that
/// holds a queued, a failed and a sent mail.
#[tokio::test]
async fn the_queue_commands_list_show_retry_and_drop_mails() {
    use crate::cli::{SECRET, run, text, valid_yaml, write_config};

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let settings = StoreSettings {
        url: StoreUrl::Sqlite(db.clone()),
        ..StoreSettings::default()
    };
    let queue = open(&settings).await.queue().unwrap();
    let now = now_ms();
    let recipients = vec!["alice@contoso.test".to_owned()];
    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    for id in &ids {
        queue
            .enqueue(NewMail {
                id,
                caller: "key:tests",
                message_id: "<m@contoso.test>",
                from: "app@contoso.test",
                recipients: &recipients,
                mime: b"Subject: x\r\n\r\nhi\r\n",
                now,
                expires_at: now + 60_000,
                idempotency: None,
            })
            .await
            .unwrap();
    }
    let history = [Attempt {
        at: now,
        kind: "smtp_rejected".into(),
        reply: Some("550 5.7.1 no".into()),
        detail: "refused".into(),
    }];
    let mut ended = Vec::new();
    for end in [
        Finish::Failed {
            problem: json!({"code": "smtp_rejected"}),
        },
        Finish::Sent {
            reply: "250 ok".into(),
            accepted: recipients.clone(),
        },
    ] {
        let claimed = queue
            .claim("t/0", now, now + 60_000)
            .await
            .unwrap()
            .unwrap();
        assert!(
            queue
                .finish(&claimed.id, "t/0", &end, &history, now)
                .await
                .unwrap()
        );
        ended.push(claimed.id);
    }
    let (failed, sent) = (&ended[0], &ended[1]);
    let queued = ids.iter().find(|id| !ended.contains(id)).unwrap();

    let yaml = format!(
        "{}mailRelay:\n  store:\n    url: sqlite:{}\n",
        valid_yaml(SECRET),
        db.display()
    );
    let config = write_config(dir.path(), &yaml);
    let queue_cmd = |args: &[&str]| {
        let mut all = vec!["--config", config.as_str(), "queue"];
        all.extend_from_slice(args);
        run(&all, &[])
    };

    let out = queue_cmd(&["list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    for (id, state) in [(queued, "queued"), (failed, "failed"), (sent, "sent")] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap();
        assert!(line.contains(state), "{line}");
    }
    assert!(
        listing.contains("3 shown; in the store: queued 1, sending 0, sent 1, failed 1"),
        "{listing}"
    );
    let out = queue_cmd(&["list", "--state", "failed"]);
    let listing = text(&out.stdout);
    assert!(listing.contains(failed.as_str()) && !listing.contains(sent.as_str()));
    let out = queue_cmd(&["list", "--state", "lost"]);
    assert_eq!(out.status.code(), Some(2), "a bad state is a usage error");
    assert!(text(&out.stderr).contains("one of queued, sending"));

    let out = queue_cmd(&["show", failed]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("caller:     key:tests"), "{shown}");
    let status: Value = serde_json::from_str(&shown[shown.find('{').unwrap()..]).unwrap();
    assert_eq!(status["status"], "failed");
    assert_eq!(status["problem"]["code"], "smtp_rejected");
    assert_eq!(status["attempts"][0]["reply"], "550 5.7.1 no");

    // A failed mail is queued again; a sent one is not sent twice.
    let out = queue_cmd(&["retry", failed]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let record = queue.get(failed).await.unwrap().unwrap();
    assert_eq!(record.state, MailState::Queued);
    assert!(record.problem.is_none());
    let out = queue_cmd(&["retry", sent]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("was sent"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        queue.get(sent).await.unwrap().unwrap().state,
        MailState::Sent
    );

    let out = queue_cmd(&["drop", queued]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(queue.get(queued).await.unwrap().is_none());
    for missing in [queued.as_str(), "not-an-id"] {
        let out = queue_cmd(&["show", missing]);
        assert_eq!(out.status.code(), Some(1), "{missing}");
    }

    // Without a store there is no queue to act on: a settings error.
    let out = run(
        &[
            "--config",
            &write_config(dir.path(), &valid_yaml(SECRET)),
            "queue",
            "list",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("mailRelay.store.url"));
}
