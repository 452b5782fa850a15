-- Reads that do not grow with the queue (issue 11): counts kept by triggers, so /queue/metrics and a task's
-- queue position never count the backlog.
-- task_counts: tasks per tenant and status (shard is always 0 here; PostgreSQL spreads its counters over
-- shards so that concurrent writers do not queue on one row).
CREATE TABLE task_counts (
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    shard INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (tenant, status, shard)
);
-- pending_counts: pending tasks per priority and block of 1,024 consecutive seq values (seq / 1024), with no
-- row for an empty block. A position is the blocks ahead summed plus a count inside the task's own block.
CREATE TABLE pending_counts (
    priority INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (priority, bucket)
);
-- pending_totals: pending tasks per priority (no row for none), so the tasks of higher priorities ahead of a
-- task are a handful of rows, not every block of theirs.
CREATE TABLE pending_totals (
    priority INTEGER PRIMARY KEY,
    n INTEGER NOT NULL
);

INSERT INTO task_counts (tenant, status, shard, n) SELECT tenant, status, 0, count(*) FROM tasks GROUP BY tenant, status;
INSERT INTO pending_counts (priority, bucket, n)
    SELECT priority, seq / 1024, count(*) FROM tasks WHERE status = 'pending' GROUP BY priority, seq / 1024;
INSERT INTO pending_totals (priority, n) SELECT priority, count(*) FROM tasks WHERE status = 'pending' GROUP BY priority;

CREATE TRIGGER tasks_counted_insert AFTER INSERT ON tasks
BEGIN
    INSERT INTO task_counts (tenant, status, shard, n) VALUES (new.tenant, new.status, 0, 1)
        ON CONFLICT (tenant, status, shard) DO UPDATE SET n = n + 1;
    INSERT INTO pending_counts (priority, bucket, n) SELECT new.priority, new.seq / 1024, 1 WHERE new.status = 'pending'
        ON CONFLICT (priority, bucket) DO UPDATE SET n = n + 1;
    INSERT INTO pending_totals (priority, n) SELECT new.priority, 1 WHERE new.status = 'pending'
        ON CONFLICT (priority) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER tasks_counted_update AFTER UPDATE OF tenant, status, priority ON tasks
WHEN old.tenant IS NOT new.tenant OR old.status IS NOT new.status OR old.priority IS NOT new.priority
BEGIN
    UPDATE task_counts SET n = n - 1 WHERE tenant = old.tenant AND status = old.status AND shard = 0;
    INSERT INTO task_counts (tenant, status, shard, n) VALUES (new.tenant, new.status, 0, 1)
        ON CONFLICT (tenant, status, shard) DO UPDATE SET n = n + 1;
    UPDATE pending_counts SET n = n - 1
        WHERE old.status = 'pending' AND priority = old.priority AND bucket = old.seq / 1024;
    DELETE FROM pending_counts
        WHERE old.status = 'pending' AND priority = old.priority AND bucket = old.seq / 1024 AND n = 0;
    INSERT INTO pending_counts (priority, bucket, n) SELECT new.priority, new.seq / 1024, 1 WHERE new.status = 'pending'
        ON CONFLICT (priority, bucket) DO UPDATE SET n = n + 1;
    UPDATE pending_totals SET n = n - 1 WHERE old.status = 'pending' AND priority = old.priority;
    DELETE FROM pending_totals WHERE old.status = 'pending' AND priority = old.priority AND n = 0;
    INSERT INTO pending_totals (priority, n) SELECT new.priority, 1 WHERE new.status = 'pending'
        ON CONFLICT (priority) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER tasks_counted_delete AFTER DELETE ON tasks
BEGIN
    UPDATE task_counts SET n = n - 1 WHERE tenant = old.tenant AND status = old.status AND shard = 0;
    UPDATE pending_counts SET n = n - 1
        WHERE old.status = 'pending' AND priority = old.priority AND bucket = old.seq / 1024;
    DELETE FROM pending_counts
        WHERE old.status = 'pending' AND priority = old.priority AND bucket = old.seq / 1024 AND n = 0;
    UPDATE pending_totals SET n = n - 1 WHERE old.status = 'pending' AND priority = old.priority;
    DELETE FROM pending_totals WHERE old.status = 'pending' AND priority = old.priority AND n = 0;
END;
