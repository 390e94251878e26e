//! Bodies are streamed, not buffered: the real `waypoint` process (its own address space,
//! so its peak RSS is its own) carries a 256 MiB request body and a 256 MiB response body
//! between an HBONE client and a backend (behind a stand-in node ztunnel), byte exact, and
//! its peak resident memory grows by far less than one body.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hbone::ca::{CertSource, SigningCa};
use hbone::client::Client;
use hbone::server::{serve_connection, Inbound, ServerCounters};
use hbone::stream::H2Stream;
use hbone::tls::TlsCounters;
use hbone::wire::ConnectRequest;
use hbone::{H2Settings, Identity};
use runtime::driver::{build_runtime, DriverDecision, DriverKind};

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "app", sa)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let d = DriverDecision {
        kind: DriverKind::Epoll,
        reason: "test".into(),
    };
    let (mut rt, _) = build_runtime(&d, 256).unwrap();
    rt.block_on(f)
}

/// The waypoint process, killed and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const BODY: usize = 256 << 20;
const BLOCK: usize = 1 << 20;

fn block() -> Vec<u8> {
    (0..BLOCK).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn fnv_add(mut h: u64, b: &[u8]) -> u64 {
    for &x in b {
        h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// A backend: `POST` → `len=N fnv=X` of the body (Content-Length, read as it comes);
/// `GET /gen` → [`BODY`] bytes (the block repeated).
fn backend(ip: Ipv4Addr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 256 * 1024];
                loop {
                    let mut hs = [httparse::EMPTY_HEADER; 32];
                    let mut req = httparse::Request::new(&mut hs);
                    let n = match req.parse(&buf) {
                        Ok(httparse::Status::Complete(n)) => n,
                        Ok(httparse::Status::Partial) => match c.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(k) => {
                                buf.extend_from_slice(&chunk[..k]);
                                continue;
                            }
                        },
                        Err(_) => return,
                    };
                    let get = req.method == Some("GET");
                    let len: usize = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |h| {
                            std::str::from_utf8(h.value).unwrap().parse().unwrap()
                        });
                    buf.drain(..n);
                    let (mut h, mut left) = (FNV0, len);
                    let k = left.min(buf.len());
                    h = fnv_add(h, &buf[..k]);
                    buf.drain(..k);
                    left -= k;
                    while left > 0 {
                        let Ok(k) = c.read(&mut chunk[..left.min(256 * 1024)]) else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        h = fnv_add(h, &chunk[..k]);
                        left -= k;
                    }
                    let ok = if get {
                        let b = block();
                        let mut ok = c
                            .write_all(
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n")
                                    .as_bytes(),
                            )
                            .is_ok();
                        for _ in 0..BODY / BLOCK {
                            ok = ok && c.write_all(&b).is_ok();
                        }
                        ok
                    } else {
                        let b = format!("len={len} fnv={h:x}");
                        c.write_all(
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{b}", b.len())
                                .as_bytes(),
                        )
                        .is_ok()
                    };
                    if !ok {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The backend's node ztunnel: accepts CONNECT and bridges to the target.
fn ztunnel(l: TcpListener, tls: Arc<rustls::ServerConfig>) {
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        block_on(async move {
            let l = monoio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((tcp, peer)) = l.accept().await else {
                    continue;
                };
                let tls = tls.clone();
                monoio::spawn(async move {
                    let h = Rc::new(|inb: Inbound| async move {
                        let target = inb.request.target;
                        let Ok(tcp) = monoio::net::TcpStream::connect_addr(target).await else {
                            inb.reject(hbone::wire::status::UPSTREAM_FAILED);
                            return;
                        };
                        let Ok(s) = inb.accept() else { return };
                        hbone::stream::bridge(
                            tcp,
                            s,
                            64 * 1024,
                            Duration::from_secs(120),
                            std::future::pending(),
                        )
                        .await;
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
}

/// `VmHWM` (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Read one response head from the tunnel; the bytes after it stay in `buf`.
async fn read_head(s: &mut H2Stream, buf: &mut Vec<u8>) -> (u16, usize) {
    loop {
        let mut hs = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut hs);
        if let Ok(httparse::Status::Complete(n)) = r.parse(buf) {
            let len = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| {
                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                });
            let code = r.code.unwrap();
            buf.drain(..n);
            return (code, len);
        }
        match s.read().await {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            other => panic!("stream ended before a response head: {other:?}"),
        }
    }
}

/// Read `len` body bytes (some may be in `buf` already): their checksum, nothing kept.
async fn read_body(s: &mut H2Stream, buf: &mut Vec<u8>, len: usize) -> u64 {
    let k = len.min(buf.len());
    let mut h = fnv_add(FNV0, &buf[..k]);
    buf.drain(..k);
    let mut left = len - k;
    while left > 0 {
        match s.read().await {
            Some(Ok(b)) => {
                let k = left.min(b.len());
                h = fnv_add(h, &b[..k]);
                buf.extend_from_slice(&b[k..]);
                left -= k;
            }
            other => panic!("stream ended in a body: {other:?}"),
        }
    }
    h
}

#[test]
fn a_256_mib_body_each_way_does_not_need_memory_of_its_size() {
    let net = (20 + std::process::id() % 200) as u8;
    let zt_ip = Ipv4Addr::new(127, net, 0, 1);
    let Ok(zl) = TcpListener::bind((zt_ip, 15008)) else {
        panic!("127.{net}.0.1:15008 is taken");
    };
    let pod = backend(Ipv4Addr::new(127, net, 0, 2));
    let d = std::env::temp_dir().join(format!("waypoint-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let ca = SigningCa::builtin(&d.join("ca"), "cluster.local").unwrap();
    let now = SystemTime::now();
    ztunnel(
        zl,
        hbone::tls::server_config(&ca.issue(&id("echo"), now).unwrap()).unwrap(),
    );
    let cfg = format!(
        r#"namespaces:
  - name: app
    labels: {{istio.io/dataplane-mode: ambient}}
waypoints:
  - {{name: wp, namespace: app, address: 10.1.0.100}}
nodes:
  - {{name: node-b, ztunnel: {zt_ip}}}
workloads:
  - {{uid: wp, name: wp, namespace: app, serviceAccount: waypoint, workloadIps: ["10.1.0.100"]}}
  - {{uid: e1, name: e1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: ["{ip}"], services: {{"app/echo.app.svc.cluster.local": {{80: {port}}}}}}}
services:
  - {{name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {{80: 8080}}}}
---
waypoint:
  listen: 127.0.0.1:0
  identity: spiffe://cluster.local/ns/app/sa/waypoint
  gateway: app/wp
  address: 10.1.0.100:15008
  ca: {{builtin: {ca}}}
runtime: {{workers: 1, pin: false, drain_timeout: 1s}}
"#,
        ip = pod.ip(),
        port = pod.port(),
        ca = d.join("ca").display(),
    );
    std::fs::write(d.join("waypoint.yaml"), cfg).unwrap();
    let mut child = Proc(
        Command::new(env!("CARGO_BIN_EXE_waypoint"))
            .args(["--config", d.join("waypoint.yaml").to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("READY "), "{line}");
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hbone="))
        .expect("hbone=ADDR")
        .parse()
        .unwrap();
    let me = ca.issue(&id("client"), now).unwrap();
    let tls = hbone::tls::client_config(&me, &[id("waypoint")]).unwrap();
    // Warm up (one small exchange) before the baseline.
    let before = std::cell::Cell::new(0);
    let (sum, got_len, got_fnv) = block_on(async {
        let c = Client::connect(addr, tls, &H2Settings::default(), &TlsCounters::default())
            .await
            .unwrap();
        let mut s = c
            .open(&ConnectRequest::new("10.96.0.1:80".parse().unwrap()))
            .await
            .unwrap();
        let mut buf = Vec::new();
        let host = "echo.app.svc.cluster.local";
        s.write_all(
            Bytes::from(format!(
                "POST /warm HTTP/1.1\r\nhost: {host}\r\ncontent-length: 2\r\n\r\nhi"
            )),
            false,
        )
        .await
        .unwrap();
        let (code, len) = read_head(&mut s, &mut buf).await;
        assert_eq!(code, 200);
        read_body(&mut s, &mut buf, len).await;
        before.set(peak_rss_kib(pid));
        // 256 MiB up.
        s.write_all(
            Bytes::from(format!(
                "POST /sum HTTP/1.1\r\nhost: {host}\r\ncontent-length: {BODY}\r\n\r\n"
            )),
            false,
        )
        .await
        .unwrap();
        let b = Bytes::from(block());
        for _ in 0..BODY / BLOCK {
            s.write_all(b.clone(), false).await.unwrap();
        }
        let (code, len) = read_head(&mut s, &mut buf).await;
        assert_eq!(code, 200);
        while buf.len() < len {
            match s.read().await {
                Some(Ok(b)) => buf.extend_from_slice(&b),
                other => panic!("stream ended in a body: {other:?}"),
            }
        }
        let sum = String::from_utf8(buf.drain(..len).collect()).unwrap();
        // 256 MiB down.
        s.write_all(
            Bytes::from(format!("GET /gen HTTP/1.1\r\nhost: {host}\r\n\r\n")),
            false,
        )
        .await
        .unwrap();
        let (code, len) = read_head(&mut s, &mut buf).await;
        assert_eq!(code, 200);
        let h = read_body(&mut s, &mut buf, len).await;
        (sum, len, h)
    });
    let blk = block();
    let want = (0..BODY / BLOCK).fold(FNV0, |h, _| fnv_add(h, &blk));
    assert_eq!(sum, format!("len={BODY} fnv={want:x}"));
    assert_eq!((got_len, got_fnv), (BODY, want));
    let grew_kib = peak_rss_kib(pid).saturating_sub(before.get());
    // A buffered body would add 256 MiB; streamed, the growth is a few flow-control
    // windows.
    assert!(
        grew_kib < 48 * 1024,
        "peak RSS grew by {grew_kib} KiB for a {BODY}-byte body each way"
    );
    eprintln!(
        "waypoint peak RSS {} KiB before, grew by {grew_kib} KiB",
        before.get()
    );
    let _ = std::fs::remove_dir_all(&d);
}
