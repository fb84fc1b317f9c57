//! TLS for the tunnel between nodes: TLS 1.3 only, each side presents its workload's
//! certificate, each checks the other's chains to the mesh's roots and names a SPIFFE ID.
//! Which identity the server must have is checked by the caller after the handshake
//! (`peer_identity`): one client configuration then serves every destination.
use std::sync::Arc;

use rustls::{
    ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, ServerConfig,
    SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{ParsedCertificate, WebPkiClientVerifier},
};

use super::{Identity, NotSpiffe, ca::WorkloadCert};

/// HBONE is HTTP/2.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("the mesh's trust roots: {0}")]
    Roots(TlsError),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the workload certificate or key: {0}")]
    Certificate(TlsError),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("the peer sent no certificate")]
    NoCertificate,
    #[error("the peer's certificate cannot be parsed")]
    Unparsable,
    #[error("the peer's certificate names no SPIFFE ID")]
    NoSpiffeId,
    #[error(transparent)]
    NotSpiffe(#[from] NotSpiffe),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(cert: &WorkloadCert) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for r in &cert.roots {
        roots.add(r.clone()).map_err(TlsConfigError::Roots)?;
    }
    Ok(Arc::new(roots))
}

/// The inbound side: the workload's certificate, a client certificate required.
pub fn server_config(cert: &WorkloadCert) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(cert)?, provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsConfigError::Certificate)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(TlsConfigError::Certificate)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The outbound side: the workload's certificate as client certificate; the server's must
/// chain to the roots (its identity is the caller's to check).
pub fn client_config(cert: &WorkloadCert) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let verifier = Arc::new(MeshServerVerifier {
        roots: root_store(cert)?,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsConfigError::Certificate)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(TlsConfigError::Certificate)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The SPIFFE ID a peer's certificate names (its only URI subject alternative name).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, PeerError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(PeerError::NoCertificate)?;
    identity_of(leaf)
}

/// The SPIFFE ID a certificate names.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, PeerError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| PeerError::Unparsable)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| PeerError::Unparsable)?
        .ok_or(PeerError::NoSpiffeId)?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .ok_or(PeerError::NoSpiffeId)?;
    Ok(Identity::parse(uri)?)
}

/// Checks the server's chain and signature, not its name: servers are named by SPIFFE ID,
/// which `peer_identity` reads once the handshake is done.
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        identity_of(end_entity).map_err(|e| TlsError::General(e.to_string()))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{client_config, peer_identity, server_config};
    use crate::identity::{Identity, ca::Ca};

    const HOUR: Duration = Duration::from_secs(3600);

    /// A handshake over an in-memory pipe: (what the server saw, what the client saw).
    async fn handshake(
        server_ca: &Ca,
        client_ca: &Ca,
    ) -> (Result<Identity, String>, Result<Identity, String>) {
        let server_id = Identity::new("cluster.local", "ns", "server");
        let client_id = Identity::new("cluster.local", "ns", "client");
        let server = server_config(&server_ca.issue(&server_id, HOUR).expect("cert")).expect("cfg");
        let client = client_config(&client_ca.issue(&client_id, HOUR).expect("cert")).expect("cfg");
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let accept = async {
            let mut s = tokio_rustls::TlsAcceptor::from(server)
                .accept(a)
                .await
                .map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            s.write_all(&byte).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            peer_identity(s.get_ref().1.peer_certificates()).map_err(|e| e.to_string())
        };
        let connect = async {
            let mut s = tokio_rustls::TlsConnector::from(client)
                .connect(name, b)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"x").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            // Kept open until the server has written back: it still sends session tickets.
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            peer_identity(s.get_ref().1.peer_certificates()).map_err(|e| e.to_string())
        };
        tokio::join!(accept, connect)
    }

    #[tokio::test]
    async fn both_sides_learn_the_other_ones_identity() {
        let ca = Ca::generate("cluster.local").expect("CA");
        let (seen_by_server, seen_by_client) = handshake(&ca, &ca).await;
        assert_eq!(
            seen_by_server.expect("server side").to_string(),
            "spiffe://cluster.local/ns/ns/sa/client"
        );
        assert_eq!(
            seen_by_client.expect("client side").to_string(),
            "spiffe://cluster.local/ns/ns/sa/server"
        );
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_both_ways() {
        let ours = Ca::generate("cluster.local").expect("CA");
        let theirs = Ca::generate("cluster.local").expect("CA");
        let (server, client) = handshake(&ours, &theirs).await;
        assert!(server.is_err() && client.is_err(), "{server:?} {client:?}");
    }
}
