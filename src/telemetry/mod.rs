//! Watching the relay: the `tracing` subscriber (JSON lines or text, filtered like `RUST_LOG`),
//! one log line per request, Prometheus metrics, and the recent-send history behind readiness.

pub mod delivery;
pub mod metrics;
pub mod request_log;

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
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

/// Log lines held for the writer thread at most; beyond, lines are dropped (and counted) rather
/// than make a request wait for a slow stdout. About 8 MiB of JSON lines at the most.
const LOG_BUFFER_LINES: usize = 16_384;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The service's log writer: lines go to stdout from a thread of their own, a batch per write
/// (no syscall on the request's thread, none per line), through a bounded buffer. Keep the guard
/// until exit: dropping it flushes what is left.
pub fn stdout_writer() -> (NonBlocking, WorkerGuard) {
    // Buffered: the writer thread flushes after each batch it drains, one write for many lines.
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let (writer, guard) = bounded(stdout, LOG_BUFFER_LINES);
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

/// `output` behind a writer thread and a buffer of `lines`; a full buffer drops lines.
fn bounded<W: std::io::Write + Send + 'static>(
    output: W,
    lines: usize,
) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .buffered_lines_limit(lines)
        .lossy(true)
        .thread_name("mail-relay-log")
        .finish(output)
}

/// Log lines dropped because the writer's buffer was full (`mail_relay_log_lines_dropped_total`).
pub fn dropped_log_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// Install the global subscriber; a second call (tests) keeps the first one.
pub fn init<W>(format: LogFormat, filter: &str, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // `try_init` also routes the `log` records of dependencies into the subscriber.
    let _ = subscriber(format, filter, writer).try_init();
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use tracing_subscriber::fmt::MakeWriter as _;

    /// A stdout nobody reads: every write waits until released.
    struct Stalled(Arc<AtomicBool>);

    impl std::io::Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            while !self.0.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_stdout_drops_and_counts_lines_instead_of_blocking_the_logger() {
        let released = Arc::new(AtomicBool::new(false));
        let (writer, guard) = super::bounded(Stalled(Arc::clone(&released)), 8);
        let dropped = writer.error_counter();
        let started = Instant::now();
        for i in 0..200 {
            writeln!(writer.make_writer(), "line {i}").unwrap();
        }
        // 200 lines against a buffer of 8 and a writer that takes none: most are dropped, and
        // the logging side never waited for the stalled one (a generous bound: it is no timing).
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            dropped.dropped_lines() >= 200 - 8 - 1,
            "{}",
            dropped.dropped_lines()
        );
        released.store(true, Ordering::SeqCst);
        drop(guard);
    }
}
