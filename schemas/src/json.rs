//! Strict reading of JSON request bodies.
//!
//! `serde_json::Value` keeps the last of two equal keys and turns every
//! number that is neither a `u64` nor an `i64` into an `f64`, so
//! `{"count":1,"count":2}` and `123456789012.123456` would be read as
//! something other than what was sent. Usage and money must never change on
//! the way in, so bodies are read through [`read`] instead: it walks the
//! document with [`RawValue`] (the text of each value as sent), refuses a
//! duplicate key anywhere as malformed JSON, and reports every number whose
//! text denotes a value the parsed number does not hold exactly (more
//! significant digits than an `f64` keeps). Such a number is never rounded:
//! the caller refuses the event, naming the field, and the sender can pass
//! the same value as a decimal string, which is read exactly.
//!
//! A number that passes is one whose `serde_json::Number` prints (shortest
//! round-trip form) to the same decimal value as its text, so every later
//! `Decimal` parse of `Number::to_string()` is exact.
//!
//! Most documents hold no number that could be inexact, and no duplicate
//! key: those are read in one pass ([`fast`]). A document is read that way
//! only when a scan of its text ([`every_number_is_exact`]) shows each of its
//! numbers to be one an `f64` or an integer holds exactly; one pass building
//! the value refuses a duplicate key. Anything else (a duplicate, a long or
//! exponent number) goes through the walk above, which names the field.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};
use std::fmt;

/// The object's entries in the order sent, duplicates kept, values unparsed.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Entries<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(8));
                while let Some((k, v)) = m.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A number whose text means a different value from the number read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InexactNumber {
    /// Dotted path of the field, e.g. `data.bytes` (`[3]` for array items).
    pub path: String,
    /// The number as it was sent.
    pub text: String,
}

/// What [`read`] found besides the value.
#[derive(Debug, Default)]
pub struct Reading {
    pub inexact: Vec<InexactNumber>,
}

/// The JSON type a value's first byte announces (for shape errors).
pub fn kind_of(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't') | Some(b'f') => "boolean",
        Some(b'n') => "null",
        _ => "number",
    }
}

/// Reads one value strictly. `Err` is a message for a malformed document (a
/// duplicate key); inexact numbers are collected in `reading` and kept as
/// parsed, for the caller to refuse.
pub fn read(raw: &RawValue, path: &str, reading: &mut Reading) -> Result<Value, String> {
    let text = raw.get();
    if every_number_is_exact(text) {
        if let Ok(v) = fast(text) {
            return Ok(v);
        }
    }
    walk(raw, path, reading)
}

/// The walk of [`read`]: each value's text is read again below its parent.
fn walk(raw: &RawValue, path: &str, reading: &mut Reading) -> Result<Value, String> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'{') => {
            let entries: Entries =
                serde_json::from_str(text).map_err(|e| format!("invalid object: {e}"))?;
            let mut map = Map::new();
            for (k, v) in entries.0 {
                let child = join(path, &k);
                let value = walk(v, &child, reading)?;
                if map.insert(k, value).is_some() {
                    return Err(format!("duplicate key `{child}`"));
                }
            }
            Ok(Value::Object(map))
        }
        Some(b'[') => {
            let items: Vec<&RawValue> =
                serde_json::from_str(text).map_err(|e| format!("invalid array: {e}"))?;
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| walk(v, &format!("{path}[{i}]"), reading))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        Some(b'"' | b't' | b'f' | b'n') => {
            serde_json::from_str(text).map_err(|e| format!("invalid value: {e}"))
        }
        _ => {
            let n: Number =
                serde_json::from_str(text).map_err(|e| format!("invalid number: {e}"))?;
            if !exact(text, &n) {
                reading.inexact.push(InexactNumber {
                    path: path.to_owned(),
                    text: text.to_owned(),
                });
            }
            Ok(Value::Number(n))
        }
    }
}

/// Whether every number in the JSON text `text` is one `serde_json` reads
/// exactly whatever its digits: an integer of at most 18 digits (an `i64`
/// or a `u64`), or a numeral with a fraction, no exponent and at most 15
/// significant digits (an `f64` keeps 15, so its shortest form is the
/// numeral's value). `false` says nothing: the number may still be exact.
fn every_number_is_exact(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                // Skip the string, escapes included.
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let (mut digits, mut leading, mut fraction) = (0usize, true, false);
                while i < b.len() {
                    match b[i] {
                        b'0' if leading => {}
                        b'0'..=b'9' => {
                            leading = false;
                            digits += 1;
                        }
                        b'.' => fraction = true,
                        b'e' | b'E' => return false,
                        b'-' | b'+' => {}
                        _ => break,
                    }
                    i += 1;
                }
                if digits > if fraction { 15 } else { 18 } {
                    return false;
                }
            }
            _ => i += 1,
        }
    }
    true
}

/// One pass over `text` into a [`Value`], refusing a duplicate key. Only
/// for texts whose numbers [`every_number_is_exact`] passed.
fn fast(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str::<Strict>(text).map(|s| s.0)
}

/// A [`Value`] read with duplicate keys refused.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0));
        while let Some(Strict(v)) = a.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Value, M::Error> {
        let mut map = Map::new();
        while let Some(k) = m.next_key::<String>()? {
            let Strict(v) = m.next_value()?;
            if map.insert(k, v).is_some() {
                return Err(serde::de::Error::custom("duplicate key"));
            }
        }
        Ok(Value::Object(map))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Whether `n` holds exactly the value `text` denotes.
pub fn exact(text: &str, n: &Number) -> bool {
    n.is_u64() || n.is_i64() || decimal_value(text) == decimal_value(&n.to_string())
}

/// A decimal numeral's value as (negative, significant digits, exponent),
/// with no leading or trailing zeros in the digits; zero is `(false, "", 0)`.
fn decimal_value(s: &str) -> (bool, String, i64) {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], s[i + 1..].parse::<i64>().unwrap_or(i64::MAX / 2)),
        None => (s, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut exp = exp - frac.len() as i64;
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    exp += (digits.len() - trimmed.len()) as i64;
    if trimmed.is_empty() {
        return (false, String::new(), 0);
    }
    (neg, trimmed.to_owned(), exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(s: &str) -> Result<(Value, Reading), String> {
        let raw: &RawValue = serde_json::from_str(s).unwrap();
        let mut r = Reading::default();
        read(raw, "", &mut r).map(|v| (v, r))
    }

    #[test]
    fn duplicate_keys_at_any_depth_are_malformed() {
        assert_eq!(
            read_str(r#"{"subject":"m1","x":1,"subject":"m2"}"#).unwrap_err(),
            "duplicate key `subject`"
        );
        assert_eq!(
            read_str(r#"{"data":{"count":1,"count":2}}"#).unwrap_err(),
            "duplicate key `data.count`"
        );
        assert!(read_str(r#"[{"a":1},{"a":2}]"#).is_ok());
    }

    #[test]
    fn numbers_are_exact_or_reported() {
        for ok in [
            "0",
            "-0",
            "1.5",
            "0.1",
            "1e5",
            "1E-7",
            "2.50",
            "9007199254740993",
            "18446744073709551615",
            "-9223372036854775808",
            "123456.789",
            "0.000000000001",
        ] {
            let (v, r) = read_str(ok).unwrap();
            assert!(r.inexact.is_empty(), "{ok} reported inexact (read {v})");
        }
        for bad in [
            "123456789012.123456",
            "9007199254740993.5",
            "18446744073709551616",
            "0.12345678901234567890",
        ] {
            let (_, r) = read_str(&format!(r#"{{"data":{{"bytes":{bad}}}}}"#)).unwrap();
            assert_eq!(
                r.inexact,
                vec![InexactNumber {
                    path: "data.bytes".into(),
                    text: bad.into()
                }],
                "{bad}"
            );
        }
    }

    #[test]
    fn the_scan_passes_only_numbers_read_exactly() {
        for exact in [
            r#"{"a":1,"b":-2.5,"c":"1e400 123456789012.123456","d":[0.000000000001]}"#,
            r#"{"n":123456789012345678,"f":123456.789012345,"s":"\"9.99999999999999999\""}"#,
        ] {
            assert!(every_number_is_exact(exact), "{exact}");
        }
        for maybe in [
            "1e5",
            "1234567890123456789",
            "1234567890.1234567",
            r#"{"a":"x\\","b":0.12345678901234567890}"#,
        ] {
            assert!(!every_number_is_exact(maybe), "{maybe}");
        }
    }

    #[test]
    fn one_pass_and_the_walk_read_the_same() {
        for s in [
            r#"{"a":[1,"x",true,null,{"b":2.5}],"c":"\u00e9","d":{"e":-0,"f":"\"}"}}"#,
            r#"[{"a":1},{"a":2},[],{}]"#,
            r#"{"big":18446744073709551615,"neg":-9223372036854775808,"f":0.1}"#,
        ] {
            let raw: &RawValue = serde_json::from_str(s).unwrap();
            let mut r = Reading::default();
            assert_eq!(fast(s).unwrap(), walk(raw, "", &mut r).unwrap(), "{s}");
        }
        assert!(fast(r#"{"a":{"b":1,"b":2}}"#).is_err());
    }

    #[test]
    fn values_are_what_serde_json_reads() {
        let s = r#"{"a":[1,"x",true,null,{"b":2.5}],"c":"\u00e9"}"#;
        let (v, _) = read_str(s).unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(s).unwrap());
    }
}
