//! The CA server (`sidelane-ca`): the only holder of the mesh's signing key. A node daemon
//! sends a certificate signing request for one workload identity with its bearer token; the
//! server signs only when the token names a node that runs a pod with that identity (the
//! namespace and service account of a pod scheduled there), as istiod's node authorizer
//! checks ztunnel's requests. A node that is taken over can then impersonate only the
//! workloads already on it.
use std::{collections::HashMap, convert::Infallible, path::Path, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::net::TcpListener;

use crate::{
    identity::{
        Identity,
        ca::{Ca, requested_identity},
        ca_client::{CERTIFICATES_PATH, CertificateRequest, CertificateResponse},
    },
    state::Snapshot,
};

/// A request body larger than this is not a certificate signing request.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: expected `token,node-name`")]
    Malformed {
        path: std::path::PathBuf,
        line: usize,
    },
}

/// Bearer tokens and the node each stands for, from a file of `token,node-name` lines (the
/// shape of the API server's static token file): for nodes outside Kubernetes and for tests.
pub struct NodeTokens {
    by_token: HashMap<String, String>,
}

impl NodeTokens {
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut by_token = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(',') {
                Some((token, node)) if !token.trim().is_empty() && !node.trim().is_empty() => {
                    by_token.insert(token.trim().to_owned(), node.trim().to_owned());
                }
                _ => {
                    return Err(TokenFileError::Malformed {
                        path: path.to_owned(),
                        line: i + 1,
                    });
                }
            }
        }
        Ok(Self { by_token })
    }

    fn node_of(&self, token: &str) -> Option<&str> {
        self.by_token.get(token).map(String::as_str)
    }
}

/// Why a request was not signed, as the node is told.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated,
    BadRequest(String),
    /// The identity has no pod on the asking node.
    Forbidden {
        node: String,
        identity: String,
    },
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Unauthenticated => "no valid node token".into(),
            Self::BadRequest(why) => why.clone(),
            Self::Forbidden { node, identity } => {
                format!("no pod on node {node} runs as {identity}")
            }
        }
    }
}

/// What the server decides with.
pub struct CaServer {
    pub ca: Ca,
    pub trust_domain: String,
    pub tokens: NodeTokens,
    /// Pods and where they run, from the same configuration source the daemons read.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// The longest lifetime handed out, whatever a node asks for.
    pub max_ttl: Duration,
}

impl CaServer {
    /// Signs `body` for the node `bearer` stands for, or says why not.
    pub fn decide(
        &self,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<CertificateResponse, Refusal> {
        let node = bearer
            .and_then(|t| self.tokens.node_of(t))
            .ok_or(Refusal::Unauthenticated)?;
        let request: CertificateRequest = serde_json::from_slice(body)
            .map_err(|e| Refusal::BadRequest(format!("not a certificate request: {e}")))?;
        let identity =
            requested_identity(&request.csr).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        if identity.trust_domain != self.trust_domain || !self.runs_on(node, &identity) {
            return Err(Refusal::Forbidden {
                node: node.to_owned(),
                identity: identity.to_string(),
            });
        }
        let ttl = Duration::from_secs(request.ttl_seconds).min(self.max_ttl);
        let (signed, chain) = self
            .ca
            .sign_request(&request.csr, ttl)
            .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        tracing::info!(node, identity = %signed, "workload certificate signed");
        Ok(CertificateResponse {
            chain: chain
                .iter()
                .map(|c| crate::identity::ca::pem_of(c.as_ref()))
                .collect(),
        })
    }

    fn runs_on(&self, node: &str, identity: &Identity) -> bool {
        self.snapshot.load().pods_by_uid.values().any(|p| {
            p.node_name == node
                && p.namespace == identity.namespace
                && p.service_account == identity.service_account
        })
    }

    /// Serves `listener` with TLS until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<ServerConfig>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let (this, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    tracing::debug!(%peer, "TLS handshake with a node failed");
                    return;
                };
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, kind: &'static str, body: Vec<u8>| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            if let Ok(v) = header::HeaderValue::from_str(kind) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r
        };
        if req.method() != Method::POST || req.uri().path() != CERTIFICATES_PATH {
            return reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
        }
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        let body = match http_body_util::Limited::new(req.into_body(), MAX_REQUEST)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain",
                    b"request too large\n".to_vec(),
                );
            }
        };
        match self.decide(bearer.as_deref(), &body) {
            Ok(answer) => match serde_json::to_vec(&answer) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string().into_bytes(),
                ),
            },
            Err(refusal) => {
                tracing::warn!(reason = %refusal.message(), "certificate request refused");
                reply(
                    refusal.status(),
                    "text/plain",
                    format!("{}\n", refusal.message()).into_bytes(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use arc_swap::ArcSwap;

    use super::{CaServer, NodeTokens, Refusal};
    use crate::{
        config::objects::Objects,
        identity::{
            Identity,
            ca::{Ca, request_for},
            ca_client::CertificateRequest,
            tls::identity_of,
        },
        state::Snapshot,
    };

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: production, uid: 11111111-1111-1111-1111-111111111111}
spec: {nodeName: node-1, serviceAccountName: reviews, containers: [{name: app, image: x}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db-v1, namespace: production, uid: 22222222-2222-2222-2222-222222222222}
spec: {nodeName: node-2, serviceAccountName: db, containers: [{name: app, image: x}]}
status: {podIP: 10.244.2.10}
"#;

    fn server() -> CaServer {
        let mut objects = Objects::default();
        objects.add_text("pods.yaml", PODS);
        let dir = std::env::temp_dir().join(format!("sl-tokens-{}", fastrand::u64(..)));
        std::fs::write(&dir, "# token,node\ntoken-1,node-1\n\ntoken-2 , node-2\n").expect("file");
        let tokens = NodeTokens::load(&dir);
        let _ = std::fs::remove_file(&dir);
        CaServer {
            ca: Ca::generate("cluster.local").expect("CA"),
            trust_domain: "cluster.local".into(),
            tokens: tokens.expect("tokens"),
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::compile(
                &objects,
                "cluster.local",
                "istio-system",
                1,
            ))),
            max_ttl: Duration::from_secs(3600),
        }
    }

    fn body(ns: &str, sa: &str, ttl: u64) -> Vec<u8> {
        let (_, csr) = request_for(&Identity::new("cluster.local", ns, sa)).expect("csr");
        serde_json::to_vec(&CertificateRequest {
            csr,
            ttl_seconds: ttl,
        })
        .expect("json")
    }

    #[test]
    fn a_node_is_signed_for_only_the_identities_of_its_pods() {
        let s = server();
        let answer = s
            .decide(Some("token-1"), &body("production", "reviews", 86_400))
            .expect("signed");
        let leaf = rustls::pki_types::CertificateDer::from(
            pem::parse(&answer.chain[0])
                .expect("pem")
                .contents()
                .to_vec(),
        );
        assert_eq!(
            identity_of(&leaf),
            Ok(Identity::new("cluster.local", "production", "reviews"))
        );
        assert!(matches!(
            s.decide(Some("token-1"), &body("production", "db", 600)),
            Err(Refusal::Forbidden { .. })
        ));
        assert!(
            s.decide(Some("token-2"), &body("production", "db", 600))
                .is_ok()
        );
        assert_eq!(
            s.decide(Some("token-3"), &body("production", "db", 600))
                .err(),
            Some(Refusal::Unauthenticated)
        );
        assert_eq!(
            s.decide(None, &body("production", "db", 600)).err(),
            Some(Refusal::Unauthenticated)
        );
        assert!(matches!(
            s.decide(Some("token-1"), b"{}"),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn the_lifetime_asked_for_is_capped() {
        use x509_parser::prelude::FromDer as _;
        let s = server();
        let answer = s
            .decide(Some("token-1"), &body("production", "reviews", 86_400))
            .expect("signed");
        let der = pem::parse(&answer.chain[0]).expect("pem");
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(der.contents()).expect("parsed");
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!(life <= 3600 + 60, "{life}");
    }
}
