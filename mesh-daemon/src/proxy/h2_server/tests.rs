use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::serve;
use crate::proxy::{drain::Drain, h2_body::H2Body, http::Body, idle::IdleDeadline};

/// A loopback server running `serve` with `answer` on its one connection, and an h2 client
/// connected to it.
async fn pair<F, Fut>(answer: F) -> h2::client::SendRequest<Bytes>
where
    F: Fn(Request<H2Body>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let (send, conn) = pair_idle(Duration::from_secs(3600), answer).await;
    tokio::spawn(conn);
    send
}

/// As [`pair`], with the server's idle timeout, and the client's connection future (it ends
/// when the connection closes) left to the caller.
async fn pair_idle<F, Fut>(
    idle: Duration,
    answer: F,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<TcpStream, Bytes>,
)
where
    F: Fn(Request<H2Body>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    pair_with(IdleDeadline::new(idle, Drain::new(0).signal()), answer).await
}

async fn pair_with<F, Fut>(
    idle: IdleDeadline,
    answer: F,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<TcpStream, Bytes>,
)
where
    F: Fn(Request<H2Body>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        if let Ok((sock, _)) = listener.accept().await {
            serve(sock, idle, answer).await;
        }
    });
    let io = TcpStream::connect(addr).await.expect("connect");
    h2::client::handshake(io).await.expect("handshake")
}

fn full(b: &'static [u8]) -> Response<Body> {
    Response::new(
        Full::new(Bytes::from_static(b))
            .map_err(|e| match e {})
            .boxed(),
    )
}

fn get(path: &str) -> Request<()> {
    Request::get(format!("http://svc.test{path}"))
        .body(())
        .expect("request")
}

/// Reads a client-side response body to its end: the bytes and the trailers.
async fn read_all(mut body: h2::RecvStream) -> (Vec<u8>, Option<HeaderMap>) {
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (got, body.trailers().await.expect("trailers"))
}

#[tokio::test]
async fn a_request_body_reaches_the_answer_and_the_response_goes_back_with_its_framing() {
    let mut send = pair(|req: Request<H2Body>| async move {
        let authority = req.uri().authority().map(|a| a.to_string());
        let got = req.into_body().collect().await.map(|c| c.to_bytes().len());
        let text = format!("{authority:?} {got:?}");
        let mut resp = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
        // Connection-specific fields an HTTP/1.1 upstream may send: HTTP/2 forbids them.
        resp.headers_mut()
            .insert("keep-alive", HeaderValue::from_static("timeout=5"));
        resp.headers_mut()
            .insert("transfer-encoding", HeaderValue::from_static("chunked"));
        resp
    })
    .await;
    let req = Request::post("http://svc.test/upload")
        .body(())
        .expect("request");
    let (response, mut stream) = send.send_request(req, false).expect("stream");
    stream.reserve_capacity(200_000);
    let chunk = Bytes::from(vec![1u8; 100_000]);
    stream.send_data(chunk.clone(), false).expect("data");
    stream.send_data(chunk, true).expect("data");
    let resp = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key(http::header::DATE));
    assert!(!resp.headers().contains_key("keep-alive"));
    let expected = "Some(\"svc.test\") Ok(200000)";
    assert_eq!(
        resp.headers().get(http::header::CONTENT_LENGTH),
        Some(&HeaderValue::from(expected.len()))
    );
    let (body, _) = read_all(resp.into_body()).await;
    assert_eq!(body, expected.as_bytes());
}

#[tokio::test]
async fn a_streamed_response_keeps_its_trailers() {
    let mut send = pair(|_req: Request<H2Body>| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames: Vec<
            Result<hyper::body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
        > = vec![
            Ok(hyper::body::Frame::data(Bytes::from(vec![9u8; 70_000]))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        Response::new(StreamBody::new(futures::stream::iter(frames)).boxed())
    })
    .await;
    let (response, _) = send.send_request(get("/"), true).expect("stream");
    let resp = response.await.expect("response");
    let (body, trailers) = read_all(resp.into_body()).await;
    assert_eq!(body.len(), 70_000);
    assert_eq!(
        trailers.and_then(|t| t.get("grpc-status").cloned()),
        Some(HeaderValue::from_static("0"))
    );
}

#[tokio::test]
async fn streams_of_one_connection_are_answered_at_the_same_time() {
    // The first answer waits for the second request: served one after the other, neither
    // would ever finish.
    let (arrived_tx, arrived) = mpsc::unbounded_channel::<()>();
    let arrived = std::sync::Arc::new(tokio::sync::Mutex::new(arrived));
    let mut send = pair(move |req: Request<H2Body>| {
        let arrived_tx = arrived_tx.clone();
        let arrived = arrived.clone();
        async move {
            if req.uri().path() == "/first" {
                let _ = arrived.lock().await.recv().await;
                full(b"first")
            } else {
                let _ = arrived_tx.send(());
                full(b"second")
            }
        }
    })
    .await;
    let (first, _) = send.send_request(get("/first"), true).expect("stream");
    let (second, _) = send.send_request(get("/second"), true).expect("stream");
    let both = async {
        let (a, b) = tokio::join!(first, second);
        (
            read_all(a.expect("first").into_body()).await.0,
            read_all(b.expect("second").into_body()).await.0,
        )
    };
    let (a, b) = tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .expect("the streams were served one at a time");
    assert_eq!(
        (a.as_slice(), b.as_slice()),
        (&b"first"[..], &b"second"[..])
    );
}

#[tokio::test]
async fn a_stream_the_client_resets_cancels_its_answer() {
    struct Dropped(mpsc::UnboundedSender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel::<()>();
    let mut send = pair(move |_req: Request<H2Body>| {
        let guard = Dropped(dropped_tx.clone());
        let started_tx = started_tx.clone();
        async move {
            let _guard = guard;
            let _ = started_tx.send(());
            // An upstream that never answers.
            std::future::pending::<()>().await;
            full(b"")
        }
    })
    .await;
    let (_response, mut stream) = send.send_request(get("/slow"), true).expect("stream");
    tokio::time::timeout(Duration::from_secs(5), started.recv())
        .await
        .expect("the answer started");
    stream.send_reset(h2::Reason::CANCEL);
    tokio::time::timeout(Duration::from_secs(5), dropped.recv())
        .await
        .expect("the answer ran on after the client reset its stream");
}

#[tokio::test]
async fn an_idle_connection_is_drained_after_the_idle_timeout_and_not_before() {
    let idle = Duration::from_millis(300);
    let (mut send, conn) =
        pair_idle(idle, |_req: Request<H2Body>| async move { full(b"ok") }).await;
    let mut conn = tokio::spawn(conn);
    let (response, _) = send.send_request(get("/"), true).expect("stream");
    let answered = tokio::time::Instant::now();
    let resp = response.await.expect("response");
    assert_eq!(read_all(resp.into_body()).await.0, b"ok");
    let closed = tokio::time::timeout(Duration::from_secs(5), &mut conn)
        .await
        .expect("an idle connection stayed open past its idle timeout");
    assert!(
        answered.elapsed() >= idle - Duration::from_millis(50),
        "closed after {:?}, before the idle timeout",
        answered.elapsed()
    );
    // Drained with a GOAWAY: the client sees an orderly close, not a failure.
    assert!(matches!(closed, Ok(Ok(()))), "{closed:?}");
}

#[tokio::test]
async fn a_stream_open_longer_than_the_idle_timeout_is_not_cut() {
    let (mut send, conn) = pair_idle(
        Duration::from_millis(100),
        |_req: Request<H2Body>| async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            full(b"slow")
        },
    )
    .await;
    tokio::spawn(conn);
    let (response, _) = send.send_request(get("/slow"), true).expect("stream");
    let resp = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("in time")
        .expect("a stream in progress was cut by the idle timeout");
    assert_eq!(read_all(resp.into_body()).await.0, b"slow");
}

/// Once the daemon drains, the client is told (GOAWAY), the stream in progress is answered,
/// and the connection then closes.
#[tokio::test]
async fn a_drain_finishes_open_streams_then_closes_the_connection() {
    let drain = Drain::new(0);
    let (mut send, conn) = pair_with(
        IdleDeadline::new(Duration::from_secs(3600), drain.signal()),
        |_req: Request<H2Body>| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            full(b"slow")
        },
    )
    .await;
    let conn = tokio::spawn(conn);
    let (response, _) = send.send_request(get("/slow"), true).expect("request");
    tokio::time::sleep(Duration::from_millis(50)).await;
    drain.start();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered in time")
        .expect("the stream in progress was answered");
    assert_eq!(response.status(), StatusCode::OK);
    let (body, _) = read_all(response.into_body()).await;
    assert_eq!(body, b"slow");
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the drained connection closed")
        .expect("task")
        .expect("closed cleanly, by GOAWAY");
}
