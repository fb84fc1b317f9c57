//! Istio's resources: typed models, parsing with field paths, and validation on Istio's
//! first level (what `istioctl validate` and the admission webhook reject).
pub mod crds;
pub mod networking;
pub mod security;
pub mod types;
pub mod validate;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Serialize, de::DeserializeOwned};

/// The Istio kinds Sidelane reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    Gateway,
    ServiceEntry,
    PeerAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    pub fn from_name(kind: &str) -> Option<Self> {
        Some(match kind {
            "VirtualService" => Self::VirtualService,
            "DestinationRule" => Self::DestinationRule,
            "Gateway" => Self::Gateway,
            "ServiceEntry" => Self::ServiceEntry,
            "PeerAuthentication" => Self::PeerAuthentication,
            "AuthorizationPolicy" => Self::AuthorizationPolicy,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::VirtualService => "VirtualService",
            Self::DestinationRule => "DestinationRule",
            Self::Gateway => "Gateway",
            Self::ServiceEntry => "ServiceEntry",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// API versions Istio serves for this kind (all share one schema).
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Self::PeerAuthentication | Self::AuthorizationPolicy => {
                &["security.istio.io/v1beta1", "security.istio.io/v1"]
            }
            _ => &[
                "networking.istio.io/v1alpha3",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1",
            ],
        }
    }
}

/// One Istio object as read, with where it came from.
#[derive(Clone, Debug, Serialize)]
pub struct Resource<S> {
    pub api_version: String,
    pub metadata: ObjectMeta,
    pub spec: S,
    pub origin: String,
    /// Fields the schema does not have. Kubernetes prunes these from CRDs (kubectl warns);
    /// Sidelane keeps the object and `analyze` reports them.
    pub unknown_fields: Vec<String>,
}

impl<S> Resource<S> {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }
}

/// `.http[0].retires`, in the same notation as serde_path_to_error's paths.
fn field_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => format!("{}.{key}", field_path(parent)),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Parses `spec` of an Istio object. Errors name the field path ("spec.http[0].timeout").
pub fn parse<S: DeserializeOwned + Default>(
    api_version: String,
    value: &serde_yaml::Value,
    origin: &str,
) -> Result<Resource<S>, String> {
    let metadata: ObjectMeta = match value.get("metadata") {
        Some(m) => serde_yaml::from_value(m.clone()).map_err(|e| format!("metadata: {e}"))?,
        None => return Err("metadata is required".into()),
    };
    let mut unknown_fields = Vec::new();
    let spec = match value.get("spec") {
        None | Some(serde_yaml::Value::Null) => S::default(),
        Some(spec) => {
            let mut on_unknown = |path: serde_ignored::Path<'_>| {
                unknown_fields.push(format!("spec{}", field_path(&path)));
            };
            let de = serde_ignored::Deserializer::new(spec.clone(), &mut on_unknown);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                if path == "." || path.is_empty() {
                    format!("spec: {inner}")
                } else {
                    format!("spec.{path}: {inner}")
                }
            })?
        }
    };
    Ok(Resource {
        api_version,
        metadata,
        spec,
        origin: origin.into(),
        unknown_fields,
    })
}

#[cfg(test)]
mod tests;
