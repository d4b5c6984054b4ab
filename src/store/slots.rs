//! The SMTP mailbox's connection slots across replicas, as PostgreSQL session advisory locks.
//!
//! Slot `i` of a mailbox is the lock `(hash(mailbox), i)`, taken with `pg_try_advisory_lock` on
//! a database session of its own that lives as long as the SMTP connection holding the slot.
//! Closing the session (the connection closed, the replica stopped or killed) frees the lock at
//! once: the server ends a session whose socket closes. A replica cut off by the network is
//! noticed by the server's TCP keep-alive, set on these sessions to 5 s idle, then 3 probes
//! 2 s apart: its slots are free again within about 15 s.

use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::describe;

/// Slots for one mailbox, shared by every replica on the same database.
pub struct SharedSlots {
    options: PgConnectOptions,
    mailbox: i32,
    max: i32,
    /// A session that found every slot held, kept for the next try: a new session per try
    /// would cost a login each time.
    spare: Mutex<Option<PgConnection>>,
}

/// A held slot: its database session. Dropping it closes the session, which frees the lock.
pub struct SlotLock {
    _session: PgConnection,
}

impl SharedSlots {
    pub(super) fn new(options: &PgConnectOptions, mailbox: &str, max: usize) -> Self {
        let digest = Sha256::digest(mailbox.to_ascii_lowercase().as_bytes());
        let options = options.clone().options([
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "2"),
            ("tcp_keepalives_count", "3"),
        ]);
        Self {
            options,
            mailbox: i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]),
            max: i32::try_from(max).unwrap_or(i32::MAX),
            spare: Mutex::new(None),
        }
    }

    /// A free slot now, or `None` when every one is held. The session that takes the lock
    /// becomes the slot's; one that found none is kept for the next try.
    pub async fn try_acquire(&self) -> Result<Option<SlotLock>, String> {
        let spare = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(session) = spare {
            // The kept session may have been ended by the server since (a restart, a
            // failover): then it fails its first query, and a fresh one tries once more.
            if let Ok(found) = self.try_slots(session).await {
                return Ok(found);
            }
        }
        let session = PgConnection::connect_with(&self.options)
            .await
            .map_err(|e| describe(&e))?;
        self.try_slots(session).await
    }

    /// Every slot in turn on `session`; on an error the session is dropped.
    async fn try_slots(&self, mut session: PgConnection) -> Result<Option<SlotLock>, String> {
        for slot in 0..self.max {
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(self.mailbox)
                .bind(slot)
                .fetch_one(&mut session)
                .await
                .map_err(|e| describe(&e))?;
            if held {
                return Ok(Some(SlotLock { _session: session }));
            }
        }
        *self.spare.lock().unwrap_or_else(PoisonError::into_inner) = Some(session);
        Ok(None)
    }
}
