//! Rate limits and Idempotency-Key over HTTP: a handler wired the way `POST /mail` uses them
//! (authenticate -> idempotency -> reserve quota -> send -> keep or refund), sending into an
//! outbox folder so the tests count what was really sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use lettre::address::Envelope;
use mail_relay::api::ApiError;
use mail_relay::caller::Caller;
use mail_relay::clock::ManualClock;
use mail_relay::config::{IdempotencySettings, RateLimitSettings};
use mail_relay::delivery::{DeliveryError, MailSender, Outbox, Receipt};
use mail_relay::idempotency::{Fingerprint, Idempotency, IdempotencyKey, InMemoryStore};
use mail_relay::message::OutgoingMail;
use mail_relay::rate_limit::{InMemoryRateLimiter, LimitError, RateLimits};
use tower::ServiceExt;

const T0: u64 = 1_700_000_000_000;

#[derive(Clone)]
struct Relay {
    limits: RateLimits,
    idempotency: Idempotency,
    sender: Arc<dyn MailSender>,
}

/// Fails every send while `down` is set, before any server accepted anything.
struct Flaky {
    inner: Outbox,
    down: Arc<AtomicBool>,
}

#[async_trait]
impl MailSender for Flaky {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(DeliveryError::Outbox {
                path: "(down)".into(),
                source: std::io::Error::other("server unreachable"),
            });
        }
        self.inner.send(mail).await
    }
}

fn problem(status: StatusCode, code: &str, detail: String) -> Response {
    let body = serde_json::json!({ "status": status.as_u16(), "code": code, "detail": detail });
    (status, axum::Json(body)).into_response()
}

/// The body is `{"to": ["a@x.com", ...]}`; the caller is the API key named in `x-caller`.
async fn post_mail(State(relay): State<Relay>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = Caller::ApiKey {
        name: headers["x-caller"].to_str().unwrap().to_owned(),
        allowed_from: Arc::from(Vec::new()),
    };
    let key = match IdempotencyKey::from_headers(&headers) {
        Ok(key) => key,
        Err(e) => {
            let (status, code) = e.status_and_code();
            return problem(status, code, e.to_string());
        }
    };
    let send = || async {
        let to: Vec<String> = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["to"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let reservation = match relay.limits.reserve(&caller, to.len()).await {
            Ok(reservation) => reservation,
            Err(LimitError::Limited(limited)) => {
                // The API's own error, as POST /mail answers it.
                return ApiError::RateLimited {
                    detail: limited.to_string(),
                    retry_after: limited.retry_after_secs(),
                }
                .into_response();
            }
            Err(e) => {
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                );
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        let mail = OutgoingMail {
            id: id.clone(),
            message_id: format!("<{id}@test>"),
            envelope: Envelope::new(
                Some("noreply@contoso.com".parse().unwrap()),
                to.iter().map(|a| a.parse().unwrap()).collect(),
            )
            .unwrap(),
            formatted: b"Subject: test\r\n\r\nbody\r\n".to_vec(),
        };
        match relay.sender.send(&mail).await {
            Ok(_) => {
                reservation.keep();
                (
                    StatusCode::ACCEPTED,
                    axum::Json(serde_json::json!({ "id": id })),
                )
                    .into_response()
            }
            Err(e) => {
                relay.limits.refund(reservation).await;
                problem(StatusCode::BAD_GATEWAY, "delivery_failed", e.to_string())
            }
        }
    };
    match relay
        .idempotency
        .run(&caller, key, Fingerprint::of(&body), send)
        .await
    {
        Ok(response) => response,
        Err(e) => {
            let (status, code) = e.status_and_code();
            problem(status, code, e.to_string())
        }
    }
}

struct Harness {
    router: Router,
    clock: ManualClock,
    outbox: tempfile::TempDir,
    down: Arc<AtomicBool>,
}

impl Harness {
    fn new(limits: RateLimitSettings) -> Self {
        let outbox = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let down = Arc::new(AtomicBool::new(false));
        let relay = Relay {
            limits: RateLimits::new(
                limits,
                "relay@contoso.com",
                Arc::new(InMemoryRateLimiter::new()),
                Arc::new(clock.clone()),
            ),
            idempotency: Idempotency::new(
                Arc::new(InMemoryStore::new(&IdempotencySettings::default())),
                Arc::new(clock.clone()),
            ),
            sender: Arc::new(Flaky {
                inner: Outbox::new(outbox.path().to_path_buf()),
                down: down.clone(),
            }),
        };
        let router = Router::new()
            .route("/mail", post(post_mail))
            .with_state(relay);
        Self {
            router,
            clock,
            outbox,
            down,
        }
    }

    async fn post(
        &self,
        caller: &str,
        key: Option<&str>,
        to: &[&str],
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut request = Request::post("/mail").header("x-caller", caller);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let body = serde_json::json!({ "to": to }).to_string();
        let response = self
            .router
            .clone()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .unwrap();
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    fn sent(&self) -> usize {
        std::fs::read_dir(self.outbox.path())
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".eml")
                })
                .count()
            })
            .unwrap_or(0)
    }
}

fn per_minute(mailbox: u32, caller: u32) -> RateLimitSettings {
    RateLimitSettings {
        mailbox_messages_per_minute: std::num::NonZeroU32::new(mailbox),
        mailbox_recipients_per_day: std::num::NonZeroU32::new(10_000),
        caller_messages_per_minute: std::num::NonZeroU32::new(caller),
    }
}

#[tokio::test]
async fn excess_mail_gets_429_with_retry_after_and_nothing_is_sent() {
    let h = Harness::new(RateLimitSettings::default());
    for i in 0..30 {
        let (status, _, _) = h.post("billing", None, &["a@contoso.com"]).await;
        assert_eq!(status, StatusCode::ACCEPTED, "mail {i}");
        h.clock.advance(Duration::from_millis(500));
    }
    // T0 + 15 s: the first mail leaves the minute at T0 + 60 s.
    let (status, headers, body) = h.post("billing", None, &["a@contoso.com"]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "45");
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("mailRelay.rateLimits.mailboxMessagesPerMinute"),
        "{detail}"
    );
    assert!(detail.contains("nothing was sent"), "{detail}");
    assert_eq!(h.sent(), 30);

    h.clock.set(T0 + 60_000);
    let (status, _, _) = h.post("billing", None, &["a@contoso.com"]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(h.sent(), 31);
}

#[tokio::test]
async fn one_caller_at_its_limit_does_not_stop_another() {
    let h = Harness::new(per_minute(30, 2));
    for _ in 0..2 {
        assert_eq!(
            h.post("crm", None, &["a@contoso.com"]).await.0,
            StatusCode::ACCEPTED
        );
    }
    let (status, headers, body) = h.post("crm", None, &["a@contoso.com"]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "60");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("callerMessagesPerMinute")
    );
    assert_eq!(
        h.post("billing", None, &["a@contoso.com"]).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(h.sent(), 3);
}

#[tokio::test]
async fn an_idempotent_retry_sends_once_and_replays_the_first_answer() {
    let h = Harness::new(RateLimitSettings::default());
    let key = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let (status, first_headers, first) = h.post("billing", Some(key), &["a@contoso.com"]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(first_headers.get("idempotent-replayed").is_none());
    let (status, headers, again) = h.post("billing", Some(key), &["a@contoso.com"]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again, first, "the same mail id");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(h.sent(), 1);

    // The same key for another mail is a client bug.
    let (status, _, body) = h.post("billing", Some(key), &["b@contoso.com"]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "idempotency_key_reused");
    // Another caller's key space is its own.
    assert_eq!(
        h.post("crm", Some(key), &["a@contoso.com"]).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(h.sent(), 2);
    // A malformed key is refused before anything happens.
    let (status, _, body) = h
        .post("billing", Some("has space"), &["a@contoso.com"])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["detail"].as_str().unwrap().contains("Idempotency-Key"));
}

#[tokio::test]
async fn a_failed_send_refunds_its_quota_and_its_key() {
    let h = Harness::new(per_minute(1, 0));
    h.down.store(true, Ordering::SeqCst);
    let (status, _, _) = h.post("billing", Some("k-1"), &["a@contoso.com"]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    h.down.store(false, Ordering::SeqCst);
    // Neither the minute's only slot nor the key was used up by the failure.
    let (status, _, _) = h.post("billing", Some("k-1"), &["a@contoso.com"]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(h.sent(), 1);
}

#[tokio::test]
async fn a_rate_limited_request_can_retry_with_the_same_key() {
    let h = Harness::new(per_minute(1, 0));
    assert_eq!(
        h.post("billing", None, &["a@contoso.com"]).await.0,
        StatusCode::ACCEPTED
    );
    let (status, _, _) = h.post("billing", Some("k-2"), &["a@contoso.com"]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    h.clock.advance(Duration::from_secs(60));
    let (status, headers, _) = h.post("billing", Some("k-2"), &["a@contoso.com"]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(
        headers.get("idempotent-replayed").is_none(),
        "a 429 is not replayed"
    );
    assert_eq!(h.sent(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_with_one_key_send_once() {
    let h = Arc::new(Harness::new(RateLimitSettings::default()));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.post("billing", Some("k-3"), &["a@contoso.com"]).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    // Each is the first answer (202, original or replayed) or "still in progress" (409).
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::ACCEPTED || *s == StatusCode::CONFLICT),
        "{statuses:?}"
    );
    assert!(statuses.contains(&StatusCode::ACCEPTED));
    assert_eq!(h.sent(), 1);
}
