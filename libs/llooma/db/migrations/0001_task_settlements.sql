-- One row per host attempt at a task, written once by accounting (attempt_id is the key).
CREATE TABLE task_settlements (
    attempt_id      text PRIMARY KEY,
    request_id      text NOT NULL,
    task_id         text NOT NULL,
    host_id         text NOT NULL,
    model           text NOT NULL,
    outcome         text NOT NULL CHECK (outcome IN ('won', 'lost', 'failed')),
    input_tokens    integer NOT NULL CHECK (input_tokens >= 0),
    output_tokens   integer NOT NULL CHECK (output_tokens >= 0),
    first_token_ms  integer NOT NULL CHECK (first_token_ms >= 0),
    duration_ms     integer NOT NULL CHECK (duration_ms >= 0),
    api_key_id      text NOT NULL,
    finished_at     timestamptz NOT NULL,
    settled_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX task_settlements_request_id ON task_settlements (request_id);
