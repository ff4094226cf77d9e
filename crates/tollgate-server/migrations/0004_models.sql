-- Models (the catalogue, `--models`). A task names the model it was sold as; tasks from before
-- the catalogue were made by the one model a server without a catalogue has, `builtin`.
ALTER TABLE tasks ADD COLUMN model TEXT NOT NULL DEFAULT 'builtin';
-- Each model's workers take the oldest queued task of their model.
CREATE INDEX tasks_queued_by_model ON tasks (model, seq) WHERE status = 'queued';
