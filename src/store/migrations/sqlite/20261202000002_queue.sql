-- The durable outbox: mails accepted with `Prefer: respond-async` (or `queue: always`) until a
-- worker delivers them, then their outcome until `retentionSeconds` pass. Times are Unix ms.
CREATE TABLE queued_mails (
    id              TEXT    PRIMARY KEY,  -- the relay's mail id (UUIDv7)
    caller          TEXT    NOT NULL,     -- key:<name>, user:<address> or anonymous
    message_id      TEXT    NOT NULL,
    mail_from       TEXT    NOT NULL,     -- the envelope sender
    recipients      TEXT    NOT NULL,     -- JSON array of envelope recipients
    mime            BLOB    NOT NULL,     -- the message as DATA carries it
    bytes           BIGINT  NOT NULL,
    state           TEXT    NOT NULL,     -- queued, sending, sent, failed, expired, unknown
    created_at      BIGINT  NOT NULL,
    expires_at      BIGINT  NOT NULL,     -- maxAgeSeconds after created_at
    next_attempt_at BIGINT  NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    claimed_by      TEXT,                 -- <replica>/<worker> while sending
    claim_until     BIGINT,               -- the claim's lease
    uploading_at    BIGINT,               -- set right before DATA: the server may have it now
    history         TEXT    NOT NULL DEFAULT '[]',  -- JSON attempts (first and latest 19)
    accepted        TEXT,                 -- JSON recipients the server accepted (sent)
    problem         TEXT,                 -- JSON problem object (failed)
    finished_at     BIGINT
);
-- The claim: the queued mail due longest.
CREATE INDEX queued_mails_due ON queued_mails (state, next_attempt_at);
-- The sweep of dead claims and the retention.
CREATE INDEX queued_mails_claims ON queued_mails (state, claim_until);
CREATE INDEX queued_mails_finished ON queued_mails (finished_at);
