//! Fixtures shared by the waypoint's test files: the spec's R17 route, an epoll runtime,
//! the stand-in destination-node ztunnel (an HBONE server that bridges each CONNECT stream
//! to its target), HTTP/1.1 framing for the test servers and clients, test payloads and
//! their checksum, and the `waypoint` binary as a child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use hbone::ca::WorkloadCert;
use hbone::client::Client;
use hbone::server::{serve_connection, Inbound, ServerCounters};
use hbone::stream::{H2Reader, H2Stream};
use hbone::tls::TlsCounters;
use hbone::{H2Settings, HboneError, Identity};
use runtime::config::RuntimeConfig;
use runtime::driver::{build_runtime, DriverDecision, DriverKind};
use waypoint::route::ObjectRef;
use waypoint::service::Settings;
use waypoint::target::Me;

#[allow(unused_imports)] // each test file uses some of the helpers
pub use waypoint::spec_example::{
    echo_route_in as spec_echo_route_in, ECHO_ROUTE as SPEC_ECHO_ROUTE,
};

/// The example's route on Service `echo` with `rules` (items of `spec.rules`, indented two
/// spaces) instead of its single rule.
pub fn echo_route_with_rules(rules: &str) -> String {
    let (head, _) = SPEC_ECHO_ROUTE
        .split_once("  rules:\n")
        .expect("the example's rules");
    format!("{head}  rules:\n{rules}")
}

pub fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

/// Run `f` to completion on a fresh epoll runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let d = DriverDecision {
        kind: DriverKind::Epoll,
        reason: "test".into(),
    };
    let (mut rt, _) = build_runtime(&d, 256).unwrap();
    rt.block_on(f)
}

/// An HBONE client connection to the waypoint at `addr`, as `cert`, requiring the waypoint
/// to prove `waypoint`.
pub async fn connect(
    addr: SocketAddr,
    cert: &WorkloadCert,
    waypoint: Identity,
) -> Result<Client, HboneError> {
    let tls = hbone::tls::client_config(cert, &[waypoint]).unwrap();
    Client::connect(addr, tls, &H2Settings::default(), &TlsCounters::default()).await
}

/// The destination node's ztunnel: accepts CONNECT and bridges each stream to its target.
pub struct Ztunnel {
    /// (peer identity, CONNECT target) of each stream.
    seen: mpsc::Receiver<(Option<Identity>, SocketAddr)>,
}

impl Ztunnel {
    /// The streams opened since the last call.
    pub fn streams(&self) -> Vec<(Option<Identity>, SocketAddr)> {
        self.seen.try_iter().collect()
    }
}

/// Accept `inb` once its CONNECT target takes a TCP connection (the connection and the
/// accepted stream); reject it with `UPSTREAM_FAILED` when the target refuses.
pub async fn connect_target(inb: Inbound) -> Option<(monoio::net::TcpStream, H2Stream)> {
    let target = inb.request.target;
    let Ok(tcp) = monoio::net::TcpStream::connect_addr(target).await else {
        inb.reject(hbone::wire::status::UPSTREAM_FAILED);
        return None;
    };
    let s = inb.accept().ok()?;
    Some((tcp, s))
}

async fn forward(inb: Inbound) {
    let Some((tcp, s)) = connect_target(inb).await else {
        return;
    };
    bridge(tcp, s).await;
}

/// The node ztunnel's bridge between `tcp` and the HBONE stream `s` (64 KiB chunks, 120 s
/// idle, never aborted), as the stand-in ztunnel runs it.
pub async fn bridge(tcp: monoio::net::TcpStream, s: H2Stream) -> runtime::forward::Outcome {
    hbone::stream::bridge(
        tcp,
        s,
        64 * 1024,
        Duration::from_secs(120),
        std::future::pending(),
    )
    .await
}

/// Serve HBONE on `listener` (on its own thread) as `cert`, each accepted CONNECT stream
/// handed to `handler`.
pub fn serve_hbone<H, Fut>(listener: TcpListener, cert: &WorkloadCert, handler: H)
where
    H: Fn(Inbound) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let tls = hbone::tls::server_config(cert).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        block_on(async move {
            let l = monoio::net::TcpListener::from_std(listener).unwrap();
            let handler = Rc::new(handler);
            loop {
                let Ok((tcp, peer)) = l.accept().await else {
                    continue;
                };
                let (tls, h) = (tls.clone(), handler.clone());
                monoio::spawn(async move {
                    let _ = serve_connection(
                        tcp,
                        peer,
                        tls,
                        &H2Settings::default(),
                        Arc::new(ServerCounters::default()),
                        std::future::pending(),
                        h,
                    )
                    .await;
                });
            }
        })
    });
}

/// Serve HBONE on `listener` (on its own thread) as `cert`.
pub fn stand_in_ztunnel(listener: TcpListener, cert: &WorkloadCert) -> Ztunnel {
    let (tx, seen) = mpsc::channel();
    serve_hbone(listener, cert, move |inb: Inbound| {
        let _ = tx.send((inb.peer_identity.clone(), inb.request.target));
        forward(inb)
    });
    Ztunnel { seen }
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// `127.net.0.host`.
pub fn ip(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net, 0, host)
}

/// A listener on a free `127.N.0.1:15008` for the stand-in ztunnel, and its N (`salt`
/// spreads the first tries of different test files).
pub fn bind_node_ztunnel(salt: u32) -> (u8, TcpListener) {
    loop {
        let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        let net = (10 + (std::process::id() * salt + n * 13) % 240) as u8;
        if let Ok(l) = TcpListener::bind((ip(net, 1), 15008)) {
            return (net, l);
        }
        assert!(n < 200, "no free loopback address for port 15008");
    }
}

/// A mesh model of ambient namespace `app` with the `app/wp` waypoint and node `node-b`
/// whose ztunnel is at `zt`: `workloads` (YAML list items, one per line, each ending in a
/// newline) beside the waypoint's own and the test clients' ([`CLIENT_WORKLOADS`]), and
/// `services` (likewise).
pub fn app_model(zt: Ipv4Addr, workloads: &str, services: &str) -> String {
    format!(
        r#"namespaces:
  - name: app
    labels: {{istio.io/dataplane-mode: ambient}}
waypoints:
  - {{name: wp, namespace: app, address: 10.1.0.100}}
nodes:
  - {{name: node-b, ztunnel: {zt}}}
workloads:
  - {{uid: wp, name: wp, namespace: app, serviceAccount: waypoint, workloadIps: ["10.1.0.100"]}}
{CLIENT_WORKLOADS}{workloads}services:
{services}"#
    )
}

/// The test clients `10.1.0.7` and `10.1.0.8`: captured workloads running as `app/client`
/// (the tests' client certificate), so that the waypoint believes a tunnel's
/// `forwarded: for=` naming them (`waypoint::source`).
pub const CLIENT_WORKLOADS: &str = r#"  - {uid: client-7, name: client-7, namespace: app, serviceAccount: client, workloadIps: ["10.1.0.7"]}
  - {uid: client-8, name: client-8, namespace: app, serviceAccount: client, workloadIps: ["10.1.0.8"]}
"#;

/// A tunnel's facts as the `app/wp` waypoint (root namespace `istio-system`) derives them
/// for a tunnel to Service `app/echo` (`10.96.0.1:80`) from `source_ip` whose peer
/// principal is `principal` and whose consumer routes are `client_namespace`'s; no
/// `traceparent`.
pub fn echo_tunnel_ctx(
    source_ip: &str,
    principal: Option<String>,
    client_namespace: Option<Arc<str>>,
) -> waypoint::http1::TunnelCtx {
    waypoint::http1::TunnelCtx {
        waypoint: ObjectRef::new("app", "wp"),
        root_namespace: "istio-system".into(),
        destination: waypoint::http1::Destination::Service {
            service: ObjectRef::new("app", "echo"),
            port: 80,
        },
        destination_ip: "10.96.0.1".parse().unwrap(),
        destination_port: 80,
        source_ip: source_ip.parse().unwrap(),
        principal,
        client_namespace,
        traceparent: None,
    }
}

/// An AuthorizationPolicy `name` of namespace `app` on the `app/wp` waypoint (its Gateway)
/// denying what `rules` match (items of `spec.rules`, indented two spaces, each line
/// ending in a newline).
pub fn wp_deny(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  targetRefs:\n  - {{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}\n  action: DENY\n  rules:\n{rules}"
    )
}

/// The mesh model with Service `echo` (`10.96.0.1:80`) in ambient namespace `app`, its one
/// endpoint `pod` behind the node ztunnel at `zt`, and the `app/wp` waypoint.
pub fn echo_model(zt: Ipv4Addr, pod: SocketAddr) -> String {
    app_model(
        zt,
        &format!(
            "  - {{uid: e1, name: e1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{ip}\"], services: {{\"app/echo.app.svc.cluster.local\": {{80: {port}}}}}}}\n",
            ip = pod.ip(),
            port = pod.port()
        ),
        ECHO_SERVICE,
    )
}

/// In-process service settings: the `app/wp` waypoint on `127.0.0.1:0`, one worker.
pub fn service_settings() -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: id("app", "waypoint"),
        me: Me {
            gateway: ObjectRef::new("app", "wp"),
            address: "10.1.0.100:15008".parse().unwrap(),
        },
        root_namespace: "istio-system".into(),
        runtime: RuntimeConfig {
            workers: Some(1),
            pin: false,
            drain_timeout: Duration::from_millis(200),
            ..Default::default()
        },
        h2: H2Settings::default(),
        stats: None,
    }
}

/// The waypoint service on the mesh model `text` (errors name `file`), with the test
/// [`service_settings`] and certificates from `ca`; stopped by the returned [`Shutdown`].
pub fn start_service(
    ca: &Arc<hbone::ca::SigningCa>,
    text: &str,
    file: &str,
) -> (waypoint::service::Handle, runtime::Shutdown) {
    let file = std::env::temp_dir().join(file);
    let l7 = waypoint::config::load_str(&file, text, 1).unwrap_or_else(|e| panic!("{e}"));
    let shutdown = runtime::Shutdown::new();
    let source: Arc<dyn hbone::ca::CertSource> = ca.clone();
    let handle = waypoint::service::start(
        service_settings(),
        source,
        runtime::Publisher::new(l7),
        shutdown.clone(),
    )
    .unwrap();
    (handle, shutdown)
}

/// The waypoint service on the already loaded `cfg` with the test [`service_settings`] plus
/// a stats listener on `127.0.0.1:0`; stopped by the returned [`Shutdown`].
pub fn start_with_stats(
    ca: &Arc<hbone::ca::SigningCa>,
    cfg: waypoint::config::WaypointConfig,
) -> (waypoint::service::Handle, runtime::Shutdown) {
    let mut settings = service_settings();
    settings.stats = Some("127.0.0.1:0".parse().unwrap());
    let shutdown = runtime::Shutdown::new();
    let source: Arc<dyn hbone::ca::CertSource> = ca.clone();
    let handle = waypoint::service::start(
        settings,
        source,
        runtime::Publisher::new(cfg),
        shutdown.clone(),
    )
    .unwrap();
    (handle, shutdown)
}

/// The waypoint's `/stats/prometheus` page (which must answer 200).
pub fn stats_page(handle: &waypoint::service::Handle) -> String {
    prometheus_page(handle.stats_addr().expect("stats listener"))
}

/// `/stats/prometheus` from the stats listener at `stats` (which must answer 200).
pub fn prometheus_page(stats: SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(stats).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (status, body) = exchange(
        &mut s,
        "GET /stats/prometheus HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    body
}

/// A TCP server on `ip` (any port) on a monoio runtime of its own thread: each accepted
/// connection handed to `handler`, its future spawned there. Returns the bound address.
pub fn serve_async<H, Fut>(ip: Ipv4Addr, handler: H) -> SocketAddr
where
    H: Fn(monoio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        block_on(async move {
            let l = monoio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    continue;
                };
                monoio::spawn(handler(tcp));
            }
        })
    });
    addr
}

/// A TCP server on `ip` (any port): each accepted connection handed to `handler` on a
/// thread of its own. Returns the bound address.
pub fn serve_threads<F>(ip: Ipv4Addr, handler: F) -> SocketAddr
where
    F: Fn(std::net::TcpStream) + Send + Sync + 'static,
{
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let handler = handler.clone();
            std::thread::spawn(move || handler(c));
        }
    });
    addr
}

/// Every byte `c` reads written back, until the peer's half-close; then ours.
pub fn echo_to_end(mut c: std::net::TcpStream) {
    let mut r = c.try_clone().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
}

/// A GET of `path` on the `echo` service's host, with `fields` (each line ending in CRLF)
/// after `host`.
pub fn echo_get(path: &str, fields: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: echo.app.svc.cluster.local\r\n{fields}\r\n")
}

/// A keep-alive HTTP/1.1 backend on `ip` (any port) answering `200 <name>` to every
/// request, one thread per connection.
pub fn named_backend(ip: Ipv4Addr, name: &'static str) -> SocketAddr {
    serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while next_request(&mut c, &mut buf).is_some() {
            if c.write_all(ok_response(name).as_bytes()).is_err() {
                return;
            }
        }
    })
}

/// A GET of `path` on `host` over `client`: the status and body.
pub async fn h2_get_from(
    client: &h2::client::SendRequest<Bytes>,
    host: &str,
    path: &str,
) -> (u16, String) {
    let req = http::Request::builder()
        .uri(format!("http://{host}{path}"))
        .body(())
        .unwrap();
    let (resp, _) = client.clone().send_request(req, true).unwrap();
    h2_response(resp).await
}

/// A fresh mesh CA ([`test_ca`]) and the stand-in node ztunnel, as `app/echo`, on a free
/// `127.N.0.1:15008` ([`bind_node_ztunnel`] with `salt`): (N, the CA, the ztunnel).
pub fn echo_node(salt: u32) -> (u8, Arc<hbone::ca::SigningCa>, Ztunnel) {
    let (net, zl) = bind_node_ztunnel(salt);
    let ca = test_ca();
    let cert = hbone::ca::CertSource::issue(&*ca, &id("app", "echo"), std::time::SystemTime::now())
        .unwrap();
    let zt = stand_in_ztunnel(zl, &cert);
    (net, ca, zt)
}

/// A fresh mesh CA (trust domain `cluster.local`).
pub fn test_ca() -> Arc<hbone::ca::SigningCa> {
    Arc::new(
        hbone::ca::SigningCa::generate_root("cluster.local")
            .unwrap()
            .0,
    )
}

/// The in-process waypoint of [`start_service`] and a client certificate (`app/client`)
/// from the same CA; drained and joined when dropped.
pub struct Waypoint {
    pub addr: SocketAddr,
    pub client_cert: WorkloadCert,
    shutdown: runtime::Shutdown,
    handle: Option<waypoint::service::Handle>,
}

impl Waypoint {
    /// [`start_service`] on the mesh model `text` (errors name `file`).
    pub fn start(ca: &Arc<hbone::ca::SigningCa>, text: &str, file: &str) -> Waypoint {
        Waypoint::of(ca, start_service(ca, text, file))
    }

    /// [`start_with_stats`] on the configuration `text` (errors name `file`).
    pub fn with_stats(ca: &Arc<hbone::ca::SigningCa>, text: &str, file: &str) -> Waypoint {
        let file = std::env::temp_dir().join(file);
        let cfg = waypoint::config::load_str(&file, text, 1).unwrap_or_else(|e| panic!("{e}"));
        Waypoint::of(ca, start_with_stats(ca, cfg))
    }

    fn of(
        ca: &Arc<hbone::ca::SigningCa>,
        (handle, shutdown): (waypoint::service::Handle, runtime::Shutdown),
    ) -> Waypoint {
        use hbone::ca::CertSource;
        let client_cert = ca
            .issue(&id("app", "client"), std::time::SystemTime::now())
            .unwrap();
        Waypoint {
            addr: handle.addr,
            client_cert,
            shutdown,
            handle: Some(handle),
        }
    }

    /// The running service.
    pub fn handle(&self) -> &waypoint::service::Handle {
        self.handle.as_ref().unwrap()
    }

    /// A tunnel through the waypoint to `target` (a Service VIP or pod address), for
    /// client `from` (the CONNECT's `forwarded: for=`).
    pub async fn tunnel(&self, target: &str, from: Ipv4Addr) -> (Client, H2Stream) {
        let c = connect(self.addr, &self.client_cert, id("app", "waypoint"))
            .await
            .unwrap();
        let mut req = hbone::wire::ConnectRequest::new(target.parse().unwrap());
        req.forwarded_for = Some(std::net::IpAddr::V4(from));
        let s = c.open(&req).await.unwrap();
        (c, s)
    }

    pub fn counters(&self) -> &waypoint::service::Counters {
        &self.handle.as_ref().unwrap().counters
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        self.shutdown.drain(Duration::from_millis(200));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// An HTTP/2 response's status and whole body (flow control released as it arrives).
pub async fn h2_response(resp: h2::client::ResponseFuture) -> (u16, String) {
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut all = Vec::new();
    while let Some(b) = body.data().await {
        let b = b.unwrap();
        let _ = body.flow_control().release_capacity(b.len());
        all.extend_from_slice(&b);
    }
    (status, String::from_utf8(all).unwrap())
}

pub fn get(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n")
}

/// A request head as a test backend sees it.
pub struct RequestHead {
    pub method: String,
    pub path: String,
    headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first field called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The declared Content-Length (0 without one).
    pub fn content_length(&self) -> usize {
        self.header("content-length")
            .map_or(0, |v| v.parse().unwrap())
    }
}

/// The next request head on a backend's connection, reading as needed; the bytes after it
/// stay in `buf`. None at the end of the connection or on a bad head.
pub fn next_request(c: &mut impl Read, buf: &mut Vec<u8>) -> Option<RequestHead> {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hs);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let head = RequestHead {
                    method: req.method.unwrap_or("").to_string(),
                    path: req.path.unwrap_or("").to_string(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            let v = String::from_utf8_lossy(h.value).into_owned();
                            (h.name.to_string(), v)
                        })
                        .collect(),
                };
                buf.drain(..n);
                return Some(head);
            }
            Ok(httparse::Status::Partial) => match c.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            },
            Err(_) => return None,
        }
    }
}

/// Service `app/echo` (VIP `10.96.0.1`, port 80 to 8080), as a model `services` item.
pub const ECHO_SERVICE: &str = "  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n";

/// A backend answering `404` to `/missing…`, else `200 <path>` (as [`ok_response`]).
pub fn backend_404_on_missing(ip: Ipv4Addr) -> SocketAddr {
    serve_threads(ip, |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let resp = if req.path.starts_with("/missing") {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_string()
            } else {
                ok_response(&req.path)
            };
            if c.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    })
}

/// A `200 OK` with `body` and its Content-Length.
pub fn ok_response(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A response head parsed from the front of a buffer.
pub struct ResponseHead {
    pub status: u16,
    /// The head's length in bytes.
    pub size: usize,
    pub text: String,
    pub content_length: Option<usize>,
    pub chunked: bool,
}

/// The response head at the front of `buf`, once all of it is there.
pub fn response_head(buf: &[u8]) -> Option<ResponseHead> {
    let mut hs = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut hs);
    let Ok(httparse::Status::Complete(size)) = r.parse(buf) else {
        return None;
    };
    let field = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| std::str::from_utf8(h.value).unwrap())
    };
    Some(ResponseHead {
        status: r.code.unwrap(),
        size,
        text: String::from_utf8_lossy(&buf[..size]).into_owned(),
        content_length: field("content-length").map(|v| v.parse().unwrap()),
        chunked: field("transfer-encoding").is_some(),
    })
}

/// One whole response.
pub struct Response {
    pub status: u16,
    pub head: String,
    /// As framed on the wire: a chunked body keeps its chunk framing.
    pub body: Vec<u8>,
    pub chunked: bool,
}

impl Response {
    /// The body as text, as framed on the wire.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body with the chunked framing removed.
    pub fn decoded(&self) -> Vec<u8> {
        if self.chunked {
            waypoint::h2srv::dechunk(&self.body).unwrap()
        } else {
            self.body.clone()
        }
    }
}

/// The response at the front of `buf`, taken out once all of it is there: a chunked body
/// ends with its last chunk and trailers, any other with its Content-Length (none: empty,
/// as for a 1xx; the bytes after the head stay in `buf`).
pub fn take_response(buf: &mut Vec<u8>) -> Option<Response> {
    let h = response_head(buf)?;
    let rest = &buf[h.size..];
    let len = if h.chunked {
        waypoint::service::chunked_end(rest)?
    } else {
        let len = h.content_length.unwrap_or(0);
        if rest.len() < len {
            return None;
        }
        len
    };
    let body = buf[h.size..h.size + len].to_vec();
    buf.drain(..h.size + len);
    Some(Response {
        status: h.status,
        head: h.text,
        body,
        chunked: h.chunked,
    })
}

/// The read side of a tunnel: a whole stream or its read half.
pub trait ReadChunk {
    async fn read_chunk(&mut self) -> Option<Result<Bytes, h2::Error>>;
}

impl ReadChunk for H2Stream {
    async fn read_chunk(&mut self) -> Option<Result<Bytes, h2::Error>> {
        self.read().await
    }
}

impl ReadChunk for H2Reader {
    async fn read_chunk(&mut self) -> Option<Result<Bytes, h2::Error>> {
        self.read().await
    }
}

/// Read from `s` into `buf` until `take` gets what it wants from `buf`; the stream ending
/// first fails.
pub async fn read_until<T>(
    s: &mut impl ReadChunk,
    buf: &mut Vec<u8>,
    mut take: impl FnMut(&mut Vec<u8>) -> Option<T>,
) -> T {
    loop {
        if let Some(v) = take(buf) {
            return v;
        }
        match s.read_chunk().await {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            other => panic!("stream ended before a full response: {other:?}"),
        }
    }
}

/// The next whole response on `s` (bytes read past it stay in `buf`).
pub async fn read_response(s: &mut impl ReadChunk, buf: &mut Vec<u8>) -> Response {
    read_until(s, buf, take_response).await
}

/// One HTTP/1.1 exchange on a plain connection: send `req`, read one whole response
/// (status, body as framed).
pub fn exchange(s: &mut std::net::TcpStream, req: &str) -> (u16, String) {
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(r) = take_response(&mut buf) {
            return (r.status, r.text());
        }
        match s.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed before a response: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&buf)),
        }
    }
}

/// The error code of the first GOAWAY frame in a run of HTTP/2 frames (None: none among
/// the whole frames there).
pub fn goaway(mut b: &[u8]) -> Option<u32> {
    while b.len() >= 9 {
        let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
        let frame = b.get(..9 + len)?;
        if frame[3] == 7 {
            return Some(u32::from_be_bytes(frame[13..17].try_into().ok()?));
        }
        b = &b[9 + len..];
    }
    None
}

/// Deterministic bytes that do not look like HTTP (first byte 0x16, a TLS record).
pub fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    v[0] = 0x16;
    v
}

/// The FNV-1a offset basis: the checksum of nothing.
pub const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// The FNV-1a checksum `h` continued over `b`.
pub fn fnv_add(h: u64, b: &[u8]) -> u64 {
    b.iter()
        .fold(h, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3))
}

pub fn fnv(b: &[u8]) -> u64 {
    fnv_add(FNV0, b)
}

/// The block the test backends repeat for generated bodies.
pub const BLOCK: usize = 1 << 20;

/// `n` bytes of the repeated [`BLOCK`]-byte payload: the body the backends generate.
pub fn write_blocks(c: &mut impl Write, mut n: usize) -> std::io::Result<()> {
    let block = payload(BLOCK);
    while n > 0 {
        let k = n.min(BLOCK);
        c.write_all(&block[..k])?;
        n -= k;
    }
    Ok(())
}

/// The checksum of [`write_blocks`]' `n` bytes.
pub fn blocks_fnv(n: usize) -> u64 {
    let block = payload(BLOCK);
    let (mut h, mut left) = (FNV0, n);
    while left > 0 {
        let k = left.min(BLOCK);
        h = fnv_add(h, &block[..k]);
        left -= k;
    }
    h
}

/// A fresh folder for one test's files.
pub fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("waypoint-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The binary's settings document: the `app/wp` waypoint on `127.0.0.1:0`, built-in CA in
/// `ca`, the stats endpoint on `127.0.0.1:0` when `stats`, one worker.
pub fn settings(ca: &Path, stats: bool) -> String {
    format!(
        "waypoint:\n  listen: 127.0.0.1:0\n  identity: spiffe://cluster.local/ns/app/sa/waypoint\n  gateway: app/wp\n  address: 10.1.0.100:15008\n  ca: {{builtin: {}}}\n{}runtime: {{workers: 1, pin: false, drain_timeout: 1s}}\n",
        ca.display(),
        if stats { "  stats: 127.0.0.1:0\n" } else { "" }
    )
}

/// The `waypoint` binary, killed and reaped when dropped, so a failed check never leaves it
/// running. (Once the test has reaped it itself, `kill` signals nothing.)
pub struct Proc {
    pub child: Child,
    /// Its `READY …` line.
    pub ready: String,
}

impl Proc {
    /// Start the binary on `config` with `args`, and wait for its READY line.
    pub fn start(config: &Path, args: &[&str], stderr: Stdio) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_waypoint"))
            .arg("--config")
            .arg(config)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert!(ready.starts_with("READY "), "{ready}");
        Proc { child, ready }
    }

    /// The address the READY line gives as `key=ADDR` (`hbone`, `stats`).
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{key}=ADDR in {}", self.ready))
            .parse()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long any awaited event may take before a test fails.
pub const EVENT_BOUND: Duration = Duration::from_secs(60);

/// `f`, which must finish within [`EVENT_BOUND`].
pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    match runtime::worker::race(f, monoio::time::sleep(EVENT_BOUND)).await {
        runtime::worker::Either::Left(x) => x,
        runtime::worker::Either::Right(()) => panic!("nothing happened within {EVENT_BOUND:?}"),
    }
}

/// A folder removed when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tunnel through the waypoint at `addr` to `target` (no `forwarded: for=`), as `cert`,
/// on a connection of its own (which lives as long as the client does).
pub async fn open_tunnel(
    addr: SocketAddr,
    cert: &WorkloadCert,
    target: &str,
) -> (Client, H2Stream) {
    open_tunnel_for(addr, cert, target, None).await
}

/// [`open_tunnel`] with the CONNECT's `forwarded: for=` naming `forwarded`.
pub async fn open_tunnel_for(
    addr: SocketAddr,
    cert: &WorkloadCert,
    target: &str,
    forwarded: Option<Ipv4Addr>,
) -> (Client, H2Stream) {
    let c = connect(addr, cert, id("app", "waypoint")).await.unwrap();
    let mut req = hbone::wire::ConnectRequest::new(target.parse().unwrap());
    req.forwarded_for = forwarded.map(std::net::IpAddr::V4);
    let s = c.open(&req).await.unwrap();
    (c, s)
}

/// A GET of `/` on `host` in a fresh tunnel ([`open_tunnel_for`]) to `target`: the
/// response's status and body.
pub async fn tunnel_get(
    addr: SocketAddr,
    cert: &WorkloadCert,
    forwarded: Option<Ipv4Addr>,
    target: &str,
    host: &str,
) -> (u16, String) {
    let (_c, mut s) = open_tunnel_for(addr, cert, target, forwarded).await;
    s.write_all(Bytes::from(get("/", host)), false)
        .await
        .unwrap();
    let r = read_response(&mut s, &mut Vec::new()).await;
    (r.status, r.text())
}

/// A workload line of the mesh model: `name` (also its uid), running as `app/echo` on
/// node `node-b` at `addr`, the endpoint of Service `app/<name>` port 80.
pub fn app_workload(name: &str, addr: SocketAddr) -> String {
    format!(
        "  - {{uid: {name}, name: {name}, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/{name}.app.svc.cluster.local\": {{80: {}}}}}}}\n",
        addr.ip(),
        addr.port()
    )
}

/// An HTTP/2 client connection inside the tunnel `s`: its sender, and its connection
/// task (which ends when the connection does).
pub async fn h2_in_tunnel(
    s: H2Stream,
) -> (
    h2::client::SendRequest<Bytes>,
    monoio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let io = waypoint::inner::StreamIo::new(s, Bytes::new());
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    (send, monoio::spawn(conn))
}

/// The counter `name` (no labels) of a `/stats/prometheus` page.
pub fn counter_in(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("{name} not in the stats:\n{page}"))
}

/// The sum of a `/stats/prometheus` page's `istio_requests_total` series whose lines have
/// all of `with`.
pub fn requests_in(page: &str, with: &[&str]) -> u64 {
    page.lines()
        .filter(|l| l.starts_with("istio_requests_total{") && with.iter().all(|w| l.contains(w)))
        .map(|l| l.rsplit_once(' ').unwrap().1.trim().parse::<u64>().unwrap())
        .sum()
}

/// The `waypoint` binary (stats on) on the echo model ([`echo_model`]: Service `echo`,
/// `10.96.0.1:80`, one endpoint behind the stand-in node ztunnel), its built-in CA in a
/// fresh test folder, and a client certificate (`app/client`) from that CA. The binary is
/// killed, then the folder removed, when dropped.
pub struct EchoBinary {
    _wp: Proc,
    _dir: TempDir,
    pub addr: SocketAddr,
    pub stats: SocketAddr,
    pub me: WorkloadCert,
}

impl EchoBinary {
    /// The node ztunnel on a free `127.N.0.1` ([`bind_node_ztunnel`] with `salt`), the
    /// endpoint that `backend` starts on `127.N.0.2`, the folder `<name>-N`, and the
    /// configuration file that `config` writes from the echo model and the settings
    /// document ([`settings`] with stats).
    pub fn start(
        salt: u32,
        name: &str,
        backend: impl FnOnce(Ipv4Addr) -> SocketAddr,
        config: impl FnOnce(String, String) -> String,
    ) -> EchoBinary {
        use hbone::ca::CertSource;
        let (net, zl) = bind_node_ztunnel(salt);
        let pod = backend(ip(net, 2));
        let d = TempDir(test_dir(&format!("{name}-{net}")));
        let ca = hbone::ca::SigningCa::builtin(&d.0.join("ca"), "cluster.local").unwrap();
        let now = std::time::SystemTime::now();
        let _zt = stand_in_ztunnel(zl, &ca.issue(&id("app", "echo"), now).unwrap());
        let cfg = config(echo_model(ip(net, 1), pod), settings(&d.0.join("ca"), true));
        std::fs::write(d.0.join("waypoint.yaml"), cfg).unwrap();
        let wp = Proc::start(&d.0.join("waypoint.yaml"), &[], Stdio::inherit());
        let (addr, stats) = (wp.addr("hbone"), wp.addr("stats"));
        EchoBinary {
            _wp: wp,
            _dir: d,
            addr,
            stats,
            me: ca.issue(&id("app", "client"), now).unwrap(),
        }
    }

    /// A tunnel to the echo service (on its own connection).
    pub async fn tunnel(&self) -> (Client, H2Stream) {
        open_tunnel(self.addr, &self.me, "10.96.0.1:80").await
    }

    /// A counter (no labels) of the waypoint's `/stats/prometheus`.
    pub fn metric(&self, name: &str) -> u64 {
        counter_in(&prometheus_page(self.stats), name)
    }

    /// The sum of the `istio_requests_total` series whose labels have all of `labels`.
    pub fn requests(&self, labels: &[&str]) -> u64 {
        requests_in(&prometheus_page(self.stats), labels)
    }
}

/// The mesh model ([`app_model`], node ztunnel at `zt`) with Service `grpc`
/// (`10.96.0.9:80`) in namespace `app`, its one endpoint `g1` at `pod`.
pub fn grpc_model(zt: Ipv4Addr, pod: SocketAddr) -> String {
    app_model(
        zt,
        &format!(
            "  - {{uid: g1, name: g1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/grpc.app.svc.cluster.local\": {{80: {}}}}}}}\n",
            pod.ip(),
            pod.port()
        ),
        "  - {name: grpc, namespace: app, hostname: grpc.app.svc.cluster.local, vips: [\"10.96.0.9\"], ports: {80: 8080}}\n",
    )
}

/// The waypoint service with stats ([`start_with_stats`], certificates from `ca`) on the
/// [`grpc_model`] (node ztunnel at `zt`, Service `grpc`'s endpoint at `pod`), a
/// DestinationRule `useClientProtocol` for `grpc` (an HTTP/2 client gets HTTP/2 upstream)
/// and the documents `extra` (errors name `file`); and a client certificate (`app/client`)
/// from `ca`.
pub fn start_grpc(
    ca: &Arc<hbone::ca::SigningCa>,
    zt: Ipv4Addr,
    pod: SocketAddr,
    extra: &str,
    file: &str,
) -> (waypoint::service::Handle, runtime::Shutdown, WorkloadCert) {
    use hbone::ca::CertSource;
    let model = grpc_model(zt, pod);
    let text = format!(
        "{model}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: grpc, namespace: app}}\nspec:\n  host: grpc\n  trafficPolicy:\n    connectionPool:\n      http: {{useClientProtocol: true}}\n---\n{extra}"
    );
    let cfg =
        waypoint::config::load_str(Path::new(file), &text, 1).unwrap_or_else(|e| panic!("{e}"));
    let (handle, shutdown) = start_with_stats(ca, cfg);
    let cert = ca
        .issue(&id("app", "client"), std::time::SystemTime::now())
        .unwrap();
    (handle, shutdown, cert)
}

/// POSTs (no body) of each path of `posts` to Service `grpc`, with `content-type:
/// application/grpc` when its flag says so, one after another on one HTTP/2 connection
/// ([`h2_in_tunnel`]) in a tunnel through the waypoint at `addr` to `10.96.0.9:80`, as
/// `cert`: each response's status and `grpc-status` ([`grpc_status`]).
pub fn grpc_posts(
    addr: SocketAddr,
    cert: &WorkloadCert,
    posts: &[(&str, bool)],
) -> Vec<(u16, Option<String>)> {
    block_on(async {
        let (_c, s) = open_tunnel(addr, cert, "10.96.0.9:80").await;
        let (send, _conn) = h2_in_tunnel(s).await;
        let mut out = Vec::new();
        for (path, grpc) in posts {
            let mut req = http::Request::builder()
                .method("POST")
                .uri(format!("http://grpc.app.svc.cluster.local{path}"));
            if *grpc {
                req = req.header("content-type", "application/grpc");
            }
            let mut send = send.clone().ready().await.unwrap();
            let (resp, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
            out.push(grpc_status(resp).await);
        }
        out
    })
}

/// An HTTP/2 response's status and its `grpc-status`: the head's (trailers-only), else
/// the trailers' (the body is read and dropped, flow control released as it arrives).
pub async fn grpc_status(resp: h2::client::ResponseFuture) -> (u16, Option<String>) {
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let head_status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    let mut rx = resp.into_body();
    while let Some(chunk) = rx.data().await {
        let chunk = chunk.unwrap();
        let _ = rx.flow_control().release_capacity(chunk.len());
    }
    let trailer = rx.trailers().await.unwrap().and_then(|t| {
        t.get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    });
    (status, head_status.or(trailer))
}

/// Read from `s` until what came ends with `tail` (each read bounded by [`EVENT_BOUND`]);
/// the stream ending or failing first fails the test.
pub async fn read_through(s: &mut H2Stream, tail: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    while !buf.ends_with(tail) {
        match bounded(s.read()).await {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            other => panic!("{other:?} after {:?}", String::from_utf8_lossy(&buf)),
        }
    }
    buf
}

/// A GET of `path` on `host` over `client` whose response is a `200` that sends `first`
/// and is then reset (RST_STREAM), never ended as if complete (each wait within
/// [`bounded`]).
pub async fn h2_get_reset_after(
    client: &h2::client::SendRequest<Bytes>,
    host: &str,
    path: &str,
    first: &[u8],
) {
    let req = http::Request::builder()
        .uri(format!("http://{host}{path}"))
        .body(())
        .unwrap();
    let (resp, _) = client.clone().send_request(req, true).unwrap();
    let resp = bounded(resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let got = bounded(body.data()).await.unwrap().unwrap();
    assert_eq!(&got[..], first);
    let end = bounded(body.data()).await;
    assert!(matches!(end, Some(Err(_))), "not reset: {end:?}");
}

/// A POST of `/` on `host` over `client` whose body stops after 3 of its declared 10
/// bytes: the response's status (awaited within [`bounded`]), and the request body's
/// stream, still open.
pub async fn h2_stalled_post(
    client: &h2::client::SendRequest<Bytes>,
    host: &str,
) -> (u16, h2::SendStream<Bytes>) {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{host}/"))
        .header("content-length", "10")
        .body(())
        .unwrap();
    let (resp, mut body) = client.clone().send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"abc"), false).unwrap();
    let (status, _) = bounded(h2_response(resp)).await;
    (status, body)
}

/// The waypoint service ([`service_settings`], certificates from `ca`) on the configuration
/// file `name` of a fresh folder `dir` (under the temporary folder), which holds `text`
/// and which the file watcher reloads. Drained, joined and its folder removed when
/// dropped.
pub struct Watched {
    pub file: PathBuf,
    shutdown: runtime::Shutdown,
    watcher: Option<waypoint::reload::Watcher>,
    handle: Option<waypoint::service::Handle>,
}

impl Watched {
    pub fn start(ca: &Arc<hbone::ca::SigningCa>, dir: &str, name: &str, text: String) -> Watched {
        let dns = waypoint::reload::DnsRefresh::system(std::time::Duration::ZERO);
        Watched::start_with_dns(ca, dir, name, text, dns)
    }

    /// [`Watched::start`], the mesh model's DNS ServiceEntries looked up by `dns`, at load
    /// and again every `dns.every`.
    pub fn start_with_dns(
        ca: &Arc<hbone::ca::SigningCa>,
        dir: &str,
        name: &str,
        text: String,
        dns: waypoint::reload::DnsRefresh,
    ) -> Watched {
        let dir = std::env::temp_dir().join(dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(name);
        std::fs::write(&file, &text).unwrap();
        let mut l7 = waypoint::config::load_str_with(&file, &text, 1, &dns.resolve)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut fetcher = waypoint::jwks::Fetcher::for_config(&l7);
        fetcher.resolve(&mut l7, std::time::Instant::now());
        let shutdown = runtime::Shutdown::new();
        let source: Arc<dyn hbone::ca::CertSource> = ca.clone();
        let publisher = runtime::Publisher::new(l7);
        let handle = waypoint::service::start(
            service_settings(),
            source,
            publisher.clone(),
            shutdown.clone(),
        )
        .unwrap();
        let watcher = waypoint::reload::watch(
            file.clone(),
            text,
            None,
            publisher,
            handle.counters.clone(),
            fetcher,
            dns,
        )
        .unwrap();
        Watched {
            file,
            shutdown,
            watcher: Some(watcher),
            handle: Some(handle),
        }
    }

    pub fn handle(&self) -> &waypoint::service::Handle {
        self.handle.as_ref().unwrap()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.watcher.take();
        self.shutdown.drain(Duration::from_millis(200));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        if let Some(d) = self.file.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Wait (generously) until `f` holds, letting this runtime's other tasks run meanwhile.
pub async fn wait_until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..3000 {
        if f() {
            return;
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// How a tunnel's stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The stream was reset.
    Reset,
    /// The stream ended cleanly (END_STREAM).
    Closed,
}

/// Everything read from `s` until it ends (each read bounded by [`EVENT_BOUND`]), and how
/// it ended.
pub async fn read_to_end(s: &mut H2Stream) -> (Vec<u8>, Ended) {
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

/// Where `cfg` routes a GET of `path` to Service `app/echo` port `port` (host
/// `echo.app.svc.cluster.local`) from a client in namespace `ns`: the backend service's
/// name, or the status answered.
pub fn echo_route_decision(
    cfg: &waypoint::config::WaypointConfig,
    ns: Option<&str>,
    port: u16,
    path: &str,
) -> String {
    use waypoint::route::{Decision, Request, Target};
    let service = ObjectRef::new("app", "echo");
    let req = Request {
        method: "GET",
        path,
        query: None,
        headers: &[("host", "echo.app.svc.cluster.local")],
        scheme: "http",
    };
    match cfg.routes.route_from(
        ns,
        Target::Service {
            service: &service,
            port,
        },
        &req,
        &|s| cfg.service_exists(s),
        &mut waypoint::lb::SplitMix64(1),
    ) {
        Decision::Forward(f) => f.service.expect("a service").0.name,
        Decision::Respond { status, .. }
        | Decision::Redirect { status, .. }
        | Decision::Direct { status, .. } => status.to_string(),
    }
}

/// An HTTP/2 (prior knowledge) backend's side of its accepted connection `tcp` (None: the
/// handshake failed).
pub async fn h2_server(
    tcp: monoio::net::TcpStream,
) -> Option<h2::server::Connection<monoio::net::tcp::stream_poll::TcpStreamPoll, Bytes>> {
    let io = monoio::io::IntoPollIo::into_poll_io(tcp).unwrap();
    h2::server::handshake(io).await.ok()
}

/// A gRPC backend's body after its response head: one empty message, then trailers with
/// `grpc-status: <status>` (None: the message ends the stream, no trailers).
pub fn send_grpc_message(tx: &mut h2::SendStream<Bytes>, status: Option<&str>) {
    let _ = tx.send_data(Bytes::from_static(b"\0\0\0\0\0"), status.is_none());
    if let Some(status) = status {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", status.parse().unwrap());
        let _ = tx.send_trailers(t);
    }
}

/// An HTTP/2 (prior knowledge) server on `ip` ([`serve_async`]): each request goes to
/// `handler` on its own task, so the connection keeps being driven while a handler reads
/// a body.
pub fn serve_h2<F, Fut>(ip: Ipv4Addr, handler: F) -> SocketAddr
where
    F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    serve_async(ip, move |tcp| {
        let handler = handler.clone();
        async move {
            let io = monoio::io::IntoPollIo::into_poll_io(tcp).unwrap();
            let Ok(mut conn) = h2::server::handshake(io).await else {
                return;
            };
            while let Some(Ok((req, respond))) = conn.accept().await {
                monoio::spawn(handler(req, respond));
            }
        }
    })
}

/// A request body as a server reads it: until its end (or a stream error), flow control
/// released as it comes.
pub async fn h2_body(mut body: h2::RecvStream) -> Vec<u8> {
    let mut data = Vec::new();
    while let Some(Ok(b)) = body.data().await {
        let _ = body.flow_control().release_capacity(b.len());
        data.extend_from_slice(&b);
    }
    data
}

/// Answer a gRPC call with one message (`message`, its encoding) and `grpc-status: 0`.
pub fn grpc_reply(mut respond: h2::server::SendResponse<Bytes>, message: &[u8]) {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    let resp = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let mut out = respond.send_response(resp, false).unwrap();
    let _ = out.send_data(Bytes::from(frame), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let _ = out.send_trailers(trailers);
}

/// Raw HTTP/1.1 requests, one after the other on one tunnel to `target` through the
/// waypoint at `addr` as `cert` (for client `from`): each whole response.
pub fn http1_on_tunnel(
    addr: SocketAddr,
    cert: &WorkloadCert,
    target: &str,
    from: Ipv4Addr,
    reqs: &[String],
) -> Vec<Response> {
    block_on(async {
        let (_c, mut s) = open_tunnel_for(addr, cert, target, Some(from)).await;
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for r in reqs {
            s.write_all(Bytes::from(r.clone()), false).await.unwrap();
            out.push(read_response(&mut s, &mut buf).await);
        }
        out
    })
}

/// HTTP/2 GETs of `(path, fields)` on `host`, one after the other on one HTTP/2 connection
/// in one tunnel to `target` through the waypoint at `addr` as `cert` (for client
/// `from`): each status and body.
pub fn h2_on_tunnel(
    addr: SocketAddr,
    cert: &WorkloadCert,
    target: &str,
    from: Ipv4Addr,
    host: &str,
    reqs: &[(&str, Vec<(&str, &str)>)],
) -> Vec<(u16, String)> {
    block_on(async {
        let (c, s) = open_tunnel_for(addr, cert, target, Some(from)).await;
        let io = waypoint::inner::StreamIo::new(s, Bytes::new());
        let (send, conn) = h2::client::handshake(io).await.unwrap();
        monoio::spawn(async move {
            let _ = conn.await;
        });
        let mut out = vec![];
        for (path, fields) in reqs {
            let mut b = http::Request::builder().uri(format!("http://{host}{path}"));
            for (n, v) in fields {
                b = b.header(*n, *v);
            }
            let (resp, _) = send
                .clone()
                .send_request(b.body(()).unwrap(), true)
                .unwrap();
            out.push(h2_response(resp).await);
        }
        drop(c);
        out
    })
}

/// An access line: `name=value` of each field, as `{:?}` gives the value.
pub type Line = Vec<(String, String)>;

/// Sends the fields of `access` events (a subscriber for the whole process: the
/// waypoint's workers are threads of its own).
pub struct Capture(pub mpsc::Sender<Line>);

struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        m.target() == "access"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(Vec::new());
        e.record(&mut f);
        let _ = self.0.send(f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The first `n` access lines, waiting for them (generous bound).
pub fn access_lines(rx: &mpsc::Receiver<Line>, n: usize) -> Vec<Line> {
    (0..n)
        .map(|i| {
            rx.recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("access line {i} of {n}: {e}"))
        })
        .collect()
}
