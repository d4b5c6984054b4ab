//! The database behind the store: a PostgreSQL or SQLite pool, its migrations, and what its
//! failures mean.
//!
//! Queries are written once, in the SQL both dialects share (`$1` parameters, `ON CONFLICT`,
//! `RETURNING`), and run on either pool through `on_pool!`; the schemas differ only in type
//! names (`src/store/migrations/{postgres,sqlite}`).

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{StoreSettings, StoreUrl};

/// A pooled PostgreSQL connection idle longer than this is pinged before it is used.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("src/store/migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("src/store/migrations/sqlite");

/// The newest schema version this build knows.
pub fn schema_version() -> i64 {
    POSTGRES_MIGRATIONS
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

/// A pool on one of the two databases.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Run the same code on whichever pool `$db` holds: `on_pool!(db, |pool| query.execute(pool))`.
/// Each arm is compiled for its own database; the body must produce the same type in both.
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::store::db::Db::Postgres($pool) => $body,
            $crate::store::db::Db::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Begin a transaction that holds the store's write lock until it ends: on PostgreSQL an
/// advisory lock taken first thing (`lock`, a constant per purpose), on SQLite `BEGIN IMMEDIATE`
/// (one writer at a time anyway; taking the lock up front avoids a deadlock on upgrade).
macro_rules! locked_transaction {
    ($db:expr, $lock:expr, |$tx:ident| $body:expr) => {
        match $db {
            $crate::store::db::Db::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind($lock)
                    .execute(&mut *$tx)
                    .await?;
                $body
            }
            $crate::store::db::Db::Sqlite(pool) => {
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                $body
            }
        }
    };
}
pub(crate) use locked_transaction;

impl Db {
    /// A pool for the settings' URL; `None` for the memory store. Connects lazily: the first
    /// query (the migrations) opens the first connection, so a database that is down at start
    /// makes the relay unready rather than stopped.
    pub fn connect(settings: &StoreSettings) -> Result<Option<Self>, String> {
        match &settings.url {
            StoreUrl::Memory => Ok(None),
            StoreUrl::Sqlite(path) => {
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    // Readers do not wait for the writer; FULL makes every commit survive a
                    // crash of the machine, not only of the process.
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(settings.connect_timeout);
                // One connection: SQLite has one writer at a time anyway, and several
                // connections waiting on its lock spin through busy_timeout (CPU and latency).
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(settings.connect_timeout)
                    .connect_lazy_with(options);
                Ok(Some(Self::Sqlite(pool)))
            }
            StoreUrl::Postgres(_) => {
                let options = postgres_options(settings)?
                    .ok_or_else(|| "not a PostgreSQL store".to_owned())?;
                let pool = PgPoolOptions::new()
                    .max_connections(settings.max_connections)
                    .acquire_timeout(settings.connect_timeout)
                    // A connection that sat idle may be gone (a restart, a failover, a NAT
                    // timeout): idle ones are closed after 5 minutes, and one idle for more than
                    // a second is pinged before it is handed out (a dead one is closed and
                    // another taken), so the first request after the store returns does not
                    // fail on a connection the server ended. Under load connections are reused
                    // within milliseconds and never pinged: no extra round trip per mail.
                    .idle_timeout(Duration::from_secs(300))
                    .test_before_acquire(false)
                    .before_acquire(|connection, meta| {
                        Box::pin(async move {
                            if meta.idle_for > PING_WHEN_IDLE_FOR {
                                sqlx::Connection::ping(connection).await?;
                            }
                            Ok(true)
                        })
                    })
                    .connect_lazy_with(options);
                Ok(Some(Self::Postgres(pool)))
            }
        }
    }

    /// Apply the embedded migrations. On PostgreSQL the migrator holds an advisory lock while it
    /// runs, so replicas starting together apply each migration once. A schema newer than this
    /// build (during a rolling update back) is accepted.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        let accept_newer = |migrations: &'static Migrator| Migrator {
            migrations: std::borrow::Cow::Borrowed(&migrations.migrations[..]),
            ignore_missing: true,
            ..Migrator::DEFAULT
        };
        match self {
            Self::Postgres(pool) => accept_newer(&POSTGRES_MIGRATIONS).run(pool).await,
            Self::Sqlite(pool) => accept_newer(&SQLITE_MIGRATIONS).run(pool).await,
        }
    }

    /// The newest applied schema version, or `None` before the first migration.
    pub async fn applied_version(&self) -> Result<Option<i64>, sqlx::Error> {
        let sql = "SELECT MAX(version) FROM _sqlx_migrations WHERE success";
        on_pool!(self, |pool| sqlx::query_scalar(sql).fetch_one(pool).await)
    }

    /// A round trip to the database.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(|_| ()))
    }

    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await);
    }
}

/// The connection options of a PostgreSQL store (`None` for the others): the URL, the
/// password, and a statement timeout so that a query hanging on the server ends there too.
pub fn postgres_options(settings: &StoreSettings) -> Result<Option<PgConnectOptions>, String> {
    let StoreUrl::Postgres(url) = &settings.url else {
        return Ok(None);
    };
    let mut options = PgConnectOptions::from_str(url.as_str())
        .map_err(|e| format!("mailRelay.store.url: {e}"))?
        .application_name("mail-relay");
    if let Some(password) = &settings.password {
        options = options.password(password.expose_secret());
    }
    let statement_timeout = format!("{}s", settings.connect_timeout.as_secs().max(1));
    Ok(Some(options.options([(
        "statement_timeout",
        statement_timeout.as_str(),
    )])))
}

/// A time or count as the schema stores it (BIGINT); beyond `i64::MAX` it saturates.
pub(crate) fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// What a database failure means for an operator: the step that failed and what to check.
/// Safe to show: sqlx's messages carry no password.
pub fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Io(e) => {
            let text = e.to_string();
            if text.contains("lookup address") || text.contains("Name or service") {
                format!("DNS: the store's host name does not resolve ({e})")
            } else {
                format!("TCP: the store cannot be reached ({e})")
            }
        }
        sqlx::Error::Tls(e) => format!("TLS: the connection to the store failed ({e})"),
        sqlx::Error::PoolTimedOut => {
            "TCP: no connection to the store within mailRelay.store.connectTimeoutSeconds".into()
        }
        sqlx::Error::Database(e) => match e.code().as_deref() {
            Some("28P01" | "28000") => format!(
                "authentication: the store refused the user or password ({}); check mailRelay.store.url's user and mailRelay.store.password",
                e.message()
            ),
            Some("3D000") => format!(
                "the database does not exist ({}); create it or fix mailRelay.store.url",
                e.message()
            ),
            Some("42501") => format!(
                "permissions: the store's user may not do this ({}); grant it CREATE and USAGE on the database's schema, and ownership of the relay's tables",
                e.message()
            ),
            Some("57014") => format!(
                "the store's statement timeout ended a query ({})",
                e.message()
            ),
            _ => format!("the store answered an error: {}", e.message()),
        },
        sqlx::Error::Migrate(e) => format!("schema: {e}"),
        other => format!("the store failed: {other}"),
    }
}
