//! The real SMTP test peer (Postfix + Dovecot XOAUTH2, started by `tests/peer/start.sh`).
//!
//! A test that needs it starts with `let peer = crate::require_peer!();`: when the peer is not
//! running the test fails under `CI=true` and is skipped loudly otherwise.
//!
//! ```ignore
//! let peer = crate::require_peer!();
//! let token = peer.mint_token(&peer.oauth_user, Duration::from_secs(600));
//! // ... send a mail whose Message-ID contains `marker` ...
//! let mail = peer.wait_for_message(&marker, Duration::from_secs(10)).await.unwrap();
//! ```
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// The command that starts the peer, for messages.
pub const START_COMMAND: &str = "tests/peer/start.sh";

/// A server a test needs is missing: under CI (`CI` set to anything but empty, `0` or `false`)
/// that fails the test; elsewhere a `SKIPPED` line goes straight to stderr, where the test
/// harness does not hide it as it hides a passing test's output.
pub fn missing(what: &str, start_command: &str, test: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
    if ci {
        panic!("no {what} and CI is set: run {start_command} first");
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED (no {what}; run {start_command}): {test}"
    );
}

/// The state dir `start.sh` uses (and writes `peer.env` into).
pub fn peer_dir() -> PathBuf {
    std::env::var_os("MAIL_RELAY_PEER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/mail-relay-peer"))
}

/// A running peer, as described by its `peer.env`.
#[derive(Clone)]
pub struct Peer {
    /// `127.0.0.1`.
    pub host: String,
    /// STARTTLS submission; STARTTLS is required before AUTH.
    pub submission_port: u16,
    /// Implicit TLS submission.
    pub smtps_port: u16,
    /// Plain SMTP, no TLS and no AUTH (for `smtpAuthentication: NONE`).
    pub plain_port: u16,
    /// Like the submission port, but the reply to the end of DATA comes `slow_delay` late.
    pub slow_port: u16,
    pub slow_delay: Duration,
    /// PEM file of the CA that signed the server certificate (SAN `localhost`, `127.0.0.1`).
    pub ca: PathBuf,
    /// Catch-all Maildir every accepted mail lands in.
    pub maildir: PathBuf,
    /// Postfix log (connections, replies).
    pub log: PathBuf,
    /// Dovecot log (why a login failed).
    pub dovecot_log: PathBuf,
    /// The XOAUTH2 mailbox, `relay@contoso.test`.
    pub oauth_user: String,
    /// Key id Dovecot looks the HMAC key up by.
    pub jwt_kid: String,
    /// The audience (client id) Dovecot requires in `aud`.
    pub jwt_aud: String,
    /// Claim that must name the XOAUTH2 user.
    pub jwt_user_claim: String,
    /// PLAIN/LOGIN user for `smtpAuthentication: BASIC`.
    pub basic_user: String,
    pub basic_password: String,
    /// An envelope sender the OAuth login may not use: refused after DATA with `554 5.2.252`.
    pub sendas_denied: String,
    /// A sender refused after DATA with Exchange's transient `432 4.3.2 ... thread limit exceeded`.
    pub sender_throttled: String,
    /// A sender refused after DATA with Exchange's `554 5.2.0 ... SubmissionQuotaExceededException`.
    pub sender_quota: String,
    jwt_key: Vec<u8>,
}

impl std::fmt::Debug for Peer {
    // The JWT key and the basic password stay out of test output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("host", &self.host)
            .field("submission_port", &self.submission_port)
            .field("smtps_port", &self.smtps_port)
            .field("plain_port", &self.plain_port)
            .field("maildir", &self.maildir)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// The running peer, or `None` when `peer.env` is missing or incomplete or the submission port
    /// does not accept a connection.
    pub fn get() -> Option<Peer> {
        let env_file = peer_dir().join("peer.env");
        let text = std::fs::read_to_string(env_file).ok()?;
        let peer = Self::parse(&text)?;
        let address = SocketAddr::new(peer.host.parse().ok()?, peer.submission_port);
        TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
        Some(peer)
    }

    /// The running peer; when it is missing, panics under `CI=true` and otherwise prints a
    /// `SKIPPED` line naming `test` and returns `None`. Prefer [`require_peer!`](crate::require_peer).
    pub fn require(test: &str) -> Option<Peer> {
        if let Some(peer) = Self::get() {
            return Some(peer);
        }
        missing(
            &format!(
                "SMTP peer ({}/peer.env missing or port closed)",
                peer_dir().display()
            ),
            START_COMMAND,
            test,
        );
        None
    }

    fn parse(text: &str) -> Option<Peer> {
        let vars: std::collections::HashMap<&str, &str> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |key: &str| vars.get(key).map(|v| (*v).to_owned());
        let port = |key: &str| vars.get(key).and_then(|v| v.parse::<u16>().ok());
        if get("PEER_JWT_ALG")? != "HS256" {
            return None;
        }
        Some(Peer {
            host: get("PEER_HOST")?,
            submission_port: port("PEER_SUBMISSION_PORT")?,
            smtps_port: port("PEER_SMTPS_PORT")?,
            plain_port: port("PEER_PLAIN_PORT")?,
            slow_port: port("PEER_SLOW_PORT")?,
            slow_delay: Duration::from_secs(vars.get("PEER_SLOW_SECONDS")?.parse().ok()?),
            ca: get("PEER_CA")?.into(),
            maildir: get("PEER_MAILDIR")?.into(),
            log: get("PEER_LOG")?.into(),
            dovecot_log: get("PEER_DOVECOT_LOG")?.into(),
            oauth_user: get("PEER_OAUTH_USER")?,
            jwt_kid: get("PEER_JWT_KID")?,
            jwt_aud: get("PEER_JWT_AUD")?,
            jwt_user_claim: get("PEER_JWT_USER_CLAIM")?,
            basic_user: get("PEER_BASIC_USER")?,
            basic_password: get("PEER_BASIC_PASSWORD")?,
            sendas_denied: get("PEER_SENDAS_DENIED")?,
            sender_throttled: get("PEER_SENDER_THROTTLED")?,
            sender_quota: get("PEER_SENDER_QUOTA")?,
            jwt_key: base64::engine::general_purpose::STANDARD
                .decode(get("PEER_JWT_KEY_B64")?)
                .ok()?,
        })
    }

    /// Stops the peer's Postfix (`postfix stop`: the master ends and takes its children with it,
    /// so sessions are cut and connections refused, as when a server goes away), leaving Dovecot,
    /// the Maildir and Postfix's own queue as they are. The guard starts it again; dropping it does
    /// too, so that a failing test does not leave the peer down for the next ones.
    pub async fn stop_postfix(&self) -> StoppedPostfix {
        let out = tokio::task::spawn_blocking(|| postfix("stop"))
            .await
            .unwrap();
        assert!(out.status.success(), "postfix stop failed: {out:?}");
        let address = SocketAddr::new(self.host.parse().unwrap(), self.submission_port);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "Postfix still accepts connections after postfix stop"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        StoppedPostfix {
            peer: Some(self.clone()),
        }
    }

    /// Path of the CA certificate (PEM) to trust.
    pub fn ca_path(&self) -> &Path {
        &self.ca
    }

    /// The CA certificate (PEM bytes).
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca).expect("the peer's CA file is readable")
    }

    /// A token the peer accepts for `user` (when `user` is [`Peer::oauth_user`]), valid for
    /// `lifetime` from now.
    pub fn mint_token(&self, user: &str, lifetime: Duration) -> String {
        let now = unix_now();
        self.mint(
            user,
            &self.jwt_aud,
            &self.jwt_key,
            now,
            now + lifetime.as_secs(),
        )
    }

    /// A well-formed token signed with the wrong key: the peer rejects it.
    pub fn mint_token_wrong_key(&self, user: &str, lifetime: Duration) -> String {
        let now = unix_now();
        let wrong: Vec<u8> = self.jwt_key.iter().map(|b| b ^ 0x5a).collect();
        self.mint(user, &self.jwt_aud, &wrong, now, now + lifetime.as_secs())
    }

    /// A correctly signed token that expired a minute ago: the peer rejects it.
    pub fn mint_token_expired(&self, user: &str) -> String {
        let now = unix_now();
        self.mint(user, &self.jwt_aud, &self.jwt_key, now - 600, now - 60)
    }

    /// A correctly signed token for another audience (another app's client id): rejected.
    pub fn mint_token_for_audience(&self, user: &str, aud: &str, lifetime: Duration) -> String {
        let now = unix_now();
        self.mint(user, aud, &self.jwt_key, now, now + lifetime.as_secs())
    }

    fn mint(&self, user: &str, aud: &str, key: &[u8], iat: u64, exp: u64) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.jwt_kid.clone());
        let mut claims = serde_json::json!({
            "sub": "mail-relay-test-app",
            "aud": aud,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
        });
        claims[self.jwt_user_claim.as_str()] = serde_json::Value::from(user);
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(key))
            .expect("HS256 signing does not fail")
    }

    /// The first delivered mail (raw bytes) that contains `needle`, polling the Maildir every
    /// 50 ms until `timeout`.
    pub async fn wait_for_message(&self, needle: &str, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        // Delivered files never change, so a file that did not match is not read again.
        let mut seen = HashSet::new();
        loop {
            if let Some(mail) = self.scan(needle.as_bytes(), &mut seen) {
                return Some(mail);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every delivered mail containing `needle`, now (no waiting).
    pub fn find_messages(&self, needle: &str) -> Vec<Vec<u8>> {
        self.mail_files()
            .into_iter()
            .filter_map(|path| std::fs::read(path).ok())
            .filter(|bytes| contains(bytes, needle.as_bytes()))
            .collect()
    }

    fn scan(&self, needle: &[u8], seen: &mut HashSet<std::ffi::OsString>) -> Option<Vec<u8>> {
        for path in self.mail_files() {
            // A mail moving from new/ to cur/ gets a suffix, never a new unique part.
            let Some(unique) = path.file_name().map(|n| {
                let n = n.to_string_lossy();
                n.split(':').next().unwrap_or_default().to_owned().into()
            }) else {
                continue;
            };
            if seen.contains(&unique) {
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue; // moved between listing and reading; the next round finds it
            };
            if contains(&bytes, needle) {
                return Some(bytes);
            }
            seen.insert(unique);
        }
        None
    }

    fn mail_files(&self) -> Vec<PathBuf> {
        ["new", "cur"]
            .iter()
            .filter_map(|sub| std::fs::read_dir(self.maildir.join(sub)).ok())
            .flatten()
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect()
    }

    /// How many SMTP connections from source address `ip` Postfix has logged so far, on all
    /// ports. Bind the client sockets to a source address of their own (127.0.0.N, unique per
    /// test) and compare counts taken before and after: the log keeps earlier runs. A line is
    /// written when a connection opens, through Postfix's log daemon: poll briefly for new ones.
    pub fn count_connections_from(&self, ip: Ipv4Addr) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let client = format!("[{ip}]");
        log.lines()
            .filter(|line| {
                line.split_once(": connect from ")
                    .is_some_and(|(_, rest)| rest.contains(&client))
            })
            .count()
    }
}

/// A loopback port nothing listens on (bound, then released): connecting is refused at once,
/// like a server that is down.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind port 0");
    listener.local_addr().expect("bound address").port()
}

/// A loopback server that accepts connections and never says a word (no banner), like a server
/// that hangs. It runs until the returned handle is aborted or the test's runtime ends.
pub async fn silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind port 0");
    let address = listener.local_addr().expect("bound address");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (address, task)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `let peer = crate::require_peer!();` — the running [`Peer`], or (outside CI) a loud skip:
/// the test returns early. Under `CI=true` a missing peer fails the test.
#[macro_export]
macro_rules! require_peer {
    () => {{
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            ::std::any::type_name::<T>()
        }
        let test = name_of(here);
        let test = test.strip_suffix("::here").unwrap_or(test);
        let test = test.strip_suffix("::{{closure}}").unwrap_or(test);
        match $crate::peer::Peer::require(test) {
            Some(peer) => peer,
            None => return,
        }
    }};
}

/// `postfix -c <the peer's Postfix dir> <command>`.
fn postfix(command: &str) -> std::process::Output {
    std::process::Command::new("postfix")
        .arg("-c")
        .arg(peer_dir().join("postfix"))
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running postfix {command}: {e}"))
}

/// The peer's Postfix, stopped by [`Peer::stop_postfix`].
pub struct StoppedPostfix {
    peer: Option<Peer>,
}

impl StoppedPostfix {
    /// Starts Postfix again and waits until the submission port answers with its greeting.
    pub async fn start(mut self) {
        let peer = self.peer.take().expect("started once");
        let out = tokio::task::spawn_blocking(|| postfix("start"))
            .await
            .unwrap();
        assert!(out.status.success(), "postfix start failed: {out:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Peer::get().is_none() {
            assert!(
                Instant::now() < deadline,
                "Postfix does not accept connections on {} after postfix start",
                peer.submission_port
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for StoppedPostfix {
    fn drop(&mut self) {
        if self.peer.take().is_some() {
            let _ = postfix("start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "PEER_HOST=127.0.0.1
PEER_SUBMISSION_PORT=10587
PEER_SMTPS_PORT=10465
PEER_PLAIN_PORT=10025
PEER_SLOW_PORT=10588
PEER_SLOW_SECONDS=5
PEER_CA=/p/tls/ca.pem
PEER_MAILDIR=/p/Maildir
PEER_LOG=/p/postfix.log
PEER_DOVECOT_LOG=/p/dovecot.log
PEER_OAUTH_USER=relay@contoso.test
PEER_JWT_KEY_B64=c2VjcmV0LWtleQ==
PEER_JWT_ALG=HS256
PEER_JWT_KID=kid-1
PEER_JWT_AUD=aud-1
PEER_JWT_USER_CLAIM=email
PEER_BASIC_USER=basic@contoso.test
PEER_BASIC_PASSWORD=pw
PEER_SENDAS_DENIED=denied@contoso.test
PEER_SENDER_THROTTLED=throttled@contoso.test
PEER_SENDER_QUOTA=quota@contoso.test
";

    #[test]
    fn peer_env_is_parsed() {
        let peer = Peer::parse(ENV).unwrap();
        assert_eq!(peer.submission_port, 10587);
        assert_eq!(peer.plain_port, 10025);
        assert_eq!(peer.slow_delay, Duration::from_secs(5));
        assert_eq!(peer.ca_path(), Path::new("/p/tls/ca.pem"));
        assert_eq!(peer.jwt_key, b"secret-key");
        assert_eq!(peer.sendas_denied, "denied@contoso.test");
    }

    #[test]
    fn an_incomplete_peer_env_is_no_peer() {
        let without_ca: String = ENV
            .lines()
            .filter(|l| !l.starts_with("PEER_CA="))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(Peer::parse(&without_ca).is_none());
    }

    #[test]
    fn minted_tokens_carry_what_dovecot_checks() {
        let peer = Peer::parse(ENV).unwrap();
        let token = peer.mint_token("relay@contoso.test", Duration::from_secs(600));
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_audience(&["aud-1"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"secret-key"),
            &validation,
        )
        .unwrap();
        assert_eq!(data.header.kid.as_deref(), Some("kid-1"));
        assert_eq!(data.header.typ.as_deref(), Some("JWT"));
        assert_eq!(data.claims["email"], "relay@contoso.test");
        assert!(data.claims["sub"].is_string());
        let wrong = peer.mint_token_wrong_key("relay@contoso.test", Duration::from_secs(600));
        assert!(
            jsonwebtoken::decode::<serde_json::Value>(
                &wrong,
                &jsonwebtoken::DecodingKey::from_secret(b"secret-key"),
                &validation,
            )
            .is_err()
        );
    }

    #[test]
    fn nothing_listens_on_a_closed_port() {
        let port = closed_port();
        let refused = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_silent_server_accepts_and_says_nothing() {
        use tokio::io::AsyncReadExt;
        let (address, task) = silent_server().await;
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await;
        assert!(read.is_err(), "the silent server sent something");
        task.abort();
    }

    #[test]
    fn connect_lines_are_counted_per_exact_address() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("postfix.log");
        std::fs::write(
            &log,
            "x postfix/plain/smtpd[1]: connect from unknown[127.0.0.5]:4000\n\
             x postfix/plain/smtpd[1]: disconnect from unknown[127.0.0.5]:4000 commands=0/0\n\
             x postfix/plain/smtpd[2]: connect from unknown[127.0.0.50]:4001\n\
             x postfix/submission/smtpd[3]: connect from localhost[127.0.0.5]:4002\n",
        )
        .unwrap();
        let mut peer = Peer::parse(ENV).unwrap();
        peer.log = log;
        assert_eq!(peer.count_connections_from(Ipv4Addr::new(127, 0, 0, 5)), 2);
        assert_eq!(peer.count_connections_from(Ipv4Addr::new(127, 0, 0, 50)), 1);
        assert_eq!(peer.count_connections_from(Ipv4Addr::new(127, 0, 0, 6)), 0);
    }
}
