//! TEMPORARY stand-in for the peer helper's `tests/api/peer.rs` (same contract);
//! replaced by that file as soon as it exists.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};

#[derive(Debug, Clone)]
pub struct Peer {
    pub host: String,
    pub submission_port: u16,
    pub smtps_port: u16,
    pub plain_port: u16,
    pub ca: PathBuf,
    pub maildir: PathBuf,
    pub log: PathBuf,
    pub oauth_user: String,
    pub jwt_key_b64: String,
    pub jwt_kid: String,
    pub jwt_aud: String,
    pub jwt_user_claim: String,
    pub basic_user: String,
    pub basic_password: String,
    pub sendas_denied: String,
}

impl Peer {
    pub fn get() -> Option<Peer> {
        let dir = std::env::var("MAIL_RELAY_PEER_DIR").unwrap_or("/tmp/mail-relay-peer".into());
        let env = std::fs::read_to_string(PathBuf::from(dir).join("peer.env")).ok()?;
        let get = |key: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(str::to_string)
        };
        let peer = Peer {
            host: get("PEER_HOST")?,
            submission_port: get("PEER_SUBMISSION_PORT")?.parse().ok()?,
            smtps_port: get("PEER_SMTPS_PORT")?.parse().ok()?,
            plain_port: get("PEER_PLAIN_PORT")?.parse().ok()?,
            ca: get("PEER_CA")?.into(),
            maildir: get("PEER_MAILDIR")?.into(),
            log: get("PEER_LOG")?.into(),
            oauth_user: get("PEER_OAUTH_USER")?,
            jwt_key_b64: get("PEER_JWT_KEY_B64")?,
            jwt_kid: get("PEER_JWT_KID")?,
            jwt_aud: get("PEER_JWT_AUD")?,
            jwt_user_claim: get("PEER_JWT_USER_CLAIM")?,
            basic_user: get("PEER_BASIC_USER")?,
            basic_password: get("PEER_BASIC_PASSWORD")?,
            sendas_denied: get("PEER_SENDAS_DENIED")?,
        };
        TcpStream::connect((peer.host.as_str(), peer.submission_port)).ok()?;
        Some(peer)
    }

    pub fn require() -> Option<Peer> {
        let peer = Peer::get();
        if peer.is_none() {
            let message = "SKIPPED (no SMTP peer): start it with `bash tests/peer/start.sh`";
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{message}");
            }
            eprintln!("{message}");
        }
        peer
    }

    fn mint(&self, user: &str, lifetime: Duration, key: &EncodingKey) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.jwt_kid.clone());
        header.typ = Some("JWT".into());
        let mut claims = serde_json::json!({
            "sub": "mail-relay-test",
            "aud": self.jwt_aud,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime.as_secs(),
        });
        claims[&self.jwt_user_claim] = user.into();
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    pub fn mint_token(&self, user: &str, lifetime: Duration) -> String {
        let key = EncodingKey::from_base64_secret(&self.jwt_key_b64).unwrap();
        self.mint(user, lifetime, &key)
    }

    pub fn mint_token_wrong_key(&self, user: &str, lifetime: Duration) -> String {
        self.mint(
            user,
            lifetime,
            &EncodingKey::from_secret(b"not the peer's key, not at all!!"),
        )
    }

    pub fn wait_for_message(&self, needle: &str, timeout: Duration) -> Option<Vec<u8>> {
        let start = Instant::now();
        loop {
            for sub in ["new", "cur"] {
                if let Ok(entries) = std::fs::read_dir(self.maildir.join(sub)) {
                    for entry in entries.flatten() {
                        if let Ok(bytes) = std::fs::read(entry.path()) {
                            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                                return Some(bytes);
                            }
                        }
                    }
                }
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn count_connections_from(&self, ip: Ipv4Addr) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let needle = "connect from ";
        let addr = format!("[{ip}]");
        log.lines()
            .filter(|l| l.contains(needle) && !l.contains("disconnect from") && l.contains(&addr))
            .count()
    }

    pub fn ca_path(&self) -> &std::path::Path {
        &self.ca
    }
}
