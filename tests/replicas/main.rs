//! The real binary as two or three replicas sharing one store (the private PostgreSQL of
//! `tests/store/start.sh`, or an SQLite file for one instance) and the one SMTP peer:
//! `cargo test --test replicas`.
//!
//! Every test runs the binary (`CARGO_BIN_EXE_mail-relay`) with a settings file of its own per
//! replica, a database of its own (so that no rate-limit window or key of another test or an
//! earlier run counts), and a marker of its own in the subjects, and checks the peer's Maildir.
//! They run one at a time (each takes [`exclusive`] first): one of them stops PostgreSQL, and the
//! others count at the peer.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../api/entra.rs"]
mod entra;
#[path = "../load/harness.rs"]
mod harness;
#[path = "../api/helpers.rs"]
mod helpers;
#[path = "../api/peer.rs"]
pub mod peer;
#[path = "../api/process.rs"]
mod process;
#[path = "../store/store.rs"]
pub mod store;

mod cluster;
mod connection_cap;
mod idempotency;
mod limits;
mod outage;
mod peer_log;
mod queued;
mod restart;
mod sqlite;

/// One replica test at a time, across the test harness's threads.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
