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
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{
    bind_node_ztunnel, block_on, connect, echo_model, id, ip, next_request, response_head,
    serve_threads, settings, stand_in_ztunnel, test_dir, Proc,
};
use hbone::ca::{CertSource, SigningCa, WorkloadCert};
use hbone::client::Client;
use hbone::stream::H2Stream;
use hbone::wire::ConnectRequest;

/// How long any awaited event may take before the test fails.
const EVENT_BOUND: Duration = Duration::from_secs(60);

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

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Setup {
    _wp: Proc,
    _dir: TempDir,
    addr: SocketAddr,
    stats: SocketAddr,
    me: WorkloadCert,
    hang_closed: mpsc::Receiver<()>,
    /// `/hang` requests the backend has seen.
    hangs: Arc<AtomicUsize>,
}

/// A waypoint whose `waypoint:` section has `extra` lines too.
fn setup(name: &str, extra: &str) -> Setup {
    let (net, zl) = bind_node_ztunnel(17);
    let (tx, hang_closed) = mpsc::channel();
    let hangs = Arc::new(AtomicUsize::new(0));
    let pod = backend(ip(net, 2), tx, hangs.clone());
    let d = TempDir(test_dir(&format!("timeouts-{name}-{net}")));
    let ca = SigningCa::builtin(&d.0.join("ca"), "cluster.local").unwrap();
    let now = SystemTime::now();
    let _zt = stand_in_ztunnel(zl, &ca.issue(&id("app", "echo"), now).unwrap());
    let s = settings(&d.0.join("ca"), true).replace("runtime:", &format!("{extra}runtime:"));
    let cfg = format!("{}---\n{s}", echo_model(ip(net, 1), pod));
    std::fs::write(d.0.join("waypoint.yaml"), cfg).unwrap();
    let wp = Proc::start(&d.0.join("waypoint.yaml"), &[], Stdio::inherit());
    let (addr, stats) = (wp.addr("hbone"), wp.addr("stats"));
    Setup {
        _wp: wp,
        _dir: d,
        addr,
        stats,
        me: ca.issue(&id("app", "client"), now).unwrap(),
        hang_closed,
        hangs,
    }
}

impl Setup {
    /// A tunnel to the echo service (on its own connection).
    async fn tunnel(&self) -> (Client, H2Stream) {
        let c = connect(self.addr, &self.me, id("app", "waypoint"))
            .await
            .unwrap();
        let s = c
            .open(&ConnectRequest::new("10.96.0.1:80".parse().unwrap()))
            .await
            .unwrap();
        (c, s)
    }

    /// A counter of the waypoint's `/stats/prometheus` (the first line that starts with
    /// `name`).
    fn metric(&self, name: &str) -> u64 {
        let mut c = TcpStream::connect(self.stats).unwrap();
        c.write_all(b"GET /stats/prometheus HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s.lines()
            .find_map(|l| {
                let (n, v) = l.rsplit_once(' ')?;
                (n == name).then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("{name} not in the stats:\n{s}"))
    }

    /// The sum of the `istio_requests_total` series whose labels have all of `labels`.
    fn requests(&self, labels: &[&str]) -> u64 {
        let mut c = TcpStream::connect(self.stats).unwrap();
        c.write_all(b"GET /stats/prometheus HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .map(|l| l.rsplit_once(' ').unwrap().1.trim().parse::<u64>().unwrap())
            .sum()
    }
}

/// `f`, which must finish within [`EVENT_BOUND`].
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    match runtime::worker::race(f, monoio::time::sleep(EVENT_BOUND)).await {
        runtime::worker::Either::Left(x) => x,
        runtime::worker::Either::Right(()) => panic!("nothing happened within {EVENT_BOUND:?}"),
    }
}

/// How a tunnel's stream ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Reset,
    Closed,
}

/// Everything until the stream ends, and how it ended.
async fn read_all(s: &mut H2Stream) -> (Vec<u8>, Ended) {
    let mut buf = Vec::new();
    let ended = loop {
        match bounded(s.read()).await {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            Some(Err(_)) => break Ended::Reset,
            None => break Ended::Closed,
        }
    };
    (buf, ended)
}

fn status(buf: &[u8]) -> u16 {
    response_head(buf)
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)))
        .status
}

/// A client that sends part of a request head and then nothing (slowloris) gets `408`
/// once `request_headers_timeout` passed, and its tunnel is closed; so is one whose
/// request body stops (`stream_idle_timeout`).
#[test]
fn a_partial_request_head_or_a_stalled_body_gets_408_and_the_tunnel_closes() {
    let st = setup("partial", SHORT);
    block_on(async {
        let (_c, mut s) = st.tunnel().await;
        s.write_all(Bytes::from_static(b"GET / HTTP/1.1\r\n"), false)
            .await
            .unwrap();
        let (buf, ended) = read_all(&mut s).await;
        assert_eq!(status(&buf), 408, "{}", String::from_utf8_lossy(&buf));
        assert_eq!(ended, Ended::Closed);

        let (_c, mut s) = st.tunnel().await;
        let req = format!("POST / HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 10\r\n\r\nabc");
        s.write_all(Bytes::from(req), false).await.unwrap();
        let (buf, ended) = read_all(&mut s).await;
        assert_eq!(status(&buf), 408, "{}", String::from_utf8_lossy(&buf));
        assert!(String::from_utf8_lossy(&buf).ends_with("stream timeout"));
        assert_eq!(ended, Ended::Closed);
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
        s.write_all(Bytes::from(req), false).await.unwrap();
        let (buf, ended) = read_all(&mut s).await;
        assert_eq!(status(&buf), 504, "{}", String::from_utf8_lossy(&buf));
        assert_eq!(ended, Ended::Closed);
    });
    st.hang_closed
        .recv_timeout(EVENT_BOUND)
        .expect("the hung backend connection was not closed");
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
        let mut buf = Vec::new();
        while !buf.ends_with(b"\r\n\r\nok") {
            match bounded(s.read()).await {
                Some(Ok(b)) => buf.extend_from_slice(&b),
                other => panic!("{other:?} after {:?}", String::from_utf8_lossy(&buf)),
            }
        }
        assert_eq!(status(&buf), 200);
        // At once (well within the kept stream's reuse bound for unsafe methods).
        let req = format!(
            "POST /hang HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc"
        );
        s.write_all(Bytes::from(req), false).await.unwrap();
        let (buf, ended) = read_all(&mut s).await;
        assert_eq!(status(&buf), 504, "{}", String::from_utf8_lossy(&buf));
        assert_eq!(ended, Ended::Closed);
    });
    st.hang_closed
        .recv_timeout(EVENT_BOUND)
        .expect("the hung backend connection was not closed");
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
        s.write_all(Bytes::from(req), false).await.unwrap();
        let (buf, ended) = read_all(&mut s).await;
        let text = String::from_utf8_lossy(&buf);
        assert_eq!(status(&buf), 200, "{text}");
        assert!(
            text.ends_with("\r\n\r\nok"),
            "one whole response only: {text}"
        );
        assert_eq!(ended, Ended::Closed);

        // Never a byte: closed too (detection waits no longer than `idle_timeout`).
        let (_c, mut s) = st.tunnel().await;
        let (buf, ended) = read_all(&mut s).await;
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
        let (buf, _) = read_all(&mut s).await;
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
        let mut buf = Vec::new();
        while !buf.ends_with(b"\r\n\r\nok") {
            match bounded(s.read()).await {
                Some(Ok(b)) => buf.extend_from_slice(&b),
                other => panic!("{other:?} after {:?}", String::from_utf8_lossy(&buf)),
            }
        }
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
        let io = waypoint::inner::StreamIo::new(s, Bytes::new());
        let (send, conn) = h2::client::handshake(io).await.unwrap();
        let conn = monoio::spawn(conn);
        let (status, _) = bounded(common::h2_get_from(&send, HOST, "/hang")).await;
        assert_eq!(status, 504);
        let (status, body) = bounded(common::h2_get_from(&send, HOST, "/")).await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        // A request body that stops coming: 408.
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{HOST}/"))
            .header("content-length", "10")
            .body(())
            .unwrap();
        let (resp, mut body) = send.clone().send_request(req, false).unwrap();
        body.send_data(Bytes::from_static(b"abc"), false).unwrap();
        let (status, _) = bounded(common::h2_response(resp)).await;
        assert_eq!(status, 408);
        // Nothing more in flight: the waypoint ends the connection.
        let _ = bounded(conn).await;
    });
    st.hang_closed
        .recv_timeout(EVENT_BOUND)
        .expect("the hung backend connection was not closed");
}
