//! The billing HTTP API: versioned `/v1` JSON for staff tools (catalog,
//! customers, apps, subscriptions, seats, plan switches with preview,
//! invoices, the audit log) and Stripe's webhooks. The OpenAPI document is
//! generated from these handlers ([`ApiDoc`]) and checked in as
//! `schemas/openapi.json`.
//!
//! Errors are `{"code": "...", "message": "...", "details": [...]?}` with a
//! 4xx status for anything the caller can fix: `malformed_json` (400),
//! `invalid_body` / `invalid` (422, with per-field `details` where there are
//! several problems), `unauthorized` (401), `not_found` (404), `conflict` and
//! `period_finalized` (409), `body_too_large` (413),
//! `unsupported_media_type` (415). A rejected request changes nothing.
//!
//! Authentication and roles: `/v1` (except the webhook) takes
//! `Authorization: Bearer <key or customer session>` (`auth.rs`). Staff
//! endpoints need an admin; a customer key or session reads only its own
//! customer (another customer's ids answer 404, as missing ones do); the
//! control plane mints sessions. A request with a malformed body can get
//! its 4xx before the role check; it changes nothing either way. The audit
//! log records the actor (`key:<id>`, or `admin:<first 8 hex of the hash>`
//! for bootstrap keys) followed by `/<name>` when an `X-Tally-Actor` header
//! names the person. The webhook is authenticated by its Stripe signature.

use crate::auth::{self, ApiKey, Authenticator, Principal, Role};
use crate::invoice::{self, month_of, NewInvoice, PlannedSwitch};
use crate::metrics::Metrics;
use crate::quota_service::{QuotaService, Snapshot};
use crate::state::{
    App, AuditEntry, Customer, Invoice, PublishedPlan, StateError, StateStore, Subscription,
};
use aggregator::UsageStore;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use billing_domain::catalog::{latest_active, CatalogError, PlanVersion};
use billing_domain::quota::{Ask, Decision};
use billing_domain::rating::{Period, Rated};
use billing_domain::webhook;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{OpenApi, ToSchema};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

pub struct ApiState {
    pub state: Arc<dyn StateStore>,
    pub usage: Arc<dyn UsageStore>,
    pub meters: Arc<MeterCatalog>,
    pub metrics: Metrics,
    /// Keys, bootstrap admin keys and customer sessions.
    pub auth: Arc<Authenticator>,
    pub webhook_secret: Option<String>,
    pub min_charge: Decimal,
    pub quota: Arc<QuotaService>,
}

impl ApiState {
    /// Reloads a customer's quota entry after a change (best effort: the
    /// periodic refresh catches up if this fails).
    async fn quota_changed(&self, customer: &str) {
        if let Err(e) = self.quota.reload(customer, crate::wire::now()).await {
            tracing::warn!(customer, error = %format!("{e:#}"), "quota reload failed; the next refresh will retry");
        }
    }
}

/// The error envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: String,
    /// For humans.
    pub message: String,
    /// One entry per problem, when a body had several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<CatalogError>>,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                code: code.into(),
                message: message.into(),
                details: None,
            },
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

// The one place where a failure becomes a status: a state error by its
// kind, a denied access decision by whether the caller may learn the thing
// exists, anything else a logged 500 that tells the caller nothing more.

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        let status = match &e {
            StateError::NotFound(_) => StatusCode::NOT_FOUND,
            StateError::Conflict(_) => StatusCode::CONFLICT,
            StateError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StateError::Db(_) => return Self::internal(&e),
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<auth::Denied> for ApiError {
    fn from(d: auth::Denied) -> Self {
        match d {
            auth::Denied::Forbidden(m) => Self::new(StatusCode::FORBIDDEN, "forbidden", m),
            auth::Denied::Hidden(m) => Self::new(StatusCode::NOT_FOUND, "not_found", m),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast_ref::<StateError>() {
            Some(StateError::Db(_)) | None => Self::internal(&format!("{e:#}")),
            Some(_) => e.downcast::<StateError>().expect("just checked").into(),
        }
    }
}

impl ApiError {
    /// A 500: the cause goes to the log, not to the caller.
    fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A JSON body whose rejections use the error envelope.
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                e.body_text(),
            )),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                e.body_text(),
            )),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            )),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
            )),
            Err(e) => Err(ApiError::new(e.status(), "bad_request", e.body_text())),
        }
    }
}

fn valid_id(field: &str, v: &str) -> Result<(), ApiError> {
    if schemas::ids::is_id(v) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field}: 1 to 128 characters of A-Z a-z 0-9 _ - . : @"
        )))
    }
}

fn valid_name(field: &str, v: &str) -> Result<(), ApiError> {
    if v.trim().is_empty() || v.chars().count() > 200 || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field}: 1 to 200 printable characters"
        )));
    }
    Ok(())
}

/// Resolves the bearer credential into a [`Principal`] (401 without one).
async fn authenticate(State(app): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(bearer) = bearer else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer credential",
        )
        .into_response();
    };
    let Some(mut who) = app.auth.principal(bearer, crate::wire::now().timestamp()) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown, revoked or expired credential",
        )
        .into_response();
    };
    if let Principal::Admin { actor } = &mut who {
        if let Some(name) = req
            .headers()
            .get("x-tally-actor")
            .and_then(|v| v.to_str().ok())
            .filter(|n| !n.is_empty() && n.len() <= 64)
        {
            actor.push('/');
            actor.push_str(name);
        }
    }
    req.extensions_mut().insert(who);
    next.run(req).await
}

/// The error code of a status, for errors that did not come with one.
fn status_code_name(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Every error answer carries the `{code, message}` envelope: an error
/// that axum produced outside the handlers (a path or query extractor's
/// rejection such as invalid UTF-8 in a path segment, a failed request
/// layer) has a plain-text body, which becomes the message.
async fn envelope(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else if status.is_server_error() {
        "internal error".to_owned()
    } else {
        text
    };
    let mut out = ApiError::new(status, status_code_name(status), message).into_response();
    // Keep headers such as `allow` on a 405.
    for (k, v) in parts.headers.iter() {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

pub fn router(app: Arc<ApiState>) -> Router {
    let admin = Router::new()
        .route("/v1/plans", get(list_plans).post(publish_plan))
        .route(
            "/v1/plans/{plan}/versions/{version}/retire",
            post(retire_plan),
        )
        .route("/v1/customers", get(list_customers).post(create_customer))
        .route("/v1/customers/{id}", get(get_customer))
        .route("/v1/customers/{id}/apps", get(list_apps).post(create_app))
        .route(
            "/v1/customers/{id}/subscription",
            get(get_subscription).post(subscribe),
        )
        .route("/v1/customers/{id}/seats", put(set_seats))
        .route(
            "/v1/customers/{id}/plan-switch/preview",
            post(preview_switch),
        )
        .route("/v1/customers/{id}/plan-switch", post(switch_plan))
        .route(
            "/v1/customers/{id}/scheduled-changes",
            get(list_scheduled_changes),
        )
        .route(
            "/v1/customers/{id}/scheduled-changes/{change}",
            delete(withdraw_scheduled_change),
        )
        .route("/v1/customers/{id}/invoices", get(list_invoices))
        .route("/v1/customers/{id}/invoices/draft", get(draft_invoice))
        .route("/v1/invoices/{id}", get(get_invoice))
        .route("/v1/invoices/{id}/rerate", get(rerate_invoice))
        .route("/v1/audit", get(audit_log))
        .route("/v1/quota/check", post(quota_check))
        .route("/v1/quota/snapshot", get(quota_snapshot))
        .route("/v1/customers/{id}/spending-cap", put(set_spending_cap))
        .route("/v1/customers/{id}/suspension", put(set_suspension))
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{id}/revoke", post(revoke_key))
        .route("/v1/customers/{id}/sessions", post(create_session))
        .route("/v1/customers/{id}/costs", get(customer_costs))
        .route("/v1/customers/{id}/plan-advisor", get(plan_advisor))
        .route("/v1/me", get(whoami))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            authenticate,
        ));
    Router::new()
        .merge(admin)
        .route("/v1/stripe/webhook", post(stripe_webhook))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .merge(crate::dashboard::router())
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(axum::middleware::from_fn(envelope))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<ApiState>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

// ---------------------------------------------------------------- catalog

/// Every published plan version.
#[utoipa::path(get, path = "/v1/plans", responses((status = 200, body = Vec<PublishedPlan>)))]
async fn list_plans(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
) -> ApiResult<Vec<PublishedPlan>> {
    who.read_catalog()?;
    Ok(Json(app.state.list_plans().await?))
}

/// Publishes a plan version (immutable once published).
#[utoipa::path(post, path = "/v1/plans", request_body = PlanVersion,
    responses((status = 201, body = PlanVersion), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn publish_plan(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Body(plan): Body<PlanVersion>,
) -> Result<(StatusCode, Json<PlanVersion>), ApiError> {
    let actor = who.admin()?;
    if let Err(errors) = plan.validate(&app.meters) {
        let mut e = ApiError::invalid(format!(
            "plan {} version {} has {} problem(s)",
            plan.plan,
            plan.version,
            errors.len()
        ));
        e.body.details = Some(errors);
        return Err(e);
    }
    app.state.publish_plan(&plan, actor).await?;
    Ok((StatusCode::CREATED, Json(plan)))
}

/// Retires a plan version: no new subscriptions; current ones keep it.
#[utoipa::path(post, path = "/v1/plans/{plan}/versions/{version}/retire",
    params(("plan" = String, Path), ("version" = u32, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn retire_plan(
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

// -------------------------------------------------------------- customers

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
async fn list_customers(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    q: Result<Query<ListCustomers>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<Customer>> {
    who.admin()?;
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    if let Some(ext) = q.external_id {
        return Ok(Json(match app.state.customer_by_external_id(&ext).await {
            Ok(c) => vec![c],
            Err(StateError::NotFound(_)) => vec![],
            Err(e) => return Err(e.into()),
        }));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "limit: 1 to 1000",
        ));
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
async fn create_customer(
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
async fn get_customer(
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
async fn list_apps(
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
async fn create_app(
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

// ---------------------------------------------------------- subscriptions

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    pub plan: String,
    /// Default: the latest version that is not retired.
    pub version: Option<u32>,
    /// Default: now.
    pub starts_at: Option<DateTime<Utc>>,
}

/// The plan version a request names (default: the latest that is not
/// retired), refused when unknown (404) or retired (422); one catalog read.
async fn resolve_plan(app: &ApiState, plan: &str, version: Option<u32>) -> Result<u32, ApiError> {
    let listed = app.state.list_plans().await?;
    let mine = listed.iter().filter(|p| p.plan.plan == plan);
    let not_found = |what: String| ApiError::new(StatusCode::NOT_FOUND, "not_found", what);
    match version {
        None => latest_active(&listed)
            .get(plan)
            .map(|p| p.version)
            .ok_or_else(|| not_found(format!("plan {plan} has no active version"))),
        Some(v) => match mine.into_iter().find(|p| p.plan.version == v) {
            None => Err(not_found(format!("plan {plan} version {v} not found"))),
            Some(p) if p.retired => Err(ApiError::invalid(format!(
                "plan {plan} version {v} is retired"
            ))),
            Some(_) => Ok(v),
        },
    }
}

/// Refuses a change effective inside a period that is already invoiced.
async fn require_open(app: &ApiState, customer: &str, at: DateTime<Utc>) -> Result<(), ApiError> {
    if let Some(last) = app.state.invoices_of(customer).await?.last() {
        if at < last.period.end {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "period_finalized",
                format!(
                    "{at} falls in a period already invoiced ({}); changes take effect from {} on",
                    last.number, last.period.end
                ),
            ));
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/customers/{id}/subscription", params(("id" = String, Path)), request_body = Subscribe,
    responses((status = 201, body = PlanSwitchResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn subscribe(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<Subscribe>,
) -> Result<(StatusCode, Json<PlanSwitchResult>), ApiError> {
    let actor = who.admin()?;
    let version = resolve_plan(&app, &req.plan, req.version).await?;
    let at = req.starts_at.unwrap_or_else(crate::wire::now);
    require_open(&app, &id, at).await?;
    app.state
        .subscribe(&id, &req.plan, version, at, actor)
        .await?;
    app.quota_changed(&id).await;
    Ok((
        StatusCode::CREATED,
        Json(PlanSwitchResult {
            plan: req.plan,
            version,
            effective_at: at,
            withdrawn: vec![],
        }),
    ))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionView {
    /// The plan in effect now, if any: its real start, and its end (null
    /// while it runs until changed; the instant of a scheduled switch).
    pub current: Option<Subscription>,
    /// Plans that start later (a switch at the period end), in order; each
    /// can be withdrawn at `DELETE /v1/customers/{id}/scheduled-changes/{change}`.
    pub scheduled: Vec<Subscription>,
}

/// No query parameters: any one is refused (400 `bad_query`, naming it).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// A query string refused with the error envelope (400 `bad_query`).
fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))
}

/// The plan history from now on: the row in effect and those after it.
fn from_now(history: Vec<Subscription>, now: DateTime<Utc>) -> SubscriptionView {
    let mut current = None;
    let mut scheduled = Vec::new();
    for s in history {
        if s.start > now {
            scheduled.push(s);
        } else if s.end.is_none_or(|e| e > now) {
            current = Some(s);
        }
    }
    SubscriptionView { current, scheduled }
}

/// The plan in effect now and any scheduled switch, as stored.
#[utoipa::path(get, path = "/v1/customers/{id}/subscription", params(("id" = String, Path), NoParams),
    responses((status = 200, body = SubscriptionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_subscription(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<NoParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<SubscriptionView> {
    who.read_customer(&id, &format!("customer {id}"))?;
    query(q)?;
    let history = app.state.subscriptions(&id).await?;
    Ok(Json(from_now(history, crate::wire::now())))
}

/// Switches that start later (at the period end), in order.
#[utoipa::path(get, path = "/v1/customers/{id}/scheduled-changes", params(("id" = String, Path), NoParams),
    responses((status = 200, body = Vec<Subscription>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_scheduled_changes(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<NoParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<Subscription>> {
    who.read_customer(&id, &format!("customer {id}"))?;
    query(q)?;
    let history = app.state.subscriptions(&id).await?;
    // A first subscription that starts later is not a change of plan.
    let first = history.first().map(|s| s.id);
    let view = from_now(history, crate::wire::now());
    Ok(Json(
        view.scheduled
            .into_iter()
            .filter(|s| Some(s.id) != first)
            .collect(),
    ))
}

/// Withdraws a scheduled switch: the plan before it runs on. Staff only,
/// audited (`subscription.withdraw`); withdrawing it again answers the same
/// change (safe to retry); a change already in effect is a 409.
#[utoipa::path(delete, path = "/v1/customers/{id}/scheduled-changes/{change}",
    params(("id" = String, Path), ("change" = i64, Path, description = "the `id` of a scheduled change")),
    responses((status = 200, body = Subscription, description = "the withdrawn change"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn withdraw_scheduled_change(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path((id, change)): Path<(String, String)>,
) -> ApiResult<Subscription> {
    let actor = who.admin()?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("scheduled change {change} of customer {id} not found"),
        )
    };
    let change_id: i64 = change.parse().map_err(|_| not_found())?;
    let w = app
        .state
        .withdraw_change(&id, change_id, crate::wire::now(), actor)
        .await?;
    Ok(Json(w))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSeats {
    pub seats: u32,
    /// Default: now. At or after the customer's first subscription start,
    /// outside every invoiced period, at most [`SEATS_MAX_AHEAD_DAYS`] days
    /// ahead, at most microsecond precision.
    #[serde(default, deserialize_with = "crate::wire::opt_instant")]
    pub at: Option<DateTime<Utc>>,
}

/// How far ahead a seat change may be dated.
pub const SEATS_MAX_AHEAD_DAYS: i64 = 366;

/// When a seat change may take effect: not before the customer's first
/// subscription starts (seats without a plan bill nothing and would carry
/// into every later period), not inside an invoiced period (409,
/// [`require_open`]), and not more than [`SEATS_MAX_AHEAD_DAYS`] days after
/// now (a typo like 9999 is refused rather than kept for ever).
async fn seats_at(
    app: &ApiState,
    customer: &str,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let horizon = now + chrono::Duration::days(SEATS_MAX_AHEAD_DAYS);
    if at > horizon {
        return Err(ApiError::invalid(format!(
            "at: {} is more than {SEATS_MAX_AHEAD_DAYS} days ahead (latest {})",
            at.to_rfc3339(),
            horizon.to_rfc3339()
        )));
    }
    let history = Period {
        start: DateTime::UNIX_EPOCH,
        end: horizon.max(at) + chrono::Duration::seconds(1),
    };
    let first = app.state.plan_segments(customer, history).await?;
    match first.first() {
        None => Err(ApiError::invalid(
            "at: the customer has no subscription; subscribe it before setting seats",
        )),
        Some(s) if at < s.start => Err(ApiError::invalid(format!(
            "at: {} is before the customer's subscription starts ({})",
            at.to_rfc3339(),
            s.start.to_rfc3339()
        ))),
        Some(_) => require_open(app, customer, at).await,
    }
}

#[utoipa::path(put, path = "/v1/customers/{id}/seats", params(("id" = String, Path)), request_body = SetSeats,
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn set_seats(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<SetSeats>,
) -> Result<StatusCode, ApiError> {
    let actor = who.admin()?;
    if req.seats > 100_000 {
        return Err(ApiError::invalid("seats: 0 to 100000"));
    }
    app.state.customer(&id).await?;
    let now = crate::wire::now();
    let at = req.at.unwrap_or(now);
    seats_at(&app, &id, at, now).await?;
    app.state.set_seats(&id, req.seats, at, actor).await?;
    app.quota_changed(&id).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Effective {
    Now,
    PeriodEnd,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    pub plan: String,
    /// Default: the latest version that is not retired.
    pub version: Option<u32>,
    /// `now` (default) or `period_end`.
    pub effective: Option<Effective>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SwitchPreview {
    pub effective_at: DateTime<Utc>,
    pub period: Period,
    /// The open period as things stand.
    pub current: Rated,
    /// The open period with the switch applied.
    pub with_switch: Rated,
    /// `with_switch.total − current.total` for usage so far.
    pub difference: Decimal,
    /// Scheduled changes the switch would replace (withdraw).
    pub replaces: Vec<Subscription>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PlanSwitchResult {
    pub plan: String,
    pub version: u32,
    /// When the plan takes effect (for a switch to the plan already in
    /// effect, which changes nothing: when it took effect).
    pub effective_at: DateTime<Utc>,
    /// Scheduled changes this switch replaced (withdrawn, audited).
    #[serde(default)]
    pub withdrawn: Vec<Subscription>,
}

async fn planned(app: &ApiState, req: &SwitchRequest) -> Result<PlannedSwitch, ApiError> {
    let version = resolve_plan(app, &req.plan, req.version).await?;
    // At the stored precision (microseconds), so the instant answered is
    // the instant stored.
    let now = crate::wire::now();
    let at = match req.effective.unwrap_or(Effective::Now) {
        Effective::Now => now,
        Effective::PeriodEnd => month_of(now).end,
    };
    Ok(PlannedSwitch {
        plan: req.plan.clone(),
        version,
        at,
    })
}

/// The open period's lines as they are and with the switch, before confirming.
#[utoipa::path(post, path = "/v1/customers/{id}/plan-switch/preview", params(("id" = String, Path)), request_body = SwitchRequest,
    responses((status = 200, body = SwitchPreview), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn preview_switch(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<SwitchRequest>,
) -> ApiResult<SwitchPreview> {
    who.read_customer(&id, &format!("customer {id}"))?;
    app.state.customer(&id).await?;
    let sw = planned(&app, &req).await?;
    let period = month_of(crate::wire::now());
    let (s, u, m) = (app.state.as_ref(), app.usage.as_ref(), app.meters.as_ref());
    let current = invoice::rate_period(s, u, m, &id, period, None).await?;
    let with_switch = invoice::rate_period(s, u, m, &id, period, Some(&sw)).await?;
    let replaces = app
        .state
        .subscriptions(&id)
        .await?
        .into_iter()
        .skip(1)
        .filter(|r| r.start >= sw.at)
        .collect();
    Ok(Json(SwitchPreview {
        effective_at: sw.at,
        period,
        difference: with_switch.money(with_switch.total - current.total),
        current,
        with_switch,
        replaces,
    }))
}

/// Switches the plan now or at the end of the period. A switch replaces
/// the changes scheduled at or after its instant (`withdrawn`); a switch to
/// the plan in effect then changes nothing but withdraws what was scheduled
/// after it, so repeating a switch is harmless.
#[utoipa::path(post, path = "/v1/customers/{id}/plan-switch", params(("id" = String, Path)), request_body = SwitchRequest,
    responses((status = 200, body = PlanSwitchResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn switch_plan(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<SwitchRequest>,
) -> ApiResult<PlanSwitchResult> {
    let actor = who.admin()?;
    app.state.customer(&id).await?;
    let sw = planned(&app, &req).await?;
    require_open(&app, &id, sw.at).await?;
    let done = app
        .state
        .switch_plan(&id, &sw.plan, sw.version, sw.at, actor)
        .await?;
    app.quota_changed(&id).await;
    Ok(Json(PlanSwitchResult {
        plan: sw.plan,
        version: sw.version,
        effective_at: done.effective_at,
        withdrawn: done.withdrawn,
    }))
}

// --------------------------------------------------------------- invoices

#[utoipa::path(get, path = "/v1/customers/{id}/invoices", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Invoice>), (status = 404, body = ErrorBody)))]
async fn list_invoices(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Vec<Invoice>> {
    who.read_customer(&id, &format!("customer {id}"))?;
    app.state.customer(&id).await?;
    Ok(Json(app.state.invoices_of(&id).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DraftQuery {
    /// The open period to draft, as `YYYY-MM` (a UTC calendar month): the
    /// current month, or the previous one until its invoice is finalized
    /// (during the grace window). Default: the current month.
    #[param(example = "2026-11")]
    pub period: Option<String>,
}

/// An open period's invoice as it would be if finalized now: the current
/// month's by default, or `?period=YYYY-MM` for the previous month until
/// it is finalized. An invoiced period is a 409 (`period_finalized`, naming
/// the invoice); any other period a 422; an unknown parameter or a period
/// not written `YYYY-MM` a 400 (`bad_query`).
#[utoipa::path(get, path = "/v1/customers/{id}/invoices/draft", params(("id" = String, Path), DraftQuery),
    responses((status = 200, body = NewInvoice), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn draft_invoice(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<DraftQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<NewInvoice> {
    who.read_customer(&id, &format!("customer {id}"))?;
    let q = query(q)?;
    app.state.customer(&id).await?;
    let current = month_of(crate::wire::now());
    let period = match q.period.as_deref() {
        None => current,
        Some(p) => invoice::parse_month(p).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("period: expected YYYY-MM (a UTC calendar month), got {p:?}"),
            )
        })?,
    };
    if let Some(inv) = app
        .state
        .invoices_of(&id)
        .await?
        .into_iter()
        .find(|i| i.period == period)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "period_finalized",
            format!(
                "period {} is invoiced ({}): GET /v1/invoices/{}",
                invoice::month_label(period),
                inv.number,
                inv.id
            ),
        ));
    }
    let prev = invoice::previous(current);
    if period != current && period != prev {
        return Err(ApiError::invalid(format!(
            "period {} is not open: drafts are of {} (until it is finalized) and {}",
            invoice::month_label(period),
            invoice::month_label(prev),
            invoice::month_label(current)
        )));
    }
    let d = invoice::draft(
        app.state.as_ref(),
        app.usage.as_ref(),
        &app.meters,
        &id,
        period,
        app.min_charge,
    )
    .await?;
    app.metrics.invoices_drafted.inc();
    Ok(Json(d))
}

#[utoipa::path(get, path = "/v1/invoices/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Invoice), (status = 404, body = ErrorBody)))]
async fn get_invoice(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Invoice> {
    let inv = app.state.invoice(&id).await?;
    who.read_customer(&inv.customer_id, &format!("invoice {id}"))?;
    Ok(Json(inv))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RerateReport {
    pub invoice: String,
    pub period: Period,
    /// The period rated again from raw events.
    pub rerated: Rated,
    /// True when every line (evidence and amount) and the subtotal equal
    /// the invoice's.
    pub reproduces: bool,
    /// Lines that differ (late usage since finalization shows up here and
    /// on the next invoice as adjustments).
    pub differences: Vec<billing_domain::adjust::AdjustmentLine>,
}

/// Re-rates a finalized invoice from raw events and compares.
#[utoipa::path(get, path = "/v1/invoices/{id}/rerate", params(("id" = String, Path)),
    responses((status = 200, body = RerateReport), (status = 404, body = ErrorBody)))]
async fn rerate_invoice(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<RerateReport> {
    who.admin()?;
    let inv = app.state.invoice(&id).await?;
    let rerated =
        invoice::rerate(app.state.as_ref(), app.usage.as_ref(), &app.meters, &inv).await?;
    let billed = invoice::billed(&inv);
    let original = billing_domain::adjust::OriginalInvoice {
        number: inv.number.clone(),
        period: inv.period,
    };
    let differences = billing_domain::adjust::adjustments(&billed, &rerated, &original);
    Ok(Json(RerateReport {
        invoice: inv.number,
        period: inv.period,
        reproduces: rerated == billed,
        rerated,
        differences,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// `customer:<id>` or `plan:<plan>`.
    pub subject: String,
}

#[utoipa::path(get, path = "/v1/audit", params(("subject" = String, Query)),
    responses((status = 200, body = Vec<AuditEntry>), (status = 400, body = ErrorBody)))]
async fn audit_log(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<AuditEntry>> {
    who.admin()?;
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    Ok(Json(app.state.audit_log(&q.subject).await?))
}

// ------------------------------------------------------------------ quota

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaCheck {
    pub customer_id: String,
    pub ask: Ask,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QuotaAnswer {
    pub customer_id: String,
    pub plan: String,
    pub plan_version: u32,
    /// Usage and running resources are as of this hour boundary.
    pub as_of: DateTime<Utc>,
    #[serde(flatten)]
    pub decision: Decision,
}

/// May the customer start instances or grow a volume? Answered from memory.
#[utoipa::path(post, path = "/v1/quota/check", request_body = QuotaCheck,
    responses((status = 200, body = QuotaAnswer), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn quota_check(
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
    let Some(entry) = app.quota.entry(&req.customer_id) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("customer {} has no plan now", req.customer_id),
        ));
    };
    let decision = entry.decide(&req.ask)?;
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
        plan: entry.plan.plan.clone(),
        plan_version: entry.plan.version,
        as_of: entry.as_of,
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
async fn quota_snapshot(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    q: Result<Query<SnapshotQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Snapshot> {
    who.admin_or_control_plane()?;
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    Ok(Json(app.quota.snapshot(q.since.unwrap_or(0))))
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
async fn set_spending_cap(
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
async fn set_suspension(
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

// ------------------------------------------------------- keys, sessions

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub role: Role,
    /// Required for (and only for) `customer` keys.
    pub customer_id: Option<String>,
    /// What the key is for (shown in listings).
    pub label: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub record: ApiKey,
    /// The key itself; shown this once, never stored.
    pub key: String,
}

/// Creates an API key (audited). The key is in the answer only.
#[utoipa::path(post, path = "/v1/keys", request_body = CreateKey,
    responses((status = 201, body = CreatedKey), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_key(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Body(req): Body<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let actor = who.admin()?;
    valid_name("label", &req.label)?;
    match (req.role, &req.customer_id) {
        (Role::Customer, None) => {
            return Err(ApiError::invalid(
                "customer_id: required for a customer key",
            ))
        }
        (Role::Customer, Some(c)) => valid_id("customer_id", c)?,
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "customer_id: only customer keys have one",
            ))
        }
        (_, None) => {}
    }
    let (record, key) = auth::new_key(req.role, req.customer_id, req.label);
    app.state.create_api_key(&record, actor).await?;
    app.auth.insert(record.clone());
    Ok((StatusCode::CREATED, Json(CreatedKey { record, key })))
}

/// Every key (without secrets), newest first.
#[utoipa::path(get, path = "/v1/keys", responses((status = 200, body = Vec<ApiKey>), (status = 403, body = ErrorBody)))]
async fn list_keys(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
) -> ApiResult<Vec<ApiKey>> {
    who.admin()?;
    Ok(Json(app.state.api_keys().await?))
}

/// Revokes a key at once in this process (other replicas within 5 s).
#[utoipa::path(post, path = "/v1/keys/{id}/revoke", params(("id" = String, Path)),
    responses((status = 200, body = ApiKey), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn revoke_key(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<ApiKey> {
    let actor = who.admin()?;
    let key = app.state.revoke_api_key(&id, actor).await?;
    app.auth.remove(&id);
    Ok(Json(key))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// Lifetime in seconds, 60 to 86400; default 3600.
    pub ttl_secs: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub customer_id: String,
    /// Bearer token for the customer's own endpoints and dashboard.
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// Mints a short-lived customer session (admin or control plane).
#[utoipa::path(post, path = "/v1/customers/{id}/sessions", params(("id" = String, Path)), request_body = CreateSession,
    responses((status = 201, body = Session), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_session(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<CreateSession>,
) -> Result<(StatusCode, Json<Session>), ApiError> {
    who.admin_or_control_plane()?;
    let ttl = req.ttl_secs.unwrap_or(3600);
    if !(60..=auth::MAX_SESSION_SECS).contains(&ttl) {
        return Err(ApiError::invalid("ttl_secs: 60 to 86400"));
    }
    app.state.customer(&id).await?;
    let expires_at = crate::wire::now() + chrono::Duration::seconds(ttl);
    let token = auth::mint_session(&app.auth.session_secret, &id, expires_at.timestamp());
    Ok((
        StatusCode::CREATED,
        Json(Session {
            customer_id: id,
            token,
            expires_at,
        }),
    ))
}

// ---------------------------------------------------------------- webhook

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookAck {
    pub received: bool,
    /// False when the event type or invoice is not one Tally tracks.
    pub applied: bool,
}

/// Stripe's webhook: `invoice.paid`, `invoice.payment_failed`,
/// `invoice.voided` update the invoice's payment status.
#[utoipa::path(post, path = "/v1/stripe/webhook", request_body = String,
    params(("Stripe-Signature" = String, Header)),
    responses((status = 200, body = WebhookAck), (status = 400, body = ErrorBody)))]
async fn stripe_webhook(
    State(app): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<WebhookAck>, ApiError> {
    let Some(secret) = &app.webhook_secret else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "webhooks are not configured",
        ));
    };
    let sig = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    if let Err(e) = webhook::verify(
        secret,
        &body,
        sig,
        crate::wire::now().timestamp(),
        webhook::DEFAULT_TOLERANCE_SECS,
    ) {
        app.metrics
            .webhooks
            .with_label_values(&["unknown", "bad_signature"])
            .inc();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_signature",
            e.to_string(),
        ));
    }
    #[derive(Deserialize)]
    struct Event {
        #[serde(rename = "type")]
        kind: String,
        data: EventData,
    }
    #[derive(Deserialize)]
    struct EventData {
        object: EventObject,
    }
    #[derive(Deserialize)]
    struct EventObject {
        id: String,
    }
    let ev: Event = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("event: {e}"),
        )
    })?;
    let label = webhook::payment_status(&ev.kind).map_or("other", |_| ev.kind.as_str());
    let applied = match webhook::payment_status(&ev.kind) {
        Some(status) => {
            app.state
                .set_payment_status(&ev.data.object.id, status)
                .await?
        }
        None => false,
    };
    app.metrics
        .webhooks
        .with_label_values(&[label, if applied { "applied" } else { "ignored" }])
        .inc();
    Ok(Json(WebhookAck {
        received: true,
        applied,
    }))
}

// ---------------------------------------------------------------- costs

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
fn as_of(q: AsOf) -> Result<DateTime<Utc>, ApiError> {
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

/// The open month: month-to-date cost and forecast, cost by meter, app and
/// day, the plan and the spending cap (admin or the customer), as of now or
/// `?at=`.
#[utoipa::path(get, path = "/v1/customers/{id}/costs", params(("id" = String, Path), AsOf),
    responses((status = 200, body = crate::costs::CostReport), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn customer_costs(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<AsOf>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::costs::CostReport> {
    who.read_customer(&id, &format!("customer {id}"))?;
    let at = as_of(query(q)?)?;
    app.state.customer(&id).await?;
    let r = crate::costs::report(
        app.state.as_ref(),
        app.usage.as_ref(),
        &app.meters,
        &app.quota,
        &id,
        at,
    )
    .await?;
    Ok(Json(r))
}

/// This month's usage priced on every published plan, with the saving
/// against the customer's forecast (admin or the customer), as of now or
/// `?at=`.
#[utoipa::path(get, path = "/v1/customers/{id}/plan-advisor", params(("id" = String, Path), AsOf),
    responses((status = 200, body = crate::costs::Advisor), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn plan_advisor(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<AsOf>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::costs::Advisor> {
    who.read_customer(&id, &format!("customer {id}"))?;
    let at = as_of(query(q)?)?;
    app.state.customer(&id).await?;
    let r = crate::costs::advisor(
        app.state.as_ref(),
        app.usage.as_ref(),
        &app.meters,
        &app.quota,
        &id,
        at,
    )
    .await?;
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
async fn whoami(axum::Extension(who): axum::Extension<Principal>) -> Json<Me> {
    let role = who.role().as_str().into();
    let customer_id = match who {
        Principal::Customer { customer_id } => Some(customer_id),
        _ => None,
    };
    Json(Me { role, customer_id })
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally billing API",
        version = "1",
        description = "Catalog, customers, subscriptions, plan switches, invoices and Stripe webhooks. Errors: {code, message, details?}."
    ),
    paths(
        list_plans,
        publish_plan,
        retire_plan,
        list_customers,
        create_customer,
        get_customer,
        list_apps,
        create_app,
        get_subscription,
        subscribe,
        set_seats,
        preview_switch,
        switch_plan,
        list_scheduled_changes,
        withdraw_scheduled_change,
        list_invoices,
        draft_invoice,
        get_invoice,
        rerate_invoice,
        audit_log,
        create_key,
        list_keys,
        revoke_key,
        create_session,
        quota_check,
        quota_snapshot,
        set_spending_cap,
        set_suspension,
        customer_costs,
        plan_advisor,
        whoami,
        stripe_webhook
    ),
    components(schemas(ErrorBody, CatalogError, Effective, Role))
)]
pub struct ApiDoc;

/// The OpenAPI document as checked into `schemas/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().expect("serializable") + "\n"
}
