//! The HTTP API: one file per resource, errors in one place.

mod auth;
pub mod budget;
pub mod docs;
pub mod errors;
pub mod form;
pub mod health;
pub mod json;
pub mod mail;
pub mod mail_status;
pub mod metrics;
pub mod openapi;

pub use errors::ApiError;
