//! The HTTP edge: the accept loop and its timeouts, the client address behind a trusted proxy, and
//! the in-flight tracking that a graceful drain waits on. Nothing here knows what a mail is.

pub mod drain;
pub mod forwarded;
pub mod serve;
