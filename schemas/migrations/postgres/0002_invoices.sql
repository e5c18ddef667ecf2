-- Apps of a customer, finalized invoices with gapless numbering, and the
-- Stripe mapping. Idempotent (IF NOT EXISTS / OR REPLACE).
CREATE TABLE IF NOT EXISTS apps (
    customer_id TEXT NOT NULL REFERENCES customers (id),
    app TEXT NOT NULL,                   -- the usage events' `app` dimension
    name TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, app)
);

ALTER TABLE customers ADD COLUMN IF NOT EXISTS stripe_customer_id TEXT;

-- The one counter behind invoice numbers. It is incremented in the same
-- transaction that inserts the invoices, so a rolled-back finalization
-- leaves no gap and two finalizers serialize on this row.
CREATE TABLE IF NOT EXISTS invoice_numbers (
    id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    last BIGINT NOT NULL
);
INSERT INTO invoice_numbers (id, last) VALUES (TRUE, 0) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS invoices (
    id TEXT PRIMARY KEY,                 -- derived from (customer, period): stable across retries
    seq BIGINT NOT NULL UNIQUE,
    number TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    period_start TIMESTAMPTZ NOT NULL,
    period_end TIMESTAMPTZ NOT NULL,
    currency TEXT NOT NULL,
    subtotal NUMERIC NOT NULL,           -- the period's own lines
    adjustments_total NUMERIC NOT NULL,  -- late usage of earlier periods
    carried_in NUMERIC NOT NULL,         -- earlier invoices below Stripe's minimum
    total NUMERIC NOT NULL,
    body JSONB NOT NULL,                 -- lines with evidence, adjustments, carried invoices
    finalized_at TIMESTAMPTZ NOT NULL,
    -- What may change after finalization: delivery and payment status.
    sync_status TEXT NOT NULL CHECK (sync_status IN ('pending', 'synced', 'carried_forward', 'nothing_due', 'failed')),
    stripe_invoice_id TEXT UNIQUE,
    carried_to TEXT REFERENCES invoices (id),
    payment_status TEXT NOT NULL DEFAULT 'open' CHECK (payment_status IN ('open', 'paid', 'payment_failed', 'void')),
    sync_error TEXT,
    UNIQUE (customer_id, period_start)
);
CREATE INDEX IF NOT EXISTS invoices_to_sync ON invoices (seq) WHERE sync_status = 'pending';

-- Finalized invoices are immutable: only the status columns may change,
-- and nothing may be deleted.
CREATE OR REPLACE FUNCTION invoices_immutable() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'invoices are immutable';
    END IF;
    IF (NEW.id, NEW.seq, NEW.number, NEW.customer_id, NEW.period_start, NEW.period_end, NEW.currency,
        NEW.subtotal, NEW.adjustments_total, NEW.carried_in, NEW.total, NEW.body, NEW.finalized_at)
       IS DISTINCT FROM
       (OLD.id, OLD.seq, OLD.number, OLD.customer_id, OLD.period_start, OLD.period_end, OLD.currency,
        OLD.subtotal, OLD.adjustments_total, OLD.carried_in, OLD.total, OLD.body, OLD.finalized_at) THEN
        RAISE EXCEPTION 'finalized invoice % is immutable', OLD.number;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS invoices_no_change ON invoices;
CREATE TRIGGER invoices_no_change BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoices_immutable();
