//! The HTTP edge: the accept loop with its timeouts and connection cap, the client address behind a trusted proxy, and
//! the in-flight tracking that a graceful drain waits on. Nothing here knows what a mail is.

mod connection;
mod detect;
pub mod drain;
pub mod forwarded;
pub mod serve;
