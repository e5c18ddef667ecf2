//! Prometheus counter scraper: per-app request and egress-byte counters from
//! a router's `/metrics`, turned into `tally.requests` and `tally.egress`
//! events.
//!
//! Each series (metric name + full label set) is tracked on its own. The
//! usage of one scrape is `current − previous` when the counter grew, and
//! `current` when it went down (a reset: the process restarted and counted
//! from zero since). A series first seen after the first scrape is counted
//! from zero (it is new); on the very first scrape without a checkpoint,
//! counters only set the baseline, because what they hold may have been
//! billed by a previous collector. Event ids are `hash(source, series,
//! sequence)`; the runner's checkpoint makes a re-sent scrape reuse them.

use super::{cloud_event, Source};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use schemas::ids::deterministic_id;
use schemas::RawEvent;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusConfig {
    pub name: String,
    pub url: String,
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    #[serde(default = "default_requests")]
    pub requests_metric: String,
    #[serde(default = "default_egress")]
    pub egress_metric: String,
    #[serde(default = "default_customer")]
    pub customer_label: String,
    #[serde(default = "default_app")]
    pub app_label: String,
}
fn default_interval() -> u64 {
    15
}
fn default_requests() -> String {
    "router_requests_total".into()
}
fn default_egress() -> String {
    "router_egress_bytes_total".into()
}
fn default_customer() -> String {
    "customer".into()
}
fn default_app() -> String {
    "app".into()
}

impl PrometheusConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_secs == 0 {
            return Err("interval_secs: must be positive".into());
        }
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            return Err(format!("url: {:?} is not an http(s) URL", self.url));
        }
        Ok(())
    }
}

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: Decimal,
}

/// Parses the Prometheus text format; lines it cannot read are skipped.
pub fn parse_text(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if rest.starts_with('{') {
        let mut chars = rest[1..].char_indices();
        let mut key = String::new();
        let mut val = String::new();
        let mut in_val = false;
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if in_val {
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => val.push('\n'),
                        other => val.push(other),
                    },
                    '"' => {
                        labels.insert(
                            std::mem::take(&mut key).trim().to_string(),
                            std::mem::take(&mut val),
                        );
                        in_val = false;
                    }
                    _ => val.push(c),
                }
            } else {
                match c {
                    '}' => {
                        end = Some(i + 2);
                        break;
                    }
                    '=' => {
                        if chars.next()?.1 != '"' {
                            return None;
                        }
                        in_val = true;
                    }
                    ',' => {}
                    _ => key.push(c),
                }
            }
        }
        rest = &rest[end?..];
    }
    let value = rest.split_whitespace().next()?;
    let value = Decimal::from_str(value)
        .or_else(|_| Decimal::from_scientific(value))
        .ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Series {
    last: Decimal,
    seq: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ScraperState {
    initialized: bool,
    series: BTreeMap<String, Series>,
}

/// The pure part: turns one scrape into events.
pub struct Scraper {
    pub cfg: PrometheusConfig,
    pub state: ScraperState,
}

impl Scraper {
    pub fn observe(&mut self, samples: &[Sample], now: DateTime<Utc>) -> Vec<RawEvent> {
        let source = format!("tally-collector/{}", self.cfg.name);
        let mut out = Vec::new();
        for s in samples {
            let (ty, field) = if s.name == self.cfg.requests_metric {
                ("tally.requests", "count")
            } else if s.name == self.cfg.egress_metric {
                ("tally.egress", "bytes")
            } else {
                continue;
            };
            let (Some(customer), Some(app)) = (
                s.labels.get(&self.cfg.customer_label),
                s.labels.get(&self.cfg.app_label),
            ) else {
                continue;
            };
            let key = format!(
                "{}{}",
                s.name,
                serde_json::to_string(&s.labels).expect("labels serialize")
            );
            let initialized = self.state.initialized;
            let series = self
                .state
                .series
                .entry(key.clone())
                .or_insert_with(|| Series {
                    // New series: from zero, unless this is the baseline scrape.
                    last: if initialized { Decimal::ZERO } else { s.value },
                    seq: 0,
                });
            let delta = if s.value >= series.last {
                s.value - series.last
            } else {
                s.value
            };
            series.last = s.value;
            if delta.is_zero() {
                continue;
            }
            series.seq += 1;
            let id = deterministic_id(&[&source, &key, &series.seq.to_string()]);
            out.push(cloud_event(
                id,
                &source,
                ty,
                customer,
                now,
                json!({"app": app, field: delta.normalize().to_string()}),
            ));
        }
        self.state.initialized = true;
        out
    }
}

pub struct PrometheusSource {
    scraper: Scraper,
    http: reqwest::Client,
}

impl PrometheusSource {
    pub fn new(cfg: PrometheusConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        Self {
            scraper: Scraper {
                cfg,
                state: ScraperState::default(),
            },
            http,
        }
    }
}

impl Source for PrometheusSource {
    fn name(&self) -> &str {
        &self.scraper.cfg.name
    }
    fn interval(&self) -> Duration {
        Duration::from_secs(self.scraper.cfg.interval_secs)
    }
    fn restore(&mut self, state: serde_json::Value) -> anyhow::Result<()> {
        self.scraper.state = serde_json::from_value(state)?;
        Ok(())
    }
    fn snapshot(&self) -> serde_json::Value {
        serde_json::to_value(&self.scraper.state).expect("state serializes")
    }
    async fn poll(&mut self, now: DateTime<Utc>) -> anyhow::Result<Vec<RawEvent>> {
        let text = self
            .http
            .get(&self.scraper.cfg.url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(self.scraper.observe(&parse_text(&text), now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn cfg() -> PrometheusConfig {
        toml::from_str("name = \"router\"\nurl = \"http://x/metrics\"").unwrap()
    }

    fn scrape(req: &str, bytes: &str) -> String {
        format!(
            "# HELP router_requests_total x\n# TYPE router_requests_total counter\n\
             router_requests_total{{customer=\"c1\",app=\"web\",code=\"200\"}} {req}\n\
             router_egress_bytes_total{{app=\"web\",customer=\"c1\"}} {bytes} 1700000000000\n\
             other_metric 5\nrouter_requests_total{{app=\"orphan\"}} 9\n"
        )
    }

    fn sum(events: &[RawEvent], field: &str) -> Decimal {
        events
            .iter()
            .filter_map(|e| e["data"][field].as_str())
            .map(|v| v.parse::<Decimal>().unwrap())
            .sum()
    }

    #[test]
    fn parses_labels_with_escapes() {
        let s = parse_text("m{a=\"x\\\"y\",b=\"1,2\"} 3.5\n");
        assert_eq!(s[0].labels["a"], "x\"y");
        assert_eq!(s[0].labels["b"], "1,2");
        assert_eq!(s[0].value, Decimal::new(35, 1));
    }

    #[test]
    fn deltas_and_resets() {
        let now = Utc.with_ymd_and_hms(2026, 11, 10, 0, 0, 0).unwrap();
        let mut s = Scraper {
            cfg: cfg(),
            state: ScraperState::default(),
        };
        assert!(
            s.observe(&parse_text(&scrape("100", "1000")), now)
                .is_empty(),
            "first scrape is the baseline"
        );
        let e = s.observe(&parse_text(&scrape("150", "1500")), now);
        assert_eq!(
            (sum(&e, "count"), sum(&e, "bytes")),
            (Decimal::from(50), Decimal::from(500))
        );
        // Router restarted: counters reset and grew to 20 / 300.
        let e = s.observe(&parse_text(&scrape("20", "300")), now);
        assert_eq!(
            (sum(&e, "count"), sum(&e, "bytes")),
            (Decimal::from(20), Decimal::from(300))
        );
        assert!(s.observe(&parse_text(&scrape("20", "300")), now).is_empty());
        let e = s.observe(
            &parse_text(&format!(
                "{}router_requests_total{{customer=\"c2\",app=\"api\"}} 7\n",
                scrape("20", "300")
            )),
            now,
        );
        assert_eq!(
            sum(&e, "count"),
            Decimal::from(7),
            "a new series counts from zero"
        );
        assert_eq!(e[0]["subject"], "c2");
    }
}
