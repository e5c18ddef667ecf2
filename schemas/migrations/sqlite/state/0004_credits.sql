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

-- Invoices: the steps after their charges (discounts and credits
-- negative, exclusive tax, the amount due after credits; earlier invoices
-- owe their total) and a third kind, `top_up` (prepaid credit bought on
-- its own). SQLite cannot change a CHECK, so the table is rebuilt as in
-- migration 3 (its documented procedure, in this migration's transaction,
-- foreign keys checked at commit) with the triggers created again.
PRAGMA defer_foreign_keys = ON;
CREATE TABLE IF NOT EXISTS invoices_v4 (
    id TEXT PRIMARY KEY NOT NULL,
    seq INTEGER NOT NULL UNIQUE,
    number TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    period_start INTEGER NOT NULL,
    period_end INTEGER NOT NULL,
    currency TEXT NOT NULL,
    subtotal TEXT NOT NULL,
    adjustments_total TEXT NOT NULL,
    carried_in TEXT NOT NULL,
    total TEXT NOT NULL,                 -- before credits
    body TEXT NOT NULL,
    finalized_at INTEGER NOT NULL,
    sync_status TEXT NOT NULL CHECK (sync_status IN ('pending', 'synced', 'carried_forward', 'nothing_due', 'failed')),
    stripe_invoice_id TEXT UNIQUE,
    carried_to TEXT REFERENCES invoices_v4 (id), -- renamed with the table
    payment_status TEXT NOT NULL DEFAULT 'open' CHECK (payment_status IN ('open', 'paid', 'payment_failed', 'void')),
    sync_error TEXT,
    kind TEXT NOT NULL DEFAULT 'period' CHECK (kind IN ('period', 'opening', 'top_up')),
    discount_total TEXT NOT NULL DEFAULT '0',
    tax_total TEXT NOT NULL DEFAULT '0',
    credit_total TEXT NOT NULL DEFAULT '0',
    amount_due TEXT NOT NULL,
    UNIQUE (customer_id, period_start, kind)
) STRICT;
INSERT INTO invoices_v4 (id, kind, seq, number, customer_id, period_start, period_end, currency,
    subtotal, adjustments_total, carried_in, total, body, finalized_at, sync_status,
    stripe_invoice_id, carried_to, payment_status, sync_error, discount_total, tax_total,
    credit_total, amount_due)
SELECT id, kind, seq, number, customer_id, period_start, period_end, currency,
    subtotal, adjustments_total, carried_in, total, body, finalized_at, sync_status,
    stripe_invoice_id, carried_to, payment_status, sync_error, '0', '0', '0', total FROM invoices;
DROP TRIGGER IF EXISTS invoices_no_delete;
DROP TRIGGER IF EXISTS invoices_no_change;
DROP TABLE invoices;
ALTER TABLE invoices_v4 RENAME TO invoices;
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
    OR NEW.discount_total IS NOT OLD.discount_total OR NEW.tax_total IS NOT OLD.tax_total
    OR NEW.credit_total IS NOT OLD.credit_total OR NEW.amount_due IS NOT OLD.amount_due
BEGIN
    SELECT RAISE(ABORT, 'finalized invoices are immutable');
END;

-- Usage alerts on the credit balance (kind `credit`): the table rebuilt for
-- its CHECK, the same way.
CREATE TABLE IF NOT EXISTS usage_alerts_v4 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    period_start INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('spending_cap', 'allowance', 'credit')),
    subject TEXT NOT NULL,
    threshold INTEGER NOT NULL CHECK (threshold > 0),
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch() * 1000000),
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT (unixepoch() * 1000000),
    delivered_at INTEGER,
    last_error TEXT,
    UNIQUE (customer_id, period_start, kind, subject, threshold)
) STRICT;
INSERT INTO usage_alerts_v4 SELECT * FROM usage_alerts;
DROP TABLE usage_alerts;
ALTER TABLE usage_alerts_v4 RENAME TO usage_alerts;
CREATE INDEX IF NOT EXISTS usage_alerts_due ON usage_alerts (next_attempt_at) WHERE status = 'pending';
