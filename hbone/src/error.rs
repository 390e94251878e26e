//! One error type for HBONE, saying which side failed and whether a retry can help.

use std::net::SocketAddr;

use crate::tls::TlsCounters;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS handshake refused: {0}")]
    Tls(rustls::Error),
    #[error("TLS handshake: {0}")]
    TlsIo(std::io::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("HBONE server answered {0}")]
    Status(http::StatusCode),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("certificate: {0}")]
    Cert(#[from] crate::ca::CaError),
    #[error("TLS config: {0}")]
    Config(rustls::Error),
    /// TCP connect, TLS and HTTP/2 handshake not done within `h2.handshake_timeout`.
    #[error("HBONE handshake with {peer} not completed within {after:?} (h2.handshake_timeout)")]
    HandshakeTimeout {
        peer: SocketAddr,
        after: std::time::Duration,
    },
    /// The client connection whose first bytes were being read for the stream (see
    /// [`crate::client::Early`]) failed before the CONNECT was answered.
    #[error("client connection: {0}")]
    Client(std::io::Error),
    /// A CONNECT sent and not answered within `h2.handshake_timeout` (the server could not
    /// reach its destination in time). Not retried: the connection itself is fine.
    #[error("HBONE CONNECT to {peer} not answered within {after:?} (h2.handshake_timeout)")]
    ReplyTimeout {
        peer: SocketAddr,
        after: std::time::Duration,
    },
}

impl HboneError {
    /// Classify an I/O error from a TLS handshake, counting refusals by reason.
    pub fn from_tls_io(e: std::io::Error, counters: &TlsCounters) -> HboneError {
        if let Some(te) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            counters.count(te);
            return HboneError::Tls(te.clone());
        }
        HboneError::TlsIo(e)
    }

    /// Whether trying again (on a new connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            HboneError::Connect(..)
            | HboneError::TlsIo(_)
            | HboneError::HandshakeTimeout { .. } => true,
            HboneError::H2(e) => e.is_go_away() || e.is_io(),
            _ => false,
        }
    }
}
