//! PeerAuthentication as Istio resolves it for one workload and port: the mesh-wide policy
//! (root namespace, no selector), overridden by the namespace's, overridden by a policy
//! selecting the workload, overridden for a port by its `portLevelMtls`. `UNSET` at any level
//! inherits from the level above; with nothing set, `PERMISSIVE`. Where several policies
//! share a level, the oldest applies (by creation time, then name), as in Istio.
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::config::{
    istio::{
        Resource,
        security::{MtlsMode, PeerAuthenticationSpec},
    },
    objects::Objects,
};

/// What a workload's port accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Only mTLS: plaintext is refused.
    Strict,
    /// mTLS and plaintext.
    Permissive,
    /// Plaintext is accepted (the tunnel still works: the client side decides).
    Disable,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
            Mode::Disable => "DISABLE",
        }
    }
}

/// One level's setting: `None` inherits.
fn set(mode: Option<MtlsMode>) -> Option<Mode> {
    match mode? {
        MtlsMode::Unset => None,
        MtlsMode::Strict => Some(Mode::Strict),
        MtlsMode::Permissive => Some(Mode::Permissive),
        MtlsMode::Disable => Some(Mode::Disable),
    }
}

#[derive(Debug, Clone, Default, Serialize)]
struct WorkloadPolicy {
    /// `namespace/name`, for `meshctl` to say which policy applied.
    name: String,
    match_labels: BTreeMap<String, String>,
    mode: Option<Mode>,
    ports: BTreeMap<u16, Option<Mode>>,
}

/// The PeerAuthentications of a snapshot, ready to answer per workload and port.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerAuthn {
    mesh: Option<Mode>,
    namespaces: HashMap<String, Option<Mode>>,
    /// Per namespace, oldest first.
    workloads: HashMap<String, Vec<WorkloadPolicy>>,
}

fn age_key(r: &Resource<PeerAuthenticationSpec>) -> (Option<String>, String) {
    (
        r.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        r.name().to_owned(),
    )
}

impl PeerAuthn {
    pub fn compile(objects: &Objects, root_namespace: &str) -> Self {
        let mut all: Vec<&Resource<PeerAuthenticationSpec>> =
            objects.peer_authentications.values().collect();
        all.sort_by_key(|r| age_key(r));
        let mut out = Self::default();
        let mut mesh_seen = false;
        for r in all {
            let ns = r.namespace();
            let labels = r
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .unwrap_or_default();
            let mode = set(r.spec.mtls.as_ref().and_then(|m| m.mode));
            if labels.is_empty() {
                if ns == root_namespace && !mesh_seen {
                    mesh_seen = true;
                    out.mesh = mode;
                }
                // Also the root namespace's own namespace-wide policy.
                out.namespaces.entry(ns.to_owned()).or_insert(mode);
                continue;
            }
            let ports = r
                .spec
                .port_level_mtls
                .iter()
                .filter_map(|(p, m)| Some((u16::try_from(p.0).ok()?, set(m.mode))))
                .collect();
            out.workloads
                .entry(ns.to_owned())
                .or_default()
                .push(WorkloadPolicy {
                    name: format!("{ns}/{}", r.name()),
                    match_labels: labels,
                    mode,
                    ports,
                });
        }
        out
    }

    /// The mode for a workload in `namespace` with `labels`, on its (container) `port`.
    pub fn mode(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u16) -> Mode {
        let mut mode = self.mesh.unwrap_or(Mode::Permissive);
        if let Some(Some(m)) = self.namespaces.get(namespace) {
            mode = *m;
        }
        let workload = self.workloads.get(namespace).and_then(|list| {
            list.iter()
                .find(|w| crate::state::selects(&w.match_labels, labels))
        });
        if let Some(w) = workload {
            if let Some(m) = w.mode {
                mode = m;
            }
            if let Some(Some(m)) = w.ports.get(&port) {
                mode = *m;
            }
        }
        mode
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{Mode, PeerAuthn};
    use crate::config::objects::Objects;

    fn compiled(yaml: &str) -> PeerAuthn {
        let mut objects = Objects::default();
        objects.add_text("test.yaml", yaml);
        assert!(objects.errors.is_empty(), "{:?}", objects.errors);
        PeerAuthn::compile(&objects, "istio-system")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const TUTORIAL: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"#;

    #[test]
    fn nothing_set_is_permissive() {
        let pa = compiled("");
        assert_eq!(pa.mode("any", &labels(&[]), 80), Mode::Permissive);
    }

    #[test]
    fn the_tutorials_policies_make_every_namespace_strict() {
        let pa = compiled(TUTORIAL);
        assert_eq!(pa.mode("production", &labels(&[]), 8080), Mode::Strict);
        assert_eq!(pa.mode("staging", &labels(&[]), 8080), Mode::Strict);
    }

    #[test]
    fn a_namespace_overrides_the_mesh_and_a_workload_the_namespace_and_a_port_the_workload() {
        let pa = compiled(
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: legacy}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: legacy}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
  portLevelMtls:
    9100: {mode: DISABLE}
    9200: {mode: UNSET}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: unset, namespace: other}
spec: {mtls: {mode: UNSET}}
"#,
        );
        let db = labels(&[("app", "db")]);
        assert_eq!(
            pa.mode("legacy", &labels(&[("app", "web")]), 80),
            Mode::Permissive
        );
        assert_eq!(pa.mode("legacy", &db, 5432), Mode::Strict);
        assert_eq!(pa.mode("legacy", &db, 9100), Mode::Disable);
        assert_eq!(pa.mode("legacy", &db, 9200), Mode::Strict, "UNSET inherits");
        assert_eq!(
            pa.mode("other", &db, 80),
            Mode::Strict,
            "UNSET inherits the mesh's"
        );
    }

    #[test]
    fn of_two_namespace_wide_policies_the_oldest_applies() {
        let pa = compiled(
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b-newer, namespace: prod, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a-older, namespace: prod, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
"#,
        );
        assert_eq!(pa.mode("prod", &labels(&[]), 80), Mode::Strict);
    }
}
