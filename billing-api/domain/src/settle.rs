//! From an invoice's rated lines to its amount due: discounts, tax,
//! credits, each step rounded once, half-even (PRODUCT.md "Credits,
//! discounts and taxes"; BILLING-EXAMPLES examples 11 and 12).
//!
//! Order on every invoice:
//! 1. **Charges**: the rated lines and late-usage adjustments (each
//!    already rounded).
//! 2. **Discounts**: one line per coupon, in the order the coupons were
//!    applied to the customer; each works on the net of the charges in its
//!    scope as the earlier ones left them, and never takes it, or the
//!    invoice's charges as a whole, below zero.
//!    A discount is shared over the charges in its scope (largest
//!    remainder, to the minor unit) so that a later coupon with another
//!    scope sees exactly what is left of its own charges.
//! 3. **Tax**: one line per rate on the discounted taxable amount (all the
//!    charges: Tally sells one kind of service). An exclusive rate adds
//!    `taxable × rate`; an inclusive rate shows the tax its prices already
//!    hold, `taxable × rate / (1 + Σ inclusive rates)`, and adds nothing.
//!    Exclusive rates beside inclusive ones apply to the net of the
//!    included tax. A tax-exempt or reverse-charge customer gets no tax
//!    lines and the invoice says which.
//! 4. **Carried in**: amounts of earlier invoices below the minimum charge.
//! 5. **Credits** (`credit::consume`) on what is due, never below zero.
//! 6. **Amount due** = total − credits; zero is settled by credits and not
//!    sent for payment; below the minimum charge it is carried forward.
//!
//! What a step needs from the world (the coupons applied, the tax rates and
//! profile, the grants' balances) is passed in; `settle` is recomputed from
//! the same inputs, which the invoice records as its evidence, when a
//! finalized invoice is re-rated.

use crate::credit::{consume, CreditLine, Grant};
use crate::rating::{with_minor_units, LineKind};
use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

/// Half-even to `dp` digits: the one rounding of every step.
fn round(x: Decimal, dp: u32) -> Decimal {
    with_minor_units(
        x.round_dp_with_strategy(dp, RoundingStrategy::MidpointNearestEven),
        dp,
    )
}

crate::named! {
    /// How long a coupon applied to a customer lasts.
    pub enum CouponDuration ("coupon duration") {
        /// The first invoice issued at or after it was applied.
        Once => "once",
        /// Invoices issued until the end of the `periods`th billing period,
        /// counting the one it was applied in.
        Repeating => "repeating",
        /// Every invoice until it is removed.
        Forever => "forever",
    }
}

/// Which charges a coupon discounts: all of them (no scope), or the usage
/// of the named meters and the named fees.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    #[serde(default)]
    pub meters: Vec<String>,
    /// `flat_fee` and/or `seat_fee`.
    #[serde(default)]
    pub fees: Vec<LineKind>,
}

/// A coupon version in the catalog: exactly one of `percent_off` and
/// `amount_off` (with its currency).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Coupon {
    pub id: String,
    #[serde(default = "one")]
    pub version: u32,
    pub name: String,
    #[serde(default, deserialize_with = "crate::wire::opt_decimal")]
    #[schema(value_type = Option<String>)]
    pub percent_off: Option<Decimal>,
    #[serde(default, deserialize_with = "crate::wire::opt_decimal")]
    #[schema(value_type = Option<String>)]
    pub amount_off: Option<Decimal>,
    /// The currency of `amount_off`; it discounts invoices in that currency only.
    #[serde(default)]
    pub currency: Option<String>,
    pub duration: CouponDuration,
    /// With `repeating`: how many billing periods (≥ 1).
    #[serde(default)]
    pub periods: Option<u32>,
    /// Absent: the whole invoice.
    #[serde(default)]
    pub applies_to: Option<Scope>,
    /// How many customers it may be applied to, in all.
    #[serde(default)]
    pub max_redemptions: Option<u32>,
}

fn one() -> u32 {
    1
}

/// A refusal naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// A key as the catalog allows it: 1 to 64 of `[a-z0-9_-]`.
pub fn valid_key(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Coupon {
    /// Checks the coupon against the meters that exist; the error names the field.
    pub fn validate(&self, meters: &[&str]) -> Result<(), FieldError> {
        if !valid_key(&self.id) {
            return Err(bad("id", "1 to 64 of a-z, 0-9, '_' and '-'"));
        }
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(bad("name", "1 to 200 characters"));
        }
        match (self.percent_off, self.amount_off) {
            (Some(p), None) => {
                if p <= Decimal::ZERO || p > Decimal::ONE_HUNDRED {
                    return Err(bad("percent_off", "must be above 0 and at most 100"));
                }
                if self.currency.is_some() {
                    return Err(bad("currency", "only with amount_off"));
                }
            }
            (None, Some(a)) => {
                if a <= Decimal::ZERO {
                    return Err(bad("amount_off", "must be above 0"));
                }
                let Some(c) = &self.currency else {
                    return Err(bad("currency", "required with amount_off"));
                };
                if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(bad("currency", "an ISO 4217 code such as \"USD\""));
                }
                let dp = crate::catalog::currency_digits(c);
                if a.round_dp(dp) != a {
                    return Err(bad(
                        "amount_off",
                        format!("{a} is finer than {c}'s minor unit"),
                    ));
                }
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    "amount_off",
                    "give percent_off or amount_off, not both",
                ))
            }
            (None, None) => return Err(bad("percent_off", "give percent_off or amount_off")),
        }
        match (self.duration, self.periods) {
            (CouponDuration::Repeating, None) => {
                return Err(bad("periods", "required with duration \"repeating\""))
            }
            (CouponDuration::Repeating, Some(0)) => return Err(bad("periods", "at least 1")),
            (CouponDuration::Repeating, Some(n)) if n > 1200 => {
                return Err(bad("periods", "at most 1200"))
            }
            (CouponDuration::Once | CouponDuration::Forever, Some(_)) => {
                return Err(bad("periods", "only with duration \"repeating\""))
            }
            _ => {}
        }
        if let Some(s) = &self.applies_to {
            if s.meters.is_empty() && s.fees.is_empty() {
                return Err(bad("applies_to", "name meters or fees, or leave it out"));
            }
            if let Some(m) = s.meters.iter().find(|m| !meters.contains(&m.as_str())) {
                return Err(bad("applies_to.meters", format!("unknown meter {m:?}")));
            }
            if let Some(f) = s
                .fees
                .iter()
                .find(|f| !matches!(f, LineKind::FlatFee | LineKind::SeatFee))
            {
                return Err(bad(
                    "applies_to.fees",
                    format!("{f:?} is not a fee: flat_fee or seat_fee"),
                ));
            }
        }
        if self.max_redemptions == Some(0) {
            return Err(bad("max_redemptions", "at least 1"));
        }
        Ok(())
    }

    fn covers(&self, c: &Charge) -> bool {
        match &self.applies_to {
            None => true,
            Some(s) => {
                c.meter.as_ref().is_some_and(|m| s.meters.contains(m)) || s.fees.contains(&c.kind)
            }
        }
    }
}

/// A coupon applied to a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Applied {
    pub id: String,
    pub customer_id: String,
    pub coupon: Coupon,
    pub applied_at: DateTime<Utc>,
    pub removed_at: Option<DateTime<Utc>>,
    /// Of a `repeating` coupon: the end of its last billing period
    /// (counted from the period it was applied in, on the customer's
    /// anchor day).
    pub ends_at: Option<DateTime<Utc>>,
    /// How many invoices it has discounted so far.
    pub redeemed: u32,
}

impl Applied {
    /// Whether it discounts an invoice issued at `issued` for a period
    /// ending at `period_end`.
    pub fn applies(&self, issued: DateTime<Utc>, period_end: DateTime<Utc>) -> bool {
        if issued < self.applied_at || self.removed_at.is_some_and(|r| issued >= r) {
            return false;
        }
        match self.coupon.duration {
            CouponDuration::Once => self.redeemed == 0,
            CouponDuration::Repeating => self.ends_at.is_some_and(|e| period_end <= e),
            CouponDuration::Forever => true,
        }
    }
}

crate::named! {
    /// What tax an invoice carries.
    pub enum TaxTreatment ("tax treatment") {
        /// The rates the customer's profile selects (possibly none).
        Standard => "standard",
        /// The customer is exempt: no tax.
        Exempt => "exempt",
        /// The customer accounts for the tax itself (EU reverse charge):
        /// no tax on the invoice, which says so.
        ReverseCharge => "reverse_charge",
    }
}

/// A tax rate as data. Immutable once created: a new percentage is a new
/// rate, and the old one is archived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaxRate {
    pub id: String,
    /// What the invoice line says ("VAT", "Sales tax").
    pub name: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    /// A region of the country (a state, a province); absent: all of it.
    #[serde(default)]
    pub region: Option<String>,
    #[serde(deserialize_with = "crate::wire::decimal")]
    #[schema(value_type = String)]
    pub percentage: Decimal,
    #[serde(default)]
    pub inclusive: bool,
    #[serde(default)]
    pub archived: bool,
}

impl TaxRate {
    pub fn validate(&self) -> Result<(), FieldError> {
        if !valid_key(&self.id) {
            return Err(bad("id", "1 to 64 of a-z, 0-9, '_' and '-'"));
        }
        if self.name.trim().is_empty() || self.name.len() > 100 {
            return Err(bad("name", "1 to 100 characters"));
        }
        if !valid_country(&self.country) {
            return Err(bad("country", "an ISO 3166-1 alpha-2 code such as \"DE\""));
        }
        if let Some(r) = &self.region {
            if r.trim().is_empty() || r.len() > 64 {
                return Err(bad("region", "1 to 64 characters, or leave it out"));
            }
        }
        if self.percentage < Decimal::ZERO || self.percentage > Decimal::ONE_HUNDRED {
            return Err(bad("percentage", "from 0 to 100"));
        }
        if self.percentage.scale() > 4 {
            return Err(bad("percentage", "at most 4 decimal places"));
        }
        Ok(())
    }
}

fn valid_country(c: &str) -> bool {
    c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase())
}

/// A customer's tax profile: where it is and how it is taxed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaxProfile {
    pub country: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub tax_id: Option<String>,
    #[serde(default)]
    pub exempt: bool,
    #[serde(default)]
    pub reverse_charge: bool,
}

impl TaxProfile {
    pub fn validate(&self) -> Result<(), FieldError> {
        if !valid_country(&self.country) {
            return Err(bad("country", "an ISO 3166-1 alpha-2 code such as \"DE\""));
        }
        if let Some(r) = &self.region {
            if r.trim().is_empty() || r.len() > 64 {
                return Err(bad("region", "1 to 64 characters, or leave it out"));
            }
        }
        if let Some(t) = &self.tax_id {
            if t.trim().is_empty() || t.len() > 64 {
                return Err(bad("tax_id", "1 to 64 characters, or leave it out"));
            }
        }
        if self.exempt && self.reverse_charge {
            return Err(bad(
                "reverse_charge",
                "a customer is exempt or reverse charged, not both",
            ));
        }
        if self.reverse_charge && self.tax_id.is_none() {
            return Err(bad("tax_id", "required for reverse charge"));
        }
        Ok(())
    }

    pub fn treatment(&self) -> TaxTreatment {
        if self.exempt {
            TaxTreatment::Exempt
        } else if self.reverse_charge {
            TaxTreatment::ReverseCharge
        } else {
            TaxTreatment::Standard
        }
    }

    /// The rates this profile selects: not archived, of its country, for
    /// all of it or for its region.
    pub fn rates<'a>(&self, rates: &'a [TaxRate]) -> Vec<&'a TaxRate> {
        if self.treatment() != TaxTreatment::Standard {
            return vec![];
        }
        rates
            .iter()
            .filter(|r| {
                !r.archived
                    && r.country == self.country
                    && r.region
                        .as_ref()
                        .is_none_or(|g| Some(g) == self.region.as_ref())
            })
            .collect()
    }
}

/// One charge a discount can work on: a rated line or an adjustment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub kind: LineKind,
    pub meter: Option<String>,
    pub amount: Decimal,
}

/// One coupon's line on an invoice, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiscountLine {
    /// The application (customer coupon) it came from.
    pub applied_id: String,
    pub coupon_id: String,
    pub coupon_version: u32,
    pub description: String,
    /// The net of the charges in scope it worked on.
    pub base: Decimal,
    pub percent_off: Option<Decimal>,
    pub amount_off: Option<Decimal>,
    /// Before rounding.
    pub amount_exact: Decimal,
    /// Negative (or zero), rounded once.
    pub amount: Decimal,
}

/// One tax rate's line, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaxLine {
    pub rate_id: String,
    pub description: String,
    pub country: String,
    pub region: Option<String>,
    pub percentage: Decimal,
    pub inclusive: bool,
    /// The discounted amount it is computed on.
    pub taxable: Decimal,
    pub amount_exact: Decimal,
    /// Rounded once. An inclusive rate's amount is already in the charges
    /// and is not added again.
    pub amount: Decimal,
}

/// What settle needs beyond the charges: everything an invoice records.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Inputs {
    /// The coupons that apply to this invoice, in the order applied.
    pub coupons: Vec<Applied>,
    pub treatment: Option<TaxTreatment>,
    pub tax_id: Option<String>,
    pub rates: Vec<TaxRate>,
    /// The customer's grants with their balances before this invoice.
    pub grants: Vec<Grant>,
    /// The credit cut-off: the usage period's end (an opening invoice: its
    /// issue instant).
    pub until: Option<DateTime<Utc>>,
}

/// The steps after the charges, as the invoice shows them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Settlement {
    pub discounts: Vec<DiscountLine>,
    /// Σ discounts (≤ 0).
    pub discount_total: Decimal,
    pub treatment: Option<TaxTreatment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tax_id: Option<String>,
    pub taxes: Vec<TaxLine>,
    /// Σ exclusive tax: what tax adds.
    pub tax_total: Decimal,
    /// Σ inclusive tax: already in the charges.
    pub tax_included: Decimal,
    pub credits: Vec<CreditLine>,
    /// Σ credits (≤ 0).
    pub credit_total: Decimal,
}

/// The steps of an invoice of `charges` (each rounded to `dp` digits) and
/// `carried_in`, in `currency`: discounts, tax, credits. `total` of the
/// invoice is `Σ charges + discount_total + tax_total + carried_in`; what
/// is due is `total + credit_total`.
pub fn settle(
    charges: &[Charge],
    carried_in: Decimal,
    currency: &str,
    dp: u32,
    inputs: &Inputs,
) -> Settlement {
    let money = |x: Decimal| with_minor_units(x, dp);
    // What is left of each charge after the discounts so far.
    let mut left: Vec<Decimal> = charges.iter().map(|c| c.amount).collect();
    let mut discounts = Vec::new();
    for a in &inputs.coupons {
        let c = &a.coupon;
        let scope: Vec<usize> = (0..charges.len())
            .filter(|&i| c.covers(&charges[i]))
            .collect();
        let base = money(scope.iter().map(|&i| left[i]).sum::<Decimal>());
        let exact = match (c.percent_off, c.amount_off) {
            (Some(p), _) => base.max(Decimal::ZERO) * p / Decimal::ONE_HUNDRED,
            (None, Some(off))
                if c.currency
                    .as_deref()
                    .is_some_and(|k| k.eq_ignore_ascii_case(currency)) =>
            {
                off
            }
            _ => Decimal::ZERO,
        };
        // Never below zero: neither the charges in its scope nor the whole
        // invoice (a refund outside the scope counts against the latter).
        let all_left: Decimal = left.iter().sum();
        let amount = round(exact, dp)
            .min(base.max(Decimal::ZERO))
            .min(all_left.max(Decimal::ZERO));
        // Shared over the charges in scope that still have something left.
        let weights: Vec<Decimal> = scope.iter().map(|&i| left[i].max(Decimal::ZERO)).collect();
        if !amount.is_zero() {
            for (k, part) in crate::costs::share(amount, &weights, dp)
                .into_iter()
                .enumerate()
            {
                left[scope[k]] -= part;
            }
        }
        let neg = |x: Decimal| {
            if x.is_zero() {
                money(Decimal::ZERO)
            } else {
                money(-x)
            }
        };
        discounts.push(DiscountLine {
            applied_id: a.id.clone(),
            coupon_id: c.id.clone(),
            coupon_version: c.version,
            description: match (c.percent_off, c.amount_off) {
                (Some(p), _) => format!("{} ({}% off)", c.name, p.normalize()),
                (_, Some(off)) => format!("{} ({} {} off)", c.name, off, currency),
                _ => c.name.clone(),
            },
            base,
            percent_off: c.percent_off,
            amount_off: c.amount_off,
            amount_exact: if exact.is_zero() {
                Decimal::ZERO
            } else {
                -exact
            },
            amount: neg(amount),
        });
    }
    let discount_total = money(discounts.iter().map(|d| d.amount).sum());
    let taxable = money(charges.iter().map(|c| c.amount).sum::<Decimal>() + discount_total);
    let rates: &[TaxRate] = match inputs.treatment {
        Some(TaxTreatment::Standard) | None => &inputs.rates,
        _ => &[],
    };
    let inclusive: Decimal = rates
        .iter()
        .filter(|r| r.inclusive)
        .map(|r| r.percentage / Decimal::ONE_HUNDRED)
        .sum();
    let mut taxes = Vec::new();
    let mut included = Decimal::ZERO;
    for r in rates.iter().filter(|r| r.inclusive) {
        let exact = taxable * (r.percentage / Decimal::ONE_HUNDRED) / (Decimal::ONE + inclusive);
        let amount = round(exact, dp);
        included += amount;
        taxes.push(tax_line(r, taxable, exact, amount));
    }
    let net = money(taxable - included);
    for r in rates.iter().filter(|r| !r.inclusive) {
        let exact = net * r.percentage / Decimal::ONE_HUNDRED;
        taxes.push(tax_line(r, net, exact, round(exact, dp)));
    }
    let tax_total = money(
        taxes
            .iter()
            .filter(|t| !t.inclusive)
            .map(|t| t.amount)
            .sum(),
    );
    let total = taxable + tax_total + carried_in;
    let credits = match inputs.until {
        Some(until) => consume(total, currency, until, &inputs.grants),
        None => vec![],
    };
    let credit_total = money(credits.iter().map(|c| c.amount).sum());
    Settlement {
        discounts,
        discount_total,
        treatment: inputs.treatment,
        tax_id: inputs.tax_id.clone(),
        taxes,
        tax_total,
        tax_included: money(included),
        credits,
        credit_total,
    }
}

fn tax_line(r: &TaxRate, taxable: Decimal, exact: Decimal, amount: Decimal) -> TaxLine {
    TaxLine {
        rate_id: r.id.clone(),
        description: format!(
            "{} {}%{}",
            r.name,
            r.percentage.normalize(),
            if r.inclusive { " (included)" } else { "" }
        ),
        country: r.country.clone(),
        region: r.region.clone(),
        percentage: r.percentage,
        inclusive: r.inclusive,
        taxable,
        amount_exact: exact,
        amount,
    }
}

/// The inputs of a customer's invoice in `currency` issued at `issued` for
/// a period ending at `period_end`, credits cut off at `until`: the
/// coupons that apply (in the order applied), the rates its tax profile
/// selects and the grants that can pay.
#[allow(clippy::too_many_arguments)]
pub fn inputs(
    applied: &[Applied],
    profile: Option<&TaxProfile>,
    rates: &[TaxRate],
    grants: &[Grant],
    currency: &str,
    issued: DateTime<Utc>,
    period_end: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Inputs {
    // An amount off in another currency does not apply (and is not
    // redeemed) at all.
    let mut coupons: Vec<Applied> = applied
        .iter()
        .filter(|a| a.applies(issued, period_end))
        .filter(|a| {
            a.coupon.amount_off.is_none()
                || a.coupon
                    .currency
                    .as_deref()
                    .is_some_and(|c| c.eq_ignore_ascii_case(currency))
        })
        .cloned()
        .collect();
    coupons.sort_by(|a, b| a.applied_at.cmp(&b.applied_at).then(a.id.cmp(&b.id)));
    Inputs {
        coupons,
        treatment: profile.map(TaxProfile::treatment),
        tax_id: profile.and_then(|p| p.tax_id.clone()),
        rates: profile
            .map(|p| p.rates(rates).into_iter().cloned().collect())
            .unwrap_or_default(),
        grants: grants
            .iter()
            .filter(|g| crate::credit::can_pay(g, currency, until))
            .cloned()
            .collect(),
        until: Some(until),
    }
}

/// Whether a discount line redeems its coupon: it had something in scope
/// to work on (a `once` coupon with nothing to discount waits for the next
/// invoice).
pub fn redeems(d: &DiscountLine) -> bool {
    !(d.amount.is_zero() && d.base <= Decimal::ZERO)
}
