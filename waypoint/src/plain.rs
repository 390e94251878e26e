//! Endpoints outside the mesh (R1, R5): a workload its node's ztunnel does not capture
//! speaks no HBONE, so the waypoint reaches it as Envoy-based waypoints reach endpoints
//! without Istio's mTLS: a plain TCP connection to `ip:targetPort`, or TLS the waypoint
//! originates itself (a DestinationRule's `tls.mode: SIMPLE`, [`Origination`]) — Istio's
//! egress through a waypoint (a ServiceEntry bound to it).
//!
//! [`UpStream`] is what every upstream exchange runs on: an HBONE CONNECT stream to a
//! captured pod, or a [`PlainConn`]; both read and write as byte streams, and both are
//! kept idle per worker between HTTP/1.1 exchanges.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::Reason;
use hbone::stream::{H2Stream, TcpIo};
use runtime::forward::{drive, DirEnd, Outcome};
use runtime::listener::ListenOptions;
use runtime::worker::{race, Either};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http1::{self, Tunnel, Watched};

/// How long a connection outside the mesh may take to connect (and to finish its TLS
/// handshake) when the service's DestinationRule sets no `connectTimeout`: Istio's default
/// `connectTimeout`, 10 s. Past it: `503`, flag `UF`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The least a read asks the socket for (and the allocation it reads into, reused once
/// every chunk handed out of it is gone).
const READ_CHUNK: usize = 16 * 1024;

/// TLS the waypoint originates to an endpoint outside the mesh: the client configuration
/// (roots, ALPN) and the name the server's certificate must carry (also sent as SNI).
#[derive(Clone)]
pub struct Origination {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for Origination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origination")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A byte stream [`PlainConn`] runs on: the socket, or TLS over it.
trait ByteIo: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> ByteIo for T {}

/// A connection to an endpoint outside the mesh. Readiness-based underneath
/// ([`hbone::stream::TcpIo`]): a read or write abandoned half-way loses nothing.
pub struct PlainConn {
    io: Box<dyn ByteIo>,
    fd: RawFd,
    rbuf: BytesMut,
    /// The peer ended its half (or the connection failed).
    eof: bool,
}

impl PlainConn {
    /// TCP connect to `addr` with the worker's socket options, then, with `tls`, the TLS
    /// handshake. Bounded by the caller (the service's `connectTimeout`).
    pub async fn connect(
        addr: SocketAddr,
        opts: &ListenOptions,
        tls: Option<&Origination>,
    ) -> io::Result<PlainConn> {
        let tcp = runtime::listener::connect(addr, opts).await?;
        let fd = tcp.as_raw_fd();
        let io = TcpIo::new(tcp);
        let io: Box<dyn ByteIo> = match tls {
            None => Box::new(io),
            Some(o) => {
                let s = tokio_rustls::TlsConnector::from(o.config.clone())
                    .connect(o.server_name.clone(), io)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("TLS to {addr}: {e}")))?;
                Box::new(s)
            }
        };
        Ok(PlainConn {
            io,
            fd,
            rbuf: BytesMut::new(),
            eof: false,
        })
    }

    /// The next chunk the peer sent; `None` at its end of stream.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if self.eof {
            return Poll::Ready(None);
        }
        // Reads land in initialized bytes (no `unsafe` outside the runtime): the buffer
        // is refilled with zeroes when little of it is left.
        if self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.clear();
            self.rbuf.resize(READ_CHUNK, 0);
        }
        let mut buf = ReadBuf::new(&mut self.rbuf[..]);
        match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
            Ok(()) => {
                let n = buf.filled().len();
                if n == 0 {
                    self.eof = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(self.rbuf.split_to(n).freeze())))
            }
            Err(e) => {
                self.eof = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    pub async fn read(&mut self) -> Option<io::Result<Bytes>> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// Write `data` (advanced as it goes), then flush.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        while !data.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, data))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            data.advance(n);
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Close our half (TLS: `close_notify` first).
    pub fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    pub async fn write_all(&mut self, mut data: Bytes, end: bool) -> io::Result<()> {
        poll_fn(|cx| self.poll_send(cx, &mut data)).await?;
        if end {
            poll_fn(|cx| self.poll_finish(cx)).await?;
        }
        Ok(())
    }

    /// Abort: the connection closes with a TCP reset when dropped.
    pub fn reset(&mut self) {
        let _ = runtime::sys::set_linger_zero(self.fd);
        self.eof = true;
    }

    /// Whether a kept connection can carry another request: nothing arrived on it while
    /// idle and the peer has not closed it (one read attempt, without waiting).
    pub fn usable_idle(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.poll_chunk(&mut cx).is_pending()
    }
}

/// An upstream byte stream: an HBONE CONNECT stream to a captured pod (through its node's
/// ztunnel), or a connection to an endpoint outside the mesh.
pub enum UpStream {
    Hbone(H2Stream),
    Plain(Box<PlainConn>),
}

impl UpStream {
    pub async fn read(&mut self) -> Option<io::Result<Bytes>> {
        match self {
            UpStream::Hbone(s) => s.read().await.map(|r| r.map_err(io::Error::other)),
            UpStream::Plain(c) => c.read().await,
        }
    }

    /// Write `data`; `end` closes our half (END_STREAM, or a FIN).
    pub async fn write_all(&mut self, data: Bytes, end: bool) -> io::Result<()> {
        match self {
            UpStream::Hbone(s) => s.write_all(data, end).await.map_err(io::Error::other),
            UpStream::Plain(c) => c.write_all(data, end).await,
        }
    }

    /// Abort: RST_STREAM with `reason`, or a TCP reset.
    pub fn reset(&mut self, reason: Reason) {
        match self {
            UpStream::Hbone(s) => s.reset(reason),
            UpStream::Plain(c) => c.reset(),
        }
    }

    /// Whether a kept stream can still carry a request
    /// ([`crate::upstream::idle_stream_usable`]).
    pub fn usable_idle(&mut self) -> bool {
        match self {
            UpStream::Hbone(s) => crate::upstream::idle_stream_usable(s),
            UpStream::Plain(c) => c.usable_idle(),
        }
    }

    /// Move bytes between the downstream tunnel `down` and this stream (opaque TCP, or
    /// after an upgrade): [`crate::inner::splice`], or to a connection outside the mesh
    /// [`splice`].
    pub async fn splice(
        self,
        down: H2Stream,
        first: Bytes,
        idle: Duration,
        abort: impl Future<Output = ()>,
    ) -> Outcome {
        match self {
            UpStream::Hbone(up) => crate::inner::splice(down, up, first, idle, abort).await,
            UpStream::Plain(up) => splice(down, *up, first, idle, abort).await,
        }
    }

    /// End it after complete exchanges, as a TCP connection is closed
    /// ([`crate::upstream::close_stream`]; a plain connection is closed at once).
    pub fn close(self) {
        match self {
            UpStream::Hbone(s) => crate::upstream::close_stream(s),
            UpStream::Plain(c) => drop(c),
        }
    }
}

impl Tunnel for UpStream {
    async fn read(&mut self) -> Option<io::Result<Bytes>> {
        UpStream::read(self).await
    }

    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.write_all(data, false).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.write_all(Bytes::new(), true).await
    }

    async fn write_watching(&mut self, data: &mut Bytes) -> io::Result<Watched> {
        match self {
            UpStream::Hbone(s) => http1::h2_write_watching(s, data).await,
            UpStream::Plain(c) => {
                poll_fn(|cx| {
                    if c.poll_send(cx, data)?.is_ready() {
                        return Poll::Ready(Ok(Watched::Written));
                    }
                    match ready!(c.poll_chunk(cx)) {
                        Some(Ok(b)) => Poll::Ready(Ok(Watched::Data(b))),
                        Some(Err(e)) => Poll::Ready(Err(e)),
                        None => Poll::Ready(Ok(Watched::End)),
                    }
                })
                .await
            }
        }
    }

    async fn read_or_source<S: Tunnel>(
        &mut self,
        source: &mut S,
    ) -> Result<Option<io::Result<Bytes>>, Watched> {
        match self {
            UpStream::Hbone(s) => http1::h2_read_or_source(s, source).await,
            UpStream::Plain(c) => match race(source.read(), c.read()).await {
                Either::Left(r) => Ok(r),
                Either::Right(Some(Ok(b))) => Err(Watched::Data(b)),
                Either::Right(Some(Err(_)) | None) => Err(Watched::End),
            },
        }
    }

    async fn cancelled(&mut self) {
        match self {
            UpStream::Hbone(s) => {
                let _ = poll_fn(|cx| s.send.poll_reset(cx)).await;
            }
            UpStream::Plain(_) => std::future::pending().await,
        }
    }
}

/// Move bytes between the downstream tunnel and a connection outside the mesh until
/// both halves close, a reset on either (passed on: RST_STREAM, a TCP reset), `idle`
/// with no bytes, or `abort`. `first` goes upstream first. As
/// [`crate::inner::splice`] between two CONNECT streams.
pub async fn splice(
    mut down: H2Stream,
    up: PlainConn,
    first: Bytes,
    idle: Duration,
    abort: impl Future<Output = ()>,
) -> Outcome {
    let counts = [std::cell::Cell::new(0u64), std::cell::Cell::new(0u64)];
    // Each direction borrows the connection only within one poll: never across a wait.
    let up = RefCell::new(up);
    let end = {
        let H2Stream { send, recv, .. } = &mut down;
        let d2u = async {
            let mut data = first;
            // Window taken by `data` (none for `first`, read by detection): given back once
            // it is written, so what waits here stays within the stream's window.
            let mut held = 0;
            loop {
                let n = data.len();
                if n > 0 {
                    if let Err(e) = poll_fn(|cx| up.borrow_mut().poll_send(cx, &mut data)).await {
                        return DirEnd::WriteFailed(e);
                    }
                    counts[0].set(counts[0].get() + n as u64);
                }
                if held > 0 {
                    let _ = recv
                        .flow_control()
                        .release_capacity(std::mem::take(&mut held));
                }
                match poll_fn(|cx| recv.poll_data(cx)).await {
                    Some(Ok(b)) => {
                        held = b.len();
                        data = b;
                    }
                    Some(Err(e)) => return DirEnd::ReadFailed(io::Error::other(e)),
                    None => {
                        return match poll_fn(|cx| up.borrow_mut().poll_finish(cx)).await {
                            Ok(()) => DirEnd::Eof,
                            Err(e) if e.kind() == io::ErrorKind::NotConnected => DirEnd::Eof,
                            Err(e) => DirEnd::WriteFailed(e),
                        }
                    }
                }
            }
        };
        let u2d = async {
            loop {
                match poll_fn(|cx| up.borrow_mut().poll_chunk(cx)).await {
                    Some(Ok(b)) => {
                        let n = b.len() as u64;
                        if let Err(e) = crate::inner::send_all(send, b, false).await {
                            return DirEnd::WriteFailed(io::Error::other(e));
                        }
                        counts[1].set(counts[1].get() + n);
                    }
                    Some(Err(e)) => return DirEnd::ReadFailed(e),
                    None => {
                        return match send.send_data(Bytes::new(), true) {
                            Ok(()) => DirEnd::Eof,
                            Err(e) => DirEnd::WriteFailed(io::Error::other(e)),
                        }
                    }
                }
            }
        };
        Box::pin(drive(d2u, u2d, &counts, idle, abort)).await
    };
    // As between two CONNECT streams; a TCP reset carries no reason.
    let (d, u) = crate::inner::resets(&end);
    if u.is_some() {
        up.into_inner().reset();
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

/// An upstream connection as the `h2` client sees it (HTTP/2 to the endpoint:
/// `useClientProtocol`): a CONNECT stream, or a connection outside the mesh.
pub enum UpIo {
    Hbone(crate::inner::StreamIo),
    Plain(Box<PlainConn>),
}

impl UpIo {
    pub fn new(s: UpStream) -> UpIo {
        match s {
            UpStream::Hbone(s) => UpIo::Hbone(crate::inner::StreamIo::new(s, Bytes::new())),
            UpStream::Plain(c) => UpIo::Plain(c),
        }
    }
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Hbone(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Plain(c) => Pin::new(&mut c.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Hbone(s) => Pin::new(s).poll_write(cx, buf),
            UpIo::Plain(c) => Pin::new(&mut c.io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Hbone(s) => Pin::new(s).poll_flush(cx),
            UpIo::Plain(c) => Pin::new(&mut c.io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Hbone(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Plain(c) => Pin::new(&mut c.io).poll_shutdown(cx),
        }
    }
}

/// What a DestinationRule's `trafficPolicy.tls` (Istio's `ClientTLSSettings`) asks of the
/// TLS originated to endpoints outside the mesh.
#[derive(Debug, Default)]
pub struct TlsSpec<'a> {
    /// `caCertificates`: PEM roots (else the system's: `SSL_CERT_FILE` or the usual bundle).
    pub ca: Option<&'a std::path::Path>,
    /// `MUTUAL`: `clientCertificate` and `privateKey` (PEM files).
    pub client: Option<(&'a std::path::Path, &'a std::path::Path)>,
    /// `subjectAltNames`: the server's certificate must be valid for one of them (instead
    /// of the name it was asked by).
    pub sans: &'a [String],
    /// `insecureSkipVerify`: any certificate (its handshake signature still checked).
    pub skip_verify: bool,
    /// `sni`.
    pub sni: Option<&'a str>,
}

/// A DestinationRule's TLS origination, compiled at load: client configurations without
/// ALPN (HTTP/1.1, opaque TCP) and offering `h2` (HTTP/2 upstream), and the SNI.
pub struct TlsOrigin {
    /// Unique per compiled origination (per load).
    id: u64,
    plain: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
    sni: Option<rustls::pki_types::ServerName<'static>>,
}

impl std::fmt::Debug for TlsOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOrigin")
            .field("sni", &self.sni)
            .finish_non_exhaustive()
    }
}

/// Where a [`TlsSpec`] failed: the field, and why.
pub type TlsSpecError = (&'static str, String);

impl TlsOrigin {
    pub fn new(spec: &TlsSpec<'_>) -> Result<TlsOrigin, TlsSpecError> {
        let provider = hbone::tls::provider();
        // No roots are needed (nor read) when nothing is checked against them.
        let webpki = if spec.skip_verify {
            None
        } else {
            let roots = crate::jwks::roots(spec.ca, "set caCertificates or SSL_CERT_FILE")
                .map_err(|e| ("caCertificates", e))?;
            let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| ("caCertificates", e.to_string()))?;
            Some(v)
        };
        let sans = spec
            .sans
            .iter()
            .map(|s| {
                rustls::pki_types::ServerName::try_from(s.clone())
                    .map_err(|e| ("subjectAltNames", format!("{s:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let verifier = Arc::new(Verifier {
            webpki,
            sans,
            algorithms: provider.signature_verification_algorithms,
        });
        let sni = spec
            .sni
            .map(|s| {
                rustls::pki_types::ServerName::try_from(s.to_string())
                    .map_err(|e| ("sni", format!("{s:?}: {e}")))
            })
            .transpose()?;
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ("mode", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match spec.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain =
                    hbone::ca::pem_certs(cert).map_err(|e| ("clientCertificate", e.to_string()))?;
                let text = std::fs::read(key)
                    .map_err(|e| ("privateKey", format!("{}: {e}", key.display())))?;
                use rustls::pki_types::pem::PemObject;
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&text)
                    .map_err(|e| ("privateKey", format!("{}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ("clientCertificate", e.to_string()))?
            }
        };
        config.resumption = rustls::client::Resumption::in_memory_sessions(256);
        let mut h2 = config.clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(TlsOrigin {
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            plain: Arc::new(config),
            h2: Arc::new(h2),
            sni,
        })
    }

    /// Unique among the originations compiled in this process (never 0).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The origination to an endpoint of the service `host` (the SNI without `sni`), for
    /// HTTP/2 (`h2`) or not.
    pub fn to(&self, host: &str, h2: bool) -> io::Result<Origination> {
        let server_name = match &self.sni {
            Some(n) => n.clone(),
            None => rustls::pki_types::ServerName::try_from(host.trim_end_matches('.').to_string())
                .map_err(|e| io::Error::other(format!("TLS origination to {host:?}: {e}")))?,
        };
        let config = if h2 { &self.h2 } else { &self.plain };
        Ok(Origination {
            config: config.clone(),
            server_name,
        })
    }
}

/// Checks the server's chain against the roots, for the name it was asked by or (with
/// `subjectAltNames`) one of those; or (`insecureSkipVerify`) not at all. The handshake's
/// signature is checked either way.
#[derive(Debug)]
struct Verifier {
    /// None: `insecureSkipVerify`.
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    sans: Vec<rustls::pki_types::ServerName<'static>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        if self.sans.is_empty() {
            return webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        }
        let mut last = None;
        for san in &self.sans {
            match webpki.verify_server_cert(end_entity, intermediates, san, ocsp, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(rustls::Error::General("no subjectAltNames".into())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
