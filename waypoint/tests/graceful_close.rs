//! An upstream connection the waypoint ends after complete exchanges reaches the pod as a
//! FIN, as Envoy closes it, never as a TCP reset: an idle HTTP/2 connection closed after
//! its DestinationRule `idleTimeout` (GOAWAY, then the tunnel stream's END_STREAM), an idle
//! kept HTTP/1.1 stream swept after it, and a stream whose response said
//! `Connection: close`. The waypoint half-closes the CONNECT stream and waits for the
//! pod's end to come back; dropping the stream instead resets it (RST_STREAM), which the
//! destination ztunnel passes on as a TCP reset.
//!
//! The destination ztunnel is the stand-in of `common` with the ztunnel's bridge
//! (`hbone::stream::bridge`, as the real one's inbound path), reporting how each bridged
//! stream ended; the backends report how their connection's reading side ended: EOF
//! (read returned 0) or an error (ECONNRESET).

mod common;

use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown as NetShutdown, SocketAddr, TcpListener};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{
    app_model, bind_node_ztunnel, block_on, connect_target, get, h2_response, id, ip, next_request,
    read_response, serve_async, serve_hbone, test_ca, Waypoint,
};
use hbone::ca::{CertSource, WorkloadCert};
use hbone::server::Inbound;
use hbone::stream::H2Stream;
use runtime::forward::End;
use waypoint::service;

/// How a backend connection's reading side ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// A read returned 0: the peer's FIN.
    Eof,
    /// A read (or a write) failed (ECONNRESET for a TCP reset).
    Failed(ErrorKind),
    /// Every byte of a flood was written.
    WroteAll,
}

fn ended(r: &std::io::Result<usize>) -> Option<Ended> {
    match r {
        Ok(0) => Some(Ended::Eof),
        Ok(_) => None,
        Err(e) if e.kind() == ErrorKind::Interrupted => None,
        Err(e) => Some(Ended::Failed(e.kind())),
    }
}

/// What the backends saw: (backend, connection number, how its reading side ended).
type Report = (&'static str, usize, Ended);

/// An HTTP/1.1 backend answering `200 <path>`: keep-alive, except for `/close`, answered
/// with `Connection: close`, after which it shuts its sending side and reads until the
/// end (a lingering close, as nginx and Apache httpd do), and `/flood`, answered with
/// `Connection: close` and then [`FLOOD`] bytes nobody asked for (reporting whether they
/// all went out).
fn h1_backend(ip: Ipv4Addr, report: mpsc::Sender<Report>) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let next = AtomicUsize::new(1);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let (report, n) = (report.clone(), next.fetch_add(1, Ordering::SeqCst));
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut end = None;
                // `next_request` reads only until a whole head: at the end of the
                // connection, one more read tells how it ended.
                while let Some(req) = next_request(&mut c, &mut buf) {
                    let close = req.path == "/close" || req.path == "/flood";
                    let body = req.path.clone();
                    let head = if close { "connection: close\r\n" } else { "" };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{head}\r\n{body}",
                        body.len()
                    );
                    if c.write_all(resp.as_bytes()).is_err() {
                        break;
                    }
                    if req.path == "/flood" {
                        let chunk = vec![b'x'; 64 * 1024];
                        let mut left = FLOOD;
                        while left > 0 && end.is_none() {
                            if let Err(e) = c.write_all(&chunk) {
                                end = Some(Ended::Failed(e.kind()));
                            }
                            left -= chunk.len();
                        }
                        let _ = report.send(("h1", n, end.unwrap_or(Ended::WroteAll)));
                        return;
                    }
                    if close {
                        let _ = c.shutdown(NetShutdown::Write);
                        break;
                    }
                }
                let mut chunk = [0u8; 4096];
                while end.is_none() {
                    end = ended(&c.read(&mut chunk));
                }
                let _ = report.send(("h1", n, end.unwrap()));
            });
        }
    });
    addr
}

/// A byte stream that notes how its first read to end ended.
struct Watched<'a, T> {
    io: &'a mut T,
    end: Rc<Cell<Option<Ended>>>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if let Poll::Ready(r) = &r {
            let n = buf.filled().len() - before;
            let e = match r {
                Ok(()) => ended(&Ok(n)),
                Err(e) => ended(&Err(std::io::Error::from(e.kind()))),
            };
            if self.end.get().is_none() {
                self.end.set(e);
            }
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// An HTTP/2 (prior knowledge) backend answering `200 <path>`. Once its `h2` connection
/// ended (after the waypoint's GOAWAY it answers with its own and shuts its sending
/// side), it reads until the end of the connection.
fn h2_backend(ip: Ipv4Addr, report: mpsc::Sender<Report>) -> SocketAddr {
    let next = Cell::new(1);
    serve_async(ip, move |tcp| {
        let (report, n) = (report.clone(), next.replace(next.get() + 1));
        async move {
            let mut io = monoio::io::IntoPollIo::into_poll_io(tcp).unwrap();
            let end = Rc::new(Cell::new(None));
            let watched = Watched {
                io: &mut io,
                end: end.clone(),
            };
            if let Ok(mut conn) = h2::server::handshake(watched).await {
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let path = req.uri().path().to_string();
                    let resp = http::Response::builder().status(200).body(()).unwrap();
                    if let Ok(mut tx) = respond.send_response(resp, false) {
                        let _ = tx.send_data(Bytes::from(path), true);
                    }
                }
            }
            let mut watched = Watched { io: &mut io, end };
            let mut chunk = [0u8; 4096];
            while watched.end.get().is_none() {
                let _ = tokio::io::AsyncReadExt::read(&mut watched, &mut chunk).await;
            }
            let _ = report.send(("h2", n, watched.end.get().unwrap()));
        }
    })
}

/// The destination node's ztunnel: the ztunnel's bridge between each CONNECT stream and
/// its target, reporting whether the stream ended in order (END_STREAM both ways).
fn ztunnel(listener: TcpListener, cert: &WorkloadCert, bridged: mpsc::Sender<(u16, String)>) {
    serve_hbone(listener, cert, move |inb: Inbound| {
        let bridged = bridged.clone();
        async move {
            let port = inb.request.target.port();
            let Some((tcp, s)) = connect_target(inb).await else {
                return;
            };
            let out = common::bridge(tcp, s).await;
            let end = match out.end {
                End::Closed => "closed".to_string(),
                other => format!("{other:?}"),
            };
            let _ = bridged.send((port, end));
        }
    });
}

/// What the backend writes after its `/flood` response: far more than a closed stream
/// reads before it resets ([`waypoint::inner::CLOSE_DRAIN_MAX`]) and than the buffers on
/// the way hold.
const FLOOD: usize = 256 << 20;

const H1: &str = "10.96.0.1:80";
const H2: &str = "10.96.0.2:80";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);

struct Mesh {
    wp: Waypoint,
    h1_port: u16,
    h2_port: u16,
    reports: mpsc::Receiver<Report>,
    bridged: mpsc::Receiver<(u16, String)>,
}

impl Mesh {
    /// Services `h1` (10.96.0.1, HTTP/1.1 upstream) and `h2` (10.96.0.2,
    /// `useClientProtocol`), both with `idleTimeout: 300ms`, on one pod with a backend of
    /// each kind.
    fn start() -> Mesh {
        let (net, zl) = bind_node_ztunnel(17);
        let ca = test_ca();
        let (btx, bridged) = mpsc::channel();
        ztunnel(
            zl,
            &ca.issue(&id("app", "echo"), SystemTime::now()).unwrap(),
            btx,
        );
        let (rtx, reports) = mpsc::channel();
        let h1 = h1_backend(ip(net, 2), rtx.clone());
        let h2 = h2_backend(ip(net, 2), rtx);
        let workload = format!(
            "  - {{uid: e1, name: e1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{ip}\"], services: {{\"app/h1.app.svc.cluster.local\": {{80: {p1}}}, \"app/h2.app.svc.cluster.local\": {{80: {p2}}}}}}}\n",
            ip = h1.ip(),
            p1 = h1.port(),
            p2 = h2.port(),
        );
        let services = "  - {name: h1, namespace: app, hostname: h1.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n  - {name: h2, namespace: app, hostname: h2.app.svc.cluster.local, vips: [\"10.96.0.2\"], ports: {80: 8080}}\n";
        let dr = |name: &str, h2: bool| {
            format!(
                "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  host: {name}\n  trafficPolicy:\n    connectionPool:\n      http: {{idleTimeout: 300ms, useClientProtocol: {h2}}}\n"
            )
        };
        let text = app_model(ip(net, 1), &workload, services) + &dr("h1", false) + &dr("h2", true);
        let wp = Waypoint::start(&ca, &text, &format!("waypoint-graceful-close-{net}.yaml"));
        Mesh {
            wp,
            h1_port: h1.port(),
            h2_port: h2.port(),
            reports,
            bridged,
        }
    }

    async fn tunnel(&self, target: &str) -> (hbone::client::Client, H2Stream) {
        self.wp.tunnel(target, CLIENT).await
    }

    /// A GET of `path` from Service `h1`, answered `200 <path>`; then how the backend
    /// connection that carried it ended.
    fn h1_get(&self, path: &str) -> Report {
        block_on(async {
            let (_c, mut s) = self.tunnel(H1).await;
            let mut buf = Vec::new();
            s.write_all(Bytes::from(get(path, "h1")), false)
                .await
                .unwrap();
            let r = read_response(&mut s, &mut buf).await;
            assert_eq!((r.status, r.text()), (200, path.to_string()));
            self.report()
        })
    }

    /// The next backend connection's end (generous bound: only a hang fails here).
    fn report(&self) -> Report {
        self.reports
            .recv_timeout(Duration::from_secs(60))
            .expect("a backend connection ended")
    }

    /// How the ztunnel's next bridged stream ended.
    fn bridged(&self) -> (u16, String) {
        self.bridged
            .recv_timeout(Duration::from_secs(60))
            .expect("a bridged stream ended")
    }

    fn counters(&self) -> &service::Counters {
        self.wp.counters()
    }
}

/// R17, DestinationRule `idleTimeout` on the HTTP/2 upstream (`useClientProtocol`): the
/// idle connection's close after its GOAWAY is a FIN at the pod (its read returns 0) and
/// the destination ztunnel's bridge ends in order; the tunnel stream was reset before
/// (the pod read ECONNRESET).
#[test]
fn r17_an_idle_upstream_h2_connection_closes_with_a_fin_not_a_reset() {
    let m = Mesh::start();
    block_on(async {
        let (_c, s) = m.tunnel(H2).await;
        let io = waypoint::inner::StreamIo::new(s, Bytes::new());
        let (client, conn) = h2::client::handshake(io).await.unwrap();
        monoio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::builder()
            .uri("http://h2/one")
            .body(())
            .unwrap();
        let (resp, _) = client.clone().send_request(req, true).unwrap();
        assert_eq!(h2_response(resp).await, (200, "/one".to_string()));
        // Idle for its 300 ms: closed by the waypoint.
        assert_eq!(m.report(), ("h2", 1, Ended::Eof));
    });
    assert_eq!(m.bridged(), (m.h2_port, "closed".to_string()));
    let c = m.counters();
    assert_eq!(c.upstream_h2_idle_closed.load(Ordering::Relaxed), 1);
    assert_eq!(c.upstream_errors.load(Ordering::Relaxed), 0);
}

/// R17, DestinationRule `idleTimeout` on a kept HTTP/1.1 stream: the sweep ends it with a
/// FIN at the pod, as the close of an idle keep-alive connection.
#[test]
fn r17_a_swept_idle_http1_stream_closes_with_a_fin_not_a_reset() {
    h1_stream_ends_with_a_fin("/keep");
}

/// A response with `Connection: close`: the pod shuts its side and reads on (a lingering
/// close); the waypoint ends the stream with END_STREAM, a FIN at the pod.
#[test]
fn a_connection_close_response_ends_the_upstream_stream_with_a_fin() {
    h1_stream_ends_with_a_fin("/close");
}

/// An HTTP/1.1 GET of `path`: the pod's connection ends with a FIN (no reset), the stand-in
/// ztunnel sees the bridged stream closed, no upstream error counted.
fn h1_stream_ends_with_a_fin(path: &str) {
    let m = Mesh::start();
    assert_eq!(m.h1_get(path), ("h1", 1, Ended::Eof));
    assert_eq!(m.bridged(), (m.h1_port, "closed".to_string()));
    assert_eq!(m.counters().upstream_errors.load(Ordering::Relaxed), 0);
}

/// After a `Connection: close` response the waypoint half-closes the stream and reads on
/// for the pod's end, but only so much: a pod that keeps sending is reset (as a TCP
/// socket closed with data still arriving), not read for the whole wait.
#[test]
fn a_closed_upstream_stream_whose_pod_keeps_sending_is_reset() {
    let m = Mesh::start();
    match m.h1_get("/flood") {
        ("h1", 1, Ended::Failed(k)) => assert!(
            matches!(k, ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
            "{k:?}"
        ),
        other => panic!("{other:?}"),
    }
    let (port, end) = m.bridged();
    assert_eq!(port, m.h1_port);
    assert_ne!(end, "closed");
    assert_eq!(m.counters().upstream_errors.load(Ordering::Relaxed), 0);
}

/// The client's side too: a request with `Connection: close` is answered and the waypoint
/// ends the client's tunnel with END_STREAM, then waits for the client's end: through the
/// client's ztunnel bridge the app reads EOF after the response, and the bridge ends in
/// order (it was reset as the waypoint dropped the stream).
#[test]
fn a_connection_close_request_ends_the_client_tunnel_with_a_fin() {
    let m = Mesh::start();
    let (app, end) = block_on(async {
        let (_c, s) = m.tunnel(H1).await;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let l = monoio::net::TcpListener::from_std(l).unwrap();
        // The client app: one request, then reads to the end of the connection.
        let app = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /bye HTTP/1.1\r\nhost: h1\r\nconnection: close\r\n\r\n")
                .unwrap();
            let (mut got, mut chunk) = (Vec::new(), [0u8; 4096]);
            loop {
                match c.read(&mut chunk) {
                    Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), Ended::Eof),
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) => {
                        return (
                            String::from_utf8_lossy(&got).into_owned(),
                            Ended::Failed(e.kind()),
                        )
                    }
                }
            }
        });
        let (tcp, _) = l.accept().await.unwrap();
        let out = common::bridge(tcp, s).await;
        (app, format!("{:?}", out.end))
    });
    let (text, ended) = app.join().unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n/bye"), "{text}");
    assert_eq!(ended, Ended::Eof, "{text}");
    assert_eq!(end, "Closed");
    // Upstream, the stream of a request that asked for a close is not kept: a FIN too.
    assert_eq!(m.report(), ("h1", 1, Ended::Eof));
    assert_eq!(m.bridged(), (m.h1_port, "closed".to_string()));
}
