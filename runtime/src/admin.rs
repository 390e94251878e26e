//! Control-side HTTP endpoints (readiness, stats, admin) for the services built on the
//! runtime: a small blocking HTTP/1.1 server, never on a worker, `connection: close`. Used by
//! ztunnel and the waypoint.
//!
//! The port is reachable from every pod of the node, so no client may hold it: each
//! connection runs on its own short-lived thread (at most [`Limits::max_connections`] at
//! once; one more is answered 503 at once and closed) and has a total deadline for its
//! request head and another for the answer, however slowly it trickles bytes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::listener::{self, BindError};

/// An HTTP answer: status line, content type, body.
pub type Answer = (&'static str, &'static str, String);

/// Longest request head read (bytes).
const MAX_HEAD: usize = 8192;

/// How long one client may hold the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections handled at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// From accept to the end of the request head, whatever the pace of its bytes.
    pub head_deadline: Duration,
    /// For writing the whole answer.
    pub write_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 32,
            head_deadline: Duration::from_secs(2),
            write_deadline: Duration::from_secs(2),
        }
    }
}

/// A running endpoint; dropped or [`Endpoint::stop`]ped, its accept thread ends (connections
/// being answered finish within their deadlines).
pub struct Endpoint {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Endpoint {
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bind `addr` (refusing an address another process serves) and answer GETs with
/// `route(path)` (the path without its query), accepting on a thread called `name`; other
/// methods get 405. Default [`Limits`].
pub fn serve(
    name: &str,
    addr: SocketAddr,
    route: impl Fn(&str) -> Answer + Send + Sync + 'static,
) -> Result<Endpoint, BindError> {
    serve_with(name, addr, Limits::default(), route)
}

/// [`serve`] with explicit [`Limits`].
pub fn serve_with(
    name: &str,
    addr: SocketAddr,
    limits: Limits,
    route: impl Fn(&str) -> Answer + Send + Sync + 'static,
) -> Result<Endpoint, BindError> {
    listener::ensure_not_served(addr)?;
    let l = TcpListener::bind(addr).map_err(|source| BindError::Io { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| BindError::Io { addr, source })?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let route = Arc::new(route);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let conn_name = format!("{name}-conn");
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            for conn in l.incoming() {
                if s2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = conn else { continue };
                if in_flight.load(Ordering::SeqCst) >= limits.max_connections {
                    busy(c);
                    continue;
                }
                in_flight.fetch_add(1, Ordering::SeqCst);
                let slot = Slot(in_flight.clone());
                let route = route.clone();
                let spawned = std::thread::Builder::new()
                    .name(conn_name.clone())
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        let _slot = slot;
                        answer(c, &limits, &*route);
                    });
                if let Err(e) = spawned {
                    // The closure (connection and slot) was dropped with the error.
                    tracing::warn!(error = %e, "admin endpoint: cannot start a connection thread");
                }
            }
        })
        .map_err(|source| BindError::Io { addr, source })?;
    Ok(Endpoint {
        addr: local,
        stop,
        thread: Some(thread),
    })
}

/// One connection slot, freed however its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every slot is taken: 503 without waiting for the request (a non-blocking write of a short
/// answer into the fresh socket's empty buffer). What the client sent so far is read first,
/// so that the close is a FIN after the answer rather than a reset that may discard it.
fn busy(mut c: TcpStream) {
    let _ = c.set_nonblocking(true);
    let mut buf = [0u8; 1024];
    for _ in 0..(MAX_HEAD / buf.len()) {
        if !matches!(c.read(&mut buf), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = c.write(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nconnection: close\r\n\r\nbusy\n",
    );
    let _ = c.shutdown(std::net::Shutdown::Write);
}

fn answer(mut c: TcpStream, limits: &Limits, route: &dyn Fn(&str) -> Answer) {
    let _ = c.set_nonblocking(false);
    let deadline = Instant::now() + limits.head_deadline;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < MAX_HEAD {
        // The deadline is for the whole head: each read may wait only for what is left.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || c.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match c.read(&mut buf) {
            // A server loop retries an interrupted read whatever its cause.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) => break,
            // Deadline passed (or the connection failed): no answer.
            Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
    let (status, ctype, body) = if method == "GET" {
        route(path.split('?').next().unwrap_or(path))
    } else {
        ("405 Method Not Allowed", "text/plain", "GET only\n".into())
    };
    let out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let deadline = Instant::now() + limits.write_deadline;
    let mut rest = out.as_bytes();
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || c.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match c.write(rest) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => return,
            Ok(n) => rest = &rest[n..],
        }
    }
}

pub fn not_found() -> Answer {
    ("404 Not Found", "text/plain", "not found\n".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    const BOUND: Duration = Duration::from_secs(60);

    fn ready(path: &str) -> Answer {
        match path {
            "/healthz/ready" => ("200 OK", "text/plain", "ready\n".into()),
            _ => not_found(),
        }
    }

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// GET `path`; the whole answer (waits up to [`BOUND`]).
    fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(BOUND)).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).expect("no answer");
        out
    }

    /// A client that sends a request head one byte at a time and never finishes it, on its
    /// own thread, until told to stop; reports each byte sent.
    fn trickle(
        addr: SocketAddr,
        every: Duration,
    ) -> (
        TcpStream,
        Arc<AtomicBool>,
        std::sync::mpsc::Receiver<()>,
        std::thread::JoinHandle<()>,
    ) {
        let c = TcpStream::connect(addr).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (mut w, s2) = (c.try_clone().unwrap(), stop.clone());
        let t = std::thread::spawn(move || {
            // "GET /x" then header bytes forever: the head never ends.
            for b in b"GET /healthz/ready HTTP/1.1\r\nx: "
                .iter()
                .chain(std::iter::repeat(&b'a'))
            {
                if s2.load(Ordering::SeqCst) || w.write_all(&[*b]).is_err() {
                    return;
                }
                let _ = tx.send(());
                std::thread::sleep(every);
            }
        });
        (c, stop, rx, t)
    }

    fn still_connected(c: &TcpStream) -> bool {
        c.set_nonblocking(true).unwrap();
        let r = (&*c).read(&mut [0u8; 1]);
        c.set_nonblocking(false).unwrap();
        matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
    }

    /// A client trickling its request head does not hold the endpoint: a readiness probe
    /// made meanwhile is answered while the trickler is still connected.
    #[test]
    fn a_probe_is_answered_while_a_trickling_client_holds_a_connection() {
        let limits = Limits {
            // Long enough that the trickler is not cut during the test.
            head_deadline: Duration::from_secs(600),
            ..Limits::default()
        };
        let ep = serve_with("t-admin", local(), limits, ready).unwrap();
        let (c, stop, sent, t) = trickle(ep.addr, Duration::from_millis(20));
        // The trickler has started its head.
        for _ in 0..3 {
            sent.recv_timeout(BOUND).unwrap();
        }
        let answer = get(ep.addr, "/healthz/ready");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nready\n"), "{answer}");
        // Still trickling, still unanswered.
        sent.recv_timeout(BOUND).unwrap();
        assert!(still_connected(&c));
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
    }

    /// The head deadline is for the whole head: a client sending a byte well within each
    /// read's wait is still cut (closed unanswered) once the deadline passes.
    #[test]
    fn a_trickling_client_is_cut_at_the_head_deadline() {
        let limits = Limits {
            head_deadline: Duration::from_millis(300),
            ..Limits::default()
        };
        let ep = serve_with("t-admin", local(), limits, ready).unwrap();
        // At this pace the 8 KiB head limit takes minutes: only the deadline ends it early.
        let (mut c, stop, sent, t) = trickle(ep.addr, Duration::from_millis(20));
        sent.recv_timeout(BOUND).unwrap();
        c.set_read_timeout(Some(BOUND)).unwrap();
        let mut got = Vec::new();
        match c.read_to_end(&mut got) {
            Ok(_) => assert!(
                got.is_empty(),
                "answered: {:?}",
                String::from_utf8_lossy(&got)
            ),
            // Closed with bytes unread: a reset.
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        // The endpoint still answers.
        assert!(get(ep.addr, "/healthz/ready").starts_with("HTTP/1.1 200 OK\r\n"));
    }

    /// Past `max_connections` held at once, a connection is answered 503 and closed; once a
    /// slot is free, requests are answered again.
    #[test]
    fn connections_past_the_cap_get_503() {
        let limits = Limits {
            max_connections: 2,
            head_deadline: Duration::from_secs(600),
            ..Limits::default()
        };
        let ep = serve_with("t-admin", local(), limits, ready).unwrap();
        let (c1, stop1, sent1, t1) = trickle(ep.addr, Duration::from_millis(20));
        let (c2, stop2, sent2, t2) = trickle(ep.addr, Duration::from_millis(20));
        sent1.recv_timeout(BOUND).unwrap();
        sent2.recv_timeout(BOUND).unwrap();
        // The accept thread takes connections in order: both slots are taken before this.
        // (The request is not sent: one the server had not read when it closed would make
        // the close a reset, which may discard the answer.)
        let mut c3 = TcpStream::connect(ep.addr).unwrap();
        c3.set_read_timeout(Some(BOUND)).unwrap();
        let mut answer = String::new();
        c3.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{answer}"
        );
        // Free the slots: the server sees EOF, answers and ends those threads.
        for (c, stop, t) in [(c1, stop1, t1), (c2, stop2, t2)] {
            stop.store(true, Ordering::SeqCst);
            t.join().unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            let mut c = c;
            c.set_read_timeout(Some(BOUND)).unwrap();
            let _ = c.read_to_end(&mut rest);
        }
        // The slot of a finished connection is freed just after its answer: retry until
        // one is answered 200 (bounded).
        let start = Instant::now();
        loop {
            let a = get(ep.addr, "/healthz/ready");
            if a.starts_with("HTTP/1.1 200 OK\r\n") {
                break;
            }
            assert!(start.elapsed() < BOUND, "never answered again: {a}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
