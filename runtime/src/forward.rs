//! Moving bytes both ways between two TCP streams until both halves close.
//!
//! Two modes, chosen by config and both benchmarked:
//! - **copy**: readiness from the ring, then non-blocking `recv` into a buffer from the
//!   per-core pool and `send` of it to the other side. A connection holds a buffer only while
//!   data moves: after a short read the buffer goes back to the pool and the direction waits
//!   for readiness first, so idle connections cost no buffer memory. Reads that keep filling
//!   the buffer switch it to the large class.
//! - **splice**: readiness from the ring, then non-blocking `splice(2)` socket → pipe →
//!   socket. `IORING_OP_SPLICE` is deliberately not used: the kernel punts every one to an
//!   io-wq thread (measured here: two kernel threads per idle connection, 2.4× the CPU).
//!
//! Semantics: EOF on one side → `shutdown(SHUT_WR)` on the other, the other direction keeps
//! flowing; a reset (or a fatal error) on one side → the other side is closed with a TCP RST
//! (`SO_LINGER` 0); nothing moving either way for `idle_timeout` → both closed (the worker's
//! idle sweeper, [`crate::idle`], closes them 1 to 1.25 × `idle_timeout` after the last
//! byte); the `abort` future completing (drain deadline) → both closed. Byte counts per
//! direction are returned.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use monoio::net::TcpStream;

use crate::bufpool::BufPool;
use crate::config::{ForwardConfig, ForwardMode};
use crate::idle::IdleWatch;
use crate::sys;

/// Which end of a forwarded pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepted (client) side.
    Downstream,
    /// The side we connected to.
    Upstream,
}

/// How a forwarded connection ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF and were shut down in order.
    Closed,
    /// One side reset (or failed fatally); the other was reset in turn.
    Reset { by: Side, error: io::Error },
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The caller's abort future completed (drain deadline, policy change).
    Aborted,
}

/// What [`forward`] returns.
#[derive(Debug)]
pub struct Outcome {
    pub downstream_to_upstream: u64,
    pub upstream_to_downstream: u64,
    pub end: End,
}

/// How one direction of a forwarded pair ended.
pub enum DirEnd {
    Eof,
    /// The reading side failed (reset by its peer).
    ReadFailed(io::Error),
    /// The writing side failed (its peer reset or went away).
    WriteFailed(io::Error),
}

/// Forward between `down` (accepted) and `up` (connected) until both halves close, a reset,
/// the idle timeout, or `abort`.
pub async fn forward(
    down: TcpStream,
    up: TcpStream,
    cfg: &ForwardConfig,
    pool: &BufPool,
    abort: impl Future<Output = ()>,
) -> Outcome {
    match cfg.mode {
        ForwardMode::Copy => forward_copy(down, up, cfg, pool, abort).await,
        ForwardMode::Splice => match prepare_splice(&down, &up, cfg, pool) {
            Ok(pipes) => {
                let o = forward_splice(&down, &up, &pipes, cfg, abort).await;
                // Pipes left empty go back to the worker's pool for the next connection.
                for p in pipes {
                    pool.put_pipe(p);
                }
                finish(o, &down, &up)
            }
            // Pipe creation failed (descriptor limit): copy this connection instead.
            Err(e) => {
                tracing::debug!(error = %e, "splice setup failed; copying instead");
                forward_copy(down, up, cfg, pool, abort).await
            }
        },
    }
}

/// Apply the close semantics of `o` to the sockets (they close when dropped after this).
fn finish(o: Outcome, down: &TcpStream, up: &TcpStream) -> Outcome {
    if let End::Reset { by, .. } = &o.end {
        let other = match by {
            Side::Downstream => up.as_raw_fd(),
            Side::Upstream => down.as_raw_fd(),
        };
        let _ = sys::set_linger_zero(other);
    }
    o
}

/// Run both directions, the idle timeout and `abort` together; decide the end. `d2u` moves
/// bytes from the downstream side to the upstream side, `u2d` the other way; `counts` are
/// their byte counters (read for the idle timeout). Reusable by any pair of byte streams.
///
/// The idle timeout is an [`IdleWatch`] (a slot in the worker's
/// sweeper, not a timer per connection): it fires between `idle` and `idle + idle/4` after
/// the last byte moved either way.
pub fn drive<'a, A, B, C>(
    d2u: A,
    u2d: B,
    counts: &'a [Cell<u64>; 2],
    idle: Duration,
    abort: C,
) -> Drive<'a, A, B, C>
where
    A: Future<Output = DirEnd>,
    B: Future<Output = DirEnd>,
    C: Future<Output = ()>,
{
    Drive {
        d2u,
        u2d,
        abort,
        counts,
        watch: IdleWatch::new(idle),
        d2u_done: false,
        u2d_done: false,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`drive`]. A struct rather than an `async fn`: that one kept its
    /// arguments and the pinned copies it polled both, so each connection held its
    /// directions twice (the copy path: 1.5 kB where 0.7 kB do).
    pub struct Drive<'a, A, B, C> {
        #[pin]
        d2u: A,
        #[pin]
        u2d: B,
        #[pin]
        abort: C,
        counts: &'a [Cell<u64>; 2],
        watch: IdleWatch,
        d2u_done: bool,
        u2d_done: bool,
    }
}

/// What a direction's end means for the pair: `None` for EOF (the other may go on), else the
/// reset, blamed on the side that failed.
fn dir_end(e: DirEnd, reader: Side, writer: Side) -> Option<End> {
    match e {
        DirEnd::Eof => None,
        DirEnd::ReadFailed(error) => Some(End::Reset { by: reader, error }),
        DirEnd::WriteFailed(error) => Some(End::Reset { by: writer, error }),
    }
}

impl<A, B, C> Future for Drive<'_, A, B, C>
where
    A: Future<Output = DirEnd>,
    B: Future<Output = DirEnd>,
    C: Future<Output = ()>,
{
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.project();
        let end = (|| {
            if !*this.d2u_done {
                if let Poll::Ready(e) = this.d2u.poll(cx) {
                    match dir_end(e, Side::Downstream, Side::Upstream) {
                        None => *this.d2u_done = true,
                        Some(end) => return Poll::Ready(end),
                    }
                }
            }
            if !*this.u2d_done {
                if let Poll::Ready(e) = this.u2d.poll(cx) {
                    match dir_end(e, Side::Upstream, Side::Downstream) {
                        None => *this.u2d_done = true,
                        Some(end) => return Poll::Ready(end),
                    }
                }
            }
            if *this.d2u_done && *this.u2d_done {
                return Poll::Ready(End::Closed);
            }
            if this.abort.poll(cx).is_ready() {
                return Poll::Ready(End::Aborted);
            }
            let total = this.counts[0].get().wrapping_add(this.counts[1].get());
            if this.watch.poll(cx, total).is_ready() {
                return Poll::Ready(End::Idle);
            }
            Poll::Pending
        })();
        if end.is_ready() {
            // The slot goes at the end, as the `async fn` freed it, not when the caller
            // gets round to dropping the future.
            this.watch.release();
        }
        end
    }
}

/// Bytes a direction (copy or splice) moves without waiting, after which it yields to the
/// worker's other tasks: a direction whose source never runs dry and whose destination never
/// fills would otherwise keep the worker to itself. The HBONE bridge's directions use it too.
pub const BUDGET: usize = 4 << 20;

/// Times a splice direction used up [`BUDGET`] and yielded (all workers).
static SPLICE_YIELDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Times a copy direction used up [`BUDGET`] and yielded (all workers).
static COPY_YIELDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How often splice directions of this process moved their budget without waiting and
/// yielded to the worker's other tasks.
pub fn splice_yields() -> u64 {
    SPLICE_YIELDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// How often copy directions of this process moved their budget without waiting and
/// yielded to the worker's other tasks.
pub fn copy_yields() -> u64 {
    COPY_YIELDS.load(std::sync::atomic::Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------
// copy mode

async fn forward_copy(
    down: TcpStream,
    up: TcpStream,
    cfg: &ForwardConfig,
    pool: &BufPool,
    abort: impl Future<Output = ()>,
) -> Outcome {
    let counts = [Cell::new(0u64), Cell::new(0u64)];
    let end = drive(
        copy_dir(&down, &up, pool, &counts[0]),
        copy_dir(&up, &down, pool, &counts[1]),
        &counts,
        cfg.idle_timeout,
        abort,
    )
    .await;
    finish(
        Outcome {
            downstream_to_upstream: counts[0].get(),
            upstream_to_downstream: counts[1].get(),
            end,
        },
        &down,
        &up,
    )
}

/// Send all of `data` to `dst`: non-blocking sends while the socket takes bytes, the ring's
/// writability poll when its buffer is full.
pub async fn send_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    let fd = dst.as_raw_fd();
    while !data.is_empty() {
        match sys::send_nonblocking(fd, data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable(false).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The source's EOF, passed on: `shutdown(SHUT_WR)` of the destination (already gone:
/// nothing left to tell it).
fn pass_eof(dfd: std::os::fd::RawFd) -> DirEnd {
    match sys::shutdown_write(dfd) {
        Ok(()) => DirEnd::Eof,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => DirEnd::Eof,
        Err(e) => DirEnd::WriteFailed(e),
    }
}

/// One direction of copy mode. Readiness comes from the ring (a poll), the bytes move with
/// non-blocking `recv`/`send` on the sockets: a small message costs the ring one poll and
/// two plain syscalls instead of a poll, a recv and a send through the ring, each of which
/// took its own `io_uring_enter` before the task could go on. After a short read the source
/// was drained, so the next read waits for readiness first (no `recv` that only says
/// `EAGAIN`); after a full read it reads again at once.
async fn copy_dir(src: &TcpStream, dst: &TcpStream, pool: &BufPool, count: &Cell<u64>) -> DirEnd {
    let sfd = src.as_raw_fd();
    let mut held: Option<Vec<u8>> = None;
    let mut large = false;
    let mut full_reads = 0u32;
    // Whether bytes may be queued without a readiness wait (after a full read).
    let mut drained = true;
    let mut budget = BUDGET;
    loop {
        if drained {
            budget = BUDGET;
            // Idle: hold no buffer until there is something to read.
            if let Err(e) = src.readable(false).await {
                return DirEnd::ReadFailed(e);
            }
        } else if budget == 0 {
            // Reads keep filling the buffer and sends never block: the other tasks first
            // (the ring ops of the former copy loop yielded on every read and write).
            budget = BUDGET;
            COPY_YIELDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::worker::yield_now().await;
        }
        let mut buf = held.take().unwrap_or_else(|| pool.get(large));
        let n = match sys::recv_spare(sfd, &mut buf, usize::MAX) {
            Ok(0) => {
                pool.put(buf);
                return pass_eof(dst.as_raw_fd());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pool.put(buf);
                drained = true;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                held = Some(buf);
                drained = false;
                continue;
            }
            Err(e) => {
                pool.put(buf);
                return DirEnd::ReadFailed(e);
            }
        };
        let filled = n == buf.capacity();
        if let Err(e) = send_all(dst, &buf).await {
            pool.put(buf);
            return DirEnd::WriteFailed(e);
        }
        count.set(count.get() + n as u64);
        budget = budget.saturating_sub(n);
        drained = !filled;
        if filled {
            full_reads += 1;
            if !large && full_reads >= 4 && pool.large_size() > pool.small_size() {
                // Traffic keeps filling the buffer: trade it for a large one.
                pool.put(buf);
                large = true;
                held = Some(pool.get(true));
            } else {
                buf.clear();
                held = Some(buf);
            }
        } else {
            full_reads = 0;
            pool.put(buf);
        }
    }
}

// ---------------------------------------------------------------------------------------
// splice mode

fn prepare_splice(
    down: &TcpStream,
    up: &TcpStream,
    cfg: &ForwardConfig,
    pool: &BufPool,
) -> io::Result<[sys::Pipe; 2]> {
    sys::set_nonblocking(down.as_raw_fd())?;
    sys::set_nonblocking(up.as_raw_fd())?;
    Ok([pool.get_pipe(cfg.pipe_size)?, pool.get_pipe(cfg.pipe_size)?])
}

async fn forward_splice(
    down: &TcpStream,
    up: &TcpStream,
    [p1, p2]: &[sys::Pipe; 2],
    cfg: &ForwardConfig,
    abort: impl Future<Output = ()>,
) -> Outcome {
    let counts = [Cell::new(0u64), Cell::new(0u64)];
    let end = drive(
        splice_dir(down, up, p1, &counts[0]),
        splice_dir(up, down, p2, &counts[1]),
        &counts,
        cfg.idle_timeout,
        abort,
    )
    .await;
    Outcome {
        downstream_to_upstream: counts[0].get(),
        upstream_to_downstream: counts[1].get(),
        end,
    }
}

async fn splice_dir(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &sys::Pipe,
    count: &Cell<u64>,
) -> DirEnd {
    let (sfd, dfd): (RawFd, RawFd) = (src.as_raw_fd(), dst.as_raw_fd());
    let (pr, pw) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    let mut pending = 0usize;
    let mut eof = false;
    let mut budget = BUDGET;
    loop {
        let mut fill_blocked = eof;
        if !eof && pending < pipe.capacity {
            match sys::splice_nonblocking(sfd, pw, pipe.capacity - pending) {
                Ok(0) => eof = true,
                Ok(n) => pending += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => fill_blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return DirEnd::ReadFailed(e),
            }
        } else {
            fill_blocked = true;
        }
        let mut drain_blocked = false;
        if pending > 0 {
            match sys::splice_nonblocking(pr, dfd, pending) {
                Ok(n) => {
                    pending -= n;
                    count.set(count.get() + n as u64);
                    budget = budget.saturating_sub(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => drain_blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return DirEnd::WriteFailed(e),
            }
        }
        if eof && pending == 0 {
            return pass_eof(dfd);
        }
        if pending > 0 && drain_blocked {
            if let Err(e) = dst.writable(false).await {
                return DirEnd::WriteFailed(e);
            }
        } else if pending == 0 && fill_blocked {
            budget = BUDGET;
            if let Err(e) = src.readable(false).await {
                return DirEnd::ReadFailed(e);
            }
        } else if budget == 0 {
            budget = BUDGET;
            SPLICE_YIELDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Behind the worker's other ready tasks (a self-waking yield would run first
            // again: see `worker::yield_now`).
            crate::worker::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `drive` holds its directions and `abort` once (an `async fn` held each twice: as
    /// given and pinned), plus a few words of its own.
    #[test]
    fn drive_holds_each_future_once() {
        let counts = [Cell::new(0u64), Cell::new(0u64)];
        let (d2u, u2d) = (
            async {
                let _held = [0u8; 300];
                std::future::pending::<()>().await;
                DirEnd::Eof
            },
            async { DirEnd::Eof },
        );
        let abort = std::future::pending::<()>();
        let parts = std::mem::size_of_val(&d2u)
            + std::mem::size_of_val(&u2d)
            + std::mem::size_of_val(&abort);
        let d = drive(d2u, u2d, &counts, Duration::from_secs(1), abort);
        let own = std::mem::size_of_val(&d) - parts;
        assert!(own <= 64, "drive adds {own} bytes to its futures' {parts}");
    }
}
