//! The thread-per-core io_uring runtime every service of this mesh runs on.
//!
//! - [`worker`]: one pinned OS thread per selected core, each with its own monoio runtime
//!   (io_uring, or epoll when a ring cannot be created — see [`driver`]), buffer pool and
//!   counters; the accept loop with connection limits and drain.
//! - [`listener`]: one `SO_REUSEPORT` socket per worker per address; refuses an address that
//!   another process already serves.
//! - [`forward`]: both-ways byte forwarding (pooled-buffer copy or readiness + `splice(2)`),
//!   with half-close, reset propagation, idle timeout and byte counts.
//! - [`idle`]: idle timeouts of forwarded connections, one sweeper task per worker instead of
//!   a timer per connection.
//! - [`snapshot`]: lock-free publishing of immutable routing snapshots.
//! - [`shutdown`]: SIGTERM/SIGINT drain.
//! - [`busy`]: busy polling before a worker parks (`runtime.busy_poll`).
//! - [`pmqos`]: the host-wide PM QoS CPU latency request (`runtime.cpu_latency_limit`), held
//!   from the first [`spawn_workers`] until the process exits.
//! - [`rtsched`]: `SCHED_FIFO` worker threads (`runtime.sched_fifo_priority`).
//! - [`admin`]: the blocking control-side HTTP endpoint (readiness, stats) services share.
//! - [`forwarder`]: the first service, a sharded L4 forwarder (binary `l4fwd`).
//!
//! This is the only crate of the workspace allowed `unsafe` (in [`sys`], [`rtsched`],
//! [`pinned`]'s pin projections, and [`forward`]'s non-blocking socket calls and `Drive` pin
//! projection), each block with a `SAFETY:` comment.

pub mod admin;
pub mod bufpool;
pub mod busy;
pub mod config;
pub mod driver;
pub mod event;
pub mod filewatch;
pub mod forward;
pub mod forwarder;
pub mod idle;
pub mod listener;
pub mod logbuf;
pub mod pinned;
pub mod pmqos;
pub mod rtsched;
pub mod shutdown;
pub mod snapshot;
pub mod stats;
pub mod sys;
pub mod worker;

pub use config::{ForwardConfig, ForwardMode, RuntimeConfig};
pub use driver::{DriverChoice, DriverKind};
pub use shutdown::Shutdown;
pub use snapshot::{Publisher, Subscriber};
pub use worker::{spawn_workers, WorkerCtx, Workers};

/// Install a `tracing` subscriber reading `RUST_LOG` (default `info`), once per process.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a pipe or a file (a log collector, the access log)
    // gets plain text, without the escape codes around every field name.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logbuf::LogWriter)
        .with_ansi(ansi)
        .try_init();
}
