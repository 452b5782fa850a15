-- Models on demand: the model files a task brings ({url, sha256, folder, name}), and the phase in which the
-- dispatcher puts them on the chosen worker before the prompt is sent.
ALTER TABLE tasks ADD COLUMN models JSONB;
ALTER TABLE tasks DROP CONSTRAINT tasks_phase_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_phase_check
    CHECK (phase IN ('dispatching', 'fetching_models', 'queued_on_worker', 'executing'));
