//! Counting at the peer: the SMTP sessions Postfix logged from given source addresses, and the
//! most of them that were open at once.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;

/// The length of the peer's log now: read [`max_concurrent_authenticated`] from here on.
pub fn log_offset(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// The most authenticated SMTP sessions from `sources` that were open at once in the peer's
/// log (from byte `offset` on), and how many such sessions there were.
///
/// A session is Postfix's `connect from unknown[IP]:PORT` up to its `disconnect from
/// unknown[IP]:PORT …`; it counts as authenticated when its disconnect line says `auth=` with a
/// success, or (still open) a line of it names a `sasl_method=`. It is counted from its connect,
/// before its AUTH: an upper bound, on the side of caution. Lines come in the order Postfix's
/// log daemon received them, which is the order the peer saw the events.
pub fn max_concurrent_authenticated(text: &str, sources: &[Ipv4Addr]) -> (usize, usize) {
    let sessions = authenticated_sessions(text, sources);
    let mut events: Vec<(usize, i32)> = Vec::new();
    for s in &sessions {
        events.push((s.connect, 1));
        if let Some(disconnect) = s.disconnect {
            events.push((disconnect, -1));
        }
    }
    events.sort_unstable();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, delta) in events {
        open += delta;
        most = most.max(open);
    }
    (most as usize, sessions.len())
}

/// How many authenticated sessions from `sources` are open at the end of `text`.
pub fn open_authenticated(text: &str, sources: &[Ipv4Addr]) -> usize {
    authenticated_sessions(text, sources)
        .iter()
        .filter(|s| s.disconnect.is_none())
        .count()
}

/// One SMTP session in the peer's log: the line numbers of its connect and disconnect.
struct Session {
    connect: usize,
    disconnect: Option<usize>,
}

/// The authenticated sessions from `sources` whose connect is in `text`.
fn authenticated_sessions(text: &str, sources: &[Ipv4Addr]) -> Vec<Session> {
    #[derive(Default)]
    struct Seen {
        connect: Option<usize>,
        disconnect: Option<usize>,
        authenticated: bool,
    }
    let clients: Vec<String> = sources.iter().map(|ip| format!("[{ip}]:")).collect();
    // Keyed by `[ip]:port`; a port reused later starts a new session (the old one ended first).
    let mut open: HashMap<String, Seen> = HashMap::new();
    let mut done: Vec<Seen> = Vec::new();
    // The client `[ip]:port` a line is about, if it is one of ours.
    let client_of = |rest: &str| -> Option<String> {
        let start = rest.find('[')?;
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_digit() || "[]:.".contains(c)))
            .unwrap_or(tail.len());
        let client = &tail[..end];
        clients
            .iter()
            .any(|c| client.starts_with(c.as_str()))
            .then(|| client.to_owned())
    };
    for (i, line) in text.lines().enumerate() {
        if let Some((_, rest)) = line.split_once(": connect from ") {
            if let Some(client) = client_of(rest) {
                let earlier = open.insert(
                    client,
                    Seen {
                        connect: Some(i),
                        ..Seen::default()
                    },
                );
                done.extend(earlier);
            }
        } else if let Some((_, rest)) = line.split_once(": disconnect from ") {
            if let Some(client) = client_of(rest) {
                let mut s = open.remove(&client).unwrap_or_default();
                s.disconnect = Some(i);
                s.authenticated |= rest
                    .split_whitespace()
                    .filter_map(|w| w.strip_prefix("auth="))
                    .any(|v| !v.starts_with('0'));
                done.push(s);
            }
        } else if let Some((_, rest)) = line.split_once(": client=")
            && rest.contains("sasl_method=")
            && let Some(client) = client_of(rest)
        {
            open.entry(client).or_default().authenticated = true;
        }
    }
    done.into_iter()
        .chain(open.into_values())
        .filter(|s| s.authenticated)
        .filter_map(|s| {
            Some(Session {
                connect: s.connect?,
                disconnect: s.disconnect,
            })
        })
        .collect()
}

/// The peer's log from byte `offset` on.
pub fn log_since(log: &Path, offset: u64) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let from = (offset as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(127, 0, 44, 61);
    const B: Ipv4Addr = Ipv4Addr::new(127, 0, 44, 62);

    #[test]
    fn overlapping_authenticated_sessions_are_counted_in_log_order() {
        let log = "\
x postfix/submission/smtpd[1]: connect from unknown[127.0.44.61]:4000
x postfix/submission/smtpd[1]: AB12: client=unknown[127.0.44.61]:4000, sasl_method=XOAUTH2, sasl_username=relay@contoso.test
x postfix/submission/smtpd[2]: connect from unknown[127.0.44.62]:4001
x postfix/submission/smtpd[3]: connect from unknown[127.0.44.7]:4002
x postfix/submission/smtpd[4]: connect from unknown[127.0.44.62]:4003
x postfix/submission/smtpd[4]: disconnect from unknown[127.0.44.62]:4003 ehlo=1 commands=1
x postfix/submission/smtpd[1]: disconnect from unknown[127.0.44.61]:4000 ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 data=1 quit=1 commands=8
x postfix/submission/smtpd[2]: CD34: client=unknown[127.0.44.62]:4001, sasl_method=XOAUTH2, sasl_username=relay@contoso.test
x postfix/submission/smtpd[5]: connect from unknown[127.0.44.61]:4004
x postfix/submission/smtpd[5]: disconnect from unknown[127.0.44.61]:4004 ehlo=2 starttls=1 auth=0/1 commands=3/4
";
        // 4000 and 4001 overlap (4001 is still open); 4003 never authenticated, 4004 failed to,
        // 127.0.44.7 is not ours.
        assert_eq!(max_concurrent_authenticated(log, &[A, B]), (2, 2));
        assert_eq!(max_concurrent_authenticated(log, &[A]), (1, 1));
        assert_eq!(open_authenticated(log, &[A, B]), 1);
        assert_eq!(open_authenticated(log, &[A]), 0);
    }
}
