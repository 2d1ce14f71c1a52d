-- The users' charges in ledger_totals were priced a second time when tallied (the serving
-- model's price on all output tokens), not read off the postings (the requested model's price
-- on the tokens delivered). From now on they are summed off the charge legs as they are
-- posted; here the past is summed off the entries already in the ledger.
UPDATE ledger_totals SET user_charges_micros = (
    SELECT coalesce(sum(amount), 0)::int8
    FROM ledger_entries
    WHERE kind = 'charge' AND account = 'platform:revenue'
);
