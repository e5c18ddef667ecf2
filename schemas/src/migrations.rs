//! ClickHouse DDL as numbered migration files under
//! `schemas/migrations/clickhouse/`. Every statement is idempotent
//! (`IF NOT EXISTS`), and applied versions are recorded in
//! `schema_migrations`, so applying them at every aggregator start is safe.
//! The SQL stays in the subset that ClickHouse 18.16 and 23.8+ both accept.

/// One migration: its number, name and SQL (a single statement).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The table that records applied migrations.
pub const CLICKHOUSE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
    version UInt32, name String, applied_at DateTime('UTC')) ENGINE = MergeTree() ORDER BY version";

/// ClickHouse migrations in order.
pub const CLICKHOUSE: &[Migration] = &[
    Migration {
        version: 1,
        name: "usage_events",
        sql: include_str!("../migrations/clickhouse/0001_usage_events.sql"),
    },
    Migration {
        version: 2,
        name: "usage_rollups_hourly",
        sql: include_str!("../migrations/clickhouse/0002_usage_rollups_hourly.sql"),
    },
    Migration {
        version: 3,
        name: "usage_events_time_us",
        sql: include_str!("../migrations/clickhouse/0003_usage_events_time_us.sql"),
    },
];

/// Whether a ClickHouse migration that failed with `error` had in fact
/// been applied: ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`, so an
/// `ADD COLUMN` migration interrupted between its DDL and its record is
/// recognised by the column being there already.
pub fn clickhouse_already_applied(m: &Migration, error: &str) -> bool {
    m.sql.contains("ADD COLUMN") && error.contains("already exists")
}

/// SQLite migrations of the embedded mode's usage store, in order (each
/// file may hold several statements, applied in one transaction).
pub const SQLITE_USAGE: &[Migration] = &[
    Migration {
        version: 1,
        name: "usage",
        sql: include_str!("../migrations/sqlite/0001_usage.sql"),
    },
    Migration {
        version: 2,
        name: "dead_letters",
        sql: include_str!("../migrations/sqlite/0002_dead_letters.sql"),
    },
    Migration {
        version: 3,
        name: "usage_events_time_us",
        sql: include_str!("../migrations/sqlite/0003_usage_events_time_us.sql"),
    },
];

/// SQLite migrations of the embedded mode's billing state (the PostgreSQL
/// schema translated: same tables and column names), in order; applied by
/// `billing_api::state::sqlite`, each file in one transaction. The state
/// lives in a file of its own, apart from the usage store's.
pub const SQLITE_STATE: &[Migration] = &[
    Migration {
        version: 1,
        name: "state",
        sql: include_str!("../migrations/sqlite/state/0001_state.sql"),
    },
    Migration {
        version: 2,
        name: "lifecycle",
        sql: include_str!("../migrations/sqlite/state/0002_lifecycle.sql"),
    },
    Migration {
        version: 3,
        name: "fees_in_advance",
        sql: include_str!("../migrations/sqlite/state/0003_fees_in_advance.sql"),
    },
    Migration {
        version: 4,
        name: "credits",
        sql: include_str!("../migrations/sqlite/state/0004_credits.sql"),
    },
];

/// PostgreSQL migrations (billing state), in order. Each file may hold
/// several statements and is applied in one transaction.
pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "billing_state",
        sql: include_str!("../migrations/postgres/0001_billing_state.sql"),
    },
    Migration {
        version: 2,
        name: "invoices",
        sql: include_str!("../migrations/postgres/0002_invoices.sql"),
    },
    Migration {
        version: 3,
        name: "api_keys",
        sql: include_str!("../migrations/postgres/0003_api_keys.sql"),
    },
    Migration {
        version: 4,
        name: "quota_settings",
        sql: include_str!("../migrations/postgres/0004_quota_settings.sql"),
    },
    Migration {
        version: 5,
        name: "usage_alerts",
        sql: include_str!("../migrations/postgres/0005_usage_alerts.sql"),
    },
    Migration {
        version: 6,
        name: "lifecycle",
        sql: include_str!("../migrations/postgres/0006_lifecycle.sql"),
    },
    Migration {
        version: 7,
        name: "fees_in_advance",
        sql: include_str!("../migrations/postgres/0007_fees_in_advance.sql"),
    },
    Migration {
        version: 8,
        name: "credits",
        sql: include_str!("../migrations/postgres/0008_credits.sql"),
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_dense_idempotent_and_match_file_names() {
        for (dir, list) in [
            ("migrations/clickhouse", CLICKHOUSE),
            ("migrations/postgres", POSTGRES),
            ("migrations/sqlite/state", SQLITE_STATE),
        ] {
            for (i, m) in list.iter().enumerate() {
                assert_eq!(m.version as usize, i + 1);
                assert!(
                    m.sql.contains("IF NOT EXISTS")
                        || (dir == "migrations/clickhouse" && m.sql.contains("ADD COLUMN")),
                    "migration {} must be idempotent",
                    m.name
                );
            }
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let mut files: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_type().unwrap().is_file())
                .map(|e| e.file_name().into_string().unwrap())
                .collect();
            files.sort();
            let expected: Vec<String> = list
                .iter()
                .map(|m| format!("{:04}_{}.sql", m.version, m.name))
                .collect();
            assert_eq!(files, expected, "every migration file must be listed");
        }
    }
}
