//! Hop-by-hop headers (RFC 9110 7.6.1) describe one connection, not the message, so a proxy
//! removes them before it forwards either way, as Envoy does. Passed on, a client's
//! `Connection: close` closed the pooled upstream connection after every request, and an
//! upstream's closed the client's.
use http::{HeaderMap, HeaderName, header};

/// Fixed hop-by-hop names besides those a `Connection` header lists. `TE` is handled apart:
/// `te: trailers` is end to end in practice (gRPC needs it).
const ALWAYS: [HeaderName; 4] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

pub fn strip(headers: &mut HeaderMap) {
    if !any_named(headers) {
        return;
    }
    // A protocol upgrade (WebSocket) needs `Connection: upgrade` and `Upgrade` to reach the
    // server; those requests are left as they came.
    if headers.contains_key(header::UPGRADE) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(ALWAYS.iter()) {
        headers.remove(name);
    }
    te_to_trailers(headers);
}

/// What HTTP/2 forbids in a request (RFC 9113 8.2.2): every connection-specific field, an
/// upgrade's included, and `TE` other than `trailers`. [`strip`] has removed them from all
/// but upgrade requests, so this is one pass over the names for nearly every request.
pub fn strip_for_h2(headers: &mut HeaderMap) {
    if !any_named(headers) {
        return;
    }
    for name in ALWAYS.iter().chain([&header::UPGRADE]) {
        headers.remove(name);
    }
    te_to_trailers(headers);
}

/// Whether any hop-by-hop name is there at all. Most messages carry none: one pass over the
/// names (no hashing) settles it.
fn any_named(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|k| k == header::TE || k == header::UPGRADE || ALWAYS.iter().any(|a| a == k))
}

/// `TE` keeps `trailers` if it listed it (end to end in practice: gRPC needs it) and nothing
/// else.
fn te_to_trailers(headers: &mut HeaderMap) {
    let te_trailers = lists(headers, &header::TE, "trailers");
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// Whether a comma-separated list header (`Connection`, `TE`) names `token`, in any of its
/// fields, case-insensitively.
pub fn lists(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| lists_token(v.as_bytes(), token.as_bytes()))
}

/// Whether one comma-separated list value names `token`, case-insensitively.
pub fn lists_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn removes_connection_headers_and_what_they_name() {
        let mut h = map(&[
            ("connection", "close, x-session-hop"),
            ("keep-alive", "timeout=5"),
            ("x-session-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("x-end-to-end", "kept"),
        ]);
        strip(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-end-to-end", "te"]);
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    }

    #[test]
    fn leaves_upgrades_alone() {
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        strip(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn http2_requests_lose_what_http2_forbids() {
        let mut h = map(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("x-end-to-end", "kept"),
        ]);
        strip_for_h2(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-end-to-end"]);
        let mut h = map(&[("te", "gzip")]);
        strip_for_h2(&mut h);
        assert!(h.is_empty());
        let mut h = map(&[("te", "gzip, trailers")]);
        strip_for_h2(&mut h);
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    }
}
