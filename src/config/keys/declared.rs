//! Every key the relay reads, declared once: its range, default and meaning. A new setting
//! starts here; loading, `check-config` and the README's tables all read this list.

use super::super::callers::USER_CLAIMS;
use super::super::read::listed;
use super::super::{
    AuthMode, Cloud, DeliveryMode, Encryption, ForwardedHeader, LogFormat, ManagedKind, QueueMode,
};
use super::Allowed::{Choice, Flag, Text, Tree, Whole};
use super::Preset::{Is, Said, Unset};
use super::{ENCRYPT_AT_REST, KeySpec, Preset};

const fn text(key: &'static str, preset: Preset, help: &'static str) -> KeySpec {
    KeySpec::new(key, Text, preset, help)
}

const fn whole(
    key: &'static str,
    min: u64,
    max: u64,
    preset: Preset,
    help: &'static str,
) -> KeySpec {
    KeySpec::new(key, Whole { min, max }, preset, help)
}

/// Timeouts: at least a second, at most a day.
const fn seconds(key: &'static str, default: &'static str, help: &'static str) -> KeySpec {
    whole(key, 1, 86_400, Is(default), help)
}

const fn choice(
    key: &'static str,
    listing: fn() -> String,
    preset: Preset,
    help: &'static str,
) -> KeySpec {
    KeySpec::new(key, Choice(listing), preset, help)
}

const fn flag(key: &'static str, default: &'static str, help: &'static str) -> KeySpec {
    KeySpec::new(key, Flag, Is(default), help)
}

const fn tree(key: &'static str, preset: Preset, help: &'static str) -> KeySpec {
    KeySpec::new(key, Tree, preset, help)
}

const DAY: u64 = 86_400;
const MIB: u64 = 1024 * 1024;

/// Every single-valued key the loader reads.
pub const KEYS: &[KeySpec] = &[
    text("server.address", Is("127.0.0.1"), "IP address to bind (`0.0.0.0` in a container)"),
    whole("server.port", 0, 65_535, Is("8080"), "0 = any free port"),
    text(
        "featureSwitches.sendEmail.smtpServer",
        Said("– (with `mailRelay.cloud` set: the cloud's)"),
        "SMTP host; required with delivery `smtp` or `auto`",
    ),
    whole("featureSwitches.sendEmail.smtpPort", 1, 65_535, Is("587"), ""),
    choice(
        "featureSwitches.sendEmail.smtpEncryption",
        || listed(Encryption::CHOICES),
        Is("TLS"),
        "`SSL` is implicit TLS, `TLS` STARTTLS; any case. `SSL` with `smtp.office365.com` is a warning. `NONE` with BASIC or MS_OAUTH only for a loopback `smtpServer`",
    ),
    choice(
        "featureSwitches.sendEmail.smtpAuthentication",
        || listed(AuthMode::CHOICES),
        Is("MS_OAUTH"),
        "",
    ),
    text(
        "featureSwitches.sendEmail.smtpUsername",
        Unset,
        "login mailbox; required with BASIC and MS_OAUTH; an address under MS_OAUTH",
    ),
    text("featureSwitches.sendEmail.smtpPassword", Unset, "BASIC only").secret(),
    text(
        "featureSwitches.sendEmail.oAuthClientId",
        Unset,
        "MS_OAUTH: Application (client) ID; required",
    ),
    text(
        "featureSwitches.sendEmail.oAuthClientSecret",
        Unset,
        "MS_OAUTH: the secret's *value*. Exactly one of this and `oAuthCertificate`",
    )
    .secret(),
    // Not a secret, but as long as a PEM file: a file mount is the natural source.
    text(
        "featureSwitches.sendEmail.oAuthCertificate",
        Unset,
        "PEM certificate uploaded to the app registration",
    )
    .read_from_file(),
    text(
        "featureSwitches.sendEmail.oAuthPrivateKey",
        Unset,
        "PEM RSA private key of that certificate (PKCS#8 or PKCS#1)",
    )
    .secret(),
    text(
        "featureSwitches.sendEmail.oAuthFederatedTokenFile",
        Said("`AZURE_FEDERATED_TOKEN_FILE` when no other credential is set"),
        "workload identity federation: a file holding the federated token (read again for every token request); instead of a secret or certificate",
    ),
    choice(
        "featureSwitches.sendEmail.oAuthManagedIdentity",
        managed_identities,
        Unset,
        "tokens from the platform's managed identity, no credential configured; `oAuthClientId` then names a user-assigned identity (empty: the system-assigned one) and `oAuthTenantId` is not needed. See [Managed identity](#managed-identity)",
    ),
    text(
        "featureSwitches.sendEmail.oAuthTenantId",
        Unset,
        "MS_OAUTH: tenant GUID or domain; required",
    ),
    text(
        "featureSwitches.sendEmail.oAuthTokenEndpoint",
        Said(
            "`https://login.microsoftonline.com/#TenantID#/oauth2/v2.0/token` (the cloud's); with a managed identity `http://169.254.169.254/metadata/identity/oauth2/token` (`imds`) or `IDENTITY_ENDPOINT` (`appService`)",
        ),
        "`#TenantID#` is replaced; https only (http only on loopback; for a managed identity also link-local)",
    ),
    text(
        "featureSwitches.sendEmail.oAuthScopes",
        Said("`https://outlook.office365.com/.default` (the cloud's)"),
        "space-separated",
    ),
    whole(
        "featureSwitches.sendEmail.oAuthTokenGraceTimeInSeconds",
        0,
        3_000,
        Is("300"),
        "a token is renewed this long before it expires",
    ),
    choice(
        "mailRelay.cloud",
        || listed(Cloud::CHOICES),
        Is("global"),
        "the defaults of the token endpoint, `oAuthScopes`, `graph.baseUrl`, `graph.scopes` and (when set) `smtpServer` for that cloud; explicit settings win. See [National clouds](#national-clouds)",
    ),
    text(
        "mailRelay.defaultIdentity.name",
        Is("default"),
        "what `featureSwitches.sendEmail` is called among the identities",
    ),
    choice(
        "mailRelay.delivery.mode",
        || listed(DeliveryMode::CHOICES),
        Is("smtp"),
        "`graph`: Microsoft Graph `sendMail` (see [Sending through Microsoft Graph](#sending-through-microsoft-graph)); `auto`: SMTP, Graph while SMTP AUTH is refused; `outbox`: writes `.eml` files, no SMTP settings needed",
    ),
    text("mailRelay.delivery.outboxDir", Is("./outbox"), "outbox mode only"),
    choice(
        "mailRelay.delivery.queue",
        || listed(QueueMode::CHOICES),
        Is("prefer"),
        "`prefer`: a request with `Prefer: respond-async` is queued; `always`: every request (needs a durable store); `never`: every answer is synchronous. See [Queued delivery](#queued-delivery)",
    ),
    whole(
        "mailRelay.delivery.workers",
        0,
        100,
        Is("0"),
        "queued mails one replica sends at once; 0: `mailRelay.smtp.maxConnections`",
    ),
    whole(
        "mailRelay.delivery.maxAgeSeconds",
        1,
        30 * DAY,
        Is("432000"),
        "a queued mail not delivered within it ends `expired` (5 days, like Postfix's `maximal_queue_lifetime`)",
    ),
    whole(
        "mailRelay.delivery.retentionSeconds",
        1,
        365 * DAY,
        Is("604800"),
        "finished mails and their MIME are deleted this long after they finished (7 days)",
    ),
    seconds(
        "mailRelay.delivery.retryMinSeconds",
        "30",
        "the first retry's pause, doubled per attempt; not above `retryMaxSeconds`",
    ),
    seconds(
        "mailRelay.delivery.retryMaxSeconds",
        "1800",
        "the longest pause between attempts",
    ),
    whole(
        "mailRelay.delivery.maxQueuedBytes",
        MIB,
        1 << 40,
        Is("1073741824"),
        "bytes of all mails still to deliver (1 GiB); past it new mails get `503 busy`",
    ),
    flag(
        ENCRYPT_AT_REST,
        "false",
        "seal each stored message with AES-256-GCM under the `{cipher}` key",
    ),
    text(
        "mailRelay.delivery.webhook",
        Unset,
        "https URL that mails ending `failed`, `expired` or `unknown` are POSTed to, signed",
    ),
    text(
        "mailRelay.delivery.webhookSecret",
        Unset,
        "the webhook's signing key: `whsec_` and base64, or at least 16 bytes as written; required with `webhook`",
    )
    .secret(),
    text(
        "mailRelay.graph.baseUrl",
        Said("`https://graph.microsoft.com/v1.0` (the cloud's)"),
        "the Graph API root; https only (http only on loopback)",
    ),
    text(
        "mailRelay.graph.scopes",
        Said("`https://graph.microsoft.com/.default` (the cloud's)"),
        "the token scope for Graph (its own token cache entry)",
    ),
    seconds("mailRelay.graph.connectTimeoutSeconds", "10", ""),
    seconds(
        "mailRelay.graph.requestTimeoutSeconds",
        "30",
        "one request to Graph; the whole send keeps `mailRelay.smtp.sendDeadlineSeconds`",
    ),
    whole(
        "mailRelay.graph.maxConcurrentRequests",
        1,
        100,
        Is("4"),
        "requests to Graph in flight at once (Outlook allows 4 per mailbox)",
    ),
    whole(
        "mailRelay.graph.sentItemsLookupSeconds",
        0,
        120,
        Is("10"),
        "how long a send whose answer was lost is looked for in Sent Items (needs `Mail.Read`) before it is sent once more; 0: never looked for, never resent",
    ),
    whole(
        "mailRelay.smtp.maxConnections",
        1,
        100,
        Is("3"),
        "Exchange allows 3 per mailbox",
    ),
    seconds("mailRelay.smtp.connectTimeoutSeconds", "10", ""),
    seconds("mailRelay.smtp.commandTimeoutSeconds", "30", ""),
    seconds(
        "mailRelay.smtp.sendDeadlineSeconds",
        "60",
        "the whole send with retries; warning if not below `limits.requestTimeoutSeconds`",
    ),
    text(
        "mailRelay.smtp.caFile",
        Unset,
        "extra CA certificates (readable PEM)",
    ),
    text("mailRelay.smtp.helloName", Said("host name"), "EHLO name"),
    text(
        "mailRelay.smtp.sourceAddress",
        Said("chosen by the OS"),
        "local IP address to connect from (multi-homed hosts)",
    ),
    seconds("mailRelay.token.connectTimeoutSeconds", "5", ""),
    seconds("mailRelay.token.requestTimeoutSeconds", "15", ""),
    whole(
        "mailRelay.limits.maxBodyBytes",
        1024,
        1024 * MIB,
        Is("52428800"),
        "a request body",
    ),
    whole(
        "mailRelay.limits.maxMessageBytes",
        1024,
        1024 * MIB,
        Is("36700160"),
        "the encoded mail (35 MiB, Exchange's default; base64 counted)",
    ),
    whole("mailRelay.limits.maxRecipients", 1, 100_000, Is("500"), ""),
    whole(
        "mailRelay.limits.maxInFlightBytes",
        65_536,
        64 * 1024 * MIB,
        Is("104857600"),
        "bytes of request bodies all requests hold at once (100 MiB; see [Memory](#memory-per-request-and-the-budget))",
    ),
    seconds("mailRelay.limits.requestTimeoutSeconds", "120", ""),
    flag(
        "mailRelay.auth.allowAnonymous",
        "false",
        "`true` only with delivery `outbox`",
    ),
    text(
        "mailRelay.auth.trustedProxy.userHeader",
        Unset,
        "header naming the user; required, with `sources`, when any `trustedProxy` key is set",
    ),
    text(
        "mailRelay.auth.trustedProxy.secretHeader",
        Unset,
        "header carrying a shared secret the proxy sends (set both it and `secret`)",
    ),
    text(
        "mailRelay.auth.trustedProxy.secret",
        Unset,
        "that shared secret",
    )
    .secret(),
    text(
        "mailRelay.auth.oidc.issuer",
        Unset,
        "the token issuer, e.g. `https://login.microsoftonline.com/<tenant>/v2.0`; required when any `oidc` key is set",
    ),
    text(
        "mailRelay.auth.oidc.audience",
        Unset,
        "the relay's application ID URI or client id; required when any `oidc` key is set",
    ),
    text(
        "mailRelay.auth.oidc.jwksUri",
        Unset,
        "the issuer's signing keys (https); required when any `oidc` key is set",
    ),
    choice(
        "mailRelay.auth.oidc.userClaim",
        || USER_CLAIMS.join(", "),
        Is("preferred_username"),
        "the claim that names the user",
    ),
    whole(
        "mailRelay.auth.oidc.clockSkewSeconds",
        0,
        300,
        Is("60"),
        "",
    ),
    whole(
        "mailRelay.sendAs.denialMemorySeconds",
        0,
        DAY,
        Is("300"),
        "how long a SendAsDenied from Exchange is remembered, refusing that From at once",
    ),
    whole(
        "mailRelay.rateLimits.mailboxMessagesPerMinute",
        0,
        100_000,
        Said("30 (1000 with delivery `graph`)"),
        "0 = off",
    ),
    whole(
        "mailRelay.rateLimits.mailboxRecipientsPerDay",
        0,
        10_000_000,
        Is("10000"),
        "to + cc + bcc; 0 = off; not below `mailRelay.limits.maxRecipients`",
    ),
    whole(
        "mailRelay.rateLimits.callerMessagesPerMinute",
        0,
        100_000,
        Said("a quarter of `mailboxMessagesPerMinute` (7); 0 when that is off"),
        "0 = off",
    ),
    whole(
        "mailRelay.rateLimits.callerRecipientsPerDay",
        0,
        10_000_000,
        Said(
            "a quarter of `mailboxRecipientsPerDay` (2500), at least `limits.maxRecipients`; 0 when that is off",
        ),
        "to + cc + bcc; 0 = off; not below `mailRelay.limits.maxRecipients`",
    ),
    whole(
        "mailRelay.idempotency.ttlSeconds",
        1,
        7 * DAY,
        Is("86400"),
        "counted from the answer; a request still running is never forgotten",
    ),
    whole(
        "mailRelay.idempotency.maxEntries",
        1,
        10_000_000,
        Is("100000"),
        "beyond it, the oldest answers of the caller holding the most are forgotten first: one caller's flood of keys never pushes out another's",
    ),
    // At least 1 MiB, so the largest success answer always fits. 32 MiB is an eighth of the
    // 256 MiB container, and days of the 10,000 mails a day one mailbox may send.
    whole(
        "mailRelay.idempotency.maxBytes",
        MIB,
        1024 * MIB,
        Is("33554432"),
        "memory the kept answers may hold, estimated (32 MiB); beyond it, the oldest answers of the caller holding the most bytes are forgotten first",
    ),
    text(
        "mailRelay.store.url",
        Is("memory"),
        "`memory` (one instance, forgotten on restart), `sqlite:/path/file.db` (one instance, durable: a file on a volume), `postgres://user@host:5432/database?sslmode=verify-full&sslrootcert=/ca.pem` (any number of replicas)",
    ),
    text(
        "mailRelay.store.password",
        Unset,
        "the PostgreSQL password; never in the URL (a URL with one is refused)",
    )
    .secret(),
    whole(
        "mailRelay.store.maxConnections",
        1,
        1_000,
        Is("10"),
        "the PostgreSQL pool per replica (SQLite uses one connection: one writer at a time)",
    ),
    whole(
        "mailRelay.store.connectTimeoutSeconds",
        1,
        120,
        Is("5"),
        "a new connection, and every query, within it",
    ),
    text(
        "mailRelay.http.basePath",
        Said("unset (root)"),
        "path prefix every route is served under, e.g. `/osweb/mail`: `POST /osweb/mail/mail`, `/osweb/mail/health/ready`, `/osweb/mail/openapi.json`. Starts with `/`, no trailing `/`, no `.`/`..` or empty segments; letters, digits, `/-_.~` only. The OpenAPI document then lists it under `servers`. Nothing is served outside it",
    ),
    choice(
        "mailRelay.http.forwardedHeader",
        forwarded_headers,
        Is("X-Forwarded-For"),
        "`Forwarded` is RFC 7239's. Only this one is read, because a proxy passes the other through as the client wrote it",
    ),
    // 75 s: above nginx's 60 s upstream keep-alive, so nginx never reuses a connection the
    // relay is closing.
    whole(
        "mailRelay.http.headerReadTimeoutSeconds",
        1,
        3_600,
        Is("75"),
        "how long a connection may go without a request in progress — from being accepted (before its protocol is known) to a complete request head, and between requests on a kept-alive HTTP/1 or HTTP/2 connection; then it is closed. Keep your proxy's upstream keep-alive idle time below it (nginx's `keepalive_timeout` in an `upstream` block: 60 s by default), or it may reuse a connection the relay is just closing",
    ),
    whole(
        "mailRelay.http.maxConnections",
        1,
        1_000_000,
        Is("1024"),
        "open connections on the main listener at most; one more is closed at once, counted in `mail_relay_http_connections_refused_total` and logged (one WARN line at most every 10 s, with the count). Each connection is one file descriptor: keep this plus `mailRelay.smtp.maxConnections` plus about 50 below the container's limit (`ulimit -n`; Docker and containerd usually give 1048576, some hosts 1024). The `/metrics` listener of its own (`mailRelay.metrics.port`) has a fixed cap of 32, so scrapes get through when the main one is full",
    ),
    // 8 KiB is hyper's smallest read buffer for HTTP/1: a smaller head limit cannot be set.
    whole(
        "mailRelay.http.maxHeaderBytes",
        8 * 1024,
        MIB,
        Is("16384"),
        "the request line and headers (HTTP/1) or the header list (HTTP/2, announced as `SETTINGS_MAX_HEADER_LIST_SIZE`) at most; more is answered `431`. nginx passes on heads of up to 32 KiB by default (`large_client_header_buffers 4 8k`: 4 buffers, no line over 8 KiB); one over this limit is then answered `431` here. Raise it when callers send large cookies or tokens",
    ),
    flag(
        "mailRelay.http.docs",
        "true",
        "serve the API reference page `GET /docs`",
    ),
    whole(
        "mailRelay.shutdown.drainDelaySeconds",
        0,
        3_600,
        Is("5"),
        "after SIGTERM, requests are still accepted this long while readiness already answers 503, so load balancers notice before connections are refused",
    ),
    // 70 s: a send accepted at the end of the 5 s drain delay still has the default
    // `sendDeadlineSeconds` (60) to finish.
    seconds(
        "mailRelay.shutdown.deadlineSeconds",
        "70",
        "from SIGTERM to exit at the latest; above `drainDelaySeconds`",
    ),
    flag(
        "mailRelay.adminMail.enabled",
        "false",
        "mail the administrators what they must fix",
    ),
    text(
        "mailRelay.adminMail.from",
        Said("`smtpUsername`"),
        "must equal `featureSwitches.sendEmail.smtpUsername` (the mailbox may always send as itself); a different value is an error naming both keys",
    ),
    text(
        "mailRelay.metrics.address",
        Said("`server.address`"),
        "IP of the separate metrics listener; needs `port`",
    ),
    whole(
        "mailRelay.metrics.port",
        0,
        65_535,
        Said("none (main listener)"),
        "when set, `/metrics` is served only there",
    ),
    choice(
        "mailRelay.log.format",
        || listed(LogFormat::CHOICES),
        Is("json"),
        "`json` writes one object a line",
    ),
    text(
        "mailRelay.log.level",
        Is("info"),
        "`RUST_LOG` syntax, e.g. `info,mail_relay=debug`",
    ),
];

/// Sections under `mailRelay` that hold lists or maps (API keys, policies): the loader hands
/// each one, as a tree, to its section's parser instead of reading single values.
/// From the environment they take a comma-separated list (`a@x.com,b@x.com`) or, starting
/// with `[` or `{`, YAML flow text (`[{name: billing, sha256: ..., allowedFrom: [...]}]`).
pub const SUBTREES: &[KeySpec] = &[
    tree(
        "mailRelay.auth.apiKeys",
        Said("none"),
        "list of `{name, sha256 (64 hex digits, from mail-relay hash-key), allowedFrom: [address or \"*@domain\"], identities: [names] (optional: the sending identities it may use)}`",
    ),
    tree(
        "mailRelay.auth.trustedProxy.sources",
        Unset,
        "the proxy's IP addresses or CIDR blocks; required, with `userHeader`, when any `trustedProxy` key is set",
    ),
    tree(
        "mailRelay.sendAs.delegates",
        Said("none"),
        "map `mailbox: [user address or group:NAME]`",
    ),
    tree(
        "mailRelay.sendAs.groups",
        Said("none"),
        "map `name: [user addresses]`",
    ),
    tree(
        "mailRelay.sendAs.exchangeGrants",
        Said("not checked"),
        "list of addresses or `\"*@domain\"` that granted Send As",
    ),
    tree(
        "mailRelay.cors.allowedOrigins",
        Said("none"),
        "origins `scheme://host[:port]`",
    ),
    tree(
        "mailRelay.http.trustedProxies",
        Said("none"),
        "IP addresses or CIDR blocks of the reverse proxies whose forwarding header is believed",
    ),
    tree(
        "mailRelay.adminMail.recipients",
        Said("none"),
        "addresses; required when enabled (env: `ops@contoso.com,it@contoso.com`)",
    ),
    tree(
        "mailRelay.identities",
        Said("none"),
        "more sending identities, each serving its `from` addresses; see [Several mailboxes](#several-mailboxes)",
    ),
    tree(
        "mailRelay.defaultIdentity.from",
        Said("every From (with other identities: `smtpUsername` only)"),
        "which From addresses `featureSwitches.sendEmail` serves",
    ),
];

fn managed_identities() -> String {
    format!(
        "{} (Azure VMs and scale sets), {} (App Service, Functions, Container Apps)",
        ManagedKind::Imds.name(),
        ManagedKind::AppService.name()
    )
}

fn forwarded_headers() -> String {
    format!(
        "{} (the header your proxy appends the client to)",
        listed(ForwardedHeader::CHOICES)
    )
}
