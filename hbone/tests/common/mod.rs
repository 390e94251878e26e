//! Test fixtures: a CA, workload certificates, and an HBONE server on its own thread and
//! monoio runtime, with an echo or a forward-to-target handler.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hbone::ca::{CertSource, SigningCa, WorkloadCert};
use hbone::server::{serve_connection, Inbound, ServerCounters};
use hbone::{H2Settings, Identity};
use runtime::driver::{build_runtime, DriverDecision, DriverKind};
use runtime::event::LocalEvent;
use runtime::snapshot::Publisher;

pub fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa)
}

/// The pool key of a stream from workload `src` to a server that must be `dst`, at `addr`.
pub fn key(src: &str, dst: &str, addr: SocketAddr) -> hbone::pool::PoolKey {
    hbone::pool::PoolKey {
        src: id(src),
        dst: vec![id(dst)],
        addr,
    }
}

/// [`hbone::stream::bridge`] as the tests run it: 64 KiB reads, a minute's idle bound, no
/// abort.
pub async fn bridge(
    tcp: monoio::net::TcpStream,
    s: hbone::stream::H2Stream,
) -> runtime::forward::Outcome {
    hbone::stream::bridge(
        tcp,
        s,
        64 * 1024,
        Duration::from_secs(60),
        std::future::pending(),
    )
    .await
}

pub fn ca() -> SigningCa {
    SigningCa::generate_root("cluster.local").unwrap().0
}

pub fn cert(ca: &SigningCa, sa: &str) -> WorkloadCert {
    ca.issue(&id(sa), SystemTime::now()).unwrap()
}

pub fn decision(kind: DriverKind) -> DriverDecision {
    DriverDecision {
        kind,
        reason: "test".into(),
    }
}

/// Run `f` on a fresh monoio runtime of `kind` on this thread.
pub fn block_on<F: std::future::Future>(kind: DriverKind, f: F) -> F::Output {
    let (mut rt, _) = build_runtime(&decision(kind), 256).unwrap();
    rt.block_on(f)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Handler {
    /// Echo every byte back; END_STREAM answered with END_STREAM.
    Echo,
    /// Connect to the CONNECT target and bridge (503 when the connect fails).
    Forward,
}

/// What the server saw of each stream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: Option<Identity>,
    pub leaf: Option<Vec<u8>>,
    pub target: SocketAddr,
    pub baggage: hbone::wire::Baggage,
}

pub struct Server {
    pub addr: SocketAddr,
    pub counters: Arc<ServerCounters>,
    pub seen: mpsc::Receiver<Seen>,
    drain: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Ask every connection to GOAWAY (open streams finish).
    pub fn drain(&self) {
        self.drain.store(true, Ordering::SeqCst);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock accept with a connection.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn echo(inbound: Inbound) {
    let Ok(mut s) = inbound.accept() else { return };
    while let Some(chunk) = s.read().await {
        match chunk {
            Ok(b) => {
                if s.write_all(b, false).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = s.write_all(bytes::Bytes::new(), true).await;
}

async fn forward(inbound: Inbound) {
    let target = inbound.request.target;
    let Ok(tcp) = monoio::net::TcpStream::connect_addr(target).await else {
        inbound.reject(hbone::wire::status::UPSTREAM_FAILED);
        return;
    };
    let Ok(s) = inbound.accept() else { return };
    bridge(tcp, s).await;
}

/// Start an HBONE server with `cert` on 127.0.0.1:0.
pub fn server(
    cert: &WorkloadCert,
    settings: H2Settings,
    handler: Handler,
    kind: DriverKind,
) -> Server {
    server_with_tls(
        hbone::tls::server_config(cert).unwrap(),
        settings,
        handler,
        kind,
    )
}

/// An echo server with default settings on io_uring.
pub fn echo_server(cert: &WorkloadCert) -> Server {
    server(
        cert,
        H2Settings::default(),
        Handler::Echo,
        DriverKind::Uring,
    )
}

/// A forwarding server (CONNECT target dialled and bridged) with default settings.
pub fn forward_server(cert: &WorkloadCert) -> Server {
    server(
        cert,
        H2Settings::default(),
        Handler::Forward,
        DriverKind::Uring,
    )
}

/// A certificate for `sa` that was valid for a day and expired a day ago.
pub fn expired_cert(ca: &SigningCa, sa: &str) -> WorkloadCert {
    let day = Duration::from_secs(24 * 3600);
    ca.mint(&id(sa), SystemTime::now() - 2 * day, day).unwrap()
}

/// A server config like ours (TLS 1.3, client certificate required, ALPN h2) whose
/// key-exchange groups are `groups`, to stand in for other implementations' choices.
pub fn server_tls_with_groups(
    cert: &WorkloadCert,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Arc<rustls::ServerConfig> {
    let mut provider = (*hbone::tls::provider()).clone();
    provider.kx_groups = groups;
    let provider = Arc::new(provider);
    let mut roots = rustls::RootCertStore::empty();
    for r in &cert.roots {
        roots.add(r.clone()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.to_rustls())
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(tls)
}

/// Start an HBONE server with a given rustls config on 127.0.0.1:0.
pub fn server_with_tls(
    tls: Arc<rustls::ServerConfig>,
    settings: H2Settings,
    handler: Handler,
    kind: DriverKind,
) -> Server {
    server_with_tls_from(Publisher::new(tls), settings, handler, kind)
}

/// [`server_with_tls`] taking each connection's config from `tls` when it is accepted, so
/// a test can swap it (a rotated certificate: a new config).
pub fn server_with_tls_from(
    tls: Publisher<Arc<rustls::ServerConfig>>,
    settings: H2Settings,
    handler: Handler,
    kind: DriverKind,
) -> Server {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let counters = Arc::new(ServerCounters::default());
    let (tx, seen) = mpsc::channel();
    let drain = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (c2, d2, s2) = (counters.clone(), drain.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        block_on(kind, async move {
            let l = monoio::net::TcpListener::from_std(listener).unwrap();
            let drain_ev = LocalEvent::new();
            // Poll the cross-thread drain flag and turn it into a local event.
            let (ev, d3) = (drain_ev.clone(), d2.clone());
            monoio::spawn(async move {
                while !d3.load(Ordering::SeqCst) {
                    monoio::time::sleep(Duration::from_millis(5)).await;
                }
                ev.set();
            });
            let tx = Rc::new(tx);
            loop {
                let Ok((tcp, peer)) = l.accept().await else {
                    continue;
                };
                if s2.load(Ordering::SeqCst) {
                    return;
                }
                let tls = (*tls.load()).clone();
                let settings = settings.clone();
                let counters = c2.clone();
                let tx = tx.clone();
                let wait = drain_ev.wait();
                let ev = drain_ev.clone();
                let drain_fut = async move {
                    if !ev.is_set() {
                        wait.await
                    }
                };
                monoio::spawn(async move {
                    let h = Rc::new(move |inb: Inbound| {
                        let _ = tx.send(Seen {
                            peer: inb.peer_identity.clone(),
                            leaf: inb.peer_certificate.as_ref().map(|c| c.as_ref().to_vec()),
                            target: inb.request.target,
                            baggage: inb.request.baggage.clone(),
                        });
                        async move {
                            match handler {
                                Handler::Echo => echo(inb).await,
                                Handler::Forward => forward(inb).await,
                            }
                        }
                    });
                    let _ =
                        serve_connection(tcp, peer, tls, &settings, counters, drain_fut, h).await;
                });
            }
        })
    });
    Server {
        addr,
        counters,
        seen,
        drain,
        thread: Some(thread),
        stop,
    }
}

/// A deterministic pseudo-random byte stream and its checksum.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

/// FNV-1a over 8-byte words (fast enough in debug builds for hundreds of MiB).
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Sum {
    pub hash: u64,
    pub len: u64,
}

impl Sum {
    pub fn update(&mut self, data: &[u8]) {
        let mut h = if self.len == 0 {
            0xcbf29ce484222325
        } else {
            self.hash
        };
        for (i, b) in data.iter().enumerate() {
            // position-dependent so chunking does not matter
            h = (h ^ (*b as u64).wrapping_add((self.len + i as u64) << 8))
                .wrapping_mul(0x100000001b3);
        }
        self.hash = h;
        self.len += data.len() as u64;
    }
}

/// A tokio runtime for the stock-stack peer.
pub fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Their client: TLS + h2 on tokio, a CONNECT to `authority` with `method`.
pub async fn their_request(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: http::Method,
    authority: &str,
    extra_header: Option<(String, String)>,
) -> Result<
    (
        http::StatusCode,
        h2::SendStream<bytes::Bytes>,
        h2::RecvStream,
    ),
    h2::Error,
> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect("10.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await?;
    let mut b = http::Request::builder().method(method).uri(authority);
    if let Some((k, v)) = extra_header {
        b = b.header(k, v);
    }
    let (resp, stream) = send.send_request(b.body(()).unwrap(), false)?;
    let resp = resp.await?;
    Ok((resp.status(), stream, resp.into_body()))
}

/// How many descriptors this process has open.
pub fn fd_count() -> usize {
    runtime::sys::open_fd_count().unwrap()
}

/// Wait (30 s at most) until the process's descriptor count is at most `limit` and stable
/// over 100 ms; else list the open descriptors and fail as a leak.
pub fn settle(limit: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = fd_count();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = fd_count();
        if now <= limit && now == last {
            return;
        }
        last = now;
        if std::time::Instant::now() >= deadline {
            for e in std::fs::read_dir("/proc/self/fd").unwrap() {
                let p = e.unwrap().path();
                eprintln!("{} -> {:?}", p.display(), std::fs::read_link(&p));
            }
            panic!("descriptor leak: {} > {limit}", fd_count());
        }
    }
}
