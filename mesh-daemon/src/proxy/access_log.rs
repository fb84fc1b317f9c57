//! One line per connection on stdout, in Envoy's default TCP format so that existing log
//! pipelines parse it:
//! `[START] "- - -" 0 FLAGS - "-" RECEIVED SENT DURATION - "-" "-" "-" "-" "UPSTREAM_HOST"
//!  CLUSTER UPSTREAM_LOCAL DOWNSTREAM_LOCAL DOWNSTREAM_PEER - -`
use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::SystemTime,
};

/// Lines waiting for the writer thread. A proxy task never blocks on stdout: when the
/// writer falls this far behind, lines are dropped and counted instead.
const QUEUE: usize = 8192;

static SINK: OnceLock<SyncSender<String>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Access-log lines dropped because stdout could not keep up.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

fn sink() -> &'static SyncSender<String> {
    SINK.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx));
        if spawned.is_err() {
            // No writer: every line will count as dropped rather than block.
            tracing::error!("cannot start the access-log writer thread");
        }
        tx
    })
}

fn write_lines(rx: &Receiver<String>) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Ok(line) = rx.recv() {
        let _ = writeln!(out, "{line}");
        // Flush once the queue is drained, so a quiet daemon's log is never stale.
        while let Ok(line) = rx.try_recv() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

fn emit(line: String) {
    match sink().try_send(line) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
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
    pub method: String,
    pub path: String,
    pub protocol: String,
    pub status: u16,
    pub response_flags: &'static str,
    pub duration_ms: u128,
    pub upstream_host: Option<SocketAddr>,
    pub cluster: String,
    pub authority: String,
    pub original_dst: SocketAddr,
    pub downstream_peer: SocketAddr,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

pub fn log_http(e: &HttpEntry) {
    let flags = if e.response_flags.is_empty() {
        "-"
    } else {
        e.response_flags
    };
    let upstream = e
        .upstream_host
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    let cluster = if e.cluster.is_empty() {
        "-"
    } else {
        &e.cluster
    };
    emit(format!(
        "[{}] \"{} {} {}\" {} {flags} - - \"-\" {} {} {} - \"-\" \"-\" \"-\" \"{}\" \"{upstream}\" {cluster} - {} {} - -",
        humantime(e.start),
        e.method,
        e.path,
        e.protocol,
        e.status,
        e.bytes_received,
        e.bytes_sent,
        e.duration_ms,
        e.authority,
        e.original_dst,
        e.downstream_peer
    ));
}

pub fn log_tcp(e: &TcpEntry<'_>) {
    let start = humantime(e.start);
    let upstream = e
        .upstream_host
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    let upstream_local = e
        .upstream_local
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    let flags = if e.response_flags.is_empty() {
        "-"
    } else {
        e.response_flags
    };
    emit(format!(
        "[{start}] \"- - -\" 0 {flags} - \"-\" {} {} {} - \"-\" \"-\" \"-\" \"-\" \"{upstream}\" {} {upstream_local} {} {} - -",
        e.received, e.sent, e.duration_ms, e.cluster, e.original_dst, e.downstream_peer
    ));
}

/// RFC 3339 UTC with milliseconds, computed without a time-zone database.
fn humantime(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
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
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_086_400_123);
        assert_eq!(humantime(t), "2025-11-25T16:00:00.123Z");
    }
}
