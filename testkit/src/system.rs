//! One running Tally, embedded or distributed, driven only through its
//! public surface (HTTP APIs and commands), so a test written once runs
//! against both modes. Distributed uses real tansu, ClickHouse and
//! PostgreSQL from the environment (`ops/test.sh`); a missing service fails
//! the test, it never skips.

pub use crate::{billing, pipeline};

pub use billing::pg_database;

use crate::pipeline::{bin, free_port, hex_sha256, wait_http, Env, Proc, INGEST_KEY};
use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
const SESSION_SECRET: &str = "test-session-secret-0123456789-abcdef";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Embedded,
    Distributed,
}

pub struct System {
    pub mode: Mode,
    pub ingest: String,
    pub billing: String,
    pub dir: PathBuf,
    procs: Vec<Proc>,
    /// Environment of the billing commands (distributed: database URLs).
    billing_env: Vec<(String, String)>,
    http: reqwest::Client,
    pub env: Option<Env>,
    quota_refresh_secs: u64,
}

/// Seconds between full re-reads of the quota state: 1 s by default (so
/// alerts are raised promptly); [`System::following`] makes it an hour, so
/// only the followed usage deltas keep the state current.
fn common_billing_args(quota_refresh_secs: u64) -> Vec<String> {
    [
        "--grace-secs",
        "0",
        "--finalize-every-secs",
        "3600",
        "--admin-key-sha256",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([hex_sha256(ADMIN_KEY)])
    .chain(
        ["--quota-refresh-secs", "--quota-backstop-secs"]
            .into_iter()
            .flat_map(|flag| [flag.to_string(), quota_refresh_secs.to_string()]),
    )
    .collect()
}

impl System {
    pub async fn start(mode: Mode, test: &str) -> Self {
        match mode {
            Mode::Embedded => Self::embedded(test, None),
            Mode::Distributed => Self::distributed(test).await,
        }
    }

    /// [`System::start`] with the quota state's full re-read an hour
    /// apart: usage reaches quota decisions only through the deltas it
    /// follows.
    pub async fn following(mode: Mode, test: &str) -> Self {
        match mode {
            Mode::Embedded => Self::embedded_with(test, None, 3600),
            Mode::Distributed => {
                let db = pg_database(test).await;
                Self::distributed_with(Env::new(test), db, 3600)
            }
        }
    }

    /// `tally serve` on a data directory (a new one when `dir` is None).
    pub fn embedded(test: &str, dir: Option<PathBuf>) -> Self {
        Self::embedded_with(test, dir, 1)
    }

    /// [`System::embedded`] with the quota state's full re-read every
    /// `quota_refresh_secs` (`tally`'s own default backstop is 3600).
    pub fn embedded_with(test: &str, dir: Option<PathBuf>, quota_refresh_secs: u64) -> Self {
        let dir = dir.unwrap_or_else(|| {
            std::env::temp_dir()
                .join("tally-tests")
                .join(pipeline::unique(test))
        });
        std::fs::create_dir_all(&dir).unwrap();
        let (ip, bp) = (free_port(), free_port());
        let log = std::fs::File::create(dir.join(format!("tally-{ip}.log"))).unwrap();
        let child = Command::new(bin("tally"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", &format!("127.0.0.1:{bp}")])
            .args(["--ingest-listen", &format!("127.0.0.1:{ip}")])
            .args(["--ingest-key-sha256", &hex_sha256(INGEST_KEY)])
            .args(common_billing_args(quota_refresh_secs))
            .env("TALLY_SESSION_SECRET", SESSION_SECRET)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let (ingest, billing) = (
            format!("http://127.0.0.1:{ip}"),
            format!("http://127.0.0.1:{bp}"),
        );
        wait_http(&format!("{ingest}/healthz"), Duration::from_secs(60));
        wait_http(&format!("{billing}/healthz"), Duration::from_secs(60));
        Self {
            mode: Mode::Embedded,
            ingest,
            billing,
            billing_env: vec![],
            procs: vec![Proc {
                child,
                name: "tally".into(),
            }],
            dir,
            http: reqwest::Client::new(),
            env: None,
            quota_refresh_secs,
        }
    }

    /// collector → tansu → aggregator → ClickHouse, billing-api on PostgreSQL.
    pub async fn distributed(test: &str) -> Self {
        let db = pg_database(test).await;
        Self::distributed_on(Env::new(test), db)
    }

    /// The distributed services over `env`'s ClickHouse database and the
    /// PostgreSQL database `db`.
    pub fn distributed_on(env: Env, db: String) -> Self {
        Self::distributed_with(env, db, 1)
    }

    fn distributed_with(env: Env, db: String, quota_refresh_secs: u64) -> Self {
        let (cfg, port) = env.collector_config("", 5000);
        let collector = env.spawn_collector(&cfg, port);
        let aggregator = env.spawn_aggregator(free_port(), None);
        let billing_env = vec![
            ("TALLY_DATABASE_URL".to_string(), db),
            (
                "TALLY_CLICKHOUSE_URL".to_string(),
                env.clickhouse_url.clone(),
            ),
            (
                "TALLY_CLICKHOUSE_DATABASE".to_string(),
                env.database.clone(),
            ),
        ];
        let (billing_proc, billing) =
            spawn_billing(&env, &billing_env, quota_refresh_secs, "billing-api");
        Self {
            mode: Mode::Distributed,
            ingest: format!("http://127.0.0.1:{port}"),
            billing,
            billing_env,
            dir: env.dir.clone(),
            procs: vec![collector, aggregator, billing_proc],
            http: reqwest::Client::new(),
            env: Some(env),
            quota_refresh_secs,
        }
    }

    /// The usage store's rollup version of `customer` now, read from the
    /// store itself (`usage.db`, or ClickHouse): what the quota state must
    /// reach to hold everything acknowledged so far.
    pub async fn store_version(&self, customer: &str) -> u64 {
        use aggregator::UsageStore;
        let now = Utc::now();
        let (from, to) = (
            now - chrono::Duration::days(40),
            now + chrono::Duration::days(40),
        );
        let ids = [customer.to_owned()];
        let v = match &self.env {
            Some(env) => env.store().versions(from, to, Some(&ids)).await,
            None => {
                let store =
                    aggregator::store::sqlite::SqliteStore::open(&self.dir.join("usage.db"))
                        .await
                        .unwrap();
                store.versions(from, to, Some(&ids)).await
            }
        };
        v.unwrap().get(customer).copied().unwrap_or(0)
    }

    /// Waits (polling, up to `timeout`) until the quota state at `billing`
    /// holds `customer`'s usage through `version`; returns how long it took.
    pub async fn await_quota_state(
        &self,
        billing: &str,
        customer: &str,
        version: u64,
        timeout: Duration,
    ) -> Duration {
        let start = std::time::Instant::now();
        loop {
            let (s, p) = self
                .api_at(
                    billing,
                    Method::GET,
                    &format!("/v1/quota/state?customer={customer}"),
                    None,
                )
                .await;
            assert_eq!(s, 200, "{p}");
            let at = p["customer"]["usage_version"].as_u64().unwrap_or(0);
            if at >= version && p["pending_rereads"] == 0 {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "the quota state of {customer} stayed at version {at} (< {version}): {p}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts another billing-api replica over the same stores (distributed
    /// mode); returns its base URL. It stops with the system.
    pub fn billing_replica(&mut self) -> String {
        let env = self
            .env
            .as_ref()
            .expect("replicas are of the distributed mode");
        let n = self.procs.len();
        let (p, billing) = spawn_billing(
            env,
            &self.billing_env,
            self.quota_refresh_secs,
            &format!("billing-api-{n}"),
        );
        self.procs.push(p);
        billing
    }

    /// SIGKILLs the process named `name` (`aggregator`, `billing-api`, …).
    pub fn kill9_named(&mut self, name: &str) {
        for p in self.procs.iter_mut().filter(|p| p.name == name) {
            p.kill9();
        }
        self.procs.retain(|p| p.name != name);
    }

    /// The pid of the first process (`tally` in the embedded mode).
    pub fn procs_pid(&self) -> u32 {
        self.procs[0].child.id()
    }

    /// SIGKILLs every process of this system.
    pub fn kill9(&mut self) {
        for p in &mut self.procs {
            p.kill9();
        }
    }

    /// SIGTERMs every process and waits for it to exit; true when every
    /// one exited by itself with status 0 (a graceful shutdown).
    pub fn terminate(&mut self) -> bool {
        self.procs.iter_mut().all(|p| {
            p.terminate();
            p.child
                .try_wait()
                .ok()
                .flatten()
                .is_some_and(|s| s.success())
        })
    }

    /// Posts events to the ingest API: (status, body).
    pub async fn ingest(&self, events: &[Value]) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/events", self.ingest))
            .bearer_auth(INGEST_KEY)
            .header("content-type", "application/cloudevents-batch+json")
            .json(events)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// Calls the billing API as admin: (status, body or Null).
    pub async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_with(method, path, body, &[]).await
    }

    /// [`api`](Self::api) with extra request headers.
    pub async fn api_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        self.request(&self.billing, method, path, body, headers)
            .await
    }

    /// [`System::api`] against another billing replica's base URL.
    pub async fn api_at(
        &self,
        billing: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request(billing, method, path, body, &[]).await
    }

    async fn request(
        &self,
        billing: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut rq = self
            .http
            .request(method, format!("{billing}{path}"))
            .bearer_auth(ADMIN_KEY);
        for (k, v) in headers {
            rq = rq.header(*k, *v);
        }
        if let Some(b) = body {
            rq = rq.json(&b);
        }
        let r = rq.send().await.unwrap();
        let s = r.status().as_u16();
        let text = r.text().await.unwrap();
        (s, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates a customer subscribed to `plan` from `starts_at`.
    pub async fn customer(&self, id: &str, plan: &str, starts_at: DateTime<Utc>) {
        let (s, v) = self
            .api(
                Method::POST,
                "/v1/customers",
                Some(serde_json::json!({"id": id, "external_id": format!("ext-{id}"), "name": id})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = self
            .api(
                Method::POST,
                &format!("/v1/customers/{id}/subscription"),
                Some(serde_json::json!({"plan": plan, "starts_at": starts_at})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }

    /// One finalization run as of `now` with this mode's command; its output.
    pub fn finalize(&self, now: DateTime<Utc>) -> String {
        let mut cmd = match self.mode {
            Mode::Embedded => {
                let mut c = Command::new(bin("tally"));
                c.arg("finalize").arg("--data-dir").arg(&self.dir);
                c
            }
            Mode::Distributed => {
                let mut c = Command::new(bin("billing-api"));
                c.arg("finalize").envs(self.billing_env.iter().cloned());
                c
            }
        };
        let out = cmd
            .args(["--grace-secs", "0", "--now", &now.to_rfc3339()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "finalize failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Polls `f` until it returns Some, or fails after `timeout`.
    pub async fn eventually<T, F, Fut>(&self, what: &str, timeout: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("{:?}: {what}: still {e}", self.mode)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// A requests event (CloudEvents JSON).
pub fn requests(id: &str, customer: &str, app: &str, time: DateTime<Utc>, count: u64) -> Value {
    serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "tests/behaviour",
        "type": "tally.requests",
        "subject": customer,
        "time": time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "datacontenttype": "application/json",
        "data": {"app": app, "count": count},
    })
}

/// A `billing-api serve` over `env`'s stores, following its usage deltas;
/// returns the process (named `name`) and its base URL once it answers.
fn spawn_billing(
    env: &Env,
    billing_env: &[(String, String)],
    quota_refresh_secs: u64,
    name: &str,
) -> (Proc, String) {
    let bp = free_port();
    let log = std::fs::File::create(env.dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(bin("billing-api"))
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{bp}")])
        .args(common_billing_args(quota_refresh_secs))
        .args(["--kafka-brokers", &env.brokers])
        .args(["--deltas-topic", &env.deltas_topic()])
        .envs(billing_env.iter().cloned())
        .env("TALLY_SESSION_SECRET", SESSION_SECRET)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let billing = format!("http://127.0.0.1:{bp}");
    wait_http(&format!("{billing}/healthz"), Duration::from_secs(60));
    (
        Proc {
            child,
            name: name.into(),
        },
        billing,
    )
}
