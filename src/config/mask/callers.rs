//! `check-config`'s lines for who may call and how they reach the relay: `mailRelay.auth`,
//! `sendAs`, `cors`, `http`, `shutdown` and `adminMail`.

use std::fmt::Write as _;

use super::{MASK, Out, flow_list, quote, secs};
use crate::config::Settings;

pub(super) fn render_callers(out: &mut Out<'_>, settings: &Settings) {
    let auth = &settings.relay.auth;
    out.section(2, "auth");
    out.line(
        4,
        "mailRelay.auth.allowAnonymous",
        Some(auth.allow_anonymous.to_string()),
    );
    if auth.api_keys.is_empty() {
        out.plain(4, "apiKeys", "[]");
    } else {
        out.section(4, "apiKeys");
        for key in &auth.api_keys {
            let _ = writeln!(out.text, "      - name: {}", quote(&key.name));
            out.plain(8, "sha256", &quote(&hex::encode(key.sha256)));
            let from: Vec<String> = key.allowed_from.iter().map(ToString::to_string).collect();
            out.plain(8, "allowedFrom", &flow_list(from));
        }
    }
    if let Some(proxy) = &auth.trusted_proxy {
        out.section(4, "trustedProxy");
        out.line(
            6,
            "mailRelay.auth.trustedProxy.userHeader",
            Some(quote(proxy.user_header.as_str())),
        );
        let sources: Vec<String> = proxy.sources.iter().map(ToString::to_string).collect();
        out.plain(6, "sources", &flow_list(sources));
        if let Some(secret) = &proxy.secret {
            out.line(
                6,
                "mailRelay.auth.trustedProxy.secretHeader",
                Some(quote(secret.header.as_str())),
            );
            out.line(6, "mailRelay.auth.trustedProxy.secret", Some(quote(MASK)));
        }
    }
    if let Some(oidc) = &auth.oidc {
        out.section(4, "oidc");
        out.line(6, "mailRelay.auth.oidc.issuer", Some(quote(&oidc.issuer)));
        out.line(
            6,
            "mailRelay.auth.oidc.audience",
            Some(quote(&oidc.audience)),
        );
        out.line(
            6,
            "mailRelay.auth.oidc.jwksUri",
            Some(quote(oidc.jwks_uri.as_str())),
        );
        out.line(
            6,
            "mailRelay.auth.oidc.userClaim",
            Some(quote(&oidc.user_claim)),
        );
        out.line(
            6,
            "mailRelay.auth.oidc.clockSkewSeconds",
            secs(oidc.clock_skew),
        );
    }
    let send_as = &settings.relay.send_as;
    out.section(2, "sendAs");
    let delegates: Vec<(String, Vec<String>)> = send_as
        .delegates
        .iter()
        .map(|(mailbox, members)| (mailbox.to_string(), strings(members)))
        .collect();
    let groups: Vec<(String, Vec<String>)> = send_as
        .groups
        .iter()
        .map(|(name, members)| (name.clone(), strings(members)))
        .collect();
    for (name, lists) in [("delegates", &delegates), ("groups", &groups)] {
        if lists.is_empty() {
            out.plain(4, name, "{}");
        } else {
            out.section(4, name);
            for (key, members) in lists {
                let _ = writeln!(out.text, "      {}: {}", quote(key), flow_list(members));
            }
        }
    }
    match &send_as.exchange_grants {
        None => out.plain(4, "exchangeGrants", "null # not checked by the relay"),
        Some(grants) => {
            let grants: Vec<String> = grants.iter().map(ToString::to_string).collect();
            out.plain(4, "exchangeGrants", &flow_list(grants));
        }
    }
    out.line(
        4,
        "mailRelay.sendAs.denialMemorySeconds",
        secs(send_as.denial_memory),
    );
    out.section(2, "cors");
    let origins: Vec<&str> = settings
        .relay
        .cors
        .allowed_origins
        .iter()
        .filter_map(|o| o.to_str().ok())
        .collect();
    out.plain(4, "allowedOrigins", &flow_list(origins));
    let http = &settings.relay.http;
    out.section(2, "http");
    out.line(
        4,
        "mailRelay.http.basePath",
        (!http.base_path.is_empty()).then(|| quote(&http.base_path)),
    );
    let proxies: Vec<String> = http
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    out.plain(4, "trustedProxies", &flow_list(proxies));
    let header = http.forwarded_header.name();
    out.line(4, "mailRelay.http.forwardedHeader", Some(quote(header)));
    out.line(4, "mailRelay.http.docs", Some(http.docs.to_string()));
    let shutdown = &settings.relay.shutdown;
    out.section(2, "shutdown");
    out.line(
        4,
        "mailRelay.shutdown.drainDelaySeconds",
        Some(shutdown.drain_delay.as_secs().to_string()),
    );
    out.line(
        4,
        "mailRelay.shutdown.deadlineSeconds",
        secs(shutdown.deadline),
    );
    out.section(2, "adminMail");
    match &settings.relay.admin_mail {
        None => out.line(4, "mailRelay.adminMail.enabled", Some("false".into())),
        Some(admin) => {
            out.line(4, "mailRelay.adminMail.enabled", Some("true".into()));
            out.line(
                4,
                "mailRelay.adminMail.from",
                Some(quote(admin.from.as_str())),
            );
            out.plain(4, "recipients", &flow_list(&admin.recipients));
        }
    }
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}
