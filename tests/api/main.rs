//! Integration tests, compiled as one binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod config;
mod entra;
mod helpers;
mod limits;
mod server;
mod token;
