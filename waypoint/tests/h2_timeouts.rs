//! `stream_idle_timeout` and the waypoint's own answers for HTTP/2 requests to an HTTP/2
//! upstream (DestinationRule `useClientProtocol`): a hung upstream gets the client a `504`
//! (no route timeout set: the idle bound is what ends it), a response that stops midway is
//! reset, a request body that stops coming is answered `408` and counted, and a client
//! that resets its stream during a streamed upload is a cancellation, not an upstream
//! error. The `waypoint` binary, a stand-in destination ztunnel and an HTTP/2 backend.
//!
//! No timing thresholds: the idle timeout is short (1 s) and the tests wait for the events
//! it causes with generous bounds; without it those events never come.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{
    block_on, bounded, h2_in_tunnel, h2_server, h2_stalled_post, serve_async, EchoBinary,
};
use hbone::client::Client;

const HOST: &str = "echo.app.svc.cluster.local";

/// `echo` is reached over HTTP/2 by HTTP/2 clients.
const USE_CLIENT_PROTOCOL: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: app}\nspec:\n  host: echo\n  trafficPolicy:\n    connectionPool:\n      http: {useClientProtocol: true}\n";

/// An HTTP/2 backend: `/hang` is never answered; `/stall` gets its head and 2 bytes, then
/// nothing; `/upload` reads its body (bytes counted in `uploaded`) and never answers;
/// anything else `200 ok`.
fn h2_backend(ip: std::net::Ipv4Addr, uploaded: Arc<AtomicU64>) -> SocketAddr {
    serve_async(ip, move |tcp| {
        let uploaded = uploaded.clone();
        async move {
            let Some(mut conn) = h2_server(tcp).await else {
                return;
            };
            let mut held = Vec::new();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                match req.uri().path() {
                    "/hang" => held.push((respond, None)),
                    "/stall" => {
                        let ok = http::Response::builder().status(200).body(()).unwrap();
                        if let Ok(mut tx) = respond.send_response(ok, false) {
                            let _ = tx.send_data(Bytes::from_static(b"ok"), false);
                            held.push((respond, Some(tx)));
                        }
                    }
                    "/upload" => {
                        let uploaded = uploaded.clone();
                        let mut body = req.into_body();
                        monoio::spawn(async move {
                            let _held = respond;
                            while let Some(Ok(b)) = body.data().await {
                                let _ = body.flow_control().release_capacity(b.len());
                                uploaded.fetch_add(b.len() as u64, Ordering::SeqCst);
                            }
                        });
                    }
                    _ => {
                        let ok = http::Response::builder().status(200).body(()).unwrap();
                        if let Ok(mut tx) = respond.send_response(ok, false) {
                            let _ = tx.send_data(Bytes::from_static(b"ok"), true);
                        }
                    }
                }
            }
        }
    })
}

struct Setup {
    wp: EchoBinary,
    uploaded: Arc<AtomicU64>,
}

fn setup(name: &str) -> Setup {
    let uploaded = Arc::new(AtomicU64::new(0));
    let u = uploaded.clone();
    let wp = EchoBinary::start(
        19,
        &format!("h2-timeouts-{name}"),
        |ip| h2_backend(ip, u),
        |model, settings| {
            let s = settings.replace(
                "runtime:",
                "  stream_idle_timeout: 1s\n  idle_timeout: 60s\nruntime:",
            );
            format!("{model}---\n{USE_CLIENT_PROTOCOL}---\n{s}")
        },
    );
    Setup { wp, uploaded }
}

impl std::ops::Deref for Setup {
    type Target = EchoBinary;

    fn deref(&self) -> &EchoBinary {
        &self.wp
    }
}

impl Setup {
    /// An HTTP/2 connection to the echo service in a tunnel of its own.
    async fn h2(&self) -> (Client, h2::client::SendRequest<Bytes>) {
        let (c, s) = self.tunnel().await;
        let (send, _conn) = h2_in_tunnel(s).await;
        (c, send)
    }

    /// Wait until counter `name` is `want` (it only grows).
    async fn metric_reaches(&self, name: &str, want: u64) {
        bounded(async {
            while self.metric(name) < want {
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(self.metric(name), want, "{name}");
    }
}

/// No route timeout: a hung HTTP/2 upstream gets the client `504` after
/// `stream_idle_timeout` (counted as an upstream timeout), a response whose body stops
/// is reset after it, and the connection still serves.
#[test]
fn h2_upstream_hung_gets_504_and_a_stalled_response_is_reset_after_the_stream_idle_timeout() {
    let st = setup("hung");
    block_on(async {
        let (_c, send) = st.h2().await;
        let (status, _) = bounded(common::h2_get_from(&send, HOST, "/")).await;
        assert_eq!(status, 200);
        let (status, _) = bounded(common::h2_get_from(&send, HOST, "/hang")).await;
        assert_eq!(status, 504);
        assert_eq!(st.metric("waypoint_upstream_timeouts_total"), 1);
        // The head and 2 bytes, then nothing: reset, never ended as if complete.
        common::h2_get_reset_after(&send, HOST, "/stall", b"ok").await;
        let (status, body) = bounded(common::h2_get_from(&send, HOST, "/")).await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    });
}

/// A request body that stops coming (to an HTTP/2 upstream) is answered `408` and counted
/// in `waypoint_request_timeouts`.
#[test]
fn h2_a_stalled_body_gets_408_counted_as_a_request_timeout() {
    let st = setup("408");
    block_on(async {
        let (_c, send) = st.h2().await;
        assert_eq!(st.metric("waypoint_request_timeouts_total"), 0);
        let (status, _body) = h2_stalled_post(&send, HOST).await;
        assert_eq!(status, 408);
        assert_eq!(st.metric("waypoint_request_timeouts_total"), 1);
    });
}

/// A client that resets its stream during a streamed upload (past the replay buffer)
/// left: counted as a cancellation, never as the endpoint's failure.
#[test]
fn h2_a_client_reset_during_an_upload_is_a_cancellation_not_an_upstream_error() {
    let st = setup("upload");
    block_on(async {
        let (_c, send) = st.h2().await;
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{HOST}/upload"))
            .body(())
            .unwrap();
        let (_resp, mut body) = send.clone().send_request(req, false).unwrap();
        // Past the replay buffer (64 KiB): the body is streamed upstream as it comes.
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        let mut queued = 0u64;
        while queued < 128 * 1024 {
            body.reserve_capacity(chunk.len());
            match bounded(std::future::poll_fn(|cx| body.poll_capacity(cx))).await {
                Some(Ok(n)) if n > 0 => {
                    let n = n.min(chunk.len());
                    body.send_data(chunk.slice(..n), false).unwrap();
                    queued += n as u64;
                }
                Some(Ok(_)) => {}
                other => panic!("upload failed: {other:?}"),
            }
        }
        // All of it upstream: the waypoint waits on the client's next piece when the
        // reset comes.
        bounded(async {
            while st.uploaded.load(Ordering::SeqCst) < queued {
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        body.send_reset(h2::Reason::CANCEL);
        st.metric_reaches("waypoint_cancelled_requests_total", 1)
            .await;
        assert_eq!(st.metric("waypoint_upstream_errors_total"), 0);
        let (status, _) = bounded(common::h2_get_from(&send, HOST, "/")).await;
        assert_eq!(status, 200);
    });
}
