//! The catalog endpoints.

use super::*;

/// Every published plan version.
#[utoipa::path(get, path = "/v1/plans", responses((status = 200, body = Vec<PublishedPlan>)))]
pub(super) async fn list_plans(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
) -> ApiResult<Vec<PublishedPlan>> {
    who.read_catalog()?;
    let mut plans = app.state.list_plans().await?;
    // A customer sees the public plans and its own contracts.
    if let Principal::Customer { customer_id } = &who {
        plans.retain(|p| p.plan.offered_to(customer_id));
    }
    Ok(Json(plans))
}

/// Publishes a plan version (immutable once published).
#[utoipa::path(post, path = "/v1/plans", request_body = PlanVersion,
    responses((status = 201, body = PlanVersion), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn publish_plan(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Body(plan): Body<PlanVersion>,
) -> Result<(StatusCode, Json<PlanVersion>), ApiError> {
    let actor = who.admin()?;
    if plan.customer.is_some() {
        return Err(ApiError::invalid(
            "customer: a contract is made at POST /v1/customers/{id}/contracts",
        ));
    }
    if let Err(errors) = plan.validate(&app.meters) {
        return Err(ApiError::invalid(format!(
            "plan {} version {} has {} problem(s)",
            plan.plan,
            plan.version,
            errors.len()
        ))
        .with_details(errors));
    }
    app.state.publish_plan(&plan, actor).await?;
    Ok((StatusCode::CREATED, Json(plan)))
}

/// Retires a plan version: no new subscriptions; current ones keep it.
#[utoipa::path(post, path = "/v1/plans/{plan}/versions/{version}/retire",
    params(("plan" = String, Path), ("version" = u32, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn retire_plan(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path((plan, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let actor = who.admin()?;
    let version: u32 = version
        .parse()
        .map_err(|_| ApiError::invalid("version: a positive integer"))?;
    app.state.retire_plan(&plan, version, actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContractRequest {
    /// The public plan the contract is derived from.
    pub base_plan: String,
    /// Default: its latest version that is not retired.
    pub base_version: Option<u32>,
    /// The contract's plan key (default `<base_plan>-<customer>`); each
    /// contract of the same key is a new version of it.
    pub plan: Option<String>,
    /// Plan fields to change, as a JSON merge patch over the base version
    /// (RFC 7386): any price, tier, fee, allowance, minimum or maximum;
    /// arrays (`prices`, `tiers`) are replaced whole, `null` removes a
    /// field. Not `plan`, `version`, `customer` or `currency`.
    #[schema(value_type = Object)]
    pub overrides: serde_json::Value,
}

/// Gives one customer its own prices: a private version derived from a
/// published one with overrides, validated like any plan (problems named
/// by field under `overrides`), subscribable by that customer only, shown
/// by the plan advisor as its contract. Staff only, audited
/// (`plan.publish`, and `contract.publish` on the customer). Sending the
/// same contract again answers the version already published (200).
#[utoipa::path(post, path = "/v1/customers/{id}/contracts", params(("id" = String, Path)), request_body = ContractRequest,
    responses((status = 201, body = PlanVersion), (status = 200, body = PlanVersion, description = "the same contract, published before"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create_contract(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<ContractRequest>,
) -> Result<(StatusCode, Json<PlanVersion>), ApiError> {
    let actor = who.admin()?;
    app.state.customer(&id).await?;
    let base_version = resolve_plan(&app, &req.base_plan, req.base_version)
        .await
        .map_err(|e| e.named("base_plan"))?;
    let base = app.state.plan_version(&req.base_plan, base_version).await?;
    let key = req
        .plan
        .clone()
        .unwrap_or_else(|| format!("{}-{id}", req.base_plan));
    let listed = app.state.list_plans().await?;
    let mine: Vec<&PlanVersion> = listed
        .iter()
        .map(|p| &p.plan)
        .filter(|p| p.plan == key)
        .collect();
    if mine
        .iter()
        .any(|p| p.customer.as_deref() != Some(id.as_str()))
    {
        return Err(ApiError::conflict(
            "conflict",
            format!("plan: the key {key} belongs to another plan; choose another"),
        ));
    }
    let latest = mine.iter().max_by_key(|p| p.version).copied();
    let next = latest.map_or(1, |p| p.version + 1);
    let derived =
        derive_contract(&base, &id, &key, next, &req.overrides, &app.meters).map_err(|errors| {
            ApiError::invalid(format!(
                "the contract has {} problem(s): {}",
                errors.len(),
                errors[0].message
            ))
            .with_details(errors)
        })?;
    if let Some(p) = latest.filter(|p| {
        **p == PlanVersion {
            version: p.version,
            ..derived.clone()
        }
    }) {
        return Ok((StatusCode::OK, Json(p.clone())));
    }
    app.state.publish_plan(&derived, actor).await?;
    Ok((StatusCode::CREATED, Json(derived)))
}

/// The customer's contracts (every version).
#[utoipa::path(get, path = "/v1/customers/{id}/contracts", params(("id" = String, Path)),
    responses((status = 200, body = Vec<PublishedPlan>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_contracts(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Vec<PublishedPlan>> {
    who.read_customer(&id, &format!("customer {id}"))?;
    app.state.customer(&id).await?;
    let mut plans = app.state.list_plans().await?;
    plans.retain(|p| p.plan.customer.as_deref() == Some(id.as_str()));
    Ok(Json(plans))
}
