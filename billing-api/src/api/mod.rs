//! The billing HTTP API: versioned `/v1` JSON for staff tools (catalog,
//! customers, apps, subscriptions, seats, plan switches with preview,
//! invoices, the audit log) and Stripe's webhooks. The OpenAPI document is
//! generated from these handlers ([`ApiDoc`]) and checked in as
//! `schemas/openapi.json`.
//!
//! Layout: this file holds the shared state, authentication, the router
//! and the OpenAPI document; one module per resource holds its handlers and
//! request/response types (`plans`, `customers` with apps, `subscriptions`
//! with seats and plan switches, `invoices` with drafts, re-rating and the
//! audit log, `quota` with caps and suspension, `keys` with sessions and
//! `/v1/me`, `costs`, `stripe_webhook`); `error` is the error envelope and
//! the only place where a failure becomes a status code. The imports below
//! are the resource modules' common vocabulary (`use super::*`).
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
use crate::quota_service::{QuotaService, Snapshot, StateProgress};
use crate::state::{
    App, AuditEntry, Customer, DynStateStore, Invoice, PublishedPlan, StateError, StateStore,
    Subscription,
};
use aggregator::DynUsageStore;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use billing_domain::catalog::{
    derive_contract, latest_active, CatalogError, PlanVersion, MAX_TRIAL_DAYS,
};
use billing_domain::quota::{Ask, Decision};
use billing_domain::rating::{Period, Rated, UsageItem};
use billing_domain::subscription::{Cancellation, NewSubscription};
use billing_domain::webhook;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use schemas::MeterCatalog;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{OpenApi, ToSchema};

mod costs;
mod credits;
mod customers;
mod error;
mod invoices;
mod keys;
mod plans;
mod quota;
mod stripe_webhook;
mod subscriptions;

pub use self::{
    costs::*, credits::*, customers::*, error::*, invoices::*, keys::*, plans::*, quota::*,
    stripe_webhook::*, subscriptions::*,
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

pub struct ApiState {
    pub state: Arc<DynStateStore<'static>>,
    pub usage: Arc<DynUsageStore<'static>>,
    pub meters: Arc<MeterCatalog>,
    pub metrics: Metrics,
    /// Keys, bootstrap admin keys and customer sessions.
    pub auth: Arc<Authenticator>,
    pub webhook_secret: Option<serving::Secret>,
    pub min_charge: Decimal,
    /// How long after a period's end (or a cancellation) its invoice stays
    /// a draft (the finalizer's grace).
    pub grace: std::time::Duration,
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

/// Resolves the bearer credential into a [`Principal`] (401 without one).
async fn authenticate(State(app): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(bearer) = bearer else {
        return ApiError::unauthorized("missing bearer credential").into_response();
    };
    let Some(mut who) = app.auth.principal(bearer, crate::wire::now().timestamp()) else {
        return ApiError::unauthorized("unknown, revoked or expired credential").into_response();
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
            "/v1/customers/{id}/cancellation",
            post(cancel_subscription).delete(withdraw_cancellation),
        )
        .route("/v1/customers/{id}/unbilled-usage", get(unbilled_usage))
        .route(
            "/v1/customers/{id}/contracts",
            get(list_contracts).post(create_contract),
        )
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
        .route("/v1/quota/state", get(quota_state))
        .route("/v1/customers/{id}/spending-cap", put(set_spending_cap))
        .route("/v1/customers/{id}/suspension", put(set_suspension))
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{id}/revoke", post(revoke_key))
        .route("/v1/customers/{id}/sessions", post(create_session))
        .route("/v1/customers/{id}/costs", get(customer_costs))
        .route("/v1/customers/{id}/plan-advisor", get(plan_advisor))
        .route(
            "/v1/customers/{id}/credit-grants",
            get(list_grants).post(create_grant),
        )
        .route(
            "/v1/customers/{id}/credit-grants/{grant}/void",
            post(void_grant),
        )
        .route(
            "/v1/customers/{id}/credit-grants/{grant}/paid",
            post(mark_grant_paid),
        )
        .route("/v1/customers/{id}/credit-ledger", get(credit_ledger))
        .route("/v1/coupons", get(list_coupons).post(publish_coupon))
        .route(
            "/v1/customers/{id}/coupons",
            get(list_customer_coupons).post(apply_coupon),
        )
        .route(
            "/v1/customers/{id}/coupons/{applied}",
            delete(remove_coupon),
        )
        .route("/v1/tax-rates", get(list_tax_rates).post(create_tax_rate))
        .route("/v1/tax-rates/{rate}/archive", post(archive_tax_rate))
        .route(
            "/v1/customers/{id}/tax-profile",
            get(get_tax_profile).put(set_tax_profile),
        )
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
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::method_not_allowed("this endpoint does not take that method")
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
        cancel_subscription,
        withdraw_cancellation,
        unbilled_usage,
        create_contract,
        list_contracts,
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
        quota_state,
        set_spending_cap,
        set_suspension,
        customer_costs,
        plan_advisor,
        create_grant,
        list_grants,
        void_grant,
        mark_grant_paid,
        credit_ledger,
        publish_coupon,
        list_coupons,
        apply_coupon,
        list_customer_coupons,
        remove_coupon,
        create_tax_rate,
        list_tax_rates,
        archive_tax_rate,
        set_tax_profile,
        get_tax_profile,
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
