//! The billing domain's wire readers ([`billing_domain::wire`]) and the
//! clock at the stored precision.

pub use billing_domain::wire::*;

use chrono::{DateTime, Utc};

/// The clock, at the stored precision (microseconds).
pub fn now() -> DateTime<Utc> {
    to_micros(Utc::now())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_reads_microseconds() {
        assert_eq!(super::now().timestamp_subsec_nanos() % 1000, 0);
    }
}
