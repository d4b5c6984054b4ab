//! Integration tests, compiled as one binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin_mail;
mod architecture;
mod auth;
mod budget;
mod cli;
mod config;
mod deploy;
mod diagnose;
mod drain;
mod e2e;
mod entra;
mod fakes;
mod graph;
mod graph_send;
mod helpers;
mod identities;
mod limits;
mod mail;
mod managed_identity;
mod observe;
pub mod peer;
mod peer_smoke;
pub mod process;
mod proxy;
mod queue;
mod queue_reports;
mod server;
mod smtp;
mod store;
#[path = "../store/settings.rs"]
pub mod store_settings;
mod token;
