//! Listening sockets passed from a running daemon to its successor, so that a restart or an
//! upgrade refuses no connection and resets none (DESIGN.md: "listeners are handed over").
//!
//! The running daemon offers its listeners on a Unix socket. A new daemon, once its eBPF
//! programs are attached and before it binds anything, connects there and says `handover v1`.
//! The running one sends each listener it holds (the pods' outbound listeners, the admin,
//! metrics and readiness ports) as a line of JSON saying what it is, with its descriptor
//! (SCM_RIGHTS), then `end`. The successor answers `taken` and accepts from then on; the old
//! daemon stops accepting, drains the connections it has and exits. Until `taken` nothing
//! changes for the old daemon, so a successor that fails halfway leaves it serving.
//!
//! Both sides share one kernel socket per listener: the queue of connections not yet accepted
//! stays where it is, whichever process takes them.
use std::{
    io::{self, IoSlice, IoSliceMut, Read as _, Write as _},
    mem::MaybeUninit,
    net::TcpListener,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

const HELLO: &[u8] = b"handover v1\n";
const END: &str = "end";
const TAKEN: &[u8] = b"taken\n";
/// Descriptors per message (the kernel takes at most 253 in one).
const BATCH: usize = 64;
/// Each side's wait for the other: a peer that hangs must not hold a restart up for long.
const PATIENCE: Duration = Duration::from_secs(10);
/// A line is a role and a pod UID: far below this.
const MAX_MESSAGE: usize = 1 << 20;

/// What a listener is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    Admin,
    Metrics,
    Readiness,
    /// A pod's outbound listener (IPv4 or IPv6), in the namespace with this inode.
    Outbound {
        pod_uid: String,
        netns_inode: u64,
    },
    /// A pod's mTLS tunnel listener (IPv4 or IPv6), in the namespace with this inode.
    Tunnel {
        pod_uid: String,
        netns_inode: u64,
    },
    /// A pod's plaintext inbound listener (IPv4 or IPv6), in the namespace with this inode.
    Inbound {
        pod_uid: String,
        netns_inode: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the running daemon at {path} broke the handover: {why}")]
    Protocol { path: PathBuf, why: String },
}

/// Listeners taken over from the daemon that ran before, until each is claimed.
#[derive(Default)]
pub struct Inherited {
    listeners: Vec<(Role, TcpListener)>,
}

impl Inherited {
    pub fn len(&self) -> usize {
        self.listeners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// The listener for `role`, if one was handed over.
    pub fn take(&mut self, role: &Role) -> Option<TcpListener> {
        let i = self.listeners.iter().position(|(r, _)| r == role)?;
        Some(self.listeners.swap_remove(i).1)
    }

    /// Every listener handed over as `role` (a pod's IPv4 and IPv6 ones). None for a pod whose
    /// sandbox has been replaced since: the role names the namespace, and the old one is gone.
    pub fn take_all(&mut self, role: &Role) -> Vec<TcpListener> {
        let mut taken = Vec::new();
        let mut i = 0;
        while i < self.listeners.len() {
            if &self.listeners[i].0 == role {
                taken.push(self.listeners.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        taken
    }
}

/// The successor's side: takes the listeners of the daemon running at `path`. `Ok(None)` when
/// none runs there (the first start on a node, or after a crash).
pub fn take_over(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let io = |what| io_error(what, path);
    let broken = |why: String| HandoverError::Protocol {
        path: path.to_owned(),
        why,
    };
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io("connecting to the running daemon at")(e)),
    };
    patient(&s).map_err(io("setting timeouts on"))?;
    s.write_all(HELLO)
        .map_err(io("asking for the listeners at"))?;

    let mut text = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    while !ends_with_line(&text, END) {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &s,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| io("receiving the listeners from")(e.into()))?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(broken(
                "more descriptors than announced in one message".into(),
            ));
        }
        if got.bytes == 0 {
            return Err(broken("it closed the connection before the end".into()));
        }
        text.extend_from_slice(&buf[..got.bytes]);
        if text.len() > MAX_MESSAGE {
            return Err(broken("an endless message".into()));
        }
    }
    let text = String::from_utf8(text).map_err(|_| broken("text that is not UTF-8".into()))?;
    let roles = text
        .lines()
        .take_while(|l| *l != END)
        .map(|l| serde_json::from_str::<Role>(l).map_err(|e| broken(format!("{l:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if roles.len() != fds.len() {
        return Err(broken(format!(
            "{} listeners but {} descriptors",
            roles.len(),
            fds.len()
        )));
    }
    let mut listeners = Vec::with_capacity(roles.len());
    for (role, fd) in roles.into_iter().zip(fds) {
        let l = TcpListener::from(fd);
        // Shared with the old daemon's tokio, which set it too; said again, not assumed.
        l.set_nonblocking(true)
            .map_err(io("taking a listener from"))?;
        listeners.push((role, l));
    }
    s.write_all(TAKEN)
        .map_err(io("confirming the handover to"))?;
    Ok(Some(Inherited { listeners }))
}

/// Whether `text` is whole lines, the last of them `line`.
fn ends_with_line(text: &[u8], line: &str) -> bool {
    text.strip_suffix(b"\n")
        .is_some_and(|t| t.rsplit(|&b| b == b'\n').next() == Some(line.as_bytes()))
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl Fn(io::Error) -> HandoverError + 'a {
    move |source| HandoverError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn patient(s: &UnixStream) -> io::Result<()> {
    s.set_read_timeout(Some(PATIENCE))?;
    s.set_write_timeout(Some(PATIENCE))
}

/// The running daemon's side: where successors come for the listeners.
pub struct Offer {
    listener: UnixListener,
    path: PathBuf,
}

impl Offer {
    /// Listens at `path`, replacing the socket a predecessor listened on (its successor is
    /// this daemon: nobody else will ask it).
    pub fn listen(path: &Path) -> Result<Self, HandoverError> {
        let io = |what| io_error(what, path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io("removing the old handover socket")(e));
            }
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(io("listening for a successor on"))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Blocks until a successor connects and asks for the listeners.
    pub fn next_successor(&self) -> Result<Successor, HandoverError> {
        let io = |what| io_error(what, &self.path);
        let (mut s, _) = self
            .listener
            .accept()
            .map_err(io("accepting a successor on"))?;
        patient(&s).map_err(io("setting timeouts on"))?;
        let mut hello = [0u8; HELLO.len()];
        s.read_exact(&mut hello)
            .map_err(io("reading a successor's request on"))?;
        if hello != HELLO {
            return Err(HandoverError::Protocol {
                path: self.path.clone(),
                why: format!("a successor said {:?}", String::from_utf8_lossy(&hello)),
            });
        }
        Ok(Successor {
            stream: s,
            path: self.path.clone(),
        })
    }
}

/// A daemon that asked for the listeners.
pub struct Successor {
    stream: UnixStream,
    path: PathBuf,
}

impl Successor {
    /// Sends `listeners` and waits for the successor to confirm it holds them. `Ok` means it
    /// does: the caller must stop accepting on them and drain.
    pub fn hand_over(mut self, listeners: &[(Role, BorrowedFd<'_>)]) -> Result<(), HandoverError> {
        let path = self.path.clone();
        let io = |what| io_error(what, &path);
        for batch in listeners.chunks(BATCH) {
            let mut text = String::new();
            for (role, _) in batch {
                // A role always serialises: strings and numbers only.
                text.push_str(&serde_json::to_string(role).unwrap_or_default());
                text.push('\n');
            }
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| fd.as_fd()).collect();
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            let sent = rustix::net::sendmsg(
                &self.stream,
                &[IoSlice::new(text.as_bytes())],
                &mut control,
                SendFlags::empty(),
            )
            .map_err(|e| io("sending listeners to a successor on")(e.into()))?;
            if sent != text.len() {
                // The descriptors went with the first bytes; the rest must follow them.
                self.stream
                    .write_all(&text.as_bytes()[sent..])
                    .map_err(io("sending listeners to a successor on"))?;
            }
        }
        self.stream
            .write_all(format!("{END}\n").as_bytes())
            .map_err(io("sending listeners to a successor on"))?;
        let mut answer = [0u8; TAKEN.len()];
        self.stream
            .read_exact(&mut answer)
            .map_err(io("waiting for a successor's confirmation on"))?;
        if answer != TAKEN {
            return Err(HandoverError::Protocol {
                path: self.path.clone(),
                why: format!(
                    "the successor answered {:?}",
                    String::from_utf8_lossy(&answer)
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        os::fd::AsFd as _,
    };

    use super::*;

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "sidelane-handover-{}-{name}.sock",
            std::process::id()
        ))
    }

    /// A listener handed over keeps its queue: a connection made before the handover, not
    /// yet accepted, is accepted by the successor, and new ones reach it too.
    #[test]
    fn listeners_and_their_queues_pass_to_the_successor() {
        let path = socket_path("pass");
        let offer = Offer::listen(&path).expect("offer");
        let outbound = TcpListener::bind("127.0.0.1:0").expect("bind");
        let admin = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = outbound.local_addr().expect("addr");
        let mut early = TcpStream::connect(addr).expect("connect before the handover");

        let old = std::thread::spawn(move || {
            let successor = offer.next_successor().expect("a successor");
            let role = Role::Outbound {
                pod_uid: "uid-1".into(),
                netns_inode: 42,
            };
            successor
                .hand_over(&[(role, outbound.as_fd()), (Role::Admin, admin.as_fd())])
                .expect("handed over");
            // Its copies close here, as the old daemon's do when it stops accepting.
        });
        let mut got = take_over(&path)
            .expect("handover")
            .expect("a daemon was running");
        old.join().expect("old side");
        assert_eq!(got.len(), 2);
        let pod = |netns_inode| Role::Outbound {
            pod_uid: "uid-1".into(),
            netns_inode,
        };
        assert!(
            got.take_all(&pod(7)).is_empty(),
            "another sandbox's listener"
        );
        let taken = got.take_all(&pod(42));
        assert_eq!(taken.len(), 1);
        assert!(got.take(&Role::Admin).is_some());
        assert!(got.is_empty());

        taken[0].set_nonblocking(false).expect("blocking");
        let (mut accepted, _) = taken[0].accept().expect("the early connection");
        early.write_all(b"hi").expect("write");
        let mut b = [0u8; 2];
        accepted.read_exact(&mut b).expect("read");
        assert_eq!(&b, b"hi");
        let _late = TcpStream::connect(addr).expect("a connection after the handover");
        taken[0].accept().expect("accepted by the successor");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn nobody_running_means_nothing_to_take() {
        let path = socket_path("none");
        assert!(take_over(&path).expect("no error").is_none());
        // A socket file left by a daemon that died: refused, not an error.
        drop(Offer::listen(&path).expect("offer"));
        assert!(take_over(&path).expect("no error").is_none());
        let _ = std::fs::remove_file(&path);
    }
}
