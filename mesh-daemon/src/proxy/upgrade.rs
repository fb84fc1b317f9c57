//! HTTP/1.1 protocol upgrades (WebSocket), which Istio's Envoy lets through on every HTTP
//! port: the request goes upstream with its `Connection: upgrade` and `Upgrade`; when the
//! upstream answers `101 Switching Protocols`, the 101 goes to the client and from then on
//! the two connections are joined byte for byte, as a TCP proxy joins them.
//!
//! The upstream connection leaves the pool with the 101 (in the response's extensions) and
//! the client's side takes it. The request stays open for the tunnel's life, as Envoy keeps
//! the stream: its cluster slots and in-flight count stay taken, and its telemetry (code
//! 101, the tunnel's bytes both ways, its whole duration) is recorded when the tunnel closes.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, header};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::{forward::Duplex as _, upstream_io::UpstreamIo};

use super::{forward, hop_by_hop, pool::ConnSlot};

/// Istio turns Envoy's stream idle timeout off: a quiet WebSocket stays open.
const NO_IDLE_TIMEOUT: Duration = Duration::MAX;

/// Whether a request asks to switch protocols (`Connection: upgrade` and an `Upgrade`).
pub fn requested(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && hop_by_hop::lists(headers, &header::CONNECTION, "upgrade")
}

/// The upstream side of a switched connection, from the 101 to whoever joins it to the
/// client. Cloned with the response's extensions; taken once.
#[derive(Clone)]
pub struct Upgraded {
    tunnel: Arc<Mutex<Option<Tunnel>>>,
    bytes: Arc<TunnelBytes>,
}

/// Bytes through a tunnel, for the request's telemetry.
#[derive(Default)]
pub struct TunnelBytes {
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
}

pub struct Tunnel {
    io: UpstreamIo,
    /// What the upstream sent after its 101, read with the head.
    early: Bytes,
    /// The cluster's `maxConnections` slot, held while the tunnel is open.
    _slot: ConnSlot,
    bytes: Arc<TunnelBytes>,
}

impl Upgraded {
    pub fn new(io: UpstreamIo, early: Bytes, slot: ConnSlot) -> Self {
        let bytes = Arc::new(TunnelBytes::default());
        Self {
            tunnel: Arc::new(Mutex::new(Some(Tunnel {
                io,
                early,
                _slot: slot,
                bytes: bytes.clone(),
            }))),
            bytes,
        }
    }

    pub fn take(&self) -> Option<Tunnel> {
        self.tunnel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    pub fn bytes(&self) -> Arc<TunnelBytes> {
        self.bytes.clone()
    }
}

impl Tunnel {
    /// Joins `client` (after its 101; `early` is what it sent past its request) to the
    /// upstream until both sides have closed, or one has reset.
    pub async fn join(self, mut client: TcpStream, early: Bytes) {
        let Self {
            io: mut upstream,
            early: upstream_early,
            _slot,
            bytes,
        } = self;
        if upstream.write_all(&early).await.is_err()
            || client.write_all(&upstream_early).await.is_err()
        {
            forward::abort(&client);
            upstream.abort();
            return;
        }
        let out = forward::forward(
            client,
            upstream,
            NO_IDLE_TIMEOUT,
            None,
            |_, _| {},
            std::future::pending(),
        )
        .await;
        bytes
            .to_upstream
            .store(early.len() as u64 + out.sent_upstream, Ordering::Relaxed);
        bytes.to_client.store(
            upstream_early.len() as u64 + out.sent_downstream,
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::requested;

    #[test]
    fn an_upgrade_needs_both_fields() {
        let map = |pairs: &[(&'static str, &'static str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, http::HeaderValue::from_static(v));
            }
            h
        };
        assert!(requested(&map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(!requested(&map(&[("upgrade", "websocket")])));
        assert!(!requested(&map(&[("connection", "upgrade")])));
    }
}
