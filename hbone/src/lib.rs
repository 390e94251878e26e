//! HBONE: HTTP/2 `CONNECT` tunnels over mutual TLS with SPIFFE identities.
//!
//! Not built yet (issue 3). This crate will hold the rustls + `h2` transport running on the
//! runtime's workers, SPIFFE identity verifiers, certificate sources (built-in CA, Istio
//! plug-in CA files, static files), per-core connection pools keyed by
//! (source identity, destination identity, destination address), and streams exposed as
//! byte streams with half-close and reset mapped to `END_STREAM` / `RST_STREAM`.
