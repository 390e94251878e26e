//! Control-side HTTP endpoints (readiness, stats, admin) for the services built on the
//! runtime: a small blocking HTTP/1.1 server on its own thread, never on a worker, one
//! connection at a time, `connection: close`. Used by ztunnel and the waypoint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::listener::{self, BindError};

/// An HTTP answer: status line, content type, body.
pub type Answer = (&'static str, &'static str, String);

/// A running endpoint; dropped or [`Endpoint::stop`]ped, its thread ends.
pub struct Endpoint {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Endpoint {
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept.
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
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
/// `route(path)` (the path without its query) on a thread called `name`; other methods get
/// 405.
pub fn serve(
    name: &str,
    addr: SocketAddr,
    route: impl Fn(&str) -> Answer + Send + 'static,
) -> Result<Endpoint, BindError> {
    listener::ensure_not_served(addr)?;
    let l = TcpListener::bind(addr).map_err(|source| BindError::Io { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| BindError::Io { addr, source })?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            for conn in l.incoming() {
                if s2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                let mut req = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match c.read(&mut buf) {
                        // A server loop retries an interrupted read whatever its cause.
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Ok(0) | Err(_) => break,
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
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|source| BindError::Io { addr, source })?;
    Ok(Endpoint {
        addr: local,
        stop,
        thread: Some(thread),
    })
}

pub fn not_found() -> Answer {
    ("404 Not Found", "text/plain", "not found\n".into())
}
