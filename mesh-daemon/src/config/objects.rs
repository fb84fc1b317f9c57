//! The Kubernetes objects the daemon reads, parsed from YAML or JSON documents.
use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use serde::Serialize;

use super::istio::{
    self, Resource,
    networking::{DestinationRuleSpec, GatewaySpec, ServiceEntrySpec, VirtualServiceSpec},
    security::{AuthorizationPolicySpec, PeerAuthenticationSpec},
};

/// `namespace/name`, or just `name` for cluster-scoped objects.
pub type ObjectKey = String;

/// A resource Sidelane knows of but does not act on yet (Istio CRDs until they are typed).
#[derive(Debug, Clone, Serialize)]
pub struct Unhandled {
    pub api_version: String,
    pub kind: String,
    pub key: ObjectKey,
    pub origin: String,
}

/// One document that could not be used, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct ObjectError {
    /// File (and document index) the object came from.
    pub origin: String,
    /// Kind and `namespace/name` of the object, when it got that far.
    pub kind: Option<String>,
    pub name: Option<String>,
    /// Field path, e.g. `spec.http[0].timeout`.
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.origin)?;
        if let Some(k) = &self.kind {
            write!(f, "{k} ")?;
        }
        if let Some(n) = &self.name {
            write!(f, "{n}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub namespaces: BTreeMap<ObjectKey, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub nodes: BTreeMap<ObjectKey, Node>,
    /// Read from manifests only: the Kubernetes source does not watch Secrets, so that the
    /// daemon holds no cluster-wide secret access before a feature needs it.
    pub secrets: BTreeMap<ObjectKey, Secret>,
    pub virtual_services: BTreeMap<ObjectKey, Resource<VirtualServiceSpec>>,
    pub destination_rules: BTreeMap<ObjectKey, Resource<DestinationRuleSpec>>,
    pub gateways: BTreeMap<ObjectKey, Resource<GatewaySpec>>,
    pub service_entries: BTreeMap<ObjectKey, Resource<ServiceEntrySpec>>,
    pub peer_authentications: BTreeMap<ObjectKey, Resource<PeerAuthenticationSpec>>,
    pub authorization_policies: BTreeMap<ObjectKey, Resource<AuthorizationPolicySpec>>,
    pub unhandled: Vec<Unhandled>,
    pub errors: Vec<ObjectError>,
}

/// Kinds Sidelane recognises but has no use for yet (recorded, so nothing is silently lost).
const KINDS_NOT_YET_READ: &[&str] = &["WorkloadEntry", "Sidecar", "Telemetry", "EnvoyFilter"];

impl Objects {
    /// Parses every document of one file's text. Bad documents are recorded in `errors` and
    /// skipped; the others are kept.
    pub fn add_text(&mut self, origin: &str, text: &str) {
        for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let origin = format!("{origin}#{index}");
            match <serde_yaml::Value as serde::Deserialize<'_>>::deserialize(doc) {
                Ok(serde_yaml::Value::Null) => {}
                Ok(value) => self.add_value(&origin, value),
                Err(e) => {
                    self.errors.push(ObjectError {
                        origin,
                        message: yaml_error(&e),
                        ..Default::default()
                    });
                    // A syntax error ends the stream: later documents cannot be trusted.
                    break;
                }
            }
        }
    }

    /// Adds one object as the Kubernetes API returns it.
    pub fn add_json(&mut self, origin: &str, value: serde_json::Value) {
        match serde_yaml::to_value(value) {
            Ok(v) => self.add_value(origin, v),
            Err(e) => self.errors.push(ObjectError {
                origin: origin.into(),
                message: format!("cannot read object: {e}"),
                ..Default::default()
            }),
        }
    }

    fn add_value(&mut self, origin: &str, value: serde_yaml::Value) {
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
            self.errors.push(ObjectError {
                origin: origin.into(),
                message: "not a Kubernetes object: apiVersion and kind are required".into(),
                ..Default::default()
            });
            return;
        };
        let result = match kind.as_str() {
            "List" => {
                let items = value
                    .get("items")
                    .and_then(|v| v.as_sequence())
                    .cloned()
                    .unwrap_or_default();
                for (i, item) in items.into_iter().enumerate() {
                    self.add_value(&format!("{origin}.items[{i}]"), item);
                }
                Ok(())
            }
            "Namespace" => insert(&mut self.namespaces, value, false),
            "Pod" => insert(&mut self.pods, value, true),
            "Service" => insert(&mut self.services, value, true),
            "EndpointSlice" => insert(&mut self.endpoint_slices, value, true),
            "Node" => insert(&mut self.nodes, value, false),
            "Secret" => insert(&mut self.secrets, value, true),
            k if let Some(istio_kind) = istio::Kind::from_name(k) => {
                self.add_istio(istio_kind, api_version, &value, origin);
                Ok(())
            }
            k if KINDS_NOT_YET_READ.contains(&k) => {
                let meta = |f: &str| {
                    value
                        .get("metadata")
                        .and_then(|m| m.get(f))
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_owned()
                };
                self.unhandled.push(Unhandled {
                    api_version,
                    kind: kind.clone(),
                    key: join_key(&meta("namespace"), &meta("name")),
                    origin: origin.into(),
                });
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(message) = result {
            self.errors.push(ObjectError {
                origin: origin.into(),
                kind: Some(kind),
                message,
                ..Default::default()
            });
        }
    }

    /// Parses and validates one Istio object; a rejected one is recorded with every reason
    /// and left out, so the rest of the configuration still applies.
    fn add_istio(
        &mut self,
        kind: istio::Kind,
        api_version: String,
        value: &serde_yaml::Value,
        origin: &str,
    ) {
        let meta = |f: &str| {
            value
                .get("metadata")
                .and_then(|m| m.get(f))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let name = meta("name").unwrap_or_default();
        let namespace = meta("namespace").unwrap_or_else(|| "default".into());
        let key = join_key(&namespace, &name);
        let error = |field: Option<String>, message: String| ObjectError {
            origin: origin.into(),
            kind: Some(kind.name().into()),
            name: Some(key.clone()),
            field,
            message,
        };
        if !kind.versions().contains(&api_version.as_str()) {
            let msg = format!(
                "apiVersion {api_version:?} does not serve {}; use one of {}",
                kind.name(),
                kind.versions().join(", ")
            );
            self.errors.push(error(Some("apiVersion".into()), msg));
            return;
        }
        if name.is_empty() {
            self.errors.push(error(
                Some("metadata.name".into()),
                "metadata.name is required".into(),
            ));
            return;
        }
        macro_rules! accept {
            ($map:ident, $spec:ty, $validate:path) => {{
                match istio::parse::<$spec>(api_version, value, origin) {
                    Err(e) => {
                        let (field, msg) = split_field(&e);
                        self.errors.push(error(field, msg));
                    }
                    Ok(res) => {
                        let violations = $validate(&res.spec);
                        if violations.is_empty() {
                            self.$map.insert(key.clone(), res);
                        } else {
                            for v in violations {
                                self.errors.push(error(Some(v.field), v.message));
                            }
                        }
                    }
                }
            }};
        }
        use istio::{Kind, validate};
        match kind {
            Kind::VirtualService => accept!(
                virtual_services,
                VirtualServiceSpec,
                validate::virtual_service
            ),
            Kind::DestinationRule => accept!(
                destination_rules,
                DestinationRuleSpec,
                validate::destination_rule
            ),
            Kind::Gateway => accept!(gateways, GatewaySpec, validate::gateway),
            Kind::ServiceEntry => {
                accept!(service_entries, ServiceEntrySpec, validate::service_entry)
            }
            Kind::PeerAuthentication => {
                accept!(
                    peer_authentications,
                    PeerAuthenticationSpec,
                    validate::peer_authentication
                )
            }
            Kind::AuthorizationPolicy => {
                accept!(
                    authorization_policies,
                    AuthorizationPolicySpec,
                    validate::authorization_policy
                )
            }
        }
    }
}

impl Objects {
    /// Adds everything from `other` (a later source wins on the same key).
    pub fn merge(&mut self, other: Objects) {
        self.namespaces.extend(other.namespaces);
        self.pods.extend(other.pods);
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.nodes.extend(other.nodes);
        self.secrets.extend(other.secrets);
        self.virtual_services.extend(other.virtual_services);
        self.destination_rules.extend(other.destination_rules);
        self.gateways.extend(other.gateways);
        self.service_entries.extend(other.service_entries);
        self.peer_authentications.extend(other.peer_authentications);
        self.authorization_policies
            .extend(other.authorization_policies);
        self.unhandled.extend(other.unhandled);
        self.errors.extend(other.errors);
    }

    /// Every Istio resource accepted, as (kind, key, apiVersion, origin, unknown fields).
    pub fn istio_resources(&self) -> Vec<(&'static str, &str, &str, &str, &[String])> {
        fn rows<'a, S>(
            kind: &'static str,
            m: &'a BTreeMap<ObjectKey, Resource<S>>,
        ) -> impl Iterator<Item = (&'static str, &'a str, &'a str, &'a str, &'a [String])> {
            m.iter().map(move |(k, r)| {
                (
                    kind,
                    k.as_str(),
                    r.api_version.as_str(),
                    r.origin.as_str(),
                    r.unknown_fields.as_slice(),
                )
            })
        }
        rows("VirtualService", &self.virtual_services)
            .chain(rows("DestinationRule", &self.destination_rules))
            .chain(rows("Gateway", &self.gateways))
            .chain(rows("ServiceEntry", &self.service_entries))
            .chain(rows("PeerAuthentication", &self.peer_authentications))
            .chain(rows("AuthorizationPolicy", &self.authorization_policies))
            .collect()
    }
}

/// "spec.http[0].timeout: message" -> (Some(field), message).
fn split_field(e: &str) -> (Option<String>, String) {
    match e.split_once(": ") {
        Some((field, msg)) if field.starts_with("spec") && !field.contains(' ') => {
            (Some(field.to_owned()), msg.to_owned())
        }
        _ => (None, e.to_owned()),
    }
}

fn join_key(namespace: &str, name: &str) -> ObjectKey {
    if namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}/{name}")
    }
}

trait HasMeta {
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
}
macro_rules! has_meta {
    ($($t:ty),*) => {$(impl HasMeta for $t {
        fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta { &self.metadata }
    })*};
}
has_meta!(Namespace, Pod, Service, EndpointSlice, Node, Secret);

fn insert<T: serde::de::DeserializeOwned + HasMeta>(
    map: &mut BTreeMap<ObjectKey, T>,
    value: serde_yaml::Value,
    namespaced: bool,
) -> Result<(), String> {
    let obj: T = serde_yaml::from_value(value).map_err(|e| yaml_error(&e))?;
    let meta = obj.meta();
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("metadata.name is required")?;
    let namespace = if namespaced {
        meta.namespace.clone().unwrap_or_else(|| "default".into())
    } else {
        String::new()
    };
    map.insert(join_key(&namespace, &name), obj);
    Ok(())
}

fn yaml_error(e: &serde_yaml::Error) -> String {
    match e.location() {
        Some(loc) => format!("line {} column {}: {e}", loc.line(), loc.column()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_document_files_and_keeps_going_after_a_bad_object() {
        let mut o = Objects::default();
        o.add_text(
            "a.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: production\n  labels:\n    istio-injection: enabled\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: production\nspec:\n  containers: 7\n\
             ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  namespace: production\n\
             ---\napiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata:\n  name: vs\n  namespace: production\n\
             spec:\n  hosts: [s]\n  http:\n  - route:\n    - destination:\n        host: s\n",
        );
        assert!(o.namespaces.contains_key("production"));
        assert!(o.services.contains_key("production/s"));
        assert!(o.pods.is_empty());
        assert_eq!(o.errors.len(), 1, "{:?}", o.errors);
        assert!(o.errors[0].origin == "a.yaml#1", "{:?}", o.errors);
        assert_eq!(o.errors[0].kind.as_deref(), Some("Pod"), "{:?}", o.errors);
        assert!(o.virtual_services.contains_key("production/vs"));
    }

    #[test]
    fn nodes_and_secrets_are_read() {
        let mut o = Objects::default();
        o.add_text(
            "n.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: api-tls-cert, namespace: istio-system}\n\
             type: kubernetes.io/tls\ndata: {tls.crt: Y2VydA==, tls.key: a2V5}\n",
        );
        assert!(o.errors.is_empty(), "{:?}", o.errors);
        assert!(o.nodes.contains_key("node-1"));
        let secret = &o.secrets["istio-system/api-tls-cert"];
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(
            secret.data.as_ref().map(|d| d["tls.crt"].0.clone()),
            Some(b"cert".to_vec())
        );
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let mut o = Objects::default();
        o.add_text(
            "b.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: [oops\n",
        );
        assert_eq!(o.errors.len(), 1);
        assert!(o.errors[0].message.contains("line "), "{}", o.errors[0]);
    }
}
