-- API keys with roles. Only the SHA-256 of a key is stored. Idempotent.
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('admin', 'control-plane', 'collector', 'customer')),
    customer_id TEXT REFERENCES customers (id),
    label TEXT NOT NULL,
    key_sha256 TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ,
    CHECK ((role = 'customer') = (customer_id IS NOT NULL))
);
