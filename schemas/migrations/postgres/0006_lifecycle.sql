-- The customer lifecycle: a subscription's trial and billing anchor day
-- (1 to 31; 1, the calendar month, for every existing row), and finding the
-- customers whose subscription ended (a cancellation: the last row of the
-- history has an end) by that end.
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS trial_ends_at TIMESTAMPTZ;
ALTER TABLE subscriptions DROP CONSTRAINT IF EXISTS subscriptions_trial_inside;
ALTER TABLE subscriptions ADD CONSTRAINT subscriptions_trial_inside CHECK (trial_ends_at IS NULL OR trial_ends_at > starts_at);
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS anchor_day INT NOT NULL DEFAULT 1;
ALTER TABLE subscriptions DROP CONSTRAINT IF EXISTS subscriptions_anchor_day;
ALTER TABLE subscriptions ADD CONSTRAINT subscriptions_anchor_day CHECK (anchor_day BETWEEN 1 AND 31);
CREATE INDEX IF NOT EXISTS subscriptions_by_end ON subscriptions (ends_at);
