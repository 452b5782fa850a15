-- The webhook outbox: one delivery per task that ends (completed, failed, cancelled) with a webhook URL.
-- The trigger writes it in the same transaction as the status change, so no ending is ever without its
-- delivery, whoever made the change (dispatcher, API, gateway) and whatever crashes afterwards.

CREATE TABLE webhook_deliveries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    -- The Standard Webhooks "webhook-id": the same on every retry, so receivers can deduplicate.
    message_id TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    lease_owner TEXT,
    lease_expires_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    delivered_at TIMESTAMPTZ,
    last_status_code INTEGER,
    last_error TEXT,
    history JSONB NOT NULL DEFAULT '[]'::jsonb
);

-- Deliveries waiting for their next attempt; finished ones cost nothing here.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

CREATE FUNCTION comfyfleet_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('completed', 'failed', 'cancelled')
        AND OLD.status NOT IN ('completed', 'failed', 'cancelled')
        AND NEW.webhook IS NOT NULL
        AND NEW.webhook->>'url' IS NOT NULL THEN
        INSERT INTO webhook_deliveries
            (task_id, tenant, url, event, message_id, next_attempt_at, created_at, updated_at)
        VALUES
            (NEW.id, NEW.tenant, NEW.webhook->>'url', 'task.' || NEW.status, 'msg_' || NEW.id, now(), now(), now())
        ON CONFLICT (task_id) DO NOTHING;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_webhook_outbox AFTER UPDATE OF status ON tasks
FOR EACH ROW EXECUTE FUNCTION comfyfleet_webhook_outbox();
