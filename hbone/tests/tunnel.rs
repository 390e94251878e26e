//! HBONE end to end over real sockets and real TLS: data integrity, identities, refusals,
//! pooling, GOAWAY, rotation and bad input.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hbone::ca::WorkloadCert;
use hbone::pool::{Pool, PoolKey};
use hbone::stream::H2Stream;
use hbone::tls::TlsCounters;
use hbone::wire::ConnectRequest;
use hbone::{H2Settings, HboneError};
use runtime::driver::DriverKind;

const TARGET: &str = "10.1.2.3:8080";

/// A CONNECT to an address nobody listens on is answered 503 (the server's upstream connect
/// failed), over the pool's existing connection.
async fn assert_dead_upstream_is_503(pool: &Pool, k: &PoolKey, cert: &WorkloadCert) {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    match pool.open(k, cert, &ConnectRequest::new(dead)).await {
        Err(HboneError::Status(s)) => assert_eq!(s, http::StatusCode::SERVICE_UNAVAILABLE),
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("expected 503, got a stream"),
    }
}

fn req() -> ConnectRequest {
    let mut r = ConnectRequest::new(TARGET.parse().unwrap());
    r.baggage.namespace = Some("default".into());
    r
}

/// Write `total` pattern bytes into `s` while reading the echo; returns (sent, received).
async fn echo_through(s: H2Stream, total: usize, seed: u64) -> (Sum, Sum) {
    let (mut w, mut r) = s.split();
    let writer = async move {
        let mut p = Pattern::new(seed);
        let mut sum = Sum::default();
        let mut left = total;
        while left > 0 {
            let n = left.min(256 * 1024);
            let mut buf = vec![0u8; n];
            p.fill(&mut buf);
            sum.update(&buf);
            w.write_all(Bytes::from(buf), false).await.expect("write");
            left -= n;
        }
        w.write_all(Bytes::new(), true).await.expect("end stream");
        sum
    };
    let reader = async move {
        let mut sum = Sum::default();
        while let Some(chunk) = r.read().await {
            sum.update(&chunk.expect("read"));
        }
        sum
    };
    monoio::join!(writer, reader)
}

fn echo_test(kind: DriverKind, total: usize) {
    let ca = ca();
    let (client_cert, server_cert) = (cert(&ca, "client"), cert(&ca, "server"));
    let srv = server(&server_cert, H2Settings::default(), Handler::Echo, kind);
    let k = key("client", "server", srv.addr);
    let (sent, got) = block_on(kind, async {
        let pool = Pool::new(H2Settings::default(), Arc::new(TlsCounters::default()));
        let s = pool.open(&k, &client_cert, &req()).await.expect("open");
        echo_through(s, total, 7).await
    });
    assert_eq!(sent.len, total as u64);
    assert_eq!(got, sent, "echoed bytes differ");
    let seen = srv.seen.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(
        seen.peer,
        Some(id("client")),
        "server must see the client's SPIFFE identity exactly"
    );
    assert_eq!(seen.target, TARGET.parse().unwrap());
    assert_eq!(seen.baggage.namespace.as_deref(), Some("default"));
}

#[test]
fn echo_256mib_with_matching_checksums_io_uring() {
    echo_test(DriverKind::Uring, 256 << 20);
}

#[test]
fn echo_32mib_with_matching_checksums_epoll() {
    echo_test(DriverKind::Epoll, 32 << 20);
}

/// Try one stream; return the client error (if any) and the client's counters.
fn try_open(
    client_cert: &WorkloadCert,
    expect: &str,
    srv: &Server,
) -> (Result<(), HboneError>, Arc<TlsCounters>) {
    let counters = Arc::new(TlsCounters::default());
    let c2 = counters.clone();
    let k = key(&client_cert.identity.service_account, expect, srv.addr);
    let r = block_on(DriverKind::Uring, async move {
        let pool = Pool::new(H2Settings::default(), c2);
        let s = pool.open(&k, client_cert, &req()).await?;
        let (mut w, mut r) = s.split();
        w.write_all(Bytes::from_static(b"ping"), true).await?;
        let got = r.read().await.transpose()?;
        assert_eq!(got.as_deref(), Some(&b"ping"[..]));
        Ok(())
    });
    (r, counters)
}

/// Wait (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn wrong_server_identity_is_refused_and_counted() {
    let ca = ca();
    let srv = echo_server(&cert(&ca, "impostor"));
    let (r, counters) = try_open(&cert(&ca, "client"), "server", &srv);
    let e = r.expect_err("must refuse a server proving another identity");
    assert!(
        e.to_string().contains("connection to") || matches!(e, HboneError::Tls(_)),
        "{e}"
    );
    assert_eq!(counters.identity_mismatch.load(Relaxed), 1, "{e}");
    // The right expectation against the same server works.
    let (ok, _) = try_open(&cert(&ca, "client"), "impostor", &srv);
    ok.expect("expected identity accepted");
}

/// A server with a good certificate refuses `bad_client` and counts it under `reason`; a
/// client with a good certificate refuses `bad_server` and counts it under `reason` too.
fn refused_both_ways(
    ca: &hbone::ca::SigningCa,
    bad_client: &WorkloadCert,
    bad_server: &WorkloadCert,
    reason: fn(&TlsCounters) -> &std::sync::atomic::AtomicU64,
) {
    let srv = echo_server(&cert(ca, "server"));
    let (r, _) = try_open(bad_client, "server", &srv);
    assert!(r.is_err());
    eventually("the server counts the refused client", || {
        reason(&srv.counters.tls).load(Relaxed) == 1
    });
    let srv2 = echo_server(bad_server);
    let (r, counters) = try_open(&cert(ca, "client"), "server", &srv2);
    assert!(r.is_err());
    assert_eq!(reason(&counters).load(Relaxed), 1);
}

#[test]
fn untrusted_root_is_refused_both_ways() {
    let (ca, other) = (ca(), ca());
    // A client from another CA, trusting our server's root so only the server's check fails;
    // a server from another CA.
    let foreign = WorkloadCert {
        roots: cert(&ca, "x").roots,
        ..cert(&other, "client")
    };
    refused_both_ways(&ca, &foreign, &cert(&other, "server"), |c| &c.untrusted);
}

#[test]
fn expired_certificate_is_refused_both_ways() {
    let ca = ca();
    let (client, server) = (expired_cert(&ca, "client"), expired_cert(&ca, "server"));
    refused_both_ways(&ca, &client, &server, |c| &c.expired);
}

#[test]
fn missing_client_certificate_is_refused() {
    use std::io::{Read, Write};
    let ca = ca();
    let srv = echo_server(&cert(&ca, "server"));
    // A client with no certificate (and a verifier that accepts anything).
    #[derive(Debug)]
    struct Any;
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            hbone::tls::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), "10.0.0.1".try_into().unwrap()).unwrap();
    let mut tcp = std::net::TcpStream::connect(srv.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    // TLS 1.3: the client finishes first; the refusal arrives on the next read.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let mut buf = [0u8; 64];
    let r = tls.read(&mut buf);
    assert!(
        !matches!(r, Ok(n) if n > 0),
        "server must not talk to a client without a certificate"
    );
    eventually("server counts the missing client certificate", || {
        srv.counters.tls.no_client_cert.load(Relaxed) == 1
    });
}

#[test]
fn five_hundred_streams_use_five_connections_and_goaway_drains() {
    let ca = ca();
    let (client_cert, server_cert) = (cert(&ca, "client"), cert(&ca, "server"));
    let srv = echo_server(&server_cert);
    let k = key("client", "server", srv.addr);
    let srv2 = &srv;
    block_on(DriverKind::Uring, async move {
        let pool = Pool::new(H2Settings::default(), Arc::new(TlsCounters::default()));
        // Open 500 streams concurrently and hold them all.
        let mut opens = Vec::new();
        for _ in 0..500 {
            let (pool, k, c) = (pool.clone(), k.clone(), client_cert.clone());
            opens.push(monoio::spawn(async move {
                pool.open(&k, &c, &req()).await.expect("open")
            }));
        }
        let mut streams = Vec::new();
        for o in opens {
            streams.push(o.await.split());
        }
        assert_eq!(pool.connects(), 5, "500 streams at 100 per connection");
        assert_eq!(pool.connections(&k), 5);
        // GOAWAY: open streams keep working to the end.
        srv2.drain();
        monoio::time::sleep(Duration::from_millis(100)).await;
        for (w, r) in streams.iter_mut() {
            w.write_all(Bytes::from_static(b"after-goaway"), true)
                .await
                .expect("stream survives GOAWAY");
            let mut got = Vec::new();
            while let Some(c) = r.read().await {
                got.extend_from_slice(&c.expect("read after GOAWAY"));
            }
            assert_eq!(got, b"after-goaway");
        }
        drop(streams);
        // New streams go to a new connection (the drained ones take none).
        let s = pool
            .open(&k, &client_cert, &req())
            .await
            .expect("open after GOAWAY");
        let (sent, got) = echo_through(s, 1000, 3).await;
        assert_eq!(sent, got);
        assert!(
            pool.connects() >= 6,
            "a new connection after GOAWAY, got {}",
            pool.connects()
        );
    });
}

#[test]
fn rotation_keeps_running_stream_and_new_streams_use_new_cert() {
    let ca = ca();
    let server_cert = cert(&ca, "server");
    let srv = echo_server(&server_cert);
    let k = key("client", "server", srv.addr);
    let old = cert(&ca, "client");
    let new = cert(&ca, "client");
    assert_ne!(old.chain[0], new.chain[0]);
    let (old2, new2) = (old.clone(), new.clone());
    block_on(DriverKind::Uring, async move {
        let pool = Pool::new(H2Settings::default(), Arc::new(TlsCounters::default()));
        let (mut w, mut r) = pool.open(&k, &old2, &req()).await.unwrap().split();
        w.write_all(Bytes::from_static(b"one"), false)
            .await
            .unwrap();
        assert_eq!(r.read().await.unwrap().unwrap().as_ref(), b"one");
        // Rotate: a new stream with the new certificate.
        let s2 = pool.open(&k, &new2, &req()).await.unwrap();
        let (a, b) = echo_through(s2, 4096, 9).await;
        assert_eq!(a, b);
        // The old stream still works.
        w.write_all(Bytes::from_static(b"two"), true).await.unwrap();
        assert_eq!(r.read().await.unwrap().unwrap().as_ref(), b"two");
        assert!(r.read().await.is_none());
        assert_eq!(pool.connects(), 2);
        // Later streams with the new certificate share its connection.
        let s3 = pool.open(&k, &new2, &req()).await.unwrap();
        let (a, b) = echo_through(s3, 4096, 10).await;
        assert_eq!(a, b);
        assert_eq!(pool.connects(), 2);
    });
    let first = srv.seen.recv_timeout(Duration::from_secs(30)).unwrap();
    let second = srv.seen.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(first.leaf.as_deref(), Some(old.chain[0].as_ref()));
    assert_eq!(second.leaf.as_deref(), Some(new.chain[0].as_ref()));
}

/// A CONNECT whose `forwarded` host or a baggage field holds a byte not allowed in a header
/// value (a workload named `web\x07`) is refused with a protocol error naming the header, not
/// sent without it: on a new pooled connection (none is made), on a pooled one (it keeps
/// serving) and on a plain client connection.
#[test]
fn a_connect_with_a_bad_header_value_is_refused_with_a_protocol_error() {
    let ca = ca();
    let (client_cert, server_cert) = (cert(&ca, "client"), cert(&ca, "server"));
    let srv = echo_server(&server_cert);
    let k = key("client", "server", srv.addr);
    let bad_host = || {
        let mut r = req();
        r.host = Some("echo\x07.default".into());
        r
    };
    let bad_baggage = || {
        let mut r = req();
        r.baggage.workload_name = Some("web\r\nx-injected: 1".into());
        r
    };
    let refused = |r: Result<H2Stream, HboneError>, header: &str| match r {
        Err(HboneError::Protocol(m)) => assert!(
            m.contains(&format!("the {header} header")),
            "the error names the header: {m}"
        ),
        Err(e) => panic!("expected a protocol error naming {header}, got {e}"),
        Ok(_) => panic!("a CONNECT with a bad {header} value was sent"),
    };
    block_on(DriverKind::Uring, async move {
        let counters = Arc::new(TlsCounters::default());
        let pool = Pool::new(H2Settings::default(), counters.clone());
        // No connection yet: refused before one is made.
        refused(pool.open(&k, &client_cert, &bad_host()).await, "forwarded");
        assert_eq!(pool.connects(), 0);
        let (a, b) =
            echo_through(pool.open(&k, &client_cert, &req()).await.unwrap(), 4096, 1).await;
        assert_eq!(a, b);
        // On the pooled connection: refused, and the connection serves the next stream.
        refused(pool.open(&k, &client_cert, &bad_baggage()).await, "baggage");
        refused(pool.open(&k, &client_cert, &bad_host()).await, "forwarded");
        let (a, b) =
            echo_through(pool.open(&k, &client_cert, &req()).await.unwrap(), 4096, 2).await;
        assert_eq!(a, b);
        assert_eq!(pool.connects(), 1);
        // A plain client connection.
        let tls =
            hbone::tls::client_config_to(&client_cert, &[id("server")], srv.addr, true).unwrap();
        let settings = H2Settings::default();
        let c = hbone::client::Client::connect(srv.addr, tls, &settings, &counters)
            .await
            .unwrap();
        refused(c.open(&bad_baggage()).await, "baggage");
        let (a, b) = echo_through(c.open(&req()).await.unwrap(), 4096, 3).await;
        assert_eq!(a, b);
    });
    // The server saw the three good streams only.
    for _ in 0..3 {
        srv.seen.recv_timeout(Duration::from_secs(30)).unwrap();
    }
    assert!(
        srv.seen.try_recv().is_err(),
        "a refused CONNECT reached the server"
    );
}

#[test]
fn forward_handler_bridges_to_tcp_and_503_when_upstream_is_down() {
    use std::io::{Read, Write};
    let ca = ca();
    let srv = forward_server(&cert(&ca, "server"));
    // A TCP backend that answers with what it got, reversed, after the client half-closes.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let baddr = backend.local_addr().unwrap();
    let bt = std::thread::spawn(move || {
        let (mut c, _) = backend.accept().unwrap();
        let mut v = Vec::new();
        c.read_to_end(&mut v).unwrap();
        v.reverse();
        c.write_all(&v).unwrap();
    });
    let client_cert = cert(&ca, "client");
    let k = key("client", "server", srv.addr);
    block_on(DriverKind::Uring, async move {
        let pool = Pool::new(H2Settings::default(), Arc::new(TlsCounters::default()));
        let (mut w, mut r) = pool
            .open(&k, &client_cert, &ConnectRequest::new(baddr))
            .await
            .unwrap()
            .split();
        w.write_all(Bytes::from_static(b"hello"), true)
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(c) = r.read().await {
            got.extend_from_slice(&c.unwrap());
        }
        assert_eq!(
            got, b"olleh",
            "half-close reached the backend and its reply came back"
        );
        // A dead upstream: 503.
        assert_dead_upstream_is_503(&pool, &k, &client_cert).await;
    });
    bt.join().unwrap();
}

/// The first key share against servers that choose the group differently. Envoy (BoringSSL,
/// which sets `SSL_OP_CIPHER_SERVER_PREFERENCE` unless `prefer_client_ciphers`, curves
/// `X25519:P-256`) picks X25519 whatever the client's order, so our P-256 share draws a
/// HelloRetryRequest. A rustls 0.23 server picks the client's first supported group, so one
/// with groups [X25519, P-256] would take P-256; a server with X25519 alone makes Envoy's
/// choice. Istio's ztunnel (rustls, ring's default groups) and ours take P-256.
///
/// Each HelloRetryRequest is answered (the second ClientHello is not held back with the
/// writes gathered for one packet after the server's first answer), on the pool's path
/// (a first request rides with the handshake) and on a plain connect; after one, the worker
/// sends that destination the group it asked for, so the next handshake has none.
#[test]
fn hello_retry_request_is_answered_and_taught_once_per_destination() {
    use hbone::tls::{key_share_for, KeyShare};
    use rustls::crypto::ring::kx_group::{SECP256R1, SECP384R1, X25519};
    let ca = ca();
    let (client_cert, server_cert) = (cert(&ca, "client"), cert(&ca, "server"));
    let with = |groups| {
        let tls = server_tls_with_groups(&server_cert, groups);
        server_with_tls(tls, H2Settings::default(), Handler::Echo, DriverKind::Uring)
    };
    let (envoy1, envoy2) = (with(vec![X25519]), with(vec![X25519]));
    let ztunnel = with(vec![X25519, SECP256R1, SECP384R1]);
    let ours = echo_server(&server_cert);
    let addrs = [envoy1.addr, envoy2.addr, ztunnel.addr, ours.addr];
    block_on(DriverKind::Uring, async move {
        let counters = Arc::new(TlsCounters::default());
        let retries = || counters.hello_retries.load(Relaxed);
        let pool = Pool::new(H2Settings::default(), counters.clone());
        let settings = H2Settings::default();
        let connect = |addr| {
            let tls =
                hbone::tls::client_config_to(&client_cert, &[id("server")], addr, true).unwrap();
            hbone::client::Client::connect(addr, tls, &settings, &counters)
        };
        for a in addrs {
            assert_eq!(key_share_for(a), KeyShare::P256, "nothing learnt yet");
        }
        // The pool's path: a HelloRetryRequest, answered.
        let k = key("client", "server", envoy1.addr);
        let s = pool.open(&k, &client_cert, &req()).await.expect("open");
        let (sent, got) = echo_through(s, 100_000, 7).await;
        assert_eq!(sent, got);
        assert_eq!(retries(), 1);
        // A plain connect (no first request) to another such server: answered too.
        let c = connect(envoy2.addr).await.expect("connect");
        let (sent, got) = echo_through(c.open(&req()).await.expect("open"), 1000, 8).await;
        assert_eq!(sent, got);
        assert_eq!(retries(), 2);
        // Learnt: a new connection to the first sends X25519 first, and has no retry.
        assert_eq!(key_share_for(envoy1.addr), KeyShare::X25519);
        let c = connect(envoy1.addr).await.expect("connect");
        let (sent, got) = echo_through(c.open(&req()).await.expect("open"), 1000, 9).await;
        assert_eq!(sent, got);
        assert_eq!(
            retries(),
            2,
            "the second handshake to a destination must not retry"
        );
        // Servers that take the client's first group keep getting P-256, with no retry.
        for addr in [ztunnel.addr, ours.addr] {
            let s = pool
                .open(&key("client", "server", addr), &client_cert, &req())
                .await
                .expect("open");
            let (sent, got) = echo_through(s, 1000, 10).await;
            assert_eq!(sent, got);
            assert_eq!(key_share_for(addr), KeyShare::P256);
        }
        assert_eq!(retries(), 2);
    });
}

/// An opener cancelled while its new connection is being set up (its future dropped while
/// it waits for the handshake) must not leave its first stream parked on the connection:
/// the stream is reset, so the server's forward to the upstream is closed, and the
/// connection stays usable for later streams.
#[test]
fn cancelled_opener_resets_its_first_stream_and_upstream_closes() {
    use std::io::Read;
    let ca = ca();
    let srv = forward_server(&cert(&ca, "server"));
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let baddr = backend.local_addr().unwrap();
    // The backend reports what became of the server's connection to it: EOF (or a reset)
    // once the stream is gone, or a timeout if it was kept open.
    let (tx, closed) = std::sync::mpsc::channel();
    let bt = std::thread::spawn(move || {
        let (mut c, _) = backend.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        let r = loop {
            match c.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break Ok(()),
                Err(e) => break Err(e.kind()),
            }
        };
        let _ = tx.send(r);
    });
    let client_cert = cert(&ca, "client");
    let k = key("client", "server", srv.addr);
    block_on(DriverKind::Uring, async move {
        let pool = Pool::new(H2Settings::default(), Arc::new(TlsCounters::default()));
        // The open is polled once (it reserves the slot and starts the connection), then
        // dropped: the other branch is already done.
        let to_backend = ConnectRequest::new(baddr);
        let open = pool.open(&k, &client_cert, &to_backend);
        let r = runtime::worker::race(open, std::future::ready(())).await;
        assert!(r.is_right(), "the open cannot have finished in one poll");
        assert_eq!(pool.connects(), 1, "the connection was started");
        // Keep this runtime (and the pooled connection) running until the backend knows.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let outcome = loop {
            match closed.try_recv() {
                Ok(r) => break r,
                Err(_) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "backend never reported"
                    );
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        assert_eq!(
            outcome,
            Ok(()),
            "the cancelled opener's CONNECT stayed open on the server (its upstream too)"
        );
        // The reset took only the stream: the connection serves the next one.
        assert_dead_upstream_is_503(&pool, &k, &client_cert).await;
        assert_eq!(
            pool.connects(),
            1,
            "the same connection took the next stream"
        );
    });
    bt.join().unwrap();
}

/// The sockets of this process connected to `peer` (found through `/proc/self/fd`), with
/// (SO_RCVBUF, SO_SNDBUF, TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE) of each.
fn sockets_to(peer: SocketAddr) -> Vec<(usize, usize, bool, bool, Duration)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = e.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let r = runtime::sys::with_sockref(fd, |s| {
            if s.peer_addr()?.as_socket() != Some(peer) {
                return Ok(None);
            }
            Ok(Some((
                s.recv_buffer_size()?,
                s.send_buffer_size()?,
                s.nodelay()?,
                s.keepalive()?,
                s.keepalive_time()?,
            )))
        });
        if let Ok(Some(x)) = r {
            out.push(x);
        }
    }
    out
}

/// The worker's socket options (`runtime.socket_recv_buffer` / `socket_send_buffer`,
/// nodelay, keepalive) reach the sockets of HBONE client connections, pooled or not.
#[test]
fn worker_socket_options_reach_hbone_client_sockets() {
    let ca = ca();
    let (client_cert, server_cert) = (cert(&ca, "client"), cert(&ca, "server"));
    let pooled = echo_server(&server_cert);
    let direct = echo_server(&server_cert);
    let mut opts = hbone::client::default_socket_options();
    opts.recv_buffer = Some(49152);
    opts.send_buffer = Some(24576);
    opts.keepalive = Some(Duration::from_secs(45));
    let k = key("client", "server", pooled.addr);
    let (paddr, daddr) = (pooled.addr, direct.addr);
    block_on(DriverKind::Uring, async move {
        let pool = Pool::with_socket_options(
            H2Settings::default(),
            Arc::new(TlsCounters::default()),
            opts.clone(),
        );
        let s = pool.open(&k, &client_cert, &req()).await.expect("open");
        let (sent, got) = echo_through(s, 1000, 5).await;
        assert_eq!(sent, got);
        let tls = hbone::tls::client_config(&client_cert, &[id("server")]).unwrap();
        let c = hbone::client::Client::connect_with(
            daddr,
            tls,
            &H2Settings::default(),
            &TlsCounters::default(),
            &opts,
        )
        .await
        .expect("connect");
        let (sent, got) = echo_through(c.open(&req()).await.expect("open"), 1000, 6).await;
        assert_eq!(sent, got);
        // The kernel reports twice the buffer sizes asked for (its bookkeeping share).
        let want = (2 * 49152, 2 * 24576, true, true, Duration::from_secs(45));
        assert_eq!(sockets_to(paddr), vec![want], "pooled connection");
        assert_eq!(sockets_to(daddr), vec![want], "Client::connect_with");
        drop(c);
    });
}
