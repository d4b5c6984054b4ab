-- What is still to tell about a mail that ended failed, expired or unknown: the completion
-- webhook (due at webhook_due_at; a claim moves it to the claim's lease, a failed call to the
-- next back-off) and the administrators' batched mail (due at admin_due_at). NULL: nothing.
ALTER TABLE queued_mails ADD COLUMN webhook_due_at BIGINT;
ALTER TABLE queued_mails ADD COLUMN webhook_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE queued_mails ADD COLUMN admin_due_at BIGINT;
CREATE INDEX queued_mails_webhook_due ON queued_mails (webhook_due_at) WHERE webhook_due_at IS NOT NULL;
CREATE INDEX queued_mails_admin_due ON queued_mails (admin_due_at) WHERE admin_due_at IS NOT NULL;
