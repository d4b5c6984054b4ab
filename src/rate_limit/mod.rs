//! Rate limits that keep the relay inside Exchange Online's limits, and each caller's share of them.
//!
//! Exchange Online allows one mailbox 30 messages per minute and 10,000 recipients per rolling
//! 24 hours (EXCHANGE.md section 4). Past the daily quota it refuses every mail for up to a day
//! (`SubmissionQuotaExceeded`), so the relay refuses the excess itself, with `429` and
//! `Retry-After`, before any SMTP traffic.
//!
//! A request reserves its cost on every limit at once ([`RateLimits::reserve`]); a send that fails
//! before the server accepted the mail gives the reservation back ([`RateLimits::refund`]), so
//! failed sends do not burn quota.
//!
//! Each caller (API key, or user through the proxy or OIDC) has its own messages per minute and
//! recipients per day, by default a quarter of the mailbox's: one caller sending large mails
//! cannot use up the mailbox's day for every other caller.
//!
//! `policy` says which limits a mail is held to and how a refusal reads; `windows` counts.
//!
//! The counting lives behind [`RateLimiter`]. [`InMemoryRateLimiter`] counts in this process,
//! which is right for one replica. Several replicas sending through one mailbox share its limit:
//! they need a shared store (e.g. Redis, with a script doing the same all-or-nothing reservation
//! over sorted sets), added as another `RateLimiter` without touching the callers.

mod policy;
mod windows;

pub use self::policy::{LimitError, LimitKind, RateLimited, RateLimits, mailbox_of};
pub use self::windows::{
    Ask, InMemoryRateLimiter, LimitKey, RateLimiter, Reservation, Reserved, wait_until_fits,
};
