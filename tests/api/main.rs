//! Integration tests, compiled as one binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod cli;
mod config;
mod e2e;
mod entra;
mod helpers;
mod mail;
mod observe;
pub mod peer;
mod peer_smoke;
mod server;
mod smtp;
mod token;
