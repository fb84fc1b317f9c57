//! Which pods are in the mesh, and what of their traffic stays out of it.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

/// Namespace labels that put a namespace's pods in the mesh: Sidelane's own and, so that
/// clusters migrating from Istio keep working, sidecar injection and ambient mode.
pub const NAMESPACE_OPT_IN: &[(&str, &str)] = &[
    ("sidelane.dev/mesh", "enabled"),
    ("istio-injection", "enabled"),
    ("istio.io/dataplane-mode", "ambient"),
];

/// Pod annotations (or labels: Istio moved `sidecar.istio.io/inject` to a label) that keep
/// one pod out.
pub const POD_OPT_OUT: &[(&str, &str)] = &[
    ("sidelane.dev/mesh", "disabled"),
    ("sidecar.istio.io/inject", "false"),
    ("istio.io/dataplane-mode", "none"),
];

pub const EXCLUDE_OUTBOUND_PORTS: &[&str] = &[
    "sidelane.dev/exclude-outbound-ports",
    "traffic.sidecar.istio.io/excludeOutboundPorts",
];
pub const EXCLUDE_INBOUND_PORTS: &[&str] = &[
    "sidelane.dev/exclude-inbound-ports",
    "traffic.sidecar.istio.io/excludeInboundPorts",
];
pub const EXCLUDE_OUTBOUND_CIDRS: &[&str] = &[
    "sidelane.dev/exclude-outbound-cidrs",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
];

/// An IP network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?
        };
        Ok(Self { addr, prefix })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Exclusions {
    pub outbound_ports: Vec<u16>,
    pub inbound_ports: Vec<u16>,
    pub outbound_cidrs: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enrollment {
    pub enrolled: bool,
    /// Why, in words `meshctl` can show.
    pub reason: String,
    pub exclusions: Exclusions,
    /// Annotations that could not be parsed; the rest of the pod's settings still apply.
    pub problems: Vec<String>,
}

pub fn decide(
    namespace_labels: Option<&BTreeMap<String, String>>,
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
    host_network: bool,
) -> Enrollment {
    let mut problems = Vec::new();
    let exclusions = Exclusions {
        outbound_ports: ports(pod_annotations, EXCLUDE_OUTBOUND_PORTS, &mut problems),
        inbound_ports: ports(pod_annotations, EXCLUDE_INBOUND_PORTS, &mut problems),
        outbound_cidrs: cidrs(pod_annotations, &mut problems),
    };
    let opt_in = namespace_labels.and_then(|labels| {
        NAMESPACE_OPT_IN
            .iter()
            .find(|(k, v)| labels.get(*k).map(String::as_str) == Some(v))
    });
    let opt_out = POD_OPT_OUT.iter().find(|(k, v)| {
        pod_annotations.get(*k).map(String::as_str) == Some(v)
            || pod_labels.get(*k).map(String::as_str) == Some(v)
    });
    let (enrolled, reason) = match (opt_in, opt_out) {
        _ if host_network => (false, "pod uses the host network".to_owned()),
        (None, _) => (false, "namespace not labelled for the mesh".to_owned()),
        (Some(_), Some((k, v))) => (false, format!("opted out by {k}={v}")),
        (Some((k, v)), None) => (true, format!("namespace labelled {k}={v}")),
    };
    Enrollment {
        enrolled,
        reason,
        exclusions,
        problems,
    }
}

fn values<'a>(annotations: &'a BTreeMap<String, String>, keys: &[&str]) -> Vec<(&'a str, &'a str)> {
    keys.iter()
        .filter_map(|k| annotations.get_key_value(*k))
        .flat_map(|(k, v)| v.split(',').map(move |item| (k.as_str(), item.trim())))
        .filter(|(_, item)| !item.is_empty())
        .collect()
}

fn ports(
    annotations: &BTreeMap<String, String>,
    keys: &[&str],
    problems: &mut Vec<String>,
) -> Vec<u16> {
    let mut out = Vec::new();
    for (key, item) in values(annotations, keys) {
        match item.parse::<u16>() {
            Ok(p) if p != 0 => out.push(p),
            _ => problems.push(format!("{key}: {item:?} is not a port (1-65535)")),
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn cidrs(annotations: &BTreeMap<String, String>, problems: &mut Vec<String>) -> Vec<Cidr> {
    let mut out = Vec::new();
    for (key, item) in values(annotations, EXCLUDE_OUTBOUND_CIDRS) {
        match item.parse::<Cidr>() {
            Ok(c) if !out.contains(&c) => out.push(c),
            Ok(_) => {}
            Err(e) => problems.push(format!("{key}: {e}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn namespace_labels_enrol_and_pods_opt_out() {
        for (k, v) in NAMESPACE_OPT_IN {
            let ns = map(&[(k, v)]);
            assert!(
                decide(Some(&ns), &map(&[]), &map(&[]), false).enrolled,
                "{k}={v}"
            );
        }
        let ns = map(&[("istio-injection", "disabled")]);
        assert!(!decide(Some(&ns), &map(&[]), &map(&[]), false).enrolled);
        assert!(!decide(None, &map(&[]), &map(&[]), false).enrolled);

        let ns = map(&[("sidelane.dev/mesh", "enabled")]);
        let off = decide(
            Some(&ns),
            &map(&[]),
            &map(&[("sidecar.istio.io/inject", "false")]),
            false,
        );
        assert!(!off.enrolled);
        assert_eq!(off.reason, "opted out by sidecar.istio.io/inject=false");
        assert!(
            !decide(
                Some(&ns),
                &map(&[("sidecar.istio.io/inject", "false")]),
                &map(&[]),
                false
            )
            .enrolled
        );
        assert!(
            !decide(
                Some(&ns),
                &map(&[]),
                &map(&[("sidelane.dev/mesh", "disabled")]),
                false
            )
            .enrolled
        );
        assert!(!decide(Some(&ns), &map(&[]), &map(&[]), true).enrolled);
    }

    #[test]
    fn exclusions_merge_sidelane_and_istio_annotations_and_report_bad_items() {
        let ns = map(&[("sidelane.dev/mesh", "enabled")]);
        let e = decide(
            Some(&ns),
            &map(&[]),
            &map(&[
                ("sidelane.dev/exclude-outbound-ports", "5432, 6379"),
                ("traffic.sidecar.istio.io/excludeOutboundPorts", "6379,x"),
                (
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                    "10.0.0.0/8,fd00::/8,1.2.3.4,10.0.0.0/40",
                ),
            ]),
            false,
        );
        assert!(e.enrolled);
        assert_eq!(e.exclusions.outbound_ports, vec![5432, 6379]);
        assert_eq!(e.exclusions.outbound_cidrs.len(), 3);
        assert_eq!(e.exclusions.outbound_cidrs[2].prefix, 32);
        assert_eq!(e.problems.len(), 2, "{:?}", e.problems);
    }
}
