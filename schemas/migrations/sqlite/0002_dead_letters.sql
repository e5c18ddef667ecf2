-- The embedded mode's dead letters (the distributed mode's dead-letter
-- topic): messages the aggregator refused, with the reason, kept for
-- inspection and replay. Nothing reads them on the billing path.
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset INTEGER NOT NULL,
    key BLOB,
    payload BLOB
);
