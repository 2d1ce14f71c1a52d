-- What each request's client received, as its ingress reported it (DeliveryReport): accounting
-- bills a request that was not completed for that, not for what the hosts produced. A row is
-- reconciled once: a completed request at once (nothing to change), an incomplete one by a
-- `delivery:<request_id>` posting (refund to the user, clawback from a host that failed it).
CREATE TABLE request_deliveries (
    request_id        text PRIMARY KEY,
    api_key_id        text NOT NULL,
    delivered_tokens  bigint NOT NULL CHECK (delivered_tokens >= 0),
    final             boolean NOT NULL,
    complete          boolean NOT NULL,
    failed            boolean NOT NULL,
    stream            boolean NOT NULL,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    reconciled_at     timestamptz
);

CREATE INDEX request_deliveries_pending ON request_deliveries (updated_at)
    WHERE reconciled_at IS NULL;
