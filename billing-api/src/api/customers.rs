//! The customers endpoints.

use super::*;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ListCustomers {
    /// Return customers with ids after this one.
    pub after: Option<String>,
    /// 1..=1000, default 100.
    pub limit: Option<u32>,
    /// Find the customer with this external id.
    pub external_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/customers",
    params(("after" = Option<String>, Query), ("limit" = Option<u32>, Query), ("external_id" = Option<String>, Query)),
    responses((status = 200, body = Vec<Customer>), (status = 400, body = ErrorBody)))]
pub(super) async fn list_customers(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    q: Result<Query<ListCustomers>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<Customer>> {
    who.admin()?;
    let Query(q) = q.map_err(|e| ApiError::bad_query(e.body_text()))?;
    if let Some(ext) = q.external_id {
        return Ok(Json(match app.state.customer_by_external_id(&ext).await {
            Ok(c) => vec![c],
            Err(StateError::NotFound(_)) => vec![],
            Err(e) => return Err(e.into()),
        }));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_query("limit: 1 to 1000"));
    }
    Ok(Json(
        app.state.list_customers(q.after.as_deref(), limit).await?,
    ))
}

/// A new customer (unknown fields are refused, as in every other body).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCustomer {
    pub id: String,
    pub external_id: String,
    pub name: String,
}

#[utoipa::path(post, path = "/v1/customers", request_body = CreateCustomer,
    responses((status = 201, body = Customer), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create_customer(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Body(req): Body<CreateCustomer>,
) -> Result<(StatusCode, Json<Customer>), ApiError> {
    let c = Customer {
        id: req.id,
        external_id: req.external_id,
        name: req.name,
    };
    let actor = who.admin()?;
    valid_id("id", &c.id)?;
    valid_id("external_id", &c.external_id)?;
    valid_name("name", &c.name)?;
    app.state.create_customer(&c, actor).await?;
    Ok((StatusCode::CREATED, Json(c)))
}

#[utoipa::path(get, path = "/v1/customers/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Customer), (status = 404, body = ErrorBody)))]
pub(super) async fn get_customer(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Customer> {
    who.read_customer(&id, &format!("customer {id}"))?;
    Ok(Json(app.state.customer(&id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    /// The `app` dimension of the customer's usage events.
    pub app: String,
    pub name: String,
}

#[utoipa::path(get, path = "/v1/customers/{id}/apps", params(("id" = String, Path)),
    responses((status = 200, body = Vec<App>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_apps(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Vec<App>> {
    who.read_customer(&id, &format!("customer {id}"))?;
    app.state.customer(&id).await?;
    Ok(Json(app.state.apps(&id).await?))
}

#[utoipa::path(post, path = "/v1/customers/{id}/apps", params(("id" = String, Path)), request_body = CreateApp,
    responses((status = 201, body = App), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create_app(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<CreateApp>,
) -> Result<(StatusCode, Json<App>), ApiError> {
    let actor = who.admin()?;
    valid_id("app", &req.app)?;
    valid_name("name", &req.name)?;
    let a = App {
        customer_id: id,
        app: req.app,
        name: req.name,
    };
    app.state.create_app(&a, actor).await?;
    Ok((StatusCode::CREATED, Json(a)))
}
