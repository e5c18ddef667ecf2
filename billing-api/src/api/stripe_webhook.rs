//! The Stripe webhook endpoint.

use super::*;

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
pub(super) async fn stripe_webhook(
    State(app): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<WebhookAck>, ApiError> {
    let Some(secret) = &app.webhook_secret else {
        return Err(ApiError::not_found("webhooks are not configured"));
    };
    let sig = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    if let Err(e) = webhook::verify(
        secret.expose(),
        &body,
        sig,
        crate::wire::now().timestamp(),
        webhook::DEFAULT_TOLERANCE_SECS,
    ) {
        app.metrics
            .webhooks
            .with_label_values(&["unknown", "bad_signature"])
            .inc();
        return Err(ApiError::bad_request("invalid_signature", e.to_string()));
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
    let ev: Event = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("event: {e}")))?;
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
