//! One line per connection on stdout, in Envoy's default TCP format so that existing log
//! pipelines parse it:
//! `[START] "- - -" 0 FLAGS - "-" RECEIVED SENT DURATION - "-" "-" "-" "-" "UPSTREAM_HOST"
//!  CLUSTER UPSTREAM_LOCAL DOWNSTREAM_LOCAL DOWNSTREAM_PEER - -`
use std::{
    fmt,
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

/// `-` for a value that is absent, as Envoy writes it.
struct OrDash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

pub struct TcpEntry<'a> {
    pub start: SystemTime,
    pub duration_ms: u128,
    pub response_flags: &'a str,
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
    pub path: String,
    /// Written as Envoy writes `%PROTOCOL%`: `HTTP/1.1`, `HTTP/2.0`.
    pub version: http::Version,
    pub status: u16,
    pub response_flags: &'static str,
    pub duration_ms: u128,
    pub upstream_host: Option<SocketAddr>,
    /// The cluster the request was sent to (shared with the snapshot, not copied).
    pub cluster: Option<Arc<crate::routing::Cluster>>,
    pub authority: String,
    pub original_dst: SocketAddr,
    pub downstream_peer: SocketAddr,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

pub fn log_http(e: &HttpEntry) {
    emit(|out| {
        write!(
            out,
            "[{}] \"{} {} {:?}\" {} {} - - \"-\" {} {} {} - \"-\" \"-\" \"-\" \"{}\" \"{}\" {} - {} {} - -",
            Rfc3339(e.start),
            e.method,
            e.path,
            e.version,
            e.status,
            or_dash(e.response_flags),
            e.bytes_received,
            e.bytes_sent,
            e.duration_ms,
            e.authority,
            OrDash(e.upstream_host),
            e.cluster.as_ref().map_or("-", |c| c.name.as_str()),
            e.original_dst,
            e.downstream_peer
        )
    });
}

pub fn log_tcp(e: &TcpEntry<'_>) {
    emit(|out| {
        write!(
            out,
            "[{}] \"- - -\" 0 {} - \"-\" {} {} {} - \"-\" \"-\" \"-\" \"-\" \"{}\" {} {} {} {} - -",
            Rfc3339(e.start),
            or_dash(e.response_flags),
            e.received,
            e.sent,
            e.duration_ms,
            OrDash(e.upstream_host),
            e.cluster,
            OrDash(e.upstream_local),
            e.original_dst,
            e.downstream_peer
        )
    });
}

/// RFC 3339 UTC with milliseconds, computed without a time-zone database.
struct Rfc3339(SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self
            .0
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = d.as_secs() as i64;
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
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_086_400_123);
        assert_eq!(Rfc3339(t).to_string(), "2025-11-25T16:00:00.123Z");
    }
}
