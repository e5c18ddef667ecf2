-- Usage alerts (spending cap or allowance thresholds), an outbox: one row
-- per (customer, period, kind, subject, threshold), so each alert is raised
-- once per period however many replicas evaluate it; delivered by webhook
-- with retries.
CREATE TABLE IF NOT EXISTS usage_alerts (
    id BIGSERIAL PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    period_start TIMESTAMPTZ NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('spending_cap', 'allowance')),
    subject TEXT NOT NULL,
    threshold INT NOT NULL CHECK (threshold > 0),
    payload JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at TIMESTAMPTZ,
    last_error TEXT,
    UNIQUE (customer_id, period_start, kind, subject, threshold)
);
CREATE INDEX IF NOT EXISTS usage_alerts_due ON usage_alerts (next_attempt_at) WHERE status = 'pending';
