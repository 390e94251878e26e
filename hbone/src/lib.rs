//! HBONE: HTTP/2 `CONNECT` tunnels over mutual TLS with SPIFFE identities, wire-compatible
//! with Istio's ztunnel and waypoints.
//!
//! - [`identity`] — `spiffe://<td>/ns/<ns>/sa/<sa>`.
//! - [`ca`] — certificate sources behind [`ca::CertSource`] — the built-in CA, Istio's
//!   plug-in CA files, static files — and the half-life renewing [`ca::CertStore`].
//! - [`tls`] — rustls configs (TLS 1.3, AES-GCM, P-256 key share first, ALPN h2,
//!   session resumption by stateless tickets: [`resumption`]) with SPIFFE verifiers and
//!   refusal counters; per worker, a chain verified once is not re-verified while valid,
//!   and client configs are cached.
//! - [`wire`] — the CONNECT request and its headers (`forwarded`, `baggage`,
//!   `traceparent`), status codes; pure and fuzzed.
//! - [`client`], [`server`] — connections on the runtime's workers (the socket as
//!   [`stream::TcpIo`]: non-blocking `recv`/`sendmsg` with readiness from the ring, small
//!   records gathered per flush, + tokio-rustls + the stock `h2`), keepalive PINGs, GOAWAY
//!   on drain. A new client connection sends TLS Finished, preface, SETTINGS and its first
//!   CONNECT in one packet. A client's first bytes may go ahead of the CONNECT's reply
//!   ([`client::Early`]).
//! - [`pool`] — per-worker connection pools keyed by (source identity, destination
//!   identities, destination address); their sockets get the worker's socket options
//!   ([`pool::Pool::with_socket_options`]).
//! - [`stream`] — streams as byte streams and the TCP ⇄ stream bridge.

pub mod ca;
pub mod client;
pub mod error;
pub mod identity;
pub mod pool;
pub mod proxy;
pub mod resumption;
pub mod server;
pub mod settings;
pub mod stream;
pub mod tls;
pub mod wire;

pub use error::HboneError;
pub use identity::Identity;
pub use settings::H2Settings;
