//! Workload simulator: N customers × M apps with plausible compute, disk,
//! request and egress patterns, for demos and load tests.
//!
//! Generation is a pure function of (seed, customer, app, window), so the
//! same parameters always give the same events with the same ids, and the
//! ground truth of any set of events is simply their sum
//! ([`ground_truth`]). App profiles:
//!
//! - `toy`: one `t4g.nano`, a handful of requests a minute, small responses;
//! - `always_on`: 2–4 `c6g.large` instances following a daily curve,
//!   thousands of requests a minute;
//! - `stateful`: one `t4g.small` with a 10–50 GB volume, steady traffic.

use super::{cloud_event, Source};
use chrono::{DateTime, Duration as CDuration, TimeZone, Timelike, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use schemas::ids::deterministic_id;
use schemas::{MeterCatalog, RawEvent, UsageEvent};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

pub const SIMULATOR_SOURCE: &str = "tally-simulator";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    pub name: String,
    pub customers: usize,
    pub apps_per_customer: usize,
    #[serde(default)]
    pub seed: u64,
    /// Seconds between polls; also the length of each generated window.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
}
fn default_interval() -> u64 {
    10
}

impl SimulatorConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.customers == 0 || self.apps_per_customer == 0 {
            return Err("customers and apps_per_customer: must be positive".into());
        }
        if self.interval_secs == 0 || 3600 % self.interval_secs != 0 {
            return Err("interval_secs: must divide 3600".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Toy,
    AlwaysOn,
    Stateful,
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub customers: usize,
    pub apps_per_customer: usize,
    pub seed: u64,
}

fn rng_for(parts: &[&str]) -> StdRng {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    StdRng::seed_from_u64(u64::from_le_bytes(d[..8].try_into().unwrap()))
}

pub fn customer_id(i: usize) -> String {
    format!("sim-c{i:04}")
}

impl Workload {
    pub fn profile(&self, customer: usize, app: usize) -> Profile {
        let mut r = rng_for(&[
            &self.seed.to_string(),
            &customer.to_string(),
            &app.to_string(),
            "profile",
        ]);
        match r.random_range(0..10) {
            0..=4 => Profile::Toy,
            5..=7 => Profile::AlwaysOn,
            _ => Profile::Stateful,
        }
    }

    /// Events for every window of `step_secs` starting in `[from, to)`.
    pub fn events(&self, from: DateTime<Utc>, to: DateTime<Utc>, step_secs: i64) -> Vec<RawEvent> {
        let mut out = Vec::new();
        let mut t = from;
        while t < to {
            for c in 0..self.customers {
                for a in 0..self.apps_per_customer {
                    self.window(c, a, t, step_secs, &mut out);
                }
            }
            t += CDuration::seconds(step_secs);
        }
        out
    }

    fn window(&self, c: usize, a: usize, t: DateTime<Utc>, step: i64, out: &mut Vec<RawEvent>) {
        let seed = self.seed.to_string();
        let cust = customer_id(c);
        let app = format!("app-{a}");
        let ts = t.timestamp().to_string();
        let mut r = rng_for(&[&seed, &cust, &app, &ts]);
        let hour = t.hour() as f64;
        // Daily curve between 0.4 and 1.0, peaking mid-afternoon UTC.
        let diurnal = 0.7 + 0.3 * ((hour - 9.0) / 24.0 * std::f64::consts::TAU).sin();
        let profile = self.profile(c, a);
        let (itype, instances, per_min, bytes_per_req, volume_gb) = match profile {
            Profile::Toy => ("t4g.nano", 1, r.random_range(0..20), 2_000, None),
            Profile::AlwaysOn => {
                let n = (2.0 + 2.0 * diurnal).round() as usize;
                (
                    "c6g.large",
                    n,
                    (r.random_range(1000..5000) as f64 * diurnal) as u64,
                    20_000,
                    None,
                )
            }
            Profile::Stateful => {
                let gb = 10 + (c * 7 + a * 13) as u64 % 41;
                ("t4g.small", 1, r.random_range(50..300), 8_000, Some(gb))
            }
        };
        let id = |kind: &str, n: usize| {
            deterministic_id(&[
                SIMULATOR_SOURCE,
                &seed,
                &cust,
                &app,
                kind,
                &n.to_string(),
                &ts,
            ])
        };
        for n in 0..instances {
            out.push(cloud_event(
                id("compute", n),
                SIMULATOR_SOURCE,
                "tally.compute",
                &cust,
                t,
                json!({"app": app, "instance_id": format!("{app}-i{n}"), "instance_type": itype, "region": "fra", "instance_seconds": step}),
            ));
        }
        if let Some(gb) = volume_gb {
            out.push(cloud_event(
                id("disk", 0),
                SIMULATOR_SOURCE,
                "tally.disk",
                &cust,
                t,
                json!({"app": app, "volume_id": format!("{app}-vol"), "gb_seconds": gb * step as u64}),
            ));
        }
        let requests = per_min * step as u64 / 60;
        if requests > 0 {
            out.push(cloud_event(
                id("requests", 0),
                SIMULATOR_SOURCE,
                "tally.requests",
                &cust,
                t,
                json!({"app": app, "count": requests}),
            ));
            let bytes = requests * bytes_per_req + r.random_range(0..1000);
            out.push(cloud_event(
                id("egress", 0),
                SIMULATOR_SOURCE,
                "tally.egress",
                &cust,
                t,
                json!({"app": app, "bytes": bytes}),
            ));
        }
    }
}

/// Totals per `customer/app/meter` of a set of events: the quantities a
/// correct pipeline must report for them.
pub fn ground_truth(events: &[RawEvent], meters: &MeterCatalog) -> BTreeMap<String, Decimal> {
    let mut truth = BTreeMap::new();
    for ev in events {
        let v = UsageEvent::validate(ev, meters, &schemas::AcceptWindow::unbounded())
            .expect("simulated events are valid");
        for r in v.records {
            *truth
                .entry(format!("{}/{}/{}", v.customer, r.app, r.meter))
                .or_insert(Decimal::ZERO) += r.quantity;
        }
    }
    truth
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SimState {
    until: Option<i64>,
}

/// The simulator as a live source: each poll emits the windows since the
/// previous one.
pub struct SimulatorSource {
    cfg: SimulatorConfig,
    workload: Workload,
    state: SimState,
}

impl SimulatorSource {
    pub fn new(cfg: SimulatorConfig) -> Self {
        let workload = Workload {
            customers: cfg.customers,
            apps_per_customer: cfg.apps_per_customer,
            seed: cfg.seed,
        };
        Self {
            cfg,
            workload,
            state: SimState::default(),
        }
    }
}

impl Source for SimulatorSource {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn interval(&self) -> Duration {
        Duration::from_secs(self.cfg.interval_secs)
    }
    fn restore(&mut self, state: serde_json::Value) -> anyhow::Result<()> {
        self.state = serde_json::from_value(state)?;
        Ok(())
    }
    fn snapshot(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("serializes")
    }
    async fn poll(&mut self, now: DateTime<Utc>) -> anyhow::Result<Vec<RawEvent>> {
        let step = self.cfg.interval_secs as i64;
        let end = now.timestamp().div_euclid(step) * step;
        let start = self.state.until.unwrap_or(end - step).max(end - 3600);
        self.state.until = Some(end);
        let ts = |s| Utc.timestamp_opt(s, 0).single().expect("in range");
        Ok(self.workload.events(ts(start), ts(end), step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_valid_and_varied() {
        let w = Workload {
            customers: 4,
            apps_per_customer: 3,
            seed: 7,
        };
        let from = Utc.with_ymd_and_hms(2026, 11, 10, 0, 0, 0).unwrap();
        let a = w.events(from, from + CDuration::minutes(10), 60);
        let b = w.events(from, from + CDuration::minutes(10), 60);
        assert_eq!(a, b);
        let truth = ground_truth(&a, &MeterCatalog::default_catalog());
        assert!(
            truth.keys().any(|k| k.ends_with("/compute"))
                && truth.keys().any(|k| k.ends_with("/requests"))
        );
        let profiles: std::collections::BTreeSet<_> = (0..4)
            .flat_map(|c| (0..3).map(move |a| (c, a)))
            .map(|(c, a)| format!("{:?}", w.profile(c, a)))
            .collect();
        assert!(profiles.len() >= 2, "{profiles:?}");
        let mut ids: Vec<_> = a.iter().map(|e| e["id"].as_str().unwrap()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), a.len());
    }
}
