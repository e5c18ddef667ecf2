//! Deterministic identifiers.
//!
//! Sources that derive usage from state (inventory samplers, counter
//! scrapers) must give the same event the same `id` whoever computes it and
//! however often, so that overlapping collectors and restarts collapse into
//! one event at the aggregator's deduplication. The id is a hash of the parts
//! that identify the usage, never of the time the collector happened to run.

use sha2::{Digest, Sha256};

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
    fn separation_matters() {
        assert_ne!(
            deterministic_id(&["ab", "c"]),
            deterministic_id(&["a", "bc"])
        );
        assert_eq!(deterministic_id(&["a", "b"]), deterministic_id(&["a", "b"]));
        assert_eq!(deterministic_id(&["x"]).len(), 32);
    }
}
