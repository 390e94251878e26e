//! HTTP/2 and pool settings. Defaults are Istio's ztunnel's.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct H2Settings {
    /// Bytes: initial flow-control window per stream.
    pub stream_window: u32,
    /// Bytes: flow-control window per connection.
    pub connection_window: u32,
    /// Bytes: largest DATA frame we accept.
    pub max_frame_size: u32,
    /// Streams a server accepts at once per connection.
    pub max_concurrent_streams: u32,
    /// Bytes: largest header block we accept.
    pub max_header_list_size: u32,
    /// A PING is sent after this much time (keepalive).
    #[serde(with = "runtime::config::duration")]
    pub ping_interval: Duration,
    /// A connection whose PING is not answered within this is closed.
    #[serde(with = "runtime::config::duration")]
    pub ping_timeout: Duration,
    /// Deadline for setting up an HBONE connection (Envoy's `connect_timeout`, 10 s):
    /// client: TCP connect + TLS + HTTP/2 handshake (every opener waiting on that pooled
    /// connection gets the error); server: TLS + HTTP/2 preface after accept (the socket
    /// is closed). Counted either way. Also how long a client's CONNECT waits for its reply
    /// (`HboneError::ReplyTimeout`, the stream reset), and ztunnel's deadline for its plain
    /// TCP connects (to a pod, passthrough). 0: no deadline.
    #[serde(with = "runtime::config::duration")]
    pub handshake_timeout: Duration,
    /// Client pool: streams per pooled connection before another connection is opened.
    pub max_streams_per_connection: usize,
    /// Client pool: an unused connection is closed after this.
    #[serde(with = "runtime::config::duration")]
    pub pool_idle_timeout: Duration,
    /// Bytes: the largest read from a TCP socket, i.e. the largest DATA frame sent. Reads
    /// start at 16 KiB and double while they fill the buffer, so idle and request/response
    /// streams hold small buffers and bulk ones make few large frames and syscalls.
    pub chunk_size: usize,
    /// Bytes of encrypted TLS records buffered before a socket write: one `writev` carries
    /// up to this much (rustls's default, 64 KiB, splits a large DATA frame into several).
    pub tls_send_buffer: usize,
    /// TLS 1.3 session resumption between HBONE peers: servers send one stateless ticket
    /// per handshake (key per server config, lifetime ≤ 1 h and ≤ the certificate's),
    /// clients keep tickets per worker and per (source identity, expected destination
    /// identities) and resume with them, skipping both sides' certificate signatures and
    /// checks (an ECDHE key exchange is still made). Off: full handshakes only, no tickets.
    pub tls_resumption: bool,
    /// Bytes: `TCP_NOTSENT_LOWAT` on HBONE sockets (client and server): a connection's
    /// socket takes more only while fewer than this many bytes are queued in the kernel
    /// unsent, so a bulk stream's bytes wait in h2 (which interleaves streams' DATA frames)
    /// instead of in one FIFO in front of every other stream's. Absent: the system's
    /// `net.ipv4.tcp_notsent_lowat` (no limit by default).
    pub socket_notsent_lowat: Option<u32>,
    /// Bytes: `SO_RCVBUF` on HBONE sockets (client and server), overriding
    /// `runtime.socket_recv_buffer` for them: bounds the encrypted bytes that queue unread in
    /// front of a small stream's (receive autotuning off; the kernel reserves twice this).
    /// Absent: as the runtime's sockets.
    pub socket_recv_buffer: Option<usize>,
    /// TCP congestion control on HBONE sockets (client and server), overriding
    /// `runtime.tcp_congestion` for them, e.g. `bbr` between nodes while pod-side sockets
    /// (on the node's veths) use `cubic`. Absent: as the runtime's sockets. Checked when the
    /// config loads (a name this host lacks or does not allow this process is refused).
    pub tcp_congestion: Option<String>,
}

/// [`H2Settings::handshake_timeout`]'s default: Envoy's default cluster `connect_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_concurrent_streams: 200,
            max_header_list_size: 64 * 1024,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_streams_per_connection: 100,
            pool_idle_timeout: Duration::from_secs(300),
            chunk_size: 64 * 1024,
            tls_send_buffer: 256 * 1024,
            tls_resumption: crate::tls::DEFAULT_RESUMPTION,
            socket_notsent_lowat: None,
            socket_recv_buffer: None,
            tcp_congestion: None,
        }
    }
}

/// Smallest `h2.socket_notsent_lowat` / `h2.socket_recv_buffer` accepted (bytes): below one
/// full-size TLS record (16 KiB + overhead) every record would take several wake-ups.
pub const MIN_SOCKET_BYTES: usize = 4096;

/// Ready once `limit` has passed from its first poll; never with a zero `limit` (a
/// setting's "no timeout"). Raced after what it bounds (`race(f, Deadline::after(t))`), so
/// `f` is held once, in place: an `async fn` taking `f` by value (as [`within`]) keeps it
/// twice, its argument and the local it is moved into. Its timer is made (boxed) at its
/// first poll, when what it bounds is pending.
pub struct Deadline {
    limit: Duration,
    sleep: Option<std::pin::Pin<Box<monoio::time::Sleep>>>,
}

impl Deadline {
    pub fn after(limit: Duration) -> Self {
        Deadline { limit, sleep: None }
    }
}

impl std::future::Future for Deadline {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.get_mut();
        if this.limit.is_zero() {
            return std::task::Poll::Pending;
        }
        let limit = this.limit;
        this.sleep
            .get_or_insert_with(|| Box::pin(monoio::time::sleep(limit)))
            .as_mut()
            .poll(cx)
    }
}

/// `fut` bounded by `limit`, where a zero `limit` (a setting's "no timeout") means no bound:
/// `Err(Elapsed)` when the limit passed first (`fut` is dropped, closing what it owns).
/// Callers map the error to their own.
pub async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, monoio::time::error::Elapsed> {
    if limit.is_zero() {
        return Ok(fut.await);
    }
    monoio::time::timeout(limit, fut).await
}

impl H2Settings {
    /// `fut`, connection setup with `peer`, bounded by [`H2Settings::handshake_timeout`]
    /// (unbounded when 0); [`HboneError::HandshakeTimeout`] when the deadline passed first
    /// (`fut` is dropped, closing what it owns).
    pub async fn within_handshake_deadline<T>(
        &self,
        peer: std::net::SocketAddr,
        fut: impl std::future::Future<Output = Result<T, crate::HboneError>>,
    ) -> Result<T, crate::HboneError> {
        within(self.handshake_timeout, fut).await.unwrap_or(Err(
            crate::HboneError::HandshakeTimeout {
                peer,
                after: self.handshake_timeout,
            },
        ))
    }

    /// The HBONE socket options' values make sense: an error names the field.
    pub fn validate(&self) -> Result<(), runtime::config::Invalid> {
        use runtime::config::Invalid;
        if let Some(name) = &self.tcp_congestion {
            runtime::config::check_congestion(name)
                .map_err(|why| Invalid::new("h2.tcp_congestion", why))?;
        }
        if let Some(n) = self.socket_notsent_lowat {
            if !(MIN_SOCKET_BYTES as u32..=i32::MAX as u32).contains(&n) {
                return Err(Invalid::new(
                    "h2.socket_notsent_lowat",
                    format!(
                        "must be between {MIN_SOCKET_BYTES} and {} bytes (absent: no limit)",
                        i32::MAX
                    ),
                ));
            }
        }
        if let Some(n) = self.socket_recv_buffer {
            if !(MIN_SOCKET_BYTES..=i32::MAX as usize / 2).contains(&n) {
                return Err(Invalid::new(
                    "h2.socket_recv_buffer",
                    format!(
                        "must be between {MIN_SOCKET_BYTES} and {} bytes (absent: autotuning)",
                        i32::MAX / 2
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Apply the HBONE-only socket options ([`H2Settings::socket_notsent_lowat`],
    /// [`H2Settings::socket_recv_buffer`], [`H2Settings::tcp_congestion`]) to a client's
    /// connected or a server's accepted socket; nothing (no system call) when all are absent.
    pub fn tune_socket(&self, fd: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
        let fd = fd.as_raw_fd();
        if let Some(name) = &self.tcp_congestion {
            runtime::sys::with_sockref(fd, |s| s.set_tcp_congestion(name.as_bytes()))?;
        }
        if let Some(n) = self.socket_notsent_lowat {
            runtime::sys::set_tcp_notsent_lowat(fd, n)?;
        }
        if let Some(n) = self.socket_recv_buffer {
            runtime::sys::with_sockref(fd, |s| s.set_recv_buffer_size(n))?;
        }
        Ok(())
    }

    pub fn client_builder(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .enable_push(false);
        b
    }

    pub fn server_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_list_size);
        b
    }
}
