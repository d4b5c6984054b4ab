//! Watching the relay: the `tracing` subscriber (JSON lines or text, filtered like `RUST_LOG`),
//! one log line per request, Prometheus metrics, and the recent-send history behind readiness.

pub mod delivery;
pub mod metrics;
pub mod request_log;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use crate::config::LogFormat;

/// The subscriber `init` installs, for tests that capture the log lines of a spawned app.
/// `filter` uses `RUST_LOG` syntax (e.g. `info,mail_relay=debug`); an invalid one means `info`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
        LogFormat::Text => Box::new(builder.finish()),
    }
}

/// Install the global subscriber; a second call (tests) keeps the first one.
pub fn init<W>(format: LogFormat, filter: &str, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // `try_init` also routes the `log` records of dependencies into the subscriber.
    let _ = subscriber(format, filter, writer).try_init();
}
