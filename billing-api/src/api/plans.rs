//! The catalog endpoints.

use super::*;

/// Every published plan version.
#[utoipa::path(get, path = "/v1/plans", responses((status = 200, body = Vec<PublishedPlan>)))]
pub(super) async fn list_plans(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
) -> ApiResult<Vec<PublishedPlan>> {
    who.read_catalog()?;
    Ok(Json(app.state.list_plans().await?))
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
