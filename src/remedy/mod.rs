//! Every cause the relay can name, and its fix: one catalogue for the API's answers, `diagnose`,
//! the administrative notices and the logs. A fix is written once here, with the relay's own
//! values filled in where the caller knows them ([`Facts`]), and placeholders where it does not.
//!
//! The texts follow `../shared/EXCHANGE.md` (Exchange Online's replies and Entra ID's codes).

pub mod setup;

pub use setup::Setup;

/// A cause with a known fix, whatever transport or component met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The From mailbox has not granted Send As to the sending mailbox.
    SendAsDenied,
    /// Authenticated SMTP is off for the mailbox or the tenant.
    SmtpAuthDisabled,
    /// The tenant refuses Basic authentication.
    BasicAuthRefused,
    /// The server refused the login (for XOAUTH2: a fresh token too).
    LoginRefused,
    /// More connections to the mailbox than Exchange allows.
    ThreadLimit,
    /// The mailbox's daily recipient quota is used up.
    QuotaExceeded,
    /// The sending mailbox (its Sent Items) is full.
    MailboxFull,
    /// The message is larger than the server accepts.
    TooLarge,
    /// The server's certificate was not accepted.
    Certificate,
    /// Graph refused the app for the mailbox: no `Mail.Send`, or a scope that leaves it out.
    GraphAccessDenied,
    /// Graph cannot send from the mailbox: not an Exchange Online mailbox, or no such user.
    GraphMailboxUnusable,
}

/// What the caller knows of the set-up, filled into the fix texts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    /// The sending mailbox (`smtpUsername`).
    pub mailbox: Option<&'a str>,
    /// The app registration's client id.
    pub client_id: Option<&'a str>,
    /// The From address of the mail at hand.
    pub from: Option<&'a str>,
}

/// The settings prefix of the sending identity.
const SE: &str = "featureSwitches.sendEmail";

impl Cause {
    /// The fix, with placeholders for what the caller does not know.
    pub fn fix(self) -> String {
        self.fix_with(&Facts::default())
    }

    /// The fix, with the set-up's values filled in.
    pub fn fix_with(self, facts: &Facts<'_>) -> String {
        let mailbox = facts.mailbox.unwrap_or("<smtpUsername>");
        let client = facts.client_id.unwrap_or("<client id>");
        let from = facts.from.unwrap_or("<from>");
        match self {
            Self::SendAsDenied => format!(
                "grant \"Send as\" on the From mailbox {from} to the sending mailbox {mailbox}: \
                 M365 admin center > Active users > {from} > Mail > Send as permissions, or \
                 Add-RecipientPermission -Identity {from} -Trustee {mailbox} -AccessRights SendAs; \
                 the grant can take up to an hour to apply"
            ),
            Self::SmtpAuthDisabled => format!(
                "enable Authenticated SMTP for {mailbox} (M365 admin center > Active \
                 users > {mailbox} > Mail > Manage email apps, or Set-CASMailbox -Identity {mailbox} \
                 -SmtpClientAuthenticationDisabled $false); if it is off for the whole tenant: \
                 Set-TransportConfig -SmtpClientAuthenticationDisabled $false; security defaults \
                 or Conditional Access can also block SMTP AUTH"
            ),
            Self::BasicAuthRefused => format!(
                "the tenant refuses Basic authentication: set {SE}.smtpAuthentication to MS_OAUTH \
                 and register an app (README: Access tokens)"
            ),
            Self::LoginRefused => format!(
                "the server refused the login. For MS_OAUTH (a fresh token was refused too): check \
                 that the app registration {client} has the application permission Office 365 \
                 Exchange Online > SMTP.SendAsApp with admin consent; that New-ServicePrincipal \
                 -AppId {client} -ObjectId <Enterprise application object id> was run; that \
                 Add-MailboxPermission -Identity {mailbox} -User <that object id> -AccessRights \
                 FullAccess was granted; and that smtpUsername is that mailbox. For BASIC: check \
                 smtpUsername and smtpPassword"
            ),
            Self::ThreadLimit => format!(
                "more than 3 connections to the mailbox {mailbox} at once: lower \
                 mailRelay.smtp.maxConnections or stop other clients that use the same mailbox"
            ),
            Self::QuotaExceeded => format!(
                "the mailbox {mailbox}'s daily recipient quota (10,000 a day in Exchange Online) is \
                 used up: wait a day or spread the load over more mailboxes"
            ),
            Self::MailboxFull => format!(
                "the sending mailbox {mailbox} (its Sent Items folder) is full: empty it or raise \
                 its quota"
            ),
            Self::TooLarge => {
                "the message is larger than the server accepts (Exchange Online: 35 MB \
                 by default, base64 adds about 33%): send less, or raise the limit"
                    .to_owned()
            }
            Self::Certificate => {
                "the server's certificate was not accepted: smtpServer must match \
                 a name in the certificate, and a private CA must be given in mailRelay.smtp.caFile"
                    .to_owned()
            }
            Self::GraphAccessDenied => format!(
                "Microsoft Graph refused the app {client} for the mailbox {mailbox}: grant the \
                 application permission Microsoft Graph > Mail.Send with admin consent (the \
                 token's roles then list Mail.Send), and if Mail.Send is scoped with RBAC for \
                 Applications (New-ManagementRoleAssignment -App {client} -Role \"Application \
                 Mail.Send\" -CustomResourceScope <scope>) or an application access policy, make \
                 sure the scope includes {mailbox}; changes can take an hour to apply"
            ),
            Self::GraphMailboxUnusable => format!(
                "Microsoft Graph cannot send from {mailbox}: {SE}.smtpUsername must be the address \
                 of an existing, licensed Exchange Online mailbox (not an on-premises, inactive or \
                 soft-deleted one)"
            ),
        }
    }
}

/// EXCHANGE.md section 1, the app-only SMTP set-up, as numbered steps with the relay's values.
pub fn ms_oauth_checklist(mailbox: &str, client: &str, tenant: &str) -> Vec<String> {
    vec![
        format!(
            "1. Authenticated SMTP is on for the mailbox {mailbox}: M365 admin center > Active users > {mailbox} > Mail > Manage email apps, or Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false (security defaults or Conditional Access can still block it)"
        ),
        format!(
            "2. the token came from the right app: {SE}.oAuthClientId {client} in tenant {tenant} (the secret or certificate is right, or no token would have been issued)"
        ),
        format!(
            "3. app registration {client} > API permissions: Office 365 Exchange Online > Application permissions > SMTP.SendAsApp, with admin consent granted (the token's roles then list SMTP.SendAsApp)"
        ),
        format!(
            "4. Exchange Online PowerShell: New-ServicePrincipal -AppId {client} -ObjectId <Object ID of the Enterprise application, not of the app registration>"
        ),
        format!(
            "5. Add-MailboxPermission -Identity {mailbox} -User <that Object ID> -AccessRights FullAccess, and {SE}.smtpUsername is that very mailbox"
        ),
        format!(
            "6. the token is for Exchange: {SE}.oAuthScopes https://outlook.office365.com/.default (audience https://outlook.office365.com)"
        ),
    ]
}

/// One row of EXCHANGE.md's table: an Entra code the relay explains.
#[derive(Debug, PartialEq, Eq)]
pub struct KnownCode {
    pub number: u64,
    /// Stable short name (see [`crate::token::TokenError::code`]).
    pub code: &'static str,
    pub meaning: &'static str,
    pub fix: &'static str,
}

/// The Entra ID codes an operator meets when setting the relay up.
pub const KNOWN_ENTRA_CODES: &[KnownCode] = &[
    KnownCode {
        number: 7000215,
        code: "token_invalid_client_secret",
        meaning: "the client secret is wrong",
        fix: "set oAuthClientSecret to the secret's value, not its ID (the value is shown only once, when the secret is created)",
    },
    KnownCode {
        number: 7000222,
        code: "token_client_secret_expired",
        meaning: "the client secret has expired",
        fix: "create a new client secret in the app registration (Certificates & secrets) and set oAuthClientSecret to its value",
    },
    KnownCode {
        number: 700016,
        code: "token_application_not_found",
        meaning: "no application with this client id exists in the tenant",
        fix: "check oAuthClientId (the app registration's Application (client) ID) and oAuthTenantId",
    },
    KnownCode {
        number: 90002,
        code: "token_tenant_not_found",
        meaning: "the tenant does not exist",
        fix: "check oAuthTenantId (the Directory (tenant) ID or a verified domain of the tenant)",
    },
    KnownCode {
        number: 70011,
        code: "token_invalid_scope",
        meaning: "the scope is not valid",
        fix: "set oAuthScopes to https://outlook.office365.com/.default for SMTP, and mailRelay.graph.scopes to https://graph.microsoft.com/.default for Graph (a national cloud's hosts there: see mailRelay.cloud)",
    },
    KnownCode {
        number: 700027,
        code: "token_invalid_client_assertion",
        meaning: "the client assertion's signature is not valid",
        fix: "the certificate uploaded to the app registration does not match the relay's private key; upload the certificate that belongs to the configured key",
    },
    KnownCode {
        number: 7000112,
        code: "token_application_disabled",
        meaning: "the application is disabled",
        fix: "enable the Enterprise application (Properties > Enabled for users to sign in) or ask the tenant administrator",
    },
    KnownCode {
        number: 500011,
        code: "token_resource_principal_not_found",
        meaning: "the resource asked for (Office 365 Exchange Online for SMTP, Microsoft Graph for Graph) is not present in the tenant (resource principal not found)",
        fix: "check oAuthScopes (SMTP) and mailRelay.graph.scopes (Graph), and that the tenant has Exchange Online and admin consent was granted for SMTP.SendAsApp or Mail.Send",
    },
    KnownCode {
        number: 53003,
        code: "token_blocked_by_conditional_access",
        meaning: "a Conditional Access policy blocked the request",
        fix: "ask the tenant administrator to exclude this application (or this host's address) from the policy",
    },
    KnownCode {
        number: 900144,
        code: "token_request_missing_parameter",
        meaning: "the token request is missing a parameter",
        fix: "this is a bug in mail-relay; please report it with the trace and correlation ids",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_fill_the_placeholders() {
        let generic = Cause::SendAsDenied.fix();
        assert!(
            generic.contains("-Identity <from> -Trustee <smtpUsername>"),
            "{generic}"
        );
        let filled = Cause::SendAsDenied.fix_with(&Facts {
            mailbox: Some("relay@contoso.com"),
            from: Some("ceo@contoso.com"),
            client_id: None,
        });
        assert!(
            filled.contains("-Identity ceo@contoso.com -Trustee relay@contoso.com"),
            "{filled}"
        );
    }

    #[test]
    fn the_tenant_wide_switch_is_named_where_smtp_auth_is_off() {
        let fix = Cause::SmtpAuthDisabled.fix();
        assert!(fix.contains("Set-CASMailbox"), "{fix}");
        assert!(
            fix.contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false"),
            "{fix}"
        );
    }
}
