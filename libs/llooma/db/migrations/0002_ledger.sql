-- The double-entry ledger (issue 7): append-only entries sealed into signed, hash-linked
-- blocks. Accounts are "kind:name": user:<api_key_id>, host:<host_id>, platform:revenue,
-- fallback:pool, treasury:deposits. Balances derive from entries.

CREATE TABLE ledger_blocks (
    height              bigint PRIMARY KEY CHECK (height > 0),
    block_id            text NOT NULL UNIQUE,
    parent_id           text NOT NULL,
    created_unix_nanos  bigint NOT NULL,
    proposer            text NOT NULL,
    entry_count         integer NOT NULL CHECK (entry_count > 0),
    entries_root        text NOT NULL,
    signature           text NOT NULL
);

CREATE TABLE ledger_entries (
    block_height  bigint NOT NULL REFERENCES ledger_blocks (height) DEFERRABLE INITIALLY DEFERRED,
    seq           integer NOT NULL CHECK (seq >= 0),
    txn_id        text NOT NULL,
    leg           smallint NOT NULL CHECK (leg >= 0),
    account       text NOT NULL CHECK (account ~ '^(user|host|platform|fallback|treasury):.+$'),
    amount        bigint NOT NULL CHECK (amount <> 0),
    kind          text NOT NULL,
    ref           text NOT NULL,
    PRIMARY KEY (block_height, seq),
    -- A transaction is posted once: a second posting of it (a double pay) cannot land.
    UNIQUE (txn_id, leg)
);

CREATE INDEX ledger_entries_account ON ledger_entries (account);

-- The chain's head: one row, locked by every poster so blocks are sealed one at a time.
CREATE TABLE ledger_head (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    height     bigint NOT NULL,
    block_id   text NOT NULL
);
INSERT INTO ledger_head (height, block_id) VALUES (0, repeat('0', 64));

-- Derived from entries by the trigger below, so a balance is one indexed read.
CREATE TABLE account_balances (
    account  text PRIMARY KEY,
    balance  bigint NOT NULL
);

-- Tallies for reports, written in the same transaction as the entries they describe.
CREATE TABLE host_tallies (
    host_id      text PRIMARY KEY,
    race_wins    bigint NOT NULL DEFAULT 0,
    race_losses  bigint NOT NULL DEFAULT 0,
    duels        bigint NOT NULL DEFAULT 0,
    duel_wins    bigint NOT NULL DEFAULT 0,
    duel_ties    bigint NOT NULL DEFAULT 0
);

CREATE TABLE ledger_totals (
    singleton            boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    completed_responses  bigint NOT NULL,
    user_charges_micros  bigint NOT NULL
);
INSERT INTO ledger_totals (completed_responses, user_charges_micros) VALUES (0, 0);

CREATE TABLE completed_requests (
    request_id  text PRIMARY KEY
);

-- One row per judged duel, written once (duel_id is the key).
CREATE TABLE duel_settlements (
    duel_id      text PRIMARY KEY,
    request_id   text NOT NULL,
    model        text NOT NULL,
    host_a       text NOT NULL,
    host_b       text NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('a', 'b', 'tie')),
    judges       text[] NOT NULL,
    settled_at   timestamptz NOT NULL DEFAULT now()
);

-- Which of the attempt's settlements were priced how: kept beside the raw settlement.
ALTER TABLE task_settlements ADD COLUMN fallback boolean NOT NULL DEFAULT false;

-- Every transaction sums to zero. Checked once per statement over the rows it inserted
-- (a per-row deferred trigger cost a lookup per entry): a transaction is posted by one
-- statement, so its entries in that statement must balance, and so must its total.
CREATE FUNCTION ledger_entries_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced text;
BEGIN
    SELECT txn_id INTO unbalanced FROM inserted GROUP BY txn_id HAVING sum(amount) <> 0 LIMIT 1;
    IF unbalanced IS NOT NULL THEN
        RAISE EXCEPTION 'ledger transaction % does not sum to zero', unbalanced
            USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO account_balances AS b (account, balance)
        SELECT account, sum(amount) FROM inserted GROUP BY account
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance;
    RETURN NULL;
END;
$$;

CREATE TRIGGER ledger_entries_balance
    AFTER INSERT ON ledger_entries REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_balance();

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % rejected', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_blocks_append_only BEFORE UPDATE OR DELETE ON ledger_blocks
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_blocks_no_truncate BEFORE TRUNCATE ON ledger_blocks
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER task_settlements_append_only BEFORE UPDATE OR DELETE ON task_settlements
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER duel_settlements_append_only BEFORE UPDATE OR DELETE ON duel_settlements
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
