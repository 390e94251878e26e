//! Entering a namespace, and the sockets made there.
//!
//! A socket belongs to the network namespace of the thread that created it, whatever thread
//! uses it later: code runs in a namespace on a fresh thread ([`in_ns`]) and hands back the
//! sockets it made.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use crate::{Error, Result};

/// Move the calling thread into network namespace `ns` (sockets it creates from then on
/// live there; threads it spawns inherit it).
pub fn enter(ns: &str) -> std::io::Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))?;
    setns(f.as_raw_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| std::io::Error::other(format!("setns {path}: {e}")))
}

/// Run `f` on a fresh thread inside `ns`; a failure to enter, or a panic in `f`, is an error.
pub fn try_in_ns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
    let ns2 = ns.to_string();
    std::thread::Builder::new()
        .name("netlab-netns".into())
        .spawn(move || -> Result<R> {
            enter(&ns2).map_err(|e| Error::io(format!("entering network namespace {ns2}"), e))?;
            Ok(f())
        })
        .map_err(|e| Error::io("spawning a thread", e))?
        .join()
        .map_err(|_| Error::Panicked(ns.to_string()))?
}

/// Run `f` on a fresh thread inside `ns` (test code): failing to enter panics, and a panic
/// in `f` is resumed here with its own message.
pub fn in_ns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let ns2 = ns.to_string();
    let r = std::thread::spawn(move || {
        enter(&ns2).unwrap_or_else(|e| panic!("entering network namespace {ns2}: {e}"));
        f()
    })
    .join();
    match r {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// A TCP connection made from inside `ns`, with a connect timeout and a read timeout.
pub fn connect_in(
    ns: &str,
    dst: SocketAddr,
    connect_timeout: Duration,
    read_timeout: Duration,
) -> std::io::Result<TcpStream> {
    in_ns(ns, move || {
        let s = TcpStream::connect_timeout(&dst, connect_timeout)?;
        s.set_read_timeout(Some(read_timeout))?;
        Ok(s)
    })
}

/// A listener on `addr` inside `ns`, accepting until dropped; each connection is handed
/// to `handler` (with its peer) on a thread of its own, as a blocking stream.
pub struct Served {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

/// Start a [`Served`] listener (binding errors are returned at once).
pub fn serve_in(
    ns: &str,
    addr: SocketAddr,
    handler: impl Fn(TcpStream, SocketAddr) + Send + Sync + 'static,
) -> std::io::Result<Served> {
    let l = in_ns(ns, move || TcpListener::bind(addr))?;
    // Polled, so that dropping the guard ends the accept loop.
    l.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let handler = Arc::new(handler);
    std::thread::Builder::new()
        .name("netlab-accept".into())
        .spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                let (c, peer) = match l.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = c.set_nonblocking(false);
                let h = handler.clone();
                std::thread::spawn(move || h(c, peer));
            }
        })?;
    Ok(Served { addr, stop })
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `GET path` (HTTP/1.1) to `addr` from inside `ns`: the response body.
pub fn http_get_in(ns: &str, addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: netlab\r\nconnection: close\r\n\r\n");
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(req.as_bytes())?;
        let mut out = String::new();
        // The server may reset after answering: what was read counts.
        let _ = s.read_to_string(&mut out);
        Ok(out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    })
}

/// The IPv4 addresses `server` (a DNS resolver, UDP) answers for `name` (an `A` query),
/// asked from inside `ns`: what a pod's resolver library would get (its rcode must be
/// `NOERROR`). A silence of 10 s is an error.
pub fn resolve_a_in(
    ns: &str,
    server: SocketAddr,
    name: &str,
) -> std::io::Result<Vec<std::net::Ipv4Addr>> {
    resolve_in(ns, server, name, false)
}

/// [`resolve_a_in`] over TCP (the query and the answer each after a two-byte length, as
/// a resolver asks after a truncated answer, or always with `use-vc`).
pub fn resolve_a_tcp_in(
    ns: &str,
    server: SocketAddr,
    name: &str,
) -> std::io::Result<Vec<std::net::Ipv4Addr>> {
    resolve_in(ns, server, name, true)
}

fn resolve_in(
    ns: &str,
    server: SocketAddr,
    name: &str,
    tcp: bool,
) -> std::io::Result<Vec<std::net::Ipv4Addr>> {
    let name = name.to_string();
    let wait = std::time::Duration::from_secs(10);
    in_ns(ns, move || {
        let q = a_query(&name);
        let a = if tcp {
            let mut s = std::net::TcpStream::connect_timeout(&server, wait)?;
            s.set_read_timeout(Some(wait))?;
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            s.write_all(&framed)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut a)?;
            a
        } else {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(wait))?;
            s.send_to(&q, server)?;
            let mut a = vec![0u8; 1500];
            let n = s.recv(&mut a)?;
            a.truncate(n);
            a
        };
        a_records(&name, &q, &a)
    })
}

/// An `A` query for `name` (ID 0x5118, recursion desired).
fn a_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x51, 0x18, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The `A` records of `a`, the answer to `q` (an error unless it is one, `NOERROR`).
fn a_records(name: &str, q: &[u8], a: &[u8]) -> std::io::Result<Vec<std::net::Ipv4Addr>> {
    let bad = |why: &str| std::io::Error::other(format!("answer for {name}: {why}"));
    if a.len() < q.len() || a[..2] != q[..2] || a[2] & 0x80 == 0 {
        return Err(bad("not a response to the query"));
    }
    if a[3] & 0x0f != 0 {
        return Err(bad(&format!("rcode {}", a[3] & 0x0f)));
    }
    // The records after the question: name (a pointer or labels), type, class, TTL,
    // length, data.
    let mut i = q.len();
    let mut out = Vec::new();
    for _ in 0..u16::from_be_bytes([a[6], a[7]]) {
        if a.get(i).is_some_and(|b| b & 0xc0 == 0xc0) {
            i += 2;
        } else {
            while a.get(i).is_some_and(|b| *b != 0) {
                i += 1 + a[i] as usize;
            }
            i += 1;
        }
        let rec = a.get(i..i + 10).ok_or_else(|| bad("cut"))?;
        let len = u16::from_be_bytes([rec[8], rec[9]]) as usize;
        let data = a.get(i + 10..i + 10 + len).ok_or_else(|| bad("cut"))?;
        if rec[..2] == [0, 1] && len == 4 {
            out.push(std::net::Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    Ok(out)
}
