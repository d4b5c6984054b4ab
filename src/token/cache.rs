//! The one token cache every request and SMTP connection shares.
//!
//! Callers get the cached token while it is fresh (`now < expiry - grace`). A spawned refresher
//! fetches the next token ahead of that point, so under steady traffic nobody waits for Entra ID.
//! When a caller does have to wait (cold start, after `invalidate`, refresher failing), exactly one
//! fetch runs and every waiting caller takes its result (single flight).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::client::TokenClient;
use super::{AccessToken, TokenError, TokenProvider, TokenState};
use crate::clock::{Clock, SystemClock};
use crate::config::OAuthSettings;

/// What a cached token is for: a multi-tenant set-up keeps one cache per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub tenant_id: String,
    pub client_id: String,
    pub scope: String,
}

impl CacheKey {
    pub fn of(oauth: &OAuthSettings) -> Self {
        Self {
            tenant_id: oauth.tenant_id.clone(),
            client_id: oauth.client_id.clone(),
            scope: oauth.scopes.clone(),
        }
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant_id, self.client_id, self.scope)
    }
}

/// How failed fetches are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts a caller without a usable token makes (1 means no retry); transient errors only.
    pub attempts: u32,
    /// First back-off; doubled per failure, with up to 20 % jitter added.
    pub base_delay: Duration,
    /// Longest back-off between attempts after failures in a row. Within the back-off, callers
    /// get the current token if it is still valid, else the last error, without a request.
    pub max_delay: Duration,
    /// Longest a waiting caller sleeps before its next attempt: a longer `Retry-After`
    /// ends the attempts at once (and later callers get the error until it has passed).
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_wait: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Back-off before attempt `failures + 1`, never shorter than the server's `Retry-After`.
    fn delay(&self, failures: u32, error: &TokenError) -> Duration {
        let exponent = failures.saturating_sub(1).min(16);
        let backoff = self
            .base_delay
            .saturating_mul(1 << exponent)
            .min(self.max_delay);
        let jitter = backoff.mul_f64(rand::rng().random_range(0.0..0.2));
        (backoff + jitter).max(error.retry_after().unwrap_or_default())
    }
}

/// Everything but the settings, for tests.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub clock: Arc<dyn Clock>,
    pub retry: RetryPolicy,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            retry: RetryPolicy::default(),
        }
    }
}

/// The shared token cache; implements [`TokenProvider`]. Dropping it stops its refresher.
pub struct TokenCache {
    inner: Arc<Inner>,
    wake: Arc<Notify>,
    refresher: OnceLock<AbortHandle>,
}

struct Inner {
    key: CacheKey,
    client: TokenClient,
    clock: Arc<dyn Clock>,
    grace: Duration,
    retry: RetryPolicy,
    state: Mutex<State>,
    /// Held while a fetch runs: the single flight. A tokio mutex, held across the request.
    flight: tokio::sync::Mutex<()>,
    wake: Arc<Notify>,
    fetches: AtomicU64,
    failed_fetches: AtomicU64,
}

struct Current {
    token: AccessToken,
    /// `expires_at - grace`: from here on the token is not handed out unless no new one can be had.
    stale_at: SystemTime,
    /// When the refresher fetches the next one.
    refresh_at: SystemTime,
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    /// Bumped when a fetch completes, so callers that waited for it take its result.
    generation: u64,
    /// The error of the latest fetch, `None` once one succeeded.
    last_failure: Option<TokenError>,
    /// Failures in a row, for the back-off.
    failures: u32,
    /// No fetch before this while a valid token exists (back-off) ...
    next_attempt: Option<SystemTime>,
    /// ... and none at all before this (the endpoint's `Retry-After`).
    not_before: Option<SystemTime>,
}

impl State {
    /// The current token if it has not expired (grace aside).
    fn valid(&self, now: SystemTime) -> Option<AccessToken> {
        self.current
            .as_ref()
            .filter(|c| now < c.token.expires_at())
            .map(|c| c.token.clone())
    }

    fn fresh(&self, now: SystemTime) -> Option<&Current> {
        self.current.as_ref().filter(|c| now < c.stale_at)
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("key", &self.inner.key)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// Builds the HTTP client and credential from the settings; no request is made yet.
    pub fn new(oauth: &OAuthSettings) -> Result<Self, TokenError> {
        Self::with_options(oauth, CacheOptions::default())
    }

    pub fn with_options(oauth: &OAuthSettings, options: CacheOptions) -> Result<Self, TokenError> {
        let client = TokenClient::new(oauth)?;
        let wake = Arc::new(Notify::new());
        Ok(Self {
            inner: Arc::new(Inner {
                key: CacheKey::of(oauth),
                client,
                clock: options.clock,
                grace: oauth.grace,
                retry: options.retry,
                state: Mutex::new(State::default()),
                flight: tokio::sync::Mutex::new(()),
                wake: wake.clone(),
                fetches: AtomicU64::new(0),
                failed_fetches: AtomicU64::new(0),
            }),
            wake,
            refresher: OnceLock::new(),
        })
    }

    pub fn key(&self) -> &CacheKey {
        &self.inner.key
    }

    /// Started on first use rather than in `new`, which may run outside a runtime. Outside a
    /// tokio runtime there is no refresher: callers then fetch when the token turns stale.
    fn ensure_refresher(&self) {
        if self.refresher.get().is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.refresher.get_or_init(|| {
            runtime
                .spawn(refresher(Arc::downgrade(&self.inner), self.wake.clone()))
                .abort_handle()
        });
    }
}

impl Drop for TokenCache {
    fn drop(&mut self) {
        if let Some(task) = self.refresher.get() {
            task.abort();
        }
    }
}

#[async_trait::async_trait]
impl TokenProvider for TokenCache {
    async fn token(&self) -> Result<AccessToken, TokenError> {
        self.ensure_refresher();
        let inner = &self.inner;
        let now = inner.clock.now();
        let seen = {
            let state = inner.lock();
            if let Some(current) = state.fresh(now) {
                if now >= current.refresh_at {
                    // Refresh ahead: the caller keeps the fresh token, the refresher gets the next.
                    self.wake.notify_one();
                }
                return Ok(current.token.clone());
            }
            state.generation
        };
        inner.fetch_for_caller(seen).await
    }

    fn invalidate(&self, token: &AccessToken) {
        let mut state = self.inner.lock();
        if state
            .current
            .as_ref()
            .is_some_and(|c| c.token.same_as(token))
        {
            state.current = None;
            // The server refused the token: a new one is wanted now, not after the back-off of an
            // earlier failed refresh (an explicit Retry-After still holds).
            state.next_attempt = None;
            tracing::info!(
                cache = %self.inner.key,
                fingerprint = %token.fingerprint(),
                "access token invalidated; the next caller fetches a new one"
            );
        }
    }

    fn state(&self) -> TokenState {
        let now = self.inner.clock.now();
        let state = self.inner.lock();
        let valid = state.valid(now);
        TokenState {
            has_token: valid.is_some(),
            expires_at: valid.map(|t| t.expires_at()),
            last_error: state.last_failure.as_ref().map(ToString::to_string),
            last_error_code: state.last_failure.as_ref().map(TokenError::code),
            fetch_count: self.inner.fetches.load(Ordering::Relaxed),
            failed_fetches: self.inner.failed_fetches.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state consistent (plain assignments).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A caller found no fresh token: join or run the single flight.
    async fn fetch_for_caller(&self, seen: u64) -> Result<AccessToken, TokenError> {
        let _flight = self.flight.lock().await;
        let now = self.clock.now();
        let keep_valid = {
            let state = self.lock();
            if let Some(current) = state.fresh(now) {
                return Ok(current.token.clone());
            }
            if state.generation != seen
                && let Some(error) = &state.last_failure
            {
                // The fetch we waited for failed: its answer is ours too.
                return state.valid(now).ok_or_else(|| error.clone());
            }
            if let Some(error) = &state.last_failure {
                // Back-off after failures (and the endpoint's Retry-After) bounds the load a
                // broken setup puts on Entra ID, however many callers arrive.
                let backing_off = state.next_attempt.is_some_and(|t| now < t)
                    || state.not_before.is_some_and(|t| now < t);
                if backing_off {
                    return state.valid(now).ok_or_else(|| error.clone());
                }
            }
            state.valid(now).is_some()
        };
        // With a still-valid token in hand, one attempt; the refresher retries later.
        let attempts = if keep_valid {
            1
        } else {
            self.retry.attempts.max(1)
        };
        let mut attempt = 1;
        loop {
            let error = match self.fetch_once().await {
                Ok(token) => return Ok(token),
                Err(error) => error,
            };
            if let Some(token) = self.lock().valid(self.clock.now()) {
                self.log_refresh_failure(&error, &token);
                return Ok(token);
            }
            if !error.is_transient() || attempt >= attempts {
                return Err(error);
            }
            let delay = self.retry.delay(attempt, &error);
            if delay > self.retry.max_wait {
                return Err(error);
            }
            tracing::debug!(cache = %self.key, attempt, ?delay, error = %error, "retrying token fetch");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// The refresher woke: fetch if the refresh point (or the back-off) has passed.
    async fn refresh_in_background(&self) {
        if !self.due(self.clock.now()) {
            return;
        }
        // Waits for a caller's fetch instead of racing it; its result usually makes this one moot.
        let _flight = self.flight.lock().await;
        if !self.due(self.clock.now()) {
            return;
        }
        // No request waits for this fetch, so its failure is logged here; the old token stays.
        if let Err(error) = self.fetch_once().await
            && let Some(token) = self.lock().valid(self.clock.now())
        {
            self.log_refresh_failure(&error, &token);
        }
    }

    /// The one log line of a failed refresh that no caller sees, since `token` is still in use.
    fn log_refresh_failure(&self, error: &TokenError, token: &AccessToken) {
        tracing::warn!(
            cache = %self.key,
            code = error.code(),
            transient = error.is_transient(),
            entra_description = error.entra().map(|e| e.description.as_str()),
            fingerprint = %token.fingerprint(),
            expires_at = %humantime(token.expires_at()),
            "token refresh failed; using the current token until it expires: {error}"
        );
    }

    fn due(&self, now: SystemTime) -> bool {
        self.next_background_attempt(now)
            .is_some_and(|at| at <= now)
    }

    /// When the refresher should fetch next; `None` while there is no valid token to refresh
    /// (then callers fetch themselves).
    fn next_background_attempt(&self, now: SystemTime) -> Option<SystemTime> {
        let state = self.lock();
        let current = state
            .current
            .as_ref()
            .filter(|c| now < c.token.expires_at())?;
        let at = match state.next_attempt {
            Some(t) if state.last_failure.is_some() => t,
            _ => current.refresh_at,
        };
        Some(at.max(state.not_before.unwrap_or(at)))
    }

    /// One request; the outcome is recorded for every caller waiting on this flight.
    async fn fetch_once(&self) -> Result<AccessToken, TokenError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = self.client.fetch(self.clock.now()).await;
        // The lifetime counts from receipt: the request's own duration is not credited.
        let received = self.clock.now();
        let mut state = self.lock();
        state.generation += 1;
        match result {
            Ok(fetched) => {
                let expires_at = received + fetched.lifetime;
                // A token shorter-lived than twice the grace would be stale on arrival.
                let grace = self.grace.min(fetched.lifetime / 2);
                let stale_at = expires_at - grace;
                let usable = stale_at.duration_since(received).unwrap_or_default();
                let jitter = usable.mul_f64(rand::rng().random_range(0.0..0.05));
                let refresh_at = received + usable.mul_f64(0.8) - jitter;
                let token = AccessToken::new(fetched.access_token, expires_at);
                tracing::info!(
                    cache = %self.key,
                    fingerprint = %token.fingerprint(),
                    expires_at = %humantime(expires_at),
                    lifetime_s = fetched.lifetime.as_secs(),
                    "fetched access token"
                );
                state.current = Some(Current {
                    token: token.clone(),
                    stale_at,
                    refresh_at,
                });
                state.last_failure = None;
                state.failures = 0;
                state.next_attempt = None;
                state.not_before = None;
                drop(state);
                // The refresher re-plans for the new token.
                self.wake.notify_one();
                Ok(token)
            }
            Err(error) => {
                self.failed_fetches.fetch_add(1, Ordering::Relaxed);
                state.failures += 1;
                let delay = self.retry.delay(state.failures, &error);
                state.next_attempt = Some(received + delay);
                state.not_before = error.retry_after().map(|d| received + d);
                state.last_failure = Some(error.clone());
                // Logged by whoever handles it: the request's own line, or the
                // `token refresh failed` line when the current token stays in use.
                Err(error)
            }
        }
    }
}

/// Sleeps until the next refresh point or a wake-up, then refreshes if due. Holds only a weak
/// reference while sleeping, and the cache aborts it on drop.
async fn refresher(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let wait = {
            let Some(inner) = inner.upgrade() else { return };
            let now = inner.clock.now();
            inner
                .next_background_attempt(now)
                .map(|at| at.duration_since(now).unwrap_or_default())
        };
        match wait {
            Some(wait) => {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.refresh_in_background().await;
    }
}

/// RFC 3339 in UTC for log fields.
fn humantime(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}
