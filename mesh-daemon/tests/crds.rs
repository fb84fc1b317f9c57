//! deploy/crds/istio.yaml is what `meshctl crds` prints, loads as CRDs, and is structural.
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use mesh_daemon::config::istio::crds;

const COMMITTED: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/crds/istio.yaml"
));

#[test]
fn the_committed_crds_are_the_generated_ones() {
    assert!(
        COMMITTED == crds::render(),
        "deploy/crds/istio.yaml is stale: regenerate it with `meshctl crds > deploy/crds/istio.yaml`"
    );
}

#[test]
fn every_crd_is_well_formed_and_structural() {
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(COMMITTED) {
        let crd: CustomResourceDefinition = serde::Deserialize::deserialize(doc).expect("a CRD");
        kinds.push(crd.spec.names.kind.clone());
        let stored: Vec<&str> = crd
            .spec
            .versions
            .iter()
            .filter(|v| v.storage)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(stored, ["v1"], "{}", crd.spec.names.kind);
        for v in &crd.spec.versions {
            let schema = serde_json::to_value(
                v.schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .expect("schema"),
            )
            .expect("json");
            let problems =
                crds::structural_problems(&schema, &format!("{}/{}", crd.spec.names.kind, v.name));
            assert!(problems.is_empty(), "{problems:#?}");
        }
    }
    assert_eq!(
        kinds,
        [
            "VirtualService",
            "DestinationRule",
            "Gateway",
            "ServiceEntry",
            "PeerAuthentication",
            "AuthorizationPolicy"
        ]
    );
}
