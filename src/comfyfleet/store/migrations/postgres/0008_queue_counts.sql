-- Reads that do not grow with the queue (issue 11): counts kept by triggers, so /queue/metrics and a task's
-- queue position never count the backlog.
-- task_counts: tasks per tenant and status, spread over 64 shards by the writing connection's backend, so
-- concurrent transactions do not queue on one counter row until each commits; a row may go negative (a task
-- counted in one shard and uncounted in another), the sum over shards is exact.
CREATE TABLE task_counts (
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    shard INTEGER NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (tenant, status, shard)
);
-- pending_counts: pending tasks per priority and block of 1,024 consecutive seq values (seq / 1024), with no
-- row for an empty block. A position is the blocks ahead summed plus a count inside the task's own block.
CREATE TABLE pending_counts (
    priority BIGINT NOT NULL,
    bucket BIGINT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (priority, bucket)
);
-- pending_totals: pending tasks per priority (no row for none), so the tasks of higher priorities ahead of a
-- task are a handful of rows, not every block of theirs.
CREATE TABLE pending_totals (
    priority BIGINT PRIMARY KEY,
    n BIGINT NOT NULL
);

INSERT INTO task_counts (tenant, status, shard, n) SELECT tenant, status, 0, count(*) FROM tasks GROUP BY tenant, status;
INSERT INTO pending_counts (priority, bucket, n)
    SELECT priority, seq / 1024, count(*) FROM tasks WHERE status = 'pending' GROUP BY priority, seq / 1024;
INSERT INTO pending_totals (priority, n) SELECT priority, count(*) FROM tasks WHERE status = 'pending' GROUP BY priority;

-- One statement-level trigger per event (transition tables need that): a statement's rows are counted in one
-- upsert per counter, in key order, so two statements never take counter rows in opposite orders; an update
-- that moves no task between counters (progress, leases) writes none.
CREATE FUNCTION tasks_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_shard INTEGER := pg_backend_pid() % 64;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_counts AS c (tenant, status, shard, n)
            SELECT tenant, status, my_shard, count(*) FROM new_rows GROUP BY tenant, status ORDER BY tenant, status
            ON CONFLICT (tenant, status, shard) DO UPDATE SET n = c.n + excluded.n;
        INSERT INTO pending_counts AS c (priority, bucket, n)
            SELECT priority, seq / 1024, count(*) FROM new_rows WHERE status = 'pending'
            GROUP BY priority, seq / 1024 ORDER BY priority, seq / 1024
            ON CONFLICT (priority, bucket) DO UPDATE SET n = c.n + excluded.n;
        INSERT INTO pending_totals AS c (priority, n)
            SELECT priority, count(*) FROM new_rows WHERE status = 'pending' GROUP BY priority ORDER BY priority
            ON CONFLICT (priority) DO UPDATE SET n = c.n + excluded.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO task_counts AS c (tenant, status, shard, n)
            SELECT tenant, status, my_shard, -count(*) FROM old_rows GROUP BY tenant, status ORDER BY tenant, status
            ON CONFLICT (tenant, status, shard) DO UPDATE SET n = c.n + excluded.n;
        UPDATE pending_counts AS c SET n = c.n - gone.n
            FROM (SELECT priority, seq / 1024 AS bucket, count(*) AS n FROM old_rows WHERE status = 'pending'
                  GROUP BY priority, seq / 1024 ORDER BY priority, seq / 1024) AS gone
            WHERE c.priority = gone.priority AND c.bucket = gone.bucket;
        DELETE FROM pending_counts
            WHERE n = 0 AND (priority, bucket) IN (SELECT priority, seq / 1024 FROM old_rows WHERE status = 'pending');
        UPDATE pending_totals AS c SET n = c.n - gone.n
            FROM (SELECT priority, count(*) AS n FROM old_rows WHERE status = 'pending' GROUP BY priority
                  ORDER BY priority) AS gone
            WHERE c.priority = gone.priority;
        DELETE FROM pending_totals
            WHERE n = 0 AND priority IN (SELECT priority FROM old_rows WHERE status = 'pending');
    ELSE
        INSERT INTO task_counts AS c (tenant, status, shard, n)
            SELECT tenant, status, my_shard, sum(d) FROM (
                SELECT tenant, status, -1 AS d FROM old_rows UNION ALL SELECT tenant, status, 1 FROM new_rows
            ) AS changes GROUP BY tenant, status HAVING sum(d) <> 0 ORDER BY tenant, status
            ON CONFLICT (tenant, status, shard) DO UPDATE SET n = c.n + excluded.n;
        INSERT INTO pending_counts AS c (priority, bucket, n)
            SELECT priority, seq / 1024, sum(d) FROM (
                SELECT priority, seq, -1 AS d FROM old_rows WHERE status = 'pending'
                UNION ALL SELECT priority, seq, 1 FROM new_rows WHERE status = 'pending'
            ) AS changes GROUP BY priority, seq / 1024 HAVING sum(d) <> 0 ORDER BY priority, seq / 1024
            ON CONFLICT (priority, bucket) DO UPDATE SET n = c.n + excluded.n;
        DELETE FROM pending_counts
            WHERE n = 0 AND (priority, bucket) IN (SELECT priority, seq / 1024 FROM old_rows WHERE status = 'pending');
        INSERT INTO pending_totals AS c (priority, n)
            SELECT priority, sum(d) FROM (
                SELECT priority, -1 AS d FROM old_rows WHERE status = 'pending'
                UNION ALL SELECT priority, 1 FROM new_rows WHERE status = 'pending'
            ) AS changes GROUP BY priority HAVING sum(d) <> 0 ORDER BY priority
            ON CONFLICT (priority) DO UPDATE SET n = c.n + excluded.n;
        DELETE FROM pending_totals
            WHERE n = 0 AND priority IN (SELECT priority FROM old_rows WHERE status = 'pending');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_counted_insert AFTER INSERT ON tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_count_changes();
CREATE TRIGGER tasks_counted_update AFTER UPDATE ON tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_count_changes();
CREATE TRIGGER tasks_counted_delete AFTER DELETE ON tasks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_count_changes();
