use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU32, Ordering},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full, StreamBody};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::{H1Conn, H1Error, Home};
use crate::proxy::{
    cluster_state::take_slot,
    pool::{ConnSlot, Returns},
};

/// A scripted upstream on loopback: one connection; for each step it reads until the
/// request's last bytes are in, reports what it read, writes the canned reply; then closes.
struct Upstream {
    addr: std::net::SocketAddr,
    requests: mpsc::UnboundedReceiver<Vec<u8>>,
}

async fn upstream(steps: Vec<(&'static str, &'static [u8])>) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (tx, requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        for (request_ends_with, reply) in steps {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.ends_with(request_ends_with.as_bytes()) {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(seen);
            if sock.write_all(reply).await.is_err() {
                return;
            }
        }
    });
    Upstream { addr, requests }
}

struct Connected {
    conn: H1Conn,
    slots: Arc<AtomicU32>,
}

async fn connect(addr: std::net::SocketAddr) -> Connected {
    let slots = Arc::new(AtomicU32::new(0));
    let slot = take_slot(&slots, 1).expect("a free slot");
    let io = TcpStream::connect(addr).await.expect("connect loopback");
    Connected {
        conn: H1Conn::new(
            crate::proxy::upstream_io::UpstreamIo::Tcp(io),
            ConnSlot::new(slot, Arc::new(Returns::default())),
        ),
        slots,
    }
}

/// Where a test's connection comes back to.
#[derive(Clone, Default)]
struct Shelf(Arc<Mutex<Option<H1Conn>>>);

impl Home for Shelf {
    fn take_back(self, conn: H1Conn) {
        if let Ok(mut s) = self.0.lock() {
            *s = Some(conn);
        }
    }
}

impl Shelf {
    fn take(&self) -> Option<H1Conn> {
        self.0.lock().ok()?.take()
    }
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", "reviews:9080")
        .body(Empty::new())
        .expect("a valid request")
}

struct Got {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

async fn exchange<B>(conn: H1Conn, req: Request<B>, shelf: &Shelf) -> Result<Got, H1Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (head, body) = req.into_parts();
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let resp = conn.send(&head, target, body, shelf.clone()).await?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Got {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

#[tokio::test]
async fn a_keep_alive_connection_carries_the_next_request() {
    let mut up = upstream(vec![
        (
            "\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-v: v1\r\n\r\nhello",
        ),
        (
            "\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
        ),
    ])
    .await;
    let c = connect(up.addr).await;
    let shelf = Shelf::default();
    let first = exchange(c.conn, get("/reviews/0?x=1"), &shelf)
        .await
        .expect("first response");
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, "hello");
    assert_eq!(first.headers["x-v"], "v1");
    let sent = up.requests.recv().await.expect("first request");
    assert_eq!(
        String::from_utf8_lossy(&sent),
        "GET /reviews/0?x=1 HTTP/1.1\r\nhost: reviews:9080\r\n\r\n"
    );

    let again = shelf.take().expect("the connection came back");
    assert!(!again.is_closed());
    let second = exchange(again, get("/"), &shelf)
        .await
        .expect("second response on the same connection");
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(second.body.is_empty());
    assert!(up.requests.recv().await.is_some());
    // The upstream closes after its script: an idle connection sees it.
    let idle = shelf.take().expect("back again");
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !idle.is_closed() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the peer's close is noticed");
    assert_eq!(c.slots.load(Ordering::Acquire), 1);
    drop(idle);
    assert_eq!(c.slots.load(Ordering::Acquire), 0, "the slot is freed");
}

#[tokio::test]
async fn chunked_bodies_and_their_trailers_are_decoded() {
    let up = upstream(vec![(
        "\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n",
    )])
    .await;
    let shelf = Shelf::default();
    let got = exchange(connect(up.addr).await.conn, get("/"), &shelf)
        .await
        .expect("response");
    assert_eq!(got.body, "hello world");
    assert_eq!(got.trailers.expect("trailers")["grpc-status"], "0");
    assert!(shelf.take().is_some(), "a chunked body ends cleanly");
}

#[tokio::test]
async fn a_body_without_length_runs_to_the_close_and_the_connection_is_not_kept() {
    let up = upstream(vec![(
        "\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end",
    )])
    .await;
    let shelf = Shelf::default();
    let got = exchange(connect(up.addr).await.conn, get("/"), &shelf)
        .await
        .expect("response");
    assert_eq!(got.body, "until the end");
    assert!(shelf.take().is_none());
}

#[tokio::test]
async fn connection_close_and_http_1_0_end_the_connection() {
    for reply in [
        &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
        &b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
    ] {
        let up = upstream(vec![("\r\n\r\n", reply)]).await;
        let shelf = Shelf::default();
        let got = exchange(connect(up.addr).await.conn, get("/"), &shelf)
            .await
            .expect("response");
        assert_eq!(got.body, "ok");
        assert!(shelf.take().is_none());
    }
}

#[tokio::test]
async fn head_204_and_304_have_no_body_whatever_their_headers_say() {
    let up = upstream(vec![
        ("\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        ("\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (
            "\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
        ),
    ])
    .await;
    let shelf = Shelf::default();
    let mut head = get("/");
    *head.method_mut() = Method::HEAD;
    let mut conn = connect(up.addr).await.conn;
    for (req, status) in [
        (head, StatusCode::OK),
        (get("/"), StatusCode::NO_CONTENT),
        (get("/"), StatusCode::NOT_MODIFIED),
    ] {
        let got = exchange(conn, req, &shelf).await.expect("response");
        assert_eq!(got.status, status);
        assert!(got.body.is_empty());
        conn = shelf
            .take()
            .unwrap_or_else(|| panic!("{status} kept the connection"));
    }
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let up = upstream(vec![(
        "hello",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
    )])
    .await;
    let req = Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .header("expect", "100-continue")
        .body(Full::new(Bytes::from_static(b"hello")))
        .expect("a valid request");
    let got = exchange(connect(up.addr).await.conn, req, &Shelf::default())
        .await
        .expect("response");
    assert_eq!(got.status, StatusCode::CREATED);
}

#[tokio::test]
async fn request_bodies_are_framed_by_length_or_chunked() {
    let mut up = upstream(vec![
        ("hello", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        ("0\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
    ])
    .await;
    let shelf = Shelf::default();
    let sized = Request::post("/a")
        .body(Full::new(Bytes::from_static(b"hello")))
        .expect("a valid request");
    exchange(connect(up.addr).await.conn, sized, &shelf)
        .await
        .expect("response");
    assert_eq!(
        String::from_utf8_lossy(&up.requests.recv().await.expect("sent")),
        "POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello"
    );
    let frames = futures::stream::iter(
        ["abc", "defghijklmnopqr"]
            .map(|s| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(s)))),
    );
    let streamed = Request::post("/b")
        .body(StreamBody::new(frames))
        .expect("a valid request");
    let conn = shelf.take().expect("kept");
    exchange(conn, streamed, &shelf).await.expect("response");
    assert_eq!(
        String::from_utf8_lossy(&up.requests.recv().await.expect("sent")),
        "POST /b HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nf\r\ndefghijklmnopqr\r\n0\r\n\r\n"
    );
}

#[tokio::test]
async fn broken_responses_are_errors() {
    for reply in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello"[..],
        &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"[..],
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
        &b"HTTP/1.1 200"[..],
        &b"not http at all\r\n\r\n"[..],
    ] {
        let up = upstream(vec![("\r\n\r\n", reply)]).await;
        let shelf = Shelf::default();
        let got = exchange(connect(up.addr).await.conn, get("/"), &shelf).await;
        assert!(
            got.is_err(),
            "{:?} was accepted",
            String::from_utf8_lossy(reply)
        );
        assert!(shelf.take().is_none());
    }
}

#[tokio::test]
async fn an_answer_that_comes_before_the_whole_body_is_returned_at_once() {
    // The upstream answers after the first chunk and then neither reads on nor closes.
    let up = upstream(vec![
        (
            "hello\r\n",
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!",
        ),
        ("never sent", b""),
    ])
    .await;
    let c = connect(up.addr).await;
    let shelf = Shelf::default();
    // One chunk, then a client that has not sent the rest yet.
    let frames = futures::StreamExt::chain(
        futures::stream::iter([Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
            Bytes::from_static(b"hello"),
        ))]),
        futures::stream::pending(),
    );
    let req = Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .header("host", "reviews:9080")
        .body(StreamBody::new(frames))
        .expect("a valid request");
    let got = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        exchange(c.conn, req, &shelf),
    )
    .await
    .expect("answered without waiting for the rest of the body")
    .expect("a response");
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(got.body, "too big!");
    assert!(
        shelf.take().is_none(),
        "a connection with half a request on it is not reused"
    );
}

/// A 101 to an upgrade request hands the connection over whole: what the upstream sent after
/// its head is kept for the client, the socket carries bytes both ways, the cluster slot is
/// held until the tunnel goes, and the connection never goes back to the pool.
#[tokio::test]
async fn a_switch_of_protocols_hands_the_connection_over() {
    let up = upstream(vec![
        (
            "\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nfirst",
        ),
        ("ping", b"pong"),
    ])
    .await;
    let Connected { conn, slots } = connect(up.addr).await;
    let req = Request::builder()
        .uri("/chat")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let (head, body) = req.into_parts();
    let shelf = Shelf::default();
    let resp = conn
        .send(&head, "/chat", body, shelf.clone())
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let tunnel = resp
        .extensions()
        .get::<crate::proxy::upgrade::Upgraded>()
        .and_then(crate::proxy::upgrade::Upgraded::take)
        .expect("the upstream connection, for the client's side");
    drop(resp);
    assert!(
        shelf.take().is_none(),
        "a switched connection went back to the pool"
    );
    assert_eq!(
        slots.load(Ordering::Relaxed),
        1,
        "slot given up while the tunnel is open"
    );

    let (mut ours, theirs) = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let c = TcpStream::connect(addr).await.expect("connect");
        (c, l.accept().await.expect("accept").0)
    };
    let joined = tokio::spawn(tunnel.join(theirs, Bytes::from_static(b"ping")));
    let mut got = [0u8; 9];
    ours.read_exact(&mut got).await.expect("read");
    assert_eq!(
        &got, b"firstpong",
        "the bytes after the 101, then the answer"
    );
    drop(ours);
    tokio::time::timeout(std::time::Duration::from_secs(5), joined)
        .await
        .expect("the tunnel ends once both sides close")
        .expect("task");
    assert_eq!(
        slots.load(Ordering::Relaxed),
        0,
        "slot kept after the tunnel"
    );
}
