//! Queued delivery: the durable outbox behind `Prefer: respond-async` and
//! `mailRelay.delivery.queue: always`.
//!
//! A queued mail is checked and built exactly as a synchronous one; then it is committed to the
//! store, and only then does the client get `202` with `"status": "queued"`. Delivery workers in
//! every replica claim mails from the store one at a time and send them on the same path as a
//! synchronous request (`MailSender`), so the SMTP pool and its cap are shared with it.
//!
//! A mail's life: `queued` -> `sending` (claimed by one worker, for a lease) -> `sent`,
//! `failed`, `expired` or `unknown`; a temporary failure puts it back to `queued` with a later
//! `next_attempt_at` (`retry`). Exactness rests on one mark: right before the message itself goes
//! out (before DATA), the worker records that it is uploading. A claim whose lease runs out (its
//! worker died) goes back to `queued` when that mark is absent: nothing was sent. With the mark,
//! the server may have the mail, so it ends `unknown` and is not sent again unless an operator
//! says so ([`QueueStore::requeue`]).
//!
//! The queue lives behind [`QueueStore`], which `store/` implements in SQL (SQLite and
//! PostgreSQL); the memory store has no queue, and then mails are sent synchronously.

mod attempt;
pub mod notify;
mod record;
pub mod retry;
mod worker;

use async_trait::async_trait;

pub use self::record::{
    Attempt, Claimed, Depth, Enqueued, Finish, MailRecord, MailState, NewMail, Swept,
};
pub use self::worker::{Queue, QueueDelivery, QueueError, Refusal};
use crate::clock::Millis;

/// Where queued mails live. Every method is one short statement or transaction; failures come
/// back described for an operator (the store's own words), and mean "try again later".
#[async_trait]
pub trait QueueStore: Send + Sync + 'static {
    /// Commit a new mail as `queued`, due at once, unless the caller's mail with the same
    /// Idempotency-Key is there already (then [`Enqueued::Earlier`], in the same statement).
    async fn enqueue(&self, mail: NewMail<'_>) -> Result<Enqueued, String>;

    /// Claim the mail due longest (`next_attempt_at <= now`) for `worker` until `lease_until`,
    /// counting an attempt; `None` when nothing is due. No two workers get the same mail.
    async fn claim(
        &self,
        worker: &str,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<Claimed>, String>;

    /// Record that `worker` is about to upload the mail (the exactness mark). `false` when the
    /// claim is no longer the worker's (its lease ran out): it must not upload.
    async fn mark_uploading(&self, id: &str, worker: &str, now: Millis) -> Result<bool, String>;

    /// End `worker`'s claim as `end` says, with the attempt history `history` (the claim's, plus
    /// this attempt). `false` when the claim was no longer the worker's.
    async fn finish(
        &self,
        id: &str,
        worker: &str,
        end: &Finish,
        history: &[Attempt],
        now: Millis,
    ) -> Result<bool, String>;

    /// Give a claim back without counting the attempt: due again at `until` (a rate-limit window).
    async fn postpone(&self, id: &str, worker: &str, until: Millis) -> Result<bool, String>;

    /// Give back every claim of `worker` that has not started its upload (at shutdown).
    async fn release(&self, worker: &str) -> Result<u64, String>;

    /// Claims whose lease ran out go back to `queued` (no upload mark) or end `unknown` (with
    /// one); `queued` mails past their age end `expired`.
    async fn sweep(&self, now: Millis) -> Result<Swept, String>;

    /// Delete mails that finished before `before`, with their MIME.
    async fn forget_finished(&self, before: Millis) -> Result<u64, String>;

    /// One mail, whoever sent it (the API checks the caller).
    async fn get(&self, id: &str) -> Result<Option<MailRecord>, String>;

    /// The newest mails, `state`'s only when given, at most `limit`.
    async fn list(&self, state: Option<MailState>, limit: u32) -> Result<Vec<MailRecord>, String>;

    /// Put a mail that is not `sending` back to `queued`, due at once and alive until
    /// `expires_at` (the operator's `retry`). `false` when there is no such mail.
    async fn requeue(&self, id: &str, now: Millis, expires_at: Millis) -> Result<bool, String>;

    /// Delete a mail that is not `sending` (the operator's `drop`).
    async fn remove(&self, id: &str) -> Result<bool, String>;

    /// Claim up to `limit` mails whose completion call is due (they ended `failed`, `expired`
    /// or `unknown` after `since`), until `lease_until`: each with the number of calls so far,
    /// this one included. A claim whose replica dies is due again at its lease's end.
    async fn claim_webhooks(
        &self,
        now: Millis,
        since: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> Result<Vec<(MailRecord, u32)>, String>;

    /// The completion call for `id` got its 2xx (`None`), or is due again at `next_at`.
    async fn webhook_done(&self, id: &str, next_at: Option<Millis>) -> Result<(), String>;

    /// Take up to `limit` of the mails that ended `failed`, `expired` or `unknown` after `since`
    /// and that no administrators' notice named yet, oldest first; no other replica gets them.
    async fn take_admin_batch(
        &self,
        now: Millis,
        since: Millis,
        limit: u32,
    ) -> Result<Vec<MailRecord>, String>;

    /// How many mails are in each state, their bytes, and when the oldest queued one came.
    async fn depth(&self) -> Result<Depth, String>;
}
