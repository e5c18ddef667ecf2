//! A secret (an API key, a signing secret, a database password) that never
//! prints: `Debug` and `Display` show `[redacted]`, so a secret inside
//! options, configs or errors cannot reach logs, panics or `--help`
//! output. The value is read only through [`Secret::expose`], at the one
//! place it is used (signing, an Authorization header).

use std::fmt;
use std::str::FromStr;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself: call it where it is used, never to print it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its length in bytes (to check a minimum without exposing it).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// For command-line and environment parsing (clap reads any `FromStr`).
impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_and_exposes_on_request() {
        let s: Secret = "whsec_very_secret_value".parse().unwrap();
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Options {
            key: Option<Secret>,
        }
        let shown = format!(
            "{s} {s:?} {:?} {:#?}",
            Options {
                key: Some(s.clone())
            },
            Options {
                key: Some(s.clone())
            }
        );
        assert!(!shown.contains("very_secret"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        assert_eq!(s.expose(), "whsec_very_secret_value");
        assert_eq!(s.len(), 23);
        assert_eq!(Secret::from("a"), Secret::new(String::from("a")));
    }
}
