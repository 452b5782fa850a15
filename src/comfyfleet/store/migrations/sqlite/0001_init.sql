-- Tasks and workers. Times are UTC ISO-8601 text with microseconds and a "+00:00" suffix, always the same
-- width, so text order is time order. JSON columns hold JSON text.

CREATE TABLE tasks (
    -- seq is the rowid: strictly increasing (AUTOINCREMENT never reuses a value), the FIFO order within a
    -- priority and the paging cursor.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    workflow_id TEXT,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    phase TEXT CHECK (phase IN ('dispatching', 'queued_on_worker', 'executing')),
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
    attempts TEXT NOT NULL DEFAULT '[]'
);

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

CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    provider TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    endpoint TEXT,
    provider_id TEXT,
    current_task_ids TEXT NOT NULL DEFAULT '[]',
    last_active_at TEXT,
    health_failures INTEGER NOT NULL DEFAULT 0,
    loaded_models TEXT NOT NULL DEFAULT '[]',
    node_types TEXT,
    error TEXT,
    labels TEXT NOT NULL DEFAULT '{}',
    info TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX workers_pool ON workers (pool, created_at);
