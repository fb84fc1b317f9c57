//! The Kubernetes objects the daemon reads, parsed from YAML or JSON documents.
use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::Serialize;

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
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ObjectError {
    /// File (and document index) the object came from.
    pub origin: String,
    pub message: String,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub namespaces: BTreeMap<ObjectKey, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub unhandled: Vec<Unhandled>,
    pub errors: Vec<ObjectError>,
}

const KINDS_NOT_YET_ACTED_ON: &[&str] = &[
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "ServiceEntry",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "Secret",
    "Node",
];

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
                    });
                    // A syntax error ends the stream: later documents cannot be trusted.
                    break;
                }
            }
        }
    }

    fn add_value(&mut self, origin: &str, value: serde_yaml::Value) {
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
            self.errors.push(ObjectError {
                origin: origin.into(),
                message: "not a Kubernetes object: apiVersion and kind are required".into(),
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
            k if KINDS_NOT_YET_ACTED_ON.contains(&k) => {
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
                message: format!("{kind}: {message}"),
            });
        }
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
has_meta!(Namespace, Pod, Service, EndpointSlice);

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
             ---\napiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata:\n  name: vs\n  namespace: production\n",
        );
        assert!(o.namespaces.contains_key("production"));
        assert!(o.services.contains_key("production/s"));
        assert!(o.pods.is_empty());
        assert_eq!(o.errors.len(), 1, "{:?}", o.errors);
        assert!(o.errors[0].origin == "a.yaml#1", "{:?}", o.errors);
        assert!(o.errors[0].message.starts_with("Pod: "), "{:?}", o.errors);
        assert_eq!(o.unhandled[0].kind, "VirtualService");
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
