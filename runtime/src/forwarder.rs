//! The first service: a sharded L4 forwarder, `listen → upstream` pairs from a YAML file.
//!
//! ```yaml
//! runtime:            # optional; see `RuntimeConfig` (workers, cores, io_driver, forward…)
//!   forward: { mode: splice }
//! admin: 127.0.0.1:15000   # optional: GET /stats (Prometheus text), /healthz
//! listeners:
//!   - name: web
//!     listen: 127.0.0.1:8080
//!     upstream: 127.0.0.1:9090
//! ```
//!
//! Upstreams live in a [`Publisher`] snapshot: a reload (the file changed on disk, or
//! [`Handle::publish`]) swaps them without touching open connections, which keep the
//! snapshot they started with. Listen addresses cannot change without a restart.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{self, ConfigError, Invalid, RuntimeConfig};
use crate::filewatch::FileWatch;
use crate::forward::{self, End};
use crate::listener::{self, BindError};
use crate::shutdown::Shutdown;
use crate::snapshot::Publisher;
use crate::stats::{self, WorkerStats};
use crate::worker::{self, Workers};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// A label for logs; defaults to the listen address.
    #[serde(default)]
    pub name: Option<String>,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwarderConfig {
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Plain-HTTP admin endpoint (`/stats`, `/healthz`), off when absent.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    pub listeners: Vec<ListenerConfig>,
}

impl ForwarderConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        self.runtime.validate("runtime")?;
        if self.listeners.is_empty() {
            return Err(Invalid::new(
                "listeners",
                "at least one listener is required",
            ));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if let Some(j) = self.listeners[..i]
                .iter()
                .position(|o| o.listen == l.listen && l.listen.port() != 0)
            {
                return Err(Invalid::new(
                    format!("listeners[{i}].listen"),
                    format!("{} is also listeners[{j}].listen", l.listen),
                ));
            }
            if l.upstream.port() == 0 {
                return Err(Invalid::new(
                    format!("listeners[{i}].upstream"),
                    "port 0 is not a valid upstream",
                ));
            }
            if l.upstream == l.listen {
                return Err(Invalid::new(
                    format!("listeners[{i}].upstream"),
                    "upstream is the listener itself",
                ));
            }
        }
        Ok(())
    }

    /// Parse and validate text read from `file`.
    pub fn from_str(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: ForwarderConfig = config::from_yaml_str(file, text)?;
        cfg.validate().map_err(|e| e.in_file(file, Some(text)))?;
        Ok(cfg)
    }

    /// Read and [`ForwarderConfig::from_str`] `file`; also returns the text read (the text in
    /// force for a [`FileWatch`] of the file).
    pub fn load(file: &Path) -> Result<(Self, String), ConfigError> {
        let text = config::read_file(file)?;
        Ok((Self::from_str(file, &text)?, text))
    }
}

/// The routing snapshot: upstream per listener index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    pub upstreams: Vec<SocketAddr>,
}

/// Errors starting the forwarder.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("admin endpoint: {0}")]
    Admin(BindError),
    #[error("starting workers: {0}")]
    Workers(#[from] std::io::Error),
}

/// A running forwarder.
pub struct Handle {
    workers: Workers,
    local_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    routes: Publisher<Routes>,
    shutdown: Shutdown,
    drain_timeout: Duration,
    stop_watch: Arc<AtomicBool>,
}

impl Handle {
    /// The bound listen addresses, in config order (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }
    pub fn workers(&self) -> &Workers {
        &self.workers
    }
    pub fn stats(&self) -> &[Arc<WorkerStats>] {
        self.workers.stats()
    }
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }
    /// Swap in new upstreams (one per listener); returns the snapshot version.
    pub fn publish(&self, routes: Routes) -> u64 {
        self.routes.publish(routes)
    }
    pub fn routes(&self) -> &Publisher<Routes> {
        &self.routes
    }
    /// Begin the drain (as SIGTERM would).
    pub fn drain(&self) {
        self.shutdown.drain(self.drain_timeout);
    }
    /// Wait until every worker has drained and returned.
    pub fn join(self) -> std::io::Result<()> {
        let r = self.workers.join();
        self.stop_watch.store(true, Ordering::Relaxed);
        r
    }
}

/// Bind every listener on all workers and start serving. `config_file`, when given (the
/// file `cfg` was read from, with the text read), is watched and reloaded into a new
/// routing snapshot.
pub fn start(
    cfg: ForwarderConfig,
    shutdown: Shutdown,
    config_file: Option<FileWatch>,
) -> Result<Handle, StartError> {
    if let Ok((old, new)) = crate::sys::raise_nofile_limit() {
        if old != new {
            tracing::debug!(old, new, "raised RLIMIT_NOFILE");
        }
    }
    let n = worker::worker_count(&cfg.runtime);
    let opts = listener::ListenOptions::from_config(&cfg.runtime);
    // Bind everything before starting a worker so errors surface here, with the address.
    let mut per_listener = Vec::with_capacity(cfg.listeners.len());
    let mut local_addrs = Vec::with_capacity(cfg.listeners.len());
    for l in &cfg.listeners {
        let socks = listener::bind_sharded(l.listen, n, &opts)?;
        local_addrs.push(socks[0].local_addr().map_err(|source| BindError::Io {
            addr: l.listen,
            source,
        })?);
        per_listener.push(socks);
    }
    // per_worker[w][l]: the socket of listener l for worker w.
    let mut per_worker: Vec<Vec<StdListener>> = (0..n).map(|_| Vec::new()).collect();
    for socks in per_listener {
        for (w, s) in socks.into_iter().enumerate() {
            per_worker[w].push(s);
        }
    }
    let routes = Publisher::new(Routes {
        upstreams: cfg.listeners.iter().map(|l| l.upstream).collect(),
    });
    let fwd_cfg = Arc::new(cfg.runtime.forward.clone());
    let mut per_worker = per_worker.into_iter();
    let workers = worker::spawn_workers(&cfg.runtime, &shutdown, |_| {
        let socks = per_worker.next().expect("one socket set per worker");
        let sub = routes.subscribe();
        let fwd_cfg = fwd_cfg.clone();
        move |ctx: worker::WorkerCtx| async move {
            let sub = Rc::new(RefCell::new(sub));
            let mut loops = Vec::new();
            for (idx, sock) in socks.into_iter().enumerate() {
                let ctx2 = ctx.clone();
                let sub = sub.clone();
                let fwd_cfg = fwd_cfg.clone();
                loops.push(monoio::spawn(async move {
                    let c = ctx2.clone();
                    let r = ctx2
                        .serve(sock, move |down, peer| {
                            // Pin the snapshot this connection starts with.
                            let routes = sub.borrow_mut().current().clone();
                            let upstream = routes.upstreams.get(idx).copied();
                            handle_conn(c.clone(), fwd_cfg.clone(), down, peer, upstream)
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::error!(worker = ctx2.id(), error = %e, "listener failed");
                    }
                }));
            }
            for l in loops {
                l.await;
            }
            ctx.finish_drain().await;
        }
    })?;
    let stop_watch = Arc::new(AtomicBool::new(false));
    let admin_addr = match cfg.admin {
        Some(a) => Some(
            spawn_admin(a, workers.stats().to_vec(), routes.clone()).map_err(StartError::Admin)?,
        ),
        None => None,
    };
    if let Some(file) = config_file {
        spawn_reload_watcher(file, cfg.clone(), routes.clone(), stop_watch.clone());
    }
    Ok(Handle {
        workers,
        local_addrs,
        admin_addr,
        routes,
        shutdown,
        drain_timeout: cfg.runtime.drain_timeout,
        stop_watch,
    })
}

async fn handle_conn(
    ctx: worker::WorkerCtx,
    fwd_cfg: Arc<crate::config::ForwardConfig>,
    down: monoio::net::TcpStream,
    peer: SocketAddr,
    upstream: Option<SocketAddr>,
) {
    let Some(upstream) = upstream else {
        return;
    };
    let st = ctx.stats().clone();
    let up = match listener::connect(upstream, ctx.listen_options()).await {
        Ok(s) => s,
        Err(e) => {
            WorkerStats::inc(&st.upstream_connect_errors);
            tracing::debug!(%peer, %upstream, error = %e, "upstream connect failed; resetting client");
            let _ = crate::sys::set_linger_zero(std::os::fd::AsRawFd::as_raw_fd(&down));
            return;
        }
    };
    let out = forward::forward(down, up, &fwd_cfg, ctx.pool(), ctx.aborted()).await;
    WorkerStats::add(&st.bytes_client_to_upstream, out.downstream_to_upstream);
    WorkerStats::add(&st.bytes_upstream_to_client, out.upstream_to_downstream);
    match &out.end {
        End::Reset { .. } => WorkerStats::inc(&st.resets),
        End::Idle => WorkerStats::inc(&st.idle_timeouts),
        End::Closed | End::Aborted => {}
    }
    tracing::trace!(%peer, %upstream, sent = out.downstream_to_upstream, received = out.upstream_to_downstream, end = ?out.end, "connection closed");
}

/// Poll the config file ([`FileWatch`]: a new text once two reads agree, also a save that
/// kept the modification time); on change, parse, validate and publish new upstreams. A
/// broken file is logged (file:line: field) and the old snapshot keeps serving.
fn spawn_reload_watcher(
    mut watch: FileWatch,
    initial: ForwarderConfig,
    routes: Publisher<Routes>,
    stop: Arc<AtomicBool>,
) {
    let _ = std::thread::Builder::new().name("config-watch".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(500));
            let Some(text) = watch.poll() else {
                continue;
            };
            let file = watch.path();
            match ForwarderConfig::from_str(file, &text) {
                Ok(next) => {
                    let same_listeners = next.listeners.len() == initial.listeners.len()
                        && next.listeners.iter().zip(&initial.listeners).all(|(a, b)| a.listen == b.listen);
                    if !same_listeners {
                        tracing::error!(file = %file.display(), "listen addresses changed: restart to apply; keeping the running config");
                        continue;
                    }
                    let v = routes.publish(Routes { upstreams: next.listeners.iter().map(|l| l.upstream).collect() });
                    tracing::info!(file = %file.display(), version = v, "config reloaded");
                }
                Err(e) => tracing::error!("config reload rejected, old config keeps serving: {e}"),
            }
        }
    });
}

/// A tiny blocking HTTP endpoint on the control side (never on a worker).
fn spawn_admin(
    addr: SocketAddr,
    workers: Vec<Arc<WorkerStats>>,
    routes: Publisher<Routes>,
) -> Result<SocketAddr, BindError> {
    listener::ensure_not_served(addr)?;
    let l = StdListener::bind(addr).map_err(|source| BindError::Io { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| BindError::Io { addr, source })?;
    let _ = std::thread::Builder::new().name("admin".into()).spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut req = [0u8; 1024];
            let n = c.read(&mut req).unwrap_or(0);
            let line = String::from_utf8_lossy(&req[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/stats" | "/stats/prometheus" | "/metrics" => {
                    let mut b = stats::render_prometheus("l4fwd", &workers);
                    b.push_str(&format!("# TYPE l4fwd_snapshot_version gauge\nl4fwd_snapshot_version {}\n", routes.version()));
                    b.push_str(&crate::pmqos::render_prometheus("l4fwd"));
                    ("200 OK", b)
                }
                "/healthz" | "/healthz/ready" => ("200 OK", "ok\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let _ = write!(c, "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
        }
    });
    Ok(local)
}

/// Entry point shared by the `l4fwd` binary and `bench`'s self-exec: parse args, start,
/// wait for the drain. Returns the process exit code.
pub fn main_with_args(args: impl IntoIterator<Item = String>) -> std::process::ExitCode {
    use clap::Parser;
    #[derive(Parser)]
    #[command(
        name = "l4fwd",
        about = "Sharded L4 forwarder on the thread-per-core io_uring runtime"
    )]
    struct Args {
        /// YAML config file (listeners, runtime knobs).
        #[arg(long)]
        config: PathBuf,
        /// Force the io driver (overrides the config; the MESH_IO_DRIVER variable wins).
        #[arg(long)]
        io_driver: Option<crate::driver::DriverChoice>,
        /// Force the forwarding mode.
        #[arg(long)]
        mode: Option<crate::config::ForwardMode>,
    }
    crate::init_logging();
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(2);
        }
    };
    let (mut cfg, text) = match ForwarderConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(d) = args.io_driver {
        cfg.runtime.io_driver = d;
    }
    if let Some(m) = args.mode {
        cfg.runtime.forward.mode = m;
    }
    let shutdown = Shutdown::new();
    if let Err(e) = shutdown.install_signal_handlers(cfg.runtime.drain_timeout) {
        eprintln!("error: cannot install signal handlers: {e}");
        return std::process::ExitCode::from(1);
    }
    let watch = FileWatch::new(args.config.clone(), text);
    let handle = match start(cfg.clone(), shutdown, Some(watch)) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    for (l, a) in cfg.listeners.iter().zip(handle.local_addrs()) {
        tracing::info!(name = l.name.as_deref().unwrap_or(""), listen = %a, upstream = %l.upstream, mode = ?cfg.runtime.forward.mode, "listening");
    }
    // Machine-readable readiness line for harnesses (bench, tests).
    println!(
        "READY driver={} workers={} listen={}{}",
        handle.workers().decision().kind,
        handle.workers().len(),
        handle
            .local_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(","),
        handle
            .admin_addr()
            .map(|a| format!(" admin={a}"))
            .unwrap_or_default()
    );
    let _ = std::io::stdout().flush();
    match handle.join() {
        Ok(()) => {
            tracing::info!("drained; exiting");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
