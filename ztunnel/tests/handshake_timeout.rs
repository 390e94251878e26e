//! `h2.handshake_timeout` in ztunnel (review #6), on loopback with real sockets: the HBONE
//! listener closes and counts sockets that never complete TLS and the HTTP/2 preface, and
//! an outbound tunnel to a peer that accepts TCP but never speaks TLS fails the client's
//! SOCKS5 request instead of hanging it, without leaving the pooled connection stuck.
//! Generous bounds on every wait; no timing assertions.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hbone::ca::SigningCa;

const BOUND: Duration = Duration::from_secs(30);

/// Start one node of `net`'s topology with a 300 ms handshake deadline.
fn node_with_short_deadline(net: Net, node: &str) -> (ztunnel::Handle, std::path::PathBuf) {
    runtime::init_logging();
    let dir = tmpdir(&format!("hs{}", net.n));
    let ca_dir = dir.join("ca");
    SigningCa::builtin(&ca_dir, "cluster.local").unwrap();
    let file = dir.join(format!("{node}.yaml"));
    let text = format!(
        "{}h2: {{handshake_timeout: 300ms}}\n",
        net.node_config(node, &ca_dir, "[]")
    );
    std::fs::write(&file, text).unwrap();
    (start_node(&file), dir)
}

fn inbound_metric(h: &ztunnel::Handle, kind: &str) -> u64 {
    let text = http_get(h.addrs.stats, "/stats/prometheus").1;
    metric(&text, "ztunnel_hbone_inbound_total", &[("kind", kind)])
}

#[test]
fn r13_hbone_listener_closes_and_counts_silent_handshakes() {
    let net = Net { n: 144 };
    let (b, dir) = node_with_short_deadline(net, "node-b");
    let _server = Pod::start(net.server(), "server");
    let zt_b = SocketAddr::new(net.zt_b(), 15008);
    let mut silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect_timeout(&zt_b, Duration::from_secs(2)).unwrap())
        .collect();
    for s in &mut silent {
        s.set_read_timeout(Some(BOUND)).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a silent client was not closed by the listener: {other:?}"),
        }
    }
    eventually("three handshake timeouts counted", || {
        inbound_metric(&b, "handshake_timeouts") == 3
    });
    // The listener keeps serving a peer that completes its handshake.
    let ca = SigningCa::builtin(&dir.join("ca"), "cluster.local").unwrap();
    let (status, line) = hbone_call(&ca, CLIENT_ID, zt_b, net.server());
    assert_eq!((status, line.as_str()), (200, "server"));
    assert_eq!(inbound_metric(&b, "handshake_timeouts"), 3);
    let _ = b.stop(Duration::from_millis(200));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn r5_outbound_tunnel_to_a_peer_that_never_speaks_tls_fails_the_socks_request() {
    let net = Net { n: 145 };
    // Node B's HBONE address accepts TCP and never answers.
    let l = TcpListener::bind(SocketAddr::new(net.zt_b(), 15008)).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (a2, c2) = (accepted.clone(), closed.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            a2.fetch_add(1, SeqCst);
            let c3 = c2.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
                c3.fetch_add(1, SeqCst);
            });
        }
    });
    let (a, dir) = node_with_short_deadline(net, "node-a");
    for round in 1..=2 {
        let (code, _s) = socks_connect(net.client(), a.addrs.socks5, Dest::Addr(net.server()));
        // SOCKS5 general failure: the tunnel could not be set up.
        assert_eq!(code, 1, "round {round}");
        // Each request made its own connection (a failed one is not reused) and closed it.
        assert_eq!(accepted.load(SeqCst), round);
        eventually("ztunnel closed the stalled connection", || {
            closed.load(SeqCst) == round
        });
        let text = http_get(a.addrs.stats, "/stats/prometheus").1;
        assert_eq!(
            metric(
                &text,
                "ztunnel_hbone_outbound_handshake_timeouts_total",
                &[]
            ),
            round as u64,
            "round {round}"
        );
    }
    let _ = a.stop(Duration::from_millis(200));
    let _ = std::fs::remove_dir_all(&dir);
}
