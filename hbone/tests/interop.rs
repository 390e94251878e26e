//! Interop with a peer built from the stock stack (tokio + tokio-rustls + h2), both ways,
//! and bad input against our server: wrong methods, bad authorities, oversized headers,
//! malformed frames. The server keeps serving and leaks no descriptor.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hbone::pool::Pool;
use hbone::tls::TlsCounters;
use hbone::wire::ConnectRequest;
use hbone::H2Settings;
use runtime::driver::DriverKind;

#[test]
fn stock_client_through_our_server() {
    let ca = ca();
    let srv = echo_server(&cert(&ca, "server"));
    let tls = hbone::tls::client_config(&cert(&ca, "client"), &[id("server")]).unwrap();
    tokio_rt().block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let (status, mut send, mut recv) =
                    their_request(srv.addr, tls, http::Method::CONNECT, "10.9.9.9:80", None)
                        .await
                        .unwrap();
                assert_eq!(status, 200);
                send.send_data(Bytes::from_static(b"interop"), true)
                    .unwrap();
                let mut got = Vec::new();
                while let Some(d) = recv.data().await {
                    let d = d.unwrap();
                    let _ = recv.flow_control().release_capacity(d.len());
                    got.extend_from_slice(&d);
                }
                assert_eq!(got, b"interop");
            })
            .await
    });
    let seen = srv.seen.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(seen.peer, Some(id("client")));
}

#[test]
fn our_client_through_stock_server() {
    let ca = ca();
    let server_tls = hbone::tls::server_config(&cert(&ca, "server")).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    // Their server: tokio + tokio-rustls + h2; answers CONNECT with 200 and echoes.
    let t = std::thread::spawn(move || {
        tokio_rt().block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let (tcp, _) = l.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(server_tls)
                .accept(tcp)
                .await
                .unwrap();
            let mut conn = h2::server::handshake(tls).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            assert_eq!(req.method(), http::Method::CONNECT);
            assert_eq!(req.uri().authority().unwrap().as_str(), "10.7.7.7:7070");
            assert!(req.headers().contains_key("traceparent"));
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let mut body = req.into_body();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            while let Some(d) = body.data().await {
                let d = d.unwrap();
                let _ = body.flow_control().release_capacity(d.len());
                send.send_data(d, false).unwrap();
            }
            send.send_data(Bytes::new(), true).unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        })
    });
    let client_cert = cert(&ca, "client");
    block_on(DriverKind::Uring, async move {
        let pool = Pool::new(H2Settings::default(), Arc::new(TlsCounters::default()));
        let k = key("client", "server", addr);
        let s = pool
            .open(
                &k,
                &client_cert,
                &ConnectRequest::new("10.7.7.7:7070".parse().unwrap()),
            )
            .await
            .unwrap();
        let (mut w, mut r) = s.split();
        w.write_all(Bytes::from_static(b"both ways"), true)
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(c) = r.read().await {
            got.extend_from_slice(&c.unwrap());
        }
        assert_eq!(got, b"both ways");
    });
    t.join().unwrap();
}

/// Session resumption with stock rustls peers: their client (rustls's own in-memory session
/// cache) resumes with our server, which still sees its identity; our client resumes with
/// a server on rustls's defaults (stateful session IDs, two tickets per handshake).
#[test]
fn sessions_resume_with_stock_rustls_peers_both_ways() {
    use std::sync::atomic::Ordering::Relaxed;
    let ca = ca();
    let (client_cert, server_cert) = (cert(&ca, "client"), cert(&ca, "server"));
    let ours = echo_server(&server_cert);
    let mut theirs = (*hbone::tls::client_config(&client_cert, &[id("server")]).unwrap()).clone();
    theirs.resumption = rustls::client::Resumption::default();
    let theirs = Arc::new(theirs);
    tokio_rt().block_on(async {
        for _ in 0..2 {
            let (status, mut send, mut recv) = their_request(
                ours.addr,
                theirs.clone(),
                http::Method::CONNECT,
                "10.9.9.9:80",
                None,
            )
            .await
            .unwrap();
            assert_eq!(status, 200);
            send.send_data(Bytes::from_static(b"again"), true).unwrap();
            let mut got = Vec::new();
            while let Some(d) = recv.data().await {
                got.extend_from_slice(&d.unwrap());
            }
            assert_eq!(got, b"again");
        }
    });
    for _ in 0..2 {
        let seen = ours.seen.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(seen.peer, Some(id("client")));
    }
    let t = &ours.counters.tls;
    assert_eq!(
        (
            t.full_handshakes.load(Relaxed),
            t.resumed_handshakes.load(Relaxed)
        ),
        (1, 1)
    );

    let stock = server_tls_with_groups(&server_cert, hbone::tls::provider().kx_groups.clone());
    let srv = server_with_tls(
        stock,
        H2Settings::default(),
        Handler::Echo,
        DriverKind::Uring,
    );
    let counters = TlsCounters::default();
    block_on(DriverKind::Uring, async {
        for _ in 0..2 {
            let tls = hbone::tls::client_config_to(&client_cert, &[id("server")], srv.addr, true)
                .unwrap();
            let c =
                hbone::client::Client::connect(srv.addr, tls, &H2Settings::default(), &counters)
                    .await
                    .unwrap();
            let (mut w, mut r) = c
                .open(&ConnectRequest::new("10.9.9.9:80".parse().unwrap()))
                .await
                .unwrap()
                .split();
            w.write_all(Bytes::from_static(b"resumed"), true)
                .await
                .unwrap();
            let mut got = Vec::new();
            while let Some(c) = r.read().await {
                got.extend_from_slice(&c.unwrap());
            }
            assert_eq!(got, b"resumed");
        }
    });
    assert_eq!(
        (
            counters.full_handshakes.load(Relaxed),
            counters.resumed_handshakes.load(Relaxed)
        ),
        (1, 1)
    );
}
