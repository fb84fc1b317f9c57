//! Host names as Istio resolves them.

/// Istio's `ResolveShortnameToFQDN`: a name without a dot is a Service in the resource's
/// namespace (`api-server` in `production` is `api-server.production.svc.cluster.local`);
/// anything with a dot, an IP or `*` is taken as written.
pub fn fqdn(host: &str, namespace: &str, cluster_domain: &str) -> String {
    if host.is_empty()
        || host == "*"
        || host.contains('.')
        || host.parse::<std::net::IpAddr>().is_ok()
    {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.{cluster_domain}")
    }
}

/// Whether `pattern` (possibly `*.suffix` or `*`) covers `host`.
pub fn matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_the_resources_namespace_only() {
        assert_eq!(
            fqdn("api-server", "production", "cluster.local"),
            "api-server.production.svc.cluster.local"
        );
        // Istio expands only dotless names.
        assert_eq!(
            fqdn("api-server.production", "x", "cluster.local"),
            "api-server.production"
        );
        assert_eq!(
            fqdn("api.example.com", "x", "cluster.local"),
            "api.example.com"
        );
        assert_eq!(fqdn("*", "x", "cluster.local"), "*");
        assert_eq!(fqdn("10.0.0.1", "x", "cluster.local"), "10.0.0.1");
    }

    #[test]
    fn wildcards() {
        assert!(matches("*.example.com", "api.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(matches("*", "anything"));
        assert!(matches("API.example.com", "api.example.com"));
    }
}
