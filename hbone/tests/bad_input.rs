//! Bad input against our HBONE server: wrong methods, bad authorities, oversized headers,
//! malformed frames. The server answers each correctly, keeps serving and leaks no
//! descriptor. Alone in its test binary so the descriptor count is not disturbed.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn bad_input_gets_the_right_answer_and_the_server_keeps_serving() {
    let ca = ca();
    let srv = echo_server(&cert(&ca, "server"));
    let tls = hbone::tls::client_config(&cert(&ca, "client"), &[id("server")]).unwrap();
    // Round one warms up process-wide resources (tokio's and TLS's lazy globals); round two
    // must leave the descriptor count where round one left it.
    let round = || {
        tokio_rt().block_on(async {
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async {
                    // Not CONNECT: 405.
                    let (s, ..) = their_request(
                        srv.addr,
                        tls.clone(),
                        http::Method::GET,
                        "http://10.0.0.1:80/",
                        None,
                    )
                    .await
                    .unwrap();
                    assert_eq!(s, http::StatusCode::METHOD_NOT_ALLOWED);
                    // Bad authorities: 400.
                    for a in ["echo.default:80", "10.0.0.1:0", "0.0.0.0:80"] {
                        let (s, ..) =
                            their_request(srv.addr, tls.clone(), http::Method::CONNECT, a, None)
                                .await
                                .unwrap();
                        assert_eq!(s, http::StatusCode::BAD_REQUEST, "{a}");
                    }
                    // Oversized headers (> 64 KiB): refused (431 or a stream/connection error).
                    let big = ("x-big".to_string(), "a".repeat(70 * 1024));
                    match their_request(
                        srv.addr,
                        tls.clone(),
                        http::Method::CONNECT,
                        "10.0.0.1:80",
                        Some(big),
                    )
                    .await
                    {
                        Ok((s, ..)) => {
                            assert_eq!(s, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
                        }
                        Err(e) => assert!(e.is_reset() || e.is_go_away() || e.is_io(), "{e}"),
                    }
                    // Malformed frames: a DATA frame on stream 0 is a connection error → GOAWAY.
                    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
                    let mut t = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect("10.0.0.1".try_into().unwrap(), tcp)
                        .await
                        .unwrap();
                    t.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                        .await
                        .unwrap();
                    t.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
                    t.write_all(&[0, 0, 4, 0, 0, 0, 0, 0, 0, b'b', b'a', b'd', b'!'])
                        .await
                        .unwrap(); // DATA on stream 0
                    let mut got = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(30), t.read_to_end(&mut got))
                        .await;
                    let has_goaway = (0..got.len().saturating_sub(9))
                        .any(|i| got[i + 3] == 7 && got[i..i + 3] == [0, 0, 8]);
                    assert!(
                        has_goaway,
                        "expected a GOAWAY frame in {:?}",
                        &got[..got.len().min(64)]
                    );
                    // Garbage instead of a preface: the connection is closed.
                    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
                    let mut t = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect("10.0.0.1".try_into().unwrap(), tcp)
                        .await
                        .unwrap();
                    t.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await
                        .unwrap();
                    let mut sink = Vec::new();
                    let r = tokio::time::timeout(Duration::from_secs(30), t.read_to_end(&mut sink))
                        .await;
                    assert!(r.is_ok(), "server closes a connection that is not HTTP/2");
                    // Still serving.
                    let (s, mut send, mut recv) = their_request(
                        srv.addr,
                        tls.clone(),
                        http::Method::CONNECT,
                        "10.0.0.1:80",
                        None,
                    )
                    .await
                    .unwrap();
                    assert_eq!(s, 200);
                    send.send_data(Bytes::from_static(b"ok"), true).unwrap();
                    let d = recv.data().await.unwrap().unwrap();
                    assert_eq!(d.as_ref(), b"ok");
                })
                .await
        });
    };
    round();
    settle(usize::MAX);
    let before = fd_count();
    round();
    assert_eq!(srv.counters.bad_method.load(Relaxed), 2);
    assert_eq!(srv.counters.bad_authority.load(Relaxed), 6);
    settle(before);
}
