//! The command line: `serve`, `check-config`, `encrypt-secret`, `healthcheck`, `queue`, ...

mod queue;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::app::Application;
use crate::config::{self, LoadOptions};
use crate::telemetry::{self, LogFormat};

/// Exit code for invalid settings or arguments (as `check-config` documents).
pub const EXIT_INVALID: u8 = 2;

/// HTTP-to-SMTP mail relay for Microsoft 365 (OAuth2 / SASL XOAUTH2).
#[derive(Debug, Parser)]
#[command(name = "mail-relay", version, about)]
pub struct Cli {
    /// Settings file (Spring-Boot-style YAML).
    #[arg(
        long,
        global = true,
        env = "MAIL_RELAY_CONFIG",
        default_value = "config/osweb-prod.yml"
    )]
    pub config: PathBuf,
    /// Log format: `json` (one object a line) or `text`; overrides `mailRelay.log.format` (default json).
    #[arg(long, global = true, env = "MAIL_RELAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter in `RUST_LOG` syntax; overrides `mailRelay.log.level` (default info).
    #[arg(long, global = true, env = "RUST_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service.
    Serve,
    /// Validate the settings and print them with every secret masked; exit 2 when invalid.
    CheckConfig,
    /// Read a secret on stdin and print its `{cipher}` form (key from MAIL_RELAY_ENCRYPT_KEY or MAIL_RELAY_ENCRYPT_KEY_FILE).
    EncryptSecret,
    /// GET the live probe of a running instance; exit 0 when it answers 200 (for container HEALTHCHECKs).
    Healthcheck {
        /// The probe's URL [default: from the settings: server.address (loopback when it is
        /// 0.0.0.0 or ::), server.port and mailRelay.http.basePath].
        #[arg(long, env = "MAIL_RELAY_HEALTHCHECK_URL")]
        url: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Print a new random API key and the SHA-256 hash to put in `mailRelay.auth.apiKeys`.
    HashKey,
    /// Print the OpenAPI document (as committed in `openapi/openapi.json`).
    Openapi,
    /// Print the settings keys, their defaults and what they allow, as the README's Markdown
    /// tables: every key, or those under the sections named (e.g. `mailRelay.store`).
    Keys {
        /// Sections to list, e.g. `mailRelay.rateLimits mailRelay.idempotency`.
        sections: Vec<String>,
    },
    /// Check each step to Microsoft 365 with these settings (DNS, TCP, TLS, EHLO, token, AUTH)
    /// and print PASS/FAIL/SKIP with cause and fix; exit 0 when all pass, 1 on a failure,
    /// 2 for invalid settings.
    Diagnose {
        /// Also send a real test mail (needs --from and --to).
        #[arg(long, requires_all = ["from", "to"])]
        send_test: bool,
        /// From address of the test mail; the SMTP mailbox needs "Send as" on it.
        #[arg(long, requires = "send_test")]
        from: Option<String>,
        /// Recipient of the test mail.
        #[arg(long, requires = "send_test")]
        to: Option<String>,
        /// Check only this sending identity (mailRelay.identities; the default is `default`
        /// unless mailRelay.defaultIdentity.name says otherwise); without it, each in turn.
        #[arg(long)]
        identity: Option<String>,
    },
    /// Look at and act on queued mails (in the store of mailRelay.store.url): list, show ID,
    /// retry ID, drop ID.
    Queue {
        #[command(subcommand)]
        command: queue::QueueCommand,
    },
}

/// Run the parsed command line; the exit code says how it went.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve => serve(&cli.config, cli.log_format, cli.log.as_deref()).await,
        Command::CheckConfig => check_config(&cli.config),
        Command::EncryptSecret => encrypt_secret(),
        Command::Healthcheck { ref url, timeout } => {
            let url = match url {
                Some(url) => url.clone(),
                None => match config::listener(&LoadOptions::from_process(cli.config.clone())) {
                    Ok((server, http)) => live_probe_url(&server, &http),
                    Err(e) => {
                        eprintln!("healthcheck: {e}");
                        return ExitCode::from(EXIT_INVALID);
                    }
                },
            };
            healthcheck(&url, Duration::from_secs(timeout)).await
        }
        Command::HashKey => {
            let (key, hash) = crate::caller::new_api_key();
            println!("key:    {key}\nsha256: {hash}");
            eprintln!("Give the key to the client once; put only the sha256 in the settings.");
            ExitCode::SUCCESS
        }
        Command::Keys { ref sections } => {
            let sections: Vec<&str> = sections.iter().map(String::as_str).collect();
            print!("{}", config::key_table(&sections));
            ExitCode::SUCCESS
        }
        Command::Openapi => {
            print!("{}", crate::api::openapi::document_json());
            ExitCode::SUCCESS
        }
        Command::Diagnose {
            send_test,
            ref from,
            ref to,
            ref identity,
        } => {
            let test = match (send_test, from, to) {
                (true, Some(from), Some(to)) => Some(crate::diagnose::SendTest {
                    from: from.clone(),
                    to: to.clone(),
                }),
                _ => None,
            };
            diagnose(&cli.config, test.as_ref(), identity.as_deref()).await
        }
        Command::Queue { ref command } => {
            match config::load(&LoadOptions::from_process(cli.config.clone())) {
                Ok(loaded) => queue::run(&loaded.settings, command).await,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_INVALID)
                }
            }
        }
    }
}

async fn diagnose(
    path: &std::path::Path,
    test: Option<&crate::diagnose::SendTest>,
    only: Option<&str>,
) -> ExitCode {
    use crate::diagnose;

    println!(
        "mail-relay {} diagnose: {}",
        env!("CARGO_PKG_VERSION"),
        path.display()
    );
    let loaded = match config::load(&LoadOptions::from_process(path.to_path_buf())) {
        Ok(loaded) => loaded,
        Err(e) => {
            println!("{}", diagnose::settings_failed(path, &e));
            return ExitCode::from(EXIT_INVALID);
        }
    };
    println!("{}", diagnose::settings_passed(&loaded.settings));
    for warning in &loaded.warnings {
        println!("     warning: {warning}");
    }
    let settings = &loaded.settings;
    let names = settings.identity_names();
    let chosen: Vec<&str> = match only {
        Some(name) if names.contains(&name) => vec![name],
        Some(name) => {
            println!(
                "FAIL identity     no identity is named {name:?}; the identities are {}",
                names.join(", ")
            );
            return ExitCode::from(EXIT_INVALID);
        }
        None => names.clone(),
    };
    let mut ok = true;
    for name in chosen {
        let Some(view) = settings.for_identity(name) else {
            continue;
        };
        if names.len() > 1 {
            let mailbox = view
                .send_email
                .smtp_authentication
                .username()
                .unwrap_or("-");
            println!("\nidentity {name} ({mailbox})");
        }
        ok &= diagnose::run(&view, test, &mut |step| println!("{step}")).await;
    }
    if ok {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("a check failed: fix the first FAIL above and run diagnose again");
        ExitCode::FAILURE
    }
}

async fn serve(
    path: &std::path::Path,
    format: Option<LogFormat>,
    filter: Option<&str>,
) -> ExitCode {
    let loaded = match config::load(&LoadOptions::from_process(path.to_path_buf())) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    // The command line and its environment variables win over the settings file.
    let log = &loaded.settings.relay.log;
    telemetry::init(
        format.unwrap_or(log.format),
        filter.unwrap_or(&log.filter),
        std::io::stdout,
    );
    for warning in &loaded.warnings {
        tracing::warn!(config = %path.display(), "{warning}");
    }
    let masked = loaded.masked;
    let app = match Application::build(loaded.settings).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start (HTTP listener, token source or SMTP setup)");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = app.metrics_addr() {
        tracing::info!(%addr, "metrics listening (GET /metrics)");
    }
    match app.local_addr() {
        Ok(addr) => {
            tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "mail-relay listening")
        }
        Err(e) => tracing::warn!(error = %e, "listening, address unknown"),
    }
    app.state().admin.started(&masked, app.local_addr().ok());
    match app.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match config::load(&LoadOptions::from_process(path.to_path_buf())) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("warning: {warning}");
            }
            print!("{}", loaded.masked);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

fn encrypt_secret() -> ExitCode {
    use std::io::Read as _;

    use crate::config::cipher::{self, EncryptionKey};

    let env: Vec<(String, String)> = std::env::vars().collect();
    let key = match EncryptionKey::from_env(&env) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("encrypt-secret: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("encrypt-secret: cannot read the secret from stdin: {e}");
        return ExitCode::from(EXIT_INVALID);
    }
    // `echo secret |` and a typed line end with a newline that is not part of the secret.
    let secret = input
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&input);
    if secret.is_empty() {
        eprintln!(
            "encrypt-secret: no secret on stdin; pipe it in, e.g. `printf %s \"$SECRET\" | mail-relay encrypt-secret`"
        );
        return ExitCode::from(EXIT_INVALID);
    }
    match cipher::encrypt(&key, secret) {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("encrypt-secret: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where this instance's live probe answers, as seen from inside its own container.
fn live_probe_url(server: &config::ServerSettings, http: &config::HttpSettings) -> String {
    let mut address = server.socket_addr();
    if address.ip().is_unspecified() {
        address.set_ip(if address.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("http://{address}{}/health/live", http.base_path)
}

async fn healthcheck(url: &str, timeout: Duration) -> ExitCode {
    let client = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(client) => client,
        Err(e) => {
            eprintln!("healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(url).send().await {
        Ok(response) if response.status().is_success() => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("healthcheck: {url} answered {}", response.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}
