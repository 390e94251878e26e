//! What runs inside one accepted HBONE tunnel: protocol detection, the byte-level adapter
//! that lets the stock `h2` server run over a CONNECT stream, and the opaque-TCP splice
//! between two CONNECT streams.
//!
//! **Detection** ([`detect`]) looks at the first bytes the client sends: the HTTP/2 client
//! preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, prior knowledge) → [`Protocol::Http2`]; an
//! HTTP/1 request line (an upper-case method token and a space) → [`Protocol::Http1`];
//! anything else → [`Protocol::Tcp`]. The first bytes are waited for as long as it takes
//! (Istio's `protocolDetectionTimeout` is `0s`, off, since 1.10): a client that is late
//! with its first request is still served as HTTP. Only with the settings document's
//! `protocol_detection_timeout` set is a client silent that long (a server-first protocol)
//! taken for opaque TCP; a tunnel with no byte for `idle_timeout` is closed.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use hbone::stream::H2Stream;
use runtime::forward::{drive, DirEnd, End, Outcome, Side};
use runtime::worker::Either;

use crate::config::TunnelTimeouts;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest HTTP method token accepted as an HTTP/1 request line.
const MAX_METHOD: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
    /// The client ended its half without sending a byte, or sent none for the tunnel's
    /// `idle_timeout`: nothing to forward (no upstream stream is opened for it).
    Empty,
}

/// The verdict on the bytes so far: `None` = need more.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        // "PRI" is also a token; only the full preface decides HTTP/2.
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    match buf.iter().position(|b| !b.is_ascii_uppercase()) {
        Some(0) => Some(Protocol::Tcp),
        Some(i) if buf[i] == b' ' && i <= MAX_METHOD => Some(Protocol::Http1),
        Some(_) => Some(Protocol::Tcp),
        None if buf.len() > MAX_METHOD => Some(Protocol::Tcp),
        None => None,
    }
}

/// Read from the tunnel until [`classify`] decides; returns the protocol and every byte
/// read (to be replayed). End of stream after some bytes decides [`Protocol::Tcp`], and
/// so does silence for `protocol_detection` (when set); end of stream before any byte,
/// or no byte for `idle`, is [`Protocol::Empty`].
pub async fn detect(
    s: &mut H2Stream,
    times: &TunnelTimeouts,
) -> Result<(Protocol, BytesMut), h2::Error> {
    let mut buf = BytesMut::new();
    let wait = match (times.protocol_detection, times.idle) {
        (Some(d), Some(i)) => Some(d.min(i)),
        (d, i) => d.or(i),
    };
    // One timer for the whole wait: silence counts from the tunnel's start. It is made
    // (in place, not boxed) only once a read would wait: a tunnel whose first bytes are
    // already here decides without one.
    let until = wait.map(|d| std::time::Instant::now() + d);
    let mut timer = std::pin::pin!(None::<monoio::time::Sleep>);
    loop {
        if let Some(p) = classify(&buf) {
            return Ok((p, buf));
        }
        let mut next = std::pin::pin!(s.read());
        let waited = poll_fn(|cx| {
            if let Poll::Ready(r) = next.as_mut().poll(cx) {
                return Poll::Ready(Either::Left(r));
            }
            let Some(at) = until else {
                return Poll::Pending;
            };
            if timer.is_none() {
                timer.set(Some(monoio::time::sleep_until(at.into())));
            }
            match timer.as_mut().as_pin_mut().map(|t| t.poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Either::Right(())),
                _ => Poll::Pending,
            }
        })
        .await;
        let read = match waited {
            Either::Left(r) => r,
            Either::Right(()) if times.protocol_detection == wait => {
                return Ok((Protocol::Tcp, buf));
            }
            // Idle: closed, or (after some bytes) passed on as they are.
            Either::Right(()) if buf.is_empty() => return Ok((Protocol::Empty, buf)),
            Either::Right(()) => return Ok((Protocol::Tcp, buf)),
        };
        match read {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            Some(Err(e)) => return Err(e),
            None if buf.is_empty() => return Ok((Protocol::Empty, buf)),
            None => return Ok((Protocol::Tcp, buf)),
        }
    }
}

/// A CONNECT stream as a tokio byte stream, for the `h2` crate's server and client (which
/// monoio's `poll-io` would otherwise provide for a socket). `pending` is replayed first.
///
/// Its shutdown (the `h2` connection's end, after its GOAWAY) closes the stream as a TCP
/// connection is closed: END_STREAM (the far ztunnel passes a FIN on), then the receive
/// side is read until the peer ends it too, for at most [`CLOSE_WAIT`] (then it is reset).
/// Dropping a stream with its receive side still open would reset it (RST_STREAM
/// CANCEL), which the far ztunnel passes on as a TCP reset.
pub struct StreamIo {
    /// Whole: its pool accounting lasts as long as the stream is used.
    s: H2Stream,
    pending: Bytes,
    eof: bool,
    /// Where written bytes are copied before they go out as DATA: each write is split
    /// off it, and once the CONNECT stream has sent (dropped) them the allocation is
    /// reused, so steady traffic writes without a fresh allocation per write.
    wbuf: BytesMut,
    /// The bound on the wait for the peer's END_STREAM, from the first shutdown poll.
    closing: Option<Pin<Box<monoio::time::Sleep>>>,
    /// Bytes dropped while closing (at most [`CLOSE_DRAIN_MAX`]).
    drained: usize,
}

/// How long a closed stream waits for its peer to end its side too (the far ztunnel
/// passes our END_STREAM on as a FIN; the pod's close comes back as END_STREAM) before
/// it is reset.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The most a closed stream reads (and drops) from its peer while it waits for its end;
/// a peer that sends more is reset, as a TCP socket closed with data still arriving is.
pub const CLOSE_DRAIN_MAX: usize = 64 * 1024;

/// The smallest allocation [`StreamIo`] copies writes into (h2 writes whole batches of
/// frames, a few hundred bytes to 16 KiB).
const WRITE_BUFFER: usize = 4096;

impl StreamIo {
    pub fn new(s: H2Stream, pending: Bytes) -> Self {
        StreamIo {
            s,
            pending,
            eof: false,
            wbuf: BytesMut::new(),
            closing: None,
            drained: 0,
        }
    }

    /// Abort the underlying CONNECT stream.
    pub fn reset(&mut self, reason: Reason) {
        self.s.send.send_reset(reason);
    }
}

impl tokio::io::AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                bytes::Buf::advance(&mut self.pending, n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match self.s.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.eof = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io::Error::other(e))),
                Poll::Ready(Some(Ok(b))) => {
                    let _ = self.s.recv.flow_control().release_capacity(b.len());
                    self.pending = b;
                }
            }
        }
    }
}

impl tokio::io::AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.s.send.reserve_capacity(buf.len());
        loop {
            match self.s.send.poll_capacity(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "tunnel stream closed",
                    )))
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io::Error::other(e))),
                Poll::Ready(Some(Ok(0))) => continue,
                Poll::Ready(Some(Ok(cap))) => {
                    let n = cap.min(buf.len());
                    let me = &mut *self;
                    // Reuses the allocation when every earlier piece is gone (else a
                    // new one; the old is freed with its last piece).
                    if me.wbuf.capacity() < n {
                        me.wbuf.reserve(n.max(WRITE_BUFFER));
                    }
                    me.wbuf.extend_from_slice(&buf[..n]);
                    let data = me.wbuf.split().freeze();
                    return Poll::Ready(
                        me.s.send
                            .send_data(data, false)
                            .map(|()| n)
                            .map_err(io::Error::other),
                    );
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.closing.is_none() {
            // END_STREAM; a stream already ended or reset has nothing left to end.
            let _ = me.s.send.send_data(Bytes::new(), true);
            me.closing = Some(Box::pin(monoio::time::sleep(CLOSE_WAIT)));
        }
        // Then the peer's end: whatever it still sends is dropped.
        while !me.eof {
            match me.s.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(b))) => {
                    let _ = me.s.recv.flow_control().release_capacity(b.len());
                    me.drained += b.len();
                    if me.drained > CLOSE_DRAIN_MAX {
                        me.s.send.send_reset(Reason::CANCEL);
                        me.eof = true;
                    }
                }
                // Ended, or reset (by the peer, or with the connection).
                Poll::Ready(_) => me.eof = true,
                Poll::Pending => {
                    if let Some(t) = me.closing.as_mut() {
                        if t.as_mut().poll(cx).is_ready() {
                            me.s.send.send_reset(Reason::CANCEL);
                            me.eof = true;
                            break;
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
        me.pending = Bytes::new();
        Poll::Ready(Ok(()))
    }
}

/// One direction of an opaque TCP tunnel: DATA from `recv` to `send`, END_STREAM at the
/// end, a reset passed on (RST_STREAM CONNECT_ERROR).
async fn pipe(
    first: Bytes,
    recv: &mut RecvStream,
    send: &mut SendStream<Bytes>,
    count: &Cell<u64>,
) -> DirEnd {
    if !first.is_empty() {
        let n = first.len() as u64;
        if let Err(e) = send_all(send, first, false).await {
            return DirEnd::WriteFailed(io::Error::other(e));
        }
        count.set(count.get() + n);
    }
    loop {
        match poll_fn(|cx| recv.poll_data(cx)).await {
            Some(Ok(b)) if b.is_empty() => {}
            Some(Ok(b)) => {
                let n = b.len();
                if let Err(e) = send_all(send, b, false).await {
                    return DirEnd::WriteFailed(io::Error::other(e));
                }
                let _ = recv.flow_control().release_capacity(n);
                count.set(count.get() + n as u64);
            }
            Some(Err(e)) => return DirEnd::ReadFailed(io::Error::other(e)),
            None => {
                return match send.send_data(Bytes::new(), true) {
                    Ok(()) => DirEnd::Eof,
                    Err(e) => DirEnd::WriteFailed(io::Error::other(e)),
                }
            }
        }
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
                send.send_data(chunk, end && data.is_empty())?;
            }
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(Reason::STREAM_CLOSED)),
        }
    }
    Ok(())
}

/// How a splice's `end` is passed on (RFC 9113 §8.5): the reasons to reset the
/// (downstream, upstream) side with, if any. A reset on one side is a `CONNECT_ERROR` to
/// the other; an idle or aborted splice cancels both; a clean close resets neither.
pub(crate) fn resets(end: &End) -> (Option<Reason>, Option<Reason>) {
    match end {
        End::Reset {
            by: Side::Downstream,
            ..
        } => (None, Some(Reason::CONNECT_ERROR)),
        End::Reset {
            by: Side::Upstream, ..
        } => (Some(Reason::CONNECT_ERROR), None),
        End::Idle | End::Aborted => (Some(Reason::CANCEL), Some(Reason::CANCEL)),
        End::Closed => (None, None),
    }
}

/// Move bytes between the downstream tunnel and the upstream CONNECT stream until both
/// halves close, a reset on either (passed on as RST_STREAM), `idle` with no bytes, or
/// `abort`. `first` (what detection read) goes upstream first.
pub async fn splice(
    mut down: H2Stream,
    mut up: H2Stream,
    first: Bytes,
    idle: Duration,
    abort: impl Future<Output = ()>,
) -> Outcome {
    let counts = [Cell::new(0u64), Cell::new(0u64)];
    let end = {
        let (d, u) = (&mut down, &mut up);
        drive(
            pipe(first, &mut d.recv, &mut u.send, &counts[0]),
            pipe(Bytes::new(), &mut u.recv, &mut d.send, &counts[1]),
            &counts,
            idle,
            abort,
        )
        .await
    };
    let (d, u) = resets(&end);
    if let Some(r) = u {
        up.reset(r);
    }
    if let Some(r) = d {
        down.reset(r);
    }
    Outcome {
        downstream_to_upstream: counts[0].get(),
        upstream_to_downstream: counts[1].get(),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let t: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"P", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (H2_PREFACE, Some(Protocol::Http2)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0",
                Some(Protocol::Http2),
            ),
            (b"PRI * HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"GET", None),
            (b"GET /", Some(Protocol::Http1)),
            (b"OPTIONS * HTTP/1.1", Some(Protocol::Http1)),
            (b"\x16\x03\x01", Some(Protocol::Tcp)),
            (b"get / HTTP/1.1", Some(Protocol::Tcp)),
            (b"SSH-2.0-x", Some(Protocol::Tcp)),
            (b"AAAAAAAAAAAAAAAAAAAAAAAA", Some(Protocol::Tcp)),
            (b"hello", Some(Protocol::Tcp)),
        ];
        for (input, want) in t {
            assert_eq!(
                classify(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
