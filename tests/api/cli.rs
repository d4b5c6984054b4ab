//! The `check-config` and `encrypt-secret` commands, through the built binary.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

const BIN: &str = env!("CARGO_BIN_EXE_mail-relay");
pub(crate) const SECRET: &str = "Zx8Q~cli-secret-value~7";

/// A command with a clean environment, so the host's variables cannot leak in.
fn mail_relay(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command.env_clear().args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

pub(crate) fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    mail_relay(args, env).output().unwrap()
}

fn run_with_stdin(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = mail_relay(args, env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(crate) fn write_config(dir: &Path, yaml: &str) -> String {
    let path = dir.join("settings.yml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

pub(crate) fn valid_yaml(secret: &str) -> String {
    format!(
        "featureSwitches:\n  sendEmail:\n    smtpServer: smtp.office365.com\n    smtpPort: 587\n    smtpEncryption: TLS\n    smtpAuthentication: MS_OAUTH\n    smtpUsername: relay@contoso.com\n    oAuthClientId: c1\n    oAuthClientSecret: \"{secret}\"\n    oAuthTenantId: contoso.onmicrosoft.com\n"
    )
}

#[test]
fn check_config_valid_file_exits_0_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &valid_yaml(SECRET));
    let out = run(&["check-config", "--config", &path], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("oAuthClientSecret: \"****\""), "{stdout}");
    assert!(
        stdout.contains("smtpServer: \"smtp.office365.com\""),
        "{stdout}"
    );
    assert!(!stdout.contains(SECRET), "{stdout}");
    assert!(!text(&out.stderr).contains(SECRET));
}

#[test]
fn check_config_reads_the_path_from_mail_relay_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &valid_yaml(SECRET));
    let out = run(&["check-config"], &[("MAIL_RELAY_CONFIG", &path)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn check_config_invalid_encryption_exits_2_naming_key_and_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = valid_yaml(SECRET).replace("smtpEncryption: TLS", "smtpEncryption: FOO");
    let path = write_config(dir.path(), &yaml);
    let out = run(&["check-config", "--config", &path], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("featureSwitches.sendEmail.smtpEncryption: \"FOO\" is not one of NONE, SSL, TLS (or 0, 1, 2)"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn check_config_missing_file_exits_2() {
    let out = run(&["check-config", "--config", "/nonexistent/x.yml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/x.yml"));
}

#[test]
fn check_config_prints_warnings_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = valid_yaml(SECRET).replace(
        "    smtpPort: 587\n",
        "    smtpPort: 587\n    smtpSever: x\n",
    );
    let path = write_config(dir.path(), &yaml);
    let out = run(&["check-config", "--config", &path], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("warning: featureSwitches.sendEmail.smtpSever: unknown key, ignored; did you mean smtpServer?"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn encrypt_secret_round_trips_through_check_config() {
    let key = STANDARD.encode([3u8; 32]);
    let env = [("MAIL_RELAY_ENCRYPT_KEY", key.as_str())];
    let out = run_with_stdin(&["encrypt-secret"], &env, &format!("{SECRET}\n"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let encrypted = text(&out.stdout).trim_end().to_owned();
    assert!(encrypted.starts_with("{cipher}"), "{encrypted}");
    assert!(!encrypted.contains(SECRET));

    // The library decrypts it to the secret, without the newline typed after it.
    let key_obj = mail_relay::config::cipher::EncryptionKey::from_base64(&key, "test").unwrap();
    let plain = mail_relay::config::cipher::decrypt(&key_obj, &encrypted).unwrap();
    assert_eq!(secrecy::ExposeSecret::expose_secret(&plain), SECRET);

    // And the binary accepts it in a settings file.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &valid_yaml(&encrypted));
    let out = run(&["check-config", "--config", &path], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(SECRET));

    // Under another key it names the setting and hides both forms of the secret.
    let other = STANDARD.encode([4u8; 32]);
    let out = run(
        &["check-config", "--config", &path],
        &[("MAIL_RELAY_ENCRYPT_KEY", &other)],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("featureSwitches.sendEmail.oAuthClientSecret"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(SECRET) && !stderr.contains(&encrypted),
        "{stderr}"
    );
}

#[test]
fn encrypt_secret_without_a_key_exits_2_naming_the_variables() {
    let out = run_with_stdin(&["encrypt-secret"], &[], SECRET);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("MAIL_RELAY_ENCRYPT_KEY"), "{stderr}");
    assert!(stderr.contains("MAIL_RELAY_ENCRYPT_KEY_FILE"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn encrypt_secret_with_empty_stdin_exits_2() {
    let key = STANDARD.encode([3u8; 32]);
    let out = run_with_stdin(
        &["encrypt-secret"],
        &[("MAIL_RELAY_ENCRYPT_KEY", &key)],
        "\n",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no secret on stdin"));
}

// ---- healthcheck ---------------------------------------------------------------------------

/// Settings for the healthcheck: where an instance listens, and its base path.
fn listening_yaml(port: u16, base_path: &str) -> String {
    format!(
        "server:\n  address: 0.0.0.0\n  port: {port}\nmailRelay:\n  http:\n    basePath: {base_path}\n  delivery:\n    mode: outbox\n    outboxDir: ./unused\n  auth:\n    allowAnonymous: true\n"
    )
}

#[tokio::test]
async fn healthcheck_finds_the_probe_from_the_settings_and_exits_by_its_answer() {
    let app = crate::helpers::spawn_app_with(|s| s.relay.http.base_path = "/relay".into()).await;
    let dir = tempfile::tempdir().unwrap();
    let healthcheck = |yaml: String| {
        let config = write_config(dir.path(), &yaml);
        tokio::task::spawn_blocking(move || run(&["healthcheck", "--config", &config], &[]))
    };
    let port = app.address.port();

    let up = healthcheck(listening_yaml(port, "/relay")).await.unwrap();
    assert_eq!(up.status.code(), Some(0), "{}", text(&up.stderr));

    // Another base path: the probe answers 404.
    let wrong = healthcheck(listening_yaml(port, "/elsewhere"))
        .await
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        text(&wrong.stderr).contains("404"),
        "{}",
        text(&wrong.stderr)
    );

    // Settings that are broken elsewhere (an unset secret, no tenant) do not fail the probe:
    // the health check reads only where the service listens.
    let elsewhere_broken = format!(
        "{}featureSwitches:\n  sendEmail:\n    smtpAuthentication: MS_OAUTH\n    oAuthClientSecret: ${{UNSET_SECRET}}\n",
        listening_yaml(port, "/relay")
    );
    let up_anyway = healthcheck(elsewhere_broken).await.unwrap();
    assert_eq!(
        up_anyway.status.code(),
        Some(0),
        "{}",
        text(&up_anyway.stderr)
    );

    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = healthcheck(listening_yaml(closed_port, "/relay"))
        .await
        .unwrap();
    assert_eq!(down.status.code(), Some(1));

    // Settings that do not load: exit 2, as check-config.
    let invalid = healthcheck("server:\n  port: seventy\n".into())
        .await
        .unwrap();
    assert_eq!(invalid.status.code(), Some(2));
    assert!(
        text(&invalid.stderr).contains("server.port"),
        "{}",
        text(&invalid.stderr)
    );

    // An explicit URL wins over the settings.
    let url = format!("http://127.0.0.1:{port}/relay/health/live");
    let config = write_config(dir.path(), &listening_yaml(closed_port, "/x"));
    let explicit = tokio::task::spawn_blocking(move || {
        run(&["healthcheck", "--config", &config, "--url", &url], &[])
    })
    .await
    .unwrap();
    assert_eq!(
        explicit.status.code(),
        Some(0),
        "{}",
        text(&explicit.stderr)
    );
}

#[test]
fn keys_prints_the_tables_of_the_sections_named_without_any_settings_file() {
    let out = run(&["keys", "mailRelay.store"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows[0], "| Key | Default | Allowed / meaning |");
    assert!(
        rows.iter()
            .any(|r| r.starts_with("| `mailRelay.store.maxConnections` | `10` | 1..1000")),
        "{table}"
    );
    assert!(
        rows.iter().any(
            |r| r.starts_with("| `mailRelay.store.password` (`passwordFile`)")
                && r.ends_with("secret |")
        ),
        "{table}"
    );
    assert!(
        rows[2..]
            .iter()
            .all(|r| r.starts_with("| `mailRelay.store.")),
        "{table}"
    );
    let all = text(&run(&["keys"], &[]).stdout);
    assert!(all.contains("| `server.port` | `8080` |"), "{all}");
    assert!(all.lines().count() > 90, "{all}");
}
