//! Fixes for a set-up that does not get as far as a mail: what `mail-relay diagnose` names
//! step by step (the settings, DNS and TCP, TLS, EHLO, the login, the token endpoint, the
//! store). The causes a mail itself can meet are [`super::Cause`].

/// The settings prefix of the sending identity.
const SE: &str = "featureSwitches.sendEmail";

/// A set-up step's problem with a known fix; the data is what the fix names.
#[derive(Debug, Clone, Copy)]
pub enum Setup<'a> {
    /// The settings file is invalid.
    InvalidSettings { path: &'a str },
    /// One setting cannot be used (the error names it).
    SettingNamedAbove,
    /// The SMTP host or port is likely wrong.
    SmtpHost,
    /// No DNS answer for the SMTP host.
    DnsResolver,
    /// The SMTP port refused the connection.
    NothingListens { server: &'a str },
    /// The TCP connection got no answer.
    SmtpFirewall { server: &'a str },
    /// The local address to connect from cannot be used.
    SourceAddress,
    /// No SMTP greeting came.
    NoGreeting { server: &'a str },
    /// A silent port: it may wait for an implicit-TLS handshake.
    SilentImplicitTls,
    /// STARTTLS is not offered on the port.
    NoStarttls,
    /// The certificate may not name the host.
    CertificateName,
    /// The certificate may come from a private CA.
    PrivateCa,
    /// The certificate may have expired.
    MaybeExpired,
    /// The certificate has expired.
    Expired,
    /// The certificate does not name the host; `names` are those it does name.
    NotInCertificate { host: &'a str, names: &'a str },
    /// The certificate's issuer is not trusted.
    UntrustedIssuer { issuer: &'a str },
    /// The port may speak STARTTLS rather than implicit TLS.
    StarttlsPort,
    /// Something between breaks the TLS handshake.
    TlsInspection,
    /// XOAUTH2 is not offered.
    NoXoauth2,
    /// A server without OAuth2.
    BasicInstead,
    /// PLAIN or LOGIN is not offered.
    NoPlainLogin,
    /// Exchange Online wants OAuth2.
    OAuthInstead,
    /// The token's roles lack SMTP.SendAsApp.
    LacksSendAsApp,
    /// The server refused the token, without saying why.
    TokenRefused,
    /// The Basic login was refused.
    BasicLogin,
    /// SendAsDenied comes only after DATA.
    SendAsAfterData,
    /// An Entra ID code the relay does not know.
    UnknownAadsts,
    /// Nothing answers at the managed identity endpoint.
    ManagedIdentityUnreachable { endpoint: &'a str },
    /// The token endpoint cannot be reached.
    TokenEndpointUnreachable,
    /// The token request got no answer.
    TokenFirewall,
    /// The token request may need longer.
    TokenTimeouts,
    /// Entra ID throttles or fails.
    EntraFailing,
    /// The token endpoint is not Entra ID's v2.0 one.
    TokenEndpointNotV2,
    /// The certificate and key do not make a credential.
    CertificatePair,
    /// The token endpoint is not https.
    HttpsTokenEndpoint,
    /// The store URL cannot be used.
    StoreUrl,
    /// The store does not answer.
    StoreSilent,
    /// The store's host does not resolve.
    StoreHost,
    /// The store cannot be reached.
    StoreReach,
    /// The store's TLS failed.
    StoreTls,
    /// The store refused the login.
    StoreLogin,
    /// The store's user may not create the schema.
    StoreGrant,
    /// No known fix: the cause says it all.
    SeeCause,
}

impl Setup<'_> {
    pub fn fix(self) -> String {
        match self {
            Self::InvalidSettings { path } => format!(
                "correct each setting named above (mail-relay check-config --config {path} lists them)"
            ),
            Self::SettingNamedAbove => "correct the setting named above".into(),
            Self::SmtpHost => format!(
                "check {SE}.smtpServer and {SE}.smtpPort (Exchange Online: smtp.office365.com, port 587 with smtpEncryption TLS)"
            ),
            Self::DnsResolver => {
                "check this host's DNS resolver (/etc/resolv.conf, the container's DNS)".into()
            }
            Self::NothingListens { server } => {
                format!("nothing listens on {server}: {}", Self::SmtpHost.fix())
            }
            Self::SmtpFirewall { server } => format!(
                "a firewall or proxy drops the connection: allow outbound TCP to {server} from this host"
            ),
            Self::SourceAddress => {
                "check mailRelay.smtp.sourceAddress: it must be an address of this host".into()
            }
            Self::NoGreeting { server } => format!(
                "{server} did not greet as an SMTP server: check {SE}.smtpServer and {SE}.smtpPort"
            ),
            Self::SilentImplicitTls => format!(
                "a port that speaks implicit TLS (usually 465) stays silent until a TLS handshake: use {SE}.smtpEncryption SSL there, or port 587 with TLS"
            ),
            Self::NoStarttls => format!(
                "the server offers no STARTTLS on this port: use {SE}.smtpEncryption SSL for an implicit-TLS port (465), or the STARTTLS port (587)"
            ),
            Self::CertificateName => format!(
                "{SE}.smtpServer must be a name in the server's certificate (connect by name, not by IP address)"
            ),
            Self::PrivateCa => {
                "a certificate from a private CA needs that CA's PEM file in mailRelay.smtp.caFile"
                    .into()
            }
            Self::MaybeExpired => "an expired certificate must be renewed on the server".into(),
            Self::Expired => {
                "the server's certificate has expired: it must be renewed on the server".into()
            }
            Self::NotInCertificate { host, names } => format!(
                "{SE}.smtpServer {host:?} is not a name in the certificate ({names}): set smtpServer to one of them"
            ),
            Self::UntrustedIssuer { issuer } => format!(
                "the certificate's issuer ({issuer}) is not trusted here: put that CA's PEM certificate in mailRelay.smtp.caFile"
            ),
            Self::StarttlsPort => format!(
                "the port may speak STARTTLS rather than implicit TLS (587 does): use {SE}.smtpEncryption TLS there"
            ),
            Self::TlsInspection => "a TLS-inspecting proxy or firewall may break the handshake: let this host reach the server directly".into(),
            Self::NoXoauth2 => format!(
                "Exchange Online offers XOAUTH2 after STARTTLS on smtp.office365.com:587: check {SE}.smtpServer, smtpPort and smtpEncryption TLS"
            ),
            Self::BasicInstead => "a server without OAuth2 support needs smtpAuthentication BASIC (if it offers PLAIN or LOGIN)".into(),
            Self::NoPlainLogin => "Exchange Online offers only LOGIN and XOAUTH2, and only after STARTTLS: use smtpEncryption TLS".into(),
            Self::OAuthInstead => "for Exchange Online, switch to smtpAuthentication MS_OAUTH".into(),
            Self::LacksSendAsApp => {
                "most likely: the token's roles lack SMTP.SendAsApp, so step 3 below is missing"
                    .into()
            }
            Self::TokenRefused => "the server refused the token (Exchange answers 535 5.7.3 without saying why; Dovecot and Gmail answer a 334 challenge and then 535). Check:".into(),
            Self::BasicLogin => format!(
                "check {SE}.smtpUsername and smtpPassword (Exchange Online refuses Basic authentication for most tenants: prefer MS_OAUTH)"
            ),
            Self::SendAsAfterData => {
                "Exchange answers SendAsDenied only after the whole message (after DATA)".into()
            }
            Self::UnknownAadsts => {
                "look the AADSTS code up at https://login.microsoftonline.com/error?code=<number>"
                    .into()
            }
            Self::ManagedIdentityUnreachable { endpoint } => format!(
                "nothing answers at {endpoint}: the managed identity endpoint exists only where the platform runs it (IMDS on Azure VMs, IDENTITY_ENDPOINT on App Service and Container Apps) once the identity is turned on; check {SE}.oAuthManagedIdentity and oAuthTokenEndpoint"
            ),
            Self::TokenEndpointUnreachable => format!(
                "check {SE}.oAuthTokenEndpoint, and that this host can reach login.microsoftonline.com on port 443 (proxy, firewall, DNS)"
            ),
            Self::TokenFirewall => {
                "a firewall may drop the connection: allow outbound HTTPS to login.microsoftonline.com"
                    .into()
            }
            Self::TokenTimeouts => {
                "or raise mailRelay.token.connectTimeoutSeconds / requestTimeoutSeconds".into()
            }
            Self::EntraFailing => "Entra ID is throttling or failing: try again in a few minutes".into(),
            Self::TokenEndpointNotV2 => format!(
                "{SE}.oAuthTokenEndpoint must be Entra ID's v2.0 token URL (https://login.microsoftonline.com/#TenantID#/oauth2/v2.0/token)"
            ),
            Self::CertificatePair => format!(
                "{SE}.oAuthCertificate and oAuthPrivateKey must be the certificate uploaded to the app registration and its RSA key"
            ),
            Self::HttpsTokenEndpoint => format!("use an https URL in {SE}.oAuthTokenEndpoint"),
            Self::StoreUrl => "set mailRelay.store.url to memory, sqlite:/path/to/file.db or postgres://user@host:5432/database".into(),
            Self::StoreSilent => "check that the database runs and that a firewall or NetworkPolicy lets this host reach its port".into(),
            Self::StoreHost => {
                "check the host name in mailRelay.store.url (and this host's DNS)".into()
            }
            Self::StoreReach => "check that the database runs, the port in mailRelay.store.url, and that a firewall or NetworkPolicy lets this host reach it".into(),
            Self::StoreTls => {
                "check sslmode and sslrootcert in mailRelay.store.url against the server's certificate"
                    .into()
            }
            Self::StoreLogin => "check the user in mailRelay.store.url and mailRelay.store.password (or passwordFile)".into(),
            Self::StoreGrant => "grant the relay's database user CREATE on the database (or run the migrations as its owner)".into(),
            Self::SeeCause => "see the cause above".into(),
        }
    }
}
