//! Which identity sends a mail: the default (`featureSwitches.sendEmail`) or one of
//! `mailRelay.identities`, chosen by the From address, the most specific pattern first (an
//! exact address before a domain, a domain before the default's catch-all). Each identity has
//! its own sender (connection pool, token, transport), mailbox limits and Send As checks.
//! Nothing is ever spread across identities: one From has one mailbox.

mod router;

use std::sync::Arc;

pub use router::Routed;

use crate::config::AddressPattern;
use crate::delivery::{DeliveryError, FailureKind, MailSender};
use crate::rate_limit::{RateLimits, Reservation};
use crate::send_as::SendAsPolicy;
use crate::telemetry::delivery::SendHistory;

/// One sending identity, as the request path and the queue use it.
pub struct Identity {
    pub name: Arc<str>,
    /// The From addresses it serves; empty: every From (the default, alone).
    pub from: Vec<AddressPattern>,
    /// The mailbox it sends as (`smtpUsername`), or what stands for it.
    pub mailbox: String,
    pub sender: Arc<dyn MailSender>,
    /// Its recent sends: one identity failing does not make the others' instance unready.
    pub sends: Arc<SendHistory>,
    pub rate_limits: RateLimits,
    pub send_as: Arc<SendAsPolicy>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("mailbox", &self.mailbox)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// How closely it serves `from`: 2 for its exact address, 1 for its domain, 0 for a
    /// catch-all; `None` when it does not serve it.
    fn serves(&self, from: &str) -> Option<u8> {
        if self.from.is_empty() {
            return Some(0);
        }
        self.from
            .iter()
            .filter(|p| p.matches(from))
            .map(|p| match p {
                AddressPattern::Exact(_) => 2,
                AddressPattern::Domain(_) => 1,
            })
            .max()
    }

    /// What a failed send means for its mailbox limits, whether a request or a queue worker
    /// sent it: the quota back unless the server may have the mail, and Exchange's quota
    /// refusal remembered as the mailbox's block.
    pub async fn settle_failed_send(&self, error: &DeliveryError, quota: Reservation) {
        if error.outcome_unknown() {
            quota.keep();
        } else {
            self.rate_limits.refund(quota).await;
        }
        if error.kind() == FailureKind::QuotaExceeded {
            self.rate_limits.mailbox_quota_exceeded().await;
        }
    }
}

/// No identity serves the From address.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no sending identity serves the From address {from}; the identities are {}", .names.join(", "))]
pub struct NoIdentity {
    pub from: String,
    pub names: Vec<String>,
}

/// Every identity, the default first.
#[derive(Debug)]
pub struct Identities {
    all: Vec<Identity>,
}

impl Identities {
    pub fn new(default: Identity, others: Vec<Identity>) -> Self {
        let mut all = vec![default];
        all.extend(others);
        Self { all }
    }

    /// The identity that sends as `from`.
    pub fn route(&self, from: &str) -> Result<&Identity, NoIdentity> {
        // Patterns are unique across identities (the settings check), so the best is one.
        self.all
            .iter()
            .filter_map(|identity| identity.serves(from).map(|rank| (rank, identity)))
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, identity)| identity)
            .ok_or_else(|| NoIdentity {
                from: from.to_owned(),
                names: self.all.iter().map(|i| i.name.to_string()).collect(),
            })
    }

    /// `featureSwitches.sendEmail`'s identity.
    pub fn default_identity(&self) -> &Identity {
        &self.all[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Identity> {
        self.all.iter()
    }

    /// More than the default.
    pub fn several(&self) -> bool {
        self.all.len() > 1
    }
}
