-- A queued mail remembers the Idempotency-Key it came with, in the same row and commit as the
-- mail: a replica killed between that commit and storing the key's answer leaves a claim that
-- expires, and the retry then finds this mail instead of queueing it a second time.
ALTER TABLE queued_mails ADD COLUMN idempotency_key TEXT;
ALTER TABLE queued_mails ADD COLUMN fingerprint BYTEA;  -- the request's (Idempotency-Key)
-- NULL keys are distinct: mails without a key never conflict.
CREATE UNIQUE INDEX queued_mails_idempotency ON queued_mails (caller, idempotency_key);
