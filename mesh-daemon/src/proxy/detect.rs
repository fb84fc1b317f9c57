//! Reading a connection's first bytes without consuming them: what protocol the client
//! speaks, and the SNI of a TLS ClientHello.
use std::time::Duration;

use tokio::net::TcpStream;

use super::protocol::{Protocol, client_hello_sni};

/// A ClientHello's first record is at most 16 KiB of payload.
const PEEK_LIMIT: usize = 5 + 16 * 1024;
/// Pause between looks at a buffer that holds a partial answer (peeking is not consuming,
/// so readiness stays set and waiting on it would spin).
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(50);
/// Once some bytes have come, how long they may stay ambiguous (a client that sends "GE"
/// and stops, or closes after it): then the answer is "no answer", whatever `limit` says.
const PARTIAL_LIMIT: Duration = Duration::from_secs(10);

/// Peeks until `decide` answers, the client closes without sending (`decide` then sees no
/// bytes and `true`), the peek buffer is full, or the time is up. `None` on error, full
/// buffer or time up.
async fn peek_until<T>(
    s: &TcpStream,
    limit: Option<Duration>,
    decide: impl Fn(&[u8], bool) -> Option<T>,
) -> Option<T> {
    let work = async {
        let mut buf = vec![0u8; PEEK_LIMIT];
        let n = s.peek(&mut buf).await.ok()?;
        if let Some(answer) = decide(&buf[..n], n == 0) {
            return Some(answer);
        }
        if n == 0 {
            return None;
        }
        let partial = async {
            let mut pause = FIRST_PAUSE;
            loop {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
                let n = s.peek(&mut buf).await.ok()?;
                if let Some(answer) = decide(&buf[..n], false) {
                    return Some(answer);
                }
                if n == buf.len() {
                    return None;
                }
            }
        };
        tokio::time::timeout(PARTIAL_LIMIT, partial)
            .await
            .ok()
            .flatten()
    };
    match limit {
        Some(t) => tokio::time::timeout(t, work).await.ok().flatten(),
        None => work.await,
    }
}

/// The protocol of a connection to a port that declares none, as Istio's sniffing decides
/// it: TCP when the client stays silent past `limit`, closes first, or sends anything else.
pub async fn sniff(s: &TcpStream, limit: Option<Duration>) -> Protocol {
    peek_until(s, limit, |bytes, closed| {
        Protocol::detect(bytes).or(closed.then_some(Protocol::Tcp))
    })
    .await
    .unwrap_or(Protocol::Tcp)
}

/// The SNI of the ClientHello the client is sending; `None` without one. TLS clients speak
/// first, so this waits at most `limit` (or the protocol detection timeout) for it.
pub async fn sni(s: &TcpStream, limit: Option<Duration>) -> Option<String> {
    peek_until(s, limit, |bytes, closed| match client_hello_sni(bytes) {
        Ok(name) => Some(name),
        Err(_) => closed.then_some(None),
    })
    .await
    .flatten()
}
