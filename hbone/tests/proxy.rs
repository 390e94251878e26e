//! The two-ended tunnel service: TCP → outbound → HBONE (mTLS, h2) → inbound → TCP.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{Pattern, Sum};
use hbone::proxy::{start, CaConfig, InboundConfig, OutboundConfig, ProxyConfig};
use runtime::Shutdown;

fn base(ca_dir: &std::path::Path) -> ProxyConfig {
    ProxyConfig {
        runtime: runtime::RuntimeConfig {
            workers: Some(1),
            pin: false,
            ..Default::default()
        },
        trust_domain: "cluster.local".into(),
        ca: CaConfig::Builtin(ca_dir.to_owned()),
        h2: Default::default(),
        outbound: vec![],
        inbound: None,
    }
}

/// A backend that hashes what it receives and then sends `reply` pattern bytes back.
fn backend(reply: usize) -> (SocketAddr, std::thread::JoinHandle<Sum>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut sum = Sum::default();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            sum.update(&buf[..n]);
        }
        let mut p = Pattern::new(99);
        let mut left = reply;
        while left > 0 {
            let n = left.min(buf.len());
            p.fill(&mut buf[..n]);
            c.write_all(&buf[..n]).unwrap();
            left -= n;
        }
        sum
    });
    (a, t)
}

#[test]
fn tcp_through_two_proxies_both_directions_checksummed() {
    let dir = std::env::temp_dir().join(format!("hbone-proxy-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    const UP: usize = 64 << 20;
    const DOWN: usize = 32 << 20;
    let (baddr, bt) = backend(DOWN);
    let mut inb = base(&dir);
    inb.inbound = Some(InboundConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: "spiffe://cluster.local/ns/default/sa/server".into(),
        targets: vec![baddr],
    });
    let inbound = start(inb, Shutdown::new()).unwrap();
    let in_addr = inbound.inbound_addr.unwrap();
    let mut out = base(&dir);
    let ob = |target: SocketAddr| OutboundConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: "spiffe://cluster.local/ns/default/sa/client".into(),
        hbone: in_addr,
        peer_identity: "spiffe://cluster.local/ns/default/sa/server".into(),
        target,
        pool: true,
    };
    // The second outbound asks for a target the inbound does not serve.
    out.outbound = vec![ob(baddr), ob("127.0.0.1:9".parse().unwrap())];
    let outbound = start(out, Shutdown::new()).unwrap();

    let mut c = TcpStream::connect(outbound.outbound_addrs[0]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut sent = Sum::default();
    let mut p = Pattern::new(5);
    let mut buf = vec![0u8; 1 << 16];
    let mut left = UP;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        sent.update(&buf[..n]);
        c.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Sum::default();
    loop {
        let n = c.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
    }
    let at_backend = bt.join().unwrap();
    assert_eq!(
        at_backend, sent,
        "bytes into the tunnel = bytes out at the backend"
    );
    let mut expect = Sum::default();
    let mut p = Pattern::new(99);
    let mut left = DOWN;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        expect.update(&buf[..n]);
        left -= n;
    }
    assert_eq!(got, expect, "reply bytes match");

    // Unserved authority: the inbound refuses (400) and counts; the client is reset.
    let mut c2 = TcpStream::connect(outbound.outbound_addrs[1]).unwrap();
    c2.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let r = c2.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "no data for a refused target");
    assert_eq!(inbound.counters.refused_targets.load(Relaxed), 1);
    assert!(inbound.counters.server.connections.load(Relaxed) >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_file_forms_and_errors() {
    let dir = std::env::temp_dir().join(format!("hbone-proxy-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("p.yaml");
    let ok = "ca: {builtin: /tmp/x}\ninbound:\n  listen: 127.0.0.1:15008\n  identity: spiffe://cluster.local/ns/a/sa/b\n  targets: [127.0.0.1:80]\n";
    std::fs::write(&f, ok).unwrap();
    let c = ProxyConfig::load(&f).unwrap();
    assert_eq!(c.ca, CaConfig::Builtin("/tmp/x".into()));
    std::fs::write(&f, "ca:\n  plugin: /etc/cacerts\noutbound: []\ninbound:\n  listen: 127.0.0.1:1\n  identity: nope\n  targets: [127.0.0.1:80]\n").unwrap();
    let e = ProxyConfig::load(&f).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("inbound.identity"), "{e}");
    assert_eq!(e.line, Some(6), "{e}");
    std::fs::write(&f, "ca: {builtin: /tmp/x}\nh2: {stream_windw: 1}\ninbound: {listen: 127.0.0.1:1, identity: spiffe://td/ns/a/sa/b, targets: [127.0.0.1:80]}\n").unwrap();
    let e = ProxyConfig::load(&f).unwrap_err();
    assert!(
        e.to_string().contains("stream_windw") && e.line == Some(2),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
