-- This installation's identity: one row whose random id is made here, once, so a store created before this
-- migration gets one when it migrates. The worker manager stamps it on every instance it starts (process
-- environment, Docker label, Novita instance name) and adopts or reaps only instances that carry it, so two
-- installations side by side (same namespace and pool names, separate stores) never touch each other's workers.
-- Every replica of one installation shares its store, and so its identity.
CREATE TABLE installation (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    id TEXT NOT NULL CHECK (length(id) = 16)
);
INSERT INTO installation (singleton, id) VALUES (1, left(replace(gen_random_uuid()::text, '-', ''), 16));
