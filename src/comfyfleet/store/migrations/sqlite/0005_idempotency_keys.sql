-- Idempotency keys that are held apart from tasks, for a limited time (Comfy API v2's Idempotency-Key: used
-- once, remembered for a day). A key is claimed for the task about to be created; a claim whose time ran out
-- may be taken again. Times are UTC ISO-8601 text, as in every table.
CREATE TABLE idempotency_keys (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    task_id TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    PRIMARY KEY (tenant, key)
);
-- Sweeping out the keys whose time ran out.
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
