-- Models on demand: the model files a task brings ({url, sha256, folder, name}), and the phase in which the
-- dispatcher puts them on the chosen worker before the prompt is sent. SQLite cannot change a CHECK
-- constraint in place, so the table is rebuilt (in this migration's one transaction) with its indexes and
-- trigger, keeping every row, its seq and the sequence's high-water mark (seq never goes back).
CREATE TABLE tasks_new (
    -- seq is the rowid: strictly increasing (AUTOINCREMENT never reuses a value), the FIFO order within a
    -- priority and the paging cursor.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    workflow_id TEXT,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    phase TEXT CHECK (phase IN ('dispatching', 'fetching_models', 'queued_on_worker', 'executing')),
    payload TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    worker_id TEXT,
    started_at TEXT,
    completed_at TEXT,
    result TEXT,
    error TEXT,
    error_kind TEXT,
    error_details TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    attempt_started_at TEXT,
    prompt_id TEXT,
    timeout_s REAL NOT NULL,
    not_before TEXT,
    lease_owner TEXT,
    lease_expires_at TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    pool TEXT,
    inputs TEXT,
    webhook TEXT,
    metadata TEXT,
    progress TEXT,
    attempts TEXT NOT NULL DEFAULT '[]',
    models TEXT
);

INSERT INTO tasks_new (
    seq, id, tenant, workflow_id, priority, status, phase, payload, created_at, updated_at, worker_id,
    started_at, completed_at, result, error, error_kind, error_details, retry_count, max_retries,
    attempt, attempt_started_at, prompt_id, timeout_s, not_before, lease_owner, lease_expires_at,
    cancel_requested, idempotency_key, pool, inputs, webhook, metadata, progress, attempts
)
SELECT
    seq, id, tenant, workflow_id, priority, status, phase, payload, created_at, updated_at, worker_id,
    started_at, completed_at, result, error, error_kind, error_details, retry_count, max_retries,
    attempt, attempt_started_at, prompt_id, timeout_s, not_before, lease_owner, lease_expires_at,
    cancel_requested, idempotency_key, pool, inputs, webhook, metadata, progress, attempts
FROM tasks;

DELETE FROM sqlite_sequence WHERE name = 'tasks_new';
INSERT INTO sqlite_sequence (name, seq) SELECT 'tasks_new', seq FROM sqlite_sequence WHERE name = 'tasks';

DROP TABLE tasks;
ALTER TABLE tasks_new RENAME TO tasks;

-- The claim order. Partial, so finished tasks cost nothing here however many accumulate; not_before and
-- pool ride along so claims and queue positions filter without visiting the table.
CREATE INDEX tasks_pending_order ON tasks (priority DESC, seq, not_before, pool) WHERE status = 'pending';
-- Retries waiting for their time: tiny, serves next_due_at.
CREATE INDEX tasks_pending_due ON tasks (not_before) WHERE status = 'pending' AND not_before IS NOT NULL;
-- Lease expiry for adoption, and the running set.
CREATE INDEX tasks_running_lease ON tasks (lease_expires_at) WHERE status = 'running';
-- Listing by status newest first, counts per status, the oldest pending task.
CREATE INDEX tasks_status_seq ON tasks (status, seq);
-- Listing one tenant's tasks newest first.
CREATE INDEX tasks_tenant_seq ON tasks (tenant, seq);
-- Idempotency is enforced by the database, so two concurrent submissions with one key cannot both insert.
CREATE UNIQUE INDEX tasks_idempotency ON tasks (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;

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

-- Fair share between tenants (dispatch.fair_share): each tenant's pending tasks in claim order, so the
-- dispatcher can read the head of every tenant's queue without walking the others'.
CREATE INDEX tasks_pending_tenant ON tasks (tenant, priority DESC, seq) WHERE status = 'pending';
