//! Deterministic identifiers.
//!
//! Sources that derive usage from state (inventory samplers, counter
//! scrapers) must give the same event the same `id` whoever computes it and
//! however often, so that overlapping collectors and restarts collapse into
//! one event at the aggregator's deduplication. The id is a hash of the parts
//! that identify the usage, never of the time the collector happened to run.

use sha2::{Digest, Sha256};

/// The longest customer id (and other id the APIs accept).
pub const MAX_ID_LEN: usize = 128;

/// The id grammar, the one home of it: 1 to [`MAX_ID_LEN`] characters of
/// A-Z a-z 0-9 and `_ - . : @`. An event's `subject` (the customer id), a
/// customer's id and external id, and an app name all follow it.
pub fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b))
}

/// Hex SHA-256 (first 32 hex chars) over the parts, separated so that
/// `("ab","c")` and `("a","bc")` differ.
pub fn deterministic_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_one_grammar() {
        for ok in ["cus_1", "a", "org:team@x.y-z", &"x".repeat(MAX_ID_LEN)] {
            assert!(is_id(ok), "{ok}");
        }
        for bad in ["", "a b", "é", "a/b", "a\n", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(!is_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn separation_matters() {
        assert_ne!(
            deterministic_id(&["ab", "c"]),
            deterministic_id(&["a", "bc"])
        );
        assert_eq!(deterministic_id(&["a", "b"]), deterministic_id(&["a", "b"]));
        assert_eq!(deterministic_id(&["x"]).len(), 32);
    }
}
