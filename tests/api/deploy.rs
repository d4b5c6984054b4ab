//! The operators' files under `deploy/` name only series that a live relay exports: the
//! dashboard's queries and the alert rules are read from the committed files and every metric
//! name in them is looked up in a real `/metrics`, after a send through the SMTP peer (so the
//! token, SMTP and mail series exist) and a 429 (so the rate-limit series does).

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use mail_relay::config::{RateLimitSettings, StoreUrl};
use serde_json::{Value, json};

use crate::entra::FakeEntra;
use crate::helpers::{peer_oauth_settings, spawn_built};

/// Every `mail_relay_*` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("mail_relay_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The strings under any of `keys`, anywhere in a document.
fn strings_under(value: &Value, keys: &[&str], out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match value {
                    Value::String(s) if keys.contains(&key.as_str()) => out.push(s.clone()),
                    other => strings_under(other, keys, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| strings_under(v, keys, out)),
        _ => {}
    }
}

fn names_in(file: &str, keys: &[&str]) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    let document: Value = if file.ends_with(".json") {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
    } else {
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let mut exprs = Vec::new();
    strings_under(&document, keys, &mut exprs);
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

/// The sample names (histograms as `_bucket`, `_sum`, `_count`) and family names of a page.
fn exported(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect();
    let families = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    (samples, families)
}

fn unknown<'a>(used: &'a BTreeSet<String>, samples: &BTreeSet<String>) -> Vec<&'a String> {
    used.iter().filter(|n| !samples.contains(*n)).collect()
}

#[test]
fn names_are_read_out_of_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.9, sum by (le) (rate(mail_relay_smtp_send_duration_seconds_bucket{job=~"$job"}[5m]))) / mail_relay_ready"#
        ),
        BTreeSet::from([
            "mail_relay_ready".to_owned(),
            "mail_relay_smtp_send_duration_seconds_bucket".to_owned()
        ])
    );
}

#[tokio::test]
async fn the_dashboard_and_the_alert_rules_use_only_exported_series() {
    let peer = crate::require_peer!();
    let entra = FakeEntra::start().await;
    let token = peer.mint_token(&peer.oauth_user, Duration::from_secs(3600));
    entra.mount_token(&token, 3599).await;
    let mut settings = peer_oauth_settings(&peer, entra.oauth_settings());
    settings.relay.smtp.send_deadline = Duration::from_secs(20);
    settings.relay.rate_limits = RateLimitSettings {
        mailbox_messages_per_minute: NonZeroU32::new(1),
        ..RateLimitSettings::OFF
    };
    // A SQL store, so that its series are exported too (an SQLite file: no server needed).
    let store_dir = tempfile::tempdir().unwrap();
    settings.relay.store.url = StoreUrl::Sqlite(store_dir.path().join("relay.db"));
    let app = spawn_built(settings).await;
    for _ in 0..100 {
        if app.get("/health/ready").await.status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let body = json!({"from": "noreply@contoso.test", "to": "alice@contoso.test", "text": "hi"});
    assert_eq!(app.post_mail(&body).await.status(), 202);
    assert_eq!(app.post_mail(&body).await.status(), 429);
    assert_eq!(app.get("/health/ready").await.status(), 200);
    let text = app.get("/metrics").await.text().await.unwrap();
    let (samples, families) = exported(&text);

    let dashboard = names_in("deploy/grafana/mail-relay.json", &["expr", "query"]);
    let alerts = names_in("deploy/prometheus/alerts.yml", &["expr"]);
    // An empty parse would pass the lookups below.
    assert!(dashboard.len() >= 10, "{dashboard:?}");
    assert!(alerts.len() >= 5, "{alerts:?}");
    assert_eq!(
        unknown(&dashboard, &samples),
        Vec::<&String>::new(),
        "the dashboard queries series /metrics does not have:\n{text}"
    );
    assert_eq!(
        unknown(&alerts, &samples),
        Vec::<&String>::new(),
        "the alert rules query series /metrics does not have:\n{text}"
    );
    // And the dashboard shows every family the relay exports.
    let shown: Vec<&String> = families
        .iter()
        .filter(|f| {
            !dashboard.iter().any(|n| {
                n == *f
                    || n.strip_prefix(f.as_str())
                        .is_some_and(|s| s.starts_with('_'))
            })
        })
        .collect();
    assert_eq!(shown, Vec::<&String>::new(), "not on the dashboard");
}
