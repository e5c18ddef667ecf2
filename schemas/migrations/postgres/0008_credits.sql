-- Credits, coupons and taxes (billing-domain `credit` and `settle`).
--
-- Credit grants and their append-only ledger: a grant entry, consumptions
-- naming the invoice (one per grant and invoice), at most one expiry and
-- one void. `remaining` is the sum of a grant's entries, kept beside them
-- in the same transaction and never negative.
CREATE TABLE IF NOT EXISTS credit_grants (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    kind TEXT NOT NULL CHECK (kind IN ('promotional', 'purchased')),
    currency TEXT NOT NULL,
    amount NUMERIC NOT NULL CHECK (amount > 0),
    remaining NUMERIC NOT NULL CHECK (remaining >= 0),
    effective_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ,
    priority INT NOT NULL,
    reason TEXT NOT NULL,
    usable BOOLEAN NOT NULL,
    invoice_id TEXT,
    idempotency_key TEXT,
    request_sha256 TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    voided_at TIMESTAMPTZ
);
CREATE UNIQUE INDEX IF NOT EXISTS credit_grants_key ON credit_grants (customer_id, idempotency_key);
CREATE INDEX IF NOT EXISTS credit_grants_customer ON credit_grants (customer_id);

CREATE TABLE IF NOT EXISTS credit_ledger (
    seq BIGSERIAL PRIMARY KEY,
    grant_id TEXT NOT NULL REFERENCES credit_grants (id),
    customer_id TEXT NOT NULL REFERENCES customers (id),
    kind TEXT NOT NULL CHECK (kind IN ('grant', 'consumption', 'expiry', 'void')),
    amount NUMERIC NOT NULL,
    currency TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL,
    invoice_id TEXT,
    recorded_at TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS credit_ledger_consumed_once ON credit_ledger (grant_id, invoice_id)
    WHERE kind = 'consumption';
CREATE UNIQUE INDEX IF NOT EXISTS credit_ledger_once ON credit_ledger (grant_id, kind)
    WHERE kind <> 'consumption';
CREATE INDEX IF NOT EXISTS credit_ledger_customer ON credit_ledger (customer_id, seq);

CREATE OR REPLACE FUNCTION credit_ledger_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the credit ledger is append-only';
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS credit_ledger_no_change ON credit_ledger;
CREATE TRIGGER credit_ledger_no_change BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_append_only();

-- Coupons as versioned catalog data, applied to customers from an instant.
CREATE TABLE IF NOT EXISTS coupons (
    id TEXT NOT NULL,
    version INT NOT NULL,
    body JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (id, version)
);
CREATE TABLE IF NOT EXISTS customer_coupons (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    coupon_id TEXT NOT NULL,
    coupon_version INT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL,
    removed_at TIMESTAMPTZ,
    ends_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL,
    FOREIGN KEY (coupon_id, coupon_version) REFERENCES coupons (id, version)
);
CREATE INDEX IF NOT EXISTS customer_coupons_customer ON customer_coupons (customer_id);
-- Each invoice a coupon discounted, written with the invoice.
CREATE TABLE IF NOT EXISTS coupon_redemptions (
    applied_id TEXT NOT NULL REFERENCES customer_coupons (id),
    invoice_id TEXT NOT NULL,
    PRIMARY KEY (applied_id, invoice_id)
);

-- Tax rates as data (immutable but for archiving) and customers' profiles.
CREATE TABLE IF NOT EXISTS tax_rates (
    id TEXT PRIMARY KEY,
    body JSONB NOT NULL,
    archived_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS tax_profiles (
    customer_id TEXT PRIMARY KEY REFERENCES customers (id),
    body JSONB NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- Usage alerts on the credit balance (kind `credit`).
ALTER TABLE usage_alerts DROP CONSTRAINT IF EXISTS usage_alerts_kind_check;
ALTER TABLE usage_alerts ADD CONSTRAINT usage_alerts_kind_check
    CHECK (kind IN ('spending_cap', 'allowance', 'credit'));

-- A top-up invoice (kind `top_up`) bills prepaid credit bought on its own.
ALTER TABLE invoices DROP CONSTRAINT IF EXISTS invoices_kind;
ALTER TABLE invoices ADD CONSTRAINT invoices_kind CHECK (kind IN ('period', 'opening', 'top_up'));

-- An invoice's steps after its charges: discounts and credits (negative),
-- exclusive tax, and what is due after credits. Invoices written before
-- have none of them, and their amount due is their total.
ALTER TABLE invoices ADD COLUMN IF NOT EXISTS discount_total NUMERIC NOT NULL DEFAULT 0;
ALTER TABLE invoices ADD COLUMN IF NOT EXISTS tax_total NUMERIC NOT NULL DEFAULT 0;
ALTER TABLE invoices ADD COLUMN IF NOT EXISTS credit_total NUMERIC NOT NULL DEFAULT 0;
ALTER TABLE invoices ADD COLUMN IF NOT EXISTS amount_due NUMERIC;
UPDATE invoices SET amount_due = total WHERE amount_due IS NULL;
ALTER TABLE invoices ALTER COLUMN amount_due SET NOT NULL;

CREATE OR REPLACE FUNCTION invoices_immutable() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'invoices are immutable';
    END IF;
    IF (NEW.id, NEW.kind, NEW.seq, NEW.number, NEW.customer_id, NEW.period_start, NEW.period_end, NEW.currency,
        NEW.subtotal, NEW.adjustments_total, NEW.carried_in, NEW.total, NEW.body, NEW.finalized_at,
        NEW.discount_total, NEW.tax_total, NEW.credit_total, NEW.amount_due)
       IS DISTINCT FROM
       (OLD.id, OLD.kind, OLD.seq, OLD.number, OLD.customer_id, OLD.period_start, OLD.period_end, OLD.currency,
        OLD.subtotal, OLD.adjustments_total, OLD.carried_in, OLD.total, OLD.body, OLD.finalized_at,
        OLD.discount_total, OLD.tax_total, OLD.credit_total, OLD.amount_due) THEN
        RAISE EXCEPTION 'finalized invoice % is immutable', OLD.number;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
