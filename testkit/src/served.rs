//! The real `billing-api serve` process (the workspace's built binary, see
//! [`crate::pipeline::bin`]).

/// A `billing-api serve` process on a free loopback port over the stores at
/// `pg` and `ch`/`db`, with `key` as its admin key and Stripe off, answering
/// `/healthz` (the caller stops it).
/// What `billing-api hash-key` prints for `key`.
pub fn hash_key(key: &str) -> String {
    let out = std::process::Command::new(crate::pipeline::bin("billing-api"))
        .args(["hash-key", key])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub struct Served {
    pub child: std::process::Child,
    pub port: u16,
    pub base: String,
}

pub async fn spawn_serve(
    pg: &str,
    ch: &str,
    db: &str,
    key: &str,
    extra_args: &[&str],
    stderr: std::process::Stdio,
) -> Served {
    use std::process::{Command, Stdio};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hash = hash_key(key);
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(crate::pipeline::bin("billing-api"))
        .args(["serve", "--listen", &listen])
        .args(extra_args)
        .env("TALLY_DATABASE_URL", pg)
        .env("TALLY_CLICKHOUSE_URL", ch)
        .env("TALLY_CLICKHOUSE_DATABASE", db)
        .env("TALLY_ADMIN_KEY_SHA256", &hash)
        .env_remove("STRIPE_SECRET_KEY")
        // Not following usage deltas: this process re-reads the quota state
        // every --quota-refresh-secs (the configuration without Kafka).
        .env_remove("TALLY_KAFKA_BROKERS")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "serve did not come up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Served { child, port, base }
}
