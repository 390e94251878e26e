//! HTTP/2 (prior knowledge) inside a tunnel: the stock `h2` server over the CONNECT stream
//! ([`crate::inner::StreamIo`]), each request stream handled concurrently with the same
//! policy-first decision as HTTP/1.1 ([`crate::http1::decide`]: R15, then R16/R17 routing,
//! filters, load balancing).
//!
//! **Upstream protocol** (as Istio chooses it): HTTP/1.1 by default — over HBONE, through
//! the same [`Upstream`] as HTTP/1.1 requests, keep-alive streams shared by the tunnel —
//! and HTTP/2 when the client spoke HTTP/2 and the service's DestinationRule sets
//! `trafficPolicy.connectionPool.http.useClientProtocol: true`: then requests are
//! multiplexed on one HTTP/2 connection per worker and endpoint (one HBONE stream). The
//! response is converted back to HTTP/2 (hop-by-hop headers dropped, chunked bodies
//! decoded).
//!
//! Protocol errors (invalid frames, bad preface after detection, …) make the `h2` server
//! send GOAWAY and end the tunnel; the worker keeps serving others. A request whose headers
//! cannot be represented in HTTP/1.1 is answered `400`.

use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use hbone::H2Settings;

use crate::config::WaypointConfig;
use crate::http1::{self, Action, RequestHead, TunnelCtx, Upstream};
use crate::inner::StreamIo;
use crate::lb::SplitMix64;

/// The largest request body buffered for one HTTP/2 request.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Hop-by-hop headers that HTTP/2 forbids (RFC 9113 §8.2.2).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// How an HTTP/2 tunnel ended.
#[derive(Debug)]
pub enum H2End {
    /// The client closed the connection.
    Closed,
    /// A protocol error: GOAWAY was sent.
    Error(h2::Error),
}

/// Serve HTTP/2 on one tunnel until the client closes it or a protocol error.
/// `new_upstream` makes the upstream of one request stream; `bad_requests` counts
/// requests answered `400` here.
pub async fn serve<U, F>(
    io: StreamIo,
    settings: &H2Settings,
    cfg: Arc<WaypointConfig>,
    ctx: Rc<TunnelCtx>,
    mut new_upstream: F,
    on_bad: Rc<dyn Fn()>,
) -> H2End
where
    U: Upstream + 'static,
    F: FnMut() -> (U, SplitMix64),
{
    let mut conn = match settings.server_builder().handshake::<_, Bytes>(io).await {
        Ok(c) => c,
        Err(e) => return H2End::Error(e),
    };
    loop {
        match conn.accept().await {
            None => return H2End::Closed,
            Some(Err(e)) => return H2End::Error(e),
            Some(Ok((req, respond))) => {
                let (up, rng) = new_upstream();
                let (cfg, ctx, on_bad) = (cfg.clone(), ctx.clone(), on_bad.clone());
                monoio::spawn(async move {
                    request(&cfg, &ctx, up, rng, req, respond, &*on_bad).await;
                });
            }
        }
    }
}

/// The request head as HTTP/1.1 sees it (`:authority` as `host`), or `None` when a
/// header value is not text.
fn head_of(parts: &http::request::Parts, body_len: usize) -> Option<RequestHead> {
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if !target.starts_with('/') {
        return None;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let mut headers = Vec::with_capacity(parts.headers.len() + 2);
    let host = match parts.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => parts.headers.get("host")?.to_str().ok()?.to_string(),
    };
    headers.push(("host".to_string(), host));
    for (n, v) in &parts.headers {
        let n = n.as_str();
        if n == "host" || n == "content-length" || HOP_BY_HOP.contains(&n) {
            continue;
        }
        headers.push((n.to_string(), v.to_str().ok()?.to_string()));
    }
    if body_len > 0 || !matches!(parts.method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS") {
        headers.push(("content-length".into(), body_len.to_string()));
    }
    Some(RequestHead {
        method: parts.method.as_str().to_string(),
        path,
        query,
        version: 1,
        headers,
    })
}

async fn read_body(body: &mut RecvStream) -> Result<BytesMut, u16> {
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|_| 400u16)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if data.len() + chunk.len() > MAX_BODY {
            return Err(413);
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

async fn request<U: Upstream>(
    cfg: &WaypointConfig,
    ctx: &TunnelCtx,
    mut up: U,
    mut rng: SplitMix64,
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    on_bad: &dyn Fn(),
) {
    let (parts, mut body) = req.into_parts();
    let head_request = parts.method == http::Method::HEAD;
    let data = match read_body(&mut body).await {
        Ok(d) => d,
        Err(status) => {
            on_bad();
            send(&mut respond, status_only(status), head_request).await;
            return;
        }
    };
    let started = std::time::Instant::now();
    let Some(mut head) = head_of(&parts, data.len()) else {
        on_bad();
        send(&mut respond, status_only(400), head_request).await;
        return;
    };
    let traceparent = http1::trace(&mut head, ctx.traceparent.as_deref(), &mut rng);
    let head_len: usize = head
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum::<usize>()
        + head.method.len()
        + head.path.len()
        + 12;
    let mut denied = false;
    let (resp, flags) = match http1::decide(cfg, ctx, &head, &mut rng) {
        Action::Respond(bytes) => {
            let status = resp_status(&bytes);
            denied = status == 403;
            (bytes, http1::local_flags(status))
        }
        Action::Forward { forward, request } => {
            let has_body = !data.is_empty();
            let mut req = BytesMut::from(&request[..]);
            req.extend_from_slice(&data);
            http1::execute(
                &mut up,
                &forward,
                req.freeze(),
                &head.method,
                has_body,
                &mut rng,
            )
            .await
        }
    };
    let status = resp_status(&resp);
    let response_bytes = resp.len() as u64;
    send(&mut respond, resp, head_request).await;
    up.record(&http1::Record {
        protocol: "HTTP/2",
        method: &head.method,
        host: head.header("host").unwrap_or(""),
        path: &http1::target_of(&head),
        status,
        flags,
        request_bytes: (head_len + data.len()) as u64,
        response_bytes,
        started,
        traceparent: &traceparent,
        denied,
    });
}

fn resp_status(resp: &[u8]) -> u16 {
    resp.get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn status_only(status: u16) -> Vec<u8> {
    http1::simple_response(status, &[], "", false)
}

/// Send a complete HTTP/1.1 response (head and body) as an HTTP/2 response.
async fn send(respond: &mut SendResponse<Bytes>, h1: Vec<u8>, head_request: bool) {
    let Some((resp, body)) = to_h2(&h1, head_request) else {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    let end = body.is_empty();
    let Ok(mut stream) = respond.send_response(resp, end) else {
        return;
    };
    if !end {
        let mut body = body;
        while !body.is_empty() {
            stream.reserve_capacity(body.len());
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let chunk = body.split_to(cap.min(body.len()));
                    if stream.send_data(chunk, body.is_empty()).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }
}

/// Parse an HTTP/1.1 response into an HTTP/2 head and a decoded body.
pub fn to_h2(h1: &[u8], head_request: bool) -> Option<(http::Response<()>, Bytes)> {
    let mut hs = [httparse::EMPTY_HEADER; 256];
    let mut r = httparse::Response::new(&mut hs);
    let httparse::Status::Complete(n) = r.parse(h1).ok()? else {
        return None;
    };
    let mut b = http::Response::builder().status(r.code?);
    let mut chunked = false;
    for h in r.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name == "transfer-encoding" {
            chunked = String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked");
            continue;
        }
        if HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        b = b.header(name, h.value);
    }
    let raw = &h1[n..];
    let body = if head_request {
        Bytes::new()
    } else if chunked {
        Bytes::from(dechunk(raw)?)
    } else {
        Bytes::copy_from_slice(raw)
    };
    Some((b.body(()).ok()?, body))
}

/// Decode a complete chunked body (trailers dropped).
pub fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 || &b[size..size + 2] != b"\r\n" {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}
