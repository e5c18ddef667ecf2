//! Rating a customer's period from stored state and stored usage: the draft
//! invoice (estimated at any time) and the preview of a plan switch.

use crate::rating::{rate, Period, Rated, Segment};
use crate::state::{PlanSegment, StateStore};
use crate::usage::segment_usage;
use aggregator::UsageStore;
use chrono::{DateTime, Utc};
use schemas::MeterCatalog;
use serde::{Deserialize, Serialize};

/// A plan switch not yet confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedSwitch {
    pub plan: String,
    pub version: u32,
    pub at: DateTime<Utc>,
}

/// The plan history with a planned switch applied: every segment is cut at
/// `at`, and the new plan covers the rest of the period.
pub fn with_switch(
    mut segs: Vec<PlanSegment>,
    sw: &PlannedSwitch,
    period: Period,
) -> Vec<PlanSegment> {
    segs.retain(|s| s.start < sw.at);
    for s in segs.iter_mut() {
        s.end = s.end.min(sw.at);
    }
    if sw.at < period.end {
        segs.push(PlanSegment {
            plan: sw.plan.clone(),
            version: sw.version,
            start: sw.at.max(period.start),
            end: period.end,
        });
    }
    segs
}

/// Rates `customer`'s `period` as things stand (or with `switch` applied):
/// plan segments and seats from the state store, usage per segment from the
/// usage store.
pub async fn rate_period(
    state: &dyn StateStore,
    usage: &dyn UsageStore,
    meters: &MeterCatalog,
    customer: &str,
    period: Period,
    switch: Option<&PlannedSwitch>,
) -> anyhow::Result<Rated> {
    let mut segs = state.plan_segments(customer, period).await?;
    if let Some(sw) = switch {
        segs = with_switch(segs, sw, period);
    }
    let seats = state.seat_intervals(customer, period).await?;
    let mut segments = Vec::with_capacity(segs.len());
    for s in segs {
        let plan = state.plan_version(&s.plan, s.version).await?;
        let u = segment_usage(usage, meters, &plan, customer, s.start, s.end).await?;
        segments.push(Segment {
            plan,
            start: s.start,
            end: s.end,
            usage: u,
        });
    }
    Ok(rate(&period, &segments, &seats)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_switch_cuts_the_history() {
        let d = |day| Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap();
        let period = Period {
            start: d(1),
            end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        };
        let seg = |p: &str, a, b| PlanSegment {
            plan: p.into(),
            version: 1,
            start: a,
            end: b,
        };
        let hist = vec![seg("payg", d(1), d(10)), seg("team", d(10), period.end)];
        let sw = PlannedSwitch {
            plan: "business".into(),
            version: 2,
            at: d(5),
        };
        let got = with_switch(hist, &sw, period);
        assert_eq!(
            got,
            vec![
                seg("payg", d(1), d(5)),
                PlanSegment {
                    plan: "business".into(),
                    version: 2,
                    start: d(5),
                    end: period.end
                }
            ]
        );
    }
}
