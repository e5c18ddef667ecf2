-- Fees in advance: an invoice is a period's (`period`, one per customer and
-- period, as before) or an opening one (`opening`: fees in advance from
-- where they start to the period's end, keyed by that instant). The
-- identity becomes (customer, period start, kind); finalized invoices stay
-- immutable, kind included.
ALTER TABLE invoices ADD COLUMN IF NOT EXISTS kind TEXT NOT NULL DEFAULT 'period';
ALTER TABLE invoices DROP CONSTRAINT IF EXISTS invoices_kind;
ALTER TABLE invoices ADD CONSTRAINT invoices_kind CHECK (kind IN ('period', 'opening'));
ALTER TABLE invoices DROP CONSTRAINT IF EXISTS invoices_customer_id_period_start_key;
CREATE UNIQUE INDEX IF NOT EXISTS invoices_identity ON invoices (customer_id, period_start, kind);

CREATE OR REPLACE FUNCTION invoices_immutable() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'invoices are immutable';
    END IF;
    IF (NEW.id, NEW.kind, NEW.seq, NEW.number, NEW.customer_id, NEW.period_start, NEW.period_end, NEW.currency,
        NEW.subtotal, NEW.adjustments_total, NEW.carried_in, NEW.total, NEW.body, NEW.finalized_at)
       IS DISTINCT FROM
       (OLD.id, OLD.kind, OLD.seq, OLD.number, OLD.customer_id, OLD.period_start, OLD.period_end, OLD.currency,
        OLD.subtotal, OLD.adjustments_total, OLD.carried_in, OLD.total, OLD.body, OLD.finalized_at) THEN
        RAISE EXCEPTION 'finalized invoice % is immutable', OLD.number;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
