//! Helpers shared by the runtime's integration tests: checksummed streams, plain std-thread
//! backends, an in-process forwarder wrapper, the `l4fwd` process wrapper, and the
//! "for each driver / mode" runners. Every wait is bounded by [`TIMEOUT`] (or a caller's
//! bound) and fails the test when it runs out; nothing depends on how fast anything is.
#![allow(dead_code)]

use std::cell::RefCell;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use runtime::forwarder::{self, ForwarderConfig, Handle, ListenerConfig};
use runtime::stats::WorkerStats;
use runtime::{DriverChoice, DriverKind, ForwardMode, Shutdown};

/// Generous bound for any single wait (a read, a connection, a process, a counter).
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

pub const DRIVERS: [DriverChoice; 2] = [DriverChoice::Uring, DriverChoice::Epoll];
pub const MODES: [ForwardMode; 2] = [ForwardMode::Copy, ForwardMode::Splice];

pub fn driver_arg(d: DriverChoice) -> &'static str {
    match d {
        DriverChoice::Uring => "uring",
        DriverChoice::Epoll => "epoll",
        DriverChoice::Auto => "auto",
    }
}

pub fn mode_arg(m: ForwardMode) -> &'static str {
    match m {
        ForwardMode::Copy => "copy",
        ForwardMode::Splice => "splice",
    }
}

pub fn expected_kind(d: DriverChoice) -> DriverKind {
    match d {
        DriverChoice::Epoll => DriverKind::Epoll,
        _ => DriverKind::Uring,
    }
}

/// Run `body` once per io driver.
pub fn for_each_driver(mut body: impl FnMut(DriverChoice)) {
    for d in DRIVERS {
        eprintln!("--- driver {}", driver_arg(d));
        body(d);
    }
}

/// Run `body` once per (io driver, forward mode).
pub fn for_each_driver_and_mode(mut body: impl FnMut(DriverChoice, ForwardMode)) {
    for d in DRIVERS {
        for m in MODES {
            eprintln!("--- driver {} mode {}", driver_arg(d), mode_arg(m));
            body(d, m);
        }
    }
}

// ---------------------------------------------------------------------------------------
// root / CI

/// Effective uid of this process, from /proc (no `unsafe` outside the runtime's src).
pub fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// checksummed byte streams

/// Streaming 64-bit checksum over 8-byte words (independent of how the stream is chunked),
/// order-sensitive, with the length folded in at the end.
#[derive(Clone, Default)]
pub struct Sum64 {
    h: u64,
    len: u64,
    tail: [u8; 8],
    tail_len: usize,
}

impl Sum64 {
    pub fn new() -> Self {
        Sum64 {
            h: 0xcbf2_9ce4_8422_2325,
            ..Default::default()
        }
    }

    #[inline]
    fn mix(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(23);
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < 8 {
                return;
            }
            let w = u64::from_le_bytes(self.tail);
            self.mix(w);
            self.tail_len = 0;
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let rest = chunks.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// (length, checksum).
    pub fn finish(&self) -> (u64, u64) {
        let mut s = self.clone();
        if s.tail_len > 0 {
            let mut t = [0u8; 8];
            t[..s.tail_len].copy_from_slice(&s.tail[..s.tail_len]);
            s.mix(u64::from_le_bytes(t));
        }
        s.mix(s.len);
        (s.len, s.h)
    }
}

/// A pseudo-random pattern of a length that is no multiple of any chunk size, so a lost,
/// repeated or reordered chunk changes the checksum.
pub fn pattern(seed: u64) -> Arc<Vec<u8>> {
    const LEN: usize = (1 << 20) + 4093;
    let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    let mut v = Vec::with_capacity(LEN * 2);
    while v.len() < LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(LEN);
    // Doubled, so any window of up to LEN bytes is one contiguous slice.
    let copy = v.clone();
    v.extend_from_slice(&copy);
    Arc::new(v)
}

/// Write `total` bytes of `seed`'s pattern in chunks of up to `chunk`; returns the checksum
/// of what was written. `progress` counts bytes written so far.
pub fn send_stream(
    w: &mut impl Write,
    seed: u64,
    total: u64,
    chunk: usize,
    progress: Option<&AtomicU64>,
) -> io::Result<(u64, u64)> {
    let pat = pattern(seed);
    let period = pat.len() / 2;
    let mut sum = Sum64::new();
    let mut off = 0usize;
    let mut left = total;
    while left > 0 {
        let n = (chunk as u64).min(left) as usize;
        let buf = &pat[off..off + n];
        w.write_all(buf)?;
        sum.update(buf);
        off = (off + n) % period;
        left -= n as u64;
        if let Some(p) = progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    w.flush()?;
    Ok(sum.finish())
}

/// Read until EOF; returns (length, checksum). An error (a reset included) is returned as is.
pub fn recv_stream(r: &mut impl Read) -> io::Result<(u64, u64)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sum = Sum64::new();
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(sum.finish()),
            Ok(n) => sum.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The checksum `send_stream(seed, total)` produces, computed without a socket.
pub fn expected_sum(seed: u64, total: u64) -> (u64, u64) {
    send_stream(&mut io::sink(), seed, total, 1 << 20, None).unwrap()
}

// ---------------------------------------------------------------------------------------
// sockets

pub fn with_timeouts(s: TcpStream) -> TcpStream {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    with_timeouts(s)
}

/// Read until EOF or error; returns what was read and how it ended.
pub fn read_to_end_or_error(s: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return (out, Err(e)),
        }
    }
}

/// Poll `cond` every few milliseconds until it holds, for at most `bound`; panics with `what`
/// (and the last observed value) when it never does.
pub fn wait_until<T: std::fmt::Debug>(
    what: &str,
    bound: Duration,
    mut probe: impl FnMut() -> T,
    mut cond: impl FnMut(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let v = probe();
        if cond(&v) {
            return v;
        }
        if start.elapsed() > bound {
            panic!("timed out after {bound:?} waiting for {what}; last value {v:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Join a thread, failing the test if it does not finish within `bound` or panicked.
pub fn join_bounded<T: Send + 'static>(h: JoinHandle<T>, what: &str, bound: Duration) -> T {
    let start = Instant::now();
    while !h.is_finished() {
        if start.elapsed() > bound {
            panic!("{what} did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// A listener on 127.0.0.1 with a port of its own and a large backlog (std's `bind` listens
/// with 128, which bursts of thousands of connections overflow: dropped SYNs then wait for
/// retransmission, seconds each).
pub fn listen_local() -> TcpListener {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.set_reuse_address(true).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    s.bind(&SockAddr::from(addr)).unwrap();
    s.listen(4096).unwrap();
    s.into()
}

// ---------------------------------------------------------------------------------------
// backends (plain std threads)

/// A listener whose accept loop runs `handler` on its own thread per connection.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    pub fn start<F>(handler: F) -> Backend
    where
        F: Fn(TcpStream, u64) + Send + Sync + 'static,
    {
        let l = listen_local();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = Arc::new(handler);
        let (acc, st) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(c) = conn else { continue };
                let n = acc.fetch_add(1, Ordering::SeqCst);
                let h = handler.clone();
                std::thread::spawn(move || h(with_timeouts(c), n));
            }
        });
        Backend {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Echo every byte back; shut down the write side at EOF.
    pub fn echo() -> Backend {
        Backend::start(|mut s, _| {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        let _ = s.shutdown(NetShutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        })
    }

    /// Say `tag` first, then echo.
    pub fn tagged_echo(tag: u8) -> Backend {
        Backend::start(move |mut s, _| {
            if s.write_all(&[tag]).is_err() {
                return;
            }
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        let _ = s.shutdown(NetShutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        })
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// in-process forwarder

pub fn config(
    driver: DriverChoice,
    mode: ForwardMode,
    workers: usize,
    upstreams: &[SocketAddr],
) -> ForwarderConfig {
    let mut cfg = ForwarderConfig {
        runtime: Default::default(),
        admin: None,
        listeners: upstreams
            .iter()
            .map(|u| ListenerConfig {
                name: None,
                listen: "127.0.0.1:0".parse().unwrap(),
                upstream: *u,
            })
            .collect(),
    };
    cfg.runtime.io_driver = driver;
    cfg.runtime.forward.mode = mode;
    cfg.runtime.workers = Some(workers);
    cfg.runtime.drain_timeout = Duration::from_secs(5);
    cfg
}

/// An in-process forwarder; drained and joined (bounded) on drop.
pub struct Fwd {
    handle: Option<Handle>,
}

impl Fwd {
    pub fn start(cfg: ForwarderConfig) -> Fwd {
        let driver = cfg.runtime.io_driver;
        let workers = cfg.runtime.workers;
        let handle = forwarder::start(cfg, Shutdown::new(), None).expect("forwarder starts");
        // Make sure the test runs on the driver it names (MESH_IO_DRIVER could override it).
        let want = expected_kind(driver);
        assert!(
            handle.workers().drivers().iter().all(|k| *k == want),
            "asked for {driver:?}, workers run {:?}",
            handle.workers().drivers()
        );
        if let Some(n) = workers {
            assert_eq!(handle.workers().len(), n);
        }
        Fwd {
            handle: Some(handle),
        }
    }

    pub fn handle(&self) -> &Handle {
        self.handle.as_ref().unwrap()
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle().local_addrs()[0]
    }

    pub fn stats(&self) -> &[Arc<WorkerStats>] {
        self.handle().stats()
    }

    /// Sum of one counter over all workers.
    pub fn sum(&self, field: fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.stats()
            .iter()
            .map(|s| field(s).load(Ordering::Relaxed))
            .sum()
    }

    /// Per-worker values of one counter.
    pub fn per_worker(&self, field: fn(&WorkerStats) -> &AtomicU64) -> Vec<u64> {
        self.stats()
            .iter()
            .map(|s| field(s).load(Ordering::Relaxed))
            .collect()
    }

    /// Wait until every accepted connection has been closed by the forwarder.
    pub fn wait_idle(&self) {
        wait_until(
            "every forwarded connection to close",
            TIMEOUT,
            || {
                (
                    self.sum(|s| &s.accepted),
                    self.sum(|s| &s.closed),
                    self.sum(|s| &s.active),
                )
            },
            |(a, c, act)| a == c && *act == 0,
        );
    }

    /// Drain and join, failing if the workers do not return within `bound`.
    pub fn stop_within(mut self, bound: Duration) {
        let h = self.handle.take().unwrap();
        h.drain();
        let t = std::thread::spawn(move || h.join());
        join_bounded(t, "forwarder drain + join", bound).expect("workers exit cleanly");
    }
}

impl Drop for Fwd {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.drain();
            let t = std::thread::spawn(move || h.join());
            let start = Instant::now();
            while !t.is_finished() && start.elapsed() < TIMEOUT {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !std::thread::panicking() {
                assert!(t.is_finished(), "forwarder did not stop within {TIMEOUT:?}");
                t.join().unwrap().expect("workers exit cleanly");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// the l4fwd process

pub struct Proc {
    pub child: Child,
    pub listen: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub ready_line: String,
    stderr_lines: mpsc::Receiver<String>,
    stderr: RefCell<String>,
    stderr_thread: Option<JoinHandle<()>>,
}

pub fn write_config(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p
}

/// A fresh directory for one test's files, removed on drop.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(test: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("runtime-tests-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

pub fn l4fwd_command(
    config: &Path,
    driver: Option<DriverChoice>,
    mode: Option<ForwardMode>,
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_l4fwd"));
    c.arg("--config").arg(config);
    if let Some(d) = driver {
        c.args(["--io-driver", driver_arg(d)]);
    }
    if let Some(m) = mode {
        c.args(["--mode", mode_arg(m)]);
    }
    c.env_remove("MESH_IO_DRIVER")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    c
}

/// Run l4fwd to completion (for start-up failures); returns (status, stderr).
pub fn run_l4fwd_to_exit(config: &Path, driver: Option<DriverChoice>) -> (ExitStatus, String) {
    let mut child = l4fwd_command(config, driver, None)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn l4fwd");
    let mut err = child.stderr.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_exit(&mut child, TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("l4fwd did not exit within {TIMEOUT:?}");
    });
    (status, join_bounded(t, "stderr reader", TIMEOUT))
}

/// Wait for a child to exit, at most `bound`.
pub fn wait_exit(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > bound {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Proc {
    /// Start l4fwd and wait for its READY line.
    pub fn start(config: &Path, driver: DriverChoice, mode: Option<ForwardMode>) -> Proc {
        Self::start_command(l4fwd_command(config, Some(driver), mode), driver)
    }

    /// Start `cmd` (l4fwd, possibly behind a wrapper such as `setpriv`) and wait for its
    /// READY line; `driver` is the one it was asked for.
    pub fn start_command(mut cmd: Command, driver: DriverChoice) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn l4fwd");
        let err = child.stderr.take().unwrap();
        let (line_tx, stderr_lines) = mpsc::channel();
        let stderr_thread = std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let _ = line_tx.send(line);
            }
        });
        let stderr = RefCell::new(String::new());
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            // Keep draining stdout so the child never blocks on it.
            for _ in lines {}
        });
        let ready_line = match rx.recv_timeout(TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let mut text = String::new();
                while let Ok(l) = stderr_lines.recv_timeout(Duration::from_secs(1)) {
                    text.push_str(&l);
                    text.push('\n');
                }
                panic!("l4fwd printed no READY line within {TIMEOUT:?}; stderr:\n{text}");
            }
        };
        assert!(ready_line.starts_with("READY "), "{ready_line}");
        let field = |name: &str| {
            ready_line
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
        };
        let want = match expected_kind(driver) {
            DriverKind::Uring => "io_uring",
            DriverKind::Epoll => "epoll",
        };
        assert_eq!(field("driver").as_deref(), Some(want), "{ready_line}");
        let listen = field("listen")
            .expect("listen=")
            .split(',')
            .map(|a| a.parse().unwrap())
            .collect();
        let admin = field("admin").map(|a| a.parse().unwrap());
        Proc {
            child,
            listen,
            admin,
            ready_line,
            stderr_lines,
            stderr,
            stderr_thread: Some(stderr_thread),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal l4fwd");
    }

    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Everything l4fwd has written to stderr so far.
    pub fn stderr(&self) -> String {
        let mut s = self.stderr.borrow_mut();
        while let Ok(l) = self.stderr_lines.try_recv() {
            s.push_str(&l);
            s.push('\n');
        }
        s.clone()
    }

    /// Wait for exit (bounded); panics with stderr if it does not.
    pub fn wait(&mut self, bound: Duration) -> ExitStatus {
        match wait_exit(&mut self.child, bound) {
            Some(s) => {
                if let Some(t) = self.stderr_thread.take() {
                    join_bounded(t, "stderr reader", TIMEOUT);
                }
                s
            }
            None => panic!(
                "l4fwd did not exit within {bound:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Open descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// GET /stats from the admin endpoint.
    pub fn admin_stats(&self) -> String {
        let addr = self.admin.expect("admin endpoint configured");
        let mut s = connect(addr);
        s.write_all(b"GET /stats HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let (body, _) = read_to_end_or_error(&mut s);
        String::from_utf8(body).unwrap()
    }

    /// One per-worker counter from /stats: values by worker index.
    pub fn admin_counter(&self, name: &str) -> Vec<u64> {
        parse_counter(&self.admin_stats(), name)
    }
}

pub fn parse_counter(text: &str, name: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&format!("{name}{{worker=\"")) {
            let (w, v) = rest.split_once("\"} ").unwrap();
            let w: usize = w.parse().unwrap();
            if out.len() <= w {
                out.resize(w + 1, 0);
            }
            out[w] = v.trim().parse().unwrap();
        }
    }
    out
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Is `addr` refusing connections now?
pub fn refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// A writer that stops once `at` bytes have gone through it: it reports that on `reached`
/// and waits for `go` before writing more.
pub struct GatedWriter<W> {
    pub inner: W,
    pub written: u64,
    pub at: u64,
    pub reached: Option<mpsc::Sender<()>>,
    pub go: mpsc::Receiver<()>,
}

impl<W: Write> Write for GatedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written >= self.at {
            if let Some(r) = self.reached.take() {
                let _ = r.send(());
                self.go
                    .recv_timeout(TIMEOUT)
                    .map_err(|_| io::Error::other("gate never opened"))?;
            }
        }
        let limit = if self.reached.is_some() {
            ((self.at - self.written) as usize).min(buf.len())
        } else {
            buf.len()
        };
        let n = self.inner.write(&buf[..limit])?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
