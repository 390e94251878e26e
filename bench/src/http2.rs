//! HTTP/2 (cleartext, prior knowledge) for `http2-rps`: the backend's server ([`serve`]) and
//! the generator's connection ([`connect`]), with the stock `h2` crate on monoio's poll-io
//! compatibility layer (as `hbone` runs it). The backend answers `GET /N` with `N` pattern
//! bytes ([`crate::http1::pattern`]); the client checks every byte.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;
use monoio::time::timeout;

use crate::http1::pattern;

const OP_TIMEOUT: Duration = Duration::from_secs(30);

fn body_len(path: &str) -> usize {
    path.trim_start_matches('/')
        .split(['?', '/'])
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
        .min(crate::http1::MAX_BODY)
}

/// The backend's side of one connection; `false` on a protocol error.
pub async fn serve(s: TcpStream) -> bool {
    let _ = s.set_nodelay(true);
    let Ok(io) = s.into_poll_io() else {
        return false;
    };
    let Ok(Ok(mut conn)) = timeout(OP_TIMEOUT, h2::server::handshake(io)).await else {
        return false;
    };
    // Streams still being answered: a connection that ends with none (a proxy closing an
    // idle upstream connection, with a reset passed on by a tunnel) is a close, not an
    // error, as between HTTP/1.1 requests; the clients check every response they get.
    let open = std::rc::Rc::new(std::cell::Cell::new(0usize));
    while let Some(req) = conn.accept().await {
        let (req, mut respond) = match req {
            Ok(x) => x,
            Err(e) if e.is_io() && open.get() == 0 => return true,
            Err(e) => {
                eprintln!("bench: backend h2 connection: {e}");
                return false;
            }
        };
        open.set(open.get() + 1);
        let open = open.clone();
        monoio::spawn(async move {
            answer(req, &mut respond).await;
            open.set(open.get() - 1);
        });
    }
    true
}

/// One request's answer: its body drained (window given back), then `n` pattern bytes
/// (from the path) with their length.
async fn answer(req: http::Request<h2::RecvStream>, respond: &mut h2::server::SendResponse<Bytes>) {
    let n = body_len(req.uri().path());
    let mut body = req.into_body();
    while let Some(chunk) = body.data().await {
        let Ok(c) = chunk else { return };
        let _ = body.flow_control().release_capacity(c.len());
    }
    let resp = http::Response::builder()
        .status(200)
        .header("content-length", n)
        .body(())
        .expect("static response");
    let Ok(mut send) = respond.send_response(resp, n == 0) else {
        return;
    };
    if n > 0 {
        let data: Bytes = (0..n).map(pattern).collect::<Vec<u8>>().into();
        let _ = send.send_data(data, true);
    }
}

/// A client connection: `SendRequest` handle (clone per stream loop); the connection is
/// driven by a task on this thread.
/// `s`: the connection to `target` (made by the generator, through SOCKS5 if need be).
pub async fn connect(
    target: SocketAddr,
    s: Result<TcpStream, String>,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let s = s?;
    let _ = target;
    let _ = s.set_nodelay(true);
    let io = s.into_poll_io().map_err(|e| format!("poll io: {e}"))?;
    let (send, conn) = match timeout(OP_TIMEOUT, h2::client::handshake(io)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Err(format!("h2 handshake: {e}")),
        Err(_) => return Err("h2 handshake: timed out".into()),
    };
    monoio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// One request on `send`: `GET /n`, read and check the body. Returns the body length.
pub async fn request(
    send: &mut h2::client::SendRequest<Bytes>,
    authority: &str,
    headers: &[(String, String)],
    n: usize,
) -> Result<usize, String> {
    let fut = async {
        let mut s = send
            .clone()
            .ready()
            .await
            .map_err(|e| format!("h2 ready: {e}"))?;
        let mut req = http::Request::builder()
            .method("GET")
            .uri(format!("http://{authority}/{n}"));
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(()).map_err(|e| e.to_string())?;
        let (resp, _) = s
            .send_request(req, true)
            .map_err(|e| format!("h2 send: {e}"))?;
        let resp = resp.await.map_err(|e| format!("h2 response: {e}"))?;
        if resp.status() != 200 {
            return Err(format!("status {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut got = 0usize;
        while let Some(chunk) = body.data().await {
            let c = chunk.map_err(|e| format!("h2 body: {e}"))?;
            if c.iter().enumerate().any(|(i, b)| *b != pattern(got + i)) {
                return Err("response body differs from what was expected".into());
            }
            got += c.len();
            let _ = body.flow_control().release_capacity(c.len());
        }
        if got != n {
            return Err(format!("response body of {got} bytes, expected {n}"));
        }
        *send = s;
        Ok(got)
    };
    match timeout(OP_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err("h2 request: no answer within 30 s".into()),
    }
}
