//! Two-node loopback topology: ztunnel A (127.N.1.10) and B (127.N.2.10) in this process,
//! pods as echo servers on their own loopback IPs, a SOCKS5 client bound to the client pod's
//! IP, an HBONE test waypoint (127.N.5.10:15008) that records what it receives.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use hbone::ca::{CertSource, SigningCa, WorkloadCert};
use hbone::server::{serve_connection, Inbound, ServerCounters};
use hbone::wire::{ConnectRequest, ParsedConnect};
use hbone::{H2Settings, Identity};
use socket2::{Domain, SockAddr, Socket, Type};

pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/ns-a/sa/client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/ns-b/sa/server";
pub const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/ns-w/sa/waypoint";
pub const WAYPOINT2_ID: &str = "spiffe://cluster.local/ns/ns-w/sa/waypoint2";
pub const ZTUNNEL_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";

/// Node B policy (a YAML list): deny the client's identity in `ns-b`.
pub const DENY_CLIENT: &str = r#"
  - name: deny-client
    namespace: ns-b
    scope: Namespace
    action: Deny
    rules: [[[{principals: ["cluster.local/ns/ns-a/sa/client"]}]]]
"#;

/// Node B policy (a YAML list): `ns-b` allows only authenticated peers (any identity).
pub const REQUIRE_MTLS: &str = r#"
  - name: require-mtls
    namespace: ns-b
    scope: Namespace
    action: Allow
    rules: [[[{principals: ["*"]}]]]
"#;

/// Node B policy (a YAML list): a DENY named `name` in `ns-b` on each of `addrs` (as a
/// single-address `sourceIps` block).
pub fn deny_ips(name: &str, addrs: &[IpAddr]) -> String {
    let blocks: Vec<String> = addrs
        .iter()
        .map(|a| format!("\"{a}/{}\"", if a.is_ipv4() { 32 } else { 128 }))
        .collect();
    format!(
        r#"
  - name: {name}
    namespace: ns-b
    scope: Namespace
    action: Deny
    rules: [[[{{sourceIps: [{}]}}]]]
"#,
        blocks.join(", ")
    )
}

/// The addresses of one test's topology; `n` keeps parallel tests apart (127.n.*.*).
#[derive(Clone, Copy)]
pub struct Net {
    pub n: u8,
}

impl Net {
    pub fn ip(&self, a: u8, b: u8) -> IpAddr {
        IpAddr::from([127, self.n, a, b])
    }
    pub fn addr(&self, a: u8, b: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(a, b), port)
    }
    pub fn zt_a(&self) -> IpAddr {
        self.ip(1, 10)
    }
    pub fn zt_b(&self) -> IpAddr {
        self.ip(2, 10)
    }
    pub fn client(&self) -> IpAddr {
        self.ip(1, 1)
    }
    pub fn server(&self) -> SocketAddr {
        self.addr(2, 2, 8080)
    }
    pub fn server2(&self) -> SocketAddr {
        self.addr(2, 3, 8080)
    }
    pub fn legacy(&self) -> SocketAddr {
        self.addr(3, 2, 8080)
    }
    pub fn outside(&self) -> SocketAddr {
        self.addr(4, 4, 8080)
    }
    pub fn wpod(&self) -> SocketAddr {
        self.addr(2, 5, 8080)
    }
    pub fn waypoint(&self) -> SocketAddr {
        self.addr(5, 10, 15008)
    }
    /// The service-account waypoint (for `wpod2` only).
    pub fn waypoint2(&self) -> SocketAddr {
        self.addr(5, 11, 15008)
    }
    pub fn wpod2(&self) -> SocketAddr {
        self.addr(2, 6, 8080)
    }
    pub fn legacy_client(&self) -> IpAddr {
        self.ip(1, 3)
    }
    pub fn mixed_vip(&self) -> IpAddr {
        IpAddr::from([10, 200, self.n, 3])
    }
    pub fn echo_vip(&self) -> IpAddr {
        IpAddr::from([10, 200, self.n, 1])
    }
    pub fn wsvc_vip(&self) -> IpAddr {
        IpAddr::from([10, 200, self.n, 2])
    }
    pub fn plaintext_b(&self) -> SocketAddr {
        self.addr(2, 10, 15006)
    }
    pub fn plaintext_wp(&self) -> SocketAddr {
        self.addr(2, 10, 15007)
    }

    /// The mesh part shared by both nodes; `policies` is a YAML list (or `[]`).
    pub fn mesh(&self, policies: &str) -> String {
        let n = self.n;
        format!(
            r#"namespaces:
  - name: ns-a
    labels: {{istio.io/dataplane-mode: ambient}}
  - name: ns-b
    labels: {{istio.io/dataplane-mode: ambient}}
  - name: ns-w
    labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
  - name: legacy
nodes:
  - {{name: node-a, ztunnel: 127.{n}.1.10}}
  - {{name: node-b, ztunnel: 127.{n}.2.10}}
waypoints:
  - {{name: waypoint, namespace: ns-w, address: "127.{n}.5.10:15008"}}
  - {{name: waypoint2, namespace: ns-w, address: "127.{n}.5.11:15008", annotations: {{istio.io/for-service-account: wpod2}}}}
workloads:
  - {{name: client, namespace: ns-a, serviceAccount: client, workloadIps: [127.{n}.1.1], node: node-a}}
  - {{name: server, namespace: ns-b, serviceAccount: server, workloadIps: [127.{n}.2.2], node: node-b}}
  - {{name: server2, namespace: ns-b, serviceAccount: server, workloadIps: [127.{n}.2.3], node: node-b}}
  - {{name: legacy, namespace: legacy, workloadIps: [127.{n}.3.2], node: node-b}}
  - {{name: wpod, namespace: ns-w, serviceAccount: wpod, workloadIps: [127.{n}.2.5], node: node-b}}
  - {{name: wpod2, namespace: ns-w, serviceAccount: wpod2, workloadIps: [127.{n}.2.6], node: node-b}}
  - {{name: legacy-client, namespace: legacy, workloadIps: [127.{n}.1.3], node: node-a}}
services:
  - name: echo
    namespace: ns-b
    hostname: echo.ns-b.svc.cluster.local
    vips: [10.200.{n}.1]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: ns-b/server}}, {{workloadUid: ns-b/server2}}]
  - name: wsvc
    namespace: ns-w
    hostname: wsvc.ns-w.svc.cluster.local
    vips: [10.200.{n}.2]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: ns-w/wpod}}]
  - name: mixed
    namespace: ns-b
    hostname: mixed.ns-b.svc.cluster.local
    vips: [10.200.{n}.3]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: ns-b/server}}, {{workloadUid: ns-w/wpod}}]
policies: {policies}
"#
        )
    }

    pub fn node_config(&self, node: &str, ca: &Path, policies: &str) -> String {
        let (ip, plaintext) = if node == "node-a" {
            (self.zt_a(), String::new())
        } else {
            (
                self.zt_b(),
                format!(
                    "  plaintext:\n    - {{listen: \"{}\", target: \"{}\"}}\n    - {{listen: \"{}\", target: \"{}\"}}\n",
                    self.plaintext_b(),
                    self.server(),
                    self.plaintext_wp(),
                    self.wpod()
                ),
            )
        };
        format!(
            "ztunnel:\n  node: {node}\n  address: {ip}\n  ca: {{builtin: {}}}\n{plaintext}runtime: {{workers: 1, pin: false, drain_timeout: 1s}}\n{}",
            ca.display(),
            self.mesh(policies)
        )
    }
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ztunnel-test-{name}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Both nodes, the CA and the config files.
pub struct Topo {
    pub net: Net,
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
    pub a: Option<ztunnel::Handle>,
    pub b: Option<ztunnel::Handle>,
    pub file_a: PathBuf,
    pub file_b: PathBuf,
}

/// Start `loaded` (from `file`, with the default profile) with its reload watcher on
/// `file`.
pub fn start_watching(loaded: ztunnel::config::Loaded, file: &Path) -> ztunnel::Handle {
    ztunnel::start(
        loaded,
        Some(ztunnel::config::Source {
            file: file.to_owned(),
            profile: tuning::Profile::default(),
        }),
        runtime::Shutdown::new(),
    )
    .unwrap()
}

pub fn start_node(file: &Path) -> ztunnel::Handle {
    let loaded = ztunnel::config::load_file(file, &tuning::Profile::default(), 1).unwrap();
    let h = start_watching(loaded, file);
    let body = http_get(h.addrs.readiness, "/healthz/ready");
    assert!(body.0.contains("200"), "not ready: {body:?}");
    h
}

impl Topo {
    pub fn new(n: u8, policies: &str) -> Topo {
        runtime::init_logging();
        let net = Net { n };
        let dir = tmpdir(&format!("n{n}"));
        let ca_dir = dir.join("ca");
        SigningCa::builtin(&ca_dir, "cluster.local").unwrap();
        let file_a = dir.join("a.yaml");
        let file_b = dir.join("b.yaml");
        std::fs::write(&file_a, net.node_config("node-a", &ca_dir, "[]")).unwrap();
        std::fs::write(&file_b, net.node_config("node-b", &ca_dir, policies)).unwrap();
        let a = start_node(&file_a);
        let b = start_node(&file_b);
        Topo {
            net,
            dir,
            ca_dir,
            a: Some(a),
            b: Some(b),
            file_a,
            file_b,
        }
    }
    pub fn a(&self) -> &ztunnel::Handle {
        self.a.as_ref().unwrap()
    }
    pub fn b(&self) -> &ztunnel::Handle {
        self.b.as_ref().unwrap()
    }
    pub fn stats_a(&self) -> String {
        http_get(self.a().addrs.stats, "/stats/prometheus").1
    }
    pub fn stats_b(&self) -> String {
        http_get(self.b().addrs.stats, "/stats/prometheus").1
    }
    /// Rewrite B's file with `policies` (or raw `text`) and wait for the reload counters.
    pub fn rewrite_b(&self, text: &str) {
        // mtime must move: wait past the filesystem's timestamp granularity.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&self.file_b, text).unwrap();
    }
    pub fn ca(&self) -> SigningCa {
        SigningCa::builtin(&self.ca_dir, "cluster.local").unwrap()
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for h in [self.a.take(), self.b.take()].into_iter().flatten() {
            let _ = h.stop(Duration::from_millis(200));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET `path`; returns (status line, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// Sum of the samples of `name` whose labels include every `(k, v)`.
pub use netlab::metric;

/// `ztunnel_authorization_denied_total` on the stats page `stats` for `transport` and
/// `policy` (`namespace/name`).
pub fn denied_total(stats: &str, transport: &str, policy: &str) -> u64 {
    metric(
        stats,
        "ztunnel_authorization_denied_total",
        &[("transport", transport), ("policy", policy)],
    )
}

/// Poll `f` until true or 5 s.
pub fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(5), f)
}

/// Poll `f` until true or `within`.
pub fn eventually_within(what: &str, within: Duration, f: impl FnMut() -> bool) {
    netlab::eventually(what, within, f, String::new)
}

/// A read error that means the connection is still open: a timeout, or EINTR.
pub fn still_open(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

/// Did this read see the connection closed: end of file or a reset, not a timeout or EINTR
/// (that would be a connection still open)?
pub fn read_closed(r: &std::io::Result<usize>) -> bool {
    match r {
        Ok(n) => *n == 0,
        Err(e) => !still_open(e),
    }
}

/// A pod: accepts on `addr`, writes `name\n`, then echoes until EOF.
pub struct Pod {
    pub addr: SocketAddr,
    pub peers: mpsc::Receiver<SocketAddr>,
    stop: Arc<AtomicBool>,
}

impl Pod {
    pub fn start(addr: SocketAddr, name: &str) -> Pod {
        let l = TcpListener::bind(addr).unwrap();
        let (tx, peers) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, name) = (stop.clone(), name.to_string());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                let _ = tx.send(c.peer_addr().unwrap());
                let name = name.clone();
                std::thread::spawn(move || named_echo(c, &name));
            }
        });
        Pod { addr, peers, stop }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// A TCP socket bound to `src` connected to `dst`.
pub fn connect_from(src: IpAddr, dst: SocketAddr) -> TcpStream {
    try_connect_from(src, dst).unwrap()
}

/// As [`connect_from`]; a peer that resets at once may fail the connect itself.
pub fn try_connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    s.connect_timeout(&SockAddr::from(dst), Duration::from_secs(2))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

pub enum Dest<'a> {
    Addr(SocketAddr),
    Name(&'a str, u16),
}

/// SOCKS5 CONNECT from `src` through `socks`; returns the reply code and the stream.
pub fn socks_connect(src: IpAddr, socks: SocketAddr, dst: Dest<'_>) -> (u8, TcpStream) {
    let mut s = connect_from(src, socks);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    let mut req = vec![5, 1, 0];
    match dst {
        Dest::Addr(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Dest::Addr(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Dest::Name(h, p) => {
            req.push(3);
            req.push(h.len() as u8);
            req.extend_from_slice(h.as_bytes());
            req.extend_from_slice(&p.to_be_bytes());
        }
    }
    s.write_all(&req).unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(rep[0], 5);
    (rep[1], s)
}

/// SOCKS5 CONNECT from `src` through `socks` to `dst`, which must succeed; then read the
/// greeting of whoever answered and check `data` comes back. (The greeting, the stream.)
pub fn socks_call(
    src: IpAddr,
    socks: SocketAddr,
    dst: Dest<'_>,
    data: &[u8],
) -> (String, TcpStream) {
    let (code, mut s) = socks_connect(src, socks, dst);
    assert_eq!(code, 0, "SOCKS5 reply");
    let who = hello(&mut s);
    assert_eq!(roundtrip(&mut s, data), data);
    (who, s)
}

/// Read the pod's greeting line.
pub fn hello(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => out.push(b[0]),
            Ok(_) => panic!("EOF before the greeting line (got {out:?})"),
            Err(e) => panic!("reading the greeting line: {e} (got {out:?})"),
        }
    }
    String::from_utf8(out).unwrap()
}

/// Write `data`, read the same number of bytes back.
pub fn roundtrip(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    back
}

/// What the test waypoint saw on each stream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: Option<Identity>,
    pub authority: SocketAddr,
    /// The whole CONNECT request as parsed (`forwarded`, `baggage`, ...).
    pub request: ParsedConnect,
}

/// An HBONE server presenting the waypoint identity: records each CONNECT, answers
/// `waypoint\n`, then echoes.
pub struct Waypoint {
    pub seen: mpsc::Receiver<Seen>,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

pub fn waypoint(ca: &SigningCa, addr: SocketAddr) -> Waypoint {
    waypoint_as(ca, addr, WAYPOINT_ID)
}

/// Run `f` to completion on a fresh epoll runtime with `entries` ring entries, on this thread.
pub fn block_on<F: std::future::Future>(entries: u32, f: F) -> F::Output {
    let decision = runtime::driver::DriverDecision {
        kind: runtime::driver::DriverKind::Epoll,
        reason: "test".into(),
    };
    let (mut rt, _) = runtime::driver::build_runtime(&decision, entries).unwrap();
    rt.block_on(f)
}

/// A test waypoint presenting `identity`.
pub fn waypoint_as(ca: &SigningCa, addr: SocketAddr, identity: &str) -> Waypoint {
    let cert = ca
        .issue(&identity.parse().unwrap(), SystemTime::now())
        .unwrap();
    let tls = hbone::tls::server_config(&cert).unwrap();
    let listener = TcpListener::bind(addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let (tx, seen) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    std::thread::spawn(move || {
        block_on(256, async move {
            let l = monoio::net::TcpListener::from_std(listener).unwrap();
            let tx = Rc::new(tx);
            loop {
                let Ok((tcp, peer)) = l.accept().await else {
                    continue;
                };
                if s2.load(Ordering::SeqCst) {
                    return;
                }
                let (tls, tx) = (tls.clone(), tx.clone());
                monoio::spawn(async move {
                    let h = Rc::new(move |inb: Inbound| {
                        let _ = tx.send(Seen {
                            peer: inb.peer_identity.clone(),
                            authority: inb.request.target,
                            request: inb.request.clone(),
                        });
                        async move {
                            let Ok(mut s) = inb.accept() else { return };
                            if s.write_all(bytes::Bytes::from_static(b"waypoint\n"), false)
                                .await
                                .is_err()
                            {
                                return;
                            }
                            while let Some(Ok(b)) = s.read().await {
                                if s.write_all(b, false).await.is_err() {
                                    return;
                                }
                            }
                            let _ = s.write_all(bytes::Bytes::new(), true).await;
                        }
                    });
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
    Waypoint { seen, stop, addr }
}

/// Open an HBONE stream to `zt` acting as `identity` (expecting the ztunnel identity), for
/// `authority`; returns the status and, on 200, the first line the far end sent.
pub fn hbone_call(
    ca: &SigningCa,
    identity: &str,
    zt: SocketAddr,
    authority: SocketAddr,
) -> (u16, String) {
    hbone_call_expecting(ca, identity, ZTUNNEL_ID, zt, authority)
}

/// [`hbone_call`] requiring the server to prove `server_id`.
pub fn hbone_call_expecting(
    ca: &SigningCa,
    identity: &str,
    server_id: &str,
    zt: SocketAddr,
    authority: SocketAddr,
) -> (u16, String) {
    try_hbone_call(ca, ca, identity, server_id, zt, authority)
        .unwrap_or_else(|e| panic!("HBONE connection to {zt}: {e}"))
}

/// [`hbone_call_expecting`] with a client certificate issued by `ca` while trusting the
/// roots of `trust`; Err: the TLS/HTTP/2 connection itself failed (e.g. the server refused
/// our certificate).
pub fn try_hbone_call(
    ca: &SigningCa,
    trust: &SigningCa,
    identity: &str,
    server_id: &str,
    zt: SocketAddr,
    authority: SocketAddr,
) -> Result<(u16, String), String> {
    let server_id: Identity = server_id.parse().unwrap();
    let id: Identity = identity.parse().unwrap();
    let mut cert = ca.issue(&id, SystemTime::now()).unwrap();
    cert.roots = trust.issue(&id, SystemTime::now()).unwrap().roots;
    try_hbone_request(cert, server_id, zt, ConnectRequest::new(authority))
}

/// One HBONE stream `req` over a new connection to `to` with `cert`, requiring the server
/// to prove `server_id`: the status and, on 200, the first line the far end sent. Err: the
/// TLS/HTTP/2 connection failed, or the stream failed other than with a status.
pub fn try_hbone_request(
    cert: WorkloadCert,
    server_id: Identity,
    to: SocketAddr,
    req: ConnectRequest,
) -> Result<(u16, String), String> {
    std::thread::spawn(move || {
        block_on(64, async move {
            let tls = hbone::tls::client_config(&cert, &[server_id]).unwrap();
            let c = hbone::client::Client::connect(
                to,
                tls,
                &H2Settings::default(),
                &hbone::tls::TlsCounters::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(match c.open(&req).await {
                Err(hbone::HboneError::Status(s)) => (s.as_u16(), String::new()),
                // TLS 1.3: a refused client certificate surfaces here.
                Err(e) => return Err(e.to_string()),
                Ok(mut s) => {
                    let mut got = Vec::new();
                    while !got.contains(&b'\n') {
                        match s.read().await {
                            Some(Ok(b)) => got.extend_from_slice(&b),
                            _ => break,
                        }
                    }
                    let line = String::from_utf8_lossy(&got);
                    (200, line.lines().next().unwrap_or_default().to_string())
                }
            })
        })
    })
    .join()
    .unwrap()
}

/// A TLS handshake with the HBONE listener at `addr`, as `identity` (client certificate from
/// `ca`), requiring the server to prove `expect`. Ok: the SPIFFE identities of the leaf the
/// server presented (read back from the certificate); Err: the handshake failed.
pub fn presented_identity(
    ca: &SigningCa,
    identity: &str,
    expect: &str,
    addr: SocketAddr,
) -> Result<Vec<String>, String> {
    let cert = ca
        .issue(&identity.parse().unwrap(), SystemTime::now())
        .unwrap();
    let cfg = hbone::tls::client_config(&cert, &[expect.parse::<Identity>().unwrap()]).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut tcp).map_err(|e| e.to_string())?;
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no server certificate")?;
    let info = hbone::tls::leaf_info(leaf)?;
    Ok(info.identities.iter().map(|i| i.to_string()).collect())
}

/// Serve one connection as a test pod: say `name` and a newline, then echo every byte until
/// the peer half-closes, then half-close back.
pub fn named_echo(mut c: TcpStream, name: &str) {
    let _ = c.set_nonblocking(false);
    let _ = c.write_all(format!("{name}\n").as_bytes());
    let mut buf = [0u8; 16384];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
}
