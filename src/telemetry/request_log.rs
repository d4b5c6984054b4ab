//! One log line per request, and the HTTP metrics, from one middleware.
//!
//! Parts deeper in the request (the handler, the sender) add what they learn — the caller, the
//! From address, the SMTP reply code, an error's causes — to the request's `Notes` through a
//! task-local, so the line is written once, at the end, with everything in it. Errors are logged
//! there and nowhere else: `ApiError` only attaches its code and detail to the response.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::RequestId;
use tracing::Level;

use super::metrics::Metrics;
use crate::caller::Caller;

/// The request id header: set when missing, echoed in the answer, logged.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static NOTES: Arc<Mutex<Notes>>;
}

/// What the request's own code found out, for its log line.
#[derive(Debug, Default)]
struct Notes {
    caller_kind: Option<&'static str>,
    /// The API key's name; a user's address (personal data) only at debug level.
    caller_name: Option<String>,
    caller_is_user: bool,
    from: Option<String>,
    smtp_reply: Option<u16>,
    mail_id: Option<String>,
    message_id: Option<String>,
    recipients: Option<usize>,
    bytes: Option<usize>,
    cause: Option<String>,
    /// The mail reached the sender (counts in `mail_relay_mails_total`).
    handed_over: bool,
    /// The limit that refused the request (`telemetry::metrics::rate_limited`).
    rate_limit: Option<&'static str>,
    /// The sending identity the From chose.
    identity: Option<std::sync::Arc<str>>,
}

/// The error answer a response carries, attached by `ApiError::into_response`.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: &'static str,
    /// The error's message, kept for server errors only (they are logged).
    pub detail: Option<String>,
}

fn with_notes(f: impl FnOnce(&mut Notes)) {
    // Outside a request (unit tests, background tasks) there is nothing to note.
    let _ = NOTES.try_with(|notes| f(&mut lock(notes)));
}

fn lock(notes: &Mutex<Notes>) -> MutexGuard<'_, Notes> {
    notes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `future` with this request's notes, so a task spawned for the request still adds to its line.
pub fn carry_notes<F: Future>(future: F) -> impl Future<Output = F::Output> {
    let notes = NOTES.try_with(Arc::clone).ok();
    async move {
        match notes {
            Some(notes) => NOTES.scope(notes, future).await,
            None => future.await,
        }
    }
}

/// Who called.
pub fn note_caller(caller: &Caller) {
    with_notes(|n| {
        n.caller_kind = Some(caller.kind());
        match caller {
            Caller::ApiKey { name, .. } => n.caller_name = Some(name.clone()),
            Caller::User { address, .. } => {
                n.caller_name = Some(address.clone());
                n.caller_is_user = true;
            }
            Caller::Anonymous => {}
        }
    });
}

/// The mail's From address (logged as its domain, in full only at debug level).
pub fn note_from(address: &str) {
    with_notes(|n| n.from = Some(address.to_owned()));
}

/// The sending identity that serves the mail's From.
pub fn note_identity(name: &std::sync::Arc<str>) {
    with_notes(|n| n.identity = Some(std::sync::Arc::clone(name)));
}

/// The rate limit that refuses this request.
pub(super) fn note_rate_limit(scope: &'static str) {
    with_notes(|n| n.rate_limit = Some(scope));
}

/// The accepted mail: its ids, how many recipients the server took, its encoded size.
pub fn note_mail(id: &str, message_id: &str, recipients: usize, bytes: usize) {
    with_notes(|n| {
        n.mail_id = Some(id.to_owned());
        n.message_id = Some(message_id.to_owned());
        n.recipients = Some(recipients);
        n.bytes = Some(bytes);
    });
}

/// The mail was handed to the sender, and the SMTP server's reply code if there was one.
pub fn note_handed_over(smtp_reply: Option<u16>) {
    with_notes(|n| {
        n.handed_over = true;
        if smtp_reply.is_some() {
            n.smtp_reply = smtp_reply;
        }
    });
}

/// The cause chain of the error behind a failure, for the request's one error line.
pub fn note_cause(error: &(dyn std::error::Error + 'static)) {
    let chain = cause_chain(error);
    with_notes(|n| n.cause = Some(chain));
}

/// What went wrong underneath a failure, when it is known only as text.
pub fn note_cause_text(text: impl Into<String>) {
    let text = text.into();
    with_notes(|n| n.cause = Some(text));
}

/// `error: source: source ...`, skipping a source whose text its parent already shows.
pub fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = error.to_string();
    let mut last = chain.clone();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !last.contains(&text) {
            chain.push_str(": ");
            chain.push_str(&text);
        }
        last = text;
        source = e.source();
    }
    chain
}

/// The method as a label: any client can invent methods, and each would be a new series.
fn metric_method(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// Probes and scrapes come every few seconds: their lines are debug, unless they fail.
fn is_quiet(route: &str) -> bool {
    route.starts_with("/health/") || route == "/metrics"
}

/// The middleware: times the request, counts it, and writes its one line.
pub async fn observe(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = metric_method(request.method()).to_owned();
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .map(str::to_owned);
    let notes = Arc::new(Mutex::new(Notes::default()));
    let response = NOTES.scope(notes.clone(), next.run(request)).await;
    let latency = start.elapsed();
    let status = response.status().as_u16();
    let failure = response.extensions().get::<Failure>().cloned();
    let notes = std::mem::take(&mut *lock(&notes));

    metrics.http_request(&route, &method, status, latency);
    if notes.handed_over {
        metrics.mail(failure.as_ref().map(|f| f.code));
    }
    if status == 429 {
        let scope = notes.rate_limit.unwrap_or(if notes.handed_over {
            "exchange_quota"
        } else {
            "relay"
        });
        metrics.count_rate_limited(scope);
    }
    let line = Line {
        request_id: request_id.as_deref(),
        method: &method,
        route: &route,
        status,
        latency,
        failure: failure.as_ref(),
        notes: &notes,
    };
    let server_error = failure.as_ref().is_some_and(|f| f.detail.is_some());
    if server_error || (status >= 500 && !is_quiet(&route)) {
        line.write(Level::ERROR);
    } else if is_quiet(&route) {
        // A 503 from the readiness probe is its answer, not a failure of the request.
        line.write(Level::DEBUG);
    } else {
        line.write(Level::INFO);
    }
    response
}

struct Line<'a> {
    request_id: Option<&'a str>,
    method: &'a str,
    route: &'a str,
    status: u16,
    latency: Duration,
    failure: Option<&'a Failure>,
    notes: &'a Notes,
}

impl Line<'_> {
    fn write(&self, level: Level) {
        let debug = tracing::enabled!(Level::DEBUG);
        let n = self.notes;
        let caller_name = match (&n.caller_name, n.caller_is_user) {
            (Some(name), false) => Some(name.as_str()),
            (Some(address), true) if debug => Some(address.as_str()),
            _ => None,
        };
        let from_domain = n
            .from
            .as_deref()
            .and_then(|a| a.rsplit_once('@'))
            .map(|(_, domain)| domain);
        let from = n.from.as_deref().filter(|_| debug);
        let code = self.failure.map_or("ok", |f| f.code);
        let error = self.failure.and_then(|f| f.detail.as_deref());
        let latency_ms = self.latency.as_secs_f64() * 1000.0;
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    request_id = self.request_id,
                    method = self.method,
                    route = self.route,
                    status = self.status,
                    code,
                    caller = n.caller_kind,
                    caller_name,
                    from_domain,
                    from,
                    identity = n.identity.as_deref(),
                    smtp_reply = n.smtp_reply,
                    rate_limit = n.rate_limit,
                    mail_id = n.mail_id.as_deref(),
                    message_id = n.message_id.as_deref(),
                    recipients = n.recipients,
                    bytes = n.bytes,
                    latency_ms,
                    error,
                    cause = n.cause.as_deref(),
                    "request finished"
                )
            };
        }
        match level {
            Level::ERROR => line!(Level::ERROR),
            Level::DEBUG => line!(Level::DEBUG),
            _ => line!(Level::INFO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer failed")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn invented_methods_share_one_label() {
        let invented = axum::http::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(metric_method(&invented), "OTHER");
        assert_eq!(metric_method(&axum::http::Method::POST), "POST");
    }

    #[test]
    fn the_cause_chain_names_each_level_once() {
        let e = Outer(std::io::Error::other("disk full"));
        assert_eq!(cause_chain(&e), "outer failed: disk full");
        let e = Repeats(std::io::Error::other("disk full"));
        assert_eq!(cause_chain(&e), "wrapped: disk full");
    }

    #[tokio::test]
    async fn notes_outside_a_request_are_ignored() {
        note_from("a@b.c");
        note_handed_over(Some(250));
        let notes = Arc::new(Mutex::new(Notes::default()));
        NOTES
            .scope(notes.clone(), async { note_handed_over(Some(250)) })
            .await;
        assert!(lock(&notes).handed_over);
        assert_eq!(lock(&notes).smtp_reply, Some(250));
        assert!(lock(&notes).from.is_none());
    }
}
