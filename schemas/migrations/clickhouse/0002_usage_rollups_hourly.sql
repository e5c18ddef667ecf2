-- Hourly rollups per (customer, meter, hour, app, dims). Each row holds the
-- cumulative aggregate of all raw rows of its key; a newer row (higher
-- `version`, the Kafka offset that produced it) replaces an older one.
-- Rewriting a row with the same version is a no-op, so rollup writes are
-- idempotent. Not partitioned: one insert is one part, hence atomic.
-- Readers take argMax(..., version) per key (or FINAL).
CREATE TABLE IF NOT EXISTS usage_rollups_hourly (
    customer String,
    meter String,
    hour DateTime('UTC'),
    app String,
    dims String,
    events UInt64,
    quantity_sum Decimal(38, 12),
    quantity_max Decimal(38, 12),
    latest_time DateTime('UTC'),
    latest_quantity Decimal(38, 12),
    kafka_partition UInt32,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY (customer, meter, hour, app, dims)
