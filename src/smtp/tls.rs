//! TLS for the SMTP side: the trusted roots, and the stream type for implicit TLS.
//!
//! Certificate verification is always on. Trusted: the system's roots plus the optional
//! `mailRelay.smtp.caFile`. STARTTLS goes through lettre (`TlsParameters`); implicit TLS
//! is done here with tokio-rustls, because lettre can only take over an existing
//! socket (which we need for `TCP_NODELAY` and the source address) before TLS.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use lettre::transport::smtp::client::{AsyncTokioStream, Certificate, TlsParameters};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::error::SmtpError;

const CA_FILE_KEY: &str = "mailRelay.smtp.caFile";

/// Both TLS configurations, built once.
#[derive(Clone)]
pub(crate) struct TlsSetup {
    /// For STARTTLS, through lettre.
    pub starttls: TlsParameters,
    /// For implicit TLS, through tokio-rustls.
    pub implicit: TlsConnector,
    pub server_name: ServerName<'static>,
}

impl TlsSetup {
    pub fn new(server: &str, ca_file: Option<&Path>) -> Result<Self, SmtpError> {
        let extra = match ca_file {
            Some(path) => read_ca_file(path)?,
            None => Vec::new(),
        };
        let server_name =
            ServerName::try_from(server.to_string()).map_err(|e| SmtpError::Setup {
                key: "featureSwitches.sendEmail.smtpServer",
                message: format!("{server:?} is not a valid host name or IP address ({e})"),
            })?;

        let mut builder = TlsParameters::builder(server.to_string());
        for cert in &extra {
            let cert = Certificate::from_der(cert.to_vec()).map_err(|e| SmtpError::Setup {
                key: CA_FILE_KEY,
                message: format!("a certificate in it was not accepted: {e}"),
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let starttls = builder.build_rustls().map_err(|e| SmtpError::Setup {
            key: CA_FILE_KEY,
            message: format!("the TLS settings could not be built: {e}"),
        })?;

        let mut roots = RootCertStore::empty();
        // Unreadable system certificates are skipped, as lettre does; a private CA goes in caFile.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        for cert in extra {
            roots.add(cert).map_err(|e| SmtpError::Setup {
                key: CA_FILE_KEY,
                message: format!("a certificate in it was not accepted: {e}"),
            })?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SmtpError::Setup {
                key: CA_FILE_KEY,
                message: format!("the TLS settings could not be built: {e}"),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();

        Ok(Self {
            starttls,
            implicit: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, SmtpError> {
    crate::config::read_ca_certificates(path).map_err(|message| SmtpError::Setup {
        key: CA_FILE_KEY,
        message,
    })
}

/// A TCP stream with implicit TLS, in the form lettre takes over.
#[derive(Debug)]
pub(crate) struct ImplicitTls(pub TlsStream<TcpStream>);

impl AsyncRead for ImplicitTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ImplicitTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

/// True when the chain of `error` says the peer's certificate was refused.
pub(crate) fn is_certificate_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(rustls_error) = e.downcast_ref::<rustls::Error>() {
            return matches!(
                rustls_error,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        // io::Error::source skips the wrapped error itself: look inside.
        if let Some(inner) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static))
            && is_certificate_error(inner)
        {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_errors_are_found_inside_io_errors() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io_error = io::Error::new(io::ErrorKind::InvalidData, rustls_error);
        assert!(is_certificate_error(&io_error));
        let other = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert!(!is_certificate_error(&other));
    }

    #[test]
    fn a_ca_file_without_certificates_names_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = TlsSetup::new("localhost", Some(&path)).err().unwrap();
        assert!(error.to_string().contains(CA_FILE_KEY), "{error}");
        let missing = TlsSetup::new("localhost", Some(&dir.path().join("missing.pem")))
            .err()
            .unwrap();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }
}
