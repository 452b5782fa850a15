-- Tasks and workers. Times are timestamptz; JSON columns are jsonb.

CREATE TABLE tasks (
    -- seq is strictly increasing: the FIFO order within a priority and the paging cursor.
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    workflow_id TEXT,
    priority BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    phase TEXT CHECK (phase IN ('dispatching', 'queued_on_worker', 'executing')),
    payload JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    worker_id TEXT,
    started_at TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    result JSONB,
    error TEXT,
    error_kind TEXT,
    error_details JSONB,
    retry_count INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    attempt_started_at TIMESTAMPTZ,
    prompt_id TEXT,
    timeout_s DOUBLE PRECISION NOT NULL,
    not_before TIMESTAMPTZ,
    lease_owner TEXT,
    lease_expires_at TIMESTAMPTZ,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    idempotency_key TEXT,
    pool TEXT,
    inputs JSONB,
    webhook JSONB,
    metadata JSONB,
    progress JSONB,
    attempts JSONB NOT NULL DEFAULT '[]'::jsonb
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
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    endpoint TEXT,
    provider_id TEXT,
    current_task_ids JSONB NOT NULL DEFAULT '[]'::jsonb,
    last_active_at TIMESTAMPTZ,
    health_failures INTEGER NOT NULL DEFAULT 0,
    loaded_models JSONB NOT NULL DEFAULT '[]'::jsonb,
    node_types JSONB,
    error TEXT,
    labels JSONB NOT NULL DEFAULT '{}'::jsonb,
    info JSONB NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX workers_pool ON workers (pool, created_at);
