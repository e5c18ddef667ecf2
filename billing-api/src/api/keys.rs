//! The keys, sessions endpoints.

use super::*;

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
pub(super) async fn create_key(
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
pub(super) async fn list_keys(
    State(app): State<Arc<ApiState>>,
    axum::Extension(who): axum::Extension<Principal>,
) -> ApiResult<Vec<ApiKey>> {
    who.admin()?;
    Ok(Json(app.state.api_keys().await?))
}

/// Revokes a key at once in this process (other replicas within 5 s).
#[utoipa::path(post, path = "/v1/keys/{id}/revoke", params(("id" = String, Path)),
    responses((status = 200, body = ApiKey), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_key(
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
pub(super) async fn create_session(
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
