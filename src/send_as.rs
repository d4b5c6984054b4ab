//! May this caller send as that From address? Decided before any SMTP traffic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::caller::Caller;
use crate::clock::{Clock, Millis, SystemClock, duration_ms};
use crate::config::{AddressPattern, Delegate, SendAsSettings};
use crate::message::EmailAddress;

/// Where Exchange's recent SendAsDenied answers are remembered: this process, or the store that
/// replicas share, so that one replica's denial spares the others the upload.
#[async_trait]
pub trait DenialMemory: Send + Sync + 'static {
    /// Exchange refused `address` (lower case) at `at`.
    async fn remember(&self, address: &str, at: Millis) -> Result<(), String>;
    /// Whether Exchange refused `address` at `since` or later.
    async fn denied_since(&self, address: &str, since: Millis) -> Result<bool, String>;
}

/// The denials in this process's memory (one replica).
#[derive(Debug, Default)]
pub struct InMemoryDenials {
    denials: Mutex<HashMap<String, Millis>>,
}

impl InMemoryDenials {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Millis>> {
        self.denials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl DenialMemory for InMemoryDenials {
    async fn remember(&self, address: &str, at: Millis) -> Result<(), String> {
        self.lock().insert(address.to_owned(), at);
        Ok(())
    }

    async fn denied_since(&self, address: &str, since: Millis) -> Result<bool, String> {
        let mut denials = self.lock();
        denials.retain(|_, at| *at >= since);
        Ok(denials.contains_key(address))
    }
}

/// Why a From address is refused. `Display` is the `detail` the caller sees: it names the caller, the
/// address and what an administrator must change.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SendAsRefusal {
    #[error(
        "{caller} may not send as {address}; it may send as: {allowed}. An administrator can add the address \
         to this key's allowedFrom in mailRelay.auth.apiKeys"
    )]
    NotListedForKey {
        caller: String,
        address: String,
        allowed: String,
    },
    #[error(
        "{caller} may send as their own address and as the mailboxes that list them as delegates, not as \
         {address}. An administrator can list the user under mailRelay.sendAs.delegates for {address}"
    )]
    NotADelegate { caller: String, address: String },
    #[error(
        "{caller} may not send as {address}: {address} has not granted Send As to {smtp_user} in Exchange \
         Online (it is not in mailRelay.sendAs.exchangeGrants). An Exchange administrator must grant it \
         (Add-RecipientPermission {address} -Trustee {smtp_user} -AccessRights SendAs) and then add it to \
         exchangeGrants"
    )]
    NoExchangeGrant {
        caller: String,
        address: String,
        smtp_user: String,
    },
    #[error(
        "{caller} may not send as {address}: Exchange Online refused to let {smtp_user} send as {address} \
         (its reply: {reply}). An Exchange administrator must grant Send As on {address} to {smtp_user}: \
         M365 admin center > Active users > {address} > Mail > Send as permissions, or \
         Add-RecipientPermission {address} -Trustee {smtp_user} -AccessRights SendAs"
    )]
    DeniedByExchange {
        caller: String,
        address: String,
        smtp_user: String,
        reply: String,
    },
    #[error(
        "{caller} may not send as {address}: Exchange Online refused to let {smtp_user} send as {address} \
         moments ago (SendAsDenied). An Exchange administrator must grant Send As on {address} to \
         {smtp_user} (Add-RecipientPermission {address} -Trustee {smtp_user} -AccessRights SendAs); the \
         relay retries after a short pause"
    )]
    RecentlyDeniedByExchange {
        caller: String,
        address: String,
        smtp_user: String,
    },
    /// The shared denial memory could not be asked (503 `store_unavailable`).
    #[error("the store is unavailable: {0}")]
    StoreUnavailable(String),
}

/// The send-as rules from settings, plus a short memory of Exchange's own refusals.
pub struct SendAsPolicy {
    settings: SendAsSettings,
    /// The mailbox the relay logs in to SMTP as (`smtpUsername`), for messages.
    smtp_user: String,
    /// From addresses (lower case) Exchange refused lately.
    denials: Arc<dyn DenialMemory>,
    clock: Arc<dyn Clock>,
}

impl SendAsPolicy {
    /// The rules, with the denials remembered in this process.
    pub fn new(settings: SendAsSettings, smtp_user: Option<&str>) -> Self {
        Self::with_memory(settings, smtp_user, Arc::new(InMemoryDenials::default()))
    }

    /// The rules, with the denials remembered in `denials` (the store).
    pub fn with_memory(
        settings: SendAsSettings,
        smtp_user: Option<&str>,
        denials: Arc<dyn DenialMemory>,
    ) -> Self {
        Self {
            settings,
            smtp_user: smtp_user
                .unwrap_or("the relay's SMTP mailbox (smtpUsername)")
                .to_string(),
            denials,
            clock: Arc::new(SystemClock),
        }
    }

    /// Check `from` for `caller`.
    pub async fn check(&self, caller: &Caller, from: &EmailAddress) -> Result<(), SendAsRefusal> {
        let from = from.as_str().to_ascii_lowercase();
        self.caller_may_use(caller, &from)?;
        if let Some(grants) = &self.settings.exchange_grants
            && !grants.iter().any(|g| g.matches(&from))
        {
            return Err(SendAsRefusal::NoExchangeGrant {
                caller: caller.to_string(),
                address: from,
                smtp_user: self.smtp_user.clone(),
            });
        }
        if self.recently_denied(&from).await? {
            return Err(SendAsRefusal::RecentlyDeniedByExchange {
                caller: caller.to_string(),
                address: from,
                smtp_user: self.smtp_user.clone(),
            });
        }
        Ok(())
    }

    /// Remember that Exchange answered SendAsDenied (`reply`) for `from`, so repeats fail fast
    /// without uploading the message again; returns the refusal to give the caller.
    pub async fn remember_exchange_denial(
        &self,
        caller: &Caller,
        from: &str,
        reply: &str,
    ) -> SendAsRefusal {
        let address = self.remember_denied(from).await;
        SendAsRefusal::DeniedByExchange {
            caller: caller.to_string(),
            address,
            smtp_user: self.smtp_user.clone(),
            reply: reply.to_string(),
        }
    }

    /// Remember that Exchange refused `from` (as the queue's workers do, with no caller
    /// waiting); the address as remembered.
    pub async fn remember_denied(&self, from: &str) -> String {
        let address = from.to_ascii_lowercase();
        if let Err(e) = self.denials.remember(&address, self.clock.now_ms()).await {
            // The caller still gets Exchange's refusal; the next try asks Exchange again.
            tracing::warn!(error = %e, "a SendAsDenied answer could not be remembered");
        }
        address
    }

    fn caller_may_use(&self, caller: &Caller, from: &str) -> Result<(), SendAsRefusal> {
        let allowed = match caller {
            Caller::Anonymous => true,
            Caller::ApiKey { allowed_from, .. } => allowed_from.iter().any(|p| p.matches(from)),
            Caller::User { address, .. } => {
                address.eq_ignore_ascii_case(from) || self.is_delegate(address, from)
            }
        };
        if allowed {
            return Ok(());
        }
        let (caller_name, address) = (caller.to_string(), from.to_string());
        Err(match caller {
            Caller::ApiKey { allowed_from, .. } => SendAsRefusal::NotListedForKey {
                caller: caller_name,
                address,
                allowed: list(allowed_from),
            },
            _ => SendAsRefusal::NotADelegate {
                caller: caller_name,
                address,
            },
        })
    }

    fn is_delegate(&self, user: &str, mailbox: &str) -> bool {
        self.settings
            .delegates
            .iter()
            .filter(|(m, _)| m.as_str().eq_ignore_ascii_case(mailbox))
            .flat_map(|(_, members)| members)
            .any(|member| match member {
                Delegate::Group(group) => self.group_has(group, user),
                Delegate::User(address) => address.as_str().eq_ignore_ascii_case(user),
            })
    }

    fn group_has(&self, group: &str, user: &str) -> bool {
        self.settings
            .groups
            .iter()
            .filter(|(name, _)| name == group)
            .flat_map(|(_, members)| members)
            .any(|m| m.as_str().eq_ignore_ascii_case(user))
    }

    async fn recently_denied(&self, from: &str) -> Result<bool, SendAsRefusal> {
        let memory = duration_ms(self.settings.denial_memory);
        if memory == 0 {
            return Ok(false);
        }
        let since = self.clock.now_ms().saturating_sub(memory) + 1;
        self.denials
            .denied_since(from, since)
            .await
            .map_err(SendAsRefusal::StoreUnavailable)
    }
}

fn list(patterns: &[AddressPattern]) -> String {
    if patterns.is_empty() {
        return "no address".into();
    }
    patterns
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::caller::UserSource;

    fn key(patterns: &[&str]) -> Caller {
        Caller::ApiKey {
            name: "billing".into(),
            allowed_from: patterns
                .iter()
                .map(|p| AddressPattern::parse(p).unwrap())
                .collect::<Vec<_>>()
                .into(),
        }
    }

    fn addr(text: &str) -> EmailAddress {
        EmailAddress::parse(text).unwrap()
    }

    fn user(address: &str) -> Caller {
        Caller::User {
            address: address.into(),
            via: UserSource::TrustedProxy,
        }
    }

    fn policy() -> SendAsPolicy {
        SendAsPolicy::new(
            SendAsSettings {
                delegates: vec![(
                    addr("team@contoso.com"),
                    vec![
                        Delegate::User(addr("bob@contoso.com")),
                        Delegate::Group("sales".into()),
                    ],
                )],
                groups: vec![("sales".into(), vec![addr("carol@contoso.com")])],
                exchange_grants: None,
                denial_memory: Duration::from_secs(60),
            },
            Some("relay@contoso.com"),
        )
    }

    #[tokio::test]
    async fn an_api_key_may_use_its_listed_addresses_and_domains() {
        let p = policy();
        let caller = key(&["noreply@contoso.com", "*@billing.contoso.com"]);
        assert!(p.check(&caller, &addr("NoReply@contoso.com")).await.is_ok());
        assert!(
            p.check(&caller, &addr("x@billing.contoso.com"))
                .await
                .is_ok()
        );
        let refused = p
            .check(&caller, &addr("ceo@contoso.com"))
            .await
            .unwrap_err();
        let detail = refused.to_string();
        assert!(
            detail.contains("API key 'billing'") && detail.contains("ceo@contoso.com"),
            "{detail}"
        );
        assert!(detail.contains("allowedFrom"), "{detail}");
    }

    #[tokio::test]
    async fn a_domain_pattern_does_not_match_subdomains_or_lookalikes() {
        let p = policy();
        let caller = key(&["*@contoso.com"]);
        assert!(p.check(&caller, &addr("a@sub.contoso.com")).await.is_err());
        assert!(p.check(&caller, &addr("a@evilcontoso.com")).await.is_err());
    }

    #[tokio::test]
    async fn a_user_may_send_as_self_and_as_mailboxes_that_list_them() {
        let p = policy();
        assert!(
            p.check(&user("alice@contoso.com"), &addr("alice@contoso.com"))
                .await
                .is_ok()
        );
        assert!(
            p.check(&user("bob@contoso.com"), &addr("team@contoso.com"))
                .await
                .is_ok()
        );
        assert!(
            p.check(&user("carol@contoso.com"), &addr("team@contoso.com"))
                .await
                .is_ok(),
            "through group:sales"
        );
        let refused = p
            .check(&user("alice@contoso.com"), &addr("team@contoso.com"))
            .await
            .unwrap_err();
        assert!(matches!(refused, SendAsRefusal::NotADelegate { .. }));
        assert!(refused.to_string().contains("mailRelay.sendAs.delegates"));
    }

    #[tokio::test]
    async fn exchange_grants_refuse_unlisted_mailboxes_at_once() {
        let mut p = policy();
        p.settings.exchange_grants = Some(vec![AddressPattern::parse("*@contoso.com").unwrap()]);
        assert!(
            p.check(&Caller::Anonymous, &addr("x@contoso.com"))
                .await
                .is_ok()
        );
        let key = Caller::ApiKey {
            name: "billing".into(),
            allowed_from: Arc::from(vec![AddressPattern::parse("*@fabrikam.com").unwrap()]),
        };
        let refused = p
            .check(&key, &addr("x@fabrikam.com"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.starts_with("API key 'billing' may not send as x@fabrikam.com"),
            "{refused}"
        );
        assert!(refused.contains("Add-RecipientPermission"), "{refused}");
    }

    #[tokio::test]
    async fn an_exchange_denial_is_remembered_for_a_while() {
        let mut p = policy();
        let caller = user("alice@contoso.com");
        let refusal = p
            .remember_exchange_denial(&caller, "Alice@contoso.com", "554 5.2.252 SendAsDenied")
            .await;
        let detail = refusal.to_string();
        assert!(
            detail.starts_with("user alice@contoso.com may not send as alice@contoso.com"),
            "{detail}"
        );
        assert!(
            detail.contains("Add-RecipientPermission alice@contoso.com"),
            "{detail}"
        );
        assert!(matches!(
            p.check(&caller, &addr("alice@contoso.com")).await,
            Err(SendAsRefusal::RecentlyDeniedByExchange { .. })
        ));
        p.settings.denial_memory = Duration::ZERO;
        assert!(
            p.check(&caller, &addr("alice@contoso.com")).await.is_ok(),
            "forgotten after the memory time"
        );
    }
}
