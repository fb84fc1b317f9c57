//! Workload identity: SPIFFE IDs, the certificate authority that vouches for them, and the
//! TLS settings of the mTLS tunnel between nodes (HBONE).
pub mod ca;
pub mod ca_client;
pub mod certs;
pub mod tls;

use std::fmt;

/// Istio's trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload's SPIFFE ID as Istio forms it:
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{uri:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
)]
pub struct NotSpiffe {
    pub uri: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    pub fn parse(uri: &str) -> Result<Self, NotSpiffe> {
        let bad = || NotSpiffe {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
            {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Identity;

    #[test]
    fn a_spiffe_id_reads_back_as_written() {
        let id = Identity::new("cluster.local", "production", "reviews");
        let uri = id.to_string();
        assert_eq!(uri, "spiffe://cluster.local/ns/production/sa/reviews");
        assert_eq!(Identity::parse(&uri), Ok(id));
    }

    #[test]
    fn other_uris_are_not_identities() {
        for uri in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/sa/b/ns/a",
        ] {
            assert!(Identity::parse(uri).is_err(), "{uri}");
        }
    }
}
