-- The state that replicas share (mail-relay's store). Times are Unix milliseconds (BIGINT),
-- the relay's own clock, so SQLite and PostgreSQL count alike.

-- Idempotency-Key records: a claim (status NULL) while its request runs, then the answer.
CREATE TABLE idempotency_records (
    scope       TEXT    NOT NULL,  -- the caller: key:<name>, user:<address> or anonymous
    key         TEXT    NOT NULL,
    fingerprint BLOB    NOT NULL,  -- SHA-256 of the request
    token       BIGINT  NOT NULL,  -- which claim holds the key
    expires_at  BIGINT  NOT NULL,  -- a claim's lease, then the answer's TTL
    status      INTEGER,
    headers     TEXT,              -- JSON [[name, value], ...]
    body        BLOB,
    bytes       BIGINT  NOT NULL,  -- what the record costs against maxBytes
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_records_expiry ON idempotency_records (expires_at);

-- Rate-limit windows: costs per limit, subject and bucket (1 ms per-minute, 1 min daily).
CREATE TABLE rate_counts (
    kind    TEXT   NOT NULL,
    subject TEXT   NOT NULL,
    bucket  BIGINT NOT NULL,
    cost    BIGINT NOT NULL,
    PRIMARY KEY (kind, subject, bucket)
);

-- The quota block Exchange reported: nothing fits before `until`.
CREATE TABLE rate_blocks (
    kind    TEXT   NOT NULL,
    subject TEXT   NOT NULL,
    until   BIGINT NOT NULL,
    PRIMARY KEY (kind, subject)
);

-- The send-as denial memory: From addresses Exchange refused lately.
CREATE TABLE send_as_denials (
    address   TEXT   PRIMARY KEY,
    denied_at BIGINT NOT NULL
);
