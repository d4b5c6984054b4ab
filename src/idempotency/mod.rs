//! `Idempotency-Key`: a retried `POST /mail` returns the first result instead of sending again.
//!
//! Follows the IETF draft "The Idempotency-Key HTTP Header Field"
//! (draft-ietf-httpapi-idempotency-key-header):
//! - keys are scoped per caller: two callers may use the same key for different mails;
//! - the same key with a different body (its SHA-256, [`Fingerprint`]) is refused:
//!   `422 idempotency_key_reused`;
//! - while the first request with a key is still running, a second one gets
//!   `409 idempotency_in_progress` at once rather than waiting: a send can take as long as the
//!   SMTP deadline, and a waiting request would hold a connection and a timeout budget for it.
//!   The client retries after a moment and then gets the stored result;
//! - only results worth replaying are stored: 2xx, definitive refusals and an unknown outcome,
//!   as each answer is marked ([`Replay`]; `ApiError::replay` decides for every failure). A
//!   transient failure (5xx, 409, 429) is not stored, so a retry with the same key tries again.
//!   A request that fails or is cancelled before it completes (its [`Guard`] is dropped) leaves
//!   no record either. A success is kept whatever its size; a refusal compactly.
//!
//! The parts: `key` (the header and the fingerprint), `replay` (what is kept of an answer
//! and how it is replayed), `store` (the records, their expiry and eviction); this file is the
//! facade the handler uses.
//!
//! Records live behind [`IdempotencyStore`]. [`InMemoryStore`] keeps them in this process for
//! `mailRelay.idempotency.ttlSeconds`, at most `maxEntries` of them holding at most `maxBytes`
//! (beyond either, the oldest records of the caller holding the most records or bytes are
//! forgotten first, so no caller can push out another's).
//! Several replicas behind one load balancer need a shared store (e.g. Redis `SET NX` with expiry
//! for the claim), added as another `IdempotencyStore`.

mod key;
mod replay;
mod store;

use std::fmt;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};

pub use self::key::{Fingerprint, IDEMPOTENCY_KEY, IdempotencyKey, MAX_KEY_LEN};
pub use self::replay::{IDEMPOTENT_REPLAYED, MAX_STORED_FIELD_ERRORS, Replay, StoredResponse};
pub use self::store::{IdempotencyStore, InMemoryStore, Slot};
use crate::caller::{Caller, caller_id};
use crate::clock::{Clock, SystemClock};
use crate::config::IdempotencySettings;

/// Why a request with an `Idempotency-Key` is not processed. Messages are safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyError {
    /// 400: the header is malformed.
    #[error(
        "the Idempotency-Key header must be 1 to 255 visible ASCII characters, e.g. a UUID; {0}"
    )]
    InvalidKey(String),
    /// 422 `idempotency_key_reused`.
    #[error(
        "this Idempotency-Key was already used with a different request body; send a new mail with a new key"
    )]
    KeyReused,
    /// 409 `idempotency_in_progress`.
    #[error(
        "a request with this Idempotency-Key is still being processed; retry in a moment to get its result"
    )]
    InProgress,
    /// 503: a shared store could not be asked.
    #[error("the idempotency store is unavailable: {0}")]
    Unavailable(String),
}

/// The outcome of [`Idempotency::begin`] that lets the request go on.
#[derive(Debug)]
pub enum Begin {
    /// First request with this key: process it, then [`Guard::complete`].
    New(Guard),
    /// Answered before: return this (it converts into the response, marked as replayed).
    Replay(StoredResponse),
}

/// The claim on a key while its request runs. Dropping it without [`Guard::complete`] (the
/// request failed or was cancelled) removes the claim, so a retry sends.
#[must_use = "complete the guard with the response, or drop it to let a retry send"]
pub struct Guard {
    store: Arc<dyn IdempotencyStore>,
    clock: Arc<dyn Clock>,
    scope: String,
    key: IdempotencyKey,
    token: u64,
    done: bool,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("scope", &self.scope)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// Keep `response` for replay. An answer not to keep (see [`Replay`]) never gets here:
    /// [`StoredResponse::capture`] gives no copy, and dropping the guard lets a retry try again.
    pub async fn complete(mut self, response: StoredResponse) {
        self.store
            .complete(
                &self.scope,
                &self.key,
                self.token,
                response,
                self.clock.now_ms(),
            )
            .await;
        self.done = true;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.store.abandon(&self.scope, &self.key, self.token);
        }
    }
}

/// Idempotency as the `POST /mail` handler uses it. Cheap to clone.
#[derive(Clone)]
pub struct Idempotency {
    store: Arc<dyn IdempotencyStore>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

impl Idempotency {
    pub fn new(store: Arc<dyn IdempotencyStore>, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
    }

    /// In-memory records from the settings, on the system clock.
    pub fn in_memory(settings: &IdempotencySettings) -> Self {
        Self::new(
            Arc::new(InMemoryStore::new(settings)),
            Arc::new(SystemClock),
        )
    }

    /// Answer a request at most once per key: without a key, `handle` runs as usual; with one,
    /// a stored result is replayed, or `handle` runs and its response is kept when replayable.
    /// If this future is dropped while `handle` runs (timeout, client gone), the claim is
    /// released and a retry sends.
    ///
    /// The `Err` is the answer to give instead of running `handle` (400, 409, 422 or 503).
    pub async fn run<F, Fut>(
        &self,
        caller: &Caller,
        key: Option<IdempotencyKey>,
        fingerprint: Fingerprint,
        handle: F,
    ) -> Result<Response, IdempotencyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Response>,
    {
        let Some(key) = key else {
            return Ok(handle().await);
        };
        match self.begin(caller, key, fingerprint).await? {
            Begin::Replay(stored) => Ok(stored.into_response()),
            Begin::New(guard) => {
                let (response, stored) = StoredResponse::capture(handle().await).await;
                if let Some(stored) = stored {
                    guard.complete(stored).await;
                }
                Ok(response)
            }
        }
    }

    /// Claim `key` for this caller and request, or get the stored result. Call it after the caller
    /// is authenticated (keys are per caller) and before anything is sent.
    pub async fn begin(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        fingerprint: Fingerprint,
    ) -> Result<Begin, IdempotencyError> {
        let scope = caller_id(caller);
        let now = self.clock.now_ms();
        match self.store.begin(&scope, &key, fingerprint, now).await? {
            Slot::New { token } => Ok(Begin::New(Guard {
                store: Arc::clone(&self.store),
                clock: Arc::clone(&self.clock),
                scope,
                key,
                token,
                done: false,
            })),
            Slot::Replay(response) => Ok(Begin::Replay(response)),
            Slot::Conflict => Err(IdempotencyError::KeyReused),
            Slot::InProgress => Err(IdempotencyError::InProgress),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::{HeaderValue, StatusCode, header};
    use bytes::Bytes;

    use super::*;
    use crate::caller::UserSource;
    use crate::clock::{ManualClock, Millis};

    const T0: Millis = 1_700_000_000_000;

    fn setup(ttl_secs: u64, max_entries: usize) -> (Idempotency, Arc<InMemoryStore>, ManualClock) {
        setup_bytes(ttl_secs, max_entries, usize::MAX)
    }

    fn setup_bytes(
        ttl_secs: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> (Idempotency, Arc<InMemoryStore>, ManualClock) {
        let store = Arc::new(InMemoryStore::new(&IdempotencySettings {
            ttl: Duration::from_secs(ttl_secs),
            max_entries,
            max_bytes,
        }));
        let clock = ManualClock::new(T0);
        let idempotency = Idempotency::new(store.clone(), Arc::new(clock.clone()));
        (idempotency, store, clock)
    }

    fn api_key(name: &str) -> Caller {
        Caller::ApiKey {
            name: name.into(),
            allowed_from: Arc::from(Vec::new()),
        }
    }

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::parse(text.as_bytes()).unwrap()
    }

    fn accepted(id: &str) -> StoredResponse {
        StoredResponse {
            status: StatusCode::ACCEPTED,
            headers: vec![(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body: Bytes::from(format!(r#"{{"id":"{id}"}}"#)),
        }
    }

    async fn new_guard(idem: &Idempotency, caller: &Caller, k: &str, body: &[u8]) -> Guard {
        match idem.begin(caller, key(k), Fingerprint::of(body)).await {
            Ok(Begin::New(guard)) => guard,
            other => panic!("expected New, got {other:?}"),
        }
    }

    async fn replay(idem: &Idempotency, caller: &Caller, k: &str, body: &[u8]) -> StoredResponse {
        match idem.begin(caller, key(k), Fingerprint::of(body)).await {
            Ok(Begin::Replay(response)) => response,
            other => panic!("expected Replay, got {other:?}"),
        }
    }

    /// A first request under `k` that ran and was answered `response`.
    async fn answered(
        idem: &Idempotency,
        caller: &Caller,
        k: &str,
        body: &[u8],
        response: StoredResponse,
    ) {
        new_guard(idem, caller, k, body)
            .await
            .complete(response)
            .await;
    }

    /// The refusal a request under `k` gets.
    async fn refused(
        idem: &Idempotency,
        caller: &Caller,
        k: &str,
        body: &[u8],
    ) -> IdempotencyError {
        idem.begin(caller, key(k), Fingerprint::of(body))
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_retry_gets_the_stored_response() {
        let (idem, _, clock) = setup(86_400, 100);
        let caller = api_key("billing");
        let guard = new_guard(&idem, &caller, "k-1", b"{mail}").await;
        guard.complete(accepted("m-1")).await;
        clock.advance(Duration::from_secs(3_600));
        let stored = replay(&idem, &caller, "k-1", b"{mail}").await;
        assert_eq!(stored, accepted("m-1"));
        // Twice is as good as once.
        assert_eq!(
            replay(&idem, &caller, "k-1", b"{mail}").await,
            accepted("m-1")
        );
    }

    #[tokio::test]
    async fn the_same_key_with_another_body_is_refused() {
        let (idem, _, _) = setup(86_400, 100);
        let caller = api_key("billing");
        let guard = new_guard(&idem, &caller, "k-1", b"first").await;
        // Also while the first is in flight: a different body is a different request.
        let err = refused(&idem, &caller, "k-1", b"second").await;
        assert_eq!(err, IdempotencyError::KeyReused);
        guard.complete(accepted("m-1")).await;
        let err = refused(&idem, &caller, "k-1", b"second").await;
        assert_eq!(err, IdempotencyError::KeyReused);
    }

    #[tokio::test]
    async fn a_second_request_while_the_first_runs_is_told_to_retry() {
        let (idem, _, _) = setup(86_400, 100);
        let caller = api_key("billing");
        let guard = new_guard(&idem, &caller, "k-1", b"body").await;
        let err = refused(&idem, &caller, "k-1", b"body").await;
        assert_eq!(err, IdempotencyError::InProgress);
        guard.complete(accepted("m-1")).await;
        replay(&idem, &caller, "k-1", b"body").await;
    }

    #[tokio::test]
    async fn a_dropped_guard_lets_a_retry_send() {
        let (idem, store, _) = setup(86_400, 100);
        let caller = api_key("billing");
        let guard = new_guard(&idem, &caller, "k-1", b"body").await;
        drop(guard);
        assert!(store.is_empty());
        let guard = new_guard(&idem, &caller, "k-1", b"body").await;
        guard.complete(accepted("m-2")).await;
        assert_eq!(
            replay(&idem, &caller, "k-1", b"body").await,
            accepted("m-2")
        );
    }

    #[tokio::test]
    async fn transient_failures_are_not_stored() {
        use crate::api::ApiError;
        let (idem, store, _) = setup(86_400, 100);
        let caller = api_key("billing");
        let run = |answer: ApiError| {
            idem.run(
                &caller,
                Some(key("k-1")),
                Fingerprint::of(b"body"),
                || async { answer.into_response() },
            )
        };
        let detail = || "detail".to_string();
        for answer in [
            ApiError::SmtpUnavailable {
                detail: detail(),
                retry_after: None,
            },
            ApiError::SmtpRejected(detail()),
            ApiError::Internal,
            ApiError::RateLimited {
                detail: detail(),
                retry_after: 1,
            },
            ApiError::IdempotencyInProgress(detail()),
            ApiError::SendAsDeniedForNow(detail()),
        ] {
            let status = run(answer).await.unwrap().status();
            assert!(store.is_empty(), "{status} was stored");
        }
        // A definitive refusal is stored: retrying the same request cannot change it.
        let first = run(ApiError::SendAsDenied(detail())).await.unwrap();
        assert_eq!(first.status(), StatusCode::FORBIDDEN);
        let again = replay(&idem, &caller, "k-1", b"body").await;
        assert_eq!(again.status, StatusCode::FORBIDDEN);
        // And so is an unknown outcome, though a 502: the server may have the mail.
        let (idem, store, _) = setup(86_400, 100);
        let unknown = idem
            .run(
                &caller,
                Some(key("k-2")),
                Fingerprint::of(b"body"),
                || async { ApiError::OutcomeUnknown(detail()).into_response() },
            )
            .await
            .unwrap();
        assert_eq!(unknown.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn records_expire_after_the_ttl() {
        let (idem, store, clock) = setup(60, 100);
        let caller = api_key("billing");
        answered(&idem, &caller, "k-1", b"body", accepted("m-1")).await;
        clock.advance(Duration::from_millis(59_999));
        replay(&idem, &caller, "k-1", b"body").await;
        clock.advance(Duration::from_millis(1));
        // Expired: a new request, even with another body.
        let guard = new_guard(&idem, &caller, "k-1", b"other").await;
        drop(guard);
        assert!(store.is_empty());
        // Every byte counted for the records is given back with them.
        assert_eq!(store.bytes(), 0);
    }

    #[tokio::test]
    async fn keys_are_scoped_per_caller() {
        let (idem, _, _) = setup(86_400, 100);
        let user = Caller::User {
            address: "alice@contoso.com".into(),
            via: UserSource::Oidc,
        };
        answered(&idem, &api_key("billing"), "k-1", b"body", accepted("m-1")).await;
        // Same key and body, other callers: their own first requests.
        answered(&idem, &api_key("crm"), "k-1", b"body", accepted("m-2")).await;
        answered(&idem, &user, "k-1", b"body", accepted("m-3")).await;
        assert_eq!(
            replay(&idem, &api_key("crm"), "k-1", b"body").await,
            accepted("m-2")
        );
        assert_eq!(replay(&idem, &user, "k-1", b"body").await, accepted("m-3"));
    }

    #[tokio::test]
    async fn the_oldest_records_go_first_beyond_max_entries() {
        let (idem, store, clock) = setup(86_400, 3);
        let caller = api_key("billing");
        for k in ["a", "b", "c", "d"] {
            answered(&idem, &caller, k, b"body", accepted(k)).await;
            clock.advance(Duration::from_secs(1));
        }
        assert_eq!(store.len(), 3);
        for k in ["b", "c", "d"] {
            assert_eq!(replay(&idem, &caller, k, b"body").await, accepted(k));
        }
        drop(new_guard(&idem, &caller, "a", b"body").await);
    }

    #[tokio::test]
    async fn a_flood_of_keys_from_one_caller_pushes_out_only_its_own_records() {
        let (idem, store, clock) = setup(86_400, 5);
        let (quiet, noisy) = (api_key("billing"), api_key("newsletter"));
        for k in ["q-1", "q-2"] {
            answered(&idem, &quiet, k, b"body", accepted(k)).await;
        }
        for n in 0..20 {
            clock.advance(Duration::from_secs(1));
            let k = format!("n-{n}");
            answered(&idem, &noisy, &k, b"body", accepted(&k)).await;
        }
        assert_eq!(store.len(), 5);
        // The quiet caller's older records stay; the noisy one keeps its newest three.
        for k in ["q-1", "q-2"] {
            assert_eq!(replay(&idem, &quiet, k, b"body").await, accepted(k));
        }
        for k in ["n-17", "n-18", "n-19"] {
            assert_eq!(replay(&idem, &noisy, k, b"body").await, accepted(k));
        }
        drop(new_guard(&idem, &noisy, "n-16", b"body").await);
    }

    /// A 400 as large as a request with hundreds of refused header names made one.
    fn large_refusal() -> StoredResponse {
        StoredResponse {
            status: StatusCode::BAD_REQUEST,
            headers: Vec::new(),
            body: Bytes::from(vec![b'x'; 60 * 1024]),
        }
    }

    #[tokio::test]
    async fn large_refusals_stay_under_the_byte_bound_and_push_out_only_their_callers_own() {
        const MAX_BYTES: usize = 1024 * 1024;
        let (idem, store, clock) = setup_bytes(86_400, 100_000, MAX_BYTES);
        let (quiet, noisy) = (api_key("billing"), api_key("newsletter"));
        for k in ["q-1", "q-2"] {
            answered(&idem, &quiet, k, b"body", accepted(k)).await;
        }
        // 200 refusals of 60 KiB: 12 MiB unbounded, far over the count bound's reach.
        for n in 0..200 {
            clock.advance(Duration::from_secs(1));
            let k = format!("n-{n}");
            answered(&idem, &noisy, &k, b"body", large_refusal()).await;
            assert!(
                store.bytes() <= MAX_BYTES,
                "{} bytes after {n}",
                store.bytes()
            );
        }
        assert!(
            store.bytes() > MAX_BYTES / 2,
            "the bound is used, not emptied"
        );
        // The quiet caller's answers stay; the noisy one keeps its newest refusals.
        for k in ["q-1", "q-2"] {
            assert_eq!(replay(&idem, &quiet, k, b"body").await, accepted(k));
        }
        assert_eq!(
            replay(&idem, &noisy, "n-199", b"body").await,
            large_refusal()
        );
        drop(new_guard(&idem, &noisy, "n-0", b"body").await);
    }

    #[tokio::test]
    async fn when_the_largest_caller_has_only_running_claims_the_next_one_gives_way() {
        let (idem, store, _) = setup(86_400, 3);
        let (a, b) = (api_key("a"), api_key("b"));
        let mut running = Vec::new();
        for k in ["a-1", "a-2", "a-3"] {
            running.push(new_guard(&idem, &a, k, b"x").await);
        }
        answered(&idem, &b, "b-1", b"x", accepted("b-1")).await;
        running.push(new_guard(&idem, &b, "b-2", b"x").await);
        // `a` holds the most, but its claims are running: `b`'s answered record went instead.
        assert_eq!(store.len(), 4);
        for k in ["a-1", "a-2", "a-3"] {
            assert_eq!(
                refused(&idem, &a, k, b"x").await,
                IdempotencyError::InProgress
            );
        }
        drop(new_guard(&idem, &b, "b-1", b"x").await);
        drop(running);
    }

    #[tokio::test]
    async fn a_claim_waiting_for_its_answer_does_not_expire() {
        // The first request may still be sending: a retry after the TTL must not send again.
        let (idem, _, clock) = setup(60, 1);
        let caller = api_key("billing");
        let first = new_guard(&idem, &caller, "k-1", b"body").await;
        clock.advance(Duration::from_secs(61));
        // Neither the TTL nor another claim beyond `maxEntries` pushes it out.
        let other = new_guard(&idem, &caller, "k-2", b"other").await;
        let err = refused(&idem, &caller, "k-1", b"body").await;
        assert_eq!(err, IdempotencyError::InProgress);
        drop(other);
        // Its answer, however late, is kept for the TTL from then.
        first.complete(accepted("first")).await;
        assert_eq!(
            replay(&idem, &caller, "k-1", b"body").await,
            accepted("first")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_requests_claim_the_key_once() {
        let (idem, _, _) = setup(86_400, 100);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let idem = idem.clone();
                tokio::spawn(async move {
                    match idem
                        .begin(&api_key("billing"), key("k-1"), Fingerprint::of(b"body"))
                        .await
                    {
                        // Keep the claim alive until every task has asked.
                        Ok(Begin::New(guard)) => Some(guard),
                        Err(IdempotencyError::InProgress) => None,
                        other => panic!("unexpected {other:?}"),
                    }
                })
            })
            .collect();
        let mut guards = Vec::new();
        for task in tasks {
            guards.extend(task.await.unwrap());
        }
        assert_eq!(guards.len(), 1);
    }
}
