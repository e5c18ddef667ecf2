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
use std::collections::{BTreeMap, BTreeSet};

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
    #[serde(default, deserialize_with = "field::up_to")]
    pub up_to: Option<Decimal>,
    #[serde(default, deserialize_with = "field::unit_price")]
    pub unit_price: Decimal,
    /// Charged once when the tier is reached.
    #[serde(default, deserialize_with = "field::flat_price")]
    pub flat_price: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum PriceModel {
    /// `quantity × unit_price`, or with `package_size`:
    /// `⌈quantity / package_size⌉ × unit_price`.
    PerUnit {
        #[serde(deserialize_with = "field::unit_price")]
        unit_price: Decimal,
        #[serde(default, deserialize_with = "field::package_size")]
        package_size: Option<Decimal>,
    },
    /// Each tier's units at its own price, plus the flat price of every
    /// tier reached.
    Graduated { tiers: Vec<Tier> },
    /// All units at the price of the tier the total falls in, plus that
    /// tier's flat price.
    Volume { tiers: Vec<Tier> },
}

/// Exact decimal readers ([`crate::wire`]) that name their field: tiers and
/// price models are read through `flatten`, where an error's path stops at
/// the price.
mod field {
    use crate::wire::{decimal, named, opt_decimal};
    use rust_decimal::Decimal;
    use serde::Deserializer;

    pub fn unit_price<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        named::<D, _>("unit_price", decimal(d))
    }
    pub fn flat_price<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        named::<D, _>("flat_price", decimal(d))
    }
    pub fn up_to<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        named::<D, _>("up_to", opt_decimal(d))
    }
    pub fn package_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        named::<D, _>("package_size", opt_decimal(d))
    }
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
    #[serde(default = "one", deserialize_with = "crate::wire::decimal")]
    pub per: Decimal,
    /// Name of the price unit on invoices, e.g. `instance-hour`.
    #[serde(default)]
    pub unit_name: Option<String>,
    /// Free price units per seat per period (team plans): the segment's
    /// allowance is `allowance_per_seat × Σ seats × interval / period`, taken
    /// off the quantity before the price model applies.
    #[serde(default, deserialize_with = "crate::wire::opt_decimal")]
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
    #[serde(default, deserialize_with = "crate::wire::decimal")]
    pub flat_fee: Decimal,
    #[serde(default, deserialize_with = "crate::wire::decimal")]
    pub seat_fee: Decimal,
    #[serde(default, deserialize_with = "crate::wire::opt_decimal")]
    pub minimum: Option<Decimal>,
    #[serde(default, deserialize_with = "crate::wire::opt_decimal")]
    pub maximum: Option<Decimal>,
    #[serde(default)]
    pub prices: Vec<MeterPrice>,
    /// What quota checks allow on this plan (absent: no limit).
    #[serde(default, skip_serializing_if = "Limits::is_unlimited")]
    pub limits: Limits,
    /// Days of trial that a customer's first subscription to this plan
    /// starts with (0, the default: none). In the trial the flat and seat
    /// fees are waived; see `subscription::trial_end`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub trial_days: u32,
    /// A contract: the one customer this private version is offered to
    /// ([`derive_contract`]); absent for public plans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// When the flat and seat fees are billed: `in_arrears` (the default,
    /// on the invoice after the period) or `in_advance` (at the start of
    /// the period they pay for; see `advance.rs`). Usage is always billed
    /// in arrears. A plan billing in advance has no minimum or maximum.
    #[serde(default, skip_serializing_if = "FeeTiming::is_in_arrears")]
    pub fee_timing: FeeTiming,
}

/// When a plan's flat and seat fees are billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FeeTiming {
    /// On the invoice after the period, prorated to the segments it had.
    #[default]
    InArrears,
    /// At the start of the period they pay for; a change inside it is
    /// refunded and charged, prorated, on the next invoice.
    InAdvance,
}

impl FeeTiming {
    fn is_in_arrears(&self) -> bool {
        *self == FeeTiming::InArrears
    }
}

impl PlanVersion {
    /// Whether the plan bills its flat and seat fees in advance.
    pub fn in_advance(&self) -> bool {
        self.fee_timing == FeeTiming::InAdvance
    }

    /// Whether `customer` may be subscribed to this version: a public
    /// plan, or the customer's own contract.
    pub fn offered_to(&self, customer: &str) -> bool {
        self.customer.as_deref().is_none_or(|c| c == customer)
    }
}

/// Fields a contract's overrides may not set: what identifies the version
/// and whom it is for.
const CONTRACT_FIXED: [&str; 4] = ["plan", "version", "customer", "currency"];

/// A customer's contract: the published version `base` with `overrides`
/// applied as a JSON merge patch (RFC 7386: an object's fields are merged,
/// `null` removes one, arrays such as `prices` and `tiers` are replaced
/// whole), published as version `version` of the private plan `plan`,
/// offered to `customer` only, and validated like any plan (each problem
/// named by its field under `overrides`).
pub fn derive_contract(
    base: &PlanVersion,
    customer: &str,
    plan: &str,
    version: u32,
    overrides: &serde_json::Value,
    meters: &MeterCatalog,
) -> Result<PlanVersion, Vec<CatalogError>> {
    let problem = |field: String, code: &'static str, message: String| {
        vec![CatalogError {
            field,
            code,
            message,
        }]
    };
    let Some(fields) = overrides.as_object() else {
        return Err(problem(
            "overrides".into(),
            "invalid_value",
            "overrides must be an object of plan fields".into(),
        ));
    };
    if let Some(k) = CONTRACT_FIXED.iter().find(|k| fields.contains_key(**k)) {
        return Err(problem(
            format!("overrides.{k}"),
            "invalid_value",
            format!("a contract cannot change the plan's {k}"),
        ));
    }
    if base.customer.is_some() {
        return Err(problem(
            "base_plan".into(),
            "invalid_value",
            format!("{} is a contract; derive from a public plan", base.plan),
        ));
    }
    let mut body = serde_json::to_value(base).expect("a plan serializes");
    json_patch::merge(&mut body, overrides);
    body["plan"] = plan.into();
    body["version"] = version.into();
    body["customer"] = customer.into();
    let derived: PlanVersion = serde_json::from_value(body).map_err(|e| {
        problem(
            "overrides".into(),
            "invalid_value",
            format!("the overridden plan does not read: {e}"),
        )
    })?;
    derived.validate(meters).map_err(|errs| {
        errs.into_iter()
            .map(|e| CatalogError {
                field: format!("overrides.{}", e.field),
                ..e
            })
            .collect::<Vec<_>>()
    })?;
    Ok(derived)
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The longest trial a plan may offer.
pub const MAX_TRIAL_DAYS: u32 = 365;

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
    #[serde(default, deserialize_with = "crate::wire::opt_decimal")]
    pub max_volume_gb: Option<Decimal>,
    /// Monthly spending cap when the customer has not set one.
    #[serde(default, deserialize_with = "crate::wire::opt_decimal")]
    pub default_spending_cap: Option<Decimal>,
}

/// ISO 4217 currencies whose minor unit is not the cent (their exponent);
/// every other code has 2. Stripe takes amounts in this unit.
const NOT_TWO_DIGITS: &[(&str, u32)] = &[
    ("BHD", 3),
    ("BIF", 0),
    ("CLP", 0),
    ("DJF", 0),
    ("GNF", 0),
    ("IQD", 3),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KMF", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("LYD", 3),
    ("MGA", 0),
    ("OMR", 3),
    ("PYG", 0),
    ("RWF", 0),
    ("TND", 3),
    ("UGX", 0),
    ("VND", 0),
    ("VUV", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("XPF", 0),
];

/// Digits after the point of `currency`'s minor unit (any case): 2 for USD,
/// 0 for JPY, 3 for KWD. The one home of this rule: a plan's `minor_units`
/// may not exceed it (catalog validation), and Stripe sync converts amounts
/// with it, so every amount a valid plan bills is a whole number of the
/// unit Stripe counts in.
pub fn currency_digits(currency: &str) -> u32 {
    NOT_TWO_DIGITS
        .iter()
        .find(|(c, _)| c.eq_ignore_ascii_case(currency))
        .map_or(2, |(_, d)| *d)
}

/// A published plan version and whether it is retired (retired versions
/// keep billing their current subscribers but take no new ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublishedPlan {
    pub plan: PlanVersion,
    pub retired: bool,
}

/// The latest version of each plan that is not retired, by plan key: what a
/// new subscription gets when it names no version, and what the advisor
/// compares. The one home of this rule.
pub fn latest_active(plans: &[PublishedPlan]) -> BTreeMap<&str, &PlanVersion> {
    let mut out: BTreeMap<&str, &PlanVersion> = BTreeMap::new();
    for p in plans.iter().filter(|p| !p.retired) {
        let have = out.entry(p.plan.plan.as_str()).or_insert(&p.plan);
        if have.version < p.plan.version {
            *have = &p.plan;
        }
    }
    out
}

/// The spending cap in force: the customer's own, else the plan's default.
/// The one home of this rule (quota checks, alerts, the snapshot, the cost
/// report).
pub fn cap_in_force(plan: &PlanVersion, own: Option<Decimal>) -> Option<Decimal> {
    own.or(plan.limits.default_spending_cap)
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

/// Decimal places any price may carry: unit prices (per unit, package and
/// tier prices), tier flat prices, the flat and seat fees, the minimum and
/// the maximum. A finer unit price is the same price stated `per` more base
/// units.
pub const PRICE_DP: u32 = 12;

/// Refuses a negative price (`-0` included: it is not how zero is written)
/// and one with more than [`PRICE_DP`] decimal places. `per` is given for
/// unit prices, which a larger `per` restates with fewer places.
fn check_amount(
    err: &mut impl FnMut(String, &'static str, String),
    field: String,
    v: Decimal,
    per: Option<Decimal>,
) {
    if v.is_sign_negative() {
        err(
            field.clone(),
            "negative_price",
            format!("{field} must not be negative (got {v}; zero is written \"0\")"),
        );
    }
    if v.scale() > PRICE_DP {
        let mut message = format!(
            "{field} has {} decimal places; prices carry at most {PRICE_DP}",
            v.scale()
        );
        if let Some(per) = per {
            // Restated per 10^k times more base units, the same price has k
            // fewer places (per means base units per price unit).
            let k = Decimal::from(10u64.pow((v.scale() - PRICE_DP).min(16)));
            let (price, per) = ((v * k).normalize(), (per * k).normalize());
            message.push_str(&format!(
                ": state it per more base units with `per` (base units per price unit), \
                 e.g. \"unit_price\": \"{price}\" with \"per\": \"{per}\" is the same price"
            ));
        }
        err(field, "too_precise", message);
    }
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
        if self.trial_days > MAX_TRIAL_DAYS {
            err(
                "trial_days".into(),
                "invalid_value",
                format!(
                    "trial_days must be 0 to {MAX_TRIAL_DAYS}, got {}",
                    self.trial_days
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
        let carried = currency_digits(&self.currency);
        if self.minor_units > carried {
            err(
                "minor_units".into(),
                "invalid_value",
                format!(
                    "minor_units must be 0..={carried}: {} has {carried} digits after the point, got {}",
                    self.currency, self.minor_units
                ),
            );
        }
        for (name, v) in [
            ("flat_fee", Some(self.flat_fee)),
            ("seat_fee", Some(self.seat_fee)),
            ("minimum", self.minimum),
            ("maximum", self.maximum),
        ] {
            if let Some(v) = v {
                check_amount(&mut err, name.into(), v, None);
            }
        }
        if self.in_advance() {
            // A minimum or maximum settles a period's whole spend, fees
            // included, after it ends: fees billed at its start cannot
            // take part (BILLING-EXAMPLES, fees in advance).
            for (name, v) in [("minimum", self.minimum), ("maximum", self.maximum)] {
                if v.is_some() {
                    err(
                        name.into(),
                        "invalid_value",
                        format!("{name}: a plan with fee_timing in_advance has no {name}"),
                    );
                }
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
            if p.allowance_per_seat.is_some_and(|a| a.is_sign_negative()) {
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
            match &p.model {
                PriceModel::PerUnit {
                    unit_price,
                    package_size,
                } => {
                    let field = format!("{at}.unit_price");
                    check_amount(&mut err, field, *unit_price, Some(p.per));
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
                        check_amount(
                            &mut err,
                            format!("{tf}.unit_price"),
                            t.unit_price,
                            Some(p.per),
                        );
                        check_amount(&mut err, format!("{tf}.flat_price"), t.flat_price, None);
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
        Self::from_json(include_str!("../../catalog.json")).expect("built-in catalog.json parses")
    }

    /// Reads a catalog file; an error names the field (`plans[0].flat_fee`).
    /// Every decimal is a string, read exactly; a JSON number is refused.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| match e.path().to_string() {
            p if p == "." => e.inner().to_string(),
            p => format!("{p}: {}", e.inner()),
        })
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

/// The (meter, group-by dimensions) questions a plan's prices need.
pub fn price_groups(plan: &PlanVersion) -> Vec<(String, Vec<String>)> {
    let priced: BTreeSet<&str> = plan.prices.iter().map(|p| p.meter.as_str()).collect();
    priced
        .into_iter()
        .map(|meter| {
            let group_by: BTreeSet<String> = plan
                .prices
                .iter()
                .filter(|p| p.meter == meter)
                .flat_map(|p| p.filter.keys().cloned())
                .collect();
            (meter.to_owned(), group_by.into_iter().collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(v: serde_json::Value) -> PlanVersion {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_contract_is_a_merge_patch_over_a_public_plan() {
        let meters = MeterCatalog::default_catalog();
        let base = plan(
            serde_json::json!({"plan":"team","version":3,"name":"Team","currency":"USD",
            "seat_fee":"15","minimum":"50","prices":[{"meter":"requests","model":"graduated",
            "tiers":[{"up_to":"5","unit_price":"0"},{"unit_price":"0.30"}]}]}),
        );
        let overrides = serde_json::json!({"minimum": null, "maximum": "500",
            "prices":[{"meter":"requests","model":"graduated",
            "tiers":[{"up_to":"10","unit_price":"0"},{"unit_price":"0.25"}]}]});
        let c = derive_contract(&base, "cus_1", "team-cus_1", 1, &overrides, &meters).unwrap();
        assert_eq!((c.plan.as_str(), c.version), ("team-cus_1", 1));
        assert_eq!(c.customer.as_deref(), Some("cus_1"));
        assert_eq!((c.minimum, c.maximum), (None, Some(Decimal::from(500))));
        assert_eq!(c.seat_fee, Decimal::from(15), "kept from the base");
        let PriceModel::Graduated { tiers } = &c.prices[0].model else {
            panic!("{c:?}")
        };
        assert_eq!(tiers[0].up_to, Some(Decimal::from(10)));
        assert!(c.offered_to("cus_1") && !c.offered_to("cus_2") && base.offered_to("cus_2"));
        // A contract is not a base; fixed fields; problems by field.
        let e = derive_contract(&c, "cus_1", "x", 1, &serde_json::json!({}), &meters).unwrap_err();
        assert_eq!(e[0].field, "base_plan");
        for (o, field) in [
            (serde_json::json!({"version": 9}), "overrides.version"),
            (serde_json::json!({"seat_fee": 12}), "overrides"),
            (serde_json::json!({"currency": "EUR"}), "overrides.currency"),
            (
                serde_json::json!({"trial_days": 400}),
                "overrides.trial_days",
            ),
        ] {
            let e = derive_contract(&base, "cus_1", "x", 1, &o, &meters).unwrap_err();
            assert_eq!(e[0].field, field, "{o}: {e:?}");
        }
    }

    #[test]
    fn a_plan_may_not_round_finer_than_its_currency() {
        assert_eq!(
            [
                currency_digits("USD"),
                currency_digits("jpy"),
                currency_digits("KWD")
            ],
            [2, 0, 3]
        );
        let with = |currency: &str, digits: u32| {
            plan(
                json!({"plan":"p","version":1,"name":"P","currency":currency,"minor_units":digits}),
            )
            .validate(&MeterCatalog::default_catalog())
        };
        // A USD plan with three digits used to publish, rate, and then fail
        // to sync (Stripe counts USD in cents).
        let errs = with("USD", 3).unwrap_err();
        assert_eq!(
            errs.iter()
                .map(|e| (e.field.as_str(), e.code))
                .collect::<Vec<_>>(),
            [("minor_units", "invalid_value")]
        );
        assert!(
            errs[0].message.contains("USD has 2 digits"),
            "{}",
            errs[0].message
        );
        assert_eq!(with("JPY", 2).unwrap_err()[0].field, "minor_units");
        for (c, d) in [("USD", 2), ("USD", 0), ("JPY", 0), ("KWD", 3), ("KWD", 2)] {
            assert_eq!(with(c, d), Ok(()), "{c} with {d}");
        }
    }

    #[test]
    fn the_customers_cap_wins_over_the_plans_default() {
        let mut p = plan(json!({"plan":"p","version":1,"name":"P","currency":"USD"}));
        assert_eq!(cap_in_force(&p, None), None);
        p.limits.default_spending_cap = Some(Decimal::from(50));
        assert_eq!(cap_in_force(&p, None), Some(Decimal::from(50)));
        assert_eq!(
            cap_in_force(&p, Some(Decimal::from(5))),
            Some(Decimal::from(5))
        );
        assert_eq!(cap_in_force(&p, Some(Decimal::ZERO)), Some(Decimal::ZERO));
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
            ("prices[1].tiers[2].unit_price", "negative_price"),
            ("prices[2].tiers[0].up_to", "invalid_tiers"),
            ("prices[2].tiers", "invalid_tiers"),
        ] {
            assert!(got.contains(&want), "missing {want:?} in {got:?}");
        }
    }

    fn problems(v: serde_json::Value) -> Vec<(String, &'static str, String)> {
        match plan(v).validate(&MeterCatalog::default_catalog()) {
            Ok(()) => vec![],
            Err(errs) => errs
                .into_iter()
                .map(|e| (e.field, e.code, e.message))
                .collect(),
        }
    }

    /// Issue 11, item 7: the 12-place limit held for per-unit prices only.
    #[test]
    fn every_price_carries_at_most_12_decimal_places() {
        let p13 = "0.0000000000001";
        let got = problems(json!({"plan":"p","version":1,"name":"P","currency":"USD",
        "flat_fee": p13, "seat_fee": p13, "minimum": p13, "maximum": p13,
        "prices":[
            {"meter":"requests","model":"graduated","tiers":[
                {"up_to":"10","unit_price":"0.00000000000004","flat_price":p13},{"unit_price":p13}]},
            {"meter":"egress","model":"volume","tiers":[{"unit_price":p13}]},
            {"meter":"disk","model":"per_unit","unit_price":p13,"package_size":"10"},
            {"meter":"compute","per":"3600","model":"per_unit","unit_price":p13}
        ]}));
        let fields: Vec<&str> = got
            .iter()
            .filter(|g| g.1 == "too_precise")
            .map(|g| g.0.as_str())
            .collect();
        assert_eq!(
            fields,
            [
                "flat_fee",
                "seat_fee",
                "minimum",
                "maximum",
                "prices[0].tiers[0].unit_price",
                "prices[0].tiers[0].flat_price",
                "prices[0].tiers[1].unit_price",
                "prices[1].tiers[0].unit_price",
                "prices[2].unit_price",
                "prices[3].unit_price",
            ],
            "{got:?}"
        );
        // Unit prices: the message says `per` restates the price, with the
        // restated figures; fees and flat prices have no `per`.
        let msg = |f: &str| got.iter().find(|g| g.0 == f).unwrap().2.clone();
        let m = msg("prices[0].tiers[0].unit_price");
        assert!(m.contains("`per`"), "{m}");
        assert!(
            m.contains(r#""unit_price": "0.000000000004" with "per": "100""#),
            "{m}"
        );
        let m = msg("prices[3].unit_price");
        assert!(
            m.contains(r#""unit_price": "0.000000000001" with "per": "36000""#),
            "{m}"
        );
        assert!(!msg("flat_fee").contains("per"), "{}", msg("flat_fee"));
        // 12 places everywhere is fine.
        let p12 = "0.000000000001";
        assert_eq!(
            problems(json!({"plan":"p","version":1,"name":"P","currency":"USD",
                "flat_fee": p12, "minimum": p12, "maximum": "1",
                "prices":[{"meter":"requests","model":"graduated","tiers":[{"up_to":"1","unit_price":p12,"flat_price":p12},{"unit_price":p12}]}]})),
            vec![]
        );
    }

    #[test]
    fn negative_zero_prices_are_refused() {
        // `Decimal` drops the sign of "-0", so the reader refuses the text.
        for (body, field) in [
            (
                r#"{"plans":[{"plan":"p","version":1,"name":"P","currency":"USD","flat_fee":"-0"}]}"#,
                "plans[0].flat_fee",
            ),
            (
                r#"{"plans":[{"plan":"p","version":1,"name":"P","currency":"USD","limits":{"default_spending_cap":"-0.00"}}]}"#,
                "plans[0].limits.default_spending_cap",
            ),
            (
                r#"{"plans":[{"plan":"p","version":1,"name":"P","currency":"USD","prices":[{"meter":"requests","model":"graduated","tiers":[{"unit_price":"-0"}]}]}]}"#,
                "plans[0].prices[0]: unit_price",
            ),
        ] {
            let e = Catalog::from_json(body).unwrap_err();
            assert!(
                e.starts_with(field) && e.contains("negative zero"),
                "{field}: {e}"
            );
        }
    }

    /// Issue 11, item 2: a JSON number in a catalog went through an f64
    /// (`0.1000000000000000055` became 0.1). Every decimal in a catalog is a
    /// string; numbers are refused, naming the field.
    #[test]
    fn catalog_numbers_are_refused_and_strings_read_exactly() {
        let with = |price: &str| {
            format!(
                r#"{{"plans":[{{"plan":"p","version":1,"name":"P","currency":"USD","prices":[
                {{"meter":"requests","model":"graduated","tiers":[{{"unit_price":{price}}}]}}]}}]}}"#
            )
        };
        let c = Catalog::from_json(&with(r#""0.1000000000000000055""#)).unwrap();
        let PriceModel::Graduated { tiers } = &c.plans[0].prices[0].model else {
            panic!()
        };
        assert_eq!(tiers[0].unit_price.to_string(), "0.1000000000000000055");
        for number in ["0.1000000000000000055", "1", "2.5e-7"] {
            let e = Catalog::from_json(&with(number)).unwrap_err();
            // The path stops at the price (tiers are read through
            // `flatten`); the message names the field.
            assert!(
                e.starts_with("plans[0].prices[0]: unit_price: ")
                    && e.contains("decimal string is required"),
                "{number}: {e}"
            );
        }
        for (field, body) in [
            (
                "plans[0].flat_fee",
                r#"{"plans":[{"plan":"p","version":1,"name":"P","currency":"USD","flat_fee":299}]}"#,
            ),
            (
                "plans[0].prices[0].per",
                r#"{"plans":[{"plan":"p","version":1,"name":"P","currency":"USD","prices":[{"meter":"requests","per":1000000,"model":"per_unit","unit_price":"0.4"}]}]}"#,
            ),
            (
                "plans[0].prices[0]: unit_price",
                r#"{"plans":[{"plan":"p","version":1,"name":"P","currency":"USD","prices":[{"meter":"requests","model":"per_unit","unit_price":0.4}]}]}"#,
            ),
            (
                "plans[0].limits.default_spending_cap",
                r#"{"plans":[{"plan":"p","version":1,"name":"P","currency":"USD","limits":{"default_spending_cap":10}}]}"#,
            ),
        ] {
            let e = Catalog::from_json(body).unwrap_err();
            assert!(
                e.contains(field) && e.contains("decimal string"),
                "{field}: {e}"
            );
        }
        // The default catalog is all strings.
        Catalog::from_json(include_str!("../../catalog.json")).unwrap();
    }
}
