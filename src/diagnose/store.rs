//! The store step: can the relay reach `mailRelay.store.url`, log in, and find (or create) its
//! schema? Each failure names the layer: DNS, TCP, TLS, authentication, permissions, schema.

use crate::config::{StoreSettings, StoreUrl};
use crate::store::{Db, describe, schema_version};

use super::Step;
use crate::remedy::Setup;

const NAME: &str = "store";

pub async fn check(settings: &StoreSettings) -> Step {
    if settings.url == StoreUrl::Memory {
        return Step::pass(
            NAME,
            "memory: state is this process's alone (one replica; a restart forgets Idempotency-Keys and limits)",
        );
    }
    let db = match Db::connect(settings) {
        Ok(Some(db)) => db,
        Ok(None) => return Step::pass(NAME, "memory"),
        Err(e) => {
            return Step::fail(
                NAME,
                "the store URL cannot be used",
                e,
                vec![Setup::StoreUrl.fix()],
            );
        }
    };
    let timeout = settings.connect_timeout * 2;
    let step = match tokio::time::timeout(timeout, probe(&db)).await {
        Err(_) => Step::fail(
            NAME,
            format!("no answer from {}", settings.url),
            format!("nothing within {} s", timeout.as_secs()),
            vec![Setup::StoreSilent.fix()],
        ),
        Ok(Err(error)) => {
            let cause = describe(&error);
            let fix = fix_for(&cause);
            Step::fail(NAME, format!("{} does not work", settings.url), cause, fix)
        }
        Ok(Ok(applied)) => {
            let needed = schema_version();
            let schema = match applied {
                None => "no schema yet: the relay applies it at start".to_owned(),
                Some(v) if v == needed => format!("schema version {v}"),
                Some(v) if v < needed => {
                    format!("schema version {v}; the relay applies {needed} at start")
                }
                Some(v) => format!("schema version {v}, newer than this build's {needed}"),
            };
            Step::pass(
                NAME,
                format!("{}: reachable, logged in, {schema}", settings.url),
            )
        }
    };
    db.close().await;
    step
}

/// Log in, and read the applied schema version (none when the table is not there yet).
async fn probe(db: &Db) -> Result<Option<i64>, sqlx::Error> {
    db.ping().await?;
    match db.applied_version().await {
        Ok(version) => Ok(version),
        // 42P01 (PostgreSQL) or "no such table" (SQLite): not migrated yet.
        Err(sqlx::Error::Database(e))
            if e.code().as_deref() == Some("42P01") || e.message().contains("no such table") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn fix_for(cause: &str) -> Vec<String> {
    let fix = if cause.starts_with("DNS") {
        Setup::StoreHost
    } else if cause.starts_with("TCP") {
        Setup::StoreReach
    } else if cause.starts_with("TLS") {
        Setup::StoreTls
    } else if cause.starts_with("authentication") {
        Setup::StoreLogin
    } else if cause.starts_with("permissions") {
        Setup::StoreGrant
    } else {
        Setup::SeeCause
    };
    vec![fix.fix()]
}
