//! CustomResourceDefinitions for Istio's resources, generated from the typed models, for
//! clusters that do not run Istio. `meshctl crds` prints them; `deploy/crds/istio.yaml` is
//! that output, and a test keeps the two equal.
use serde_json::{Map, Value, json};

use super::{
    Kind,
    networking::{DestinationRuleSpec, GatewaySpec, ServiceEntrySpec, VirtualServiceSpec},
    security::{AuthorizationPolicySpec, PeerAuthenticationSpec},
};

/// Number formats the API server knows; others are dropped rather than warned about.
const KNOWN_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "date",
    "date-time",
];

fn spec_schema<T: schemars::JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let mut v = generator.into_root_schema_for::<T>().to_value();
    structural(&mut v);
    v
}

/// Makes a schema structural, as apiextensions.k8s.io/v1 requires: no references or
/// metadata keywords, every node typed, free-form values marked as such.
fn structural(v: &mut Value) {
    let Some(m) = v.as_object_mut() else { return };
    for k in [
        "$schema",
        "title",
        "definitions",
        "$defs",
        "components",
        "default",
        "examples",
    ] {
        m.remove(k);
    }
    if let Some(f) = m.get("format").and_then(Value::as_str)
        && !KNOWN_FORMATS.contains(&f)
    {
        m.remove("format");
    }
    // `nullable` already admits null; a null enum member is not a value of the type.
    if let Some(e) = m.get_mut("enum").and_then(Value::as_array_mut) {
        e.retain(|x| !x.is_null());
    }
    let typed = m.contains_key("type");
    if !typed {
        m.clear();
        m.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
        return;
    }
    if let Some(props) = m.get_mut("properties").and_then(Value::as_object_mut) {
        props.values_mut().for_each(structural);
    }
    for k in ["items", "additionalProperties"] {
        if let Some(sub) = m.get_mut(k)
            && sub.is_object()
        {
            structural(sub);
        }
    }
}

fn crd(kind: Kind, plural: &str, short: &str, spec: Value, columns: Value) -> Value {
    let (group, category) = match kind {
        Kind::PeerAuthentication | Kind::AuthorizationPolicy => {
            ("security.istio.io", "security-istio-io")
        }
        _ => ("networking.istio.io", "networking-istio-io"),
    };
    let schema = json!({
        "type": "object",
        "properties": {
            "spec": spec,
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        },
    });
    let versions: Vec<Value> = kind
        .versions()
        .iter()
        .filter_map(|av| av.split_once('/').map(|(_, v)| v))
        .map(|v| {
            json!({
                "name": v,
                "served": true,
                // v1 is the stored version, as in Istio's own CRDs.
                "storage": v == "v1",
                "schema": {"openAPIV3Schema": schema},
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
            })
        })
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}"), "labels": {"app.kubernetes.io/part-of": "sidelane"}},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": kind.name(),
                "listKind": format!("{}List", kind.name()),
                "plural": plural,
                "singular": kind.name().to_lowercase(),
                "shortNames": [short],
                "categories": ["istio-io", category],
            },
            "versions": versions,
        },
    })
}

fn age() -> Value {
    json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})
}

/// Every CRD, as multi-document YAML.
pub fn render() -> String {
    let crds = [
        crd(
            Kind::VirtualService,
            "virtualservices",
            "vs",
            spec_schema::<VirtualServiceSpec>(),
            json!([{"name": "Gateways", "type": "string", "jsonPath": ".spec.gateways"},
                   {"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts"}, age()]),
        ),
        crd(
            Kind::DestinationRule,
            "destinationrules",
            "dr",
            spec_schema::<DestinationRuleSpec>(),
            json!([{"name": "Host", "type": "string", "jsonPath": ".spec.host"}, age()]),
        ),
        crd(
            Kind::Gateway,
            "gateways",
            "gw",
            spec_schema::<GatewaySpec>(),
            json!([age()]),
        ),
        crd(
            Kind::ServiceEntry,
            "serviceentries",
            "se",
            spec_schema::<ServiceEntrySpec>(),
            json!([{"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts"},
                   {"name": "Location", "type": "string", "jsonPath": ".spec.location"},
                   {"name": "Resolution", "type": "string", "jsonPath": ".spec.resolution"}, age()]),
        ),
        crd(
            Kind::PeerAuthentication,
            "peerauthentications",
            "pa",
            spec_schema::<PeerAuthenticationSpec>(),
            json!([{"name": "Mode", "type": "string", "jsonPath": ".spec.mtls.mode"}, age()]),
        ),
        crd(
            Kind::AuthorizationPolicy,
            "authorizationpolicies",
            "ap",
            spec_schema::<AuthorizationPolicySpec>(),
            json!([{"name": "Action", "type": "string", "jsonPath": ".spec.action"}, age()]),
        ),
    ];
    let mut out = String::from("# Generated by `meshctl crds`; do not edit.\n");
    for c in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&c).unwrap_or_default());
    }
    out
}

/// Problems that would make the API server refuse a schema as non-structural.
pub fn structural_problems(schema: &Value, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Some(m) = schema.as_object() else {
        return vec![format!("{path}: not an object")];
    };
    let preserve = m.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if !m.contains_key("type") && !preserve {
        out.push(format!("{path}: no type"));
    }
    for k in [
        "$ref",
        "$schema",
        "definitions",
        "$defs",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
    ] {
        if m.contains_key(k) {
            out.push(format!("{path}: {k} is not allowed"));
        }
    }
    if m.contains_key("properties") && m.get("type") != Some(&json!("object")) {
        out.push(format!("{path}: properties on a non-object"));
    }
    let empty = Map::new();
    for (k, sub) in m
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty)
    {
        out.extend(structural_problems(sub, &format!("{path}.{k}")));
    }
    for k in ["items", "additionalProperties"] {
        if let Some(sub) = m.get(k).filter(|s| s.is_object()) {
            out.extend(structural_problems(sub, &format!("{path}.{k}")));
        }
    }
    out
}
