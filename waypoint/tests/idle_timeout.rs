//! The worker's pool of idle upstream streams, per service: DestinationRule
//! `trafficPolicy.connectionPool.http.idleTimeout` bounds how long a kept stream waits for
//! the next request, and only a request that can be sent again on a new stream (its body
//! read whole) may take a kept stream idle for long.
//!
//! The backend numbers its connections (one per upstream HBONE stream, through the
//! stand-in ztunnel) and reports each request and each close with that number, so the
//! tests see which kept stream carried what and wait on those events, not on time.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{
    app_model, bind_node_ztunnel, block_on, get, h2_get_from, h2_response, id, ip, next_request,
    ok_response, read_response, serve_async, stand_in_ztunnel, test_ca, Waypoint,
};
use hbone::ca::CertSource;
use hbone::stream::H2Stream;
use waypoint::service;

/// What the backend saw, by connection number.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// (connection, path, request body length)
    Request(usize, String, usize),
    Closed(usize),
}

/// An HTTP/1.1 keep-alive backend answering `200 <path> <body length>`; request bodies
/// framed by Content-Length or chunked.
fn backend(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<Seen>) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, seen) = mpsc::channel();
    let next = Arc::new(AtomicUsize::new(1));
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let (tx, n) = (tx.clone(), next.fetch_add(1, Ordering::SeqCst));
            std::thread::spawn(move || serve(c, n, &tx));
        }
    });
    (addr, seen)
}

fn serve(mut c: TcpStream, n: usize, seen: &mpsc::Sender<Seen>) {
    let mut buf = Vec::new();
    while let Some(req) = next_request(&mut c, &mut buf) {
        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let len = if chunked {
            match read_chunked(&mut c, &mut buf) {
                Some(len) => len,
                None => break,
            }
        } else {
            let len = req.content_length();
            if !fill(&mut c, &mut buf, len) {
                break;
            }
            buf.drain(..len);
            len
        };
        let _ = seen.send(Seen::Request(n, req.path.clone(), len));
        if c.write_all(ok_response(&format!("{} {len}", req.path)).as_bytes())
            .is_err()
        {
            break;
        }
    }
    let _ = seen.send(Seen::Closed(n));
}

/// Read until `buf` holds at least `n` bytes; false when the connection ended first.
fn fill(c: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
    let mut chunk = vec![0u8; 64 * 1024];
    while buf.len() < n {
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    true
}

/// Consume a chunked body (no trailers) from the front of `buf`, reading as needed: its
/// decoded length.
fn read_chunked(c: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut total = 0;
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if !fill(c, buf, buf.len() + 1) {
                return None;
            }
        };
        let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).ok()?, 16).ok()?;
        if !fill(c, buf, line_end + 2 + size + 2) {
            return None;
        }
        buf.drain(..line_end + 2 + size + 2);
        total += size;
        if size == 0 {
            return Some(total);
        }
    }
}

/// An HTTP/2 (prior knowledge) backend on `ip` answering `200 <path> <body length>`, after
/// three seconds for `/slow`; it numbers its connections from `next` and reports to `seen`.
fn h2_backend(ip: Ipv4Addr, next: Arc<AtomicUsize>, seen: mpsc::Sender<Seen>) -> SocketAddr {
    serve_async(ip, move |tcp| {
        let (seen, n) = (seen.clone(), next.fetch_add(1, Ordering::SeqCst));
        async move {
            let io = monoio::io::IntoPollIo::into_poll_io(tcp).unwrap();
            if let Ok(mut conn) = h2::server::handshake(io).await {
                while let Some(Ok((req, respond))) = conn.accept().await {
                    monoio::spawn(h2_answer(req, respond, n, seen.clone()));
                }
            }
            let _ = seen.send(Seen::Closed(n));
        }
    })
}

async fn h2_answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    n: usize,
    seen: mpsc::Sender<Seen>,
) {
    let path = req.uri().path().to_string();
    let mut body = req.into_body();
    let mut len = 0;
    while let Some(Ok(c)) = body.data().await {
        let _ = body.flow_control().release_capacity(c.len());
        len += c.len();
    }
    let _ = seen.send(Seen::Request(n, path.clone(), len));
    if path == "/slow" {
        monoio::time::sleep(Duration::from_secs(3)).await;
    }
    let resp = http::Response::builder().status(200).body(()).unwrap();
    if let Ok(mut tx) = respond.send_response(resp, false) {
        let _ = tx.send_data(Bytes::from(format!("{path} {len}")), true);
    }
}

/// Services `short` (10.96.0.1) and `long` (10.96.0.2) in namespace `app`, both on the one
/// pod at `pod` behind the node ztunnel at `zt` (`short` to port `pod.port()`, `long` to
/// `long_port`), with DestinationRules setting `idleTimeout` to `short` and `long`, and
/// `useClientProtocol` when `h2`.
fn model(
    zt: Ipv4Addr,
    pod: SocketAddr,
    long_port: u16,
    short: &str,
    long: &str,
    h2: bool,
) -> String {
    let dr = |name: &str, t: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  host: {name}\n  trafficPolicy:\n    connectionPool:\n      http: {{idleTimeout: {t}, useClientProtocol: {h2}}}\n"
        )
    };
    let workload = format!(
        "  - {{uid: e1, name: e1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{ip}\"], services: {{\"app/short.app.svc.cluster.local\": {{80: {port}}}, \"app/long.app.svc.cluster.local\": {{80: {long_port}}}}}}}\n",
        ip = pod.ip(),
        port = pod.port(),
    );
    let services = "  - {name: short, namespace: app, hostname: short.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n  - {name: long, namespace: app, hostname: long.app.svc.cluster.local, vips: [\"10.96.0.2\"], ports: {80: 8080}}\n";
    app_model(zt, &workload, services) + &dr("short", short) + &dr("long", long)
}

const SHORT: &str = "10.96.0.1:80";
const LONG: &str = "10.96.0.2:80";

struct Mesh {
    wp: Waypoint,
    seen: mpsc::Receiver<Seen>,
}

impl Mesh {
    /// HTTP/1.1 upstream: one backend behind both services.
    fn start(short: &str, long: &str) -> Mesh {
        Mesh::start_with(short, long, false)
    }

    /// With `h2`: `useClientProtocol` for both services, each with its own HTTP/2 backend
    /// (a port of its own: a worker's HTTP/2 connections are per endpoint).
    fn start_with(short: &str, long: &str, h2: bool) -> Mesh {
        let (net, zl) = bind_node_ztunnel(7);
        let ca = test_ca();
        // Its thread serves for the rest of the test process.
        let _ztunnel = stand_in_ztunnel(
            zl,
            &ca.issue(&id("app", "echo"), SystemTime::now()).unwrap(),
        );
        let (pod, long_port, seen) = if h2 {
            let (tx, seen) = mpsc::channel();
            let next = Arc::new(AtomicUsize::new(1));
            let short = h2_backend(ip(net, 2), next.clone(), tx.clone());
            let long = h2_backend(ip(net, 2), next, tx);
            (short, long.port(), seen)
        } else {
            let (pod, seen) = backend(ip(net, 2));
            (pod, pod.port(), seen)
        };
        let text = model(ip(net, 1), pod, long_port, short, long, h2);
        let wp = Waypoint::start(&ca, &text, &format!("waypoint-idle-timeout-{net}.yaml"));
        Mesh { wp, seen }
    }

    /// A tunnel to Service `target` through the waypoint, for client `from`.
    async fn tunnel(&self, target: &str, from: Ipv4Addr) -> (hbone::client::Client, H2Stream) {
        self.wp.tunnel(target, from).await
    }

    /// The backend's next event (generous bound: only a hang fails here).
    fn next(&self) -> Seen {
        self.seen
            .recv_timeout(Duration::from_secs(60))
            .expect("a backend event")
    }

    fn counters(&self) -> &service::Counters {
        self.wp.counters()
    }
}

async fn ask(s: &mut H2Stream, buf: &mut Vec<u8>, req: String) -> common::Response {
    s.write_all(Bytes::from(req), false).await.unwrap();
    read_response(s, buf).await
}

const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);
const B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 8);

/// R17 with DestinationRule `connectionPool.http.idleTimeout`: a kept stream of the
/// service with a short one is closed once it ran out, while the other service's (an hour)
/// stays and carries its client's next request. With one expiry for all (the former
/// constant), both would go in the same sweep.
#[test]
fn r17_destination_rule_idle_timeout_closes_kept_streams_per_service() {
    let m = Mesh::start("100ms", "1h");
    block_on(async {
        let (_ca, mut sa) = m.tunnel(SHORT, A).await;
        let (_cb, mut sb) = m.tunnel(LONG, B).await;
        let (mut ba, mut bb) = (Vec::new(), Vec::new());
        // The long one first: the short one's stream may run out (and be swept by any
        // request) as soon as its response is back, so nothing may be asked after it
        // before its close is seen.
        let r = ask(&mut sb, &mut bb, get("/b", "long")).await;
        assert_eq!((r.status, r.text()), (200, "/b 0".to_string()));
        let long_conn = match m.next() {
            Seen::Request(c, p, 0) if p == "/b" => c,
            other => panic!("{other:?}"),
        };
        let r = ask(&mut sa, &mut ba, get("/a", "short")).await;
        assert_eq!((r.status, r.text()), (200, "/a 0".to_string()));
        let short_conn = match m.next() {
            Seen::Request(c, p, 0) if p == "/a" => c,
            other => panic!("{other:?}"),
        };
        assert_ne!(short_conn, long_conn, "one upstream stream per client");
        // The short one's stream is closed by the worker's sweep, nothing else happens.
        assert_eq!(m.next(), Seen::Closed(short_conn));
        // The long one's stream was kept: the next request of its client goes on it.
        let r = ask(&mut sb, &mut bb, get("/b2", "long")).await;
        assert_eq!((r.status, r.text()), (200, "/b2 0".to_string()));
        assert_eq!(m.next(), Seen::Request(long_conn, "/b2".into(), 0));
        // The short one's client gets a new stream.
        let r = ask(&mut sa, &mut ba, get("/a2", "short")).await;
        assert_eq!((r.status, r.text()), (200, "/a2 0".to_string()));
        match m.next() {
            Seen::Request(c, p, 0) if p == "/a2" => {
                assert!(c != short_conn && c != long_conn, "a new connection: {c}")
            }
            other => panic!("{other:?}"),
        }
    });
    assert_eq!(m.counters().upstream_errors.load(Ordering::Relaxed), 0);
    assert_eq!(m.counters().upstream_streams.load(Ordering::Relaxed), 3);
}

/// An HTTP/2 client inside a tunnel to Service `target` through the waypoint, for client
/// `from`.
async fn h2_client(
    m: &Mesh,
    target: &str,
    from: Ipv4Addr,
) -> (hbone::client::Client, h2::client::SendRequest<Bytes>) {
    let (c, s) = m.tunnel(target, from).await;
    let io = waypoint::inner::StreamIo::new(s, Bytes::new());
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    monoio::spawn(async move {
        let _ = conn.await;
    });
    (c, send)
}

/// `idleTimeout` on the HTTP/2 upstream path (`useClientProtocol`), as Istio applies it to
/// both: the worker's HTTP/2 connection to the short one's endpoint is closed once it has
/// had no request in flight for its `idleTimeout` (2 s), not while a request takes longer
/// (3 s; its idle time starts when the request ends: the next request, sent at once, still
/// goes on it: the 2 s are the bound for that);
/// the long one's (an hour) stays and carries its client's next request, and the short
/// one's next request opens a new connection. Without the limit no close would come.
#[test]
fn r17_destination_rule_idle_timeout_closes_idle_upstream_h2_connections() {
    let m = Mesh::start_with("2s", "1h", true);
    block_on(async {
        let (_ca, sa) = h2_client(&m, SHORT, A).await;
        let (_cb, sb) = h2_client(&m, LONG, B).await;
        assert_eq!(h2_get_from(&sb, "long", "/b").await, (200, "/b 0".into()));
        let long_conn = match m.next() {
            Seen::Request(c, p, 0) if p == "/b" => c,
            other => panic!("{other:?}"),
        };
        // In flight for 3 s: the connection is not idle meanwhile.
        assert_eq!(
            h2_get_from(&sa, "short", "/slow").await,
            (200, "/slow 0".into())
        );
        let short_conn = match m.next() {
            Seen::Request(c, p, 0) if p == "/slow" => c,
            other => panic!("{other:?}"),
        };
        assert_ne!(short_conn, long_conn, "one connection per endpoint");
        assert_eq!(h2_get_from(&sa, "short", "/a").await, (200, "/a 0".into()));
        assert_eq!(m.next(), Seen::Request(short_conn, "/a".into(), 0));
        // Idle for its 2 s: closed, nothing else happens.
        assert_eq!(m.next(), Seen::Closed(short_conn));
        assert_eq!(h2_get_from(&sb, "long", "/b2").await, (200, "/b2 0".into()));
        assert_eq!(m.next(), Seen::Request(long_conn, "/b2".into(), 0));
        assert_eq!(
            h2_get_from(&sa, "short", "/a2").await,
            (200, "/a2 0".into())
        );
        match m.next() {
            Seen::Request(c, p, 0) if p == "/a2" => {
                assert!(c != short_conn && c != long_conn, "a new connection: {c}")
            }
            other => panic!("{other:?}"),
        }
    });
    let c = m.counters();
    assert_eq!(c.upstream_errors.load(Ordering::Relaxed), 0);
    assert_eq!(c.upstream_h2_connections.load(Ordering::Relaxed), 3);
    assert_eq!(c.upstream_h2_idle_closed.load(Ordering::Relaxed), 1);
}

/// HTTP/2 inside the tunnel (converted to HTTP/1.1 upstream): a request body of unknown
/// length (no `content-length`, ended by END_STREAM) past the replay buffer is streamed and
/// cannot be sent again, so it never takes a kept stream idle longer than
/// [`waypoint::upstream::UNSAFE_REUSE_MAX_IDLE`] (its upstream head has neither
/// `content-length` nor `transfer-encoding` as the waypoint parses it, which once made it
/// look replayable). A GET after as long an idle time does take the kept stream. The idle
/// times are waited out (the limit is a constant); the service's `idleTimeout` (an hour)
/// keeps the streams meanwhile.
#[test]
fn r17_an_h2_body_of_unknown_length_does_not_take_a_long_idle_kept_stream() {
    let m = Mesh::start("100ms", "1h");
    let idle = waypoint::upstream::UNSAFE_REUSE_MAX_IDLE + Duration::from_millis(300);
    block_on(async {
        let (_c, s) = m.tunnel(LONG, A).await;
        let io = waypoint::inner::StreamIo::new(s, Bytes::new());
        let (mut client, conn) = h2::client::handshake(io).await.unwrap();
        monoio::spawn(async move {
            let _ = conn.await;
        });
        let uri = |path: &str| format!("http://long{path}");
        let get = |path: &str| http::Request::builder().uri(uri(path)).body(()).unwrap();
        let (resp, _) = client.send_request(get("/first"), true).unwrap();
        assert_eq!(h2_response(resp).await, (200, "/first 0".to_string()));
        let Seen::Request(first, ..) = m.next() else {
            panic!("the request first")
        };

        // Idle past the limit for requests that cannot be replayed.
        std::thread::sleep(idle);
        let len = waypoint::http1::REPLAY_BUFFER + 4096;
        let put = http::Request::builder()
            .method("PUT")
            .uri(uri("/upload"))
            .body(())
            .unwrap();
        let (resp, mut tx) = client.send_request(put, false).unwrap();
        let mut body = Bytes::from(vec![b'u'; len]);
        while !body.is_empty() {
            tx.reserve_capacity(body.len());
            let cap = std::future::poll_fn(|cx| tx.poll_capacity(cx))
                .await
                .unwrap()
                .unwrap();
            let chunk = body.split_to(cap.min(body.len()));
            tx.send_data(chunk, body.is_empty()).unwrap();
        }
        assert_eq!(h2_response(resp).await, (200, format!("/upload {len}")));
        let upload = match m.next() {
            Seen::Request(c, p, n) if p == "/upload" && n == len => c,
            other => panic!("{other:?}"),
        };
        assert_ne!(upload, first, "the streamed upload went on a new stream");

        // A GET may take a kept stream idle as long: the most recent one.
        std::thread::sleep(idle);
        let (resp, _) = client.send_request(get("/again"), true).unwrap();
        assert_eq!(h2_response(resp).await, (200, "/again 0".to_string()));
        assert_eq!(m.next(), Seen::Request(upload, "/again".into(), 0));
    });
    assert_eq!(m.counters().upstream_errors.load(Ordering::Relaxed), 0);
    assert_eq!(m.counters().streamed_bodies.load(Ordering::Relaxed), 1);
}

/// A bad `idleTimeout` is an error naming the document, its line and the field.
#[test]
fn destination_rule_idle_timeout_errors_name_document_line_and_field() {
    let dr = |v: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: echo\n  trafficPolicy:\n    connectionPool:\n      http:\n        idleTimeout: {v}\n"
        )
    };
    for (v, msg) in [
        ("soon", "invalid duration"),
        ("10 parsecs", "unknown duration unit"),
    ] {
        let text = format!("{}---\n{}", dr("1s").replace("name: d", "name: ok"), dr(v));
        let text = text.replacen("host: echo", "host: other", 1);
        let e = match waypoint::config::load_str(Path::new("w.yaml"), &text, 1) {
            Ok(_) => panic!("loaded:\n{text}"),
            Err(e) => e,
        };
        let shown = e.to_string();
        assert_eq!(e.document, 2, "{shown}");
        assert_eq!(e.line, Some(19), "{shown}");
        assert_eq!(
            e.field.as_deref(),
            Some("spec.trafficPolicy.connectionPool.http.idleTimeout"),
            "{shown}"
        );
        assert!(e.message.contains(msg), "{shown}");
    }
    // Unknown fields next to it are still errors.
    let text = dr("1s").replace(
        "idleTimeout: 1s",
        "idleTimeout: 1s\n        h2UpgradePolicy: UPGRADE",
    );
    let e = waypoint::config::load_str(Path::new("w.yaml"), &text, 1).unwrap_err();
    assert!(
        e.to_string().contains("unknown field `h2UpgradePolicy`"),
        "{e}"
    );
    // And a good one loads, per service; `0s` is Istio's "no idle timeout".
    let text = format!(
        "{}---\n{}",
        dr("250ms"),
        dr("0s")
            .replace("name: d", "name: e")
            .replace("host: echo", "host: other")
    );
    let cfg = waypoint::config::load_str(Path::new("w.yaml"), &text, 1).unwrap();
    let svc = |n: &str| waypoint::route::ObjectRef::new("default", n);
    assert_eq!(
        cfg.idle_expiry(Some(&svc("echo")), None),
        Duration::from_millis(250)
    );
    assert_eq!(cfg.idle_expiry(Some(&svc("other")), None), Duration::MAX);
    assert_eq!(
        cfg.idle_expiry(Some(&svc("third")), None),
        waypoint::upstream::IDLE_STREAM_EXPIRY
    );
    assert_eq!(
        cfg.idle_expiry(None, None),
        waypoint::upstream::IDLE_STREAM_EXPIRY
    );
}
