//! Network-namespace labs: the plumbing shared by ztunnel's and the waypoint's namespace
//! tests and the bench's mesh (root needed to use any of it).
//!
//! - [`Lab`]: a teardown guard that owns what it created — namespaces (deleted, with their
//!   veths, routes and nftables rules) and child processes (killed first) — on `Drop`, also
//!   on panic or on an early `?` return.
//! - [`TwoNodes`]: the routed two-node shape every user builds: node namespaces `<prefix>-na`
//!   and `<prefix>-nb` joined by a veth (`to-b` ⇄ `to-a`), pods in their own namespaces
//!   behind a veth (`p-<pod>` on the node, `eth0` in the pod), a /32 (/128) route per pod on
//!   its node and the pod's default route via the node, so every pod packet crosses its
//!   node's `PREROUTING`. [`TwoNodes::with_pods`] builds it from the [`Pod`]s and one
//!   [`Addressing`] plan per family (two for dual stack); [`captured_devs`] says which pod
//!   veths the caller's capture rules must cover.
//! - Commands ([`run`], [`run_in`], [`nft`], [`nft_list_table`]), namespace entry ([`enter`],
//!   [`in_ns`], [`try_in_ns`]), sockets made inside a namespace ([`connect_in`],
//!   [`serve_in`], [`http_get_in`], [`resolve_a_in`], [`resolve_a_tcp_in`]), readiness ([`Lab::spawn_ready`],
//!   [`eventually`]) and the gate of tests that need root ([`require_root`],
//!   [`require_ipv6`]), and the proxies' Prometheus counters ([`metric`]).
//!
//! Namespace names start with `<tag><pid>` ([`process_prefix`]) so that [`sweep_stale`] can
//! remove what a killed process left behind without touching live runs.
//!
//! No `unsafe` here: `setns(2)` comes from `nix`; everything else is `ip`, `sysctl` and
//! `nft` run as commands.

mod cmd;
mod gate;
mod lab;
mod ns;
mod stats;
mod topo;

pub use cmd::{nft, nft_list_table, run, run_in};
pub use gate::{
    cannot_run, eventually, in_ci, ipv6_available, is_root, require_ipv6, require_root,
};
pub use lab::{netns_command, process_prefix, sweep_stale, Lab};
pub use ns::{
    connect_in, enter, http_get_in, in_ns, resolve_a_in, resolve_a_tcp_in, serve_in, try_in_ns,
    Served,
};
pub use stats::metric;
pub use topo::{captured_devs, Addressing, Pod, TwoNodes};

use std::path::PathBuf;
use std::process::ExitStatus;

/// What went wrong, with the command or the namespace it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command ran and failed (bad arguments, a name taken, no permission).
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: ExitStatus,
        stderr: String,
    },
    /// An operating-system call failed (spawning, a file, setns).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A process did not print its READY line in time (or exited first).
    #[error("{name}: no READY line ({why}); log {}:\n{log}", path.display())]
    NotReady {
        name: String,
        why: String,
        path: PathBuf,
        log: String,
    },
    /// Code run inside a namespace panicked.
    #[error("the thread in network namespace {0} panicked")]
    Panicked(String),
}

impl Error {
    fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
