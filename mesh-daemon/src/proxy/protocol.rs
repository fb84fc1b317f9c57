//! Which protocol a connection speaks, as Istio decides it: declared by the Service port
//! (`appProtocol` first, then the port name's prefix: `http`, `http-web`, `grpc-api` ...),
//! otherwise detected from the client's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 upstream (HTTP/2 from clients is accepted and translated).
    Http,
    /// HTTP/2 upstream with prior knowledge (http2, grpc, h2c).
    Http2,
    /// TLS the mesh does not terminate: routed by the ClientHello's SNI, forwarded as bytes.
    Tls,
    /// Opaque bytes: TCP and the protocols Sidelane does not parse (mongo, mysql, redis).
    Tcp,
}

impl Protocol {
    /// `None` when the port declares nothing Istio recognises: the connection is sniffed.
    /// An `appProtocol` Istio does not know falls back to the port name, as in Istio.
    pub fn declared(port_name: &str, app_protocol: Option<&str>) -> Option<Self> {
        app_protocol
            .and_then(|p| Self::from_token(p.rsplit('/').next().unwrap_or(p)))
            .or_else(|| Self::from_token(port_name.split('-').next().unwrap_or("")))
    }

    fn from_token(t: &str) -> Option<Self> {
        Some(match t.to_ascii_lowercase().as_str() {
            "http" => Self::Http,
            "http2" | "grpc" | "grpc-web" | "h2c" => Self::Http2,
            "https" | "tls" => Self::Tls,
            "tcp" | "mongo" | "mysql" | "redis" => Self::Tcp,
            _ => return None,
        })
    }

    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2)
    }

    /// What the client's first bytes say; `None` while they are a prefix of more than one
    /// answer (wait for more). HTTP/1 is a known method and a space, HTTP/2 the full
    /// connection preface, TLS a handshake record; anything else is opaque TCP.
    pub fn detect(first: &[u8]) -> Option<Self> {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
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
        if first.is_empty() {
            return None;
        }
        if first.starts_with(PREFACE) {
            return Some(Self::Http2);
        }
        if METHODS.iter().any(|m| first.starts_with(m)) {
            return Some(Self::Http);
        }
        // Handshake record (22), then a 3.x record version.
        if first[0] == 0x16 && first.get(1).is_none_or(|v| *v == 3) {
            return Some(Self::Tls);
        }
        let could_be = |whole: &[u8]| whole.len() > first.len() && whole.starts_with(first);
        if could_be(PREFACE) || METHODS.iter().any(|m| could_be(m)) {
            return None;
        }
        Some(Self::Tcp)
    }
}

/// The server name a TLS ClientHello asks for. `Err` while the record is incomplete (wait
/// for more bytes); `Ok(None)` when the bytes are a complete ClientHello without SNI, or
/// not one at all.
pub fn client_hello_sni(buf: &[u8]) -> Result<Option<String>, Incomplete> {
    // Record header: type, version (2), length (2).
    let Some(header) = buf.get(..5) else {
        return Err(Incomplete);
    };
    if header[0] != 0x16 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let Some(record) = buf.get(5..5 + len) else {
        return Err(Incomplete);
    };
    Ok(parse_client_hello(record))
}

#[derive(Debug, PartialEq, Eq)]
pub struct Incomplete;

/// A cursor over a handshake message; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The `server_name` extension (RFC 6066) of a ClientHello that fits in its first record.
fn parse_client_hello(record: &[u8]) -> Option<String> {
    let mut r = Reader(record);
    // Handshake type 1 (ClientHello), 24-bit length.
    if r.u8()? != 1 {
        return None;
    }
    r.take(3)?;
    r.take(2 + 32)?; // legacy version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let mut body = Reader(exts.vec16()?);
        if kind != 0 {
            continue;
        }
        let mut names = Reader(body.vec16()?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type == 0 {
                return std::str::from_utf8(name)
                    .ok()
                    .map(|n| n.to_ascii_lowercase());
            }
        }
    }
    None
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
        assert_eq!(Protocol::declared("tls", None), Some(Protocol::Tls));
        assert_eq!(Protocol::declared("https-admin", None), Some(Protocol::Tls));
        assert_eq!(Protocol::declared("mongo", None), Some(Protocol::Tcp));
        // Names Istio does not know, and no name at all, are sniffed.
        assert_eq!(Protocol::declared("", None), None);
        assert_eq!(Protocol::declared("web", None), None);
        // appProtocol wins over the name, including Kubernetes' prefixed values; an unknown
        // one falls back to the name.
        assert_eq!(
            Protocol::declared("tcp", Some("http")),
            Some(Protocol::Http)
        );
        assert_eq!(
            Protocol::declared("web", Some("kubernetes.io/h2c")),
            Some(Protocol::Http2)
        );
        assert_eq!(
            Protocol::declared("http", Some("custom")),
            Some(Protocol::Http)
        );
    }

    #[test]
    fn detection_waits_only_while_the_bytes_are_ambiguous() {
        assert_eq!(
            Protocol::detect(b"GET / HTTP/1.1\r\n"),
            Some(Protocol::Http)
        );
        assert_eq!(
            Protocol::detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http2)
        );
        assert_eq!(
            Protocol::detect(b"\x16\x03\x01\x02\x00"),
            Some(Protocol::Tls)
        );
        assert_eq!(Protocol::detect(b"hello\n"), Some(Protocol::Tcp));
        assert_eq!(Protocol::detect(b"GE"), None);
        assert_eq!(Protocol::detect(b"PRI * HTTP"), None);
        assert_eq!(Protocol::detect(b""), None);
        // A method without its space is not HTTP.
        assert_eq!(Protocol::detect(b"GETX"), Some(Protocol::Tcp));
    }

    /// A ClientHello as a TLS 1.2/1.3 client writes it, with SNI `name`.
    pub(crate) fn client_hello(name: &str) -> Vec<u8> {
        let mut sni = vec![0u8];
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name.as_bytes());
        let mut list = (sni.len() as u16).to_be_bytes().to_vec();
        list.extend(sni);
        // An unrelated extension first (supported_versions), then server_name.
        let mut exts = vec![0, 43, 0, 3, 2, 3, 4, 0, 0];
        exts.extend((list.len() as u16).to_be_bytes());
        exts.extend(list);
        let mut hello = vec![3, 3];
        hello.extend([7u8; 32]);
        hello.extend([0]); // session id
        hello.extend([0, 2, 0x13, 0x01]); // one cipher suite
        hello.extend([1, 0]); // null compression
        hello.extend((exts.len() as u16).to_be_bytes());
        hello.extend(exts);
        let mut hs = vec![1, 0];
        hs.extend((hello.len() as u16).to_be_bytes());
        hs.extend(hello);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn sni_is_read_from_a_client_hello() {
        let hello = client_hello("API.example.com");
        assert_eq!(
            client_hello_sni(&hello),
            Ok(Some("api.example.com".to_owned()))
        );
        assert_eq!(client_hello_sni(&hello[..hello.len() - 3]), Err(Incomplete));
        assert_eq!(client_hello_sni(&hello[..3]), Err(Incomplete));
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n"), Ok(None));
        // A record whose lengths lie is no ClientHello, not a panic.
        let mut broken = hello.clone();
        broken[43] = 0xff; // the session id claims more bytes than there are
        assert_eq!(client_hello_sni(&broken), Ok(None));
    }
}
