-- Fair share between tenants (dispatch.fair_share): each tenant's pending tasks in claim order, so the
-- dispatcher can read the head of every tenant's queue without walking the others'.
CREATE INDEX tasks_pending_tenant ON tasks (tenant, priority DESC, seq) WHERE status = 'pending';
