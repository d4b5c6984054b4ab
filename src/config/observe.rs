//! `mailRelay.metrics.*` and `mailRelay.log.*`: how the relay can be watched.

use std::net::{IpAddr, SocketAddr};

use tracing_subscriber::EnvFilter;

use super::read::Ctx;

/// `mailRelay.metrics`: where `GET /metrics` is served.
#[derive(Debug, Clone, Default)]
pub struct MetricsSettings {
    /// A listener of its own (`address` and `port`), the only place `/metrics` is served then;
    /// `None` serves it on the main listener.
    pub listen: Option<SocketAddr>,
}

/// `mailRelay.log`: how log lines look and which are written.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter, e.g. `info` or `info,mail_relay=debug`.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        super::read::from_presets(log)
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object a line.
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// Every spelling `mailRelay.log.format` accepts, any case.
    pub const CHOICES: &[(&str, LogFormat)] =
        &[("json", LogFormat::Json), ("text", LogFormat::Text)];

    /// The spelling `check-config` prints.
    pub fn name(self) -> &'static str {
        super::read::name_in(Self::CHOICES, &self)
    }
}

const ADDRESS: &str = "mailRelay.metrics.address";
const PORT: &str = "mailRelay.metrics.port";

/// A port of its own turns the separate listener on; the address alone means nothing.
pub(super) fn metrics(ctx: &mut Ctx<'_>, server: SocketAddr) -> MetricsSettings {
    let server_address = server.ip();
    let address = ctx.text(ADDRESS).map(str::to_owned).and_then(|text| {
        let parsed = text.parse::<IpAddr>().ok();
        if parsed.is_none() {
            ctx.error(
                ADDRESS,
                format!(
                    "{text:?} is not an IP address; use e.g. 0.0.0.0 (all interfaces) or 127.0.0.1"
                ),
            );
        }
        parsed
    });
    if ctx.text(PORT).is_none() {
        if address.is_some() {
            ctx.error(
                ADDRESS,
                format!("is set but {PORT} is not: give the port of the separate metrics listener too, or remove the address to serve /metrics on the main listener"),
            );
        }
        return MetricsSettings::default();
    }
    // 0 picks a free port, as for server.port.
    let port = ctx.whole_or(PORT, 9090u16);
    if port != 0 && port == server.port() && address.is_none_or(|a| a == server_address) {
        ctx.error(
            PORT,
            format!("{port} is server.port too: the two listeners need different ports"),
        );
    }
    MetricsSettings {
        listen: Some(SocketAddr::new(address.unwrap_or(server_address), port)),
    }
}

pub(super) fn log(ctx: &mut Ctx<'_>) -> LogSettings {
    let format = ctx.choice("mailRelay.log.format", LogFormat::CHOICES);
    let key = "mailRelay.log.level";
    let preset = ctx.preset(key).to_owned();
    let filter = match ctx.text(key).map(str::to_owned) {
        None => preset,
        Some(text) => match EnvFilter::try_new(&text) {
            Ok(_) => text,
            Err(e) => {
                ctx.error(
                    key,
                    format!("{text:?} is not a RUST_LOG-style filter ({e}); use e.g. info, or info,mail_relay=debug"),
                );
                preset
            }
        },
    };
    LogSettings { format, filter }
}
