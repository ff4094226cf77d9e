-- tollgate's schema on SQLite. Times are Unix milliseconds (UTC).

CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE accounts (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    -- The balance can never go below zero, whatever the code above does.
    credits    INTEGER NOT NULL CHECK (credits >= 0),
    -- NULL: the server's default limit.
    rpm        INTEGER,
    burst      INTEGER,
    created_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    -- SHA-256 of the whole key; the key itself is never stored.
    key_hash   TEXT NOT NULL UNIQUE,
    -- The first characters of the key, to recognise it in a list.
    prefix     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE tasks (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    account_id    TEXT NOT NULL REFERENCES accounts (id),
    status        TEXT NOT NULL,
    prompt        TEXT NOT NULL,
    n             INTEGER NOT NULL,
    size          TEXT NOT NULL,
    seed          INTEGER NOT NULL,
    cost          INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    started_at    INTEGER,
    completed_at  INTEGER,
    error_code    TEXT,
    error_message TEXT,
    -- 1 once the retention purge removed the task's data: the row stays as a tombstone (410, not 404).
    purged        INTEGER NOT NULL DEFAULT 0,
    -- The worker that runs the task holds it until lease_until and renews it while it works;
    -- a lease that runs out (its process died) lets another worker take the task.
    claim         TEXT,
    lease_until   INTEGER
);
CREATE INDEX tasks_account ON tasks (account_id, seq);
CREATE INDEX tasks_queued ON tasks (seq) WHERE status = 'queued';
CREATE INDEX tasks_leased ON tasks (lease_until) WHERE status = 'running';
CREATE INDEX tasks_unpurged ON tasks (created_at) WHERE purged = 0;

CREATE TABLE ledger (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id    TEXT NOT NULL REFERENCES accounts (id),
    delta         INTEGER NOT NULL,
    balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
    kind          TEXT NOT NULL,
    task_id       TEXT,
    note          TEXT,
    created_at    INTEGER NOT NULL
);
CREATE INDEX ledger_account ON ledger (account_id, id);
-- A task is charged once and refunded at most once, enforced by the database itself.
CREATE UNIQUE INDEX ledger_one_charge ON ledger (task_id) WHERE kind = 'charge';
CREATE UNIQUE INDEX ledger_one_refund ON ledger (task_id) WHERE kind = 'refund';

CREATE TABLE idempotency_keys (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    -- 'running' while the first request is in flight, 'done' once its response is stored.
    state       TEXT NOT NULL,
    status      INTEGER,
    body        BLOB,
    created_at  INTEGER NOT NULL,
    locked_at   INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
