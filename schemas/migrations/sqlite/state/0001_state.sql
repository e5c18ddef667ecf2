-- The embedded mode's billing state: PostgreSQL's migrations 0001..0005
-- (migrations/postgres/) translated to SQLite, with the same tables, column
-- names and column order, so an export/import copies them by name.
-- Idempotent (IF NOT EXISTS / ON CONFLICT DO NOTHING).
--
-- Encodings (STRICT tables, so a value of another type is refused):
--   times     INTEGER microseconds since 1970-01-01 UTC (exact ordering and
--             comparison in SQL; PostgreSQL's timestamptz resolution);
--   money     TEXT, the decimal's exact string (rust_decimal), never REAL;
--   JSON      TEXT (PostgreSQL's JSONB);
--   booleans  INTEGER 0 or 1.
-- Defaults of time columns are whole seconds; the store binds every time
-- itself, with microseconds.

-- 0001 billing_state --------------------------------------------------------
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY NOT NULL,        -- the usage events' subject
    external_id TEXT NOT NULL UNIQUE,    -- the PaaS's own id
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch() * 1000000),
    -- 0002
    stripe_customer_id TEXT,
    -- 0004: quota settings
    suspended INTEGER NOT NULL DEFAULT 0 CHECK (suspended IN (0, 1)),
    -- Decimal text, not negative ("-0" is zero).
    spending_cap TEXT CHECK (spending_cap IS NULL OR substr(spending_cap, 1, 1) <> '-'
                            OR trim(spending_cap, '-0.') = '')
) STRICT;

CREATE TABLE IF NOT EXISTS plan_versions (
    plan TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version > 0),
    body TEXT NOT NULL,                  -- the PlanVersion (JSON), immutable once published
    published_at INTEGER NOT NULL DEFAULT (unixepoch() * 1000000),
    retired_at INTEGER,
    PRIMARY KEY (plan, version)
) STRICT;

CREATE TABLE IF NOT EXISTS subscriptions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    plan TEXT NOT NULL,
    version INTEGER NOT NULL,
    starts_at INTEGER NOT NULL,
    ends_at INTEGER,
    FOREIGN KEY (plan, version) REFERENCES plan_versions (plan, version),
    CHECK (ends_at IS NULL OR ends_at > starts_at)
) STRICT;
-- At most one open subscription per customer.
CREATE UNIQUE INDEX IF NOT EXISTS subscriptions_one_open ON subscriptions (customer_id) WHERE ends_at IS NULL;
CREATE INDEX IF NOT EXISTS subscriptions_by_customer ON subscriptions (customer_id, starts_at);

CREATE TABLE IF NOT EXISTS seat_changes (
    customer_id TEXT NOT NULL REFERENCES customers (id),
    effective_at INTEGER NOT NULL,
    seats INTEGER NOT NULL CHECK (seats >= 0),
    PRIMARY KEY (customer_id, effective_at)
) STRICT;

CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL DEFAULT (unixepoch() * 1000000),
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    before TEXT,
    after TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS audit_log_by_subject ON audit_log (subject, id);

-- The audit log is append-only.
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

-- 0002 invoices -------------------------------------------------------------
CREATE TABLE IF NOT EXISTS apps (
    customer_id TEXT NOT NULL REFERENCES customers (id),
    app TEXT NOT NULL,                   -- the usage events' `app` dimension
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch() * 1000000),
    PRIMARY KEY (customer_id, app)
) STRICT;

-- The one counter behind invoice numbers (a single row, id 1: PostgreSQL's
-- TRUE). It is incremented in the same transaction that inserts the
-- invoices, so a rolled-back finalization leaves no gap; writers take
-- SQLite's write lock first (BEGIN IMMEDIATE), so finalizers serialize.
CREATE TABLE IF NOT EXISTS invoice_numbers (
    id INTEGER PRIMARY KEY NOT NULL DEFAULT 1 CHECK (id = 1),
    last INTEGER NOT NULL
) STRICT;
INSERT INTO invoice_numbers (id, last) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS invoices (
    id TEXT PRIMARY KEY NOT NULL,        -- derived from (customer, period): stable across retries
    seq INTEGER NOT NULL UNIQUE,
    number TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    period_start INTEGER NOT NULL,
    period_end INTEGER NOT NULL,
    currency TEXT NOT NULL,
    subtotal TEXT NOT NULL,              -- the period's own lines
    adjustments_total TEXT NOT NULL,     -- late usage of earlier periods
    carried_in TEXT NOT NULL,            -- earlier invoices below Stripe's minimum
    total TEXT NOT NULL,
    body TEXT NOT NULL,                  -- JSON: lines with evidence, adjustments, carried invoices
    finalized_at INTEGER NOT NULL,
    -- What may change after finalization: delivery and payment status.
    sync_status TEXT NOT NULL CHECK (sync_status IN ('pending', 'synced', 'carried_forward', 'nothing_due', 'failed')),
    stripe_invoice_id TEXT UNIQUE,
    carried_to TEXT REFERENCES invoices (id),
    payment_status TEXT NOT NULL DEFAULT 'open' CHECK (payment_status IN ('open', 'paid', 'payment_failed', 'void')),
    sync_error TEXT,
    UNIQUE (customer_id, period_start)
) STRICT;
CREATE INDEX IF NOT EXISTS invoices_to_sync ON invoices (seq) WHERE sync_status = 'pending';

-- Finalized invoices are immutable: only the status columns (sync_status,
-- stripe_invoice_id, carried_to, payment_status, sync_error) may change,
-- and nothing may be deleted.
CREATE TRIGGER IF NOT EXISTS invoices_no_delete BEFORE DELETE ON invoices
BEGIN
    SELECT RAISE(ABORT, 'invoices are immutable');
END;
CREATE TRIGGER IF NOT EXISTS invoices_no_change BEFORE UPDATE ON invoices
WHEN NEW.id IS NOT OLD.id OR NEW.seq IS NOT OLD.seq OR NEW.number IS NOT OLD.number
    OR NEW.customer_id IS NOT OLD.customer_id OR NEW.period_start IS NOT OLD.period_start
    OR NEW.period_end IS NOT OLD.period_end OR NEW.currency IS NOT OLD.currency
    OR NEW.subtotal IS NOT OLD.subtotal OR NEW.adjustments_total IS NOT OLD.adjustments_total
    OR NEW.carried_in IS NOT OLD.carried_in OR NEW.total IS NOT OLD.total
    OR NEW.body IS NOT OLD.body OR NEW.finalized_at IS NOT OLD.finalized_at
BEGIN
    SELECT RAISE(ABORT, 'finalized invoices are immutable');
END;

-- 0003 api_keys: only the SHA-256 of a key is stored ------------------------
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'control-plane', 'collector', 'customer')),
    customer_id TEXT REFERENCES customers (id),
    label TEXT NOT NULL,
    key_sha256 TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL DEFAULT (unixepoch() * 1000000),
    revoked_at INTEGER,
    CHECK ((role = 'customer') = (customer_id IS NOT NULL))
) STRICT;

-- 0005 usage_alerts: an outbox, one row per (customer, period, kind,
-- subject, threshold), so each alert is raised once per period however
-- many evaluations see it; delivered by webhook with retries --------------
CREATE TABLE IF NOT EXISTS usage_alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    period_start INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('spending_cap', 'allowance')),
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
CREATE INDEX IF NOT EXISTS usage_alerts_due ON usage_alerts (next_attempt_at) WHERE status = 'pending';
