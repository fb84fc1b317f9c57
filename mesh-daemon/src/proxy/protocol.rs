//! Which protocol a Service port speaks, as Istio decides it: `appProtocol` first, then
//! the port name's prefix (`http`, `http-web`, `grpc-api` ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 upstream (HTTP/2 from clients is accepted and translated).
    Http,
    /// HTTP/2 upstream with prior knowledge (http2, grpc, h2c).
    Http2,
    /// Opaque bytes: TCP, TLS, and anything Sidelane does not parse.
    Tcp,
}

impl Protocol {
    /// `None` when the port does not declare one (Istio would sniff).
    pub fn declared(port_name: &str, app_protocol: Option<&str>) -> Option<Self> {
        if let Some(p) = app_protocol {
            return Some(Self::from_token(p.rsplit('/').next().unwrap_or(p)));
        }
        let prefix = port_name.split('-').next().unwrap_or("");
        (!prefix.is_empty()).then(|| Self::from_token(prefix))
    }

    fn from_token(t: &str) -> Self {
        match t.to_ascii_lowercase().as_str() {
            "http" => Self::Http,
            "http2" | "grpc" | "grpc-web" | "h2c" => Self::Http2,
            _ => Self::Tcp,
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2)
    }
}

/// Whether the first bytes a client sent are an HTTP/1 request line or the HTTP/2 preface.
pub fn sniff_http(first: &[u8]) -> bool {
    const METHODS: &[&[u8]] = &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"TRACE ",
        b"CONNECT ",
    ];
    first.starts_with(b"PRI * HTTP/2.0") || METHODS.iter().any(|m| first.starts_with(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_protocol_selection() {
        assert_eq!(Protocol::declared("http", None), Some(Protocol::Http));
        assert_eq!(Protocol::declared("http-web", None), Some(Protocol::Http));
        assert_eq!(Protocol::declared("http2", None), Some(Protocol::Http2));
        assert_eq!(Protocol::declared("grpc-api", None), Some(Protocol::Http2));
        assert_eq!(Protocol::declared("tcp-db", None), Some(Protocol::Tcp));
        assert_eq!(Protocol::declared("tls", None), Some(Protocol::Tcp));
        assert_eq!(Protocol::declared("mongo", None), Some(Protocol::Tcp));
        assert_eq!(Protocol::declared("", None), None);
        // appProtocol wins over the name, including Kubernetes' prefixed values.
        assert_eq!(
            Protocol::declared("tcp", Some("http")),
            Some(Protocol::Http)
        );
        assert_eq!(
            Protocol::declared("web", Some("kubernetes.io/h2c")),
            Some(Protocol::Http2)
        );
        assert!(sniff_http(b"GET / HTTP/1.1\r\n"));
        assert!(sniff_http(b"PRI * HTTP/2.0\r\n\r\nSM"));
        assert!(!sniff_http(b"\x16\x03\x01"));
    }
}
