//! `mailRelay.auth`, `mailRelay.sendAs` and `mailRelay.cors`: who may call, as whom they may
//! send, and which browsers may call directly.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde_json::Value;

use crate::message::EmailAddress;

use super::read::Ctx;
use super::send_email::https_url;
use super::{
    AddressPattern, ApiKeySettings, AuthSettings, CorsSettings, Delegate, OidcSettings,
    ProxySecret, SendAsSettings, TrustedProxySettings,
};

const API_KEYS: &str = "mailRelay.auth.apiKeys";
const PROXY: &str = "mailRelay.auth.trustedProxy";
const OIDC: &str = "mailRelay.auth.oidc";
const DELEGATES: &str = "mailRelay.sendAs.delegates";
const GROUPS: &str = "mailRelay.sendAs.groups";
const GRANTS: &str = "mailRelay.sendAs.exchangeGrants";
const ORIGINS: &str = "mailRelay.cors.allowedOrigins";

pub(super) const USER_CLAIMS: &[&str] = &["preferred_username", "upn", "email"];

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "empty",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a single value",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A list of single values at `key`; a lone value counts as a list of one.
/// The list of single values at `key` (empty when unset).
pub(super) fn list_at(ctx: &mut Ctx<'_>, key: &str) -> Vec<String> {
    let tree = ctx.values.subtrees.get(key).cloned().unwrap_or(Value::Null);
    string_list(ctx, key, &tree)
}

/// The IP addresses and CIDR blocks listed at `key`, each bad entry an error naming it.
pub(super) fn ip_nets_at(ctx: &mut Ctx<'_>, key: &str) -> Vec<ipnet::IpNet> {
    list_at(ctx, key)
        .into_iter()
        .filter_map(|text| {
            let net = text
                .parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| text.parse::<IpAddr>().ok().map(ipnet::IpNet::from));
            if net.is_none() {
                ctx.error(
                    key,
                    format!("{text:?} is not an IP address or CIDR block, e.g. 10.0.0.0/8 or ::1"),
                );
            }
            net.map(|net| net.trunc())
        })
        .collect()
}

pub(super) fn string_list(ctx: &mut Ctx<'_>, key: &str, value: &Value) -> Vec<String> {
    match value {
        Value::Null => Vec::new(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let text = scalar_text(item);
                if text.is_none() {
                    ctx.error(
                        &format!("{key}[{i}]"),
                        format!("is {}; a single value is expected", describe(item)),
                    );
                }
                text
            })
            .filter(|s| !s.is_empty())
            .collect(),
        other => match scalar_text(other) {
            Some(text) => vec![text],
            None => {
                ctx.error(key, format!("is {}; a list is expected", describe(other)));
                Vec::new()
            }
        },
    }
}

pub(super) fn patterns(ctx: &mut Ctx<'_>, key: &str, value: &Value) -> Vec<AddressPattern> {
    string_list(ctx, key, value)
        .into_iter()
        .filter_map(|text| {
            let pattern = AddressPattern::parse(&text);
            if pattern.is_none() {
                ctx.error(
                    key,
                    format!("{text:?} is not an address (noreply@contoso.com) or a domain pattern (\"*@contoso.com\", quoted: YAML reads a leading * as an alias)"),
                );
            }
            pattern
        })
        .collect()
}

fn has_any(ctx: &Ctx<'_>, prefix: &str) -> bool {
    ctx.values
        .values
        .keys()
        .any(|k| k.starts_with(&format!("{prefix}.")))
        || ctx
            .values
            .subtrees
            .keys()
            .any(|k| k.starts_with(&format!("{prefix}.")))
}

pub(super) fn auth(ctx: &mut Ctx<'_>, smtp: bool) -> AuthSettings {
    let key = "mailRelay.auth.allowAnonymous";
    let allow_anonymous = ctx.flag(key);
    if allow_anonymous && smtp {
        ctx.error(
            key,
            "true is refused with mailRelay.delivery.mode smtp: anyone could send mail as the relay's mailbox; configure apiKeys, trustedProxy or oidc (allowAnonymous is for the outbox dev mode)",
        );
    }
    let api_keys = api_keys(ctx);
    let trusted_proxy = has_any(ctx, PROXY).then(|| trusted_proxy(ctx)).flatten();
    let oidc = has_any(ctx, OIDC).then(|| oidc(ctx)).flatten();
    // Keys whose placeholders could not be resolved are reported already; they are not "none".
    let unresolved_keys = ctx.values.failed.contains(API_KEYS);
    if smtp
        && !allow_anonymous
        && !unresolved_keys
        && api_keys.is_empty()
        && trusted_proxy.is_none()
        && oidc.is_none()
    {
        ctx.warnings.push(format!(
            "mailRelay.auth: no apiKeys, trustedProxy or oidc configured: every POST /mail will be refused (401); add an API key ({API_KEYS}, `mail-relay hash-key` makes one)"
        ));
    }
    AuthSettings {
        allow_anonymous,
        api_keys,
        trusted_proxy,
        oidc,
    }
}

fn api_keys(ctx: &mut Ctx<'_>) -> Vec<ApiKeySettings> {
    let Some(tree) = ctx.values.subtrees.get(API_KEYS).cloned() else {
        return Vec::new();
    };
    let items = match tree {
        Value::Null => return Vec::new(),
        Value::Array(items) => items,
        other => {
            ctx.error(
                API_KEYS,
                format!(
                    "is {}; a list of {{name, sha256, allowedFrom}} is expected",
                    describe(&other)
                ),
            );
            return Vec::new();
        }
    };
    let mut names = BTreeSet::new();
    let mut hashes = BTreeSet::new();
    let mut keys = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{API_KEYS}[{i}]");
        let Value::Object(map) = item else {
            ctx.error(
                &at,
                format!(
                    "is {}; a mapping {{name, sha256, allowedFrom}} is expected",
                    describe(item)
                ),
            );
            continue;
        };
        for unknown in map
            .keys()
            .filter(|k| !["name", "sha256", "allowedFrom", "identities"].contains(&k.as_str()))
        {
            ctx.error(
                &format!("{at}.{unknown}"),
                "unknown key; an API key takes name, sha256, allowedFrom and identities",
            );
        }
        let name = map.get("name").and_then(scalar_text).unwrap_or_default();
        if name.is_empty() {
            ctx.error(
                &format!("{at}.name"),
                "is required (names the caller in logs and errors)",
            );
        } else if !names.insert(name.clone()) {
            ctx.error(
                &format!("{at}.name"),
                format!("{name:?} is used by another API key; names must be unique"),
            );
        }
        let hash_text = map.get("sha256").and_then(scalar_text).unwrap_or_default();
        let sha256 = match hex::decode(&hash_text)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        {
            Some(hash) => {
                if !hashes.insert(hash) {
                    ctx.error(
                        &format!("{at}.sha256"),
                        "is the hash of another API key too",
                    );
                }
                Some(hash)
            }
            None => {
                ctx.error(
                    &format!("{at}.sha256"),
                    if hash_text.is_empty() {
                        "is required: the SHA-256 of the key as 64 hex digits (`mail-relay hash-key` prints a key and its hash); never the key itself".to_owned()
                    } else {
                        format!("{hash_text:?} is not 64 hex digits; give the SHA-256 of the key as `mail-relay hash-key` prints it")
                    },
                );
                None
            }
        };
        let from_key = format!("{at}.allowedFrom");
        let allowed_from = patterns(
            ctx,
            &from_key,
            map.get("allowedFrom").unwrap_or(&Value::Null),
        );
        if allowed_from.is_empty() {
            ctx.error(
                &from_key,
                "is required: the From addresses or domains (\"*@contoso.com\") this key may send as",
            );
        }
        let identities = string_list(
            ctx,
            &format!("{at}.identities"),
            map.get("identities").unwrap_or(&Value::Null),
        );
        if let Some(sha256) = sha256
            && !name.is_empty()
        {
            keys.push(ApiKeySettings {
                name,
                sha256,
                allowed_from,
                identities,
            });
        }
    }
    keys
}

fn trusted_proxy(ctx: &mut Ctx<'_>) -> Option<TrustedProxySettings> {
    let header_key = format!("{PROXY}.userHeader");
    let user_header = match ctx.text(&header_key).map(str::to_owned) {
        None => {
            ctx.error(
                &header_key,
                "is required with trustedProxy: the header naming the user, e.g. X-Forwarded-Email",
            );
            None
        }
        Some(text) => header_name(ctx, &header_key, &text),
    };
    let sources_key = format!("{PROXY}.sources");
    let sources = ip_nets_at(ctx, &sources_key);
    if sources.is_empty() {
        ctx.error(
            &sources_key,
            "is required with trustedProxy: the proxy's source addresses (CIDR blocks); the user header is ignored from anywhere else",
        );
    }
    let secret_key = format!("{PROXY}.secret");
    let secret_header_key = format!("{PROXY}.secretHeader");
    let secret = match (
        ctx.secret(&secret_key),
        ctx.text(&secret_header_key).map(str::to_owned),
    ) {
        (None, None) => None,
        (Some(value), Some(header)) => header_name(ctx, &secret_header_key, &header)
            .map(|header| ProxySecret { header, value }),
        (Some(_), None) => {
            ctx.error(
                &secret_header_key,
                "is required with trustedProxy.secret: the header the proxy sends it in",
            );
            None
        }
        (None, Some(_)) => {
            ctx.error(&secret_key, "is required with trustedProxy.secretHeader (or secretFile naming a file that holds it)");
            None
        }
    };
    Some(TrustedProxySettings {
        user_header: user_header?,
        sources,
        secret,
    })
}

fn header_name(ctx: &mut Ctx<'_>, key: &str, text: &str) -> Option<http::HeaderName> {
    match http::HeaderName::from_bytes(text.as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            ctx.error(
                key,
                format!("{text:?} is not an HTTP header name; write it like X-Forwarded-Email"),
            );
            None
        }
    }
}

fn oidc(ctx: &mut Ctx<'_>) -> Option<OidcSettings> {
    let why = "with mailRelay.auth.oidc";
    let issuer = ctx.required(
        &format!("{OIDC}.issuer"),
        &format!("{why} (the token issuer, e.g. https://login.microsoftonline.com/<tenant>/v2.0)"),
    );
    let audience = ctx.required(
        &format!("{OIDC}.audience"),
        &format!("{why} (the relay's application ID URI or client id)"),
    );
    let jwks_key = format!("{OIDC}.jwksUri");
    let jwks_uri = ctx
        .required(&jwks_key, &format!("{why} (the issuer's signing keys, e.g. https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys)"))
        .and_then(|text| https_url(ctx, &jwks_key, &text, "token signing keys must not be tampered with"));
    let claim_key = format!("{OIDC}.userClaim");
    let user_claim = match ctx.text(&claim_key).map(str::to_owned) {
        None => "preferred_username".to_owned(),
        Some(claim) if USER_CLAIMS.contains(&claim.as_str()) => claim,
        Some(claim) => {
            ctx.error(
                &claim_key,
                format!("{claim} is not one of {}", USER_CLAIMS.join(", ")),
            );
            "preferred_username".to_owned()
        }
    };
    let clock_skew = ctx.seconds(&format!("{OIDC}.clockSkewSeconds"));
    Some(OidcSettings {
        issuer: issuer?,
        audience: audience?,
        jwks_uri: jwks_uri?,
        user_claim,
        clock_skew,
    })
}

/// A mapping of name -> list of values, as `delegates` and `groups` are written.
fn named_lists(ctx: &mut Ctx<'_>, key: &str) -> Vec<(String, Vec<String>)> {
    match ctx.values.subtrees.get(key).cloned() {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(name, members)| {
                let members = string_list(ctx, &format!("{key}.{name}"), members);
                (name.clone(), members)
            })
            .collect(),
        Some(other) => {
            ctx.error(
                key,
                format!(
                    "is {}; a mapping (name: [addresses]) is expected",
                    describe(&other)
                ),
            );
            Vec::new()
        }
    }
}

pub(super) fn send_as(ctx: &mut Ctx<'_>) -> SendAsSettings {
    let groups: Vec<(String, Vec<EmailAddress>)> = named_lists(ctx, GROUPS)
        .into_iter()
        .map(|(name, members)| {
            let members = members
                .iter()
                .filter_map(|member| match EmailAddress::parse(member) {
                    Ok(address) => Some(address),
                    Err(_) => {
                        ctx.error(
                            &format!("{GROUPS}.{name}"),
                            format!("{member:?} is not an e-mail address; list the group's members as alice@contoso.com"),
                        );
                        None
                    }
                })
                .collect();
            (name, members)
        })
        .collect();
    let mut delegates = Vec::new();
    for (mailbox, members) in named_lists(ctx, DELEGATES) {
        let at = format!("{DELEGATES}.{mailbox}");
        let parsed = EmailAddress::parse(&mailbox);
        if parsed.is_err() {
            ctx.error(
                &at,
                format!(
                    "{mailbox:?} is not a mailbox address (the From address delegates may use)"
                ),
            );
        }
        let members: Vec<Delegate> = members
            .iter()
            .filter_map(|member| match member.strip_prefix("group:") {
                Some(group) if groups.iter().any(|(g, _)| g == group) => {
                    Some(Delegate::Group(group.to_owned()))
                }
                Some(group) => {
                    ctx.error(
                        &at,
                        format!("group {group:?} is not defined under {GROUPS}"),
                    );
                    None
                }
                None => match EmailAddress::parse(member) {
                    Ok(address) => Some(Delegate::User(address)),
                    Err(_) => {
                        ctx.error(
                            &at,
                            format!("{member:?} is neither a user's address nor group:NAME"),
                        );
                        None
                    }
                },
            })
            .collect();
        if let Ok(mailbox) = parsed {
            delegates.push((mailbox, members));
        }
    }
    let exchange_grants = ctx
        .values
        .subtrees
        .get(GRANTS)
        .cloned()
        .filter(|v| !v.is_null())
        .map(|tree| patterns(ctx, GRANTS, &tree));
    let denial_memory = ctx.seconds("mailRelay.sendAs.denialMemorySeconds");
    SendAsSettings {
        delegates,
        groups,
        exchange_grants,
        denial_memory,
    }
}

pub(super) fn cors(ctx: &mut Ctx<'_>) -> CorsSettings {
    let allowed_origins = list_at(ctx, ORIGINS)
        .into_iter()
        .filter_map(|text| {
            let origin = url::Url::parse(&text).ok().filter(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some()
                    && u.path() == "/"
                    && u.query().is_none()
                    && u.fragment().is_none()
            });
            match origin {
                // Browsers send the origin without a trailing slash; compare exactly that.
                Some(url) => http::HeaderValue::from_str(&url.origin().ascii_serialization()).ok(),
                None => {
                    ctx.error(
                        ORIGINS,
                        format!("{text:?} is not an origin; write scheme://host[:port] with no path, e.g. https://app.contoso.com"),
                    );
                    None
                }
            }
        })
        .collect();
    CorsSettings { allowed_origins }
}
