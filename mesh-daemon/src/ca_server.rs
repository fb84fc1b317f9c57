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
        ca::{Ca, SigningRequest},
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

/// How the server learns which node a bearer token stands for.
pub enum NodeAuth {
    /// A `token,node-name` file.
    Tokens(NodeTokens),
    /// The API server's TokenReview of the node daemon's projected service account token.
    Kubernetes(TokenReviewer),
}

/// The `extra` keys a bound service account token carries (node ones since Kubernetes 1.30).
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Asks the API server who a token belongs to: it must be the node daemons' service
/// account, for this server's audience, and bound to a pod on a node.
pub struct TokenReviewer {
    pub client: kube::Client,
    /// The audience the daemons' projected tokens are made for.
    pub audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the node daemons.
    pub username: String,
}

impl TokenReviewer {
    async fn node_of(&self, token: &str, snap: &Snapshot) -> Option<String> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let reviewed = match api.create(&kube::api::PostParams::default(), &review).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "TokenReview failed");
                return None;
            }
        };
        node_of_review(reviewed.status?, &self.audience, &self.username, snap)
    }
}

/// The node a reviewed token stands for: authenticated, for `audience`, the daemons'
/// `username`, and bound to a pod whose node the review names (or, before Kubernetes 1.30,
/// whose node the snapshot knows).
fn node_of_review(
    status: k8s_openapi::api::authentication::v1::TokenReviewStatus,
    audience: &str,
    username: &str,
    snap: &Snapshot,
) -> Option<String> {
    if status.authenticated != Some(true) {
        return None;
    }
    if status
        .audiences
        .as_ref()
        .is_some_and(|a| !a.iter().any(|a| a == audience))
    {
        return None;
    }
    let user = status.user?;
    if user.username.as_deref() != Some(username) {
        tracing::warn!(user = ?user.username, "a token of another service account asked for a certificate");
        return None;
    }
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    if let Some(node) = first(EXTRA_NODE_NAME) {
        return Some(node);
    }
    let uid = first(EXTRA_POD_UID)?;
    snap.pods_by_uid
        .get(&uid)
        .map(|p| p.node_name.clone())
        .filter(|n| !n.is_empty())
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

/// Requests by outcome: `signed`, `forbidden` (no pod of the node runs as the identity),
/// `unauthenticated`, `bad_request`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RequestLabels {
    result: &'static str,
}

/// The CA server's metrics (`sidelane_ca_*`).
pub struct CaMetrics {
    registry: prometheus_client::registry::Registry,
    requests: prometheus_client::metrics::family::Family<
        RequestLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Default for CaMetrics {
    fn default() -> Self {
        let mut registry = prometheus_client::registry::Registry::with_prefix("sidelane_ca");
        let requests = prometheus_client::metrics::family::Family::default();
        registry.register(
            "requests",
            "Certificate signing requests from nodes, by outcome",
            requests.clone(),
        );
        Self { registry, requests }
    }
}

impl CaMetrics {
    fn count(&self, result: &'static str) {
        self.requests.get_or_create(&RequestLabels { result }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The CA server's own TLS certificate, issued by the CA it serves and issued again before
/// it expires (a long-running server must not outlive it).
pub struct ServingCert {
    current: ArcSwap<rustls::sign::CertifiedKey>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error(transparent)]
    Ca(#[from] crate::identity::ca::CaError),
    #[error("the serving certificate: {0}")]
    Tls(#[from] rustls::Error),
}

impl ServingCert {
    /// A certificate for `names` and `ips`, valid for `ttl`.
    pub fn issue(
        ca: &Ca,
        names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<rustls::sign::CertifiedKey, ServingError> {
        let (chain, key) = ca.issue_server(names, ips, ttl)?;
        Ok(rustls::sign::CertifiedKey::from_der(
            chain,
            key,
            &rustls::crypto::ring::default_provider(),
        )?)
    }

    pub fn new(first: rustls::sign::CertifiedKey) -> Self {
        Self {
            current: ArcSwap::from_pointee(first),
        }
    }

    pub fn replace(&self, next: rustls::sign::CertifiedKey) {
        self.current.store(Arc::new(next));
    }

    /// TLS settings that present whatever certificate is current.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, ServingError> {
        Ok(Arc::new(
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(self.clone()),
        ))
    }
}

/// What the server decides with.
pub struct CaServer {
    pub ca: Ca,
    pub trust_domain: String,
    pub auth: NodeAuth,
    /// Pods and where they run, from the same configuration source the daemons read.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// The longest lifetime handed out, whatever a node asks for.
    pub max_ttl: Duration,
    pub metrics: CaMetrics,
}

impl CaServer {
    /// Signs `body` for the node `bearer` stands for, or says why not.
    pub async fn decide(
        &self,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<CertificateResponse, Refusal> {
        let token = bearer.ok_or(Refusal::Unauthenticated)?;
        let node = match &self.auth {
            NodeAuth::Tokens(t) => t.node_of(token).map(str::to_owned),
            NodeAuth::Kubernetes(r) => r.node_of(token, &self.snapshot.load()).await,
        }
        .ok_or(Refusal::Unauthenticated)?;
        let node = node.as_str();
        let request: CertificateRequest = serde_json::from_slice(body)
            .map_err(|e| Refusal::BadRequest(format!("not a certificate request: {e}")))?;
        let csr =
            SigningRequest::parse(&request.csr).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        let identity = &csr.identity;
        if identity.trust_domain != self.trust_domain || !self.runs_on(node, identity) {
            return Err(Refusal::Forbidden {
                node: node.to_owned(),
                identity: identity.to_string(),
            });
        }
        let ttl = Duration::from_secs(request.ttl_seconds).min(self.max_ttl);
        let chain = self
            .ca
            .sign_request(&csr, ttl)
            .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        tracing::info!(node, %identity, "workload certificate signed");
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
        let decided = self.decide(bearer.as_deref(), &body).await;
        self.metrics.count(match &decided {
            Ok(_) => "signed",
            Err(Refusal::Unauthenticated) => "unauthenticated",
            Err(Refusal::Forbidden { .. }) => "forbidden",
            Err(Refusal::BadRequest(_)) => "bad_request",
        });
        match decided {
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

    use super::{CaServer, NodeAuth, NodeTokens, Refusal, node_of_review};
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
            auth: NodeAuth::Tokens(tokens.expect("tokens")),
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::compile(
                &objects,
                "cluster.local",
                "istio-system",
                1,
            ))),
            max_ttl: Duration::from_secs(3600),
            metrics: super::CaMetrics::default(),
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

    fn decide(
        s: &CaServer,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<super::CertificateResponse, Refusal> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(s.decide(bearer, body))
    }

    #[test]
    fn a_node_is_signed_for_only_the_identities_of_its_pods() {
        let s = server();
        let answer =
            decide(&s, Some("token-1"), &body("production", "reviews", 86_400)).expect("signed");
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
            decide(&s, Some("token-1"), &body("production", "db", 600)),
            Err(Refusal::Forbidden { .. })
        ));
        assert!(decide(&s, Some("token-2"), &body("production", "db", 600)).is_ok());
        assert_eq!(
            decide(&s, Some("token-3"), &body("production", "db", 600)).err(),
            Some(Refusal::Unauthenticated)
        );
        assert_eq!(
            decide(&s, None, &body("production", "db", 600)).err(),
            Some(Refusal::Unauthenticated)
        );
        assert!(matches!(
            decide(&s, Some("token-1"), b"{}"),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn a_reviewed_token_names_its_node_only_for_the_daemons_account_and_audience() {
        use std::collections::BTreeMap;

        use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
        let s = server();
        let snap = s.snapshot.load();
        let review = |user: &str, audience: &str, extra: (&str, &str)| TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![audience.to_owned()]),
            user: Some(UserInfo {
                username: Some(user.to_owned()),
                extra: Some(BTreeMap::from([(
                    extra.0.to_owned(),
                    vec![extra.1.to_owned()],
                )])),
                ..UserInfo::default()
            }),
            error: None,
        };
        let daemon = "system:serviceaccount:sidelane-system:sidelane";
        let node = |status| node_of_review(status, "sidelane-ca", daemon, &snap);
        let on_node_1 = (super::EXTRA_NODE_NAME, "node-1");
        assert_eq!(
            node(review(daemon, "sidelane-ca", on_node_1)),
            Some("node-1".into())
        );
        // Before node info in tokens: the bound pod's node, from the snapshot.
        let db_pod = (super::EXTRA_POD_UID, "22222222-2222-2222-2222-222222222222");
        assert_eq!(
            node(review(daemon, "sidelane-ca", db_pod)),
            Some("node-2".into())
        );
        let workload = "system:serviceaccount:production:reviews";
        assert_eq!(
            node(review(workload, "sidelane-ca", on_node_1)),
            None,
            "a workload's token is not a node's"
        );
        assert_eq!(
            node(review(daemon, "https://kubernetes.default.svc", on_node_1)),
            None,
            "a token for another audience"
        );
        let mut unauthenticated = review(daemon, "sidelane-ca", on_node_1);
        unauthenticated.authenticated = Some(false);
        assert_eq!(node(unauthenticated), None);
    }

    #[test]
    fn the_lifetime_asked_for_is_capped() {
        use x509_parser::prelude::FromDer as _;
        let s = server();
        let answer =
            decide(&s, Some("token-1"), &body("production", "reviews", 86_400)).expect("signed");
        let der = pem::parse(&answer.chain[0]).expect("pem");
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(der.contents()).expect("parsed");
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!(life <= 3600 + 60, "{life}");
    }

    #[test]
    fn a_renewed_serving_certificate_is_what_the_next_node_sees() {
        use rustls::pki_types::ServerName;

        let ca = Ca::generate("cluster.local").expect("CA");
        let names = vec!["sidelane-ca.sidelane-system.svc".to_owned()];
        let issue = || {
            super::ServingCert::issue(&ca, &names, &[], Duration::from_secs(3600)).expect("issued")
        };
        let serving = Arc::new(super::ServingCert::new(issue()));
        let server = serving.server_config().expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        for r in ca.roots() {
            roots.add(r.clone()).expect("root");
        }
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let presented = || {
            rt.block_on(async {
                let (a, b) = tokio::io::duplex(64 * 1024);
                let name = ServerName::try_from(names[0].clone()).expect("name");
                let (_, connected) = tokio::join!(
                    tokio_rustls::TlsAcceptor::from(server.clone()).accept(a),
                    tokio_rustls::TlsConnector::from(client.clone()).connect(name, b)
                );
                let tls = connected.expect("the node trusts the server's certificate");
                tls.get_ref().1.peer_certificates().expect("certificates")[0].clone()
            })
        };
        let first = presented();
        assert_eq!(presented(), first);
        serving.replace(issue());
        assert_ne!(
            presented(),
            first,
            "the renewed certificate is served at once"
        );
    }
}
