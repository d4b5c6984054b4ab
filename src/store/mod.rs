//! The store: where the state that replicas share lives (`mailRelay.store.url`).
//!
//! - `memory` (the default): this process's memory, as the policy rooms keep it themselves. One
//!   replica; a restart forgets.
//! - `sqlite:PATH`: a file, for one durable instance.
//! - `postgres://…`: any number of replicas, which then share the Idempotency-Key records, the
//!   rate-limit windows and the quota block as if they were one relay.
//!
//! The SQL stores implement the policy rooms' own traits (`IdempotencyStore`, `RateLimiter`),
//! so nothing above them knows which store is in use. The schema is embedded and applied at
//! start (`db`); until it is, and whenever the database does not answer, requests that need
//! the store get `503 store_unavailable` and readiness is off: nothing is sent unchecked.
//! A background task applies the schema (retrying until the database answers) and pings the
//! database every few seconds, so recovery needs no restart and readiness follows the
//! database even without traffic.

pub mod db;
mod idempotency;
mod queue;
mod rate_limit;
mod send_as;
mod slots;

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

pub use self::db::{Db, describe, schema_version};
pub use self::idempotency::SqlIdempotencyStore;
pub use self::queue::SqlQueue;
pub use self::rate_limit::SqlRateLimiter;
pub use self::send_as::SqlDenials;
pub use self::slots::{SharedSlots, SlotLock};
use crate::config::{Settings, StoreSettings};
use crate::idempotency::{IdempotencyStore, InMemoryStore};
use crate::queue::QueueStore;
use crate::rate_limit::{InMemoryRateLimiter, RateLimiter};
use crate::send_as::{DenialMemory, InMemoryDenials};

/// How often the background task pings a healthy database.
const PING_EVERY: Duration = Duration::from_secs(5);
/// The longest pause between attempts to apply the schema while the database is away.
const MIGRATE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Run one query (the `$body`, on `pool`) through [`Shared::run`]: bounded in time, and its
/// outcome recorded for readiness. `sql!(shared, |pool| sqlx::query(..).execute(pool).await)`.
macro_rules! sql {
    ($shared:expr, |$pool:ident| $body:expr) => {
        $shared.run(async { $crate::store::db::on_pool!($shared.db(), |$pool| $body) })
    };
}
pub(crate) use sql;

/// What readiness, `/metrics` and `check-config` show of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreState {
    /// `sqlite` or `postgres`.
    pub kind: &'static str,
    /// The schema this build needs is in place.
    pub migrated: bool,
    /// The newest schema version applied, when known.
    pub schema_version: Option<i64>,
    /// The last query (or ping) succeeded.
    pub reachable: bool,
    /// Why the last query failed, while it is the latest word; safe to show.
    pub last_error: Option<String>,
    /// How long the last ping took.
    pub ping: Option<Duration>,
    /// Queries that failed since start.
    pub failures: u64,
}

/// The pool and what is known of its health, shared by the SQL stores and the background task.
pub struct Shared {
    db: Db,
    op_timeout: Duration,
    state: Mutex<StoreState>,
}

impl Shared {
    fn new(db: Db, kind: &'static str, op_timeout: Duration) -> Self {
        Self {
            db,
            op_timeout,
            state: Mutex::new(StoreState {
                kind,
                migrated: false,
                schema_version: None,
                reachable: false,
                last_error: Some("the store's schema is being applied".into()),
                ping: None,
                failures: 0,
            }),
        }
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, outcome: Result<Duration, &str>) {
        let mut state = self.state();
        match outcome {
            Ok(_) => {
                state.reachable = true;
                if state.migrated {
                    state.last_error = None;
                }
            }
            Err(error) => {
                state.reachable = false;
                state.failures += 1;
                state.last_error = Some(error.to_owned());
            }
        }
    }

    /// Run `query` once the schema is in place, within `connectTimeoutSeconds`; its failure
    /// comes back described for an operator ([`describe`]).
    pub(crate) async fn run<T>(
        &self,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, String> {
        {
            let state = self.state();
            if !state.migrated {
                return Err(state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the store's schema is not applied yet".into()));
            }
        }
        let started = Instant::now();
        let outcome = match tokio::time::timeout(self.op_timeout, query).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!(
                "the store did not answer within {} s (mailRelay.store.connectTimeoutSeconds)",
                self.op_timeout.as_secs()
            )),
        };
        match &outcome {
            Ok(_) => self.record(Ok(started.elapsed())),
            Err(e) => self.record(Err(e)),
        }
        outcome
    }

    /// Apply the schema; then ping. Ends when the store is dropped.
    async fn maintain(shared: Weak<Self>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let Some(this) = shared.upgrade() else { return };
            let migrated = this.state().migrated;
            let pause = if migrated {
                this.ping().await;
                PING_EVERY
            } else if this.migrate().await {
                // The first latency figure at once, for readiness and /metrics.
                this.ping().await;
                PING_EVERY
            } else {
                backoff = (backoff * 2).min(MIGRATE_BACKOFF_MAX);
                backoff
            };
            drop(this);
            tokio::time::sleep(pause).await;
        }
    }

    async fn migrate(&self) -> bool {
        let applied = tokio::time::timeout(self.op_timeout * 6, async {
            self.db.migrate().await.map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => describe(&e),
                other => format!("schema: {other}"),
            })?;
            self.db.applied_version().await.map_err(|e| describe(&e))
        })
        .await
        .unwrap_or_else(|_| Err("the store did not answer while its schema was applied".into()));
        let mut state = self.state();
        match applied {
            Ok(version) => {
                state.migrated = true;
                state.reachable = true;
                state.schema_version = version;
                state.last_error = None;
                tracing::info!(store = state.kind, version, "store schema in place");
                true
            }
            Err(error) => {
                if state.last_error.as_deref() != Some(error.as_str()) {
                    tracing::warn!(store = state.kind, %error, "store schema not applied yet; retrying");
                }
                state.reachable = false;
                state.last_error = Some(error);
                false
            }
        }
    }

    async fn ping(&self) {
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.op_timeout, self.db.ping()).await;
        let elapsed = started.elapsed();
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(describe(&e)),
            Err(_) => Some("the store did not answer a ping".to_owned()),
        };
        let was_reachable = self.state().reachable;
        match &error {
            None => self.record(Ok(elapsed)),
            Some(e) => self.record(Err(e)),
        }
        let mut state = self.state();
        state.ping = Some(elapsed);
        match (&error, was_reachable) {
            (Some(e), true) => tracing::warn!(store = state.kind, error = %e, "store unreachable"),
            (None, false) => tracing::info!(store = state.kind, "store reachable again"),
            _ => {}
        }
    }
}

/// The store chosen by the settings. Cheap to clone.
#[derive(Clone, Default)]
pub struct Store {
    shared: Option<Arc<Shared>>,
    /// PostgreSQL's connection options, for the sessions that hold connection slots.
    postgres: Option<sqlx::postgres::PgConnectOptions>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.state().map_or("memory", |s| s.kind);
        f.debug_struct("Store").field("kind", &kind).finish()
    }
}

impl Store {
    /// The memory store.
    pub fn memory() -> Self {
        Self::default()
    }

    /// The store `settings` name. A SQL store starts applying its schema in the background
    /// (which needs a tokio runtime); it is usable once that is done.
    pub fn open(settings: &StoreSettings) -> Result<Self, String> {
        let Some(db) = Db::connect(settings)? else {
            return Ok(Self::memory());
        };
        let shared = Arc::new(Shared::new(
            db,
            settings.url.kind(),
            settings.connect_timeout,
        ));
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "a SQL store needs a tokio runtime".to_owned())?;
        runtime.spawn(Shared::maintain(Arc::downgrade(&shared)));
        Ok(Self {
            shared: Some(shared),
            postgres: db::postgres_options(settings)?,
        })
    }

    /// Where Idempotency-Key records are kept.
    pub fn idempotency(&self, settings: &Settings) -> Arc<dyn IdempotencyStore> {
        match &self.shared {
            None => Arc::new(InMemoryStore::new(&settings.relay.idempotency)),
            Some(shared) => Arc::new(SqlIdempotencyStore::new(
                Arc::clone(shared),
                &settings.relay.idempotency,
                settings.relay.limits.request_timeout,
            )),
        }
    }

    /// Where the rate-limit windows and the quota block are counted.
    pub fn rate_limiter(&self) -> Arc<dyn RateLimiter> {
        match &self.shared {
            None => Arc::new(InMemoryRateLimiter::new()),
            Some(shared) => Arc::new(SqlRateLimiter::new(Arc::clone(shared))),
        }
    }

    /// Where queued mails wait; `None` for memory, which could not keep what `202` promised.
    pub fn queue(&self) -> Option<Arc<dyn QueueStore>> {
        self.shared
            .as_ref()
            .map(|shared| Arc::new(SqlQueue::new(Arc::clone(shared))) as Arc<dyn QueueStore>)
    }

    /// Where Exchange's recent SendAsDenied answers are remembered.
    pub fn denial_memory(&self) -> Arc<dyn DenialMemory> {
        match &self.shared {
            None => Arc::new(InMemoryDenials::default()),
            Some(shared) => Arc::new(SqlDenials::new(Arc::clone(shared))),
        }
    }

    /// The SMTP mailbox's `max` connection slots shared by every replica; `None` unless the
    /// store is shared (PostgreSQL): one instance's own pool cap is then the cap.
    pub fn connection_slots(&self, mailbox: &str, max: usize) -> Option<SharedSlots> {
        self.postgres
            .as_ref()
            .map(|options| SharedSlots::new(options, mailbox, max))
    }

    /// The SQL store's health; `None` for memory, which is always there.
    pub fn state(&self) -> Option<StoreState> {
        self.shared.as_ref().map(|s| s.state().clone())
    }

    /// Wait until the schema is applied or `timeout` passes; whether it is.
    pub async fn wait_until_migrated(&self, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            match self.state() {
                None => return true,
                Some(state) if state.migrated => return true,
                Some(_) if started.elapsed() >= timeout => return false,
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Close the pool's connections (at shutdown).
    pub async fn close(&self) {
        if let Some(shared) = &self.shared {
            shared.db.close().await;
        }
    }
}
