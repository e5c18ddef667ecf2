//! The error envelope every Tally API answers with, `{code, message}` and,
//! when a body had several problems, `details`: written here only, for the
//! collector's API, billing-api's (whose `ErrorBody` documents this shape
//! in the OpenAPI document) and the rewrite of hyper's own answers.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The envelope's fields. `D` is what `details` holds (a list of
/// problems); `()` for an envelope without details.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<'a, D: Serialize = ()> {
    /// Machine-readable code.
    pub code: &'a str,
    /// For humans: names the field or flag at fault.
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<D>,
}

impl<'a> Envelope<'a> {
    pub fn new(code: &'a str, message: &'a str) -> Self {
        Envelope {
            code,
            message,
            details: None,
        }
    }
}

impl<D: Serialize> Envelope<'_, D> {
    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope serializes")
    }

    /// The response: `status`, `content-type: application/json`, the body.
    pub fn response(&self, status: StatusCode) -> Response {
        (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.to_json(),
        )
            .into_response()
    }
}

/// An error response without details.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    Envelope::new(code, message).response(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_is_code_and_message_and_details_when_given() {
        let v: serde_json::Value =
            serde_json::from_slice(&Envelope::new("bad_query", "limit: 1 to 1000").to_json())
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": "bad_query", "message": "limit: 1 to 1000"})
        );
        let with = Envelope {
            code: "invalid",
            message: "2 problems",
            details: Some(vec!["a", "b"]),
        };
        let v: serde_json::Value = serde_json::from_slice(&with.to_json()).unwrap();
        assert_eq!(v["details"], serde_json::json!(["a", "b"]));
        let r = error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()["content-type"], "application/json");
    }
}
