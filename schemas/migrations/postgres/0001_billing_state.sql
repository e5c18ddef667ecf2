-- Billing state: customers, published plan versions, subscriptions (the
-- customer's plan history as non-overlapping segments), seat changes and an
-- append-only audit log. Idempotent (IF NOT EXISTS / OR REPLACE).
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY,                 -- the usage events' subject
    external_id TEXT NOT NULL UNIQUE,    -- the PaaS's own id
    name TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS plan_versions (
    plan TEXT NOT NULL,
    version INT NOT NULL CHECK (version > 0),
    body JSONB NOT NULL,                 -- the PlanVersion, immutable once published
    published_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    retired_at TIMESTAMPTZ,
    PRIMARY KEY (plan, version)
);

CREATE TABLE IF NOT EXISTS subscriptions (
    id BIGSERIAL PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    plan TEXT NOT NULL,
    version INT NOT NULL,
    starts_at TIMESTAMPTZ NOT NULL,
    ends_at TIMESTAMPTZ,
    FOREIGN KEY (plan, version) REFERENCES plan_versions (plan, version),
    CHECK (ends_at IS NULL OR ends_at > starts_at)
);
-- At most one open subscription per customer.
CREATE UNIQUE INDEX IF NOT EXISTS subscriptions_one_open ON subscriptions (customer_id) WHERE ends_at IS NULL;
CREATE INDEX IF NOT EXISTS subscriptions_by_customer ON subscriptions (customer_id, starts_at);

CREATE TABLE IF NOT EXISTS seat_changes (
    customer_id TEXT NOT NULL REFERENCES customers (id),
    effective_at TIMESTAMPTZ NOT NULL,
    seats INT NOT NULL CHECK (seats >= 0),
    PRIMARY KEY (customer_id, effective_at)
);

CREATE TABLE IF NOT EXISTS audit_log (
    id BIGSERIAL PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    before JSONB,
    after JSONB
);
CREATE INDEX IF NOT EXISTS audit_log_by_subject ON audit_log (subject, id);

CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
