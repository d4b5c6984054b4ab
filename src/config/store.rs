//! `mailRelay.store.*`: where the state that replicas share lives (idempotency records, rate-limit
//! windows, the quota block, the send-as denial memory).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::read::Ctx;

const URL: &str = "mailRelay.store.url";
const PASSWORD: &str = "mailRelay.store.password";

/// `mailRelay.store.*`.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub url: StoreUrl,
    /// The database password (`password`, `passwordFile` or a placeholder); never in the URL.
    pub password: Option<SecretString>,
    /// `maxConnections`: the pool's size per replica.
    pub max_connections: u32,
    /// `connectTimeoutSeconds`: how long a new database connection (or a pooled one) may take.
    pub connect_timeout: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        super::read::from_presets(store)
    }
}

/// `mailRelay.store.url`: which store, parsed once.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// This process's memory: one replica, forgotten on restart (the default).
    Memory,
    /// An SQLite file: one replica, durable across restarts.
    Sqlite(PathBuf),
    /// A PostgreSQL server: any number of replicas. The URL holds no password.
    Postgres(Url),
}

impl StoreUrl {
    /// The kind, for metrics and readiness: `memory`, `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Whether the state outlives the process and is seen by other replicas.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Self::Postgres(url) => f.write_str(url.as_str()),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}

pub(super) fn store(ctx: &mut Ctx<'_>) -> StoreSettings {
    let url = ctx
        .text(URL)
        .map(str::to_owned)
        .map_or(Ok(StoreUrl::Memory), |text| parse_url(&text));
    let url = url.unwrap_or_else(|message| {
        ctx.error(URL, message);
        StoreUrl::Memory
    });
    let password = ctx.secret(PASSWORD);
    if password.is_some() && !matches!(url, StoreUrl::Postgres(_)) {
        ctx.error(
            PASSWORD,
            format!(
                "is set but {URL} is {}: only a postgres:// store takes a password",
                url.kind()
            ),
        );
    }
    StoreSettings {
        url,
        password,
        max_connections: ctx.whole("mailRelay.store.maxConnections"),
        connect_timeout: ctx.seconds("mailRelay.store.connectTimeoutSeconds"),
    }
}

/// `memory`, `sqlite:PATH` or `postgres://user@host:port/database?sslmode=…`.
fn parse_url(text: &str) -> Result<StoreUrl, String> {
    const ALLOWED: &str =
        "use memory, sqlite:/path/to/file.db or postgres://user@host:5432/database";
    if text.eq_ignore_ascii_case("memory") {
        return Ok(StoreUrl::Memory);
    }
    if let Some(path) = text.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() || path.starts_with(':') {
            return Err(format!(
                "{text:?} names no file; an SQLite store is a file on a volume: sqlite:/data/mail-relay.db (for memory, use memory)"
            ));
        }
        if path.contains('?') {
            return Err(format!(
                "{text:?} has options after the path; give the file's path only"
            ));
        }
        return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
    }
    let url = Url::parse(text).map_err(|e| {
        // The text may hold a password: show only what is safe.
        let scheme = text.split(':').next().unwrap_or_default();
        format!("is not a store URL ({e}, scheme {scheme:?}); {ALLOWED}")
    })?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!("has the scheme {:?}; {ALLOWED}", url.scheme()));
    }
    if url.password().is_some() {
        return Err(format!(
            "holds a password; remove it from the URL and set {PASSWORD} (or {PASSWORD}File, or a placeholder)"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} names no host; {ALLOWED}"));
    }
    if url.path().trim_start_matches('/').is_empty() {
        return Err(format!("{text:?} names no database; {ALLOWED}"));
    }
    Ok(StoreUrl::Postgres(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sqlite_and_postgres_urls() {
        assert_eq!(parse_url("memory"), Ok(StoreUrl::Memory));
        assert_eq!(
            parse_url("sqlite:/data/relay.db"),
            Ok(StoreUrl::Sqlite("/data/relay.db".into()))
        );
        assert_eq!(
            parse_url("sqlite:///data/relay.db"),
            Ok(StoreUrl::Sqlite("/data/relay.db".into()))
        );
        let pg = parse_url("postgres://relay@db.internal:5432/mail_relay?sslmode=verify-full");
        assert_eq!(pg.as_ref().map(StoreUrl::kind), Ok("postgres"));
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_showing_it() {
        let err = parse_url("postgres://relay:hunter2@db/mail_relay").unwrap_err();
        assert!(err.contains("mailRelay.store.password"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse_url("postgres://relay:hunter2@[bad/mail_relay").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn urls_without_a_file_host_or_database_are_refused() {
        for bad in [
            "sqlite:",
            "sqlite::memory:",
            "sqlite:/x.db?mode=rwc",
            "postgres:///mail_relay",
            "postgres://db",
            "mysql://db/x",
            "redis",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
