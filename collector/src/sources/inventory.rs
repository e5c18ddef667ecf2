//! Inventory sampler: turns the control plane's list of running instances
//! and volumes (gauges) into compute instance-seconds and disk GB-seconds.
//!
//! ## Gauge-to-usage semantics
//!
//! Time is cut into windows `[a, a + W)` aligned to multiples of
//! `window_secs` since the epoch (W divides 3600, so windows never straddle
//! an hour, day or month). A *segment* is a span during which a resource
//! existed unchanged: an instance from `started_at` to `stopped_at`, a volume
//! at one size from `size_since` until it is resized or deleted. For every
//! window a segment overlaps, one event is emitted with quantity
//! `rate × overlap` (rate 1 for instances, `size_gb` for volumes) and id
//! `hash(kind, resource id, segment start, window start)`.
//!
//! - A window is emitted once it is closed (its end has passed), or at once
//!   when the segment's end is known. The quantity depends only on the
//!   segment's start and end and the window, never on when the poll ran.
//! - Restarts: covered windows are checkpointed (see the runner in
//!   `sources/mod.rs`), so a restarted collector continues where it stopped;
//!   re-emitted windows carry the same ids and are deduplicated.
//! - Missed polls: the next poll emits every window the gap left open.
//! - Overlapping collectors with the same source `name` emit identical events
//!   (same source, id and quantity), which collapse into one.
//! - A resource that disappears without a `stopped_at` / `deleted_at` is
//!   billed until the last poll that saw it (the best the sampler can know);
//!   control planes should report stop times for exact billing.
//! - A volume listed without `size_since` takes the time the sampler first
//!   saw that size as the start of its segment.

use super::{cloud_event, Source};
use chrono::{DateTime, Duration as CDuration, TimeZone, Utc};
use rust_decimal::Decimal;
use schemas::event::previous_month_start;
use schemas::ids::deterministic_id;
use schemas::RawEvent;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryConfig {
    pub name: String,
    /// HTTP endpoint returning an [`Inventory`] JSON document.
    pub url: String,
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    #[serde(default = "default_window")]
    pub window_secs: i64,
}
fn default_interval() -> u64 {
    15
}
fn default_window() -> i64 {
    60
}

impl InventoryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.window_secs <= 0 || 3600 % self.window_secs != 0 {
            return Err(format!(
                "window_secs: {} must divide 3600",
                self.window_secs
            ));
        }
        if self.interval_secs == 0 {
            return Err("interval_secs: must be positive".into());
        }
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            return Err(format!("url: {:?} is not an http(s) URL", self.url));
        }
        Ok(())
    }
}

/// The control plane's inventory document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Inventory {
    #[serde(default)]
    pub instances: Vec<Instance>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub customer: String,
    pub app: String,
    pub instance_id: String,
    pub instance_type: String,
    pub region: String,
    pub started_at: DateTime<Utc>,
    /// Set for instances that stopped recently.
    #[serde(default)]
    pub stopped_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Volume {
    pub customer: String,
    pub app: String,
    pub volume_id: String,
    pub size_gb: Decimal,
    /// When the current size took effect.
    #[serde(default)]
    pub size_since: Option<DateTime<Utc>>,
    #[serde(default)]
    pub deleted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Instance,
    Volume,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Segment {
    kind: Kind,
    resource_id: String,
    customer: String,
    app: String,
    /// instance_type + region, or empty for volumes.
    attrs: BTreeMap<String, String>,
    rate: Decimal,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
    last_seen: DateTime<Utc>,
    covered_until: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplerState {
    segments: BTreeMap<String, Segment>,
}

fn align_down(t: DateTime<Utc>, w: i64) -> DateTime<Utc> {
    let s = t.timestamp().div_euclid(w) * w;
    Utc.timestamp_opt(s, 0).single().expect("in range")
}

fn seconds(d: CDuration) -> Decimal {
    Decimal::new(d.num_milliseconds(), 3).normalize()
}

/// The pure part of the sampler: applies one observation and returns the
/// events it makes due.
pub struct Sampler {
    pub source: String,
    pub window_secs: i64,
    pub state: SamplerState,
}

impl Sampler {
    pub fn new(source: impl Into<String>, window_secs: i64) -> Self {
        Self {
            source: source.into(),
            window_secs,
            state: SamplerState::default(),
        }
    }

    pub fn observe(&mut self, inv: &Inventory, now: DateTime<Utc>) -> Vec<RawEvent> {
        let mut seen = std::collections::BTreeSet::new();
        for i in &inv.instances {
            let key = format!(
                "instance/{}/{}",
                i.instance_id,
                i.started_at.timestamp_millis()
            );
            let attrs = BTreeMap::from([
                ("instance_type".into(), i.instance_type.clone()),
                ("region".into(), i.region.clone()),
            ]);
            self.upsert(
                key.clone(),
                Kind::Instance,
                &i.instance_id,
                &i.customer,
                &i.app,
                attrs,
                Decimal::ONE,
                i.started_at,
                i.stopped_at,
                now,
            );
            seen.insert(key);
        }
        for v in &inv.volumes {
            // The open segment of this volume, if any.
            let open = self
                .state
                .segments
                .iter()
                .find(|(_, s)| {
                    s.kind == Kind::Volume && s.resource_id == v.volume_id && s.end.is_none()
                })
                .map(|(k, s)| (k.clone(), s.rate, s.start));
            let start = match (v.size_since, &open) {
                (Some(t), _) => t,
                (None, Some((_, rate, start))) if *rate == v.size_gb => *start,
                (None, _) => now,
            };
            let key = format!("volume/{}/{}", v.volume_id, start.timestamp_millis());
            if let Some((open_key, _, _)) = open {
                if open_key != key {
                    // Resized: the previous size ends where this one starts.
                    if let Some(s) = self.state.segments.get_mut(&open_key) {
                        s.end = Some(start.max(s.start));
                    }
                }
            }
            self.upsert(
                key.clone(),
                Kind::Volume,
                &v.volume_id,
                &v.customer,
                &v.app,
                BTreeMap::new(),
                v.size_gb,
                start,
                v.deleted_at,
                now,
            );
            seen.insert(key);
        }
        // Vanished without a reported end: billed until last seen.
        for (k, s) in self.state.segments.iter_mut() {
            if !seen.contains(k) && s.end.is_none() {
                s.end = Some(s.last_seen);
            }
        }
        self.emit(now)
    }

    #[allow(clippy::too_many_arguments)]
    fn upsert(
        &mut self,
        key: String,
        kind: Kind,
        id: &str,
        customer: &str,
        app: &str,
        attrs: BTreeMap<String, String>,
        rate: Decimal,
        start: DateTime<Utc>,
        end: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        let w = self.window_secs;
        let floor = previous_month_start(now);
        let seg = self.state.segments.entry(key).or_insert_with(|| Segment {
            kind,
            resource_id: id.to_owned(),
            customer: customer.to_owned(),
            app: app.to_owned(),
            attrs,
            rate,
            start,
            end: None,
            last_seen: now,
            covered_until: align_down(start.max(floor), w),
        });
        seg.last_seen = now;
        if end.is_some() {
            seg.end = end;
        }
    }

    fn emit(&mut self, now: DateTime<Utc>) -> Vec<RawEvent> {
        let w = CDuration::seconds(self.window_secs);
        let mut out = Vec::new();
        let mut done = Vec::new();
        for (key, s) in self.state.segments.iter_mut() {
            let end_known = s.end.filter(|e| *e <= now);
            loop {
                let a = s.covered_until;
                let b = a + w;
                let due = match end_known {
                    Some(e) => a < e,
                    None => b <= now,
                };
                if !due {
                    break;
                }
                let from = a.max(s.start);
                let to = match end_known {
                    Some(e) => b.min(e),
                    None => b,
                };
                if to > from {
                    let qty = (s.rate * seconds(to - from)).normalize();
                    let id = deterministic_id(&[
                        match s.kind {
                            Kind::Instance => "instance",
                            Kind::Volume => "volume",
                        },
                        &s.resource_id,
                        &s.start.timestamp_millis().to_string(),
                        &a.timestamp().to_string(),
                    ]);
                    let (ty, data) = match s.kind {
                        Kind::Instance => (
                            "tally.compute",
                            json!({"app": s.app, "instance_id": s.resource_id, "instance_type": s.attrs["instance_type"],
                                   "region": s.attrs["region"], "instance_seconds": qty.to_string()}),
                        ),
                        Kind::Volume => (
                            "tally.disk",
                            json!({"app": s.app, "volume_id": s.resource_id, "size_gb": s.rate.to_string(), "gb_seconds": qty.to_string()}),
                        ),
                    };
                    out.push(cloud_event(id, &self.source, ty, &s.customer, from, data));
                }
                s.covered_until = b;
            }
            if end_known.is_some_and(|e| s.covered_until >= e) {
                done.push(key.clone());
            }
        }
        for k in done {
            self.state.segments.remove(&k);
        }
        out
    }
}

/// The sampler polling an HTTP endpoint.
pub struct InventorySource {
    cfg: InventoryConfig,
    sampler: Sampler,
    http: reqwest::Client,
}

impl InventorySource {
    pub fn new(cfg: InventoryConfig) -> Self {
        let sampler = Sampler::new(format!("tally-collector/{}", cfg.name), cfg.window_secs);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        Self { cfg, sampler, http }
    }
}

impl Source for InventorySource {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn interval(&self) -> Duration {
        Duration::from_secs(self.cfg.interval_secs)
    }
    fn restore(&mut self, state: serde_json::Value) -> anyhow::Result<()> {
        self.sampler.state = serde_json::from_value(state)?;
        Ok(())
    }
    fn snapshot(&self) -> serde_json::Value {
        serde_json::to_value(&self.sampler.state).expect("state serializes")
    }
    async fn poll(&mut self, now: DateTime<Utc>) -> anyhow::Result<Vec<RawEvent>> {
        let inv: Inventory = self
            .http
            .get(&self.cfg.url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(self.sampler.observe(&inv, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 10, 10, 0, 0).unwrap() + CDuration::seconds(s)
    }

    fn inst(start: i64, stop: Option<i64>) -> Instance {
        Instance {
            customer: "c1".into(),
            app: "web".into(),
            instance_id: "i-1".into(),
            instance_type: "t4g.nano".into(),
            region: "fra".into(),
            started_at: t(start),
            stopped_at: stop.map(t),
        }
    }

    fn total(events: &[RawEvent], field: &str) -> Decimal {
        events
            .iter()
            .map(|e| {
                e["data"][field]
                    .as_str()
                    .unwrap()
                    .parse::<Decimal>()
                    .unwrap()
            })
            .sum()
    }

    #[test]
    fn instance_of_95s_across_restart_is_95_seconds() {
        let mut s = Sampler::new("inv", 10);
        let inv = Inventory {
            instances: vec![inst(3, None)],
            volumes: vec![],
        };
        let mut events = s.observe(&inv, t(20));
        events.extend(s.observe(&inv, t(47)));
        // Restart: a new sampler from the saved state.
        let saved = serde_json::to_value(&s.state).unwrap();
        let mut s = Sampler::new("inv", 10);
        s.state = serde_json::from_value(saved).unwrap();
        let stopped = Inventory {
            instances: vec![inst(3, Some(98))],
            volumes: vec![],
        };
        events.extend(s.observe(&stopped, t(130)));
        events.extend(s.observe(&Inventory::default(), t(140)));
        assert_eq!(total(&events, "instance_seconds"), Decimal::from(95));
        let mut ids: Vec<_> = events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), events.len(), "no window is emitted twice");
    }

    #[test]
    fn overlapping_samplers_emit_identical_events() {
        let stopped = Inventory {
            instances: vec![inst(3, Some(98))],
            volumes: vec![],
        };
        let mut a = Sampler::new("inv", 10);
        let mut b = Sampler::new("inv", 10);
        let running = Inventory {
            instances: vec![inst(3, None)],
            volumes: vec![],
        };
        let mut ea = a.observe(&running, t(31));
        ea.extend(a.observe(&stopped, t(100)));
        let mut eb = b.observe(&running, t(57));
        eb.extend(b.observe(&stopped, t(200)));
        let key = |e: &RawEvent| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["data"]["instance_seconds"].as_str().unwrap().to_string(),
            )
        };
        let mut ka: Vec<_> = ea.iter().map(key).collect();
        let mut kb: Vec<_> = eb.iter().map(key).collect();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb);
    }

    #[test]
    fn volume_resized_mid_hour_bills_each_part() {
        let vol = |size: i64, since: i64| Volume {
            customer: "c1".into(),
            app: "db".into(),
            volume_id: "v-1".into(),
            size_gb: Decimal::from(size),
            size_since: Some(t(since)),
            deleted_at: None,
        };
        let mut s = Sampler::new("inv", 60);
        let mut events = s.observe(
            &Inventory {
                instances: vec![],
                volumes: vec![vol(10, 0)],
            },
            t(600),
        );
        // Resized to 25 GB at +1000 s; the sampler sees it at +1300 s.
        events.extend(s.observe(
            &Inventory {
                instances: vec![],
                volumes: vec![vol(25, 1000)],
            },
            t(1300),
        ));
        let mut deleted = vol(25, 1000);
        deleted.deleted_at = Some(t(1800));
        events.extend(s.observe(
            &Inventory {
                instances: vec![],
                volumes: vec![deleted],
            },
            t(1900),
        ));
        assert_eq!(
            total(&events, "gb_seconds"),
            Decimal::from(10 * 1000 + 25 * 800)
        );
        assert!(s.state.segments.is_empty());
    }

    #[test]
    fn missed_polls_are_covered_and_vanished_resources_billed_to_last_seen() {
        let mut s = Sampler::new("inv", 60);
        let running = Inventory {
            instances: vec![inst(0, None)],
            volumes: vec![],
        };
        let mut events = s.observe(&running, t(30));
        events.extend(s.observe(&running, t(3630))); // an hour of missed polls
        assert_eq!(total(&events, "instance_seconds"), Decimal::from(3600));
        events.extend(s.observe(&Inventory::default(), t(3700)));
        assert_eq!(total(&events, "instance_seconds"), Decimal::from(3630));
    }

    #[test]
    fn window_must_divide_an_hour() {
        let c = InventoryConfig {
            name: "i".into(),
            url: "http://x".into(),
            interval_secs: 1,
            window_secs: 7,
        };
        assert!(c.validate().unwrap_err().contains("window_secs"));
    }
}
