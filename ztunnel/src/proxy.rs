//! The running ztunnel: listeners on the runtime's workers, the config watcher and the
//! control-side endpoints.
//!
//! - **outbound** (transparent capture on `:15001` with the destination from
//!   `SO_ORIGINAL_DST`, or SOCKS5): the client is identified by its source IP (a captured
//!   workload of this node); both entries share one routing function (`outbound_conn`), and
//!   differ only in how a failure is reported (SOCKS5 reply code vs. reset); [`mesh_model::route::outbound`] picks passthrough (plain TCP through
//!   `runtime::forward`), HBONE to the destination node's ztunnel (`:authority` =
//!   `podIP:targetPort`) or HBONE to a waypoint (`:authority` = `VIP:port` for a service,
//!   R7). HBONE goes through the worker's [`hbone::pool::Pool`] acting as the client's
//!   identity; the CONNECT carries `forwarded: for=<client IP>` (and `host=` for a service)
//!   and Istio's `baggage` for the client workload (`state::source_baggage`, rendered once per snapshot). The SOCKS reply is sent once the upstream answered, so a refusal at the far
//!   end (401 → `02`, 503 → `05`) reaches the client.
//! - **inbound HBONE**: peer identity from mTLS, our certificate chosen by the address the
//!   connection was made to (below); the source address for policy is the socket's peer,
//!   or the CONNECT's `forwarded: for=` when the peer is the destination's own waypoint or
//!   the client's node ztunnel speaking for it (the client's identity, from its node's
//!   `nodes[].ztunnel` address when the model names one) (`policy_source_ip`); [`mesh_model::route::inbound`] decides:
//!   not a captured workload of this node → 400; deny → 401 (counted and logged with the
//!   policy); hairpin → HBONE to the destination's waypoint (R12) as the ztunnel identity;
//!   allow → connect to the pod (503 on failure) and bridge.
//! - **inbound plaintext**: the destination is the original destination (`SO_ORIGINAL_DST`,
//!   captured traffic to a pod) or, when not redirected, the listener's `target`; the same
//!   decision with no identity (R10); deny and not served reset the connection.
//! - **live re-check**: each worker notices a new snapshot version (50 ms tick) and every
//!   allowed inbound connection re-runs the decision; one that is now denied is closed
//!   (counted under `transport="hbone_live"`/`"plaintext_live"` with the policy).
//!
//! Identities: one node-level HBONE listener presents, per connection, the certificate of
//! the pod the connection was addressed to (`hbone_addressed`: original destination or
//! local address), or the ztunnel's own for the node address; see [`crate::config`].

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hbone::ca::CertSource;
use hbone::pool::{Pool, PoolKey};
use hbone::server::{serve_connection, Inbound as HboneInbound, ServerCounters};
use hbone::stream::H2Stream;
use hbone::wire::{status, ConnectRequest};
use hbone::HboneError;
use mesh_model::model::{Identity, Workload};
use mesh_model::route::{self, Inbound, InboundRequest, Outbound, SeededChooser};
use mesh_model::snapshot::Snapshot;
use monoio::net::TcpStream;
use runtime::event::LocalEvent;
use runtime::forward::{DirEnd, End};
use runtime::listener::{self, BindError};
use runtime::worker::race;
use runtime::{Publisher, Shutdown, Subscriber, WorkerCtx, Workers};

use crate::admin::{self, Endpoint};
use crate::config::{self, Loaded, Settings};
use crate::metrics::{
    self, AddrLabel, ConnLabels, ConnectTimeout, DenyLabels, LocalMetrics, Metrics, PathLabels,
};
use crate::socks::{self, reply, Failure, Target};
use crate::state::{self, State};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("certificates: {0}")]
    Ca(#[from] hbone::ca::CaError),
    #[error("workers: {0}")]
    Workers(#[from] std::io::Error),
    #[error("capture rules: {0}")]
    Capture(#[from] crate::capture::CaptureError),
    #[error("dns proxy on {0}: {1}")]
    Dns(SocketAddr, std::io::Error),
}

/// Control-side counters of the config watcher.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    pub reloads: AtomicU64,
    pub errors: AtomicU64,
    /// Capture rule sets installed by this process (`ztunnel.capture`), the first included.
    pub capture_installs: AtomicU64,
    /// Capture rule updates that failed (the previous rules stay).
    pub capture_errors: AtomicU64,
    /// Loads of the file in force because a DNS ServiceEntry's host name answered otherwise.
    pub dns_reloads: AtomicU64,
}

/// Addresses actually bound.
#[derive(Debug, Clone)]
pub struct Addrs {
    pub socks5: SocketAddr,
    /// The transparent outbound capture listener, when configured.
    pub outbound: Option<SocketAddr>,
    pub hbone: SocketAddr,
    pub plaintext: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    pub readiness: SocketAddr,
    /// Dual stack (`address6`): the IPv6 twins of outbound, hbone and plaintext listeners.
    pub v6: Vec<SocketAddr>,
}

pub struct Handle {
    workers: Option<Workers>,
    shutdown: Shutdown,
    pub addrs: Addrs,
    pub state: Publisher<State>,
    pub metrics: Arc<Metrics>,
    pub reloads: Arc<ReloadCounters>,
    endpoints: Vec<Endpoint>,
    stop_watch: Arc<AtomicBool>,
    /// The DNS proxy (`ztunnel.dns`), when on; and what it did.
    pub dns: Option<crate::dns::DnsProxy>,
    pub dns_counters: Arc<crate::dns::DnsCounters>,
}

impl Handle {
    pub fn workers(&self) -> &Workers {
        self.workers.as_ref().expect("running")
    }
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }
    /// Wait for the workers (after a drain).
    pub fn join(mut self) -> std::io::Result<()> {
        let r = match self.workers.take() {
            Some(w) => w.join(),
            None => Ok(()),
        };
        self.stop_control();
        r
    }
    /// Drain with `timeout`, then wait for everything to stop.
    pub fn stop(self, timeout: Duration) -> std::io::Result<()> {
        self.shutdown.drain(timeout);
        self.join()
    }
    fn stop_control(&mut self) {
        self.stop_watch.store(true, Ordering::SeqCst);
        for e in &mut self.endpoints {
            e.stop();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.workers.is_some() {
            self.shutdown.drain(Duration::ZERO);
        }
        self.stop_control();
    }
}

/// Which listener a socket belongs to.
#[derive(Debug, Clone, Copy)]
enum Listener {
    Socks,
    Hbone,
    Outbound,
    Plaintext(usize),
}

/// What every worker shares (read-only).
struct Shared {
    settings: Settings,
    /// The outbound capture listeners' port (IPv4 and IPv6 twins share it): a connection
    /// whose local address has another port was handed over by a `tproxy` rule.
    outbound_port: Option<u16>,
    /// Each plaintext listener's port, likewise.
    plaintext_ports: Vec<u16>,
}

/// One worker's state; never leaves its thread.
struct Worker {
    ctx: WorkerCtx,
    sub: RefCell<Subscriber<State>>,
    pool: Pool,
    chooser: RefCell<SeededChooser>,
    metrics: LocalMetrics,
    server_counters: Arc<ServerCounters>,
    /// Notified when this worker sees a new snapshot version (live re-check).
    changed: LocalEvent,
    shared: Arc<Shared>,
}

impl Worker {
    fn state(&self) -> Arc<State> {
        self.sub.borrow_mut().current().clone()
    }
    fn settings(&self) -> &Settings {
        &self.shared.settings
    }
}

/// Start ztunnel. `watch` (the file and profile it came from) enables hot reload.
pub fn start(
    loaded: Loaded,
    watch: Option<config::Source>,
    shutdown: Shutdown,
) -> Result<Handle, StartError> {
    let _ = runtime::sys::raise_nofile_limit();
    let Loaded {
        settings,
        snapshot,
        text,
    } = loaded;
    let source = state::cert_source(&settings)?;
    let first = state::build(source.as_ref(), &settings, snapshot, None)?;
    let publisher = Publisher::new(first);
    let metrics = Arc::new(Metrics::default());
    let reloads = Arc::new(ReloadCounters::default());
    let ready = Arc::new(AtomicBool::new(false));

    // Readiness first (503 until everything below is up).
    let mut endpoints = Vec::new();
    let r2 = ready.clone();
    endpoints.push(admin::serve(
        "readiness",
        settings.readiness,
        move |path| match path {
            "/healthz/ready" if r2.load(Ordering::SeqCst) => {
                ("200 OK", "text/plain", "ready\n".into())
            }
            "/healthz/ready" => (
                "503 Service Unavailable",
                "text/plain",
                "not ready\n".into(),
            ),
            _ => admin::not_found(),
        },
    )?);

    let n = runtime::worker::worker_count(&settings.runtime);
    let opts = listener::ListenOptions::from_config(&settings.runtime);
    let bound = |a: SocketAddr, s: &[std::net::TcpListener]| {
        s[0].local_addr()
            .map_err(|source| BindError::Io { addr: a, source })
    };
    let socks_socks = listener::bind_sharded(settings.socks5, n, &opts)?;
    // The capture listeners (outbound, and plaintext ones without a fixed `target`) are
    // transparent: capture hands them connections with `tproxy`, the original destination
    // as the local address. Without CAP_NET_ADMIN they are not, and only `REDIRECT` capture
    // reaches them.
    let capture_opts = listener::ListenOptions {
        transparent: true,
        ..opts.clone()
    };
    let bind_capture = |a: SocketAddr| match listener::bind_sharded(a, n, &capture_opts) {
        Err(BindError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            tracing::warn!(addr = %a, "capture listener: IP_TRANSPARENT refused (needs CAP_NET_ADMIN); tproxy capture cannot reach it (its connections are reset), REDIRECT capture can");
            listener::bind_sharded(a, n, &opts)
        }
        r => r,
    };
    // HBONE to a captured pod (`podIP:15008`) arrives by `tproxy` too, so a node that
    // captures (an outbound or a plaintext capture listener, or rules of its own) has a
    // transparent HBONE listener; its own HBONE to a pod of the node is `REDIRECT`ed to it.
    let captures = settings.outbound.is_some()
        || settings.capture.is_some()
        || settings.plaintext.iter().any(|p| p.target.is_none());
    // Which listeners are transparent, for the IPv4 ones and their IPv6 twins alike.
    let bind = |kind: Listener, a: SocketAddr| {
        let transparent = match kind {
            Listener::Outbound => true,
            Listener::Hbone => captures,
            Listener::Plaintext(i) => settings.plaintext[i].target.is_none(),
            Listener::Socks => false,
        };
        match transparent {
            true => bind_capture(a),
            false => listener::bind_sharded(a, n, &opts),
        }
    };
    let hbone_socks = bind(Listener::Hbone, settings.hbone)?;
    let mut plain_socks = Vec::new();
    let mut plain_addrs = Vec::new();
    for (i, p) in settings.plaintext.iter().enumerate() {
        let s = bind(Listener::Plaintext(i), p.listen)?;
        plain_addrs.push(bound(p.listen, &s)?);
        plain_socks.push(s);
    }
    let socks_addr = bound(settings.socks5, &socks_socks)?;
    let (out_socks, out_addr) = match settings.outbound {
        Some(a) => {
            let s = bind(Listener::Outbound, a)?;
            let bound_at = bound(a, &s)?;
            (Some(s), Some(bound_at))
        }
        None => (None, None),
    };
    let hbone_addr = bound(settings.hbone, &hbone_socks)?;
    // Dual stack: the same listeners again on the IPv6 address (IPv6-only sockets).
    let mut v6_groups = Vec::new();
    let mut v6_addrs = Vec::new();
    if let Some(ip6) = settings.address6 {
        let mut twins = vec![(Listener::Hbone, hbone_addr.port())];
        if let Some(o) = out_addr {
            twins.push((Listener::Outbound, o.port()));
        }
        for (i, p) in plain_addrs.iter().enumerate() {
            twins.push((Listener::Plaintext(i), p.port()));
        }
        for (kind, port) in twins {
            let a = SocketAddr::new(IpAddr::V6(ip6), port);
            let s = bind(kind, a)?;
            v6_addrs.push(bound(a, &s)?);
            v6_groups.push((kind, s));
        }
    }
    // Capture rules owned by this process: in place before anything reports ready.
    // The DNS proxy, answering from the snapshot in force.
    let dns_counters = Arc::new(crate::dns::DnsCounters::default());
    let dns = match &settings.dns {
        Some(d) => {
            let p = publisher.clone();
            let lookup = move |q: &crate::dns::Query| crate::dns::lookup(&p.load().model, q);
            let proxy =
                crate::dns::serve(d.listen, d.upstream.clone(), lookup, dns_counters.clone())
                    .map_err(|e| StartError::Dns(d.listen, e))?;
            tracing::info!(listen = %proxy.addr, upstream = ?d.upstream, "dns proxy up");
            Some(proxy)
        }
        None => None,
    };
    let dns_port = dns.as_ref().map(|d| d.addr.port());
    let capture = match &settings.capture {
        Some(c) => {
            let mut rules =
                crate::capture::owned_rules(&publisher.load().model, &settings.node, &c.table);
            rules.dns_port = dns_port;
            rules.install(None)?;
            reloads.capture_installs.fetch_add(1, Ordering::Relaxed);
            tracing::info!(table = %rules.table, interfaces = ?rules.pod_interfaces, pods = ?rules.pod_cidrs, "capture rules installed");
            Some(rules)
        }
        None => None,
    };

    let (m2, p2, rl2, dc2) = (
        metrics.clone(),
        publisher.clone(),
        reloads.clone(),
        dns_counters.clone(),
    );
    let stats_ep = admin::serve("stats", settings.stats, move |path| match path {
        "/stats/prometheus" | "/metrics" | "/stats" => {
            let mut body = m2.render(p2.version());
            body.push_str(&format!(
                "# TYPE ztunnel_config_reloads_total counter\nztunnel_config_reloads_total {}\n# TYPE ztunnel_config_reload_errors_total counter\nztunnel_config_reload_errors_total {}\n# TYPE ztunnel_capture_installs_total counter\nztunnel_capture_installs_total {}\n# TYPE ztunnel_capture_errors_total counter\nztunnel_capture_errors_total {}\n# TYPE ztunnel_dns_reloads_total counter\nztunnel_dns_reloads_total {}\n",
                rl2.reloads.load(Ordering::Relaxed),
                rl2.errors.load(Ordering::Relaxed),
                rl2.capture_installs.load(Ordering::Relaxed),
                rl2.capture_errors.load(Ordering::Relaxed),
                rl2.dns_reloads.load(Ordering::Relaxed)
            ));
            body.push_str(&dc2.render());
            body.push_str(&runtime::pmqos::render_prometheus("ztunnel"));
            ("200 OK", "text/plain; version=0.0.4", body)
        }
        _ => admin::not_found(),
    })?;
    let p3 = publisher.clone();
    let r3 = ready.clone();
    let admin_ep = admin::serve("admin", settings.admin, move |path| match path {
        "/config_dump" => {
            let st = p3.load();
            let body = admin::config_dump(&st, p3.version()).to_string();
            ("200 OK", "application/json", body)
        }
        "/healthz/ready" if r3.load(Ordering::SeqCst) => ("200 OK", "text/plain", "ready\n".into()),
        _ => admin::not_found(),
    })?;
    let addrs = Addrs {
        socks5: socks_addr,
        outbound: out_addr,
        hbone: hbone_addr,
        plaintext: plain_addrs,
        admin: admin_ep.addr,
        stats: stats_ep.addr,
        readiness: endpoints[0].addr,
        v6: v6_addrs,
    };
    endpoints.push(stats_ep);
    endpoints.push(admin_ep);

    // Per worker: one socket of each listener, in the order of `kinds`.
    let mut groups = vec![
        (Listener::Socks, socks_socks),
        (Listener::Hbone, hbone_socks),
    ];
    if let Some(s) = out_socks {
        groups.push((Listener::Outbound, s));
    }
    for (i, s) in plain_socks.into_iter().enumerate() {
        groups.push((Listener::Plaintext(i), s));
    }
    groups.extend(v6_groups);
    let kinds: Arc<Vec<Listener>> = Arc::new(groups.iter().map(|(k, _)| *k).collect());
    let mut per_worker: Vec<Vec<std::net::TcpListener>> = (0..n).map(|_| Vec::new()).collect();
    for (_, group) in groups {
        for (w, s) in group.into_iter().enumerate() {
            per_worker[w].push(s);
        }
    }
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        outbound_port: out_addr.map(|a| a.port()),
        plaintext_ports: addrs.plaintext.iter().map(|a| a.port()).collect(),
    });
    let mut per_worker = per_worker.into_iter();
    // Started from a short-lived thread, never the caller's. `spawn_workers` probes io_uring
    // by creating (and entering) a ring; since `runtime::driver::decide` runs that probe on
    // a thread of its own this is a second line of defence (no ring may ever be entered on
    // the embedding process's thread). Why it matters: when a ring is
    // closed the kernel's ring-exit work (a kworker, possibly much later) queues task work
    // with TWA_SIGNAL to every thread that entered it. That sets TIF_NOTIFY_SIGNAL on the
    // thread, which makes a blocking socket call with a timeout (SO_RCVTIMEO/SO_SNDTIMEO)
    // fail with EINTR: no signal is delivered (strace shows EINTR without any `--- SIG`),
    // and calls without a timeout are restarted silently. A process embedding ztunnel (the
    // tests, the bench harness) saw its blocking reads fail with EINTR now and then. Here
    // the task work targets a thread that has exited, which the kernel skips.
    let workers = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                runtime::spawn_workers(&settings.runtime, &shutdown, |id| {
                    let socks = per_worker.next().expect("sockets per worker");
                    let sub = publisher.subscribe();
                    let (metrics, shared, kinds) = (metrics.clone(), shared.clone(), kinds.clone());
                    move |ctx: WorkerCtx| async move {
                        let seed = SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.as_nanos() as u64)
                            .unwrap_or(0)
                            ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        let w = Rc::new(Worker {
                            ctx: ctx.clone(),
                            sub: RefCell::new(sub),
                            // HBONE legs get the worker's socket options (nodelay,
                            // keepalive, SO_RCVBUF/SO_SNDBUF of the profile).
                            pool: Pool::with_socket_options(
                                shared.settings.h2.clone(),
                                metrics.hbone_client_tls.clone(),
                                ctx.listen_options().clone(),
                            ),
                            chooser: RefCell::new(SeededChooser::new(seed)),
                            server_counters: metrics.hbone_server.clone(),
                            metrics: LocalMetrics::new(metrics),
                            changed: LocalEvent::new(),
                            shared,
                        });
                        // Watch the snapshot version so live connections are re-authorized on change.
                        let watcher = w.clone();
                        monoio::spawn(async move {
                            let draining = watcher.ctx.draining();
                            let mut draining = std::pin::pin!(draining);
                            // Our own last-seen version: connections refresh the shared subscriber too.
                            let mut seen = watcher.sub.borrow().version();
                            loop {
                                let tick = monoio::time::sleep(Duration::from_millis(50));
                                if race(tick, draining.as_mut()).await.is_right() {
                                    return;
                                }
                                let now = {
                                    let mut sub = watcher.sub.borrow_mut();
                                    sub.current();
                                    sub.version()
                                };
                                if now != seen {
                                    seen = now;
                                    watcher.changed.notify();
                                }
                            }
                        });
                        let mut loops = Vec::new();
                        for (i, sock) in socks.into_iter().enumerate() {
                            let w = w.clone();
                            let kind = kinds[i];
                            loops.push(monoio::spawn(async move {
                    let w2 = w.clone();
                    let r = w
                        .ctx
                        .serve(sock, move |tcp, peer| {
                            let w = w2.clone();
                            // Each kind's future is boxed on its own: the task of an idle
                            // connection holds the state of its own path only, not the
                            // largest of the four (the unboxed `match` measured 8.9 KB).
                            async move {
                                match kind {
                                    Listener::Socks => Box::pin(socks_conn(w, tcp, peer)).await,
                                    Listener::Hbone => Box::pin(hbone_conn(w, tcp, peer)).await,
                                    Listener::Outbound => {
                                        Box::pin(captured_conn(w, tcp, peer)).await
                                    }
                                    Listener::Plaintext(p) => {
                                        Box::pin(plaintext_conn(w, p, tcp, peer)).await
                                    }
                                }
                            }
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::error!(worker = w.ctx.id(), error = %e, "listener failed");
                    }
                }));
                        }
                        for l in loops {
                            l.await;
                        }
                        ctx.finish_drain().await;
                    }
                })
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })?;
    let stop_watch = Arc::new(AtomicBool::new(false));
    // The text in force: the one the running snapshot was loaded from.
    let file = watch.map(|w| {
        let f = runtime::filewatch::FileWatch::new(w.file, text.unwrap_or_default());
        (f, w.profile)
    });
    spawn_watcher(
        file,
        settings,
        source,
        publisher.clone(),
        reloads.clone(),
        stop_watch.clone(),
        capture,
    );
    ready.store(true, Ordering::SeqCst);
    Ok(Handle {
        workers: Some(workers),
        shutdown,
        addrs,
        state: publisher,
        metrics,
        reloads,
        endpoints,
        stop_watch,
        dns,
        dns_counters,
    })
}

/// Poll the file (`runtime::filewatch`: a new text once two reads agree, also a save that
/// kept the modification time) and certificate lifetimes; publish a new state on change. A
/// broken file is logged with file:line and field, and the old state keeps serving.
fn spawn_watcher(
    mut watch: Option<(runtime::filewatch::FileWatch, tuning::Profile)>,
    settings: Settings,
    source: Arc<dyn CertSource>,
    publisher: Publisher<State>,
    counters: Arc<ReloadCounters>,
    stop: Arc<AtomicBool>,
    mut capture: Option<crate::capture::Rules>,
) {
    let _ = std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let resolve = settings.dns_resolver.0;
            let mut dns =
                mesh_model::config::DnsRecheck::new(settings.dns_refresh, std::time::Instant::now());
            // The text in force (what a DNS refresh loads again).
            // (None until one is known: a start without the text waits for its first reload.)
            let mut in_force = watch
                .as_ref()
                .map(|(f, _)| f.current().to_string())
                .filter(|t| !t.is_empty());
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let current = publisher.load();
                let mut next_model: Option<Snapshot> = None;
                if let Some((file, profile)) = watch.as_mut() {
                    let now = std::time::Instant::now();
                    let text = match file.poll() {
                        Some(text) => Some(text),
                        // DNS ServiceEntries' names looked up again: an answer that
                        // changed loads the text in force again.
                        None if dns.changed(now, &current.model, &resolve) => {
                            tracing::info!(file = %file.path().display(), "a DNS ServiceEntry's host name answers otherwise: loading the file again");
                            counters.dns_reloads.fetch_add(1, Ordering::Relaxed);
                            in_force.clone()
                        }
                        None => None,
                    };
                    if let Some(text) = text {
                        match config::load_str_with(file.path(), &text, profile, publisher.version() + 1, &resolve) {
                            Ok(l) => {
                                in_force = Some(text);
                                if l.settings != settings {
                                    tracing::warn!(file = %file.path().display(), "the ztunnel/runtime/h2 sections changed: restart to apply them; reloading the mesh only");
                                }
                                next_model = Some(l.snapshot);
                            }
                            Err(e) => {
                                counters.errors.fetch_add(1, Ordering::Relaxed);
                                tracing::error!("config reload rejected, the old config keeps serving: {e}");
                            }
                        }
                    }
                }
                if next_model.is_none() && state::needs_renewal(&current) {
                    let mut m = current.model.clone();
                    m.version = publisher.version() + 1;
                    next_model = Some(m);
                }
                let Some(model) = next_model else { continue };
                match state::build(source.as_ref(), &settings, model, Some(&current)) {
                    Ok(st) => {
                        // The capture rules follow the new snapshot (R2) before it serves:
                        // a pod captured from now on is already known to the proxy.
                        if let Some(old) = capture.as_mut() {
                            let mut next = crate::capture::owned_rules(&st.model, &settings.node, &old.table);
                            next.dns_port = old.dns_port;
                            if next != *old {
                                match next.replace_table(None) {
                                    Ok(()) => {
                                        counters.capture_installs.fetch_add(1, Ordering::Relaxed);
                                        tracing::info!(interfaces = ?next.pod_interfaces, pods = ?next.pod_cidrs, "capture rules updated");
                                        *old = next;
                                    }
                                    Err(e) => {
                                        counters.capture_errors.fetch_add(1, Ordering::Relaxed);
                                        tracing::error!(error = %e, "capture rules not updated; the previous rules stay");
                                    }
                                }
                            }
                        }
                        let v = publisher.publish(st);
                        counters.reloads.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(version = v, "config snapshot published");
                    }
                    Err(e) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "cannot issue certificates; the old config keeps serving");
                    }
                }
            }
        });
}

// ---------------------------------------------------------------------------------------
// Labels and logs

/// `addr` as a label: itself when the model knows its IP (a service VIP or a workload),
/// else `unknown`.
fn model_addr(model: &Snapshot, addr: SocketAddr) -> AddrLabel {
    if model.lookup(addr.ip()).is_some() {
        AddrLabel::Known(addr)
    } else {
        AddrLabel::Unknown
    }
}

/// The label value `unknown`, shared.
fn unknown() -> Arc<str> {
    static UNKNOWN: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "unknown".into());
    UNKNOWN.clone()
}

/// An empty label value, shared.
fn empty() -> Arc<str> {
    static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "".into());
    EMPTY.clone()
}

fn dest_labels(
    labels: &mut ConnLabels,
    st: &State,
    service: Option<&String>,
    workload: Option<&String>,
) {
    if let Some(s) = service {
        labels.destination_service = st.service_label(s);
    }
    if let Some(t) = workload.and_then(|u| st.texts.get(u)) {
        labels.destination_workload = t.name.clone();
        labels.destination_workload_namespace = t.namespace.clone();
        labels.destination_principal = t.principal.clone();
        if service.is_none() {
            if let Some(s) = &t.service {
                labels.destination_service = s.clone();
            }
        }
    }
}

fn base_labels(reporter: &'static str, security: &'static str) -> ConnLabels {
    let u = unknown();
    ConnLabels {
        reporter,
        source_workload: u.clone(),
        source_workload_namespace: u.clone(),
        source_principal: u.clone(),
        destination_service: u.clone(),
        destination_workload: u.clone(),
        destination_workload_namespace: u.clone(),
        destination_principal: u,
        connection_security_policy: security,
    }
}

fn source_labels(labels: &mut ConnLabels, st: &State, w: &Workload) {
    if let Some(t) = st.texts.get(&w.uid) {
        labels.source_workload = t.name.clone();
        labels.source_workload_namespace = t.namespace.clone();
        labels.source_principal = t.principal.clone();
    }
}

/// Why a connection ended, as its access-log line says (formatted only when logged).
enum Ended<'a> {
    End(&'a End),
    /// Closed because a newer snapshot denies it; the deciding policy.
    Revoked(String),
}

impl std::fmt::Display for Ended<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::End(End::Closed) => f.write_str("closed"),
            Ended::End(End::Reset { by, error }) => write!(f, "reset by {by:?}: {error}"),
            Ended::End(End::Idle) => f.write_str("idle timeout"),
            Ended::End(End::Aborted) => f.write_str("aborted (drain deadline)"),
            Ended::Revoked(policy) => {
                write!(f, "authorization revoked by a config change ({policy})")
            }
        }
    }
}

/// One access-log line. Its values are formatted by `tracing` only when the line is
/// enabled (target `access` at info, as Istio's ztunnel and our waypoint; a worker writes these lines in batches, `runtime::logbuf`): a connection whose log is off builds no text.
#[allow(clippy::too_many_arguments)]
fn access_log(
    direction: &str,
    route: &dyn std::fmt::Display,
    src: SocketAddr,
    dst: SocketAddr,
    labels: &ConnLabels,
    target: Option<SocketAddr>,
    authority: Option<SocketAddr>,
    sent: u64,
    received: u64,
    started: Instant,
    reason: &Ended<'_>,
) {
    tracing::info!(
        target: "access",
        direction,
        route = %route,
        src = %metrics::Src(src),
        dst = %dst,
        src_workload = %labels.source_workload,
        src_identity = %labels.source_principal,
        dst_service = %labels.destination_service,
        dst_workload = %labels.destination_workload,
        dst_identity = %labels.destination_principal,
        hbone_target = %metrics::Opt(target),
        authority = %metrics::Opt(authority),
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        reason = %reason,
        "connection complete"
    );
}

fn reset(tcp: &TcpStream) {
    let _ = runtime::sys::set_linger_zero(std::os::fd::AsRawFd::as_raw_fd(tcp));
}

// ---------------------------------------------------------------------------------------
// Outbound (SOCKS5)

/// A service hostname (or a workload-free name) → an address, from the snapshot.
pub fn resolve(snap: &Snapshot, name: &str, port: u16) -> Option<SocketAddr> {
    let svc = snap.service_by_host(name)?;
    let ip = svc
        .vips
        .iter()
        .map(|(_, ip)| *ip)
        .find(IpAddr::is_ipv4)
        .or_else(|| svc.vips.first().map(|(_, ip)| *ip))?;
    Some(SocketAddr::new(ip, port))
}

/// A TCP connect to `target` within `h2.handshake_timeout` (Envoy's `connect_timeout`; 0:
/// the kernel's SYN retries only): a destination that drops SYNs fails with `TimedOut`
/// after it, counted as `what`, instead of holding the connection for minutes.
async fn connect_within(
    w: &Worker,
    target: SocketAddr,
    what: ConnectTimeout,
) -> std::io::Result<TcpStream> {
    let limit = w.settings().h2.handshake_timeout;
    let connect = listener::connect(target, w.ctx.listen_options());
    // Boxed: the connect and its timer (a 512-byte timer entry) are freed once connected,
    // not kept in the connection's task for its whole life.
    Box::pin(hbone::settings::within(limit, connect))
        .await
        .unwrap_or_else(|_| {
            w.metrics.connect_timeout(what);
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("not connected within {limit:?} (h2.handshake_timeout)"),
            ))
        })
}

fn status_reply(e: &HboneError) -> u8 {
    match e {
        HboneError::Status(s) if *s == status::DENIED => reply::NOT_ALLOWED,
        HboneError::Status(s) if *s == status::UPSTREAM_FAILED => reply::CONNECTION_REFUSED,
        HboneError::Status(s) if *s == status::BAD_AUTHORITY => reply::HOST_UNREACHABLE,
        HboneError::Connect(..) => reply::CONNECTION_REFUSED,
        HboneError::ReplyTimeout { .. } => reply::HOST_UNREACHABLE,
        _ => reply::GENERAL_FAILURE,
    }
}

async fn socks_fail(w: &Worker, tcp: &mut TcpStream, peer: SocketAddr, code: u8, why: &str) {
    w.metrics.socks_error(code);
    tracing::info!(target: "access", direction = "outbound", src = %peer, reply = code, reason = why, "socks5 request refused");
    let _ = socks::send_reply(tcp, code).await;
}

/// How an outbound client reached ztunnel. The routing is the same; only the way a result
/// is reported to the client differs: SOCKS5 answers with a reply code, a transparently
/// captured connection (which believes it is talking to the destination) is reset on
/// failure and just starts flowing on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Downstream {
    Socks,
    Captured,
}

impl Downstream {
    /// Refuse the connection; `code` is the SOCKS5 reply (only logged when captured).
    async fn fail(self, w: &Worker, tcp: &mut TcpStream, peer: SocketAddr, code: u8, why: &str) {
        match self {
            // Boxed (as below): a failure's reply is no part of a connection's lasting state.
            Downstream::Socks => Box::pin(socks_fail(w, tcp, peer, code, why)).await,
            Downstream::Captured => {
                tracing::info!(target: "access", direction = "outbound", src = %peer, reply = code, reason = why, "captured connection refused: reset");
                reset(tcp);
            }
        }
    }
    /// The upstream is ready: tell the client (SOCKS5 `succeeded`). False if it went away.
    async fn ready(self, tcp: &mut TcpStream) -> bool {
        match self {
            Downstream::Socks => Box::pin(socks::send_reply(tcp, reply::SUCCEEDED)).await,
            Downstream::Captured => true,
        }
    }
}

/// Where a connection accepted by a capture listener bound at `port` was going: under
/// `tproxy` (the capture rules' way, see [`crate::capture`]) its local address, any port but
/// the listener's own (no further call); under `REDIRECT` the conntrack original
/// (`SO_ORIGINAL_DST`); `None` when it was made to the listener itself.
fn captured_destination(tcp: &TcpStream, port: Option<u16>) -> std::io::Result<Option<SocketAddr>> {
    let local = tcp.local_addr()?;
    if Some(local.port()) != port {
        return Ok(Some(local));
    }
    runtime::sys::original_dst(std::os::fd::AsRawFd::as_raw_fd(tcp))
}

/// Transparent outbound capture (`:15001`): the destination is the connection's original
/// destination, the source workload its peer address (a pod of this node: neither `tproxy`
/// nor `REDIRECT` changes the source); see [`captured_destination`].
async fn captured_conn(w: Rc<Worker>, mut tcp: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let dst = match captured_destination(&tcp, w.shared.outbound_port) {
        Ok(Some(d)) => d,
        Ok(None) => {
            let why = "no original destination (connection was not redirected)";
            return Downstream::Captured
                .fail(&w, &mut tcp, peer, reply::GENERAL_FAILURE, why)
                .await;
        }
        Err(e) => {
            let why = format!("original destination: {e}");
            return Downstream::Captured
                .fail(&w, &mut tcp, peer, reply::GENERAL_FAILURE, &why)
                .await;
        }
    };
    let st = w.state();
    let tunnel = Box::pin(outbound_conn(
        &w,
        &st,
        Downstream::Captured,
        tcp,
        peer,
        dst,
        started,
    ));
    if let Some(t) = tunnel.await {
        t.run(&w).await
    }
}

async fn socks_conn(w: Rc<Worker>, mut tcp: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let st = w.state();
    let target = match Box::pin(socks::handshake(&mut tcp, Duration::from_secs(10))).await {
        Ok(t) => t,
        Err(Failure::Silent) => return,
        Err(Failure::Greeting) => {
            w.metrics.socks_error(socks::NO_ACCEPTABLE_METHOD);
            return;
        }
        Err(Failure::Reply(code)) => {
            return socks_fail(&w, &mut tcp, peer, code, "bad socks5 request").await
        }
    };
    let dst = match target {
        Target::Addr(a) => a,
        Target::Domain(name, port) => match resolve(&st.model, &name, port) {
            Some(a) => a,
            None => {
                let why = format!("unknown host {name:?}");
                return socks_fail(&w, &mut tcp, peer, reply::HOST_UNREACHABLE, &why).await;
            }
        },
    };
    let tunnel = Box::pin(outbound_conn(
        &w,
        &st,
        Downstream::Socks,
        tcp,
        peer,
        dst,
        started,
    ));
    if let Some(t) = tunnel.await {
        t.run(&w).await
    }
}

/// An HBONE tunnel, set up: what it needs while it lasts. The setup (routing, the pool, the
/// CONNECT) runs in its own boxed future, freed before the tunnel's bytes flow, so an idle
/// tunnel's task holds this and the bridge, not the setup's largest state. Outbound tunnels
/// and the inbound plaintext hairpin to a waypoint (`direction` in the access log).
struct Tunnel {
    direction: &'static str,
    tcp: TcpStream,
    stream: H2Stream,
    /// Bytes of the client's sent on the stream before it was answered (counted as sent).
    early: u64,
    labels: ConnLabels,
    peer: SocketAddr,
    dst: SocketAddr,
    target: SocketAddr,
    authority: SocketAddr,
    route: &'static str,
    started: Instant,
}

impl Tunnel {
    async fn run(self, w: &Worker) {
        // The bridge takes the sockets; the rest is read where it is needed.
        let Tunnel { tcp, stream, .. } = self;
        let counters = w.metrics.open(&self.labels);
        let out = hbone::stream::bridge(
            tcp,
            stream,
            w.settings().h2.chunk_size,
            w.settings().runtime.forward.idle_timeout,
            w.ctx.aborted(),
        )
        .await;
        let sent = self.early + out.downstream_to_upstream;
        metrics::close(&counters, sent, out.upstream_to_downstream);
        access_log(
            self.direction,
            &self.route,
            self.peer,
            self.dst,
            &self.labels,
            Some(self.target),
            Some(self.authority),
            sent,
            out.upstream_to_downstream,
            self.started,
            &Ended::End(&out.end),
        );
    }
}

/// The outbound decision (R1, R4–R8) for a client `peer` (a workload of this node, by IP)
/// going to `dst`, shared by SOCKS5 and transparent capture. Passthrough runs here; an HBONE
/// tunnel (direct or through a waypoint) is returned set up, to run after this is freed.
async fn outbound_conn(
    w: &Worker,
    st: &State,
    mode: Downstream,
    mut tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    started: Instant,
) -> Option<Tunnel> {
    let node = &w.settings().node;
    let Some(src) = st
        .model
        .workload_by_ip(peer.ip())
        .filter(|s| &s.node == node)
    else {
        let why = format!("{} is not a workload on node {node}", peer.ip());
        mode.fail(w, &mut tcp, peer, reply::NOT_ALLOWED, &why).await;
        return None;
    };
    let decision = route::outbound(&st.model, Some(src), dst, &mut *w.chooser.borrow_mut());
    let path = |route: &'static str, target: AddrLabel| PathLabels {
        direction: "outbound",
        route,
        target,
        authority: AddrLabel::None,
        peer: empty(),
        identity: empty(),
    };
    let src_principal = || st.texts.get(&src.uid).map(|t| t.principal.clone());
    let hbone_path = |route: &'static str,
                      target: SocketAddr,
                      authority: SocketAddr,
                      expected: &[hbone::Identity],
                      dest: Option<&String>| {
        // The destination workload's identity (and its node ztunnel's): the shared text.
        let peer = match (expected, dest.and_then(|u| st.texts.get(u))) {
            ([one, node], Some(t)) if *one == t.identity && *node == w.settings().peer_identity => {
                t.principal_or_node.clone()
            }
            // A workload's, a waypoint's or the node ztunnel's identity: the snapshot's text.
            ([one], _) => st.principal(one),
            _ => expected
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        };
        PathLabels {
            authority: AddrLabel::Known(authority),
            peer,
            identity: src_principal().unwrap_or_else(|| src.identity().to_string().into()),
            ..path(route, AddrLabel::Known(target))
        }
    };
    match decision {
        Outbound::NoEndpoint { service, port } => {
            w.metrics.path(&path("no_endpoint", AddrLabel::None));
            let why = format!("service {service} has no healthy endpoint for port {port}");
            mode.fail(w, &mut tcp, peer, reply::HOST_UNREACHABLE, &why)
                .await;
            None
        }
        Outbound::Passthrough {
            target,
            reason,
            service,
            workload,
        } => {
            // An address outside the mesh is the pod's choice: not a label value.
            w.metrics
                .path(&path("passthrough", model_addr(&st.model, target)));
            let mut labels = base_labels("source", "none");
            source_labels(&mut labels, st, src);
            dest_labels(&mut labels, st, service.as_ref(), workload.as_ref());
            let up = match connect_within(w, target, ConnectTimeout::Passthrough).await {
                Ok(u) => u,
                Err(e) => {
                    let why = format!("connect {target}: {e}");
                    let code = if e.kind() == std::io::ErrorKind::TimedOut {
                        reply::HOST_UNREACHABLE
                    } else {
                        reply::CONNECTION_REFUSED
                    };
                    mode.fail(w, &mut tcp, peer, code, &why).await;
                    return None;
                }
            };
            if !mode.ready(&mut tcp).await {
                return None;
            }
            let counters = w.metrics.open(&labels);
            let out = Box::pin(runtime::forward::forward(
                tcp,
                up,
                &w.settings().runtime.forward,
                w.ctx.pool(),
                w.ctx.aborted(),
            ))
            .await;
            metrics::close(
                &counters,
                out.downstream_to_upstream,
                out.upstream_to_downstream,
            );
            access_log(
                "outbound",
                &format_args!("passthrough ({reason:?})"),
                peer,
                dst,
                &labels,
                Some(target),
                None,
                out.downstream_to_upstream,
                out.upstream_to_downstream,
                started,
                &Ended::End(&out.end),
            );
            None
        }
        Outbound::Hbone {
            target,
            authority,
            identity,
            service,
            workload,
        } => {
            // A tunnel addressed to the pod (`podIP:15008`, Istio's way) must be answered
            // with the pod's own identity; one addressed to the destination node's ztunnel
            // (`nodes[].ztunnel`) may be answered by that ztunnel (`peer_identity`).
            let to_node = st
                .model
                .workload(&workload)
                .and_then(|d| st.model.node(&d.node))
                .is_some_and(|n| n.ztunnel == target.ip());
            let mut expected = vec![identity];
            if to_node {
                expected.push(w.settings().peer_identity.clone());
            }
            let mut labels = base_labels("source", "mutual_tls");
            source_labels(&mut labels, st, src);
            dest_labels(&mut labels, st, service.as_ref(), Some(&workload));
            let route = "hbone";
            w.metrics.path(&hbone_path(
                route,
                target,
                authority,
                &expected,
                Some(&workload),
            ));
            let host = service
                .as_deref()
                .map(|s| state::service_host(s).to_string());
            outbound_hbone(
                w, st, mode, tcp, peer, dst, src, target, authority, expected, host, labels, route,
                started,
            )
            .await
        }
        Outbound::Waypoint {
            target,
            authority,
            identity,
            waypoint,
            service,
            workload,
        } => {
            let expected = vec![identity
                .as_ref()
                .cloned()
                .unwrap_or_else(|| w.settings().peer_identity.clone())];
            let mut labels = base_labels("source", "mutual_tls");
            source_labels(&mut labels, st, src);
            dest_labels(&mut labels, st, service.as_ref(), workload.as_ref());
            w.metrics.path(&hbone_path(
                "waypoint",
                target,
                authority,
                &expected,
                workload.as_ref(),
            ));
            tracing::debug!(?waypoint, %authority, "outbound via waypoint");
            let host = service
                .as_deref()
                .map(|s| state::service_host(s).to_string());
            outbound_hbone(
                w, st, mode, tcp, peer, dst, src, target, authority, expected, host, labels,
                "waypoint", started,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn outbound_hbone(
    w: &Worker,
    st: &State,
    mode: Downstream,
    mut tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: &Workload,
    target: SocketAddr,
    authority: SocketAddr,
    expected: Vec<hbone::Identity>,
    host: Option<String>,
    labels: ConnLabels,
    route: &'static str,
    started: Instant,
) -> Option<Tunnel> {
    // The source's identity, certificate and rendered `baggage`, from the snapshot.
    let Some(source) = st.sources.get(&peer.ip()) else {
        let why = format!("no certificate for {}", src.identity());
        mode.fail(w, &mut tcp, peer, reply::GENERAL_FAILURE, &why)
            .await;
        return None;
    };
    // The request and the pool key in their own scope: not kept across the bridge's await,
    // in the task of a connection for as long as it lives.
    let (opened, early) = {
        let mut req = ConnectRequest::new(authority);
        req.forwarded_for = Some(peer.ip());
        req.host = host;
        req.baggage_header = source.baggage.clone();
        let key = PoolKey {
            src: source.identity.clone(),
            dst: expected,
            addr: target,
        };
        // A captured client may have sent its first bytes already: they go ahead of the
        // reply. A SOCKS5 client waits for our reply, so it has none to send.
        let mut early = hbone::client::Early::new(&tcp);
        let early_ref = matches!(mode, Downstream::Captured).then_some(&mut early);
        let opened = Box::pin(w.pool.open_early(&key, &source.cert, &req, early_ref)).await;
        (opened, early.sent())
    };
    let stream = match opened {
        Ok(s) => s,
        Err(e) => {
            if matches!(e, HboneError::ReplyTimeout { .. }) {
                w.metrics.connect_timeout(ConnectTimeout::HboneReply);
            }
            let why = format!("HBONE to {target} (authority {authority}): {e}");
            mode.fail(w, &mut tcp, peer, status_reply(&e), &why).await;
            return None;
        }
    };
    if !mode.ready(&mut tcp).await {
        return None;
    }
    Some(Tunnel {
        direction: "outbound",
        tcp,
        stream,
        early,
        labels,
        peer,
        dst,
        target,
        authority,
        route,
        started,
    })
}

// ---------------------------------------------------------------------------------------
// Inbound

/// Which TLS identity an accepted HBONE connection presents, and which pod it is for.
///
/// The address it was made to is its local address when that is a workload's (a peer
/// dialled `podIP:15008` and node-level capture handed it here by `tproxy`, or the listener
/// is bound on the pod's address), else its original destination (`SO_ORIGINAL_DST`: this
/// node's own HBONE to a pod of the node, `REDIRECT`ed in the `output` hook), else the
/// local address. A captured workload of this node there → its certificate, and
/// the connection's CONNECT streams may only target that workload. Anything else (the
/// node's ztunnel address) → the ztunnel's own identity, any local workload.
fn hbone_addressed(
    w: &Worker,
    st: &State,
    tcp: &TcpStream,
) -> (Arc<rustls::ServerConfig>, Arc<str>, Option<String>) {
    let local = tcp.local_addr().ok();
    let addressed = match local {
        Some(l) if st.model.workload_by_ip(l.ip()).is_some() => local,
        _ => match runtime::sys::original_dst(std::os::fd::AsRawFd::as_raw_fd(tcp)) {
            Ok(Some(a)) => Some(a),
            _ => local,
        },
    };
    let node = &w.settings().node;
    if let Some(a) = addressed {
        if let Some((id, tls)) = st.server_tls_for(a.ip(), node) {
            let uid = st.model.workload_by_ip(a.ip()).map(|w| w.uid.clone());
            return (tls.clone(), st.principal(id), uid);
        }
    }
    (
        st.server_tls.clone(),
        st.principal(&w.settings().identity),
        None,
    )
}

async fn hbone_conn(w: Rc<Worker>, tcp: TcpStream, peer: SocketAddr) {
    let st = w.state();
    let (tls, presented, for_pod) = hbone_addressed(&w, &st, &tcp);
    drop(st);
    let w2 = w.clone();
    let conn = Rc::new(InConn {
        presented,
        for_pod,
        peer: std::cell::OnceCell::new(),
    });
    // The stream's future itself (no async block around it, which would keep `inb` once
    // more), with the inbound request boxed: an async fn keeps its arguments for its whole
    // life, so a stream holds a pointer to it, not its 400 bytes twice.
    let handler = Rc::new(move |inb: HboneInbound| {
        let (w, conn) = (w2.clone(), conn.clone());
        hbone_stream(w, Box::new(inb), conn)
    });
    let r = serve_connection(
        tcp,
        peer,
        tls,
        &w.settings().h2,
        w.server_counters.clone(),
        w.ctx.draining(),
        handler,
    )
    .await;
    if let Err(e) = r {
        tracing::debug!(%peer, error = %e, "hbone inbound connection ended with an error");
    }
}

/// What the streams of one inbound HBONE connection share.
struct InConn {
    /// The identity the connection presented (the path label `identity`).
    presented: Arc<str>,
    /// The uid of the pod the connection was addressed to, if any.
    for_pod: Option<String>,
    /// The peer's identity as text, made for the connection's first stream (one TLS
    /// session: the same for every stream).
    peer: std::cell::OnceCell<Arc<str>>,
}

impl InConn {
    fn peer_text(&self, st: &State, peer: Option<&Identity>) -> Arc<str> {
        self.peer
            .get_or_init(|| match peer {
                Some(p) => st.principal(p),
                None => empty(),
            })
            .clone()
    }
}

/// `peer`: the verified identity and its text.
fn inbound_source_labels(
    labels: &mut ConnLabels,
    st: &State,
    peer: Option<(&Identity, &Arc<str>)>,
    src_ip: IpAddr,
) {
    if let Some((_, text)) = peer {
        labels.source_principal = text.clone();
    }
    let snap = &st.model;
    let by_ip = snap
        .workload_by_ip(src_ip)
        .filter(|w| peer.is_none_or(|(p, _)| w.has_identity(p)));
    let by_id = || peer.and_then(|(p, _)| snap.workloads_by_identity(p).next());
    if let Some(t) = by_ip.or_else(by_id).and_then(|w| st.texts.get(&w.uid)) {
        labels.source_workload = t.name.clone();
        labels.source_workload_namespace = t.namespace.clone();
    }
}

fn deny_policy(v: &mesh_model::authz::Verdict) -> String {
    match &v.reason {
        mesh_model::authz::Reason::DenyPolicy(p) => p.clone(),
        mesh_model::authz::Reason::NoAllowMatched(ps) => ps.join(","),
        other => format!("{other:?}"),
    }
}

/// The source address an inbound HBONE stream is authorized with (`ipBlocks`), re-checked
/// with on reloads and forwarded on an R12 hairpin. The CONNECT's `forwarded: for=` is the
/// original client only from a hop that took the client's connection itself:
///
/// - the destination's own **waypoint** (peer identity = its waypoint's), as Istio's
///   ztunnel, which trusts `Forwarded` from its waypoint;
/// - the client's **node ztunnel speaking for it** (`Snapshot::node_ztunnel_speaks_for`,
///   the rule the waypoint applies too): this ztunnel opens
///   tunnels from its node's address, not the pod's (Istio's in-pod mode uses the pod's),
///   so a captured pod-to-pod connection arrives from the client node's address with the
///   client's certificate and the client's address in `for=`.
///
/// From any other peer the socket's peer address counts, so holding a mesh certificate
/// does not let a caller choose the address a DENY `ipBlocks` is matched against.
fn policy_source_ip(
    snap: &Snapshot,
    peer: Option<&Identity>,
    forwarded_for: Option<IpAddr>,
    peer_addr: SocketAddr,
    target: SocketAddr,
) -> IpAddr {
    let socket = peer_addr.ip().to_canonical();
    let (Some(claimed), Some(peer)) = (forwarded_for.map(|f| f.to_canonical()), peer) else {
        return socket;
    };
    if claimed == socket {
        return socket;
    }
    let from_waypoint = snap
        .workload_by_ip(target.ip())
        .and_then(|w| w.waypoint.as_ref())
        .and_then(|wp| wp.identity.as_ref())
        .is_some_and(|waypoint| waypoint == peer);
    if from_waypoint || snap.node_ztunnel_speaks_for(peer, claimed, socket) {
        claimed
    } else {
        socket
    }
}

/// The inbound request out of its box: the box is freed here, not when the stream ends.
fn unbox(inb: Box<HboneInbound>) -> HboneInbound {
    *inb
}

/// One CONNECT stream of an inbound HBONE connection `conn`.
async fn hbone_stream(w: Rc<Worker>, mut inb: Box<HboneInbound>, conn: Rc<InConn>) {
    let started = Instant::now();
    let st = w.state();
    let target = inb.request.target;
    let peer_id = inb.peer_identity.take();
    let for_pod = &conn.for_pod;
    let src_ip = policy_source_ip(
        &st.model,
        peer_id.as_ref(),
        inb.request.forwarded_for,
        inb.peer_addr,
        target,
    );
    let src = SocketAddr::new(src_ip, 0);
    let decision = route::inbound(
        &st.model,
        &InboundRequest {
            peer: peer_id.as_ref(),
            src: src_ip,
            dst: target,
        },
        &w.settings().node,
    );
    let peer_s = conn.peer_text(&st, peer_id.as_ref());
    // The `:authority` is the peer's choice: a label value only when the model knows it.
    let authority = model_addr(&st.model, target);
    let path = |route: &'static str, to: Option<SocketAddr>| PathLabels {
        direction: "inbound",
        route,
        target: to.into(),
        authority,
        peer: peer_s.clone(),
        identity: conn.presented.clone(),
    };
    // A tunnel made to one pod (and authenticated as it) carries streams for that pod only.
    if let Some(uid) = for_pod {
        let ok = st
            .model
            .workload(uid)
            .is_some_and(|p| p.ips.contains(&target.ip()));
        if !ok {
            w.metrics.path(&path("hbone_wrong_pod", None));
            tracing::info!(target: "access", direction = "inbound", src = %inb.peer_addr, peer = %peer_s, authority = %target, addressed = %uid, "CONNECT target is not the pod this tunnel was made to: 400");
            inb.reject(status::BAD_AUTHORITY);
            return;
        }
    }
    let mut labels = base_labels("destination", "mutual_tls");
    // Telemetry may name the workload at the claimed address: only one whose identity is
    // the peer's proven one (`inbound_source_labels` checks), never for policy.
    let claimed = inb.request.forwarded_for.unwrap_or(src_ip);
    inbound_source_labels(
        &mut labels,
        &st,
        peer_id.as_ref().map(|p| (p, &peer_s)),
        claimed,
    );
    match decision {
        Inbound::NotServed => {
            w.metrics.path(&path("hbone_not_served", None));
            tracing::info!(target: "access", direction = "inbound", src = %inb.peer_addr, peer = %peer_s, authority = %target, "not a workload on this node: 400");
            inb.reject(status::BAD_AUTHORITY);
        }
        Inbound::Deny { workload, verdict } => {
            let policy = deny_policy(&verdict);
            w.metrics.path(&path("hbone_deny", None));
            w.metrics.denied(&DenyLabels {
                transport: "hbone",
                policy: policy.clone(),
            });
            tracing::info!(target: "access", direction = "inbound", src = %inb.peer_addr, peer = %peer_s, authority = %target, workload, policy, "denied by authorization: 401");
            inb.reject(status::DENIED);
        }
        Inbound::Hairpin {
            waypoint,
            authority,
            workload,
        } => {
            dest_labels(&mut labels, &st, None, Some(&workload));
            w.metrics
                .path(&path("hbone_hairpin", Some(waypoint.address)));
            let up = match Box::pin(hairpin_open(&w, &st, &waypoint, authority, src_ip, None)).await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(target: "access", direction = "inbound", authority = %target, waypoint = %waypoint.address, error = %e, "hairpin to waypoint failed: 503");
                    inb.reject(status::UPSTREAM_FAILED);
                    return;
                }
            };
            let Ok(down) = unbox(inb).accept() else {
                return;
            };
            let counters = w.metrics.open(&labels);
            let (sent, received, end) = Box::pin(splice_h2(
                down,
                up,
                w.settings().runtime.forward.idle_timeout,
                w.ctx.aborted(),
            ))
            .await;
            metrics::close(&counters, sent, received);
            access_log(
                "inbound",
                &"hbone_hairpin",
                src,
                target,
                &labels,
                Some(waypoint.address),
                Some(authority),
                sent,
                received,
                started,
                &Ended::End(&end),
            );
        }
        Inbound::Allow { workload, verdict } => {
            dest_labels(&mut labels, &st, None, Some(&workload));
            w.metrics.path(&path("hbone_allow", Some(target)));
            let tcp = match connect_within(&w, target, ConnectTimeout::HbonePod).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::info!(target: "access", direction = "inbound", authority = %target, error = %e, "connect to pod failed: 503");
                    inb.reject(status::UPSTREAM_FAILED);
                    return;
                }
            };
            let Ok(stream) = unbox(inb).accept() else {
                return;
            };
            let counters = w.metrics.open(&labels);
            let why = Rc::new(RefCell::new(None));
            // Boxed: the bridge's `drive` keeps its `abort` twice (as given and pinned).
            let abort = Box::pin(abort_or_revoked(&w, peer_id, src_ip, target, &why));
            let out = hbone::stream::bridge(
                tcp,
                stream,
                w.settings().h2.chunk_size,
                w.settings().runtime.forward.idle_timeout,
                abort,
            )
            .await;
            // The pod is the bridge's downstream: sent = towards the pod.
            let (sent, received) = (out.upstream_to_downstream, out.downstream_to_upstream);
            metrics::close(&counters, sent, received);
            let reason = close_reason(&w, "hbone_live", &out.end, &why);
            access_log(
                "inbound",
                &format_args!("hbone_allow ({:?})", verdict.reason),
                src,
                target,
                &labels,
                None,
                Some(target),
                sent,
                received,
                started,
                &reason,
            );
        }
    }
}

/// Completes when a newer snapshot no longer allows this connection (live re-check); the
/// deciding policy is left in `why`.
async fn revoked(
    w: Rc<Worker>,
    peer: Option<Identity>,
    src: IpAddr,
    dst: SocketAddr,
    why: Rc<RefCell<Option<String>>>,
) {
    let mut wait = w.changed.wait();
    loop {
        wait.await;
        wait = w.changed.wait();
        let st = w.state();
        let req = InboundRequest {
            peer: peer.as_ref(),
            src,
            dst,
        };
        match route::inbound(&st.model, &req, &w.settings().node) {
            Inbound::Deny { verdict, .. } => {
                *why.borrow_mut() = Some(deny_policy(&verdict));
                return;
            }
            Inbound::NotServed => {
                *why.borrow_mut() = Some("destination no longer served".into());
                return;
            }
            Inbound::Allow { .. } | Inbound::Hairpin { .. } => {}
        }
    }
}

/// `abort` of a connection: the drain deadline or a revoked authorization.
fn abort_or_revoked(
    w: &Rc<Worker>,
    peer: Option<Identity>,
    src: IpAddr,
    dst: SocketAddr,
    why: &Rc<RefCell<Option<String>>>,
) -> impl std::future::Future<Output = ()> + 'static {
    let aborted = w.ctx.aborted();
    let revoked = revoked(w.clone(), peer, src, dst, why.clone());
    async move {
        race(aborted, revoked).await;
    }
}

/// After a connection: the close reason, counting a revocation.
fn close_reason<'a>(
    w: &Worker,
    transport: &'static str,
    end: &'a End,
    why: &Rc<RefCell<Option<String>>>,
) -> Ended<'a> {
    match why.borrow_mut().take() {
        Some(policy) if matches!(end, End::Aborted) => {
            w.metrics.denied(&DenyLabels {
                transport,
                policy: policy.clone(),
            });
            Ended::Revoked(policy)
        }
        _ => Ended::End(end),
    }
}

/// R12: open an HBONE stream to `waypoint` for `authority`, as the ztunnel identity (a
/// plaintext client's first bytes ahead of the reply with `early`).
async fn hairpin_open(
    w: &Worker,
    st: &State,
    waypoint: &mesh_model::model::WaypointRef,
    authority: SocketAddr,
    src_ip: IpAddr,
    early: Option<&mut hbone::client::Early<'_>>,
) -> Result<H2Stream, HboneError> {
    let me = &w.settings().identity;
    let cert = st
        .certs
        .get(me)
        .cloned()
        .ok_or_else(|| HboneError::Protocol(format!("no certificate for {me}")))?;
    let expected = vec![waypoint
        .identity
        .as_ref()
        .cloned()
        .unwrap_or_else(|| w.settings().peer_identity.clone())];
    let mut req = ConnectRequest::new(authority);
    req.forwarded_for = Some(src_ip);
    let key = PoolKey {
        src: me.clone(),
        dst: expected,
        addr: waypoint.address,
    };
    w.pool.open_early(&key, &cert, &req, early).await
}

async fn copy_h2(
    r: &mut hbone::stream::H2Reader,
    wr: &mut hbone::stream::H2Writer,
    count: &Cell<u64>,
) -> DirEnd {
    let io = |e: h2::Error| std::io::Error::new(std::io::ErrorKind::ConnectionReset, e);
    loop {
        match r.read().await {
            Some(Ok(b)) => {
                let n = b.len() as u64;
                if let Err(e) = wr.write_all(b, false).await {
                    return DirEnd::WriteFailed(io(e));
                }
                count.set(count.get() + n);
            }
            Some(Err(e)) => return DirEnd::ReadFailed(io(e)),
            None => {
                return match wr.write_all(Bytes::new(), true).await {
                    Ok(()) => DirEnd::Eof,
                    Err(e) => DirEnd::WriteFailed(io(e)),
                }
            }
        }
    }
}

/// Bridge two HBONE streams (hairpin). Returns (down→up bytes, up→down bytes, end).
async fn splice_h2(
    down: H2Stream,
    up: H2Stream,
    idle: Duration,
    abort: impl std::future::Future<Output = ()>,
) -> (u64, u64, End) {
    let (mut dw, mut dr) = down.split();
    let (mut uw, mut ur) = up.split();
    let counts = [Cell::new(0u64), Cell::new(0u64)];
    let end = runtime::forward::drive(
        copy_h2(&mut dr, &mut uw, &counts[0]),
        copy_h2(&mut ur, &mut dw, &counts[1]),
        &counts,
        idle,
        abort,
    )
    .await;
    match &end {
        End::Closed => {}
        _ => {
            dw.reset(h2::Reason::CANCEL);
            uw.reset(h2::Reason::CANCEL);
        }
    }
    (counts[0].get(), counts[1].get(), end)
}

async fn plaintext_conn(w: Rc<Worker>, idx: usize, tcp: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let st = w.state();
    let fallback = w.settings().plaintext.get(idx).and_then(|p| p.target);
    let port = w.shared.plaintext_ports.get(idx).copied();
    let target = match captured_destination(&tcp, port) {
        Ok(Some(d)) => d,
        Ok(None) => match fallback {
            Some(t) => t,
            None => {
                tracing::info!(target: "access", direction = "inbound", src = %peer, "plaintext: no original destination and no target: reset");
                reset(&tcp);
                return;
            }
        },
        Err(e) => {
            tracing::info!(target: "access", direction = "inbound", src = %peer, error = %e, "plaintext: original destination unknown: reset");
            reset(&tcp);
            return;
        }
    };
    let decision = route::inbound(
        &st.model,
        &InboundRequest {
            peer: None,
            src: peer.ip(),
            dst: target,
        },
        &w.settings().node,
    );
    let path =
        |route: &'static str, to: Option<SocketAddr>, authority: Option<SocketAddr>| PathLabels {
            direction: "inbound",
            route,
            target: to.into(),
            authority: authority.into(),
            peer: empty(),
            identity: empty(),
        };
    let mut labels = base_labels("destination", "none");
    inbound_source_labels(&mut labels, &st, None, peer.ip());
    match decision {
        Inbound::NotServed => {
            w.metrics.path(&path("plaintext_not_served", None, None));
            tracing::info!(target: "access", direction = "inbound", src = %peer, dst = %target, "plaintext: not a workload on this node: reset");
            reset(&tcp);
        }
        Inbound::Deny { workload, verdict } => {
            let policy = deny_policy(&verdict);
            w.metrics.path(&path("plaintext_deny", None, None));
            w.metrics.denied(&DenyLabels {
                transport: "plaintext",
                policy: policy.clone(),
            });
            tracing::info!(target: "access", direction = "inbound", src = %peer, dst = %target, workload, policy, "plaintext denied by authorization: reset");
            reset(&tcp);
        }
        Inbound::Hairpin {
            waypoint,
            authority,
            workload,
        } => {
            dest_labels(&mut labels, &st, None, Some(&workload));
            w.metrics.path(&path(
                "plaintext_hairpin",
                Some(waypoint.address),
                Some(authority),
            ));
            // The client's first bytes go ahead of the waypoint's reply (as outbound).
            let mut early = hbone::client::Early::new(&tcp);
            let opened = Box::pin(hairpin_open(
                &w,
                &st,
                &waypoint,
                authority,
                peer.ip(),
                Some(&mut early),
            ))
            .await;
            let early = early.sent();
            let up = match opened {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(target: "access", direction = "inbound", src = %peer, dst = %target, waypoint = %waypoint.address, error = %e, "plaintext hairpin failed: reset");
                    reset(&tcp);
                    return;
                }
            };
            Box::pin(
                Tunnel {
                    direction: "inbound",
                    tcp,
                    stream: up,
                    early,
                    labels,
                    peer,
                    dst: target,
                    target: waypoint.address,
                    authority,
                    route: "plaintext_hairpin",
                    started,
                }
                .run(&w),
            )
            .await;
        }
        Inbound::Allow { workload, verdict } => {
            dest_labels(&mut labels, &st, None, Some(&workload));
            w.metrics.path(&path("plaintext_allow", Some(target), None));
            let up = match connect_within(&w, target, ConnectTimeout::PlaintextPod).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::info!(target: "access", direction = "inbound", src = %peer, dst = %target, error = %e, "plaintext: connect to pod failed: reset");
                    reset(&tcp);
                    return;
                }
            };
            let counters = w.metrics.open(&labels);
            let why = Rc::new(RefCell::new(None));
            let abort = abort_or_revoked(&w, None, peer.ip(), target, &why);
            let out = Box::pin(runtime::forward::forward(
                tcp,
                up,
                &w.settings().runtime.forward,
                w.ctx.pool(),
                abort,
            ))
            .await;
            metrics::close(
                &counters,
                out.downstream_to_upstream,
                out.upstream_to_downstream,
            );
            let reason = close_reason(&w, "plaintext_live", &out.end, &why);
            access_log(
                "inbound",
                &format_args!("plaintext_allow ({:?})", verdict.reason),
                peer,
                target,
                &labels,
                None,
                None,
                out.downstream_to_upstream,
                out.upstream_to_downstream,
                started,
                &reason,
            );
        }
    }
}
