//! The SQL stores against real databases: an SQLite file, and the private PostgreSQL that
//! `tests/store/start.sh` runs. Each test opens two stores on one database, as two replicas
//! would, and checks that they see one truth.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use mail_relay::config::{IdempotencySettings, StoreSettings, StoreUrl};
use mail_relay::idempotency::{
    Fingerprint, IdempotencyKey, IdempotencyStore, Slot, StoredResponse,
};
use mail_relay::rate_limit::{Ask, LimitError, LimitKey, LimitKind, RateLimiter};
use mail_relay::store::Store;
use secrecy::SecretString;

use crate::helpers::{TestApp, spawn_app};
use crate::store_settings::postgres;

/// The stores every test runs against: SQLite in `dir`, and PostgreSQL when it runs (under
/// `CI=true` it must).
fn stores(dir: &tempfile::TempDir, test: &str) -> Vec<StoreSettings> {
    let mut stores = vec![StoreSettings {
        url: StoreUrl::Sqlite(dir.path().join("relay.db")),
        ..StoreSettings::default()
    }];
    match postgres() {
        Some(settings) => stores.push(settings),
        None => crate::peer::missing("PostgreSQL store", "tests/store/start.sh", test),
    }
    stores
}

pub(crate) async fn open(settings: &StoreSettings) -> Store {
    let store = Store::open(settings).unwrap();
    assert!(
        store.wait_until_migrated(Duration::from_secs(20)).await,
        "{:?}: {:?}",
        settings.url,
        store.state()
    );
    store
}

fn idempotency_settings(ttl: Duration) -> IdempotencySettings {
    IdempotencySettings {
        ttl,
        max_entries: 1_000,
        max_bytes: 4 * 1024 * 1024,
    }
}

fn sql_idempotency(store: &Store, ttl: Duration) -> Arc<dyn IdempotencyStore> {
    let mut settings = crate::helpers::test_settings(std::env::temp_dir());
    settings.relay.idempotency = idempotency_settings(ttl);
    store.idempotency(&settings)
}

pub(crate) fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn answer(id: &str) -> StoredResponse {
    StoredResponse {
        status: StatusCode::ACCEPTED,
        headers: vec![(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body: format!(r#"{{"messageId":"<{id}@relay>"}}"#).into(),
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

#[tokio::test]
async fn a_claim_is_seen_by_every_replica_and_its_answer_replayed_by_any() {
    let dir = tempfile::tempdir().unwrap();
    for settings in stores(&dir, "a_claim_is_seen_by_every_replica") {
        let (a, b) = (open(&settings).await, open(&settings).await);
        let (a, b) = (
            sql_idempotency(&a, Duration::from_secs(3600)),
            sql_idempotency(&b, Duration::from_secs(3600)),
        );
        let scope = unique("key:shop");
        let key = IdempotencyKey::parse(unique("order").as_bytes()).unwrap();
        let body = Fingerprint::of(b"the mail");
        let now = now_ms();

        let Slot::New { token } = a.begin(&scope, &key, body, now).await.unwrap() else {
            panic!("the first claim wins");
        };
        assert!(
            matches!(
                b.begin(&scope, &key, body, now).await.unwrap(),
                Slot::InProgress
            ),
            "{:?}: the other replica sees the claim",
            settings.url
        );
        assert!(matches!(
            b.begin(&scope, &key, Fingerprint::of(b"another mail"), now)
                .await
                .unwrap(),
            Slot::Conflict
        ));
        // Another caller may use the same key for its own mail.
        assert!(matches!(
            b.begin(&unique("key:other"), &key, body, now)
                .await
                .unwrap(),
            Slot::New { .. }
        ));

        a.complete(&scope, &key, token, answer("m1"), now + 5).await;
        match b.begin(&scope, &key, body, now + 10).await.unwrap() {
            Slot::Replay(stored) => assert_eq!(stored, answer("m1"), "{:?}", settings.url),
            other => panic!("{:?}: {other:?}", settings.url),
        }
    }
}

#[tokio::test]
async fn an_abandoned_claim_frees_the_key_and_an_expired_answer_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    for settings in stores(&dir, "an_abandoned_claim_frees_the_key") {
        let (a, b) = (open(&settings).await, open(&settings).await);
        let ttl = Duration::from_secs(60);
        let (a, b) = (sql_idempotency(&a, ttl), sql_idempotency(&b, ttl));
        let scope = unique("key:shop");
        let key = IdempotencyKey::parse(unique("order").as_bytes()).unwrap();
        let body = Fingerprint::of(b"the mail");
        let now = now_ms();

        let Slot::New { token } = a.begin(&scope, &key, body, now).await.unwrap() else {
            panic!("the first claim wins");
        };
        a.abandon(&scope, &key, token);
        let mut freed = false;
        for _ in 0..100 {
            if let Slot::New { token } = b.begin(&scope, &key, body, now).await.unwrap() {
                b.complete(&scope, &key, token, answer("m2"), now).await;
                freed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            freed,
            "{:?}: the abandoned claim was never removed",
            settings.url
        );
        assert!(matches!(
            a.begin(&scope, &key, body, now + 59_000).await.unwrap(),
            Slot::Replay(_)
        ));
        // Past the TTL the record counts for nothing: the key is new again, on any replica.
        assert!(
            matches!(
                a.begin(&scope, &key, body, now + 61_000).await.unwrap(),
                Slot::New { .. }
            ),
            "{:?}",
            settings.url
        );
    }
}

#[tokio::test]
async fn the_byte_bound_is_kept_in_sql_by_forgetting_the_heaviest_callers_oldest_answers() {
    let dir = tempfile::tempdir().unwrap();
    for settings in stores(&dir, "the_byte_bound_is_kept_in_sql") {
        let store = open(&settings).await;
        let mut relay = crate::helpers::test_settings(std::env::temp_dir());
        relay.relay.idempotency = IdempotencySettings {
            ttl: Duration::from_secs(3600),
            max_entries: 100_000,
            max_bytes: 1024 * 1024,
        };
        let records = store.idempotency(&relay);
        let (heavy, light) = (unique("key:heavy"), unique("key:light"));
        let now = now_ms();
        let light_key = IdempotencyKey::parse(b"light-1").unwrap();
        let Slot::New { token } = records
            .begin(&light, &light_key, Fingerprint::of(b"l"), now)
            .await
            .unwrap()
        else {
            panic!("new");
        };
        records
            .complete(&light, &light_key, token, answer("light"), now)
            .await;
        // 300 answers of 8 KiB, one every 100 ms: 2.4 MiB from one caller in 30 s, over the
        // 1 MiB bound (each replica checks the bound at most every 10 s).
        let big = StoredResponse {
            body: vec![b'x'; 8 * 1024].into(),
            ..answer("big")
        };
        for n in 0..300 {
            let key = IdempotencyKey::parse(format!("heavy-{n}").as_bytes()).unwrap();
            let Slot::New { token } = records
                .begin(&heavy, &key, Fingerprint::of(b"h"), now + n * 100)
                .await
                .unwrap()
            else {
                panic!("new");
            };
            records
                .complete(&heavy, &key, token, big.clone(), now + n * 100)
                .await;
        }
        let first = IdempotencyKey::parse(b"heavy-0").unwrap();
        assert!(
            matches!(
                records
                    .begin(&heavy, &first, Fingerprint::of(b"h"), now + 40_000)
                    .await
                    .unwrap(),
                Slot::New { .. }
            ),
            "{:?}: the heavy caller's oldest answer is forgotten",
            settings.url
        );
        let last = IdempotencyKey::parse(b"heavy-299").unwrap();
        assert!(matches!(
            records
                .begin(&heavy, &last, Fingerprint::of(b"h"), now + 40_000)
                .await
                .unwrap(),
            Slot::Replay(_)
        ));
        assert!(
            matches!(
                records
                    .begin(&light, &light_key, Fingerprint::of(b"l"), now + 40_000)
                    .await
                    .unwrap(),
                Slot::Replay(_)
            ),
            "{:?}: another caller's answer stays",
            settings.url
        );
    }
}

fn ask(kind: LimitKind, subject: &str, cost: u32, max: u32) -> Ask {
    Ask {
        key: LimitKey {
            kind,
            subject: subject.to_owned(),
        },
        cost,
        max: NonZeroU32::new(max).unwrap(),
    }
}

#[tokio::test]
async fn a_limit_is_counted_across_replicas_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for settings in stores(&dir, "a_limit_is_counted_across_replicas") {
        let replicas: Vec<Arc<dyn RateLimiter>> = vec![
            open(&settings).await.rate_limiter(),
            open(&settings).await.rate_limiter(),
            open(&settings).await.rate_limiter(),
        ];
        let mailbox = unique("relay@contoso.test");
        let now = now_ms();
        // 30 concurrent requests over three replicas against 10 a minute.
        let attempts = (0..30).map(|n| {
            let limiter = Arc::clone(&replicas[n % 3]);
            let asks = vec![ask(LimitKind::MailboxMessages, &mailbox, 1, 10)];
            async move { limiter.check_and_reserve(&asks, now + n as u64).await }
        });
        let results = futures_util::future::join_all(attempts).await;
        let reserved = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(reserved, 10, "{:?}: {results:?}", settings.url);
        for refusal in results.iter().filter_map(|r| r.as_ref().err()) {
            let LimitError::Limited(limited) = refusal else {
                panic!("{refusal:?}");
            };
            assert!(
                // Counted per second in SQL: up to a second more than the memory limiter.
                limited.retry_after <= Duration::from_secs(61),
                "{limited:?}"
            );
            assert!(
                limited.retry_after >= Duration::from_secs(59),
                "{limited:?}"
            );
        }
        // A refusal on one limit reserves nothing on the others.
        let caller = unique("key:shop");
        let both = vec![
            ask(LimitKind::CallerMessages, &caller, 1, 100),
            ask(LimitKind::MailboxMessages, &mailbox, 1, 10),
        ];
        assert!(
            replicas[0]
                .check_and_reserve(&both, now + 100)
                .await
                .is_err()
        );
        let only_caller = vec![ask(LimitKind::CallerMessages, &caller, 100, 100)];
        let full = replicas[1]
            .check_and_reserve(&only_caller, now + 100)
            .await
            .expect("the refused request took nothing from the caller's limit");
        // Given back on one replica, the quota is free on another.
        replicas[1].release(full).await;
        assert!(
            replicas[2]
                .check_and_reserve(&only_caller, now + 200)
                .await
                .is_ok()
        );
        // A minute (and the second a stored counter spans) later the window has room again.
        let later = vec![ask(LimitKind::MailboxMessages, &mailbox, 1, 10)];
        assert!(
            replicas[0]
                .check_and_reserve(&later, now + 61_030)
                .await
                .is_ok()
        );
    }
}

#[tokio::test]
async fn a_quota_block_holds_on_every_replica_for_the_window() {
    let dir = tempfile::tempdir().unwrap();
    for settings in stores(&dir, "a_quota_block_holds_on_every_replica") {
        let (a, b) = (
            open(&settings).await.rate_limiter(),
            open(&settings).await.rate_limiter(),
        );
        let mailbox = unique("relay@contoso.test");
        let now = now_ms();
        let asks = vec![ask(LimitKind::MailboxRecipients, &mailbox, 1, 10_000)];
        a.block(&asks[0].key, now).await;
        match b.check_and_reserve(&asks, now + 1_000).await {
            Err(LimitError::Limited(limited)) => {
                assert!(
                    limited.retry_after > Duration::from_secs(86_000),
                    "{limited:?}"
                )
            }
            other => panic!("{:?}: {other:?}", settings.url),
        }
        let after = now + 86_400_000 + 60_000;
        assert!(
            b.check_and_reserve(&asks, after).await.is_ok(),
            "{:?}",
            settings.url
        );
    }
}

/// A store nobody answers at: a closed loopback port.
fn unreachable_store() -> StoreSettings {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    StoreSettings {
        url: StoreUrl::Postgres(
            format!("postgres://relay@127.0.0.1:{port}/relay")
                .parse()
                .unwrap(),
        ),
        password: Some(SecretString::from("not-shown-anywhere")),
        connect_timeout: Duration::from_secs(1),
        ..StoreSettings::default()
    }
}

/// An app with `store` and the mailbox's default limit of 30 a minute, so that every mail
/// asks the store (its limit; its Idempotency-Key when it has one).
async fn app_with_store(store: StoreSettings) -> TestApp {
    crate::helpers::spawn_app_with(|settings| {
        settings.relay.store = store;
        settings.relay.rate_limits.mailbox_messages_per_minute = NonZeroU32::new(30);
    })
    .await
}

#[tokio::test]
async fn without_its_store_the_relay_sends_nothing_and_says_why() {
    let app = app_with_store(unreachable_store()).await;
    let (status, body) = app.get_ready().await;
    assert_eq!(status, 503);
    assert_eq!(body["components"]["store"]["kind"], "postgres", "{body}");
    assert_eq!(body["components"]["store"]["status"], "failing", "{body}");
    assert!(
        body["reason"].as_str().unwrap().starts_with("store:"),
        "{body}"
    );
    assert!(!body.to_string().contains("not-shown-anywhere"));

    for key in [Some("order-1"), None] {
        let mut request = app.mail_request().json(&serde_json::json!({
            "from": "app@contoso.test", "to": "a@contoso.test", "subject": "s", "text": "t"
        }));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 503, "key {key:?}");
        assert!(response.headers().contains_key("retry-after"));
        let problem: serde_json::Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "store_unavailable", "{problem}");
        assert!(!problem.to_string().contains("not-shown-anywhere"));
    }
    assert!(
        crate::helpers::outbox_files(&app).is_empty(),
        "nothing was sent unchecked"
    );
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("mail_relay_store_up{store=\"postgres\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn with_a_memory_store_readiness_shows_it_and_sql_metrics_are_absent() {
    let app = spawn_app().await;
    let (_, body) = app.get_ready().await;
    assert_eq!(body["components"]["store"]["kind"], "memory", "{body}");
    assert_eq!(body["components"]["store"]["status"], "ok", "{body}");
}

#[tokio::test]
async fn a_send_as_denial_seen_by_one_replica_is_known_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    for settings in stores(&dir, "a_send_as_denial_seen_by_one_replica") {
        let (a, b) = (
            open(&settings).await.denial_memory(),
            open(&settings).await.denial_memory(),
        );
        let address = unique("shared@contoso.test");
        let now = now_ms();
        assert!(!b.denied_since(&address, now - 1_000).await.unwrap());
        a.remember(&address, now).await.unwrap();
        assert!(
            b.denied_since(&address, now - 1_000).await.unwrap(),
            "{:?}",
            settings.url
        );
        assert!(
            !b.denied_since(&address, now + 1).await.unwrap(),
            "older than the memory"
        );
    }
}

#[tokio::test]
async fn diagnose_names_the_layer_that_fails() {
    let Some(pg) = postgres() else {
        return crate::peer::missing("PostgreSQL store", "tests/store/start.sh", "diagnose_store");
    };
    let StoreUrl::Postgres(url) = &pg.url else {
        unreachable!()
    };
    let closed = unreachable_store();
    let StoreUrl::Postgres(closed_url) = &closed.url else {
        unreachable!()
    };
    let cases = [
        (
            url.as_str(),
            "not-the-password",
            "FAIL store",
            "authentication:",
        ),
        (closed_url.as_str(), "x", "FAIL store", "TCP:"),
        (
            url.as_str(),
            "store-test-password",
            "PASS store",
            "reachable, logged in",
        ),
    ];
    for (url, password, status, words) in cases {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mail-relay"))
            .args(["diagnose", "--config", "config/dev.yml"])
            .env("MAILRELAY_STORE_URL", url)
            .env("MAILRELAY_STORE_PASSWORD", password)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text
            .lines()
            .skip_while(|l| !l.starts_with(status))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(line.contains(words), "{url}: {text}");
        assert!(!text.contains(password) || password == "x", "{text}");
    }
}
