//! Prometheus metrics, one registry per application.
//!
//! Each [`Metrics`] owns its own recorder rather than installing the global one: a process
//! (the test binary) may run many apps, and a global recorder can be installed only once.
//! Values read from other parts' state (open connections, token expiry) are set at scrape time.
//! No label carries an address, a secret or a caller's name: routes, statuses, codes and
//! fixed scopes only.

use std::time::{Duration, SystemTime};

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::queue::{Depth, MailState};
use crate::smtp::SmtpState;
use crate::store::StoreState;
use crate::token::TokenState;

/// Seconds; from a fast local answer to Exchange's slowest sends.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub const HTTP_REQUESTS: &str = "mail_relay_http_requests_total";
pub const HTTP_DURATION: &str = "mail_relay_http_request_duration_seconds";
pub const MAILS: &str = "mail_relay_mails_total";
pub const SMTP_SEND_DURATION: &str = "mail_relay_smtp_send_duration_seconds";
pub const SMTP_OPEN: &str = "mail_relay_smtp_connections_open";
pub const SMTP_IDLE: &str = "mail_relay_smtp_connections_idle";
pub const TOKEN_FETCHES: &str = "mail_relay_token_fetches_total";
pub const TOKEN_EXPIRES_IN: &str = "mail_relay_token_expires_in_seconds";
pub const RATE_LIMITED: &str = "mail_relay_rate_limited_total";
pub const READY: &str = "mail_relay_ready";
pub const TRANSPORT: &str = "mail_relay_transport";
pub const IDENTITY_UP: &str = "mail_relay_identity_up";
pub const HTTP_CONNECTIONS_OPEN: &str = "mail_relay_http_connections_open";
pub const HTTP_CONNECTIONS_REFUSED: &str = "mail_relay_http_connections_refused_total";
pub const MAIL_BYTES_IN_FLIGHT: &str = "mail_relay_mail_bytes_in_flight";
pub const STORE_UP: &str = "mail_relay_store_up";
pub const STORE_SCHEMA_VERSION: &str = "mail_relay_store_schema_version";
pub const STORE_PING: &str = "mail_relay_store_ping_seconds";
pub const STORE_FAILURES: &str = "mail_relay_store_query_failures_total";
pub const QUEUE_MAILS: &str = "mail_relay_queue_mails";
pub const QUEUE_BYTES: &str = "mail_relay_queue_bytes";
pub const QUEUE_OLDEST: &str = "mail_relay_queue_oldest_age_seconds";
pub const QUEUE_ATTEMPTS: &str = "mail_relay_queue_attempts_total";
pub const QUEUE_RETRIES: &str = "mail_relay_queue_retries_total";
pub const QUEUE_SWEPT: &str = "mail_relay_queue_swept_total";
pub const QUEUE_WEBHOOKS: &str = "mail_relay_queue_webhooks_total";

/// One application's metrics registry.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // Only fails for an empty bucket list, which this is not.
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let metrics = Self { recorder, handle };
        metrics.with(describe);
        metrics
    }

    fn with(&self, f: impl FnOnce()) {
        ::metrics::with_local_recorder(&self.recorder, f);
    }

    /// One answered HTTP request; `route` is the matched route (`/mail`), never the raw path.
    pub fn http_request(&self, route: &str, method: &str, status: u16, latency: Duration) {
        self.with(|| {
            counter!(HTTP_REQUESTS, "route" => route.to_owned(), "method" => method.to_owned(),
                "status" => status.to_string())
            .increment(1);
            histogram!(HTTP_DURATION, "route" => route.to_owned(), "method" => method.to_owned())
                .record(latency.as_secs_f64());
        });
    }

    /// A mail that was handed to the sender: `sent`, or `failed` with the answer's error code.
    pub fn mail(&self, code: Option<&'static str>) {
        let (outcome, code) = match code {
            None => ("sent", "ok"),
            Some(code) => ("failed", code),
        };
        self.with(|| counter!(MAILS, "outcome" => outcome, "code" => code).increment(1));
    }

    /// One hand-over to `identity`'s sender (the SMTP server, Graph, or the development outbox).
    pub fn smtp_send(&self, identity: &str, latency: Duration, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.with(|| {
            histogram!(SMTP_SEND_DURATION, "outcome" => outcome, "identity" => identity.to_owned())
                .record(latency.as_secs_f64());
        });
    }

    /// Whether `identity` sends (1) or its last sends all failed on the relay's side (0).
    pub fn set_identity_up(&self, identity: &str, up: bool) {
        self.with(|| {
            gauge!(IDENTITY_UP, "identity" => identity.to_owned()).set(if up { 1.0 } else { 0.0 });
        });
    }

    /// A request answered 429 (counted by the request middleware; see [`rate_limited`]).
    pub(crate) fn count_rate_limited(&self, scope: &'static str) {
        self.with(|| counter!(RATE_LIMITED, "scope" => scope).increment(1));
    }

    /// The transport carrying mail now (1) and the other one (0); with `delivery.mode: auto`
    /// a 1 for `graph` means Graph stands in for an SMTP AUTH the server refuses.
    pub fn set_transport(&self, in_use: &'static str) {
        self.with(|| {
            for transport in ["smtp", "graph"] {
                let value = if transport == in_use { 1.0 } else { 0.0 };
                gauge!(TRANSPORT, "transport" => transport).set(value);
            }
        });
    }

    /// Whether `/health/ready` would answer 200 now (1) or 503 (0).
    pub fn set_ready(&self, ready: bool) {
        self.with(|| gauge!(READY).set(if ready { 1.0 } else { 0.0 }));
    }

    /// One listener's connections (`listener` is `main` or `metrics`): open now, and closed at
    /// once since start because `mailRelay.http.maxConnections` were open.
    pub fn set_connections(&self, listener: &'static str, open: usize, refused: u64) {
        self.with(|| {
            gauge!(HTTP_CONNECTIONS_OPEN, "listener" => listener).set(open as f64);
            counter!(HTTP_CONNECTIONS_REFUSED, "listener" => listener).absolute(refused);
        });
    }

    /// Bytes of mail the requests hold now, against `mailRelay.limits.maxInFlightBytes`.
    pub fn set_mail_bytes_in_flight(&self, bytes: usize) {
        self.with(|| gauge!(MAIL_BYTES_IN_FLIGHT).set(bytes as f64));
    }

    /// One queued mail's attempt ended: `outcome` is the state it left the mail in (`sent`,
    /// `queued` for a retry, `failed`, `expired`, `unknown`).
    pub fn queue_attempt(&self, outcome: &'static str) {
        self.with(|| counter!(QUEUE_ATTEMPTS, "outcome" => outcome).increment(1));
    }

    /// A queued mail will be tried again after a failure of `kind` (a `FailureKind` code).
    pub fn queue_retry(&self, kind: String) {
        self.with(|| counter!(QUEUE_RETRIES, "kind" => kind).increment(1));
    }

    /// The sweep moved `n` mails: `requeued` (dead worker, no upload), `unknown` (dead worker
    /// while uploading) or `expired`.
    pub fn queue_swept(&self, outcome: &'static str, n: u64) {
        self.with(|| counter!(QUEUE_SWEPT, "outcome" => outcome).increment(n));
    }

    /// A completion call ended: `delivered` (2xx), `retry` (to be made again) or `abandoned`
    /// (no 2xx within a day of the mail's end).
    pub fn queue_webhook(&self, outcome: &'static str) {
        self.with(|| counter!(QUEUE_WEBHOOKS, "outcome" => outcome).increment(1));
    }

    /// The Prometheus text, with the values read from the token cache and the SMTP pool now.
    pub fn render(
        &self,
        tokens: Option<&TokenState>,
        smtp: Option<&SmtpState>,
        store: Option<&StoreState>,
        queue: Option<&Depth>,
    ) -> String {
        self.with(|| {
            if let Some(depth) = queue {
                for state in MailState::ALL {
                    let (count, bytes) = depth
                        .by_state
                        .iter()
                        .find(|(s, ..)| *s == state)
                        .map_or((0, 0), |(_, count, bytes)| (*count, *bytes));
                    gauge!(QUEUE_MAILS, "state" => state.as_str()).set(count as f64);
                    gauge!(QUEUE_BYTES, "state" => state.as_str()).set(bytes as f64);
                }
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let oldest = depth
                    .oldest_waiting
                    .map_or(0.0, |at| now.saturating_sub(at) as f64 / 1000.0);
                gauge!(QUEUE_OLDEST).set(oldest);
            }
            if let Some(store) = store {
                let up = store.migrated && store.reachable;
                gauge!(STORE_UP, "store" => store.kind).set(if up { 1.0 } else { 0.0 });
                gauge!(STORE_SCHEMA_VERSION).set(store.schema_version.unwrap_or(0) as f64);
                if let Some(ping) = store.ping {
                    gauge!(STORE_PING).set(ping.as_secs_f64());
                }
                counter!(STORE_FAILURES).absolute(store.failures);
            }
            if let Some(smtp) = smtp {
                gauge!(SMTP_OPEN).set(smtp.open_connections as f64);
                gauge!(SMTP_IDLE).set(smtp.idle_connections as f64);
            }
            if let Some(tokens) = tokens {
                let failures = tokens.failed_fetches.min(tokens.fetch_count);
                counter!(TOKEN_FETCHES, "outcome" => "success")
                    .absolute(tokens.fetch_count - failures);
                counter!(TOKEN_FETCHES, "outcome" => "failure").absolute(failures);
                gauge!(TOKEN_EXPIRES_IN).set(seconds_until(tokens.expires_at));
            }
        });
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// Names the limit that refuses the current request, for `mail_relay_rate_limited_total{scope}`:
/// call it where a rate limit answers 429, anywhere inside the request. `scope` is a fixed
/// word such as `mailbox_minute`, `mailbox_day` or `caller`: never an address or a caller's name.
///
/// Every 429 is counted once whether or not this is called: without a scope, one from Exchange
/// (its quota) counts as `exchange_quota`, any other as `relay`.
pub fn rate_limited(scope: &'static str) {
    super::request_log::note_rate_limit(scope);
}

/// Seconds to `at`; 0 when there is no valid token.
fn seconds_until(at: Option<SystemTime>) -> f64 {
    at.and_then(|at| at.duration_since(SystemTime::now()).ok())
        .map_or(0.0, |d| d.as_secs() as f64)
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by matched route, method and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        ::metrics::Unit::Seconds,
        "Time to answer an HTTP request, by matched route and method"
    );
    describe_counter!(
        MAILS,
        "Mails handed to the sender: outcome sent (code ok) or failed, by the answer's error code"
    );
    describe_histogram!(
        SMTP_SEND_DURATION,
        ::metrics::Unit::Seconds,
        "Time of one send to the SMTP server or Graph (retries included), by outcome and sending identity"
    );
    describe_gauge!(
        IDENTITY_UP,
        "1 while the sending identity sends, 0 when its last sends all failed on the relay's side (mailRelay.identities)"
    );
    describe_gauge!(
        TRANSPORT,
        "The transport carrying mail now (1) and the other (0): smtp or graph"
    );
    describe_gauge!(SMTP_OPEN, "Open SMTP connections, in use or idle");
    describe_gauge!(SMTP_IDLE, "Idle SMTP connections in the pool");
    describe_counter!(
        TOKEN_FETCHES,
        "Requests to the Entra ID token endpoint, by outcome"
    );
    describe_gauge!(
        TOKEN_EXPIRES_IN,
        ::metrics::Unit::Seconds,
        "Seconds until the cached access token expires; 0 when there is none"
    );
    describe_gauge!(
        READY,
        "1 when /health/ready answers 200, 0 when it answers 503 (draining, no token, SMTP failing)"
    );
    describe_gauge!(
        HTTP_CONNECTIONS_OPEN,
        "Open HTTP connections, by listener (main, metrics)"
    );
    describe_counter!(
        HTTP_CONNECTIONS_REFUSED,
        "HTTP connections closed at once because the listener's connection limit was reached"
    );
    describe_gauge!(
        MAIL_BYTES_IN_FLIGHT,
        ::metrics::Unit::Bytes,
        "Bytes of mail (request bodies) held by the requests now; at most mailRelay.limits.maxInFlightBytes"
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests refused with 429 rate_limited, by the limit's scope"
    );
    describe_gauge!(
        STORE_UP,
        "1 when the SQL store (mailRelay.store.url) answers and its schema is applied; absent for memory"
    );
    describe_gauge!(
        STORE_SCHEMA_VERSION,
        "The newest schema version applied to the SQL store"
    );
    describe_gauge!(
        STORE_PING,
        ::metrics::Unit::Seconds,
        "How long the last ping of the SQL store took"
    );
    describe_counter!(
        STORE_FAILURES,
        "Queries to the SQL store that failed or timed out"
    );
    describe_gauge!(
        QUEUE_MAILS,
        "Queued-delivery mails in the store, by state (queued, sending, sent, failed, expired, unknown)"
    );
    describe_gauge!(
        QUEUE_BYTES,
        ::metrics::Unit::Bytes,
        "Bytes of MIME the queued-delivery mails hold in the store, by state"
    );
    describe_gauge!(
        QUEUE_OLDEST,
        ::metrics::Unit::Seconds,
        "Age of the oldest mail still queued or sending; 0 when none waits"
    );
    describe_counter!(
        QUEUE_ATTEMPTS,
        "Delivery attempts of queued mails, by the state they left the mail in (queued = will retry)"
    );
    describe_counter!(
        QUEUE_RETRIES,
        "Queued mails put back for a later attempt, by the failure's kind"
    );
    describe_counter!(
        QUEUE_SWEPT,
        "Mails the sweep moved: requeued (worker died before the upload), unknown (died while uploading), expired"
    );
    describe_counter!(
        QUEUE_WEBHOOKS,
        "Completion calls (mailRelay.delivery.webhook) by outcome: delivered, retry, abandoned"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn two_registries_count_apart() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.count_rate_limited("caller");
        a.count_rate_limited("caller");
        b.count_rate_limited("mailbox_minute");
        let a = a.render(None, None, None, None);
        let b = b.render(None, None, None, None);
        assert_eq!(
            value(&a, "mail_relay_rate_limited_total{scope=\"caller\"}"),
            Some(2.0),
            "{a}"
        );
        assert!(!a.contains("mailbox_minute"), "{a}");
        assert_eq!(
            value(
                &b,
                "mail_relay_rate_limited_total{scope=\"mailbox_minute\"}"
            ),
            Some(1.0),
            "{b}"
        );
    }

    #[test]
    fn token_and_smtp_state_are_read_at_scrape_time() {
        let metrics = Metrics::new();
        let tokens = TokenState {
            has_token: true,
            expires_at: Some(SystemTime::now() + Duration::from_secs(3000)),
            last_error: None,
            last_error_code: None,
            fetch_count: 5,
            failed_fetches: 2,
        };
        let smtp = SmtpState {
            open_connections: 2,
            idle_connections: 1,
            sent: 0,
            failed: 0,
        };
        let text = metrics.render(Some(&tokens), Some(&smtp), None, None);
        assert_eq!(
            value(&text, "mail_relay_token_fetches_total{outcome=\"success\"}"),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "mail_relay_token_fetches_total{outcome=\"failure\"}"),
            Some(2.0)
        );
        let expires = value(&text, "mail_relay_token_expires_in_seconds").unwrap();
        assert!((2990.0..=3000.0).contains(&expires), "{expires}");
        assert_eq!(value(&text, "mail_relay_smtp_connections_open"), Some(2.0));
    }

    #[test]
    fn latencies_land_in_histogram_buckets() {
        let metrics = Metrics::new();
        metrics.http_request("/mail", "POST", 202, Duration::from_millis(30));
        metrics.smtp_send("default", Duration::from_millis(300), true);
        let text = metrics.render(None, None, None, None);
        assert_eq!(
            value(
                &text,
                "mail_relay_http_request_duration_seconds_bucket{route=\"/mail\",method=\"POST\",le=\"0.05\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "mail_relay_smtp_send_duration_seconds_bucket{outcome=\"ok\",identity=\"default\",le=\"0.25\"}"
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "mail_relay_smtp_send_duration_seconds_bucket{outcome=\"ok\",identity=\"default\",le=\"0.5\"}"
            ),
            Some(1.0)
        );
    }
}
