//! What the queue stores about a mail, and what a finished attempt leaves behind.

use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// Attempts kept per mail: the first ones and the latest tell the story; the count is exact.
pub const HISTORY_MAX: usize = 20;

/// Where a queued mail is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailState {
    /// Committed, waiting for its next attempt.
    Queued,
    /// A worker holds it and is sending it.
    Sending,
    /// The server answered 2xx to the end of DATA.
    Sent,
    /// Refused for good; `problem` says why and what to fix.
    Failed,
    /// Not delivered within `mailRelay.delivery.maxAgeSeconds`.
    Expired,
    /// The message went out but no verdict came back (or its worker died while uploading):
    /// the server may have it. Not sent again unless an operator says so.
    Unknown,
}

impl MailState {
    pub const ALL: [Self; 6] = [
        Self::Queued,
        Self::Sending,
        Self::Sent,
        Self::Failed,
        Self::Expired,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Nothing more will happen to it by itself.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Sending)
    }
}

/// One attempt to deliver, as `GET /mail/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// When it ended (Unix ms).
    pub at: Millis,
    /// `sent`, or the failure's classified kind (`smtp_thread_limit`, `token_unavailable`, ...).
    pub kind: String,
    /// The server's reply to the last command, when there was one (`432 4.3.2 ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// What happened, for a person.
    pub detail: String,
}

/// A mail to commit.
#[derive(Debug, Clone, Copy)]
pub struct NewMail<'a> {
    pub id: &'a str,
    /// The caller that sent it (`caller::caller_id`): only it may read its status.
    pub caller: &'a str,
    pub message_id: &'a str,
    /// The envelope sender and recipients.
    pub from: &'a str,
    pub recipients: &'a [String],
    /// The whole message, as it goes into DATA.
    pub mime: &'a [u8],
    pub now: Millis,
    pub expires_at: Millis,
    /// The request's `Idempotency-Key` and fingerprint, when it came with one: kept in the
    /// mail's row, so that the key's retry finds this mail even if its answer was never stored.
    pub idempotency: Option<(&'a str, &'a [u8])>,
}

/// What [`QueueStore::enqueue`](super::QueueStore::enqueue) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// The mail is committed.
    New,
    /// This caller's mail with this Idempotency-Key was committed before, by a request whose
    /// answer was lost (its replica died); nothing new is queued. `same_request` is `false` when
    /// that mail came with a different request body.
    Earlier {
        id: String,
        message_id: String,
        same_request: bool,
    },
}

/// A mail a worker holds.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub caller: String,
    pub message_id: String,
    pub from: String,
    pub recipients: Vec<String>,
    pub mime: Vec<u8>,
    /// Attempts so far, this one included.
    pub attempts: u32,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub history: Vec<Attempt>,
}

impl Claimed {
    /// The history with `attempt` added, at most `HISTORY_MAX` long (the first attempt and the
    /// latest ones).
    pub fn history_with(&self, attempt: Attempt) -> Vec<Attempt> {
        let mut history = self.history.clone();
        history.push(attempt);
        if history.len() > HISTORY_MAX {
            history.drain(1..history.len() - HISTORY_MAX + 1);
        }
        history
    }
}

/// How a worker's attempt ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Sent {
        reply: String,
        accepted: Vec<String>,
    },
    /// A temporary failure: due again at `next_at`.
    Retry {
        next_at: Millis,
    },
    Failed {
        /// The problem object `GET /mail/{id}` shows, as the synchronous answer would have been.
        problem: serde_json::Value,
    },
    Expired,
    Unknown,
}

impl Finish {
    pub fn state(&self) -> MailState {
        match self {
            Self::Sent { .. } => MailState::Sent,
            Self::Retry { .. } => MailState::Queued,
            Self::Failed { .. } => MailState::Failed,
            Self::Expired => MailState::Expired,
            Self::Unknown => MailState::Unknown,
        }
    }
}

/// A mail as the store has it.
#[derive(Debug, Clone, PartialEq)]
pub struct MailRecord {
    pub id: String,
    pub caller: String,
    pub message_id: String,
    pub state: MailState,
    pub recipients: Vec<String>,
    pub bytes: u64,
    pub created_at: Millis,
    pub expires_at: Millis,
    /// When the next attempt is due (`queued` only).
    pub next_attempt_at: Option<Millis>,
    pub attempts: u32,
    pub history: Vec<Attempt>,
    /// The recipients the server accepted (`sent` only).
    pub accepted: Option<Vec<String>>,
    pub problem: Option<serde_json::Value>,
    pub finished_at: Option<Millis>,
}

/// What a sweep changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Claims of dead workers that had not started the upload: queued again.
    pub requeued: u64,
    /// Claims of dead workers that had: the server may have the mail.
    pub unknown: u64,
    pub expired: u64,
}

/// The queue's size, for `/metrics` and the `maxQueuedBytes` bound.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Depth {
    /// Mails and their bytes per state; states without mails are absent.
    pub by_state: Vec<(MailState, u64, u64)>,
    /// When the oldest mail still `queued` or `sending` was accepted.
    pub oldest_waiting: Option<Millis>,
}

impl Depth {
    /// The bytes of mail still to deliver (queued and sending).
    pub fn waiting_bytes(&self) -> u64 {
        self.by_state
            .iter()
            .filter(|(state, ..)| !state.is_final())
            .map(|(_, _, bytes)| bytes)
            .sum()
    }

    pub fn count(&self, state: MailState) -> u64 {
        self.by_state
            .iter()
            .find(|(s, ..)| *s == state)
            .map_or(0, |(_, count, _)| *count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(at: Millis) -> Attempt {
        Attempt {
            at,
            kind: "smtp_unavailable".into(),
            reply: None,
            detail: "down".into(),
        }
    }

    #[test]
    fn the_history_keeps_the_first_attempt_and_the_latest() {
        let mut claimed = Claimed {
            id: "m".into(),
            caller: "key:shop".into(),
            message_id: "<m@x>".into(),
            from: "a@x".into(),
            recipients: vec![],
            mime: vec![],
            attempts: 0,
            created_at: 0,
            expires_at: 0,
            history: vec![],
        };
        for at in 0..30 {
            claimed.history = claimed.history_with(attempt(at));
        }
        assert_eq!(claimed.history.len(), HISTORY_MAX);
        assert_eq!(claimed.history[0].at, 0);
        assert_eq!(claimed.history[1].at, 11);
        assert_eq!(claimed.history.last().unwrap().at, 29);
    }

    #[test]
    fn states_round_trip_and_only_queued_and_sending_wait() {
        for state in MailState::ALL {
            assert_eq!(MailState::parse(state.as_str()), Some(state));
        }
        let waiting: Vec<_> = MailState::ALL
            .into_iter()
            .filter(|s| !s.is_final())
            .collect();
        assert_eq!(waiting, [MailState::Queued, MailState::Sending]);
    }
}
