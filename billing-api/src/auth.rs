//! Access control: who is calling, and what they may touch.
//!
//! Principals and their credentials:
//!
//! - **API keys** with a role: `admin` (staff), `control-plane` (quota
//!   checks, minting customer sessions), `collector` (ingest; no billing
//!   endpoint), `customer` (scoped to one customer id). A key reads
//!   `tk_<id>_<secret>`: `id` (16 hex digits) finds the record, the secret
//!   (32 random bytes, hex) is never stored; only SHA-256 of the whole key
//!   is, compared in constant time. Keys are shown once at creation,
//!   revocable, and their creation and revocation are audited.
//! - **Bootstrap admin keys** from the configuration
//!   (`--admin-key-sha256`), to create the first keys.
//! - **Customer sessions** for the dashboard: `ts1.<customer>.<expiry unix
//!   seconds>.<hex HMAC-SHA256 of "ts1.<customer>.<expiry>">`, minted by an
//!   admin or control-plane call for at most 24 hours, verified without a
//!   database read; they grant exactly what a customer key grants.
//!
//! Keys are served from memory: the cache is refreshed from the state store
//! every [`KEY_REFRESH`] and at once after a key is created or revoked
//! through this process, so a revocation made through another replica takes
//! effect here within that interval.
//!
//! Denials: no or unknown credentials → 401; a role the endpoint does not
//! admit → 403; a customer principal asking for another customer's data →
//! 404, the same answer as for an id that does not exist, so nothing about
//! other customers leaks.

pub use billing_domain::access::{Denied, Principal, Role};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// How often the key cache is reloaded from the state store.
pub const KEY_REFRESH: Duration = Duration::from_secs(5);
/// Longest customer session a mint may ask for.
pub const MAX_SESSION_SECS: i64 = 24 * 3600;

/// A stored API key (without its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub role: Role,
    /// Set for (and only for) customer keys.
    pub customer_id: Option<String>,
    pub label: String,
    /// SHA-256 (hex) of the whole key.
    #[serde(skip_serializing)]
    #[schema(ignore)]
    pub key_sha256: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Who is calling.
/// A new key: (record to store, the key to show once).
pub fn new_key(role: Role, customer_id: Option<String>, label: String) -> (ApiKey, String) {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let key = format!("tk_{id}_{secret}");
    let rec = ApiKey {
        id,
        role,
        customer_id,
        label,
        key_sha256: hex::encode(Sha256::digest(key.as_bytes())),
        created_at: crate::wire::now(),
        revoked_at: None,
    };
    (rec, key)
}

/// The key id of a `tk_<id>_<secret>` string.
fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("tk_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && !secret.is_empty()).then_some(id)
}

type HmacSha256 = Hmac<Sha256>;

fn session_mac(secret: &[u8], customer: &str, expiry: i64) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("any key size");
    mac.update(format!("ts1.{customer}.{expiry}").as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Mints a customer session token valid until `expiry` (unix seconds).
pub fn mint_session(secret: &[u8], customer: &str, expiry: i64) -> String {
    format!(
        "ts1.{customer}.{expiry}.{}",
        hex::encode(session_mac(secret, customer, expiry))
    )
}

/// The customer of a valid, unexpired session token.
///
/// Exactly one encoding is accepted: the token must equal, byte for byte
/// (compared in constant time), the one `mint_session` gives for its
/// customer and expiry, so an upper-cased MAC or an expiry written
/// `+123`/`0123` is refused. A token whose expiry lies more than
/// `MAX_SESSION_SECS` after `now` is refused too: the 24-hour limit holds
/// when a session is presented, not only when it is minted.
pub fn verify_session(secret: &[u8], token: &str, now: i64) -> Option<String> {
    let rest = token.strip_prefix("ts1.")?;
    let (rest, _mac) = rest.rsplit_once('.')?;
    let (customer, expiry) = rest.rsplit_once('.')?;
    let expiry: i64 = expiry.parse().ok()?;
    let want = mint_session(secret, customer, expiry);
    let ok: bool = token.as_bytes().ct_eq(want.as_bytes()).into();
    let fresh = now < expiry && expiry.saturating_sub(now) <= MAX_SESSION_SECS;
    (ok && fresh).then(|| customer.to_owned())
}

/// Everything that authenticates callers.
pub struct Authenticator {
    /// SHA-256 of each bootstrap admin key.
    pub bootstrap: Vec<[u8; 32]>,
    pub session_secret: Vec<u8>,
    keys: RwLock<HashMap<String, ApiKey>>,
}

impl Authenticator {
    pub fn new(bootstrap: Vec<[u8; 32]>, session_secret: Vec<u8>) -> Self {
        Self {
            bootstrap,
            session_secret,
            keys: RwLock::new(HashMap::new()),
        }
    }

    /// Replaces the cached keys (active ones only).
    pub fn load(&self, keys: Vec<ApiKey>) {
        let map = keys
            .into_iter()
            .filter(|k| k.revoked_at.is_none())
            .map(|k| (k.id.clone(), k))
            .collect();
        *self.keys.write().unwrap() = map;
    }

    pub fn insert(&self, key: ApiKey) {
        self.keys.write().unwrap().insert(key.id.clone(), key);
    }

    pub fn remove(&self, id: &str) {
        self.keys.write().unwrap().remove(id);
    }

    /// Resolves a bearer credential; `None` for anything not valid now.
    pub fn principal(&self, bearer: &str, now: i64) -> Option<Principal> {
        let bearer = bearer.trim();
        if bearer.starts_with("ts1.") {
            return verify_session(&self.session_secret, bearer, now)
                .map(|customer_id| Principal::Customer { customer_id });
        }
        let hash = Sha256::digest(bearer.as_bytes());
        if let Some(id) = key_id(bearer) {
            let keys = self.keys.read().unwrap();
            let k = keys.get(id)?;
            let want = hex::decode(&k.key_sha256).ok()?;
            if !bool::from(want.as_slice().ct_eq(hash.as_slice())) {
                return None;
            }
            return Some(match k.role {
                Role::Admin => Principal::Admin {
                    actor: format!("key:{}", k.id),
                },
                Role::ControlPlane => Principal::ControlPlane {
                    key_id: k.id.clone(),
                },
                Role::Collector => Principal::Collector {
                    key_id: k.id.clone(),
                },
                Role::Customer => Principal::Customer {
                    customer_id: k.customer_id.clone()?,
                },
            });
        }
        let matched = self
            .bootstrap
            .iter()
            .fold(0u8, |acc, k| acc | k.ct_eq(hash.as_slice()).unwrap_u8());
        (matched == 1).then(|| Principal::Admin {
            actor: format!("admin:{}", &hex::encode(hash)[..8]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_accepts_only_the_minted_encoding() {
        let t = mint_session(b"k", "cus_a", 1000);
        assert_eq!(verify_session(b"k", &t, 0), Some("cus_a".into()));
        let (head, mac) = t.rsplit_once('.').unwrap();
        let upper = format!("{head}.{}", mac.to_uppercase());
        assert_ne!(upper, t);
        assert_eq!(verify_session(b"k", &upper, 0), None, "upper-case MAC");
        let mixed = format!("{head}.{}{}", &mac[..1].to_uppercase(), &mac[1..]);
        if mixed != t {
            assert_eq!(verify_session(b"k", &mixed, 0), None, "mixed-case MAC");
        }
        for expiry in ["+1000", "01000"] {
            let odd = format!("ts1.cus_a.{expiry}.{mac}");
            assert_eq!(verify_session(b"k", &odd, 0), None, "{odd}");
        }
        assert_eq!(verify_session(b"k", &format!("{t} "), 0), None);
        assert_eq!(verify_session(b"k2", &t, 0), None, "other secret");
        assert_eq!(verify_session(b"k", &t, 1000), None, "expired");
    }

    #[test]
    fn session_longer_than_24_hours_refused_when_presented() {
        let now = 1_700_000_000;
        let ok = mint_session(b"k", "cus_a", now + MAX_SESSION_SECS);
        assert_eq!(verify_session(b"k", &ok, now), Some("cus_a".into()));
        let long = mint_session(b"k", "cus_a", now + MAX_SESSION_SECS + 1);
        assert_eq!(verify_session(b"k", &long, now), None);
        // The token carries no issue time: once its expiry is within 24 h
        // of now it is a session minting could have given.
        assert_eq!(verify_session(b"k", &long, now + 1), Some("cus_a".into()));
        let years = mint_session(b"k", "cus_a", i64::MAX);
        assert_eq!(verify_session(b"k", &years, now), None);
    }

    #[test]
    fn keys_and_sessions() {
        let auth = Authenticator::new(vec![Sha256::digest(b"boot").into()], b"s3cret".to_vec());
        let (rec, key) = new_key(Role::Customer, Some("cus_a".into()), "dash".into());
        assert!(key.starts_with(&format!("tk_{}_", rec.id)));
        assert_eq!(auth.principal(&key, 0), None, "not loaded yet");
        auth.load(vec![rec.clone()]);
        assert_eq!(
            auth.principal(&key, 0),
            Some(Principal::Customer {
                customer_id: "cus_a".into()
            })
        );
        // Same id, other secret.
        let forged = format!("tk_{}_{}", rec.id, "0".repeat(64));
        assert_eq!(auth.principal(&forged, 0), None);
        auth.remove(&rec.id);
        assert_eq!(auth.principal(&key, 0), None, "revoked");
        assert!(matches!(
            auth.principal("boot", 0),
            Some(Principal::Admin { .. })
        ));
        assert_eq!(auth.principal("nope", 0), None);

        let t = mint_session(b"s3cret", "cus_a", 100);
        assert_eq!(verify_session(b"s3cret", &t, 99), Some("cus_a".into()));
        assert_eq!(verify_session(b"s3cret", &t, 100), None, "expired");
        assert_eq!(verify_session(b"other", &t, 0), None);
        let tampered = t.replacen("cus_a", "cus_b", 1);
        assert_eq!(verify_session(b"s3cret", &tampered, 0), None);
        let longer = t.replacen(".100.", ".999.", 1);
        assert_eq!(verify_session(b"s3cret", &longer, 0), None);
    }
}
