-- Task runs and webhooks. Times are Unix milliseconds (UTC).

-- How many times a worker has claimed the task. A task whose run was interrupted (a crash, a
-- lost lease) is run again; one claimed a fourth time is failed and refunded instead.
ALTER TABLE tasks ADD COLUMN runs INTEGER NOT NULL DEFAULT 0;
-- Where the task's outcome is POSTed (NULL: nowhere). The retention purge clears it.
ALTER TABLE tasks ADD COLUMN webhook_url TEXT;

-- The key that signs the account's webhook deliveries (HMAC-SHA256). Stored as is, unlike API
-- keys, because the server signs with it. Made with the account, or on first use for accounts
-- older than this migration.
ALTER TABLE accounts ADD COLUMN webhook_secret TEXT;

-- The outbox of webhook deliveries: the row is written in the transaction that records the
-- task's final state, so a finished task cannot miss its webhook, even across a crash.
CREATE TABLE webhook_deliveries (
    task_id         TEXT PRIMARY KEY REFERENCES tasks (id),
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    url             TEXT NOT NULL,
    -- 'pending' (an attempt is due at next_attempt_at), 'delivered', or 'failed' (gave up).
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- While pending: when the next attempt is due. A sender that claims the row moves it ahead
    -- by its lease, so the row of a sender that died is due again once the lease is over.
    next_attempt_at INTEGER,
    claim           TEXT,
    delivered_at    INTEGER,
    created_at      INTEGER NOT NULL,
    CHECK ((state = 'pending') = (next_attempt_at IS NOT NULL))
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';

-- Every attempt of a delivery: the receiver's status, or why there was none.
CREATE TABLE webhook_attempts (
    task_id TEXT NOT NULL REFERENCES webhook_deliveries (task_id),
    number  INTEGER NOT NULL,
    at      INTEGER NOT NULL,
    status  INTEGER,
    error   TEXT,
    PRIMARY KEY (task_id, number)
);
