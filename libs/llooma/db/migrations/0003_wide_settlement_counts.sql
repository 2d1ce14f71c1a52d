-- A settlement's counts are uint32 on the wire: integer (int4) overflowed at 2^31 and made
-- the whole batch fail, again on every redelivery.
ALTER TABLE task_settlements
    ALTER COLUMN input_tokens TYPE bigint,
    ALTER COLUMN output_tokens TYPE bigint,
    ALTER COLUMN first_token_ms TYPE bigint,
    ALTER COLUMN duration_ms TYPE bigint;
