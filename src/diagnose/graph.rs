//! `diagnose` with `mailRelay.delivery.mode: graph`: the token for Graph's scope and its roles,
//! then (when asked) a test mail through Graph's `sendMail`. No SMTP step applies. With `auto`
//! the same checks follow the SMTP steps, since Graph stands in when SMTP AUTH is refused.

use std::sync::Arc;

use super::SendTest;
use super::report::Step;
use super::smtp::test_mail;
use super::token::fetch_token;
use crate::config::{OAuthSettings, Settings, SmtpAuthentication};
use crate::graph::GraphSender;
use crate::remedy::{Cause, Facts};
use crate::token::TokenClaims;
use crate::token::{AccessToken, TokenError, TokenProvider, TokenState};

pub(super) async fn run(
    settings: &Settings,
    send_test: Option<&SendTest>,
    emit: &mut dyn FnMut(Step),
) {
    let why =
        "mailRelay.delivery.mode is graph: mail goes to Microsoft Graph, not to an SMTP server";
    for name in ["connect", "tls", "ehlo", "auth"] {
        emit(Step::skip(name, why));
    }
    let Some(token) = checks(settings, "token", emit).await else {
        return emit(Step::skip("send-test", "no access token (see above)"));
    };
    match send_test {
        Some(test) => send(settings, token, test, emit).await,
        None => emit(Step::skip(
            "send-test",
            "not asked for (add --send-test --from ADDRESS --to ADDRESS to send a real mail)",
        )),
    }
}

/// The token for Graph's scope (the step named `token_step`) and its roles; the token when
/// one came.
pub(super) async fn checks(
    settings: &Settings,
    token_step: &'static str,
    emit: &mut dyn FnMut(Step),
) -> Option<AccessToken> {
    let SmtpAuthentication::MsOAuth { username, oauth } = &settings.send_email.smtp_authentication
    else {
        // Refused by the settings check already.
        return None;
    };
    let oauth = graph_oauth(settings, oauth);
    match fetch_token(&oauth).await {
        Ok((token, claims, mut step)) => {
            step.name = token_step;
            emit(step);
            emit(roles(&claims, username.as_str(), &oauth.client_id));
            emit(
                mailbox(
                    settings,
                    &token,
                    &claims,
                    username.as_str(),
                    &oauth.client_id,
                )
                .await,
            );
            Some(token)
        }
        Err(mut step) => {
            step.name = token_step;
            emit(step);
            emit(Step::skip("graph-roles", "no access token (see above)"));
            emit(Step::skip("graph-mailbox", "no access token (see above)"));
            None
        }
    }
}

fn graph_oauth(settings: &Settings, oauth: &OAuthSettings) -> OAuthSettings {
    OAuthSettings {
        scopes: settings.relay.graph.scopes.clone(),
        ..oauth.clone()
    }
}

/// A test mail through Graph's `sendMail`, with the token [`checks`] got.
pub(super) async fn send(
    settings: &Settings,
    token: AccessToken,
    test: &SendTest,
    emit: &mut dyn FnMut(Step),
) {
    let SmtpAuthentication::MsOAuth { username, oauth } = &settings.send_email.smtp_authentication
    else {
        return;
    };
    let base = settings.relay.graph.base_url.as_str();
    let mail = match test_mail(settings, test, &format!("Microsoft Graph ({base})")) {
        Ok(mail) => mail,
        Err(step) => return emit(step),
    };
    let sender = match GraphSender::new(settings, Arc::new(Fixed(token))) {
        Ok(sender) => sender,
        Err(e) => {
            return emit(Step::fail(
                "send-test",
                "the Graph client could not be built",
                e,
                vec![],
            ));
        }
    };
    emit(match sender.send(&mail).await {
        Ok(receipt) => Step::pass(
            "send-test",
            format!(
                "Microsoft Graph took the test mail from {} to {}: {} (Message-ID {})",
                test.from, test.to, receipt.reply, mail.message_id
            ),
        ),
        Err(error) => {
            let facts = Facts {
                mailbox: Some(username.as_str()),
                client_id: Some(&oauth.client_id),
                from: Some(&test.from),
            };
            let fixes = error
                .cause()
                .map(|c| c.fix_with(&facts))
                .into_iter()
                .collect();
            Step::fail(
                "send-test",
                "Microsoft Graph did not take the test mail",
                error.to_string(),
                fixes,
            )
        }
    });
}

/// `Mail.Send` is what `sendMail` needs (application permission, admin consent).
fn roles(claims: &TokenClaims, mailbox: &str, client: &str) -> Step {
    let has = |role: &str| claims.roles.iter().any(|r| r == role);
    if !claims.readable {
        return Step::pass("graph-roles", "the token's roles could not be read");
    }
    if has("Mail.Send") {
        let large = if has("Mail.ReadWrite") {
            "and Mail.ReadWrite: mails over Graph's 4 MB request limit go as drafts with upload sessions"
        } else {
            "but not Mail.ReadWrite: mails over Graph's 4 MB request limit will be refused with 403 ErrorAccessDenied until it is granted (with admin consent)"
        };
        let lost = if has("Mail.Read") || has("Mail.ReadWrite") {
            "a send whose answer is lost is looked up in Sent Items before it is sent again"
        } else {
            "without Mail.Read a send whose answer is lost stays outcome_unknown and is never sent again (grant Mail.Read to settle it in Sent Items)"
        };
        return Step::pass(
            "graph-roles",
            format!("the token's roles list Mail.Send, {large}; {lost}"),
        );
    }
    let facts = Facts {
        mailbox: Some(mailbox),
        client_id: Some(client),
        from: None,
    };
    Step::fail(
        "graph-roles",
        "the token has no Mail.Send role: Graph will answer 403 ErrorAccessDenied",
        format!(
            "roles: {}",
            if claims.roles.is_empty() {
                "(none)".to_owned()
            } else {
                claims.roles.join(" ")
            }
        ),
        vec![Cause::GraphAccessDenied.fix_with(&facts)],
    )
}

/// The mailbox as Graph sees it, read without sending (Sent Items, with `Mail.Read`).
async fn mailbox(
    settings: &Settings,
    token: &AccessToken,
    claims: &TokenClaims,
    mailbox: &str,
    client: &str,
) -> Step {
    if !(claims.has("Mail.Read") || claims.has("Mail.ReadWrite")) {
        return Step::skip(
            "graph-mailbox",
            "looking at the mailbox without sending needs Mail.Read (or Mail.ReadWrite); --send-test checks it by sending",
        );
    }
    let sender = match GraphSender::new(settings, Arc::new(Fixed(token.clone()))) {
        Ok(sender) => sender,
        Err(e) => {
            return Step::fail(
                "graph-mailbox",
                "the Graph client could not be built",
                e,
                vec![],
            );
        }
    };
    match sender.reach_mailbox().await {
        Ok(()) => Step::pass(
            "graph-mailbox",
            format!(
                "Graph reads {mailbox}'s Sent Items: an Exchange Online mailbox within the app's scope"
            ),
        ),
        Err(error) => {
            let facts = Facts {
                mailbox: Some(mailbox),
                client_id: Some(client),
                from: None,
            };
            Step::fail(
                "graph-mailbox",
                format!("Graph does not reach the mailbox {mailbox}"),
                error.to_string(),
                error
                    .cause()
                    .map(|c| c.fix_with(&facts))
                    .into_iter()
                    .collect(),
            )
        }
    }
}

/// The one token diagnose fetched, for the test send.
struct Fixed(AccessToken);

#[async_trait::async_trait]
impl TokenProvider for Fixed {
    async fn token(&self) -> Result<AccessToken, TokenError> {
        Ok(self.0.clone())
    }
    fn invalidate(&self, _: &AccessToken) {}
    fn state(&self) -> TokenState {
        TokenState::default()
    }
}
