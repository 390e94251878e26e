//! A two-ended HBONE tunnel service on the runtime's workers — the L4 core that ztunnel
//! builds on, and what `bench` measures as the `hbone` path:
//!
//! - **outbound**: accept plain TCP, open a pooled HBONE stream to a remote inbound acting
//!   as a configured workload identity, and bridge;
//! - **inbound**: accept HBONE on a port (client certificate required), check the target is
//!   one this inbound serves (else 400), connect to it (503 on failure), and bridge.
//!
//! ```yaml
//! trust_domain: cluster.local
//! ca: { builtin: /var/lib/mesh/ca }     # or { plugin: DIR } (Istio plug-in CA files) or { static: DIR }
//! h2: { max_streams_per_connection: 100 }
//! outbound:
//!   - listen: 127.0.0.1:15001
//!     identity: spiffe://cluster.local/ns/default/sa/client
//!     hbone: 127.0.0.1:15008
//!     peer_identity: spiffe://cluster.local/ns/default/sa/server
//!     target: 127.0.0.1:9000
//! inbound:
//!   listen: 127.0.0.1:15008
//!   identity: spiffe://cluster.local/ns/default/sa/server
//!   targets: [127.0.0.1:9000]
//! ```
//!
//! Certificates are issued at start and renewed at half life on a control thread; workers
//! pick up the new ones through a snapshot, so running connections are never touched.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use runtime::config::{self, ConfigError, Invalid, RuntimeConfig};
use runtime::listener::{self, BindError};
use runtime::stats::WorkerStats;
use runtime::{Publisher, Shutdown, Workers};

use crate::ca::{CertSource, SigningCa, StaticCerts, WorkloadCert};
use crate::identity::Identity;
use crate::pool::{Pool, PoolKey};
use crate::server::{serve_connection, Inbound, ServerCounters};
use crate::settings::H2Settings;
use crate::tls::TlsCounters;
use crate::wire::{status, ConnectRequest};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum CaConfig {
    /// The embedded default: a root created on first start in this directory, or loaded.
    Builtin(PathBuf),
    /// Istio's plug-in CA files (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`).
    Plugin(PathBuf),
    /// `<dir>/root-cert.pem` and `<dir>/<ns>/<sa>/{cert-chain.pem,key.pem}`.
    Static(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    pub listen: SocketAddr,
    /// The workload this tunnel acts for.
    pub identity: String,
    /// The remote HBONE inbound (`ip:15008`).
    pub hbone: SocketAddr,
    /// The identity the remote must prove.
    pub peer_identity: String,
    /// The CONNECT authority.
    pub target: SocketAddr,
    /// Reuse connections (default); `false` opens a fresh TLS connection per stream.
    #[serde(default = "yes")]
    pub pool: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    pub listen: SocketAddr,
    pub identity: String,
    /// The addresses this inbound serves; any other authority is refused with 400.
    pub targets: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default = "default_td")]
    pub trust_domain: String,
    /// `{builtin: DIR}`, `{plugin: DIR}` or `{static: DIR}`.
    #[serde(with = "serde_norway::with::singleton_map")]
    pub ca: CaConfig,
    #[serde(default)]
    pub h2: H2Settings,
    #[serde(default)]
    pub outbound: Vec<OutboundConfig>,
    #[serde(default)]
    pub inbound: Option<InboundConfig>,
}

fn default_td() -> String {
    "cluster.local".into()
}

fn parse_id(field: String, s: &str) -> Result<Identity, Invalid> {
    s.parse::<Identity>()
        .map_err(|e| Invalid::new(field, e.to_string()))
}

impl ProxyConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        self.runtime.validate("runtime")?;
        if self.outbound.is_empty() && self.inbound.is_none() {
            return Err(Invalid::new(
                "outbound",
                "configure at least one outbound listener or an inbound",
            ));
        }
        for (i, o) in self.outbound.iter().enumerate() {
            parse_id(format!("outbound[{i}].identity"), &o.identity)?;
            parse_id(format!("outbound[{i}].peer_identity"), &o.peer_identity)?;
        }
        if let Some(inb) = &self.inbound {
            parse_id("inbound.identity".into(), &inb.identity)?;
            if inb.targets.is_empty() {
                return Err(Invalid::new(
                    "inbound.targets",
                    "list the addresses this inbound serves",
                ));
            }
        }
        let h = &self.h2;
        if !(16_384..=16_777_215).contains(&h.max_frame_size) {
            return Err(Invalid::new(
                "h2.max_frame_size",
                "must be between 16384 and 16777215",
            ));
        }
        if h.max_streams_per_connection == 0 {
            return Err(Invalid::new(
                "h2.max_streams_per_connection",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = config::read_file(file)?;
        let cfg: ProxyConfig = config::from_yaml_str(file, &text)?;
        cfg.validate().map_err(|e| e.in_file(file, Some(&text)))?;
        Ok(cfg)
    }
}

/// The certificates workers use now.
pub struct CertSet {
    pub certs: HashMap<Identity, Arc<WorkloadCert>>,
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("certificates: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("workers: {0}")]
    Workers(#[from] std::io::Error),
}

/// Counters of a running proxy.
#[derive(Default)]
pub struct ProxyCounters {
    pub client_tls: TlsCounters,
    pub server: Arc<ServerCounters>,
    pub pool_connects: std::sync::atomic::AtomicU64,
    pub stream_open_errors: std::sync::atomic::AtomicU64,
    pub refused_targets: std::sync::atomic::AtomicU64,
}

pub struct Handle {
    workers: Workers,
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addr: Option<SocketAddr>,
    pub counters: Arc<ProxyCounters>,
    pub certs: Publisher<CertSet>,
}

impl Handle {
    pub fn workers(&self) -> &Workers {
        &self.workers
    }
    pub fn stats(&self) -> &[Arc<WorkerStats>] {
        self.workers.stats()
    }
    pub fn join(self) -> std::io::Result<()> {
        self.workers.join()
    }
}

fn make_source(cfg: &ProxyConfig) -> Result<Arc<dyn CertSource>, ProxyError> {
    Ok(match &cfg.ca {
        CaConfig::Builtin(dir) => Arc::new(SigningCa::builtin(dir, &cfg.trust_domain)?),
        CaConfig::Plugin(dir) => Arc::new(SigningCa::plugin(dir)?),
        CaConfig::Static(dir) => Arc::new(StaticCerts::new(dir)?),
    })
}

fn issue_all(
    source: &dyn CertSource,
    ids: &[Identity],
    inbound: Option<&Identity>,
    resumption: bool,
) -> Result<CertSet, ProxyError> {
    let now = SystemTime::now();
    let mut certs = HashMap::new();
    for id in ids {
        certs.insert(id.clone(), Arc::new(source.issue(id, now)?));
    }
    let server_tls = match inbound {
        Some(id) => Some(crate::tls::server_config_with(&certs[id], resumption)?),
        None => None,
    };
    Ok(CertSet { certs, server_tls })
}

/// Start the configured outbound listeners and inbound on the runtime's workers.
pub fn start(cfg: ProxyConfig, shutdown: Shutdown) -> Result<Handle, ProxyError> {
    let _ = runtime::sys::raise_nofile_limit();
    let source = make_source(&cfg)?;
    let out_ids: Vec<(Identity, Identity)> = cfg
        .outbound
        .iter()
        .map(|o| {
            (
                o.identity.parse().expect("validated"),
                o.peer_identity.parse().expect("validated"),
            )
        })
        .collect();
    let in_id: Option<Identity> = cfg
        .inbound
        .as_ref()
        .map(|i| i.identity.parse().expect("validated"));
    let mut all_ids: Vec<Identity> = out_ids
        .iter()
        .map(|(a, _)| a.clone())
        .chain(in_id.clone())
        .collect();
    all_ids.sort();
    all_ids.dedup();
    let certs = Publisher::new(issue_all(
        source.as_ref(),
        &all_ids,
        in_id.as_ref(),
        cfg.h2.tls_resumption,
    )?);
    spawn_renewer(
        source,
        all_ids,
        in_id.clone(),
        certs.clone(),
        cfg.h2.tls_resumption,
    );

    let n = runtime::worker::worker_count(&cfg.runtime);
    let opts = listener::ListenOptions::from_config(&cfg.runtime);
    let mut out_socks = Vec::new();
    let mut outbound_addrs = Vec::new();
    for o in &cfg.outbound {
        let s = listener::bind_sharded(o.listen, n, &opts)?;
        outbound_addrs.push(s[0].local_addr().map_err(|source| BindError::Io {
            addr: o.listen,
            source,
        })?);
        out_socks.push(s);
    }
    let (mut in_socks, inbound_addr) = match &cfg.inbound {
        Some(i) => {
            let s = listener::bind_sharded(i.listen, n, &opts)?;
            let a = s[0].local_addr().map_err(|source| BindError::Io {
                addr: i.listen,
                source,
            })?;
            (s.into_iter().map(Some).collect::<Vec<_>>(), Some(a))
        }
        None => ((0..n).map(|_| None).collect(), None),
    };
    let mut per_worker: Vec<Vec<std::net::TcpListener>> = (0..n).map(|_| Vec::new()).collect();
    for socks in out_socks {
        for (w, s) in socks.into_iter().enumerate() {
            per_worker[w].push(s);
        }
    }
    let counters = Arc::new(ProxyCounters::default());
    let shared = Arc::new((cfg.clone(), out_ids));
    let mut per_worker = per_worker.into_iter();
    let workers = runtime::spawn_workers(&cfg.runtime, &shutdown, |w| {
        let outs = per_worker.next().expect("sockets per worker");
        let inb = in_socks[w].take();
        let (certs, counters, shared) = (certs.subscribe(), counters.clone(), shared.clone());
        move |ctx: runtime::WorkerCtx| async move {
            let certs = Rc::new(RefCell::new(certs));
            let client_tls: Arc<TlsCounters> = Arc::new(TlsCounters::default());
            let pool = Pool::with_socket_options(
                shared.0.h2.clone(),
                client_tls,
                ctx.listen_options().clone(),
            );
            let mut loops = Vec::new();
            for (i, sock) in outs.into_iter().enumerate() {
                let (ctx2, certs, pool, counters, shared) = (
                    ctx.clone(),
                    certs.clone(),
                    pool.clone(),
                    counters.clone(),
                    shared.clone(),
                );
                loops.push(monoio::spawn(async move {
                    let c = ctx2.clone();
                    let _ = ctx2
                        .serve(sock, move |tcp, peer| {
                            let set = certs.borrow_mut().current().clone();
                            outbound_conn(
                                c.clone(),
                                pool.clone(),
                                set,
                                counters.clone(),
                                shared.clone(),
                                i,
                                tcp,
                                peer,
                            )
                        })
                        .await;
                }));
            }
            if let Some(sock) = inb {
                let (ctx2, certs, counters, shared) =
                    (ctx.clone(), certs.clone(), counters.clone(), shared.clone());
                loops.push(monoio::spawn(async move {
                    let c = ctx2.clone();
                    let _ = ctx2
                        .serve(sock, move |tcp, peer| {
                            let set = certs.borrow_mut().current().clone();
                            inbound_conn(
                                c.clone(),
                                set,
                                counters.clone(),
                                shared.clone(),
                                tcp,
                                peer,
                            )
                        })
                        .await;
                }));
            }
            for l in loops {
                l.await;
            }
            ctx.finish_drain().await;
        }
    })?;
    Ok(Handle {
        workers,
        outbound_addrs,
        inbound_addr,
        counters,
        certs,
    })
}

#[allow(clippy::too_many_arguments)]
async fn outbound_conn(
    ctx: runtime::WorkerCtx,
    pool: Pool,
    certs: Arc<CertSet>,
    counters: Arc<ProxyCounters>,
    shared: Arc<(ProxyConfig, Vec<(Identity, Identity)>)>,
    idx: usize,
    tcp: monoio::net::TcpStream,
    peer: SocketAddr,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let (cfg, ids) = (&shared.0, &shared.1);
    let o = &cfg.outbound[idx];
    let (src, dst) = &ids[idx];
    let cert = certs.certs[src].clone();
    let mut req = ConnectRequest::new(o.target);
    req.forwarded_for = Some(peer.ip());
    let key = PoolKey {
        src: src.clone(),
        dst: vec![dst.clone()],
        addr: o.hbone,
    };
    // The client's first bytes go ahead of the reply (see `Early`).
    let mut early = crate::client::Early::new(&tcp);
    let stream = if o.pool {
        pool.open_early(&key, &cert, &req, Some(&mut early)).await
    } else {
        // Cold path: a fresh connection per stream (handshake benchmark).
        match crate::tls::client_config_to(&cert, &key.dst, o.hbone, cfg.h2.tls_resumption) {
            Ok(tls) => crate::client::Client::connect_and_open(
                o.hbone,
                tls,
                &cfg.h2,
                &counters.client_tls,
                ctx.listen_options(),
                &req,
                Some(&mut early),
            )
            .await
            .map(|(_client, stream)| stream),
            Err(e) => Err(crate::HboneError::Config(e)),
        }
    };
    let early = early.sent();
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            counters.stream_open_errors.fetch_add(1, Relaxed);
            tracing::debug!(%peer, error = %e, "hbone stream failed; resetting client");
            let _ = runtime::sys::set_linger_zero(std::os::fd::AsRawFd::as_raw_fd(&tcp));
            return;
        }
    };
    counters.pool_connects.store(pool.connects(), Relaxed);
    let out = crate::stream::bridge(
        tcp,
        stream,
        cfg.h2.chunk_size,
        cfg.runtime.forward.idle_timeout,
        ctx.aborted(),
    )
    .await;
    let st = ctx.stats();
    WorkerStats::add(
        &st.bytes_client_to_upstream,
        early + out.downstream_to_upstream,
    );
    WorkerStats::add(&st.bytes_upstream_to_client, out.upstream_to_downstream);
    if matches!(out.end, runtime::forward::End::Reset { .. }) {
        WorkerStats::inc(&st.resets);
    }
}

async fn inbound_conn(
    ctx: runtime::WorkerCtx,
    certs: Arc<CertSet>,
    counters: Arc<ProxyCounters>,
    shared: Arc<(ProxyConfig, Vec<(Identity, Identity)>)>,
    tcp: monoio::net::TcpStream,
    peer: SocketAddr,
) {
    let Some(tls) = certs.server_tls.clone() else {
        return;
    };
    let cfg = &shared.0;
    let handler_ctx = ctx.clone();
    let shared2 = shared.clone();
    let counters2 = counters.clone();
    let handler = Rc::new(move |inb: Inbound| {
        let (ctx, shared, counters) = (handler_ctx.clone(), shared2.clone(), counters2.clone());
        async move { inbound_stream(ctx, shared, counters, inb).await }
    });
    let r = serve_connection(
        tcp,
        peer,
        tls,
        &cfg.h2,
        counters.server.clone(),
        ctx.draining(),
        handler,
    )
    .await;
    if let Err(e) = r {
        tracing::debug!(%peer, error = %e, "hbone inbound connection ended with an error");
    }
}

async fn inbound_stream(
    ctx: runtime::WorkerCtx,
    shared: Arc<(ProxyConfig, Vec<(Identity, Identity)>)>,
    counters: Arc<ProxyCounters>,
    inb: Inbound,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let cfg = &shared.0;
    let target = inb.request.target;
    let serves = cfg
        .inbound
        .as_ref()
        .is_some_and(|i| i.targets.contains(&target));
    if !serves {
        counters.refused_targets.fetch_add(1, Relaxed);
        inb.reject(status::BAD_AUTHORITY);
        return;
    }
    let tcp = match listener::connect(target, ctx.listen_options()).await {
        Ok(t) => t,
        Err(e) => {
            WorkerStats::inc(&ctx.stats().upstream_connect_errors);
            tracing::debug!(%target, error = %e, "upstream connect failed: 503");
            inb.reject(status::UPSTREAM_FAILED);
            return;
        }
    };
    let Ok(stream) = inb.accept() else { return };
    let out = crate::stream::bridge(
        tcp,
        stream,
        cfg.h2.chunk_size,
        cfg.runtime.forward.idle_timeout,
        ctx.aborted(),
    )
    .await;
    let st = ctx.stats();
    WorkerStats::add(&st.bytes_upstream_to_client, out.downstream_to_upstream);
    WorkerStats::add(&st.bytes_client_to_upstream, out.upstream_to_downstream);
}

/// Re-issue certificates at half life and publish them; running connections keep theirs.
fn spawn_renewer(
    source: Arc<dyn CertSource>,
    ids: Vec<Identity>,
    inbound: Option<Identity>,
    certs: Publisher<CertSet>,
    resumption: bool,
) {
    let _ = std::thread::Builder::new()
        .name("cert-renew".into())
        .spawn(move || loop {
            let next = certs
                .load()
                .certs
                .values()
                .map(|c| c.refresh_at())
                .min()
                .unwrap_or_else(SystemTime::now);
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            std::thread::sleep(wait.max(Duration::from_secs(1)));
            match issue_all(source.as_ref(), &ids, inbound.as_ref(), resumption) {
                Ok(set) => {
                    let v = certs.publish(set);
                    tracing::info!(version = v, "workload certificates renewed");
                }
                Err(e) => {
                    tracing::error!(error = %e, "certificate renewal failed; retrying in 10 s");
                    std::thread::sleep(Duration::from_secs(10));
                }
            }
        });
}

/// Entry point for `bench`'s self-exec (`__hbone --config FILE`) and tests.
pub fn main_with_args(args: impl IntoIterator<Item = String>) -> std::process::ExitCode {
    use std::io::Write;
    let args: Vec<String> = args.into_iter().collect();
    runtime::init_logging();
    let Some(path) = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
    else {
        eprintln!(
            "usage: {} --config FILE",
            args.first().map(String::as_str).unwrap_or("hbone-proxy")
        );
        return std::process::ExitCode::from(2);
    };
    let cfg = match ProxyConfig::load(Path::new(path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let shutdown = Shutdown::new();
    if let Err(e) = shutdown.install_signal_handlers(cfg.runtime.drain_timeout) {
        eprintln!("error: signals: {e}");
        return std::process::ExitCode::from(1);
    }
    let h = match start(cfg, shutdown) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let outs: Vec<String> = h.outbound_addrs.iter().map(|a| a.to_string()).collect();
    println!(
        "READY driver={} workers={} listen={}{}",
        h.workers().decision().kind,
        h.workers().len(),
        outs.join(","),
        h.inbound_addr
            .map(|a| format!(" inbound={a}"))
            .unwrap_or_default()
    );
    let _ = std::io::stdout().flush();
    match h.join() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
