//! The connection pool: a cap on open connections and a stack of idle ones.
//!
//! The semaphore has `max_connections` permits; a send holds one from checkout to
//! check-in, and a connection is opened only by a permit holder that found no idle one.
//! So open connections (in use + idle) never exceed the cap: a holder has at most one
//! connection, and it opens one only when every other connection is held.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connection::Connection;

pub(crate) struct Pool {
    permits: std::sync::Arc<Semaphore>,
    /// Most recently used last: reuse the warmest connection, let the others age out.
    idle: Mutex<Vec<Connection>>,
    closed: AtomicBool,
}

impl Pool {
    pub fn new(max_connections: usize) -> Self {
        Self {
            permits: std::sync::Arc::new(Semaphore::new(max_connections)),
            idle: Mutex::new(Vec::with_capacity(max_connections)),
            closed: AtomicBool::new(false),
        }
    }

    /// Waits for a turn to use (or open) a connection.
    pub async fn turn(&self) -> OwnedSemaphorePermit {
        // Acquiring fails only on a closed semaphore, and this one is never closed.
        std::sync::Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed")
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // A panic while holding this lock leaves a valid Vec: keep using it.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used idle connection, if any (only with a turn held).
    pub fn take_idle(&self) -> Option<Connection> {
        self.idle().pop()
    }

    /// Returns a connection for reuse; after [`Pool::close`] it is handed back to be quit.
    pub fn put_back(&self, connection: Connection) -> Option<Connection> {
        // Checked under the lock `close` takes too, so no connection slips in after it.
        let mut idle = self.idle();
        if self.closed.load(Ordering::Acquire) {
            return Some(connection);
        }
        idle.push(connection);
        None
    }

    /// Takes out the idle connections matching `pred` (oldest first).
    pub fn take_where(&self, pred: impl Fn(&Connection) -> bool) -> Vec<Connection> {
        let mut idle = self.idle();
        let (taken, kept): (Vec<_>, Vec<_>) = idle.drain(..).partition(|c| pred(c));
        *idle = kept;
        taken
    }

    /// Stops keeping connections and returns the idle ones.
    pub fn close(&self) -> Vec<Connection> {
        let mut idle = self.idle();
        self.closed.store(true, Ordering::Release);
        std::mem::take(&mut *idle)
    }

    pub fn idle_count(&self) -> usize {
        self.idle().len()
    }
}
