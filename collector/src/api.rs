//! HTTP ingest: `POST /v1/events`, `GET /metrics`, `GET /healthz`.
//!
//! Answers (JSON envelope `{code, message, ...}` on every error):
//! - 200: every event accepted and durable (`delivery` says where);
//! - 207: a batch where some events were accepted (durable) and some
//!   rejected; `errors` lists each rejected event's index, field and reason;
//! - 400: malformed body, or no event valid; 401: missing or unknown key;
//! - 413: body or batch too large; 415: unsupported content type;
//! - 404 / 405: unknown path or method;
//! - 503: neither Kafka nor the spool could take the events (nothing was
//!   accepted; retry).
//!
//! Retrying a request is always safe: events are deduplicated by
//! (`source`, `id`) downstream.

use crate::auth::KeySet;
use crate::metrics::Metrics;
use crate::sink::{DynEventSink, Envelope, EventSink};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use schemas::{parse_batch, parse_single, FieldError, MeterCatalog};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;

#[derive(Clone)]
pub struct IngestState {
    pub sink: Arc<DynEventSink<'static>>,
    pub meters: Arc<MeterCatalog>,
    pub keys: Arc<KeySet>,
    pub metrics: Metrics,
    pub max_body_bytes: usize,
    pub max_batch_events: usize,
}

pub fn router(state: IngestState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/events", post(ingest))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        // Unknown paths and methods get the error envelope too.
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; events go to POST /v1/events",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method (POST /v1/events, GET /metrics, GET /healthz)",
            )
        })
        // Bodies over the limit are never buffered; the handler turns the
        // rejection into our error envelope.
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn metrics(State(st): State<IngestState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

/// An error answer in the shared envelope (`serving::Envelope`).
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    serving::error_response(status, code, &message.into())
}

fn too_large(st: &IngestState) -> Response {
    st.metrics
        .events_rejected
        .with_label_values(&["payload_too_large"])
        .inc();
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("body exceeds {} bytes", st.max_body_bytes),
    )
}

#[derive(Serialize)]
struct EventResult {
    index: usize,
    field: String,
    code: &'static str,
    message: String,
}

/// A request body after validation.
pub struct ValidatedBody {
    /// The valid events, ready for the sink.
    pub envelopes: Vec<Envelope>,
    /// Every problem, with the index of its event.
    pub errors: Vec<(usize, FieldError)>,
    /// Events in the body.
    pub total: usize,
}

/// Validates a body received at `now` into envelopes and per-event errors;
/// a body that is not an event or batch at all becomes the error response.
#[allow(clippy::result_large_err)]
pub fn validate_body(
    body: &[u8],
    batch: bool,
    meters: &MeterCatalog,
    now: DateTime<Utc>,
) -> Result<ValidatedBody, Response> {
    let raws = if batch {
        parse_batch(body)
    } else {
        parse_single(body).map(|e| vec![e])
    }
    .map_err(|e| error(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    let total = raws.len();
    let mut envelopes = Vec::with_capacity(total);
    let mut errors = Vec::new();
    for (i, raw) in raws.into_iter().enumerate() {
        match raw.and_then(|ev| Envelope::accept(ev, meters, now)) {
            Ok(envelope) => envelopes.push(envelope),
            Err(errs) => errors.extend(errs.into_iter().map(|e| (i, e))),
        }
    }
    Ok(ValidatedBody {
        envelopes,
        errors,
        total,
    })
}

async fn ingest(
    State(st): State<IngestState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !st.keys.check_header(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    ) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <key>` is required",
        );
    }
    let body = match body {
        Ok(b) if b.len() <= st.max_body_bytes => b,
        Ok(_) => return too_large(&st),
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => return too_large(&st),
        Err(r) => return error(StatusCode::BAD_REQUEST, "unreadable_body", r.body_text()),
    };
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let batch = match mime.as_str() {
        "application/cloudevents-batch+json" => true,
        "application/cloudevents+json" => false,
        "application/json" => body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'['),
        _ => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "use application/cloudevents+json or application/cloudevents-batch+json",
            )
        }
    };
    let ValidatedBody {
        envelopes,
        errors,
        total,
    } = match validate_body(&body, batch, &st.meters, Utc::now()) {
        Ok(v) => v,
        Err(resp) => {
            st.metrics
                .events_rejected
                .with_label_values(&["malformed_body"])
                .inc();
            return resp;
        }
    };
    st.metrics.events_received.inc_by(total as u64);
    if total > st.max_batch_events {
        st.metrics
            .events_rejected
            .with_label_values(&["batch_too_large"])
            .inc_by(total as u64);
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "batch holds {total} events; the limit is {}",
                st.max_batch_events
            ),
        );
    }
    let mut rejected_idx: Vec<usize> = errors.iter().map(|(i, _)| *i).collect();
    rejected_idx.dedup();
    for (_, e) in &errors {
        st.metrics
            .events_rejected
            .with_label_values(&[e.code])
            .inc();
    }
    let results: Vec<EventResult> = errors
        .into_iter()
        .map(|(index, e)| EventResult {
            index,
            field: e.field,
            code: e.code,
            message: e.message,
        })
        .collect();
    let accepted = envelopes.len();
    if accepted == 0 {
        let msg = if batch {
            "no event in the batch is valid"
        } else {
            "the event is invalid"
        };
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": "invalid_event", "message": msg, "accepted": 0, "rejected": rejected_idx.len(), "errors": results})),
        )
            .into_response();
    }
    let delivery = match st.sink.send(envelopes).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "could not make events durable");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "events could not be stored; nothing was accepted, retry",
            );
        }
    };
    st.metrics
        .events_accepted
        .with_label_values(&[delivery.as_str()])
        .inc_by(accepted as u64);
    let status = if results.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    (
        status,
        Json(json!({"accepted": accepted, "rejected": rejected_idx.len(), "delivery": delivery.as_str(), "errors": results})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Delivery;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Kept(Mutex<Vec<Envelope>>);
    impl EventSink for Kept {
        async fn send(&self, batch: Vec<Envelope>) -> anyhow::Result<Delivery> {
            self.0.lock().unwrap().extend(batch);
            Ok(Delivery::Kafka)
        }
    }

    const KEY: &str = "test-ingest-key";

    async fn serve() -> (String, Arc<Kept>) {
        let sink = Arc::new(Kept::default());
        let state = IngestState {
            sink: DynEventSink::from_arc(sink.clone()),
            meters: Arc::new(MeterCatalog::default_catalog()),
            keys: Arc::new(KeySet::from_hex(&[hex::encode(crate::auth::hash_key(KEY))]).unwrap()),
            metrics: Metrics::new(),
            max_body_bytes: 1 << 20,
            max_batch_events: 100,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        (url, sink)
    }

    fn event(id: &str, count: &str) -> String {
        let now = Utc::now().to_rfc3339();
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"t","type":"tally.requests","subject":"cus_1","time":"{now}","data":{{"app":"web","count":{count}}}}}"#
        )
    }

    async fn post(url: &str, body: String) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("{url}/v1/events"))
            .bearer_auth(KEY)
            .header("content-type", "application/cloudevents+json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    #[tokio::test]
    async fn every_error_has_the_envelope() {
        let (url, _) = serve().await;
        let c = reqwest::Client::new();
        for (req, status, code) in [
            (c.get(format!("{url}/v1/nothing")), 404, "not_found"),
            (c.get(format!("{url}/v1/events")), 405, "method_not_allowed"),
            (
                c.delete(format!("{url}/metrics")),
                405,
                "method_not_allowed",
            ),
            (c.get(format!("{url}/%FF%FE")), 404, "not_found"),
            (
                c.get(format!("{url}/{}", "a".repeat(20_000))),
                404,
                "not_found",
            ),
        ] {
            let r = req.send().await.unwrap();
            assert_eq!(r.status().as_u16(), status);
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["code"], code, "{v}");
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[tokio::test]
    async fn bodies_are_read_as_sent() {
        let (url, sink) = serve().await;
        // A duplicate key: the whole body is malformed, nothing accepted.
        let dup =
            event("d1", "1").replace(r#""subject":"cus_1""#, r#""subject":"m1","subject":"m2""#);
        let (status, v) = post(&url, dup).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (400, Some("malformed_json")),
            "{v}"
        );
        assert!(v["message"]
            .as_str()
            .unwrap()
            .contains("duplicate key `subject`"));
        // A number an f64 would round: refused naming the field.
        let (status, v) = post(&url, event("n1", "9007199254740993.5")).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["errors"][0]["field"], "data.count");
        assert_eq!(v["errors"][0]["code"], "inexact_number");
        assert!(sink.0.lock().unwrap().is_empty());
        // Accepted: stamped with the instant the window was judged at; the
        // payload keeps the number's exact value.
        let before = Utc::now();
        let (status, v) = post(&url, event("ok", "9007199254740993")).await;
        assert_eq!(status, 200, "{v}");
        let kept = sink.0.lock().unwrap();
        let raw: schemas::RawEvent = serde_json::from_slice(&kept[0].payload).unwrap();
        let at = schemas::event::accepted_at(&raw).unwrap().expect("stamped");
        assert!(at >= before - chrono::Duration::microseconds(1) && at <= Utc::now());
        assert_eq!(raw["data"]["count"].to_string(), "9007199254740993");
    }
}
