//! Per-request route selection: the first route with a matching block wins, then a
//! destination is drawn by weight.
use std::collections::BTreeMap;

use super::table::{HttpRoute, Matcher, RequestMatch, Rewrite, VirtualHost, WeightedCluster};
use crate::config::istio::networking::{HttpRedirect, RedirectPortSelection};

/// What route matching may look at in a request.
pub struct RequestView<'a> {
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub headers: &'a http::HeaderMap,
    pub port: u16,
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: &'a str,
}

fn header<'a>(req: &'a RequestView<'_>, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The value of query parameter `name` (empty when it has none).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn opt(m: Option<&Matcher>, value: &str) -> bool {
    m.is_none_or(|m| m.matches(value))
}

impl RequestMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match (&self.uri, self.ignore_uri_case) {
            (None, _) => true,
            (Some(m), true) => m.matches(&req.path.to_lowercase()),
            (Some(m), false) => m.matches(req.path),
        };
        path_ok
            && opt(self.method.as_ref(), req.method)
            && opt(self.scheme.as_ref(), req.scheme)
            && opt(self.authority.as_ref(), req.authority)
            && self.port.is_none_or(|p| p == req.port)
            && self
                .source_namespace
                .as_deref()
                .is_none_or(|ns| ns == req.source_namespace)
            && crate::state::selects(&self.source_labels, req.source_labels)
            && self
                .headers
                .iter()
                .all(|(name, m)| match (header(req, name), m) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(v), Some(m)) => m.matches(v),
                })
            && self
                .without_headers
                .iter()
                .all(|(name, m)| match (header(req, name), m) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(v), Some(m)) => !m.matches(v),
                })
            && self
                .query_params
                .iter()
                .all(|(name, m)| match (query_param(req.query, name), m) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(v), Some(m)) => m.matches(v),
                })
    }
}

impl VirtualHost {
    /// The first route whose match blocks (any of them) accept the request, with the block
    /// that matched (`None` for a route without conditions).
    pub fn select(&self, req: &RequestView<'_>) -> Option<(&HttpRoute, Option<&RequestMatch>)> {
        self.routes.iter().find_map(|r| {
            if r.matches.is_empty() {
                return Some((r, None));
            }
            r.matches
                .iter()
                .find(|m| m.matches(req))
                .map(|m| (r, Some(m)))
        })
    }
}

/// The request path after `rewrite`: a URI rewrite replaces the prefix that matched (all of
/// the path for exact and regex matches; a route without a URI condition matched the prefix
/// "/"), as Istio documents it; a regex rewrite substitutes every match, with Istio's RE2
/// style `\1` group references. The query string is kept.
pub fn rewrite_path(rw: &Rewrite, matched_uri: Option<&Matcher>, path_and_query: &str) -> String {
    let (p, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let new = if let Some(uri) = &rw.uri {
        match matched_uri {
            Some(Matcher::Prefix(prefix)) if p.len() >= prefix.len() => {
                format!("{uri}{}", &p[prefix.len()..])
            }
            Some(Matcher::Exact(_) | Matcher::Regex(_)) => uri.clone(),
            _ => format!("{uri}{}", p.strip_prefix('/').unwrap_or(p)),
        }
    } else if let Some((re, replacement)) = &rw.uri_regex {
        re.replace_all(p, replacement.as_str()).into_owned()
    } else {
        p.to_owned()
    };
    match query {
        Some(q) => format!("{new}?{q}"),
        None => new,
    }
}

/// The `Location` of an Istio redirect, as Envoy builds it: `uri` swaps the path and keeps
/// the request's query unless it brings its own; `authority` swaps host and port (as
/// written); `port` sets the port, `derivePort` takes the scheme's default (none) or the
/// request's.
pub fn redirect_location(rd: &HttpRedirect, authority: &str, path_and_query: &str) -> String {
    let scheme = rd.scheme.as_deref().unwrap_or("http");
    let (_, request_port) = split_port(authority);
    let host = rd.authority.as_deref().unwrap_or(authority);
    let host = match (rd.port, &rd.derive_port) {
        (Some(p), _) => format!("{}:{p}", split_port(host).0),
        (None, Some(RedirectPortSelection::FromProtocolDefault)) => split_port(host).0.to_owned(),
        (None, Some(RedirectPortSelection::FromRequestPort)) => match request_port {
            Some(p) => format!("{}:{p}", split_port(host).0),
            None => split_port(host).0.to_owned(),
        },
        (None, None) => host.to_owned(),
    };
    let path = match rd.uri.as_deref() {
        None => path_and_query.to_owned(),
        Some(uri) if uri.contains('?') => uri.to_owned(),
        Some(uri) => match path_and_query.split_once('?') {
            Some((_, q)) => format!("{uri}?{q}"),
            None => uri.to_owned(),
        },
    };
    format!("{scheme}://{host}{path}")
}

/// `host:port` into host and port (IPv6 literals keep their brackets).
fn split_port(authority: &str) -> (&str, Option<&str>) {
    match authority.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') =>
        {
            (h, Some(p))
        }
        _ => (authority, None),
    }
}

/// Draws a destination with probability proportional to its weight; `roll` is uniform in
/// `0..u32::MAX`. `None` when every weight is zero.
pub fn pick_weighted(clusters: &[WeightedCluster], roll: u32) -> Option<&WeightedCluster> {
    let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = u64::from(roll) * total / (u64::from(u32::MAX) + 1);
    for c in clusters {
        let w = u64::from(c.weight);
        if point < w {
            return Some(c);
        }
        point -= w;
    }
    clusters.last()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wc(name: &str, weight: u32) -> WeightedCluster {
        WeightedCluster {
            cluster: name.into(),
            host: "h".into(),
            port: 80,
            subset: None,
            weight,
            headers: None,
        }
    }

    #[test]
    fn weighted_choice_follows_relative_weights() {
        let c = [wc("v1", 9), wc("v2", 1)];
        let mut v1 = 0;
        let n = 10_000u32;
        for i in 0..n {
            // The middle of the i-th of n equal slices of the roll's range.
            let roll =
                ((2 * u64::from(i) + 1) * (u64::from(u32::MAX) + 1) / (2 * u64::from(n))) as u32;
            if pick_weighted(&c, roll).map(|c| c.cluster.as_str()) == Some("v1") {
                v1 += 1;
            }
        }
        assert_eq!(v1, 9_000);
        assert!(pick_weighted(&[wc("a", 0), wc("b", 0)], 5).is_none());
        assert_eq!(
            pick_weighted(&[wc("a", 0), wc("b", 3)], 0).map(|c| c.cluster.as_str()),
            Some("b")
        );
    }

    #[test]
    fn redirects_build_envoys_location() {
        let rd = |uri: Option<&str>, authority: Option<&str>| HttpRedirect {
            uri: uri.map(str::to_owned),
            authority: authority.map(str::to_owned),
            ..Default::default()
        };
        let loc = |r: &HttpRedirect| redirect_location(r, "api:8080", "/old?x=1");
        // The query stays unless the new URI brings one.
        assert_eq!(loc(&rd(Some("/new"), None)), "http://api:8080/new?x=1");
        assert_eq!(loc(&rd(Some("/new?y=2"), None)), "http://api:8080/new?y=2");
        // A new authority replaces host and port as written.
        assert_eq!(
            loc(&rd(None, Some("example.com"))),
            "http://example.com/old?x=1"
        );
        let mut r = rd(None, Some("example.com"));
        r.derive_port = Some(RedirectPortSelection::FromRequestPort);
        assert_eq!(loc(&r), "http://example.com:8080/old?x=1");
        r.port = Some(9443);
        r.scheme = Some("https".into());
        assert_eq!(loc(&r), "https://example.com:9443/old?x=1");
        let mut r = rd(None, None);
        r.derive_port = Some(RedirectPortSelection::FromProtocolDefault);
        assert_eq!(loc(&r), "http://api/old?x=1");
    }

    #[test]
    fn rewrites_follow_istio() {
        use crate::config::istio::networking::{HttpRewrite, RegexRewrite};
        let uri = |u: &str| {
            Rewrite::compile(&HttpRewrite {
                uri: Some(u.into()),
                ..Default::default()
            })
        };
        let prefix = Matcher::Prefix("/legacy/".into());
        assert_eq!(
            rewrite_path(&uri("/v2/"), Some(&prefix), "/legacy/a/b?x=1"),
            "/v2/a/b?x=1"
        );
        let exact = Matcher::Exact("/login".into());
        assert_eq!(
            rewrite_path(&uri("/auth/login"), Some(&exact), "/login?next=/"),
            "/auth/login?next=/"
        );
        assert_eq!(rewrite_path(&uri("/base/"), None, "/x/y"), "/base/x/y");
        let regex = Rewrite::compile(&HttpRewrite {
            uri_regex_rewrite: Some(RegexRewrite {
                pattern: "^/service/([^/]+)(/.*)$".into(),
                rewrite: "\\2/instance/\\1".into(),
            }),
            ..Default::default()
        });
        assert_eq!(
            rewrite_path(&regex, None, "/service/foo/v1/api?q"),
            "/v1/api/instance/foo?q"
        );
    }

    #[test]
    fn match_blocks_and_presence() {
        let headers = {
            let mut h = http::HeaderMap::new();
            h.insert("x-canary", "true".parse().expect("value"));
            h
        };
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let req = RequestView {
            path: "/API/users",
            query: Some("debug=1&v=2"),
            method: "GET",
            scheme: "http",
            authority: "api-server:8080",
            headers: &headers,
            port: 8080,
            source_labels: &labels,
            source_namespace: "production",
        };
        let m = |f: &dyn Fn(&mut RequestMatch)| {
            let mut m = RequestMatch::default();
            f(&mut m);
            m.matches(&req)
        };
        assert!(!m(&|m| m.uri = Some(Matcher::Prefix("/api".into()))));
        assert!(m(&|m| {
            m.uri = Some(Matcher::Prefix("/api".into()));
            m.ignore_uri_case = true;
        }));
        assert!(m(
            &|m| m.headers = vec![("x-canary".into(), Some(Matcher::Exact("true".into())))]
        ));
        assert!(m(&|m| m.headers = vec![("x-canary".into(), None)]));
        assert!(!m(&|m| m.headers = vec![("x-other".into(), None)]));
        assert!(!m(&|m| m.without_headers = vec![("x-canary".into(), None)]));
        assert!(m(&|m| m.without_headers =
            vec![("x-canary".into(), Some(Matcher::Exact("false".into())))]));
        assert!(m(
            &|m| m.query_params = vec![("v".into(), Some(Matcher::Exact("2".into())))]
        ));
        assert!(!m(
            &|m| m.query_params = vec![("v".into(), Some(Matcher::Exact("3".into())))]
        ));
        assert!(m(&|m| m.source_labels = labels.clone()));
        assert!(!m(&|m| m.source_namespace = Some("staging".into())));
        assert!(!m(&|m| m.port = Some(9090)));
    }
}
