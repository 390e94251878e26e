//! An HBONE stream as a byte stream, and the bridge between it and a TCP socket.
//!
//! Half-close maps to `END_STREAM` each way; a TCP reset maps to `RST_STREAM(CONNECT_ERROR)`
//! and an `RST_STREAM` to a TCP reset (RFC 9113 §8.5). DATA is sent only within the peer's
//! flow-control window (no unbounded buffering in h2), and received data releases window
//! only once written to the socket.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
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

async fn send_all(
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

/// Reads at most this big are copied out of the read buffer, which is then reused.
const COPY_MAX: usize = 1024;

/// The buffer of a read after the socket was drained (a short read), when the next bytes
/// may be long in coming: an idle stream holds this much, not a full-size buffer. A message
/// up to this size still takes one read; a longer one fills it, and the reads after it are
/// full-size again.
const IDLE_READ: usize = COPY_MAX;

/// The read buffers of one TCP → stream direction. Reads start small and double while they
/// fill the buffer (bulk transfers make few, large DATA frames); a read that comes back
/// short drained the socket, so the full-size buffer is let go and the next read — the one
/// an idle stream waits in — gets the small one (nginx and HAProxy likewise hold a buffer
/// only while data moves).
struct ReadBufs {
    min: usize,
    max: usize,
    /// The size of the next full-size read.
    size: usize,
    /// The last read came back short: the next one uses `small`.
    drained: bool,
    /// The buffer of reads after a short one; kept (it is small) and reused.
    small: BytesMut,
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
            // Nothing read yet: the first read may wait as long as any.
            drained: true,
            small: BytesMut::new(),
            big: BytesMut::new(),
        }
    }

    /// The (empty) buffer for the next read; back with [`ReadBufs::filled`].
    fn take(&mut self) -> BytesMut {
        let (mut buf, want) = if self.drained {
            (std::mem::take(&mut self.small), IDLE_READ.min(self.max))
        } else {
            (std::mem::take(&mut self.big), self.size)
        };
        buf.reserve(want);
        buf
    }

    /// `buf` (from [`ReadBufs::take`]) now holds a read of `n` > 0 bytes: the bytes to send.
    fn filled(&mut self, mut buf: BytesMut, n: usize) -> Bytes {
        // The buffer was empty before the read: all of its capacity was offered.
        let full = n == buf.capacity();
        // A small message is copied out (a small allocation, from the allocator's
        // per-thread cache) and the buffer kept; a large one is handed to h2 as it is.
        // (A read into the small buffer is always small.)
        let data = if n <= COPY_MAX {
            let d = Bytes::copy_from_slice(&buf);
            buf.clear();
            d
        } else {
            buf.split().freeze()
        };
        if self.drained {
            self.small = buf;
            // A full small read: more is probably queued, read it full-size.
            self.drained = !full;
            return data;
        }
        // (The buffer may hold more than `size`: kept from an earlier read.)
        self.size = if n >= self.size {
            (self.size * 2).min(self.max)
        } else if n < self.size / 4 {
            (self.size / 2).max(self.min)
        } else {
            self.size
        };
        if full {
            // The socket may hold more: read again at once, into what is left of this one.
            self.big = buf;
        } else {
            // Drained: hold no full-size buffer while waiting for the next bytes.
            self.drained = true;
        }
        data
    }

    /// Bytes of buffer this direction holds between reads.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.small.capacity() + self.big.capacity()
    }
}

async fn tcp_to_h2(
    r: &mut OwnedReadHalf<TcpStream>,
    send: &mut SendStream<Bytes>,
    chunk: usize,
    count: &Cell<u64>,
) -> DirEnd {
    let mut bufs = ReadBufs::new(chunk);
    loop {
        let (res, buf) = r.read(bufs.take()).await;
        match res {
            Ok(0) => {
                return match send.send_data(Bytes::new(), true) {
                    Ok(()) => DirEnd::Eof,
                    Err(e) => DirEnd::WriteFailed(h2_err(e)),
                }
            }
            Ok(n) => {
                let data = bufs.filled(buf, n);
                if let Err(e) = send_all(send, data, false).await {
                    return DirEnd::WriteFailed(h2_err(e));
                }
                count.set(count.get() + n as u64);
            }
            Err(e) => return DirEnd::ReadFailed(e),
        }
    }
}

async fn h2_to_tcp(
    recv: &mut RecvStream,
    w: &mut OwnedWriteHalf<TcpStream>,
    count: &Cell<u64>,
) -> DirEnd {
    loop {
        match recv.data().await {
            Some(Ok(data)) if data.is_empty() => {}
            Some(Ok(data)) => {
                let n = data.len();
                let (res, _) = w.write_all(data).await;
                if let Err(e) = res {
                    return DirEnd::WriteFailed(e);
                }
                let _ = recv.flow_control().release_capacity(n);
                count.set(count.get() + n as u64);
            }
            Some(Err(e)) => return DirEnd::ReadFailed(h2_err(e)),
            None => {
                return match w.shutdown().await {
                    Ok(()) => DirEnd::Eof,
                    Err(e) if e.kind() == std::io::ErrorKind::NotConnected => DirEnd::Eof,
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
    let (mut r, mut w) = tcp.into_split();
    let end = {
        let H2Stream { send, recv, .. } = &mut stream;
        // Boxed, each direction and `drive` around them: inline, `drive` keeps each
        // direction twice (as given and pinned) and its idle timer (a 128-byte aligned
        // timer entry) pads every future around it to that alignment — 2.8 KB per stream
        // in the task of the connection, against 1.7 KB in three allocations.
        let d2u = Box::pin(tcp_to_h2(&mut r, send, chunk, &counts[0]));
        let u2d = Box::pin(h2_to_tcp(recv, &mut w, &counts[1]));
        Box::pin(drive(d2u, u2d, &counts, idle, abort)).await
    };
    let tcp = r.reunite(w).expect("halves of one stream");
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
    /// The last `recv` returned less than asked: the socket was empty then, so the next
    /// read waits for readiness first instead of a `recv` that would say `EAGAIN` (one
    /// syscall less per message; data that came in meanwhile completes the poll at once).
    drained: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HoldState {
    /// Not holding (released, or never armed).
    Off,
    /// Hold from the first byte read on.
    Armed,
    Holding,
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
        }
    }

    /// A socket whose writes are held (flushes deferred) from the first byte it reads —
    /// i.e. after the first flight went out and the peer answered — until the [`Hold`] is
    /// released or dropped.
    pub fn held_after_first_read(tcp: TcpStream) -> (Self, Hold) {
        let flag = Rc::new(Cell::new(HoldState::Armed));
        let mut io = TcpIo::new(tcp);
        io.hold = Some(flag.clone());
        (io, Hold(flag))
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
                    if let Some(h) = &this.hold {
                        h.set(HoldState::Off);
                    }
                    ready!(this.poll_drain(cx))?;
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
                        // `held_after_first_read`: hold from the peer's first answer on
                        // (unless the `Hold` is already gone).
                        if n > 0 && h.get() == HoldState::Armed && Rc::strong_count(h) > 1 {
                            h.set(HoldState::Holding);
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

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.holding() {
            return Poll::Ready(Ok(()));
        }
        this.poll_drain(cx)
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

    /// A read of `n` bytes of `fill` into the buffer the next read would get.
    fn read(bufs: &mut ReadBufs, n: usize, fill: u8) -> (usize, Bytes) {
        let mut buf = bufs.take();
        let offered = buf.capacity();
        assert!(n <= offered, "a read of {n} into {offered}");
        buf.resize(n, fill);
        (offered, bufs.filled(buf, n))
    }

    #[test]
    fn a_stream_that_never_read_offers_only_the_small_buffer() {
        let mut bufs = ReadBufs::new(64 * 1024);
        assert_eq!(bufs.held(), 0);
        assert_eq!(bufs.take().capacity(), IDLE_READ);
    }

    #[test]
    fn after_a_bulk_transfer_drains_the_idle_read_holds_only_the_small_buffer() {
        let mut bufs = ReadBufs::new(64 * 1024);
        // A small read that fills the small buffer: the next ones are full-size and grow.
        let (offered, d) = read(&mut bufs, IDLE_READ, 1);
        assert_eq!((offered, d.len()), (IDLE_READ, IDLE_READ));
        let mut sizes = Vec::new();
        for i in 0..4 {
            let mut buf = bufs.take();
            let want = buf.capacity();
            buf.resize(want, i as u8);
            let d = bufs.filled(buf, want);
            assert_eq!(d.len(), want);
            assert!(d.iter().all(|b| *b == i as u8));
            sizes.push(want);
        }
        assert!(sizes[0] >= MIN_READ, "{sizes:?}");
        assert!(
            sizes[3] >= 64 * 1024,
            "reads grow to the chunk size: {sizes:?}"
        );
        // A short read: the socket was drained. No full-size buffer is kept for the wait.
        let (offered, d) = read(&mut bufs, 5000, 9);
        assert!(offered >= 64 * 1024);
        assert_eq!(d.len(), 5000);
        assert!(bufs.held() <= IDLE_READ, "held {} while idle", bufs.held());
        assert_eq!(bufs.take().capacity(), IDLE_READ);
    }

    #[test]
    fn small_messages_reuse_one_small_buffer_and_arrive_intact() {
        let mut bufs = ReadBufs::new(64 * 1024);
        for i in 0..100u8 {
            let n = 1 + (i as usize * 7) % (IDLE_READ - 1);
            let (offered, d) = read(&mut bufs, n, i);
            assert_eq!(offered, IDLE_READ, "message {i}");
            assert_eq!(d.len(), n);
            assert!(d.iter().all(|b| *b == i));
            assert_eq!(bufs.held(), IDLE_READ);
        }
    }

    #[test]
    fn a_message_longer_than_the_small_buffer_continues_full_size() {
        let mut bufs = ReadBufs::new(64 * 1024);
        let (_, first) = read(&mut bufs, IDLE_READ, 3);
        assert_eq!(first.len(), IDLE_READ);
        // The rest of the message: a full-size read, short (the message ended).
        let (offered, rest) = read(&mut bufs, 3000, 4);
        assert_eq!(offered, MIN_READ);
        assert_eq!(rest.len(), 3000);
        assert!(bufs.held() <= IDLE_READ);
    }
}
