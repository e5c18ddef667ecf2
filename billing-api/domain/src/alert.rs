//! What a usage alert is about and where its delivery stands.

crate::named! {
    /// What an alert's threshold is a percentage of.
    pub enum AlertKind ("alert kind") {
        /// The spending cap in force (`catalog::cap_in_force`).
        SpendingCap => "spending_cap",
        /// A price's free units (`rating::free_units`).
        Allowance => "allowance",
    }
}

crate::named! {
    /// An alert's delivery.
    pub enum AlertStatus ("alert status") {
        /// Due for (another) delivery attempt.
        Pending => "pending",
        Delivered => "delivered",
        /// Gave up after the last attempt.
        Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_statuses_have_their_stored_names() {
        let kinds: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds, ["spending_cap", "allowance"]);
        let statuses: Vec<&str> = AlertStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(statuses, ["pending", "delivered", "failed"]);
        for k in AlertKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for s in AlertStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
