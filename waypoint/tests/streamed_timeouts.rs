//! Route timeouts (Gateway API `HTTPRoute` `timeouts.request` / `timeouts.backendRequest`)
//! with streamed bodies, against a real backend that trickles: the `waypoint` binary, a
//! stand-in destination ztunnel and plain TCP backends.
//!
//! The reading implemented (`http1::request_deadline`): `request` bounds the whole
//! exchange, from the request head's arrival through the request body (buffered or
//! streamed), every try and the streamed response body to its last byte;
//! `backendRequest` bounds each try, from its first byte upstream to the response's last
//! byte. Before the response head went out the client gets `504`; after, the response is
//! cut: the CONNECT stream (HTTP/1.1 in the tunnel) or the request stream (HTTP/2 in the
//! tunnel) is reset, never ended as if complete, and the backend's connection is closed.
//!
//! No timing thresholds: the backends trickle until their connection closes (so only the
//! timeout can end an exchange), and the tests wait for events with generous bounds.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use common::{
    block_on, bounded, h2_in_tunnel, next_request, read_through, read_to_end, response_head,
    serve_threads, EchoBinary, Ended, EVENT_BOUND,
};
use hbone::stream::H2Stream;

/// What the backend saw end.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Its trickled response could not be written any more: the path closed it.
    ResponseCut(&'static str),
    /// The request body stopped (end of stream) before its declared length.
    UploadCut { got: usize },
}

/// Trickle `unit` every few milliseconds until a write fails.
fn trickle(c: &mut TcpStream, unit: &[u8]) {
    loop {
        if c.write_all(unit).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A backend: `…/slow-body` answers a head with `content-length: 1000000` at once and then
/// one byte at a time; `…/slow-chunked` the same with one-byte chunks; `…/upload` reads
/// the whole declared body before answering `200 got=N`; anything else `200 ok`.
/// Reports what it saw end on `tx`.
fn backend(ip: std::net::Ipv4Addr, tx: mpsc::Sender<Seen>) -> SocketAddr {
    serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while let Some(req) = next_request(&mut c, &mut buf) {
            let len = req.content_length();
            let path = req.path;
            let mut got = len.min(buf.len());
            buf.drain(..got);
            while got < len {
                match c.read(&mut chunk[..(len - got).min(64 * 1024)]) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Seen::UploadCut { got });
                        return;
                    }
                    Ok(k) => got += k,
                }
            }
            if path.ends_with("/slow-body") {
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n";
                if c.write_all(head.as_bytes()).is_ok() {
                    trickle(&mut c, b"x");
                }
                let _ = tx.send(Seen::ResponseCut("length"));
                return;
            }
            if path.ends_with("/slow-chunked") {
                let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if c.write_all(head.as_bytes()).is_ok() {
                    trickle(&mut c, b"1\r\nx\r\n");
                }
                let _ = tx.send(Seen::ResponseCut("chunked"));
                return;
            }
            let body = if path.ends_with("/upload") {
                format!("got={got}")
            } else {
                "ok".to_string()
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if c.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    })
}

const HOST: &str = "echo.app.svc.cluster.local";

/// `/rq/…`: `request: 1s`; `/br/…`: `backendRequest: 1s` within `request: 10m`.
const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: timeouts, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /rq}}]
    backendRefs: [{name: echo, port: 80}]
    timeouts: {request: 1s}
  - matches: [{path: {type: PathPrefix, value: /br}}]
    backendRefs: [{name: echo, port: 80}]
    timeouts: {request: 10m, backendRequest: 1s}
  - backendRefs: [{name: echo, port: 80}]
"#;

struct Setup {
    wp: EchoBinary,
    seen: mpsc::Receiver<Seen>,
}

fn setup() -> Setup {
    let (tx, seen) = mpsc::channel();
    let wp = EchoBinary::start(
        11,
        "streamed-timeouts",
        |ip| backend(ip, tx),
        |model, settings| format!("{model}---\n{settings}---\n{ROUTE}"),
    );
    Setup { wp, seen }
}

impl std::ops::Deref for Setup {
    type Target = EchoBinary;

    fn deref(&self) -> &EchoBinary {
        &self.wp
    }
}

impl Setup {
    /// What the backend saw end next.
    fn next_seen(&self) -> Seen {
        self.seen
            .recv_timeout(EVENT_BOUND)
            .expect("the backend saw nothing end")
    }
}

/// Read the response head (status, head length) and then everything until the stream
/// ends: (status, bytes after the head, how it ended).
async fn read_all(s: &mut H2Stream) -> (u16, Vec<u8>, Ended) {
    let (buf, ended) = read_to_end(s).await;
    let h = response_head(&buf)
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&buf)));
    (h.status, buf[h.size..].to_vec(), ended)
}

/// A complete exchange on a fresh tunnel: (status, body).
async fn exchange(st: &Setup, path: &str) -> (u16, String) {
    let (_c, mut s) = st.tunnel().await;
    let req = format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
    s.write_all(Bytes::from(req), false).await.unwrap();
    let (status, body, ended) = read_all(&mut s).await;
    assert_eq!(ended, Ended::Closed);
    (status, String::from_utf8(body).unwrap())
}

/// A response body trickled past the route's `request` timeout, after its head went
/// out: the tunnel is reset with the body incomplete (content-length and chunked), the
/// backend's connection is closed, and the timeout is counted. The same route answers
/// a quick exchange in full.
#[test]
fn r17_request_timeout_cuts_a_streamed_response_body_after_its_head() {
    let st = setup();
    block_on(async {
        assert_eq!(exchange(&st, "/rq/fast").await, (200, "ok".into()));
        for (path, framing) in [("/rq/slow-body", "length"), ("/rq/slow-chunked", "chunked")] {
            let (_c, mut s) = st.tunnel().await;
            let req = format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
            s.write_all(Bytes::from(req), false).await.unwrap();
            let (status, body, ended) = read_all(&mut s).await;
            assert_eq!(status, 200, "{path}");
            assert_eq!(
                ended,
                Ended::Reset,
                "{path}: the cut must not look complete"
            );
            if framing == "length" {
                assert!(body.len() < 1_000_000, "{path}: {} bytes", body.len());
            } else {
                assert!(
                    !body.windows(5).any(|w| w == b"0\r\n\r\n"),
                    "{path}: a last chunk was sent"
                );
            }
            assert_eq!(st.next_seen(), Seen::ResponseCut(framing));
        }
    });
    assert_eq!(st.metric("waypoint_upstream_timeouts_total"), 2);
}

/// `backendRequest` bounds a try until the response's last byte, not only its head.
#[test]
fn r17_backend_request_timeout_covers_the_response_body() {
    let st = setup();
    block_on(async {
        assert_eq!(exchange(&st, "/br/fast").await, (200, "ok".into()));
        let (_c, mut s) = st.tunnel().await;
        let req = format!("GET /br/slow-body HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
        s.write_all(Bytes::from(req), false).await.unwrap();
        let (status, body, ended) = read_all(&mut s).await;
        assert_eq!((status, ended), (200, Ended::Reset));
        assert!(body.len() < 1_000_000);
    });
    assert_eq!(st.next_seen(), Seen::ResponseCut("length"));
    assert_eq!(st.metric("waypoint_upstream_timeouts_total"), 1);
}

/// A request body trickled past the route's `request` timeout, before any response:
/// `504`, and the tunnel is closed (the rest of the body is never read). A small body
/// (read whole by the waypoint before the first try) never reaches the backend; a large
/// (streamed) one is cut at the backend.
#[test]
fn r17_request_timeout_answers_504_to_a_slow_upload() {
    let st = setup();
    block_on(async {
        for (len, sent_first) in [(1_000usize, 10usize), (1_000_000, 100 * 1024)] {
            let (_c, mut s) = st.tunnel().await;
            let head = format!(
                "POST /rq/upload HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: {len}\r\n\r\n"
            );
            s.write_all(Bytes::from(head), false).await.unwrap();
            s.write_all(Bytes::from(vec![b'u'; sent_first]), false)
                .await
                .unwrap();
            // Trickle the rest until the waypoint answers and the stream ends.
            let (mut w, mut r) = s.split();
            let reader = async {
                let mut buf = Vec::new();
                loop {
                    match r.read().await {
                        Some(Ok(b)) => buf.extend_from_slice(&b),
                        Some(Err(_)) => return (buf, Ended::Reset),
                        None => return (buf, Ended::Closed),
                    }
                }
            };
            let trickler = async {
                while w.write_all(Bytes::from_static(b"u"), false).await.is_ok() {
                    monoio::time::sleep(Duration::from_millis(20)).await;
                }
                std::future::pending::<()>().await
            };
            let (buf, ended) = match bounded(runtime::worker::race(reader, trickler)).await {
                runtime::worker::Either::Left(x) => x,
                runtime::worker::Either::Right(()) => unreachable!(),
            };
            let text = String::from_utf8_lossy(&buf).into_owned();
            assert!(
                text.starts_with("HTTP/1.1 504 "),
                "{len}-byte upload: {text:?}"
            );
            assert!(text.ends_with("upstream request timeout"), "{text:?}");
            assert!(
                text.to_ascii_lowercase().contains("connection: close"),
                "{text:?}"
            );
            assert_eq!(ended, Ended::Closed, "{len}-byte upload");
            if len > 64 * 1024 {
                match st.next_seen() {
                    Seen::UploadCut { got } => assert!(got >= sent_first && got < len),
                    other => panic!("{other:?}"),
                }
            }
        }
    });
    // Only the streamed upload reached the backend; nothing else ended there. Both
    // timeouts are counted (the small body's while the waypoint read it).
    assert!(st.seen.try_recv().is_err());
    assert_eq!(st.metric("waypoint_upstream_timeouts_total"), 2);
}

/// HTTP/2 inside the tunnel: a response body trickled past the route's `request` timeout
/// after its head went out is reset (RST_STREAM), not ended; the connection and its other
/// streams go on (a quick request on the same connection afterwards completes).
#[test]
fn r17_request_timeout_resets_an_h2_stream_whose_body_is_streaming() {
    let st = setup();
    block_on(async {
        let (_c, s) = st.tunnel().await;
        let (mut client, _conn) = h2_in_tunnel(s).await;
        let get = |path: &str| {
            http::Request::builder()
                .uri(format!("http://{HOST}{path}"))
                .body(())
                .unwrap()
        };
        let (resp, _) = client.send_request(get("/rq/slow-body"), true).unwrap();
        let resp = bounded(resp).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = 0;
        let err = loop {
            match bounded(body.data()).await {
                Some(Ok(b)) => {
                    got += b.len();
                    let _ = body.flow_control().release_capacity(b.len());
                }
                Some(Err(e)) => break e,
                None => panic!("the stream ended as if complete after {got} bytes"),
            }
        };
        assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "{err}");
        assert!(got < 1_000_000);
        assert_eq!(st.next_seen(), Seen::ResponseCut("length"));
        // The connection still serves.
        let (resp, _) = client.send_request(get("/rq/fast"), true).unwrap();
        let resp = bounded(resp).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut all = Vec::new();
        while let Some(b) = bounded(body.data()).await {
            all.extend_from_slice(&b.unwrap());
        }
        assert_eq!(all, b"ok");
    });
    assert_eq!(st.metric("waypoint_upstream_timeouts_total"), 1);
}

/// Idle tunnels hold no upstream stream: ten tunnels from one client, each having made
/// one keep-alive request and left open (idle), were all served over one upstream HBONE
/// stream, which went back to the worker's pool after each response (the issue's
/// "upstream stream kept per idle tunnel").
#[test]
fn idle_tunnels_share_the_workers_kept_upstream_stream() {
    let st = setup();
    block_on(async {
        let mut open = Vec::new();
        for i in 0..10 {
            let (c, mut s) = st.tunnel().await;
            let req = format!("GET /fast/{i} HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
            s.write_all(Bytes::from(req), false).await.unwrap();
            let buf = read_through(&mut s, b"\r\n\r\nok").await;
            assert!(buf.starts_with(b"HTTP/1.1 200 "), "{buf:?}");
            open.push((c, s));
        }
        assert_eq!(st.metric("waypoint_tunnels_total"), 10);
        assert_eq!(st.metric("waypoint_upstream_streams_total"), 1);
    });
}
