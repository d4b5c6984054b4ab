//! The benchmark's limit: small mails submitted straight to the SMTP peer over a fixed number of
//! pooled, authenticated connections (STARTTLS + XOAUTH2), with the same SMTP client code and the
//! same exchange on the wire as the relay (lettre's `AsyncSmtpConnection` on a socket with
//! `TCP_NODELAY`; MAIL FROM and RCPT TO pipelined; the message and its end in one write), but no
//! HTTP, no JSON, no MIME building and no token cache.
//!
//! ```sh
//! BENCH_TOKEN=... cargo run --release --example smtp_direct -- \
//!     127.0.0.1 10587 /tmp/mail-relay-peer/tls/ca.pem relay@contoso.test 3 5 <marker>
//! ```
//! Arguments: host, port, CA file, XOAUTH2 user, connections, seconds, subject marker.
//! Prints one JSON line: `{"mails":..,"seconds":..,"rate":..,"p50_ms":..,"p99_ms":..,"errors":..}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::Data;
use lettre::transport::smtp::extension::ClientId;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    host: String,
    port: u16,
    ca: String,
    user: String,
    connections: usize,
    seconds: f64,
    marker: String,
}

fn args() -> Result<Args, BoxError> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 7 {
        return Err(
            "usage: smtp_direct HOST PORT CA_FILE USER CONNECTIONS SECONDS MARKER \
                    (token in BENCH_TOKEN)"
                .into(),
        );
    }
    Ok(Args {
        host: a[0].clone(),
        port: a[1].parse()?,
        ca: a[2].clone(),
        user: a[3].clone(),
        connections: a[4].parse()?,
        seconds: a[5].parse()?,
        marker: a[6].clone(),
    })
}

async fn open(args: &Args, token: &str) -> Result<AsyncSmtpConnection, BoxError> {
    let tcp = tokio::net::TcpStream::connect((args.host.as_str(), args.port)).await?;
    // As in the relay: without it every mail waits for a delayed ACK (about 40 ms).
    tcp.set_nodelay(true)?;
    let hello = ClientId::Domain("bench.localhost".into());
    let mut connection = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello).await?;
    let ca = Certificate::from_pem(&std::fs::read(&args.ca)?)?;
    let tls = TlsParameters::builder(args.host.clone())
        .add_root_certificate(ca)
        .build_rustls()?;
    connection.starttls(tls, &hello).await?;
    let credentials = Credentials::new(args.user.clone(), token.to_owned());
    connection.auth(&[Mechanism::Xoauth2], &credentials).await?;
    Ok(connection)
}

/// One mail as the relay sends it to a server offering PIPELINING: MAIL FROM and RCPT TO in one
/// write, DATA, then the message and its end in one write (the text has no line starting with a
/// dot, so nothing needs doubling).
async fn send(connection: &mut AsyncSmtpConnection, message: &str) -> Result<(), BoxError> {
    connection
        .command("MAIL FROM:<bench@contoso.test>\r\nRCPT TO:<alice@contoso.test>\r\n")
        .await?;
    connection.read_response().await?;
    connection.command(Data).await?;
    connection.command(format!("{message}\r\n.\r\n")).await?;
    Ok(())
}

/// A small mail much like the relay's for the same JSON request (about 1 KB).
fn mail(marker: &str, n: u64) -> String {
    let text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(16);
    format!(
        "From: bench@contoso.test\r\nTo: alice@contoso.test\r\nSubject: {marker} direct {n}\r\n\
         Message-ID: <{marker}-direct-{n}@contoso.test>\r\nDate: Thu, 26 Nov 2026 08:00:00 +0000\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 7bit\r\n\r\n{text}\r\n"
    )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Arc::new(args()?);
    let token = std::env::var("BENCH_TOKEN").map_err(|_| "set BENCH_TOKEN")?;
    let mut connections = Vec::new();
    for _ in 0..args.connections {
        connections.push(open(&args, &token).await?);
    }
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for mut connection in connections {
        let (args, counter, errors) = (args.clone(), counter.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < end {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let body = mail(&args.marker, n);
                let sent = Instant::now();
                match send(&mut connection, &body).await {
                    Ok(_) => latencies.push(sent.elapsed()),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("send failed: {e}");
                        break;
                    }
                }
            }
            let _ = connection.quit().await;
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{{\"mails\":{},\"seconds\":{:.3},\"rate\":{:.1},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"errors\":{}}}",
        latencies.len(),
        seconds,
        latencies.len() as f64 / seconds,
        pct(0.5),
        pct(0.99),
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}
