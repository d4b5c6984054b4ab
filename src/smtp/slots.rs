//! The mailbox's connection slots across replicas: Exchange Online allows 3 sessions per
//! mailbox, counted over every client, so replicas must share the cap, not each keep it.
//!
//! A [`ConnectionSlots`] (the store's, with a shared database) hands out at most
//! `maxConnections` slots for the whole deployment. A connection is opened only with a slot,
//! holds it for its life and gives it back when it closes. With slots, an idle connection is
//! closed after [`SHARED_MAX_IDLE`], so one quiet replica cannot keep the others waiting.

use std::time::Duration;

use async_trait::async_trait;

/// An idle connection is closed after this long when slots are shared (60 s otherwise).
pub const SHARED_MAX_IDLE: Duration = Duration::from_secs(2);
/// How often a send that found neither an idle connection nor a free slot looks again (at
/// both: a connection of its own replica coming back serves it as well as a slot).
pub const SLOT_POLL: Duration = Duration::from_millis(50);

/// A held slot; dropping it gives the slot back.
pub type Slot = Box<dyn Send + Sync>;

/// Slots for the SMTP mailbox shared by every replica.
#[async_trait]
pub trait ConnectionSlots: Send + Sync + 'static {
    /// A free slot if there is one now, `None` when every slot is held; `Err` when the shared
    /// state cannot be asked, with a message for an operator.
    async fn try_acquire(&self) -> Result<Option<Slot>, String>;
}
