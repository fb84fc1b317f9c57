//! Network namespaces of pods: holding them open, running code inside them, and the
//! kernel's cookie for them (the key the eBPF programs use).
#![allow(unsafe_code)]

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("entering network namespace {what}: {source}")]
    Enter { what: String, source: nix::Error },
    #[error(
        "reading the network-namespace cookie (SO_NETNS_COOKIE needs Linux 5.14 or later): {0}"
    )]
    Cookie(std::io::Error),
}

/// An open handle on a network namespace; the namespace lives as long as this does.
#[derive(Debug)]
pub struct Netns {
    file: File,
    cookie: u64,
    inode: u64,
}

/// The daemon's own namespace, captured at start so `run` can always return to it.
#[derive(Debug)]
pub struct HostNetns(File);

impl HostNetns {
    pub fn current() -> Result<Self, NetnsError> {
        let path = "/proc/thread-self/ns/net";
        File::open(path)
            .map(Self)
            .map_err(|source| NetnsError::Open {
                path: path.into(),
                source,
            })
    }

    pub fn try_clone(&self) -> Result<Self, NetnsError> {
        self.0
            .try_clone()
            .map(Self)
            .map_err(|source| NetnsError::Open {
                path: "host netns (dup)".into(),
                source,
            })
    }
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/proc/<pid>/ns/net`).
    pub fn open(path: &Path, host: &HostNetns) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().map_err(|source| {
            NetnsError::Open {
                path: path.display().to_string(),
                source,
            }
        })?);
        let mut ns = Self {
            file,
            cookie: 0,
            inode,
        };
        ns.cookie = ns.run(host, || {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
                .map_err(NetnsError::Cookie)?;
            netns_cookie(&sock)
        })??;
        Ok(ns)
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The namespace's file, for attaching programs to it (`sk_lookup`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` with the calling thread inside this namespace, then returns the thread to
    /// `host`. Sockets created by `f` stay in this namespace for their whole life. `f` must
    /// not block or yield: the thread is a runtime worker.
    pub fn run<R>(&self, host: &HostNetns, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            what: format!("inode {}", self.inode),
            source,
        })?;
        let out = f();
        // Returning cannot reasonably fail (we left from there); if it does, this thread
        // would open later sockets in the pod's namespace, so stop the process instead.
        if let Err(e) = setns(host.0.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot return to the host network namespace");
            std::process::abort();
        }
        Ok(out)
    }
}

/// The cookie the kernel gives `bpf_get_netns_cookie` for the namespace `sock` lives in.
pub fn netns_cookie(sock: &impl AsRawFd) -> Result<u64, NetnsError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(NetnsError::Cookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}
