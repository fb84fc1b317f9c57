//! One tunnelled connection's two directions as byte streams: the HTTP/2 stream's received
//! DATA frames read as bytes (their flow-control window handed back as they are read), and
//! bytes written as DATA frames within the peer's window. End of stream is a FIN; a reset
//! stream is a reset connection.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::proxy::forward::{Duplex, Half};

/// The largest DATA frame written at once: what a read of the other side brings, at most.
const MAX_CHUNK: usize = 64 * 1024;

/// What arrives through the tunnel.
pub struct TunnelRead {
    recv: RecvStream,
    pending: Bytes,
}

/// What goes into the tunnel.
pub struct TunnelWrite {
    send: SendStream<Bytes>,
    ended: bool,
}

impl TunnelRead {
    pub fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            pending: Bytes::new(),
        }
    }

    /// Whether the peer has ended its side (nothing more will arrive).
    pub fn ended(&self) -> bool {
        self.pending.is_empty() && self.recv.is_end_stream()
    }
}

impl TunnelWrite {
    pub fn new(send: SendStream<Bytes>) -> Self {
        Self { send, ended: false }
    }

    /// Ends the stream with a reset: the other side sees its connection reset.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

fn broken(e: h2::Error) -> io::Error {
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::BrokenPipe
    };
    io::Error::new(kind, e)
}

impl AsyncRead for TunnelRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    // Handed back at once: the window bounds what is in flight, and the
                    // bytes are about to be copied out.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(broken(e))),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_CHUNK);
        self.send.reserve_capacity(want);
        let granted = loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(broken(e))),
                Some(Ok(0)) => {}
                Some(Ok(n)) => break n.min(want),
            }
        };
        match self
            .send
            .send_data(Bytes::copy_from_slice(&buf[..granted]), false)
        {
            Ok(()) => Poll::Ready(Ok(granted)),
            Err(e) => Poll::Ready(Err(broken(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are written by the connection's task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            if let Err(e) = self.send.send_data(Bytes::new(), true) {
                return Poll::Ready(Err(broken(e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Half for &mut TunnelRead {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl Half for &mut TunnelWrite {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// Both directions of one tunnelled connection.
pub struct Tunnel {
    pub read: TunnelRead,
    pub write: TunnelWrite,
    /// The client side's place on a pooled connection, given back when this is dropped.
    pub slot: Option<super::pool::StreamSlot>,
}

impl Tunnel {
    pub fn holding(mut self, slot: super::pool::StreamSlot) -> Self {
        self.slot = Some(slot);
        self
    }
}

impl Duplex for Tunnel {
    type Read<'a> = &'a mut TunnelRead;
    type Write<'a> = &'a mut TunnelWrite;

    fn halves(&mut self) -> (&mut TunnelRead, &mut TunnelWrite) {
        (&mut self.read, &mut self.write)
    }

    fn abort(&mut self) {
        self.write.reset();
    }
}
