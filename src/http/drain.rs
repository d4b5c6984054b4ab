//! What is still running: the requests in flight, so that a shutdown that runs out of time can
//! say which ones it abandons.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::RequestId;

/// The requests being served now. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    running: HashMap<u64, (String, Instant)>,
}

/// Removes its request from the registry when dropped (also when the request is cancelled).
#[derive(Debug)]
pub struct Running {
    registry: InFlight,
    id: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.registry.lock().running.remove(&self.id);
    }
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The registry stays consistent even if a holder panicked: every change is one call.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record `what` as running until the returned guard is dropped.
    pub fn start(&self, what: String) -> Running {
        let mut registry = self.lock();
        registry.next_id += 1;
        let id = registry.next_id;
        registry.running.insert(id, (what, Instant::now()));
        Running {
            registry: self.clone(),
            id,
        }
    }

    /// How many requests are running.
    pub fn count(&self) -> usize {
        self.lock().running.len()
    }

    /// One line per running request, oldest first: `POST /mail (request id …, running 12.3 s)`.
    pub fn describe(&self) -> Vec<String> {
        let registry = self.lock();
        let mut running: Vec<_> = registry.running.values().collect();
        running.sort_by_key(|(_, since)| *since);
        running
            .into_iter()
            .map(|(what, since)| format!("{what}, running {:.1} s", since.elapsed().as_secs_f64()))
            .collect()
    }
}

/// Middleware: registers each request for the time its handler runs.
pub async fn track(State(in_flight): State<InFlight>, request: Request, next: Next) -> Response {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("-");
    let what = format!(
        "{} {} (request id {request_id})",
        request.method(),
        request.uri().path()
    );
    let _running = in_flight.start(what);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_listed_until_its_guard_drops() {
        let in_flight = InFlight::default();
        let first = in_flight.start("POST /mail (request id a)".into());
        let second = in_flight.start("GET /health/ready (request id b)".into());
        assert_eq!(in_flight.count(), 2);
        let lines = in_flight.describe();
        assert!(
            lines[0].starts_with("POST /mail (request id a), running "),
            "{lines:?}"
        );
        assert!(lines[1].starts_with("GET /health/ready"), "{lines:?}");
        drop(first);
        assert_eq!(in_flight.count(), 1);
        assert!(in_flight.describe()[0].contains("request id b"));
        drop(second);
        assert_eq!(in_flight.count(), 0);
        assert!(in_flight.describe().is_empty());
    }
}
