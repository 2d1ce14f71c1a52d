-- API keys managed by accounting (issue 17). Only a key's keyed hash is stored (key_id:
-- HMAC-SHA256 with the server secret, 32 hex, also its ledger account user:<key_id>); the
-- key itself is shown once, at creation. Its budget is its ledger balance (deposits).
CREATE TABLE api_keys (
    key_id      text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{32}$'),
    name        text NOT NULL CHECK (name <> ''),
    owner       text NOT NULL DEFAULT '',
    prefix      text NOT NULL,
    rpm         bigint NOT NULL DEFAULT 0 CHECK (rpm >= 0),
    tpm         bigint NOT NULL DEFAULT 0 CHECK (tpm >= 0),
    models      text[] NOT NULL DEFAULT '{}',
    expires_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Spend per key and model over a time range reads a user's charge legs by account, then
-- each one's settlement by attempt id (the primary key).
CREATE INDEX ledger_entries_account_kind ON ledger_entries (account, kind);
