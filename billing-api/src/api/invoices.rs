//! The invoices endpoints.

use super::*;

#[utoipa::path(get, path = "/v1/customers/{id}/invoices", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Invoice>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_invoices(
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
pub(super) async fn draft_invoice(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<DraftQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<NewInvoice> {
    who.read_customer(&id, &format!("customer {id}"))?;
    let q = query(q)?;
    app.state.customer(&id).await?;
    let anchor = anchor(&app, &id).await?;
    let current = customer_period(anchor, None)?;
    let period = customer_period(anchor, q.period.as_deref())?;
    if let Some(inv) = app
        .state
        .invoices_of(&id)
        .await?
        .into_iter()
        .find(|i| i.kind == invoice::InvoiceKind::Period && i.period == period)
    {
        return Err(ApiError::conflict(
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
pub(super) async fn get_invoice(
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
    /// The period rated again from raw events (its own rating: usage and
    /// fees in arrears).
    pub rerated: Rated,
    /// Fees billed in advance, derived again from the plan history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advance: Vec<billing_domain::rating::Line>,
    /// True when every line (evidence and amount), fees in advance
    /// included, and the subtotal equal the invoice's.
    pub reproduces: bool,
    /// Lines that differ (late usage since finalization shows up here and
    /// on the next invoice as adjustments).
    pub differences: Vec<billing_domain::adjust::AdjustmentLine>,
}

/// Re-rates a finalized invoice from raw events and compares.
#[utoipa::path(get, path = "/v1/invoices/{id}/rerate", params(("id" = String, Path)),
    responses((status = 200, body = RerateReport), (status = 404, body = ErrorBody)))]
pub(super) async fn rerate_invoice(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<RerateReport> {
    who.admin()?;
    let inv = app.state.invoice(&id).await?;
    let again = invoice::rerate(app.state.as_ref(), app.usage.as_ref(), &app.meters, &inv).await?;
    let reproduces = again.reproduces(&inv);
    let (rerated, advance) = (again.own, again.advance);
    let billed = invoice::billed(&inv);
    let original = billing_domain::adjust::OriginalInvoice {
        number: inv.number.clone(),
        period: inv.period,
    };
    let differences = billing_domain::adjust::adjustments(&billed, &rerated, &original);
    Ok(Json(RerateReport {
        invoice: inv.number,
        period: inv.period,
        reproduces,
        rerated,
        advance,
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
pub(super) async fn audit_log(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<AuditEntry>> {
    who.admin()?;
    let Query(q) = q.map_err(|e| ApiError::bad_query(e.body_text()))?;
    Ok(Json(app.state.audit_log(&q.subject).await?))
}
