//! Ingest authentication: bearer keys, stored as SHA-256 hashes in the
//! config and compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Default)]
pub struct KeySet {
    hashes: Vec<[u8; 32]>,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl KeySet {
    /// From hex SHA-256 digests of the keys.
    pub fn from_hex(hex_hashes: &[String]) -> Result<Self, String> {
        let mut hashes = Vec::new();
        for (i, h) in hex_hashes.iter().enumerate() {
            let bytes =
                hex::decode(h).map_err(|e| format!("auth.key_sha256[{i}]: not hex: {e}"))?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| format!("auth.key_sha256[{i}]: must be 32 bytes (64 hex chars)"))?;
            hashes.push(arr);
        }
        Ok(Self { hashes })
    }

    /// Whether the `Authorization` header value carries a known key. Every
    /// stored hash is compared, so timing does not reveal which matched.
    pub fn check_header(&self, header: Option<&str>) -> bool {
        let Some(key) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let h = hash_key(key.trim());
        let mut ok = 0u8;
        for stored in &self.hashes {
            ok |= stored.ct_eq(&h).unwrap_u8();
        }
        ok == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_exactly() {
        let ks = KeySet::from_hex(&[hex::encode(hash_key("secret-1"))]).unwrap();
        assert!(ks.check_header(Some("Bearer secret-1")));
        assert!(!ks.check_header(Some("Bearer secret-2")));
        assert!(!ks.check_header(Some("secret-1")));
        assert!(!ks.check_header(None));
        assert!(KeySet::from_hex(&["zz".into()]).is_err());
    }
}
