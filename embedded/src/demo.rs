//! `tally serve --demo`: a few simulated customers so a new user sees a
//! live cost dashboard right away.
//!
//! On the first start it subscribes five customers to the default plans
//! (payg, team with 3 seats, business, payg, free) from the start of the
//! month, back-fills their usage since then in hourly windows, and starts
//! the workload simulator, which sends every 10 s from there on. Everything
//! goes through the same ingest path as real usage; the simulator's ids are
//! deterministic, so a repeated back-fill (a crash before the simulator's
//! first checkpoint) is deduplicated.

use billing_api::invoice::month_of;
use billing_api::state::{Customer, NewSubscription, StateError, StateStore};
use chrono::{DateTime, TimeZone, Utc};
use collector::sink::{Envelope, EventSink};
use collector::sources::simulator::{customer_id, SimulatorConfig, Workload};
use schemas::MeterCatalog;

const PLANS: [&str; 5] = ["payg", "team", "business", "payg", "free"];

pub fn simulator() -> SimulatorConfig {
    SimulatorConfig {
        name: "demo-simulator".into(),
        customers: PLANS.len(),
        apps_per_customer: 3,
        seed: 7,
        interval_secs: 10,
    }
}

/// The customer whose dashboard the demo prints.
pub fn dashboard_customer() -> String {
    customer_id(0)
}

/// Creates the demo customers and their subscriptions (idempotent).
pub async fn customers(
    state: &(impl StateStore + ?Sized),
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let start = month_of(now).start;
    let plans = state.list_plans().await?;
    for (i, plan) in PLANS.iter().enumerate() {
        let id = customer_id(i);
        let version = plans
            .iter()
            .filter(|p| p.plan.plan == *plan && !p.retired)
            .map(|p| p.plan.version)
            .max()
            .ok_or_else(|| anyhow::anyhow!("the catalog has no plan {plan:?} for the demo"))?;
        let c = Customer {
            id: id.clone(),
            external_id: format!("demo-{i}"),
            name: format!("Demo customer {i}"),
        };
        // Each step may have happened on an earlier start.
        match state.create_customer(&c, "demo").await {
            Ok(()) | Err(StateError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        match state
            .subscribe(&id, &NewSubscription::new(plan, version, start), "demo")
            .await
        {
            Ok(_) if *plan == "team" => state.set_seats(&id, 3, start, "demo").await?,
            Ok(_) | Err(StateError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends the simulator's usage from the start of the month to the last
/// whole hour through `sink`; returns the end of the back-filled span (the
/// simulator continues from there) and the number of events.
pub async fn backfill(
    sink: &(impl EventSink + ?Sized),
    meters: &MeterCatalog,
    cfg: &SimulatorConfig,
    now: DateTime<Utc>,
) -> anyhow::Result<(DateTime<Utc>, usize)> {
    let from = month_of(now).start;
    let hour = now.timestamp().div_euclid(3600) * 3600;
    let to = Utc.timestamp_opt(hour, 0).single().expect("in range");
    let events = Workload {
        customers: cfg.customers,
        apps_per_customer: cfg.apps_per_customer,
        seed: cfg.seed,
    }
    .events(from, to, 3600);
    for chunk in events.chunks(2000) {
        let mut batch = Vec::with_capacity(chunk.len());
        for ev in chunk {
            batch.push(
                Envelope::accept(ev.clone(), meters, now)
                    .map_err(|e| anyhow::anyhow!("simulated event refused: {e:?}"))?,
            );
        }
        sink.send(batch).await?;
    }
    Ok((to, events.len()))
}
