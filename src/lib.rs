//! mail-relay: an HTTP-to-SMTP relay for Microsoft 365 that authenticates with OAuth2.
//!
//! Data flows one way: request -> caller -> policy (send-as, limits, idempotency) -> message ->
//! delivery -> transport (SMTP or Microsoft Graph) -> token. ARCHITECTURE.md is the map.

pub mod admin;
pub mod api;
pub mod app;
pub mod caller;
pub mod causes;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod diagnose;
pub mod graph;
pub mod http;
pub mod idempotency;
pub mod identity;
pub mod message;
pub mod queue;
pub mod rate_limit;
pub mod remedy;
pub mod send_as;
pub mod smtp;
pub mod store;
pub mod telemetry;
pub mod token;

/// What the relay calls itself in outbound HTTP requests (Entra ID, Graph, the completion calls).
pub const USER_AGENT: &str = concat!("mail-relay/", env!("CARGO_PKG_VERSION"));
