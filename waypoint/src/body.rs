//! HTTP/1.1 message bodies as they pass through: framing, an incremental chunked-body
//! scanner, and the copy of one body from a byte stream to another.
//!
//! Bodies are **streamed**: each chunk read from one side is written to the other before
//! the next is read, so a body of any size needs about one read's worth of memory (the
//! HTTP/2 flow-control window of the CONNECT stream bounds how much is in flight). Chunked
//! bodies are forwarded as received (extensions and trailers kept); the scanner only finds
//! where they end.

use bytes::{BufMut, Bytes, BytesMut};

use crate::http1::Tunnel;

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
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
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

/// A chunked body that is not well formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl ChunkScan {
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
                    b';' | b' ' | b'\t' if self.digits > 0 => {
                        self.state = State::Ext;
                        self.line = 0;
                    }
                    b'\r' if self.digits > 0 => self.state = State::SizeLf,
                    _ => return Err(Malformed),
                },
                State::Ext => match c {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(Malformed),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err(Malformed);
                        }
                    }
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
                    self.state = if c == b'\r' {
                        State::FinalLf
                    } else {
                        State::TrailerLine
                    };
                }
                State::TrailerLine => match c {
                    b'\r' => self.state = State::TrailerLf,
                    _ => {
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err(Malformed);
                        }
                    }
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
}

/// Copy one body with `framing` from `src` (whose already-read bytes are at the start of
/// `buf`) to `dst` (`None`: discard it). Bytes after the body stay in `buf`. With
/// `encode_chunks`, the body is written chunked (an end-of-connection delimited response
/// sent on a keep-alive connection). Returns the body's length as received.
pub async fn copy<S: Tunnel, D: Tunnel>(
    src: &mut S,
    buf: &mut BytesMut,
    framing: Framing,
    mut dst: Option<&mut D>,
    encode_chunks: bool,
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
            match src.read().await {
                Some(Ok(b)) => b,
                Some(Err(e)) => return Err(CopyError::Read(e)),
                None if framing == Framing::Eof => {
                    if encode_chunks {
                        if let Some(d) = dst.as_mut() {
                            d.write(Bytes::from_static(b"0\r\n\r\n"))
                                .await
                                .map_err(CopyError::Write)?;
                        }
                    }
                    return Ok(total);
                }
                None => return Err(CopyError::Truncated),
            }
        };
        let (n, end) = match framing {
            Framing::Length(_) => {
                let n = (chunk.len() as u64).min(left);
                left -= n;
                (n as usize, left == 0)
            }
            Framing::Chunked => match scan.feed(&chunk) {
                Ok(Some(n)) => (n, true),
                Ok(None) => (chunk.len(), false),
                Err(Malformed) => return Err(CopyError::Malformed),
            },
            Framing::Eof => (chunk.len(), false),
        };
        if n < chunk.len() {
            // The rest belongs to the next message (pipelining).
            buf.extend_from_slice(&chunk.split_off(n));
        }
        total += n as u64;
        if let Some(d) = dst.as_mut() {
            if !chunk.is_empty() {
                let out = if encode_chunks {
                    let mut o = BytesMut::with_capacity(chunk.len() + 20);
                    o.put_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    o.put_slice(&chunk);
                    o.put_slice(b"\r\n");
                    o.freeze()
                } else {
                    chunk
                };
                d.write(out).await.map_err(CopyError::Write)?;
            }
        }
        if end {
            return Ok(total);
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
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"4\r\nwikiX\r\n",
            b"4\nwiki",
            b"11111111111111111\r\n",
            b"0\r\n\rX",
        ] {
            assert_eq!(scan_all(bad, 1), Err(Malformed), "{bad:?}");
        }
    }
}
