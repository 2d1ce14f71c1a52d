-- Stake a host has locked in the ledger (issue 15): the account stake:<host_id>, funded by a
-- transfer like every other posting; the dispatcher weights its draw by it, and accounting
-- slashes it for a streak of no-shows or a duel lost unanimously.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_account_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_account_check
    CHECK (account ~ '^(user|host|platform|fallback|treasury|stake):.+$');

-- No-shows per host (TaskSettlement.no_show): the total, and the streak since the host's last
-- first token or slash, updated in the batch that posts the attempts.
ALTER TABLE host_tallies ADD COLUMN no_shows bigint NOT NULL DEFAULT 0;
ALTER TABLE host_tallies ADD COLUMN no_show_streak bigint NOT NULL DEFAULT 0;

-- An unlock asked for (`llooma ledger unstake`): the stake stays locked, counted in the draw
-- and slashable until release_after; accounting then posts `release:<txn_id>` once.
CREATE TABLE stake_unlocks (
    txn_id         text PRIMARY KEY,
    host_id        text NOT NULL,
    amount         bigint NOT NULL CHECK (amount > 0),
    requested_at   timestamptz NOT NULL DEFAULT now(),
    release_after  timestamptz NOT NULL,
    released_at    timestamptz
);

CREATE INDEX stake_unlocks_pending ON stake_unlocks (release_after) WHERE released_at IS NULL;
