//! The client's address behind reverse proxies.
//!
//! `X-Forwarded-For` and `Forwarded` (RFC 7239) are written by whoever sends the request, so they
//! are believed only when the TCP peer is one of `mailRelay.http.trustedProxies`, and only as far
//! as the chain of trusted proxies reaches: the client is the right-most address in the header
//! that is not a trusted proxy. Anything to the left of it was written by that client and may be
//! made up.
//!
//! This address is for logs. Authentication by a proxy's user header (`caller.rs`) checks the
//! TCP peer instead: that header is believed because the proxy set it, so the proxy itself must be
//! the peer.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::config::{ForwardedHeader, HttpSettings};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client's address, as far as trusted proxies vouch for it (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The trusted reverse proxies and the header they report the client in.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<ipnet::IpNet>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    pub fn new(settings: &HttpSettings) -> Self {
        Self {
            nets: settings.trusted_proxies.clone(),
            header: settings.forwarded_header,
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client address of a request whose TCP peer is `peer`.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let hops = match self.header {
            ForwardedHeader::XForwardedFor => x_forwarded_for(headers),
            ForwardedHeader::Forwarded => forwarded(headers),
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) if self.is_trusted(*ip) => client = *ip,
                Some(ip) => return *ip,
                // `unknown`, an obfuscated `_name` or garbage: the chain of addresses we can vouch
                // for ends at the proxy that wrote it; nothing further left is believed.
                None => return client,
            }
        }
        // Every hop is a trusted proxy: the request started inside the proxies' network.
        client
    }
}

/// Middleware: puts the [`ClientAddr`] into the request's extensions for the log span.
pub async fn client_address(
    State(proxies): State<std::sync::Arc<TrustedProxies>>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    if let Some(peer) = peer {
        let client = proxies.client_address(peer, request.headers());
        request.extensions_mut().insert(ClientAddr(client));
    }
    next.run(request).await
}

/// The hops of every `X-Forwarded-For` line, left to right; `None` for one that is no address.
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .flat_map(|value| match value.to_str() {
            Ok(text) => text
                .split(',')
                .map(|hop| node_address(hop.trim()))
                .collect(),
            Err(_) => vec![None],
        })
        .collect()
}

/// The `for=` hops of every `Forwarded` line, left to right; `None` for a hop without an address.
fn forwarded(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(header::FORWARDED)
        .iter()
        .flat_map(|value| match value.to_str() {
            Ok(text) => split_unquoted(text, ',')
                .into_iter()
                .map(|element| {
                    split_unquoted(element, ';').into_iter().find_map(|pair| {
                        let (name, value) = pair.split_once('=')?;
                        name.trim()
                            .eq_ignore_ascii_case("for")
                            .then(|| node_address(unquote(value.trim())))
                    })?
                })
                .collect(),
            Err(_) => vec![None],
        })
        .collect()
}

/// `text` split at `separator` outside double quotes.
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// The address of one hop: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]:4711`.
/// `unknown`, obfuscated names (`_proxy1`) and anything else give `None`.
fn node_address(node: &str) -> Option<IpAddr> {
    let ip = node
        .parse::<IpAddr>()
        .ok()
        .or_else(|| node.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            node.strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .and_then(|n| n.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn proxies(nets: &[&str], header: ForwardedHeader) -> TrustedProxies {
        TrustedProxies::new(&HttpSettings {
            base_path: String::new(),
            trusted_proxies: nets.iter().map(|n| n.parse().unwrap()).collect(),
            forwarded_header: header,
            docs: true,
        })
    }

    fn xff(nets: &[&str]) -> TrustedProxies {
        proxies(nets, ForwardedHeader::XForwardedFor)
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let h = headers("x-forwarded-for", &["203.0.113.7"]);
        assert_eq!(xff(&[]).client_address(ip("10.0.0.5"), &h), ip("10.0.0.5"));
    }

    #[test]
    fn an_untrusted_peer_cannot_name_another_client() {
        let h = headers("x-forwarded-for", &["203.0.113.7"]);
        let p = xff(&["10.0.0.0/8"]);
        assert_eq!(p.client_address(ip("198.51.100.9"), &h), ip("198.51.100.9"));
    }

    #[test]
    fn a_trusted_proxy_names_the_client() {
        let h = headers("x-forwarded-for", &["203.0.113.7"]);
        let p = xff(&["10.0.0.0/8"]);
        assert_eq!(p.client_address(ip("10.0.0.5"), &h), ip("203.0.113.7"));
    }

    #[test]
    fn a_spoofed_chain_stops_at_the_first_untrusted_hop_from_the_right() {
        // The client sent "X-Forwarded-For: 1.2.3.4, 10.9.9.9" itself; the proxy appended its peer.
        let h = headers("x-forwarded-for", &["1.2.3.4, 10.9.9.9, 203.0.113.7"]);
        let p = xff(&["10.0.0.0/8"]);
        assert_eq!(p.client_address(ip("10.0.0.5"), &h), ip("203.0.113.7"));
    }

    #[test]
    fn chained_trusted_proxies_are_skipped() {
        let h = headers("x-forwarded-for", &["203.0.113.7, 10.1.1.1", "10.2.2.2"]);
        let p = xff(&["10.0.0.0/8"]);
        assert_eq!(p.client_address(ip("10.0.0.5"), &h), ip("203.0.113.7"));
    }

    #[test]
    fn only_trusted_hops_give_the_left_most() {
        let h = headers("x-forwarded-for", &["10.3.3.3, 10.1.1.1"]);
        let p = xff(&["10.0.0.0/8"]);
        assert_eq!(p.client_address(ip("10.0.0.5"), &h), ip("10.3.3.3"));
    }

    #[test]
    fn no_header_from_a_proxy_gives_the_proxy() {
        let p = xff(&["10.0.0.0/8"]);
        assert_eq!(
            p.client_address(ip("10.0.0.5"), &HeaderMap::new()),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn garbage_stops_the_walk_at_the_proxy_that_passed_it() {
        let p = xff(&["10.0.0.0/8"]);
        for value in [
            "203.0.113.7, unknown",
            "1.2.3.4, not-an-ip",
            "1.2.3.4,",
            "1.2.3.4, 999.1.1.1",
        ] {
            let h = headers("x-forwarded-for", &[value]);
            assert_eq!(
                p.client_address(ip("10.0.0.5"), &h),
                ip("10.0.0.5"),
                "{value}"
            );
        }
        // Behind a second trusted proxy, the walk ends at that proxy.
        let h = headers("x-forwarded-for", &["1.2.3.4, unknown, 10.1.1.1"]);
        assert_eq!(p.client_address(ip("10.0.0.5"), &h), ip("10.1.1.1"));
    }

    #[test]
    fn ipv6_and_ports_in_x_forwarded_for() {
        let p = xff(&["10.0.0.0/8", "fd00::/8"]);
        let h = headers("x-forwarded-for", &["2001:db8::7, fd00::1"]);
        assert_eq!(p.client_address(ip("fd00::2"), &h), ip("2001:db8::7"));
        let h = headers("x-forwarded-for", &["[2001:db8::7]:4711"]);
        assert_eq!(p.client_address(ip("10.0.0.5"), &h), ip("2001:db8::7"));
        let h = headers("x-forwarded-for", &["203.0.113.7:1234"]);
        assert_eq!(p.client_address(ip("10.0.0.5"), &h), ip("203.0.113.7"));
    }

    #[test]
    fn ipv4_mapped_ipv6_peers_count_as_ipv4() {
        // A listener on [::] sees IPv4 peers as ::ffff:a.b.c.d.
        let p = xff(&["127.0.0.1/32"]);
        let h = headers("x-forwarded-for", &["::ffff:203.0.113.7"]);
        assert_eq!(
            p.client_address(ip("::ffff:127.0.0.1"), &h),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn the_other_header_is_ignored() {
        // nginx appends to X-Forwarded-For and passes the client's own Forwarded through.
        let mut h = headers("forwarded", &["for=1.2.3.4"]);
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        let p = xff(&["10.0.0.0/8"]);
        assert_eq!(p.client_address(ip("10.0.0.5"), &h), ip("203.0.113.7"));
        let p = proxies(&["10.0.0.0/8"], ForwardedHeader::Forwarded);
        assert_eq!(p.client_address(ip("10.0.0.5"), &h), ip("1.2.3.4"));
    }

    fn fwd(value: &str) -> IpAddr {
        let p = proxies(&["10.0.0.0/8", "fd00::/8"], ForwardedHeader::Forwarded);
        p.client_address(ip("10.0.0.5"), &headers("forwarded", &[value]))
    }

    #[test]
    fn forwarded_values_as_rfc_7239_writes_them() {
        assert_eq!(
            fwd("for=192.0.2.60;proto=http;by=203.0.113.43"),
            ip("192.0.2.60")
        );
        assert_eq!(
            fwd("For=\"[2001:db8:cafe::17]:4711\""),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(
            fwd("for=192.0.2.43, for=198.51.100.17"),
            ip("198.51.100.17")
        );
        assert_eq!(
            fwd("for=192.0.2.43, for=\"[fd00::9]\";proto=https"),
            ip("192.0.2.43")
        );
        assert_eq!(
            fwd("proto=https;for=\"192.0.2.60:8080\";host=a.example"),
            ip("192.0.2.60")
        );
        assert_eq!(fwd(" for = 192.0.2.61 "), ip("192.0.2.61"));
    }

    #[test]
    fn obfuscated_and_unknown_forwarded_nodes_end_the_chain() {
        assert_eq!(fwd("for=192.0.2.43, for=_hidden"), ip("10.0.0.5"));
        assert_eq!(fwd("for=192.0.2.43, for=unknown"), ip("10.0.0.5"));
        assert_eq!(
            fwd("for=192.0.2.43, for=\"_gazonk\";by=_x, for=10.1.1.1"),
            ip("10.1.1.1")
        );
        // An element without for= says nothing about who sent it.
        assert_eq!(fwd("for=192.0.2.43, proto=https"), ip("10.0.0.5"));
    }

    #[test]
    fn quoted_separators_do_not_split_forwarded_elements() {
        // A made-up address with a quoted comma must not leak out as its own hop.
        assert_eq!(fwd("for=\"1.2.3.4,5.6.7.8\""), ip("10.0.0.5"));
        assert_eq!(
            fwd("for=\"x;for=1.2.3.4\", for=198.51.100.17"),
            ip("198.51.100.17")
        );
        assert_eq!(fwd("for=\"x\\\",for=1.2.3.4\""), ip("10.0.0.5"));
    }

    #[test]
    fn ipv6_without_brackets_in_forwarded_is_accepted_leniently() {
        // RFC 7239 wants "[...]" but some proxies write bare IPv6; the address is still unambiguous.
        assert_eq!(fwd("for=\"2001:db8::1\""), ip("2001:db8::1"));
    }

    proptest::proptest! {
        /// Whatever the client writes in front, the proxies' appended hops decide.
        #[test]
        fn spoofed_prefixes_never_change_the_client(
            spoof in proptest::collection::vec(proptest::prelude::any::<std::net::Ipv4Addr>(), 0..5),
            client in proptest::prelude::any::<[u8; 3]>(),
            proxies_behind in proptest::collection::vec(proptest::prelude::any::<[u8; 3]>(), 0..4),
            junk in proptest::option::of("[ -~]{0,20}"),
        ) {
            let p = xff(&["10.0.0.0/8"]);
            // A client outside 10/8 (203.x.y.z), then trusted proxies (10.x.y.z) appending.
            let client = IpAddr::from([203, client[0], client[1], client[2]]);
            let mut chain: Vec<String> = spoof.iter().map(ToString::to_string).collect();
            if let Some(junk) = junk.filter(|j| !j.contains(',')) {
                chain.push(junk);
            }
            chain.push(client.to_string());
            chain.extend(proxies_behind.iter().map(|b| IpAddr::from([10, b[0], b[1], b[2]]).to_string()));
            let h = headers("x-forwarded-for", &[&chain.join(", ")]);
            proptest::prop_assert_eq!(p.client_address(ip("10.0.0.5"), &h), client);
        }
    }
}
