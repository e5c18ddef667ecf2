//! Test harness for pipeline tests against real tansu and ClickHouse.
//!
//! Service addresses come from the environment (`ops/test.sh` sets them);
//! a missing variable fails the test, it never skips. Every test gets its
//! own topic, consumer group and ClickHouse database, kept after the run for
//! inspection.

use aggregator::store::clickhouse::ClickHouseStore;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const INGEST_KEY: &str = "test-ingest-key";

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through ops/test.sh, which starts tansu and ClickHouse"))
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A loopback port free now, for a process the test starts to listen on.
/// Picked at random below Linux's ephemeral range (32768–60999): a port
/// the OS hands out as `:0` is also one it hands to outgoing connections,
/// and one of the many the tests open (to ClickHouse, Kafka, PostgreSQL)
/// took such a port before the server bound it (CI, 2026-12-08: "Address
/// already in use").
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let p = rand::random_range(20_000..32_000u16);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A workspace binary next to this test's (`target/<profile>/`); any crate's
/// tests can include this module.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (ops/test.sh does)",
        p.display()
    );
    p
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Kafka + ClickHouse addresses and this test's private names.
#[derive(Clone, Debug)]
pub struct Env {
    pub brokers: String,
    pub clickhouse_url: String,
    pub database: String,
    pub topic: String,
    pub group: String,
    pub dir: PathBuf,
}

impl Env {
    pub fn new(test: &str) -> Self {
        Self::with_services(
            test,
            env("TALLY_KAFKA_BROKERS"),
            env("TALLY_CLICKHOUSE_URL"),
        )
    }

    pub fn with_services(test: &str, brokers: String, clickhouse_url: String) -> Self {
        let id = unique(test);
        let dir = std::env::temp_dir().join("tally-tests").join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            brokers,
            clickhouse_url,
            database: id.clone(),
            topic: format!("usage-{id}"),
            group: format!("agg-{id}"),
            dir,
        }
    }

    pub fn store(&self) -> ClickHouseStore {
        ClickHouseStore::new(&self.clickhouse_url, &self.database)
    }

    pub fn dlq_topic(&self) -> String {
        format!("{}-dlq", self.topic)
    }

    pub fn deltas_topic(&self) -> String {
        format!("{}-deltas", self.topic)
    }

    /// Writes a collector config and returns (path, port).
    pub fn collector_config(&self, extra: &str, delivery_timeout_ms: u64) -> (PathBuf, u16) {
        let port = free_port();
        let hash = hex_sha256(INGEST_KEY);
        let path = self.dir.join(format!("collector-{port}.toml"));
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\ncheckpoint_dir = \"{cp}\"\nshutdown_timeout_secs = 5\n\
             [kafka]\nbrokers = \"{b}\"\ntopic = \"{t}\"\ndelivery_timeout_ms = {delivery_timeout_ms}\n\
             [spool]\ndir = \"{sp}\"\n[limits]\nmax_body_bytes = 262144\nmax_batch_events = 1000\n\
             [auth]\nkey_sha256 = [\"{hash}\"]\n{extra}\n",
            cp = self.dir.join("checkpoints").display(),
            b = self.brokers,
            t = self.topic,
            sp = self.dir.join("spool").display(),
        );
        std::fs::write(&path, text).unwrap();
        (path, port)
    }

    pub fn spawn_collector(&self, config: &Path, port: u16) -> Proc {
        let log = std::fs::File::create(
            self.dir
                .join(format!("collector-{}.log", rand::random::<u16>())),
        )
        .unwrap();
        let child = Command::new(bin("collector"))
            .args(["serve", "--config"])
            .arg(config)
            // The config file is the whole truth for this collector.
            .env_remove("TALLY_KAFKA_BROKERS")
            .env_remove("TALLY_KAFKA_TOPIC")
            .env_remove("TALLY_LISTEN")
            .env_remove("TALLY_SPOOL_DIR")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_http(
            &format!("http://127.0.0.1:{port}/healthz"),
            Duration::from_secs(30),
        );
        Proc {
            child,
            name: "collector".into(),
        }
    }

    pub fn spawn_aggregator(&self, metrics_port: u16, meters_file: Option<&Path>) -> Proc {
        self.spawn_aggregator_with(metrics_port, meters_file, &[])
    }

    pub fn spawn_aggregator_with(
        &self,
        metrics_port: u16,
        meters_file: Option<&Path>,
        extra: &[&str],
    ) -> Proc {
        let log = std::fs::File::create(
            self.dir
                .join(format!("aggregator-{}.log", rand::random::<u16>())),
        )
        .unwrap();
        let mut cmd = Command::new(bin("aggregator"));
        cmd.args([
            "run",
            "--batch-max-wait-ms",
            "100",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .args(extra)
        .env("TALLY_KAFKA_BROKERS", &self.brokers)
        .env("TALLY_KAFKA_TOPIC", &self.topic)
        .env("TALLY_KAFKA_DLQ_TOPIC", self.dlq_topic())
        .env("TALLY_KAFKA_DELTAS_TOPIC", self.deltas_topic())
        .env("TALLY_CLICKHOUSE_URL", &self.clickhouse_url)
        .env("TALLY_CLICKHOUSE_DATABASE", &self.database)
        .env("TALLY_AGGREGATOR_GROUP", &self.group)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
        if let Some(m) = meters_file {
            cmd.env("TALLY_METERS_FILE", m);
        }
        Proc {
            child: cmd.spawn().unwrap(),
            name: "aggregator".into(),
        }
    }

    /// Runs an aggregator subcommand to completion; returns stdout.
    pub fn aggregator_cmd(&self, args: &[&str], meters_file: Option<&Path>) -> String {
        let mut cmd = Command::new(bin("aggregator"));
        cmd.args(args)
            .env("TALLY_KAFKA_BROKERS", &self.brokers)
            .env("TALLY_KAFKA_TOPIC", &self.topic)
            .env("TALLY_KAFKA_DLQ_TOPIC", self.dlq_topic())
            .env("TALLY_CLICKHOUSE_URL", &self.clickhouse_url)
            .env("TALLY_CLICKHOUSE_DATABASE", &self.database);
        if let Some(m) = meters_file {
            cmd.env("TALLY_METERS_FILE", m);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "aggregator {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Polls the store until its totals equal `want` (rollups and raw), or
    /// fails with the last difference.
    pub async fn wait_totals(&self, want: &BTreeMap<String, Decimal>, timeout: Duration) {
        let store = self.store();
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            match (store.totals().await, store.raw_totals().await) {
                (Ok(roll), Ok(raw)) if &roll == want && &raw == want => return,
                (r, w) => {
                    last = Some(format!(
                        "rollups: {:?}\nraw: {:?}",
                        r.map(|m| diff(want, &m)),
                        w.map(|m| diff(want, &m))
                    ))
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "totals never matched the ground truth; differences (key: want vs got):\n{}",
            last.unwrap_or_default()
        );
    }

    /// Number of raw rows stored.
    pub async fn raw_count(&self) -> u64 {
        self.store()
            .client()
            .query("SELECT count() FROM usage_events")
            .fetch_one::<u64>()
            .await
            .unwrap_or(0)
    }
}

pub fn diff(want: &BTreeMap<String, Decimal>, got: &BTreeMap<String, Decimal>) -> Vec<String> {
    let mut keys: Vec<&String> = want.keys().chain(got.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .take(10)
        .map(|k| format!("{k}: {:?} vs {:?}", want.get(k), got.get(k)))
        .collect()
}

pub fn hex_sha256(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn wait_http(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(resp) = std::process::Command::new("curl")
            .args(["-sf", "-o", "/dev/null", url])
            .status()
        {
            if resp.success() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} did not answer within {timeout:?}");
}

/// Posts events in batches, retrying transport errors and 5xx until each
/// batch is accepted (as a well-behaved client does).
pub async fn post_all(url: &str, events: &[schemas::RawEvent], batch: usize) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for chunk in events.chunks(batch) {
        let body = serde_json::to_vec(chunk).unwrap();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let r = http
                .post(format!("{url}/v1/events"))
                .bearer_auth(INGEST_KEY)
                .header("content-type", "application/cloudevents-batch+json")
                .body(body.clone())
                .send()
                .await;
            match r {
                Ok(r) if r.status().as_u16() == 200 => break,
                Ok(r) if r.status().is_client_error() => panic!(
                    "batch rejected: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                _ => {
                    assert!(attempts < 600, "collector never accepted a batch");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Reads one metric's value from a /metrics endpoint (sum over labels).
pub async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Metric names a Grafana dashboard (JSON under `dashboards/`) uses that
/// none of the `/metrics` texts exposes. Histogram series (`_bucket`,
/// `_sum`, `_count`) count as their base name.
pub fn dashboard_metrics_missing(dashboard: &str, exposed: &[&str]) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("dashboards")
        .join(dashboard);
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for panel in json["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("tally_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(!used.is_empty(), "{dashboard} uses no tally metric");
    let mut have = std::collections::BTreeSet::new();
    for text in exposed {
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    have.insert(base.to_owned());
                }
            }
            have.insert(name);
        }
    }
    used.into_iter().filter(|n| !have.contains(n)).collect()
}

/// `n` simulator events of the last hours with unique ids under `source`
/// (the benchmarks' workload).
pub fn bench_events(n: usize, source: &str) -> Vec<schemas::RawEvent> {
    let now = chrono::Utc::now().timestamp();
    let from = chrono::DateTime::from_timestamp(now - now % 3600 - 20 * 3600, 0).unwrap();
    let w = collector::sources::simulator::Workload {
        customers: 40,
        apps_per_customer: 5,
        seed: 5,
    };
    let mut out = w.events(from, from + chrono::Duration::hours(19), 60);
    out.truncate(n);
    assert_eq!(out.len(), n, "workload too small");
    for (i, e) in out.iter_mut().enumerate() {
        e.insert("source".into(), serde_json::json!(source));
        e.insert("id".into(), serde_json::json!(format!("{source}-{i}")));
    }
    out
}

/// `n` CloudEvents as a router and an inventory source send them (half
/// requests, half compute; 97 customers, 7 apps), timed five minutes
/// before `at`, their ids unique to `round`: the batch the event-path
/// benchmarks of the collector and the aggregator time.
pub fn router_and_inventory_events(
    round: &str,
    at: chrono::DateTime<chrono::Utc>,
    n: usize,
) -> Vec<serde_json::Value> {
    let t = (at - chrono::Duration::minutes(5)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    (0..n)
        .map(|i| {
            let customer = format!("cus_{:05}", i % 97);
            let app = format!("app-{}", i % 7);
            if i % 2 == 0 {
                serde_json::json!({"specversion": "1.0", "id": format!("req-{round}-{i}"),
                    "source": "router/eu-1", "type": "tally.requests", "subject": customer,
                    "time": t, "datacontenttype": "application/json",
                    "data": {"app": app, "count": 1200 + i}})
            } else {
                serde_json::json!({"specversion": "1.0", "id": format!("cmp-{round}-{i}"),
                    "source": "inventory/eu-1", "type": "tally.compute", "subject": customer,
                    "time": t, "datacontenttype": "application/json",
                    "data": {"app": app, "instance_type": "t4g.small", "region": "eu-west-1",
                        "instance_seconds": "60"}})
            }
        })
        .collect()
}

pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
