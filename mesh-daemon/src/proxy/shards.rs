//! The proxy's worker threads, as Envoy and nginx run theirs: each thread has its own
//! single-threaded runtime (its own epoll, timers and run queue), and a client connection
//! lives on one thread from accept to close, together with the upstream connections its
//! requests open.
//!
//! Why not one work-stealing runtime: there all sockets share one epoll, so a wake-up on
//! the pod's loopback is handled wherever that runtime's driver runs. Under load one core
//! was busy while the other sat idle (benches/README.md, "idle%": 10-11% against nginx's
//! 2-6%); with separate loops, each keeping its connections, the idle time fell to nginx's.
use std::{
    cell::Cell,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{net::TcpStream, runtime::Handle, sync::watch};

use super::drain::Drain;

thread_local! {
    /// Which shard the running thread is (`None` off the proxy threads).
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The proxy threads. Dropping this stops them (their tasks are dropped with their
/// runtimes); a connection's count holds its shard's counter, not this, so open
/// connections do not keep the threads alive.
pub struct Shards {
    shards: Vec<Shard>,
    drain: Arc<Drain>,
    _stop: watch::Sender<()>,
}

struct Shard {
    handle: Handle,
    /// Client connections this shard serves now.
    open: Arc<AtomicUsize>,
}

impl Shards {
    /// Starts `n` threads (at least one), named `sl-proxy-<i>`.
    pub fn start(n: usize) -> std::io::Result<Arc<Self>> {
        let (stop, stopped) = watch::channel(());
        let mut shards = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("sl-proxy-{i}"))
                .spawn(move || {
                    CURRENT.set(Some(i));
                    rt.block_on(async move {
                        let _ = stopped.changed().await;
                    });
                })?;
            shards.push(Shard {
                handle,
                open: Arc::default(),
            });
        }
        Ok(Arc::new(Self {
            drain: Drain::new(shards.len()),
            shards,
            _stop: stop,
        }))
    }

    /// The shard the calling thread is, if it is one.
    pub fn current() -> Option<usize> {
        CURRENT.get()
    }

    /// [`Self::current`], small enough to sit in a map key's padding.
    pub fn current_u16() -> Option<u16> {
        Self::current().and_then(|i| u16::try_from(i).ok())
    }

    /// The drain of the connections these threads serve.
    pub fn drain(&self) -> &Arc<Drain> {
        &self.drain
    }

    /// Client connections open on all threads (a drain is over when none is left).
    pub fn open_connections(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.open.load(Ordering::Relaxed))
            .sum()
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The runtime of shard `i` (modulo the count), for a task that belongs to no
    /// connection, such as a listener's accept loop.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.shards[i % self.shards.len()].handle
    }

    /// The shard with the fewest open connections; the calling one when it is among them,
    /// so a connection moves only to even the load (Envoy's exact balance, per thread).
    fn least_loaded(&self) -> usize {
        let here = Self::current();
        let mut best = here.filter(|&i| i < self.shards.len()).unwrap_or(0);
        let mut least = self.shards[best].open.load(Ordering::Relaxed);
        for (i, s) in self.shards.iter().enumerate() {
            let n = s.open.load(Ordering::Relaxed);
            if n < least {
                best = i;
                least = n;
            }
        }
        best
    }

    /// Serves an accepted connection on the least loaded shard. A connection accepted on
    /// another thread is moved: taken off this thread's epoll and registered on the
    /// target's.
    pub fn serve<F, Fut>(&self, stream: TcpStream, peer: SocketAddr, serve: F)
    where
        F: FnOnce(TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let target = self.least_loaded();
        let open = OpenConn::new(&self.shards[target].open);
        if Self::current() == Some(target) {
            tokio::spawn(async move {
                let _open = open;
                serve(stream, peer).await
            });
            return;
        }
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand an accepted connection over");
                return;
            }
        };
        self.shards[target].handle.spawn(async move {
            let _open = open;
            match TcpStream::from_std(std_stream) {
                Ok(stream) => serve(stream, peer).await,
                Err(e) => tracing::warn!(%peer, error = %e, "cannot take an accepted connection"),
            }
        });
    }
}

/// One open connection counted on its shard until dropped.
struct OpenConn(Arc<AtomicUsize>);

impl OpenConn {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::Shards;

    /// Connections accepted off the proxy threads are moved onto them, half on each, keep
    /// working there, and stop counting once closed.
    #[tokio::test]
    async fn connections_spread_evenly_and_work_where_they_land() {
        let shards = Shards::start(2).expect("proxy threads");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("bound");
        let (tx, mut served_on) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for i in 0..4u8 {
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (stream, peer) = listener.accept().await.expect("accept");
            let tx = tx.clone();
            shards.serve(stream, peer, move |mut s, _| async move {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() && s.write_all(&[b[0] + 1]).await.is_ok() {
                    let _ = tx.send(Shards::current());
                }
                // Held open until the client leaves.
                let _ = s.read(&mut b).await;
            });
            client.write_all(&[i]).await.expect("write");
            let mut answer = [0u8; 1];
            client.read_exact(&mut answer).await.expect("echo");
            assert_eq!(answer[0], i + 1, "connection {i} answered from its thread");
            clients.push(client);
        }
        let mut per_shard = [0; 2];
        for _ in 0..4 {
            let shard = served_on
                .recv()
                .await
                .expect("served")
                .expect("on a proxy thread");
            per_shard[shard] += 1;
        }
        assert_eq!(per_shard, [2, 2]);

        drop(clients);
        let deadline = Instant::now() + Duration::from_secs(5);
        let open = || shards.open_connections();
        while open() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(open(), 0, "closed connections still counted");
    }
}
