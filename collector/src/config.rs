//! The collector's typed configuration: a TOML file, then environment
//! overrides (`TALLY_LISTEN`, `TALLY_KAFKA_BROKERS`, `TALLY_KAFKA_TOPIC`,
//! `TALLY_SPOOL_DIR`), validated at start. `collector.example.toml` is a
//! complete example, loaded by a test.

use crate::sources::inventory::InventoryConfig;
use crate::sources::prometheus::PrometheusConfig;
use crate::sources::simulator::SimulatorConfig;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the ingest API, e.g. `127.0.0.1:8080`.
    pub listen: String,
    pub kafka: KafkaConfig,
    pub spool: SpoolConfig,
    #[serde(default)]
    pub limits: Limits,
    pub auth: AuthConfig,
    /// Meter catalog; the built-in `schemas/meters.json` when absent.
    #[serde(default)]
    pub meters_file: Option<PathBuf>,
    /// Directory for source checkpoints.
    #[serde(default = "default_checkpoint_dir")]
    pub checkpoint_dir: PathBuf,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Seconds to finish in-flight work on SIGTERM.
    #[serde(default = "default_shutdown_secs")]
    pub shutdown_timeout_secs: u64,
}

fn default_checkpoint_dir() -> PathBuf {
    PathBuf::from(".tally-data/collector/checkpoints")
}
fn default_shutdown_secs() -> u64 {
    20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    #[serde(default = "default_topic")]
    pub topic: String,
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
}
fn default_topic() -> String {
    "usage-events".into()
}
fn default_partitions() -> i32 {
    4
}
fn default_delivery_timeout_ms() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    #[serde(default = "default_batch")]
    pub max_batch_events: usize,
}
fn default_body() -> usize {
    4 * 1024 * 1024
}
fn default_batch() -> usize {
    10_000
}
impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_body(),
            max_batch_events: default_batch(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Hex SHA-256 digests of the accepted bearer keys
    /// (`collector hash-key KEY` prints one).
    pub key_sha256: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    Inventory(InventoryConfig),
    Prometheus(PrometheusConfig),
    Simulator(SimulatorConfig),
}

impl Config {
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let mut c: Config = toml::from_str(text)?;
        c.apply_env(|k| std::env::var(k).ok());
        c.validate()?;
        Ok(c)
    }

    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(v) = get("TALLY_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = get("TALLY_KAFKA_BROKERS") {
            self.kafka.brokers = v;
        }
        if let Some(v) = get("TALLY_KAFKA_TOPIC") {
            self.kafka.topic = v;
        }
        if let Some(v) = get("TALLY_SPOOL_DIR") {
            self.spool.dir = v.into();
        }
    }

    /// Reports every problem at once, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut p = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!("listen: {:?} is not host:port", self.listen));
        }
        if self.kafka.brokers.is_empty() {
            p.push("kafka.brokers: must not be empty".into());
        }
        if self.kafka.partitions < 1 {
            p.push("kafka.partitions: must be at least 1".into());
        }
        if self.limits.max_body_bytes == 0 || self.limits.max_batch_events == 0 {
            p.push("limits: max_body_bytes and max_batch_events must be positive".into());
        }
        if self.auth.key_sha256.is_empty() {
            p.push("auth.key_sha256: at least one key hash is required".into());
        }
        if let Err(e) = crate::auth::KeySet::from_hex(&self.auth.key_sha256) {
            p.push(e);
        }
        for (i, s) in self.sources.iter().enumerate() {
            if let Err(e) = s.validate() {
                p.push(format!("sources[{i}].{e}"));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid config: {}", p.join("; "))
        }
    }
}

impl SourceConfig {
    fn validate(&self) -> Result<(), String> {
        match self {
            SourceConfig::Inventory(c) => c.validate(),
            SourceConfig::Prometheus(c) => c.validate(),
            SourceConfig::Simulator(c) => c.validate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_example_config_loads() {
        let text = include_str!("../collector.example.toml");
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.sources.len(), 3);
    }

    #[test]
    fn env_overrides_file_and_errors_name_fields() {
        let text = include_str!("../collector.example.toml");
        let mut c: Config = toml::from_str(text).unwrap();
        c.apply_env(|k| (k == "TALLY_KAFKA_BROKERS").then(|| "10.0.0.1:9092".to_string()));
        assert_eq!(c.kafka.brokers, "10.0.0.1:9092");
        c.listen = "nope".into();
        c.auth.key_sha256 = vec!["abc".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("listen:") && err.contains("auth.key_sha256[0]"),
            "{err}"
        );
        assert!(
            toml::from_str::<Config>(&format!("{text}\nbogus = 1\n")).is_err(),
            "unknown fields are rejected"
        );
    }
}
