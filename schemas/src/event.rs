//! The usage event: a CloudEvents 1.0 JSON envelope whose `data` carries the
//! quantity and dimensions of one or more meters.
//!
//! Parsing is split in two: the body is first read as JSON (a malformed body
//! fails the whole request), then each event is validated on its own and
//! either becomes a [`UsageEvent`] or yields every [`FieldError`] it has, so a
//! batch can be answered event by event. The collector and the aggregator run
//! the same [`UsageEvent::validate`], so nothing the collector accepts is
//! judged differently downstream.

use crate::json;
use crate::meter::{Aggregation, MeterCatalog, MeterDef, APP_DIMENSION};
use chrono::{DateTime, Datelike, Duration, SecondsFormat, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::value::RawValue;
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

/// One event of a body after strict reading: its object, or the problems
/// that keep it from being read as sent (not an object, an inexact number).
pub type ParsedEvent = Result<RawEvent, Vec<FieldError>>;

fn top_level(body: &[u8]) -> Result<&RawValue, EventError> {
    serde_json::from_slice::<&RawValue>(body).map_err(|e| EventError::MalformedJson(e.to_string()))
}

/// Reads one event object strictly ([`crate::json`]): a duplicate key is
/// malformed JSON; a number that would not keep its exact value is a field
/// error of the event (`inexact_number`), never rounded.
fn parse_event(raw: &RawValue) -> Result<ParsedEvent, EventError> {
    if !raw.get().starts_with('{') {
        return Ok(Err(vec![FieldError::new(
            "",
            "wrong_type",
            format!("event must be a JSON object, got {}", json::kind_of(raw)),
        )]));
    }
    let mut reading = json::Reading::default();
    let value = json::read(raw, "", &mut reading).map_err(EventError::MalformedJson)?;
    if !reading.inexact.is_empty() {
        return Ok(Err(reading
            .inexact
            .into_iter()
            .map(|n| {
                FieldError::new(
                    n.path,
                    "inexact_number",
                    format!(
                        "the number {} has more significant digits than a JSON number keeps exactly; \
                         send it as a decimal string (\"{}\") to keep every digit",
                        n.text, n.text
                    ),
                )
            })
            .collect()));
    }
    match value {
        Value::Object(m) => Ok(Ok(m)),
        _ => unreachable!("an object's text reads as an object"),
    }
}

/// Parses a `application/cloudevents+json` body: exactly one event object.
pub fn parse_single(body: &[u8]) -> Result<ParsedEvent, EventError> {
    let raw = top_level(body)?;
    if !raw.get().starts_with('{') {
        return Err(EventError::WrongShape {
            expected: "a JSON object",
            got: json::kind_of(raw),
        });
    }
    parse_event(raw)
}

/// Parses a `application/cloudevents-batch+json` body: a non-empty array.
/// Elements that are not objects are kept as errors so the per-event answer
/// keeps its indexes. A duplicate key anywhere makes the whole body
/// malformed, as it does for the billing API.
pub fn parse_batch(body: &[u8]) -> Result<Vec<ParsedEvent>, EventError> {
    let raw = top_level(body)?;
    if !raw.get().starts_with('[') {
        return Err(EventError::WrongShape {
            expected: "a JSON array",
            got: json::kind_of(raw),
        });
    }
    let items: Vec<&RawValue> =
        serde_json::from_str(raw.get()).map_err(|e| EventError::MalformedJson(e.to_string()))?;
    if items.is_empty() {
        return Err(EventError::EmptyBatch);
    }
    items.into_iter().map(parse_event).collect()
}

/// The CloudEvents extension attribute the collector sets on every event it
/// accepts: the instant (RFC 3339, microseconds, UTC) at which the event's
/// time was judged against the [`AcceptWindow`]. Whatever a client sends
/// under this name is replaced. The aggregator judges the event against the
/// window of that instant, not of the moment it happens to process it, so
/// an event answered 2xx before a month boundary and processed after it
/// (Kafka lag, a spool replay, a batch waiting on its commit) is counted,
/// never dead-lettered. Events without it (written to Kafka by something
/// other than a collector) are judged at processing time.
pub const ACCEPTED_AT: &str = "tallyacceptedat";

/// Records in `ev` that it was accepted at `at` (see [`ACCEPTED_AT`]).
pub fn stamp_accepted(ev: &mut RawEvent, at: DateTime<Utc>) {
    ev.insert(
        ACCEPTED_AT.to_owned(),
        Value::String(at.to_rfc3339_opts(SecondsFormat::Micros, true)),
    );
}

/// The instant `ev` was accepted at, if it carries one (see [`ACCEPTED_AT`]).
pub fn accepted_at(ev: &RawEvent) -> Result<Option<DateTime<Utc>>, FieldError> {
    match ev.get(ACCEPTED_AT) {
        None => Ok(None),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| {
                FieldError::new(
                    ACCEPTED_AT,
                    "invalid_value",
                    format!("`{ACCEPTED_AT}` is not RFC 3339: {e}"),
                )
            }),
        Some(v) => Err(FieldError::new(
            ACCEPTED_AT,
            "wrong_type",
            format!("`{ACCEPTED_AT}` must be a string, got {}", kind(v)),
        )),
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

    /// The window `ev` was accepted in: at its [`ACCEPTED_AT`] stamp, or at
    /// `now` when it carries none.
    pub fn of_event(ev: &RawEvent, now: DateTime<Utc>) -> Result<Self, FieldError> {
        Ok(Self::at(accepted_at(ev)?.unwrap_or(now)))
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

/// Whether `s` is a quantity string the published schema allows:
/// `^[0-9]{1,16}(\.[0-9]{1,12})?$` (no sign, no exponent, at most 16
/// integer and 12 fractional digits), or `^[0-9]{1,16}$` for a meter of
/// whole numbers.
fn quantity_string_ok(s: &str, whole: bool) -> bool {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let digits = |t: &str, max: u32| {
        !t.is_empty() && t.len() as u32 <= max && t.bytes().all(|b| b.is_ascii_digit())
    };
    digits(int, QUANTITY_MAX_INTEGER_DIGITS)
        && match frac {
            None => true,
            Some(f) => !whole && digits(f, QUANTITY_SCALE),
        }
}

/// Parses a quantity: a JSON number (non-negative, below 10^16, at most
/// [`QUANTITY_SCALE`] decimal places once trailing zeros are dropped) or a
/// decimal string of the schema's form (see `quantity_string_ok`). A meter
/// of whole numbers (`integer` in its definition, e.g. seats) takes only
/// values without a fractional part. Numbers reach here exact: the body
/// reader refuses any whose text an `f64` would round ([`crate::json`]).
pub fn parse_quantity(v: &Value, whole: bool) -> Result<Decimal, (&'static str, String)> {
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
            if !quantity_string_ok(s, whole) {
                return Err((
                    "invalid_value",
                    if whole {
                        format!("quantity {s:?} must be a whole number: 1 to {QUANTITY_MAX_INTEGER_DIGITS} digits")
                    } else {
                        format!(
                            "quantity {s:?} must be a decimal: 1 to {QUANTITY_MAX_INTEGER_DIGITS} digits, \
                             optionally a point and 1 to {QUANTITY_SCALE} more, no sign or exponent"
                        )
                    },
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
    let d = d.normalize();
    if d.scale() > QUANTITY_SCALE {
        return Err((
            "invalid_value",
            format!("quantity {d} has more than {QUANTITY_SCALE} decimal places"),
        ));
    }
    if whole && d.scale() > 0 {
        return Err((
            "invalid_value",
            format!("quantity {d} must be a whole number"),
        ));
    }
    if d.trunc() >= Decimal::from_i128_with_scale(10i128.pow(QUANTITY_MAX_INTEGER_DIGITS), 0) {
        return Err(("invalid_value", format!("quantity {d} is too large")));
    }
    // `-0` as a number is zero; never store a negative zero.
    Ok(if d.is_zero() { Decimal::ZERO } else { d })
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
            if !crate::ids::is_id(s) {
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
                    Some(v) => match parse_quantity(v, def.integer) {
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
            (json!("-0"), "invalid_value"),
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
        assert_eq!(parse_batch(b"{}").unwrap_err().code(), "wrong_shape");
        assert_eq!(parse_single(b"[1]").unwrap_err().code(), "wrong_shape");
        let b = parse_batch(br#"[{"a":1}, 3]"#).unwrap();
        assert!(b[0].is_ok() && b[1].is_err());
        assert_eq!(b[1].as_ref().unwrap_err()[0].code, "wrong_type");
    }

    fn body(q: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"e1","source":"r","type":"tally.egress","subject":"cus_1",
               "time":"2026-11-15T11:00:00Z","data":{{"app":"web","bytes":{q}}}}}"#
        )
    }

    #[test]
    fn duplicate_keys_are_malformed() {
        for dup in [
            r#"{"subject":"m1","id":"1","subject":"m2"}"#,
            r#"{"data":{"count":1,"count":2}}"#,
        ] {
            let e = parse_single(dup.as_bytes()).unwrap_err();
            assert_eq!(e.code(), "malformed_json", "{dup}");
            assert!(e.to_string().contains("duplicate key"), "{e}");
        }
        let batch = format!("[{},{}]", body("1"), r#"{"id":"a","id":"b"}"#);
        assert_eq!(
            parse_batch(batch.as_bytes()).unwrap_err().code(),
            "malformed_json"
        );
    }

    #[test]
    fn numbers_are_read_exactly_or_refused() {
        let meters = MeterCatalog::default_catalog();
        let w = AcceptWindow::at(now());
        let bytes = |q: &str| -> Result<Decimal, Vec<FieldError>> {
            let raw = parse_single(body(q).as_bytes()).unwrap()?;
            Ok(UsageEvent::validate(&raw, &meters, &w)?.records[0].quantity)
        };
        for q in [
            "123456789012.123456",
            "9007199254740993.5",
            "18446744073709551616",
        ] {
            let errs = bytes(q).unwrap_err();
            assert_eq!(
                (errs[0].field.as_str(), errs[0].code),
                ("data.bytes", "inexact_number"),
                "{q}"
            );
            assert!(errs[0].message.contains(q), "{}", errs[0].message);
        }
        // The same values as strings are exact.
        assert_eq!(
            bytes(r#""123456789012.123456""#).unwrap().to_string(),
            "123456789012.123456"
        );
        assert_eq!(
            bytes("9007199254740993").unwrap().to_string(),
            "9007199254740993"
        );
        assert_eq!(bytes("123.25").unwrap().to_string(), "123.25");
        assert_eq!(bytes("-0").unwrap().to_string(), "0");
    }

    #[test]
    fn quantity_strings_follow_the_schema() {
        for (q, ok) in [
            ("0", true),
            ("0001", true),
            ("9999999999999999.999999999999", true),
            ("-0", false),
            ("1.0000000000000", false),
            ("00000000000000001", false),
            ("+1", false),
            (".5", false),
            ("1.", false),
            ("1e5", false),
            ("", false),
        ] {
            assert_eq!(parse_quantity(&json!(q), false).is_ok(), ok, "{q:?}");
        }
        assert!(parse_quantity(&json!("3"), true).is_ok());
        assert!(parse_quantity(&json!(3.0), true).is_ok());
        for q in [json!("1.5"), json!("2.0"), json!(1.5)] {
            assert_eq!(
                parse_quantity(&q, true).unwrap_err().0,
                "invalid_value",
                "{q}"
            );
        }
    }

    #[test]
    fn fractional_seats_are_refused() {
        let mut e = json!({"specversion":"1.0","id":"s1","source":"billing","type":"tally.seats",
                           "subject":"cus_1","time":"2026-11-15T11:00:00Z","data":{"seats":1.5}});
        assert_eq!(validate(e.clone()).unwrap_err()[0].field, "data.seats");
        e["data"]["seats"] = json!(2);
        assert_eq!(validate(e).unwrap().records[0].quantity, Decimal::from(2));
    }

    #[test]
    fn the_window_is_the_one_of_acceptance() {
        let mut ev = compute(json!(1)).as_object().unwrap().clone();
        ev["time"] = json!("2026-10-15T00:00:00Z");
        let accepted = Utc.with_ymd_and_hms(2026, 11, 30, 23, 59, 59).unwrap();
        let later = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 5).unwrap();
        let meters = MeterCatalog::default_catalog();
        // Judged when processed, an unstamped event is out of the window ...
        let w = AcceptWindow::of_event(&ev, later).unwrap();
        assert_eq!(
            UsageEvent::validate(&ev, &meters, &w).unwrap_err()[0].code,
            "time_before_window"
        );
        // ... stamped at its acceptance, it is judged as the collector did.
        stamp_accepted(&mut ev, accepted);
        assert_eq!(accepted_at(&ev).unwrap(), Some(accepted));
        let w = AcceptWindow::of_event(&ev, later).unwrap();
        assert_eq!(w, AcceptWindow::at(accepted));
        assert!(UsageEvent::validate(&ev, &meters, &w).is_ok());
        ev[ACCEPTED_AT] = json!(5);
        assert_eq!(
            AcceptWindow::of_event(&ev, later).unwrap_err().field,
            ACCEPTED_AT
        );
    }
}
