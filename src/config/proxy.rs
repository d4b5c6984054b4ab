//! `mailRelay.http` and `mailRelay.shutdown`: the relay behind a reverse proxy, and its drain.

use std::time::Duration;

use super::callers;
use super::read::Ctx;

const BASE_PATH: &str = "mailRelay.http.basePath";
const TRUSTED_PROXIES: &str = "mailRelay.http.trustedProxies";
const FORWARDED_HEADER: &str = "mailRelay.http.forwardedHeader";
const HEADER_READ_TIMEOUT: &str = "mailRelay.http.headerReadTimeoutSeconds";
const MAX_CONNECTIONS: &str = "mailRelay.http.maxConnections";
const MAX_HEADER_BYTES: &str = "mailRelay.http.maxHeaderBytes";
const DOCS: &str = "mailRelay.http.docs";
const DRAIN_DELAY: &str = "mailRelay.shutdown.drainDelaySeconds";
const DEADLINE: &str = "mailRelay.shutdown.deadlineSeconds";

/// `mailRelay.http.*`: how the relay sits behind a reverse proxy, and what one connection may hold.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Path prefix every route is served under (`/osweb/mail`); empty for the root.
    /// Starts with `/`, has no trailing `/` and no `..`.
    pub base_path: String,
    /// Proxies whose forwarding header is believed (CIDRs); none by default.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Which header those proxies report the client in.
    pub forwarded_header: ForwardedHeader,
    /// `headerReadTimeoutSeconds`: how long a connection may go without a request in progress:
    /// from accepting it (before its protocol is known) to a complete request head, and between
    /// requests on a kept-alive HTTP/1 or HTTP/2 connection.
    pub header_read_timeout: Duration,
    /// `maxConnections`: open connections at most; one more is closed at once.
    pub max_connections: usize,
    /// `maxHeaderBytes`: the request head (HTTP/1) or header list (HTTP/2) at most; more is `431`.
    pub max_header_bytes: usize,
    /// Whether `GET /docs` serves the API reference page (on by default).
    pub docs: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        super::read::from_presets(http)
    }
}

/// `mailRelay.http.forwardedHeader`: the one header the trusted proxies maintain.
///
/// Only one is read: a proxy that appends to one passes the other through untouched, so a
/// client could put any address into it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1` (nginx's `$proxy_add_x_forwarded_for`).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for=proxy1`.
    Forwarded,
}

impl ForwardedHeader {
    /// Every spelling `forwardedHeader` accepts, any case: the header's name.
    pub const CHOICES: &[(&str, ForwardedHeader)] = &[
        ("X-Forwarded-For", ForwardedHeader::XForwardedFor),
        ("Forwarded", ForwardedHeader::Forwarded),
    ];

    /// The spelling `check-config` prints.
    pub fn name(self) -> &'static str {
        super::read::name_in(Self::CHOICES, &self)
    }
}

/// `mailRelay.shutdown.*`: graceful drain on SIGTERM.
#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    /// How long requests are still accepted after SIGTERM, while readiness already says 503.
    pub drain_delay: Duration,
    /// From SIGTERM to exit at the latest; what still runs then is abandoned and the exit is non-zero.
    pub deadline: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        super::read::from_presets(shutdown)
    }
}

pub(super) fn http(ctx: &mut Ctx<'_>) -> HttpSettings {
    let base_path = ctx
        .text(BASE_PATH)
        .map(str::to_owned)
        .map(|text| match base_path_problem(&text) {
            None => text,
            Some(problem) => {
                ctx.error(
                    BASE_PATH,
                    format!("{text:?} {problem}; write it like /osweb/mail, or leave it unset to serve at the root"),
                );
                String::new()
            }
        })
        .unwrap_or_default();
    let trusted_proxies = callers::ip_nets_at(ctx, TRUSTED_PROXIES);
    let forwarded_header = ctx.choice(FORWARDED_HEADER, ForwardedHeader::CHOICES);
    let header_read_timeout = ctx.seconds(HEADER_READ_TIMEOUT);
    let max_connections = ctx.whole(MAX_CONNECTIONS);
    let max_header_bytes = ctx.whole(MAX_HEADER_BYTES);
    let docs = ctx.flag(DOCS);
    HttpSettings {
        base_path,
        trusted_proxies,
        forwarded_header,
        header_read_timeout,
        max_connections,
        max_header_bytes,
        docs,
    }
}

/// Why `path` cannot be a base path, if it cannot.
fn base_path_problem(path: &str) -> Option<&'static str> {
    if path == "/" {
        return Some("is the root; leave basePath unset for that");
    }
    if !path.starts_with('/') {
        return Some("does not start with /");
    }
    if path.ends_with('/') {
        return Some("ends with /");
    }
    if path
        .split('/')
        .any(|segment| segment == ".." || segment == ".")
    {
        return Some("contains a . or .. segment");
    }
    if path.contains("//") {
        return Some("contains an empty segment (//)");
    }
    // Characters a URL path would carry percent-encoded, and the route syntax of the router.
    if !path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.' | '~'))
    {
        return Some("may only hold letters, digits, /, -, _, . and ~");
    }
    None
}

pub(super) fn shutdown(ctx: &mut Ctx<'_>) -> ShutdownSettings {
    let drain_delay = ctx.seconds(DRAIN_DELAY);
    let deadline = ctx.seconds(DEADLINE);
    if drain_delay >= deadline {
        ctx.error(
            DEADLINE,
            format!(
                "({}) is not above {DRAIN_DELAY} ({}): in-flight sends would have no time to finish; raise the deadline or lower the delay",
                deadline.as_secs(),
                drain_delay.as_secs()
            ),
        );
    }
    ShutdownSettings {
        drain_delay,
        deadline,
    }
}

#[cfg(test)]
mod tests {
    use super::base_path_problem;

    #[test]
    fn base_paths_must_be_clean() {
        assert_eq!(base_path_problem("/osweb/mail"), None);
        assert_eq!(base_path_problem("/mail-relay_v1"), None);
        for bad in [
            "osweb/mail",
            "/osweb/mail/",
            "/",
            "/osweb/../admin",
            "/..",
            "/osweb//mail",
            "/osweb/./mail",
            "/osweb mail",
            "/osweb/{id}",
            "/osweb/*rest",
            "/osweb?x=1",
        ] {
            assert!(base_path_problem(bad).is_some(), "{bad:?} was accepted");
        }
    }
}
