//! The node's workload certificates: one per identity (service account) of the pods it
//! serves, issued on first use and renewed once half its life has passed. A connection keeps
//! the configuration it started with, so a renewal drops nothing. They come from the CA
//! server (`sidelane-ca`), which signs only for identities of pods on this node, or, where
//! the node holds the CA's key itself, from that key.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{ClientConfig, ServerConfig, pki_types::CertificateDer};

use super::{
    Identity,
    ca::{Ca, CaError, WorkloadCert},
    ca_client::{CaClient, CaClientError},
    tls::{TlsConfigError, client_config, server_config},
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error(transparent)]
    Server(#[from] CaClientError),
}

/// Where certificates come from.
pub enum Signer {
    /// The CA server: this node holds no CA key.
    Server(CaClient),
    /// The CA's key, on this node: any identity can be signed. Boxed: the key is large and
    /// the enum is built once.
    Local(Box<Ca>),
}

impl Signer {
    async fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CertError> {
        Ok(match self {
            Self::Server(c) => c.issue(identity, ttl).await?,
            Self::Local(ca) => ca.issue(identity, ttl)?,
        })
    }

    fn roots(&self) -> &[CertificateDer<'static>] {
        match self {
            Self::Server(c) => c.roots(),
            Self::Local(ca) => ca.roots(),
        }
    }

    /// Who signs, in words `meshctl` shows.
    pub fn describe(&self) -> String {
        match self {
            Self::Server(c) => format!("the CA server at {}", c.addr()),
            Self::Local(_) => "the CA key on this node".to_owned(),
        }
    }
}

/// How long after a failed renewal the CA is asked again.
const RENEWAL_RETRY: Duration = Duration::from_secs(10);

/// One identity's certificate and the TLS settings built on it.
#[derive(Clone)]
pub struct IdentityTls {
    pub identity: Identity,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    renew_at: SystemTime,
}

/// Certificates by identity. Reads take no lock; issuing one takes that identity's lock,
/// which only other issuers of the same identity wait on.
pub struct Certificates {
    signer: Signer,
    trust_domain: String,
    ttl: Duration,
    by_identity: ArcSwap<HashMap<Identity, Arc<IdentityTls>>>,
    /// One lock per identity, held across its request to the CA server: callers wanting the
    /// same certificate at once wait for one request, and a slow answer for one identity
    /// delays no other.
    issuing: std::sync::Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
}

impl Certificates {
    pub fn new(signer: Signer, trust_domain: &str, ttl: Duration) -> Self {
        Self {
            signer,
            trust_domain: trust_domain.to_owned(),
            ttl,
            by_identity: ArcSwap::default(),
            issuing: std::sync::Mutex::default(),
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
    pub async fn get(&self, identity: &Identity) -> Result<Arc<IdentityTls>, CertError> {
        let now = SystemTime::now();
        if let Some(found) = self.fresh(identity, now) {
            return Ok(found);
        }
        let lock = self
            .issuing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(identity.clone())
            .or_default()
            .clone();
        let _issuing = lock.lock().await;
        // Another caller may have issued it while this one waited.
        if let Some(found) = self.fresh(identity, now) {
            return Ok(found);
        }
        let cert = match self.signer.issue(identity, self.ttl).await {
            Ok(c) => c,
            // A renewal that fails keeps the current certificate while it is valid, asking
            // again only after a pause, so an unreachable CA server is not asked per connection.
            Err(e) => {
                let current = self.by_identity.load().get(identity).cloned();
                let Some(current) = current.filter(|c| now < c.not_after) else {
                    return Err(e);
                };
                tracing::warn!(%identity, error = %e, not_after = ?current.not_after, "renewing the workload certificate failed; the current one stays in use");
                let retry = Arc::new(IdentityTls {
                    renew_at: now + RENEWAL_RETRY,
                    ..IdentityTls::clone(&current)
                });
                self.store(identity, retry.clone());
                return Ok(retry);
            }
        };
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
        self.store(identity, issued.clone());
        Ok(issued)
    }

    fn store(&self, identity: &Identity, tls: Arc<IdentityTls>) {
        let mut map = HashMap::clone(&self.by_identity.load());
        map.insert(identity.clone(), tls);
        self.by_identity.store(Arc::new(map));
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
        self.signer.roots()
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }
}
