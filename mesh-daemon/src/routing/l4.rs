//! Per-connection route selection for `tls` and `tcp` routes: the first route with a
//! matching block picks the destinations of the whole connection.
use std::{collections::BTreeMap, net::IpAddr};

use super::table::{Cidr, L4Match, L4Route};
use crate::config::hosts;

/// What an L4 route may look at in a connection.
pub struct ConnectionView<'a> {
    pub destination: IpAddr,
    pub port: u16,
    /// The server name of the ClientHello, for TLS connections that sent one.
    pub sni: Option<&'a str>,
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: &'a str,
}

impl Cidr {
    /// `None` for text that is neither an address nor `address/prefix`.
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = s.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| -> (u128, u32) {
            match a {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let ((net, width), (addr, addr_width)) = (bits(self.addr), bits(ip));
        if width != addr_width {
            return false;
        }
        let mask = match self.prefix {
            0 => 0,
            p => u128::MAX << (128 - u32::from(p)),
        };
        net & mask == addr & mask
    }
}

impl L4Match {
    pub fn matches(&self, c: &ConnectionView<'_>) -> bool {
        let sni_ok = self.sni_hosts.is_empty()
            || c.sni
                .is_some_and(|sni| self.sni_hosts.iter().any(|p| hosts::matches(p, sni)));
        sni_ok
            && self.port.is_none_or(|p| p == c.port)
            && (self.destination_subnets.is_empty()
                || self
                    .destination_subnets
                    .iter()
                    .any(|n| n.contains(c.destination)))
            && self
                .source_namespace
                .as_deref()
                .is_none_or(|ns| ns == c.source_namespace)
            && crate::state::selects(&self.source_labels, c.source_labels)
    }
}

/// The first route that takes the connection.
pub fn select<'r>(
    routes: impl IntoIterator<Item = &'r L4Route>,
    c: &ConnectionView<'_>,
) -> Option<&'r L4Route> {
    routes
        .into_iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(sni: Option<&'a str>, labels: &'a BTreeMap<String, String>) -> ConnectionView<'a> {
        ConnectionView {
            destination: "10.96.0.20".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port: 443,
            sni,
            source_labels: labels,
            source_namespace: "shop",
        }
    }

    #[test]
    fn cidrs_cover_their_prefix_only() {
        let net = Cidr::parse("10.96.0.0/16").expect("cidr");
        assert!(net.contains("10.96.200.1".parse().expect("ip")));
        assert!(!net.contains("10.97.0.1".parse().expect("ip")));
        assert!(!net.contains("::1".parse().expect("ip")));
        let one = Cidr::parse("fd00::5").expect("address");
        assert_eq!(one.prefix, 128);
        assert!(one.contains("fd00::5".parse().expect("ip")));
        assert!(!one.contains("fd00::6".parse().expect("ip")));
        assert!(
            Cidr::parse("0.0.0.0/0").is_some_and(|c| c.contains("8.8.8.8".parse().expect("ip")))
        );
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert_eq!(Cidr::parse("bogus"), None);
    }

    #[test]
    fn sni_port_and_source_all_must_hold() {
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let m = L4Match {
            sni_hosts: vec!["*.example.com".into()],
            port: Some(443),
            source_namespace: Some("shop".into()),
            source_labels: labels.clone(),
            ..Default::default()
        };
        assert!(m.matches(&view(Some("api.example.com"), &labels)));
        assert!(!m.matches(&view(Some("example.com"), &labels)));
        assert!(
            !m.matches(&view(None, &labels)),
            "no SNI never matches an SNI route"
        );
        assert!(!m.matches(&view(Some("api.example.com"), &BTreeMap::new())));
        let subnet = L4Match {
            destination_subnets: vec![Cidr::parse("10.96.0.0/24").expect("cidr")],
            ..Default::default()
        };
        assert!(subnet.matches(&view(None, &labels)));
    }

    #[test]
    fn first_matching_route_wins_and_unconditional_routes_take_the_rest() {
        let labels = BTreeMap::new();
        let by_port = L4Route {
            matches: vec![L4Match {
                port: Some(8443),
                ..Default::default()
            }],
            clusters: vec![],
        };
        let catch_all = L4Route {
            matches: vec![],
            clusters: vec![],
        };
        let routes = [by_port, catch_all];
        let chosen = select(&routes, &view(None, &labels)).expect("a route");
        assert!(chosen.matches.is_empty());
    }
}
