//! Webhook signatures: verifying Stripe's, and signing Tally's own usage
//! alerts with the same scheme.
//!
//! Stripe signs each delivery with the endpoint's secret: the
//! `Stripe-Signature` header is `t=<unix time>,v1=<hex>[,v1=<hex>…]` where
//! each `v1` is HMAC-SHA256 over `"<t>.<raw body>"` (several when a secret
//! is being rolled). A delivery is accepted when some `v1` matches (compared
//! in constant time) and `t` is within the tolerance of now (replays of an
//! old delivery are refused).

use crate::invoice::PaymentStatus;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Stripe's default tolerance.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Stripe-Signature header")]
    Missing,
    #[error("malformed Stripe-Signature header")]
    Malformed,
    #[error("signature timestamp outside the tolerance")]
    Expired,
    #[error("no signature matches")]
    Mismatch,
}

fn mac(secret: &str, t: i64, payload: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key size");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac.finalize().into_bytes().to_vec()
}

/// The hex `v1` signature of `payload` at unix time `t` (what Tally's own
/// outgoing webhooks carry).
pub fn sign(secret: &str, t: i64, payload: &[u8]) -> String {
    hex::encode(mac(secret, t, payload))
}

/// Verifies `header` for `payload` at unix time `now`.
pub fn verify(
    secret: &str,
    payload: &[u8],
    header: Option<&str>,
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match k {
            "t" => t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            // One encoding only: lowercase hex, as Stripe writes it.
            "v1" if v.bytes().any(|b| b.is_ascii_uppercase()) => {
                return Err(SignatureError::Malformed)
            }
            "v1" => sigs.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?),
            _ => {} // other schemes (v0) are ignored, as Stripe's libraries do
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let expected = mac(secret, t, payload);
    let matched = sigs.iter().fold(0u8, |acc, s| {
        acc | s.as_slice().ct_eq(expected.as_slice()).unwrap_u8()
    });
    if matched == 0 {
        return Err(SignatureError::Mismatch);
    }
    if (now - t).abs() > tolerance_secs {
        return Err(SignatureError::Expired);
    }
    Ok(())
}

/// The payment status an event type sets, if it is one Tally handles.
pub fn payment_status(event_type: &str) -> Option<PaymentStatus> {
    match event_type {
        "invoice.paid" => Some(PaymentStatus::Paid),
        "invoice.payment_failed" => Some(PaymentStatus::PaymentFailed),
        "invoice.voided" => Some(PaymentStatus::Void),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, payload: &str, t: i64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{payload}").as_bytes());
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn accepts_good_refuses_bad() {
        let (s, p, now) = ("whsec_test", r#"{"type":"invoice.paid"}"#, 1_800_000_000);
        let ok = sign(s, p, now - 10);
        assert_eq!(verify(s, p.as_bytes(), Some(&ok), now, 300), Ok(()));
        // A second v1 (secret roll) still matches.
        let two = format!("{ok},v1={}", "00".repeat(32));
        assert_eq!(verify(s, p.as_bytes(), Some(&two), now, 300), Ok(()));
        assert_eq!(
            verify(s, b"{}", Some(&ok), now, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("other", p.as_bytes(), Some(&ok), now, 300),
            Err(SignatureError::Mismatch)
        );
        let old = sign(s, p, now - 301);
        assert_eq!(
            verify(s, p.as_bytes(), Some(&old), now, 300),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            verify(s, p.as_bytes(), None, now, 300),
            Err(SignatureError::Missing)
        );
        for bad in ["", "t=x,v1=00", "v1=00", "t=1", "t=1,v1=zz"] {
            assert_eq!(
                verify(s, p.as_bytes(), Some(bad), now, 300),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn refuses_upper_case_signature_hex() {
        let (s, p, now) = ("whsec_test", r#"{"type":"invoice.paid"}"#, 1_800_000_000);
        let ok = sign(s, p, now - 10);
        let (head, sig) = ok.split_once(",v1=").unwrap();
        let upper = format!("{head},v1={}", sig.to_uppercase());
        assert_eq!(
            verify(s, p.as_bytes(), Some(&upper), now, 300),
            Err(SignatureError::Malformed)
        );
    }
}
