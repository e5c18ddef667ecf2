-- Credits, coupons and taxes: the PostgreSQL migration 0008 translated
-- (same tables and columns; times as integer microseconds, money as exact
-- decimal text, JSON as text). `remaining` is text, so "never negative" is
-- checked by the store in the writing transaction (SQLite's single writer
-- serializes it), not by a CHECK.
CREATE TABLE IF NOT EXISTS credit_grants (
    id TEXT PRIMARY KEY NOT NULL,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    kind TEXT NOT NULL CHECK (kind IN ('promotional', 'purchased')),
    currency TEXT NOT NULL,
    amount TEXT NOT NULL,
    remaining TEXT NOT NULL,
    effective_at INTEGER NOT NULL,
    expires_at INTEGER,
    priority INTEGER NOT NULL,
    reason TEXT NOT NULL,
    usable INTEGER NOT NULL,
    invoice_id TEXT,
    idempotency_key TEXT,
    request_sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    voided_at INTEGER
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS credit_grants_key ON credit_grants (customer_id, idempotency_key);
CREATE INDEX IF NOT EXISTS credit_grants_customer ON credit_grants (customer_id);

CREATE TABLE IF NOT EXISTS credit_ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    grant_id TEXT NOT NULL REFERENCES credit_grants (id),
    customer_id TEXT NOT NULL REFERENCES customers (id),
    kind TEXT NOT NULL CHECK (kind IN ('grant', 'consumption', 'expiry', 'void')),
    amount TEXT NOT NULL,
    currency TEXT NOT NULL,
    at INTEGER NOT NULL,
    invoice_id TEXT,
    recorded_at INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS credit_ledger_consumed_once ON credit_ledger (grant_id, invoice_id)
    WHERE kind = 'consumption';
CREATE UNIQUE INDEX IF NOT EXISTS credit_ledger_once ON credit_ledger (grant_id, kind)
    WHERE kind <> 'consumption';
CREATE INDEX IF NOT EXISTS credit_ledger_customer ON credit_ledger (customer_id, seq);
CREATE TRIGGER IF NOT EXISTS credit_ledger_no_update BEFORE UPDATE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'the credit ledger is append-only');
END;
CREATE TRIGGER IF NOT EXISTS credit_ledger_no_delete BEFORE DELETE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'the credit ledger is append-only');
END;

CREATE TABLE IF NOT EXISTS coupons (
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (id, version)
) STRICT;
CREATE TABLE IF NOT EXISTS customer_coupons (
    id TEXT PRIMARY KEY NOT NULL,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    coupon_id TEXT NOT NULL,
    coupon_version INTEGER NOT NULL,
    applied_at INTEGER NOT NULL,
    removed_at INTEGER,
    ends_at INTEGER,
    created_at INTEGER NOT NULL,
    FOREIGN KEY (coupon_id, coupon_version) REFERENCES coupons (id, version)
) STRICT;
CREATE INDEX IF NOT EXISTS customer_coupons_customer ON customer_coupons (customer_id);
CREATE TABLE IF NOT EXISTS coupon_redemptions (
    applied_id TEXT NOT NULL REFERENCES customer_coupons (id),
    invoice_id TEXT NOT NULL,
    PRIMARY KEY (applied_id, invoice_id)
) STRICT;

CREATE TABLE IF NOT EXISTS tax_rates (
    id TEXT PRIMARY KEY NOT NULL,
    body TEXT NOT NULL,
    archived_at INTEGER,
    created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS tax_profiles (
    customer_id TEXT PRIMARY KEY NOT NULL REFERENCES customers (id),
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

-- The steps after an invoice's charges; earlier invoices owe their total.
ALTER TABLE invoices ADD COLUMN discount_total TEXT NOT NULL DEFAULT '0';
ALTER TABLE invoices ADD COLUMN tax_total TEXT NOT NULL DEFAULT '0';
ALTER TABLE invoices ADD COLUMN credit_total TEXT NOT NULL DEFAULT '0';
ALTER TABLE invoices ADD COLUMN amount_due TEXT;
UPDATE invoices SET amount_due = total WHERE amount_due IS NULL;
DROP TRIGGER IF EXISTS invoices_no_change;
CREATE TRIGGER IF NOT EXISTS invoices_no_change BEFORE UPDATE ON invoices
WHEN NEW.id IS NOT OLD.id OR NEW.kind IS NOT OLD.kind OR NEW.seq IS NOT OLD.seq
    OR NEW.number IS NOT OLD.number
    OR NEW.customer_id IS NOT OLD.customer_id OR NEW.period_start IS NOT OLD.period_start
    OR NEW.period_end IS NOT OLD.period_end OR NEW.currency IS NOT OLD.currency
    OR NEW.subtotal IS NOT OLD.subtotal OR NEW.adjustments_total IS NOT OLD.adjustments_total
    OR NEW.carried_in IS NOT OLD.carried_in OR NEW.total IS NOT OLD.total
    OR NEW.body IS NOT OLD.body OR NEW.finalized_at IS NOT OLD.finalized_at
    OR NEW.discount_total IS NOT OLD.discount_total OR NEW.tax_total IS NOT OLD.tax_total
    OR NEW.credit_total IS NOT OLD.credit_total OR NEW.amount_due IS NOT OLD.amount_due
BEGIN
    SELECT RAISE(ABORT, 'finalized invoices are immutable');
END;
