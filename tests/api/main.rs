//! Integration tests, compiled as one binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;
pub mod peer;
mod peer_smoke;
mod server;
