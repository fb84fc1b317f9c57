//! What crosses a node's links, captured the way tcpdump does (an `AF_PACKET` socket in the
//! node's namespace, every interface): to show what a wire carries, such as that no
//! plaintext passes between two pods once the mesh encrypts their traffic.
use std::{io::Read, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};

use crate::sys::{HarnessError, Result, in_netns, io_err};

/// `htons(ETH_P_ALL)`: every protocol.
const ETH_P_ALL_BE: i32 = 0x0300;

/// A capture running on every interface of one namespace; frames queue in the socket until
/// read.
pub struct Capture(Socket);

/// One IPv4 or IPv6 TCP segment seen.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

impl Capture {
    pub fn start(netns: &str) -> Result<Self> {
        let socket = in_netns(netns, || {
            let s = Socket::new(
                Domain::PACKET,
                Type::RAW,
                Some(Protocol::from(ETH_P_ALL_BE)),
            )?;
            s.set_recv_buffer_size(8 << 20)?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok::<_, std::io::Error>(s)
        })?
        .map_err(io_err("opening a packet capture"))?;
        Ok(Self(socket))
    }

    /// The TCP segments captured so far (each seen on every interface it crossed).
    pub fn segments(&self) -> Result<Vec<Segment>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        // Bounded: a busy link cannot keep the test reading forever.
        for _ in 0..100_000 {
            match (&self.0).read(&mut buf) {
                Ok(n) => out.extend(tcp_segment(&buf[..n])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(out);
                }
                Err(e) => return Err(io_err("reading the packet capture")(e)),
            }
        }
        Err(HarnessError::Other("the capture never ran dry".into()))
    }
}

/// The TCP segment in an Ethernet frame, if it carries one.
fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (proto, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            (*ip.get(9)?, ip.get(ihl..total.min(ip.len()))?)
        }
        0x86dd => {
            let len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            (*ip.get(6)?, ip.get(40..(40 + len).min(ip.len()))?)
        }
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let offset = usize::from(l4.get(12)? >> 4) * 4;
    Some(Segment {
        src_port: u16::from_be_bytes([*l4.first()?, *l4.get(1)?]),
        dst_port: u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
        payload: l4.get(offset..)?.to_vec(),
    })
}
