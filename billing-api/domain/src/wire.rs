//! Money and instants on the wire: how request bodies and catalog files
//! are read into `Decimal`s, and how instants are held to the stored
//! precision.
//!
//! **Decimals are read from their text, or refused.** `rust_decimal`'s own
//! `Deserialize` (this workspace enables `serde-with-str`, which leaves the
//! default impl on `deserialize_any`) takes a JSON number through an `f64`:
//! `0.1000000000000000055` or `123456789012.123456` arrive rounded. Every
//! amount, price, quantity or cap the billing API and the catalog read is a
//! decimal string (as `schemas/openapi.json` says), so the fields use
//! [`decimal`] / [`opt_decimal`], which accept only a string of the plain
//! form `-?D+(.D+)?` (no exponent, `+`, `_`, blanks or leading zeros) that
//! `Decimal` holds exactly (at most 28 significant digits), and refuse a JSON
//! number with a message that says to send it as a string. serde_json's
//! `arbitrary_precision` is deliberately not enabled: it would change
//! `serde_json::Value` for every crate of the workspace. Whether a negative
//! zero (`"-0"`) is acceptable is the field's rule (caps and prices refuse
//! it).
//!
//! **Instants are microseconds.** The state stores keep microseconds
//! (PostgreSQL `timestamptz`, SQLite text), so an instant the API takes from
//! the clock is truncated to microseconds before it is stored or answered
//! ([`to_micros`]; billing-api's `wire::now` is the clock at that precision), and an instant in a request body with a finer part is refused
//! ([`instant`], [`opt_instant`]): what the API answers is what it stored.

use chrono::{DateTime, Timelike, Utc};
use rust_decimal::Decimal;
use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::fmt;

/// Parses the plain decimal text `-?D+(.D+)?` exactly; the error says why not.
pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
        return Err(format!(
            "{s:?} is not a decimal number like \"12.50\" (digits, an optional '-' and '.', no exponent)"
        ));
    }
    if int.len() > 1 && int.starts_with('0') {
        return Err(format!("{s:?} has a leading zero"));
    }
    // `Decimal` drops the sign of a negative zero, so it is refused here,
    // where the text still shows it.
    if s.starts_with('-') && digits.bytes().all(|b| b == b'0' || b == b'.') {
        return Err(format!("{s:?} is a negative zero; zero is written \"0\""));
    }
    Decimal::from_str_exact(s).map_err(|_| {
        format!("{s:?} has more digits than a decimal holds exactly (28 significant digits)")
    })
}

struct Strict;

impl<'de> Visitor<'de> for Strict {
    type Value = Decimal;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a decimal string such as \"12.50\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Decimal, E> {
        parse_decimal(v).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Decimal, E> {
        Err(number(&v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Decimal, E> {
        Err(number(&v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Decimal, E> {
        // Not echoed: the f64 may already differ from the number sent.
        Err(E::custom(
            "a JSON number where a decimal string is required: send the value as a string \
             (numbers are refused so that no value passes through a float)",
        ))
    }
}

fn number<E: de::Error>(v: &str) -> E {
    E::custom(format!(
        "a JSON number where a decimal string is required: send it as \"{v}\" \
         (numbers are refused so that no value passes through a float)"
    ))
}

/// Prefixes a deserializer's error with the field's name, for fields that
/// serde reaches through `flatten` or an internally tagged enum, where the
/// error path ends at the enclosing object.
pub fn named<'de, D: Deserializer<'de>, T>(
    field: &str,
    r: Result<T, D::Error>,
) -> Result<T, D::Error> {
    r.map_err(|e| de::Error::custom(format!("{field}: {e}")))
}

struct StrictDecimal(Decimal);

impl<'de> Deserialize<'de> for StrictDecimal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Strict).map(StrictDecimal)
    }
}

/// `#[serde(deserialize_with = "crate::wire::decimal")]`: a decimal string, exactly.
pub fn decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    d.deserialize_any(Strict)
}

/// [`decimal`] for an `Option<Decimal>` (`null` is `None`).
pub fn opt_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    Ok(Option::<StrictDecimal>::deserialize(d)?.map(|s| s.0))
}

/// The stored precision of instants.
pub fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    // (Not `duration_trunc`: it fails past 2262, where nanoseconds since
    // 1970 leave an i64.)
    t.with_nanosecond(t.nanosecond() / 1000 * 1000)
        .expect("a smaller nanosecond of a valid instant")
}

fn exact_micros<E: de::Error>(t: DateTime<Utc>) -> Result<DateTime<Utc>, E> {
    if to_micros(t) == t {
        Ok(t)
    } else {
        Err(E::custom(format!(
            "{} is finer than the stored precision (microseconds)",
            t.to_rfc3339()
        )))
    }
}

/// An RFC 3339 instant of at most microsecond precision.
pub fn instant<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    exact_micros(DateTime::<Utc>::deserialize(d)?)
}

/// [`instant`] for an `Option` (`null` is `None`).
pub fn opt_instant<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    Option::<DateTime<Utc>>::deserialize(d)?
        .map(exact_micros)
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    struct Body {
        #[serde(deserialize_with = "decimal")]
        v: Decimal,
        #[serde(default, deserialize_with = "opt_decimal")]
        o: Option<Decimal>,
    }

    fn read(s: &str) -> Result<Body, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn decimal_strings_are_read_exactly() {
        let b = read(r#"{"v":"123456789012.123456","o":"9007199254740993.5"}"#).unwrap();
        assert_eq!(b.v.to_string(), "123456789012.123456");
        assert_eq!(b.o.unwrap().to_string(), "9007199254740993.5");
        assert_eq!(
            read(r#"{"v":"0.50","o":null}"#).unwrap().v.to_string(),
            "0.50"
        );
        assert!(read(r#"{"v":"1"}"#).unwrap().o.is_none());
    }

    #[test]
    fn json_numbers_are_refused_never_rounded() {
        // Through the f64 these would become 123456789012.12346 and
        // 9007199254740994; integers are refused too (the document says string).
        for body in [
            r#"{"v":123456789012.123456}"#,
            r#"{"v":"1","o":9007199254740993.5}"#,
            r#"{"v":15}"#,
            r#"{"v":-0}"#,
        ] {
            let e = read(body).unwrap_err();
            assert!(e.contains("decimal string is required"), "{body}: {e}");
        }
    }

    #[test]
    fn only_plain_decimal_text_is_accepted() {
        for bad in [
            "",
            "-",
            "1e3",
            "1E-2",
            "+1",
            " 1",
            "1 ",
            "1_000",
            ".5",
            "5.",
            "007",
            "0x10",
            "NaN",
            "1.2.3",
            // 30 significant digits: Decimal::from_str would round it.
            "1.00000000000000000000000000001",
            "-0",
            "-0.00",
            "-00",
        ] {
            assert!(parse_decimal(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "0",
            "0.00",
            "-0.01",
            "0.000000000001",
            "-12.50",
            "79228162514264337593543950335",
        ] {
            assert_eq!(parse_decimal(good).unwrap().to_string(), good);
        }
    }

    #[test]
    fn instants_finer_than_microseconds_are_refused() {
        #[derive(Deserialize)]
        struct T {
            #[serde(default, deserialize_with = "opt_instant")]
            at: Option<DateTime<Utc>>,
        }
        let ok: T = serde_json::from_str(r#"{"at":"2026-11-05T10:00:00.123456Z"}"#).unwrap();
        assert_eq!(ok.at.unwrap().timestamp_subsec_nanos(), 123_456_000);
        let e = serde_json::from_str::<T>(r#"{"at":"2026-11-05T10:00:00.1234567Z"}"#)
            .err()
            .unwrap();
        assert!(e.to_string().contains("microseconds"), "{e}");
        assert!(serde_json::from_str::<T>("{}").unwrap().at.is_none());
    }
}
