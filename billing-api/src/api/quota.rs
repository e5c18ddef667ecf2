//! The quota endpoints.

use super::*;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaCheck {
    pub customer_id: String,
    pub ask: Ask,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QuotaAnswer {
    pub customer_id: String,
    /// The plan in force (null: the customer has no subscription, and
    /// every start is denied with `no_subscription`).
    pub plan: Option<String>,
    pub plan_version: Option<u32>,
    /// Usage and running resources are as of this hour boundary (null
    /// without a subscription).
    pub as_of: Option<DateTime<Utc>>,
    #[serde(flatten)]
    pub decision: Decision,
}

/// May the customer start instances or grow a volume? Answered from memory.
#[utoipa::path(post, path = "/v1/quota/check", request_body = QuotaCheck,
    responses((status = 200, body = QuotaAnswer), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn quota_check(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Body(req): Body<QuotaCheck>,
) -> ApiResult<QuotaAnswer> {
    who.admin_or_control_plane()?;
    let started = std::time::Instant::now();
    if let Ask::GrowVolume { size_gb, .. } = &req.ask {
        if size_gb.is_sign_negative() {
            return Err(ApiError::invalid("ask.size_gb: must not be negative"));
        }
    }
    let entry = app.quota.entry(&req.customer_id);
    let decision = match &entry {
        Some(entry) => entry.decide_at(&req.ask, crate::wire::now())?,
        None => {
            // Unknown customers are a 404; known ones without a plan are
            // denied every start.
            app.state.customer(&req.customer_id).await?;
            billing_domain::quota::without_subscription(&req.ask)
        }
    };
    let reason = decision.reason.map_or("none", |r| r.as_str());
    app.metrics
        .quota_decisions
        .with_label_values(&[if decision.allow { "allow" } else { "deny" }, reason])
        .inc();
    app.metrics
        .quota_check_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(Json(QuotaAnswer {
        customer_id: req.customer_id,
        plan: entry.as_ref().map(|e| e.plan.plan.clone()),
        plan_version: entry.as_ref().map(|e| e.plan.version),
        as_of: entry.as_ref().map(|e| e.as_of),
        decision,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotQuery {
    /// Only customers changed after this version (0 or absent: all).
    pub since: Option<u64>,
}

/// Every customer's limits (or those changed since a version), to cache.
#[utoipa::path(get, path = "/v1/quota/snapshot", params(("since" = Option<u64>, Query)),
    responses((status = 200, body = Snapshot), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn quota_snapshot(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    q: Result<Query<SnapshotQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Snapshot> {
    who.admin_or_control_plane()?;
    let Query(q) = q.map_err(|e| ApiError::bad_query(e.body_text()))?;
    Ok(Json(app.quota.snapshot(q.since.unwrap_or(0))))
}

/// Where the in-memory usage state stands: per usage partition, the batch
/// applied through (its rollup version and when it was written), and how
/// many customers wait to be read again. The staleness of a quota decision
/// is the time from a batch's write to its version showing here.
#[utoipa::path(get, path = "/v1/quota/state", params(("customer" = Option<String>, Query)),
    responses((status = 200, body = StateProgress), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn quota_state(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    q: Result<Query<StateQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<StateProgress> {
    who.admin_or_control_plane()?;
    let Query(q) = q.map_err(|e| ApiError::bad_query(e.body_text()))?;
    Ok(Json(app.quota.progress(q.customer.as_deref())))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StateQuery {
    /// Also report this customer's entry.
    pub customer: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpendingCap {
    /// Monthly cap in the plan's currency, a decimal string (a JSON number
    /// is refused); null removes it.
    #[serde(default, deserialize_with = "crate::wire::opt_decimal")]
    pub spending_cap: Option<Decimal>,
}

/// Sets or removes the monthly spending cap (admin or the customer).
#[utoipa::path(put, path = "/v1/customers/{id}/spending-cap", params(("id" = String, Path)), request_body = SpendingCap,
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn set_spending_cap(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<SpendingCap>,
) -> Result<StatusCode, ApiError> {
    who.read_customer(&id, &format!("customer {id}"))?;
    let actor = match &who {
        Principal::Admin { actor } => actor.clone(),
        _ => format!("customer:{id}"),
    };
    if let Some(c) = req.spending_cap {
        // `is_sign_negative` is also true of "-0", which is refused too.
        if c.is_sign_negative() || c > Decimal::from(1_000_000_000u64) || c.scale() > 4 {
            return Err(ApiError::invalid(format!(
                "spending_cap: 0 to 1000000000 with at most 4 decimals, got {c:?}",
                c = c.to_string()
            )));
        }
    }
    app.state
        .set_spending_cap(&id, req.spending_cap, &actor)
        .await?;
    app.quota_changed(&id).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Suspension {
    pub suspended: bool,
}

/// Suspends or resumes an account (suspended accounts may not scale up).
#[utoipa::path(put, path = "/v1/customers/{id}/suspension", params(("id" = String, Path)), request_body = Suspension,
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn set_suspension(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<Suspension>,
) -> Result<StatusCode, ApiError> {
    let actor = who.admin()?;
    app.state.set_suspended(&id, req.suspended, actor).await?;
    app.quota_changed(&id).await;
    Ok(StatusCode::NO_CONTENT)
}
