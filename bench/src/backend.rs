//! The backends the load goes to: thread-per-core monoio servers, one thread per generator
//! core, pinned beside the generator. Three protocols, each on its own port:
//!
//! - **sink** (`tcp-throughput`): read to end of file, counting bytes into a shared counter
//!   (the receiver-side throughput the harness samples), then answer the 8-byte little-endian
//!   total received and close. The client compares it with what it sent.
//! - **echo** (`tcp-rr`): write back whatever arrives until end of file, then close.
//! - **reply-close** (`conn-churn`): read one request whose first 4 bytes (big-endian) give
//!   its total length, write it back, close. The server closes first, so `TIME_WAIT` lands on
//!   the listening side and connection churn does not exhaust ephemeral ports.
//!
//! - **http** (`http1-rps`, `large-body`): HTTP/1.1 keep-alive ([`crate::http1`]): a request
//!   with a body gets it back as the response body; `GET /N` gets `N` bytes; anything
//!   unparsable gets `400` and a close (counted as a backend error).
//!
//! - **h2** (`http2-rps`): HTTP/2 cleartext ([`crate::http2`]), `GET /N` gets `N` bytes.
//!
//! - **stall** (`slow-reader`): a slow reader. Its receive buffer is small
//!   ([`crate::generator::SLOW_SOCKET_BUFFER`]) and it reads nothing until the harness sets
//!   [`BackendCounters::release_stalled`]; then it reads to end of file and answers the
//!   8-byte count, as the sink does.
//!
//! On loopback the listeners take ephemeral ports on 127.0.0.1; in a mesh pod they listen on
//! [`PORTS`] on every address of the pod's network namespace.
//!
//! Every read and write has a 30 s bound; a connection that stalls longer is dropped and
//! counted as an error. Waiting for the next message on an echo or HTTP connection (idle,
//! between messages) is bounded by 10 minutes instead and ends quietly: proxies keep idle
//! upstream connections (nginx's and HAProxy's keep-alive pools), and idle-connections
//! holds thousands open for as long as it takes to open the rest.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::time::timeout;
use runtime::driver::{self, DriverDecision, DriverKind};

const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an echo or HTTP connection may wait idle for its next message.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Counters the harness samples while a run is going.
#[derive(Debug, Default)]
pub struct BackendCounters {
    /// Bytes the sink has received, all connections, since start.
    pub sink_bytes: AtomicU64,
    /// Connections whose protocol went wrong (bad request header, early close, timeout).
    pub errors: AtomicU64,
    /// slow-reader: the stall backend starts reading once this is set.
    pub release_stalled: std::sync::atomic::AtomicBool,
}

/// The ports of a backend set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub echo: u16,
    pub sink: u16,
    pub reply_close: u16,
    pub http: u16,
    pub h2: u16,
    pub stall: u16,
}

/// Fixed ports of the backends in mesh pods.
pub const PORTS: Ports = Ports {
    echo: 8080,
    sink: 8081,
    reply_close: 8082,
    http: 8090,
    h2: 8091,
    stall: 8083,
};

/// The running backends.
pub struct Backends {
    pub sink: SocketAddr,
    pub echo: SocketAddr,
    pub reply_close: SocketAddr,
    pub http: SocketAddr,
    pub h2: SocketAddr,
    pub stall: SocketAddr,
    pub drivers: Vec<DriverKind>,
}

fn listener(port: u16, bind: Option<IpAddr>) -> Result<TcpListener> {
    let ip = match bind {
        Some(ip) => ip,
        None if port == 0 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let l = TcpListener::bind((ip, port))
        .with_context(|| format!("binding a backend listener on {ip}:{port}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

type Listeners = (
    TcpListener,
    TcpListener,
    TcpListener,
    TcpListener,
    TcpListener,
    TcpListener,
);

fn listeners(ports: Option<Ports>, bind: Option<IpAddr>) -> Result<Listeners> {
    let p = ports.unwrap_or(Ports {
        echo: 0,
        sink: 0,
        reply_close: 0,
        http: 0,
        h2: 0,
        stall: 0,
    });
    let stall = listener(p.stall, bind)?;
    // Accepted connections inherit it: a small, fixed window for the slow reader.
    socket2::SockRef::from(&stall)
        .set_recv_buffer_size(crate::generator::SLOW_SOCKET_BUFFER)
        .context("SO_RCVBUF on the stall listener")?;
    Ok((
        listener(p.sink, bind)?,
        listener(p.echo, bind)?,
        listener(p.reply_close, bind)?,
        listener(p.http, bind)?,
        listener(p.h2, bind)?,
        stall,
    ))
}

/// Start one backend thread per entry of `cores` (`None` = unpinned), listening on
/// loopback ephemeral ports (`netns` None) or on [`PORTS`] inside network namespace `netns`
/// (a mesh pod; the returned addresses are then `pod_ip:port`), or on [`PORTS`] of the pod's
/// own loopback address (`netns` `("", ip)`: the loopback mesh). Returns once each thread
/// has built its runtime.
pub fn start(
    cores: &[Option<usize>],
    decision: &DriverDecision,
    netns: Option<(&str, IpAddr)>,
    counters: Arc<BackendCounters>,
) -> Result<Backends> {
    let (sink, echo, rc, http, h2, stall) = match netns {
        None => listeners(None, None)?,
        Some(("", ip)) => listeners(Some(PORTS), Some(ip))?,
        Some((ns, _)) => crate::mesh::in_ns(ns, || listeners(Some(PORTS), None))?,
    };
    let mut addrs = (
        sink.local_addr()?,
        echo.local_addr()?,
        rc.local_addr()?,
        http.local_addr()?,
        h2.local_addr()?,
        stall.local_addr()?,
    );
    if let Some((_, ip)) = netns {
        addrs.0.set_ip(ip);
        addrs.1.set_ip(ip);
        addrs.2.set_ip(ip);
        addrs.3.set_ip(ip);
        addrs.4.set_ip(ip);
        addrs.5.set_ip(ip);
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (i, core) in cores.iter().copied().enumerate() {
        let ls = (
            sink.try_clone()?,
            echo.try_clone()?,
            rc.try_clone()?,
            http.try_clone()?,
            h2.try_clone()?,
            stall.try_clone()?,
        );
        let counters = counters.clone();
        let decision = decision.clone();
        let ready = ready_tx.clone();
        std::thread::Builder::new()
            .name(format!("bench-be-{i}"))
            .spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(core_affinity::CoreId { id: c });
                }
                let (mut rt, kind) = match driver::build_runtime(&decision, 1024) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready.send(Ok(kind));
                drop(ready);
                rt.block_on(serve_all(ls, counters));
            })
            .context("spawning a backend thread")?;
    }
    drop(ready_tx);
    let mut drivers = Vec::new();
    for _ in cores {
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(kind)) => drivers.push(kind),
            Ok(Err(e)) => anyhow::bail!("backend thread cannot build its runtime: {e}"),
            Err(_) => anyhow::bail!("backend thread did not start within 10 s"),
        }
    }
    Ok(Backends {
        sink: addrs.0,
        echo: addrs.1,
        reply_close: addrs.2,
        http: addrs.3,
        h2: addrs.4,
        stall: addrs.5,
        drivers,
    })
}

async fn serve_all((sink, echo, rc, http, h2, stall): Listeners, counters: Arc<BackendCounters>) {
    let c5 = counters.clone();
    let e = monoio::spawn(accept_loop(stall, c5, Proto::Stall));
    let c1 = counters.clone();
    let c2 = counters.clone();
    let c3 = counters.clone();
    let c4 = counters.clone();
    let d = monoio::spawn(accept_loop(h2, c4, Proto::Http2));
    let a = monoio::spawn(accept_loop(sink, c1, Proto::Sink));
    let b = monoio::spawn(accept_loop(echo, c2, Proto::Echo));
    let c = monoio::spawn(accept_loop(http, c3, Proto::Http));
    accept_loop(rc, counters, Proto::ReplyClose).await;
    a.await;
    b.await;
    c.await;
    d.await;
    e.await;
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Sink,
    Echo,
    ReplyClose,
    Http,
    Http2,
    Stall,
}

async fn accept_loop(l: TcpListener, counters: Arc<BackendCounters>, proto: Proto) {
    let l = match monoio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench: backend listener: {e}");
            return;
        }
    };
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors or similar: back off, never spin.
                eprintln!("bench: backend accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let counters = counters.clone();
        monoio::spawn(async move {
            let ok = match proto {
                Proto::Sink => sink(s, &counters).await,
                Proto::Echo => echo(s).await,
                Proto::ReplyClose => reply_close(s).await,
                Proto::Http => crate::http1::serve(s).await,
                Proto::Http2 => crate::http2::serve(s).await,
                Proto::Stall => stall(s, &counters).await,
            };
            if !ok {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                // Counted against the run in progress: the kind says where to look.
                eprintln!("bench: backend: a {proto:?} connection failed");
            }
        });
    }
}

async fn sink(mut s: TcpStream, counters: &BackendCounters) -> bool {
    let mut buf: Box<[u8]> = vec![0u8; 256 * 1024].into_boxed_slice();
    let mut total = 0u64;
    loop {
        let Ok((r, b)) = timeout(OP_TIMEOUT, s.read(buf)).await else {
            return false;
        };
        buf = b;
        match r {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                counters.sink_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => return false,
        }
    }
    let ack = total.to_le_bytes().to_vec();
    matches!(timeout(OP_TIMEOUT, s.write_all(ack)).await, Ok((Ok(_), _)))
}

/// The slow reader: nothing read until released (bounded by [`IDLE_TIMEOUT`]), then a sink.
async fn stall(s: TcpStream, counters: &BackendCounters) -> bool {
    let mut waited = Duration::ZERO;
    while !counters.release_stalled.load(Ordering::Relaxed) {
        if waited > IDLE_TIMEOUT {
            return false;
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    sink(s, counters).await
}

async fn echo(mut s: TcpStream) -> bool {
    let _ = s.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        // Waiting for the next message owes the client nothing: an idle connection (an
        // idle-connections run, a proxy's kept connection) closes quietly after IDLE_TIMEOUT.
        let Ok((r, b)) = timeout(IDLE_TIMEOUT, s.read(buf)).await else {
            return true;
        };
        buf = b;
        match r {
            // Closed (FIN, or a reset passed on by a proxy) between messages: nothing of
            // the client's is lost (the client checks every echo), as for HTTP.
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
        let Ok((r, b)) = timeout(OP_TIMEOUT, s.write_all(buf)).await else {
            return false;
        };
        buf = b;
        if r.is_err() {
            return false;
        }
    }
}

async fn reply_close(mut s: TcpStream) -> bool {
    let _ = s.set_nodelay(true);
    let head: Box<[u8]> = vec![0u8; 4].into_boxed_slice();
    let Ok((Ok(_), head)) = timeout(OP_TIMEOUT, s.read_exact(head)).await else {
        return false;
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if !(4..=1 << 20).contains(&len) {
        return false;
    }
    let rest: Box<[u8]> = vec![0u8; len - 4].into_boxed_slice();
    let rest = if len > 4 {
        let Ok((Ok(_), rest)) = timeout(OP_TIMEOUT, s.read_exact(rest)).await else {
            return false;
        };
        rest
    } else {
        rest
    };
    let mut msg = head.into_vec();
    msg.extend_from_slice(&rest);
    let Ok((Ok(_), _)) = timeout(OP_TIMEOUT, s.write_all(msg.slice(..))).await else {
        return false;
    };
    // Close first (drop); the client reads our FIN.
    true
}
