-- Event times at microsecond precision (see the ClickHouse migration of the
-- same name): `time` keeps whole seconds, `time_us` the microseconds within.
-- Applied in one transaction with its version record, so it runs once.
ALTER TABLE usage_events ADD COLUMN time_us INTEGER NOT NULL DEFAULT 0;
