-- Raw usage: one row per (event, meter) the event feeds.
-- Every row of one aggregator batch carries the same `ingested_at`, so a batch
-- lands in one partition as one part: the insert is atomic. `kafka_partition`
-- and `kafka_offset` record where each row came from; the aggregator resumes
-- after the highest offset stored here, which makes the write and the offset
-- one atomic fact (see aggregator/README.md).
CREATE TABLE IF NOT EXISTS usage_events (
    customer String,
    meter String,
    time DateTime('UTC'),
    app String,
    dims String,
    quantity Decimal(38, 12),
    unique_value String,
    source String,
    id String,
    event_type String,
    kafka_partition UInt32,
    kafka_offset UInt64,
    ingested_at DateTime('UTC')
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(ingested_at)
ORDER BY (customer, meter, time, source, id)
