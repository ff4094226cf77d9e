-- The dashboard: credit vouchers and browser sessions. Times are Unix milliseconds (UTC).

CREATE TABLE vouchers (
    id          TEXT PRIMARY KEY,
    -- SHA-256 of the code; the code itself is shown once to the operator and never stored.
    code_hash   TEXT NOT NULL UNIQUE,
    -- The first characters of the code, to recognise it in a list.
    prefix      TEXT NOT NULL,
    credits     INTEGER NOT NULL CHECK (credits > 0),
    note        TEXT,
    created_at  INTEGER NOT NULL,
    -- NULL: the code never expires.
    expires_at  INTEGER,
    -- Set once, by the guarded UPDATE that redeems the code (`WHERE redeemed_at IS NULL`).
    redeemed_at INTEGER,
    redeemed_by TEXT REFERENCES accounts (id),
    CHECK ((redeemed_at IS NULL) = (redeemed_by IS NULL))
);
CREATE INDEX vouchers_created ON vouchers (created_at);

CREATE TABLE dashboard_sessions (
    -- SHA-256 of the token in the session cookie; the token itself is never stored.
    token_hash       TEXT PRIMARY KEY,
    -- 'account': signed in with an API key (key_id); 'operator': with the operator token.
    kind             TEXT NOT NULL CHECK (kind IN ('account', 'operator')),
    account_id       TEXT REFERENCES accounts (id),
    key_id           TEXT REFERENCES api_keys (id),
    -- The operator token's hash at sign-in: a new operator token ends older operator sessions.
    admin_token_hash TEXT,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    CHECK ((kind = 'account') = (account_id IS NOT NULL AND key_id IS NOT NULL)),
    CHECK ((kind = 'operator') = (admin_token_hash IS NOT NULL))
);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);

-- Spend per day (per account) and per account (all accounts) read the ledger by time.
CREATE INDEX ledger_account_time ON ledger (account_id, created_at);
CREATE INDEX ledger_time ON ledger (created_at);
