use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Full, StreamBody};
use tokio::net::{TcpListener, TcpStream};

use super::{H2Conn, RequestBody, handshake};

/// An h2 server on loopback that takes one connection and hands it to `then`.
async fn one_connection<F, Fut>(then: F) -> std::net::SocketAddr
where
    F: FnOnce(h2::server::Connection<TcpStream, Bytes>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        if let Ok(conn) = h2::server::handshake(sock).await {
            then(conn).await;
        }
    });
    addr
}

/// An h2 server on loopback answering each stream with what `answer` makes of it.
async fn server<F, Fut>(answer: F) -> std::net::SocketAddr
where
    F: Fn(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    one_connection(|mut conn| async move {
        while let Some(Ok((req, respond))) = conn.accept().await {
            tokio::spawn(answer(req, respond));
        }
    })
    .await
}

async fn connect(addr: std::net::SocketAddr) -> H2Conn {
    let io = TcpStream::connect(addr).await.expect("connect");
    let (conn, drive) = handshake(crate::proxy::upstream_io::UpstreamIo::Tcp(io))
        .await
        .expect("handshake");
    tokio::spawn(drive);
    conn
}

fn head(extra: &[(&'static str, &'static str)]) -> http::request::Parts {
    let mut req = Request::post("/echo").body(()).expect("request");
    req.headers_mut()
        .insert("host", HeaderValue::from_static("svc.test"));
    for (k, v) in extra {
        req.headers_mut().insert(*k, HeaderValue::from_static(v));
    }
    req.into_parts().0
}

#[tokio::test]
async fn a_large_body_and_trailers_go_and_come_back_whole() {
    let addr = server(|req, mut respond| async move {
        let mut body = req.into_body();
        let mut got = 0usize;
        while let Some(Ok(d)) = body.data().await {
            got += d.len();
            let _ = body.flow_control().release_capacity(d.len());
        }
        let trailer = body
            .trailers()
            .await
            .ok()
            .flatten()
            .and_then(|t| t.get("x-sum").cloned());
        let Ok(mut send) = respond.send_response(Response::new(()), false) else {
            return;
        };
        let _ = send.send_data(Bytes::from(got.to_string()), false);
        let mut t = HeaderMap::new();
        t.insert(
            "x-seen",
            trailer.unwrap_or(HeaderValue::from_static("none")),
        );
        let _ = send.send_trailers(t);
    })
    .await;
    let mut conn = connect(addr).await;
    let chunks: Vec<Result<hyper::body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> =
        (0..10)
            .map(|_| Ok(hyper::body::Frame::data(Bytes::from(vec![7u8; 30_000]))))
            .chain([Ok(hyper::body::Frame::trailers({
                let mut t = HeaderMap::new();
                t.insert("x-sum", HeaderValue::from_static("300000"));
                t
            }))])
            .collect();
    let body: RequestBody = StreamBody::new(futures::stream::iter(chunks)).boxed();
    let resp = conn
        .send(
            &head(&[("connection", "upgrade"), ("upgrade", "x")]),
            "/echo",
            body,
        )
        .await
        .expect("response");
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    assert_eq!(collected.to_bytes(), Bytes::from("300000"));
    assert_eq!(
        trailers.and_then(|t| t.get("x-seen").cloned()),
        Some(HeaderValue::from_static("300000"))
    );
}

#[tokio::test]
async fn a_refused_stream_is_reported_as_refused_and_the_connection_stays_open() {
    let addr = server(|_req, mut respond| async move {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
    })
    .await;
    let mut conn = connect(addr).await;
    let body: RequestBody = Full::new(Bytes::new()).map_err(|e| match e {}).boxed();
    let err = conn
        .send(&head(&[]), "/", body)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.reason(), Some(h2::Reason::REFUSED_STREAM));
    assert!(!conn.is_closed());
}

fn empty() -> RequestBody {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

/// Polls `done` every 10 ms for at most two seconds.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if done() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn a_goaway_closes_the_connection_to_new_requests_and_they_fail_as_unprocessed() {
    let addr = one_connection(|mut conn| async move {
        if let Some(Ok((_req, mut respond))) = conn.accept().await {
            // The stream in flight still gets its answer; no new one is taken.
            conn.graceful_shutdown();
            let _ = respond.send_response(Response::new(()), true);
        }
        while let Some(Ok(_)) = conn.accept().await {}
    })
    .await;
    let mut conn = connect(addr).await;
    let resp = conn.send(&head(&[]), "/", empty()).await.expect("answered");
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert!(
        eventually(|| conn.is_closed()).await,
        "the pool would still lend a connection told to go away"
    );
    let err = conn
        .send(&head(&[]), "/", empty())
        .await
        .err()
        .expect("no stream opens after a GOAWAY");
    assert!(
        err.is_go_away() && err.is_remote(),
        "not reported as the server's GOAWAY: {err}"
    );
}

#[tokio::test]
async fn a_connection_whose_server_went_away_reports_closed() {
    let addr = one_connection(|mut conn| async move {
        // Answer one stream, then drop the connection without a GOAWAY.
        if let Some(Ok((_req, mut respond))) = conn.accept().await {
            let _ = respond.send_response(Response::new(()), true);
        }
        // Long enough to flush the answer; then the socket closes under the client.
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            std::future::poll_fn(|cx| conn.poll_closed(cx)),
        )
        .await;
    })
    .await;
    let mut conn = connect(addr).await;
    assert!(!conn.is_closed());
    let resp = conn.send(&head(&[]), "/", empty()).await.expect("answered");
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert!(eventually(|| conn.is_closed()).await);
}

#[tokio::test]
async fn a_request_body_that_fails_resets_the_upstream_stream() {
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let addr = server(move |req, _respond| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut got = 0usize;
            let end = loop {
                match body.data().await {
                    Some(Ok(d)) => {
                        got += d.len();
                        let _ = body.flow_control().release_capacity(d.len());
                    }
                    Some(Err(e)) => break e.reason(),
                    None => break None,
                }
            };
            let _ = seen_tx.send((got, end));
        }
    })
    .await;
    let mut conn = connect(addr).await;
    let chunks: Vec<Result<hyper::body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
        Ok(hyper::body::Frame::data(Bytes::from_static(b"partial"))),
        Err("client went away".into()),
    ];
    let body: RequestBody = StreamBody::new(futures::stream::iter(chunks)).boxed();
    let sent = conn.send(&head(&[]), "/upload", body).await;
    assert!(sent.is_err(), "a request cut short got a response");
    let (got, end) = tokio::time::timeout(std::time::Duration::from_secs(5), seen.recv())
        .await
        .expect("the server saw the stream end")
        .expect("report");
    // The chunk may still sit in h2's buffer when the reset comes, and go with it.
    assert!(got <= b"partial".len());
    assert_eq!(
        end,
        Some(h2::Reason::INTERNAL_ERROR),
        "the upstream took a cut-short body as whole"
    );
}

#[test]
fn the_uri_takes_its_authority_from_host_and_keeps_the_query() {
    let host = HeaderValue::from_static("reviews.default:9080");
    let uri = super::h2_uri(Some(&host), "/a/b?x=1&y").expect("uri");
    assert_eq!(uri.to_string(), "http://reviews.default:9080/a/b?x=1&y");
    let bare = super::h2_uri(None, "/only").expect("uri");
    assert_eq!((bare.authority(), bare.path()), (None, "/only"));
    let bad = HeaderValue::from_static("not a host");
    assert!(super::h2_uri(Some(&bad), "/").is_none());
}
