//! The real `mail-relay` binary in a child process, with a settings file written by the test and
//! its JSON log lines collected.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::entra::{CLIENT_ID, CLIENT_SECRET, FakeEntra, TENANT_ID};
use crate::helpers::TEST_API_KEY;
use crate::peer::Peer;

pub struct RelayProcess {
    child: Child,
    pub address: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Start `mail-relay serve` with `yaml` as its settings (log level from `mailRelay.log.level`,
    /// `info` by default); waits for its "listening" line.
    pub fn start(yaml: &str) -> RelayProcess {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay.yml");
        std::fs::write(&config, yaml).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_mail-relay"));
        // Only the file counts: no settings from the test's environment.
        for (name, _) in std::env::vars() {
            if name.starts_with("MAILRELAY_")
                || name.starts_with("FEATURESWITCHES_")
                || name.starts_with("SERVER_")
                || name.starts_with("MAIL_RELAY_")
                || name == "RUST_LOG"
            {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let mut process = RelayProcess {
            child,
            address: "0.0.0.0:0".parse().unwrap(),
            logs,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let listening = process.json_lines().into_iter().find_map(|line| {
                (line["message"] == "mail-relay listening")
                    .then(|| line["addr"].as_str()?.parse().ok())
                    .flatten()
            });
            if let Some(address) = listening {
                process.address = address;
                return process;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "mail-relay exited with {status} before listening:\n{}",
                    process.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mail-relay did not start:\n{}",
                process.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The settings file the process was started with (for the operator's commands).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("relay.yml")
    }

    /// Send SIGKILL: the process ends at once, as in a crash or an OOM kill.
    pub fn sigkill(&self) {
        let status = Command::new("kill")
            .args(["-KILL", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -KILL failed");
    }

    /// Send SIGTERM, as an orchestrator does.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    /// The exit status, or `None` when the process still runs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Every log line that is JSON.
    pub fn json_lines(&self) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The `client` of the request span of every finished request to `path` (matched route).
    pub fn clients_for(&self, path: &str) -> Vec<String> {
        self.json_lines()
            .into_iter()
            // The request's one line (probes log it at debug level).
            .filter(|line| line["message"] == "request finished" && line["route"] == path)
            .map(|line| line["span"]["client"].as_str().unwrap_or("?").to_owned())
            .collect()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        // Our own child, by its id: a failed test leaves no relay behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hex SHA-256 of the integration tests' API key, for `mailRelay.auth.apiKeys`.
pub fn test_key_sha256() -> String {
    hex::encode(Sha256::digest(TEST_API_KEY.as_bytes()))
}

/// Settings text for a relay sending with MS_OAUTH to `peer` on `port` from `source` (its SMTP
/// connections can be told apart in the peer's log), tokens from `entra`, the tests' API key:
/// the YAML twin of [`crate::helpers::peer_oauth_settings`]'s sending side (the same server,
/// login, credential, token endpoint and timeouts, CA and API key; a test loads both and
/// compares). `auth_extra` is appended under `mailRelay.auth:` (indent 4), `relay_extra` under
/// `mailRelay:` (indent 2).
pub fn smtp_yaml(
    peer: &Peer,
    port: u16,
    source: std::net::Ipv4Addr,
    entra: &FakeEntra,
    auth_extra: &str,
    relay_extra: &str,
) -> String {
    let endpoint = entra.token_url().as_str().replace(TENANT_ID, "#TenantID#");
    let oauth = entra.oauth_settings();
    format!(
        r#"server:
  address: 127.0.0.1
  port: 0
featureSwitches:
  sendEmail:
    smtpServer: {host}
    smtpPort: {port}
    smtpEncryption: TLS
    smtpAuthentication: MS_OAUTH
    smtpUsername: {user}
    oAuthClientId: {CLIENT_ID}
    oAuthClientSecret: "{CLIENT_SECRET}"
    oAuthTenantId: {TENANT_ID}
    oAuthTokenEndpoint: "{endpoint}"
mailRelay:
  smtp:
    caFile: {ca}
    sourceAddress: {source}
    sendDeadlineSeconds: 20
  token:
    connectTimeoutSeconds: {connect}
    requestTimeoutSeconds: {request}
  limits:
    requestTimeoutSeconds: 30
  auth:
    apiKeys:
      - name: tests
        sha256: "{sha}"
        allowedFrom: {from:?}
{auth_extra}{relay_extra}"#,
        host = peer.host,
        user = peer.oauth_user,
        ca = peer.ca_path().display(),
        sha = test_key_sha256(),
        connect = oauth.connect_timeout.as_secs(),
        request = oauth.request_timeout.as_secs(),
        from = crate::helpers::TEST_KEY_FROM,
    )
}
