//! HBONE client connections: TCP → TLS (our workload cert, SPIFFE-verified peer) → h2.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::SendStream;
use monoio::net::TcpStream;
use runtime::listener::ListenOptions;
use runtime::worker::{race, Either};
use rustls_pki_types::ServerName;

use crate::error::HboneError;
use crate::settings::H2Settings;
use crate::stream::H2Stream;
use crate::tls::TlsCounters;
use crate::wire::ConnectRequest;

/// One HTTP/2 connection to an HBONE server. Cheap to clone (shares the connection).
#[derive(Clone)]
pub struct Client {
    send: SendRequest<Bytes>,
    closed: Rc<Cell<bool>>,
    peer: SocketAddr,
    /// `h2.handshake_timeout`: how long a CONNECT waits for its reply (0: no limit).
    reply_timeout: std::time::Duration,
}

/// Random bytes for trace ids (`traceparent`): unique, not secret, so a per-thread
/// splitmix64 stream seeded once from the system's generator instead of a `getrandom`
/// syscall per stream.
fn random_fill(b: &mut [u8]) {
    thread_local! {
        static STATE: Cell<u64> = const { Cell::new(0) };
    }
    STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            let mut seed = [0u8; 8];
            let _ = crate::tls::provider().secure_random.fill(&mut seed);
            x = u64::from_ne_bytes(seed) | 1;
        }
        for chunk in b.chunks_mut(8) {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_ne_bytes()[..chunk.len()]);
        }
        s.set(x);
    });
}

/// Socket options for a client connection made without the worker's: `TCP_NODELAY`, the
/// kernel's buffer autotuning, no keepalive probes.
pub fn default_socket_options() -> ListenOptions {
    ListenOptions {
        backlog: 0,
        nodelay: true,
        keepalive: None,
        cpu_steering: false,
        recv_buffer: None,
        send_buffer: None,
        congestion: None,
        transparent: false,
    }
}

impl Client {
    /// Connect to `addr`, authenticating with `tls` (built by `tls::client_config` for the
    /// expected peer identities), with [`default_socket_options`].
    pub async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        settings: &H2Settings,
        counters: &TlsCounters,
    ) -> Result<Client, HboneError> {
        Self::connect_with(addr, tls, settings, counters, &default_socket_options()).await
    }

    /// [`Client::connect`] with the worker's socket options (`WorkerCtx::listen_options`:
    /// nodelay, keepalive, `SO_RCVBUF`/`SO_SNDBUF`), applied to the socket as
    /// `runtime::listener::connect` does for any connected socket.
    pub async fn connect_with(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        settings: &H2Settings,
        counters: &TlsCounters,
        opts: &ListenOptions,
    ) -> Result<Client, HboneError> {
        Ok(Self::establish(addr, tls, settings, counters, opts, None)
            .await?
            .0)
    }

    /// [`Client::connect`] and open a first stream with `req` (`early`: the client's
    /// first bytes sent ahead of the reply). The TLS Finished, the h2 preface and SETTINGS
    /// and the CONNECT request leave in one packet (a separate `open` after `connect` costs
    /// one more).
    pub async fn connect_and_open(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        settings: &H2Settings,
        counters: &TlsCounters,
        opts: &ListenOptions,
        req: &ConnectRequest,
        early: Option<&mut Early<'_>>,
    ) -> Result<(Client, H2Stream), HboneError> {
        let req = connect_request(req)?;
        let (client, first) =
            Self::establish(addr, tls, settings, counters, opts, Some(req)).await?;
        let (resp, stream) = first.expect("a first request was asked for");
        let stream = answered_with(resp, stream, early).await?;
        Ok((client, stream))
    }

    /// TCP connect, TLS, HTTP/2 handshake (and the first request's send, when asked for)
    /// within `settings.handshake_timeout`: a peer that accepts and never answers (or
    /// stalls mid-handshake) fails with [`HboneError::HandshakeTimeout`], the socket closed.
    pub(crate) async fn establish(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        settings: &H2Settings,
        counters: &TlsCounters,
        opts: &ListenOptions,
        first: Option<http::Request<()>>,
    ) -> Result<(Client, Option<FirstRequest>), HboneError> {
        let setup = Self::establish_now(addr, tls, settings, counters, opts, first);
        settings.within_handshake_deadline(addr, setup).await
    }

    async fn establish_now(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        settings: &H2Settings,
        counters: &TlsCounters,
        opts: &ListenOptions,
        first: Option<http::Request<()>>,
    ) -> Result<(Client, Option<FirstRequest>), HboneError> {
        let tcp = runtime::listener::connect(addr, opts)
            .await
            .map_err(|e| HboneError::Connect(addr, e))?;
        settings
            .tune_socket(&tcp)
            .map_err(|e| HboneError::Connect(addr, e))?;
        // Our writes after the server's flight (TLS Finished, h2 preface, SETTINGS, the
        // first HEADERS) wait for one flush, below.
        let (io, hold) = crate::stream::TcpIo::held_after_first_read(tcp);
        let mut tls_stream = match tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::IpAddress(addr.ip().into()), io)
            .await
        {
            Ok(s) => s,
            Err(e) => return Err(HboneError::from_tls_io(e, counters)),
        };
        crate::tls::note_handshake(addr, tls_stream.get_ref().1, counters);
        if tls_stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(HboneError::Protocol(
                "server did not negotiate ALPN h2".into(),
            ));
        }
        tls_stream
            .get_mut()
            .1
            .set_buffer_limit(Some(settings.tls_send_buffer));
        let (send, mut conn) = settings
            .client_builder()
            .handshake::<_, Bytes>(crate::stream::H2Io(tls_stream))
            .await?;
        let first = match first {
            Some(req) => {
                let mut ready = send.clone().ready().await?;
                let (resp, stream) = ready.send_request(req, false)?;
                Some((
                    Reply {
                        resp,
                        peer: addr,
                        timeout: settings.handshake_timeout,
                    },
                    stream,
                ))
            }
            None => None,
        };
        // The connection task's first flush sends everything gathered.
        drop(hold);
        let closed = Rc::new(Cell::new(false));
        let flag = closed.clone();
        let ping = conn.ping_pong();
        let (interval, timeout) = (settings.ping_interval, settings.ping_timeout);
        monoio::spawn(async move {
            let keepalive = crate::server::keepalive(ping, interval, timeout);
            let r = runtime::worker::race(conn, keepalive).await;
            if let runtime::worker::Either::Left(Err(e)) = r {
                tracing::debug!(error = %e, "hbone client connection ended");
            }
            flag.set(true);
        });
        Ok((
            Client {
                send,
                closed,
                peer: addr,
                reply_timeout: settings.handshake_timeout,
            },
            first,
        ))
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The connection has ended (GOAWAY + streams done, error, or keepalive timeout).
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Open a CONNECT stream; fails with `HboneError::Status` unless the server answers 200.
    pub async fn open(&self, req: &ConnectRequest) -> Result<H2Stream, HboneError> {
        let (reply, stream) = self.send_connect(req).await?;
        answered(reply, stream).await
    }

    /// Send a CONNECT, its reply not awaited yet.
    pub(crate) async fn send_connect(
        &self,
        req: &ConnectRequest,
    ) -> Result<FirstRequest, HboneError> {
        let req = connect_request(req)?;
        let mut send = self.send.clone().ready().await?;
        let (resp, stream) = send.send_request(req, false)?;
        let reply = Reply {
            resp,
            peer: self.peer,
            timeout: self.reply_timeout,
        };
        Ok((reply, stream))
    }
}

/// `req` as the HTTP/2 CONNECT to send; a header value it cannot carry (a control character
/// in the `forwarded` host or a baggage field) refuses the stream with a protocol error
/// naming the header, rather than sending the request without it.
pub(crate) fn connect_request(req: &ConnectRequest) -> Result<http::Request<()>, HboneError> {
    req.try_to_http(random_fill)
        .map_err(|e| HboneError::Protocol(e.to_string()))
}

/// A first request sent with the connection's setup, its answer not awaited yet.
pub(crate) type FirstRequest = (Reply, SendStream<Bytes>);

/// A CONNECT's pending reply and how long it may take.
pub(crate) struct Reply {
    resp: h2::client::ResponseFuture,
    peer: SocketAddr,
    timeout: std::time::Duration,
}

/// The stream once the server answered 200; `HboneError::Status` otherwise, and
/// [`HboneError::ReplyTimeout`] when no reply came within `h2.handshake_timeout` (the
/// stream is reset: a server stuck connecting to its destination does not hold the opener).
pub(crate) async fn answered(
    reply: Reply,
    stream: SendStream<Bytes>,
) -> Result<H2Stream, HboneError> {
    answered_with(reply, stream, None).await
}

/// [`answered`], sending `early`'s bytes on the stream while the reply is awaited.
pub(crate) async fn answered_with(
    reply: Reply,
    mut stream: SendStream<Bytes>,
    early: Option<&mut Early<'_>>,
) -> Result<H2Stream, HboneError> {
    let Reply {
        resp,
        peer,
        timeout,
    } = reply;
    let wait = async {
        let mut resp = resp;
        if let Some(early) = early {
            if early.data.is_none() {
                // The client's first bytes, if they come before the reply (the reply
                // first: the bridge forwards them, as without `early`).
                match race(&mut resp, early.tcp.readable(false)).await {
                    Either::Left(r) => return r.map_err(HboneError::from),
                    Either::Right(r) => early.read(r)?,
                }
            }
            if let Some(data) = early.data.clone().filter(|d| !d.is_empty()) {
                if let Err(e) = crate::stream::send_all(&mut stream, data, false).await {
                    // A server that refused the stream may have reset it once answered:
                    // its answer says why.
                    return match resp.await {
                        Ok(r) if r.status() != http::StatusCode::OK => Ok(r),
                        _ => Err(HboneError::from(e)),
                    };
                }
            }
        }
        resp.await.map_err(HboneError::from)
    };
    // Raced in place (held once: this future waits in every opener while it is pending).
    let resp = match race(wait, crate::settings::Deadline::after(timeout)).await {
        Either::Left(r) => r?,
        Either::Right(()) => {
            return Err(HboneError::ReplyTimeout {
                peer,
                after: timeout,
            })
        }
    };
    if resp.status() != http::StatusCode::OK {
        return Err(HboneError::Status(resp.status()));
    }
    Ok(H2Stream::new(stream, resp.into_body()))
}

/// The client's first bytes, sent on a CONNECT stream ahead of its reply: a client that
/// speaks first (an HTTP request, a TLS ClientHello) has them at the server while it
/// connects to the destination, instead of one more round trip between the two ends after
/// the `200`. A server that refuses the stream drops them, and the client's connection is
/// refused as before.
///
/// Read once, at most [`EARLY_MAX`] bytes, only if they arrived before the reply; kept for
/// a retry on another connection (the pool's), so they go on whichever stream is answered.
pub struct Early<'a> {
    tcp: &'a TcpStream,
    data: Option<Bytes>,
}

/// The most a client's early bytes take: one read.
pub const EARLY_MAX: usize = 16 * 1024;

impl<'a> Early<'a> {
    /// Early bytes from `tcp`, the client connection the stream will carry.
    pub fn new(tcp: &'a TcpStream) -> Self {
        Early { tcp, data: None }
    }

    /// The bytes sent ahead of the reply (to count with what the bridge moves after).
    pub fn sent(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64)
    }

    /// One non-blocking read once `tcp` was readable (`ready`). End of stream or no bytes
    /// after all: none early (the bridge sees the end again). A failed connection ends the
    /// open: [`HboneError::Client`].
    fn read(&mut self, ready: std::io::Result<()>) -> Result<(), HboneError> {
        ready.map_err(HboneError::Client)?;
        let mut buf = bytes::BytesMut::with_capacity(EARLY_MAX);
        let fd = std::os::fd::AsRawFd::as_raw_fd(self.tcp);
        match runtime::sys::recv_spare(fd, &mut buf, EARLY_MAX) {
            Ok(_) => self.data = Some(buf.freeze()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(HboneError::Client(e)),
        }
        Ok(())
    }
}
