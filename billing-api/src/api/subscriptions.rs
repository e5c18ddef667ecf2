//! The subscriptions endpoints.

use super::*;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    pub plan: String,
    /// Default: the latest version that is not retired.
    pub version: Option<u32>,
    /// Default: now.
    pub starts_at: Option<DateTime<Utc>>,
    /// Days of trial instead of the plan version's `trial_days` (0: none).
    /// A trial starts only with a customer's first subscription to a plan.
    pub trial_days: Option<u32>,
    /// The billing anchor day, 1 to 31 (default 1: calendar months; a day
    /// past a month's end means its last day). Chosen with the first
    /// subscription; a later one keeps it.
    pub anchor_day: Option<u32>,
}

/// The plan version a request names (default: the latest that is not
/// retired), refused when unknown (404) or retired (422); one catalog read.
pub(super) async fn resolve_plan(
    app: &ApiState,
    plan: &str,
    version: Option<u32>,
) -> Result<u32, ApiError> {
    let listed = app.state.list_plans().await?;
    let mine = listed.iter().filter(|p| p.plan.plan == plan);
    let not_found = |what: String| ApiError::not_found(what);
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

/// The billing anchor day of `customer` (which must exist).
pub(super) async fn anchor(app: &ApiState, customer: &str) -> Result<u32, ApiError> {
    Ok(billing_domain::subscription::anchor_of_history(
        &app.state.subscriptions(customer).await?,
    ))
}

/// The billing period of anchor day `anchor` named by `?period=YYYY-MM`
/// (the one that starts in that month), or the one containing now.
pub(super) fn customer_period(anchor: u32, period: Option<&str>) -> Result<Period, ApiError> {
    match period {
        None => Ok(invoice::period_of(crate::wire::now(), anchor)),
        Some(p) => invoice::parse_month(p)
            .map(|m| invoice::starting_in(m, anchor))
            .ok_or_else(|| {
                ApiError::bad_query(format!(
                    "period: expected YYYY-MM (the month the billing period starts in), got {p:?}"
                ))
            }),
    }
}

/// The open-period rule (`subscription::check_open`) against the
/// customer's period invoices, and for fees in advance
/// (`advance::check_issued`): nothing takes effect before the latest
/// invoice that billed fees in advance was issued, nor, when the change
/// brings a plan billing in advance (`to` names it), before the latest
/// invoice of any kind (whose next period's fees it would change).
pub(super) async fn require_open(
    app: &ApiState,
    customer: &str,
    at: DateTime<Utc>,
    to: Option<(&str, u32)>,
) -> Result<(), ApiError> {
    let invoices = app.state.invoices_of(customer).await?;
    let last = invoices
        .iter()
        .filter(|i| i.kind == invoice::InvoiceKind::Period)
        .next_back()
        .map(|i| (i.number.as_str(), i.period.end));
    billing_domain::subscription::check_open(at, last)?;
    let ahead = match to {
        Some((plan, version)) => app.state.plan_version(plan, version).await?.in_advance(),
        None => false,
    };
    let issued = invoices
        .iter()
        .filter(|i| ahead || i.body.lines.iter().any(|l| l.advance.is_some()))
        .max_by_key(|i| i.finalized_at)
        .map(|i| (i.number.as_str(), i.finalized_at));
    Ok(billing_domain::advance::check_issued(at, issued)?)
}

#[utoipa::path(post, path = "/v1/customers/{id}/subscription", params(("id" = String, Path)), request_body = Subscribe,
    responses((status = 201, body = PlanSwitchResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn subscribe(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<Subscribe>,
) -> Result<(StatusCode, Json<PlanSwitchResult>), ApiError> {
    let actor = who.admin()?;
    if req.trial_days.is_some_and(|d| d > MAX_TRIAL_DAYS) {
        return Err(ApiError::invalid(format!(
            "trial_days: 0 to {MAX_TRIAL_DAYS}"
        )));
    }
    let version = resolve_plan(&app, &req.plan, req.version).await?;
    let now = crate::wire::now();
    let at = req.starts_at.unwrap_or(now);
    require_open(&app, &id, at, Some((&req.plan, version))).await?;
    final_invoice_due(&app, &id, at, now).await?;
    let row = app
        .state
        .subscribe(
            &id,
            &NewSubscription {
                plan: req.plan.clone(),
                version,
                start: at,
                trial_days: req.trial_days,
                anchor_day: req.anchor_day,
            },
            actor,
        )
        .await?;
    app.quota_changed(&id).await;
    Ok((
        StatusCode::CREATED,
        Json(PlanSwitchResult {
            plan: req.plan,
            version,
            effective_at: at,
            withdrawn: vec![],
            trial_ends_at: row.trial_end,
        }),
    ))
}

/// A subscription again after a cancellation (reactivation) may not start
/// inside the cancellation's period once its final invoice is due (the
/// cancellation plus grace: the finalizer may be writing it), only from
/// that period's end on: refused like a change in an invoiced period (409
/// `period_finalized`).
pub(super) async fn final_invoice_due(
    app: &ApiState,
    customer: &str,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let history = app.state.subscriptions(customer).await?;
    let Some(ended) = billing_domain::subscription::cancelled_at(&history) else {
        return Ok(());
    };
    let grace = chrono::Duration::from_std(app.grace).unwrap_or_default();
    let period = invoice::period_of(
        ended,
        billing_domain::subscription::anchor_of_history(&history),
    );
    if now < ended + grace || at >= period.end {
        return Ok(());
    }
    let invoice = crate::invoice::invoice_id(customer, period);
    Ok(billing_domain::subscription::check_open(
        at,
        Some((invoice.as_str(), period.end)),
    )?)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionView {
    /// The plan in effect now, if any: its real start, and its end (null
    /// while it runs until changed; the instant of a scheduled switch).
    pub current: Option<Subscription>,
    /// Plans that start later (a switch at the period end), in order; each
    /// can be withdrawn at `DELETE /v1/customers/{id}/scheduled-changes/{change}`.
    pub scheduled: Vec<Subscription>,
    /// Where the subscription ends, when it is cancelled (ahead: a
    /// scheduled cancellation, withdrawn at `DELETE
    /// /v1/customers/{id}/cancellation`; past: the customer has no
    /// subscription since then).
    pub cancelled_at: Option<DateTime<Utc>>,
}

/// No query parameters: any one is refused (400 `bad_query`, naming it).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// A query string refused with the error envelope (400 `bad_query`).
pub(super) fn query<T>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_query(e.body_text()))
}

/// The plan history from now on: the row in effect and those after it.
pub(super) fn from_now(history: Vec<Subscription>, now: DateTime<Utc>) -> SubscriptionView {
    let cancelled_at = billing_domain::subscription::cancelled_at(&history);
    let mut current = None;
    let mut scheduled = Vec::new();
    for s in history {
        if s.start > now {
            scheduled.push(s);
        } else if s.end.is_none_or(|e| e > now) {
            current = Some(s);
        }
    }
    SubscriptionView {
        current,
        scheduled,
        cancelled_at,
    }
}

/// The plan in effect now and any scheduled switch, as stored.
#[utoipa::path(get, path = "/v1/customers/{id}/subscription", params(("id" = String, Path), NoParams),
    responses((status = 200, body = SubscriptionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_subscription(
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
pub(super) async fn list_scheduled_changes(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<NoParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<Subscription>> {
    who.read_customer(&id, &format!("customer {id}"))?;
    query(q)?;
    let history = app.state.subscriptions(&id).await?;
    // A subscription that starts later (a first one, or one after a
    // cancellation) is not a change of plan.
    let starts: Vec<i64> = history
        .iter()
        .enumerate()
        .filter(|(i, s)| *i == 0 || history[i - 1].end != Some(s.start))
        .map(|(_, s)| s.id)
        .collect();
    let view = from_now(history, crate::wire::now());
    Ok(Json(
        view.scheduled
            .into_iter()
            .filter(|s| !starts.contains(&s.id))
            .collect(),
    ))
}

/// Withdraws a scheduled switch: the plan before it runs on. Staff only,
/// audited (`subscription.withdraw`); withdrawing it again answers the same
/// change (safe to retry); a change already in effect is a 409.
#[utoipa::path(delete, path = "/v1/customers/{id}/scheduled-changes/{change}",
    params(("id" = String, Path), ("change" = i64, Path, description = "the `id` of a scheduled change")),
    responses((status = 200, body = Subscription, description = "the withdrawn change"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn withdraw_scheduled_change(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path((id, change)): Path<(String, String)>,
) -> ApiResult<Subscription> {
    let actor = who.admin()?;
    let not_found = || {
        ApiError::not_found(format!(
            "scheduled change {change} of customer {id} not found"
        ))
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
    /// `now` (default) or `period_end`; or give `at`.
    pub effective: Option<Effective>,
    /// An explicit instant instead of `effective`: at or after the
    /// customer's first subscription start, outside every invoiced period,
    /// at most [`SEATS_MAX_AHEAD_DAYS`] days ahead, at most microsecond
    /// precision.
    #[serde(default, deserialize_with = "crate::wire::opt_instant")]
    pub at: Option<DateTime<Utc>>,
}

/// How far ahead a seat change, a switch or a cancellation may be dated.
pub const SEATS_MAX_AHEAD_DAYS: i64 = 366;

/// When a change takes effect: `now`, the end of the period containing
/// now, or an explicit instant (`at`, not more than
/// [`SEATS_MAX_AHEAD_DAYS`] days ahead: a typo like 9999 is refused rather
/// than kept for ever); never both. Whether the instant is outside every
/// invoiced period is [`require_open`]'s to say.
pub(super) fn when(
    effective: Option<Effective>,
    at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    anchor: u32,
) -> Result<DateTime<Utc>, ApiError> {
    match (effective, at) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "at: give either effective (now, period_end) or at (an instant), not both",
        )),
        (Some(Effective::PeriodEnd), None) => Ok(invoice::period_of(now, anchor).end),
        (Some(Effective::Now), None) | (None, None) => Ok(now),
        (None, Some(at)) => {
            let horizon = now + chrono::Duration::days(SEATS_MAX_AHEAD_DAYS);
            if at > horizon {
                return Err(ApiError::invalid(format!(
                    "at: {} is more than {SEATS_MAX_AHEAD_DAYS} days ahead (latest {})",
                    at.to_rfc3339(),
                    horizon.to_rfc3339()
                )));
            }
            Ok(at)
        }
    }
}

/// When a seat change may take effect: not before the customer's first
/// subscription starts (seats without a plan bill nothing and would carry
/// into every later period), not inside an invoiced period (409,
/// [`require_open`]), and not more than [`SEATS_MAX_AHEAD_DAYS`] days after
/// now (a typo like 9999 is refused rather than kept for ever).
pub(super) async fn seats_at(
    app: &ApiState,
    customer: &str,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let horizon = now + chrono::Duration::days(SEATS_MAX_AHEAD_DAYS);
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
        Some(_) => require_open(app, customer, at, None).await,
    }
}

#[utoipa::path(put, path = "/v1/customers/{id}/seats", params(("id" = String, Path)), request_body = SetSeats,
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn set_seats(
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
    let at = when(req.effective, req.at, now, anchor(&app, &id).await?)?;
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
    /// `now` (default) or `period_end`; or give `at`.
    pub effective: Option<Effective>,
    /// An explicit instant instead of `effective`: inside the open period
    /// or later (at most 366 days ahead), at most microsecond precision.
    #[serde(default, deserialize_with = "crate::wire::opt_instant")]
    pub at: Option<DateTime<Utc>>,
    /// Refused: a trial starts only with a subscription, never on a switch.
    #[schema(value_type = Option<u32>)]
    pub trial_days: Option<serde_json::Value>,
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
    /// A new subscription's trial end, when it starts with a trial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_ends_at: Option<DateTime<Utc>>,
}

pub(super) async fn planned(
    app: &ApiState,
    customer: &str,
    req: &SwitchRequest,
) -> Result<PlannedSwitch, ApiError> {
    if req.trial_days.is_some() {
        return Err(ApiError::invalid(
            "trial_days: a trial starts only with a subscription (POST /v1/customers/{id}/subscription), never on a switch",
        ));
    }
    // At the stored precision (microseconds), so the instant answered is
    // the instant stored.
    let now = crate::wire::now();
    let at = when(req.effective, req.at, now, anchor(app, customer).await?)?;
    let version = resolve_plan(app, &req.plan, req.version).await?;
    Ok(PlannedSwitch {
        plan: req.plan.clone(),
        version,
        at,
    })
}

/// The open period's lines as they are and with the switch, before confirming.
#[utoipa::path(post, path = "/v1/customers/{id}/plan-switch/preview", params(("id" = String, Path)), request_body = SwitchRequest,
    responses((status = 200, body = SwitchPreview), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn preview_switch(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<SwitchRequest>,
) -> ApiResult<SwitchPreview> {
    who.read_customer(&id, &format!("customer {id}"))?;
    app.state.customer(&id).await?;
    let sw = planned(&app, &id, &req).await?;
    // The open period, or the later one the switch falls in.
    let period = invoice::period_of(crate::wire::now().max(sw.at), anchor(&app, &id).await?);
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
pub(super) async fn switch_plan(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<SwitchRequest>,
) -> ApiResult<PlanSwitchResult> {
    let actor = who.admin()?;
    app.state.customer(&id).await?;
    let sw = planned(&app, &id, &req).await?;
    require_open(&app, &id, sw.at, Some((&sw.plan, sw.version))).await?;
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
        trial_ends_at: None,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// `now` (default) or `period_end`; or give `at`.
    pub effective: Option<Effective>,
    /// An explicit instant instead of `effective`: inside the open period
    /// or later (at most 366 days ahead), at most microsecond precision.
    #[serde(default, deserialize_with = "crate::wire::opt_instant")]
    pub at: Option<DateTime<Utc>>,
}

/// Cancels the subscription now, at the period end or at an instant. The
/// last plan segment ends there: the final invoice covers the partial
/// period (fees prorated, usage timed before it) and is finalized at the
/// cancellation plus grace; usage timed after it is not billed and is
/// reported (`GET /v1/customers/{id}/unbilled-usage`). Changes scheduled
/// at or after it are withdrawn. Staff only, audited
/// (`subscription.cancel`); repeating it changes nothing; a cancellation
/// already scheduled elsewhere is a 409 (withdraw it first).
#[utoipa::path(post, path = "/v1/customers/{id}/cancellation", params(("id" = String, Path)), request_body = CancelRequest,
    responses((status = 200, body = Cancellation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn cancel_subscription(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<CancelRequest>,
) -> ApiResult<Cancellation> {
    let actor = who.admin()?;
    app.state.customer(&id).await?;
    let at = when(
        req.effective,
        req.at,
        crate::wire::now(),
        anchor(&app, &id).await?,
    )?;
    require_open(&app, &id, at, None).await?;
    let done = app.state.cancel(&id, at, actor).await?;
    app.quota_changed(&id).await;
    Ok(Json(done))
}

/// Withdraws a scheduled cancellation before it takes effect: the plan
/// runs on until changed. Staff only, audited (`subscription.uncancel`);
/// a retry answers the same subscription; one that took effect is a 409
/// (subscribe again instead).
#[utoipa::path(delete, path = "/v1/customers/{id}/cancellation", params(("id" = String, Path)),
    responses((status = 200, body = Subscription, description = "the subscription that runs on"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn withdraw_cancellation(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Subscription> {
    let actor = who.admin()?;
    let row = app
        .state
        .withdraw_cancellation(&id, crate::wire::now(), actor)
        .await?;
    app.quota_changed(&id).await;
    Ok(Json(row))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UnbilledQuery {
    /// `YYYY-MM` (default: the period containing now).
    pub period: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UnbilledUsage {
    pub period: Period,
    /// Where the customer had no subscription in the period (after a
    /// cancellation, before a first subscription).
    pub uncovered: Vec<Period>,
    /// Usage timed there, per meter: not billed.
    pub usage: Vec<UsageItem>,
}

/// Usage timed where the customer had no subscription (after a
/// cancellation): not billed, never dropped. Staff only.
#[utoipa::path(get, path = "/v1/customers/{id}/unbilled-usage", params(("id" = String, Path), UnbilledQuery),
    responses((status = 200, body = UnbilledUsage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn unbilled_usage(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<UnbilledQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<UnbilledUsage> {
    who.admin()?;
    let q = query(q)?;
    app.state.customer(&id).await?;
    let period = customer_period(anchor(&app, &id).await?, q.period.as_deref())?;
    let segs = app.state.plan_segments(&id, period).await?;
    let spans = invoice::uncovered(period, segs.iter().map(|s| (s.start, s.end)));
    let usage = crate::usage::unbilled_usage(app.usage.as_ref(), &app.meters, &id, &spans).await?;
    Ok(Json(UnbilledUsage {
        period,
        uncovered: spans
            .into_iter()
            .map(|(start, end)| Period { start, end })
            .collect(),
        usage,
    }))
}
