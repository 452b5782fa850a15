-- Comfy API v2's assets. A blob is the bytes one tenant uploaded, named by their blake3 hash ("blake3:<hex>"):
-- every asset record of that tenant over the same bytes shares it (refs counts them, with the model files), and
-- the bytes are removed with the last one. folder/key: where the output store keeps the bytes.
CREATE TABLE asset_blobs (
    tenant TEXT NOT NULL,
    hash TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    folder TEXT NOT NULL,
    key TEXT NOT NULL,
    refs BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant, hash)
);

-- A tenant's asset records: an upload (over a blob: hash set) or a job's output (job_id set, the task's file).
CREATE TABLE assets (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    hash TEXT,
    size BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    file_path TEXT,
    folder TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT,
    tags JSONB NOT NULL DEFAULT '[]',
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX assets_job ON assets (job_id) WHERE job_id IS NOT NULL;

-- The fleet's model files, content-addressed by sha256, one per ComfyUI folder and name (never overwritten).
CREATE TABLE model_files (
    sha256 TEXT NOT NULL,
    blake3 TEXT NOT NULL,
    folder TEXT NOT NULL,
    name TEXT NOT NULL,
    size BIGINT NOT NULL,
    file_folder TEXT NOT NULL,
    file_key TEXT NOT NULL,
    tenant TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (folder, name)
);
CREATE INDEX model_files_sha256 ON model_files (sha256);
