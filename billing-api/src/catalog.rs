//! The pricing catalog: plans as versioned data.
//!
//! A plan version fixes everything a bill depends on: currency and its
//! rounding, a recurring flat fee and per-seat fee (per billing period), an
//! optional minimum and maximum spend, and one price per meter (optionally
//! restricted to a dimension value, e.g. one compute price per instance
//! type). Prices are stated per `per` base units of the meter (3,600
//! instance-seconds = one instance-hour; 1,000,000 requests), and tier
//! bounds (`up_to`) are in those same price units.

use rust_decimal::{Decimal, RoundingStrategy};
use schemas::MeterCatalog;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// Banker's rounding, the default: $0.125 → $0.12, $0.135 → $0.14.
    #[default]
    HalfEven,
    /// $0.125 → $0.13.
    HalfUp,
}

impl Rounding {
    pub fn strategy(self) -> RoundingStrategy {
        match self {
            Rounding::HalfEven => RoundingStrategy::MidpointNearestEven,
            Rounding::HalfUp => RoundingStrategy::MidpointAwayFromZero,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Upper bound in price units (inclusive); `None` for the last tier.
    #[serde(default)]
    pub up_to: Option<Decimal>,
    #[serde(default)]
    pub unit_price: Decimal,
    /// Charged once when the tier is reached.
    #[serde(default)]
    pub flat_price: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum PriceModel {
    /// `quantity × unit_price`, or with `package_size`:
    /// `⌈quantity / package_size⌉ × unit_price`.
    PerUnit {
        unit_price: Decimal,
        #[serde(default)]
        package_size: Option<Decimal>,
    },
    /// Each tier's units at its own price, plus the flat price of every
    /// tier reached.
    Graduated { tiers: Vec<Tier> },
    /// All units at the price of the tier the total falls in, plus that
    /// tier's flat price.
    Volume { tiers: Vec<Tier> },
}

/// (Unknown keys are rejected by the flattened `PriceModel`, which receives
/// every key this struct does not consume.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MeterPrice {
    pub meter: String,
    /// Only usage whose dimensions have these values (e.g.
    /// `{"instance_type": "t4g.nano"}`); empty for all of the meter.
    #[serde(default)]
    pub filter: BTreeMap<String, String>,
    /// Base units of the meter per price unit (default 1).
    #[serde(default = "one")]
    pub per: Decimal,
    /// Name of the price unit on invoices, e.g. `instance-hour`.
    #[serde(default)]
    pub unit_name: Option<String>,
    /// Free price units per seat per period (team plans): the segment's
    /// allowance is `allowance_per_seat × Σ seats × interval / period`, taken
    /// off the quantity before the price model applies.
    #[serde(default)]
    pub allowance_per_seat: Option<Decimal>,
    #[serde(flatten)]
    pub model: PriceModel,
}

fn one() -> Decimal {
    Decimal::ONE
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanVersion {
    pub plan: String,
    pub version: u32,
    pub name: String,
    /// ISO 4217 code, e.g. `USD`.
    pub currency: String,
    /// Digits of the currency's minor unit (2 for USD, 0 for JPY).
    #[serde(default = "two")]
    pub minor_units: u32,
    #[serde(default)]
    pub rounding: Rounding,
    #[serde(default)]
    pub flat_fee: Decimal,
    #[serde(default)]
    pub seat_fee: Decimal,
    #[serde(default)]
    pub minimum: Option<Decimal>,
    #[serde(default)]
    pub maximum: Option<Decimal>,
    #[serde(default)]
    pub prices: Vec<MeterPrice>,
    /// What quota checks allow on this plan (absent: no limit).
    #[serde(default, skip_serializing_if = "Limits::is_unlimited")]
    pub limits: Limits,
}

/// Quota limits of a plan or pay-as-you-go tier, as catalog data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Running instances per app.
    #[serde(default)]
    pub max_instances_per_app: Option<u32>,
    /// Instance types the plan may start (absent: all it prices).
    #[serde(default)]
    pub instance_types: Option<Vec<String>>,
    /// Size of one volume, in GB.
    #[serde(default)]
    pub max_volume_gb: Option<Decimal>,
    /// Monthly spending cap when the customer has not set one.
    #[serde(default)]
    pub default_spending_cap: Option<Decimal>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self == &Limits::default()
    }

    /// Whether `instance_types` (when set) lists `ty`.
    pub fn allows_instance_type(&self, ty: &str) -> bool {
        self.instance_types
            .as_ref()
            .is_none_or(|ts| ts.iter().any(|t| t == ty))
    }
}

fn two() -> u32 {
    2
}

/// One problem in a catalog, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CatalogError {
    pub field: String,
    pub code: &'static str,
    pub message: String,
}

impl PlanVersion {
    /// Checks the plan against the meters; reports every problem at once.
    pub fn validate(&self, meters: &MeterCatalog) -> Result<(), Vec<CatalogError>> {
        let mut errs = Vec::new();
        let mut err = |field: String, code: &'static str, message: String| {
            errs.push(CatalogError {
                field,
                code,
                message,
            })
        };
        if self.plan.is_empty() {
            err(
                "plan".into(),
                "missing_field",
                "plan key is required".into(),
            );
        }
        if self.currency.len() != 3 || !self.currency.chars().all(|c| c.is_ascii_uppercase()) {
            err(
                "currency".into(),
                "invalid_currency",
                format!(
                    "currency must be an ISO 4217 code like USD, got {:?}",
                    self.currency
                ),
            );
        }
        if let Some(types) = &self.limits.instance_types {
            for (i, t) in types.iter().enumerate() {
                let priced = self
                    .prices
                    .iter()
                    .any(|p| p.meter == "compute" && p.filter.get("instance_type") == Some(t));
                if !priced {
                    err(
                        format!("limits.instance_types[{i}]"),
                        "unpriced_instance_type",
                        format!(
                            "instance type {t} is allowed but the plan has no compute price for it"
                        ),
                    );
                }
            }
        }
        for (field, v) in [
            ("limits.max_volume_gb", self.limits.max_volume_gb),
            (
                "limits.default_spending_cap",
                self.limits.default_spending_cap,
            ),
        ] {
            if v.is_some_and(|v| v.is_sign_negative()) {
                err(
                    field.into(),
                    "negative_value",
                    format!("{field} must not be negative"),
                );
            }
        }
        if self.minor_units > 4 {
            err(
                "minor_units".into(),
                "invalid_value",
                "minor_units must be 0..=4".into(),
            );
        }
        for (name, v) in [
            ("flat_fee", Some(self.flat_fee)),
            ("seat_fee", Some(self.seat_fee)),
            ("minimum", self.minimum),
            ("maximum", self.maximum),
        ] {
            if v.is_some_and(|v| v.is_sign_negative() && !v.is_zero()) {
                err(
                    name.into(),
                    "negative_price",
                    format!("{name} must not be negative"),
                );
            }
        }
        if let (Some(min), Some(max)) = (self.minimum, self.maximum) {
            if min > max {
                err(
                    "minimum".into(),
                    "invalid_value",
                    "minimum must not exceed maximum".into(),
                );
            }
        }
        for (i, p) in self.prices.iter().enumerate() {
            let at = format!("prices[{i}]");
            if meters.get(&p.meter).is_none() {
                err(
                    format!("{at}.meter"),
                    "unknown_meter",
                    format!("no meter {:?} in the meter catalog", p.meter),
                );
            }
            if p.allowance_per_seat
                .is_some_and(|a| a.is_sign_negative() && !a.is_zero())
            {
                err(
                    format!("{at}.allowance_per_seat"),
                    "invalid_value",
                    "allowance_per_seat must not be negative".into(),
                );
            }
            if p.per <= Decimal::ZERO {
                err(
                    format!("{at}.per"),
                    "invalid_value",
                    "per must be positive".into(),
                );
            }
            let check_price = |v: Decimal| v.is_sign_negative() && !v.is_zero();
            match &p.model {
                PriceModel::PerUnit {
                    unit_price,
                    package_size,
                } => {
                    if check_price(*unit_price) {
                        err(
                            format!("{at}.unit_price"),
                            "negative_price",
                            "unit_price must not be negative".into(),
                        );
                    }
                    if unit_price.scale() > 12 {
                        err(
                            format!("{at}.unit_price"),
                            "invalid_value",
                            "unit prices carry at most 12 decimal places".into(),
                        );
                    }
                    if package_size.is_some_and(|s| s <= Decimal::ZERO) {
                        err(
                            format!("{at}.package_size"),
                            "invalid_value",
                            "package_size must be positive".into(),
                        );
                    }
                }
                PriceModel::Graduated { tiers } | PriceModel::Volume { tiers } => {
                    if tiers.is_empty() {
                        err(
                            format!("{at}.tiers"),
                            "invalid_tiers",
                            "at least one tier is required".into(),
                        );
                    }
                    let mut prev = Decimal::ZERO;
                    for (j, t) in tiers.iter().enumerate() {
                        let tf = format!("{at}.tiers[{j}]");
                        if check_price(t.unit_price) || check_price(t.flat_price) {
                            err(
                                tf.clone(),
                                "negative_price",
                                "tier prices must not be negative".into(),
                            );
                        }
                        match t.up_to {
                            Some(u) if u <= prev => err(
                                format!("{tf}.up_to"),
                                "invalid_tiers",
                                format!("tiers must be in ascending order without overlap: {u} is not above {prev}"),
                            ),
                            Some(u) => prev = u,
                            None if j + 1 != tiers.len() => {
                                err(format!("{tf}.up_to"), "invalid_tiers", "only the last tier may be unbounded".into())
                            }
                            None => {}
                        }
                    }
                    if tiers.last().is_some_and(|t| t.up_to.is_some()) {
                        err(
                            format!("{at}.tiers"),
                            "invalid_tiers",
                            "the last tier must be unbounded (no up_to)".into(),
                        );
                    }
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

/// A set of plan versions, as loaded from a catalog file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub plans: Vec<PlanVersion>,
}

impl Catalog {
    /// The default catalog a PaaS can start from (`billing-api/catalog.json`).
    pub fn default_catalog() -> Self {
        serde_json::from_str(include_str!("../catalog.json")).expect("built-in catalog.json parses")
    }

    /// Validates every plan and that (plan, version) pairs are unique.
    pub fn validate(&self, meters: &MeterCatalog) -> Result<(), Vec<CatalogError>> {
        let mut errs = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.plans.iter().enumerate() {
            if !seen.insert((p.plan.clone(), p.version)) {
                errs.push(CatalogError {
                    field: format!("plans[{i}].version"),
                    code: "duplicate_version",
                    message: format!("plan {} version {} appears twice", p.plan, p.version),
                });
            }
            if let Err(e) = p.validate(meters) {
                errs.extend(e.into_iter().map(|e| CatalogError {
                    field: format!("plans[{i}].{}", e.field),
                    ..e
                }));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// The latest version of a plan.
    pub fn latest(&self, plan: &str) -> Option<&PlanVersion> {
        self.plans
            .iter()
            .filter(|p| p.plan == plan)
            .max_by_key(|p| p.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(v: serde_json::Value) -> PlanVersion {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn invalid_plans_report_every_problem() {
        let p = plan(
            json!({"plan":"p","version":1,"name":"P","currency":"usd","flat_fee":"-1","prices":[
                {"meter":"gpu","model":"per_unit","unit_price":"1"},
                {"meter":"requests","model":"graduated","tiers":[{"up_to":"10","unit_price":"0"},{"up_to":"5","unit_price":"1"},{"unit_price":"-2"}]},
                {"meter":"egress","model":"volume","tiers":[{"unit_price":"1"},{"up_to":"5","unit_price":"1"}]}
            ]}),
        );
        let errs = p.validate(&MeterCatalog::default_catalog()).unwrap_err();
        let got: Vec<(&str, &str)> = errs.iter().map(|e| (e.field.as_str(), e.code)).collect();
        for want in [
            ("currency", "invalid_currency"),
            ("flat_fee", "negative_price"),
            ("prices[0].meter", "unknown_meter"),
            ("prices[1].tiers[1].up_to", "invalid_tiers"),
            ("prices[1].tiers[2]", "negative_price"),
            ("prices[2].tiers[0].up_to", "invalid_tiers"),
            ("prices[2].tiers", "invalid_tiers"),
        ] {
            assert!(got.contains(&want), "missing {want:?} in {got:?}");
        }
    }
}
