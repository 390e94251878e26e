//! Requests whose client leaves do not keep their upstream work (the HTTP/2 "Rapid Reset"
//! pattern, CVE-2023-44487): an HTTP/2 request stream reset inside a tunnel, an HTTP/1.1
//! CONNECT stream reset, and a dropped HBONE connection each reset the upstream requests
//! in flight, so the backend's connections close (the destination ztunnel passes the
//! reset on); the waypoint counts them and keeps serving. And (R15) a request the
//! waypoint answers itself is answered before its body: a denied upload is not streamed
//! through first.
//!
//! The backend here reads a request and never answers it (but `/ok`): the tests wait on
//! its count of requests held, with generous bounds, never on time.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    block_on, connect, echo_node, get, id, ip, next_request, ok_response, read_response,
    serve_threads, wp_deny, Waypoint,
};
use hbone::stream::H2Stream;

const ECHO: &str = "echo.app.svc.cluster.local";
const ME: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);

/// The longest wait for an event (a generous bound: the events come in milliseconds).
const BOUND: Duration = Duration::from_secs(60);

/// A backend on `ip` answering `/ok` (keep-alive) and holding any other request
/// unanswered until its connection ends: the count of requests it holds now.
fn holding_backend(ip: Ipv4Addr) -> (SocketAddr, Arc<AtomicUsize>) {
    let held = Arc::new(AtomicUsize::new(0));
    let h = held.clone();
    let addr = serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            if req.path == "/ok" {
                if c.write_all(ok_response("ok").as_bytes()).is_err() {
                    return;
                }
                continue;
            }
            h.fetch_add(1, SeqCst);
            let mut b = [0u8; 4096];
            while matches!(c.read(&mut b), Ok(n) if n > 0) {}
            h.fetch_sub(1, SeqCst);
            return;
        }
    });
    (addr, held)
}

/// Wait (on the test's runtime) until `f` holds; fails after [`BOUND`].
async fn until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < BOUND, "never happened: {what}");
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `f`'s output; fails after [`BOUND`].
async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match monoio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("never happened: {what}"),
    }
}

/// The waypoint on the echo model, its one endpoint the holding backend; `extra` YAML
/// documents appended.
fn setup(salt: u32, extra: &str) -> (Waypoint, Arc<AtomicUsize>) {
    let (net, ca, _) = echo_node(salt);
    let (pod, held) = holding_backend(ip(net, 2));
    let mut text = common::echo_model(ip(net, 1), pod);
    if !extra.is_empty() {
        text = format!("{text}---\n{extra}");
    }
    let wp = Waypoint::start(&ca, &text, &format!("waypoint-cancel-{net}.yaml"));
    (wp, held)
}

fn cancelled(wp: &Waypoint) -> u64 {
    wp.counters().cancelled_requests.load(SeqCst)
}

/// An HTTP/2 (prior knowledge) client connection inside `s`.
async fn h2_inside(s: H2Stream) -> h2::client::SendRequest<Bytes> {
    let io = waypoint::inner::StreamIo::new(s, Bytes::new());
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    monoio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn h2_get_req(path: &str) -> http::Request<()> {
    http::Request::builder()
        .uri(format!("http://{ECHO}{path}"))
        .body(())
        .unwrap()
}

/// A GET of `/ok` in a new HTTP/1.1 tunnel answers 200 (the waypoint still serves).
async fn still_serves(wp: &Waypoint) {
    let (_c, mut s) = wp.tunnel("10.96.0.1:80", ME).await;
    s.write_all(Bytes::from(get("/ok", ECHO)), false)
        .await
        .unwrap();
    let r = read_response(&mut s, &mut Vec::new()).await;
    assert_eq!((r.status, r.text()), (200, "ok".to_string()));
}

/// HTTP/2 in a tunnel: requests the backend holds, each then reset by the client, reset
/// their upstream requests (the backend's connections close), are counted, and the
/// tunnel and the waypoint keep serving.
#[test]
fn r17_h2_streams_reset_by_the_client_reset_their_upstream_requests() {
    const N: usize = 100;
    let (wp, held) = setup(41, "");
    block_on(async {
        let (_c, s) = wp.tunnel("10.96.0.1:80", ME).await;
        let send = h2_inside(s).await;
        let mut streams = Vec::new();
        for i in 0..N {
            let (resp, tx) = send
                .clone()
                .send_request(h2_get_req(&format!("/hold/{i}")), true)
                .unwrap();
            streams.push((resp, tx));
        }
        until("the backend holds every request", || held.load(SeqCst) == N).await;
        for (_, tx) in &mut streams {
            tx.send_reset(h2::Reason::CANCEL);
        }
        until("the backend's connections all close", || {
            held.load(SeqCst) == 0
        })
        .await;
        until("every reset counted", || cancelled(&wp) == N as u64).await;
        // The same tunnel serves the next request.
        let (resp, _) = send.clone().send_request(h2_get_req("/ok"), true).unwrap();
        assert_eq!(common::h2_response(resp).await, (200, "ok".to_string()));
        still_serves(&wp).await;
    });
    assert_eq!(cancelled(&wp), N as u64);
}

/// HTTP/1.1 tunnels: a CONNECT stream reset while its request waits for the upstream
/// resets that upstream request.
#[test]
fn r17_http1_tunnels_reset_by_the_client_reset_their_upstream_requests() {
    const N: usize = 50;
    let (wp, held) = setup(43, "");
    block_on(async {
        let c = connect(wp.addr, &wp.client_cert, id("app", "waypoint"))
            .await
            .unwrap();
        let mut tunnels = Vec::new();
        for i in 0..N {
            let mut req = hbone::wire::ConnectRequest::new("10.96.0.1:80".parse().unwrap());
            req.forwarded_for = Some(ME.into());
            let mut s = c.open(&req).await.unwrap();
            s.write_all(Bytes::from(get(&format!("/hold/{i}"), ECHO)), false)
                .await
                .unwrap();
            tunnels.push(s);
        }
        until("the backend holds every request", || held.load(SeqCst) == N).await;
        for s in &mut tunnels {
            s.reset(h2::Reason::CANCEL);
        }
        until("the backend's connections all close", || {
            held.load(SeqCst) == 0
        })
        .await;
        until("every reset counted", || cancelled(&wp) == N as u64).await;
        still_serves(&wp).await;
    });
}

/// A TCP relay to `to` whose connections can be cut (both ways at once), as a client
/// node's network failing would.
struct Relay {
    addr: SocketAddr,
    /// Both sockets of each relayed connection.
    socks: mpsc::Receiver<TcpStream>,
}

impl Relay {
    fn start(to: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (kept, socks) = mpsc::channel();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let u = TcpStream::connect(to).unwrap();
                let _ = kept.send(c.try_clone().unwrap());
                let _ = kept.send(u.try_clone().unwrap());
                for (mut from, mut to) in [(c.try_clone().unwrap(), u.try_clone().unwrap()), (u, c)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Relay { addr, socks }
    }

    /// Cut every relayed connection.
    fn cut(&self) {
        for s in self.socks.try_iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The client's HBONE connection dropped while HTTP/1.1 and HTTP/2 requests wait for
/// the upstream: every one of them is reset upstream and counted.
#[test]
fn r17_a_dropped_client_connection_resets_its_upstream_requests() {
    const N1: usize = 20;
    const N2: usize = 20;
    let (wp, held) = setup(47, "");
    let relay = Relay::start(wp.addr);
    block_on(async {
        let c = connect(relay.addr, &wp.client_cert, id("app", "waypoint"))
            .await
            .unwrap();
        let mut req = hbone::wire::ConnectRequest::new("10.96.0.1:80".parse().unwrap());
        req.forwarded_for = Some(ME.into());
        let mut tunnels = Vec::new();
        for i in 0..N1 {
            let mut s = c.open(&req).await.unwrap();
            s.write_all(Bytes::from(get(&format!("/hold/{i}"), ECHO)), false)
                .await
                .unwrap();
            tunnels.push(s);
        }
        let send = h2_inside(c.open(&req).await.unwrap()).await;
        let mut streams = Vec::new();
        for i in 0..N2 {
            let r = send
                .clone()
                .send_request(h2_get_req(&format!("/hold/h2/{i}")), true)
                .unwrap();
            streams.push(r);
        }
        until("the backend holds every request", || {
            held.load(SeqCst) == N1 + N2
        })
        .await;
        relay.cut();
        until("the backend's connections all close", || {
            held.load(SeqCst) == 0
        })
        .await;
        until("every abandoned request counted", || {
            cancelled(&wp) == (N1 + N2) as u64
        })
        .await;
        still_serves(&wp).await;
    });
}

/// R15: a denied request is answered before its body. An upload whose body is not all
/// there gets its `403` (with `Connection: close`) after the first bytes of a body it
/// announced as 10 GB, and the tunnel is then ended; a denied request whose (small) body
/// came whole with its head keeps the tunnel open for the next request.
#[test]
fn r15_a_denied_upload_is_answered_before_its_body() {
    let deny_upload = wp_deny(
        "deny-upload",
        "  - to: [{operation: {paths: [\"/upload\"]}}]\n",
    );
    let (wp, held) = setup(53, &deny_upload);
    block_on(async {
        let (_c, mut s) = wp.tunnel("10.96.0.1:80", ME).await;
        let head =
            format!("POST /upload HTTP/1.1\r\nhost: {ECHO}\r\ncontent-length: 10000000000\r\n\r\n");
        s.write_all(Bytes::from(head), false).await.unwrap();
        s.write_all(Bytes::from(vec![b'x'; 1024]), false)
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = bounded("the 403", read_response(&mut s, &mut buf)).await;
        assert_eq!(r.status, 403, "{}", r.head);
        assert!(
            r.head.to_ascii_lowercase().contains("connection: close"),
            "{}",
            r.head
        );
        // Then the waypoint ends the tunnel (END_STREAM, or a reset once the client sends
        // on past the bounded drain): nothing more comes.
        while let Some(Ok(b)) = bounded("the tunnel's end", s.read()).await {
            assert!(b.is_empty(), "more after the 403: {b:?}");
        }
        assert_eq!(wp.counters().denied.load(SeqCst), 1);

        // A small body that came whole: dropped from the buffer, the tunnel stays open.
        let (_c, mut s) = wp.tunnel("10.96.0.1:80", ME).await;
        let mut buf = Vec::new();
        for body in [
            "content-length: 5\r\n\r\nhello",
            "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ] {
            let req = format!("POST /upload HTTP/1.1\r\nhost: {ECHO}\r\n{body}");
            s.write_all(Bytes::from(req), false).await.unwrap();
            let r = read_response(&mut s, &mut buf).await;
            assert_eq!(r.status, 403, "{}", r.head);
            assert!(
                !r.head.to_ascii_lowercase().contains("connection: close"),
                "{}",
                r.head
            );
        }
        s.write_all(Bytes::from(get("/ok", ECHO)), false)
            .await
            .unwrap();
        let r = read_response(&mut s, &mut buf).await;
        assert_eq!((r.status, r.text()), (200, "ok".to_string()));
    });
    assert_eq!(held.load(SeqCst), 0);
}
