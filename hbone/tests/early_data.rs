//! A client's first bytes go on the CONNECT stream ahead of the reply
//! (`hbone::client::Early`), against a stock-stack server (tokio + tokio-rustls + h2) that
//! answers a CONNECT only once it has its first DATA: without early bytes every open here
//! would wait for a reply that never comes. Checked: the bytes arrive once, in order, with
//! the rest of the connection's after them (checksums); on a fresh connection and on a
//! pooled one; a refusal after early bytes is the server's status.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hbone::ca::WorkloadCert;
use hbone::client::Early;
use hbone::pool::{Pool, PoolKey};
use hbone::tls::TlsCounters;
use hbone::wire::ConnectRequest;
use hbone::{H2Settings, HboneError};
use runtime::driver::DriverKind;

/// The target whose CONNECTs the server refuses with 401 (after their first DATA).
const REFUSED: &str = "10.0.0.9:401";

/// Their server: for each CONNECT, waits (30 s at most) for the first DATA, then answers
/// 200 and echoes everything, that chunk first (401 and nothing more for [`REFUSED`]).
/// Sends on `got_early` whether a stream's first DATA came before its reply.
fn answer_after_data_server(
    ca: &hbone::ca::SigningCa,
) -> (SocketAddr, std::sync::mpsc::Receiver<bool>) {
    let server_tls = hbone::tls::server_config(&cert(ca, "server")).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, got_early) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        tokio_rt().block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let (tls, tx) = (server_tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(tls) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
                        return;
                    };
                    let Ok(mut conn) = h2::server::handshake(tls).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let refuse = req.uri().authority().map(|a| a.as_str()) == Some(REFUSED);
                            let mut body = req.into_body();
                            let first =
                                tokio::time::timeout(Duration::from_secs(30), body.data()).await;
                            let first = match first {
                                Ok(Some(Ok(d))) => d,
                                _ => {
                                    let _ = tx.send(false);
                                    let r = http::Response::builder().status(504).body(());
                                    let _ = respond.send_response(r.unwrap(), true);
                                    return;
                                }
                            };
                            let _ = tx.send(true);
                            let _ = body.flow_control().release_capacity(first.len());
                            if refuse {
                                let r = http::Response::builder().status(401).body(());
                                let _ = respond.send_response(r.unwrap(), true);
                                return;
                            }
                            let mut send = respond
                                .send_response(http::Response::new(()), false)
                                .unwrap();
                            if send.send_data(first, false).is_err() {
                                return;
                            }
                            while let Some(Ok(d)) = body.data().await {
                                let _ = body.flow_control().release_capacity(d.len());
                                send.reserve_capacity(d.len());
                                if send.send_data(d, false).is_err() {
                                    return;
                                }
                            }
                            let _ = send.send_data(Bytes::new(), true);
                        });
                    }
                });
            }
        })
    });
    (addr, got_early)
}

/// A connected pair: the std end (the application) and the monoio end (what a proxy
/// accepted from it).
async fn tcp_pair() -> (std::net::TcpStream, monoio::net::TcpStream) {
    let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (accepted, _) = l.accept().await.unwrap();
    (app, accepted)
}

/// The application writes `total` pattern bytes (and half-closes) while reading the echo
/// to its end: (sent, received).
fn application(mut app: std::net::TcpStream, total: usize, seed: u64) -> (Sum, Sum) {
    use std::io::{Read, Write};
    let mut w = app.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let (mut p, mut sum, mut left) = (Pattern::new(seed), Sum::default(), total);
        while left > 0 {
            let mut buf = vec![0u8; left.min(64 * 1024)];
            p.fill(&mut buf);
            w.write_all(&buf).unwrap();
            sum.update(&buf);
            left -= buf.len();
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
        sum
    });
    app.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (mut got, mut buf) = (Sum::default(), vec![0u8; 64 * 1024]);
    loop {
        let n = app.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
    }
    (writer.join().unwrap(), got)
}

/// The server of [`answer_after_data_server`], with the client's certificate, pool key
/// and a pool, for `f` on an io_uring runtime; then what the server said of each stream.
fn with_answer_after_data_server<F: std::future::Future<Output = ()>>(
    f: impl FnOnce(WorkloadCert, PoolKey, Pool) -> F,
) -> std::sync::mpsc::Receiver<bool> {
    let ca = ca();
    let (addr, got_early) = answer_after_data_server(&ca);
    let client_cert = cert(&ca, "client");
    let k = key("client", "server", addr);
    block_on(DriverKind::Uring, async move {
        let pool = Pool::new(H2Settings::default(), Arc::new(TlsCounters::default()));
        f(client_cert, k, pool).await
    });
    got_early
}

#[test]
fn first_bytes_go_ahead_of_the_reply_on_fresh_and_pooled_connections() {
    let got_early = with_answer_after_data_server(|client_cert, k, pool| async move {
        // The first stream rides the connection's setup; the second a pooled connection.
        for (i, total) in [(0u64, 3 << 20), (1, 100)] {
            let (app, tcp) = tcp_pair().await;
            let app = std::thread::spawn(move || application(app, total, 7 + i));
            let mut early = Early::new(&tcp);
            let req = ConnectRequest::new("10.7.7.7:7070".parse().unwrap());
            let s = pool
                .open_early(&k, &client_cert, &req, Some(&mut early))
                .await
                .unwrap_or_else(|e| panic!("stream {i}: {e}"));
            let sent = early.sent();
            assert!(sent > 0, "stream {i}: nothing went ahead of the reply");
            assert!(sent as usize <= hbone::client::EARLY_MAX);
            let out = bridge(tcp, s).await;
            let (wrote, read) = app.join().unwrap();
            assert_eq!(wrote.len, total as u64);
            assert_eq!(
                read, wrote,
                "stream {i}: the echo differs from what was sent"
            );
            assert_eq!(
                sent + out.downstream_to_upstream,
                total as u64,
                "stream {i}"
            );
            assert_eq!(out.upstream_to_downstream, total as u64, "stream {i}");
        }
        assert_eq!(
            pool.connects(),
            1,
            "the second stream used the pooled connection"
        );
    });
    for i in 0..2 {
        assert_eq!(
            got_early.recv_timeout(Duration::from_secs(60)),
            Ok(true),
            "stream {i}: the server had no DATA before its reply"
        );
    }
}

#[test]
fn a_refusal_after_early_bytes_is_the_servers_status() {
    let got_early = with_answer_after_data_server(|client_cert, k, pool| async move {
        let (mut app, tcp) = tcp_pair().await;
        std::io::Write::write_all(&mut app, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut early = Early::new(&tcp);
        let req = ConnectRequest::new(REFUSED.parse().unwrap());
        match pool
            .open_early(&k, &client_cert, &req, Some(&mut early))
            .await
        {
            Err(HboneError::Status(s)) => assert_eq!(s, http::StatusCode::UNAUTHORIZED),
            Err(e) => panic!("expected 401, got {e}"),
            Ok(_) => panic!("expected 401, got a stream"),
        }
        assert_eq!(early.sent(), 18);
    });
    assert_eq!(got_early.recv_timeout(Duration::from_secs(60)), Ok(true));
}

/// With nothing to send before the reply (a server that answers at once, an application
/// that waits for it, as a SOCKS5 client does), nothing goes early and the bridge carries
/// everything after.
#[test]
fn with_no_bytes_before_the_reply_the_bridge_carries_everything() {
    let ca = ca();
    let srv = echo_server(&cert(&ca, "server"));
    let client_cert = cert(&ca, "client");
    let k = key("client", "server", srv.addr);
    block_on(DriverKind::Uring, async move {
        let pool = Pool::new(H2Settings::default(), Arc::new(TlsCounters::default()));
        let (app, tcp) = tcp_pair().await;
        let mut early = Early::new(&tcp);
        let req = ConnectRequest::new("10.7.7.7:7070".parse().unwrap());
        let s = pool
            .open_early(&k, &client_cert, &req, Some(&mut early))
            .await
            .unwrap();
        assert_eq!(early.sent(), 0);
        let app = std::thread::spawn(move || application(app, 1 << 20, 3));
        let out = bridge(tcp, s).await;
        let (wrote, read) = app.join().unwrap();
        assert_eq!(read, wrote);
        assert_eq!(out.downstream_to_upstream, 1 << 20);
    });
}
