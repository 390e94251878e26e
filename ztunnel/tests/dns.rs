//! The DNS proxy (`ztunnel.dns`), on loopback with a real upstream, over UDP and TCP: a
//! query for a hostname of the mesh model (a Service, a ServiceEntry — its VIP allocated
//! when it has none) is answered with its VIPs; any other is forwarded (over the query's
//! transport) and its answer relayed; an upstream that stays silent gets the client
//! `SERVFAIL`; garbage is dropped and counted (and ends a TCP connection).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A query for `name` of `qtype` with ID `id`, recursion desired.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// The answer's rcode and the addresses of its A/AAAA records (read past the question;
/// records named by a pointer, as the proxy writes them and as the fake upstream does).
fn parse_answer(a: &[u8], id: u16) -> (u8, Vec<IpAddr>) {
    assert_eq!(u16::from_be_bytes([a[0], a[1]]), id, "the query's ID");
    assert!(a[2] & 0x80 != 0, "a response");
    let rcode = a[3] & 0x0f;
    let ancount = u16::from_be_bytes([a[6], a[7]]);
    // Skip the question.
    let mut i = 12;
    while a[i] != 0 {
        i += 1 + a[i] as usize;
    }
    i += 5;
    let mut ips = Vec::new();
    for _ in 0..ancount {
        assert_eq!(a[i] & 0xc0, 0xc0, "a name pointer");
        let t = u16::from_be_bytes([a[i + 2], a[i + 3]]);
        let len = u16::from_be_bytes([a[i + 10], a[i + 11]]) as usize;
        let data = &a[i + 12..i + 12 + len];
        ips.push(match t {
            1 => IpAddr::from(<[u8; 4]>::try_from(data).unwrap()),
            28 => IpAddr::from(<[u8; 16]>::try_from(data).unwrap()),
            other => panic!("record type {other}"),
        });
        i += 12 + len;
    }
    (rcode, ips)
}

/// The fake upstream's answer to `q`: `example.net` A is 192.0.2.7; anything else none.
fn upstream_answer(q: &[u8]) -> Option<Vec<u8>> {
    if !q.windows(12).any(|w| w == b"\x07example\x03net") {
        return None;
    }
    let mut a = q.to_vec();
    a[2] |= 0x80;
    a[3] = 0x80;
    a[7] = 1;
    a.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 192, 0, 2, 7]);
    Some(a)
}

/// A resolver, UDP and TCP on one port, that answers `example.net` A with 192.0.2.7 and
/// stays silent on anything else; counts the queries it got over TCP.
fn fake_upstream(ip: IpAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if let Some(a) = upstream_answer(&buf[..n]) {
                let _ = s.send_to(&a, from);
            }
        }
    });
    let tcp = TcpListener::bind(addr).unwrap();
    let over_tcp = Arc::new(AtomicUsize::new(0));
    let count = over_tcp.clone();
    std::thread::spawn(move || {
        for c in tcp.incoming() {
            let Ok(mut c) = c else { continue };
            while let Some(q) = read_tcp(&mut c) {
                count.fetch_add(1, Ordering::SeqCst);
                if let Some(a) = upstream_answer(&q) {
                    let _ = c.write_all(&framed(&a));
                }
            }
        }
    });
    (addr, over_tcp)
}

/// `msg` with its two-byte length in front (DNS over TCP).
fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

/// One length-prefixed message; `None` at the end of the stream.
fn read_tcp(c: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    c.read_exact(&mut len).ok()?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    c.read_exact(&mut msg).ok()?;
    Some(msg)
}

/// A TCP connection to the proxy (a 10 s bound on each read).
fn tcp_to(proxy: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(proxy).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

fn ask(proxy: SocketAddr, q: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind(SocketAddr::new(proxy.ip(), 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.send_to(q, proxy).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.recv(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

#[test]
fn answers_the_mesh_hostnames_and_forwards_the_rest_over_udp_and_tcp() {
    let net = Net { n: 131 };
    let dir = tmpdir("dns");
    let (upstream, upstream_tcp) = fake_upstream(net.ip(9, 53));
    let silent = UdpSocket::bind((net.ip(9, 54), 0)).unwrap();
    // Its TCP side accepts (the backlog does) and never answers.
    let _silent_tcp = TcpListener::bind(silent.local_addr().unwrap()).unwrap();
    let text = net
        .node_config("node-a", &dir.join("ca"), "[]")
        .replacen(
            "ztunnel:\n",
            &format!(
                "ztunnel:\n  dns: {{listen: \"{}\", upstream: [\"{upstream}\"]}}\n",
                net.addr(1, 10, 0)
            ),
            1,
        )
        + "serviceEntries:\n  - {name: httpbin, namespace: ns-a, hosts: [httpbin.org], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: 198.51.100.7}]}\n";
    let file = dir.join("a.yaml");
    std::fs::write(&file, &text).unwrap();
    let loaded = ztunnel::config::load_str(&file, &text, &tuning::Profile::default(), 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let h = ztunnel::start(loaded, None, runtime::Shutdown::new()).unwrap();
    let proxy = h.dns.as_ref().unwrap().addr;
    let vip = h
        .state
        .load()
        .model
        .service_by_host("httpbin.org")
        .unwrap()
        .vips[0]
        .1;
    // The entry's allocated VIP, whatever the case of the name.
    let (rcode, ips) = parse_answer(&ask(proxy, &query(1, "HTTPBIN.org.", 1)).unwrap(), 1);
    assert_eq!((rcode, ips), (0, vec![vip]));
    // A Service's VIP.
    let (rcode, ips) = parse_answer(
        &ask(proxy, &query(2, "echo.ns-b.svc.cluster.local", 1)).unwrap(),
        2,
    );
    assert_eq!((rcode, ips), (0, vec![IpAddr::from([10, 200, 131, 1])]));
    // No IPv6 VIP: an empty answer from the model, not a forward.
    let (rcode, ips) = parse_answer(&ask(proxy, &query(3, "httpbin.org", 28)).unwrap(), 3);
    assert_eq!((rcode, ips), (0, vec![]));
    // Another name: forwarded, the upstream's answer relayed.
    let (rcode, ips) = parse_answer(&ask(proxy, &query(4, "example.net", 1)).unwrap(), 4);
    assert_eq!(
        (rcode, ips),
        (0, vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))])
    );
    // Garbage: dropped (no answer), counted; the proxy goes on.
    let s = UdpSocket::bind(SocketAddr::new(proxy.ip(), 0)).unwrap();
    s.send_to(b"\x00\x01\x80\x00junk", proxy).unwrap();
    let stats = http_get(h.addrs.stats, "/stats/prometheus").1;
    let count = |result: &str| {
        metric(
            &http_get(h.addrs.stats, "/stats/prometheus").1,
            "ztunnel_dns_requests_total",
            &[("result", result)],
        )
    };
    eventually("the garbage counted", || count("malformed") == 1);
    assert_eq!(count("answered"), 3, "{stats}");
    assert_eq!(count("forwarded"), 1, "{stats}");
    // Over TCP, on the same port: three queries sent at once on one connection, answered
    // in turn; the forwarded one went upstream over TCP.
    let mut c = tcp_to(proxy);
    let mut three = framed(&query(11, "httpbin.org", 1));
    three.extend(framed(&query(12, "example.net", 1)));
    three.extend(framed(&query(13, "echo.ns-b.svc.cluster.local", 28)));
    c.write_all(&three).unwrap();
    let a = |c: &mut TcpStream, id| parse_answer(&read_tcp(c).expect("a TCP answer"), id);
    assert_eq!(a(&mut c, 11), (0, vec![vip]));
    assert_eq!(
        a(&mut c, 12),
        (0, vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))])
    );
    assert_eq!(a(&mut c, 13), (0, vec![]));
    assert_eq!(upstream_tcp.load(Ordering::SeqCst), 1);
    // What is not a query ends the connection (the stream is out of step), counted.
    c.write_all(&framed(b"\x00\x01\x80\x00junk-junk-junk"))
        .unwrap();
    assert!(read_tcp(&mut c).is_none(), "the connection is closed");
    eventually("the TCP garbage counted", || count("malformed") == 2);
    assert_eq!(count("answered"), 5);
    assert_eq!(count("forwarded"), 2);
    h.stop(Duration::from_secs(5)).unwrap();
    // A proxy whose upstream never answers: SERVFAIL after its wait.
    let text2 = text.replace(
        &format!("upstream: [\"{upstream}\"]"),
        &format!("upstream: [\"{}\"]", silent.local_addr().unwrap()),
    );
    let text2 = text2.replace(
        &format!("{}:0", net.ip(1, 10)),
        &format!("{}:0", net.ip(1, 11)),
    );
    let text2 = text2.replace("address: 127.131.1.10", "address: 127.131.1.12");
    let loaded = ztunnel::config::load_str(&file, &text2, &tuning::Profile::default(), 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let h = ztunnel::start(loaded, None, runtime::Shutdown::new()).unwrap();
    let proxy = h.dns.as_ref().unwrap().addr;
    let (rcode, ips) = parse_answer(&ask(proxy, &query(5, "example.net", 1)).unwrap(), 5);
    assert_eq!((rcode, ips), (2, vec![]));
    // Over TCP likewise.
    let mut c = tcp_to(proxy);
    c.write_all(&framed(&query(6, "example.net", 1))).unwrap();
    let (rcode, ips) = parse_answer(&read_tcp(&mut c).expect("a TCP answer"), 6);
    assert_eq!((rcode, ips), (2, vec![]));
    h.stop(Duration::from_secs(5)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
