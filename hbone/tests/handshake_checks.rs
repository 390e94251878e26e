//! How many ECDSA verifications a handshake costs, over real sockets and real TLS: a full
//! handshake checks one CertificateVerify signature per side and the peer's certificate
//! chain only the first time a thread sees it (the verified-chain memo); a resumed one
//! checks neither. One test in this binary: the counts are process-wide.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hbone::ca::WorkloadCert;
use hbone::client::Client;
use hbone::tls::{client_config_to, server_config_with, verification_counts, TlsCounters};
use hbone::wire::ConnectRequest;
use hbone::H2Settings;
use runtime::driver::DriverKind;

/// Connect, echo one stream, close; (full, resumed) client handshakes after it.
async fn echo_once(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, c: &TlsCounters) {
    let client = Client::connect(addr, tls, &H2Settings::default(), c)
        .await
        .unwrap();
    let s = client
        .open(&ConnectRequest::new("10.1.2.3:80".parse().unwrap()))
        .await
        .unwrap();
    let (mut w, mut r) = s.split();
    w.write_all(Bytes::from_static(b"ping"), true)
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(chunk) = r.read().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, b"ping");
}

/// Wait (bounded) until `srv` has completed `full` full and `resumed` resumed handshakes
/// (it counts after its side, which may trail the client's).
fn wait_server(srv: &Server, full: u64, resumed: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let t = &srv.counters.tls;
    while (
        t.full_handshakes.load(Relaxed),
        t.resumed_handshakes.load(Relaxed),
    ) != (full, resumed)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "server handshakes: want ({full}, {resumed})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Four connections to a new server (a server thread with an empty memo) with `resumption`
/// on both sides; waits until the server counted `server_handshakes` (full, resumed) and
/// returns the verifications they cost: (chain verifications, CertificateVerify checks).
fn four_connections(
    client: &WorkloadCert,
    server: &WorkloadCert,
    resumption: bool,
    server_handshakes: (u64, u64),
) -> (u64, u64) {
    let srv = server_with_tls(
        server_config_with(server, resumption).unwrap(),
        H2Settings::default(),
        Handler::Echo,
        DriverKind::Uring,
    );
    let counters = TlsCounters::default();
    let before = verification_counts();
    block_on(DriverKind::Uring, async {
        for _ in 0..4 {
            let tls = client_config_to(client, &[id("server")], srv.addr, resumption).unwrap();
            echo_once(srv.addr, tls, &counters).await;
        }
    });
    wait_server(&srv, server_handshakes.0, server_handshakes.1);
    let now = verification_counts();
    (now.0 - before.0, now.1 - before.1)
}

#[test]
fn full_handshakes_verify_one_signature_per_side_and_each_chain_once_resumed_none() {
    let ca = ca();
    let (client, server) = (cert(&ca, "client"), cert(&ca, "server"));
    assert_eq!(
        four_connections(&client, &server, false, (4, 0)),
        (2, 8),
        "4 full handshakes: each side's chain verified once, one CertificateVerify per side each"
    );
    // Resumption on, a server on a new thread (an empty memo there): the first handshake is
    // full (the server verifies the client's chain again; the client's thread remembers the
    // server's), the next three resume without any certificate check.
    assert_eq!(
        four_connections(&client, &server, true, (1, 3)),
        (1, 2),
        "1 full handshake (the client chain new to the server thread) and 3 resumed ones"
    );
}
