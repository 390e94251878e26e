//! The waypoint's own bounds on a tunnel's waits, from the settings document (Envoy's
//! `request_headers_timeout`, `stream_idle_timeout` and HCM `idle_timeout`; Istio leaves
//! route timeouts unset, so these are what end a hung request), and protocol detection
//! without a timeout (Istio's `protocolDetectionTimeout: 0s`). The `waypoint` binary, a
//! stand-in destination ztunnel and a plain TCP backend.
//!
//! No timing thresholds: the timeouts under test are short (1–2 s) and the tests wait for
//! the events they cause (a response, the stream's end, a counter) with generous bounds;
//! without the timeouts those events never come.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use common::{
    block_on, bounded, h2_in_tunnel, h2_stalled_post, next_request, read_through, read_to_end,
    response_head, serve_threads, EchoBinary, Ended, EVENT_BOUND,
};
use hbone::stream::H2Stream;

const HOST: &str = "echo.app.svc.cluster.local";

/// The short bounds the tests run under.
const SHORT: &str =
    "  stream_idle_timeout: 1s\n  request_headers_timeout: 1s\n  idle_timeout: 2s\n";

/// A backend: `/hang` is read and never answered (the connection is held until the
/// waypoint closes it, reported on the channel; each one counted in `hangs`); anything
/// else `200 ok`, keep-alive.
fn backend(
    ip: std::net::Ipv4Addr,
    closed: mpsc::Sender<()>,
    hangs: Arc<AtomicUsize>,
) -> SocketAddr {
    serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            if req.path == "/hang" {
                hangs.fetch_add(1, Ordering::SeqCst);
                let mut b = [0u8; 1024];
                while matches!(c.read(&mut b), Ok(n) if n > 0) {}
                let _ = closed.send(());
                return;
            }
            if c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .is_err()
            {
                return;
            }
        }
    })
}

struct Setup {
    wp: EchoBinary,
    hang_closed: mpsc::Receiver<()>,
    /// `/hang` requests the backend has seen.
    hangs: Arc<AtomicUsize>,
}

/// A waypoint whose `waypoint:` section has `extra` lines too.
fn setup(name: &str, extra: &str) -> Setup {
    let (tx, hang_closed) = mpsc::channel();
    let hangs = Arc::new(AtomicUsize::new(0));
    let h = hangs.clone();
    let wp = EchoBinary::start(
        17,
        &format!("timeouts-{name}"),
        |ip| backend(ip, tx, h),
        |model, settings| {
            let s = settings.replace("runtime:", &format!("{extra}runtime:"));
            format!("{model}---\n{s}")
        },
    );
    Setup {
        wp,
        hang_closed,
        hangs,
    }
}

impl std::ops::Deref for Setup {
    type Target = EchoBinary;

    fn deref(&self) -> &EchoBinary {
        &self.wp
    }
}

fn status(buf: &[u8]) -> u16 {
    response_head(buf)
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)))
        .status
}

/// Send `req` on `s` and read until the stream ends: the response must be `want` and the
/// stream must end in order. Everything read.
async fn answered_and_closed(s: &mut H2Stream, req: Bytes, want: u16) -> Vec<u8> {
    s.write_all(req, false).await.unwrap();
    let (buf, ended) = read_to_end(s).await;
    assert_eq!(status(&buf), want, "{}", String::from_utf8_lossy(&buf));
    assert_eq!(ended, Ended::Closed);
    buf
}

impl Setup {
    /// Wait until the waypoint closed the hung backend's connection.
    fn hung_connection_closed(&self) {
        self.hang_closed
            .recv_timeout(EVENT_BOUND)
            .expect("the hung backend connection was not closed");
    }
}

/// A client that sends part of a request head and then nothing (slowloris) gets `408`
/// once `request_headers_timeout` passed, and its tunnel is closed; so is one whose
/// request body stops (`stream_idle_timeout`).
#[test]
fn a_partial_request_head_or_a_stalled_body_gets_408_and_the_tunnel_closes() {
    let st = setup("partial", SHORT);
    block_on(async {
        let (_c, mut s) = st.tunnel().await;
        answered_and_closed(&mut s, Bytes::from_static(b"GET / HTTP/1.1\r\n"), 408).await;

        let (_c, mut s) = st.tunnel().await;
        let req = format!("POST / HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 10\r\n\r\nabc");
        let buf = answered_and_closed(&mut s, Bytes::from(req), 408).await;
        assert!(String::from_utf8_lossy(&buf).ends_with("stream timeout"));
    });
    assert_eq!(st.metric("waypoint_request_timeouts_total"), 2);
    // Both are requests the waypoint answered: in the request metrics (the stalled body
    // one flagged `SI`, Envoy's stream idle timeout).
    assert_eq!(st.requests(&["response_code=\"408\""]), 2);
    assert_eq!(
        st.requests(&["response_code=\"408\"", "response_flags=\"SI\""]),
        1
    );
}

/// A backend that accepts a request and never answers: once `stream_idle_timeout`
/// passed with no byte either way the client gets `504` and the backend's connection is
/// closed (without the bound both would wait for ever).
#[test]
fn a_hung_backend_gets_the_client_a_504_after_the_stream_idle_timeout() {
    let st = setup("hung", SHORT);
    block_on(async {
        let (_c, mut s) = st.tunnel().await;
        let req = format!("GET /hang HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
        answered_and_closed(&mut s, Bytes::from(req), 504).await;
    });
    st.hung_connection_closed();
    assert_eq!(st.metric("waypoint_upstream_timeouts_total"), 1);
}

/// A POST on a kept upstream stream to a backend that never answers: the try cut by
/// `stream_idle_timeout` is answered `504` and counted as a timeout, and the request is
/// not sent again on a new stream (the backend may have run it; a kept stream "found
/// closed" is one that closed, not one that stayed silent).
#[test]
fn a_post_cut_by_the_stream_idle_timeout_on_a_kept_stream_is_sent_once() {
    let st = setup("once", SHORT);
    block_on(async {
        let (_c, mut s) = st.tunnel().await;
        let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
        s.write_all(Bytes::from(req), false).await.unwrap();
        let buf = read_through(&mut s, b"\r\n\r\nok").await;
        assert_eq!(status(&buf), 200);
        // At once (well within the kept stream's reuse bound for unsafe methods).
        let req = format!(
            "POST /hang HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc"
        );
        answered_and_closed(&mut s, Bytes::from(req), 504).await;
    });
    st.hung_connection_closed();
    assert_eq!(
        st.hangs.load(Ordering::SeqCst),
        1,
        "the POST was sent again"
    );
    assert_eq!(st.metric("waypoint_upstream_timeouts_total"), 1);
}

/// A keep-alive tunnel with no request in flight is closed after `idle_timeout` (its
/// stream ends in order after a complete exchange); one that is never used at all too.
#[test]
fn an_idle_keep_alive_tunnel_is_closed_after_the_idle_timeout() {
    let st = setup("idle", SHORT);
    block_on(async {
        let (_c, mut s) = st.tunnel().await;
        let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
        let buf = answered_and_closed(&mut s, Bytes::from(req), 200).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.ends_with("\r\n\r\nok"),
            "one whole response only: {text}"
        );

        // Never a byte: closed too (detection waits no longer than `idle_timeout`).
        let (_c, mut s) = st.tunnel().await;
        let (buf, ended) = read_to_end(&mut s).await;
        assert!(buf.is_empty());
        assert_eq!(ended, Ended::Closed);
    });
}

/// A pre-connected HTTP/1.1 client whose first request comes late (6 s here, past the
/// 5 s after which the waypoint used to take a silent client for opaque TCP) is served
/// as HTTP: detection waits for the first bytes (Istio's `protocolDetectionTimeout` is
/// off by default). With `protocol_detection_timeout` set, a silent client's tunnel is
/// taken for opaque TCP (a server-first protocol) once it passed.
#[test]
fn r15_a_late_first_request_is_still_http_unless_a_detection_timeout_is_set() {
    let st = setup("late", "");
    block_on(async {
        let (_c, mut s) = st.tunnel().await;
        monoio::time::sleep(Duration::from_secs(6)).await;
        let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
        s.write_all(Bytes::from(req), false).await.unwrap();
        let (buf, _) = read_to_end(&mut s).await;
        assert_eq!(status(&buf), 200, "{}", String::from_utf8_lossy(&buf));
    });
    let by = |p: &str| format!("waypoint_tunnels_by_protocol_total{{protocol=\"{p}\"}}");
    assert_eq!(st.metric(&by("http1")), 1);
    assert_eq!(st.metric(&by("tcp")), 0);
    drop(st);

    let st = setup("detect", "  protocol_detection_timeout: 1s\n");
    block_on(async {
        let (_c, mut s) = st.tunnel().await;
        // Wait for the waypoint to decide (an event, not a sleep past the timeout).
        let mut waited = Duration::ZERO;
        while st.metric(&by("tcp")) == 0 {
            assert!(
                waited < EVENT_BOUND,
                "the silent tunnel was never taken for TCP"
            );
            monoio::time::sleep(Duration::from_millis(100)).await;
            waited += Duration::from_millis(100);
        }
        let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
        s.write_all(Bytes::from(req), false).await.unwrap();
        // Passed on as bytes: the backend's own answer (it keeps the connection open, so
        // only the response is awaited).
        let buf = read_through(&mut s, b"\r\n\r\nok").await;
        assert_eq!(status(&buf), 200);
    });
    assert_eq!(st.metric(&by("http1")), 0);
}

/// HTTP/2 in the tunnel: a request to a backend that never answers gets `504` after the
/// stream idle timeout, one whose body stops coming `408`, and the connection, once it has no stream in flight for
/// `idle_timeout`, is closed by the waypoint (GOAWAY; the client's connection ends).
#[test]
fn h2_a_hung_request_gets_504_and_an_idle_connection_is_closed() {
    let st = setup("h2", SHORT);
    block_on(async {
        let (_c, s) = st.tunnel().await;
        let (send, conn) = h2_in_tunnel(s).await;
        let (status, _) = bounded(common::h2_get_from(&send, HOST, "/hang")).await;
        assert_eq!(status, 504);
        let (status, body) = bounded(common::h2_get_from(&send, HOST, "/")).await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        // A request body that stops coming: 408.
        let (status, _body) = h2_stalled_post(&send, HOST).await;
        assert_eq!(status, 408);
        // Nothing more in flight: the waypoint ends the connection.
        let _ = bounded(conn).await;
    });
    st.hung_connection_closed();
}

/// `waypoint_request_timeouts` counts the waypoint's own `408`s only: a backend's `408`
/// passed on, on a tunnel that then closes (the client asked to), is a response like any
/// other (in the request metrics, not in the counter), while a head that stops coming
/// still counts.
#[test]
fn an_upstream_408_is_passed_on_and_not_counted_as_the_waypoints_request_timeout() {
    let wp = EchoBinary::start(
        17,
        "timeouts-upstream-408",
        |ip| {
            serve_threads(ip, |mut c| {
                let mut buf = Vec::new();
                while next_request(&mut c, &mut buf).is_some() {
                    let resp = "HTTP/1.1 408 Request Timeout\r\ncontent-length: 4\r\n\r\nslow";
                    if c.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            })
        },
        |model, settings| {
            let s = settings.replace("runtime:", &format!("{SHORT}runtime:"));
            format!("{model}---\n{s}")
        },
    );
    block_on(async {
        let (_c, mut s) = wp.tunnel().await;
        let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
        let buf = answered_and_closed(&mut s, Bytes::from(req), 408).await;
        assert!(String::from_utf8_lossy(&buf).ends_with("slow"));
    });
    assert_eq!(wp.metric("waypoint_request_timeouts_total"), 0);
    assert_eq!(wp.requests(&["response_code=\"408\""]), 1);
    block_on(async {
        let (_c, mut s) = wp.tunnel().await;
        answered_and_closed(&mut s, Bytes::from_static(b"GET / HTTP/1.1\r\n"), 408).await;
    });
    assert_eq!(wp.metric("waypoint_request_timeouts_total"), 1);
    assert_eq!(wp.requests(&["response_code=\"408\""]), 2);
}

/// `waypoint_bad_requests` counts the requests the waypoint itself refuses as malformed:
/// a backend's `400` passed on, on a tunnel that then closes (the client asked to), is a
/// response like any other, while a request with two `Host` fields still counts.
#[test]
fn an_upstream_400_is_passed_on_and_not_counted_as_a_bad_request() {
    let wp = EchoBinary::start(
        18,
        "upstream-400",
        |ip| {
            serve_threads(ip, |mut c| {
                let mut buf = Vec::new();
                while next_request(&mut c, &mut buf).is_some() {
                    let resp = "HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nbad";
                    if c.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            })
        },
        |model, settings| format!("{model}---\n{settings}"),
    );
    block_on(async {
        let (_c, mut s) = wp.tunnel().await;
        let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
        let buf = answered_and_closed(&mut s, Bytes::from(req), 400).await;
        assert!(String::from_utf8_lossy(&buf).ends_with("bad"));
    });
    assert_eq!(wp.metric("waypoint_bad_requests_total"), 0);
    assert_eq!(wp.requests(&["response_code=\"400\""]), 1);
    block_on(async {
        let (_c, mut s) = wp.tunnel().await;
        let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nhost: {HOST}\r\n\r\n");
        answered_and_closed(&mut s, Bytes::from(req), 400).await;
    });
    assert_eq!(wp.metric("waypoint_bad_requests_total"), 1);
}
