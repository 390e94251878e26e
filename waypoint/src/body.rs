//! HTTP/1.1 message bodies as they pass through: framing, an incremental chunked-body
//! scanner, and the copy of one body from a byte stream to another.
//!
//! Bodies are **streamed**: each chunk read from one side is written to the other before
//! the next is read, so a body of any size needs about one read's worth of memory (the
//! HTTP/2 flow-control window of the CONNECT stream bounds how much is in flight). Chunked
//! bodies are forwarded as received (extensions and trailers kept); the scanner finds
//! where they end and is strict about everything it passes on: CRLF only (no bare LF or
//! CR), no control bytes in extensions or trailers, trailers of the form `name: value`,
//! chunk sizes of at most 16 hex digits with nothing but `;` extensions after them. A
//! lenient backend could otherwise read a "trailer" as a new request (smuggling).

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use runtime::pinned::Race;
use runtime::worker::{race, Either};

use crate::http1::{in_time, Bound, Clock, Tunnel, Watched};

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` (0: no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`, forwarded as received.
    Chunked,
    /// A response delimited by the end of the connection.
    Eof,
}

/// The longest chunk-size line or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Size,
    /// Whitespace after the size: only more whitespace, `;` or CR may follow.
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    FinalLf,
    Done,
}

/// Finds the end of a chunked body (RFC 9112 §7.1) fed in pieces of any size.
#[derive(Debug, Default)]
pub struct ChunkScan {
    state: State,
    size: u64,
    digits: usize,
    line: usize,
}

/// A control byte other than HTAB (RFC 9110 §5.5: not allowed in field values).
fn is_ctl(c: u8) -> bool {
    (c < 0x20 && c != b'\t') || c == 0x7f
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// A chunked body that is not well formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl ChunkScan {
    fn count_line(&mut self) -> Result<(), Malformed> {
        self.line += 1;
        if self.line > MAX_LINE {
            return Err(Malformed);
        }
        Ok(())
    }

    /// Feed the next bytes: `Some(n)` when the body ends after the first `n` of them,
    /// `None` when all were consumed and more are needed.
    pub fn feed(&mut self, b: &[u8]) -> Result<Option<usize>, Malformed> {
        self.feed_with(b, |_, _| {})
    }

    /// [`ChunkScan::feed`], telling `on_data(start, end)` where chunk data lies in `b`
    /// (to decode the body as it passes).
    pub fn feed_with(
        &mut self,
        b: &[u8],
        mut on_data: impl FnMut(usize, usize),
    ) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            match self.state {
                State::Size => match c {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (c as char).to_digit(16).unwrap_or(0) as u64;
                        self.digits += 1;
                        if self.digits > 16 {
                            return Err(Malformed);
                        }
                        self.size = self.size * 16 + d;
                    }
                    b';' if self.digits > 0 => {
                        self.state = State::Ext;
                        self.line = 0;
                    }
                    b' ' | b'\t' if self.digits > 0 => {
                        self.state = State::SizeWs;
                        self.line = 0;
                    }
                    b'\r' if self.digits > 0 => self.state = State::SizeLf,
                    _ => return Err(Malformed),
                },
                State::SizeWs => match c {
                    b' ' | b'\t' => self.count_line()?,
                    b';' => self.state = State::Ext,
                    b'\r' => self.state = State::SizeLf,
                    _ => return Err(Malformed),
                },
                State::Ext => match c {
                    b'\r' => self.state = State::SizeLf,
                    // No bare LF, no other control bytes (a smuggling vector).
                    _ if is_ctl(c) => return Err(Malformed),
                    _ => self.count_line()?,
                },
                State::SizeLf => {
                    if c != b'\n' {
                        return Err(Malformed);
                    }
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let n = ((b.len() - i) as u64).min(self.size);
                    on_data(i, i + n as usize);
                    self.size -= n;
                    i += n as usize;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if c != b'\r' {
                        return Err(Malformed);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if c != b'\n' {
                        return Err(Malformed);
                    }
                    self.state = State::Size;
                    self.digits = 0;
                }
                State::TrailerStart => {
                    self.line = 0;
                    self.state = match c {
                        b'\r' => State::FinalLf,
                        _ if is_tchar(c) => State::TrailerName,
                        // Strict: a trailer line is `name: value` CRLF; a bare LF (or
                        // anything else) would let a lenient backend see a new request.
                        _ => return Err(Malformed),
                    };
                }
                State::TrailerName => match c {
                    b':' => self.state = State::TrailerValue,
                    _ if is_tchar(c) => self.count_line()?,
                    _ => return Err(Malformed),
                },
                State::TrailerValue => match c {
                    b'\r' => self.state = State::TrailerLf,
                    _ if is_ctl(c) => return Err(Malformed),
                    _ => self.count_line()?,
                },
                State::TrailerLf => {
                    if c != b'\n' {
                        return Err(Malformed);
                    }
                    self.state = State::TrailerStart;
                }
                State::FinalLf => {
                    if c != b'\n' {
                        return Err(Malformed);
                    }
                    self.state = State::Done;
                    return Ok(Some(i + 1));
                }
                State::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok((self.state == State::Done).then_some(b.len()))
    }
}

/// Why a body copy stopped early.
#[derive(Debug)]
pub enum CopyError {
    /// The source ended before the body did.
    Truncated,
    /// A chunked body that is not well formed.
    Malformed,
    /// Reading the source failed.
    Read(std::io::Error),
    /// Writing the destination failed.
    Write(std::io::Error),
    /// A read or a write waited the idle bound ([`copy_within`]: `stream_idle_timeout`)
    /// without a byte moving.
    Idle,
}

/// How much of `chunk` belongs to the body being copied, and whether the body ends there;
/// `left` counts down a Content-Length, `scan` follows chunked framing.
fn take(
    framing: Framing,
    left: &mut u64,
    scan: &mut ChunkScan,
    chunk: &[u8],
) -> Result<(usize, bool), CopyError> {
    Ok(match framing {
        Framing::Length(_) => {
            let n = (chunk.len() as u64).min(*left);
            *left -= n;
            (n as usize, *left == 0)
        }
        Framing::Chunked => match scan.feed(chunk) {
            Ok(Some(n)) => (n, true),
            Ok(None) => (chunk.len(), false),
            Err(Malformed) => return Err(CopyError::Malformed),
        },
        Framing::Eof => (chunk.len(), false),
    })
}

/// `chunk` framed as one HTTP/1.1 chunk (size line, data, CRLF).
fn chunk_frame(chunk: &[u8]) -> Bytes {
    let mut o = BytesMut::with_capacity(chunk.len() + 20);
    o.put_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
    o.put_slice(chunk);
    o.put_slice(b"\r\n");
    o.freeze()
}

/// Copy one body with `framing` from `src` (whose already-read bytes are at the start of
/// `buf`) to `dst` (`None`: discard it). Bytes after the body stay in `buf`. With
/// `encode_chunks`, the body is written chunked (an end-of-connection delimited response
/// sent on a keep-alive connection). Returns the body's length as received.
pub async fn copy<S: Tunnel, D: Tunnel>(
    src: &mut S,
    buf: &mut BytesMut,
    framing: Framing,
    dst: Option<&mut D>,
    encode_chunks: bool,
) -> Result<u64, CopyError> {
    copy_within(src, buf, framing, dst, encode_chunks, None).await
}

/// `f`'s output, or [`CopyError::Idle`] when it waited `idle` (the clock's bound) without
/// finishing. `None`: no bound.
pub(crate) async fn idle_bound<F: std::future::Future>(
    idle: &mut Option<(&mut Clock, Duration)>,
    f: F,
) -> Result<F::Output, CopyError> {
    idle_out(idle_race(idle, f).await)
}

/// `f` raced with `idle`'s bound ([`Bound`]), held in place by the future awaiting it.
fn idle_race<'a, F: std::future::Future>(
    idle: &'a mut Option<(&mut Clock, Duration)>,
    f: F,
) -> Race<F, Bound<'a>> {
    race(f, Bound::idle(idle.as_mut().map(|(c, d)| (&mut **c, *d))))
}

/// What [`idle_race`] came to: `f`'s output, or [`CopyError::Idle`].
fn idle_out<A>(r: Either<A, ()>) -> Result<A, CopyError> {
    in_time(r).ok_or(CopyError::Idle)
}

/// [`copy`] with each read of `src` and each write to `dst` bounded by `idle` (Envoy's
/// `stream_idle_timeout`, kept on the stream's [`Clock`]: no byte either way that long
/// fails [`CopyError::Idle`]); `None`: no bound.
pub async fn copy_within<S: Tunnel, D: Tunnel>(
    src: &mut S,
    buf: &mut BytesMut,
    framing: Framing,
    mut dst: Option<&mut D>,
    encode_chunks: bool,
    mut idle: Option<(&mut Clock, Duration)>,
) -> Result<u64, CopyError> {
    let mut scan = ChunkScan::default();
    let mut left = match framing {
        Framing::Length(0) => return Ok(0),
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut total = 0u64;
    loop {
        let mut chunk = if !buf.is_empty() {
            buf.split().freeze()
        } else {
            match idle_out(idle_race(&mut idle, src.read()).await)? {
                Some(Ok(b)) => b,
                Some(Err(e)) => return Err(CopyError::Read(e)),
                None if framing == Framing::Eof => {
                    if encode_chunks {
                        if let Some(d) = dst.as_mut() {
                            let end = d.write(Bytes::from_static(b"0\r\n\r\n"));
                            idle_out(idle_race(&mut idle, end).await)?.map_err(CopyError::Write)?;
                        }
                    }
                    return Ok(total);
                }
                None => return Err(CopyError::Truncated),
            }
        };
        let (n, end) = take(framing, &mut left, &mut scan, &chunk)?;
        if n < chunk.len() {
            // The rest belongs to the next message (pipelining).
            buf.extend_from_slice(&chunk.split_off(n));
        }
        total += n as u64;
        if let Some(d) = dst.as_mut() {
            if !chunk.is_empty() {
                let out = if encode_chunks {
                    chunk_frame(&chunk)
                } else {
                    chunk
                };
                idle_out(idle_race(&mut idle, d.write(out)).await)?.map_err(CopyError::Write)?;
            }
        }
        if end {
            return Ok(total);
        }
    }
}

/// [`copy`] of a request body to the upstream `dst`, watching `dst` for an early
/// response: whatever the upstream sends while the body goes out is added to `ubuf`, and
/// once `answered(ubuf)` says a final response has begun the copy stops (the rest of the
/// body is not sent; the upstream connection must not be reused). Returns the body bytes
/// sent and whether the body went out whole.
pub async fn copy_watching<S: Tunnel, D: Tunnel>(
    src: &mut S,
    buf: &mut BytesMut,
    framing: Framing,
    dst: &mut D,
    encode_chunks: bool,
    ubuf: &mut BytesMut,
    mut answered: impl FnMut(&mut BytesMut) -> bool,
) -> Result<(u64, bool), CopyError> {
    let mut scan = ChunkScan::default();
    let mut left = match framing {
        Framing::Length(0) => return Ok((0, true)),
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut total = 0u64;
    // What the upstream sent: `true` when the copy is to stop.
    let mut peer = |w: Watched, ubuf: &mut BytesMut| match w {
        Watched::Written => false,
        Watched::Data(b) => {
            ubuf.extend_from_slice(&b);
            answered(ubuf)
        }
        Watched::End => true,
    };
    loop {
        let mut chunk = if !buf.is_empty() {
            buf.split().freeze()
        } else {
            let got = loop {
                match dst.read_or_source(src).await {
                    Ok(got) => break got,
                    Err(w) => {
                        if peer(w, ubuf) {
                            return Ok((total, false));
                        }
                    }
                }
            };
            match got {
                Some(Ok(b)) => b,
                Some(Err(e)) => return Err(CopyError::Read(e)),
                None if framing == Framing::Eof => {
                    let mut end = if encode_chunks {
                        Bytes::from_static(b"0\r\n\r\n")
                    } else {
                        Bytes::new()
                    };
                    while !end.is_empty() {
                        let w = dst
                            .write_watching(&mut end)
                            .await
                            .map_err(CopyError::Write)?;
                        if peer(w, ubuf) {
                            return Ok((total, false));
                        }
                    }
                    return Ok((total, true));
                }
                None => return Err(CopyError::Truncated),
            }
        };
        let (n, end) = take(framing, &mut left, &mut scan, &chunk)?;
        if n < chunk.len() {
            buf.extend_from_slice(&chunk.split_off(n));
        }
        total += n as u64;
        let mut out = if encode_chunks && !chunk.is_empty() {
            chunk_frame(&chunk)
        } else {
            chunk
        };
        while !out.is_empty() {
            let w = dst
                .write_watching(&mut out)
                .await
                .map_err(CopyError::Write)?;
            if peer(w, ubuf) {
                return Ok((total, false));
            }
        }
        if end {
            return Ok((total, true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(b: &[u8], step: usize) -> Result<Option<usize>, Malformed> {
        let mut s = ChunkScan::default();
        let mut off = 0;
        for piece in b.chunks(step.max(1)) {
            if let Some(n) = s.feed(piece)? {
                return Ok(Some(off + n));
            }
            off += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn chunk_scan_table() {
        let ok: &[(&[u8], usize)] = &[
            (b"0\r\n\r\n", 5),
            (b"0\r\n\r\nGET", 5),
            (
                b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nx-t: 1\r\n\r\nrest",
                38,
            ),
            (b"A\r\n0123456789\r\n0\r\n\r\n", 20),
            (b"1 ; x\r\na\r\n0\r\n\r\n", 15),
            (b"1\t;x=\"q\"\r\na\r\n0\r\n\r\n", 18),
            (b"0\r\nx-t:\r\n\r\n", 11),
            (b"0\r\nx-t: a\tb\r\ny: 2\r\n\r\n", 21),
        ];
        for (input, want) in ok {
            for step in [1, 2, 3, 7, 1000] {
                assert_eq!(
                    scan_all(input, step),
                    Ok(Some(*want)),
                    "{:?} step {step}",
                    String::from_utf8_lossy(input)
                );
            }
        }
        assert_eq!(scan_all(b"4\r\nwik", 2), Ok(None));
        // The largest size that fits 64 bits is accepted (and waits for its data).
        assert_eq!(scan_all(b"ffffffffffffffff\r\nab", 1), Ok(None));
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"4\r\nwikiX\r\n",
            b"4\nwiki",
            b"11111111111111111\r\n",
            b"0\r\n\rX",
            // Smuggling through trailers: bare LF ends nothing here.
            b"0\r\n\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
            b"0\r\nx\n\r\n",
            b"0\r\nx-t: 1\n\r\n",
            b"0\r\nx-t: a\nb\r\n\r\n",
            b"0\r\nno-colon\r\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\nbad name: v\r\n\r\n",
            b"0\r\nx-t: a\x00b\r\n\r\n",
            b"0\r\nx-t: 1\r\n\n",
            b"0\r\n\r\r\n",
            // Chunk sizes: junk before or after, overflow, bare LF in an extension.
            b" 1\r\na\r\n0\r\n\r\n",
            b"+1\r\na\r\n0\r\n\r\n",
            b"1x\r\na\r\n0\r\n\r\n",
            b"1 x\r\na\r\n0\r\n\r\n",
            b"0x1\r\na\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"1;ext\nGET / HTTP/1.1\r\n",
            b"1;e\x01xt\r\na\r\n0\r\n\r\n",
            b"1;ext\r\r\na\r\n0\r\n\r\n",
            b"1\r\na\n0\r\n\r\n",
        ] {
            assert_eq!(scan_all(bad, 1), Err(Malformed), "{bad:?}");
        }
    }
}
