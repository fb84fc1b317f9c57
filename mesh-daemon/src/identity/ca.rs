//! The certificate authority that signs workload certificates, in Istio's layouts: a
//! plugged-in CA (the `cacerts` secret: `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
//! `cert-chain.pem`) or a self-signed root made on first use (istiod's `istio-ca-secret`).
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};

use super::Identity;

/// Istio's default workload certificate lifetime (`DEFAULT_WORKLOAD_CERT_TTL`).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// istiod's self-signed root lives ten years.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so a peer whose clock is behind accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("signing a certificate for {identity}: {source}")]
    Sign {
        identity: String,
        source: rcgen::Error,
    },
    #[error("making the CA: {0}")]
    Generate(rcgen::Error),
    #[error("not a valid certificate signing request: {0}")]
    Request(rcgen::Error),
    #[error("a request must name exactly one SPIFFE ID, found {found}")]
    NotOneIdentity { found: String },
}

/// A workload's key and certificate, with what a peer needs to check it.
pub struct WorkloadCert {
    pub identity: Identity,
    /// The workload's certificate first, then the CA certificates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The trust anchors peers' certificates must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    pub fn new(
        identity: &Identity,
        chain: Vec<CertificateDer<'static>>,
        key: &KeyPair,
        roots: &[CertificateDer<'static>],
        (not_before, not_after): (SystemTime, SystemTime),
    ) -> Self {
        Self {
            identity: identity.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            roots: roots.to_vec(),
            not_before,
            not_after,
        }
    }
}

/// The signing CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    /// Certificates sent after a workload's own: the signing CA's and any between it and the root.
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl Ca {
    /// A fresh self-signed root for `trust_domain`, as istiod makes when no CA is plugged in.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_TTL).into();
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        Ok(Self {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            chain: Vec::new(),
            roots: vec![cert.der().clone()],
        })
    }

    /// Loads a CA from a directory in the `cacerts` layout. `root-cert.pem` and
    /// `cert-chain.pem` may be left out when the signing certificate is the root.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| CaError::Read { path, source })
        };
        let optional = |name: &str| read_optional(&dir.join(name));
        let ca_pem = read(CA_CERT)?;
        let key_pem = read(CA_KEY)?;
        let invalid = |name: &str, what| {
            let path = dir.join(name);
            move |source| CaError::Invalid { path, what, source }
        };
        let key = KeyPair::from_pem(&key_pem).map_err(invalid(CA_KEY, "not a private key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .map_err(invalid(CA_CERT, "not a CA certificate"))?;
        let certs = |name: &str, pem: &str| pem_certificates(&dir.join(name), pem);
        let signing = certs(CA_CERT, &ca_pem)?;
        let chain = match optional(CERT_CHAIN)? {
            Some(pem) => certs(CERT_CHAIN, &pem)?,
            None => signing.clone(),
        };
        let roots = match optional(ROOT_CERT)? {
            Some(pem) => certs(ROOT_CERT, &pem)?,
            None => signing,
        };
        // A root is not sent: the peer has it already.
        let chain = chain.into_iter().filter(|c| !roots.contains(c)).collect();
        Ok(Self {
            issuer,
            ca_pem,
            chain,
            roots,
        })
    }

    /// Writes the CA in the `cacerts` layout (the key readable by its owner only).
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        let write = |name: &str, contents: &str, mode: u32| {
            use std::{io::Write, os::unix::fs::OpenOptionsExt};
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .and_then(|mut f| f.write_all(contents.as_bytes()))
                .map_err(|source| CaError::Write { path, source })
        };
        let pem = |certs: &[CertificateDer<'static>]| {
            certs.iter().map(|c| pem_of(c.as_ref())).collect::<String>()
        };
        write(CA_CERT, &self.ca_pem, 0o644)?;
        write(CA_KEY, &self.issuer.key().serialize_pem(), 0o600)?;
        write(ROOT_CERT, &pem(&self.roots), 0o644)?;
        let mut chain = self.chain.clone();
        chain.extend(self.roots.iter().cloned());
        chain.dedup();
        write(CERT_CHAIN, &pem(&chain), 0o644)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// A new key and a certificate for `identity`, valid for `ttl` (Istio's: the SPIFFE ID
    /// as the only subject alternative name, usable as client and server).
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CaError> {
        let failed = sign_error(identity.to_string());
        let key = KeyPair::generate().map_err(&failed)?;
        let (chain, not_before, not_after) =
            self.sign(&key, vec![spiffe_san(identity)?], ttl, &failed)?;
        Ok(WorkloadCert::new(
            identity,
            chain,
            &key,
            &self.roots,
            (not_before, not_after),
        ))
    }

    /// Signs a node's certificate signing request: the key is the requester's, everything
    /// else the CA's own (the request's other extensions, a CA flag among them, are ignored),
    /// the identity its one SPIFFE ID, which the caller must have authorized.
    pub fn sign_request(
        &self,
        request: &SigningRequest,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let failed = sign_error(request.identity.to_string());
        let (chain, _, _) = self.sign(
            &request.public_key,
            vec![spiffe_san(&request.identity)?],
            ttl,
            &failed,
        )?;
        Ok(chain)
    }

    /// A serving certificate for the CA's own endpoint, with these DNS names and addresses.
    pub fn issue_server(
        &self,
        names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let failed = sign_error(names.join(","));
        let key = KeyPair::generate().map_err(&failed)?;
        let mut sans = Vec::new();
        for n in names {
            sans.push(SanType::DnsName(n.clone().try_into().map_err(&failed)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let (chain, _, _) = self.sign(&key, sans, ttl, &failed)?;
        Ok((chain, PrivatePkcs8KeyDer::from(key.serialize_der()).into()))
    }

    /// A leaf certificate for `key` with these names, valid for `ttl`, and the CA
    /// certificates after it.
    fn sign(
        &self,
        key: &impl rcgen::PublicKeyData,
        sans: Vec<SanType>,
        ttl: Duration,
        failed: &impl Fn(rcgen::Error) -> CaError,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime, SystemTime), CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let (not_before, not_after) = (now - BACKDATE, now + ttl);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(key, &self.issuer).map_err(failed)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, not_before, not_after))
    }
}

fn sign_error(identity: String) -> impl Fn(rcgen::Error) -> CaError {
    move |source| CaError::Sign {
        identity: identity.clone(),
        source,
    }
}

fn spiffe_san(identity: &Identity) -> Result<SanType, CaError> {
    Ok(SanType::URI(
        identity
            .to_string()
            .try_into()
            .map_err(sign_error(identity.to_string()))?,
    ))
}

/// The one SPIFFE ID a request names, and nothing else.
fn spiffe_of(params: &CertificateParams) -> Result<Identity, CaError> {
    match params.subject_alt_names.as_slice() {
        [SanType::URI(uri)] => {
            Identity::parse(uri.as_str()).map_err(|e| CaError::NotOneIdentity { found: e.uri })
        }
        other => Err(CaError::NotOneIdentity {
            found: format!("{other:?}"),
        }),
    }
}

/// A node's certificate signing request, read (its signature checked) once: the identity
/// it asks for, to authorize, and the key to sign.
pub struct SigningRequest {
    pub identity: Identity,
    public_key: rcgen::PublicKey,
}

impl SigningRequest {
    pub fn parse(csr_pem: &str) -> Result<Self, CaError> {
        let request =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Request)?;
        Ok(Self {
            identity: spiffe_of(&request.params)?,
            public_key: request.public_key,
        })
    }
}

/// A new key and a signing request for `identity`, as a node asks the CA for a workload
/// certificate without the CA's key.
pub fn request_for(identity: &Identity) -> Result<(KeyPair, String), CaError> {
    let failed = sign_error(identity.to_string());
    let key = KeyPair::generate().map_err(&failed)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![spiffe_san(identity)?];
    let csr = params.serialize_request(&key).map_err(&failed)?;
    let pem = csr.pem().map_err(&failed)?;
    Ok((key, pem))
}

/// Trust anchors alone: `root-cert.pem` (or `ca-cert.pem`) in a `cacerts`-layout directory,
/// for a node that asks a CA server for its certificates and holds no CA key.
pub fn load_roots(dir: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    for name in [ROOT_CERT, CA_CERT] {
        let path = dir.join(name);
        if let Some(pem) = read_optional(&path)? {
            return pem_certificates(&path, &pem);
        }
    }
    Err(CaError::Read {
        path: dir.join(ROOT_CERT),
        source: std::io::ErrorKind::NotFound.into(),
    })
}

/// A file's text, or `None` when there is no such file.
fn read_optional(path: &Path) -> Result<Option<String>, CaError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CaError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The certificates in `pem` (read from `path`): at least one.
fn pem_certificates(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let found: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if found.is_empty() {
        return Err(CaError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(found)
}

/// A certificate in PEM.
pub fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Ca, ROOT_CERT};
    use crate::identity::{Identity, tls::identity_of};

    #[test]
    fn a_workload_certificate_names_its_identity_and_chains_to_the_root() {
        let ca = Ca::generate("cluster.local").expect("CA");
        let id = Identity::new("cluster.local", "production", "reviews");
        let cert = ca.issue(&id, Duration::from_secs(3600)).expect("issued");
        assert_eq!(identity_of(&cert.chain[0]), Ok(id));
        // The root itself is not sent.
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.roots, ca.roots());
        let life = cert
            .not_after
            .duration_since(cert.not_before)
            .expect("ordered");
        assert!(life >= Duration::from_secs(3600) && life < Duration::from_secs(3700));
    }

    #[test]
    fn a_ca_written_to_a_directory_loads_back_and_signs_the_same_way() {
        let dir = std::env::temp_dir().join(format!("sl-ca-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = Ca::generate("example.org").expect("CA");
        ca.write(&dir).expect("written");
        let loaded = Ca::load(&dir);
        let root = std::fs::read_to_string(dir.join(ROOT_CERT));
        let _ = std::fs::remove_dir_all(&dir);
        let loaded = loaded.expect("loaded");
        assert!(
            root.expect("root")
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert_eq!(loaded.roots(), ca.roots());
        let id = Identity::new("example.org", "a", "b");
        let cert = loaded.issue(&id, Duration::from_secs(60)).expect("issued");
        assert_eq!(identity_of(&cert.chain[0]), Ok(id));
    }

    #[test]
    fn a_missing_key_is_named() {
        let dir = std::env::temp_dir().join(format!("sl-ca-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("dir");
        let err = Ca::load(&dir).err().map(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.expect("an error").contains("ca-cert.pem"));
    }

    #[test]
    fn a_signing_request_gets_the_cas_terms_not_its_own() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        use x509_parser::prelude::FromDer as _;

        let ca = Ca::generate("cluster.local").expect("CA");
        let id = Identity::new("cluster.local", "production", "reviews");
        // A request that also asks to be a CA.
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().expect("uri"))];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let request = super::SigningRequest::parse(&csr).expect("parsed");
        assert_eq!(request.identity, id);
        let chain = ca
            .sign_request(&request, Duration::from_secs(600))
            .expect("signed");
        assert_eq!(identity_of(&chain[0]), Ok(id.clone()));
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(chain[0].as_ref()).expect("parsed");
        assert!(!cert.is_ca(), "the request's CA flag is ignored");
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );

        // One SPIFFE ID and nothing else.
        params.is_ca = IsCa::NoCa;
        params.subject_alt_names.push(SanType::DnsName(
            "reviews.production.svc".try_into().expect("dns"),
        ));
        let two = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        assert!(super::SigningRequest::parse(&two).is_err());
        let (_, ours) = super::request_for(&id).expect("request");
        assert_eq!(
            super::SigningRequest::parse(&ours)
                .expect("parsed")
                .identity,
            id
        );
    }
}
