//! A pod's listening sockets of one kind (outbound capture, tunnel), bound inside its network
//! namespace: IPv4 always, IPv6 where the pod has it. Accepting spreads connections over
//! the proxy threads.
use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};

use super::{
    shards::Shards,
    sockets::{SocketError, listen_in},
};
use crate::netns::{HostNetns, Netns};

/// Where in the pod a listener is bound.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// The pod's loopback: only its own (redirected) connections reach it.
    Loopback,
    /// Every address of the pod: other pods reach it.
    Pod,
}

pub struct PodListeners(Vec<std::net::TcpListener>);

/// What serves each connection a pod's listeners accept.
pub trait Handler: Send + Sync + 'static {
    /// The pod whose listeners these are (for logs).
    fn pod_uid(&self) -> &str;
    /// The proxy threads that accept and serve.
    fn shards(&self) -> &Arc<Shards>;
    fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static;
}

impl PodListeners {
    /// Binds `port` in the pod's namespace. IPv6 is optional: a pod without it gets IPv4 only.
    pub fn bind(
        pod_uid: &str,
        netns: &Netns,
        host: &HostNetns,
        scope: Scope,
        port: u16,
    ) -> Result<Self, SocketError> {
        let (v4, v6): (IpAddr, IpAddr) = match scope {
            Scope::Loopback => (Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()),
            Scope::Pod => (Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()),
        };
        let mut listeners = vec![listen_in(netns, host, SocketAddr::new(v4, port))?];
        match listen_in(netns, host, SocketAddr::new(v6, port)) {
            Ok(l) => listeners.push(l),
            Err(e) => tracing::info!(pod = %pod_uid, port, error = %e, "no IPv6 listener"),
        }
        Ok(Self(listeners))
    }

    /// Listeners bound already: by the daemon that ran before, which handed them over.
    pub fn adopt(listeners: Vec<std::net::TcpListener>) -> Self {
        Self(listeners)
    }

    /// Second descriptors of the listeners, to hand to a successor while these accept.
    pub fn copies(&self) -> std::io::Result<Vec<std::net::TcpListener>> {
        self.0
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect()
    }

    /// The listener of `ip`'s family, if the pod has one.
    pub fn for_family_of(&self, ip: IpAddr) -> Option<&std::net::TcpListener> {
        self.0
            .iter()
            .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv4() == ip.is_ipv4()))
    }

    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.0.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// `accept` with `handler` serving each connection, until the task is aborted (the pod
    /// left the mesh or the node).
    pub async fn serve<H: Handler>(self, handler: Arc<H>) {
        let (pod_uid, shards) = (handler.pod_uid().to_owned(), handler.shards().clone());
        self.accept(&pod_uid, &shards, move |stream, peer| {
            let handler = handler.clone();
            // A connection's future can be large; spawned as it is, it is copied on its way
            // into the task. Boxed inside the task, it is written once.
            async move { Box::pin(handler.handle(stream, peer)).await }
        })
        .await;
    }

    /// Accepts until the task is aborted (the pod left the mesh or the node): one accept loop
    /// per listener, on its own proxy thread; each connection then goes to the thread with
    /// the fewest (`Shards::serve`). Dropping the set stops the loops.
    pub async fn accept<H, F>(self, pod_uid: &str, shards: &Arc<Shards>, handle: H)
    where
        H: Fn(TcpStream, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, l) in self.0.into_iter().enumerate() {
            let home = shards.handle(i).clone();
            let shards = shards.clone();
            let handle = handle.clone();
            let pod_uid = pod_uid.to_owned();
            tasks.spawn_on(
                async move {
                    let l = match TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(pod = %pod_uid, error = %e, "cannot accept on a pod's listener");
                            return;
                        }
                    };
                    loop {
                        match l.accept().await {
                            // TCP_NODELAY comes with the listener's options (`listen_in`).
                            Ok((stream, peer)) => shards.serve(stream, peer, handle.clone()),
                            Err(e) => {
                                tracing::warn!(pod = %pod_uid, error = %e, "accept failed");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        }
                    }
                },
                &home,
            );
        }
        while tasks.join_next().await.is_some() {}
    }
}
