//! A node's side of the CA server (`sidelane-ca`): the key is made here and never leaves the
//! node, a certificate signing request for one workload identity goes to the server over TLS
//! (its certificate checked against the mesh's roots) with the node's bearer token, and the
//! chain that comes back must name the identity asked for.
use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use serde::{Deserialize, Serialize};

use super::{
    Identity,
    ca::{CaError, WorkloadCert, request_for},
    tls::identity_of,
};

/// The path certificates are asked for at.
pub const CERTIFICATES_PATH: &str = "/v1/certificates";
/// How long one request to the CA server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A response larger than this is not a certificate chain.
const MAX_RESPONSE: usize = 64 * 1024;

/// What a node sends.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// PEM `CERTIFICATE REQUEST` naming one SPIFFE ID.
    pub csr: String,
    pub ttl_seconds: u64,
}

/// What the CA server answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// PEM certificates, the workload's first.
    pub chain: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("reading the node token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA server's roots: {0}")]
    Roots(rustls::Error),
    #[error("connecting to the CA server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP with the CA server: {0}")]
    Http(#[from] hyper::Error),
    #[error("the CA server did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("the CA server refused ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    #[error("the CA server's answer: {0}")]
    Answer(String),
}

/// Where the CA server is and how this node proves itself to it.
pub struct CaClient {
    /// `host:port`, resolved at each request (a Service name in a cluster).
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    token_file: PathBuf,
    roots: Vec<CertificateDer<'static>>,
}

impl CaClient {
    pub fn new(
        addr: String,
        server_name: &str,
        roots: Vec<CertificateDer<'static>>,
        token_file: PathBuf,
    ) -> Result<Self, CaClientError> {
        let mut store = RootCertStore::empty();
        for r in &roots {
            store.add(r.clone()).map_err(CaClientError::Roots)?;
        }
        let tls =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(CaClientError::Roots)?
                .with_root_certificates(store)
                .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| CaClientError::Answer(format!("server name {server_name:?}: {e}")))?;
        Ok(Self {
            addr,
            server_name,
            tls: Arc::new(tls),
            token_file,
            roots,
        })
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The server's `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// A certificate for `identity`, valid for `ttl`, with a key made here.
    pub async fn issue(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCert, CaClientError> {
        let (key, csr) = request_for(identity)?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, self.ask(csr, ttl))
            .await
            .map_err(|_| CaClientError::Timeout)??;
        let chain: Vec<CertificateDer<'static>> = answer
            .chain
            .iter()
            .flat_map(|pem| {
                use rustls::pki_types::pem::PemObject as _;
                CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok)
            })
            .collect();
        let leaf = chain
            .first()
            .ok_or_else(|| CaClientError::Answer("no certificate".into()))?;
        let named = identity_of(leaf).map_err(|e| CaClientError::Answer(e.to_string()))?;
        if &named != identity {
            return Err(CaClientError::Answer(format!(
                "asked for {identity}, got a certificate for {named}"
            )));
        }
        let validity = validity(leaf)?;
        Ok(WorkloadCert::new(
            identity,
            chain,
            &key,
            &self.roots,
            validity,
        ))
    }

    async fn ask(&self, csr: String, ttl: Duration) -> Result<CertificateResponse, CaClientError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|source| CaClientError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let body = serde_json::to_vec(&CertificateRequest {
            csr,
            ttl_seconds: ttl.as_secs(),
        })
        .map_err(|e| CaClientError::Answer(e.to_string()))?;
        let connect = |source| CaClientError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let tcp = tokio::net::TcpStream::connect(self.addr.as_str())
            .await
            .map_err(connect)?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(connect)?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = Request::post(CERTIFICATES_PATH)
            .header(header::HOST, self.server_name.to_str().as_ref())
            .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CaClientError::Answer(e.to_string()))?;
        let response = send.send_request(request).await?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| CaClientError::Answer(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(CaClientError::Refused {
                status,
                message: String::from_utf8_lossy(&bytes).trim().to_owned(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| CaClientError::Answer(e.to_string()))
    }
}

fn validity(
    cert: &CertificateDer<'_>,
) -> Result<(std::time::SystemTime, std::time::SystemTime), CaClientError> {
    use x509_parser::prelude::FromDer as _;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .map_err(|e| CaClientError::Answer(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        std::time::UNIX_EPOCH + Duration::from_secs(secs)
    };
    Ok((
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}
