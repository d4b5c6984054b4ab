//! Load and fault tests against the real SMTP peer, compiled as their own binary so that they
//! neither slow down nor are slowed down by the API tests: `cargo test --test load`.
//!
//! The tests in here run one at a time (each takes [`exclusive`] first): they share the peer and
//! some of them assert how promptly the relay answers.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../api/entra.rs"]
mod entra;
#[path = "../api/helpers.rs"]
mod helpers;
#[path = "../api/peer.rs"]
pub mod peer;
#[path = "../api/process.rs"]
mod process;

mod faults;
mod harness;
mod http;
mod mails;
mod shared_slots;
mod sigterm;
#[path = "../store/settings.rs"]
pub mod store_settings;

/// One load or fault test at a time, across the test harness's threads.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
