//! The embedded process: collector ingest, the aggregator's processor and
//! billing-api over two SQLite files in one data directory.
//!
//! | file | what |
//! |---|---|
//! | `usage.db` | the usage store (`aggregator::store::sqlite`): raw rows, hourly rollups, dead letters |
//! | `state.db` | the billing state (`billing_api::state::sqlite`): plans, customers, invoices, keys, audit |
//! | `admin.key`, `ingest.key`, `session.secret` | created on the first start (0600) unless given by flags |
//! | `checkpoints/` | the demo simulator's checkpoint |
//!
//! Two listeners, with the same routes as the distributed services: ingest
//! (`POST /v1/events`, `/metrics` with the collector's and aggregator's
//! metrics) and billing (`/v1/…`, `/dashboard`, `/metrics`).
//!
//! Shutdown (SIGTERM/Ctrl-C): both servers stop taking requests and finish
//! the ones in flight, the demo simulator stops, the usage writer drains
//! its queue (every acknowledged batch is already committed), the billing
//! scheduler finishes its step.

use crate::ingest;
use crate::secrets::load_or_create;
use aggregator::store::sqlite::SqliteStore;
use aggregator::{DynUsageStore, UsageWriter};
use billing_api::auth::mint_session;
use billing_api::options::{BillingOptions, ServeOptions};
use billing_api::service::{serve_until, setup};
use billing_api::state::sqlite::SqliteState;
use billing_api::state::{DynStateStore, StateStore};
use chrono::Utc;
use collector::api::{router, IngestState};
use collector::auth::{hash_key, KeySet};
use collector::sink::DynEventSink;
use collector::sources::simulator::SimulatorSource;
use collector::sources::{DynSource, Source, SourceRunner};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

/// Settings of `tally serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Where the SQLite files, keys and checkpoints live.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = ".tally")]
    pub data_dir: PathBuf,
    /// Billing API and dashboard address.
    #[arg(long, env = "TALLY_BILLING_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: String,
    /// Ingest API address (`POST /v1/events`).
    #[arg(long, env = "TALLY_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub ingest_listen: String,
    /// SHA-256 (hex) of each ingest key; `<data-dir>/ingest.key` when absent.
    #[arg(long, env = "TALLY_INGEST_KEY_SHA256", value_delimiter = ',')]
    pub ingest_key_sha256: Vec<String>,
    /// Most events written (and fsynced) per usage transaction.
    #[arg(long, env = "TALLY_WRITE_BATCH", default_value_t = 10_000)]
    pub write_batch: usize,
    /// Run the demo: five simulated customers with live usage.
    #[arg(long)]
    pub demo: bool,
    #[command(flatten)]
    pub billing: BillingOptions,
    #[command(flatten)]
    pub serve: ServeOptions,
}

/// The embedded data directory's two stores, opened and migrated.
pub async fn open_stores(
    dir: &std::path::Path,
) -> anyhow::Result<(Arc<SqliteStore>, Arc<SqliteState>)> {
    crate::secrets::private_dir(dir)
        .map_err(|e| anyhow::anyhow!("--data-dir {}: {e}", dir.display()))?;
    // SQLite creates a database's -wal and -shm files with the database
    // file's own mode, so owner-only database files keep them private too.
    for db in ["usage.db", "state.db"] {
        crate::secrets::private_file(&dir.join(db))?;
    }
    let usage = Arc::new(SqliteStore::open(&dir.join("usage.db")).await?);
    usage.migrate().await?;
    let state = Arc::new(SqliteState::open(&dir.join("state.db")).await?);
    state.migrate().await?;
    Ok((usage, state))
}

/// Runs until `shutdown` completes.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let alerts = cfg.serve.alerts()?;
    let dir = &cfg.data_dir;
    let (usage, state) = open_stores(dir).await?;

    // Keys: given, or created in the data directory on the first start.
    let mut admin_keys = cfg.serve.admin_keys()?;
    let admin_key = if admin_keys.is_empty() {
        let k = load_or_create(dir, "admin.key", "tally_admin_")?;
        admin_keys.push(hash_key(&k));
        Some(k)
    } else {
        None
    };
    let session_secret = match cfg.serve.session_secret()? {
        Some(s) => s,
        None => load_or_create(dir, "session.secret", "")?.into_bytes(),
    };
    let (ingest_hashes, ingest_key) = if cfg.ingest_key_sha256.is_empty() {
        let k = load_or_create(dir, "ingest.key", "tally_ingest_")?;
        (vec![hex::encode(hash_key(&k))], Some(k))
    } else {
        (cfg.ingest_key_sha256.clone(), None)
    };
    let keys = Arc::new(
        KeySet::from_hex(&ingest_hashes)
            .map_err(|e| anyhow::anyhow!("--ingest-key-sha256: {e}"))?,
    );

    // Billing over the SQLite state and usage.
    let state_dyn = DynStateStore::from_arc(state.clone());
    let parts = setup(
        state_dyn,
        DynUsageStore::from_arc(usage.clone()),
        &cfg.billing,
    )
    .await?;
    let api = parts
        .api(&cfg.billing, &cfg.serve, admin_keys, session_secret.clone())
        .await?;

    // Ingest: the collector's API over the embedded usage writer.
    let (stop_tx, stop_rx) = watch::channel(false);
    let collector_metrics = collector::metrics::Metrics::new();
    let agg_metrics = aggregator::metrics::Metrics::in_registry(collector_metrics.registry.clone());
    // The quota state follows every committed batch (see `ingest`).
    let (deltas, _) = tokio::sync::broadcast::channel(DELTA_BACKLOG);
    tokio::spawn(
        api.quota
            .clone()
            .follow(follow_broadcast(deltas.subscribe()), stop_rx.clone()),
    );
    let (sink, writer) = ingest::start(
        usage.clone(),
        parts.meters.clone(),
        agg_metrics,
        cfg.write_batch.max(1),
        deltas,
        stop_rx.clone(),
    )
    .await?;

    let mut sources = Vec::new();
    if cfg.demo {
        let now = Utc::now();
        crate::demo::customers(parts.state.as_ref(), now).await?;
        let sim = crate::demo::simulator();
        let checkpoints = dir.join("checkpoints");
        std::fs::create_dir_all(&checkpoints)?;
        let mut source = SimulatorSource::new(sim.clone());
        if !checkpoints.join(format!("{}.json", sim.name)).exists() {
            let (until, n) = crate::demo::backfill(sink.as_ref(), &parts.meters, &sim, now).await?;
            tracing::info!(
                events = n,
                "demo usage back-filled since the start of the month"
            );
            source.restore(serde_json::json!({ "until": until.timestamp() }))?;
        }
        let runner = SourceRunner::new(
            DynSource::new_box(source),
            &checkpoints,
            DynEventSink::from_arc(sink.clone()),
            parts.meters.clone(),
            collector_metrics.clone(),
        );
        sources.push(tokio::spawn(runner.run(stop_rx.clone())));
    }

    let limits = collector::config::Limits::default();
    let ingest_state = IngestState {
        sink: DynEventSink::from_arc(sink.clone()),
        meters: parts.meters.clone(),
        keys,
        metrics: collector_metrics,
        // The distributed collector's default limits.
        max_body_bytes: limits.max_body_bytes,
        max_batch_events: limits.max_batch_events,
    };
    drop(sink);
    let ingest_listener = tokio::net::TcpListener::bind(&cfg.ingest_listen)
        .await
        .map_err(|e| anyhow::anyhow!("--ingest-listen {}: {e}", cfg.ingest_listen))?;
    let billing_listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", cfg.listen))?;
    let ingest_addr = ingest_listener.local_addr()?;
    let billing_addr = billing_listener.local_addr()?;

    let (done_tx, done_rx) = watch::channel(false);
    let stop_http = || {
        let mut rx = done_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = done_tx.send(true);
    });
    let limit = cfg.serve.shutdown_limit();
    let ingest_http = tokio::spawn(serving::process::serve(
        ingest_listener,
        router(ingest_state),
        stop_http(),
        limit,
    ));
    let billing = tokio::spawn(serve_until(
        billing_listener,
        api,
        parts.finalizer.clone(),
        parts.sync.clone(),
        cfg.serve.clone(),
        alerts,
        stop_http(),
    ));

    print_banner(
        &cfg,
        ingest_addr,
        billing_addr,
        admin_key.is_some(),
        ingest_key.is_some(),
        &session_secret,
    );
    tracing::info!(%ingest_addr, %billing_addr, data_dir = %dir.display(), "tally (embedded) running");

    // Ordered, within one time limit from the signal (serving::process):
    // both APIs' open requests, billing's step in hand, the sources, then
    // the writer's queue (every event in it was acknowledged only after
    // its commit, so nothing acknowledged waits there).
    // A failed ingest server still lets the rest stop in order; its error
    // is returned last.
    let ingest_res = ingest_http.await?;
    let deadline = match &ingest_res {
        Ok(d) => *d,
        Err(_) => serving::process::Deadline::after(limit),
    };
    let billing_res = billing.await?;
    let _ = stop_tx.send(true);
    let _ = deadline
        .stage("sources", futures::future::join_all(sources))
        .await;
    // Every sink is gone now: the writer drains its queue and ends.
    let _ = deadline.stage("usage writer", writer).await;
    tracing::info!("tally (embedded) stopped");
    ingest_res?;
    billing_res
}

/// What a start prints: where things are, never a key. Keys created on the
/// first start are files in the data directory (0600), and the commands
/// shown read them from there, so the keys stay out of terminal scrollback,
/// journald and container logs. The demo prints a link holding a session
/// for one simulated customer: the longest a session may live (24 hours),
/// scoped to that customer's own data, and only with `--demo`.
fn print_banner(
    cfg: &Config,
    ingest: std::net::SocketAddr,
    billing: std::net::SocketAddr,
    admin_key_created: bool,
    ingest_key_created: bool,
    session_secret: &[u8],
) {
    let dir = cfg.data_dir.display();
    let admin = if admin_key_created {
        format!("$(cat {dir}/admin.key)")
    } else {
        "<your admin key>".to_owned()
    };
    let ingest_k = if ingest_key_created {
        format!("$(cat {dir}/ingest.key)")
    } else {
        "<your ingest key>".to_owned()
    };
    println!("Tally (embedded) is running; data in {dir}");
    println!(
        "  ingest API     POST http://{ingest}/v1/events   (Authorization: Bearer {ingest_k})"
    );
    println!("  billing API    http://{billing}/v1/...          (Authorization: Bearer {admin})");
    println!("  metrics        http://{ingest}/metrics  http://{billing}/metrics");
    if cfg.demo {
        let customer = crate::demo::dashboard_customer();
        let expiry = Utc::now().timestamp() + billing_api::auth::MAX_SESSION_SECS;
        let token = mint_session(session_secret, &customer, expiry);
        println!("  cost dashboard http://{billing}/dashboard#token={token}");
        println!("                 (customer {customer}, valid 24 h; the simulator adds usage every 10 s)");
        println!(
            "  invoice draft  curl -H \"Authorization: Bearer {admin}\" http://{billing}/v1/customers/{customer}/invoices/draft"
        );
    }
    println!("Stop with Ctrl-C; start again with the same --data-dir to resume.");
}

/// Batches the quota state may fall behind the writer before it re-reads
/// everyone instead.
const DELTA_BACKLOG: usize = 4096;

/// The quota state's feed from the in-process broadcast: a receiver that
/// fell behind says so, and the state re-reads the store.
fn follow_broadcast(
    mut rx: tokio::sync::broadcast::Receiver<std::sync::Arc<aggregator::delta::UsageDelta>>,
) -> tokio::sync::mpsc::Receiver<billing_api::quota_service::Feed> {
    use billing_api::quota_service::Feed;
    use tokio::sync::broadcast::error::RecvError;
    let (tx, out) = tokio::sync::mpsc::channel(DELTA_BACKLOG);
    tokio::spawn(async move {
        loop {
            let item = match rx.recv().await {
                Ok(d) => Feed::Delta(d),
                Err(RecvError::Lagged(_)) => Feed::Lost,
                Err(RecvError::Closed) => return,
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    out
}
