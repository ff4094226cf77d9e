-- tollgate's schema on PostgreSQL: the same tables and rules as the SQLite one.
-- Times are Unix milliseconds (UTC) in BIGINT, so both engines decode the same way.

CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE accounts (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    credits    BIGINT NOT NULL CHECK (credits >= 0),
    rpm        BIGINT,
    burst      BIGINT,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    key_hash   TEXT NOT NULL UNIQUE,
    prefix     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE tasks (
    seq           BIGSERIAL PRIMARY KEY,
    id            TEXT NOT NULL UNIQUE,
    account_id    TEXT NOT NULL REFERENCES accounts (id),
    status        TEXT NOT NULL,
    prompt        TEXT NOT NULL,
    n             BIGINT NOT NULL,
    size          TEXT NOT NULL,
    seed          BIGINT NOT NULL,
    cost          BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    started_at    BIGINT,
    completed_at  BIGINT,
    error_code    TEXT,
    error_message TEXT,
    purged        BIGINT NOT NULL DEFAULT 0,
    claim         TEXT,
    lease_until   BIGINT
);
CREATE INDEX tasks_account ON tasks (account_id, seq);
CREATE INDEX tasks_queued ON tasks (seq) WHERE status = 'queued';
CREATE INDEX tasks_leased ON tasks (lease_until) WHERE status = 'running';
CREATE INDEX tasks_unpurged ON tasks (created_at) WHERE purged = 0;

CREATE TABLE ledger (
    id            BIGSERIAL PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES accounts (id),
    delta         BIGINT NOT NULL,
    balance_after BIGINT NOT NULL CHECK (balance_after >= 0),
    kind          TEXT NOT NULL,
    task_id       TEXT,
    note          TEXT,
    created_at    BIGINT NOT NULL
);
CREATE INDEX ledger_account ON ledger (account_id, id);
CREATE UNIQUE INDEX ledger_one_charge ON ledger (task_id) WHERE kind = 'charge';
CREATE UNIQUE INDEX ledger_one_refund ON ledger (task_id) WHERE kind = 'refund';

CREATE TABLE idempotency_keys (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state       TEXT NOT NULL,
    status      BIGINT,
    body        BYTEA,
    created_at  BIGINT NOT NULL,
    locked_at   BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
