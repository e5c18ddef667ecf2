//! The usage event: a CloudEvents 1.0 JSON envelope whose `data` carries the
//! quantity and dimensions of one or more meters.
//!
//! Parsing is split in two: the body is first read as JSON (a malformed body
//! fails the whole request), then each event is validated on its own and
//! either becomes a [`UsageEvent`] or yields every [`FieldError`] it has, so a
//! batch can be answered event by event. The collector and the aggregator run
//! the same [`UsageEvent::validate`], so nothing the collector accepts is
//! judged differently downstream.

use crate::meter::{Aggregation, MeterCatalog, MeterDef, APP_DIMENSION};
use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::str::FromStr;

/// Largest number of fractional digits a quantity may carry (the storage
/// scale of `Decimal(38, 12)`).
pub const QUANTITY_SCALE: u32 = 12;
/// One quantity must stay below 10^16, so that sums of many of them at
/// scale 12 still fit both `Decimal(38, 12)` and `rust_decimal` (96 bits).
pub const QUANTITY_MAX_INTEGER_DIGITS: u32 = 16;
/// How far in the future an event `time` may lie (clock skew allowance).
pub const FUTURE_TOLERANCE_SECS: i64 = 300;

/// One problem with one event, at one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `data.instance_seconds`.
    pub field: String,
    /// Machine-readable reason, e.g. `missing_field`, `negative_quantity`.
    pub code: &'static str,
    /// Human explanation.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}

/// A request body that is not an event or a batch at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("expected {expected}, got {got}")]
    WrongShape {
        expected: &'static str,
        got: &'static str,
    },
    #[error("batch is empty")]
    EmptyBatch,
}

impl EventError {
    pub fn code(&self) -> &'static str {
        match self {
            EventError::MalformedJson(_) => "malformed_json",
            EventError::WrongShape { .. } => "wrong_shape",
            EventError::EmptyBatch => "empty_batch",
        }
    }
}

/// An event as received: a JSON object not yet validated.
pub type RawEvent = Map<String, Value>;

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Parses a `application/cloudevents+json` body: exactly one event object.
pub fn parse_single(body: &[u8]) -> Result<RawEvent, EventError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(EventError::WrongShape {
            expected: "a JSON object",
            got: kind(&other),
        }),
        Err(e) => Err(EventError::MalformedJson(e.to_string())),
    }
}

/// Parses a `application/cloudevents-batch+json` body: a non-empty array.
/// Elements that are not objects are kept as errors so the per-event answer
/// keeps its indexes.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Result<RawEvent, FieldError>>, EventError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) if items.is_empty() => Err(EventError::EmptyBatch),
        Ok(Value::Array(items)) => Ok(items
            .into_iter()
            .map(|v| match v {
                Value::Object(m) => Ok(m),
                other => Err(FieldError::new(
                    "",
                    "wrong_type",
                    format!("event must be a JSON object, got {}", kind(&other)),
                )),
            })
            .collect()),
        Ok(other) => Err(EventError::WrongShape {
            expected: "a JSON array",
            got: kind(&other),
        }),
        Err(e) => Err(EventError::MalformedJson(e.to_string())),
    }
}

/// The range of event times accepted at a given instant.
///
/// Lower bound: the start of the previous calendar month (UTC). That covers
/// the open billing period and the previous one through its grace period and
/// beyond, so late usage for a just-finalized period is still accepted and
/// becomes an adjustment. The aggregator keeps deduplication keys for the
/// same window, so every event it can accept is deduplicated against every
/// other one. Upper bound: now plus [`FUTURE_TOLERANCE_SECS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptWindow {
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

impl AcceptWindow {
    pub fn at(now: DateTime<Utc>) -> Self {
        Self {
            not_before: previous_month_start(now),
            not_after: now + Duration::seconds(FUTURE_TOLERANCE_SECS),
        }
    }

    /// No bounds: used when re-validating stored events whose window was
    /// checked on arrival.
    pub fn unbounded() -> Self {
        Self {
            not_before: DateTime::<Utc>::MIN_UTC,
            not_after: DateTime::<Utc>::MAX_UTC,
        }
    }
}

/// First instant of the calendar month before the one containing `t` (UTC).
pub fn previous_month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if t.month() == 1 {
        (t.year() - 1, 12)
    } else {
        (t.year(), t.month() - 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .expect("valid month start")
}

/// What one event contributes to one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRecord {
    pub meter: String,
    /// Non-negative, at most [`QUANTITY_SCALE`] fractional digits. 1 for
    /// `count` and `unique_count` meters.
    pub quantity: Decimal,
    /// The `app` dimension, empty when the meter has none.
    pub app: String,
    /// The meter's other dimensions, by name.
    pub dims: BTreeMap<String, String>,
    /// For `unique_count` meters: the value counted.
    pub unique_value: Option<String>,
}

impl UsageRecord {
    /// The dimensions as canonical compact JSON (keys sorted), the form
    /// stored in rollups.
    pub fn dims_json(&self) -> String {
        serde_json::to_string(&self.dims).expect("string map serializes")
    }
}

/// A validated usage event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageEvent {
    pub id: String,
    pub source: String,
    /// The customer (`subject`).
    pub customer: String,
    pub event_type: String,
    pub time: DateTime<Utc>,
    pub records: Vec<UsageRecord>,
}

fn str_field<'a>(
    ev: &'a RawEvent,
    name: &str,
    max: usize,
    errs: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match ev.get(name) {
        None | Some(Value::Null) => {
            errs.push(FieldError::new(
                name,
                "missing_field",
                format!("`{name}` is required"),
            ));
            None
        }
        Some(Value::String(s)) if s.is_empty() => {
            errs.push(FieldError::new(
                name,
                "invalid_value",
                format!("`{name}` must not be empty"),
            ));
            None
        }
        Some(Value::String(s)) if s.len() > max => {
            errs.push(FieldError::new(
                name,
                "invalid_value",
                format!("`{name}` is longer than {max} bytes"),
            ));
            None
        }
        Some(Value::String(s)) if s.chars().any(|c| c.is_control()) => {
            errs.push(FieldError::new(
                name,
                "invalid_value",
                format!("`{name}` contains control characters"),
            ));
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            errs.push(FieldError::new(
                name,
                "wrong_type",
                format!("`{name}` must be a string, got {}", kind(other)),
            ));
            None
        }
    }
}

fn lookup<'a>(data: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut cur = data.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

/// Parses a quantity: a JSON number or a decimal string, non-negative, at
/// most [`QUANTITY_SCALE`] fractional digits.
pub fn parse_quantity(v: &Value) -> Result<Decimal, (&'static str, String)> {
    let d = match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Decimal::from(u)
            } else if let Some(i) = n.as_i64() {
                Decimal::from(i)
            } else {
                let s = n.to_string();
                Decimal::from_str(&s)
                    .or_else(|_| Decimal::from_scientific(&s))
                    .map_err(|_| {
                        (
                            "invalid_value",
                            format!("quantity {s} is not a representable decimal"),
                        )
                    })?
            }
        }
        Value::String(s) => {
            let ok = !s.is_empty()
                && s.trim_start_matches('-').split('.').count() <= 2
                && s.trim_start_matches('-')
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.')
                && !s.trim_start_matches('-').starts_with('.')
                && !s.ends_with('.');
            if !ok {
                return Err((
                    "invalid_value",
                    format!("quantity {s:?} is not a decimal number"),
                ));
            }
            Decimal::from_str(s)
                .map_err(|_| ("invalid_value", format!("quantity {s:?} is out of range")))?
        }
        other => {
            return Err((
                "wrong_type",
                format!(
                    "quantity must be a number or decimal string, got {}",
                    kind(other)
                ),
            ))
        }
    };
    if d.is_sign_negative() && !d.is_zero() {
        return Err(("negative_quantity", format!("quantity {d} is negative")));
    }
    if d.scale() > QUANTITY_SCALE && d.normalize().scale() > QUANTITY_SCALE {
        return Err((
            "invalid_value",
            format!("quantity {d} has more than {QUANTITY_SCALE} decimal places"),
        ));
    }
    if d.trunc() >= Decimal::from_i128_with_scale(10i128.pow(QUANTITY_MAX_INTEGER_DIGITS), 0) {
        return Err(("invalid_value", format!("quantity {d} is too large")));
    }
    Ok(d.normalize())
}

fn dim_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s)
            if !s.is_empty() && s.len() <= 256 && !s.chars().any(|c| c.is_control()) =>
        {
            Some(s.clone())
        }
        _ => None,
    }
}

fn is_customer_id(s: &str) -> bool {
    s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:@-".contains(c))
}

impl UsageEvent {
    /// Validates one event against the meter catalog and the time window.
    /// Returns every problem found, not just the first.
    pub fn validate(
        ev: &RawEvent,
        meters: &MeterCatalog,
        window: &AcceptWindow,
    ) -> Result<UsageEvent, Vec<FieldError>> {
        let mut errs = Vec::new();
        match ev.get("specversion") {
            Some(Value::String(s)) if s == "1.0" => {}
            None => errs.push(FieldError::new(
                "specversion",
                "missing_field",
                "`specversion` is required",
            )),
            Some(v) => errs.push(FieldError::new(
                "specversion",
                "invalid_value",
                format!("`specversion` must be \"1.0\", got {v}"),
            )),
        }
        let id = str_field(ev, "id", 256, &mut errs);
        let source = str_field(ev, "source", 512, &mut errs);
        let event_type = str_field(ev, "type", 256, &mut errs);
        let subject = str_field(ev, "subject", 128, &mut errs);
        if let Some(s) = subject {
            if !is_customer_id(s) {
                errs.push(FieldError::new(
                    "subject",
                    "invalid_value",
                    "`subject` (the customer id) may hold only letters, digits and ._:@-",
                ));
            }
        }
        let time = str_field(ev, "time", 64, &mut errs).and_then(|t| {
            match DateTime::parse_from_rfc3339(t) {
                Ok(t) => Some(t.with_timezone(&Utc)),
                Err(e) => {
                    errs.push(FieldError::new(
                        "time",
                        "invalid_value",
                        format!("`time` is not RFC 3339: {e}"),
                    ));
                    None
                }
            }
        });
        if let Some(t) = time {
            if t > window.not_after {
                errs.push(FieldError::new(
                    "time",
                    "time_in_future",
                    format!("`time` {t} is after {}", window.not_after),
                ));
            } else if t < window.not_before {
                errs.push(FieldError::new(
                    "time",
                    "time_before_window",
                    format!(
                        "`time` {t} is before the retention window, which starts {}",
                        window.not_before
                    ),
                ));
            }
        }
        match ev.get("datacontenttype") {
            None | Some(Value::Null) => {}
            Some(Value::String(s))
                if s == "application/json" || s.starts_with("application/json;") => {}
            Some(v) => errs.push(FieldError::new(
                "datacontenttype",
                "invalid_value",
                format!("`datacontenttype` must be application/json, got {v}"),
            )),
        }
        let data = match ev.get("data") {
            Some(Value::Object(d)) => Some(d),
            None | Some(Value::Null) => {
                errs.push(FieldError::new(
                    "data",
                    "missing_field",
                    "`data` is required",
                ));
                None
            }
            Some(v) => {
                errs.push(FieldError::new(
                    "data",
                    "wrong_type",
                    format!("`data` must be an object, got {}", kind(v)),
                ));
                None
            }
        };
        let mut records = Vec::new();
        if let Some(t) = event_type {
            let defs: Vec<&MeterDef> = meters.for_type(t).collect();
            if defs.is_empty() {
                errs.push(FieldError::new(
                    "type",
                    "unknown_event_type",
                    format!("no meter reads events of type {t:?}"),
                ));
            } else if let Some(data) = data {
                for def in defs {
                    if let Some(r) = Self::record(def, data, &mut errs) {
                        records.push(r);
                    }
                }
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(UsageEvent {
            id: id.unwrap().to_owned(),
            source: source.unwrap().to_owned(),
            customer: subject.unwrap().to_owned(),
            event_type: event_type.unwrap().to_owned(),
            time: time.unwrap(),
            records,
        })
    }

    fn record(
        def: &MeterDef,
        data: &Map<String, Value>,
        errs: &mut Vec<FieldError>,
    ) -> Option<UsageRecord> {
        let before = errs.len();
        let mut app = String::new();
        let mut dims = BTreeMap::new();
        for d in &def.dimensions {
            let field = format!("data.{}", d.path);
            match lookup(data, &d.path) {
                None | Some(Value::Null) if d.required => errs.push(FieldError::new(
                    field,
                    "missing_field",
                    format!("dimension `{}` is required by meter {}", d.name, def.key),
                )),
                None | Some(Value::Null) => {}
                Some(v) => match dim_value(v) {
                    Some(s) if d.name == APP_DIMENSION => app = s,
                    Some(s) => {
                        dims.insert(d.name.clone(), s);
                    }
                    None => errs.push(FieldError::new(
                        field,
                        "wrong_type",
                        format!(
                            "dimension `{}` must be a non-empty string of at most 256 bytes",
                            d.name
                        ),
                    )),
                },
            }
        }
        let (quantity, unique_value) = match (def.aggregation, &def.value_path) {
            (Aggregation::Count, _) => (Decimal::ONE, None),
            (agg, Some(path)) => {
                let field = format!("data.{path}");
                match lookup(data, path) {
                    None | Some(Value::Null) => {
                        errs.push(FieldError::new(
                            field,
                            "missing_field",
                            format!("`{path}` is required by meter {}", def.key),
                        ));
                        (Decimal::ZERO, None)
                    }
                    Some(v) if agg == Aggregation::UniqueCount => {
                        match v {
                            Value::String(s) if !s.is_empty() => (Decimal::ONE, Some(s.clone())),
                            Value::Number(n) => (Decimal::ONE, Some(n.to_string())),
                            other => {
                                errs.push(FieldError::new(field, "wrong_type", format!("unique value must be a non-empty string or a number, got {}", kind(other))));
                                (Decimal::ZERO, None)
                            }
                        }
                    }
                    Some(v) => match parse_quantity(v) {
                        Ok(q) => (q, None),
                        Err((code, msg)) => {
                            errs.push(FieldError::new(field, code, msg));
                            (Decimal::ZERO, None)
                        }
                    },
                }
            }
            (_, None) => unreachable!("catalog validation requires value_path"),
        };
        (errs.len() == before).then(|| UsageRecord {
            meter: def.key.clone(),
            quantity,
            app,
            dims,
            unique_value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 15, 12, 0, 0).unwrap()
    }

    fn validate(v: Value) -> Result<UsageEvent, Vec<FieldError>> {
        let m = v.as_object().unwrap().clone();
        UsageEvent::validate(
            &m,
            &MeterCatalog::default_catalog(),
            &AcceptWindow::at(now()),
        )
    }

    fn compute(q: Value) -> Value {
        json!({"specversion":"1.0","id":"e1","source":"inv","type":"tally.compute","subject":"cus_1",
               "time":"2026-11-15T11:00:00Z",
               "data":{"app":"web","instance_type":"t4g.nano","region":"fra","instance_seconds":q}})
    }

    #[test]
    fn valid_compute_event() {
        let e = validate(compute(json!(60))).unwrap();
        assert_eq!(e.customer, "cus_1");
        assert_eq!(e.records.len(), 1);
        let r = &e.records[0];
        assert_eq!((r.meter.as_str(), r.app.as_str()), ("compute", "web"));
        assert_eq!(r.quantity, Decimal::from(60));
        assert_eq!(
            r.dims_json(),
            r#"{"instance_type":"t4g.nano","region":"fra"}"#
        );
    }

    #[test]
    fn decimal_strings_are_exact() {
        let e = validate(compute(json!("0.000000000001"))).unwrap();
        assert_eq!(e.records[0].quantity.to_string(), "0.000000000001");
        let e = validate(compute(json!(1.5))).unwrap();
        assert_eq!(e.records[0].quantity, Decimal::new(15, 1));
    }

    #[test]
    fn every_problem_is_reported() {
        let errs = validate(
            json!({"specversion":"0.3","id":5,"type":"tally.compute","subject":"c",
            "time":"2027-01-01T00:00:00Z","data":{"app":"web","instance_seconds":-1}}),
        )
        .unwrap_err();
        let codes: Vec<(&str, &str)> = errs.iter().map(|e| (e.field.as_str(), e.code)).collect();
        for want in [
            ("specversion", "invalid_value"),
            ("id", "wrong_type"),
            ("source", "missing_field"),
            ("time", "time_in_future"),
            ("data.instance_type", "missing_field"),
            ("data.instance_seconds", "negative_quantity"),
        ] {
            assert!(codes.contains(&want), "missing {want:?} in {codes:?}");
        }
    }

    #[test]
    fn window_bounds() {
        let w = AcceptWindow::at(now());
        assert_eq!(
            w.not_before,
            Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap()
        );
        let jan = Utc.with_ymd_and_hms(2027, 1, 10, 0, 0, 0).unwrap();
        assert_eq!(
            previous_month_start(jan),
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
        );
        let mut old = compute(json!(1));
        old["time"] = json!("2026-09-30T23:59:59Z");
        assert_eq!(validate(old).unwrap_err()[0].code, "time_before_window");
    }

    #[test]
    fn unknown_type_and_bad_quantities() {
        let mut e = compute(json!(1));
        e["type"] = json!("tally.gpu");
        assert_eq!(validate(e).unwrap_err()[0].code, "unknown_event_type");
        for (q, code) in [
            (json!("1e5"), "invalid_value"),
            (json!(true), "wrong_type"),
            (json!("0.0000000000001"), "invalid_value"),
            (json!("1.2.3"), "invalid_value"),
        ] {
            let errs = validate(compute(q.clone())).unwrap_err();
            assert_eq!(errs[0].code, code, "{q}");
        }
    }

    #[test]
    fn batch_shapes() {
        assert_eq!(parse_batch(b"[]").unwrap_err(), EventError::EmptyBatch);
        assert_eq!(parse_batch(b"{").unwrap_err().code(), "malformed_json");
        assert_eq!(parse_single(b"[1]").unwrap_err().code(), "wrong_shape");
        let b = parse_batch(br#"[{"a":1}, 3]"#).unwrap();
        assert!(b[0].is_ok() && b[1].is_err());
    }
}
