//! One line per connection on stdout, in Envoy's default TCP format so that existing log
//! pipelines parse it:
//! `[START] "- - -" 0 FLAGS - TERMINATION_DETAILS "-" RECEIVED SENT DURATION - "-" "-" "-" "-" "UPSTREAM_HOST"
//!  CLUSTER UPSTREAM_LOCAL DOWNSTREAM_LOCAL DOWNSTREAM_PEER - -`
use std::{
    cell::Cell,
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

/// Lines are appended to a shared buffer that a writer thread hands to stdout this often:
/// a request costs a short lock and no wake-up, where a queue with a waiting reader cost a
/// futex wake (and often a context switch) per request.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A proxy task never blocks on stdout: when this much is waiting, lines are dropped and
/// counted instead.
const MAX_PENDING: usize = 8 << 20;

static PENDING: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Access-log lines dropped because stdout could not keep up.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

fn pending() -> &'static Mutex<Vec<u8>> {
    PENDING.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(write_lines);
        if spawned.is_err() {
            // No writer: the buffer fills once and every later line counts as dropped.
            tracing::error!("cannot start the access-log writer thread");
        }
        Mutex::new(Vec::with_capacity(64 << 10))
    })
}

fn write_lines() {
    let mut out = Vec::new();
    loop {
        std::thread::sleep(FLUSH_EVERY);
        write_pending(&mut out);
    }
}

/// Moves what is waiting to stdout; `spare` is the buffer to swap in (reused, so a busy
/// log does not allocate).
fn write_pending(spare: &mut Vec<u8>) {
    let Some(pending) = PENDING.get() else {
        return;
    };
    std::mem::swap(
        &mut *pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        spare,
    );
    if !spare.is_empty() {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(spare);
        let _ = stdout.flush();
        spare.clear();
    }
}

/// Writes out what is waiting now: at shutdown, so the last requests' lines are not lost.
pub fn flush() {
    write_pending(&mut Vec::new());
}

/// Appends one line, written by `line` straight into the shared buffer.
fn emit(line: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) {
    let mut buf = pending()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if buf.len() >= MAX_PENDING {
        drop(buf);
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mark = buf.len();
    if line(&mut buf).is_err() {
        buf.truncate(mark);
        return;
    }
    buf.push(b'\n');
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

pub struct TcpEntry<'a> {
    pub start: SystemTime,
    pub duration_ms: u128,
    pub response_flags: &'a str,
    /// Envoy's `%CONNECTION_TERMINATION_DETAILS%`: why the proxy closed it (an RBAC refusal
    /// names the policy); empty for none.
    pub termination: &'a str,
    pub received: u64,
    pub sent: u64,
    pub upstream_host: Option<SocketAddr>,
    /// Envoy's cluster name: `outbound|PORT||HOST` or `PassthroughCluster`.
    pub cluster: &'a str,
    /// The address the daemon connected from (the pod's own, in its namespace).
    pub upstream_local: Option<SocketAddr>,
    pub original_dst: SocketAddr,
    pub downstream_peer: &'a str,
}

/// One HTTP request, in Envoy's default HTTP format (fields it has no value for are "-").
pub struct HttpEntry {
    pub start: SystemTime,
    pub method: http::Method,
    /// The request target as the client sent it (`None`: `/`). Shares the request's bytes.
    pub path: Option<http::uri::PathAndQuery>,
    /// Written as Envoy writes `%PROTOCOL%`: `HTTP/1.1`, `HTTP/2`.
    pub version: http::Version,
    pub status: u16,
    pub response_flags: &'static str,
    pub duration_ms: u128,
    pub upstream_host: Option<SocketAddr>,
    /// The cluster the request was sent to (shared with the snapshot, not copied).
    pub cluster: Option<Arc<crate::routing::Cluster>>,
    /// Shares the request's bytes, as `path` does.
    pub authority: http::HeaderValue,
    pub original_dst: SocketAddr,
    pub downstream_peer: SocketAddr,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

pub fn log_http(e: &HttpEntry) {
    emit(|out| http_line(out, e));
}

pub fn log_tcp(e: &TcpEntry<'_>) {
    emit(|out| tcp_line(out, e));
}

fn http_line(out: &mut Vec<u8>, e: &HttpEntry) -> std::io::Result<()> {
    timestamp(out, e.start);
    out.push(b'"');
    out.extend_from_slice(e.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(e.path.as_ref().map_or("/", |p| p.as_str()).as_bytes());
    out.push(b' ');
    out.extend_from_slice(protocol(e.version).as_bytes());
    out.extend_from_slice(b"\" ");
    number(out, u64::from(e.status));
    out.push(b' ');
    out.extend_from_slice(or_dash(e.response_flags).as_bytes());
    out.extend_from_slice(b" - - \"-\" ");
    counts(out, e.bytes_received, e.bytes_sent, e.duration_ms);
    out.extend_from_slice(b" - \"-\" \"-\" \"-\" \"");
    out.extend_from_slice(e.authority.as_bytes());
    out.extend_from_slice(b"\" \"");
    address_or_dash(out, e.upstream_host);
    out.extend_from_slice(b"\" ");
    out.extend_from_slice(
        e.cluster
            .as_ref()
            .map_or("-", |c| c.name.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" - ");
    address(out, e.original_dst);
    out.push(b' ');
    address(out, e.downstream_peer);
    out.extend_from_slice(b" - -");
    Ok(())
}

fn tcp_line(out: &mut Vec<u8>, e: &TcpEntry<'_>) -> std::io::Result<()> {
    timestamp(out, e.start);
    out.extend_from_slice(b"\"- - -\" 0 ");
    out.extend_from_slice(or_dash(e.response_flags).as_bytes());
    out.extend_from_slice(b" - ");
    out.extend_from_slice(or_dash(e.termination).as_bytes());
    out.extend_from_slice(b" \"-\" ");
    counts(out, e.received, e.sent, e.duration_ms);
    out.extend_from_slice(b" - \"-\" \"-\" \"-\" \"-\" \"");
    address_or_dash(out, e.upstream_host);
    out.extend_from_slice(b"\" ");
    out.extend_from_slice(e.cluster.as_bytes());
    out.push(b' ');
    address_or_dash(out, e.upstream_local);
    out.push(b' ');
    address(out, e.original_dst);
    out.push(b' ');
    out.extend_from_slice(e.downstream_peer.as_bytes());
    out.extend_from_slice(b" - -");
    Ok(())
}

/// Envoy's `%PROTOCOL%`.
fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Lines are written for every request: integers go through itoa, not `core::fmt`.
fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `%BYTES_RECEIVED% %BYTES_SENT% %DURATION%`, which both formats share.
fn counts(out: &mut Vec<u8>, received: u64, sent: u64, duration_ms: u128) {
    number(out, received);
    out.push(b' ');
    number(out, sent);
    out.push(b' ');
    number(out, u64::try_from(duration_ms).unwrap_or(u64::MAX));
}

fn address_or_dash(out: &mut Vec<u8>, a: Option<SocketAddr>) {
    match a {
        Some(a) => address(out, a),
        None => out.push(b'-'),
    }
}

/// `ip:port`, `[ip6]:port`. Four addresses a line: IPv4 is assembled on the stack from a
/// table of the 256 octets, each followed by its dot, and appended at once (`core::fmt`, then
/// a copy per octet, then a division per digit showed in profiles in turn); the port by
/// `itoa`, as every other number of the line; IPv6, rarer, goes through its `Display`.
fn address(out: &mut Vec<u8>, a: SocketAddr) {
    let SocketAddr::V4(v4) = a else {
        let _ = write!(out, "[{}]:{}", a.ip(), a.port());
        return;
    };
    // 255.255.255.255:65535, with room for a whole table entry past the last octet.
    let mut buf = [0u8; 24];
    let mut n = 0;
    for octet in v4.ip().octets() {
        let (text, len) = OCTETS[usize::from(octet)];
        buf[n..n + 4].copy_from_slice(&text);
        n += len;
    }
    buf[n - 1] = b':';
    let mut digits = itoa::Buffer::new();
    let port = digits.format(a.port()).as_bytes();
    buf[n..n + port.len()].copy_from_slice(port);
    out.extend_from_slice(&buf[..n + port.len()]);
}

/// Every octet in decimal with a dot after it, and that text's length.
const OCTETS: [([u8; 4], usize); 256] = {
    let mut table = [([0u8; 4], 0usize); 256];
    let mut v = 0;
    while v < 256 {
        let (h, t, o) = ((v / 100) as u8, (v / 10 % 10) as u8, (v % 10) as u8);
        table[v] = if v >= 100 {
            ([b'0' + h, b'0' + t, b'0' + o, b'.'], 4)
        } else if v >= 10 {
            ([b'0' + t, b'0' + o, b'.', 0], 3)
        } else {
            ([b'0' + o, b'.', 0, 0], 2)
        };
        v += 1;
    }
    table
};

/// `[2025-11-25T16:00:00.123Z] `: RFC 3339 UTC with milliseconds. The part up to the second
/// is worked out once a second per thread, not once a line.
fn timestamp(out: &mut Vec<u8>, t: SystemTime) {
    thread_local! {
        static LAST: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
    }
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let date = LAST.with(|last| match last.get() {
        (s, date) if s == secs => date,
        _ => {
            let date = civil_seconds(secs);
            last.set((secs, date));
            date
        }
    });
    let ms = d.subsec_millis();
    out.push(b'[');
    out.extend_from_slice(&date);
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
        b']',
        b' ',
    ]);
}

/// `YYYY-MM-DDTHH:MM:SS` of seconds since the epoch, without a time-zone database.
fn civil_seconds(secs: u64) -> [u8; 19] {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = [b'0'; 19];
    // Exactly 19 bytes for years 0 to 9999; a later year would be cut short, not overflow.
    let _ = write!(
        &mut out[..],
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    #[test]
    fn lines_are_envoys_default_formats() {
        let mut out = Vec::new();
        let http = HttpEntry {
            start: at(1_764_086_400_123),
            method: http::Method::GET,
            path: Some(http::uri::PathAndQuery::from_static("/status/503?x=1")),
            version: http::Version::HTTP_2,
            status: 503,
            response_flags: "URX",
            duration_ms: 12,
            upstream_host: Some(addr("10.244.1.12:8080")),
            cluster: None,
            authority: http::HeaderValue::from_static("httpbin:8000"),
            original_dst: addr("10.96.0.10:8000"),
            downstream_peer: addr("127.0.0.1:40000"),
            bytes_received: 0,
            bytes_sent: 95,
        };
        http_line(&mut out, &http).expect("formatting");
        out.push(b'\n');
        let tcp = TcpEntry {
            start: at(1_764_086_400_999),
            duration_ms: 7,
            response_flags: "",
            termination: "rbac_access_denied_matched_policy[prod/deny-all]",
            received: 10,
            sent: 20,
            upstream_host: None,
            cluster: "PassthroughCluster",
            upstream_local: None,
            original_dst: addr("[fd00::1]:443"),
            downstream_peer: "-",
        };
        tcp_line(&mut out, &tcp).expect("formatting");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[2025-11-25T16:00:00.123Z] \"GET /status/503?x=1 HTTP/2\" 503 URX - - \"-\" 0 95 12 - \
             \"-\" \"-\" \"-\" \"httpbin:8000\" \"10.244.1.12:8080\" - - 10.96.0.10:8000 127.0.0.1:40000 - -\n\
             [2025-11-25T16:00:00.999Z] \"- - -\" 0 - - rbac_access_denied_matched_policy[prod/deny-all] \"-\" 10 20 7 - \"-\" \"-\" \"-\" \"-\" \"-\" \
             PassthroughCluster - [fd00::1]:443 - - -"
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let mut out = Vec::new();
        for ms in [1_764_086_400_123, 1_764_086_400_999, 951_782_400_007] {
            timestamp(&mut out, at(ms));
        }
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[2025-11-25T16:00:00.123Z] [2025-11-25T16:00:00.999Z] [2000-02-29T00:00:00.007Z] "
        );
    }

    #[test]
    fn addresses_at_their_widest_and_narrowest() {
        let mut out = Vec::new();
        for a in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.9.99.100:1000",
            "[::1]:8080",
        ] {
            address(&mut out, addr(a));
            out.push(b' ');
        }
        assert_eq!(
            String::from_utf8_lossy(&out),
            "0.0.0.0:0 255.255.255.255:65535 10.9.99.100:1000 [::1]:8080 "
        );
    }
}
