//! End to end on loopback: client (HBONE) → waypoint → destination node's ztunnel (a test
//! HBONE server that bridges CONNECT streams to their target) → real HTTP/1.1 backends.
//!
//! Each test gets its own `127.X.0.0/24` addresses: the stand-in ztunnel listens on
//! `127.X.0.1:15008` (the port upstream.rs derives from the model), the `echo` pod on
//! `127.X.0.2`, the `echo-v1` pod on `127.X.0.3`.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{
    block_on, blocks_fnv, connect, echo_node, fnv, get, h2_in_tunnel, id, ip, next_request,
    ok_response, open_tunnel, payload, read_response, read_until, serve_async, spec_echo_route_in,
    wait_until, wp_deny, write_blocks, Response, Watched, Ztunnel, BLOCK,
};
use hbone::ca::{CertSource, WorkloadCert};
use hbone::client::Client;
use hbone::stream::H2Stream;
use hbone::wire::ConnectRequest;
use hbone::HboneError;
use waypoint::service;

/// A keep-alive HTTP/1.1 backend answering `200 <name> <path> xff=<x-forwarded-for>`.
struct Backend {
    addr: SocketAddr,
    paths: mpsc::Receiver<String>,
}

impl Backend {
    /// Request targets seen since the last call.
    fn seen(&self) -> Vec<String> {
        self.paths.try_iter().collect()
    }
}

fn backend(ip: Ipv4Addr, name: &'static str) -> Backend {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let (p2, paths) = mpsc::channel();
    let hits = Arc::new(AtomicU32::new(0));
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(c) = conn else { return };
            let (paths, hits) = (p2.clone(), hits.clone());
            std::thread::spawn(move || serve_backend(c, name, &paths, &hits));
        }
    });
    Backend { addr, paths }
}

/// Send back every byte read until the peer's half-close, then half-close too. With
/// `reset_on_ask`, a read starting `\x16RST` closes with a reset (linger 0) instead.
fn echo_back(c: &mut TcpStream, reset_on_ask: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => {
                let _ = c.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) if reset_on_ask && buf[..n].starts_with(b"\x16RST") => {
                let _ = socket2::SockRef::from(&*c).set_linger(Some(Duration::ZERO));
                return;
            }
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// One connection of [`backend`]: every request answered by its path (see the comments).
fn serve_backend(mut c: TcpStream, name: &str, paths: &mpsc::Sender<String>, hits: &AtomicU32) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while let Some(req) = next_request(&mut c, &mut buf) {
        let path = req.path.clone();
        let xff = req.header("x-forwarded-for").unwrap_or_default();
        let shadow = req.header("host").is_some_and(|h| h.contains("-shadow"));
        let chunked = req.header("transfer-encoding").is_some();
        let len = req.content_length();
        let tp = req.header("traceparent").unwrap_or_default();
        if path == "/stream/early" {
            // Answers 413 after the head and never reads the body.
            let _ = paths.send(path.clone());
            let _ =
                c.write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\n\r\ntoo big!");
            std::thread::sleep(Duration::from_secs(120));
            return;
        }
        if path == "/stream/upgrade" && req.header("upgrade").is_some() {
            // Any upgrade asked for (this backend is lenient: h2c too): 101, then every
            // byte echoed; half-close after the client's.
            let _ = paths.send(path.clone());
            let resp = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
            if c.write_all(resp.as_bytes()).is_ok() && c.write_all(&buf).is_ok() {
                echo_back(&mut c, false);
            }
            return;
        }
        // The request body, decoded.
        let body_in = loop {
            let end = if chunked {
                waypoint::service::chunked_end(&buf)
            } else {
                (buf.len() >= len).then_some(len)
            };
            if let Some(end) = end {
                let raw: Vec<u8> = buf.drain(..end).collect();
                break if chunked {
                    waypoint::h2srv::dechunk(&raw).unwrap()
                } else {
                    raw
                };
            }
            match c.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        if let Some(rest) = path.strip_prefix("/stream/") {
            let _ = paths.send(path.clone());
            let ok = if let Some(n) = rest.strip_prefix("gen/") {
                // `n` bytes: the 1 MiB block repeated, Content-Length.
                let n: usize = n.parse().unwrap();
                c.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n").as_bytes())
                    .and_then(|()| write_blocks(&mut c, n))
                    .is_ok()
            } else if let Some(n) = rest.strip_prefix("genchunked/") {
                // The same, chunked (1 MiB chunks).
                let mut n: usize = n.parse().unwrap();
                let mut ok = c
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .is_ok();
                while ok && n > 0 {
                    let k = n.min(BLOCK);
                    ok = c.write_all(format!("{k:x}\r\n").as_bytes()).is_ok()
                        && write_blocks(&mut c, k).is_ok()
                        && c.write_all(b"\r\n").is_ok();
                    n -= k;
                }
                ok && c.write_all(b"0\r\n\r\n").is_ok()
            } else {
                // The request body's length and checksum.
                let b = format!("len={} fnv={:x}", body_in.len(), fnv(&body_in));
                c.write_all(ok_response(&b).as_bytes()).is_ok()
            };
            if !ok {
                return;
            }
            continue;
        }
        let _ = paths.send(if shadow {
            format!("shadow:{path}")
        } else {
            path.clone()
        });
        let mut body = format!("{name} {path} xff={xff}");
        if path.contains("trace") {
            body.push_str(&format!(" tp={tp}"));
        }
        if path.contains("rid") {
            let rid = req.header("x-request-id").unwrap_or_default();
            body.push_str(&format!(" rid={rid}"));
        }
        if !body_in.is_empty() {
            body.push_str(&format!(" body={}", String::from_utf8_lossy(&body_in)));
        }
        if path.contains("hang") || (shadow && path.contains("stall")) {
            // Never answers: waits for the connection to go away.
            while let Ok(k) = c.read(&mut chunk) {
                if k == 0 {
                    return;
                }
            }
            return;
        }
        if path.contains("huge") {
            // One byte over the waypoint's limit (head and body), or (`at-limit`) exactly
            // at it, then close.
            let max = waypoint::service::MAX_RESPONSE - usize::from(path.contains("at-limit"));
            let head = |n: usize| format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
            let mut n = max;
            while head(n).len() + n != max + 1 {
                n = max + 1 - head(n).len();
            }
            if c.write_all(head(n).as_bytes()).is_err() {
                return;
            }
            let chunk = vec![b'x'; 1 << 20];
            while n > 0 {
                let k = n.min(chunk.len());
                if c.write_all(&chunk[..k]).is_err() {
                    return;
                }
                n -= k;
            }
            return;
        }
        let hit = hits.fetch_add(1, Ordering::SeqCst);
        let resp = match path.as_str() {
            // Chunked, with an extension and a trailer.
            "/chunked" => format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\n{}\r\n{:x}\r\n{}\r\n0\r\nx-t: 1\r\n\r\n",
                &body[..3],
                body.len() - 3,
                &body[3..]
            ),
            // Delimited by the end of the connection.
            "/eof" => format!("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{body}"),
            // Fails every other time (the first included).
            p if p.contains("flaky") && hit % 2 == 0 => {
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nflak".to_string()
            }
            p if p.contains("fail") => {
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nfail".to_string()
            }
            _ => ok_response(&body),
        };
        // /drop: a keep-alive response, then the connection closes anyway.
        if c.write_all(resp.as_bytes()).is_err() || path == "/eof" || path == "/drop" {
            return;
        }
    }
}

/// The rules of the default DENY policy ([`deny_admin`]).
const DENY_ADMIN_RULES: &str = r#"  - to: [{operation: {paths: ["/admin*"]}}]
  # The client's certificate identity reaches the policy as its principal…
  - from: [{source: {principals: ["cluster.local/ns/app/sa/client"]}}]
    to: [{operation: {paths: ["/secret"]}}]
  # …and the CONNECT's `forwarded: for=` as its source IP.
  - from: [{source: {ipBlocks: ["10.1.0.7/32"]}}]
    to: [{operation: {paths: ["/from-7"]}}]
"#;

/// The default DENY policy of the tests' waypoint.
fn deny_admin() -> String {
    wp_deny("deny-admin", DENY_ADMIN_RULES)
}

const ECHO: &str = "echo.app.svc.cluster.local";
const V1: &str = "echo-v1.app.svc.cluster.local";

/// The spec's R17 route, for Service `echo` of namespace `app`.
fn route() -> String {
    spec_echo_route_in("app")
}

/// `useClientProtocol` for `grpcish`: HTTP/2 clients get HTTP/2 upstream.
const USE_CLIENT_PROTOCOL: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: grpcish, namespace: app}\nspec:\n  host: grpcish\n  trafficPolicy:\n    connectionPool:\n      http: {useClientProtocol: true}\n";

/// HTTPRoute `name` on echo-v1: requests under `prefix` are mirrored to echo.
fn mirror_route(name: &str, prefix: &str) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: app}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo-v1}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    filters:
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: echo, port: 80}}}}
    backendRefs: [{{name: echo-v1, port: 80}}]
"#
    )
}

struct Mesh {
    net: u8,
    waypoint: SocketAddr,
    client_cert: WorkloadCert,
    zt: Ztunnel,
    echo: Backend,
    echo_v1: Backend,
    /// TCP connections the HTTP/2 backend accepted.
    h2_conns: Arc<AtomicU32>,
    /// The waypoint, on the configuration file the watcher reloads; its mesh-model
    /// document.
    live: Watched,
    model: String,
}

/// An HTTP/2 (prior knowledge) backend answering `h2echo <path> <version> xff=<…>`; counts
/// the TCP connections it accepted.
fn h2_backend(ip: Ipv4Addr) -> (SocketAddr, Arc<AtomicU32>) {
    let conns = Arc::new(AtomicU32::new(0));
    let c2 = conns.clone();
    let addr = serve_async(ip, move |tcp| {
        c2.fetch_add(1, Ordering::SeqCst);
        async move {
            let io = monoio::io::IntoPollIo::into_poll_io(tcp).unwrap();
            let Ok(mut conn) = h2::server::handshake(io).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                if req.uri().path() == "/h2/sum" {
                    // The body's length and checksum, read as it comes; the same
                    // in a trailer.
                    monoio::spawn(async move {
                        let mut body = req.into_body();
                        let (mut n, mut h) = (0usize, common::FNV0);
                        while let Some(Ok(c)) = body.data().await {
                            let _ = body.flow_control().release_capacity(c.len());
                            n += c.len();
                            h = common::fnv_add(h, &c);
                        }
                        let text = format!("len={n} fnv={h:x}");
                        let resp = http::Response::builder().status(200).body(()).unwrap();
                        let mut tx = respond.send_response(resp, false).unwrap();
                        let _ = tx.send_data(Bytes::from(text.clone()), false);
                        let mut t = http::HeaderMap::new();
                        t.insert("x-sum", text.parse().unwrap());
                        let _ = tx.send_trailers(t);
                    });
                    continue;
                }
                monoio::spawn(async move {
                    let xff = req
                        .headers()
                        .get("x-forwarded-for")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let body = format!("h2echo {} {:?} xff={xff}", req.uri().path(), req.version());
                    let resp = http::Response::builder().status(200).body(()).unwrap();
                    let mut tx = respond.send_response(resp, false).unwrap();
                    let _ = tx.send_data(Bytes::from(body), true);
                });
            }
        }
    });
    (addr, conns)
}

/// A TCP backend that sends back every byte it reads and half-closes after the client's
/// half-close; a read starting `\x16RST` asks it to reset instead.
fn tcp_echo(ip: Ipv4Addr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || echo_back(&mut c, true));
        }
    });
    addr
}

impl Mesh {
    fn start() -> Mesh {
        Mesh::start_with(&deny_admin())
    }

    /// The mesh with `policies` (YAML documents) instead of the default DENY policy.
    fn start_with(policies: &str) -> Mesh {
        // A free 127.X.0.1:15008 for the stand-in ztunnel.
        let (net, ca, zt) = echo_node(7);
        let now = SystemTime::now();
        let client_cert = ca.issue(&id("app", "client"), now).unwrap();
        let echo = backend(ip(net, 2), "echo");
        let echo_v1 = backend(ip(net, 3), "echo-v1");
        let raw = tcp_echo(ip(net, 5));
        let (h2b, h2_conns) = h2_backend(ip(net, 7));
        let model = format!(
            r#"namespaces:
  - name: app
    labels: {{istio.io/dataplane-mode: ambient}}
  - name: other
    labels: {{istio.io/dataplane-mode: ambient}}
waypoints:
  - {{name: wp, namespace: app, address: 10.1.0.100}}
nodes:
  - {{name: node-b, ztunnel: {zt}}}
workloads:
  - {{uid: wp, name: wp, namespace: app, serviceAccount: waypoint, workloadIps: ["10.1.0.100"]}}
{clients}  - {{uid: echo-1, name: echo-1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: ["{e}"], services: {{"app/echo.app.svc.cluster.local": {{80: {ep}}}}}}}
  - {{uid: v1-1, name: v1-1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: ["{v}"], services: {{"app/echo-v1.app.svc.cluster.local": {{80: {vp}}}}}}}
  - {{uid: o1, name: o1, namespace: other, workloadIps: ["{o}"], services: {{"other/lone.other.svc.cluster.local": {{80: 8080}}}}}}
  - {{uid: h2-1, name: h2-1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: ["{h}"], services: {{"app/grpcish.app.svc.cluster.local": {{80: {hp}}}}}}}
  - {{uid: dead-1, name: dead-1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: ["{d}"], services: {{"app/dead.app.svc.cluster.local": {{80: 9}}}}}}
  - {{uid: raw-1, name: raw-1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: ["{r}"], services: {{"app/raw.app.svc.cluster.local": {{80: {rp}}}}}}}
services:
  - {{name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {{80: 8080}}}}
  - {{name: echo-v1, namespace: app, hostname: echo-v1.app.svc.cluster.local, vips: ["10.96.0.2"], ports: {{80: 8080}}}}
  - {{name: lone, namespace: other, hostname: lone.other.svc.cluster.local, vips: ["10.96.0.3"], ports: {{80: 8080}}}}
  - {{name: raw, namespace: app, hostname: raw.app.svc.cluster.local, vips: ["10.96.0.4"], ports: {{80: 8080}}}}
  - {{name: grpcish, namespace: app, hostname: grpcish.app.svc.cluster.local, vips: ["10.96.0.7"], ports: {{80: 8080}}}}
  - {{name: dead, namespace: app, hostname: dead.app.svc.cluster.local, vips: ["10.96.0.6"], ports: {{80: 8080}}}}
"#,
            zt = ip(net, 1),
            clients = common::CLIENT_WORKLOADS,
            e = echo.addr.ip(),
            ep = echo.addr.port(),
            v = echo_v1.addr.ip(),
            vp = echo_v1.addr.port(),
            o = ip(net, 4),
            d = ip(net, 6),
            h = h2b.ip(),
            hp = h2b.port(),
            r = raw.ip(),
            rp = raw.port(),
        );
        let text = format!("{model}---\n{}---\n{policies}", route());
        let dir = format!("waypoint-e2e-{}-{net}", std::process::id());
        let live = Watched::start(&ca, &dir, "e2e.yaml", text);
        Mesh {
            h2_conns,
            model,
            net,
            waypoint: live.handle().addr,
            live,
            client_cert,
            zt,
            echo,
            echo_v1,
        }
    }

    fn counters(&self) -> &service::Counters {
        &self.live.handle().counters
    }

    /// [`Mesh::requests`] of a GET for each of `paths` on `host`, which must not be refused.
    fn gets(&self, target: &str, host: &str, paths: &[&str]) -> Vec<(u16, String)> {
        let reqs: Vec<String> = paths.iter().map(|p| get(p, host)).collect();
        self.requests(target, &reqs).unwrap()
    }

    /// Open a tunnel to `target` through the waypoint and send each request on it.
    fn requests(&self, target: &str, reqs: &[String]) -> Result<Vec<(u16, String)>, HboneError> {
        let target: SocketAddr = target.parse().unwrap();
        let reqs = reqs.to_vec();
        block_on(async move {
            let c = connect(self.waypoint, &self.client_cert, id("app", "waypoint")).await?;
            let mut req = ConnectRequest::new(target);
            req.forwarded_for = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 7)));
            let mut s = c.open(&req).await?;
            let mut out = Vec::new();
            let mut buf = Vec::new();
            for r in reqs {
                let r = ask(&mut s, &mut buf, r).await;
                out.push((r.status, r.text()));
            }
            Ok(out)
        })
    }
}

/// Send `req` on the tunnel and read the whole response (bytes read past it stay in `buf`).
async fn ask(s: &mut H2Stream, buf: &mut Vec<u8>, req: String) -> Response {
    s.write_all(Bytes::from(req), false).await.unwrap();
    read_response(s, buf).await
}

/// Wait (generously) until `f` holds, on this thread.
fn settle(what: &str, f: impl FnMut() -> bool) {
    netlab::eventually(what, Duration::from_secs(30), f, String::new);
}

#[test]
fn r13_plaintext_http_to_the_waypoint_gets_nothing() {
    let m = Mesh::start();
    let mut c = std::net::TcpStream::connect(m.waypoint).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    // And the HBONE path works on the same port.
    let r = m.gets("10.96.0.1:80", ECHO, &["/"]);
    assert_eq!(r[0].0, 200);
    assert_eq!(m.echo_v1.seen(), vec!["/".to_string()]);
}

#[test]
fn r14_target_not_bound_to_the_waypoint_is_refused() {
    let m = Mesh::start();
    for target in [
        "10.96.0.3:80".to_string(),       // service without this waypoint
        format!("{}:8080", ip(m.net, 4)), // pod without this waypoint
        "10.9.9.9:80".to_string(),        // unknown
        "10.96.0.1:81".to_string(),       // bound service, no such port
    ] {
        match m.requests(&target, &[get("/", "x")]) {
            Err(HboneError::Status(s)) => assert_eq!(s.as_u16(), 400, "{target}"),
            other => panic!("{target}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(m.counters().refused_targets.load(Ordering::Relaxed), 4);
    assert!(m.zt.streams().is_empty());
}

#[test]
fn r15_deny_policy_answers_403_before_any_upstream_connection() {
    let m = Mesh::start();
    let r = m.gets("10.96.0.1:80", ECHO, &["/admin/users", "/admin"]);
    for (code, body) in &r {
        assert_eq!(*code, 403);
        assert_eq!(body, "RBAC: access denied");
    }
    assert!(m.echo.seen().is_empty());
    assert!(m.echo_v1.seen().is_empty());
    assert!(m.zt.streams().is_empty(), "an upstream stream was opened");
    assert_eq!(m.counters().upstream_streams.load(Ordering::Relaxed), 0);
    // Allowed paths on the same tunnel still go through.
    let r = m.gets("10.96.0.1:80", ECHO, &["/admin", "/ok"]);
    assert_eq!(r[0].0, 403);
    assert_eq!(r[1].0, 200);
    assert_eq!(m.echo_v1.seen(), vec!["/ok".to_string()]);
    let r = m.gets("10.96.0.1:80", ECHO, &["/secret", "/from-7"]);
    assert_eq!(r[0], (403, "RBAC: access denied".to_string()));
    assert_eq!(r[1], (403, "RBAC: access denied".to_string()));
    assert!(m.echo_v1.seen().is_empty());
}

#[test]
fn r16_pod_addressed_request_is_not_rerouted() {
    let m = Mesh::start();
    let pod = m.echo.addr.to_string();
    let r = m
        .requests(&pod, &[get("/direct", &pod), get("/again", &pod)])
        .unwrap();
    for (code, body) in &r {
        assert_eq!(*code, 200);
        assert!(body.starts_with("echo /"), "{body}");
    }
    assert_eq!(
        m.echo.seen(),
        vec!["/direct".to_string(), "/again".to_string()]
    );
    assert!(m.echo_v1.seen().is_empty());
    // Both requests on one upstream stream (kept alive for the tunnel).
    let seen = m.zt.streams();
    assert_eq!(seen.len(), 1);
    for (peer, target) in seen {
        assert_eq!(peer, Some(id("app", "waypoint")));
        assert_eq!(target, m.echo.addr);
    }
}

#[test]
fn r17_service_request_follows_the_echo_to_echo_v1_route() {
    let m = Mesh::start();
    let host = ECHO;
    let r = m.gets("10.96.0.1:80", host, &["/", "/anything/at/all?x=1"]);
    assert_eq!(r[0], (200, "echo-v1 / xff=10.1.0.7".to_string()));
    assert_eq!(
        r[1],
        (200, "echo-v1 /anything/at/all?x=1 xff=10.1.0.7".to_string())
    );
    assert!(m.echo.seen().is_empty());
    // Both requests on one upstream stream (kept alive for the tunnel).
    let seen = m.zt.streams();
    assert_eq!(seen.len(), 1);
    for (peer, target) in seen {
        // As the waypoint's identity, authority podIP:targetPort.
        assert_eq!(peer, Some(id("app", "waypoint")));
        assert_eq!(target, m.echo_v1.addr);
    }
    // echo-v1 itself (no route attached) routes to its own endpoints.
    let r = m.gets("10.96.0.2:80", V1, &["/self"]);
    assert_eq!(r[0].1, "echo-v1 /self xff=10.1.0.7");
    assert_eq!(m.counters().tunnels.load(Ordering::Relaxed), 2);
}

#[test]
fn upstream_chunked_and_eof_delimited_responses_keep_the_tunnel_usable() {
    let m = Mesh::start();
    let host = V1;
    let r = m.gets("10.96.0.2:80", host, &["/chunked", "/eof", "/after"]);
    assert_eq!(r[0].0, 200);
    assert_eq!(
        r[0].1,
        "3;x=y\r\nech\r\n1a\r\no-v1 /chunked xff=10.1.0.7\r\n0\r\nx-t: 1\r\n\r\n"
    );
    // End-of-connection delimited: re-framed chunked for the keep-alive tunnel.
    assert_eq!(
        r[1],
        (
            200,
            "19\r\necho-v1 /eof xff=10.1.0.7\r\n0\r\n\r\n".to_string()
        )
    );
    assert_eq!(r[2], (200, "echo-v1 /after xff=10.1.0.7".to_string()));
    // /eof reused the chunked response's stream; the stream it ended is not reused.
    assert_eq!(m.counters().upstream_streams.load(Ordering::Relaxed), 2);
    assert_eq!(m.echo_v1.seen(), vec!["/chunked", "/eof", "/after"]);
}

#[test]
fn chunked_end_table() {
    use waypoint::service::chunked_end;
    let table: [(&[u8], Option<usize>); 9] = [
        (b"0\r\n\r\n", Some(5)),
        (b"0\r\n\r\nextra", Some(5)),
        (b"3\r\nabc\r\n0\r\n\r\n", Some(13)),
        (b"3;ext=1\r\nabc\r\n0\r\nt: v\r\n\r\n", Some(25)),
        (b"3\r\nabc\r\n0\r\n", None),
        (b"a\r\nabc", None),
        (b"zz\r\n", None),
        // Strict: a bare LF is no line end (trailer smuggling).
        (b"0\r\n\nGET /admin HTTP/1.1\r\n\r\n", None),
        (b"0\r\nx\n\r\n", None),
    ];
    for (input, want) in table {
        assert_eq!(
            chunked_end(input),
            want,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn a_kept_stream_the_backend_closed_is_replaced_transparently() {
    let m = Mesh::start();
    let host = V1;
    let r = m.gets("10.96.0.2:80", host, &["/drop", "/next", "/last"]);
    assert_eq!(r[0], (200, "echo-v1 /drop xff=10.1.0.7".to_string()));
    assert_eq!(r[1], (200, "echo-v1 /next xff=10.1.0.7".to_string()));
    assert_eq!(r[2], (200, "echo-v1 /last xff=10.1.0.7".to_string()));
    assert_eq!(m.echo_v1.seen(), vec!["/drop", "/next", "/last"]);
    assert_eq!(m.counters().upstream_streams.load(Ordering::Relaxed), 2);
    assert_eq!(m.counters().upstream_errors.load(Ordering::Relaxed), 0);
}

/// Wait (generously) until `counter` reaches `want`.
async fn wait_for(counter: &std::sync::atomic::AtomicU64, want: u64) {
    let what = format!("the counter at {want}");
    wait_until(&what, || counter.load(Ordering::Relaxed) >= want).await;
}

/// The tunnels of the reload test come from here (no `forwarded` header).
const ME: &str = "127.0.0.1";

struct Tun {
    s: H2Stream,
    buf: Vec<u8>,
}

impl Tun {
    async fn ask(&mut self, path: &str) -> (u16, String) {
        let r = ask(&mut self.s, &mut self.buf, get(path, ECHO)).await;
        (r.status, r.text())
    }
}

#[test]
fn hot_reload_publishes_valid_edits_keeps_old_snapshot_on_broken_ones_and_live_tunnels_take_them() {
    let m = Mesh::start();
    let counters = m.live.handle().counters.clone();
    let (file, model, route) = (m.live.file.clone(), m.model.clone(), route());
    block_on(async {
        let c = connect(m.waypoint, &m.client_cert, id("app", "waypoint"))
            .await
            .unwrap();
        let open = || async {
            let s = c
                .open(&ConnectRequest::new("10.96.0.1:80".parse().unwrap()))
                .await
                .unwrap();
            Tun { s, buf: Vec::new() }
        };
        // Snapshot 1: the echo → echo-v1 route.
        let mut old = open().await;
        assert_eq!(old.ask("/a").await.1, format!("echo-v1 /a xff={ME}"));
        // A valid edit: the route removed and /blocked denied.
        let deny = deny_admin().replace("\"/admin*\"", "\"/admin*\", \"/blocked\"");
        std::fs::write(&file, format!("{model}---\n{deny}")).unwrap();
        wait_for(&counters.config_reloads, 1).await;
        // The tunnel opened before takes it at its next request: no route (echo routes to
        // itself), /blocked denied…
        assert_eq!(old.ask("/b").await.1, format!("echo /b xff={ME}"));
        assert_eq!(
            old.ask("/blocked").await,
            (403, "RBAC: access denied".into())
        );
        // …as a new one does.
        let mut new = open().await;
        assert_eq!(new.ask("/c").await.1, format!("echo /c xff={ME}"));
        assert_eq!(
            new.ask("/blocked").await,
            (403, "RBAC: access denied".into())
        );
        // A broken edit (unknown field, line 3 of the second document) is rejected and
        // the last good snapshot keeps serving.
        std::fs::write(
            &file,
            format!(
                "{model}---\n{route}---\n{}",
                deny.replace("action: DENY", "action: DENY\n  bogus: 1")
            ),
        )
        .unwrap();
        wait_for(&counters.config_reload_errors, 1).await;
        let mut after = open().await;
        assert_eq!(after.ask("/d").await.1, format!("echo /d xff={ME}"));
        assert_eq!(after.ask("/blocked").await.0, 403);
        assert_eq!(counters.config_reloads.load(Ordering::Relaxed), 1);
        // Fixed again: the route is back for new tunnels.
        std::fs::write(&file, format!("{model}---\n{route}---\n{}", deny_admin())).unwrap();
        wait_for(&counters.config_reloads, 2).await;
        let mut last = open().await;
        assert_eq!(last.ask("/e").await.1, format!("echo-v1 /e xff={ME}"));
    });
}

/// Open a CONNECT stream through the waypoint to `target`.
async fn tunnel_to(m: &Mesh, target: &str) -> (Client, H2Stream) {
    open_tunnel(m.waypoint, &m.client_cert, target).await
}

/// An HTTP/2 (prior knowledge) client connection inside a tunnel to `target`.
async fn h2_over_tunnel(m: &Mesh, target: &str) -> (Client, h2::client::SendRequest<Bytes>) {
    let (c, s) = tunnel_to(m, target).await;
    let (send, _) = h2_in_tunnel(s).await;
    (c, send)
}

/// An HTTP/2 response read whole.
struct H2Response {
    status: u16,
    /// Whether it carried a transfer-encoding field (never valid in HTTP/2).
    transfer_encoding: bool,
    body: Vec<u8>,
    trailers: Option<http::HeaderMap>,
}

impl H2Response {
    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }
}

/// Send `req` with `body` (none: the request ends with its head), as flow control lets it
/// go, in 256 KiB pieces; read the whole response, trailers included.
async fn h2_send(
    send: &h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Option<&[u8]>,
) -> H2Response {
    let mut send = send.clone().ready().await.unwrap();
    let (resp, mut tx) = send.send_request(req, body.is_none()).unwrap();
    if let Some(body) = body {
        for piece in body.chunks(256 * 1024) {
            let mut piece = Bytes::copy_from_slice(piece);
            while !piece.is_empty() {
                tx.reserve_capacity(piece.len());
                let cap = std::future::poll_fn(|cx| tx.poll_capacity(cx))
                    .await
                    .unwrap()
                    .unwrap();
                let n = cap.min(piece.len());
                tx.send_data(piece.split_to(n), false).unwrap();
            }
        }
        tx.send_data(Bytes::new(), true).unwrap();
    }
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let transfer_encoding = resp.headers().contains_key("transfer-encoding");
    let mut rx = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = rx.data().await {
        let chunk = chunk.unwrap();
        let _ = rx.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    let trailers = rx.trailers().await.unwrap();
    H2Response {
        status,
        transfer_encoding,
        body: out,
        trailers,
    }
}

fn h2_request(method: &str, host: &str, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{host}{path}"))
        .body(())
        .unwrap()
}

async fn h2_get(send: &h2::client::SendRequest<Bytes>, path: &str, host: &str) -> (u16, String) {
    let r = h2_send(send, h2_request("GET", host, path), None).await;
    (r.status, r.text())
}

#[test]
fn h2_prior_knowledge_many_concurrent_streams_policy_first_then_routing() {
    let m = Mesh::start();
    let host = ECHO;
    block_on(async {
        let (_c, send) = h2_over_tunnel(&m, "10.96.0.1:80").await;
        // 256 requests, 64 in flight at a time, on one tunnel.
        for round in 0..4 {
            let mut handles = Vec::new();
            for i in 0..64 {
                let send = send.clone();
                let path = format!("/r{round}/{i}");
                handles.push(monoio::spawn(async move {
                    let got = h2_get(&send, &path, host).await;
                    (path, got)
                }));
            }
            for h in handles {
                let (path, (status, body)) = h.await;
                assert_eq!(status, 200, "{path}");
                // The echo → echo-v1 route, x-forwarded-for added.
                assert_eq!(body, format!("echo-v1 {path} xff={ME}"));
            }
        }
        // Policy first: denied without an upstream request.
        let before = m.echo_v1.seen().len();
        assert_eq!(before, 256);
        assert_eq!(
            h2_get(&send, "/admin/x", host).await,
            (403, "RBAC: access denied".to_string())
        );
        assert!(m.echo_v1.seen().is_empty());
        assert_eq!(m.counters().http2_tunnels.load(Ordering::Relaxed), 1);
    });
    assert!(m.echo.seen().is_empty());
}

/// The `x-request-id` in a backend's answer to a `/rid` path.
fn rid_of(body: &str) -> &str {
    body.split_once(" rid=").map_or("", |(_, r)| r)
}

fn is_uuid4(id: &str) -> bool {
    let parts: Vec<&str> = id.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && parts[2].starts_with('4')
        && id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

/// Envoy's `x-request-id`: a request with its own keeps it; one without gets a new UUID
/// (a different one each), over HTTP/1.1 and HTTP/2 alike, and it is in the access log.
#[test]
fn x_request_id_is_kept_or_generated_over_both_protocols() {
    let m = Mesh::start();
    let own = format!("GET /rid HTTP/1.1\r\nhost: {V1}\r\nx-request-id: client-id-1\r\n\r\n");
    let got = m
        .requests("10.96.0.2:80", &[get("/rid", V1), get("/rid", V1), own])
        .unwrap();
    let ids: Vec<&str> = got.iter().map(|(_, b)| rid_of(b)).collect();
    assert!(is_uuid4(ids[0]) && is_uuid4(ids[1]), "{got:?}");
    assert_ne!(ids[0], ids[1]);
    assert_eq!(ids[2], "client-id-1");
    block_on(async {
        let (_c, send) = h2_over_tunnel(&m, "10.96.0.2:80").await;
        let (status, body) = h2_get(&send, "/rid", V1).await;
        assert_eq!(status, 200);
        assert!(is_uuid4(rid_of(&body)), "{body}");
        let mut req = h2_request("GET", V1, "/rid");
        req.headers_mut()
            .insert("x-request-id", "client-id-2".parse().unwrap());
        let r = h2_send(&send, req, None).await;
        assert_eq!(rid_of(&r.text()), "client-id-2");
    });
}

/// Read HTTP/2 frames from `s` until a GOAWAY: its error code.
async fn read_goaway(s: &mut H2Stream) -> u32 {
    read_until(s, &mut Vec::new(), |b| common::goaway(b)).await
}

#[test]
fn h2_invalid_frames_get_goaway_and_the_worker_keeps_serving() {
    let m = Mesh::start();
    block_on(async {
        let (_c, mut s) = tunnel_to(&m, "10.96.0.1:80").await;
        let mut bad = waypoint::inner::H2_PREFACE.to_vec();
        // An empty SETTINGS, then DATA on stream 0: a connection error (PROTOCOL_ERROR).
        bad.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        bad.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0, 0, b'x']);
        s.write_all(Bytes::from(bad), false).await.unwrap();
        assert_eq!(read_goaway(&mut s).await, 1, "GOAWAY(PROTOCOL_ERROR)");
    });
    settle("the protocol error counted", || {
        m.counters().h2_protocol_errors.load(Ordering::Relaxed) == 1
    });
    assert_eq!(m.counters().h2_protocol_errors.load(Ordering::Relaxed), 1);
    // The worker keeps serving: HTTP/1.1 and HTTP/2 tunnels after it.
    let r = m.gets("10.96.0.1:80", ECHO, &["/after"]);
    assert_eq!(r[0].0, 200);
    block_on(async {
        let (_c, send) = h2_over_tunnel(&m, "10.96.0.2:80").await;
        let (status, body) = h2_get(&send, "/h2-after", V1).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "echo-v1 /h2-after xff=127.0.0.1")
        );
    });
}

/// Send `data` on the tunnel from a task of its own, in 100 kB writes, then half-close;
/// read what comes back until the far end's half-close (a reset fails), after `got`.
async fn echo_through(s: H2Stream, data: &[u8], mut got: Vec<u8>) -> Vec<u8> {
    let (mut w, mut r) = s.split();
    let sent = data.to_vec();
    let writer = monoio::spawn(async move {
        for chunk in sent.chunks(100_000) {
            w.write_all(Bytes::copy_from_slice(chunk), false)
                .await
                .unwrap();
        }
        // Half-close: the far end answers everything, then closes its side.
        w.write_all(Bytes::new(), true).await.unwrap();
        w
    });
    loop {
        match r.read().await {
            Some(Ok(b)) => got.extend_from_slice(&b),
            Some(Err(e)) => panic!("reset: {e}"),
            None => break,
        }
    }
    let _w = writer.await;
    got
}

#[test]
fn opaque_tcp_is_forwarded_byte_exact_with_half_close() {
    // No DENY policy here: see the test below for TCP under HTTP-only DENY rules.
    let m = Mesh::start_with("");
    let data = payload(8 * 1024 * 1024 + 17);
    let want = fnv(&data);
    let got = block_on(async {
        let (_c, s) = tunnel_to(&m, "10.96.0.4:80").await;
        echo_through(s, &data, Vec::new()).await
    });
    assert_eq!(got.len(), data.len());
    assert_eq!(fnv(&got), want);
    let c = m.counters();
    settle("the tunnel's bytes counted", || {
        c.tcp_bytes_received.load(Ordering::Relaxed) == data.len() as u64
    });
    assert_eq!(c.tcp_tunnels.load(Ordering::Relaxed), 1);
    assert_eq!(c.tcp_bytes_sent.load(Ordering::Relaxed), data.len() as u64);
    assert_eq!(
        c.tcp_bytes_received.load(Ordering::Relaxed),
        data.len() as u64
    );
    let seen = m.zt.streams();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, Some(id("app", "waypoint")));
}

/// Send non-HTTP bytes on a tunnel to `target`; whether the waypoint refused it (reset
/// with no byte back).
fn tcp_refused(m: &Mesh, target: &str) -> bool {
    block_on(async {
        let (_c, mut s) = tunnel_to(m, target).await;
        s.write_all(Bytes::from_static(b"\x16hello"), true)
            .await
            .unwrap();
        match s.read().await {
            Some(Err(_)) => true,
            Some(Ok(b)) => {
                // Forwarded: the echo's answer.
                assert_eq!(&b[..], b"\x16hello");
                false
            }
            None => panic!("closed without a reset or a byte"),
        }
    })
}

#[test]
fn r15_opaque_tcp_policy_follows_istio_rules_for_http_only_fields() {
    // DENY with only HTTP fields (paths): for TCP those fields are ignored, so it denies.
    let m = Mesh::start();
    assert!(tcp_refused(&m, "10.96.0.4:80"));
    assert_eq!(m.counters().tcp_denied.load(Ordering::Relaxed), 1);
    assert!(m.zt.streams().is_empty(), "an upstream stream was opened");
    drop(m);
    // ALLOW with an HTTP-only field (methods) never matches TCP: refused; an ALLOW on
    // L4 fields (principals, ports) matches.
    let allow = |op: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow, namespace: app}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: raw}}]\n  action: ALLOW\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/app/sa/client\"]}}}}]\n    to: [{{operation: {op}}}]\n")
    };
    let m = Mesh::start_with(&allow("{methods: [GET]}"));
    assert!(tcp_refused(&m, "10.96.0.4:80"));
    assert_eq!(m.counters().tcp_denied.load(Ordering::Relaxed), 1);
    drop(m);
    let m = Mesh::start_with(&allow("{ports: [\"80\"]}"));
    assert!(!tcp_refused(&m, "10.96.0.4:80"));
    assert_eq!(m.counters().tcp_denied.load(Ordering::Relaxed), 0);
}

/// Routes on echo-v1 that exercise timeouts, retries, mirrors and query matching.
const EXEC_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: exec, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v1}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /hang}}]
    backendRefs: [{name: echo-v1, port: 80}]
    timeouts: {backendRequest: 200ms}
  - matches: [{path: {type: PathPrefix, value: /total}}]
    backendRefs: [{name: echo-v1, port: 80}]
    timeouts: {request: 300ms}
  - matches: [{path: {type: PathPrefix, value: /noretry}}]
    backendRefs: [{name: echo-v1, port: 80}]
    retry: {attempts: 0}
  - matches: [{path: {type: PathPrefix, value: /dead}}]
    backendRefs: [{name: dead, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo, port: 80}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{queryParams: [{name: "a b", value: "x/y"}]}]
    backendRefs: [{name: echo, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80}]
"#;

fn req(method: &str, path: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: {V1}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn timeouts_answer_504_against_a_slow_backend_and_the_tunnel_stays_usable() {
    let m = Mesh::start_with(EXEC_ROUTE);
    let r = m.gets("10.96.0.2:80", V1, &["/hang", "/total/hang", "/ok"]);
    // backendRequest, then request timeout: 504, the try not repeated.
    assert_eq!(r[0], (504, "upstream request timeout".to_string()));
    assert_eq!(r[1], (504, "upstream request timeout".to_string()));
    assert_eq!(r[2], (200, "echo-v1 /ok xff=10.1.0.7".to_string()));
    assert_eq!(m.echo_v1.seen(), vec!["/hang", "/total/hang", "/ok"]);
    assert_eq!(m.counters().upstream_timeouts.load(Ordering::Relaxed), 2);
    assert_eq!(m.counters().retries.load(Ordering::Relaxed), 0);
}

#[test]
fn retries_against_a_failing_backend_follow_istio_defaults_and_the_route() {
    let m = Mesh::start_with(EXEC_ROUTE);
    // 503 then 200: retried once, the client sees 200.
    let r = m.gets("10.96.0.2:80", V1, &["/flaky"]);
    assert_eq!(r[0], (200, "echo-v1 /flaky xff=10.1.0.7".to_string()));
    assert_eq!(m.echo_v1.seen(), vec!["/flaky", "/flaky"]);
    // Always 503: 1 try + 2 retries (Istio's default), then the 503 itself.
    let r = m.gets("10.96.0.2:80", V1, &["/fail"]);
    assert_eq!(r[0], (503, "fail".to_string()));
    assert_eq!(m.echo_v1.seen(), vec!["/fail", "/fail", "/fail"]);
    // A POST with a body is not re-sent; a PUT (idempotent) is.
    let r = m
        .requests(
            "10.96.0.2:80",
            &[req("POST", "/fail", "data"), req("PUT", "/fail", "data")],
        )
        .unwrap();
    assert_eq!((r[0].0, r[1].0), (503, 503));
    assert_eq!(m.echo_v1.seen(), vec!["/fail"; 4]);
    // retry: {attempts: 0} on the route: one try.
    let r = m.gets("10.96.0.2:80", V1, &["/noretry/fail"]);
    assert_eq!(r[0].0, 503);
    assert_eq!(m.echo_v1.seen(), vec!["/noretry/fail"]);
    assert_eq!(m.counters().retries.load(Ordering::Relaxed), 1 + 2 + 2);
    // Nothing listens behind `dead`: connect failure, retried, then 503 (not 502).
    let dead = SocketAddr::new(IpAddr::V4(ip(m.net, 6)), 9);
    let _ = m.zt.streams();
    let r = m.gets("10.96.0.2:80", V1, &["/dead", "/ok"]);
    assert_eq!(r[0].0, 503);
    assert!(r[0].1.starts_with("upstream connect error"), "{}", r[0].1);
    assert_eq!(r[1].0, 200, "the tunnel stays usable after a 503");
    let tries = m.zt.streams().iter().filter(|(_, t)| *t == dead).count();
    assert_eq!(tries, 3);
}

#[test]
fn request_mirror_is_fire_and_forget_and_chunked_bodies_and_decoded_queries_route() {
    let m = Mesh::start_with(EXEC_ROUTE);
    let chunked = format!(
        "POST /post HTTP/1.1\r\nhost: {V1}\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n"
    );
    let r = m
        .requests(
            "10.96.0.2:80",
            &[get("/mirror", V1), chunked, get("/q?a%20b=x%2Fy", V1)],
        )
        .unwrap();
    assert_eq!(r[0], (200, "echo-v1 /mirror xff=10.1.0.7".to_string()));
    assert_eq!(
        r[1],
        (200, "echo-v1 /post xff=10.1.0.7 body=wikipedia".to_string())
    );
    // The decoded query parameter matched the rule that sends to echo.
    assert_eq!(r[2], (200, "echo /q?a%20b=x%2Fy xff=10.1.0.7".to_string()));
    // The mirror's copy reached echo, with the -shadow host.
    let shadow = m.echo.paths.recv_timeout(Duration::from_secs(30)).unwrap();
    let next = m.echo.paths.recv_timeout(Duration::from_secs(30)).unwrap();
    let mut got = vec![shadow, next];
    got.sort();
    assert_eq!(got, vec!["/q?a%20b=x%2Fy", "shadow:/mirror"]);
    assert_eq!(m.counters().mirrored.load(Ordering::Relaxed), 1);
}

#[test]
fn telemetry_istio_request_metrics_keep_the_original_client_and_traceparent() {
    let m = Mesh::start();
    let host = ECHO;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = m
        .requests(
            "10.96.0.1:80",
            &[
                get("/a", host),
                get("/b", host),
                format!("GET /trace HTTP/1.1\r\nhost: {host}\r\ntraceparent: {tp}\r\n\r\n"),
                format!("GET /trace2 HTTP/1.1\r\nhost: {host}\r\ntraceparent: junk\r\n\r\n"),
                get("/admin", host),
            ],
        )
        .unwrap();
    assert_eq!(r[0].0, 200);
    // A valid traceparent is propagated as is; an invalid one is replaced by a valid one.
    assert_eq!(r[2].1, format!("echo-v1 /trace xff=10.1.0.7 tp={tp}"));
    let new_tp = r[3].1.rsplit("tp=").next().unwrap();
    assert!(waypoint::telemetry::valid_traceparent(new_tp), "{new_tp}");
    assert_eq!(r[4].0, 403);
    let metrics = &m.live.handle().metrics;
    let labels =
        |code: u16, svc: &str, wl: &str, principal: &str| waypoint::telemetry::RequestLabels {
            // The model's workload at the client's address, which runs as the verified
            // identity, and that identity's namespace.
            source_workload: "client-7".into(),
            source_workload_namespace: "app".into(),
            source_principal: "spiffe://cluster.local/ns/app/sa/client".into(),
            destination_service: format!("{svc}.app.svc.cluster.local"),
            destination_service_name: svc.into(),
            destination_service_namespace: "app".into(),
            destination_workload: wl.into(),
            destination_workload_namespace: if wl == "unknown" { "unknown" } else { "app" }.into(),
            destination_principal: principal.into(),
            // No labels, canonical names or cluster in this model: the workload name,
            // `latest`, `unknown` (istiod's defaults).
            source: waypoint::telemetry::WorkloadLabels {
                app: "client-7".into(),
                version: "latest".into(),
                canonical_service: "client-7".into(),
                canonical_revision: "latest".into(),
                cluster: "unknown".into(),
            },
            destination: if wl == "unknown" {
                waypoint::telemetry::WorkloadLabels::unknown()
            } else {
                waypoint::telemetry::WorkloadLabels {
                    app: wl.into(),
                    version: "latest".into(),
                    canonical_service: wl.into(),
                    canonical_revision: "latest".into(),
                    cluster: "unknown".into(),
                }
            },
            request_protocol: "http",
            response_code: code,
            grpc_response_status: String::new(),
            response_flags: "-",
            tweaks: None,
        };
    // Routed echo → echo-v1: the destination is the service and pod that answered.
    let ok = metrics
        .lookup(&labels(
            200,
            "echo-v1",
            "v1-1",
            "spiffe://cluster.local/ns/app/sa/echo",
        ))
        .unwrap_or_else(|| panic!("{:#?}", metrics.label_sets()));
    assert_eq!(ok.requests.load(Ordering::Relaxed), 4);
    assert_eq!(ok.duration_ms.count(), 4);
    assert_eq!(ok.response_bytes.count(), 4);
    // Denied before routing: the addressed service, no workload.
    let denied = metrics
        .lookup(&labels(403, "echo", "unknown", "unknown"))
        .unwrap_or_else(|| panic!("{:#?}", metrics.label_sets()));
    assert_eq!(denied.requests.load(Ordering::Relaxed), 1);
    assert_eq!(m.counters().denied.load(Ordering::Relaxed), 1);
    let text = metrics.render();
    assert!(text.contains("# TYPE istio_requests_total counter"));
    assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram"));
    assert!(text.contains("istio_request_bytes_bucket{reporter=\"waypoint\""));
    assert!(text.contains("connection_security_policy=\"mutual_tls\""));
}

#[test]
fn h2_client_to_a_use_client_protocol_service_gets_h2_upstream_multiplexed_on_one_connection() {
    let m = Mesh::start_with(&format!("{}---\n{USE_CLIENT_PROTOCOL}", deny_admin()));
    let host = "grpcish.app.svc.cluster.local";
    block_on(async {
        for _tunnel in 0..2 {
            let (_c, send) = h2_over_tunnel(&m, "10.96.0.7:80").await;
            let mut handles = Vec::new();
            for i in 0..50 {
                let send = send.clone();
                handles.push(monoio::spawn(async move {
                    let path = format!("/s{i}");
                    (path.clone(), h2_get(&send, &path, host).await)
                }));
            }
            for h in handles {
                let (path, (status, body)) = h.await;
                assert_eq!(status, 200);
                // HTTP/2 reached the backend, with x-forwarded-for added.
                assert_eq!(body, format!("h2echo {path} HTTP/2.0 xff={ME}"));
            }
            // Policy still first.
            assert_eq!(h2_get(&send, "/admin", host).await.0, 403);
        }
    });
    // 100 requests from two tunnels on one upstream HTTP/2 connection (per worker).
    assert_eq!(m.h2_conns.load(Ordering::SeqCst), 1);
    assert_eq!(
        m.counters().upstream_h2_connections.load(Ordering::Relaxed),
        1
    );
}

#[test]
fn opaque_tcp_reset_by_the_backend_reaches_the_client_as_a_stream_reset() {
    let m = Mesh::start_with("");
    block_on(async {
        let (_c, mut s) = tunnel_to(&m, "10.96.0.4:80").await;
        // Forwarded bytes first (the echo answers), then the reset.
        s.write_all(Bytes::from_static(b"\x16hello"), false)
            .await
            .unwrap();
        assert_eq!(&s.read().await.unwrap().unwrap()[..], b"\x16hello");
        s.write_all(Bytes::from_static(b"\x16RST"), false)
            .await
            .unwrap();
        match s.read().await {
            Some(Err(e)) => assert!(e.is_reset(), "{e}"),
            other => panic!("expected a reset, got {other:?}"),
        }
    });
    // The tunnel adds `sent`, then `received`, when it ends: wait for both (generously),
    // so the check never lands between the two.
    let c = m.counters();
    settle("both directions counted", || {
        c.tcp_bytes_sent.load(Ordering::Relaxed) >= 10
            && c.tcp_bytes_received.load(Ordering::Relaxed) >= 6
    });
    assert_eq!(c.tcp_bytes_sent.load(Ordering::Relaxed), 10);
    assert_eq!(c.tcp_bytes_received.load(Ordering::Relaxed), 6);
}

/// Write `body` in 1 MiB pieces (each a chunk when `chunked`).
async fn write_body(s: &mut H2Stream, body: &[u8], chunked: bool) {
    for piece in body.chunks(1 << 20) {
        if chunked {
            let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
            c.extend_from_slice(piece);
            c.extend_from_slice(b"\r\n");
            s.write_all(Bytes::from(c), false).await.unwrap();
        } else {
            s.write_all(Bytes::copy_from_slice(piece), false)
                .await
                .unwrap();
        }
    }
    if chunked {
        s.write_all(Bytes::from_static(b"0\r\n\r\n"), false)
            .await
            .unwrap();
    }
}

#[test]
fn large_bodies_are_streamed_both_ways_byte_exact() {
    // Request bodies of 80 MiB (Content-Length) and 3 MiB (chunked), responses of 100 MiB
    // (Content-Length) and 70 MiB (chunked): all over the old 64 MiB whole-body limit or
    // the replay buffer, all on one keep-alive tunnel, checked by checksum.
    let m = Mesh::start_with("");
    let (cl_len, ch_len, resp_len, resp_ch_len) =
        (80 << 20, 3 << 20, 100 << 20, (70 << 20) + 12_345);
    let big = payload(cl_len);
    let (_c, out) = block_on(async {
        let (c, mut s) = tunnel_to(&m, "10.96.0.2:80").await;
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for (framing, body, chunked) in [
            (format!("content-length: {cl_len}"), &big[..], false),
            (
                "transfer-encoding: chunked".to_string(),
                &big[..ch_len],
                true,
            ),
        ] {
            let head = format!("POST /stream/sum HTTP/1.1\r\nhost: {V1}\r\n{framing}\r\n\r\n");
            s.write_all(Bytes::from(head), false).await.unwrap();
            write_body(&mut s, body, chunked).await;
            out.push(read_response(&mut s, &mut buf).await);
        }
        for path in [
            format!("/stream/gen/{resp_len}"),
            format!("/stream/genchunked/{resp_ch_len}"),
            "/after".to_string(),
        ] {
            out.push(ask(&mut s, &mut buf, get(&path, V1)).await);
        }
        (c, out)
    });
    let text = |r: &Response| String::from_utf8_lossy(&r.decoded()).into_owned();
    assert_eq!(
        (out[0].status, text(&out[0])),
        (200, format!("len={cl_len} fnv={:x}", fnv(&big)))
    );
    assert_eq!(
        (out[1].status, text(&out[1])),
        (200, format!("len={ch_len} fnv={:x}", fnv(&big[..ch_len])))
    );
    assert_eq!(out[2].status, 200);
    let body = out[2].decoded();
    assert_eq!((body.len(), fnv(&body)), (resp_len, blocks_fnv(resp_len)));
    assert!(
        out[3].head.contains("transfer-encoding: chunked"),
        "{}",
        out[3].head
    );
    let body = out[3].decoded();
    assert_eq!(
        (body.len(), fnv(&body)),
        (resp_ch_len, blocks_fnv(resp_ch_len))
    );
    assert_eq!(text(&out[4]), "echo-v1 /after xff=127.0.0.1");
    let c = m.counters();
    assert_eq!(c.streamed_bodies.load(Ordering::Relaxed), 2);
    // One upstream stream carried all five exchanges.
    assert_eq!(c.upstream_streams.load(Ordering::Relaxed), 1);
    assert_eq!(c.upstream_errors.load(Ordering::Relaxed), 0);
}

#[test]
fn only_bodies_within_the_replay_buffer_are_retried() {
    // PUT is idempotent: with a small body the 503 is retried twice (Istio's default);
    // with a body over the replay buffer it was streamed and is not retried.
    let m = Mesh::start_with("");
    let small = "x".repeat(1000);
    let large = "y".repeat(waypoint::http1::REPLAY_BUFFER + 1);
    let r = m
        .requests(
            "10.96.0.2:80",
            &[
                req("PUT", "/small/fail", &small),
                req("PUT", "/large/fail", &large),
            ],
        )
        .unwrap();
    assert_eq!((r[0].0, r[1].0), (503, 503));
    assert_eq!(
        m.echo_v1.seen(),
        vec!["/small/fail", "/small/fail", "/small/fail", "/large/fail"]
    );
    let c = m.counters();
    assert_eq!(c.retries.load(Ordering::Relaxed), 2);
    assert_eq!(c.streamed_bodies.load(Ordering::Relaxed), 1);
}

#[test]
fn expect_100_continue_is_answered_after_policy_and_a_denial_skips_the_body() {
    let m = Mesh::start();
    let body = payload(300_000);
    let (first, done, denied, after_denied) = block_on(async {
        let (_c, mut s) = tunnel_to(&m, "10.96.0.2:80").await;
        let mut buf = Vec::new();
        let head = format!(
            "POST /stream/sum HTTP/1.1\r\nhost: {V1}\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        // Nothing of the body is sent before the 100.
        let first = ask(&mut s, &mut buf, head).await;
        write_body(&mut s, &body, false).await;
        let done = read_response(&mut s, &mut buf).await;
        // Denied: 403 at once, the body never sent, the tunnel ends.
        let (_c2, mut s2) = tunnel_to(&m, "10.96.0.2:80").await;
        let head = format!(
            "POST /admin/x HTTP/1.1\r\nhost: {V1}\r\nexpect: 100-continue\r\ncontent-length: 1000000\r\n\r\n"
        );
        let mut buf2 = Vec::new();
        let denied = ask(&mut s2, &mut buf2, head).await;
        let after = s2.read().await;
        (first, done, denied, after.is_none() && buf2.is_empty())
    });
    assert_eq!(first.status, 100, "{}", first.head);
    assert_eq!(
        (done.status, done.text()),
        (200, format!("len={} fnv={:x}", body.len(), fnv(&body)))
    );
    assert_eq!(
        (denied.status, denied.text()),
        (403, "RBAC: access denied".to_string())
    );
    assert!(after_denied, "the tunnel ends after the denial");
    assert_eq!(m.echo_v1.seen(), vec!["/stream/sum"]);
    assert_eq!(m.counters().continues.load(Ordering::Relaxed), 1);
}

#[test]
fn upgrade_after_101_splices_raw_bytes_both_ways_with_half_close() {
    let m = Mesh::start_with("");
    let data = payload(2 * 1024 * 1024 + 5);
    let (status, got) = block_on(async {
        let (_c, mut s) = tunnel_to(&m, "10.96.0.2:80").await;
        let head = format!(
            "GET /stream/upgrade HTTP/1.1\r\nhost: {V1}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        let mut buf = Vec::new();
        let status = ask(&mut s, &mut buf, head).await.status;
        // Spliced bytes read with the 101 come first.
        (status, echo_through(s, &data, buf).await)
    });
    assert_eq!(status, 101);
    assert_eq!((got.len(), fnv(&got)), (data.len(), fnv(&data)));
    assert_eq!(m.counters().upgrades.load(Ordering::Relaxed), 1);
}

#[test]
fn a_tunnel_closed_before_its_first_byte_opens_no_upstream_stream() {
    let m = Mesh::start_with("");
    let ended = block_on(async {
        let (_c, mut s) = tunnel_to(&m, "10.96.0.2:80").await;
        s.write_all(Bytes::new(), true).await.unwrap();
        // The waypoint ends its half too.
        s.read().await.is_none()
    });
    assert!(ended);
    let c = m.counters();
    assert_eq!(c.empty_tunnels.load(Ordering::Relaxed), 1);
    assert_eq!(c.tcp_tunnels.load(Ordering::Relaxed), 0);
    assert_eq!(c.upstream_streams.load(Ordering::Relaxed), 0);
    assert!(m.zt.streams().is_empty());
}

#[test]
fn h2_requests_stream_bodies_both_ways_to_an_http1_upstream() {
    // HTTP/2 inside the tunnel, HTTP/1.1 upstream: a 3 MiB request body of unknown length
    // (sent upstream chunked), a 5 MiB Content-Length body, a 20 MiB chunked response
    // (decoded as it passes) and a 70 MiB Content-Length response, each checksummed.
    let m = Mesh::start_with("");
    let up = payload(5 << 20);
    let (sums, gets) = block_on(async {
        let (_c, send) = h2_over_tunnel(&m, "10.96.0.2:80").await;
        let mut sums = Vec::new();
        for (len, declared) in [(3 << 20, false), (5 << 20, true)] {
            let mut req = h2_request("POST", V1, "/stream/sum");
            if declared {
                req.headers_mut().insert("content-length", len.into());
            }
            let r = h2_send(&send, req, Some(&up[..len])).await;
            sums.push((r.status, r.text(), len));
        }
        let mut gets = Vec::new();
        for (path, len) in [
            (format!("/stream/genchunked/{}", 20 << 20), 20 << 20),
            (format!("/stream/gen/{}", 70 << 20), 70 << 20),
        ] {
            let r = h2_send(&send, h2_request("GET", V1, &path), None).await;
            gets.push((r.transfer_encoding, r.body.len(), fnv(&r.body), len));
        }
        (sums, gets)
    });
    for (status, text, len) in sums {
        assert_eq!(
            (status, text),
            (200, format!("len={len} fnv={:x}", fnv(&up[..len])))
        );
    }
    for (te, n, h, len) in gets {
        assert!(!te, "no transfer-encoding in HTTP/2");
        assert_eq!((n, h), (len, blocks_fnv(len)));
    }
    assert_eq!(m.counters().streamed_bodies.load(Ordering::Relaxed), 2);
}

#[test]
fn h2_to_an_h2_upstream_streams_bodies_and_relays_trailers() {
    // useClientProtocol: a 6 MiB request body (over the replay buffer: streamed), and a
    // small one (buffered); the backend's checksum comes back in the body and in a
    // trailer.
    let m = Mesh::start_with(USE_CLIENT_PROTOCOL);
    let host = "grpcish.app.svc.cluster.local";
    let data = payload(6 << 20);
    let got = block_on(async {
        let (_c, send) = h2_over_tunnel(&m, "10.96.0.7:80").await;
        let mut got = Vec::new();
        for len in [6 << 20, 1000] {
            let req = h2_request("POST", host, "/h2/sum");
            let r = h2_send(&send, req, Some(&data[..len])).await;
            let trailer = r
                .trailers
                .as_ref()
                .and_then(|t| t.get("x-sum").map(|v| v.to_str().unwrap().to_string()));
            got.push((r.status, r.text(), trailer, len));
        }
        got
    });
    for (status, body, trailer, len) in got {
        let want = format!("len={len} fnv={:x}", fnv(&data[..len]));
        assert_eq!((status, &body), (200, &want));
        assert_eq!(trailer.as_deref(), Some(want.as_str()));
    }
    assert_eq!(m.counters().streamed_bodies.load(Ordering::Relaxed), 1);
    assert_eq!(m.h2_conns.load(Ordering::SeqCst), 1);
}

#[test]
fn h2c_upgrade_is_not_passed_on_and_later_requests_stay_under_policy() {
    // A lenient backend would switch to any protocol asked for and take what follows as raw
    // bytes: an h2c upgrade must not reach it, so the next request on the tunnel is still
    // parsed, checked by policy (DENY /admin*) and answered 403 by the waypoint.
    let m = Mesh::start_with(&deny_admin());
    let (first, second) = block_on(async {
        let (_c, mut s) = tunnel_to(&m, "10.96.0.2:80").await;
        let head = format!(
            "GET /stream/upgrade HTTP/1.1\r\nhost: {V1}\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        );
        let mut buf = Vec::new();
        let first = ask(&mut s, &mut buf, head).await;
        let second = ask(&mut s, &mut buf, get("/admin/x", V1)).await;
        (first, second)
    });
    assert_eq!(first.status, 200, "{}", first.head);
    assert_eq!(second.status, 403, "{}", second.head);
    assert_eq!(second.decoded(), b"RBAC: access denied");
    assert_eq!(m.counters().upgrades.load(Ordering::Relaxed), 0);
}

#[test]
fn an_early_413_stops_the_streamed_body_and_reaches_the_client() {
    // The backend answers 413 after the head of a 1 GiB upload and stops reading: far more
    // than every window and socket buffer on the way, so a proxy that sends the whole body
    // before reading the response never gets to it. The waypoint passes the 413 on, stops
    // sending, and closes the tunnel (the rest of the body is not drained).
    let m = Mesh::start_with("");
    let len: u64 = 1 << 30;
    let (resp, ended) = block_on(async {
        let (_c, s) = tunnel_to(&m, "10.96.0.2:80").await;
        let (mut w, mut r) = s.split();
        let writer = monoio::spawn(async move {
            let head = format!(
                "POST /stream/early HTTP/1.1\r\nhost: {V1}\r\ncontent-length: {len}\r\n\r\n"
            );
            if w.write_all(Bytes::from(head), false).await.is_err() {
                return w;
            }
            let block = Bytes::from(payload(1 << 20));
            for _ in 0..(len >> 20) {
                if w.write_all(block.clone(), false).await.is_err() {
                    break;
                }
            }
            w
        });
        let resp = read_response(&mut r, &mut Vec::new()).await;
        // Then the waypoint ends the tunnel (end of stream or reset).
        let ended = loop {
            match r.read().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => break true,
            }
        };
        drop(r);
        drop(writer);
        (resp, ended)
    });
    assert_eq!(
        (resp.status, resp.decoded().as_slice()),
        (413, &b"too big!"[..])
    );
    assert!(ended);
    assert_eq!(m.echo_v1.seen(), ["/stream/early"]);
    // The waypoint serves on.
    let out = m.gets("10.96.0.2:80", V1, &["/after"]);
    assert_eq!(out[0].0, 200);
}

#[test]
fn mirrored_responses_are_streamed_and_discarded_whatever_their_size() {
    // The mirror's copy gets a response larger than anything the waypoint buffers
    // (MAX_RESPONSE): read and thrown away as it comes, it completes instead of failing.
    let m = Mesh::start_with(&mirror_route("big-mirror", "/stream/gen"));
    let n = waypoint::service::MAX_RESPONSE + (1 << 20);
    let c = m.counters();
    let got = block_on(async {
        let (_c, mut s) = tunnel_to(&m, "10.96.0.2:80").await;
        let r = ask(
            &mut s,
            &mut Vec::new(),
            get(&format!("/stream/gen/{n}"), V1),
        )
        .await;
        wait_until("the mirror done", || {
            c.mirrors_completed.load(Ordering::Relaxed) + c.mirror_errors.load(Ordering::Relaxed)
                > 0
        })
        .await;
        (r.status, r.decoded().len())
    });
    assert_eq!(got, (200, n));
    assert_eq!(c.mirrored.load(Ordering::Relaxed), 1);
    assert_eq!(c.mirror_errors.load(Ordering::Relaxed), 0);
    assert_eq!(c.mirrors_completed.load(Ordering::Relaxed), 1);
}

#[test]
fn mirrors_in_flight_are_capped_per_worker_and_the_rest_skipped() {
    // Every mirrored copy stalls at the backend (never answered); the primary requests are
    // answered at once. One tunnel, so one worker: past the cap, mirrors are skipped.
    let m = Mesh::start_with(&mirror_route("stall-mirror", "/mirror-stall"));
    let cap = waypoint::service::MAX_MIRRORS_IN_FLIGHT;
    let reqs: Vec<String> = (0..cap + 3)
        .map(|i| get(&format!("/mirror-stall/{i}"), V1))
        .collect();
    let out = m.requests("10.96.0.2:80", &reqs).unwrap();
    assert!(out.iter().all(|(s, _)| *s == 200));
    let c = m.counters();
    assert_eq!(c.mirrored.load(Ordering::Relaxed), cap as u64);
    assert_eq!(c.mirrors_skipped.load(Ordering::Relaxed), 3);
}
