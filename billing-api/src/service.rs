//! Running billing-api: loading the catalog file into the state store, the
//! scheduler (finalization runs, then Stripe sync), and the HTTP server with
//! graceful shutdown.

use crate::alerts::{AlertConfig, AlertRaiser, AlertSender};
use crate::api::{router, ApiState};
use crate::auth::{Authenticator, KEY_REFRESH};
use crate::finalize::Finalizer;
use crate::metrics::Metrics;
use crate::options::{BillingOptions, ServeOptions};
use crate::quota_service::QuotaService;
use crate::state::{DynStateStore, StateError, StateStore};
use crate::stripe_sync::StripeSync;
use aggregator::DynUsageStore;
use billing_domain::catalog::Catalog;
use chrono::Utc;
use schemas::MeterCatalog;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The parts of a billing process over a state store and a usage store:
/// the same for PostgreSQL + ClickHouse and for the embedded SQLite files.
pub struct Parts {
    pub state: Arc<DynStateStore<'static>>,
    pub usage: Arc<DynUsageStore<'static>>,
    pub finalizer: Arc<Finalizer>,
    pub sync: Option<Arc<StripeSync>>,
    pub meters: Arc<MeterCatalog>,
    pub metrics: Metrics,
}

/// Migrates the state store, publishes the catalog and builds the
/// finalizer and (with a key) the Stripe sync.
pub async fn setup(
    state: Arc<DynStateStore<'static>>,
    usage: Arc<DynUsageStore<'static>>,
    opts: &BillingOptions,
) -> anyhow::Result<Parts> {
    let meters = Arc::new(opts.meters()?);
    let catalog = opts.catalog()?;
    let config = opts.finalize_config()?;
    state.migrate().await?;
    let n = load_catalog(state.as_ref(), &catalog, &meters).await?;
    tracing::info!(published = n, "catalog loaded");
    let metrics = Metrics::new();
    let finalizer = Arc::new(Finalizer {
        state: state.clone(),
        usage: usage.clone(),
        meters: meters.clone(),
        config,
        metrics: metrics.clone(),
    });
    let sync = opts
        .stripe()
        .map(|c| Arc::new(StripeSync::new(c, state.clone(), metrics.clone())));
    if sync.is_none() {
        tracing::warn!("STRIPE_SECRET_KEY not set: invoices are finalized but not sent to Stripe");
    }
    Ok(Parts {
        state,
        usage,
        finalizer,
        sync,
        meters,
        metrics,
    })
}

impl Parts {
    /// One finalization run as of `now`, then Stripe sync when a key is
    /// set; prints what it did (the `finalize` commands).
    pub async fn finalize_once(&self, now: chrono::DateTime<Utc>) -> anyhow::Result<()> {
        let r = self.finalizer.run_once(now).await?;
        println!(
            "finalized {} invoice(s) over {} period(s)",
            r.finalized, r.periods
        );
        if let Some(s) = &self.sync {
            let (ok, failed) = s.run_once().await?;
            println!("synced {ok} invoice(s) to Stripe, {failed} failed");
            anyhow::ensure!(failed == 0, "{failed} invoice(s) failed to sync");
        }
        Ok(())
    }

    /// The HTTP API's state: keys loaded, quota state read once.
    pub async fn api(
        &self,
        opts: &BillingOptions,
        serve: &ServeOptions,
        admin_keys: Vec<[u8; 32]>,
        session_secret: Vec<u8>,
    ) -> anyhow::Result<Arc<ApiState>> {
        let auth = Arc::new(Authenticator::new(admin_keys, session_secret));
        auth.load(self.state.api_keys().await?);
        let quota = Arc::new(QuotaService::new(
            self.state.clone(),
            self.usage.clone(),
            self.meters.clone(),
        ));
        // The usage store may not be ready yet (the aggregator creates its
        // tables): answer from an empty state until the next refresh.
        match quota.refresh(Utc::now()).await {
            Ok(n) => tracing::info!(customers = n, "quota state loaded"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "quota state not loaded yet; retrying on the next refresh")
            }
        }
        Ok(Arc::new(ApiState {
            state: self.state.clone(),
            usage: self.usage.clone(),
            meters: self.meters.clone(),
            quota,
            metrics: self.metrics.clone(),
            auth,
            webhook_secret: serve.stripe_webhook_secret.clone(),
            min_charge: opts.min_charge,
            grace: std::time::Duration::from_secs(opts.grace_secs),
        }))
    }
}

/// Publishes every plan version of `catalog` that is not published yet.
/// A version already published with other terms is an error: published
/// versions are immutable, so a changed plan needs a new version number.
pub async fn load_catalog(
    state: &(impl StateStore + ?Sized),
    catalog: &Catalog,
    meters: &schemas::MeterCatalog,
) -> anyhow::Result<usize> {
    if let Err(errors) = catalog.validate(meters) {
        let list: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        anyhow::bail!("catalog is invalid:\n  {}", list.join("\n  "));
    }
    let mut published = 0;
    for plan in &catalog.plans {
        match state.plan_version(&plan.plan, plan.version).await {
            Ok(existing) if &existing == plan => {}
            Ok(_) => anyhow::bail!(
                "plan {} version {} in the catalog file differs from the published version; \
                 publish it as a new version",
                plan.plan,
                plan.version
            ),
            Err(StateError::NotFound(_)) => {
                state.publish_plan(plan, "catalog-file").await?;
                published += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(published)
}

/// Runs finalization and then Stripe sync every `every`, until `stop`.
/// Each step is safe to interrupt: a killed process resumes on restart.
pub async fn scheduler(
    finalizer: Arc<Finalizer>,
    sync: Option<Arc<StripeSync>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match finalizer.run_once(Utc::now()).await {
            Ok(r) if r.finalized > 0 => {
                tracing::info!(invoices = r.finalized, "finalization run")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %format!("{e:#}"), "finalization run failed"),
        }
        if let Some(s) = &sync {
            if *stop.borrow() {
                break;
            }
            match s.run_once().await {
                Ok((0, 0)) => {}
                Ok((ok, failed)) => tracing::info!(ok, failed, "Stripe sync run"),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "Stripe sync run failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
    }
}

/// Serves the API on `listener` until SIGTERM/Ctrl-C, then stops in
/// order within `opts.shutdown_limit()`: in-flight requests, then the
/// current scheduler step (see `serving::process`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<ApiState>,
    finalizer: Arc<Finalizer>,
    sync: Option<Arc<StripeSync>>,
    opts: &ServeOptions,
    alerts: Option<AlertConfig>,
) -> anyhow::Result<()> {
    serve_until(
        listener,
        api,
        finalizer,
        sync,
        opts.clone(),
        alerts,
        serving::process::shutdown_signal(),
    )
    .await
}

/// [`serve`] until `shutdown` completes instead of a signal (the embedded
/// process shares one shutdown between ingest and billing).
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    api: Arc<ApiState>,
    finalizer: Arc<Finalizer>,
    sync: Option<Arc<StripeSync>>,
    opts: ServeOptions,
    alerts: Option<AlertConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (every, quota_every) = (opts.finalize_every(), opts.quota_every());
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(config) = &alerts {
        let sender = AlertSender::new(api.state.clone(), config.clone(), api.metrics.clone());
        tokio::spawn(send_alerts(sender, stop_rx.clone()));
    }
    tokio::spawn(refresh_quota(
        api.clone(),
        quota_every,
        opts.quota_backstop(),
        alerts,
        stop_rx.clone(),
    ));
    let sched = tokio::spawn(scheduler(finalizer, sync, every, stop_rx.clone()));
    tokio::spawn(refresh_keys(api.clone(), stop_rx));
    tracing::info!(addr = %listener.local_addr()?, "billing-api listening");
    // hyper's own 414/431/400 answers carry the error envelope too.
    let deadline =
        serving::process::serve(listener, router(api), shutdown, opts.shutdown_limit()).await?;
    let _ = stop_tx.send(true);
    let _ = deadline.stage("finalization and Stripe sync", sched).await;
    tracing::info!("billing-api stopped");
    Ok(())
}

/// Reloads API keys from the state store every [`KEY_REFRESH`], so keys
/// created or revoked through another replica take effect here.
async fn refresh_keys(api: Arc<ApiState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(KEY_REFRESH) => {}
            _ = stop.changed() => return,
        }
        match api.state.api_keys().await {
            Ok(keys) => api.auth.load(keys),
            Err(e) => {
                tracing::warn!(error = %e, "could not reload API keys; keeping the cached ones")
            }
        }
    }
}

/// Keeps the quota state current and raises the usage alerts it warrants.
///
/// Following usage deltas ([`QuotaService::following`]), the alerts of the
/// entries changed are evaluated every second and every customer is re-read
/// only every `backstop` (changes the state cannot see: credit consumed by
/// a finalization run in another process). Otherwise every customer is
/// re-read every `every`, then every entry is evaluated.
async fn refresh_quota(
    api: Arc<ApiState>,
    every: Duration,
    backstop: Duration,
    alerts: Option<AlertConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let raiser = alerts.map(AlertRaiser::new);
    let mut last_full = std::time::Instant::now();
    loop {
        let following = api.quota.following();
        let wait = if following {
            Duration::from_secs(1)
        } else {
            every
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        let full = !following || last_full.elapsed() >= backstop;
        if full {
            last_full = std::time::Instant::now();
            if let Err(e) = api.quota.refresh(chrono::Utc::now()).await {
                tracing::warn!(error = %format!("{e:#}"), "quota refresh failed; answering from the previous state");
                continue;
            }
        }
        if let Some(raiser) = &raiser {
            let entries = if following {
                api.quota.take_changed()
            } else {
                api.quota.entries()
            };
            if let Err(e) = raiser
                .raise_for(entries, api.state.as_ref(), &api.metrics, Utc::now())
                .await
            {
                tracing::warn!(error = %format!("{e:#}"), "usage alert evaluation failed; retrying after the next refresh");
            }
        }
    }
}

/// Delivers due usage alerts every few seconds.
async fn send_alerts(sender: AlertSender, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = sender.run_once(Utc::now()).await {
            tracing::warn!(error = %format!("{e:#}"), "usage alert delivery run failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => return,
        }
    }
}
