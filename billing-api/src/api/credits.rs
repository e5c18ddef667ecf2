//! Credit grants and the ledger, coupons (catalog and applied), tax rates
//! and tax profiles.
//!
//! Staff write them; a customer reads its own grants, ledger, coupons and
//! tax profile. Every change is audited in its own transaction, and every
//! write is safe to retry: a grant with the same `Idempotency-Key` and the
//! same body answers the first grant (200), with another body a 409; a
//! void, a removal, an archive or a "paid" answer the same when repeated.

use super::*;
use billing_domain::credit::{balance_at, Entry, Grant, GrantKind};
use billing_domain::settle::{Applied, Coupon, FieldError, TaxProfile, TaxRate};

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

/// The most a grant or an amount-off coupon may be.
const MAX_AMOUNT: i64 = 1_000_000_000;

fn check_money(field: &str, amount: Decimal, currency: &str) -> Result<(), ApiError> {
    if amount <= Decimal::ZERO || amount > Decimal::from(MAX_AMOUNT) {
        return Err(ApiError::invalid(format!(
            "{field}: above 0 and at most {MAX_AMOUNT}, got {amount}"
        )));
    }
    let dp = billing_domain::catalog::currency_digits(currency);
    if amount.round_dp(dp) != amount {
        return Err(ApiError::invalid(format!(
            "{field}: {amount} is finer than {currency}'s minor unit ({dp} digits)"
        )));
    }
    Ok(())
}

fn check_currency(currency: &str) -> Result<(), ApiError> {
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ApiError::invalid(format!(
            "currency: an ISO 4217 code such as \"USD\", got {currency:?}"
        )));
    }
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGrant {
    pub kind: GrantKind,
    /// A decimal string in whole minor units of `currency`.
    #[serde(deserialize_with = "crate::wire::decimal")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// ISO 4217; the grant pays invoices in this currency only. Default USD.
    #[serde(default)]
    pub currency: Option<String>,
    /// Default: now.
    #[serde(default, deserialize_with = "crate::wire::opt_instant")]
    pub effective_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "crate::wire::opt_instant")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Lower numbers are consumed first (after the earliest expiry); 0 to
    /// 1000, default 10.
    #[serde(default)]
    pub priority: Option<u32>,
    #[serde(default)]
    pub reason: Option<String>,
    /// A purchased grant invoiced on its own (a `top_up` invoice, numbered
    /// and sent to Stripe like any other): usable once that invoice is paid
    /// (Stripe's `invoice.paid`, or staff marking it paid).
    #[serde(default)]
    pub top_up: bool,
}

/// Grants credit to a customer (admin). With an `Idempotency-Key` header,
/// a repeat of the same request answers the first grant (200).
#[utoipa::path(post, path = "/v1/customers/{id}/credit-grants", params(("id" = String, Path),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 characters; the same key and body answer the first grant")),
    request_body = CreateGrant,
    responses((status = 201, body = Grant), (status = 200, body = Grant, description = "a repeat of an earlier request with the same key"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create_grant(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(req): Body<CreateGrant>,
) -> Result<(StatusCode, Json<Grant>), ApiError> {
    let actor = who.admin()?.to_owned();
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if (1..=255).contains(&k.len()) => Some(k.to_owned()),
            _ => {
                return Err(ApiError::invalid(
                    "Idempotency-Key: 1 to 255 visible ASCII characters",
                ))
            }
        },
    };
    let currency = req.currency.unwrap_or_else(|| "USD".into());
    check_currency(&currency)?;
    check_money("amount", req.amount, &currency)?;
    // `expires_at` after `effective_at` (now when absent) is checked where
    // the grant is recorded.
    let priority = req.priority.unwrap_or(10);
    if priority > 1000 {
        return Err(ApiError::invalid(format!(
            "priority: 0 to 1000, got {priority}"
        )));
    }
    let reason = req.reason.unwrap_or_default();
    if reason.len() > 500 {
        return Err(ApiError::invalid("reason: at most 500 characters"));
    }
    if req.top_up && req.amount < app.min_charge {
        return Err(ApiError::invalid(format!(
            "amount: a top-up is invoiced on its own: at least the minimum charge, {}",
            app.min_charge
        )));
    }
    if req.top_up && req.kind != GrantKind::Purchased {
        return Err(ApiError::invalid(
            "top_up: only a purchased grant is invoiced as a top-up",
        ));
    }
    let g = crate::state::NewGrant {
        customer_id: id,
        kind: req.kind,
        currency,
        amount: req.amount,
        effective_at: req.effective_at,
        expires_at: req.expires_at,
        priority,
        reason,
        top_up: req.top_up,
        idempotency_key: key,
    };
    let (grant, created) = app.state.grant_credit(&g, &actor).await?;
    app.quota_changed(&grant.customer_id).await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(grant)))
}

/// A customer's grants with what is left of each (admin or the customer).
#[utoipa::path(get, path = "/v1/customers/{id}/credit-grants", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Grant>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_grants(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Vec<Grant>> {
    who.read_customer(&id, &format!("customer {id}"))?;
    Ok(Json(app.state.grants_of(&id).await?))
}

/// Voids the unused remainder of a grant (admin); a repeat answers the same.
#[utoipa::path(post, path = "/v1/customers/{id}/credit-grants/{grant}/void",
    params(("id" = String, Path), ("grant" = String, Path)),
    responses((status = 200, body = Grant), (status = 404, body = ErrorBody)))]
pub(super) async fn void_grant(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path((id, grant)): Path<(String, String)>,
) -> ApiResult<Grant> {
    let actor = who.admin()?.to_owned();
    let g = app
        .state
        .void_grant(&id, &grant, &actor, crate::wire::now())
        .await?;
    app.quota_changed(&id).await;
    Ok(Json(g))
}

/// Marks a top-up grant's invoice paid, making the grant usable (admin;
/// the embedded mode without Stripe). A repeat answers the same.
#[utoipa::path(post, path = "/v1/customers/{id}/credit-grants/{grant}/paid",
    params(("id" = String, Path), ("grant" = String, Path)),
    responses((status = 200, body = Grant), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn mark_grant_paid(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path((id, grant)): Path<(String, String)>,
) -> ApiResult<Grant> {
    let actor = who.admin()?.to_owned();
    let g = app.state.mark_grant_paid(&id, &grant, &actor).await?;
    app.quota_changed(&id).await;
    Ok(Json(g))
}

/// A customer's credit ledger and balances.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreditLedger {
    /// Per currency: what can be spent now.
    pub balances: std::collections::BTreeMap<String, Decimal>,
    pub entries: Vec<Entry>,
}

/// The append-only ledger of a customer's grants (admin or the customer).
#[utoipa::path(get, path = "/v1/customers/{id}/credit-ledger", params(("id" = String, Path)),
    responses((status = 200, body = CreditLedger), (status = 404, body = ErrorBody)))]
pub(super) async fn credit_ledger(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<CreditLedger> {
    who.read_customer(&id, &format!("customer {id}"))?;
    let entries = app.state.ledger_of(&id).await?;
    let grants = app.state.grants_of(&id).await?;
    let now = crate::wire::now();
    let mut balances = std::collections::BTreeMap::new();
    for g in &grants {
        balances
            .entry(g.currency.clone())
            .or_insert_with(|| balance_at(&grants, &g.currency, now));
    }
    Ok(Json(CreditLedger { balances, entries }))
}

/// Publishes a coupon's next version (admin). Customers it was applied to
/// keep the version applied.
#[utoipa::path(post, path = "/v1/coupons", request_body = Coupon,
    responses((status = 201, body = Coupon), (status = 422, body = ErrorBody)))]
pub(super) async fn publish_coupon(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Body(c): Body<Coupon>,
) -> Result<(StatusCode, Json<Coupon>), ApiError> {
    let actor = who.admin()?.to_owned();
    let meters: Vec<&str> = app.meters.meters.iter().map(|m| m.key.as_str()).collect();
    c.validate(&meters)?;
    let published = app.state.publish_coupon(&c, &actor).await?;
    Ok((StatusCode::CREATED, Json(published)))
}

/// Every version of every coupon (admin).
#[utoipa::path(get, path = "/v1/coupons", responses((status = 200, body = Vec<Coupon>)))]
pub(super) async fn list_coupons(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
) -> ApiResult<Vec<Coupon>> {
    who.admin()?;
    Ok(Json(app.state.coupons().await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyCoupon {
    pub coupon: String,
    /// Default: now.
    #[serde(default, deserialize_with = "crate::wire::opt_instant")]
    pub applied_at: Option<DateTime<Utc>>,
}

/// Applies a coupon's latest version to a customer from an instant (admin).
#[utoipa::path(post, path = "/v1/customers/{id}/coupons", params(("id" = String, Path)), request_body = ApplyCoupon,
    responses((status = 201, body = Applied), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn apply_coupon(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<ApplyCoupon>,
) -> Result<(StatusCode, Json<Applied>), ApiError> {
    let actor = who.admin()?.to_owned();
    if !billing_domain::settle::valid_key(&req.coupon) {
        return Err(ApiError::invalid(
            "coupon: 1 to 64 of a-z, 0-9, '_' and '-'",
        ));
    }
    let at = req.applied_at.unwrap_or_else(crate::wire::now);
    let a = app.state.apply_coupon(&id, &req.coupon, at, &actor).await?;
    Ok((StatusCode::CREATED, Json(a)))
}

/// A customer's coupons, applied and removed (admin or the customer).
#[utoipa::path(get, path = "/v1/customers/{id}/coupons", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Applied>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_customer_coupons(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Vec<Applied>> {
    who.read_customer(&id, &format!("customer {id}"))?;
    Ok(Json(app.state.coupons_of(&id).await?))
}

/// Removes an applied coupon from now on (admin); a repeat answers the same.
#[utoipa::path(delete, path = "/v1/customers/{id}/coupons/{applied}",
    params(("id" = String, Path), ("applied" = String, Path)),
    responses((status = 200, body = Applied), (status = 404, body = ErrorBody)))]
pub(super) async fn remove_coupon(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path((id, applied)): Path<(String, String)>,
) -> ApiResult<Applied> {
    let actor = who.admin()?.to_owned();
    Ok(Json(
        app.state
            .remove_coupon(&id, &applied, crate::wire::now(), &actor)
            .await?,
    ))
}

/// Creates a tax rate (admin). Rates are immutable: a new percentage is a
/// new rate, and the old one is archived.
#[utoipa::path(post, path = "/v1/tax-rates", request_body = TaxRate,
    responses((status = 201, body = TaxRate), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create_tax_rate(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Body(r): Body<TaxRate>,
) -> Result<(StatusCode, Json<TaxRate>), ApiError> {
    let actor = who.admin()?.to_owned();
    r.validate()?;
    if r.archived {
        return Err(ApiError::invalid("archived: a new rate is not archived"));
    }
    app.state.create_tax_rate(&r, &actor).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

/// Every tax rate, archived ones included (admin).
#[utoipa::path(get, path = "/v1/tax-rates", responses((status = 200, body = Vec<TaxRate>)))]
pub(super) async fn list_tax_rates(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
) -> ApiResult<Vec<TaxRate>> {
    who.admin()?;
    Ok(Json(app.state.tax_rates().await?))
}

/// Archives a tax rate: invoices settled afterwards do not use it (admin).
#[utoipa::path(post, path = "/v1/tax-rates/{rate}/archive", params(("rate" = String, Path)),
    responses((status = 200, body = TaxRate), (status = 404, body = ErrorBody)))]
pub(super) async fn archive_tax_rate(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(rate): Path<String>,
) -> ApiResult<TaxRate> {
    let actor = who.admin()?.to_owned();
    Ok(Json(app.state.archive_tax_rate(&rate, &actor).await?))
}

/// Sets a customer's tax profile (admin).
#[utoipa::path(put, path = "/v1/customers/{id}/tax-profile", params(("id" = String, Path)), request_body = TaxProfile,
    responses((status = 200, body = TaxProfile), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn set_tax_profile(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(p): Body<TaxProfile>,
) -> ApiResult<TaxProfile> {
    let actor = who.admin()?.to_owned();
    p.validate()?;
    app.state.set_tax_profile(&id, &p, &actor).await?;
    Ok(Json(p))
}

/// A customer's tax profile (admin or the customer); 404 when it has none.
#[utoipa::path(get, path = "/v1/customers/{id}/tax-profile", params(("id" = String, Path)),
    responses((status = 200, body = TaxProfile), (status = 404, body = ErrorBody)))]
pub(super) async fn get_tax_profile(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<TaxProfile> {
    who.read_customer(&id, &format!("customer {id}"))?;
    app.state
        .tax_profile(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("customer {id} has no tax profile")))
}
