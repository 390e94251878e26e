//! The worker's pool of idle upstream HBONE streams against backends that close idle
//! keep-alive connections: a kept stream the backend ended (END_STREAM through the
//! destination's ztunnel), or one holding bytes the backend wrote unasked, is never handed
//! to a request, whatever the request (a GET, a streamed upload that cannot be replayed).
//!
//! The destination ztunnel here reports each stream whose backend side ended once it has
//! queued the END_STREAM; a probe request on another client's stream, which shares the
//! waypoint's HBONE connection to that ztunnel, then comes back after it: by then the
//! waypoint has seen the END_STREAM (frames of one connection are handled in order), so
//! the tests wait on events, not on time.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use common::{
    bind_node_ztunnel, block_on, connect_target, echo_model, get, id, ip, next_request,
    ok_response, read_response, serve_hbone, test_ca, Waypoint,
};
use hbone::ca::{CertSource, WorkloadCert};
use hbone::server::Inbound;
use hbone::stream::H2Stream;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use waypoint::service;

/// What a backend does once it answered a connection's first request.
#[derive(Clone, Copy)]
enum AfterFirst {
    /// Keep serving the connection (keep-alive), and report its close as `<closed>`.
    Stay,
    /// Close the connection (an idle keep-alive timeout that already ran out).
    Close,
    /// Write a `408 Request Timeout` nobody asked for, then close (as nginx, Apache httpd
    /// and Node.js do on an idle keep-alive timeout); after `/first`, only once told to
    /// (the response delivered, its stream kept idle).
    Unsolicited408,
}

/// An HTTP/1.1 backend answering `200 <path> <request body length>` (keep-alive framing,
/// no `Connection: close`), then doing `after` on the connection. Requests to `/pair…`
/// are answered only once two of them arrived (two upstream streams at once).
fn backend(
    ip: Ipv4Addr,
    after: AfterFirst,
    go: Arc<Barrier>,
) -> (SocketAddr, mpsc::Receiver<String>) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, seen) = mpsc::channel();
    let pair = Arc::new(Barrier::new(2));
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let (tx, pair, go) = (tx.clone(), pair.clone(), go.clone());
            std::thread::spawn(move || serve(c, after, &tx, &pair, &go));
        }
    });
    (addr, seen)
}

fn serve(
    mut c: TcpStream,
    after: AfterFirst,
    seen: &mpsc::Sender<String>,
    pair: &Barrier,
    go: &Barrier,
) {
    let mut buf = Vec::new();
    let Some(req) = next_request(&mut c, &mut buf) else {
        return;
    };
    if let AfterFirst::Stay = after {
        let _ = seen.send(req.path.clone());
        let _ = c.write_all(ok_response(&format!("{} 0", req.path)).as_bytes());
        while let Some(req) = next_request(&mut c, &mut buf) {
            let _ = seen.send(req.path.clone());
            let _ = c.write_all(ok_response(&format!("{} 0", req.path)).as_bytes());
        }
        let _ = seen.send("<closed>".into());
        return;
    }
    let len = req.content_length();
    let mut chunk = vec![0u8; 64 * 1024];
    while buf.len() < len {
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    if req.path.starts_with("/pair") {
        pair.wait();
    }
    let _ = seen.send(req.path.clone());
    let _ = c.write_all(ok_response(&format!("{} {len}", req.path)).as_bytes());
    if let AfterFirst::Unsolicited408 = after {
        if req.path == "/first" {
            go.wait();
        }
        let _ = c.write_all(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
    }
    // Closed when dropped.
}

/// The destination node's ztunnel: bridges each CONNECT stream to its target and sends
/// the target's close as END_STREAM, then reports the target on `ended`.
fn ztunnel(listener: TcpListener, cert: &WorkloadCert, ended: mpsc::Sender<SocketAddr>) {
    serve_hbone(listener, cert, move |inb: Inbound| {
        bridge(inb, ended.clone())
    });
}

async fn bridge(inb: Inbound, ended: mpsc::Sender<SocketAddr>) {
    let target = inb.request.target;
    let Some((tcp, s)) = connect_target(inb).await else {
        return;
    };
    let H2Stream {
        mut send, mut recv, ..
    } = s;
    let (mut tr, mut tw) = tcp.into_split();
    monoio::spawn(async move {
        while let Some(Ok(b)) = recv.data().await {
            let n = b.len();
            let (r, _) = tw.write_all(b).await;
            if r.is_err() {
                return;
            }
            let _ = recv.flow_control().release_capacity(n);
        }
        // The stream ended or was reset: the target sees its connection close.
        let _ = tw.shutdown().await;
    });
    loop {
        let (r, buf) = tr.read(BytesMut::with_capacity(16 * 1024)).await;
        match r {
            Ok(n) if n > 0 => {
                send.reserve_capacity(n);
                if send.send_data(buf.freeze(), false).is_err() {
                    return;
                }
            }
            _ => break,
        }
    }
    if send.send_data(Bytes::new(), true).is_ok() {
        let _ = ended.send(target);
    }
}

struct Mesh {
    wp: Waypoint,
    /// Requests the `echo` backend answered, by path.
    seen: mpsc::Receiver<String>,
    /// Backend connections whose close went out as END_STREAM.
    ended: mpsc::Receiver<SocketAddr>,
    /// Lets the backend write its unsolicited `408` after `/first`.
    go: Arc<Barrier>,
}

/// The requests' client.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);
/// The probe's client (its own kept streams).
const PROBE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 8);

impl Mesh {
    fn start(after: AfterFirst) -> Mesh {
        let (net, zl) = bind_node_ztunnel(5);
        let ca = test_ca();
        let (ended_tx, ended) = mpsc::channel();
        ztunnel(
            zl,
            &ca.issue(&id("app", "echo"), SystemTime::now()).unwrap(),
            ended_tx,
        );
        let go = Arc::new(Barrier::new(2));
        let (echo, seen) = backend(ip(net, 2), after, go.clone());
        let text = echo_model(ip(net, 1), echo);
        let wp = Waypoint::start(&ca, &text, &format!("waypoint-pooled-{net}.yaml"));
        Mesh {
            wp,
            seen,
            ended,
            go,
        }
    }

    fn counters(&self) -> &service::Counters {
        self.wp.counters()
    }

    /// A tunnel to the `echo` Service through the waypoint, for client `from`.
    async fn tunnel(&self, from: Ipv4Addr) -> (hbone::client::Client, H2Stream) {
        self.wp.tunnel("10.96.0.1:80", from).await
    }

    /// Wait until `n` more backend connections ended (their END_STREAM queued by the
    /// ztunnel).
    fn wait_ended(&self, n: usize) {
        for _ in 0..n {
            self.ended
                .recv_timeout(Duration::from_secs(30))
                .expect("a backend connection's end reached the ztunnel");
        }
    }

    /// A request from another client over the same HBONE connection of the waypoint to
    /// the ztunnel: when its response is back, the waypoint has handled every END_STREAM
    /// the ztunnel sent before (and the probe's own backend connection ends too).
    async fn probe(&self) {
        let (_c, mut s) = self.tunnel(PROBE).await;
        let r = ask(&mut s, &mut Vec::new(), get("/probe", ECHO)).await;
        assert_eq!((r.status, r.text()), (200, "/probe 0".to_string()));
    }

    /// The requests the backend answered, probes left out.
    fn answered(&self) -> Vec<String> {
        self.seen.try_iter().filter(|p| p != "/probe").collect()
    }
}

const ECHO: &str = "echo.app.svc.cluster.local";

async fn ask(s: &mut H2Stream, buf: &mut Vec<u8>, req: String) -> common::Response {
    s.write_all(Bytes::from(req), false).await.unwrap();
    read_response(s, buf).await
}

/// A streamed upload: longer than the waypoint's replay buffer, so it cannot be retried.
fn upload(len: usize) -> String {
    format!(
        "POST /upload HTTP/1.1\r\nhost: {ECHO}\r\ncontent-length: {len}\r\n\r\n{}",
        "u".repeat(len)
    )
}

#[test]
fn r17_kept_streams_the_backend_closed_are_skipped_for_a_get_and_a_streamed_upload() {
    let m = Mesh::start(AfterFirst::Close);
    block_on(async {
        // Two requests at once from one client: two upstream streams, both kept, both
        // then closed by the backend.
        let (_c1, mut s1) = m.tunnel(CLIENT).await;
        let (_c2, mut s2) = m.tunnel(CLIENT).await;
        let (mut b1, mut b2) = (Vec::new(), Vec::new());
        s1.write_all(Bytes::from(get("/pair1", ECHO)), false)
            .await
            .unwrap();
        s2.write_all(Bytes::from(get("/pair2", ECHO)), false)
            .await
            .unwrap();
        let r1 = read_response(&mut s1, &mut b1).await;
        let r2 = read_response(&mut s2, &mut b2).await;
        assert_eq!((r1.status, r2.status), (200, 200));
        m.wait_ended(2);
        m.probe().await;
        m.wait_ended(1);

        // A GET finds only closed kept streams: it goes on a new one.
        let r = ask(&mut s1, &mut b1, get("/after", ECHO)).await;
        assert_eq!((r.status, r.text()), (200, "/after 0".to_string()));
        m.wait_ended(1);
        m.probe().await;
        m.wait_ended(1);

        // A streamed upload (never retried) too.
        let len = waypoint::http1::REPLAY_BUFFER + 4096;
        let r = ask(&mut s1, &mut b1, upload(len)).await;
        assert_eq!((r.status, r.text()), (200, format!("/upload {len}")));
    });
    let seen = m.answered();
    let mut pair: Vec<String> = seen[..2].to_vec();
    pair.sort();
    assert_eq!(pair, ["/pair1", "/pair2"]);
    assert_eq!(seen[2..], ["/after", "/upload"]);
    let c = m.counters();
    assert_eq!(c.upstream_errors.load(Ordering::Relaxed), 0);
    assert_eq!(c.streamed_bodies.load(Ordering::Relaxed), 1);
}

#[test]
fn r17_a_408_the_backend_wrote_before_closing_is_not_the_next_response() {
    let m = Mesh::start(AfterFirst::Unsolicited408);
    block_on(async {
        let (_c, mut s) = m.tunnel(CLIENT).await;
        let mut buf = Vec::new();
        let r = ask(&mut s, &mut buf, get("/first", ECHO)).await;
        assert_eq!((r.status, r.text()), (200, "/first 0".to_string()));
        // The response came whole: its stream is back in the pool, idle, when the 408
        // comes.
        m.go.wait();
        m.wait_ended(1);
        m.probe().await;
        m.wait_ended(1);
        let r = ask(&mut s, &mut buf, get("/second", ECHO)).await;
        assert_eq!((r.status, r.text()), (200, "/second 0".to_string()));
        assert!(buf.is_empty(), "nothing after the response");
    });
    assert_eq!(m.answered(), ["/first", "/second"]);
    assert_eq!(m.counters().upstream_errors.load(Ordering::Relaxed), 0);
}

/// Once the traffic stops, a kept stream is not left open: the worker's timer resets it
/// after the idle expiry (the backend then sees its connection close). Before, streams
/// were swept only when another was put back.
#[test]
fn idle_kept_streams_are_reset_by_the_workers_timer_once_traffic_stops() {
    let m = Mesh::start(AfterFirst::Stay);
    block_on(async {
        let (_c, mut s) = m.tunnel(CLIENT).await;
        let mut buf = Vec::new();
        let r = ask(&mut s, &mut buf, get("/once", ECHO)).await;
        assert_eq!((r.status, r.text()), (200, "/once 0".to_string()));
    });
    assert_eq!(m.seen.recv().unwrap(), "/once");
    // No request comes any more; the bound is generous (the expiry is a few seconds).
    let next = m.seen.recv_timeout(Duration::from_secs(60));
    assert_eq!(next.as_deref(), Ok("<closed>"));
}
