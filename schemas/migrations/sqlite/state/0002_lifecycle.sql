-- The customer lifecycle: a subscription's trial and billing anchor day
-- (1 to 31; 1, the calendar month, for every existing row), and finding the
-- customers whose subscription ended (a cancellation: the last row of the
-- history has an end) by that end. Applied once (schema_migrations).
ALTER TABLE subscriptions ADD COLUMN trial_ends_at INTEGER CHECK (trial_ends_at IS NULL OR trial_ends_at > starts_at);
ALTER TABLE subscriptions ADD COLUMN anchor_day INTEGER NOT NULL DEFAULT 1 CHECK (anchor_day BETWEEN 1 AND 31);
CREATE INDEX IF NOT EXISTS subscriptions_by_end ON subscriptions (ends_at);
