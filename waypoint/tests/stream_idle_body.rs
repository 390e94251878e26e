//! `stream_idle_timeout` (Envoy's stream idle timeout: no byte either way that long ends
//! the stream) over an HTTP/1.1 upstream's streamed response body: a backend that sends
//! the head and part of the body, then nothing. The client has its head already, so no
//! status can tell it: the tunnel (HTTP/1.1 downstream) or the request stream (HTTP/2
//! downstream: RST_STREAM, the connection goes on serving) is reset, the upstream
//! connection is closed (never reused), and the cut is counted with the upstream timeouts
//! and flagged `SI` in the request metrics. The `waypoint` binary, a stand-in destination
//! ztunnel and a plain TCP backend.
//!
//! No timing thresholds: the idle timeout is short (1 s) and the tests wait for the events
//! it causes (the stream's end, the backend connection's close) with generous bounds;
//! without the bound neither ever comes.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc;

use bytes::Bytes;
use common::{
    block_on, bounded, h2_in_tunnel, next_request, read_to_end, response_head, serve_threads,
    EchoBinary, Ended, EVENT_BOUND,
};

const HOST: &str = "echo.app.svc.cluster.local";

/// A keep-alive backend: `/stall-length` sends a head for 100 bytes and 2 of them,
/// `/stall-chunked` a chunked head and one chunk, then nothing more (the connection held
/// until the waypoint closes it, reported on `closed` with the path); anything else
/// `200 ok`.
fn backend(ip: std::net::Ipv4Addr, closed: mpsc::Sender<String>) -> SocketAddr {
    serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let part: &[u8] = match req.path.as_str() {
                "/stall-length" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nab",
                "/stall-chunked" => {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n"
                }
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            };
            if c.write_all(part).is_err() {
                return;
            }
            if req.path.starts_with("/stall") {
                let mut b = [0u8; 1024];
                while matches!(c.read(&mut b), Ok(n) if n > 0) {}
                let _ = closed.send(req.path.clone());
                return;
            }
        }
    })
}

struct Setup {
    wp: EchoBinary,
    closed: mpsc::Receiver<String>,
}

fn setup(name: &str) -> Setup {
    let (tx, closed) = mpsc::channel();
    let wp = EchoBinary::start(
        59,
        &format!("stream-idle-body-{name}"),
        |ip| backend(ip, tx),
        |model, settings| {
            let s = settings.replace(
                "runtime:",
                "  stream_idle_timeout: 1s\n  idle_timeout: 60s\nruntime:",
            );
            format!("{model}---\n{s}")
        },
    );
    Setup { wp, closed }
}

impl Setup {
    /// Wait until the waypoint closed the stalled backend connection of `path`.
    fn upstream_closed(&self, path: &str) {
        let got = self
            .closed
            .recv_timeout(EVENT_BOUND)
            .expect("the stalled backend connection was not closed");
        assert_eq!(got, path);
    }
}

/// HTTP/1.1 downstream: the response head and the part of the body that came reach the
/// client, then (no byte for `stream_idle_timeout`) its tunnel is reset — never ended as if
/// the body were complete —, the backend connection is closed, and each cut is counted
/// (`waypoint_upstream_timeouts_total`, `response_flags="SI"`). Content-Length and chunked
/// bodies alike.
#[test]
fn an_http1_response_body_that_stalls_is_cut_after_the_stream_idle_timeout() {
    let st = setup("h1");
    for (n, (path, part)) in [
        ("/stall-length", &b"\r\n\r\nab"[..]),
        ("/stall-chunked", &b"\r\n\r\n2\r\nab\r\n"[..]),
    ]
    .into_iter()
    .enumerate()
    {
        block_on(async {
            let (_c, mut s) = st.wp.tunnel().await;
            let req = format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
            s.write_all(Bytes::from(req), false).await.unwrap();
            let (buf, ended) = read_to_end(&mut s).await;
            let text = String::from_utf8_lossy(&buf);
            assert_eq!(response_head(&buf).map(|h| h.status), Some(200), "{text}");
            assert!(buf.ends_with(part), "{path}: {text}");
            assert_eq!(ended, Ended::Reset, "{path}: {text}");
        });
        st.upstream_closed(path);
        assert_eq!(
            st.wp.metric("waypoint_upstream_timeouts_total"),
            n as u64 + 1
        );
    }
    assert_eq!(
        st.wp
            .requests(&["response_code=\"200\"", "response_flags=\"SI\""]),
        2
    );
}

/// HTTP/2 downstream (HTTP/1.1 upstream): the stalled response's stream is reset after
/// `stream_idle_timeout` (RST_STREAM; the part that came was passed on), the backend
/// connection is closed, the cut counted; the tunnel's connection still serves.
#[test]
fn h2_a_response_body_from_an_http1_upstream_that_stalls_is_reset_after_the_stream_idle_timeout() {
    let st = setup("h2");
    block_on(async {
        let (_c, s) = st.wp.tunnel().await;
        let (send, _conn) = h2_in_tunnel(s).await;
        common::h2_get_reset_after(&send, HOST, "/stall-chunked", b"ab").await;
        let (status, text) = bounded(common::h2_get_from(&send, HOST, "/")).await;
        assert_eq!((status, text.as_str()), (200, "ok"));
    });
    st.upstream_closed("/stall-chunked");
    assert_eq!(st.wp.metric("waypoint_upstream_timeouts_total"), 1);
    assert_eq!(
        st.wp
            .requests(&["response_code=\"200\"", "response_flags=\"SI\""]),
        1
    );
}
