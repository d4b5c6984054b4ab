//! `mailRelay.http` and `mailRelay.shutdown`: the relay behind a reverse proxy, and its drain.

use super::callers;
use super::read::Ctx;
use super::{ForwardedHeader, HttpSettings, ShutdownSettings};

const BASE_PATH: &str = "mailRelay.http.basePath";
const TRUSTED_PROXIES: &str = "mailRelay.http.trustedProxies";
const FORWARDED_HEADER: &str = "mailRelay.http.forwardedHeader";
const HEADER_READ_TIMEOUT: &str = "mailRelay.http.headerReadTimeoutSeconds";
const MAX_CONNECTIONS: &str = "mailRelay.http.maxConnections";
const MAX_HEADER_BYTES: &str = "mailRelay.http.maxHeaderBytes";
/// hyper's smallest read buffer for HTTP/1: a smaller head limit cannot be set.
const MIN_HEADER_BYTES: usize = 8 * 1024;
const DOCS: &str = "mailRelay.http.docs";
const DRAIN_DELAY: &str = "mailRelay.shutdown.drainDelaySeconds";
const DEADLINE: &str = "mailRelay.shutdown.deadlineSeconds";

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
    let forwarded_header = ctx.one_of(
        FORWARDED_HEADER,
        ForwardedHeader::XForwardedFor,
        &[
            ("X-Forwarded-For", ForwardedHeader::XForwardedFor),
            ("Forwarded", ForwardedHeader::Forwarded),
        ],
        "X-Forwarded-For, Forwarded (the header your proxy appends the client to)",
    );
    let defaults = HttpSettings::default();
    let header_read_timeout = std::time::Duration::from_secs(ctx.number(
        HEADER_READ_TIMEOUT,
        defaults.header_read_timeout.as_secs(),
        1..=3_600,
    ));
    let max_connections = ctx.number(MAX_CONNECTIONS, defaults.max_connections, 1..=1_000_000);
    let max_header_bytes = ctx.number(
        MAX_HEADER_BYTES,
        defaults.max_header_bytes,
        MIN_HEADER_BYTES..=1024 * 1024,
    );
    let docs = ctx.one_of(
        DOCS,
        true,
        &[("true", true), ("false", false)],
        "true, false",
    );
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
    let defaults = ShutdownSettings::default();
    let drain_delay = std::time::Duration::from_secs(ctx.number(
        DRAIN_DELAY,
        defaults.drain_delay.as_secs(),
        0..=3_600,
    ));
    let deadline = ctx.seconds(DEADLINE, defaults.deadline.as_secs());
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
