-- Fees in advance: an invoice is a period's (`period`, one per customer and
-- period, as before) or an opening one (`opening`: fees in advance from
-- where they start to the period's end, keyed by that instant). The
-- identity becomes (customer, period start, kind). SQLite cannot drop a
-- table's UNIQUE constraint, so the table is rebuilt (SQLite's documented
-- procedure), inside the migration's transaction, with foreign keys
-- checked at its commit (nothing but its own rows refers to the table);
-- the immutability triggers are created again with the new column. Applied once (schema_migrations).
PRAGMA defer_foreign_keys = ON;
CREATE TABLE IF NOT EXISTS invoices_v3 (
    id TEXT PRIMARY KEY NOT NULL,        -- derived from (customer, period, kind): stable across retries
    seq INTEGER NOT NULL UNIQUE,
    number TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    period_start INTEGER NOT NULL,
    period_end INTEGER NOT NULL,
    currency TEXT NOT NULL,
    subtotal TEXT NOT NULL,              -- the invoice's own lines
    adjustments_total TEXT NOT NULL,     -- late usage of earlier periods
    carried_in TEXT NOT NULL,            -- earlier invoices below Stripe's minimum
    total TEXT NOT NULL,
    body TEXT NOT NULL,                  -- JSON: lines with evidence, adjustments, carried invoices
    finalized_at INTEGER NOT NULL,
    sync_status TEXT NOT NULL CHECK (sync_status IN ('pending', 'synced', 'carried_forward', 'nothing_due', 'failed')),
    stripe_invoice_id TEXT UNIQUE,
    carried_to TEXT REFERENCES invoices_v3 (id), -- renamed with the table
    payment_status TEXT NOT NULL DEFAULT 'open' CHECK (payment_status IN ('open', 'paid', 'payment_failed', 'void')),
    sync_error TEXT,
    kind TEXT NOT NULL DEFAULT 'period' CHECK (kind IN ('period', 'opening')),
    UNIQUE (customer_id, period_start, kind)
) STRICT;
INSERT INTO invoices_v3 (id, kind, seq, number, customer_id, period_start, period_end, currency,
    subtotal, adjustments_total, carried_in, total, body, finalized_at, sync_status,
    stripe_invoice_id, carried_to, payment_status, sync_error)
SELECT id, 'period', seq, number, customer_id, period_start, period_end, currency,
    subtotal, adjustments_total, carried_in, total, body, finalized_at, sync_status,
    stripe_invoice_id, carried_to, payment_status, sync_error FROM invoices;
DROP TRIGGER IF EXISTS invoices_no_delete;
DROP TRIGGER IF EXISTS invoices_no_change;
DROP TABLE invoices;
ALTER TABLE invoices_v3 RENAME TO invoices;
CREATE INDEX IF NOT EXISTS invoices_to_sync ON invoices (seq) WHERE sync_status = 'pending';
CREATE TRIGGER IF NOT EXISTS invoices_no_delete BEFORE DELETE ON invoices
BEGIN
    SELECT RAISE(ABORT, 'invoices are immutable');
END;
CREATE TRIGGER IF NOT EXISTS invoices_no_change BEFORE UPDATE ON invoices
WHEN NEW.id IS NOT OLD.id OR NEW.kind IS NOT OLD.kind OR NEW.seq IS NOT OLD.seq
    OR NEW.number IS NOT OLD.number
    OR NEW.customer_id IS NOT OLD.customer_id OR NEW.period_start IS NOT OLD.period_start
    OR NEW.period_end IS NOT OLD.period_end OR NEW.currency IS NOT OLD.currency
    OR NEW.subtotal IS NOT OLD.subtotal OR NEW.adjustments_total IS NOT OLD.adjustments_total
    OR NEW.carried_in IS NOT OLD.carried_in OR NEW.total IS NOT OLD.total
    OR NEW.body IS NOT OLD.body OR NEW.finalized_at IS NOT OLD.finalized_at
BEGIN
    SELECT RAISE(ABORT, 'finalized invoices are immutable');
END;
