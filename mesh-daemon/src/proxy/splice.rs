//! Moving bytes from one TCP socket to another through a kernel pipe (splice(2)), without
//! copying them through user space.
//!
//! A copy through a buffer costs two copies of every byte (receive queue → buffer → send
//! queue) and two system calls per buffer's worth. splice moves references to the received
//! pages into a pipe and from the pipe into the send queue: the bytes are not copied, and a
//! call moves up to the pipe's capacity. A pipe costs two file descriptors and three system
//! calls to make and close, which a short exchange would not earn back, so the caller
//! switches to one only once a direction has shown itself to be bulk.
use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use nix::{
    errno::Errno,
    fcntl::{self, OFlag, SpliceFFlags},
};
use tokio::{io::Interest, net::TcpStream};

/// The most one call moves: the pipe's default capacity (16 pages), which every kernel
/// grants without raising `fs.pipe-max-size`.
const CHUNK: usize = 64 * 1024;

/// A pipe between two sockets, empty between calls to [`Pipe::relay`].
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Self { read, write })
    }

    /// Moves what `from` has received (as much as the pipe holds) into `to`, waiting for
    /// either as needed; the number of bytes moved, `Ok(0)` once `from` has reached its end.
    /// An error leaves bytes behind in the pipe: the caller is to give the connection up.
    pub async fn relay(&self, from: &TcpStream, to: &TcpStream) -> io::Result<usize> {
        // The pipe is empty here, so "would block" can only mean that `from` has nothing:
        // the readiness `async_io` then clears is the socket's, as it should be.
        let n = from
            .async_io(Interest::READABLE, || splice(from, &self.write, CHUNK))
            .await?;
        let mut left = n;
        while left > 0 {
            let moved = to
                .async_io(Interest::WRITABLE, || splice(&self.read, to, left))
                .await?;
            if moved == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= moved;
        }
        Ok(n)
    }
}

/// One splice(2), non-blocking on both ends (tokio's sockets are non-blocking too).
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        match fcntl::splice(from.as_fd(), None, to.as_fd(), None, len, flags) {
            Err(Errno::EINTR) => {}
            moved => return moved.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::Pipe;

    /// A connected pair on loopback: (the end we write, the end the relay reads).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn relays_every_byte_in_order_and_reports_the_end() {
        let (mut source, from) = pair().await;
        let (to, mut sink) = pair().await;
        // Larger than the pipe and than the socket buffers, so both ends wait in turn.
        let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                source.write_all(&sent).await.expect("write");
                source.shutdown().await.expect("shutdown");
            })
        };
        let relay = tokio::spawn(async move {
            let pipe = Pipe::new().expect("pipe");
            let mut total = 0;
            loop {
                match pipe.relay(&from, &to).await.expect("relay") {
                    0 => return total,
                    n => total += n,
                }
            }
        });
        let mut received = Vec::new();
        let reading = sink.read_to_end(&mut received);
        let (read, relayed, written) = tokio::join!(reading, relay, writer);
        written.expect("writer");
        assert_eq!(relayed.expect("relay task"), sent.len());
        // The relay does not close its side, so the sink's read ends when `to` is dropped
        // with the relay task; every byte must have arrived before that.
        read.expect("read");
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "bytes changed or reordered");
    }

    #[tokio::test]
    async fn a_reset_source_is_an_error() {
        let (source, from) = pair().await;
        let (to, _sink) = pair().await;
        socket2::SockRef::from(&source)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        drop(source);
        let pipe = Pipe::new().expect("pipe");
        assert!(pipe.relay(&from, &to).await.is_err());
    }
}
