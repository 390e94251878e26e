//! HTTP/1.1 for the `http1-rps` and `large-body` scenarios: the backend's server side
//! ([`serve`]) and the generator's client side ([`Client`]), keep-alive, heads parsed with
//! `httparse`, bodies framed by `content-length` only (the bench never sends chunked bodies;
//! a chunked response from a proxy is decoded by [`Client`]).
//!
//! Protocol of the bench's HTTP backend: a request with a body gets that body back as the
//! response body (so every byte can be checked); `GET /N` gets `N` bytes of a pattern the
//! client checks; `400` and a close for anything unparsable.

use std::time::Duration;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::time::timeout;

const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest head accepted either way.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body the backend will produce or echo.
pub const MAX_BODY: usize = 64 << 20;
const MAX_HEADERS: usize = 32;
/// [`Client::exchange_metered`]: request body bytes per write.
pub const METER_CHUNK: usize = 64 * 1024;

/// Byte `i` of a generated body.
pub fn pattern(i: usize) -> u8 {
    b'a' + (i % 26) as u8
}

/// Read more bytes, appended to `buf`. `Ok(0)` at end of file.
async fn read_more(s: &mut TcpStream, mut buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (r, sl) = s.read(buf.slice_mut(len..cap)).await;
    (r, sl.into_inner())
}

/// Head fields the bench cares about.
struct Head {
    len: usize,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
    /// Request path (server side) or status (client side).
    path: String,
    status: u16,
}

fn fields(headers: &[httparse::Header<'_>]) -> Result<(Option<usize>, bool, bool), String> {
    let mut cl = None;
    let (mut chunked, mut close) = (false, false);
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("bad content-length")?;
            cl = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    Ok((cl, chunked, close))
}

fn parse_request(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let (cl, chunked, close) = fields(req.headers)?;
            Ok(Some(Head {
                len: n,
                content_length: cl,
                chunked,
                close,
                path: req.path.unwrap_or("/").to_string(),
                status: 0,
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => Err("head too large".into()),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_response(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hs);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let (cl, chunked, close) = fields(resp.headers)?;
            Ok(Some(Head {
                len: n,
                content_length: cl,
                chunked,
                close,
                path: String::new(),
                status: resp.code.unwrap_or(0),
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => Err("head too large".into()),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The backend's side: serve requests on `s` until the client closes. `false` when the
/// connection ended in a protocol error or a timeout.
pub async fn serve(mut s: TcpStream) -> bool {
    let _ = s.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        // Head.
        let head = loop {
            match parse_request(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(_) => {
                    let msg = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    let _ = timeout(OP_TIMEOUT, s.write_all(msg.to_vec())).await;
                    return false;
                }
            }
            let before = buf.len();
            let wait = if buf.is_empty() {
                crate::backend::IDLE_TIMEOUT
            } else {
                OP_TIMEOUT
            };
            let idle = buf.is_empty();
            let Ok((r, b)) = timeout(wait, read_more(&mut s, buf)).await else {
                // Idle between requests: a kept connection closed quietly; mid-request: an error.
                return idle;
            };
            buf = b;
            match r {
                Ok(_) if buf.len() > before => {}
                // Closed (FIN or reset) between requests: a proxy closing an idle upstream
                // connection, not an error. Mid-request it is one.
                Ok(_) | Err(_) => return buf.is_empty(),
            }
        };
        if head.chunked {
            let msg = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
            let _ = timeout(OP_TIMEOUT, s.write_all(msg.to_vec())).await;
            return false;
        }
        let cl = head.content_length.unwrap_or(0);
        if cl > MAX_BODY {
            return false;
        }
        // Body.
        while buf.len() < head.len + cl {
            let Ok((r, b)) = timeout(OP_TIMEOUT, read_more(&mut s, buf)).await else {
                return false;
            };
            buf = b;
            match r {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        let body_len = if cl > 0 {
            cl
        } else {
            head.path
                .trim_start_matches('/')
                .split(['?', '/'])
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
                .min(MAX_BODY)
        };
        let mut out = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\ncontent-type: application/octet-stream\r\n{}\r\n",
            if head.close { "connection: close\r\n" } else { "" }
        )
        .into_bytes();
        if cl > 0 {
            out.extend_from_slice(&buf[head.len..head.len + cl]);
        } else {
            out.extend((0..body_len).map(pattern));
        }
        buf.drain(..head.len + cl);
        let Ok((r, _)) = timeout(OP_TIMEOUT, s.write_all(out)).await else {
            return false;
        };
        if r.is_err() {
            return false;
        }
        if head.close {
            return true;
        }
    }
}

/// One request's outcome on the client side.
pub struct Exchange {
    /// Body bytes received (checked against what was expected).
    pub body: usize,
}

/// The generator's side of one keep-alive connection.
pub struct Client {
    pub s: TcpStream,
    buf: Vec<u8>,
    req: Vec<u8>,
    /// Expected response body length.
    want: usize,
    /// Request body length (the tail of `req`).
    req_body: usize,
}

impl Client {
    /// `GET /resp` when `req_body` is 0, else `POST /` with `req_body` pattern bytes (echoed);
    /// `headers` after `host`.
    pub fn new(
        s: TcpStream,
        host: &str,
        headers: &[(String, String)],
        req_body: usize,
        resp_body: usize,
    ) -> Client {
        let extra: String = headers
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect();
        let mut req = if req_body > 0 {
            format!("POST / HTTP/1.1\r\nhost: {host}\r\n{extra}content-length: {req_body}\r\n\r\n")
                .into_bytes()
        } else {
            format!("GET /{resp_body} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n").into_bytes()
        };
        req.extend((0..req_body).map(pattern));
        Client {
            s,
            buf: Vec::with_capacity(16 * 1024),
            req,
            want: if req_body > 0 { req_body } else { resp_body },
            req_body,
        }
    }

    /// Send the request, read the whole response; check status 200 and every body byte.
    pub async fn exchange(&mut self) -> Result<Exchange, String> {
        self.exchange_metered(&mut |_| {}).await
    }

    /// [`Client::exchange`], telling `moved` each time body bytes have gone out (request
    /// body, written in [`METER_CHUNK`] pieces) or come in (response body, each read; a
    /// chunked response's framing counts as body), so a caller can count the bytes of
    /// exchanges that straddle its window's edges (`large-body`).
    pub async fn exchange_metered(
        &mut self,
        moved: &mut dyn FnMut(usize),
    ) -> Result<Exchange, String> {
        let req = std::mem::take(&mut self.req);
        let head_len = req.len() - self.req_body;
        let mut off = 0;
        let mut req = req;
        while off < req.len() {
            // The head and the first piece of the body together, then the body piecewise.
            let end = if off == 0 {
                (head_len + METER_CHUNK).min(req.len())
            } else {
                (off + METER_CHUNK).min(req.len())
            };
            let (r, sl) = match timeout(OP_TIMEOUT, self.s.write_all(req.slice(off..end))).await {
                Ok(x) => x,
                Err(_) => return Err("write: timed out".into()),
            };
            req = sl.into_inner();
            if let Err(e) = r {
                self.req = req;
                return Err(format!("write: {e}"));
            }
            moved(end - off.max(head_len));
            off = end;
        }
        self.req = req;
        let head = loop {
            match parse_response(&self.buf) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => return Err(format!("bad response head: {e}")),
            }
            self.fill().await?;
        };
        // What arrived with the head is body: counted now, the rest as each read ends.
        let mut counted = 0;
        let mut count = |buf_len: usize, limit: usize| {
            let now = buf_len.saturating_sub(head.len).min(limit);
            if now > counted {
                moved(now - counted);
                counted = now;
            }
        };
        if head.status != 200 {
            return Err(format!("status {}", head.status));
        }
        let mut got: Vec<u8>;
        if head.chunked {
            got = Vec::new();
            let mut pos = head.len;
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf[pos..].windows(2).position(|w| w == b"\r\n") {
                        break pos + i;
                    }
                    self.fill().await?;
                };
                let size_txt = std::str::from_utf8(&self.buf[pos..line_end])
                    .map_err(|_| "bad chunk size")?
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let size = usize::from_str_radix(&size_txt, 16)
                    .map_err(|_| format!("bad chunk size {size_txt:?}"))?;
                pos = line_end + 2;
                count(self.buf.len(), usize::MAX);
                while self.buf.len() < pos + size + 2 {
                    self.fill().await?;
                    count(self.buf.len(), usize::MAX);
                }
                got.extend_from_slice(&self.buf[pos..pos + size]);
                pos += size + 2;
                if size == 0 {
                    break;
                }
            }
            self.buf.drain(..pos);
        } else {
            let cl = head
                .content_length
                .ok_or("response without content-length or chunked")?;
            count(self.buf.len(), cl);
            while self.buf.len() < head.len + cl {
                self.fill().await?;
                count(self.buf.len(), cl);
            }
            got = self.buf[head.len..head.len + cl].to_vec();
            self.buf.drain(..head.len + cl);
        }
        if got.len() != self.want {
            return Err(format!(
                "response body of {} bytes, expected {}",
                got.len(),
                self.want
            ));
        }
        if got.iter().enumerate().any(|(i, b)| *b != pattern(i)) {
            return Err("response body differs from what was expected".into());
        }
        if head.close {
            return Err("server closed the keep-alive connection".into());
        }
        Ok(Exchange { body: got.len() })
    }

    async fn fill(&mut self) -> Result<(), String> {
        let buf = std::mem::take(&mut self.buf);
        let (r, b) = match timeout(OP_TIMEOUT, read_more(&mut self.s, buf)).await {
            Ok(x) => x,
            Err(_) => return Err("read: no answer within 30 s".into()),
        };
        self.buf = b;
        match r {
            Ok(0) => Err("connection closed mid-response".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::driver::{self, DriverChoice};

    /// Over a real loopback connection to [`serve`]: the bytes [`Client::exchange_metered`]
    /// reports add up to exactly the body bytes each way (1 MiB up and echoed: many pieces;
    /// a `GET`: the response body only), exchange after exchange on one keep-alive connection.
    #[test]
    fn metered_exchange_reports_every_body_byte_once() {
        let decision = driver::decide(DriverChoice::Auto, 256).expect("a driver");
        let (mut rt, _) = driver::build_runtime(&decision, 256).expect("a runtime");
        rt.block_on(async {
            for (req_body, resp_body) in [(1usize << 20, 1usize << 20), (0, 300_000), (0, 0)] {
                let l = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                let addr = l.local_addr().expect("address");
                let server = monoio::spawn(async move {
                    let (s, _) = l.accept().await.expect("accept");
                    serve(s).await
                });
                let s = TcpStream::connect(addr).await.expect("connect");
                let mut c = Client::new(s, "test", &[], req_body, resp_body);
                for _ in 0..3 {
                    let (mut total, mut pieces) = (0usize, 0usize);
                    let x = c
                        .exchange_metered(&mut |n| {
                            total += n;
                            pieces += 1;
                        })
                        .await
                        .expect("exchange");
                    assert_eq!(x.body, resp_body);
                    assert_eq!(total, req_body + resp_body, "body bytes reported");
                    if req_body > 0 {
                        assert!(
                            pieces >= req_body / METER_CHUNK,
                            "the request body is written in pieces ({pieces} reported)"
                        );
                    }
                }
                drop(c);
                assert!(
                    server.await,
                    "the backend saw a clean keep-alive connection"
                );
            }
        });
    }
}
