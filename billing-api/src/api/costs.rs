//! The costs endpoints.

use super::*;

/// The instant a cost report is as of.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AsOf {
    /// RFC 3339; default now. An earlier instant of this month or the last,
    /// never a future one: a page that shows several reports asks them all
    /// as of the first one's `as_of`, so their figures agree (forecasts move
    /// with the clock).
    #[serde(default, deserialize_with = "crate::wire::opt_instant")]
    #[param(value_type = Option<String>, example = "2026-11-14T09:30:00Z")]
    pub at: Option<DateTime<Utc>>,
}

/// The instant of `?at=`, checked: not after now, not before last month.
pub(super) fn as_of(q: AsOf) -> Result<DateTime<Utc>, ApiError> {
    let now = crate::wire::now();
    let Some(at) = q.at else { return Ok(now) };
    if at > now {
        return Err(ApiError::invalid(format!(
            "at: {at} is in the future (now is {now})"
        )));
    }
    if at < invoice::previous(month_of(now)).start {
        return Err(ApiError::invalid(format!(
            "at: {at} is before last month; cost reports are of the open months"
        )));
    }
    Ok(at)
}

/// A cost report's instant, once the caller may read the customer's and
/// the customer exists.
async fn report_at(
    app: &ApiState,
    who: &Principal,
    id: &str,
    q: Result<Query<AsOf>, axum::extract::rejection::QueryRejection>,
) -> Result<DateTime<Utc>, ApiError> {
    who.read_customer(id, &format!("customer {id}"))?;
    let at = as_of(query(q)?)?;
    app.state.customer(id).await?;
    Ok(at)
}

/// The open month: month-to-date cost and forecast, cost by meter, app and
/// day, the plan and the spending cap (admin or the customer), as of now or
/// `?at=`.
#[utoipa::path(get, path = "/v1/customers/{id}/costs", params(("id" = String, Path), AsOf),
    responses((status = 200, body = crate::costs::CostReport), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn customer_costs(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<AsOf>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::costs::CostReport> {
    let at = report_at(&app, &who, &id, q).await?;
    let (state, usage) = (app.state.as_ref(), app.usage.as_ref());
    let r = crate::costs::report(state, usage, &app.meters, &app.quota, &id, at).await?;
    Ok(Json(r))
}

/// This month's usage priced on every published plan, with the saving
/// against the customer's forecast (admin or the customer), as of now or
/// `?at=`.
#[utoipa::path(get, path = "/v1/customers/{id}/plan-advisor", params(("id" = String, Path), AsOf),
    responses((status = 200, body = crate::costs::Advisor), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn plan_advisor(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<AsOf>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::costs::Advisor> {
    let at = report_at(&app, &who, &id, q).await?;
    let (state, usage) = (app.state.as_ref(), app.usage.as_ref());
    let r = crate::costs::advisor(state, usage, &app.meters, &app.quota, &id, at).await?;
    Ok(Json(r))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    /// `admin`, `control-plane`, `collector` or `customer`.
    pub role: String,
    /// The customer a customer credential is scoped to.
    pub customer_id: Option<String>,
}

/// Who the credential is (the dashboard learns its customer from this).
#[utoipa::path(get, path = "/v1/me", responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
pub(super) async fn whoami(axum::Extension(who): axum::Extension<Principal>) -> Json<Me> {
    let role = who.role().as_str().into();
    let customer_id = match who {
        Principal::Customer { customer_id } => Some(customer_id),
        _ => None,
    };
    Json(Me { role, customer_id })
}
