//! What a usage alert is about, when one is raised and where its delivery
//! stands. The rules: which thresholds a month to date has crossed of the
//! cap in force and of each allowance (`evaluate`), how thresholds are
//! given (`parse_thresholds`) and how a failed delivery backs off
//! (`retry_delay`). billing-api records, sends and schedules them.

use crate::catalog::cap_in_force;
use crate::quota::{cost_to_date, since, QuotaInput};
use crate::rating::{free_units, matches};
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::json;

crate::named! {
    /// What an alert's threshold is a percentage of.
    pub enum AlertKind ("alert kind") {
        /// The spending cap in force (`catalog::cap_in_force`).
        SpendingCap => "spending_cap",
        /// A price's free units (`rating::free_units`).
        Allowance => "allowance",
        /// The credit the customer can spend: how much of it the month's
        /// usage so far would use up (a low balance).
        Credit => "credit",
    }
}

crate::named! {
    /// An alert's delivery.
    pub enum AlertStatus ("alert status") {
        /// Due for (another) delivery attempt.
        Pending => "pending",
        Delivered => "delivered",
        /// Gave up after the last attempt.
        Failed => "failed",
    }
}

/// A usage alert to raise: once per (customer, period, kind, subject,
/// threshold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewAlert {
    pub customer_id: String,
    pub period_start: DateTime<Utc>,
    pub kind: AlertKind,
    /// What the threshold is of: empty for the cap, the price for an
    /// allowance (e.g. `compute instance_type=t4g.small`).
    pub subject: String,
    /// Percent.
    pub threshold: u32,
    /// The webhook body.
    pub payload: serde_json::Value,
}

/// The wait before the next delivery attempt after `attempts` failed ones:
/// `first` doubling after each, at most an hour.
pub fn retry_delay(first: Duration, attempts: u32) -> Duration {
    let factor = 1i32 << attempts.saturating_sub(1).min(16);
    (first * factor).min(Duration::hours(1))
}

/// Parses `50,80,100`: whole percentages from 1 to 1000.
pub fn parse_thresholds(s: &str) -> Result<Vec<u32>, String> {
    let mut v = Vec::new();
    for part in s.split(',') {
        let t: u32 = part.trim().parse().map_err(|_| {
            format!("alert-thresholds: {part:?} is not a whole percentage (e.g. 50,80,100)")
        })?;
        if !(1..=1000).contains(&t) {
            return Err(format!("alert-thresholds: {t} is outside 1..=1000"));
        }
        v.push(t);
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// The thresholds (percent) `used` has reached of `limit`.
pub fn crossed(
    used: Decimal,
    limit: Decimal,
    thresholds: &[u32],
) -> impl Iterator<Item = u32> + '_ {
    thresholds
        .iter()
        .copied()
        .filter(move |t| used * Decimal::ONE_HUNDRED >= limit * Decimal::from(*t))
}

/// The alerts a customer's quota state warrants now: each threshold of
/// the cap in force and of each allowance that the month to date has
/// reached. Pure; recording them makes each once-only.
pub fn evaluate(
    customer: &str,
    q: &QuotaInput,
    thresholds: &[u32],
) -> anyhow::Result<Vec<NewAlert>> {
    let mut out = Vec::new();
    let period = json!({"start": q.period.start, "end": q.period.end});
    let mut raise =
        |kind: AlertKind, subject: String, t: u32, used: Decimal, limit: Decimal, unit: &str| {
            out.push(NewAlert {
                customer_id: customer.to_owned(),
                period_start: q.period.start,
                kind,
                subject: subject.clone(),
                threshold: t,
                payload: json!({
                    "type": "usage_alert",
                    "customer_id": customer,
                    "period": period,
                    "kind": kind,
                    "subject": subject,
                    "threshold_percent": t,
                    "used": used,
                    "limit": limit,
                    "unit": unit,
                    "as_of": q.now,
                }),
            });
        };
    let cap = cap_in_force(q.plan, q.spending_cap);
    if let Some(cap) = cap.filter(|c| *c > Decimal::ZERO) {
        let (_, cost) = cost_to_date(q)?;
        for t in crossed(cost, cap, thresholds) {
            raise(
                AlertKind::SpendingCap,
                String::new(),
                t,
                cost,
                cap,
                &q.plan.currency,
            );
        }
    }
    // Credit running low: the month to date against the balance it would
    // be paid from.
    if q.credit > Decimal::ZERO {
        let (_, cost) = cost_to_date(q)?;
        for t in crossed(cost, q.credit, thresholds) {
            raise(
                AlertKind::Credit,
                String::new(),
                t,
                cost,
                q.credit,
                &q.plan.currency,
            );
        }
    }
    // The plan in force now is rated from where it started, with the usage
    // since then: its allowances are that segment's.
    let since = since(q);
    for p in &q.plan.prices {
        let Some(allowance) = free_units(p, q.seats, &q.period, since, q.period.end) else {
            continue;
        };
        if allowance <= Decimal::ZERO {
            continue;
        }
        let used: Decimal = q
            .usage_to_date
            .iter()
            .filter(|u| matches(p, u))
            .map(|u| u.quantity)
            .sum::<Decimal>()
            / p.per;
        let mut subject = p.meter.clone();
        for (k, v) in &p.filter {
            subject.push_str(&format!(" {k}={v}"));
        }
        let unit = p.unit_name.clone().unwrap_or_else(|| p.meter.clone());
        for t in crossed(used, allowance, thresholds) {
            raise(
                AlertKind::Allowance,
                subject.clone(),
                t,
                used.round_dp(6).normalize(),
                allowance.round_dp(6).normalize(),
                &unit,
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_parsed_and_crossed() {
        assert_eq!(
            parse_thresholds("100, 50,80,50").unwrap(),
            vec![50, 80, 100]
        );
        assert!(parse_thresholds("50,x").unwrap_err().contains("\"x\""));
        assert!(parse_thresholds("0").is_err());
        assert!(parse_thresholds("1001").is_err());
        let half: Vec<u32> = crossed(Decimal::from(5), Decimal::from(10), &[50, 80, 100]).collect();
        assert_eq!(half, vec![50]);
        let all: Vec<u32> = crossed(Decimal::from(10), Decimal::from(10), &[50, 80, 100]).collect();
        assert_eq!(all, vec![50, 80, 100]);
    }

    /// $2.00 of requests so far against $2.50 of credit: 50 % and 80 % of
    /// it used, not 100 %; no credit, no such alert.
    #[test]
    fn a_low_credit_balance_raises_alerts() {
        use chrono::TimeZone;
        let cat = crate::catalog::Catalog::default_catalog();
        let period = crate::rating::Period {
            start: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        };
        let usage = vec![crate::rating::UsageItem {
            meter: "requests".into(),
            dims: Default::default(),
            quantity: Decimal::from(5_000_000),
            events: 1,
        }];
        let running = crate::quota::Running::default();
        let q = |credit: Decimal| QuotaInput {
            plan: cat.latest("payg").unwrap(),
            period,
            now: Utc.with_ymd_and_hms(2026, 11, 11, 0, 0, 0).unwrap(),
            usage_to_date: &usage,
            earlier: &[],
            trial_end: None,
            ends: None,
            seats: &[],
            running: &running,
            suspended: false,
            spending_cap: None,
            credit,
        };
        let credit = |a: &[NewAlert]| -> Vec<u32> {
            a.iter()
                .filter(|x| x.kind == AlertKind::Credit)
                .map(|x| x.threshold)
                .collect()
        };
        let raised = evaluate("c", &q(Decimal::new(250, 2)), &[50, 80, 100]).unwrap();
        assert_eq!(credit(&raised), [50, 80]);
        let a = raised.iter().find(|x| x.kind == AlertKind::Credit).unwrap();
        assert_eq!(
            (&a.payload["used"], &a.payload["limit"], &a.payload["unit"]),
            (&json!("2.00"), &json!("2.50"), &json!("USD"))
        );
        assert!(credit(&evaluate("c", &q(Decimal::ZERO), &[50, 80, 100]).unwrap()).is_empty());
    }

    #[test]
    fn delivery_backs_off_doubling_to_an_hour() {
        let first = Duration::seconds(10);
        assert_eq!(retry_delay(first, 1), Duration::seconds(10));
        assert_eq!(retry_delay(first, 3), Duration::seconds(40));
        assert_eq!(retry_delay(first, 11), Duration::hours(1));
        assert_eq!(retry_delay(first, 40), Duration::hours(1));
    }

    #[test]
    fn kinds_and_statuses_have_their_stored_names() {
        let kinds: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds, ["spending_cap", "allowance", "credit"]);
        let statuses: Vec<&str> = AlertStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(statuses, ["pending", "delivered", "failed"]);
        for k in AlertKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for s in AlertStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
