//! The load generator: thread-per-core monoio clients (io_uring, or epoll where the runtime
//! decides so), one thread per generator core, pinned beside the backends. Each run starts
//! fresh threads; each connection (or churn loop) is a task on its thread.
//!
//! Windows: every run has a warm-up (`t0..t_warm`) and a measured window (`t_warm..t_end`).
//! Round trips and connections count, and enter the histogram, when they *start* inside the
//! window (open loop, `tcp-rr-open`: when they are *due* inside the window, timed from that
//! due time). Every connect, read and write is bounded (`OP_TIMEOUT`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::time::timeout;
use runtime::driver::{self, DriverDecision};

const OP_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Error messages kept per run (the count is exact).
const MAX_ERROR_SAMPLES: usize = 5;

/// What each connection does.
#[derive(Debug, Clone, Copy)]
pub enum Work {
    /// Write `write_size` chunks until the end, then half-close and read the sink's count.
    Throughput { write_size: usize },
    /// Closed loop: write `size` bytes, read them back, repeat.
    Rr { size: usize },
    /// Loop: connect, write `size` bytes, read them back and the server's close, close.
    Churn { size: usize },
    /// Open loop: request `i` of a connection is due at `t0 + i × interval`; write `size`
    /// bytes at (or, when behind, after) that time, read them back; latency is measured from
    /// the due time (coordinated-omission correction, as wrk2 does).
    RrOpen { size: usize, interval: Duration },
    /// HTTP/1.1 keep-alive, closed loop: `req_body` bytes up (POST, echoed back) or a
    /// `GET /resp_body`; every response body byte is checked ([`crate::http1`]).
    Http1 { req_body: usize, resp_body: usize },
    /// HTTP/2, closed loop: `streams` concurrent `GET /resp_body` on each connection.
    Http2 { streams: usize, resp_body: usize },
    /// Open idle connections (`conns` of them), hold them until the end of the window, then
    /// check each still answers one echo exchange.
    Idle { size: usize },
    /// Idle HTTP/1.1 keep-alive connections: one `GET /resp_body` each to prove it is through,
    /// held until the end, then one more request each.
    IdleHttp { resp_body: usize },
    /// Open loop HTTP/1.1: this thread's requests are due at `t_first + i × interval` (one
    /// schedule over all its connections), each sent on the next free keep-alive connection;
    /// latency from the due time (coordinated-omission corrected). See [`http1_open`].
    Http1Open {
        resp_body: usize,
        interval: Duration,
    },
    /// Slow reader: write `write_size` chunks to a backend that does not read (the stall
    /// port) until told to stop, so the path's buffers fill; then the backend reads everything
    /// and answers the count, which must equal what was written.
    SlowReader { write_size: usize },
}

/// idle-connections, idle-http: connections a generator thread has opening at once (connect,
/// SOCKS5, first exchange). Opening all at once overflows a proxy's accept queue: the
/// handshake-completing ACK and the first data are dropped (`ListenOverflows`), the client
/// retransmits with exponential backoff and the SOCKS5 step times out (measured on the
/// loopback mesh: 1,318 of 9,000 timed out, 13,478 listen overflows, no connect stalled).
/// Opening is bound by the proxies' CPU, not by this window: a smaller one only keeps each
/// connection's opening time (window ÷ opening rate) well under the 5 s SOCKS5 bound when
/// outside load slows the proxies down (256 in flight at 150 openings/s timed out 98 of 9,000).
pub const OPEN_WINDOW: usize = 64;

/// slow-reader: the client's `SO_SNDBUF` and the stall backend's `SO_RCVBUF`, so the kernel
/// buffers outside the proxies are small and fixed; what fills up is the path in between.
pub const SLOW_SOCKET_BUFFER: usize = 64 * 1024;

/// Live counters the main thread shows as progress.
#[derive(Debug, Default)]
pub struct Live {
    pub ops: AtomicU64,
    pub bytes_sent: AtomicU64,
}

/// One generator thread's share of a run.
#[derive(Clone)]
pub struct Plan {
    pub work: Work,
    pub target: SocketAddr,
    /// Connections (throughput, rr) or concurrent loops (churn) on this thread.
    pub conns: usize,
    pub t_warm: Instant,
    pub t_end: Instant,
    pub stop: Arc<AtomicBool>,
    pub live: Arc<Live>,
    /// Network namespace the generator thread enters first (a mesh client pod).
    pub netns: Option<String>,
    /// `host` header of HTTP requests.
    pub host: String,
    /// More fields on every HTTP request (`--header`).
    pub headers: Arc<[(String, String)]>,
    /// Reach `target` through a SOCKS5 proxy (the loopback mesh: ztunnel A's SOCKS5).
    pub socks: Option<Socks>,
}

/// A SOCKS5 CONNECT step before the exchange: connect from `src` (the client pod's address,
/// by which ztunnel identifies the source workload) to `proxy`, then ask for the target.
#[derive(Debug, Clone, Copy)]
pub struct Socks {
    pub src: std::net::IpAddr,
    pub proxy: SocketAddr,
}

/// What a thread (or a connection) reports.
#[derive(Debug, Clone)]
pub struct GenResult {
    /// Round-trip or connection times (ns) of operations started in the window.
    pub hist: Histogram<u64>,
    pub ops_window: u64,
    pub ops_total: u64,
    /// Payload bytes written.
    pub sent: u64,
    /// Payload bytes the other end confirmed: the sink's count (throughput) or bytes read
    /// back (rr, churn).
    pub received: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Open loop: requests due in the window (`t_warm..t_end`).
    pub due_window: u64,
    /// Open loop: requests due in the window but not yet sent when it ended (each is in the
    /// histogram with its wait so far, a lower bound).
    pub unsent: u64,
    /// Open loop: requests of the window sent more than `LATE_SLACK` after their due time.
    pub late: u64,
    /// Open loop: answers received in the window, whenever due (the achieved rate; behind
    /// schedule these include requests due in the warm-up).
    pub done_window: u64,
    /// HTTP/1.1 (`large-body`'s figure): body bytes moved both ways inside the window, each
    /// write or read counted when it completes ([`WindowBytes`]), so exchanges straddling
    /// the window's edges count with the part moved inside it.
    pub window_bytes: u64,
}

/// Bytes counted by when they moved: a piece (a write or a read) completing inside the
/// measured window `[t_warm, t_end)` counts, whole; one completing before or after does not.
/// Unlike counting whole exchanges by their start, this does not quantise the figure when an
/// exchange takes a sizeable part of the window (`large-body`: 64 connections each echoing
/// 1 MiB over the waypoint take ~0.3–0.5 s per exchange, so a 0.6 s window starts only one or
/// two per connection). The error is at most one piece per connection at each edge, the two
/// edges' errors of opposite sign.
#[derive(Debug, Clone, Copy)]
pub struct WindowBytes {
    t_warm: Instant,
    t_end: Instant,
    pub bytes: u64,
}

impl WindowBytes {
    pub fn new(t_warm: Instant, t_end: Instant) -> Self {
        WindowBytes {
            t_warm,
            t_end,
            bytes: 0,
        }
    }

    /// `n` bytes finished moving at `at`.
    pub fn add(&mut self, at: Instant, n: usize) {
        if at >= self.t_warm && at < self.t_end {
            self.bytes += n as u64;
        }
    }
}

/// Open loop: how late a send may start before it counts as `late`.
pub const LATE_SLACK: Duration = Duration::from_micros(100);

pub fn new_hist() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant figures.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

impl GenResult {
    fn new() -> Self {
        GenResult {
            hist: new_hist(),
            ops_window: 0,
            ops_total: 0,
            sent: 0,
            received: 0,
            errors: 0,
            error_samples: Vec::new(),
            due_window: 0,
            unsent: 0,
            late: 0,
            done_window: 0,
            window_bytes: 0,
        }
    }

    fn error(&mut self, what: impl Into<String>) {
        self.errors += 1;
        if self.error_samples.len() < MAX_ERROR_SAMPLES {
            self.error_samples.push(what.into());
        }
    }

    pub fn merge(&mut self, o: &GenResult) {
        let _ = self.hist.add(&o.hist);
        self.ops_window += o.ops_window;
        self.ops_total += o.ops_total;
        self.sent += o.sent;
        self.received += o.received;
        self.errors += o.errors;
        self.due_window += o.due_window;
        self.unsent += o.unsent;
        self.late += o.late;
        self.done_window += o.done_window;
        self.window_bytes += o.window_bytes;
        for e in &o.error_samples {
            if self.error_samples.len() < MAX_ERROR_SAMPLES {
                self.error_samples.push(e.clone());
            }
        }
    }

    pub fn empty() -> Self {
        Self::new()
    }
}

/// Start generator thread `id` on `core`; it sends its result (or why it could not run) on
/// `tx` when its share is done.
pub fn spawn(
    id: usize,
    core: Option<usize>,
    decision: &DriverDecision,
    plan: Plan,
    tx: Sender<Result<GenResult, String>>,
) -> std::io::Result<()> {
    let decision = decision.clone();
    std::thread::Builder::new()
        .name(format!("bench-gen-{id}"))
        .spawn(move || {
            if let Some(c) = core {
                core_affinity::set_for_current(core_affinity::CoreId { id: c });
            }
            if let Some(ns) = &plan.netns {
                if let Err(e) = crate::mesh::enter(ns) {
                    let _ = tx.send(Err(format!("generator: entering {ns}: {e}")));
                    return;
                }
            }
            let entries = match plan.work {
                Work::Idle { .. } => 4096,
                _ => 1024,
            };
            let (mut rt, _kind) = match driver::build_runtime(&decision, entries) {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.send(Err(format!("generator runtime: {e}")));
                    return;
                }
            };
            let res = rt.block_on(run_plan(plan));
            let _ = tx.send(Ok(res));
        })?;
    Ok(())
}

async fn run_plan(plan: Plan) -> GenResult {
    if let Work::Http1Open {
        resp_body,
        interval,
    } = plan.work
    {
        return http1_open(plan, resp_body, interval).await;
    }
    let opening = matches!(plan.work, Work::Idle { .. } | Work::IdleHttp { .. });
    // Connections still opening (idle scenarios): at most OPEN_WINDOW at once.
    let inflight = std::rc::Rc::new(std::cell::Cell::new(0usize));
    // Idle connections wait on this until the plan ends (one task watches the flag).
    let hold = std::rc::Rc::new(Hold::default());
    let watcher = opening.then(|| {
        let (h, p) = (hold.clone(), plan.clone());
        monoio::spawn(async move { h.watch(&p).await })
    });
    let mut handles = Vec::with_capacity(plan.conns);
    for i in 0..plan.conns {
        if opening {
            while inflight.get() >= OPEN_WINDOW && running(&plan) {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
            if !running(&plan) {
                break;
            }
            inflight.set(inflight.get() + 1);
        }
        let opened = Opened(opening.then(|| inflight.clone()));
        let p = plan.clone();
        let hold = hold.clone();
        handles.push(monoio::spawn(async move {
            match p.work {
                Work::Throughput { write_size } => throughput_conn(&p, write_size).await,
                Work::Rr { size } => rr_conn(&p, size, i).await,
                Work::Churn { size } => churn_loop(&p, size, i).await,
                Work::RrOpen { size, interval } => rr_open_conn(&p, size, interval, i).await,
                Work::Http1 {
                    req_body,
                    resp_body,
                } => http1_conn(&p, req_body, resp_body).await,
                Work::Idle { size } => idle_conn(&p, size, i, opened, &hold).await,
                Work::IdleHttp { resp_body } => idle_http_conn(&p, resp_body, opened, &hold).await,
                Work::Http2 { streams, resp_body } => http2_conn(&p, streams, resp_body).await,
                Work::SlowReader { write_size } => slow_writer_conn(&p, write_size).await,
                Work::Http1Open { .. } => unreachable!("handled above"),
            }
        }));
    }
    let mut total = GenResult::new();
    for h in handles {
        total.merge(&h.await);
    }
    if let Some(w) = watcher {
        w.await;
    }
    total
}

/// Where a generator thread's idle connections wait for the plan's end: one task polls the
/// stop flag and the end time and wakes them all, where a timer per connection would wake
/// each of thousands every few ms (CPU taken from the backends sharing the core).
#[derive(Default)]
struct Hold {
    over: std::cell::Cell<bool>,
    waiting: std::cell::RefCell<Vec<std::task::Waker>>,
}

impl Hold {
    /// How often the watcher looks at the stop flag (the hold ends at most this late).
    const POLL: Duration = Duration::from_millis(10);

    async fn watch(&self, p: &Plan) {
        while running(p) {
            monoio::time::sleep(Self::POLL).await;
        }
        self.over.set(true);
        for w in self.waiting.take() {
            w.wake();
        }
    }

    /// Ready once the plan has ended.
    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.over.get() {
                std::task::Poll::Ready(())
            } else {
                self.waiting.borrow_mut().push(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// An idle connection's place in the opening window: released (once) when its first
/// exchange is done or it failed.
struct Opened(Option<std::rc::Rc<std::cell::Cell<usize>>>);

impl Opened {
    fn done(&mut self) {
        if let Some(c) = self.0.take() {
            c.set(c.get().saturating_sub(1));
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.done();
    }
}

fn running(p: &Plan) -> bool {
    !p.stop.load(Ordering::Relaxed) && Instant::now() < p.t_end
}

async fn connect_addr(target: SocketAddr, nodelay: bool) -> Result<TcpStream, String> {
    match timeout(CONNECT_TIMEOUT, TcpStream::connect_addr(target)).await {
        Ok(Ok(s)) => {
            if nodelay {
                let _ = s.set_nodelay(true);
            }
            Ok(s)
        }
        Ok(Err(e)) => Err(format!("connect {target}: {e}")),
        Err(_) => Err(format!(
            "connect {target}: timed out after {}s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// Connect to the plan's target, through its SOCKS5 proxy when it has one (the SOCKS5
/// handshake is part of the connect, so conn-churn counts it in the connection time).
async fn connect(p: &Plan, nodelay: bool) -> Result<TcpStream, String> {
    match p.socks {
        None => connect_addr(p.target, nodelay).await,
        Some(sx) => match timeout(CONNECT_TIMEOUT, socks_connect(sx, p.target, nodelay)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "socks5 {} → {}: timed out after {}s",
                sx.proxy,
                p.target,
                CONNECT_TIMEOUT.as_secs()
            )),
        },
    }
}

/// A TCP connection from `src` to `dst` (a bound source address, which std cannot do),
/// connected without blocking the thread: a connect that waits (a SYN retransmit) must not
/// hold up the thread's other connections.
async fn connect_from(src: std::net::IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::AsRawFd;
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    // The port is chosen by `connect` for the 4-tuple, not by `bind` for every destination:
    // with the pod's address bound, `bind` to port 0 searched past every TIME_WAIT port of
    // that address (see `close_quietly`).
    runtime::sys::set_bind_address_no_port(s.as_raw_fd())?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    match s.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let std: std::net::TcpStream = s.into();
    let t = TcpStream::from_std(std)?;
    t.writable(false).await?;
    // The connect's outcome (SO_ERROR).
    match runtime::sys::with_sockref(t.as_raw_fd(), |s| s.take_error())? {
        Some(e) => Err(e),
        None => Ok(t),
    }
}

/// Close cleanly: half-close, wait (bounded) for the other side's close, then close (with a
/// zero linger, which drops a socket still in CLOSING instead of leaving it to time out; no
/// reset goes out from there). This side closed first, so each connection stays in TIME_WAIT
/// here for 60 s: the kernel moves it there itself when the other side's FIN arrives, before
/// the close (`ss` after an idle run shows one per connection). Through the loopback mesh,
/// whose client sockets are bound to the client pod's address, every later `bind` to port 0
/// searched past those ports: idle-connections over hbone right after l4's took 38–49 s to
/// open its 9,000 connections (7 s for l4's) on a loaded machine, the generator thread
/// spending ~18 CPU-seconds in `inet_csk_get_port`'s search (perf). `connect_from` now
/// leaves the port to `connect` (`IP_BIND_ADDRESS_NO_PORT`). `Err` when the other side did
/// not close cleanly.
async fn close_quietly(mut s: TcpStream) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    s.shutdown()
        .await
        .map_err(|e| format!("shutdown(SHUT_WR): {e}"))?;
    let extra = read_to_eof(&mut s).await?;
    let _ = runtime::sys::with_sockref(s.as_raw_fd(), |r| r.set_linger(Some(Duration::ZERO)));
    drop(s);
    if extra > 0 {
        return Err(format!("{extra} unexpected bytes before close"));
    }
    Ok(())
}

async fn socks_connect(sx: Socks, target: SocketAddr, nodelay: bool) -> Result<TcpStream, String> {
    let what = format!("socks5 {} → {target}", sx.proxy);
    let mut s = connect_from(sx.src, sx.proxy)
        .await
        .map_err(|e| format!("{what}: connect: {e}"))?;
    let _ = s.set_nodelay(true);
    // Greeting: version 5, one method, no authentication.
    let (r, _) = s.write_all(vec![5u8, 1, 0]).await;
    r.map_err(|e| format!("{what}: greeting: {e}"))?;
    let (r, b) = s.read_exact(vec![0u8; 2]).await;
    r.map_err(|e| format!("{what}: greeting reply: {e}"))?;
    if b != [5, 0] {
        return Err(format!("{what}: greeting refused ({b:?})"));
    }
    let mut req = vec![5u8, 1, 0];
    match target {
        SocketAddr::V4(a) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
        }
    }
    req.extend_from_slice(&target.port().to_be_bytes());
    let (r, _) = s.write_all(req).await;
    r.map_err(|e| format!("{what}: request: {e}"))?;
    let (r, head) = s.read_exact(vec![0u8; 4]).await;
    r.map_err(|e| format!("{what}: reply: {e}"))?;
    if head[0] != 5 || head[1] != 0 {
        return Err(format!("{what}: reply code {}", head[1]));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let (r, l) = s.read_exact(vec![0u8; 1]).await;
            r.map_err(|e| format!("{what}: reply: {e}"))?;
            l[0] as usize + 2
        }
        t => return Err(format!("{what}: reply address type {t}")),
    };
    let (r, _) = s.read_exact(vec![0u8; rest]).await;
    r.map_err(|e| format!("{what}: reply: {e}"))?;
    if !nodelay {
        let _ = s.set_nodelay(false);
    }
    Ok(s)
}

/// Read until end of file, bounded; `Ok(extra bytes)` (0 expected).
async fn read_to_eof(s: &mut TcpStream) -> Result<usize, String> {
    let mut extra = 0usize;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        match timeout(OP_TIMEOUT, s.read(buf)).await {
            Ok((Ok(0), _)) => return Ok(extra),
            Ok((Ok(n), b)) => {
                extra += n;
                buf = b;
            }
            Ok((Err(e), _)) => return Err(format!("waiting for close: {e}")),
            Err(_) => return Err("waiting for close: timed out".into()),
        }
    }
}

async fn throughput_conn(p: &Plan, write_size: usize) -> GenResult {
    let mut r = GenResult::new();
    let mut s = match connect(p, false).await {
        Ok(s) => s,
        Err(e) => {
            r.error(e);
            return r;
        }
    };
    // The sink answers with its count once it has read everything; allow time for the
    // socket buffers along the path to drain.
    let bounds = (
        OP_TIMEOUT,
        "write: stalled for 5 s",
        Duration::from_secs(15),
    );
    send_then_check_count(&mut s, p, &mut r, write_size, || running(p), bounds, "sink").await;
    r
}

/// Writes `write_size` blocks while `keep_going()`, half-closes, reads the peer's 8-byte
/// count of what it received and checks it against what was sent, then reads to EOF.
/// `bounds`: (longest a write may block, its error, how long to wait for the count); `peer`
/// names the counting side in errors. Errors are recorded in `r`; false when the exchange
/// stopped before the count (a write or the half-close failed).
async fn send_then_check_count(
    s: &mut TcpStream,
    p: &Plan,
    r: &mut GenResult,
    write_size: usize,
    keep_going: impl Fn() -> bool,
    bounds: (Duration, &str, Duration),
    peer: &str,
) -> bool {
    let (stall, stall_error, count_wait) = bounds;
    let mut buf: Vec<u8> = vec![0x5a; write_size];
    while keep_going() {
        match timeout(stall, s.write_all(buf)).await {
            Ok((Ok(n), b)) => {
                buf = b;
                r.sent += n as u64;
                p.live.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok((Err(e), _)) => {
                r.error(format!("write: {e}"));
                return false;
            }
            Err(_) => {
                r.error(stall_error);
                return false;
            }
        }
    }
    if let Err(e) = s.shutdown().await {
        r.error(format!("shutdown(SHUT_WR): {e}"));
        return false;
    }
    let ack: Box<[u8]> = vec![0u8; 8].into_boxed_slice();
    match timeout(count_wait, s.read_exact(ack)).await {
        Ok((Ok(_), a)) => {
            let got = u64::from_le_bytes(a[..8].try_into().expect("8 bytes"));
            r.received = got;
            if got != r.sent {
                r.error(format!("{peer} received {got} bytes of {} sent", r.sent));
            }
        }
        Ok((Err(e), _)) => r.error(format!("reading the {peer}'s count: {e}")),
        Err(_) => r.error(format!("reading the {peer}'s count: timed out")),
    }
    if let Err(e) = read_to_eof(s).await {
        r.error(e);
    }
    true
}

/// One echo exchange: tag `req` with `seq`, send it, read the echo into `resp` and check it.
/// Returns the buffers for reuse, or `None` once the failure is recorded in `r`.
async fn echo_once(
    s: &mut TcpStream,
    mut req: Vec<u8>,
    resp: Box<[u8]>,
    seq: u64,
    r: &mut GenResult,
) -> Option<(Vec<u8>, Box<[u8]>)> {
    let size = req.len();
    let tag = seq.to_le_bytes();
    let n = tag.len().min(size);
    req[..n].copy_from_slice(&tag[..n]);
    let req = match timeout(OP_TIMEOUT, s.write_all(req)).await {
        Ok((Ok(_), b)) => b,
        Ok((Err(e), _)) => {
            r.error(format!("write: {e}"));
            return None;
        }
        Err(_) => {
            r.error("write: timed out");
            return None;
        }
    };
    r.sent += size as u64;
    let resp = match timeout(OP_TIMEOUT, s.read_exact(resp)).await {
        Ok((Ok(_), b)) => b,
        Ok((Err(e), _)) => {
            r.error(format!("read: {e}"));
            return None;
        }
        Err(_) => {
            r.error("read: no answer within 5 s");
            return None;
        }
    };
    r.received += size as u64;
    if resp[..] != req[..] {
        r.error("echo differs from the request");
        return None;
    }
    Some((req, resp))
}

async fn rr_conn(p: &Plan, size: usize, conn: usize) -> GenResult {
    let mut r = GenResult::new();
    let mut s = match connect(p, true).await {
        Ok(s) => s,
        Err(e) => {
            r.error(e);
            return r;
        }
    };
    let mut req: Vec<u8> = vec![0u8; size];
    let mut resp: Box<[u8]> = vec![0u8; size].into_boxed_slice();
    let mut seq: u64 = conn as u64 * 7919;
    while running(p) {
        seq = seq.wrapping_add(1);
        let start = Instant::now();
        (req, resp) = match echo_once(&mut s, req, resp, seq, &mut r).await {
            Some(bufs) => bufs,
            None => return r,
        };
        let done = Instant::now();
        r.ops_total += 1;
        p.live.ops.fetch_add(1, Ordering::Relaxed);
        if start >= p.t_warm && start < p.t_end {
            r.ops_window += 1;
            r.hist.saturating_record((done - start).as_nanos() as u64);
        }
    }
    if let Err(e) = s.shutdown().await {
        r.error(format!("shutdown(SHUT_WR): {e}"));
        return r;
    }
    match read_to_eof(&mut s).await {
        Ok(0) => {}
        Ok(n) => r.error(format!("{n} unexpected bytes before close")),
        Err(e) => r.error(e),
    }
    r
}

/// Yield once to the other tasks of this thread (monoio has no `yield_now`).
async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// Wait until `due` precisely (the runtime's timer has 1 ms granularity, too coarse for a
/// 200 µs schedule). `alone`: this is the thread's only connection, so a blocking sleep
/// to `SPIN` before `due`, then a spin, holds nothing else up; otherwise sleep on the runtime's
/// timer until ~2 ms before, then yield (to the other connections and, by `sched_yield`, to
/// the kernel) until `due`: a busy wait, and a fallback only — measured, it holds the other
/// connections' answers back by up to the interval, which is why the suite gives each
/// open-loop connection its own thread.
/// The blocking wait's last stretch, spun (above the default 50 µs timer slack).
const SPIN: Duration = Duration::from_micros(80);

async fn wait_until_due(due: Instant, alone: bool) {
    let now = Instant::now();
    if now >= due {
        return;
    }
    if alone {
        // nanosleep may overshoot by the timer slack (50 µs by default): sleep to just
        // before, then spin the rest.
        if due - now > SPIN {
            std::thread::sleep(due - now - SPIN);
        }
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        return;
    }
    let coarse = Duration::from_millis(2);
    if due - now > coarse {
        monoio::time::sleep_until(monoio::time::Instant::from_std(due - coarse)).await;
    }
    while Instant::now() < due {
        // A syscall: returning from it runs the kernel's pending io_uring task work, so the
        // other connections' completions get posted (a pure userspace spin would hold them
        // back until this task sleeps); it also lets a backend thread on this core run.
        std::thread::yield_now();
        yield_once().await;
    }
}

async fn rr_open_conn(p: &Plan, size: usize, interval: Duration, conn: usize) -> GenResult {
    let mut r = GenResult::new();
    let alone = p.conns == 1;
    let mut s = match connect(p, true).await {
        Ok(s) => s,
        Err(e) => {
            r.error(e);
            return r;
        }
    };
    let mut req: Vec<u8> = vec![0u8; size];
    let mut resp: Box<[u8]> = vec![0u8; size].into_boxed_slice();
    let mut seq: u64 = conn as u64 * 7919;
    // Spread this thread's connections over one interval so their sends do not coincide.
    let t0 = Instant::now() + interval.mul_f64(conn as f64 / p.conns.max(1) as f64);
    let mut i: u64 = 0;
    loop {
        let due = t0 + interval.mul_f64(i as f64);
        if due >= p.t_end || p.stop.load(Ordering::Relaxed) {
            break;
        }
        if Instant::now() >= p.t_end {
            // Behind schedule at the end: requests due in the window but never sent. Record
            // each with its wait so far (a lower bound) rather than omit it.
            let now = Instant::now();
            let mut j = i;
            loop {
                let d = t0 + interval.mul_f64(j as f64);
                if d >= p.t_end {
                    break;
                }
                if d >= p.t_warm {
                    r.due_window += 1;
                    r.unsent += 1;
                    r.hist.saturating_record((now - d).as_nanos() as u64);
                }
                j += 1;
            }
            break;
        }
        i += 1;
        wait_until_due(due, alone).await;
        let in_window = due >= p.t_warm;
        if in_window {
            r.due_window += 1;
            if Instant::now() > due + LATE_SLACK {
                r.late += 1;
            }
        }
        seq = seq.wrapping_add(1);
        (req, resp) = match echo_once(&mut s, req, resp, seq, &mut r).await {
            Some(bufs) => bufs,
            None => return r,
        };
        let done = Instant::now();
        r.ops_total += 1;
        p.live.ops.fetch_add(1, Ordering::Relaxed);
        if done >= p.t_warm && done < p.t_end {
            r.done_window += 1;
        }
        if in_window {
            r.ops_window += 1;
            // From the due time, not the send: time spent behind schedule counts.
            r.hist.saturating_record((done - due).as_nanos() as u64);
        }
    }
    if let Err(e) = s.shutdown().await {
        r.error(format!("shutdown(SHUT_WR): {e}"));
        return r;
    }
    match read_to_eof(&mut s).await {
        Ok(0) => {}
        Ok(n) => r.error(format!("{n} unexpected bytes before close")),
        Err(e) => r.error(e),
    }
    r
}

async fn churn_loop(p: &Plan, size: usize, lp: usize) -> GenResult {
    let mut r = GenResult::new();
    let size = size.max(4);
    let mut req: Vec<u8> = vec![0u8; size];
    req[..4].copy_from_slice(&(size as u32).to_be_bytes());
    let mut resp: Box<[u8]> = vec![0u8; size].into_boxed_slice();
    let mut seq: u64 = lp as u64 * 104_729;
    while running(p) {
        seq = seq.wrapping_add(1);
        let tag = seq.to_le_bytes();
        let n = tag.len().min(size - 4);
        req[4..4 + n].copy_from_slice(&tag[..n]);
        let start = Instant::now();
        let mut s = match connect(p, true).await {
            Ok(s) => s,
            Err(e) => {
                r.error(e);
                // Do not spin on a refusing target.
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        match timeout(OP_TIMEOUT, s.write_all(req)).await {
            Ok((Ok(_), b)) => req = b,
            Ok((Err(e), b)) => {
                r.error(format!("write: {e}"));
                req = b;
                continue;
            }
            Err(_) => {
                r.error("write: timed out");
                return r;
            }
        }
        r.sent += size as u64;
        match timeout(OP_TIMEOUT, s.read_exact(resp)).await {
            Ok((Ok(_), b)) => resp = b,
            Ok((Err(e), b)) => {
                r.error(format!("read: {e}"));
                resp = b;
                continue;
            }
            Err(_) => {
                r.error("read: no answer within 5 s");
                return r;
            }
        }
        r.received += size as u64;
        if resp[..] != req[..] {
            r.error("echo differs from the request");
            continue;
        }
        match read_to_eof(&mut s).await {
            Ok(0) => {}
            Ok(n) => {
                r.error(format!("{n} unexpected bytes before close"));
                continue;
            }
            Err(e) => {
                r.error(e);
                continue;
            }
        }
        drop(s);
        let done = Instant::now();
        r.ops_total += 1;
        p.live.ops.fetch_add(1, Ordering::Relaxed);
        if start >= p.t_warm && start < p.t_end {
            r.ops_window += 1;
            r.hist.saturating_record((done - start).as_nanos() as u64);
        }
    }
    r
}

async fn http1_conn(p: &Plan, req_body: usize, resp_body: usize) -> GenResult {
    let mut r = GenResult::new();
    let s = match connect(p, true).await {
        Ok(s) => s,
        Err(e) => {
            r.error(e);
            return r;
        }
    };
    let mut c = crate::http1::Client::new(s, &p.host, &p.headers, req_body, resp_body);
    let want = if req_body > 0 { req_body } else { resp_body } as u64;
    let mut meter = WindowBytes::new(p.t_warm, p.t_end);
    while running(p) {
        let start = Instant::now();
        r.sent += want;
        let res = c
            .exchange_metered(&mut |n| meter.add(Instant::now(), n))
            .await;
        r.window_bytes = meter.bytes;
        match res {
            Ok(x) => r.received += x.body as u64,
            Err(e) => {
                r.error(e);
                return r;
            }
        }
        let done = Instant::now();
        r.ops_total += 1;
        p.live.ops.fetch_add(1, Ordering::Relaxed);
        if start >= p.t_warm && start < p.t_end {
            r.ops_window += 1;
            r.hist.saturating_record((done - start).as_nanos() as u64);
        }
    }
    r
}

/// One idle connection: connect (retrying while the path's accept queue is full), one
/// exchange to prove it is through, idle until the end, one more exchange, close.
async fn idle_conn(
    p: &Plan,
    size: usize,
    conn: usize,
    mut opened: Opened,
    hold: &Hold,
) -> GenResult {
    let mut r = GenResult::new();
    let mut s = match connect(p, false).await {
        Ok(s) => s,
        Err(e) => {
            r.error(e);
            return r;
        }
    };
    let mut req: Vec<u8> = vec![0u8; size];
    let mut resp: Box<[u8]> = vec![0u8; size].into_boxed_slice();
    let start = Instant::now();
    (req, resp) = match echo_once(&mut s, req, resp, conn as u64, &mut r).await {
        Some(b) => b,
        None => return r,
    };
    r.hist.saturating_record(start.elapsed().as_nanos() as u64);
    p.live.ops.fetch_add(1, Ordering::Relaxed);
    opened.done();
    hold.wait().await;
    if echo_once(&mut s, req, resp, conn as u64 + 1, &mut r)
        .await
        .is_none()
    {
        return r;
    }
    if let Err(e) = close_quietly(s).await {
        r.error(e);
        return r;
    }
    r.ops_total += 1;
    r.ops_window += 1;
    r
}

async fn http2_conn(p: &Plan, streams: usize, resp_body: usize) -> GenResult {
    let mut r = GenResult::new();
    let send = match crate::http2::connect(p.target, connect(p, true).await).await {
        Ok(s) => s,
        Err(e) => {
            r.error(e);
            return r;
        }
    };
    let mut loops = Vec::with_capacity(streams);
    for _ in 0..streams.max(1) {
        let mut send = send.clone();
        let p = p.clone();
        loops.push(monoio::spawn(async move {
            let mut r = GenResult::new();
            while running(&p) {
                let start = Instant::now();
                r.sent += resp_body as u64;
                match crate::http2::request(&mut send, &p.host, &p.headers, resp_body).await {
                    Ok(n) => r.received += n as u64,
                    Err(e) => {
                        r.error(e);
                        return r;
                    }
                }
                let done = Instant::now();
                r.ops_total += 1;
                p.live.ops.fetch_add(1, Ordering::Relaxed);
                if start >= p.t_warm && start < p.t_end {
                    r.ops_window += 1;
                    r.hist.saturating_record((done - start).as_nanos() as u64);
                }
            }
            r
        }));
    }
    for l in loops {
        r.merge(&l.await);
    }
    r
}

/// One idle HTTP/1.1 keep-alive connection: connect, one request to prove it is through,
/// idle until the end, one more request, close.
async fn idle_http_conn(p: &Plan, resp_body: usize, mut opened: Opened, hold: &Hold) -> GenResult {
    let mut r = GenResult::new();
    let s = match connect(p, true).await {
        Ok(s) => s,
        Err(e) => {
            r.error(e);
            return r;
        }
    };
    let mut c = crate::http1::Client::new(s, &p.host, &p.headers, 0, resp_body);
    let start = Instant::now();
    for round in 0..2 {
        r.sent += resp_body as u64;
        match c.exchange().await {
            Ok(x) => r.received += x.body as u64,
            Err(e) => {
                r.error(e);
                return r;
            }
        }
        if round == 0 {
            r.hist.saturating_record(start.elapsed().as_nanos() as u64);
            p.live.ops.fetch_add(1, Ordering::Relaxed);
            opened.done();
            hold.wait().await;
        }
    }
    // Best effort: an HTTP proxy need not close on a client's half-close at once.
    let _ = close_quietly(c.s).await;
    r.ops_total += 1;
    r.ops_window += 1;
    r
}

/// slow-reader: write to the stall backend (which does not read until the harness releases
/// it) until told to stop; every chunk's write waits as long as it takes. Then half-close
/// and compare the backend's count with what was written. `live.ops` counts connections up,
/// `live.bytes_sent` the bytes written so far (the harness waits until it stops growing).
async fn slow_writer_conn(p: &Plan, write_size: usize) -> GenResult {
    use std::os::fd::AsRawFd;
    let mut r = GenResult::new();
    let mut s = match connect(p, false).await {
        Ok(s) => s,
        Err(e) => {
            r.error(e);
            return r;
        }
    };
    let _ = runtime::sys::with_sockref(s.as_raw_fd(), |r| {
        r.set_send_buffer_size(SLOW_SOCKET_BUFFER)
    });
    p.live.ops.fetch_add(1, Ordering::Relaxed);
    // The backend stays stalled for as long as the harness measures (bounded by its own
    // deadline); a write blocked longer than this is a failure.
    let bounds = (
        Duration::from_secs(120),
        "write: stalled beyond the stall's bound",
        Duration::from_secs(30),
    );
    let keep_going = || !p.stop.load(Ordering::Relaxed);
    if !send_then_check_count(&mut s, p, &mut r, write_size, keep_going, bounds, "backend").await {
        return r;
    }
    r.ops_total += 1;
    r.ops_window += 1;
    r
}

/// Open-loop requests waiting for a free connection, shared by one thread's tasks.
#[derive(Default)]
struct DueQueue {
    due: std::collections::VecDeque<Instant>,
    waiters: Vec<std::task::Waker>,
    closed: bool,
}

type SharedQueue = std::rc::Rc<std::cell::RefCell<DueQueue>>;

fn wake_all(q: &SharedQueue) {
    let w = std::mem::take(&mut q.borrow_mut().waiters);
    for w in w {
        w.wake();
    }
}

/// The next request due, or `None` once the schedule has ended and the queue is empty.
async fn next_due(q: &SharedQueue) -> Option<Instant> {
    std::future::poll_fn(|cx| {
        let mut s = q.borrow_mut();
        if let Some(d) = s.due.pop_front() {
            std::task::Poll::Ready(Some(d))
        } else if s.closed {
            std::task::Poll::Ready(None)
        } else {
            s.waiters.push(cx.waker().clone());
            std::task::Poll::Pending
        }
    })
    .await
}

/// Open-loop HTTP/1.1 (`http1-open`), as wrk2 measures: one schedule per generator thread,
/// request `i` due at `t_first + i × interval`; each due request goes to the next free
/// keep-alive connection (`p.conns` of them), or waits in a queue while all are busy; its
/// latency is completion − due time, so waiting behind a slow answer counts
/// (coordinated-omission correction).
///
/// Pacing: the runtime's timer has 1 ms granularity, too coarse for a 67 µs schedule, so a
/// ticker thread (same CPUs) waits for each due time on a timerfd (an hrtimer without the
/// 50 µs timer slack of `nanosleep`) and wakes the dispatcher task through a socket pair;
/// the dispatcher queues every request due by then.
/// A late wake-up (the CPU's halt exit, a busy core) is counted in the latency, as it would
/// be for a real client. At the window's end, requests still queued are recorded with their
/// wait so far (a lower bound) as `unsent`.
async fn http1_open(p: Plan, resp_body: usize, interval: Duration) -> GenResult {
    let mut r = GenResult::new();
    let mut clients = Vec::with_capacity(p.conns);
    for _ in 0..p.conns {
        match connect(&p, true).await {
            Ok(s) => clients.push(crate::http1::Client::new(
                s, &p.host, &p.headers, 0, resp_body,
            )),
            Err(e) => {
                r.error(e);
                return r;
            }
        }
    }
    let (tick_tx, tick_rx) = match std::os::unix::net::UnixStream::pair() {
        Ok(x) => x,
        Err(e) => {
            r.error(format!("socket pair: {e}"));
            return r;
        }
    };
    let _ = tick_tx.set_nonblocking(true);
    let mut rx = match monoio::net::UnixStream::from_std(tick_rx) {
        Ok(x) => x,
        Err(e) => {
            r.error(format!("socket pair: {e}"));
            return r;
        }
    };
    let t_first = Instant::now() + Duration::from_millis(1);
    let (t_end, stop) = (p.t_end, p.stop.clone());
    let due_at = move |i: u64| t_first + interval.mul_f64(i as f64);
    let ticker = std::thread::Builder::new()
        .name("bench-gen-tick".into())
        .spawn(move || {
            use nix::sys::time::TimeSpec;
            use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
            let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC).ok();
            let mut tx = tick_tx;
            let mut i: u64 = 0;
            loop {
                let due = due_at(i);
                if due >= t_end || stop.load(Ordering::Relaxed) {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    let armed = timer.as_ref().is_some_and(|t| {
                        t.set(
                            Expiration::OneShot(TimeSpec::from_duration(due - now)),
                            TimerSetTimeFlags::empty(),
                        )
                        .and_then(|()| t.wait())
                        .is_ok()
                    });
                    if !armed {
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                }
                // One byte wakes the dispatcher; a full pair means it is awake already.
                let _ = std::io::Write::write(&mut tx, &[1u8]);
                // Behind schedule: the dispatcher queues every request due by now anyway.
                let now = Instant::now();
                i += 1;
                while due_at(i) < now {
                    i += 1;
                }
            }
            // Close at the window's end: the dispatcher then records what is still queued.
            while Instant::now() < t_end && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(
                    t_end
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50)),
                );
            }
        });
    if let Err(e) = ticker {
        r.error(format!("ticker thread: {e}"));
        return r;
    }
    let q: SharedQueue = Default::default();
    let mut workers = Vec::with_capacity(clients.len());
    for mut c in clients {
        let q = q.clone();
        let p = p.clone();
        workers.push(monoio::spawn(async move {
            let mut r = GenResult::new();
            while let Some(due) = next_due(&q).await {
                let in_window = due >= p.t_warm && due < p.t_end;
                if in_window && Instant::now() > due + LATE_SLACK {
                    r.late += 1;
                }
                r.sent += resp_body as u64;
                match c.exchange().await {
                    Ok(x) => r.received += x.body as u64,
                    Err(e) => {
                        r.error(e);
                        return r;
                    }
                }
                let done = Instant::now();
                r.ops_total += 1;
                p.live.ops.fetch_add(1, Ordering::Relaxed);
                if done >= p.t_warm && done < p.t_end {
                    r.done_window += 1;
                }
                if in_window {
                    r.ops_window += 1;
                    r.hist.saturating_record((done - due).as_nanos() as u64);
                }
            }
            r
        }));
    }
    // Dispatcher: on each tick, queue every request due by now.
    let mut next: u64 = 0;
    let mut buf: Vec<u8> = vec![0u8; 256];
    loop {
        let now = Instant::now();
        let mut queued = false;
        while next_due_time(t_first, interval, next) <= now
            && next_due_time(t_first, interval, next) < p.t_end
        {
            let due = next_due_time(t_first, interval, next);
            if due >= p.t_warm {
                r.due_window += 1;
            }
            q.borrow_mut().due.push_back(due);
            queued = true;
            next += 1;
        }
        if queued {
            wake_all(&q);
        }
        if p.stop.load(Ordering::Relaxed) {
            break;
        }
        let (res, b) = rx.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // The schedule has ended: whatever is still queued was never sent.
    let now = Instant::now();
    {
        let mut s = q.borrow_mut();
        for due in s.due.drain(..) {
            if due >= p.t_warm {
                r.unsent += 1;
                r.hist.saturating_record((now - due).as_nanos() as u64);
            }
        }
        s.closed = true;
    }
    wake_all(&q);
    for w in workers {
        r.merge(&w.await);
    }
    r
}

fn next_due_time(t_first: Instant, interval: Duration, i: u64) -> Instant {
    t_first + interval.mul_f64(i as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A constructed `large-body` timeline (no clocks read): `conns` connections in step, each
    /// exchange `exchange` long moving `2 × body` bytes in `pieces` equal pieces evenly spread
    /// over it, the first exchanges starting at `offset` after `t0`. Returns (bytes counted by
    /// [`WindowBytes`], whole exchanges started in the window) for a window `warm..warm+win`.
    fn timeline(
        t0: Instant,
        offset: Duration,
        exchange: Duration,
        warm: Duration,
        win: Duration,
    ) -> (u64, u64) {
        let (conns, body, pieces) = (64u64, 1u64 << 20, 32u64);
        let (t_warm, t_end) = (t0 + warm, t0 + warm + win);
        let mut meter = WindowBytes::new(t_warm, t_end);
        let mut started = 0;
        for _ in 0..conns {
            let mut start = t0 + offset;
            // The generator finishes the exchange running when the window ends.
            while start < t_end {
                if start >= t_warm {
                    started += 1;
                }
                for i in 1..=pieces {
                    let at = start + exchange.mul_f64(i as f64 / pieces as f64);
                    meter.add(at, (2 * body / pieces) as usize);
                }
                start += exchange;
            }
        }
        (meter.bytes, started)
    }

    #[test]
    fn window_bytes_count_pieces_by_completion_inside_the_window_only() {
        let t0 = Instant::now();
        let mut m = WindowBytes::new(
            t0 + Duration::from_millis(200),
            t0 + Duration::from_millis(800),
        );
        m.add(t0, 1);
        m.add(t0 + Duration::from_millis(199), 2);
        m.add(t0 + Duration::from_millis(200), 4);
        m.add(t0 + Duration::from_millis(799), 8);
        m.add(t0 + Duration::from_millis(800), 16);
        m.add(t0 + Duration::from_secs(5), 32);
        assert_eq!(m.bytes, 4 + 8);
    }

    #[test]
    fn large_body_window_bytes_do_not_depend_on_the_exchanges_phase() {
        // 0.4 s exchanges in a 0.6 s window (the default length): the true
        // rate is 64 × 2 MiB per 0.4 s. Counting whole exchanges by start gives 64 or 128
        // exchanges (±33 %) depending on where the exchanges fall; bytes by completion stay
        // within one piece (64 KiB) per connection at each edge of the truth.
        let t0 = Instant::now();
        let exchange = Duration::from_millis(400);
        // The constructed flow starts a whole exchange before the window (offsets cover one
        // exchange), as a run's connections are busy when its window opens.
        let (warm, win) = (Duration::from_millis(1000), Duration::from_millis(600));
        let truth = 64.0 * 2.0 * (1u64 << 20) as f64 * win.as_secs_f64() / exchange.as_secs_f64();
        let piece = 2.0 * (1u64 << 20) as f64 / 32.0;
        let mut by_start = Vec::new();
        for step in 0..40u32 {
            let offset = Duration::from_millis(10) * step;
            let (bytes, started) = timeline(t0, offset, exchange, warm, win);
            let err = (bytes as f64 - truth).abs();
            assert!(
                err <= 64.0 * piece,
                "offset {offset:?}: {bytes} bytes counted, {truth} moved (error {err})"
            );
            by_start.push(started);
        }
        // The old count really is quantised on this timeline (what the meter replaces).
        let (lo, hi) = (
            *by_start.iter().min().unwrap(),
            *by_start.iter().max().unwrap(),
        );
        assert_eq!((lo, hi), (64, 128), "exchanges started in the window");
    }
}
