//! Running billing-api: loading the catalog file into the state store, the
//! scheduler (finalization runs, then Stripe sync), and the HTTP server with
//! graceful shutdown.

use crate::alerts::{AlertConfig, AlertRaiser, AlertSender};
use crate::api::{router, ApiState};
use crate::auth::KEY_REFRESH;
use crate::catalog::Catalog;
use crate::finalize::Finalizer;
use crate::state::{StateError, StateStore};
use crate::stripe_sync::StripeSync;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Publishes every plan version of `catalog` that is not published yet.
/// A version already published with other terms is an error: published
/// versions are immutable, so a changed plan needs a new version number.
pub async fn load_catalog(
    state: &dyn StateStore,
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

/// Serves the API on `listener` until SIGTERM/Ctrl-C, then lets in-flight
/// requests and the current scheduler step finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<ApiState>,
    finalizer: Arc<Finalizer>,
    sync: Option<Arc<StripeSync>>,
    every: Duration,
    quota_every: Duration,
    alerts: Option<AlertConfig>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(config) = &alerts {
        let sender = AlertSender::new(api.state.clone(), config.clone(), api.metrics.clone());
        tokio::spawn(send_alerts(sender, stop_rx.clone()));
    }
    tokio::spawn(refresh_quota(
        api.clone(),
        quota_every,
        alerts,
        stop_rx.clone(),
    ));
    let sched = tokio::spawn(scheduler(finalizer, sync, every, stop_rx.clone()));
    tokio::spawn(refresh_keys(api.clone(), stop_rx));
    tracing::info!(addr = %listener.local_addr()?, "billing-api listening");
    axum::serve(listener, router(api))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    let _ = stop_tx.send(true);
    let _ = sched.await;
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

/// Reloads the quota state of every customer every `every`, then raises
/// the usage alerts it warrants.
async fn refresh_quota(
    api: Arc<ApiState>,
    every: Duration,
    alerts: Option<AlertConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let raiser = alerts.map(AlertRaiser::new);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = api.quota.refresh(chrono::Utc::now()).await {
            tracing::warn!(error = %format!("{e:#}"), "quota refresh failed; answering from the previous state");
            continue;
        }
        if let Some(raiser) = &raiser {
            if let Err(e) = raiser
                .raise(&api.quota, api.state.as_ref(), &api.metrics, Utc::now())
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

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
