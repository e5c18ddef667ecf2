-- Event times at microsecond precision: `time` keeps whole seconds (rollups,
-- buckets and partitions use it) and `time_us` the microseconds within that
-- second, so usage belongs to a plan segment by its exact time even when the
-- boundary has a sub-second part. Rows written before this column read 0.
-- ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS: the migration runner
-- treats "column already exists" as applied, which keeps this idempotent.
ALTER TABLE usage_events ADD COLUMN time_us UInt32 DEFAULT 0 AFTER time
