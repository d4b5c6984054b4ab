//! `featureSwitches.sendEmail.*`: the SMTP server, its login, and the Entra ID credential.

use url::Url;

use crate::message::EmailAddress;

use super::certificate::{Certificate, CertificateCredential, PrivateKey};
use super::read::Ctx;
use super::trust::{is_host_local, is_loopback_host};
use super::validate::{OFFICE365_HOST, TENANT_PLACEHOLDER, se};
use super::{
    AuthMode, ClientCredential, Cloud, Delivery, Encryption, ManagedIdentity, ManagedKind,
    OAuthSettings, SendEmailSettings, SmtpAuthentication,
};

/// `delivery` decides what is required: the server only for SMTP, the login for SMTP and Graph.
pub(super) fn send_email(
    ctx: &mut Ctx<'_>,
    delivery: &Delivery,
    cloud: Cloud,
) -> SendEmailSettings {
    let smtp = delivery.uses_smtp();
    let graph = delivery.uses_graph();
    // With `mailRelay.cloud` set, the cloud's SMTP host is the default server.
    let cloud_set = ctx.text("mailRelay.cloud").is_some();
    let why_smtp = "with mailRelay.delivery.mode smtp or auto (the SMTP server's host name, e.g. smtp.office365.com)";
    let server = if smtp && cloud_set && ctx.text(&se("smtpServer")).is_none() {
        Some(cloud.smtp_host().to_owned())
    } else if smtp {
        ctx.required(&se("smtpServer"), why_smtp)
    } else {
        ctx.text(&se("smtpServer")).map(str::to_owned)
    };
    if let Some(host) = &server
        && (host.contains(|c: char| c.is_whitespace() || c == '/') || host.contains("://"))
    {
        ctx.error(
            &se("smtpServer"),
            format!("{host:?} is not a host name; give the bare host, e.g. smtp.office365.com"),
        );
    }
    let port = ctx.whole(&se("smtpPort"));
    let encryption = ctx.choice(&se("smtpEncryption"), Encryption::CHOICES);
    let mode = ctx.choice(&se("smtpAuthentication"), AuthMode::CHOICES);

    let host = server.clone().unwrap_or_default();
    if encryption == Encryption::Ssl && host.eq_ignore_ascii_case(OFFICE365_HOST) {
        ctx.warnings.push(format!(
            "{}: SSL (implicit TLS) with {OFFICE365_HOST}, which offers none: connections will fail; use TLS (STARTTLS) with smtpPort 587",
            se("smtpEncryption")
        ));
    } else if encryption == Encryption::Ssl && port == 587 {
        ctx.warnings.push(format!(
            "{}: SSL (implicit TLS) on port 587, which usually speaks STARTTLS; use TLS, or port 465 for SSL",
            se("smtpEncryption")
        ));
    } else if encryption == Encryption::Tls && port == 465 {
        ctx.warnings.push(format!(
            "{}: TLS (STARTTLS) on port 465, which usually speaks implicit TLS; use SSL, or port 587 for TLS",
            se("smtpEncryption")
        ));
    }
    if encryption == Encryption::None
        && mode != AuthMode::None
        && server.is_some()
        && !is_loopback_host(&host)
    {
        ctx.error(
            &se("smtpEncryption"),
            format!(
                "NONE would send the mail credentials in clear to {host:?}; NONE is allowed with BASIC or MS_OAUTH only when smtpServer is loopback (localhost, 127.0.0.0/8, ::1); use TLS (STARTTLS, port 587) or SSL (port 465)"
            ),
        );
    }

    if graph && mode != AuthMode::MsOAuth {
        ctx.error(
            &se("smtpAuthentication"),
            "must be MS_OAUTH with mailRelay.delivery.mode graph or auto: Microsoft Graph takes only OAuth2 app-only tokens (the app registration's oAuthClientId, oAuthTenantId and secret or certificate)",
        );
    }
    let authentication = match mode {
        AuthMode::None => Some(SmtpAuthentication::None),
        AuthMode::Basic => basic(ctx, smtp),
        AuthMode::MsOAuth => ms_oauth(ctx, smtp || graph, cloud),
    };
    SendEmailSettings {
        smtp_server: server.unwrap_or_default(),
        smtp_port: port,
        smtp_encryption: encryption,
        // In outbox mode incomplete credentials are never used.
        smtp_authentication: authentication.unwrap_or(SmtpAuthentication::None),
    }
}

fn basic(ctx: &mut Ctx<'_>, smtp: bool) -> Option<SmtpAuthentication> {
    let why = "with smtpAuthentication BASIC";
    let (username, password) = if smtp {
        let username = ctx.required(&se("smtpUsername"), why);
        let password = ctx.secret(&se("smtpPassword"));
        if password.is_none() {
            ctx.error(
                &se("smtpPassword"),
                format!("is required {why} (or smtpPasswordFile naming a file that holds it)"),
            );
        }
        (username, password)
    } else {
        (
            ctx.text(&se("smtpUsername")).map(str::to_owned),
            ctx.secret(&se("smtpPassword")),
        )
    };
    Some(SmtpAuthentication::Basic {
        username: username?,
        password: password?,
    })
}

fn ms_oauth(ctx: &mut Ctx<'_>, smtp: bool, cloud: Cloud) -> Option<SmtpAuthentication> {
    let why = "with smtpAuthentication MS_OAUTH";
    let managed = managed_identity(ctx);
    // A managed identity needs neither: its tenant is its own, and the client id names a
    // user-assigned identity only.
    let app = smtp && managed.is_none();
    let get = |ctx: &mut Ctx<'_>, name: &str, what: &str, required: bool| {
        if required {
            ctx.required(&se(name), &format!("{why} ({what})"))
        } else {
            ctx.text(&se(name)).map(str::to_owned)
        }
    };
    let username = get(
        ctx,
        "smtpUsername",
        "the mailbox the relay logs in as, e.g. relay@contoso.com",
        smtp,
    );
    let tenant_id = get(
        ctx,
        "oAuthTenantId",
        "the Directory (tenant) ID of the app registration",
        app,
    );
    let client_id = get(
        ctx,
        "oAuthClientId",
        "the Application (client) ID of the app registration",
        app,
    );
    let username = username.and_then(|user| match EmailAddress::parse(&user) {
        Ok(address) => Some(address),
        Err(_) => {
            ctx.error(
                &se("smtpUsername"),
                format!("{user:?} is not an e-mail address; MS_OAUTH logs in as a mailbox, e.g. relay@contoso.com"),
            );
            None
        }
    });
    if let Some(tenant) = &tenant_id
        && !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        ctx.error(
            &se("oAuthTenantId"),
            format!("{tenant:?} is not a tenant id; use the Directory (tenant) ID (a GUID) or the tenant's domain, e.g. contoso.onmicrosoft.com"),
        );
    }
    let scopes = ctx
        .text(&se("oAuthScopes"))
        .unwrap_or(cloud.smtp_scope())
        .to_owned();
    let (credential, token_endpoint) = match managed {
        Some(kind) => {
            if scopes.split_whitespace().count() != 1 {
                ctx.error(
                    &se("oAuthScopes"),
                    format!("{scopes:?}: a managed identity is issued a token for one resource; give one scope, e.g. {}", cloud.smtp_scope()),
                );
            }
            if smtp {
                ctx.warnings.push(format!(
                    "{}: Exchange documents only client secrets and certificates for SMTP.SendAsApp; a managed identity is documented for Microsoft Graph's Mail.Send (mailRelay.delivery.mode: graph)",
                    se("oAuthManagedIdentity")
                ));
            }
            managed_credential(ctx, kind)
        }
        None => (
            credential(ctx, smtp),
            token_endpoint(ctx, cloud, tenant_id.as_deref()),
        ),
    };
    let grace = ctx.seconds(&se("oAuthTokenGraceTimeInSeconds"));
    let connect_timeout = ctx.seconds("mailRelay.token.connectTimeoutSeconds");
    let request_timeout = ctx.seconds("mailRelay.token.requestTimeoutSeconds");
    let (tenant_id, client_id) = match managed {
        Some(_) => (
            Some(tenant_id.unwrap_or_default()),
            Some(client_id.unwrap_or_default()),
        ),
        None => (tenant_id, client_id),
    };
    Some(SmtpAuthentication::MsOAuth {
        username: username?,
        oauth: OAuthSettings {
            tenant_id: tenant_id?,
            client_id: client_id?,
            credential: credential?,
            token_endpoint: token_endpoint?,
            scopes,
            grace,
            connect_timeout,
            request_timeout,
        },
    })
}

/// `oAuthTokenEndpoint` for an app registration: Entra ID's, `#TenantID#` replaced.
fn token_endpoint(ctx: &mut Ctx<'_>, cloud: Cloud, tenant_id: Option<&str>) -> Option<Url> {
    let endpoint_key = se("oAuthTokenEndpoint");
    let template = ctx
        .text(&endpoint_key)
        .map_or_else(|| cloud.token_endpoint(), str::to_owned);
    // Without a tenant id (already reported) the template itself is checked, so that every
    // error comes at once.
    let text = match tenant_id {
        Some(tenant) => template.replace(TENANT_PLACEHOLDER, tenant),
        None => template.clone(),
    };
    https_url(
        ctx,
        &endpoint_key,
        &text,
        "the client secret travels over it",
    )
    .filter(|_| tenant_id.is_some() || !template.contains(TENANT_PLACEHOLDER))
}

/// Azure's Instance Metadata Service, the same address on every Azure VM.
pub const IMDS_TOKEN_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

fn managed_identity(ctx: &mut Ctx<'_>) -> Option<ManagedKind> {
    let key = se("oAuthManagedIdentity");
    ctx.text(&key)?;
    Some(ctx.choice_or(&key, ManagedKind::Imds, ManagedKind::CHOICES))
}

/// The managed identity and its endpoint: `oAuthTokenEndpoint` when set, else the platform's.
fn managed_credential(
    ctx: &mut Ctx<'_>,
    kind: ManagedKind,
) -> (Option<ClientCredential>, Option<Url>) {
    let key = se("oAuthManagedIdentity");
    let others: Vec<String> = [
        "oAuthClientSecret",
        "oAuthCertificate",
        "oAuthFederatedTokenFile",
    ]
    .into_iter()
    .filter(|name| ctx.text(&se(name)).is_some())
    .map(str::to_owned)
    .collect();
    if !others.is_empty() {
        ctx.error(
            &key,
            format!(
                "a managed identity takes no credential of the relay's, but {} is set too: remove it, or remove oAuthManagedIdentity",
                others.join(" and ")
            ),
        );
    }
    let endpoint_key = se("oAuthTokenEndpoint");
    let (credential, default) = match kind {
        ManagedKind::Imds => (
            Some(ManagedIdentity::Imds),
            Some(IMDS_TOKEN_ENDPOINT.to_owned()),
        ),
        ManagedKind::AppService => {
            let header = ctx.values.identity_header.clone();
            if header.is_none() {
                ctx.error(
                    "IDENTITY_HEADER",
                    "is not set: with oAuthManagedIdentity appService the platform's identity endpoint answers only requests carrying it (App Service, Functions and Container Apps set it once the identity is turned on)",
                );
            }
            (
                header.map(|identity_header| ManagedIdentity::AppService { identity_header }),
                ctx.values.identity_endpoint.clone(),
            )
        }
    };
    let text = match ctx.text(&endpoint_key).map(str::to_owned).or(default) {
        Some(text) => text,
        None => {
            ctx.error(
                &endpoint_key,
                "is required with oAuthManagedIdentity appService when IDENTITY_ENDPOINT is not set (App Service, Functions and Container Apps set it once the identity is turned on)",
            );
            return (None, None);
        }
    };
    let endpoint = match Url::parse(&text) {
        Err(e) => {
            ctx.error(&endpoint_key, format!("{text:?} is not a URL ({e})"));
            None
        }
        Ok(url)
            if url.scheme() == "https"
                || (url.scheme() == "http" && url.host_str().is_some_and(is_host_local)) =>
        {
            Some(url)
        }
        Ok(_) => {
            ctx.error(
                &endpoint_key,
                format!("{text:?} must be an https URL, or http on this host or its link-local network, where the platform's identity endpoint listens"),
            );
            None
        }
    };
    (credential.map(ClientCredential::ManagedIdentity), endpoint)
}

/// An https URL (http only on a loopback host, for tests and local fakes); `why` says what
/// travels over it.
pub(super) fn https_url(ctx: &mut Ctx<'_>, key: &str, text: &str, why: &str) -> Option<Url> {
    match Url::parse(text) {
        Err(e) => {
            ctx.error(key, format!("{text:?} is not a URL ({e})"));
            None
        }
        Ok(url) => {
            let loopback = url.host_str().is_some_and(is_loopback_host);
            match url.scheme() {
                "https" => Some(url),
                "http" if loopback => Some(url),
                _ => {
                    ctx.error(
                        key,
                        format!(
                            "{text:?} must be an https URL (http only on a loopback host): {why}"
                        ),
                    );
                    None
                }
            }
        }
    }
}

fn credential(ctx: &mut Ctx<'_>, smtp: bool) -> Option<ClientCredential> {
    let secret_key = se("oAuthClientSecret");
    let cert_key = se("oAuthCertificate");
    let pkey_key = se("oAuthPrivateKey");
    let secret = ctx.secret(&secret_key);
    let certificate = ctx.text(&cert_key).map(str::to_owned);
    let private_key = ctx.secret(&pkey_key);
    let federated_key = se("oAuthFederatedTokenFile");
    let federated = ctx.text(&federated_key).map(str::to_owned);
    if let Some(path) = federated {
        if secret.is_some() || certificate.is_some() {
            ctx.error(
                &federated_key,
                "MS_OAUTH takes exactly one of oAuthClientSecret, oAuthCertificate and oAuthFederatedTokenFile; more than one is set: remove the others",
            );
            return None;
        }
        return federated_file(ctx, &federated_key, path);
    }
    // Azure Workload Identity names the pod's token file in this variable.
    if secret.is_none()
        && certificate.is_none()
        && let Some(path) = ctx.values.azure_federated_token_file.clone()
    {
        return federated_file(ctx, "AZURE_FEDERATED_TOKEN_FILE", path);
    }
    match (secret, certificate, private_key) {
        (Some(_), Some(_), _) => {
            ctx.error(
                &secret_key,
                "MS_OAUTH takes exactly one of oAuthClientSecret and oAuthCertificate (with oAuthPrivateKey); both are set: remove one",
            );
            None
        }
        (Some(_), None, Some(_)) => {
            ctx.error(
                &pkey_key,
                "is set but oAuthCertificate is not: the private key belongs to a certificate; MS_OAUTH takes exactly one of oAuthClientSecret and oAuthCertificate",
            );
            None
        }
        (Some(secret), None, None) => Some(ClientCredential::Secret(secret)),
        (None, Some(certificate), private_key) => {
            let certificate = Certificate::from_pem(&certificate);
            if certificate.is_err() {
                ctx.error(
                    &cert_key,
                    "is not a PEM certificate (-----BEGIN CERTIFICATE-----); give the certificate uploaded to the app registration",
                );
            }
            let Some(private_key) = private_key else {
                ctx.error(
                    &pkey_key,
                    "is required with oAuthCertificate (the PEM private key of that certificate; or oAuthPrivateKeyFile naming a file)",
                );
                return None;
            };
            let key = PrivateKey::from_pem(&private_key);
            if key.is_err() {
                ctx.error(
                    &pkey_key,
                    "**** is not a PEM RSA private key (-----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)",
                );
            }
            let (Ok(certificate), Ok(key)) = (certificate, key) else {
                return None;
            };
            // A key from another certificate is a settings error here, not Entra's
            // AADSTS700027 on the first mail.
            match CertificateCredential::pair(certificate, key) {
                Ok(credential) => Some(ClientCredential::Certificate(credential)),
                Err(e) => {
                    ctx.error(
                        &pkey_key,
                        format!("the client certificate cannot be used: {e}"),
                    );
                    None
                }
            }
        }
        (None, None, _) => {
            if smtp {
                ctx.error(
                    &secret_key,
                    "MS_OAUTH takes exactly one of oAuthClientSecret, oAuthCertificate (with oAuthPrivateKey) and oAuthFederatedTokenFile (or AZURE_FEDERATED_TOKEN_FILE in the environment, as Azure Workload Identity sets it), or oAuthManagedIdentity; none is set",
                );
            }
            None
        }
    }
}

/// A federated token file: it must exist and be readable now; it is read again for every token
/// request, because Kubernetes rotates it.
fn federated_file(ctx: &mut Ctx<'_>, key: &str, path: String) -> Option<ClientCredential> {
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            Some(ClientCredential::FederatedTokenFile(path.into()))
        }
        Ok(_) => {
            ctx.error(key, format!("{path:?} is empty: it must hold the federated token (a JWT) Kubernetes or the identity provider writes there"));
            None
        }
        Err(e) => {
            ctx.error(key, format!("{path:?} cannot be read ({e}): give the file the federated token is mounted at (Azure Workload Identity: /var/run/secrets/azure/tokens/azure-identity-token)"));
            None
        }
    }
}
