//! Access decisions: who a credential is ([`Principal`]) and what it may
//! do. A decision is allowed or [`Denied`]; the HTTP layer turns a denial
//! into its status (403, or 404 where even existence is not the caller's to
//! learn). Resolving a credential (keys, sessions) is the service's.

use serde::{Deserialize, Serialize};

/// Why a principal may not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The role may not do this at all.
    #[error("{0}")]
    Forbidden(String),
    /// Another customer's data: answered exactly as a missing id is.
    #[error("{0}")]
    Hidden(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Admin,
    ControlPlane,
    Collector,
    Customer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ControlPlane => "control-plane",
            Role::Collector => "collector",
            Role::Customer => "customer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [
            Role::Admin,
            Role::ControlPlane,
            Role::Collector,
            Role::Customer,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// An authenticated credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Staff; `actor` is what the audit log records.
    Admin {
        actor: String,
    },
    ControlPlane {
        key_id: String,
    },
    Collector {
        key_id: String,
    },
    Customer {
        customer_id: String,
    },
}

fn forbidden(what: &str) -> Denied {
    Denied::Forbidden(format!("this credential may not {what}"))
}

impl Principal {
    /// The credential's role.
    pub fn role(&self) -> Role {
        match self {
            Principal::Admin { .. } => Role::Admin,
            Principal::ControlPlane { .. } => Role::ControlPlane,
            Principal::Collector { .. } => Role::Collector,
            Principal::Customer { .. } => Role::Customer,
        }
    }

    /// The audit actor, for admins only.
    pub fn admin(&self) -> Result<&str, Denied> {
        match self {
            Principal::Admin { actor } => Ok(actor),
            _ => Err(forbidden("use staff endpoints")),
        }
    }

    /// Admins and the control plane (minting sessions, quota checks).
    pub fn admin_or_control_plane(&self) -> Result<String, Denied> {
        match self {
            Principal::Admin { actor } => Ok(actor.clone()),
            Principal::ControlPlane { key_id } => Ok(format!("key:{key_id}")),
            _ => Err(forbidden("use control-plane endpoints")),
        }
    }

    /// Reading one customer's data: admins, or that customer. Another
    /// customer gets `not_found`, exactly as for a missing id.
    pub fn read_customer(&self, customer: &str, what: &str) -> Result<(), Denied> {
        match self {
            Principal::Admin { .. } => Ok(()),
            Principal::Customer { customer_id } if customer_id == customer => Ok(()),
            Principal::Customer { .. } => Err(Denied::Hidden(format!("{what} not found"))),
            _ => Err(forbidden("read customer data")),
        }
    }

    /// Anyone authenticated except the collector (the catalog is not secret
    /// to customers or the control plane).
    pub fn read_catalog(&self) -> Result<(), Denied> {
        match self {
            Principal::Collector { .. } => Err(forbidden("read the catalog")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> [Principal; 4] {
        [
            Principal::Admin {
                actor: "admin:1".into(),
            },
            Principal::ControlPlane {
                key_id: "k1".into(),
            },
            Principal::Collector {
                key_id: "k2".into(),
            },
            Principal::Customer {
                customer_id: "cus_a".into(),
            },
        ]
    }

    #[test]
    fn each_role_is_allowed_what_it_needs_and_nothing_else() {
        // (admin, admin or control plane, read cus_a, read cus_b, catalog)
        let expect = [
            [true, true, true, true, true],
            [false, true, false, false, true],
            [false, false, false, false, false],
            [false, false, true, false, true],
        ];
        for (p, want) in all().iter().zip(expect) {
            let got = [
                p.admin().is_ok(),
                p.admin_or_control_plane().is_ok(),
                p.read_customer("cus_a", "customer cus_a").is_ok(),
                p.read_customer("cus_b", "customer cus_b").is_ok(),
                p.read_catalog().is_ok(),
            ];
            assert_eq!(got, want, "{p:?}");
        }
    }

    #[test]
    fn another_customers_data_is_hidden_not_forbidden() {
        let [admin, cp, collector, customer] = all();
        assert_eq!(
            customer.read_customer("cus_b", "customer cus_b"),
            Err(Denied::Hidden("customer cus_b not found".into()))
        );
        assert!(matches!(
            collector.read_customer("cus_a", "x"),
            Err(Denied::Forbidden(_))
        ));
        assert_eq!(admin.admin(), Ok("admin:1"));
        assert_eq!(cp.admin_or_control_plane(), Ok("key:k1".into()));
        assert_eq!(customer.role().as_str(), "customer");
    }
}
