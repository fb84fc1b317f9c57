//! The tutorial's YAML, and one test per input Istio's validation rejects.
use crate::config::objects::{ObjectError, Objects};

fn load(text: &str) -> Objects {
    let mut o = Objects::default();
    o.add_text("test.yaml", text);
    o
}

/// The single error, which must name the kind, the object, the field and the reason.
fn only_error(o: &Objects) -> &ObjectError {
    assert_eq!(o.errors.len(), 1, "{:#?}", o.errors);
    &o.errors[0]
}

macro_rules! tutorial {
    ($f:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../demo/tutorial/",
            $f
        ))
    };
}

#[test]
fn every_tutorial_yaml_loads_and_validates() {
    for (file, text) in [
        (
            "deployment-with-sidecar.yaml",
            tutorial!("deployment-with-sidecar.yaml"),
        ),
        ("virtualservice.yaml", tutorial!("virtualservice.yaml")),
        ("destinationrule.yaml", tutorial!("destinationrule.yaml")),
        ("gateway.yaml", tutorial!("gateway.yaml")),
        (
            "peerauthentication.yaml",
            tutorial!("peerauthentication.yaml"),
        ),
        (
            "virtualservice-resilience.yaml",
            tutorial!("virtualservice-resilience.yaml"),
        ),
        (
            "virtualservice-mirror.yaml",
            tutorial!("virtualservice-mirror.yaml"),
        ),
    ] {
        let o = load(text);
        assert!(o.errors.is_empty(), "{file}: {:#?}", o.errors);
        for (kind, key, _, _, unknown) in o.istio_resources() {
            assert!(
                unknown.is_empty(),
                "{file}: {kind} {key} has unknown fields {unknown:?}"
            );
        }
    }
    let vs = load(tutorial!("virtualservice.yaml"));
    let spec = &vs.virtual_services["production/api-server"].spec;
    assert_eq!(spec.http.len(), 3);
    assert_eq!(spec.http[0].route[0].weight, Some(90));
    assert_eq!(
        spec.http[1].matches[0].headers["x-canary"].exact.as_deref(),
        Some("true")
    );
    let dr = load(tutorial!("destinationrule.yaml"));
    let dr = &dr.destination_rules["production/api-server"].spec;
    let tp = dr.traffic_policy.as_ref().expect("traffic policy");
    assert_eq!(
        tp.outlier_detection
            .as_ref()
            .and_then(|o| o.consecutive5xx_errors),
        Some(5)
    );
    assert_eq!(dr.subsets.len(), 2);
    let r = load(tutorial!("virtualservice-resilience.yaml"));
    let retries = r.virtual_services["production/api-server"].spec.http[0]
        .retries
        .clone()
        .expect("retries");
    assert_eq!(retries.attempts, Some(3));
    assert_eq!(retries.per_try_timeout.map(|d| d.0.as_secs()), Some(10));
    let gw = load(tutorial!("gateway.yaml"));
    assert!(gw.gateways.contains_key("production/api-gateway"));
    assert!(gw.virtual_services.contains_key("production/api-external"));
    let pa = load(tutorial!("peerauthentication.yaml"));
    assert!(pa.peer_authentications.contains_key("istio-system/default"));
    assert!(pa.peer_authentications.contains_key("production/default"));
}

const GOOD_DR: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: fine, namespace: production}
spec: {host: api-server}
";

fn vs_with(route: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: api-server, namespace: production}}
spec:
  hosts: [api-server]
  http:
  - {route}
---{GOOD_DR}"
    )
}

/// The bad object is rejected alone: the good one beside it still loads.
fn rejected(text: &str, field: &str, reason: &str) {
    let o = load(text);
    let e = only_error(&o);
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(e.message.contains(reason), "expected {reason:?} in {e}");
    assert!(e.kind.is_some() && e.name.is_some(), "{e}");
    assert!(
        o.destination_rules.contains_key("production/fine"),
        "the good object was lost"
    );
}

#[test]
fn a_bad_duration_is_rejected_with_its_field() {
    rejected(
        &vs_with("route: [{destination: {host: api-server}}]\n    timeout: 3x"),
        "spec.http[0].timeout",
        "unknown unit",
    );
    // Istio requires at least 1ms (so "0s" is rejected, as its webhook does).
    rejected(
        &vs_with("route: [{destination: {host: api-server}}]\n    timeout: 0s"),
        "spec.http[0].timeout",
        "duration must be greater than 1ms",
    );
}

#[test]
fn an_unknown_enum_value_is_rejected() {
    rejected(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBBIN}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: fine, namespace: production}
spec: {host: api-server}
",
        "spec.trafficPolicy.loadBalancer.simple",
        "unknown variant `ROUND_ROBBIN`",
    );
}

#[test]
fn an_invalid_retry_on_condition_is_rejected() {
    rejected(
        &vs_with(
            "route: [{destination: {host: api-server}}]\n    retries: {attempts: 3, retryOn: \"5xx,connect-failure,bogus\"}",
        ),
        "spec.http[0].retries.retryOn",
        "\"bogus\" is not a valid retryOn policy",
    );
    // Status codes and the gRPC conditions are valid.
    let o = load(&vs_with(
        "route: [{destination: {host: api-server}}]\n    retries: {attempts: 2, retryOn: \"503,unavailable,cancelled,retriable-4xx,refused-stream\"}",
    ));
    assert!(o.errors.is_empty(), "{:?}", o.errors);
}

#[test]
fn all_weights_zero_across_several_destinations_is_rejected_but_relative_weights_are_fine() {
    rejected(
        &vs_with(
            "route:\n    - {destination: {host: api-server, subset: v1}, weight: 0}\n    - {destination: {host: api-server, subset: v2}, weight: 0}",
        ),
        "spec.http[0].route",
        "total destination weight = 0",
    );
    // Current Istio: weights are relative and need not add up to 100.
    let o = load(&vs_with(
        "route:\n    - {destination: {host: api-server, subset: v1}, weight: 3}\n    - {destination: {host: api-server, subset: v2}, weight: 1}",
    ));
    assert!(o.errors.is_empty(), "{:?}", o.errors);
}

#[test]
fn a_port_level_peer_authentication_without_selector_is_rejected() {
    rejected(
        &format!(
            "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: default, namespace: production}}
spec:
  mtls: {{mode: STRICT}}
  portLevelMtls:
    8080: {{mode: DISABLE}}
---{GOOD_DR}"
        ),
        "spec.portLevelMtls",
        "cannot have port level mTLS",
    );
}

#[test]
fn out_of_range_percentages_are_rejected() {
    rejected(
        &vs_with(
            "route: [{destination: {host: api-server, subset: v1}}]\n    mirror: {host: api-server, subset: v2}\n    mirrorPercentage: {value: 150}",
        ),
        "spec.http[0].mirrorPercentage",
        "must be in range [0, 100]",
    );
    rejected(
        &vs_with(
            "route: [{destination: {host: api-server}}]\n    fault: {abort: {httpStatus: 503, percentage: {value: -1}}}",
        ),
        "spec.http[0].fault.abort.percentage",
        "must be in range [0, 100]",
    );
    rejected(
        &format!(
            "apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: api-server, namespace: production}}
spec:
  host: api-server
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 5, maxEjectionPercent: 120}}
---{GOOD_DR}"
        ),
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "must be in range [0, 100]",
    );
}

#[test]
fn a_wrong_type_names_the_field() {
    rejected(
        &vs_with("route: [{destination: {host: api-server}, weight: heavy}]"),
        "spec.http[0].route[0].weight",
        "invalid type",
    );
}

#[test]
fn an_unsupported_api_version_is_rejected() {
    let o = load(&format!(
        "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {{name: x, namespace: production}}\n---{GOOD_DR}"
    ));
    let e = only_error(&o);
    assert_eq!(e.field.as_deref(), Some("apiVersion"));
    assert!(e.message.contains("networking.istio.io/v1beta1"), "{e}");
}

#[test]
fn unknown_fields_are_kept_and_reported_not_rejected() {
    let o = load(&vs_with(
        "route: [{destination: {host: api-server}}]\n    retires: {attempts: 3}",
    ));
    assert!(o.errors.is_empty(), "{:?}", o.errors);
    let vs = &o.virtual_services["production/api-server"];
    assert_eq!(vs.unknown_fields, ["spec.http[0].retires"]);
}

#[test]
fn an_sni_host_outside_the_virtual_service_hosts_is_rejected() {
    let vs = |sni: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: secure, namespace: production}}
spec:
  hosts: [secure, \"*.example.com\"]
  tls:
  - match: [{{sniHosts: [{sni}]}}]
    route: [{{destination: {{host: secure}}}}]
---{GOOD_DR}"
        )
    };
    for fine in ["secure", "a.example.com", "\"*.example.com\""] {
        assert!(load(&vs(fine)).errors.is_empty(), "{fine}");
    }
    rejected(
        &vs("other.example.org"),
        "spec.tls[0].match[0].sniHosts[0]",
        "not a compatible subset",
    );
}
