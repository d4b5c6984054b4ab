//! The private PostgreSQL of the tests (started by `tests/store/start.sh`), as described by its
//! `store.env`: a database of its own per test, and stopping and starting the server mid-test.
//!
//! A test target includes it with `#[path = "../store/store.rs"] mod store;` next to
//! `../api/peer.rs` (whose `missing` it shares). A test that needs the server starts with
//! `let store = crate::require_store!();`: when the server is not running the test fails under
//! `CI=true` and is skipped loudly otherwise.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};

/// The command that starts the server, for messages.
pub const START_COMMAND: &str = "tests/store/start.sh";

/// Test databases are named `<PREFIX><unix seconds>_<random>`; older ones are dropped.
const DATABASE_PREFIX: &str = "relay_t_";
/// A test database left behind (by a failed test, kept for a look) is dropped after this long.
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// The state dir `start.sh` uses (and writes `store.env` into).
pub fn store_dir() -> PathBuf {
    std::env::var_os("MAIL_RELAY_STORE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/mail-relay-store"))
}

/// A running test server.
#[derive(Clone)]
pub struct Store {
    /// `postgres://mail_relay@127.0.0.1:15432/mail_relay` (no password).
    pub url: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The database the role owns; test databases are created from it.
    pub database: String,
    password: String,
    /// A file holding the password alone, for `mailRelay.store.passwordFile`.
    pub password_file: PathBuf,
    /// The CA that signed the server's certificate (SAN `localhost`, `127.0.0.1`).
    pub ca: PathBuf,
    pub data_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The OS user the server runs as (`postgres` when the tests run as root).
    pub os_user: String,
    /// The server's log.
    pub log: PathBuf,
}

impl std::fmt::Debug for Store {
    // The password stays out of test output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The running server, or `None` when `store.env` is missing or incomplete or the port does
    /// not accept a connection.
    pub fn get() -> Option<Store> {
        let text = std::fs::read_to_string(store_dir().join("store.env")).ok()?;
        let store = Self::parse(&text)?;
        store.accepts_connections().then_some(store)
    }

    /// The running server; when it is missing, panics under `CI=true` and otherwise prints a
    /// `SKIPPED` line naming `test` and returns `None`. Prefer [`require_store!`](crate::require_store).
    pub fn require(test: &str) -> Option<Store> {
        if let Some(store) = Self::get() {
            return Some(store);
        }
        crate::peer::missing(
            &format!(
                "PostgreSQL store ({}/store.env missing or port closed)",
                store_dir().display()
            ),
            START_COMMAND,
            test,
        );
        None
    }

    fn parse(text: &str) -> Option<Store> {
        let vars: HashMap<&str, &str> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |key: &str| vars.get(key).map(|v| (*v).to_owned());
        Some(Store {
            url: get("MAIL_RELAY_STORE_URL")?,
            host: get("MAIL_RELAY_STORE_HOST")?,
            port: get("MAIL_RELAY_STORE_PORT")?.parse().ok()?,
            user: get("MAIL_RELAY_STORE_USER")?,
            database: get("MAIL_RELAY_STORE_DATABASE")?,
            password: get("MAIL_RELAY_STORE_PASSWORD")?,
            password_file: get("MAIL_RELAY_STORE_PASSWORD_FILE")?.into(),
            ca: get("MAIL_RELAY_STORE_CA")?.into(),
            data_dir: get("MAIL_RELAY_STORE_DATA_DIR")?.into(),
            bin_dir: get("MAIL_RELAY_STORE_BIN_DIR")?.into(),
            os_user: get("MAIL_RELAY_STORE_OS_USER")?,
            log: get("MAIL_RELAY_STORE_LOG")?.into(),
        })
    }

    /// Whether the port accepts a TCP connection now.
    pub fn accepts_connections(&self) -> bool {
        let Ok(ip) = self.host.parse() else {
            return false;
        };
        TcpStream::connect_timeout(&SocketAddr::new(ip, self.port), Duration::from_secs(1)).is_ok()
    }

    fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .username(&self.user)
            .password(&self.password)
            .database(database)
    }

    /// A connection of the tests' own, to `database`.
    pub async fn connect(&self, database: &str) -> PgConnection {
        PgConnection::connect_with(&self.options(database))
            .await
            .unwrap_or_else(|e| panic!("connecting to {database} on {}: {e}", self.url))
    }

    /// A new, empty database owned by the role, for one test: the relay's migrations run into it
    /// and no other test (or earlier run) shares its rate-limit windows or keys. Databases older
    /// than an hour, left by earlier runs, are dropped on the way.
    pub async fn fresh_database(&self) -> TestDatabase {
        let mut conn = self.connect(&self.database).await;
        let now = unix_now();
        let leftovers: Vec<(String,)> =
            sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE $1")
                .bind(format!("{DATABASE_PREFIX}%"))
                .fetch_all(&mut conn)
                .await
                .expect("listing test databases");
        for (name,) in leftovers {
            let created = name
                .strip_prefix(DATABASE_PREFIX)
                .and_then(|rest| rest.split('_').next())
                .and_then(|secs| secs.parse::<u64>().ok());
            if created.is_some_and(|c| c + LEFTOVER_AGE.as_secs() < now) {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        }
        let name = format!(
            "{DATABASE_PREFIX}{now}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        sqlx::query(&format!(
            "CREATE DATABASE \"{name}\" OWNER \"{}\"",
            self.user
        ))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = conn.close().await;
        TestDatabase {
            url: format!(
                "postgres://{}@{}:{}/{name}",
                self.user, self.host, self.port
            ),
            name,
            store: self.clone(),
        }
    }

    /// `pg_ctl` with `args`, as the server's OS user (a blocking call).
    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let data = self.data_dir.to_string_lossy().into_owned();
        let me = Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        // As root (start.sh ran as root): the server belongs to `postgres`.
        let mut command = if me != self.os_user {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.os_user, "--"]).arg(&pg_ctl);
            c
        } else {
            Command::new(&pg_ctl)
        };
        // A directory the server's user may enter: it starts from here.
        command
            .current_dir(self.data_dir.parent().unwrap_or(Path::new("/")))
            .args(["-D", &data])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", pg_ctl.display()))
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are cut, nothing is lost) and returns a
    /// guard that starts it again when dropped, so that a failing test does not leave it down.
    pub async fn stop(&self) -> StoppedServer {
        let store = self.clone();
        let out = tokio::task::spawn_blocking(move || {
            store.pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"])
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        StoppedServer {
            store: Some(self.clone()),
        }
    }

    fn start_blocking(&self) -> std::process::Output {
        let log = self.log.to_string_lossy().into_owned();
        self.pg_ctl(&["-l", &log, "-w", "-t", "30", "start"])
    }

    /// The last `n` lines of the server's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The server, stopped by [`Store::stop`]; [`StoppedServer::start`] (or dropping it) starts it again.
pub struct StoppedServer {
    store: Option<Store>,
}

impl StoppedServer {
    /// Starts the server again and waits until it accepts connections.
    pub async fn start(mut self) {
        let store = self.store.take().expect("started once");
        let started = store.clone();
        let out = tokio::task::spawn_blocking(move || started.start_blocking())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            store.log_tail(20)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !store.accepts_connections() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL does not accept connections after pg_ctl start:\n{}",
                store.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for StoppedServer {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            // A test failed while the server was down: the next tests need it.
            let _ = store.start_blocking();
        }
    }
}

/// One test's database; [`TestDatabase::drop_database`] removes it at the end of a passing test
/// (a failing test leaves it for a look, and a later run drops it).
pub struct TestDatabase {
    pub name: String,
    /// `postgres://mail_relay@127.0.0.1:15432/<name>`, for `mailRelay.store.url`.
    pub url: String,
    store: Store,
}

impl TestDatabase {
    /// The `mailRelay.store` block (indent 2, under `mailRelay:`) for this database, the password
    /// from the file `start.sh` wrote, with `extra` lines (indent 4) appended.
    pub fn store_yaml(&self, extra: &str) -> String {
        format!(
            "  store:\n    url: \"{}\"\n    passwordFile: \"{}\"\n{extra}",
            self.url,
            self.store.password_file.display()
        )
    }

    /// A connection of the test's own to this database.
    pub async fn connect(&self) -> PgConnection {
        self.store.connect(&self.name).await
    }

    pub async fn drop_database(self) {
        let mut conn = self.store.connect(&self.store.database).await;
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `let store = crate::require_store!();` — the running [`Store`], or (outside CI) a loud skip:
/// the test returns early. Under `CI=true` a missing server fails the test.
#[macro_export]
macro_rules! require_store {
    () => {{
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            ::std::any::type_name::<T>()
        }
        let test = name_of(here);
        let test = test.strip_suffix("::here").unwrap_or(test);
        let test = test.strip_suffix("::{{closure}}").unwrap_or(test);
        match $crate::store::Store::require(test) {
            Some(store) => store,
            None => return,
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "MAIL_RELAY_STORE_URL=postgres://mail_relay@127.0.0.1:15432/mail_relay
MAIL_RELAY_STORE_HOST=127.0.0.1
MAIL_RELAY_STORE_PORT=15432
MAIL_RELAY_STORE_USER=mail_relay
MAIL_RELAY_STORE_DATABASE=mail_relay
MAIL_RELAY_STORE_PASSWORD=pw
MAIL_RELAY_STORE_PASSWORD_FILE=/s/password
MAIL_RELAY_STORE_CA=/s/tls/ca.pem
MAIL_RELAY_STORE_DATA_DIR=/s/pgdata
MAIL_RELAY_STORE_BIN_DIR=/usr/lib/postgresql/15/bin
MAIL_RELAY_STORE_OS_USER=postgres
MAIL_RELAY_STORE_LOG=/s/postgres.log
";

    #[test]
    fn store_env_is_parsed_and_the_password_is_not_shown() {
        let store = Store::parse(ENV).unwrap();
        assert_eq!(store.port, 15432);
        assert_eq!(store.data_dir, Path::new("/s/pgdata"));
        assert_eq!(store.os_user, "postgres");
        assert!(!format!("{store:?}").contains("pw\""));
        let without_bin: String = ENV
            .lines()
            .filter(|l| !l.starts_with("MAIL_RELAY_STORE_BIN_DIR="))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(Store::parse(&without_bin).is_none());
    }
}
