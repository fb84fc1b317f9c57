//! Byte forwarding between two TCP streams that keeps TCP's semantics end to end: a FIN is
//! passed on as a FIN (half-close), a reset as a reset. Bulk goes through a kernel pipe
//! (`splice`) once a direction fills a read buffer.
use std::{
    io::ErrorKind,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::splice::Pipe;

const BUF_SIZE: usize = 16 * 1024;

/// How a forwarded connection ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes from the client to the upstream.
    pub sent_upstream: u64,
    /// Bytes from the upstream to the client.
    pub sent_downstream: u64,
    /// One side reset (or failed); the other was reset in turn.
    pub reset: bool,
    /// Nothing moved either way for the idle timeout: both sides were closed.
    pub idle_timeout: bool,
}

/// When bytes last moved, in milliseconds since the connection's start.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

enum Dir {
    Eof,
    Reset,
}

/// One direction's ends. The TCP socket under each, when both have one, lets bulk skip user
/// space; a tunnel stream has none.
pub trait Half {
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Half for ReadHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl Half for WriteHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

async fn pump<R, W>(mut r: R, mut w: W, counted: &AtomicU64, activity: &Activity) -> Dir
where
    R: AsyncRead + Half + Unpin,
    W: AsyncWrite + Half + Unpin,
{
    let moved = |n: usize| {
        counted.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    };
    let mut buf = vec![0u8; BUF_SIZE];
    // Copied through `buf` until a read fills it: then this direction carries bulk, and
    // the rest goes through a pipe without being copied (see `splice`).
    let pipe = loop {
        match r.read(&mut buf).await {
            Ok(0) => return pass_fin(&mut w).await,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return Dir::Reset;
                }
                moved(n);
                if n == buf.len()
                    && r.tcp().is_some()
                    && w.tcp().is_some()
                    && let Ok(pipe) = Pipe::new()
                {
                    break pipe;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Dir::Reset,
        }
    };
    drop(buf);
    let (Some(from), Some(to)) = (r.tcp(), w.tcp()) else {
        return Dir::Reset;
    };
    loop {
        match pipe.relay(from, to).await {
            Ok(0) => return pass_fin(&mut w).await,
            Ok(n) => moved(n),
            Err(_) => return Dir::Reset,
        }
    }
}

/// Passes a FIN on; the other direction keeps flowing.
async fn pass_fin(w: &mut (impl AsyncWrite + Unpin)) -> Dir {
    match w.shutdown().await {
        Ok(()) => Dir::Eof,
        Err(_) => Dir::Reset,
    }
}

/// Bytes forwarded so far, each way.
#[derive(Default)]
struct Counts {
    upstream: AtomicU64,
    downstream: AtomicU64,
}

impl Counts {
    /// What moved (to the upstream, to the client) since `reported`, which it moves on.
    fn since(&self, reported: &mut (u64, u64)) -> (u64, u64) {
        let now = (
            self.upstream.load(Ordering::Relaxed),
            self.downstream.load(Ordering::Relaxed),
        );
        let delta = (now.0 - reported.0, now.1 - reported.1);
        *reported = now;
        delta
    }
}

/// A connection whose two directions can be driven at once.
pub trait Duplex {
    type Read<'a>: AsyncRead + Half + Unpin
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Half + Unpin
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
    /// Makes the coming close a reset (RST, or `RST_STREAM` for a tunnel).
    fn abort(&mut self);
}

impl Duplex for TcpStream {
    type Read<'a> = ReadHalf<'a>;
    type Write<'a> = WriteHalf<'a>;

    fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        self.split()
    }

    fn abort(&mut self) {
        abort(self);
    }
}

/// Copies both ways until both sides have closed, or until either resets, in which case the
/// other side is reset too (SO_LINGER 0 then close), as a direct connection would see it.
/// After `idle` without a byte either way both sides are closed (Envoy's TCP idle timeout).
/// `report` gets the bytes moved (to the upstream, to the client) every `report_every`
/// while the connection is open, as Istio's TCP metrics are reported, and the rest at the
/// end; `None` reports only at the end. Once `until` completes, both sides are reset.
pub async fn forward<C: Duplex, U: Duplex>(
    mut client: C,
    mut upstream: U,
    idle: Duration,
    report_every: Option<Duration>,
    report: impl FnMut(u64, u64),
    until: impl Future<Output = ()>,
) -> Outcome {
    let out = {
        let (cr, cw) = client.halves();
        let (ur, uw) = upstream.halves();
        drive(cr, cw, ur, uw, (idle, report_every), report, until).await
    };
    if out.idle_timeout {
        let _ = client.halves().1.shutdown().await;
        let _ = upstream.halves().1.shutdown().await;
    }
    if out.reset {
        client.abort();
        upstream.abort();
    }
    out
}

/// Runs both directions, with the idle timeout and the periodic report `forward` describes;
/// closing or resetting the streams afterwards is the caller's.
async fn drive<CR, CW, UR, UW>(
    client_read: CR,
    client_write: CW,
    upstream_read: UR,
    upstream_write: UW,
    (idle, report_every): (Duration, Option<Duration>),
    mut report: impl FnMut(u64, u64),
    until: impl Future<Output = ()>,
) -> Outcome
where
    CR: AsyncRead + Half + Unpin,
    CW: AsyncWrite + Half + Unpin,
    UR: AsyncRead + Half + Unpin,
    UW: AsyncWrite + Half + Unpin,
{
    let mut out = Outcome::default();
    let counts = Counts::default();
    let mut reported = (0, 0);
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    {
        let to_upstream = pump(client_read, upstream_write, &counts.upstream, &activity);
        let to_client = pump(upstream_read, client_write, &counts.downstream, &activity);
        tokio::pin!(to_upstream, to_client);
        let every = report_every.unwrap_or(Duration::MAX);
        let report_timer = tokio::time::sleep(every);
        tokio::pin!(report_timer, until);
        let (mut a_done, mut b_done) = (false, false);
        while !(out.reset || out.idle_timeout || a_done && b_done) {
            let wait = idle.saturating_sub(activity.idle_for());
            let dir = tokio::select! {
                d = &mut to_upstream, if !a_done => { a_done = true; d }
                d = &mut to_client, if !b_done => { b_done = true; d }
                () = tokio::time::sleep(wait) => {
                    out.idle_timeout = activity.idle_for() >= idle;
                    continue;
                }
                () = &mut report_timer, if report_every.is_some() => {
                    let (up, down) = counts.since(&mut reported);
                    report(up, down);
                    report_timer.as_mut().reset(tokio::time::Instant::now() + every);
                    continue;
                }
                // The caller ends it (a policy now denies the connection): reset both sides.
                () = &mut until => Dir::Reset,
            };
            out.reset = matches!(dir, Dir::Reset);
        }
    }
    let (up, down) = counts.since(&mut reported);
    report(up, down);
    (out.sent_upstream, out.sent_downstream) = reported;
    out
}

/// Makes the coming close send a RST instead of a FIN.
pub fn abort(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}
