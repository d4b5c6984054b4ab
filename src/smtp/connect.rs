//! Opening a connection: DNS and TCP (from a source address if set), implicit TLS or STARTTLS,
//! the greeting, EHLO and the login, each step bounded by its timeout.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::commands::Ehlo;
use lettre::transport::smtp::extension::ClientId;
use secrecy::SecretString;
use tokio::net::{TcpSocket, TcpStream};

use super::classify::SmtpErrorKind;
use super::connection::{Connection, OpenGuard, from_lettre};
use super::error::{SmtpError, Stage};
use super::tls::{ImplicitTls, TlsSetup, is_certificate_error};
use crate::config::Encryption;
use crate::token::AccessToken;

/// How a new connection logs in.
#[derive(Clone)]
pub(crate) enum Login {
    None,
    Basic {
        username: String,
        password: SecretString,
    },
    XOAuth2 {
        username: String,
    },
}

/// Everything needed to open a connection; built once from the settings.
pub(crate) struct Connector {
    pub host: String,
    pub port: u16,
    pub encryption: Encryption,
    pub login: Login,
    pub tls: Option<TlsSetup>,
    pub hello: ClientId,
    pub source_address: Option<IpAddr>,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Open connections, for health and metrics; each [`Connection`] counts itself.
    pub open: Arc<AtomicUsize>,
}

impl Connector {
    fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn connection_error(&self, stage: Stage, detail: impl Into<String>) -> SmtpError {
        SmtpError::Connection {
            kind: SmtpErrorKind::Transient,
            stage,
            server: self.server(),
            detail: detail.into(),
        }
    }

    /// Opens, secures and authenticates a connection. `token` is required for XOAUTH2.
    #[tracing::instrument(name = "smtp_connect", skip_all, fields(server = %self.server()))]
    pub async fn open(&self, token: Option<&AccessToken>) -> Result<Connection, SmtpError> {
        let tcp = self.connect_tcp().await?;
        let mut connection = match (self.encryption, &self.tls) {
            (Encryption::Ssl, Some(_)) => {
                let tls_stream = self.implicit_tls(tcp).await?;
                self.greet(Box::new(ImplicitTls(tls_stream))).await?
            }
            _ => self.greet(Box::new(tcp)).await?,
        };
        if let (Encryption::Tls, Some(_)) = (self.encryption, &self.tls) {
            self.starttls(&mut connection).await?;
        }
        self.login(connection, token).await
    }

    // The steps of `open`, one by one, for `mail-relay diagnose`.

    /// Implicit TLS (`smtpEncryption: SSL`) on a fresh socket, before the greeting.
    pub(crate) async fn implicit_tls(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SmtpError> {
        let Some(tls) = &self.tls else {
            return Err(SmtpError::Setup {
                key: "featureSwitches.sendEmail.smtpEncryption",
                message: "implicit TLS asked for without TLS settings".into(),
            });
        };
        self.timed(
            Stage::Connect,
            self.connect_timeout,
            tls.implicit.connect(tls.server_name.clone(), tcp),
        )
        .await?
        .map_err(|e| self.tls_error(Stage::Connect, &e))
    }

    /// Reads the server's greeting and says EHLO.
    pub(crate) async fn greet(
        &self,
        stream: Box<dyn AsyncTokioStream>,
    ) -> Result<AsyncSmtpConnection, SmtpError> {
        self.timed(
            Stage::Greeting,
            self.command_timeout,
            AsyncSmtpConnection::connect_with_transport(stream, &self.hello),
        )
        .await?
        .map_err(|e| self.lettre_error(e, Stage::Greeting))
    }

    /// STARTTLS (required: a server not offering it is an error, never a fall-back to plain
    /// text), then EHLO again over TLS.
    pub(crate) async fn starttls(
        &self,
        connection: &mut AsyncSmtpConnection,
    ) -> Result<(), SmtpError> {
        let Some(tls) = &self.tls else {
            return Err(SmtpError::Setup {
                key: "featureSwitches.sendEmail.smtpEncryption",
                message: "STARTTLS asked for without TLS settings".into(),
            });
        };
        if !connection.can_starttls() {
            connection.abort().await;
            return Err(SmtpError::Unsupported {
                stage: Stage::StartTls,
                server: self.server(),
                detail: "does not offer STARTTLS, which smtpEncryption TLS requires \
                         (use SSL for an implicit-TLS port)"
                    .into(),
            });
        }
        self.timed(
            Stage::StartTls,
            self.command_timeout,
            connection.starttls(tls.starttls.clone(), &self.hello),
        )
        .await?
        .map_err(|e| self.lettre_error(e, Stage::StartTls))
    }

    /// Logs in as the settings say; a refused login ends the session with QUIT.
    pub(crate) async fn login(
        &self,
        connection: AsyncSmtpConnection,
        token: Option<&AccessToken>,
    ) -> Result<Connection, SmtpError> {
        let mut connection = Connection {
            inner: connection,
            pipelining: false,
            token: None,
            last_used: Instant::now(),
            server: self.server(),
            command_timeout: self.command_timeout,
            _open: OpenGuard::new(&self.open),
            slot: None,
        };
        // lettre keeps only the EHLO keywords it knows, and PIPELINING is not one: one more
        // EHLO per connection, before AUTH, tells.
        let ehlo = connection
            .command(Ehlo::new(self.hello.clone()), Stage::Greeting)
            .await?;
        connection.pipelining = ehlo
            .message()
            .any(|line| line.trim().eq_ignore_ascii_case("PIPELINING"));
        let login = match &self.login {
            Login::None => Ok(()),
            Login::Basic { username, password } => connection.basic(username, password).await,
            Login::XOAuth2 { username } => match token {
                Some(token) => {
                    connection.token = Some(token.clone());
                    connection.xoauth2(username, token).await
                }
                None => Err(SmtpError::Setup {
                    key: "featureSwitches.sendEmail.smtpAuthentication",
                    message: "MS_OAUTH needs a token provider".into(),
                }),
            },
        };
        match login {
            Ok(()) => Ok(connection),
            Err(error) => {
                // The session is still open after a refused login: end it politely.
                connection.quit().await;
                Err(error)
            }
        }
    }

    pub(crate) async fn connect_tcp(&self) -> Result<TcpStream, SmtpError> {
        let addresses: Vec<SocketAddr> = self
            .timed(
                Stage::Connect,
                self.connect_timeout,
                tokio::net::lookup_host((self.host.as_str(), self.port)),
            )
            .await?
            .map_err(|e| self.connection_error(Stage::Connect, format!("cannot resolve: {e}")))?
            .filter(|a| {
                self.source_address
                    .is_none_or(|source| source.is_ipv4() == a.is_ipv4())
            })
            .collect();
        let mut last = None;
        for address in addresses {
            match self.connect_one(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            self.connection_error(
                Stage::Connect,
                "the host name resolved to no address usable from mailRelay.smtp.sourceAddress",
            )
        }))
    }

    async fn connect_one(&self, address: SocketAddr) -> Result<TcpStream, SmtpError> {
        let io = |e: std::io::Error| self.connection_error(Stage::Connect, e.to_string());
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(io)?;
        if let Some(source) = self.source_address {
            socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
                self.connection_error(
                    Stage::Connect,
                    format!("cannot bind mailRelay.smtp.sourceAddress {source}: {e}"),
                )
            })?;
        }
        let stream = self
            .timed(
                Stage::Connect,
                self.connect_timeout,
                socket.connect(address),
            )
            .await?
            .map_err(io)?;
        // lettre writes the body and the final "." separately: with Nagle's algorithm and
        // the server's delayed ACK, every mail would wait about 40 ms.
        stream.set_nodelay(true).map_err(io)?;
        Ok(stream)
    }

    async fn timed<T>(
        &self,
        stage: Stage,
        limit: Duration,
        future: impl Future<Output = T>,
    ) -> Result<T, SmtpError> {
        let key = if matches!(stage, Stage::Connect) {
            "mailRelay.smtp.connectTimeoutSeconds"
        } else {
            "mailRelay.smtp.commandTimeoutSeconds"
        };
        tokio::time::timeout(limit, future).await.map_err(|_| {
            self.connection_error(stage, format!("no answer within {key} ({limit:?})"))
        })
    }

    fn tls_error(&self, stage: Stage, error: &std::io::Error) -> SmtpError {
        SmtpError::Connection {
            kind: if is_certificate_error(error) {
                SmtpErrorKind::Tls
            } else {
                SmtpErrorKind::Transient
            },
            stage,
            server: self.server(),
            detail: format!("TLS handshake failed: {error}"),
        }
    }

    fn lettre_error(&self, error: lettre::transport::smtp::Error, stage: Stage) -> SmtpError {
        from_lettre(error, stage, &self.server())
    }
}
