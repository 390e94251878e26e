//! ztunnel: the per-node L4 proxy of ambient mode (issue 4), on the runtime's workers.
//!
//! Outbound traffic enters through transparent capture (`:15001`, node-level nftables
//! `tproxy`, the original destination as the socket's local address: see [`capture`]) or, without root,
//! SOCKS5 (`:15080`); inbound through HBONE (`:15008`) and plaintext listeners (`:15006`,
//! original destination or a fixed `target`).
//!
//! - [`config`] — the file: mesh-model's local YAML plus the `ztunnel:` section.
//! - [`state`] — the published snapshot: mesh model + this node's certificates.
//! - [`socks`] — SOCKS5 parsing and handshake.
//! - [`capture`] — transparent capture: the design (node-level `tproxy`) and the helper
//!   that installs/removes a node's nftables rules.
//! - [`dns`] — the DNS proxy: captured pods' queries for the mesh's hostnames answered
//!   with their VIPs, the rest forwarded.
//! - [`proxy`] — listeners, outbound (R1, R4–R8) and inbound (R9–R12) paths, reload watcher.
//! - [`metrics`] — `istio_tcp_*` with Istio's labels and ztunnel's path counters.
//! - [`admin`] — `/healthz/ready`, `/stats/prometheus`, `/config_dump`.

pub mod admin;
pub mod capture;
pub mod cli;
pub mod config;
pub mod dns;
pub mod metrics;
pub mod proxy;
pub mod socks;
pub mod state;

pub use proxy::{start, Handle, StartError};
