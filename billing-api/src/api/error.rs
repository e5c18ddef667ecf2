//! The error envelope and the one mapping of failures to statuses; the
//! JSON body and query extractors whose rejections use it.

use super::*;

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

    // One constructor per kind of refusal: the statuses live here, not in
    // the handlers.

    /// 422: well-formed, but not acceptable (a field's value).
    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }

    /// 400 `bad_query`: the query string does not parse.
    pub(super) fn bad_query(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_query", message)
    }

    /// 400 with its own code: a request that cannot be read as sent.
    pub(super) fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 `not_found`.
    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 401 `unauthorized`: no credential, or one that is not valid.
    pub(super) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 405 `method_not_allowed`.
    pub(super) fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    /// 409 with its own code: the request conflicts with what is stored.
    pub(super) fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// One entry per problem, when a body had several.
    /// The refusal with the request field it is about named first.
    pub(super) fn named(mut self, field: &str) -> Self {
        self.body.message = format!("{field}: {}", self.body.message);
        self
    }

    pub(super) fn with_details(mut self, details: Vec<CatalogError>) -> Self {
        self.body.details = Some(details);
        self
    }
}

impl IntoResponse for ApiError {
    /// Written by the one envelope writer every API shares
    /// (`serving::Envelope`); [`ErrorBody`] is its description in the
    /// OpenAPI document.
    fn into_response(self) -> Response {
        serving::Envelope {
            code: &self.body.code,
            message: &self.body.message,
            details: self.body.details,
        }
        .response(self.status)
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
        // A refused value's message names its field first (`anchor_day:
        // …`), as the API's own refusals do.
        let message = match &e {
            StateError::Invalid(m) => m.clone(),
            _ => e.to_string(),
        };
        Self::new(status, e.code(), message)
    }
}

impl From<billing_domain::subscription::PeriodFinalized> for ApiError {
    fn from(e: billing_domain::subscription::PeriodFinalized) -> Self {
        Self::new(StatusCode::CONFLICT, "period_finalized", e.to_string())
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
    pub(super) fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

pub(super) type ApiResult<T> = Result<Json<T>, ApiError>;

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

pub(super) fn valid_id(field: &str, v: &str) -> Result<(), ApiError> {
    if schemas::ids::is_id(v) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field}: 1 to 128 characters of A-Z a-z 0-9 _ - . : @"
        )))
    }
}

pub(super) fn valid_name(field: &str, v: &str) -> Result<(), ApiError> {
    if v.trim().is_empty() || v.chars().count() > 200 || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field}: 1 to 200 printable characters"
        )));
    }
    Ok(())
}

/// The error code of a status, for errors that did not come with one.
pub(super) fn status_code_name(status: StatusCode) -> &'static str {
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
pub(super) async fn envelope(req: Request, next: Next) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What the OpenAPI document says an error is ([`ErrorBody`]) is what
    /// the shared envelope writes, with and without details.
    #[tokio::test]
    async fn the_documented_error_body_is_the_envelope_on_the_wire() {
        let details = vec![CatalogError {
            field: "prices[0].unit_price".into(),
            code: "invalid",
            message: "must not be negative".into(),
        }];
        for d in [None, Some(details)] {
            let e = ApiError::invalid("plan payg: 1 problem");
            let e = match d.clone() {
                Some(d) => e.with_details(d),
                None => e,
            };
            let documented = serde_json::to_value(&e.body).unwrap();
            let r = e.into_response();
            assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            let wire: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(wire, documented);
            assert_eq!(wire["code"], "invalid");
            assert_eq!(wire.get("details").is_some(), d.is_some(), "{wire}");
        }
    }
}
