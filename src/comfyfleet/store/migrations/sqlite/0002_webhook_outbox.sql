-- The webhook outbox: one delivery per task that ends (completed, failed, cancelled) with a webhook URL.
-- The trigger writes it in the same transaction as the status change, so no ending is ever without its
-- delivery, whoever made the change (dispatcher, API, gateway) and whatever crashes afterwards.

CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    -- The Standard Webhooks "webhook-id": the same on every retry, so receivers can deduplicate.
    message_id TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    lease_owner TEXT,
    lease_expires_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    delivered_at TEXT,
    last_status_code INTEGER,
    last_error TEXT,
    history TEXT NOT NULL DEFAULT '[]'
);

-- Deliveries waiting for their next attempt; finished ones cost nothing here.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TRIGGER tasks_webhook_outbox AFTER UPDATE OF status ON tasks
WHEN NEW.status IN ('completed', 'failed', 'cancelled')
    AND OLD.status NOT IN ('completed', 'failed', 'cancelled')
    AND NEW.webhook IS NOT NULL
    AND json_extract(NEW.webhook, '$.url') IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO webhook_deliveries
        (task_id, tenant, url, event, message_id, next_attempt_at, created_at, updated_at)
    VALUES
        (NEW.id, NEW.tenant, json_extract(NEW.webhook, '$.url'), 'task.' || NEW.status, 'msg_' || NEW.id,
         NEW.updated_at, NEW.updated_at, NEW.updated_at);
END;
