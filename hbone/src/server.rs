//! HBONE server connections: TLS accept (client certificate required) → h2 → one task per
//! CONNECT stream, handed to the caller with the peer's identity and the parsed request.

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Ping, PingPong, RecvStream};
use http::{Response, StatusCode};
use monoio::net::TcpStream;
use runtime::worker::{race, Either};
use rustls_pki_types::CertificateDer;

use crate::error::HboneError;
use crate::identity::Identity;
use crate::settings::H2Settings;
use crate::stream::H2Stream;
use crate::tls::{peer_identity, TlsCounters};
use crate::wire::{self, ParsedConnect};

/// Server-side counters (shared by a server's workers; relaxed atomics).
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub tls: TlsCounters,
    pub connections: AtomicU64,
    pub streams: AtomicU64,
    pub bad_method: AtomicU64,
    pub bad_authority: AtomicU64,
    pub h2_errors: AtomicU64,
    /// Accepted sockets closed because TLS and the HTTP/2 preface were not done within
    /// `h2.handshake_timeout`.
    pub handshake_timeouts: AtomicU64,
    /// Stream tasks still running when their connection ended (the peer left, the
    /// connection failed): dropped then, with what they held.
    pub streams_cut: AtomicU64,
}

/// Sets its event when dropped: a connection's end, however [`serve_connection`] ends
/// (returned, or its future dropped).
struct SetOnDrop(runtime::event::LocalEvent);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// A CONNECT stream waiting for the caller's decision.
pub struct Inbound {
    pub peer_identity: Option<Identity>,
    /// The peer's leaf certificate (shared by the connection's streams).
    pub peer_certificate: Option<Arc<CertificateDer<'static>>>,
    pub peer_addr: SocketAddr,
    pub request: ParsedConnect,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl Inbound {
    /// Answer 200 and get the byte stream.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let send = self.respond.send_response(
            Response::builder()
                .status(StatusCode::OK)
                .body(())
                .expect("static response"),
            false,
        )?;
        Ok(H2Stream::new(send, self.recv))
    }

    /// Answer `status` (401 denied, 503 upstream failed, 400 bad authority …) and end it.
    pub fn reject(mut self, status: StatusCode) {
        let _ = self.respond.send_response(
            Response::builder()
                .status(status)
                .body(())
                .expect("static response"),
            true,
        );
    }
}

/// Returns only if a PING goes unanswered for `timeout` (or pings fail): the connection is
/// then dead. Pending forever without a `PingPong`.
pub(crate) async fn keepalive(ping: Option<PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        monoio::time::sleep(interval).await;
        match race(ping.ping(Ping::opaque()), monoio::time::sleep(timeout)).await {
            Either::Left(Ok(_)) => {}
            Either::Left(Err(e)) => {
                tracing::debug!(error = %e, "keepalive ping failed");
                return;
            }
            Either::Right(()) => {
                tracing::debug!(?timeout, "keepalive ping timed out; closing connection");
                return;
            }
        }
    }
}

/// Serve one accepted TCP connection as HBONE until the peer closes it, it fails, or `drain`
/// completes (then GOAWAY is sent and open streams finish). `handler` gets each valid
/// CONNECT; malformed ones are answered here (405 non-CONNECT, 400 bad authority).
pub async fn serve_connection<H, Fut>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    settings: &H2Settings,
    counters: Arc<ServerCounters>,
    drain: impl Future<Output = ()>,
    handler: Rc<H>,
) -> Result<(), HboneError>
where
    H: Fn(Inbound) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let _ = tcp.set_nodelay(true);
    settings.tune_socket(&tcp).map_err(HboneError::TlsIo)?;
    // Writes held from the client's second flight (its TLS Finished, h2 preface and first
    // request) until the connection's task next waits for the peer: the session tickets,
    // SETTINGS, WINDOW_UPDATE and SETTINGS ACK in one packet instead of three. Never
    // longer: a read that has to wait sends what is held once the task yields.
    let (io, _hold) = crate::stream::TcpIo::held_after_reads_until_parked(tcp, 2);
    // TLS and the client's HTTP/2 preface within the handshake deadline: a peer that
    // connects and stays silent (or stalls mid-handshake) is closed, its descriptor freed.
    let setup = async {
        let mut tls_stream = match tokio_rustls::TlsAcceptor::from(tls).accept(io).await {
            Ok(s) => s,
            Err(e) => return Err(HboneError::from_tls_io(e, &counters.tls)),
        };
        if let Err(e) = crate::tls::note_server_handshake(tls_stream.get_ref().1, &counters.tls) {
            return Err(HboneError::Tls(e));
        }
        counters.connections.fetch_add(1, Relaxed);
        let limit = Some(settings.tls_send_buffer);
        tls_stream.get_mut().1.set_buffer_limit(limit);
        let peer_certs = tls_stream.get_ref().1.peer_certificates();
        let peer_identity = peer_identity(peer_certs);
        let peer_certificate = peer_certs
            .and_then(|c| c.first())
            .map(|c| Arc::new(c.clone()));
        let conn = settings
            .server_builder()
            .handshake::<_, Bytes>(crate::stream::H2Io(tls_stream))
            .await?;
        Ok((conn, peer_identity, peer_certificate))
    };
    let (mut conn, peer_identity, peer_certificate) =
        match settings.within_handshake_deadline(peer_addr, setup).await {
            Err(e @ HboneError::HandshakeTimeout { .. }) => {
                counters.handshake_timeouts.fetch_add(1, Relaxed);
                return Err(e);
            }
            r => r?,
        };
    let ping = conn.ping_pong();
    let keep = keepalive(ping, settings.ping_interval, settings.ping_timeout);
    // The streams' tasks live no longer than their connection: once it has ended, none of
    // its streams can carry a byte, and a task still waiting (on an upstream that does
    // not answer, say) is dropped, its own upstream streams reset with it.
    let ended = SetOnDrop(runtime::event::LocalEvent::new());
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    let accept_loop = async {
        loop {
            let next = if draining {
                conn.accept().await
            } else {
                match race(conn.accept(), drain.as_mut()).await {
                    Either::Left(n) => n,
                    Either::Right(()) => {
                        draining = true;
                        conn.graceful_shutdown();
                        continue;
                    }
                }
            };
            let (req, respond) = match next {
                None => return Ok(()),
                Some(Ok(x)) => x,
                Some(Err(e)) => {
                    counters.h2_errors.fetch_add(1, Relaxed);
                    return Err(HboneError::H2(e));
                }
            };
            let (parts, recv) = req.into_parts();
            let parsed = wire::parse_connect(
                &parts.method,
                parts.uri.authority().map(|a| a.as_str()),
                &parts.headers,
            );
            let mut respond = respond;
            match parsed {
                Ok(request) => {
                    counters.streams.fetch_add(1, Relaxed);
                    let inbound = Inbound {
                        peer_identity: peer_identity.clone(),
                        peer_certificate: peer_certificate.clone(),
                        peer_addr,
                        request,
                        respond,
                        recv,
                    };
                    let h = handler.clone();
                    let (gone, counters) = (ended.0.wait(), counters.clone());
                    runtime::busy::spawn_tracked(async move {
                        if let Either::Right(()) = race(h(inbound), gone).await {
                            counters.streams_cut.fetch_add(1, Relaxed);
                        }
                    });
                }
                Err(status) => {
                    let c = if status == wire::status::NOT_CONNECT {
                        &counters.bad_method
                    } else {
                        &counters.bad_authority
                    };
                    c.fetch_add(1, Relaxed);
                    let _ = respond.send_response(
                        Response::builder()
                            .status(status)
                            .body(())
                            .expect("static response"),
                        true,
                    );
                }
            }
        }
    };
    match race(accept_loop, keep).await {
        Either::Left(r) => r,
        Either::Right(()) => Err(HboneError::Protocol("keepalive timeout".into())),
    }
}
