//! HTTP/2 PING keepalive: a connection whose peer stops answering is closed after the ping
//! timeout and leaves the pool; the next stream gets a fresh connection.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use hbone::pool::Pool;
use hbone::tls::TlsCounters;
use hbone::wire::ConnectRequest;
use hbone::H2Settings;
use runtime::driver::DriverKind;

/// A TCP relay to `to`. Setting `freeze` stops every relay accepted before it from moving
/// bytes (a silent, stuck peer); relays accepted after it work normally.
fn relay(to: SocketAddr, freeze: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(s) = TcpStream::connect(to) else {
                return;
            };
            let frozen_at_accept = freeze.load(Ordering::SeqCst);
            for (mut a, mut b) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)] {
                let f = freeze.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match a.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while f.load(Ordering::SeqCst) && !frozen_at_accept {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        if b.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    addr
}

#[test]
fn unanswered_ping_closes_the_connection() {
    let ca = ca();
    let srv = echo_server(&cert(&ca, "server"));
    let freeze = Arc::new(AtomicBool::new(false));
    let addr = relay(srv.addr, freeze.clone());
    let settings = H2Settings {
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let client_cert = cert(&ca, "client");
    let k = key("client", "server", addr);
    block_on(DriverKind::Uring, async move {
        let pool = Pool::new(settings, Arc::new(TlsCounters::default()));
        let open = || async {
            let (mut w, mut r) = pool
                .open(
                    &k,
                    &client_cert,
                    &ConnectRequest::new("10.0.0.1:80".parse().unwrap()),
                )
                .await
                .unwrap()
                .split();
            w.write_all(Bytes::from_static(b"x"), true).await.unwrap();
            assert_eq!(r.read().await.unwrap().unwrap().as_ref(), b"x");
        };
        open().await;
        // Pings are answered: the idle connection stays across several intervals.
        monoio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            pool.connections(&k),
            1,
            "answered pings keep the connection"
        );
        freeze.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while pool.connections(&k) > 0 {
            assert!(
                Instant::now() < deadline,
                "the stuck connection was never closed"
            );
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        // The next stream gets a fresh connection (relayed normally: accepted after freeze).
        open().await;
        assert_eq!(pool.connects(), 2);
    });
}
