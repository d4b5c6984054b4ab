//! The store of idempotency records, and the in-memory one with its expiry and fair eviction.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

use super::{Fingerprint, IdempotencyError, IdempotencyKey, StoredResponse};
use crate::clock::{Millis, duration_ms};
use crate::config::IdempotencySettings;

/// What the store found for a key.
#[derive(Debug)]
pub enum Slot {
    /// No record: this request claimed the key; `token` identifies the claim.
    New {
        token: u64,
    },
    Replay(StoredResponse),
    /// Claimed or completed with another fingerprint.
    Conflict,
    /// Claimed, not completed yet.
    InProgress,
}

/// Keeps idempotency records per (caller scope, key).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claim `key` for `fingerprint`, or report what is already there.
    async fn begin(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: Millis,
    ) -> Result<Slot, IdempotencyError>;

    /// Store the answer for the claim `token`; nothing when the claim is gone (expired, evicted).
    /// It is kept for the TTL from `now`, the answer's time, since its request may have run
    /// longer than the TTL.
    async fn complete(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        token: u64,
        response: StoredResponse,
        now: Millis,
    );

    /// Drop the claim `token` so a retry can run. Synchronous because it runs from `Drop`;
    /// a networked store spawns the removal.
    fn abandon(&self, scope: &str, key: &IdempotencyKey, token: u64);
}

/// What a record costs beyond its key and answer: its map and queue slots, fingerprint and
/// times. An estimate; what matters is that the bound grows with what clients send.
const RECORD_OVERHEAD: usize = 256;

struct Entry {
    fingerprint: Fingerprint,
    token: u64,
    expires_at: Millis,
    response: Option<StoredResponse>,
}

impl Entry {
    /// Bytes this record holds, counted against `maxBytes`: the caller and key are kept three
    /// times (map, expiry queue, caller queue).
    fn size(&self, id: &RecordId) -> usize {
        RECORD_OVERHEAD
            + 3 * (id.0.len() + id.1.as_str().len())
            + self.response.as_ref().map_or(0, StoredResponse::size)
    }
}

type RecordId = (String, IdempotencyKey);

/// What eviction makes room for.
#[derive(Clone, Copy)]
enum Measure {
    Count,
    Bytes,
}

#[derive(Default)]
struct Records {
    entries: HashMap<RecordId, Entry>,
    /// Claims oldest first, as (token, record), for expiry. Removed entries leave stale items
    /// here, skipped by their token and compacted when they pile up.
    order: VecDeque<(u64, RecordId)>,
    /// Each caller's records, for eviction beyond a bound from the caller holding the most, so
    /// one caller's flood of keys (or of large refusals) pushes out its own records, never
    /// another caller's.
    scopes: HashMap<String, Scope>,
    /// (live records, caller) for every caller holding any: the last one holds the most.
    by_count: BTreeSet<(usize, String)>,
    /// (bytes held, caller) for every caller holding any: the last one holds the most bytes.
    by_bytes: BTreeSet<(usize, String)>,
    /// Bytes held by all records ([`Entry::size`]).
    bytes: usize,
    next_token: u64,
}

/// One caller's claims oldest first (stale items skipped as in `Records::order`).
#[derive(Default)]
struct Scope {
    order: VecDeque<(u64, IdempotencyKey)>,
    live: usize,
    bytes: usize,
}

impl Records {
    fn is_current(&self, token: u64, id: &RecordId) -> bool {
        self.entries.get(id).is_some_and(|e| e.token == token)
    }

    fn insert(&mut self, id: RecordId, entry: Entry) {
        let token = entry.token;
        let size = entry.size(&id);
        let replaced = self
            .entries
            .insert(id.clone(), entry)
            .map(|old| old.size(&id));
        let (scope_name, key) = id.clone();
        self.order.push_back((token, id));
        self.account(&scope_name, |scope| {
            scope.order.push_back((token, key));
            scope.live += usize::from(replaced.is_none());
            scope.bytes = scope.bytes - replaced.unwrap_or(0) + size;
        });
    }

    fn remove(&mut self, id: &RecordId) {
        let Some(entry) = self.entries.remove(id) else {
            return;
        };
        let size = entry.size(id);
        self.account(&id.0, |scope| {
            scope.live -= 1;
            scope.bytes -= size;
        });
    }

    /// The answer for the claim `token`, kept for the TTL from `now` (or longer, if the claim's
    /// own expiry is later).
    fn answer(&mut self, id: &RecordId, token: u64, response: StoredResponse, expires_at: Millis) {
        let Some(entry) = self.entries.get_mut(id).filter(|e| e.token == token) else {
            return;
        };
        let before = entry.size(id);
        entry.response = Some(response);
        entry.expires_at = entry.expires_at.max(expires_at);
        let after = entry.size(id);
        self.account(&id.0, |scope| scope.bytes = scope.bytes - before + after);
    }

    /// Apply `change` to the caller's counts and keep the rankings and the total in step; a
    /// caller left with no records is forgotten.
    fn account(&mut self, name: &str, change: impl FnOnce(&mut Scope)) {
        let scope = self.scopes.entry(name.to_owned()).or_default();
        let before = (scope.live, scope.bytes);
        change(scope);
        let after = (scope.live, scope.bytes);
        self.bytes = self.bytes - before.1 + after.1;
        if before.0 > 0 {
            self.by_count.remove(&(before.0, name.to_owned()));
            self.by_bytes.remove(&(before.1, name.to_owned()));
        }
        if after.0 > 0 {
            self.by_count.insert((after.0, name.to_owned()));
            self.by_bytes.insert((after.1, name.to_owned()));
        } else {
            self.scopes.remove(name);
        }
    }

    fn ranking(&self, by: Measure) -> &BTreeSet<(usize, String)> {
        match by {
            Measure::Count => &self.by_count,
            Measure::Bytes => &self.by_bytes,
        }
    }

    /// Forget expired records and, beyond `max_entries` or `max_bytes`, the oldest ones of the
    /// caller holding the most records or bytes. A claim still waiting for its answer is never
    /// forgotten: its request may be sending, and a retry must not send again.
    fn trim(&mut self, now: Millis, max_entries: usize, max_bytes: usize) {
        self.expire(now);
        while self.entries.len() > max_entries && self.evict_one(Measure::Count) {}
        while self.bytes > max_bytes && self.evict_one(Measure::Bytes) {}
        self.compact();
    }

    fn expire(&mut self, now: Millis) {
        while let Some(entry) = front_answered(&mut self.order, |id| self.entries.get(id)) {
            if entry.expires_at > now {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.remove(&id);
            }
        }
    }

    /// Forget the oldest answered record of the caller holding the most records or bytes (the
    /// next one when all of its records are still waiting for answers). `false` when nothing
    /// can go.
    fn evict_one(&mut self, by: Measure) -> bool {
        let mut candidate = self.ranking(by).last().cloned();
        while let Some(current) = candidate {
            candidate = self.ranking(by).range(..&current).next_back().cloned();
            let name = current.1;
            let Some(scope) = self.scopes.get_mut(&name) else {
                continue;
            };
            let entries = &self.entries;
            let lookup = |key: &IdempotencyKey| entries.get(&(name.clone(), key.clone()));
            if front_answered(&mut scope.order, lookup).is_none() {
                continue;
            }
            if let Some((_, key)) = scope.order.pop_front() {
                self.remove(&(name, key));
                return true;
            }
        }
        false
    }

    /// Drop stale queue items once they outnumber the live records.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let order = std::mem::take(&mut self.order);
            self.order = order
                .into_iter()
                .filter(|(token, id)| self.is_current(*token, id))
                .collect();
        }
        for (name, scope) in &mut self.scopes {
            if scope.order.len() > 2 * scope.live + 64 {
                let entries = &self.entries;
                scope.order.retain(|(token, key)| {
                    entries
                        .get(&(name.clone(), key.clone()))
                        .is_some_and(|e| e.token == *token)
                });
            }
        }
    }
}

/// Brings the oldest answered record of `queue` to its front and returns it. Stale items
/// (removed or replaced records) are dropped on the way; claims still waiting for their answers
/// go to the back, each looked past once: they are never forgotten.
fn front_answered<'e, K>(
    queue: &mut VecDeque<(u64, K)>,
    entry_of: impl Fn(&K) -> Option<&'e Entry>,
) -> Option<&'e Entry> {
    let mut pending_seen = 0;
    while let Some((token, key)) = queue.front() {
        match entry_of(key).filter(|e| e.token == *token) {
            None => {
                queue.pop_front();
            }
            Some(e) if e.response.is_none() => {
                if pending_seen == queue.len() {
                    return None;
                }
                pending_seen += 1;
                queue.rotate_left(1);
            }
            Some(e) => return Some(e),
        }
    }
    None
}

/// Records in this process, for `ttl` each, at most `max_entries` of them holding at most
/// `max_bytes` (beyond either, the oldest of the caller holding the most are forgotten first).
pub struct InMemoryStore {
    ttl_ms: Millis,
    max_entries: usize,
    max_bytes: usize,
    // Never held across `.await`: every operation is a few map look-ups.
    records: Mutex<Records>,
}

impl InMemoryStore {
    pub fn new(settings: &IdempotencySettings) -> Self {
        Self {
            ttl_ms: duration_ms(settings.ttl),
            max_entries: settings.max_entries.max(1),
            max_bytes: settings.max_bytes,
            records: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many records are kept (claims and results).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the records hold, as counted against `maxBytes`.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[async_trait]
impl IdempotencyStore for InMemoryStore {
    async fn begin(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        now: Millis,
    ) -> Result<Slot, IdempotencyError> {
        let mut records = self.lock();
        records.trim(now, self.max_entries, self.max_bytes);
        let id = (scope.to_owned(), key.clone());
        // A claim still waiting for its answer counts however old: its send may be under way.
        if let Some(entry) = records.entries.get(&id)
            && (entry.expires_at > now || entry.response.is_none())
        {
            return Ok(if entry.fingerprint != fingerprint {
                Slot::Conflict
            } else {
                match &entry.response {
                    Some(response) => Slot::Replay(response.clone()),
                    None => Slot::InProgress,
                }
            });
        }
        records.next_token += 1;
        let token = records.next_token;
        records.insert(
            id,
            Entry {
                fingerprint,
                token,
                expires_at: now.saturating_add(self.ttl_ms),
                response: None,
            },
        );
        records.trim(now, self.max_entries, self.max_bytes);
        Ok(Slot::New { token })
    }

    async fn complete(
        &self,
        scope: &str,
        key: &IdempotencyKey,
        token: u64,
        response: StoredResponse,
        now: Millis,
    ) {
        let mut records = self.lock();
        let id = (scope.to_owned(), key.clone());
        records.answer(&id, token, response, now.saturating_add(self.ttl_ms));
        records.trim(now, self.max_entries, self.max_bytes);
    }

    fn abandon(&self, scope: &str, key: &IdempotencyKey, token: u64) {
        let mut records = self.lock();
        let id = (scope.to_owned(), key.clone());
        if records.is_current(token, &id) {
            records.remove(&id);
        }
    }
}
