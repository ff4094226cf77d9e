-- Money: purchases through Stripe Checkout, credits that expire, spend limits per key and
-- low-balance alerts. Times are Unix milliseconds (UTC); money in the currency's minor unit.

-- A Checkout Session made for an account, and what its payment came to. The guarded UPDATE
-- from 'open' to 'paid' credits a session exactly once, however often Stripe reports it.
CREATE TABLE purchases (
    session_id       TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts (id),
    credits          INTEGER NOT NULL CHECK (credits > 0),
    amount           INTEGER NOT NULL CHECK (amount >= 0),
    currency         TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('open', 'paid')),
    payment_intent   TEXT,
    -- What refunds came to: the money refunded so far, the credits taken back for it, and the
    -- credits the balance no longer had (the operator's shortfall).
    refunded_amount  INTEGER NOT NULL DEFAULT 0,
    refunded_credits INTEGER NOT NULL DEFAULT 0,
    shortfall        INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    paid_at          INTEGER
);
CREATE INDEX purchases_account ON purchases (account_id, created_at);
CREATE INDEX purchases_payment_intent ON purchases (payment_intent);

-- The ledger names the purchase its entries come from; a session is credited once, enforced
-- by the database itself.
ALTER TABLE ledger ADD COLUMN purchase_id TEXT;
CREATE UNIQUE INDEX ledger_one_purchase ON ledger (purchase_id) WHERE kind = 'purchase';

-- Credits that expire: what is left of each grant made with an expiry. Every decrease of the
-- balance takes from the soonest-expiring lot first; accounts.lot_credits is their sum (never
-- above credits), so a charge on an account without lots never reads this table.
CREATE TABLE credit_lots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    credits    INTEGER NOT NULL CHECK (credits >= 0),
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX credit_lots_account ON credit_lots (account_id, expires_at) WHERE credits > 0;
CREATE INDEX credit_lots_due ON credit_lots (expires_at) WHERE credits > 0;
ALTER TABLE accounts ADD COLUMN lot_credits INTEGER NOT NULL DEFAULT 0;

-- Low-balance alerts: a charge that takes the balance from at or above the threshold to below
-- it puts one account.balance_low event in the outbox.
ALTER TABLE accounts ADD COLUMN low_balance_threshold INTEGER;
ALTER TABLE accounts ADD COLUMN low_balance_url TEXT;

-- Spend limits per key: credits per period (day, week, month: calendar, UTC; or total). The
-- period's spend is a guarded counter written in the charge's transaction.
ALTER TABLE api_keys ADD COLUMN spend_limit INTEGER;
ALTER TABLE api_keys ADD COLUMN spend_period TEXT;
CREATE TABLE key_spend (
    key_id       TEXT NOT NULL REFERENCES api_keys (id),
    period_start INTEGER NOT NULL,
    spent        INTEGER NOT NULL CHECK (spent >= 0),
    PRIMARY KEY (key_id, period_start)
);
-- The key a task was charged to and the spend period it counted in, so a refund gives it back.
ALTER TABLE tasks ADD COLUMN key_id TEXT;
ALTER TABLE tasks ADD COLUMN spend_period_start INTEGER;

-- The outbox of account events (account.balance_low), delivered as task webhooks are.
CREATE TABLE account_events (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    type            TEXT NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    claim           TEXT,
    last_error      TEXT,
    delivered_at    INTEGER,
    created_at      INTEGER NOT NULL,
    CHECK ((state = 'pending') = (next_attempt_at IS NOT NULL))
);
CREATE INDEX account_events_due ON account_events (next_attempt_at) WHERE state = 'pending';
CREATE INDEX account_events_account ON account_events (account_id, created_at);
