//! An HBONE stream as a byte stream, and the bridge between it and a TCP socket.
//!
//! Half-close maps to `END_STREAM` each way; a TCP reset maps to `RST_STREAM(CONNECT_ERROR)`
//! and an `RST_STREAM` to a TCP reset (RFC 9113 §8.5). DATA is sent only within the peer's
//! flow-control window (no unbounded buffering in h2), and received data releases window
//! only once written to the socket.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use monoio::net::TcpStream;
use runtime::forward::{drive, DirEnd, End, Outcome, Side};

/// Decrements a counter when the stream ends (pool accounting).
pub struct StreamGuard(Option<Box<dyn FnOnce()>>);

impl StreamGuard {
    pub fn new(f: impl FnOnce() + 'static) -> Self {
        StreamGuard(Some(Box::new(f)))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f()
        }
    }
}

/// One established CONNECT stream.
pub struct H2Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub(crate) _guard: Option<StreamGuard>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            _guard: None,
        }
    }

    /// Send `data` respecting flow control; `end` closes our half.
    pub async fn write_all(&mut self, data: Bytes, end: bool) -> Result<(), h2::Error> {
        send_all(&mut self.send, data, end).await
    }

    /// Next non-empty chunk from the peer (`None` at END_STREAM); releases its window.
    pub async fn read(&mut self) -> Option<Result<Bytes, h2::Error>> {
        read_nonempty(&mut self.recv).await
    }

    /// Abort the stream with RST_STREAM.
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason)
    }
}

/// Next non-empty DATA (an END_STREAM may come in an empty frame), window released.
async fn read_nonempty(recv: &mut RecvStream) -> Option<Result<Bytes, h2::Error>> {
    loop {
        match recv.data().await {
            Some(Ok(b)) if b.is_empty() => continue,
            Some(Ok(b)) => {
                let _ = recv.flow_control().release_capacity(b.len());
                return Some(Ok(b));
            }
            other => return other,
        }
    }
}

/// The sending half of a split [`H2Stream`].
pub struct H2Writer {
    send: SendStream<Bytes>,
    _guard: Option<StreamGuard>,
}

impl H2Writer {
    pub async fn write_all(&mut self, data: Bytes, end: bool) -> Result<(), h2::Error> {
        send_all(&mut self.send, data, end).await
    }
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason)
    }
}

/// The receiving half of a split [`H2Stream`].
pub struct H2Reader {
    recv: RecvStream,
}

impl H2Reader {
    pub async fn read(&mut self) -> Option<Result<Bytes, h2::Error>> {
        read_nonempty(&mut self.recv).await
    }
}

impl H2Stream {
    /// Separate halves, to send and receive from two tasks or futures.
    pub fn split(self) -> (H2Writer, H2Reader) {
        (
            H2Writer {
                send: self.send,
                _guard: self._guard,
            },
            H2Reader { recv: self.recv },
        )
    }
}

pub(crate) async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(cap)) => {
                let chunk = data.split_to(cap.min(data.len()));
                let last = end && data.is_empty();
                send.send_data(chunk, last)?;
                if last {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(Reason::STREAM_CLOSED)),
        }
    }
    if end {
        send.send_data(Bytes::new(), true)?;
    }
    Ok(())
}

fn h2_err(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| std::io::Error::other("h2 io"))
    } else {
        std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
    }
}

/// The first full-size read from a TCP socket; reads grow to the configured chunk size.
const MIN_READ: usize = 16 * 1024;

/// The read after a readiness wait (the socket was drained before) goes into the worker's
/// scratch buffer of this size and its bytes are copied out: a direction holds no buffer
/// while it waits, and a message up to this size takes one `recv`. A read that fills it
/// continues with full-size reads into buffers of the direction's own, handed to h2
/// without a copy.
const FIRST_READ: usize = MIN_READ;

// Bytes a direction moves without waiting (for readiness, h2 data or h2 capacity) before it
// yields to the worker's other tasks: the budget of `runtime::forward`'s directions.
use runtime::forward::BUDGET;

thread_local! {
    /// The worker's buffer for first reads (see [`FIRST_READ`]); filled and emptied within
    /// one synchronous `recv`, so one per thread serves all of its streams.
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// The read buffers of one TCP → stream direction. After a readiness wait, a read goes
/// into the worker's scratch buffer ([`FIRST_READ`]); reads that fill their buffer go on
/// into full-size buffers that double while they fill (bulk transfers make few, large
/// DATA frames); a read that comes back short drained the socket: the full-size buffer is
/// let go and the direction waits for readiness, holding no buffer (nginx and HAProxy
/// likewise hold a buffer only while data moves).
struct ReadBufs {
    min: usize,
    max: usize,
    /// The size of the next full-size read.
    size: usize,
    /// The socket was drained (or nothing was read yet): wait for readiness, then read
    /// into the scratch buffer.
    drained: bool,
    /// Full-size buffer, kept only from a read that filled it to the next read.
    big: BytesMut,
}

impl ReadBufs {
    fn new(chunk: usize) -> Self {
        let max = chunk.max(1);
        let min = MIN_READ.min(max);
        ReadBufs {
            min,
            max,
            size: min,
            drained: true,
            big: BytesMut::new(),
        }
    }

    /// Whether the next read should wait for readiness first.
    fn drained(&self) -> bool {
        self.drained
    }

    /// One read: `recv(buf, max)` appends at most `max` bytes to `buf` (empty on entry) and
    /// returns how many. The bytes read, empty at end of stream. `WouldBlock` marks the
    /// socket drained.
    fn read(
        &mut self,
        recv: impl FnOnce(&mut BytesMut, usize) -> io::Result<usize>,
    ) -> io::Result<Bytes> {
        if self.drained {
            let want = FIRST_READ.min(self.max);
            let (n, data) = SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                s.clear();
                s.reserve(want);
                let r = recv(&mut s, want);
                let data = match r {
                    Ok(n) => Bytes::copy_from_slice(&s[..n]),
                    Err(_) => Bytes::new(),
                };
                s.clear();
                r.map(|n| (n, data))
            })?;
            // A full read: more is probably queued, read it at once, full-size.
            self.drained = n < want;
            return Ok(data);
        }
        let mut buf = std::mem::take(&mut self.big);
        buf.reserve(self.size);
        // The buffer is empty: all of its capacity is offered (it may be more than
        // `size`: what is left of an earlier one).
        let want = buf.capacity();
        let n = match recv(&mut buf, want) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.drained = true;
                } else {
                    self.big = buf;
                }
                return Err(e);
            }
        };
        self.size = if n >= self.size {
            (self.size * 2).min(self.max)
        } else if n < self.size / 4 {
            (self.size / 2).max(self.min)
        } else {
            self.size
        };
        let data = buf.split().freeze();
        if n == want && n > 0 {
            // The socket may hold more: read again at once, into what is left of this one.
            self.big = buf;
        } else {
            // Drained: hold no buffer while waiting for the next bytes.
            self.drained = true;
        }
        Ok(data)
    }

    /// Bytes of buffer this direction holds between reads.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.big.capacity()
    }
}

/// Yield to the worker's other tasks once `*budget` bytes moved without a wait.
async fn spend(budget: &mut usize, n: usize) {
    *budget = budget.saturating_sub(n);
    if *budget == 0 {
        *budget = BUDGET;
        runtime::worker::yield_now().await;
    }
}

/// TCP → stream. Readiness comes from the ring (a poll), the bytes with non-blocking
/// `recv`: a message costs one poll and a plain syscall, not a `recv` through the ring
/// and the `io_uring_enter` it takes before the task goes on. After a short read the
/// socket was drained and the next read waits for readiness (no `recv` that only says
/// `EAGAIN`); after a full read it reads again at once.
async fn tcp_to_h2(
    tcp: &TcpStream,
    send: &mut SendStream<Bytes>,
    chunk: usize,
    count: &Cell<u64>,
) -> DirEnd {
    let fd = tcp.as_raw_fd();
    let mut bufs = ReadBufs::new(chunk);
    let mut budget = BUDGET;
    loop {
        if bufs.drained() {
            budget = BUDGET;
            if let Err(e) = tcp.readable(false).await {
                return DirEnd::ReadFailed(e);
            }
        }
        match bufs.read(|buf, max| runtime::sys::recv_spare(fd, buf, max)) {
            Ok(data) if data.is_empty() => {
                return match send.send_data(Bytes::new(), true) {
                    Ok(()) => DirEnd::Eof,
                    Err(e) => DirEnd::WriteFailed(h2_err(e)),
                }
            }
            Ok(data) => {
                let n = data.len();
                if let Err(e) = send_all(send, data, false).await {
                    return DirEnd::WriteFailed(h2_err(e));
                }
                count.set(count.get() + n as u64);
                spend(&mut budget, n).await;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return DirEnd::ReadFailed(e),
        }
    }
}

/// Stream → TCP, with non-blocking `send`s (see [`tcp_to_h2`]); a DATA frame's window is
/// released once all of it is in the socket.
async fn h2_to_tcp(recv: &mut RecvStream, tcp: &TcpStream, count: &Cell<u64>) -> DirEnd {
    let mut budget = BUDGET;
    loop {
        let mut waited = false;
        let next = poll_fn(|cx| {
            let p = recv.poll_data(cx);
            waited |= p.is_pending();
            p
        })
        .await;
        if waited {
            budget = BUDGET;
        }
        match next {
            Some(Ok(data)) if data.is_empty() => {}
            Some(Ok(data)) => {
                let n = data.len();
                if let Err(e) = runtime::forward::send_all(tcp, &data).await {
                    return DirEnd::WriteFailed(e);
                }
                let _ = recv.flow_control().release_capacity(n);
                count.set(count.get() + n as u64);
                spend(&mut budget, n).await;
            }
            Some(Err(e)) => return DirEnd::ReadFailed(h2_err(e)),
            None => {
                return match runtime::sys::shutdown_write(tcp.as_raw_fd()) {
                    Ok(()) => DirEnd::Eof,
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => DirEnd::Eof,
                    Err(e) => DirEnd::WriteFailed(e),
                }
            }
        }
    }
}

/// Move bytes between `tcp` (the "downstream" side of the outcome) and `stream` (the
/// "upstream" side) until both halves close, a reset on either, `idle` passes with no bytes,
/// or `abort` completes.
pub async fn bridge(
    tcp: TcpStream,
    mut stream: H2Stream,
    chunk: usize,
    idle: std::time::Duration,
    abort: impl Future<Output = ()>,
) -> Outcome {
    let counts = [Cell::new(0u64), Cell::new(0u64)];
    let end = {
        let H2Stream { send, recv, .. } = &mut stream;
        // One allocation for both directions and `drive` (which holds each once, with no
        // timer of its own): the caller's task stays small in the states before and
        // after the bridge.
        let d2u = tcp_to_h2(&tcp, send, chunk, &counts[0]);
        let u2d = h2_to_tcp(recv, &tcp, &counts[1]);
        Box::pin(drive(d2u, u2d, &counts, idle, abort)).await
    };
    match &end {
        // The TCP side failed: tell the peer with RST_STREAM(CONNECT_ERROR).
        End::Reset {
            by: Side::Downstream,
            ..
        } => stream.reset(Reason::CONNECT_ERROR),
        // The stream was reset: reset the TCP connection.
        End::Reset {
            by: Side::Upstream, ..
        } => {
            let _ = runtime::sys::set_linger_zero(tcp.as_raw_fd());
        }
        End::Idle | End::Aborted => stream.reset(Reason::CANCEL),
        End::Closed => {}
    }
    Outcome {
        downstream_to_upstream: counts[0].get(),
        upstream_to_downstream: counts[1].get(),
        end,
    }
}

type Readiness = Pin<Box<dyn Future<Output = io::Result<()>>>>;

/// Writes at most this big are gathered until the next flush (TLS records of h2 control
/// frames, handshake flights, small DATA): one `sendmsg` — one packet — per flush instead
/// of one per record. Larger writes go straight to the socket (with anything gathered
/// before them in front, in the same `sendmsg`), so bulk data is never copied.
const GATHER_MAX: usize = 4096;

/// A flush with at least this much gathered waits until the task yields
/// ([`TcpIo::poll_flush`]): `h2`'s threshold for flushing a DATA frame on its own.
const DEFER_MIN: usize = 1024;

/// The socket under TLS + h2: non-blocking `recv`/`sendmsg` straight from and into the
/// callers' buffers (no copy), waiting for readiness with a poll on the ring itself. Saves
/// the `epoll_wait` (and the epoll registration) that monoio's `poll-io` adds per wake-up.
///
/// Small writes are gathered until `poll_flush`/`poll_shutdown` (tokio-rustls flushes at
/// the end of each handshake step, h2 after each batch of frames). While a [`Hold`] is
/// active, flushes are deferred too: a client holds its TLS Finished, the h2 preface and
/// SETTINGS and its first request HEADERS, and sends them as one packet.
pub struct TcpIo {
    tcp: Rc<TcpStream>,
    read_ready: Option<Readiness>,
    write_ready: Option<Readiness>,
    gathered: Vec<u8>,
    hold: Option<Rc<Cell<HoldState>>>,
    /// A held read that has to wait releases the hold once the task yields, not at once.
    release_when_parked: bool,
    /// That release is on its way: send what was gathered once it happened.
    release_scheduled: bool,
    /// The last `recv` returned less than asked: the socket was empty then, so the next
    /// read waits for readiness first instead of a `recv` that would say `EAGAIN` (one
    /// syscall less per message; data that came in meanwhile completes the poll at once).
    drained: bool,
    /// A flush put off until the task yields ([`TcpIo::poll_flush`]): set once it has.
    deferred: Option<Rc<Cell<bool>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HoldState {
    /// Not holding (released, or never armed).
    Off,
    /// Hold once this many more reads brought bytes.
    Armed(u8),
    Holding,
}

/// The TLS stream as `h2` sees it: the same, but reporting no vectored writes. `h2`
/// copies a DATA frame's payload into its write buffer below a threshold and chains a
/// larger one, which it must then flush (a TLS record flush and a `sendmsg`) before it can
/// take the next frame; the threshold is 256 bytes over a vectored writer and 1 KiB over
/// any other. So with this a frame of 256 to 1,023 bytes (a typical HTTP request head, with
/// its `cookie` or `authorization`) is batched with its neighbours instead of costing a
/// send of its own. Measured through the waypoint path (http1-rps, 64 connections, old and
/// new builds alternated): with a 120-byte field added to each request the waypoint made
/// 25.6k `sendmsg`/s (one per request) instead of 2.4k, at 9.6 CPU-µs/req instead of 4.2,
/// and the path served 36.3k instead of 47.3k req/s; with a bearer token (a 280-byte
/// request) 28.5k instead of 46.8k req/s (ztunnel A 14.6 → 8.7, waypoint 10.7 → 4.6
/// CPU-µs/req); http2-rps rose from 79.4k to 86.9k req/s. Frames of 1 KiB and more are
/// chained (sent from where they are) as before: one-stream HBONE throughput did not
/// move (5.7 Gbit/s either way).
pub struct H2Io<T>(pub T);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for H2Io<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for H2Io<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Run `f` and wake the task of `cx` once that task has yielded to the worker (a spawned
/// task, run after it): how a [`TcpIo`] lets the rest of a task's poll join bytes it put
/// off sending.
fn after_yield(cx: &Context<'_>, f: impl FnOnce() + 'static) {
    let w = cx.waker().clone();
    drop(monoio::spawn(async move {
        f();
        w.wake();
    }));
}

/// Defers a [`TcpIo`]'s flushes until released (or dropped).
pub struct Hold(Rc<Cell<HoldState>>);

impl Hold {
    /// Let the next flush send what was gathered.
    pub fn release(&self) {
        self.0.set(HoldState::Off);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

impl TcpIo {
    pub fn new(tcp: TcpStream) -> Self {
        TcpIo {
            tcp: Rc::new(tcp),
            read_ready: None,
            write_ready: None,
            gathered: Vec::new(),
            hold: None,
            drained: false,
            release_when_parked: false,
            release_scheduled: false,
            deferred: None,
        }
    }

    /// A socket whose writes are held (flushes deferred) from the first byte it reads —
    /// i.e. after the first flight went out and the peer answered — until the [`Hold`] is
    /// released or dropped.
    pub fn held_after_first_read(tcp: TcpStream) -> (Self, Hold) {
        Self::held_after_reads(tcp, 1)
    }

    /// As [`TcpIo::held_after_first_read`], holding from the `reads`-th read that brings
    /// bytes on. A server holds from its second (the client's TLS Finished, with its h2
    /// preface and first request after it): its session tickets, SETTINGS, WINDOW_UPDATE
    /// and SETTINGS ACK go out together, at the latest when it next waits for the peer.
    pub fn held_after_reads(tcp: TcpStream, reads: u8) -> (Self, Hold) {
        let flag = Rc::new(Cell::new(HoldState::Armed(reads.max(1))));
        let mut io = TcpIo::new(tcp);
        io.hold = Some(flag.clone());
        (io, Hold(flag))
    }

    /// As [`TcpIo::held_after_reads`], but a read that has to wait while bytes are held
    /// ends the hold only once the task yields to the worker (a spawned task releases it
    /// and wakes this one, which then sends): what the task writes after that read within
    /// the same poll joins the held bytes. The peer still never waits on the hold for
    /// longer than this task's one poll.
    pub fn held_after_reads_until_parked(tcp: TcpStream, reads: u8) -> (Self, Hold) {
        let (mut io, hold) = Self::held_after_reads(tcp, reads);
        io.release_when_parked = true;
        (io, hold)
    }

    fn holding(&self) -> bool {
        self.hold
            .as_ref()
            .is_some_and(|h| h.get() == HoldState::Holding)
    }

    /// Start waiting for readability (`read`) or writability: one poll on the ring.
    fn arm(&mut self, read: bool) {
        let t = self.tcp.clone();
        if read {
            self.read_ready = Some(Box::pin(async move { t.readable(false).await }));
        } else {
            self.write_ready = Some(Box::pin(async move { t.writable(false).await }));
        }
    }

    /// Poll the armed wait; once it fires, the next call tries the syscall again.
    fn poll_ready(&mut self, cx: &mut Context<'_>, read: bool) -> Poll<io::Result<()>> {
        let slot = if read {
            &mut self.read_ready
        } else {
            &mut self.write_ready
        };
        if let Some(wait) = slot {
            let r = ready!(wait.as_mut().poll(cx));
            *slot = None;
            return Poll::Ready(r);
        }
        Poll::Ready(Ok(()))
    }

    /// One `sendmsg` of `bufs`, waiting for writability after `WouldBlock`.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.write_ready.is_some() {
                ready!(self.poll_ready(cx, false))?;
            }
            let fd = self.tcp.as_raw_fd();
            match runtime::sys::send_vectored_nonblocking(fd, bufs) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.arm(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Send everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.gathered.is_empty() {
            let g = std::mem::take(&mut self.gathered);
            let r = self.poll_send(cx, &[io::IoSlice::new(&g)]);
            self.gathered = g;
            let n = ready!(r)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.gathered.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpIo {
    fn drop(&mut self) {
        // Best effort for bytes gathered but never flushed (a connection dropped on error).
        if !self.gathered.is_empty() {
            let _ = runtime::sys::send_vectored_nonblocking(
                self.tcp.as_raw_fd(),
                &[io::IoSlice::new(&self.gathered)],
            );
        }
    }
}

impl tokio::io::AsyncRead for TcpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if std::mem::take(&mut this.drained) && this.read_ready.is_none() {
            this.arm(true);
        }
        loop {
            // After `WouldBlock`, no syscall until the ring says readable.
            if this.read_ready.is_some() {
                // Never wait for the peer with held bytes it may be waiting for (a
                // HelloRetryRequest's second ClientHello): stop holding and send.
                if this.holding() && !this.gathered.is_empty() {
                    if this.release_when_parked {
                        // A read that waits here is often followed by more work in the
                        // same poll of the task (the TLS layer's buffered plaintext: h2's
                        // SETTINGS ACK and WINDOW_UPDATE): stop holding once the task
                        // yields, and send then (below, when the task polls again).
                        if !this.release_scheduled {
                            this.release_scheduled = true;
                            if let Some(h) = &this.hold {
                                let h = h.clone();
                                after_yield(cx, move || h.set(HoldState::Off));
                            }
                        }
                    } else {
                        if let Some(h) = &this.hold {
                            h.set(HoldState::Off);
                        }
                        ready!(this.poll_drain(cx))?;
                    }
                }
                if this.release_scheduled && !this.holding() {
                    this.release_scheduled = false;
                    ready!(this.poll_drain(cx))?;
                }
                // A flush put off till the task yields: not while waiting on the peer.
                if this.deferred.is_some() && !this.holding() {
                    ready!(this.poll_drain(cx))?;
                    this.deferred = None;
                }
                ready!(this.poll_ready(cx, true))?;
            }
            let fd = this.tcp.as_raw_fd();
            let want = buf.remaining();
            match runtime::sys::recv_nonblocking(fd, buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    this.drained = n > 0 && n < want;
                    if let Some(h) = &this.hold {
                        // `held_after_reads`: hold from the peer's `reads`-th answer on
                        // (unless the `Hold` is already gone).
                        if let HoldState::Armed(k) = h.get() {
                            if n > 0 && Rc::strong_count(h) > 1 {
                                h.set(if k <= 1 {
                                    HoldState::Holding
                                } else {
                                    HoldState::Armed(k - 1)
                                });
                            }
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.arm(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for TcpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.holding() || this.gathered.len() + total <= GATHER_MAX {
            for b in bufs {
                this.gathered.extend_from_slice(b);
            }
            return Poll::Ready(Ok(total));
        }
        // A large write: what was gathered goes first, in the same `sendmsg`.
        while !this.gathered.is_empty() {
            let g = std::mem::take(&mut this.gathered);
            let mut iov = Vec::with_capacity(bufs.len() + 1);
            iov.push(io::IoSlice::new(&g));
            iov.extend_from_slice(bufs);
            let r = this.poll_send(cx, &iov);
            drop(iov);
            this.gathered = g;
            let n = ready!(r)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < this.gathered.len() {
                this.gathered.drain(..n);
            } else {
                let of_bufs = n - this.gathered.len();
                this.gathered.clear();
                if of_bufs > 0 {
                    return Poll::Ready(Ok(of_bufs));
                }
            }
        }
        this.poll_send(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// With a frame's worth gathered ([`DEFER_MIN`]), what was gathered is sent once the
    /// task yields, not at once: the first such flush spawns a task that runs after this
    /// one yields and wakes it, and until then flushes return at once. `h2` flushes after
    /// each DATA frame of 1 KiB or more it sends (and a TLS flush reaches here each time);
    /// the frames one poll of the connection writes thus go out in one `sendmsg` instead of
    /// one each. A read that has to wait sends first (the peer may be waiting for these
    /// bytes), and so does shutdown. Measured (http1-rps, 2 KiB responses, old and new
    /// builds alternated, 3 runs each): through the waypoint 25.2k → 28.8k req/s (39.3 →
    /// 34.9 CPU-µs/req), hbone 38.2k → 40.7k; 100-byte and 8 KiB responses unchanged
    /// (writes over [`GATHER_MAX`] go straight out).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.holding() {
            return Poll::Ready(Ok(()));
        }
        if this.gathered.is_empty() {
            this.deferred = None;
            return Poll::Ready(Ok(()));
        }
        // Due: the task has yielded since, or a send already waits for room. Only a flush
        // with a frame's worth gathered is put off (small control frames and responses
        // flush at once: putting them off cost a poll of the connection more each).
        let due = this.write_ready.is_some()
            || this.deferred.as_ref().is_some_and(|d| d.get())
            || (this.deferred.is_none() && this.gathered.len() < DEFER_MIN);
        if !due {
            if this.deferred.is_none() {
                let flag = Rc::new(Cell::new(false));
                let d = flag.clone();
                after_yield(cx, move || d.set(true));
                this.deferred = Some(flag);
            }
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        this.deferred = None;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(h) = this.hold.take() {
            h.set(HoldState::Off);
        }
        ready!(this.poll_drain(cx))?;
        Poll::Ready(runtime::sys::shutdown_write(this.tcp.as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read of `n` bytes of `fill` through `bufs`: (bytes offered, bytes returned).
    fn read(bufs: &mut ReadBufs, n: usize, fill: u8) -> (usize, Bytes) {
        let mut offered = 0;
        let d = bufs
            .read(|buf, max| {
                assert!(buf.is_empty());
                assert!(max <= buf.capacity(), "offered {max} of {}", buf.capacity());
                assert!(n <= max, "a read of {n} into {max}");
                offered = max;
                buf.resize(n, fill);
                Ok(n)
            })
            .unwrap();
        (offered, d)
    }

    #[test]
    fn a_stream_that_never_read_holds_no_buffer_and_waits_first() {
        let mut bufs = ReadBufs::new(64 * 1024);
        assert_eq!(bufs.held(), 0);
        assert!(bufs.drained());
        let (offered, d) = read(&mut bufs, 10, 7);
        assert_eq!(offered, FIRST_READ);
        assert_eq!(&d[..], &[7; 10]);
        assert_eq!(bufs.held(), 0);
        assert!(bufs.drained());
    }

    #[test]
    fn after_a_bulk_transfer_drains_the_idle_direction_holds_no_buffer() {
        let mut bufs = ReadBufs::new(64 * 1024);
        // A first read that fills the scratch buffer: the next ones are full-size, at once,
        // and grow.
        let (offered, d) = read(&mut bufs, FIRST_READ, 1);
        assert_eq!((offered, d.len()), (FIRST_READ, FIRST_READ));
        assert!(!bufs.drained());
        let mut sizes = Vec::new();
        for i in 0..4u8 {
            let mut want = 0;
            let d = bufs
                .read(|buf, max| {
                    want = max;
                    buf.resize(max, i);
                    Ok(max)
                })
                .unwrap();
            assert_eq!(d.len(), want);
            assert!(d.iter().all(|b| *b == i));
            assert!(!bufs.drained());
            sizes.push(want);
        }
        assert!(sizes[0] >= MIN_READ, "{sizes:?}");
        assert!(
            sizes[3] >= 64 * 1024,
            "reads grow to the chunk size: {sizes:?}"
        );
        // A short read: the socket was drained. No buffer is kept for the wait.
        let (offered, d) = read(&mut bufs, 5000, 9);
        assert!(offered >= 64 * 1024);
        assert_eq!(&d[..], &[9; 5000][..]);
        assert_eq!(bufs.held(), 0, "a buffer held while idle");
        assert!(bufs.drained());
        assert_eq!(read(&mut bufs, 1, 0).0, FIRST_READ);
    }

    #[test]
    fn small_messages_arrive_intact_and_leave_no_buffer_held() {
        let mut bufs = ReadBufs::new(64 * 1024);
        for i in 0..100u8 {
            let n = 1 + (i as usize * 7919) % (FIRST_READ - 1);
            let (offered, d) = read(&mut bufs, n, i);
            assert_eq!(offered, FIRST_READ, "message {i}");
            assert_eq!(d.len(), n);
            assert!(d.iter().all(|b| *b == i));
            assert_eq!(bufs.held(), 0);
            assert!(bufs.drained());
        }
    }

    #[test]
    fn a_message_longer_than_the_first_read_continues_full_size() {
        let mut bufs = ReadBufs::new(64 * 1024);
        let (_, first) = read(&mut bufs, FIRST_READ, 3);
        assert_eq!(first.len(), FIRST_READ);
        // The rest of the message: a full-size read, short (the message ended).
        let (offered, rest) = read(&mut bufs, 3000, 4);
        assert_eq!(offered, MIN_READ);
        assert_eq!(&rest[..], &[4; 3000][..]);
        assert_eq!(bufs.held(), 0);
        assert!(bufs.drained());
    }

    #[test]
    fn a_would_block_after_a_full_read_lets_the_buffer_go_and_waits() {
        let mut bufs = ReadBufs::new(64 * 1024);
        read(&mut bufs, FIRST_READ, 1);
        // Interrupted: try again, still full-size and without a wait.
        let e = bufs
            .read(|_, _| Err(io::ErrorKind::Interrupted.into()))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        assert!(!bufs.drained());
        // Nothing queued after all: no buffer held, wait for readiness.
        let e = bufs
            .read(|_, _| Err(io::ErrorKind::WouldBlock.into()))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(bufs.drained());
        assert_eq!(bufs.held(), 0);
        // End of stream: no bytes.
        assert!(read(&mut bufs, 0, 0).1.is_empty());
    }

    #[test]
    fn a_first_read_is_no_larger_than_a_small_chunk() {
        let mut bufs = ReadBufs::new(4096);
        let (offered, d) = read(&mut bufs, 4096, 1);
        assert_eq!((offered, d.len()), (4096, 4096));
        assert!(!bufs.drained());
    }

    /// A server's hold (`held_after_reads_until_parked`) keeps what its task writes after a
    /// read that has to wait, within the same poll, and sends it all once the task yields:
    /// nothing reaches the peer during that poll, then both writes in one piece.
    #[test]
    fn a_hold_until_parked_sends_the_writes_of_the_whole_poll_together() {
        use std::io::{Read, Write};
        use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let mut peer = std::net::TcpStream::connect(l.local_addr().expect("addr")).unwrap();
            let (s, _) = l.accept().expect("accept");
            s.set_nonblocking(true).expect("nonblocking");
            let (mut io, hold) =
                TcpIo::held_after_reads_until_parked(TcpStream::from_std(s).expect("tcp"), 1);
            peer.write_all(b"hi").unwrap();
            let mut b = [0u8; 16];
            let n = io.read(&mut b).await.expect("read");
            assert_eq!(&b[..n], b"hi");
            peer.set_nonblocking(true).unwrap();
            let mut first_poll = true;
            poll_fn(|cx| {
                let mut rb = [0u8; 8];
                let mut rb = tokio::io::ReadBuf::new(&mut rb);
                if std::mem::take(&mut first_poll) {
                    assert!(Pin::new(&mut io).poll_write(cx, b"a").is_ready());
                    assert!(Pin::new(&mut io).poll_flush(cx).is_ready());
                    assert!(Pin::new(&mut io).poll_read(cx, &mut rb).is_pending());
                    assert!(Pin::new(&mut io).poll_write(cx, b"b").is_ready());
                    assert!(Pin::new(&mut io).poll_flush(cx).is_ready());
                    let mut got = [0u8; 8];
                    let e = peer
                        .read(&mut got)
                        .expect_err("nothing sent during the poll");
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    // Woken by the release.
                    return Poll::Pending;
                }
                assert!(Pin::new(&mut io).poll_read(cx, &mut rb).is_pending());
                Poll::Ready(())
            })
            .await;
            peer.set_nonblocking(false).unwrap();
            let mut got = [0u8; 8];
            let n = peer.read(&mut got).expect("read");
            assert_eq!(&got[..n], b"ab");
            drop(hold);
        });
    }
}
