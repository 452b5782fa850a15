"""Every SQL statement of the store, written once.

Both dialects speak almost the same SQL. :class:`Statements` writes each statement once, in that common SQL,
with named parameters (``:name``); a dialect subclass (in ``sqlite.py`` and ``postgres.py``) fills in the few
tokens where the two differ — whose clock is "now", how a list is bound, how rows are picked (and locked)
for an update, how JSON is appended to — and overrides a whole statement only where its SQL must differ.

The shared store passes every statement the same named parameters; a dialect uses those it needs (SQLite's
``:now`` is the application's clock; PostgreSQL ignores it and uses the database's, so that replicas agree).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

from comfyfleet.store._asset_statements import AssetStatements
from comfyfleet.store._rows import QUEUE_ORDER, TASK_COLUMNS, WEBHOOK_COLUMNS, WORKER_COLUMNS

# A write about an attempt applies only while its lease is current: the fencing condition.
FENCE = "id = :task_id AND status = 'running' AND attempt = :attempt AND lease_owner = :owner"
# What an attempt leaves behind when it ends or gives its task back.
LEAVE_RUNNING = "phase = NULL, lease_owner = NULL, lease_expires_at = NULL"


def base64_size(text: str) -> str:
    """The byte size of base64 ``text`` (an SQL expression), without decoding it."""
    return f"length({text}) * 3 / 4 - (length({text}) - length(rtrim({text}, '=')))"


class Statements(AssetStatements):
    """The SQL of one dialect. Subclasses set the tokens below; the statements are built once, on first use."""

    # The migrations folder of this dialect.
    dialect: str
    # The current time, in SQL.
    now: str
    # The end of a lease of ``:lease_s`` seconds from now, in SQL.
    lease_expiry: str
    # The ``tasks`` table read in queue order, and by tenant then queue order (SQLite names the indexes its
    # planner would not pick on a database that was never analysed).
    pending_by_order = "tasks"
    pending_by_tenant = "tasks"

    def in_list(self, column: str, parameter: str) -> str:
        """The condition "``column`` is one of the list bound as ``parameter``"."""
        raise NotImplementedError

    def pick(self, key: str, subselect: str) -> str:
        """The condition that an ``UPDATE`` applies to the rows ``subselect`` picks (by ``key``), locking them
        where concurrent claimers exist so that none waits for or takes the same row."""
        raise NotImplementedError

    def append_json(self, column: str, fields: str) -> str:
        """``column`` (a JSON array) with one more object made of ``fields`` (``'key', value, …``)."""
        raise NotImplementedError

    def seconds_since(self, column: str) -> str:
        raise NotImplementedError

    def as_json(self, parameter: str) -> str:
        """A JSON parameter where SQL cannot tell its type from the context."""
        return f":{parameter}"

    # A task's input files as lists show them: each spec without its base64 ``data``, with the decoded ``size``.
    inputs_summary: str

    @cached_property
    def listed_task_columns(self) -> str:
        """The columns of a task list, in ``TASK_COLUMNS``'s order, without what lists do not show: the payload
        (NULL, read as ``{}``) and the input files' bytes. A list of large tasks reads kilobytes, not megabytes."""
        columns = {"payload": "NULL AS payload", "inputs": f"{self.inputs_summary} AS inputs"}
        return ", ".join(columns.get(name, name) for name in TASK_COLUMNS.split(", "))

    # -- fragments ----------------------------------------------------------------------------
    @cached_property
    def runnable(self) -> str:
        """Pending and due: the peeks, the claims, the queue positions and the demand agree on it exactly."""
        return f"status = 'pending' AND (not_before IS NULL OR not_before <= {self.now})"

    @cached_property
    def in_pools(self) -> str:
        """The pool filter (see ``_common.pool_filter`` for its parameters)."""
        return f"(:any_pool OR {self.in_list('pool', 'pools')} OR (:null_pool AND pool IS NULL))"

    def fenced(self, assignments: str, *, unless_cancel_requested: bool = False) -> str:
        """``UPDATE`` one running attempt if its lease is current; return the task."""
        condition = f"{FENCE} AND NOT cancel_requested" if unless_cancel_requested else FENCE
        return f"UPDATE tasks SET {assignments}, updated_at = {self.now} WHERE {condition} RETURNING {TASK_COLUMNS}"

    def ended_attempt(self) -> str:
        """The attempt that ends, appended to ``attempts`` (the row's values are the old ones)."""
        return "attempts = " + self.append_json(
            "attempts",
            "'attempt', attempt, 'owner', lease_owner, 'worker_id', worker_id, 'prompt_id', prompt_id, "
            f"'started_at', attempt_started_at, 'ended_at', {self.now}, 'outcome', CAST(:outcome AS TEXT), "
            "'error', CAST(:error AS TEXT), 'kind', CAST(:kind AS TEXT)",
        )

    # -- submission and reading -------------------------------------------------------------------
    @cached_property
    def insert_task(self) -> str:
        return (
            "INSERT INTO tasks (id, tenant, workflow_id, priority, status, payload, created_at, updated_at, "
            "max_retries, timeout_s, idempotency_key, pool, inputs, webhook, metadata, models) "
            f"VALUES (:id, :tenant, :workflow_id, :priority, 'pending', :payload, {self.now}, {self.now}, "
            ":max_retries, :timeout_s, :idempotency_key, :pool, :inputs, :webhook, :metadata, :models) "
            "ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING "
            "RETURNING seq, created_at"
        )

    task_by_idempotency_key = (
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE tenant = :tenant AND idempotency_key = :idempotency_key"
    )
    get_task = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = :id AND (CAST(:tenant AS TEXT) IS NULL OR tenant = :tenant)"
    task_status = (
        "SELECT status FROM tasks WHERE id = :id AND (CAST(:tenant AS TEXT) IS NULL OR tenant = :tenant)"
    )

    def list_tasks(self, filters: Iterable[str]) -> str:
        where = " AND ".join(filters) or "TRUE"
        return f"SELECT {self.listed_task_columns} FROM tasks WHERE {where} ORDER BY seq DESC LIMIT :limit"

    @cached_property
    def list_filters(self) -> dict[str, str]:
        """The condition for each filter of ``list_tasks``, by the name of its parameter."""
        return {
            "tenant": "tenant = :tenant",
            "statuses": self.in_list("status", "statuses"),
            "workflow_id": "workflow_id = :workflow_id",
            "before_seq": "seq < :before_seq",
        }

    # A task's place: its status, priority and seq, then :attr:`tasks_ahead`.
    queue_position = "SELECT status, priority, seq FROM tasks WHERE id = :id"
    # Pending tasks not due yet: few (retries waiting), found through their own small index.
    pending_due = "tasks"

    @cached_property
    def tasks_ahead(self) -> str:
        """How many runnable tasks come before a task of ``:priority`` and ``:seq`` in claim order, without
        walking the backlog: the pending tasks of higher priority from ``pending_totals`` and of earlier blocks
        of its own priority from ``pending_counts`` (kept by triggers, migration 0008), a count inside its own
        block of 1,024 seq values (``:block_start`` to ``:seq``), less the pending tasks ahead that are not
        due yet."""
        blocks = "SELECT coalesce(sum(n), 0) FROM pending_counts WHERE priority"
        in_block = (
            f"SELECT count(*) FROM {self.pending_by_order} WHERE status = 'pending' AND priority = :priority "
            "AND seq >= :block_start AND seq < :seq"
        )
        not_due = (
            f"SELECT count(*) FROM {self.pending_due} WHERE status = 'pending' AND not_before IS NOT NULL "
            f"AND not_before > {self.now} AND (priority > :priority OR (priority = :priority AND seq < :seq))"
        )
        higher = "SELECT coalesce(sum(n), 0) FROM pending_totals WHERE priority > :priority"
        return f"SELECT ({higher}) + ({blocks} = :priority AND bucket < :block) + ({in_block}) - ({not_due})"

    @staticmethod
    def tasks_by_status(*, of_tenant: bool) -> str:
        """``(status, count)`` rows, for everyone or for ``:tenant``, from the counters of migration 0008."""
        scope = "WHERE tenant = :tenant " if of_tenant else ""
        return f"SELECT status, CAST(sum(n) AS BIGINT) FROM task_counts {scope}GROUP BY status"

    def oldest_pending_age(self, *, of_tenant: bool) -> str:
        """The age in seconds of the oldest pending task, for everyone or for ``:tenant``."""
        scope = "AND tenant = :tenant " if of_tenant else ""
        return (
            f"SELECT {self.seconds_since('created_at')} FROM tasks WHERE status = 'pending' {scope}"
            "ORDER BY seq LIMIT 1"
        )

    @cached_property
    def demand_by_pool(self) -> str:
        return (
            f"SELECT pool, sum(CASE WHEN {self.runnable} THEN 1 ELSE 0 END), "
            "sum(CASE WHEN status = 'running' THEN 1 ELSE 0 END) "
            "FROM tasks WHERE status IN ('pending', 'running') GROUP BY pool"
        )

    count_by_status_and_priority = (
        "SELECT status, priority, count(*) FROM tasks GROUP BY status, priority ORDER BY status, priority"
    )

    # -- cancel and priority ----------------------------------------------------------------------
    @cached_property
    def cancel_task(self) -> str:
        # Pending: cancelled at once. Running: flagged for the dispatcher that owns it.
        return (
            "UPDATE tasks SET cancel_requested = (status = 'running') OR cancel_requested, "
            f"completed_at = CASE WHEN status = 'pending' THEN {self.now} ELSE completed_at END, "
            "error = CASE WHEN status = 'pending' THEN 'cancelled by request' ELSE error END, "
            "error_kind = CASE WHEN status = 'pending' THEN 'cancelled' ELSE error_kind END, "
            "status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END, "
            f"updated_at = {self.now} "
            "WHERE id = :id AND (CAST(:tenant AS TEXT) IS NULL OR tenant = :tenant) "
            f"AND status IN ('pending', 'running') RETURNING {TASK_COLUMNS}"
        )

    @cached_property
    def set_priority(self) -> str:
        return (
            f"UPDATE tasks SET priority = :priority, updated_at = {self.now} "
            "WHERE id = :id AND (CAST(:tenant AS TEXT) IS NULL OR tenant = :tenant) AND status = 'pending' "
            f"RETURNING {TASK_COLUMNS}"
        )

    # -- the dispatcher's side --------------------------------------------------------------------
    @cached_property
    def peek_pending(self) -> str:
        return (
            f"SELECT {TASK_COLUMNS} FROM {self.pending_by_order} WHERE {self.runnable} AND {self.in_pools} "
            f"ORDER BY {QUEUE_ORDER} LIMIT :limit"
        )

    @cached_property
    def pending_tenants(self) -> str:
        """The tenants with pending tasks, one index probe each (a loose scan of ``tasks_pending_tenant``),
        never a walk over every pending task."""
        return (
            "WITH RECURSIVE tenants(name) AS ("
            f" SELECT min(tenant) FROM {self.pending_by_tenant} WHERE status = 'pending'"
            " UNION ALL"
            f" SELECT (SELECT min(tenant) FROM {self.pending_by_tenant} WHERE status = 'pending'"
            " AND tenant > tenants.name) FROM tenants WHERE name IS NOT NULL)"
        )

    @cached_property
    def peek_pending_per_tenant(self) -> str:
        """The head of every tenant's queue (:meth:`tenant_head` for each of :attr:`pending_tenants`)."""
        raise NotImplementedError

    def tenant_head(self, selected: str) -> str:
        """The first ``:limit`` runnable tasks of the tenant ``tenants.name``, for ``peek_pending_per_tenant``."""
        return (
            f"SELECT {selected} FROM {self.pending_by_tenant} WHERE tenant = tenants.name AND {self.runnable} "
            f"AND {self.in_pools} ORDER BY {QUEUE_ORDER} LIMIT :limit"
        )

    running_per_tenant = "SELECT tenant, count(*) FROM tasks WHERE status = 'running' GROUP BY tenant"

    @cached_property
    def start_attempt(self) -> str:
        """What claiming does to a task: a new attempt, dispatching, leased to ``:owner``."""
        return (
            "status = 'running', phase = 'dispatching', attempt = attempt + 1, "
            f"started_at = coalesce(started_at, {self.now}), attempt_started_at = {self.now}, "
            f"lease_owner = :owner, lease_expires_at = {self.lease_expiry}, worker_id = NULL, prompt_id = NULL, "
            f"progress = NULL, updated_at = {self.now}"
        )

    @cached_property
    def claim_ids(self) -> str:
        picked = f"SELECT seq FROM tasks WHERE {self.in_list('id', 'ids')} AND {self.runnable}"
        return (
            f"UPDATE tasks SET {self.start_attempt} WHERE {self.pick('seq', picked)} RETURNING {TASK_COLUMNS}"
        )

    def claim_assigned(self, count: int) -> str:
        """``claim_ids`` that also writes each task's worker and prompt id (``:assigned_id_<n>``,
        ``:assigned_worker_<n>``, ``:assigned_prompt_<n>``): the dispatch record, in the claim's write."""
        cached = self._claims_assigned.get(count)
        if cached is None:

            def case(column: str) -> str:
                whens = " ".join(f"WHEN :assigned_id_{n} THEN :assigned_{column}_{n}" for n in range(count))
                return f"CASE id {whens} END"

            cached = self._claims_assigned[count] = self.claim_ids.replace(
                "worker_id = NULL, prompt_id = NULL",
                f"worker_id = {case('worker')}, prompt_id = {case('prompt')}",
            )
        return cached

    @cached_property
    def _claims_assigned(self) -> dict[int, str]:
        return {}

    @cached_property
    def renew_leases(self) -> str:
        return (
            f"UPDATE tasks SET lease_expires_at = {self.lease_expiry} "
            f"WHERE {self.in_list('id', 'ids')} AND status = 'running' AND lease_owner = :owner RETURNING seq"
        )

    # Why a fenced write changed nothing.
    lease_holder = "SELECT status, attempt, lease_owner FROM tasks WHERE id = :task_id"
    cancel_requested = f"SELECT cancel_requested FROM tasks WHERE {FENCE}"

    @cached_property
    def record_dispatch(self) -> str:
        return self.fenced("worker_id = :worker_id, prompt_id = :prompt_id")

    @cached_property
    def set_phase(self) -> str:
        return self.fenced(f"phase = :phase, progress = coalesce({self.as_json('progress')}, progress)")

    @cached_property
    def set_progress(self) -> str:
        return f"UPDATE tasks SET progress = :progress, updated_at = {self.now} WHERE {FENCE} RETURNING seq"

    @cached_property
    def complete_task(self) -> str:
        return self.fenced(
            f"status = 'completed', result = :result, completed_at = {self.now}, error = NULL, "
            f"progress = coalesce({self.as_json('progress')}, progress), "
            f"error_kind = NULL, error_details = NULL, {LEAVE_RUNNING}, {self.ended_attempt()}"
        )

    @cached_property
    def fail_task(self) -> str:
        return self.fenced(
            f"status = 'failed', error = :error, error_kind = :kind, error_details = :details, "
            f"completed_at = {self.now}, {LEAVE_RUNNING}, {self.ended_attempt()}"
        )

    @cached_property
    def finish_cancelled(self) -> str:
        return self.fenced(
            f"status = 'cancelled', error = :error, error_kind = 'cancelled', completed_at = {self.now}, "
            f"{LEAVE_RUNNING}, {self.ended_attempt()}"
        )

    @cached_property
    def retry_task(self) -> str:
        return self.fenced(
            "status = 'pending', retry_count = retry_count + 1, not_before = :not_before, error = :error, "
            "error_kind = :kind, error_details = :details, worker_id = NULL, prompt_id = NULL, "
            f"attempt_started_at = NULL, progress = NULL, {LEAVE_RUNNING}, {self.ended_attempt()}",
            unless_cancel_requested=True,
        )

    @cached_property
    def release_task(self) -> str:
        # An attempt given back never ran, so it is not recorded; started_at goes back to unset if no attempt
        # ever ran.
        return self.fenced(
            "status = 'pending', worker_id = NULL, prompt_id = NULL, attempt_started_at = NULL, progress = NULL, "
            f"started_at = CASE WHEN attempts = '[]' THEN NULL ELSE started_at END, {LEAVE_RUNNING}",
            unless_cancel_requested=True,
        )

    @cached_property
    def adopt_expired(self) -> str:
        expired = (
            "SELECT seq FROM tasks WHERE status = 'running' "
            f"AND (lease_expires_at <= {self.now} OR lease_owner = :previous_owner) "
            "ORDER BY lease_expires_at LIMIT :limit"
        )
        return (
            f"UPDATE tasks SET lease_owner = :owner, lease_expires_at = {self.lease_expiry}, "
            f"attempt = attempt + 1, updated_at = {self.now} WHERE {self.pick('seq', expired)} "
            f"RETURNING {TASK_COLUMNS}"
        )

    running_tasks = (
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'running' "
        "AND (CAST(:owner AS TEXT) IS NULL OR lease_owner = :owner) ORDER BY seq"
    )

    @cached_property
    def next_due_at(self) -> str:
        return (
            "SELECT min(not_before) FROM tasks WHERE status = 'pending' AND not_before IS NOT NULL "
            f"AND not_before > {self.now}"
        )

    # -- workers ----------------------------------------------------------------------------------
    @cached_property
    def update_worker_activity(self) -> str:
        owned = "CASE WHEN CAST(:owner AS BOOLEAN) THEN"
        return (
            "UPDATE workers SET current_task_ids = :current_task_ids, last_active_at = :last_active_at, "
            f"loaded_models = :loaded_models, updated_at = {self.now}, "
            f"state = {owned} CAST(:state AS TEXT) ELSE state END, "
            f"info = {owned} {self.as_json('info')} ELSE info END "
            "WHERE id = :id AND state <> 'terminated' RETURNING id"
        )

    @cached_property
    def upsert_worker(self) -> str:
        # created_at is the first record's: a worker is created once, however often it is updated.
        return (
            f"INSERT INTO workers ({WORKER_COLUMNS}) VALUES (:id, :pool, :provider, :state, :created_at, "
            f"{self.now}, :endpoint, :provider_id, :current_task_ids, :last_active_at, :health_failures, "
            ":loaded_models, :node_types, :error, :labels, :info) "
            "ON CONFLICT (id) DO UPDATE SET pool = excluded.pool, provider = excluded.provider, "
            "state = excluded.state, updated_at = excluded.updated_at, endpoint = excluded.endpoint, "
            "provider_id = excluded.provider_id, current_task_ids = excluded.current_task_ids, "
            "last_active_at = excluded.last_active_at, health_failures = excluded.health_failures, "
            "loaded_models = excluded.loaded_models, node_types = excluded.node_types, error = excluded.error, "
            f"labels = excluded.labels, info = excluded.info RETURNING {WORKER_COLUMNS}"
        )

    get_worker = f"SELECT {WORKER_COLUMNS} FROM workers WHERE id = :id"
    list_workers = (
        f"SELECT {WORKER_COLUMNS} FROM workers WHERE (CAST(:pool AS TEXT) IS NULL OR pool = :pool) "
        "AND (:include_gone OR state != 'terminated') ORDER BY created_at, id"
    )
    delete_worker = "DELETE FROM workers WHERE id = :id"
    workers_by_state = "SELECT state, count(*) FROM workers GROUP BY state"

    # -- webhook outbox ---------------------------------------------------------------------------
    @cached_property
    def claim_webhook_deliveries(self) -> str:
        due = (
            "SELECT id FROM webhook_deliveries WHERE status = 'pending' "
            f"AND next_attempt_at <= {self.now} AND (lease_expires_at IS NULL OR lease_expires_at <= {self.now}) "
            "ORDER BY next_attempt_at, id LIMIT :limit"
        )
        return (
            f"UPDATE webhook_deliveries SET lease_owner = :owner, lease_expires_at = {self.lease_expiry}, "
            f"updated_at = {self.now} WHERE {self.pick('id', due)} RETURNING {WEBHOOK_COLUMNS}"
        )

    @cached_property
    def record_webhook_attempt(self) -> str:
        entry = (
            f"'attempt', attempts + 1, 'at', {self.now}, 'status_code', CAST(:status_code AS INTEGER), "
            "'error', CAST(:error AS TEXT), 'duration_ms', CAST(:duration_ms AS DOUBLE PRECISION)"
        )
        return (
            "UPDATE webhook_deliveries SET status = :status, attempts = attempts + 1, "
            "next_attempt_at = coalesce(:next_attempt_at, next_attempt_at), lease_owner = NULL, "
            f"lease_expires_at = NULL, updated_at = {self.now}, "
            f"delivered_at = CASE WHEN :status = 'delivered' THEN {self.now} ELSE delivered_at END, "
            f"last_status_code = :status_code, last_error = :error, history = {self.append_json('history', entry)} "
            f"WHERE id = :id AND lease_owner = :owner AND status = 'pending' RETURNING {WEBHOOK_COLUMNS}"
        )

    webhook_deliveries = (
        f"SELECT {WEBHOOK_COLUMNS} FROM webhook_deliveries WHERE task_id = :task_id ORDER BY id"
    )
    next_webhook_due_at = "SELECT min(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'"

    # -- idempotency keys held apart from tasks --------------------------------------------------
    @cached_property
    def claim_idempotency_key(self) -> str:
        """Claim ``:key`` of ``:tenant`` for ``:task_id`` until the end of ``:lease_s`` seconds, unless a claim
        whose time has not run out holds it: then nothing is returned."""
        return (
            "INSERT INTO idempotency_keys (tenant, key, task_id, expires_at) "
            f"VALUES (:tenant, :key, :task_id, {self.lease_expiry}) "
            "ON CONFLICT (tenant, key) DO UPDATE SET task_id = excluded.task_id, expires_at = excluded.expires_at "
            f"WHERE idempotency_keys.expires_at <= {self.now} RETURNING task_id"
        )

    idempotency_key_holder = "SELECT task_id FROM idempotency_keys WHERE tenant = :tenant AND key = :key"
    release_idempotency_key = (
        "DELETE FROM idempotency_keys WHERE tenant = :tenant AND key = :key AND task_id = :task_id"
    )

    @cached_property
    def purge_idempotency_keys(self) -> str:
        return f"DELETE FROM idempotency_keys WHERE expires_at <= {self.now} RETURNING key"

    # -- schema -----------------------------------------------------------------------------------
    schema_version = "SELECT max(version) FROM schema_migrations"
    installation_id = "SELECT id FROM installation"
