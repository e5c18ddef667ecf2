//! The JSON Schema (`usage-event.schema.json`) and the Rust validation must
//! agree on which events are valid. The corpus keeps event times inside the
//! window of a fixed instant, since the rolling window is not expressible in
//! JSON Schema.

use chrono::{TimeZone, Utc};
use schemas::{parse_single, AcceptWindow, MeterCatalog, UsageEvent};
use serde_json::value::RawValue;
use serde_json::Value;

#[derive(serde::Deserialize)]
struct Case<'a> {
    name: &'a str,
    valid: bool,
    #[serde(borrow)]
    event: &'a RawValue,
}

#[test]
fn schema_and_rust_validation_agree_on_corpus() {
    let schema: Value = serde_json::from_str(include_str!("../usage-event.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    // Each event is handed to Rust as the text it is in the corpus, through
    // the same strict reader the collector uses, and to the schema as JSON.
    let corpus: Vec<Case> = serde_json::from_str(include_str!("corpus.json")).unwrap();
    let meters = MeterCatalog::default_catalog();
    let window = AcceptWindow::at(Utc.with_ymd_and_hms(2026, 11, 15, 0, 0, 0).unwrap());
    let (mut valid, mut invalid) = (0, 0);
    for case in &corpus {
        let (name, expected) = (case.name, case.valid);
        let event: Value = serde_json::from_str(case.event.get()).unwrap();
        let by_schema = validator.is_valid(&event);
        let by_rust = parse_single(case.event.get().as_bytes())
            .expect("corpus events are JSON objects")
            .and_then(|raw| UsageEvent::validate(&raw, &meters, &window));
        assert_eq!(
            by_schema, expected,
            "schema disagrees with corpus on {name:?}"
        );
        assert_eq!(
            by_rust.is_ok(),
            expected,
            "rust disagrees with corpus on {name:?}: {by_rust:?}"
        );
        if expected {
            valid += 1
        } else {
            invalid += 1
        }
    }
    assert!(
        valid >= 10 && invalid >= 25,
        "corpus too small: {valid} valid, {invalid} invalid"
    );
}
