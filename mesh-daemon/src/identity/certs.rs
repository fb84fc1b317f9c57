//! The node's workload certificates: one per identity (service account) of the pods it
//! serves, issued on first use and renewed once half its life has passed. A connection keeps
//! the configuration it started with, so a renewal drops nothing.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{ClientConfig, ServerConfig, pki_types::CertificateDer};

use super::{
    Identity,
    ca::{Ca, CaError},
    tls::{TlsConfigError, client_config, server_config},
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
}

/// One identity's certificate and the TLS settings built on it.
pub struct IdentityTls {
    pub identity: Identity,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    renew_at: SystemTime,
}

/// Certificates by identity. Reads take no lock; issuing one takes a lock that only other
/// issuers wait on.
pub struct Certificates {
    ca: Ca,
    trust_domain: String,
    ttl: Duration,
    by_identity: ArcSwap<HashMap<Identity, Arc<IdentityTls>>>,
    issuing: Mutex<()>,
}

impl Certificates {
    pub fn new(ca: Ca, trust_domain: &str, ttl: Duration) -> Self {
        Self {
            ca,
            trust_domain: trust_domain.to_owned(),
            ttl,
            by_identity: ArcSwap::default(),
            issuing: Mutex::new(()),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The identity of a pod with this namespace and service account.
    pub fn identity(&self, namespace: &str, service_account: &str) -> Identity {
        Identity::new(&self.trust_domain, namespace, service_account)
    }

    /// The certificate for `identity`, issued now if there is none or it is due for renewal.
    pub fn get(&self, identity: &Identity) -> Result<Arc<IdentityTls>, CertError> {
        let now = SystemTime::now();
        if let Some(found) = self.fresh(identity, now) {
            return Ok(found);
        }
        let _issuing = self
            .issuing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Another caller may have issued it while this one waited.
        if let Some(found) = self.fresh(identity, now) {
            return Ok(found);
        }
        let cert = self.ca.issue(identity, self.ttl)?;
        let life = cert
            .not_after
            .duration_since(cert.not_before)
            .unwrap_or_default();
        let issued = Arc::new(IdentityTls {
            identity: identity.clone(),
            server: server_config(&cert)?,
            client: client_config(&cert)?,
            chain: cert.chain,
            not_before: cert.not_before,
            not_after: cert.not_after,
            renew_at: cert.not_before + life / 2,
        });
        let mut map = HashMap::clone(&self.by_identity.load());
        map.insert(identity.clone(), issued.clone());
        self.by_identity.store(Arc::new(map));
        Ok(issued)
    }

    fn fresh(&self, identity: &Identity, now: SystemTime) -> Option<Arc<IdentityTls>> {
        self.by_identity
            .load()
            .get(identity)
            .filter(|c| now < c.renew_at)
            .cloned()
    }

    /// Every certificate issued so far (for `/certs`).
    pub fn issued(&self) -> Vec<Arc<IdentityTls>> {
        let mut all: Vec<_> = self.by_identity.load().values().cloned().collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        self.ca.roots()
    }
}
