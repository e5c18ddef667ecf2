//! Meter definitions as data.
//!
//! A meter says which CloudEvent `type` it reads, where the quantity is in
//! `data` (a dotted path), which `data` fields become dimensions, and how
//! quantities combine. The default catalog (`meters.json`) holds the meters a
//! PaaS needs; an operator can load another file with the same shape.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Sum of the quantities.
    Sum,
    /// Number of events; the value path is ignored.
    Count,
    /// Largest quantity.
    Max,
    /// Quantity of the event with the latest `time`.
    Latest,
    /// Number of distinct values at the value path (strings or numbers).
    UniqueCount,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimension {
    /// Name used in rollups and queries.
    pub name: String,
    /// Dotted path inside `data`.
    pub path: String,
    /// An event without it is rejected.
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterDef {
    /// Stable key, e.g. `compute`.
    pub key: String,
    /// CloudEvent `type` this meter reads.
    pub event_type: String,
    /// Unit of the stored quantity, e.g. `instance_second`.
    pub unit: String,
    /// Dotted path inside `data` to the quantity (absent for `count`).
    #[serde(default)]
    pub value_path: Option<String>,
    pub aggregation: Aggregation,
    #[serde(default)]
    pub dimensions: Vec<Dimension>,
    /// The quantity is a whole number (e.g. seats): a fractional value is
    /// refused, by the JSON Schema and by validation alike.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub integer: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterCatalog {
    pub meters: Vec<MeterDef>,
}

/// Name of the dimension every rollup keeps in its own column.
pub const APP_DIMENSION: &str = "app";

impl MeterCatalog {
    /// The default catalog shipped in `schemas/meters.json`.
    pub fn default_catalog() -> Self {
        Self::from_json(include_str!("../meters.json")).expect("built-in meters.json is valid")
    }

    /// The catalog every binary starts with: the meter file at `path` when
    /// one is given (`--meters-file`), the default catalog otherwise. An
    /// error names the file, and says whether it could not be read or
    /// which definitions are wrong.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Self::default_catalog());
        };
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let cat: MeterCatalog = serde_json::from_str(text).map_err(|e| format!("meters: {e}"))?;
        cat.validate()?;
        Ok(cat)
    }

    /// Checks every definition; reports all problems at once.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut keys = BTreeSet::new();
        for (i, m) in self.meters.iter().enumerate() {
            let at = format!("meters[{i}]");
            if m.key.is_empty() || !m.key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                problems.push(format!("{at}.key: must be non-empty [A-Za-z0-9_]"));
            }
            if !keys.insert(m.key.clone()) {
                problems.push(format!("{at}.key: duplicate meter key {:?}", m.key));
            }
            if m.event_type.is_empty() {
                problems.push(format!("{at}.event_type: must not be empty"));
            }
            match (m.aggregation, &m.value_path) {
                (Aggregation::Count, _) => {}
                (_, None) => problems.push(format!(
                    "{at}.value_path: required for aggregation {:?}",
                    m.aggregation
                )),
                (_, Some(p)) if p.is_empty() => {
                    problems.push(format!("{at}.value_path: must not be empty"))
                }
                _ => {}
            }
            let mut dims = BTreeSet::new();
            for (j, d) in m.dimensions.iter().enumerate() {
                if d.name.is_empty() || d.path.is_empty() {
                    problems.push(format!("{at}.dimensions[{j}]: name and path are required"));
                }
                if !dims.insert(d.name.clone()) {
                    problems.push(format!("{at}.dimensions[{j}].name: duplicate {:?}", d.name));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    pub fn get(&self, key: &str) -> Option<&MeterDef> {
        self.meters.iter().find(|m| m.key == key)
    }

    /// Meters reading events of this type.
    pub fn for_type<'a>(&'a self, event_type: &'a str) -> impl Iterator<Item = &'a MeterDef> + 'a {
        self.meters
            .iter()
            .filter(move |m| m.event_type == event_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reads_the_file_or_falls_back_to_the_default() {
        assert_eq!(
            MeterCatalog::load(None).unwrap().meters.len(),
            MeterCatalog::default_catalog().meters.len()
        );
        let dir = std::env::temp_dir().join(format!("tally-meters-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let one = dir.join("one.json");
        let mut cat = MeterCatalog::default_catalog();
        cat.meters.truncate(1);
        std::fs::write(&one, serde_json::to_string(&cat).unwrap()).unwrap();
        assert_eq!(MeterCatalog::load(Some(&one)).unwrap().meters.len(), 1);

        let missing = dir.join("missing.json");
        let err = MeterCatalog::load(Some(&missing)).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: ", missing.display())),
            "{err}"
        );

        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"meters":[{"key":""}]}"#).unwrap();
        let err = MeterCatalog::load(Some(&bad)).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: meters", bad.display())),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_catalog_is_valid_and_has_paas_meters() {
        let c = MeterCatalog::default_catalog();
        for k in ["compute", "disk", "requests", "egress", "seats"] {
            assert!(c.get(k).is_some(), "missing meter {k}");
        }
        assert_eq!(c.get("seats").unwrap().aggregation, Aggregation::Latest);
    }

    #[test]
    fn invalid_catalog_reports_every_problem() {
        let err = MeterCatalog::from_json(
            r#"{"meters":[{"key":"a","event_type":"t","unit":"u","aggregation":"sum"},
                          {"key":"a","event_type":"","unit":"u","aggregation":"count"}]}"#,
        )
        .unwrap_err();
        assert!(err.contains("value_path: required"), "{err}");
        assert!(err.contains("duplicate meter key"), "{err}");
        assert!(err.contains("event_type: must not be empty"), "{err}");
    }
}
