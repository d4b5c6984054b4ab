//! Rate limits and idempotency, the promises Exchange and the drain make, and the queue's
//! webhook and encryption at rest.

use super::*;

fn limit(n: u32) -> Option<std::num::NonZeroU32> {
    std::num::NonZeroU32::new(n)
}

#[test]
fn rate_limits_and_idempotency_default_to_exchange_limits_and_a_day() {
    let loaded = ok(SEED, &[]);
    let r = &loaded.settings.relay;
    assert_eq!(r.rate_limits.mailbox_messages_per_minute, limit(30));
    assert_eq!(r.rate_limits.mailbox_recipients_per_day, limit(10_000));
    // A quarter of the mailbox's for each caller.
    assert_eq!(r.rate_limits.caller_messages_per_minute, limit(7));
    assert_eq!(r.rate_limits.caller_recipients_per_day, limit(2_500));
    assert_eq!(r.idempotency.ttl, Duration::from_secs(86_400));
    assert_eq!(r.idempotency.max_entries, 100_000);
    assert_eq!(r.idempotency.max_bytes, 32 * 1024 * 1024);
    for line in [
        "mailboxMessagesPerMinute: 30 # default",
        "mailboxRecipientsPerDay: 10000 # default",
        "callerMessagesPerMinute: 7 # default",
        "callerRecipientsPerDay: 2500 # default",
        "ttlSeconds: 86400 # default",
        "maxEntries: 100000 # default",
        "maxBytes: 33554432 # default",
    ] {
        assert!(loaded.masked.contains(line), "{line} in\n{}", loaded.masked);
    }
}

#[test]
fn rate_limits_and_idempotency_are_read_from_file_and_env() {
    let yaml = seed_plus(
        "  rateLimits:\n    mailboxMessagesPerMinute: 20\n    mailboxRecipientsPerDay: 0\n    callerMessagesPerMinute: 5\n  idempotency:\n    ttlSeconds: 600\n    maxEntries: 50\n    maxBytes: 2097152\n",
    );
    let loaded = ok(&yaml, &[]);
    let r = &loaded.settings.relay;
    assert_eq!(r.rate_limits.mailbox_messages_per_minute, limit(20));
    assert_eq!(r.rate_limits.mailbox_recipients_per_day, None, "0 is off");
    assert_eq!(r.rate_limits.caller_messages_per_minute, limit(5));
    // The mailbox's day is off, and so is the caller's share of it.
    assert_eq!(r.rate_limits.caller_recipients_per_day, None);
    assert_eq!(r.idempotency.ttl, Duration::from_secs(600));
    assert_eq!(r.idempotency.max_entries, 50);
    assert_eq!(r.idempotency.max_bytes, 2 * 1024 * 1024);
    // Off is written back as 0, and the masked output loads back to the same settings.
    assert!(
        loaded.masked.contains("mailboxRecipientsPerDay: 0\n"),
        "{}",
        loaded.masked
    );
    let again = ok(
        &loaded.masked,
        &[("FEATURESWITCHES_SENDEMAIL_OAUTHCLIENTSECRET", CLIENT_SECRET)],
    );
    assert_eq!(again.settings.relay.rate_limits, r.rate_limits);
    assert_eq!(again.settings.relay.idempotency, r.idempotency);

    let loaded = ok(
        &yaml,
        &[
            ("MAILRELAY_RATELIMITS_CALLERMESSAGESPERMINUTE", "0"),
            ("MAILRELAY_RATELIMITS_MAILBOXMESSAGESPERMINUTE", "10"),
            ("MAILRELAY_IDEMPOTENCY_TTLSECONDS", "3600"),
        ],
    );
    let r = &loaded.settings.relay;
    assert_eq!(r.rate_limits.caller_messages_per_minute, None);
    assert_eq!(r.rate_limits.mailbox_messages_per_minute, limit(10));
    assert_eq!(r.idempotency.ttl, Duration::from_secs(3_600));
    assert!(
        loaded
            .masked
            .contains("# from env MAILRELAY_RATELIMITS_MAILBOXMESSAGESPERMINUTE"),
        "{}",
        loaded.masked
    );
}

#[test]
fn rate_limit_and_idempotency_values_out_of_range_name_the_key() {
    for (var, value, key, expected) in [
        (
            "MAILRELAY_RATELIMITS_MAILBOXMESSAGESPERMINUTE",
            "-1",
            "mailRelay.rateLimits.mailboxMessagesPerMinute",
            "out of range; allowed 0..=100000",
        ),
        (
            "MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY",
            "lots",
            "mailRelay.rateLimits.mailboxRecipientsPerDay",
            "is not a whole number",
        ),
        (
            "MAILRELAY_RATELIMITS_CALLERMESSAGESPERMINUTE",
            "100001",
            "mailRelay.rateLimits.callerMessagesPerMinute",
            "out of range; allowed 0..=100000",
        ),
        (
            "MAILRELAY_RATELIMITS_CALLERRECIPIENTSPERDAY",
            "10000001",
            "mailRelay.rateLimits.callerRecipientsPerDay",
            "out of range; allowed 0..=10000000",
        ),
        (
            "MAILRELAY_IDEMPOTENCY_TTLSECONDS",
            "0",
            "mailRelay.idempotency.ttlSeconds",
            "out of range; allowed 1..=604800",
        ),
        (
            "MAILRELAY_IDEMPOTENCY_MAXENTRIES",
            "0",
            "mailRelay.idempotency.maxEntries",
            "out of range; allowed 1..=10000000",
        ),
        (
            "MAILRELAY_IDEMPOTENCY_MAXBYTES",
            "1000",
            "mailRelay.idempotency.maxBytes",
            "out of range; allowed 1048576..=1073741824",
        ),
    ] {
        let message = error_for(SEED, &[(var, value)], key);
        assert!(message.contains(expected), "{key}: {message}");
    }
}

#[test]
fn a_daily_recipient_limit_below_the_per_mail_limit_is_an_error() {
    // SEED allows 100 recipients per mail.
    let key = "mailRelay.rateLimits.mailboxRecipientsPerDay";
    let message = error_for(
        SEED,
        &[("MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY", "99")],
        key,
    );
    assert!(
        message.contains("below mailRelay.limits.maxRecipients (100)"),
        "{message}"
    );
    assert!(message.contains("set it to 0 (off)"), "{message}");
    ok(
        SEED,
        &[("MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY", "100")],
    );

    let key = "mailRelay.rateLimits.callerRecipientsPerDay";
    let message = error_for(
        SEED,
        &[("MAILRELAY_RATELIMITS_CALLERRECIPIENTSPERDAY", "99")],
        key,
    );
    assert!(
        message.contains("below mailRelay.limits.maxRecipients (100)"),
        "{message}"
    );
    // The default share is never below one mail's recipients: a quarter of 200 would be 50.
    let loaded = ok(
        SEED,
        &[("MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY", "200")],
    );
    let limits = &loaded.settings.relay.rate_limits;
    assert_eq!(limits.caller_recipients_per_day, limit(100));
}

#[test]
fn limits_above_exchange_online_are_a_warning_for_office365_only() {
    let above = [
        ("MAILRELAY_RATELIMITS_MAILBOXMESSAGESPERMINUTE", "0"),
        ("MAILRELAY_RATELIMITS_MAILBOXRECIPIENTSPERDAY", "20000"),
    ];
    let loaded = ok(SEED, &above);
    assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
    assert!(
        loaded.warnings[0].contains("mailboxMessagesPerMinute"),
        "{:?}",
        loaded.warnings
    );
    assert!(
        loaded.warnings[0].contains("30 messages per minute"),
        "{:?}",
        loaded.warnings
    );
    assert!(
        loaded.warnings[1].contains("mailboxRecipientsPerDay"),
        "{:?}",
        loaded.warnings
    );
    assert!(
        loaded.warnings[1].contains("SubmissionQuotaExceeded"),
        "{:?}",
        loaded.warnings
    );

    let mut other_host = above.to_vec();
    other_host.push(("FEATURESWITCHES_SENDEMAIL_SMTPSERVER", "smtp.example.net"));
    let loaded = ok(SEED, &other_host);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn production_example_sets_the_exchange_limits() {
    let loaded = load(&LoadOptions {
        path: config_file("osweb-prod.yml"),
        env: env(&[
            ("SMTP_USERNAME", "relay@contoso.com"),
            ("OAUTH_CLIENT_ID", "11111111-2222-3333-4444-555555555555"),
            ("OAUTH_CLIENT_SECRET", CLIENT_SECRET),
            ("OAUTH_TENANT_ID", "contoso.onmicrosoft.com"),
            ("OSWEB_API_KEY_SHA256", &"ab".repeat(32)),
            ("MAIL_DOMAIN", "contoso.com"),
        ]),
    })
    .unwrap();
    let r = &loaded.settings.relay;
    assert_eq!(r.rate_limits, Default::default());
    assert_eq!(r.idempotency, Default::default());
    // Every value in the example is written, not defaulted.
    assert!(
        loaded.masked.contains("mailboxMessagesPerMinute: 30\n"),
        "{}",
        loaded.masked
    );
    assert!(
        loaded.masked.contains("maxEntries: 100000\n"),
        "{}",
        loaded.masked
    );
}

#[test]
fn settings_that_break_exchange_or_drain_promises_are_warned_about() {
    let yaml = "featureSwitches:\n  sendEmail:\n    smtpServer: smtp.office365.com\n    smtpAuthentication: NONE\n\
                mailRelay:\n  smtp:\n    maxConnections: 5\n  shutdown:\n    drainDelaySeconds: 5\n    deadlineSeconds: 30\n";
    let loaded = mail_relay::config::load_str(yaml, "test.yml", &[]).unwrap();
    let warnings = loaded.warnings.join("\n");
    assert!(
        warnings.contains("maxConnections is 5") && warnings.contains("432"),
        "{warnings}"
    );
    assert!(
        warnings.contains("deadlineSeconds (30 s)") && warnings.contains("65 s"),
        "{warnings}"
    );
    // A deadline not above the drain delay is one error, not an error and a warning too.
    let broken = yaml.replace("deadlineSeconds: 30", "deadlineSeconds: 5");
    let e = mail_relay::config::load_str(&broken, "test.yml", &[]).unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e}");
    assert_eq!(e.errors[0].key, "mailRelay.shutdown.deadlineSeconds");
    assert!(
        !e.warnings.iter().any(|w| w.contains("deadlineSeconds")),
        "{e}"
    );
}

#[test]
fn the_webhook_needs_an_https_url_and_a_key_of_16_bytes_never_shown() {
    let (url, secret) = (
        "MAILRELAY_DELIVERY_WEBHOOK",
        "MAILRELAY_DELIVERY_WEBHOOKSECRET",
    );
    let https = "https://app.contoso.com/hooks/mail";
    let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let loaded = ok(SEED, &[(url, https), (secret, whsec)]);
    let webhook = loaded.settings.relay.queue.webhook.as_ref().unwrap();
    assert_eq!(webhook.url.as_str(), https);
    assert_eq!(
        webhook.key.expose().len(),
        24,
        "whsec_ is base64 of the key"
    );
    assert!(
        loaded.masked.contains(&format!("webhook: \"{https}\"")),
        "{}",
        loaded.masked
    );
    assert!(loaded.masked.contains("webhookSecret: \"****\""));
    for shown in [loaded.masked.clone(), format!("{:?}", loaded.settings)] {
        assert!(
            !shown.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            "{shown}"
        );
    }

    let message = error_for(
        SEED,
        &[(url, "http://app.contoso.com/hook"), (secret, whsec)],
        "mailRelay.delivery.webhook",
    );
    assert!(message.contains("https"), "{message}");
    let message = error_for(SEED, &[(url, https)], "mailRelay.delivery.webhookSecret");
    assert!(message.contains("required"), "{message}");
    let message = error_for(SEED, &[(secret, whsec)], "mailRelay.delivery.webhookSecret");
    assert!(message.contains("is set but"), "{message}");
    let message = error_for(
        SEED,
        &[(url, https), (secret, "short-key")],
        "mailRelay.delivery.webhookSecret",
    );
    assert!(
        message.contains("shorter than 16 bytes") && !message.contains("short-key"),
        "{message}"
    );
    let message = error_for(
        SEED,
        &[(url, https), (secret, "whsec_not base64!")],
        "mailRelay.delivery.webhookSecret",
    );
    assert!(message.contains("not base64"), "{message}");
}

#[test]
fn encrypt_at_rest_needs_the_cipher_key() {
    let on = ("MAILRELAY_DELIVERY_ENCRYPTATREST", "true");
    let message = error_for(SEED, &[on], "mailRelay.delivery.encryptAtRest");
    assert!(message.contains("MAIL_RELAY_ENCRYPT_KEY"), "{message}");
    let (name, key) = key_env(9);
    let loaded = ok(SEED, &[on, (name.as_str(), key.as_str())]);
    assert!(loaded.settings.relay.queue.at_rest.is_some());
    assert!(
        loaded.masked.contains("encryptAtRest: true"),
        "{}",
        loaded.masked
    );
    assert!(ok(SEED, &[]).settings.relay.queue.at_rest.is_none());
    let message = error_for(
        SEED,
        &[("MAILRELAY_DELIVERY_ENCRYPTATREST", "yes")],
        "mailRelay.delivery.encryptAtRest",
    );
    assert!(message.contains("true, false"), "{message}");
}
