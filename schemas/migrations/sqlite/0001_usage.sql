-- The embedded mode's usage store: the same two tables as ClickHouse's
-- (raw rows with the offset that produced them; cumulative hourly rollups
-- with a version). Quantities are decimal text, summed in Rust, never as
-- floating point. SQLite commits are atomic, so a batch's raw rows land
-- together with the offset they carry.
CREATE TABLE IF NOT EXISTS usage_events (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    time INTEGER NOT NULL,
    app TEXT NOT NULL,
    dims TEXT NOT NULL,
    quantity TEXT NOT NULL,
    unique_value TEXT NOT NULL,
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_events_by_customer ON usage_events (customer, meter, time);
CREATE INDEX IF NOT EXISTS usage_events_by_offset ON usage_events (kafka_partition, kafka_offset);
CREATE TABLE IF NOT EXISTS usage_rollups_hourly (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    hour INTEGER NOT NULL,
    app TEXT NOT NULL,
    dims TEXT NOT NULL,
    events INTEGER NOT NULL,
    quantity_sum TEXT NOT NULL,
    quantity_max TEXT NOT NULL,
    latest_time INTEGER NOT NULL,
    latest_quantity TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (customer, meter, hour, app, dims)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_rollups_by_partition ON usage_rollups_hourly (kafka_partition, version);
