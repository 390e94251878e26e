//! `h2.handshake_timeout` (review #6): a peer that connects and never completes TLS and the
//! HTTP/2 handshake is given up on after the deadline, on both sides, with real sockets.
//!
//! - Server: silent TCP clients (and one that stalls mid-ClientHello) are closed, counted,
//!   and their descriptors released; the server keeps serving.
//! - Client: a TCP server that accepts and never speaks TLS makes `Client::connect` fail
//!   with `HandshakeTimeout`, and every opener waiting on the pool slot of that connection
//!   gets the error; the next open, once the peer is healthy, succeeds on a new connection.
//!
//! No timing assertions: the deadlines are short and the waits generously bounded.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use hbone::error::HboneError;
use hbone::pool::Pool;
use hbone::tls::TlsCounters;
use hbone::wire::ConnectRequest;
use hbone::H2Settings;
use runtime::driver::DriverKind;

const SHORT: Duration = Duration::from_millis(300);
/// Generous bound on every wait in this file.
const BOUND: Duration = Duration::from_secs(30);

fn short_deadline() -> H2Settings {
    H2Settings {
        handshake_timeout: SHORT,
        ..H2Settings::default()
    }
}

/// Wait (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Read until the peer closes (EOF or reset), bounded by `BOUND`. Returns what was read.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(BOUND)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the server did not close a stalled handshake: {e}"),
        }
    }
}

fn req() -> ConnectRequest {
    ConnectRequest::new("10.0.0.1:80".parse().unwrap())
}

/// Echo `msg` over a fresh HBONE client connection to `addr` (the server still serves).
fn echo_once(addr: SocketAddr, cert: &hbone::ca::WorkloadCert, server: &str, msg: &'static [u8]) {
    let tls = hbone::tls::client_config(cert, &[id(server)]).unwrap();
    let got = block_on(DriverKind::Uring, async move {
        let counters = TlsCounters::default();
        let c = hbone::client::Client::connect(addr, tls, &short_deadline(), &counters)
            .await
            .expect("a well-behaved client connects");
        let (mut w, mut r) = c.open(&req()).await.expect("open").split();
        w.write_all(Bytes::from_static(msg), true).await.unwrap();
        r.read().await.unwrap().unwrap()
    });
    assert_eq!(got.as_ref(), msg);
}

/// A blocking rustls client that completes the TLS handshake with `addr` (ALPN h2) and
/// sends nothing more.
fn tls_then_silent(
    addr: SocketAddr,
    cert: &hbone::ca::WorkloadCert,
    server: &str,
) -> (rustls::ClientConnection, TcpStream) {
    let cfg = hbone::tls::client_config(cert, &[id(server)]).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(BOUND)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("TLS handshake");
    }
    while conn.wants_write() {
        conn.write_tls(&mut tcp).unwrap();
    }
    (conn, tcp)
}

#[test]
fn server_closes_silent_and_stalled_handshakes_and_frees_their_descriptors() {
    let ca = ca();
    let srv = server(
        &cert(&ca, "server"),
        short_deadline(),
        Handler::Echo,
        DriverKind::Uring,
    );
    let client_cert = cert(&ca, "client");
    // A first served connection, so the server's lazily made state is in the baseline.
    echo_once(srv.addr, &client_cert, "server", b"warm");
    settle(usize::MAX);
    let before = fd_count();

    // Five clients that connect and never send a byte, one that stops inside its
    // ClientHello (a TLS record header announcing more than it sends).
    let mut silent: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(srv.addr).unwrap())
        .collect();
    let mut partial = TcpStream::connect(srv.addr).unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    silent.push(partial);
    // One that completes TLS (a real client certificate) and never sends the HTTP/2
    // preface.
    let mut tls_only = tls_then_silent(srv.addr, &client_cert, "server");
    eventually("seven handshake timeouts counted", || {
        srv.counters.handshake_timeouts.load(SeqCst) == 7
    });
    for s in &mut silent {
        let got = read_until_closed(s);
        // A stalled ClientHello may get nothing or a TLS alert; never a ServerHello.
        assert!(got.len() < 8, "unexpected answer: {got:?}");
    }
    // The TLS-only client reads the server's close (close_notify, EOF or reset).
    let (conn, tcp) = &mut tls_only;
    tcp.set_read_timeout(Some(BOUND)).unwrap();
    loop {
        match conn.read_tls(tcp) {
            Ok(0) => break,
            Ok(_) => {
                if conn.process_new_packets().is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server did not close a connection without HTTP/2: {e}"),
        }
    }
    drop(silent);
    drop(tls_only);
    // Every accepted socket of the seven was closed by the server: back to the baseline.
    settle(before);
    assert_eq!(srv.counters.handshake_timeouts.load(SeqCst), 7);

    // It keeps serving, and a handshake that completes in time is not counted.
    echo_once(srv.addr, &client_cert, "server", b"still serving");
    assert_eq!(srv.counters.handshake_timeouts.load(SeqCst), 7);
}

/// A TCP peer at one address: the first `silent` connections are accepted and never get a
/// byte (held until the client closes them); later ones are relayed to `healthy`.
struct Peer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Silent connections the client has closed (EOF seen).
    closed_by_client: Arc<AtomicUsize>,
}

fn relay(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

fn peer(silent: usize, healthy: SocketAddr) -> Peer {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed_by_client = Arc::new(AtomicUsize::new(0));
    let (a2, c2) = (accepted.clone(), closed_by_client.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let n = a2.fetch_add(1, SeqCst);
            if n < silent {
                let c3 = c2.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    // The client's ClientHello arrives; nothing is ever answered.
                    while let Ok(k) = s.read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                    }
                    c3.fetch_add(1, SeqCst);
                });
            } else if let Ok(up) = TcpStream::connect(healthy) {
                relay(s, up);
            }
        }
    });
    Peer {
        addr,
        accepted,
        closed_by_client,
    }
}

#[test]
fn client_connect_to_a_peer_that_never_speaks_tls_fails_with_handshake_timeout() {
    let ca = ca();
    let srv = echo_server(&cert(&ca, "server"));
    let p = peer(1, srv.addr);
    let tls = hbone::tls::client_config(&cert(&ca, "client"), &[id("server")]).unwrap();
    let addr = p.addr;
    let (err, took) = block_on(DriverKind::Uring, async move {
        let started = Instant::now();
        let r = monoio::time::timeout(
            BOUND,
            hbone::client::Client::connect(addr, tls, &short_deadline(), &TlsCounters::default()),
        )
        .await
        .expect("connect gave up by itself, within the generous bound");
        (
            r.err().expect("no handshake can succeed"),
            started.elapsed(),
        )
    });
    assert!(
        matches!(err, HboneError::HandshakeTimeout { peer, after } if peer == addr && after == SHORT),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("not completed within") && text.contains("handshake_timeout"),
        "{text}"
    );
    assert!(took < BOUND, "{took:?}");
    // The client closed its socket: the peer sees EOF.
    eventually("the client closed the stalled socket", || {
        p.closed_by_client.load(SeqCst) == 1
    });
}

#[test]
fn every_waiter_on_a_stalled_pool_slot_gets_the_error_and_the_next_open_succeeds() {
    const WAITERS: usize = 20;
    let ca = ca();
    let srv = echo_server(&cert(&ca, "server"));
    let p = peer(1, srv.addr);
    let client_cert = cert(&ca, "client");
    let k = key("client", "server", p.addr);
    let (errors, first_round_connects, timeouts, after) = block_on(DriverKind::Uring, async move {
        let counters = Arc::new(TlsCounters::default());
        let pool = Pool::new(short_deadline(), counters.clone());
        // 20 concurrent openers: one connection (≤ 100 streams each), one slot shared.
        let mut opens = Vec::new();
        for _ in 0..WAITERS {
            let (pool, k, c) = (pool.clone(), k.clone(), client_cert.clone());
            opens.push(monoio::spawn(async move {
                pool.open(&k, &c, &req()).await.map(|_| ())
            }));
        }
        let mut errors = Vec::new();
        for o in opens {
            let r = monoio::time::timeout(BOUND, o)
                .await
                .expect("every waiter got an answer within the generous bound");
            errors.push(r.expect_err("no stream on a peer that never speaks TLS"));
        }
        let first_round_connects = pool.connects();
        let timeouts = counters.handshake_timeouts.load(Relaxed);
        // The peer relays new connections to the healthy server now: the failed slot is
        // not reused, a new connection is made and the stream works.
        let s = monoio::time::timeout(BOUND, pool.open(&k, &client_cert, &req()))
            .await
            .expect("bounded")
            .expect("the next attempt succeeds against a healthy peer");
        let (mut w, mut r) = s.split();
        w.write_all(Bytes::from_static(b"healthy"), true)
            .await
            .unwrap();
        let got = r.read().await.unwrap().unwrap();
        assert_eq!(got.as_ref(), b"healthy");
        let after = (pool.connects(), pool.connections(&k));
        (errors, first_round_connects, timeouts, after)
    });
    assert_eq!(errors.len(), WAITERS);
    for e in &errors {
        let text = e.to_string();
        assert!(
            text.contains(&p.addr.to_string()) && text.contains("not completed within"),
            "{text}"
        );
    }
    assert_eq!(first_round_connects, 1, "the waiters shared one slot");
    assert_eq!(timeouts, 1);
    assert_eq!(
        after,
        (2, 1),
        "one new live connection after the failed one"
    );
    assert_eq!(p.accepted.load(Relaxed), 2);
    eventually("the stalled socket was closed by the client", || {
        p.closed_by_client.load(SeqCst) == 1
    });
}
