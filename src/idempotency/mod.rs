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
//! - only results worth replaying are stored: 2xx and definitive 4xx. A 5xx, 408, 409, 425 or
//!   429 is not stored, so a retry with the same key tries again. A request that fails or is
//!   cancelled before it completes (its [`Guard`] is dropped) leaves no record either.
//!
//! Records live behind [`IdempotencyStore`]. [`InMemoryStore`] keeps them in this process for
//! `mailRelay.idempotency.ttlSeconds`, at most `maxEntries` of them (beyond it, the oldest records
//! of the caller holding the most are forgotten first, so no caller can push out another's).
//! Several replicas behind one load balancer need a shared store (e.g. Redis `SET NX` with expiry
//! for the claim), added as another `IdempotencyStore`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use axum::body::{Body, HttpBody};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::caller::Caller;
use crate::clock::{Clock, Millis, SystemClock, duration_ms};
use crate::config::IdempotencySettings;
use crate::rate_limit::caller_id;

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set to `true` on a replayed response, so clients and logs can tell a replay from a first send.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;
/// Largest response body kept for replay; `POST /mail` answers are far smaller.
const MAX_STORED_BODY: usize = 64 * 1024;

/// A valid `Idempotency-Key`: 1 to 255 visible ASCII characters (a UUID is the usual choice).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(value: &[u8]) -> Result<Self, IdempotencyError> {
        // Structured-field strings arrive quoted (`"abc"`); plain tokens are common too. Accept both.
        let value = match value {
            [b'"', inner @ .., b'"'] => inner,
            other => other,
        };
        if value.is_empty() || value.len() > MAX_KEY_LEN {
            return Err(IdempotencyError::InvalidKey(format!(
                "it has {} characters",
                value.len()
            )));
        }
        match value.iter().position(|b| !b.is_ascii_graphic()) {
            Some(i) => Err(IdempotencyError::InvalidKey(format!(
                "character {} is not visible ASCII",
                i + 1
            ))),
            None => Ok(Self(String::from_utf8_lossy(value).into_owned())),
        }
    }

    /// The key in `headers`, if there is one.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, IdempotencyError> {
        let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(IdempotencyError::InvalidKey(
                "it is sent more than once".into(),
            ));
        }
        Self::parse(first.as_bytes()).map(Some)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of what makes a request "the same request". The store keys records by caller and key,
/// so together they compare the SHA-256 of caller and body.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a request body (JSON: its raw bytes).
    pub fn of(body: &[u8]) -> Self {
        Self::of_parts([body])
    }

    /// The fingerprint of a request read in parts, e.g. a `multipart/form-data` mail: its `mail`
    /// JSON part, then each file's name, type and content. Hashing the parts rather than the raw
    /// body keeps a retry with a new multipart boundary the same request.
    pub fn of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut hash = Sha256::new();
        for part in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        Self(hash.finalize().into())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex::encode(&self.0[..8]))
    }
}

/// A response extension: store this answer under its key whatever its status. An SMTP send
/// whose outcome is unknown must not be tried again by a retry with the same key.
#[derive(Debug, Clone, Copy)]
pub struct ReplayAlways;

/// A response extension: never store this answer, whatever its status (a refusal that lasts
/// only a short while, so a retry with the same key should be tried again).
#[derive(Debug, Clone, Copy)]
pub struct ReplayNever;

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// Marked [`ReplayAlways`]: kept whatever its status.
    pub always: bool,
}

impl StoredResponse {
    /// Is a response with this status worth replaying? 2xx and definitive 4xx are; 5xx and the
    /// 4xx that say "try again" (408, 409, 425, 429) are not, so a retry tries again.
    pub fn is_replayable_status(status: StatusCode) -> bool {
        status.is_success()
            || (status.is_client_error()
                && !matches!(
                    status,
                    StatusCode::REQUEST_TIMEOUT
                        | StatusCode::CONFLICT
                        | StatusCode::TOO_EARLY
                        | StatusCode::TOO_MANY_REQUESTS
                ))
    }

    pub fn is_replayable(&self) -> bool {
        self.always || Self::is_replayable_status(self.status)
    }

    /// Buffer `response`'s body and return it unchanged, with a copy to store when it is
    /// replayable and its body known to be at most 64 KiB (larger or streamed bodies are not kept).
    pub async fn capture(response: Response) -> (Response, Option<StoredResponse>) {
        // Only bodies known to be small are buffered; anything else passes through unstored.
        let small = response
            .body()
            .size_hint()
            .upper()
            .is_some_and(|n| n <= MAX_STORED_BODY as u64);
        let always = response.extensions().get::<ReplayAlways>().is_some();
        let never = response.extensions().get::<ReplayNever>().is_some();
        if never || !(always || Self::is_replayable_status(response.status())) || !small {
            return (response, None);
        }
        let (parts, body) = response.into_parts();
        match axum::body::to_bytes(body, MAX_STORED_BODY).await {
            Ok(bytes) => {
                let headers = parts
                    .headers
                    .iter()
                    .filter(|(name, _)| keep_header(name))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                let stored = StoredResponse {
                    status: parts.status,
                    headers,
                    body: bytes.clone(),
                    always,
                };
                (Response::from_parts(parts, Body::from(bytes)), Some(stored))
            }
            Err(e) => {
                // Too large or broken: the client gets an error either way; nothing to replay.
                tracing::warn!(error = %e, "response not kept for idempotent replay");
                let mut failed = Response::new(Body::empty());
                *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                (failed, None)
            }
        }
    }
}

/// Headers that describe the result; per-response ones (request id, date, length) are not replayed.
fn keep_header(name: &HeaderName) -> bool {
    name != header::DATE
        && name != header::CONTENT_LENGTH
        && name != header::TRANSFER_ENCODING
        && name != header::CONNECTION
        && name != header::SET_COOKIE
        && *name != crate::telemetry::request_log::REQUEST_ID
}

impl IntoResponse for StoredResponse {
    /// The stored response, marked `Idempotent-Replayed: true`.
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
    }
}

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

/// What the store found for a key.
#[derive(Debug)]
pub enum Slot {
    /// No record: this request claimed the key; `token` identifies the claim.
    New {
        token: u64,
    },
    Replay(StoredResponse),
    /// Claimed or completed with another fingerprint.
    Conflict,
    /// Claimed, not completed yet.
    InProgress,
}

/// Keeps idempotency records per (caller scope, key).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claim `key` for `fingerprint`, or report what is already there.
    async fn begin(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: Millis,
    ) -> Result<Slot, IdempotencyError>;

    /// Store the result of the claim `token`; nothing when the claim is gone (expired, evicted).
    /// Store the answer for the claim `token`; it is kept for the TTL from `now`, the answer's
    /// time, since its request may have run longer than the TTL.
    async fn complete(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        token: u64,
        response: StoredResponse,
        now: Millis,
    );

    /// Drop the claim `token` so a retry can run. Synchronous because it runs from `Drop`;
    /// a networked store spawns the removal.
    fn abandon(&self, scope: &str, key: &IdempotencyKey, token: u64);
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
    /// Record the result: kept for replay when [`StoredResponse::is_replayable`], otherwise the
    /// claim is dropped so a retry tries again.
    pub async fn complete(mut self, response: StoredResponse) {
        if response.is_replayable() {
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
        // Otherwise `Drop` abandons the claim.
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.store.abandon(&self.scope, &self.key, self.token);
        }
    }
}

struct Entry {
    fingerprint: Fingerprint,
    token: u64,
    expires_at: Millis,
    response: Option<StoredResponse>,
}

type RecordId = (String, IdempotencyKey);

#[derive(Default)]
struct Records {
    entries: HashMap<RecordId, Entry>,
    /// Claims oldest first, as (token, record), for expiry. Removed entries leave stale items
    /// here, skipped by their token and compacted when they pile up.
    order: VecDeque<(u64, RecordId)>,
    /// Each caller's records, for eviction beyond `max` from the caller holding the most, so one
    /// caller's flood of keys pushes out its own records, never another caller's.
    scopes: HashMap<String, Scope>,
    /// (live records, caller) for every caller holding any: the last one holds the most.
    by_count: BTreeSet<(usize, String)>,
    next_token: u64,
}

/// One caller's claims oldest first (stale items skipped as in `Records::order`).
#[derive(Default)]
struct Scope {
    order: VecDeque<(u64, IdempotencyKey)>,
    live: usize,
}

impl Records {
    fn is_current(&self, token: u64, id: &RecordId) -> bool {
        self.entries.get(id).is_some_and(|e| e.token == token)
    }

    fn insert(&mut self, id: RecordId, entry: Entry) {
        let token = entry.token;
        let replaced = self.entries.insert(id.clone(), entry).is_some();
        let (scope_name, key) = id.clone();
        self.order.push_back((token, id));
        let scope = self.scopes.entry(scope_name.clone()).or_default();
        scope.order.push_back((token, key));
        if !replaced {
            let before = scope.live;
            scope.live += 1;
            Self::recount(&mut self.by_count, &scope_name, before, scope.live);
        }
    }

    fn remove(&mut self, id: &RecordId) {
        if self.entries.remove(id).is_none() {
            return;
        }
        let Some(scope) = self.scopes.get_mut(&id.0) else {
            return;
        };
        let before = scope.live;
        scope.live -= 1;
        Self::recount(&mut self.by_count, &id.0, before, scope.live);
        if scope.live == 0 {
            self.scopes.remove(&id.0);
        }
    }

    fn recount(by_count: &mut BTreeSet<(usize, String)>, scope: &str, before: usize, after: usize) {
        if before > 0 {
            by_count.remove(&(before, scope.to_owned()));
        }
        if after > 0 {
            by_count.insert((after, scope.to_owned()));
        }
    }

    /// Forget expired records and, beyond `max`, the oldest ones of the caller holding the most.
    /// A claim still waiting for its answer is never forgotten: its request may be sending, and
    /// a retry must not send again.
    fn trim(&mut self, now: Millis, max: usize) {
        self.expire(now);
        while self.entries.len() > max && self.evict_one() {}
        self.compact();
    }

    fn expire(&mut self, now: Millis) {
        while let Some(entry) = front_answered(&mut self.order, |id| self.entries.get(id)) {
            if entry.expires_at > now {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.remove(&id);
            }
        }
    }

    /// Forget the oldest answered record of the caller holding the most (the next one when all
    /// of its records are still waiting for answers). `false` when nothing can go.
    fn evict_one(&mut self) -> bool {
        let mut candidate = self.by_count.last().cloned();
        while let Some(current) = candidate {
            candidate = self.by_count.range(..&current).next_back().cloned();
            let name = current.1;
            let Some(scope) = self.scopes.get_mut(&name) else {
                continue;
            };
            let entries = &self.entries;
            let lookup = |key: &IdempotencyKey| entries.get(&(name.clone(), key.clone()));
            if front_answered(&mut scope.order, lookup).is_none() {
                continue;
            }
            if let Some((_, key)) = scope.order.pop_front() {
                self.remove(&(name, key));
                return true;
            }
        }
        false
    }

    /// Drop stale queue items once they outnumber the live records.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let order = std::mem::take(&mut self.order);
            self.order = order
                .into_iter()
                .filter(|(token, id)| self.is_current(*token, id))
                .collect();
        }
        for (name, scope) in &mut self.scopes {
            if scope.order.len() > 2 * scope.live + 64 {
                let entries = &self.entries;
                scope.order.retain(|(token, key)| {
                    entries
                        .get(&(name.clone(), key.clone()))
                        .is_some_and(|e| e.token == *token)
                });
            }
        }
    }
}

/// Brings the oldest answered record of `queue` to its front and returns it. Stale items
/// (removed or replaced records) are dropped on the way; claims still waiting for their answers
/// go to the back, each looked past once: they are never forgotten.
fn front_answered<'e, K>(
    queue: &mut VecDeque<(u64, K)>,
    entry_of: impl Fn(&K) -> Option<&'e Entry>,
) -> Option<&'e Entry> {
    let mut pending_seen = 0;
    while let Some((token, key)) = queue.front() {
        match entry_of(key).filter(|e| e.token == *token) {
            None => {
                queue.pop_front();
            }
            Some(e) if e.response.is_none() => {
                if pending_seen == queue.len() {
                    return None;
                }
                pending_seen += 1;
                queue.rotate_left(1);
            }
            Some(e) => return Some(e),
        }
    }
    None
}

/// Records in this process, for `ttl` each, at most `max_entries` (beyond it, the oldest of the
/// caller holding the most are forgotten first).
pub struct InMemoryStore {
    ttl_ms: Millis,
    max_entries: usize,
    // Never held across `.await`: every operation is a few map look-ups.
    records: Mutex<Records>,
}

impl InMemoryStore {
    pub fn new(settings: &IdempotencySettings) -> Self {
        Self {
            ttl_ms: duration_ms(settings.ttl),
            max_entries: settings.max_entries.max(1),
            records: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many records are kept (claims and results).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl IdempotencyStore for InMemoryStore {
    async fn begin(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: Millis,
    ) -> Result<Slot, IdempotencyError> {
        let mut records = self.lock();
        records.trim(now, self.max_entries);
        let id = (scope.to_owned(), key.clone());
        // A claim still waiting for its answer counts however old: its send may be under way.
        if let Some(entry) = records.entries.get(&id)
            && (entry.expires_at > now || entry.response.is_none())
        {
            return Ok(if entry.fingerprint != fingerprint {
                Slot::Conflict
            } else {
                match &entry.response {
                    Some(response) => Slot::Replay(response.clone()),
                    None => Slot::InProgress,
                }
            });
        }
        records.next_token += 1;
        let token = records.next_token;
        records.insert(
            id,
            Entry {
                fingerprint,
                token,
                expires_at: now.saturating_add(self.ttl_ms),
                response: None,
            },
        );
        records.trim(now, self.max_entries);
        Ok(Slot::New { token })
    }

    async fn complete(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        token: u64,
        response: StoredResponse,
        now: Millis,
    ) {
        let mut records = self.lock();
        if let Some(entry) = records.entries.get_mut(&(scope.to_owned(), key.clone()))
            && entry.token == token
        {
            entry.response = Some(response);
            entry.expires_at = entry.expires_at.max(now.saturating_add(self.ttl_ms));
        }
    }

    fn abandon(&self, scope: &str, key: &IdempotencyKey, token: u64) {
        let mut records = self.lock();
        let id = (scope.to_owned(), key.clone());
        if records.is_current(token, &id) {
            records.remove(&id);
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

    use super::*;
    use crate::caller::UserSource;
    use crate::clock::ManualClock;

    const T0: Millis = 1_700_000_000_000;

    fn setup(ttl_secs: u64, max_entries: usize) -> (Idempotency, Arc<InMemoryStore>, ManualClock) {
        let store = Arc::new(InMemoryStore::new(&IdempotencySettings {
            ttl: Duration::from_secs(ttl_secs),
            max_entries,
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
            always: false,
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
        let err = idem
            .begin(&caller, key("k-1"), Fingerprint::of(b"second"))
            .await
            .unwrap_err();
        assert_eq!(err, IdempotencyError::KeyReused);
        guard.complete(accepted("m-1")).await;
        let err = idem
            .begin(&caller, key("k-1"), Fingerprint::of(b"second"))
            .await
            .unwrap_err();
        assert_eq!(err, IdempotencyError::KeyReused);
    }

    #[tokio::test]
    async fn a_second_request_while_the_first_runs_is_told_to_retry() {
        let (idem, _, _) = setup(86_400, 100);
        let caller = api_key("billing");
        let guard = new_guard(&idem, &caller, "k-1", b"body").await;
        let err = idem
            .begin(&caller, key("k-1"), Fingerprint::of(b"body"))
            .await
            .unwrap_err();
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
        let (idem, store, _) = setup(86_400, 100);
        let caller = api_key("billing");
        for status in [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::BAD_GATEWAY,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::CONFLICT,
        ] {
            let guard = new_guard(&idem, &caller, "k-1", b"body").await;
            guard
                .complete(StoredResponse {
                    status,
                    headers: Vec::new(),
                    body: Bytes::new(),
                    always: false,
                })
                .await;
            assert!(store.is_empty(), "{status} was stored");
        }
        // A definitive refusal is stored: retrying the same request cannot change it.
        let guard = new_guard(&idem, &caller, "k-1", b"body").await;
        let forbidden = StoredResponse {
            status: StatusCode::FORBIDDEN,
            headers: Vec::new(),
            body: Bytes::from_static(b"send_as_denied"),
            always: false,
        };
        guard.complete(forbidden.clone()).await;
        assert_eq!(replay(&idem, &caller, "k-1", b"body").await, forbidden);
    }

    #[tokio::test]
    async fn records_expire_after_the_ttl() {
        let (idem, store, clock) = setup(60, 100);
        let caller = api_key("billing");
        new_guard(&idem, &caller, "k-1", b"body")
            .await
            .complete(accepted("m-1"))
            .await;
        clock.advance(Duration::from_millis(59_999));
        replay(&idem, &caller, "k-1", b"body").await;
        clock.advance(Duration::from_millis(1));
        // Expired: a new request, even with another body.
        let guard = new_guard(&idem, &caller, "k-1", b"other").await;
        drop(guard);
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn keys_are_scoped_per_caller() {
        let (idem, _, _) = setup(86_400, 100);
        let user = Caller::User {
            address: "alice@contoso.com".into(),
            via: UserSource::Oidc,
        };
        new_guard(&idem, &api_key("billing"), "k-1", b"body")
            .await
            .complete(accepted("m-1"))
            .await;
        // Same key and body, other callers: their own first requests.
        new_guard(&idem, &api_key("crm"), "k-1", b"body")
            .await
            .complete(accepted("m-2"))
            .await;
        new_guard(&idem, &user, "k-1", b"body")
            .await
            .complete(accepted("m-3"))
            .await;
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
            new_guard(&idem, &caller, k, b"body")
                .await
                .complete(accepted(k))
                .await;
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
            new_guard(&idem, &quiet, k, b"body")
                .await
                .complete(accepted(k))
                .await;
        }
        for n in 0..20 {
            clock.advance(Duration::from_secs(1));
            let k = format!("n-{n}");
            new_guard(&idem, &noisy, &k, b"body")
                .await
                .complete(accepted(&k))
                .await;
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

    #[tokio::test]
    async fn when_the_largest_caller_has_only_running_claims_the_next_one_gives_way() {
        let (idem, store, _) = setup(86_400, 3);
        let (a, b) = (api_key("a"), api_key("b"));
        let mut running = Vec::new();
        for k in ["a-1", "a-2", "a-3"] {
            running.push(new_guard(&idem, &a, k, b"x").await);
        }
        new_guard(&idem, &b, "b-1", b"x")
            .await
            .complete(accepted("b-1"))
            .await;
        running.push(new_guard(&idem, &b, "b-2", b"x").await);
        // `a` holds the most, but its claims are running: `b`'s answered record went instead.
        assert_eq!(store.len(), 4);
        for k in ["a-1", "a-2", "a-3"] {
            let err = idem.begin(&a, key(k), Fingerprint::of(b"x")).await;
            assert_eq!(err.unwrap_err(), IdempotencyError::InProgress);
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
        let err = idem
            .begin(&caller, key("k-1"), Fingerprint::of(b"body"))
            .await
            .unwrap_err();
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

    #[test]
    fn keys_are_1_to_255_visible_ascii_characters() {
        for good in [
            "a",
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
            &"x".repeat(255),
            "a!~\"",
        ] {
            assert!(IdempotencyKey::parse(good.as_bytes()).is_ok(), "{good}");
        }
        assert_eq!(key("\"quoted-key\"").as_str(), "quoted-key");
        for bad in [
            "",
            &"x".repeat(256),
            "with space",
            "tab\there",
            "caf\u{e9}",
            "\"\"",
        ] {
            let err = IdempotencyKey::parse(bad.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("1 to 255 visible ASCII"), "{err}");
        }
    }

    #[test]
    fn a_key_sent_twice_is_refused_and_none_is_fine() {
        let mut headers = HeaderMap::new();
        assert_eq!(IdempotencyKey::from_headers(&headers), Ok(None));
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(IdempotencyKey::from_headers(&headers), Ok(Some(key("a"))));
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
        assert!(IdempotencyKey::from_headers(&headers).is_err());
    }

    #[test]
    fn the_fingerprint_covers_every_byte_and_part_boundary() {
        let base = Fingerprint::of(b"body");
        assert_eq!(base, Fingerprint::of(b"body"));
        assert_ne!(base, Fingerprint::of(b"body "));
        assert_ne!(
            Fingerprint::of_parts([&b"ab"[..], b"c"]),
            Fingerprint::of_parts([&b"a"[..], b"bc"])
        );
        assert_ne!(
            Fingerprint::of_parts([&b"mail"[..]]),
            Fingerprint::of_parts([&b"mail"[..], b""])
        );
    }

    #[tokio::test]
    async fn capture_keeps_the_response_and_a_replayable_copy() {
        let original = (
            StatusCode::ACCEPTED,
            [("x-request-id", "req-1"), ("location", "/mail/m-1")],
            "{\"id\":\"m-1\"}",
        )
            .into_response();
        let (response, stored) = StoredResponse::capture(original).await;
        let stored = stored.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"{\"id\":\"m-1\"}");
        assert!(stored.headers.iter().any(|(n, _)| n == header::LOCATION));
        assert!(!stored.headers.iter().any(|(n, _)| n == "x-request-id"));

        let replayed = stored.into_response();
        assert_eq!(replayed.status(), StatusCode::ACCEPTED);
        assert_eq!(replayed.headers()[IDEMPOTENT_REPLAYED], "true");
        assert_eq!(replayed.headers()[header::LOCATION], "/mail/m-1");
        let body = axum::body::to_bytes(replayed.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"{\"id\":\"m-1\"}");

        let (_, stored) =
            StoredResponse::capture(StatusCode::SERVICE_UNAVAILABLE.into_response()).await;
        assert!(stored.is_none());

        // Too large to keep: passed through whole, not stored.
        let big = "x".repeat(MAX_STORED_BODY + 1);
        let (response, stored) = StoredResponse::capture(big.clone().into_response()).await;
        assert!(stored.is_none());
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(body.len(), big.len());
    }
}
