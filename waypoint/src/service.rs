//! The running waypoint: an HBONE listener (R13) on the runtime's workers, the R14 target
//! check per CONNECT stream, then HTTP/1.1 ([`crate::http1::serve`]) over the stream with an
//! [`Upstream`] that opens HBONE streams through a per-worker [`Pool`] to the chosen
//! endpoint's node ztunnel (`:15008`), as the waypoint's identity.
//!
//! [`Settings`] come from the settings document of the configuration file (see
//! [`crate::config`]) resolved against a tuning profile.
//!
//! Plain TCP, plaintext HTTP and TLS without a client certificate never get past the TLS
//! accept of [`serve_connection`]: nothing is served to them.
//!
//! Per tunnel, [`crate::inner::detect`] picks HTTP/1.1 ([`crate::http1`]), HTTP/2
//! ([`crate::h2srv`]) or opaque TCP (L4 policy, then [`crate::inner::splice`] to the
//! chosen endpoint). Upstream HBONE streams whose response completed are kept per tunnel
//! and reused by its next requests.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use hbone::ca::{CertSource, SigningCa, StaticCerts, WorkloadCert};
use hbone::pool::{Pool, PoolKey};
use hbone::proxy::CaConfig;
use hbone::server::{serve_connection, Inbound, ServerCounters};
use hbone::stream::H2Stream;
use hbone::tls::TlsCounters;
use hbone::wire::{status, ConnectRequest};
use hbone::{H2Settings, Identity};
use mesh_model::model::HBONE_PORT;
use mesh_model::snapshot::Snapshot;
use runtime::config::{Invalid, RuntimeConfig};
use runtime::listener::{self, BindError};
use runtime::worker::{race, Either};
use runtime::{Publisher, Shutdown, Workers};

use crate::config::{SettingsDoc, WaypointConfig};
use crate::h2srv::{self, H2End};
use crate::http1::{self, TunnelCtx, Upstream};
use crate::inner::{self, Protocol};
use crate::lb::{HashInput, SplitMix64};
use crate::plain::UpStream;
use crate::route::ObjectRef;
use crate::target::{self, Me, Refused};
use crate::telemetry::LocalMetrics;
use crate::upstream::{Balancers, Endpoint};

/// Everything [`start`] needs besides certificates and the L7 configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub identity: Identity,
    pub me: Me,
    pub root_namespace: String,
    pub runtime: RuntimeConfig,
    pub h2: H2Settings,
    /// `/stats/prometheus` and `/healthz/ready` (off when `None`).
    pub stats: Option<SocketAddr>,
}

impl Settings {
    /// The settings document resolved against a tuning profile's knobs (the document's
    /// `runtime`/`h2` replace the profile's).
    pub fn new(
        doc: &SettingsDoc,
        runtime: &RuntimeConfig,
        h2: &H2Settings,
    ) -> Result<Settings, Invalid> {
        let runtime = doc.runtime.clone().unwrap_or_else(|| runtime.clone());
        runtime.validate("runtime")?;
        let w = &doc.waypoint;
        Ok(Settings {
            listen: w.listen,
            identity: doc.identity()?,
            me: Me {
                gateway: doc.gateway()?,
                address: w.address.unwrap_or(w.listen),
            },
            root_namespace: w.root_namespace.clone(),
            runtime,
            h2: doc.h2.clone().unwrap_or_else(|| h2.clone()),
            stats: w.stats,
        })
    }
}

/// The certificate source the settings document names (`ca:`).
pub fn cert_source(doc: &SettingsDoc) -> Result<Arc<dyn CertSource>, hbone::ca::CaError> {
    let w = &doc.waypoint;
    Ok(match &w.ca {
        CaConfig::Builtin(dir) => Arc::new(SigningCa::builtin(dir, &w.trust_domain)?),
        CaConfig::Plugin(dir) => Arc::new(SigningCa::plugin(dir)?),
        CaConfig::Static(dir) => Arc::new(StaticCerts::new(dir)?),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("certificates: {0}")]
    Ca(#[from] hbone::ca::CaError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("workers: {0}")]
    Workers(#[from] io::Error),
}

/// Counters of a running waypoint (relaxed atomics, shared by the workers).
#[derive(Debug, Default)]
pub struct Counters {
    pub server: Arc<ServerCounters>,
    /// CONNECT streams accepted (target bound to this waypoint).
    pub tunnels: AtomicU64,
    /// CONNECT streams refused by the R14 target check.
    pub refused_targets: AtomicU64,
    /// Accepted tunnels by detected inner protocol.
    pub http1_tunnels: AtomicU64,
    pub http2_tunnels: AtomicU64,
    pub tcp_tunnels: AtomicU64,
    /// Tunnels whose client closed without sending a byte (no upstream stream opened).
    pub empty_tunnels: AtomicU64,
    /// HTTP/2 tunnels ended by a protocol error (GOAWAY sent).
    pub h2_protocol_errors: AtomicU64,
    /// Requests answered 400/413/431 by the waypoint itself (malformed, too large).
    pub bad_requests: AtomicU64,
    /// Requests answered 408 by the waypoint: the head not complete within
    /// `request_headers_timeout`, or the body stalled for `stream_idle_timeout`.
    pub request_timeouts: AtomicU64,
    /// HTTP requests denied by AuthorizationPolicy (R15, answered 403).
    pub denied: AtomicU64,
    /// HTTP requests refused for a JWT that did not verify (RequestAuthentication, 401).
    pub jwt_rejected: AtomicU64,
    /// Key sets fetched for RequestAuthentication (`jwksUri`, discovery), and how many
    /// of those fetches failed ([`crate::jwks`]).
    pub jwks_fetches: AtomicU64,
    pub jwks_fetch_errors: AtomicU64,
    /// CUSTOM policies' checks ([`crate::ext_authz`]) by outcome: allowed, denied, error.
    pub ext_authz: [AtomicU64; 3],
    /// Faults injected by VirtualServices: delays, aborts.
    pub faults: [AtomicU64; 2],
    /// Opaque TCP tunnels refused by L4 policy (R15).
    pub tcp_denied: AtomicU64,
    /// Opaque TCP bytes client → endpoint and endpoint → client.
    pub tcp_bytes_sent: AtomicU64,
    pub tcp_bytes_received: AtomicU64,
    /// Upstream HBONE streams opened.
    pub upstream_streams: AtomicU64,
    /// Upstream connections opened to endpoints outside the mesh ([`crate::plain`]).
    pub upstream_plain: AtomicU64,
    /// Upstream HTTP/2 connections made (each on one HBONE stream).
    pub upstream_h2_connections: AtomicU64,
    /// Upstream HTTP/2 connections closed for being idle past their service's DestinationRule
    /// `connectionPool.http.idleTimeout`.
    pub upstream_h2_idle_closed: AtomicU64,
    /// Upstream exchanges that failed (no endpoint, open, I/O).
    pub upstream_errors: AtomicU64,
    /// Upstream tries that timed out (route timeouts, or `stream_idle_timeout` waiting for
    /// a response or within its body).
    pub upstream_timeouts: AtomicU64,
    /// Requests re-sent by the retry policy.
    pub retries: AtomicU64,
    /// Requests refused by a service's circuit breakers (`503`, flag `UO`): connections
    /// and pending requests at their limits, requests at theirs; opaque TCP tunnels reset,
    /// connections at their limit; and retries not made, retries at theirs
    /// ([`crate::breaker`]).
    /// By [`crate::breaker::Limit::index`].
    pub overflows: [AtomicU64; 4],
    /// Requests abandoned by their client (stream reset, connection gone) before their
    /// response was complete, their upstream work dropped (its stream reset).
    pub cancelled_requests: AtomicU64,
    /// Mirrored copies sent (RequestMirror).
    pub mirrored: AtomicU64,
    /// HTTP/1.1 request bodies over the replay buffer, streamed (never retried).
    pub streamed_bodies: AtomicU64,
    /// Mirrors not sent: the request body was streamed, or the worker already had
    /// [`MAX_MIRRORS_IN_FLIGHT`] in flight.
    pub mirrors_skipped: AtomicU64,
    /// Mirrored exchanges that ended with the response read (and discarded) whole.
    pub mirrors_completed: AtomicU64,
    /// Mirrored exchanges that failed (connect, reset, timeout, bad response).
    pub mirror_errors: AtomicU64,
    /// `Expect: 100-continue` requests answered `100 Continue` by the waypoint.
    pub continues: AtomicU64,
    /// Connections upgraded after a `101` (spliced as raw bytes).
    pub upgrades: AtomicU64,
    /// Configuration snapshots published by the watcher.
    pub config_reloads: AtomicU64,
    /// Edited configurations rejected (the old snapshot kept serving).
    pub config_reload_errors: AtomicU64,
    /// Loads of the file in force because a DNS ServiceEntry's host name answered otherwise.
    pub dns_reloads: AtomicU64,
    /// Live tunnels that took a newer snapshot at a request (or, opaque, at the reload)
    /// and derived their facts again (R14 target, client address, telemetry).
    pub tunnel_refreshes: AtomicU64,
    /// Requests answered `503` because, since a reload, their tunnel's target is no
    /// longer served by this waypoint (R14).
    pub stale_target_requests: AtomicU64,
    /// Live opaque TCP tunnels closed because a reload's policy denies them (R15) or no
    /// longer serves their target (R14).
    pub tcp_revoked: AtomicU64,
    /// Live upgraded connections (after a `101`) closed because a reload's policy denies
    /// their upgrade request (R15) or no longer serves their target (R14).
    pub upgrades_revoked: AtomicU64,
    /// Live HTTP/2 tunnels sent a graceful GOAWAY because a reload no longer serves their
    /// target (R14): at the reload, or at a stream that found it first.
    pub h2_revoked: AtomicU64,
    /// The waypoint's spans ([`crate::spans`]): exported (the collector took them),
    /// failed (an export not taken), dropped (a worker's queue full).
    pub spans: [AtomicU64; 3],
    /// Access log records for `envoyOtelAls` providers, as `spans`.
    pub log_records: [AtomicU64; 3],
}

impl Counters {
    /// Count a circuit breaker's refusal, by the limit that refused.
    fn overflowed(&self, o: &crate::breaker::Overflow) {
        self.overflows[o.0.index()].fetch_add(1, Relaxed);
    }
}

/// The waypoint's certificate and the server TLS made from it.
pub struct Certs {
    pub cert: Arc<WorkloadCert>,
    pub server_tls: Arc<rustls::ServerConfig>,
}

fn issue(source: &dyn CertSource, id: &Identity) -> Result<Certs, ServiceError> {
    let cert = Arc::new(source.issue(id, SystemTime::now())?);
    let server_tls = hbone::tls::server_config(&cert)?;
    Ok(Certs { cert, server_tls })
}

/// A running waypoint.
pub struct Handle {
    workers: Workers,
    /// The bound HBONE address.
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    /// Istio's request metrics.
    pub metrics: Arc<crate::telemetry::Metrics>,
    pub certs: Publisher<Certs>,
    /// The stats/readiness endpoint, when configured.
    pub stats: Option<crate::admin::Endpoint>,
}

impl Handle {
    /// The bound stats/readiness address, when configured.
    pub fn stats_addr(&self) -> Option<SocketAddr> {
        self.stats.as_ref().map(|e| e.addr)
    }
    pub fn workers(&self) -> &Workers {
        &self.workers
    }
    pub fn join(self) -> io::Result<()> {
        self.workers.join()
    }
}

struct Shared {
    settings: Settings,
    /// `settings.identity` as text (access logs' `%DOWNSTREAM_LOCAL_URI_SAN%`).
    identity_uri: String,
    counters: Arc<Counters>,
    metrics: Arc<crate::telemetry::Metrics>,
}

/// Start the HBONE listener on the runtime's workers.
pub fn start(
    settings: Settings,
    source: Arc<dyn CertSource>,
    l7: Publisher<WaypointConfig>,
    shutdown: Shutdown,
) -> Result<Handle, ServiceError> {
    let _ = runtime::sys::raise_nofile_limit();
    let certs = Publisher::new(issue(source.as_ref(), &settings.identity)?);
    spawn_renewer(source, settings.identity.clone(), certs.clone());
    let n = runtime::worker::worker_count(&settings.runtime);
    let opts = listener::ListenOptions::from_config(&settings.runtime);
    let socks = listener::bind_sharded(settings.listen, n, &opts)?;
    let addr = socks[0].local_addr().map_err(|source| BindError::Io {
        addr: settings.listen,
        source,
    })?;
    let mut socks: Vec<Option<std::net::TcpListener>> = socks.into_iter().map(Some).collect();
    let counters = Arc::new(Counters::default());
    let metrics = Arc::new(crate::telemetry::Metrics::default());
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        identity_uri: settings.identity.to_string(),
        counters: counters.clone(),
        metrics: metrics.clone(),
    });
    let workers = runtime::spawn_workers(&settings.runtime, &shutdown, |w| {
        let sock = socks[w].take().expect("one socket per worker");
        let (certs, shared) = (certs.subscribe(), shared.clone());
        let l7 = l7.subscribe();
        move |ctx: runtime::WorkerCtx| async move {
            let certs = Rc::new(RefCell::new(certs));
            let worker = Rc::new(Worker {
                ctx: ctx.clone(),
                // HBONE legs get the worker's socket options (nodelay, keepalive, the
                // profile's SO_RCVBUF/SO_SNDBUF).
                pool: Pool::with_socket_options(
                    shared.settings.h2.clone(),
                    Arc::new(TlsCounters::default()),
                    ctx.listen_options().clone(),
                ),
                balancers: RefCell::new(Balancers::at(shared.settings.me.address.ip())),
                l7: RefCell::new(l7),
                metrics: LocalMetrics::new(shared.metrics.clone()),
                h2_clients: RefCell::new(Default::default()),
                idle: RefCell::new(crate::upstream::IdleStreams::default()),
                breakers: crate::breaker::Locals::default(),
                seed: std::cell::Cell::new(seed(ctx.id())),
                mirrors: std::cell::Cell::new(0),
                spans: RefCell::default(),
                reloaded: runtime::event::LocalEvent::new(),
                reload_watchers: Cell::new(0),
                reload_watcher: Cell::new(false),
                shared,
            });
            spawn_idle_sweeper(Rc::downgrade(&worker));
            let worker_spans = worker.clone();
            let _ = ctx
                .serve(sock, move |tcp, peer| {
                    let set = certs.borrow_mut().current().clone();
                    connection(worker.clone(), set, tcp, peer)
                })
                .await;
            ctx.finish_drain().await;
            flush_spans(&worker_spans).await;
        }
    })?;
    let stats = match settings.stats {
        Some(a) => {
            let c = counters.clone();
            let (m, srv) = (metrics.clone(), shared.counters.server.clone());
            let cfg = l7.clone();
            Some(crate::admin::serve(
                "waypoint-stats",
                a,
                move |path| match path {
                    "/healthz/ready" => ("200 OK", "text/plain", "ready\n".into()),
                    "/stats/prometheus" => {
                        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", {
                            let l7 = cfg.load();
                            format!(
                                "{}{}{}{}{}",
                                m.render(),
                                prometheus(&c),
                                refusals(&srv),
                                l7.ignored_policies_prometheus(),
                                l7.breakers_prometheus()
                            )
                        })
                    }
                    _ => crate::admin::not_found(),
                },
            )?)
        }
        None => None,
    };
    Ok(Handle {
        workers,
        addr,
        counters,
        metrics,
        certs,
        stats,
    })
}

/// R13 refusals: connections that never became HBONE (TLS failed: plaintext, no or bad
/// client certificate), and malformed CONNECTs.
pub fn refusals(s: &ServerCounters) -> String {
    let t = &s.tls;
    let mut out = String::from(
        "# HELP waypoint_refused_connections_total Connections refused before HBONE (R13), by reason.\n# TYPE waypoint_refused_connections_total counter\n",
    );
    for (reason, v) in [
        ("no_client_cert", &t.no_client_cert),
        ("untrusted", &t.untrusted),
        ("expired", &t.expired),
        ("identity_mismatch", &t.identity_mismatch),
        ("tls_other", &t.other),
        ("not_connect", &s.bad_method),
        ("bad_authority", &s.bad_authority),
    ] {
        out.push_str(&format!(
            "waypoint_refused_connections_total{{reason=\"{reason}\"}} {}\n",
            v.load(Relaxed)
        ));
    }
    out
}

/// The counters in Prometheus text format.
pub fn prometheus(c: &Counters) -> String {
    let mut out = String::new();
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}_total {v}\n"
        ));
    };
    counter(
        &mut out,
        "waypoint_tunnels",
        "CONNECT streams accepted (target bound to this waypoint).",
        c.tunnels.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_refused_targets",
        "CONNECT streams refused by the R14 target check.",
        c.refused_targets.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_h2_protocol_errors",
        "HTTP/2 tunnels ended by a protocol error (GOAWAY sent).",
        c.h2_protocol_errors.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_bad_requests",
        "Requests answered 400/413/431 by the waypoint (malformed, too large).",
        c.bad_requests.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_request_timeouts",
        "Requests answered 408 by the waypoint (head or body too slow; the tunnel closed).",
        c.request_timeouts.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_http_denied",
        "HTTP requests denied by AuthorizationPolicy (R15).",
        c.denied.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_jwt_rejected",
        "HTTP requests answered 401 for a JWT that did not verify (RequestAuthentication).",
        c.jwt_rejected.load(Relaxed),
    );
    out.push_str("# HELP waypoint_ext_authz_checks_total Checks asked of CUSTOM policies' external authorizers, by result (error: no usable answer).\n# TYPE waypoint_ext_authz_checks_total counter\n");
    for (i, result) in ["allowed", "denied", "error"].iter().enumerate() {
        out.push_str(&format!(
            "waypoint_ext_authz_checks_total{{result=\"{result}\"}} {}\n",
            c.ext_authz[i].load(Relaxed)
        ));
    }
    out.push_str("# HELP waypoint_faults_injected_total Faults injected by VirtualServices (fault.delay, fault.abort), by kind.\n# TYPE waypoint_faults_injected_total counter\n");
    for (i, kind) in ["delay", "abort"].iter().enumerate() {
        out.push_str(&format!(
            "waypoint_faults_injected_total{{fault=\"{kind}\"}} {}\n",
            c.faults[i].load(Relaxed)
        ));
    }
    counter(
        &mut out,
        "waypoint_jwks_fetches",
        "Key set fetches for RequestAuthentication (jwksUri, OpenID discovery).",
        c.jwks_fetches.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_jwks_fetch_errors",
        "Key set fetches that failed (the last good set, if any, is kept).",
        c.jwks_fetch_errors.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_tcp_denied",
        "Opaque TCP tunnels denied by AuthorizationPolicy (R15).",
        c.tcp_denied.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_tcp_sent_bytes",
        "Opaque TCP bytes client to endpoint.",
        c.tcp_bytes_sent.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_tcp_received_bytes",
        "Opaque TCP bytes endpoint to client.",
        c.tcp_bytes_received.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_upstream_streams",
        "Upstream HBONE streams opened.",
        c.upstream_streams.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_upstream_plain_connections",
        "Upstream connections opened to endpoints outside the mesh (plain TCP, or TLS the waypoint originates).",
        c.upstream_plain.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_upstream_errors",
        "Upstream exchanges that failed.",
        c.upstream_errors.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_upstream_h2_connections",
        "Upstream HTTP/2 connections made (useClientProtocol).",
        c.upstream_h2_connections.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_upstream_h2_idle_closed",
        "Upstream HTTP/2 connections closed idle past their idleTimeout.",
        c.upstream_h2_idle_closed.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_upstream_timeouts",
        "Upstream tries that timed out (route timeouts, stream idle timeout).",
        c.upstream_timeouts.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_retries",
        "Requests re-sent by the retry policy.",
        c.retries.load(Relaxed),
    );
    out.push_str("# HELP waypoint_upstream_overflows_total Requests refused (503, flag UO) and retries not made by a service's circuit breakers (DestinationRule connectionPool), by the limit reached.\n# TYPE waypoint_upstream_overflows_total counter\n");
    for limit in crate::breaker::Limit::ALL {
        out.push_str(&format!(
            "waypoint_upstream_overflows_total{{limit=\"{}\"}} {}\n",
            limit.label(),
            c.overflows[limit.index()].load(Relaxed)
        ));
    }
    counter(
        &mut out,
        "waypoint_cancelled_requests",
        "Requests abandoned by their client (stream reset, connection gone); their upstream stream was reset.",
        c.cancelled_requests.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_mirrored_requests",
        "Mirrored request copies sent.",
        c.mirrored.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_streamed_request_bodies",
        "HTTP/1.1 request bodies over the replay buffer, streamed (never retried).",
        c.streamed_bodies.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_mirrors_skipped",
        "Mirrors not sent (streamed request body, or too many in flight on the worker).",
        c.mirrors_skipped.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_mirrors_completed",
        "Mirrored exchanges whose response was read (and discarded) whole.",
        c.mirrors_completed.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_mirror_errors",
        "Mirrored exchanges that failed.",
        c.mirror_errors.load(Relaxed),
    );
    out.push_str("# HELP waypoint_tracing_spans_total The waypoint's spans (Telemetry tracing): exported (taken by the collector), failed (an export not taken), dropped (a worker's export queue full).\n# TYPE waypoint_tracing_spans_total counter\n");
    for (i, result) in ["exported", "failed", "dropped"].iter().enumerate() {
        out.push_str(&format!(
            "waypoint_tracing_spans_total{{result=\"{result}\"}} {}\n",
            c.spans[i].load(Relaxed)
        ));
    }
    out.push_str("# HELP waypoint_access_log_records_total Access log records for OpenTelemetry (envoyOtelAls) providers: exported, failed, dropped (as spans).\n# TYPE waypoint_access_log_records_total counter\n");
    for (i, result) in ["exported", "failed", "dropped"].iter().enumerate() {
        out.push_str(&format!(
            "waypoint_access_log_records_total{{result=\"{result}\"}} {}\n",
            c.log_records[i].load(Relaxed)
        ));
    }
    counter(
        &mut out,
        "waypoint_expect_continue",
        "Expect: 100-continue requests answered 100 Continue by the waypoint.",
        c.continues.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_upgrades",
        "Connections upgraded after a 101 and spliced as raw bytes.",
        c.upgrades.load(Relaxed),
    );
    out.push_str("# HELP waypoint_tunnels_by_protocol_total Accepted tunnels by detected inner protocol.\n# TYPE waypoint_tunnels_by_protocol_total counter\n");
    for (proto, v) in [
        ("http1", &c.http1_tunnels),
        ("http2", &c.http2_tunnels),
        ("tcp", &c.tcp_tunnels),
        ("empty", &c.empty_tunnels),
    ] {
        out.push_str(&format!(
            "waypoint_tunnels_by_protocol_total{{protocol=\"{proto}\"}} {}\n",
            v.load(Relaxed)
        ));
    }
    counter(
        &mut out,
        "waypoint_config_reloads",
        "Configuration snapshots published by hot reload.",
        c.config_reloads.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_config_reload_errors",
        "Edited configurations rejected; the old snapshot kept serving.",
        c.config_reload_errors.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_dns_reloads",
        "Loads of the file in force because a DNS ServiceEntry's host name answered with other addresses.",
        c.dns_reloads.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_tunnel_refreshes",
        "Live tunnels that took a newer configuration snapshot.",
        c.tunnel_refreshes.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_stale_target_requests",
        "Requests answered 503: since a reload their tunnel's target is no longer served (R14).",
        c.stale_target_requests.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_tcp_revoked",
        "Live opaque TCP tunnels closed by a reload (policy denies them or target no longer served).",
        c.tcp_revoked.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_upgrades_revoked",
        "Live upgraded connections closed by a reload (policy denies their upgrade request or target no longer served).",
        c.upgrades_revoked.load(Relaxed),
    );
    counter(
        &mut out,
        "waypoint_h2_revoked",
        "Live HTTP/2 tunnels sent a graceful GOAWAY: a reload no longer serves their target.",
        c.h2_revoked.load(Relaxed),
    );
    out
}

fn seed(worker: usize) -> u64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((worker as u64 + 1) << 48) ^ u64::from(std::process::id())
}

/// One worker's state.
struct Worker {
    ctx: runtime::WorkerCtx,
    pool: Pool,
    balancers: RefCell<Balancers>,
    /// The L7 snapshot (routes, policies, model). Each request takes the current one (one
    /// version compare when it did not change) and keeps it to its end ([`TunnelFacts`]).
    l7: RefCell<runtime::snapshot::Subscriber<WaypointConfig>>,
    metrics: LocalMetrics,
    /// HTTP/2 upstream connections, by [`crate::upstream::ConnKey`], shared by the worker's
    /// tunnels; each dropped by its timer once idle past its `idleTimeout`
    /// ([`spawn_h2_idle_timer`]).
    h2_clients: RefCell<crate::upstream::FnvMap<crate::upstream::ConnKey, H2Slot>>,
    /// Idle upstream HTTP/1.1 streams, shared by the worker's tunnels (none is bound to a
    /// tunnel between its requests).
    idle: RefCell<crate::upstream::IdleStreams>,
    /// This worker's side of the services' circuit breakers (its pending requests).
    breakers: crate::breaker::Locals,
    seed: std::cell::Cell<u64>,
    /// Mirrored requests in flight on this worker (at most [`MAX_MIRRORS_IN_FLIGHT`]).
    mirrors: std::cell::Cell<usize>,
    /// Sampled spans waiting for export ([`crate::spans`]).
    spans: RefCell<SpanQueue>,
    /// Notified when the worker sees a new snapshot version, while live opaque TCP tunnels
    /// watch for one ([`ReloadWatch`]; they are then authorized again, as ztunnel does).
    reloaded: runtime::event::LocalEvent,
    /// Opaque TCP tunnels watching for a reload; the version watcher runs while any does.
    reload_watchers: Cell<usize>,
    /// Whether the version watcher task runs.
    reload_watcher: Cell<bool>,
    shared: Arc<Shared>,
}

/// A worker's sampled spans and OpenTelemetry access log records waiting for export
/// ([`crate::spans`]).
#[derive(Default)]
struct SpanQueue {
    /// By provider, in the order first seen.
    batches: Vec<(Arc<crate::spans::Provider>, Vec<crate::spans::Item>)>,
    /// Items in `batches`.
    waiting: usize,
    /// A timed export is scheduled.
    timer: bool,
    /// Exports in flight.
    in_flight: usize,
}

/// How long a stopping worker waits for its spans' exports (after its connections are
/// done), at most.
const SPAN_FLUSH_BOUND: Duration = Duration::from_secs(2);

/// After a worker's drain: wait for its spans' exports (started when the drain began,
/// [`HboneUpstream::spawn_export`]) to end, at most [`SPAN_FLUSH_BOUND`], so that a
/// restart or a rollout does not lose the last second of spans.
async fn flush_spans(w: &Worker) {
    let until = Instant::now() + SPAN_FLUSH_BOUND;
    loop {
        let idle = {
            let q = w.spans.borrow();
            q.waiting == 0 && q.in_flight == 0
        };
        if idle || Instant::now() >= until {
            return;
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An export in flight on its worker: dropped (its exchange over, or unwound by a panic),
/// it gives back its place in [`SpanQueue::in_flight`].
struct ExportInFlight(Rc<Worker>);

impl Drop for ExportInFlight {
    fn drop(&mut self) {
        let mut q = self.0.spans.borrow_mut();
        q.in_flight = q.in_flight.saturating_sub(1);
    }
}

/// A mirrored request in flight on its worker: dropped (its task ended, or unwound by a
/// panic), it gives back its place in [`Worker::mirrors`].
struct MirrorInFlight(Rc<Worker>);

impl Drop for MirrorInFlight {
    fn drop(&mut self) {
        let m = &self.0.mirrors;
        m.set(m.get().saturating_sub(1));
    }
}

/// How often a worker with live opaque TCP tunnels looks for a new snapshot version
/// (ztunnel's live re-check period).
const RELOAD_WATCH_PERIOD: Duration = Duration::from_millis(50);

impl Worker {
    /// The version of the current snapshot (one atomic load when it did not change).
    fn l7_version(&self) -> u64 {
        let mut s = self.l7.borrow_mut();
        s.current();
        s.version()
    }
}

/// A live opaque TCP tunnel watching for reloads: while any is, the worker's version
/// watcher runs and notifies [`Worker::reloaded`] on each new snapshot version.
struct ReloadWatch(Rc<Worker>);

impl ReloadWatch {
    fn start(w: &Rc<Worker>) -> ReloadWatch {
        w.reload_watchers.set(w.reload_watchers.get() + 1);
        if !w.reload_watcher.replace(true) {
            let weak = Rc::downgrade(w);
            let mut seen = w.l7_version();
            monoio::spawn(async move {
                loop {
                    monoio::time::sleep(RELOAD_WATCH_PERIOD).await;
                    let Some(w) = weak.upgrade() else { return };
                    if w.reload_watchers.get() == 0 || w.ctx.shutdown().is_draining() {
                        w.reload_watcher.set(false);
                        return;
                    }
                    let now = w.l7_version();
                    if now != seen {
                        seen = now;
                        w.reloaded.notify();
                    }
                }
            });
        }
        ReloadWatch(w.clone())
    }
}

impl Drop for ReloadWatch {
    fn drop(&mut self) {
        let w = &self.0;
        w.reload_watchers
            .set(w.reload_watchers.get().saturating_sub(1));
    }
}

/// The worker's one timer for its idle upstream streams: every half of the shortest
/// expiry kept ([`crate::upstream::IdleStreams::sweep_period`]), the expired ones are
/// reset, so that none stays open once the traffic stopped (`take`/`put` sweep only while
/// requests come).
fn spawn_idle_sweeper(w: std::rc::Weak<Worker>) {
    monoio::spawn(async move {
        let mut period = crate::upstream::IDLE_STREAM_EXPIRY / 2;
        loop {
            monoio::time::sleep(period).await;
            let Some(w) = w.upgrade() else { return };
            if w.ctx.shutdown().is_draining() {
                w.idle.borrow_mut().clear();
                return;
            }
            if !w.idle.borrow().is_empty() {
                w.idle.borrow_mut().sweep(Instant::now());
            }
            period = w.idle.borrow().sweep_period();
        }
    });
}

impl Worker {
    /// A generator of its own for a tunnel (or a task): seeded with the next output of the
    /// worker's generator, not its next state. SplitMix64 generators whose states differ
    /// by its step are one sequence shifted by one, so seeding with states would give
    /// consecutive tunnels the same numbers one draw apart (the same trace and request ids
    /// across them); mixed seeds put their sequences at unrelated places.
    fn rng(&self) -> SplitMix64 {
        let mut worker = SplitMix64(self.seed.get());
        let seed = crate::lb::Rng::next_u64(&mut worker);
        self.seed.set(worker.0);
        SplitMix64(seed)
    }
}

async fn connection(
    w: Rc<Worker>,
    certs: Arc<Certs>,
    tcp: monoio::net::TcpStream,
    peer: SocketAddr,
) {
    let shared = w.shared.clone();
    let w2 = w.clone();
    let cert = certs.cert.clone();
    let handler = Rc::new(move |inb: Inbound| {
        let (w, cert) = (w2.clone(), cert.clone());
        // Boxed: the per-stream task then holds a pointer, not the tunnel's state twice;
        // and the stream's `Inbound` boxed until it is accepted: an `async fn` keeps its
        // arguments beside the locals they are moved into, for the life of the tunnel.
        Box::pin(tunnel(w, cert, Box::new(inb)))
    });
    let r = serve_connection(
        tcp,
        peer,
        certs.server_tls.clone(),
        &shared.settings.h2,
        shared.counters.server.clone(),
        w.ctx.draining(),
        handler,
    )
    .await;
    if let Err(e) = r {
        tracing::debug!(%peer, error = %e, "waypoint connection ended with an error");
    }
}

/// `td/ns/N/sa/S`, as AuthorizationPolicy principals name it.
fn principal(id: &Identity) -> String {
    format!(
        "{}/ns/{}/sa/{}",
        id.trust_domain, id.namespace, id.service_account
    )
}

async fn tunnel(w: Rc<Worker>, cert: Arc<WorkloadCert>, mut inb: Box<Inbound>) {
    let shared = w.shared.clone();
    let (settings, counters) = (&shared.settings, &shared.counters);
    // The CONNECT is checked under the snapshot current now; each request then takes the
    // one current at its start ([`HboneUpstream::begin`]).
    let (l7, version) = {
        let mut s = w.l7.borrow_mut();
        let l7 = s.current().clone();
        (l7, s.version())
    };
    let target = inb.request.target;
    let resolved = match l7.mesh.as_ref() {
        Some(snap) => target::resolve(snap, &settings.me, target),
        None => Err(Refused::Unknown),
    };
    let destination = match resolved {
        Ok(d) => d,
        Err(why) => {
            counters.refused_targets.fetch_add(1, Relaxed);
            tracing::debug!(%target, ?why, "CONNECT target refused (R14)");
            inb.reject(status::BAD_AUTHORITY);
            return;
        }
    };
    let view = Rc::new(derive(
        l7.clone(),
        version,
        destination,
        &Arrival {
            identity: inb.peer_identity.as_ref(),
            peer_addr: inb.peer_addr.ip(),
            forwarded_for: inb.request.forwarded_for,
            baggage: &inb.request.baggage,
        },
        |destination, source_ip, client_namespace| TunnelCtx {
            waypoint: settings.me.gateway.clone(),
            root_namespace: settings.root_namespace.clone(),
            destination,
            destination_ip: target.ip(),
            destination_port: target.port(),
            source_ip,
            principal: inb.peer_identity.as_ref().map(principal),
            client_namespace,
            traceparent: inb.request.traceparent.clone(),
        },
    ));
    let ctx = view.ctx.clone().expect("derived from a resolved target");
    let facts = Rc::new(TunnelFacts {
        peer_identity: inb.peer_identity.take(),
        peer_addr: inb.peer_addr.ip(),
        peer_port: inb.peer_addr.port(),
        id: TUNNEL_IDS.fetch_add(1, Relaxed),
        forwarded_for: inb.request.forwarded_for,
        baggage: std::mem::take(&mut inb.request.baggage),
        target,
        start: version,
        start_ctx: ctx.clone(),
        view: RefCell::new(view.clone()),
    });
    let Ok(mut stream) = inb.accept() else { return };
    counters.tunnels.fetch_add(1, Relaxed);
    let times = l7.tunnel_timeouts();
    // From the tunnel's current view (a later stream of a tunnel that saw a reload starts
    // under it, not under the tunnel's first one, which would derive it again).
    let upstream = |w: &Rc<Worker>, client_h2: bool| {
        let view = facts.view.borrow().clone();
        let metric_cache = view.metric_cache.clone();
        HboneUpstream::new(
            &facts,
            view,
            w,
            client_h2,
            &cert,
            target,
            metric_cache,
            times.stream_idle,
        )
    };
    // A port a TCPRoute takes is opaque TCP: nothing to detect (a server-first protocol
    // is served at once).
    let tcp_routed = match &ctx.destination {
        http1::Destination::Service { service, port } => l7
            .routes
            .tcp_route(ctx.client_namespace.as_deref(), service, *port)
            .is_some(),
        http1::Destination::Workload { .. } => false,
    };
    // Boxed: only live until the first bytes, it would otherwise size the whole tunnel.
    let detect = async {
        if tcp_routed {
            return Either::Left(Ok((Protocol::Tcp, bytes::BytesMut::new())));
        }
        race(inner::detect(&mut stream, &times), w.ctx.aborted()).await
    };
    let (proto, first) = match Box::pin(detect).await {
        Either::Left(Ok(x)) => x,
        Either::Left(Err(e)) => {
            tracing::debug!(%target, error = %e, "tunnel failed before its first bytes");
            return;
        }
        Either::Right(()) => {
            stream.reset(h2::Reason::CANCEL);
            return;
        }
    };
    match proto {
        Protocol::Http1 => {
            counters.http1_tunnels.fetch_add(1, Relaxed);
            let mut up = upstream(&w, false);
            let mut rng = w.rng();
            // Boxed (as the other branches): the tunnel's future is as large as its
            // largest branch, and `race` holds it twice.
            let serve = Box::pin(http1::serve_from(
                &mut stream,
                first,
                &l7,
                &ctx,
                &mut up,
                &mut rng,
            ));
            match race(serve, w.ctx.aborted()).await {
                Either::Left(Ok(http1::End::Upgraded)) => {
                    if let Some(upstream) = up.upgrade.take() {
                        let _slot = up.upgrade_slot.take();
                        let first = std::mem::take(&mut up.upgrade_first);
                        let rt = &settings.runtime;
                        // Authorized again at each reload, as opaque TCP is: by the
                        // upgrade request's policy (R15) and target (R14).
                        let revoked = Cell::new(false);
                        let head = up.upgrade_head.take();
                        let allowed = |l7: &WaypointConfig, ctx: &TunnelCtx| {
                            head.as_ref().is_some_and(|(h, auth)| {
                                let hdrs: Vec<(&str, &str)> = h
                                    .headers
                                    .iter()
                                    .map(|(n, v)| (n.as_str(), v.as_str()))
                                    .collect();
                                http1::allows(l7, ctx, h, &hdrs, auth.as_deref())
                            })
                        };
                        let recheck =
                            revoked_by_reload(w.clone(), facts.clone(), up.view.version, allowed);
                        let abort = async {
                            if let Either::Right(()) = race(w.ctx.aborted(), recheck).await {
                                revoked.set(true);
                            }
                        };
                        let idle = rt.forward.idle_timeout;
                        let out = Box::pin(upstream.splice(stream, first, idle, abort)).await;
                        if revoked.get() {
                            counters.upgrades_revoked.fetch_add(1, Relaxed);
                        }
                        tracing::debug!(%target, sent = out.downstream_to_upstream, received = out.upstream_to_downstream, end = ?out.end, "upgraded connection ended");
                    }
                }
                Either::Left(Ok(end)) => {
                    tracing::trace!(%target, ?end, "tunnel ended");
                    // Ended in order: END_STREAM (if not sent yet), then the client's end
                    // waited for, so its ztunnel passes a FIN on (dropping the stream
                    // would reset it).
                    crate::upstream::close_stream(stream);
                }
                Either::Left(Err(e)) => {
                    // A response cut after its head (or a failed tunnel): the stream is
                    // reset, so the client never sees a complete-looking end.
                    stream.reset(h2::Reason::CANCEL);
                    tracing::debug!(%target, error = %e, "tunnel failed");
                }
                Either::Right(()) => stream.reset(h2::Reason::CANCEL),
            }
        }
        Protocol::Http2 => {
            counters.http2_tunnels.fetch_add(1, Relaxed);
            let io = inner::StreamIo::new(stream, first.freeze());
            let w2 = w.clone();
            let c2 = counters.clone();
            // R14 only: policy (R15) applies to each stream as it comes.
            let version = facts.view.borrow().version;
            let revoked = revoked_by_reload(w.clone(), facts.clone(), version, |_, _| true);
            let serve = Box::pin(h2srv::serve(
                io,
                &settings.h2,
                l7.clone(),
                ctx.clone(),
                || (upstream(&w2, true), w2.rng()),
                Rc::new(move || {
                    c2.bad_requests.fetch_add(1, Relaxed);
                }),
                revoked,
                || {
                    counters.h2_revoked.fetch_add(1, Relaxed);
                },
            ));
            match race(serve, w.ctx.aborted()).await {
                Either::Left(H2End::Closed) => tracing::trace!(%target, "h2 tunnel ended"),
                Either::Left(H2End::Error(e)) => {
                    counters.h2_protocol_errors.fetch_add(1, Relaxed);
                    tracing::debug!(%target, error = %e, "h2 tunnel failed (GOAWAY sent)");
                }
                // The connection (and its stream) is dropped: the stream is reset.
                Either::Right(()) => {}
            }
        }
        Protocol::Empty => {
            // Nothing to forward: end our half too; no upstream stream is opened.
            counters.empty_tunnels.fetch_add(1, Relaxed);
            let _ = stream.write_all(Bytes::new(), true).await;
            tracing::trace!(%target, "tunnel closed before its first byte");
        }
        Protocol::Tcp => {
            counters.tcp_tunnels.fetch_add(1, Relaxed);
            let mut up = upstream(&w, false);
            Box::pin(up.opaque(stream, &ctx, first.freeze())).await;
        }
    }
}

/// A workload's name as telemetry shows it: its controller's (`workloadName`), else the pod's.
pub(crate) fn workload_name(w: &mesh_model::model::Workload) -> String {
    if w.workload_name.is_empty() {
        w.name.clone()
    } else {
        w.workload_name.clone()
    }
}

/// The tunnel's original client: the peer certificate's identity, and its workload and
/// namespace from that identity and the model ([`crate::source::workload_of`]; the
/// CONNECT's `baggage` never overrides them).
fn peer_of(
    identity: Option<&Identity>,
    baggage: &hbone::wire::Baggage,
    l7: &WaypointConfig,
    addr: IpAddr,
    destination: &http1::Destination,
    ztunnel: &Identity,
) -> Peer {
    let (workload, namespace) =
        crate::source::workload_of(l7.mesh.as_ref(), identity, addr, ztunnel, baggage);
    Peer {
        principal: identity.map_or_else(|| "unknown".into(), |i| i.to_string()),
        workload,
        namespace,
        addr,
        destination: destination.clone(),
    }
}

/// The endpoint of a pod-addressed request (R16): the pod itself, through its node's
/// ztunnel (or the pod's own address when the model has no node for it).
fn pod_endpoint(snap: &Snapshot, target: SocketAddr) -> Option<Endpoint> {
    let w = snap.workload_by_ip(target.ip())?;
    let hbone_ip = snap.node(&w.node).map_or(target.ip(), |n| n.ztunnel);
    Some(Endpoint {
        workload_uid: w.uid.clone(),
        authority: target,
        hbone: SocketAddr::new(hbone_ip, HBONE_PORT),
        plain: !w.captured(),
        tier: 0,
        share: None,
    })
}

/// A worker's HTTP/2 upstream connection to one endpoint, or one being made.
#[derive(Clone)]
enum H2Slot {
    Ready(h2::client::SendRequest<Bytes>, Rc<H2Idle>),
    Connecting(runtime::event::LocalEvent),
}

/// The requests on a worker's HTTP/2 upstream connection: how many are in flight, when the
/// last one ended, and how long the connection may then stay idle (the DestinationRule
/// `connectionPool.http.idleTimeout` of the last request's service, as for the HTTP/1.1
/// streams kept). The connection's timer ([`spawn_h2_idle_timer`]) drops it from the
/// worker's slots once idle that long.
struct H2Idle {
    active: Cell<usize>,
    last: Cell<Instant>,
    expiry: Cell<Duration>,
}

impl H2Idle {
    fn new(now: Instant) -> Rc<H2Idle> {
        Rc::new(H2Idle {
            active: Cell::new(0),
            last: Cell::new(now),
            expiry: Cell::new(crate::upstream::IDLE_STREAM_EXPIRY),
        })
    }

    /// `None` when the connection has had no request in flight for its expiry; else how
    /// long to wait before looking again (at most [`crate::upstream::IDLE_STREAM_EXPIRY`],
    /// so that a shorter expiry set meanwhile is seen in time; at least
    /// [`crate::upstream::MIN_SWEEP_PERIOD`]).
    fn left(&self, now: Instant) -> Option<Duration> {
        let expiry = self.expiry.get();
        let wait = if self.active.get() > 0 {
            // Its idle time starts when the last request ends: at least an expiry away.
            expiry
        } else {
            let idle = now.saturating_duration_since(self.last.get());
            if idle >= expiry {
                return None;
            }
            expiry - idle
        };
        Some(wait.clamp(
            crate::upstream::MIN_SWEEP_PERIOD,
            crate::upstream::IDLE_STREAM_EXPIRY,
        ))
    }
}

/// One request on a worker's HTTP/2 upstream connection, in flight until ended
/// ([`H2Use::end`]) or dropped.
struct H2Use {
    idle: Rc<H2Idle>,
    ended: bool,
}

impl H2Use {
    fn new(idle: &Rc<H2Idle>, expiry: Duration) -> H2Use {
        idle.active.set(idle.active.get() + 1);
        idle.expiry.set(expiry);
        H2Use {
            idle: idle.clone(),
            ended: false,
        }
    }

    /// The request ended at `now` (the caller's clock read, not one more).
    fn end(mut self, now: Instant) {
        self.release(now);
    }

    fn release(&mut self, now: Instant) {
        if !std::mem::replace(&mut self.ended, true) {
            self.idle.active.set(self.idle.active.get() - 1);
            self.idle.last.set(now);
        }
    }
}

impl Drop for H2Use {
    fn drop(&mut self) {
        if !self.ended {
            self.release(Instant::now());
        }
    }
}

/// The timer of a worker's HTTP/2 upstream connection `idle` (the slot `key`): once it has
/// had no request in flight for its expiry, its slot is removed and its handle dropped
/// (the `h2` client then ends the connection with a GOAWAY, and its HBONE stream closes as
/// [`inner::StreamIo`] shuts down: END_STREAM, a FIN at the pod, and the pod's close waited
/// for; a later request opens a new one). Ends with the slot (replaced after a
/// failure) and when the worker drains.
fn spawn_h2_idle_timer(w: std::rc::Weak<Worker>, key: crate::upstream::ConnKey, idle: Rc<H2Idle>) {
    monoio::spawn(async move {
        let mut wait = idle.left(Instant::now());
        while let Some(period) = wait {
            monoio::time::sleep(period).await;
            let Some(w) = w.upgrade() else { return };
            if w.ctx.shutdown().is_draining() {
                return;
            }
            let ours = matches!(
                w.h2_clients.borrow().get(&key),
                Some(H2Slot::Ready(_, i)) if Rc::ptr_eq(i, &idle)
            );
            if !ours {
                return;
            }
            wait = idle.left(Instant::now());
        }
        let Some(w) = w.upgrade() else { return };
        // Dropped after the borrow: its handle's drop wakes the connection's task.
        let slot = w.h2_clients.borrow_mut().remove(&key);
        drop(slot);
        w.shared
            .counters
            .upstream_h2_idle_closed
            .fetch_add(1, Relaxed);
        tracing::debug!(upstream = %key.1, "upstream HTTP/2 connection idle past its idleTimeout; closing it");
    });
}

/// The connecting slot of one key: waiters wake when it is done, also when the connecting
/// request is dropped or fails (the slot is then cleared).
struct Connecting {
    worker: Rc<Worker>,
    key: crate::upstream::ConnKey,
    ev: runtime::event::LocalEvent,
    done: bool,
}

impl Connecting {
    fn start(worker: &Rc<Worker>, key: crate::upstream::ConnKey) -> Connecting {
        let ev = runtime::event::LocalEvent::new();
        worker
            .h2_clients
            .borrow_mut()
            .insert(key, H2Slot::Connecting(ev.clone()));
        Connecting {
            worker: worker.clone(),
            key,
            ev,
            done: false,
        }
    }

    fn done(mut self, slot: H2Slot) {
        self.worker.h2_clients.borrow_mut().insert(self.key, slot);
        self.done = true;
        self.ev.set();
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if !self.done {
            self.worker.h2_clients.borrow_mut().remove(&self.key);
            self.ev.set();
        }
    }
}

/// Upstream exchanges over HBONE for one tunnel.
struct HboneUpstream {
    /// The tunnel's facts, and its view of the newest snapshot a request took.
    tunnel: Rc<TunnelFacts>,
    /// What the current request is served under (its config, caller and metric cache),
    /// set by [`Upstream::begin`].
    view: Rc<View>,
    worker: Rc<Worker>,
    /// The client spoke HTTP/2: a service whose DestinationRule sets `useClientProtocol`
    /// gets HTTP/2 upstream.
    client_h2: bool,
    cert: Arc<WorkloadCert>,
    target: SocketAddr,
    rng: SplitMix64,
    /// The service and endpoint workload of the current request's last try.
    last: Option<Rc<Dest>>,
    /// This tunnel's recent metric label sets: (status, flags, `last`) → counters, so a
    /// keep-alive tunnel builds its labels once (the view's; a mirror keeps its own).
    metric_cache: MetricCache,
    /// The balancer slot (port, index) of the current try; its service is `last`'s.
    current: Option<(u16, usize)>,
    /// Whether `last` names the current request's destination (else it answered here).
    routed: bool,
    /// An upgraded (`101`) upstream stream, and tunnel bytes to send it first.
    upgrade: Option<UpStream>,
    upgrade_first: Bytes,
    /// The upgrade request, authorized again at each reload while the connection lives.
    upgrade_head: Option<(http1::RequestHead, Option<Arc<crate::jwt::Authenticated>>)>,
    /// A kept stream just turned out closed: the next connect opens a new stream (the
    /// other kept ones of that endpoint are likely closed too).
    fresh_next: bool,
    /// The current try's request on a worker's HTTP/2 upstream connection
    /// ([`Upstream::h2_request`]), until its [`Upstream::done`].
    h2_use: Option<H2Use>,
    /// The current request is gRPC (`Some`), with its response's `grpc-status` when seen.
    grpc: Option<Option<u32>>,
    /// The settings document's `stream_idle_timeout` ([`Upstream::stream_idle`]), and the
    /// timer that keeps it for this tunnel (or HTTP/2 stream).
    idle_clock: http1::Clock,
    stream_idle: Option<Duration>,
    /// The current try's place under its service's circuit breakers: an upstream
    /// HTTP/1.1 connection, a request in flight; and the request's retry in flight.
    slot: Option<crate::breaker::Slot>,
    in_flight: Option<crate::breaker::Token>,
    retrying: Option<crate::breaker::Token>,
    /// The connection slot of an upgraded (`101`) connection, held while it is spliced.
    upgrade_slot: Option<crate::breaker::Slot>,
    /// The service port of the current request's last try (with `last`'s service: its
    /// DestinationRule's `portLevelSettings`).
    port: Option<u16>,
    /// The endpoint (`podIP:port`) of the current request's last try.
    upstream_host: Option<SocketAddr>,
}

/// A try still in flight when its request's future is dropped (its tunnel's HBONE
/// connection ended, the worker aborted) was abandoned: it ends as
/// [`Upstream::cancelled`] says, so the endpoint's count of active requests comes back.
impl Drop for HboneUpstream {
    fn drop(&mut self) {
        if self.current.is_some() || self.h2_use.is_some() {
            self.cancelled();
        }
    }
}

/// A request's destination for telemetry: the routed service (none: the tunnel's pod) and
/// the endpoint workload that answered. Shared: a tunnel's requests to one endpoint reuse
/// one copy ([`set_last`]).
type Dest = (Option<ObjectRef>, String);

/// Status, flags, the routed service and endpoint, gRPC (`Some` for a gRPC request, with
/// its status when known), and the values of the metrics' `tagOverrides` UPSERTs (`None`:
/// none).
type MetricKey = (
    u16,
    &'static str,
    Option<Rc<Dest>>,
    Option<Option<u32>>,
    Option<Rc<[String]>>,
);

/// The label changes of `tags` for `metrics` (indices of [`crate::telemetry::METRICS`])
/// with `values` (their UPSERTs' values, in order).
fn tweaks(
    tags: &crate::config::MetricTags,
    metrics: std::ops::Range<usize>,
    values: Option<&[String]>,
) -> Arc<crate::telemetry::TagTweaks> {
    let mut values = values.unwrap_or_default().iter();
    let mut out = crate::telemetry::TagTweaks::default();
    for (m, list) in tags
        .0
        .iter()
        .enumerate()
        .filter(|(m, _)| metrics.contains(m))
    {
        for (name, t) in list {
            let v = match t {
                crate::config::TagOverride::Upsert(_) => values.next().cloned(),
                crate::config::TagOverride::Remove => None,
            };
            out.0[m].push((name.clone(), v));
        }
    }
    Arc::new(out)
}

/// Make `last` (service `svc`, endpoint workload `uid`), reusing the copy already there or
/// in the tunnel's metric `cache` (an HTTP/2 tunnel's upstream is made per request): no
/// allocation once the tunnel has sent one request there.
fn set_last(last: &mut Option<Rc<Dest>>, cache: &MetricCache, svc: &ObjectRef, uid: &str) {
    let is = |d: &Dest| matches!(d, (Some(s), u) if s == svc && u == uid);
    if last.as_deref().is_some_and(is) {
        return;
    }
    let shared = cache
        .borrow()
        .iter()
        .find_map(|(k, _)| k.2.as_ref().filter(|d| is(d)).cloned());
    *last = Some(shared.unwrap_or_else(|| Rc::new((Some(svc.clone()), uid.to_string()))));
}

/// A tunnel's recent label sets, shared by its requests (HTTP/2 streams included).
type MetricCache = Rc<RefCell<Vec<(MetricKey, Rc<LabelSet>)>>>;

/// A label set's counters and its destination's access-log text, made when a tunnel
/// first records the set.
struct LabelSet {
    counters: Arc<crate::telemetry::RequestCounters>,
    dst: crate::telemetry::AccessDst,
    /// The access logs its requests go to (Telemetry `accessLogging`), each with the filter
    /// choosing them.
    logs: Vec<crate::config::LogSink>,
    /// The metrics that count its requests (Telemetry `metrics`).
    shown: crate::telemetry::Shown,
}

/// Label sets a tunnel remembers.
const METRIC_CACHE: usize = 8;

/// The original client of a tunnel and its destination, as telemetry names them.
struct Peer {
    /// `spiffe://…` of the peer certificate, or `unknown`.
    principal: String,
    workload: String,
    namespace: String,
    /// The client address (`forwarded: for=`, else the peer's).
    addr: IpAddr,
    destination: http1::Destination,
}

/// The next tunnel's number.
static TUNNEL_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A tunnel's CONNECT facts, fixed for its life, and its view of the newest snapshot one of
/// its requests took: derived again only when a request (or, for an opaque tunnel, a
/// reload) finds a newer version, and shared by its HTTP/2 streams.
struct TunnelFacts {
    peer_identity: Option<Identity>,
    peer_addr: IpAddr,
    /// The HBONE peer's port, and the tunnel's number (access logs' `%CONNECTION_ID%`).
    peer_port: u16,
    id: u64,
    forwarded_for: Option<IpAddr>,
    baggage: hbone::wire::Baggage,
    target: SocketAddr,
    /// The version the tunnel was accepted under, and its facts then: what its serve loop
    /// was given ([`http1::Begin::Same`] means this one).
    start: u64,
    start_ctx: Rc<TunnelCtx>,
    view: RefCell<Rc<View>>,
}

/// What a tunnel derived from one snapshot: its R14 target check, client address, peer
/// (workload lookups) and metric label cache.
struct View {
    version: u64,
    l7: Arc<WaypointConfig>,
    /// `None`: the target is not served under `l7` (R14).
    ctx: Option<Rc<TunnelCtx>>,
    peer: Rc<Peer>,
    metric_cache: MetricCache,
    /// Tracing for the tunnel's destination under `l7`, resolved at its first request.
    tracing: std::cell::OnceCell<Option<Rc<ViewTracing>>>,
    /// The metrics' Telemetry `tagOverrides` for it, resolved at its first request.
    tags: std::cell::OnceCell<Option<Arc<crate::config::MetricTags>>>,
}

/// The tracing of a tunnel's destination ([`WaypointConfig::tracing_for`]) and the name of
/// its spans.
struct ViewTracing {
    tracing: crate::spans::Tracing,
    /// As Istio names a waypoint's route: `<service hostname>:<port>/*`, or
    /// `<pod ip>:<port>/*` for a pod target.
    name: String,
}

/// The hostname of service `svc` in the model `snap` (else Kubernetes' form of it).
fn service_host(snap: Option<&Snapshot>, svc: &ObjectRef) -> String {
    snap.and_then(|s| {
        s.services()
            .find(|x| x.namespace == svc.namespace && x.name == svc.name)
            .map(|x| x.hostname.clone())
    })
    .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", svc.name, svc.namespace))
}

impl View {
    /// Tracing for the tunnel's destination (none when its target is not served here).
    fn tracing(&self) -> Option<&Rc<ViewTracing>> {
        self.tracing
            .get_or_init(|| {
                let ctx = self.ctx.as_deref()?;
                let tracing = self.l7.tracing_for(&http1::subject(ctx))?;
                let name = match &ctx.destination {
                    http1::Destination::Service { service, port } => {
                        let host = service_host(self.l7.mesh.as_ref(), service);
                        format!("{host}:{port}/*")
                    }
                    http1::Destination::Workload { .. } => format!(
                        "{}/*",
                        SocketAddr::new(ctx.destination_ip, ctx.destination_port)
                    ),
                };
                Some(Rc::new(ViewTracing { tracing, name }))
            })
            .as_ref()
    }
}

impl TunnelFacts {
    /// The tunnel's view of the worker's current snapshot, derived again if that is newer
    /// than the tunnel's.
    fn refresh(&self, w: &Worker) -> Rc<View> {
        let (l7, version) = {
            let mut s = w.l7.borrow_mut();
            s.current();
            let v = s.version();
            if self.view.borrow().version == v {
                return self.view.borrow().clone();
            }
            let l7 = s.current().clone();
            (l7, s.version())
        };
        let old = self.view.borrow().clone();
        let settings = &w.shared.settings;
        let resolved = match l7.mesh.as_ref() {
            Some(snap) => target::resolve(snap, &settings.me, self.target),
            None => Err(Refused::Unknown),
        };
        let view = match resolved {
            Ok(destination) => derive(
                l7,
                version,
                destination,
                &Arrival {
                    identity: self.peer_identity.as_ref(),
                    peer_addr: self.peer_addr,
                    forwarded_for: self.forwarded_for,
                    baggage: &self.baggage,
                },
                |destination, source_ip, client_namespace| TunnelCtx {
                    destination,
                    source_ip,
                    client_namespace,
                    ..TunnelCtx::clone(&self.start_ctx)
                },
            ),
            Err(why) => {
                tracing::debug!(target = %self.target, ?why, version, "a reload no longer serves this tunnel's target (R14)");
                View {
                    version,
                    ctx: None,
                    peer: old.peer.clone(),
                    metric_cache: Rc::default(),
                    tracing: Default::default(),
                    tags: Default::default(),
                    l7,
                }
            }
        };
        w.shared.counters.tunnel_refreshes.fetch_add(1, Relaxed);
        let view = Rc::new(view);
        *self.view.borrow_mut() = view.clone();
        view
    }
}

/// A tunnel's CONNECT facts that its views are derived from.
struct Arrival<'a> {
    identity: Option<&'a Identity>,
    peer_addr: IpAddr,
    forwarded_for: Option<IpAddr>,
    baggage: &'a hbone::wire::Baggage,
}

/// The view of a tunnel whose target `l7` (at `version`) serves as `destination`: its client
/// address (`forwarded: for=` only from a hop that captured that client, crate::source),
/// peer and facts, the latter made by `ctx` from the destination, client address and the
/// namespace whose consumer routes apply (crate::source::consumer_namespace).
fn derive(
    l7: Arc<WaypointConfig>,
    version: u64,
    destination: http1::Destination,
    a: &Arrival<'_>,
    ctx: impl FnOnce(http1::Destination, IpAddr, Option<Arc<str>>) -> TunnelCtx,
) -> View {
    let ztunnel = crate::source::ztunnel_identity(&l7);
    let source_ip = crate::source::client_ip(
        l7.mesh.as_ref(),
        a.identity,
        a.peer_addr,
        a.forwarded_for,
        ztunnel,
    );
    let peer = peer_of(a.identity, a.baggage, &l7, source_ip, &destination, ztunnel);
    let client_namespace = crate::source::consumer_namespace(a.identity, ztunnel).map(Arc::from);
    View {
        version,
        ctx: Some(Rc::new(ctx(destination, source_ip, client_namespace))),
        peer: Rc::new(peer),
        metric_cache: Rc::default(),
        tracing: Default::default(),
        tags: Default::default(),
        l7,
    }
}

/// The L4 policy verdict (R15) of an opaque TCP tunnel with facts `ctx` under `l7`.
fn tcp_verdict(l7: &WaypointConfig, ctx: &TunnelCtx) -> crate::authz::Verdict {
    tcp_policy(l7, ctx).0
}

/// [`tcp_verdict`], and the gRPC authorizer of the CUSTOM policy the tunnel matches, if
/// any: asked about the connection once, as it opens, so the rest decides the verdict; an
/// HTTP authorizer has no request to be asked about: refused (fail closed).
fn tcp_policy<'c>(
    l7: &'c WaypointConfig,
    ctx: &TunnelCtx,
) -> (
    crate::authz::Verdict,
    Option<&'c Arc<crate::ext_authz::Provider>>,
) {
    let subject = http1::subject(ctx);
    let areq = tcp_request(ctx);
    let authorizer = (!l7.ext_authz.is_empty())
        .then(|| crate::authz::custom_tcp(&l7.policies, &subject, &areq))
        .flatten()
        .and_then(|name| l7.ext_authz.get(name));
    if authorizer.is_some_and(|p| !p.grpc) {
        tracing::debug!(
            "opaque TCP tunnel matched by a CUSTOM policy with an HTTP authorizer: refused"
        );
        let refused = crate::authz::Verdict {
            allowed: false,
            policy: None,
            audited: vec![],
        };
        return (refused, None);
    }
    let verdict = crate::authz::evaluate_tcp(&l7.policies, &subject, &areq);
    (verdict, authorizer)
}

/// What L4 policy reads of an opaque TCP tunnel with facts `ctx` (no HTTP attributes).
fn tcp_request(ctx: &TunnelCtx) -> crate::authz::Request<'_> {
    crate::authz::Request {
        source_ip: ctx.source_ip,
        remote_ip: ctx.source_ip,
        principal: ctx.principal.as_deref(),
        auth: None,
        destination_ip: ctx.destination_ip,
        destination_port: ctx.destination_port,
        host: "",
        method: "",
        path: "",
        headers: &[],
    }
}

/// Completes when a snapshot newer than `version` no longer allows a live connection (an
/// opaque TCP tunnel, an upgraded one): its target is no longer served (R14) or
/// `allowed` says its policy denies it (R15). Checked at each new version the worker sees
/// (as ztunnel re-checks its live connections).
async fn revoked_by_reload(
    w: Rc<Worker>,
    t: Rc<TunnelFacts>,
    mut version: u64,
    allowed: impl Fn(&WaypointConfig, &TunnelCtx) -> bool,
) {
    let _watch = ReloadWatch::start(&w);
    loop {
        let reloaded = w.reloaded.wait();
        if w.l7_version() != version {
            let view = t.refresh(&w);
            version = view.version;
            let Some(ctx) = view.ctx.as_deref() else {
                tracing::debug!(target = %t.target, "a reload no longer serves this live connection's target (R14)");
                return;
            };
            if !allowed(&view.l7, ctx) {
                tracing::debug!(target = %t.target, "a reload's policy denies this live connection (R15)");
                return;
            }
        }
        reloaded.await;
    }
}

/// An upstream stream (HBONE, or a connection outside the mesh) carrying HTTP/1.1
/// exchanges, and where it goes (to keep it for the tunnel's next request to the same
/// endpoint).
pub struct UpConn {
    s: UpStream,
    key: crate::upstream::ConnKey,
    /// Requests the stream carried before this one (`maxRequestsPerConnection`).
    uses: u32,
}

impl http1::Tunnel for UpConn {
    async fn read(&mut self) -> Option<io::Result<Bytes>> {
        self.s.read().await
    }

    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.s.write_all(data, false).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.s.write_all(Bytes::new(), true).await
    }

    async fn write_watching(&mut self, data: &mut Bytes) -> io::Result<http1::Watched> {
        self.s.write_watching(data).await
    }

    async fn read_or_source<S: http1::Tunnel>(
        &mut self,
        source: &mut S,
    ) -> Result<Option<io::Result<Bytes>>, http1::Watched> {
        self.s.read_or_source(source).await
    }
}

impl Upstream for HboneUpstream {
    type Conn = UpConn;

    /// Without word about the body: only a recently used kept stream.
    async fn connect(
        &mut self,
        service: Option<&(ObjectRef, u16)>,
        head: &http1::RequestHead,
    ) -> io::Result<(UpConn, bool)> {
        self.connect_try(service, head, false).await
    }

    async fn connect_try(
        &mut self,
        service: Option<&(ObjectRef, u16)>,
        head: &http1::RequestHead,
        replayable: bool,
    ) -> io::Result<(UpConn, bool)> {
        if let Some((svc, port)) = service {
            self.admit(svc, *port, true).await?;
        }
        // One clock read for the balancer and the pool.
        let now = Instant::now();
        let key = match service {
            Some((svc, port)) => {
                let hdrs: Vec<(&str, &str)> = if Balancers::hashed(&self.view.l7, svc, *port) {
                    head.headers
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_str()))
                        .collect()
                } else {
                    Vec::new()
                };
                self.pick(svc, *port, &hdrs, head.query.as_deref(), now)?
            }
            None => {
                let snap = self
                    .view
                    .l7
                    .mesh
                    .as_ref()
                    .ok_or_else(|| io::Error::other("no mesh model"))?;
                let ep = pod_endpoint(snap, self.target)
                    .ok_or_else(|| io::Error::other("target pod left the model"))?;
                self.current = None;
                self.upstream_host = Some(ep.authority);
                let key = (ep.hbone, ep.authority, 0);
                self.last = Some(Rc::new((None, ep.workload_uid)));
                key
            }
        };
        self.routed = true;
        // A request that cannot be replayed if the kept stream turns out closed gets only
        // a recently used one; after a kept stream that was closed, a new one.
        let max_idle = if std::mem::take(&mut self.fresh_next) {
            Duration::ZERO
        } else if replayable {
            Duration::MAX
        } else {
            crate::upstream::UNSAFE_REUSE_MAX_IDLE
        };
        let kept = self
            .worker
            .idle
            .borrow_mut()
            .take(&self.idle_key(key), now, max_idle);
        if let Some((s, uses)) = kept {
            return Ok((UpConn { s, key, uses }, true));
        }
        // A new stream (the endpoint's identity is needed only now).
        let uid = self.last.as_deref().map_or("", |l| l.1.as_str());
        // Boxed: a new stream (a connection's TLS handshake, perhaps) is the rare case; its
        // future would otherwise size every request's.
        let s = Box::pin(self.open(key.0, key.1, uid, false)).await?;
        Ok((UpConn { s, key, uses: 0 }, false))
    }

    fn done(
        &mut self,
        conn: Option<UpConn>,
        status: u16,
        reusable: bool,
        error: Option<io::ErrorKind>,
    ) {
        // One clock read for the HTTP/2 connection's idle time, the balancer and the pool.
        let now = Instant::now();
        // The try's HTTP/2 request (if any) is no longer in flight.
        if let Some(u) = self.h2_use.take() {
            u.end(now);
        }
        if status == 0 && error.is_none() && conn.is_none() {
            // A kept stream found closed: the try again goes on a new stream.
            self.fresh_next = true;
        }
        if let (Some((port, i)), Some((Some(svc), _))) = (self.current.take(), self.last.as_deref())
        {
            let verdict = outlier_verdict(status, error);
            self.worker
                .balancers
                .borrow_mut()
                .finish(svc, port, i, verdict, now);
        }
        if let Some(kind) = error {
            let c = &self.worker.shared.counters;
            if kind == io::ErrorKind::TimedOut {
                c.upstream_timeouts.fetch_add(1, Relaxed);
            } else {
                c.upstream_errors.fetch_add(1, Relaxed);
            }
        }
        if let Some(c) = conn {
            if status == 101 {
                self.upgrade = Some(c.s);
                // Still an upstream connection (`maxConnections`) while it is spliced.
                self.upgrade_slot = self.slot.take();
            } else {
                self.keep(c.key, c.s, c.uses + 1, reusable, now);
            }
        }
        // After the stream was kept: a request waiting for the connection slot finds it.
        self.leave_breakers();
    }

    async fn h2_request(
        &mut self,
        service: &(ObjectRef, u16),
        req: http::Request<()>,
        end: bool,
    ) -> io::Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
        let (svc, port) = (&service.0, service.1);
        self.admit(svc, port, false).await?;
        let hdrs: Vec<(&str, &str)> = if Balancers::hashed(&self.view.l7, svc, port) {
            req.headers()
                .iter()
                .filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?)))
                .collect()
        } else {
            Vec::new()
        };
        let key = self.pick(svc, port, &hdrs, req.uri().query(), Instant::now())?;
        self.routed = true;
        let (mut sender, u) = self.h2_sender(key).await?;
        let r = sender.send_request(req, end).map_err(io::Error::other)?;
        self.h2_use = Some(u);
        Ok(r)
    }

    fn upgraded(
        &mut self,
        to_upstream: Bytes,
        head: &http1::RequestHead,
        auth: Option<Arc<crate::jwt::Authenticated>>,
    ) {
        self.upgrade_first = to_upstream;
        self.upgrade_head = Some((head.clone(), auth));
    }

    fn cancelled(&mut self) {
        self.worker
            .shared
            .counters
            .cancelled_requests
            .fetch_add(1, Relaxed);
        // Its HTTP/2 request (if any) is no longer in flight.
        drop(self.h2_use.take());
        if let (Some((port, i)), Some((Some(svc), _))) = (self.current.take(), self.last.as_deref())
        {
            if let Ok(mut b) = self.worker.balancers.try_borrow_mut() {
                b.release(svc, port, i);
            }
        }
        self.leave_breakers();
        self.retrying = None;
    }

    fn stream_idle(&mut self) -> Option<(&mut http1::Clock, Duration)> {
        Some((&mut self.idle_clock, self.stream_idle?))
    }

    /// One timer per tunnel: the stream-idle one serves the tunnel's own waits too.
    fn clock(&mut self) -> Option<&mut http1::Clock> {
        Some(&mut self.idle_clock)
    }

    fn note(&mut self, n: http1::Note) {
        let c = &self.worker.shared.counters;
        let ctr = match n {
            http1::Note::Grpc => {
                self.grpc = Some(None);
                return;
            }
            http1::Note::GrpcStatus(g) => {
                // A label value: one of the 17 gRPC codes, whatever the upstream sent.
                if self.grpc.is_some() {
                    self.grpc = Some(Some(crate::telemetry::grpc_code(g)));
                }
                return;
            }
            http1::Note::StreamedBody => &c.streamed_bodies,
            http1::Note::MirrorSkipped => &c.mirrors_skipped,
            http1::Note::Continue => &c.continues,
            http1::Note::Upgraded => &c.upgrades,
            http1::Note::RequestBodyTimeout => &c.upstream_timeouts,
            http1::Note::RequestTimeout => &c.request_timeouts,
            http1::Note::BadRequest => &c.bad_requests,
            http1::Note::ExtAuthz(outcome) => match outcome {
                "allowed" => &c.ext_authz[0],
                "denied" => &c.ext_authz[1],
                _ => &c.ext_authz[2],
            },
            http1::Note::Fault(kind) => &c.faults[usize::from(kind == "abort")],
        };
        ctr.fetch_add(1, Relaxed);
    }

    async fn side_exchange(
        &mut self,
        service: &(ObjectRef, u16),
        request: Bytes,
        timeout: Duration,
        h2: bool,
    ) -> io::Result<Vec<u8>> {
        // The request's own destination (for its telemetry) stays what it was.
        let (last, routed) = (self.last.clone(), self.routed);
        let r = self
            .exchange_inner(Some(service), request, Some(timeout), false, h2)
            .await;
        (self.last, self.routed) = (last, routed);
        self.count_failed(&r);
        r
    }

    async fn exchange(
        &mut self,
        service: Option<&(ObjectRef, u16)>,
        request: Bytes,
        timeout: Option<Duration>,
    ) -> io::Result<Vec<u8>> {
        let r = self
            .exchange_inner(service, request, timeout, false, false)
            .await;
        self.count_failed(&r);
        r
    }

    fn mirror(&mut self, service: &(ObjectRef, u16), request: Bytes) {
        // Bounded: past the cap a mirror is skipped (counted), never queued.
        let in_flight = self.worker.mirrors.get();
        if in_flight >= MAX_MIRRORS_IN_FLIGHT {
            self.worker
                .shared
                .counters
                .mirrors_skipped
                .fetch_add(1, Relaxed);
            return;
        }
        // The mirror service's `http2MaxRequests` (circuit breaking): a mirror past it is
        // not sent, as Envoy drops a shadow its cluster's breaker refuses.
        let breaker = self.view.l7.breaker(&service.0, Some(service.1));
        let token = match breaker.map(|b| b.request()).transpose() {
            Ok(t) => t,
            Err(o) => {
                let c = &self.worker.shared.counters;
                c.overflowed(&o);
                c.mirrors_skipped.fetch_add(1, Relaxed);
                return;
            }
        };
        self.worker.mirrors.set(in_flight + 1);
        let mut copy = HboneUpstream::new(
            &self.tunnel,
            self.view.clone(),
            &self.worker,
            self.client_h2,
            &self.cert,
            self.target,
            Rc::default(),
            self.stream_idle,
        );
        let service = service.clone();
        self.worker.shared.counters.mirrored.fetch_add(1, Relaxed);
        runtime::busy::spawn_tracked(async move {
            // Gives the mirror's place back however the task ends (a panic included), so
            // a panicked mirror does not hold one of MAX_MIRRORS_IN_FLIGHT for good.
            let _in_flight = MirrorInFlight(copy.worker.clone());
            let _token = token;
            // The response is read and discarded as it comes (never buffered).
            let r = copy
                .exchange_inner(Some(&service), request, Some(MIRROR_TIMEOUT), true, false)
                .await;
            let c = &copy.worker.shared.counters;
            match &r {
                Ok(_) => c.mirrors_completed.fetch_add(1, Relaxed),
                Err(_) => c.mirror_errors.fetch_add(1, Relaxed),
            };
            if let Err(e) = r {
                tracing::debug!(service = %format!("{}/{}", service.0.namespace, service.0.name), error = %e, "mirrored request failed (ignored)");
            }
        });
    }

    fn record(&mut self, r: &http1::Record<'_>) {
        // The request is over: its retry (if any) is no longer in flight.
        self.retrying = None;
        let ms = r.started.elapsed().as_secs_f64() * 1000.0;
        let was_routed = std::mem::take(&mut self.routed);
        let last_ref = if was_routed { self.last.as_ref() } else { None };
        // gRPC: the response's grpc-status, else (as Envoy) its HTTP status mapped.
        let grpc = self
            .grpc
            .take()
            .map(|g| g.or_else(|| crate::telemetry::grpc_status_of_http(r.status)));
        // The view's (an `Rc`, so no count of the `Arc` per request).
        let view = self.view.clone();
        let tags = view
            .tags
            .get_or_init(|| self.telemetry_choice().tags)
            .as_ref();
        let requests = 0..crate::telemetry::TCP_OPENED;
        let tag_values = tags
            .filter(|t| t.upserts(requests.clone()))
            .map(|t| self.tag_values(t, requests.clone(), r, ms));
        let cached = self
            .metric_cache
            .borrow()
            .iter()
            .find(|(k, _)| {
                k.0 == r.status
                    && k.1 == r.flags
                    && k.2.as_ref() == last_ref
                    && k.3 == grpc
                    && k.4 == tag_values
            })
            .map(|(_, c)| c.clone());
        // The common case: a label set this tunnel has seen (its counters and access-log
        // text kept), no labels built.
        let set = match cached {
            Some(set) => set,
            None => {
                let tweaks = tags.map(|t| tweaks(t, requests, tag_values.as_deref()));
                let set = self.new_label_set(r.status, r.flags, was_routed, grpc, tweaks);
                let mut cache = self.metric_cache.borrow_mut();
                if cache.len() >= METRIC_CACHE {
                    cache.remove(0);
                }
                let last = if was_routed { self.last.clone() } else { None };
                cache.push(((r.status, r.flags, last, grpc, tag_values), set.clone()));
                set
            }
        };
        crate::telemetry::observe_shown(
            &set.counters,
            set.shown,
            ms,
            r.request_bytes,
            r.response_bytes,
        );
        match r.denied {
            Some(http1::Refusal::Policy) => {
                self.worker.shared.counters.denied.fetch_add(1, Relaxed);
            }
            Some(http1::Refusal::Token) => {
                self.worker
                    .shared
                    .counters
                    .jwt_rejected
                    .fetch_add(1, Relaxed);
            }
            // Counted when the check was made (`Note::ExtAuthz`) or the fault injected
            // (`Note::Fault`).
            Some(http1::Refusal::External) | Some(http1::Refusal::Fault) | None => {}
        }
        self.write_logs(&set.logs, &set.dst, r, ms, was_routed);
        if let Some(parent) = r.span {
            let cluster = was_routed.then(|| (self.port, set.dst.service.as_str()));
            self.queue_span(r, parent, cluster);
        }
    }

    fn propagation(&mut self) -> Option<crate::spans::Propagation> {
        self.view.tracing().map(|t| t.tracing.propagation())
    }

    fn retried(&mut self) {
        self.worker.shared.counters.retries.fetch_add(1, Relaxed);
    }

    /// `maxRetries` of the request's service: a retry in flight until the request ends.
    fn retry_allowed(&mut self) -> bool {
        let Some(b) = self.current_breaker().cloned() else {
            return true;
        };
        // The request's previous retry (if any) has ended: it is not in flight any more.
        self.retrying = None;
        match b.retry() {
            Ok(t) => {
                self.retrying = Some(t);
                true
            }
            Err(o) => {
                self.worker.shared.counters.overflowed(&o);
                false
            }
        }
    }

    /// One version compare when nothing was reloaded; else the tunnel's view of the new
    /// snapshot (derived once per tunnel and version) becomes this request's.
    fn begin(&mut self) -> http1::Begin {
        if self.worker.l7_version() != self.view.version {
            let view = self.tunnel.refresh(&self.worker);
            self.metric_cache = view.metric_cache.clone();
            self.view = view;
        }
        if self.view.version == self.tunnel.start {
            return http1::Begin::Same;
        }
        match &self.view.ctx {
            Some(ctx) => http1::Begin::New(self.view.l7.clone(), ctx.clone()),
            None => {
                self.worker
                    .shared
                    .counters
                    .stale_target_requests
                    .fetch_add(1, Relaxed);
                http1::Begin::Refused
            }
        }
    }
}

/// How long a mirrored request may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Mirrored requests one worker keeps in flight; more are skipped (`waypoint_mirrors_skipped`).
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;

impl HboneUpstream {
    /// A tunnel's upstream for one request (or HTTP/2 stream, or mirror) under `view`,
    /// with nothing picked yet.
    #[allow(clippy::too_many_arguments)]
    fn new(
        tunnel: &Rc<TunnelFacts>,
        view: Rc<View>,
        worker: &Rc<Worker>,
        client_h2: bool,
        cert: &Arc<WorkloadCert>,
        target: SocketAddr,
        metric_cache: MetricCache,
        stream_idle: Option<Duration>,
    ) -> Self {
        HboneUpstream {
            tunnel: tunnel.clone(),
            view,
            worker: worker.clone(),
            client_h2,
            cert: cert.clone(),
            target,
            rng: worker.rng(),
            last: None,
            metric_cache,
            current: None,
            routed: false,
            upgrade: None,
            upgrade_first: Bytes::new(),
            upgrade_head: None,
            fresh_next: false,
            h2_use: None,
            grpc: None,
            idle_clock: http1::Clock::default(),
            stream_idle,
            slot: None,
            in_flight: None,
            retrying: None,
            upgrade_slot: None,
            port: None,
            upstream_host: None,
        }
    }

    /// The request (or opaque connection) `r`, `ms` long, to destination `dst`, in the
    /// access `logs` whose filter takes it; `routed`: it went upstream.
    fn write_logs(
        &self,
        logs: &[crate::config::LogSink],
        dst: &crate::telemetry::AccessDst,
        r: &http1::Record<'_>,
        ms: f64,
        routed: bool,
    ) {
        // Envoy's `UPSTREAM_CLUSTER` of a routed request.
        let cluster = || {
            routed
                .then_some(())
                .and(self.port)
                .map(|port| format!("outbound|{port}||{}", dst.service))
        };
        for sink in logs {
            if sink
                .filter
                .as_ref()
                .is_some_and(|f| !self.log_filter_matches(f, r, ms))
            {
                continue;
            }
            match &*sink.provider {
                crate::config::LogProvider::Builtin => {
                    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
                        continue;
                    }
                    let p = &self.view.peer;
                    let src = crate::telemetry::AccessSrc {
                        addr: p.addr,
                        workload: &p.workload,
                        namespace: &p.namespace,
                        identity: &p.principal,
                    };
                    crate::telemetry::access_log(&src, dst, r, ms);
                }
                crate::config::LogProvider::File(f) => {
                    self.with_log_fields(r, routed, cluster().as_deref(), |fields| {
                        f.out
                            .append(|buf| f.format.render(fields, f.omit_empty, buf))
                    });
                }
                crate::config::LogProvider::Otel(o) => {
                    self.with_log_fields(r, routed, cluster().as_deref(), |fields| {
                        self.queue_log(o, fields, r)
                    });
                }
            }
        }
    }

    /// Whether an access log takes the request `r` (of `ms` milliseconds) under its
    /// Telemetry `filter`.
    fn log_filter_matches(
        &self,
        filter: &crate::cel::Expr,
        r: &http1::Record<'_>,
        ms: f64,
    ) -> bool {
        filter.matches(&self.cel_input(r, ms))
    }

    /// What CEL expressions (log filters, tag values) read of the request `r`, `ms` long.
    fn cel_input<'a>(&self, r: &'a http1::Record<'a>, ms: f64) -> crate::cel::Input<'a> {
        let ctx = self.view.ctx.as_deref();
        crate::cel::Input {
            record: r,
            source: self.view.peer.addr,
            destination: ctx.map(|c| SocketAddr::new(c.destination_ip, c.destination_port)),
            duration: Duration::from_secs_f64(ms / 1000.0),
        }
    }

    /// `log` given the fields Envoy-formatted access logs read of the request `r`
    /// ([`crate::logfmt`]); `routed`: it went upstream; `cluster`: its routed service's
    /// `outbound|port||host`.
    fn with_log_fields(
        &self,
        r: &http1::Record<'_>,
        routed: bool,
        cluster: Option<&str>,
        log: impl FnOnce(&crate::logfmt::Fields<'_>),
    ) {
        let duration = r.started.elapsed();
        let now = SystemTime::now();
        let request = crate::telemetry::LoggedRequest::new(r);
        let peer = &self.view.peer;
        let tunnel = &self.tunnel;
        let fields = crate::logfmt::Fields {
            start: now.checked_sub(duration).unwrap_or(now),
            duration,
            request_duration: None,
            response_duration: None,
            // Envoy's `-` for a TCP connection.
            protocol: if r.protocol == "tcp" { "-" } else { r.protocol },
            status: r.status,
            flags: r.flags,
            details: crate::telemetry::response_code_details(r),
            connection_termination: None,
            transport_failure: None,
            bytes_received: r.request_bytes,
            bytes_sent: r.response_bytes,
            request: &request,
            response: &crate::logfmt::NoHeaders,
            // Only a request that went upstream has one (not one answered here).
            upstream_host: self.upstream_host.filter(|_| routed),
            upstream_cluster: cluster,
            upstream_local: None,
            upstream_peer_uri_san: None,
            upstream_attempts: None,
            downstream_local: self.target,
            // The original client's port is not carried by HBONE: 0, left out.
            downstream_remote: SocketAddr::new(peer.addr, 0),
            downstream_direct_remote: SocketAddr::new(tunnel.peer_addr, tunnel.peer_port),
            downstream_peer_uri_san: Some(peer.principal.as_str())
                .filter(|p| p.starts_with("spiffe://")),
            downstream_local_uri_san: Some(self.worker.shared.identity_uri.as_str()),
            requested_server_name: None,
            route_name: None,
            connection_id: tunnel.id,
            trace_id: r
                .traceparent
                .get(3..35)
                .filter(|_| crate::telemetry::valid_traceparent(r.traceparent)),
        };
        log(&fields);
    }

    /// The request `r`'s record for the OpenTelemetry access log `o`, queued for export
    /// (dropped and counted past [`crate::spans::MAX_BUFFERED`] waiting).
    fn queue_log(
        &self,
        o: &crate::config::OtelLog,
        fields: &crate::logfmt::Fields<'_>,
        r: &http1::Record<'_>,
    ) {
        if self.worker.spans.borrow().waiting >= crate::spans::MAX_BUFFERED {
            self.worker.shared.counters.log_records[2].fetch_add(1, Relaxed);
            return;
        }
        let mut text = Vec::with_capacity(256);
        o.body.render(fields, false, &mut text);
        let body = String::from_utf8_lossy(&text).into_owned();
        let mut attributes = crate::spans::Tags::with_capacity(o.attributes.len(), 128);
        for (k, f) in &o.attributes {
            text.clear();
            f.render(fields, false, &mut text);
            attributes.push(k.clone(), String::from_utf8_lossy(&text));
        }
        let record = crate::spans::LogRecord {
            time_unix_nanos: crate::spans::unix_nanos(fields.start),
            body,
            attributes,
            trace: crate::spans::parse_traceparent(r.traceparent),
        };
        self.queue_export(o.provider.clone(), crate::spans::Item::Log(record));
    }

    /// The waypoint's span of the request `r` (tracing on: its `traceparent` names the
    /// span, `parent` its parent, 0 none), queued for export when sampled and reported;
    /// `cluster`: the routed service port and hostname (Envoy's `upstream_cluster`).
    fn queue_span(
        &mut self,
        r: &http1::Record<'_>,
        parent: u64,
        cluster: Option<(Option<u16>, &str)>,
    ) {
        let settings = &self.worker.shared.settings;
        let Some(vt) = self.view.tracing().cloned() else {
            return;
        };
        let t = &vt.tracing;
        let Some((trace_id, span_id, flags)) = crate::spans::parse_traceparent(r.traceparent)
        else {
            return;
        };
        if !t.report || flags & 1 == 0 {
            return;
        }
        let counters = &self.worker.shared.counters;
        if self.worker.spans.borrow().waiting >= crate::spans::MAX_BUFFERED {
            counters.spans[2].fetch_add(1, Relaxed);
            return;
        }
        let provider = t.provider.clone();
        let end = SystemTime::now();
        let start = end.checked_sub(r.started.elapsed()).unwrap_or(end);
        let header = |n: &str| r.head.and_then(|h| h.header(n));
        let mut tags = crate::spans::Tags::with_capacity(20 + t.custom_tags.len(), 384);
        let query = r.query.map_or(("", ""), |q| ("?", q));
        tags.push("component", "proxy");
        tags.push("guid:x-request-id", r.request_id);
        tags.push("http.method", r.method);
        tags.push(
            "http.url",
            format_args!("http://{}{}{}{}", r.host, r.path, query.0, query.1),
        );
        tags.push("http.protocol", r.protocol);
        tags.push("http.status_code", r.status);
        tags.push("user_agent", header("user-agent").unwrap_or("-"));
        tags.push("request_size", r.request_bytes);
        tags.push("response_size", r.response_bytes);
        tags.push("response_flags", r.flags);
        for name in ["upstream_cluster", "upstream_cluster.name"] {
            match cluster {
                Some((Some(port), host)) => {
                    tags.push(name, format_args!("outbound|{port}||{host}"))
                }
                _ => tags.push(name, "-"),
            }
        }
        tags.push("downstream_cluster", "-");
        tags.push("peer.address", self.view.peer.addr);
        tags.push("istio.canonical_service", &settings.me.gateway.name);
        tags.push("istio.namespace", &settings.me.gateway.namespace);
        let error = r.status >= 500;
        if error {
            tags.push("error", "true");
        }
        for (name, custom) in &t.custom_tags {
            let value = match custom {
                crate::spans::CustomTag::Literal(v) => Some(v.as_str()),
                crate::spans::CustomTag::Header { name, default } => {
                    header(name).or(default.as_deref())
                }
            };
            if let Some(v) = value {
                tags.push(name.clone(), v);
            }
        }
        let span = crate::spans::Span {
            trace_id,
            span_id,
            parent: (parent != 0).then(|| parent.to_be_bytes()),
            flags,
            name: vt.name.clone(),
            start_unix_nanos: crate::spans::unix_nanos(start),
            end_unix_nanos: crate::spans::unix_nanos(end),
            peer: self.view.peer.addr,
            error,
            tags,
        };
        self.queue_export(provider, crate::spans::Item::Span(span));
    }

    /// Queue `item` for export to `provider` (a batch is sent when full, else a second
    /// after the first item waiting).
    fn queue_export(&self, provider: Arc<crate::spans::Provider>, item: crate::spans::Item) {
        let due = {
            let mut q = self.worker.spans.borrow_mut();
            q.waiting += 1;
            let i = match q
                .batches
                .iter()
                .position(|(p, _)| Arc::ptr_eq(p, &provider))
            {
                Some(i) => i,
                None => {
                    q.batches.push((provider, Vec::new()));
                    q.batches.len() - 1
                }
            };
            q.batches[i].1.push(item);
            let full = q.batches[i].1.len() >= crate::spans::MAX_BATCH
                && q.in_flight < crate::spans::MAX_EXPORTS_IN_FLIGHT;
            if full {
                Some(None)
            } else if !q.timer {
                q.timer = true;
                Some(Some(crate::spans::FLUSH_INTERVAL))
            } else {
                None
            }
        };
        if let Some(after) = due {
            self.spawn_export(after);
        }
    }

    /// Export the worker's waiting spans (after `after`, a timed flush), batch by batch,
    /// in a task of their own, over a copy of this upstream (HBONE to the collector's
    /// service, as any upstream).
    fn spawn_export(&self, after: Option<Duration>) {
        let mut copy = HboneUpstream::new(
            &self.tunnel,
            self.view.clone(),
            &self.worker,
            false,
            &self.cert,
            self.target,
            Rc::default(),
            self.stream_idle,
        );
        runtime::busy::spawn_tracked(async move {
            if let Some(d) = after {
                // At once when the worker begins to drain: its spans are sent before it
                // stops (see `flush_spans`).
                let _ = race(monoio::time::sleep(d), copy.worker.ctx.draining()).await;
                copy.worker.spans.borrow_mut().timer = false;
            }
            copy.export_waiting().await;
        });
    }

    /// Send the worker's waiting spans, a batch (one provider, up to
    /// [`crate::spans::MAX_BATCH`] spans) at a time, while fewer than
    /// [`crate::spans::MAX_EXPORTS_IN_FLIGHT`] are in flight; what is left is taken by the
    /// exports in flight as they end.
    async fn export_waiting(&mut self) {
        let me = &self.worker.shared.settings.me;
        let local = crate::spans::Local {
            service_name: format!("{}.{}", me.gateway.name, me.gateway.namespace),
            ip: me.address.ip(),
        };
        loop {
            let (provider, batch, _in_flight) = {
                let mut q = self.worker.spans.borrow_mut();
                if q.waiting == 0 {
                    return;
                }
                if q.in_flight >= crate::spans::MAX_EXPORTS_IN_FLIGHT {
                    // Left for the exports in flight: each takes the next batch when it
                    // is done.
                    return;
                }
                let Some(i) = q.batches.iter().position(|(_, b)| !b.is_empty()) else {
                    q.waiting = 0;
                    return;
                };
                let (provider, items) = &mut q.batches[i];
                let provider = provider.clone();
                let n = items.len().min(crate::spans::MAX_BATCH);
                let batch: Vec<crate::spans::Item> = items.drain(..n).collect();
                if items.is_empty() {
                    q.batches.remove(i);
                }
                q.waiting -= n;
                q.in_flight += 1;
                (provider, batch, ExportInFlight(self.worker.clone()))
            };
            let request = crate::spans::export_request(&provider, &local, &batch);
            let grpc = provider.grpc();
            let service = (provider.service.clone(), provider.port);
            let r = self
                .exchange_inner(Some(&service), request, Some(provider.timeout), false, grpc)
                .await;
            let taken = matches!(&r, Ok(answer) if crate::spans::accepted(&provider, answer));
            let c = &self.worker.shared.counters;
            let counted = if provider.logs() {
                &c.log_records
            } else {
                &c.spans
            };
            counted[usize::from(!taken)].fetch_add(batch.len() as u64, Relaxed);
            match &r {
                Ok(_) if taken => {}
                Ok(a) => tracing::debug!(
                    provider = %provider.name,
                    answer = %String::from_utf8_lossy(&a[..a.len().min(200)]),
                    "export not taken (spans or log records)"
                ),
                Err(e) => {
                    tracing::debug!(provider = %provider.name, error = %e, "export failed (spans or log records)")
                }
            }
        }
    }

    /// The counters and access-log text of a label set this tunnel has not seen (status,
    /// flags, `last` when routed, gRPC): its labels built from the view's snapshot.
    fn new_label_set(
        &self,
        status: u16,
        flags: &'static str,
        was_routed: bool,
        grpc: Option<Option<u32>>,
        tweaks: Option<Arc<crate::telemetry::TagTweaks>>,
    ) -> Rc<LabelSet> {
        let labels = self.request_labels(status, flags, was_routed, grpc, tweaks);
        let choice = self.telemetry_choice();
        let counters = self.worker.metrics.counters(&labels);
        counters.shown.store(choice.metrics, Relaxed);
        Rc::new(LabelSet {
            counters,
            dst: crate::telemetry::AccessDst::of(&labels),
            logs: choice.logs,
            shown: choice.metrics,
        })
    }

    /// Istio's labels of a request (status, flags, `last` when routed, gRPC) from the
    /// view's snapshot.
    fn request_labels(
        &self,
        status: u16,
        flags: &'static str,
        was_routed: bool,
        grpc: Option<Option<u32>>,
        tweaks: Option<Arc<crate::telemetry::TagTweaks>>,
    ) -> crate::telemetry::RequestLabels {
        let last = if was_routed {
            self.last.as_deref()
        } else {
            None
        };
        let snap = self.view.l7.mesh.as_ref();
        let p = &self.view.peer;
        // The destination: the routed service and the endpoint that answered; else what
        // the tunnel was addressed to.
        let (service, workload) = match (last, &p.destination) {
            (Some(d), _) => (d.0.clone(), snap.and_then(|s| s.workload(&d.1))),
            (None, http1::Destination::Service { service, .. }) => (Some(service.clone()), None),
            (None, http1::Destination::Workload { .. }) => {
                (None, snap.and_then(|s| s.workload_by_ip(self.target.ip())))
            }
        };
        let unknown = || "unknown".to_string();
        let host = service
            .as_ref()
            .map_or_else(unknown, |svc| service_host(snap, svc));
        // The model's workload of the client, when it is the one telemetry names (see
        // `crate::source::workload_of`).
        let source = snap
            .and_then(|s| s.workload_by_ip(p.addr))
            .filter(|w| w.namespace == p.namespace && workload_name(w) == p.workload);
        crate::telemetry::RequestLabels {
            source_workload: p.workload.clone(),
            source_workload_namespace: p.namespace.clone(),
            source_principal: p.principal.clone(),
            source: crate::telemetry::WorkloadLabels::of(source),
            destination: crate::telemetry::WorkloadLabels::of(workload),
            grpc_response_status: grpc.flatten().map_or_else(String::new, |g| g.to_string()),
            destination_service: host,
            destination_service_name: service.as_ref().map_or_else(unknown, |s| s.name.clone()),
            destination_service_namespace: service
                .as_ref()
                .map_or_else(unknown, |s| s.namespace.clone()),
            destination_workload: workload.map_or_else(unknown, workload_name),
            destination_workload_namespace: workload.map_or_else(unknown, |w| w.namespace.clone()),
            destination_principal: workload.map_or_else(unknown, |w| w.identity().to_string()),
            request_protocol: if grpc.is_some() { "grpc" } else { "http" },
            response_code: status,
            response_flags: flags,
            tweaks,
        }
    }

    /// Istio's TCP metrics of an opaque tunnel to `last` (response flags `flags`): one
    /// connection, opened and closed, with its bytes each way.
    fn record_tcp(&self, flags: &'static str, received: u64, sent: u64, started: Instant) {
        let choice = self.telemetry_choice();
        let tcp = crate::telemetry::TCP_OPENED..crate::telemetry::METRICS.len();
        // What `tagOverrides` values read of a connection (no HTTP request).
        let record = http1::Record {
            protocol: "tcp",
            method: "",
            host: "",
            path: "",
            query: None,
            status: 0,
            flags,
            request_bytes: received,
            response_bytes: sent,
            started,
            traceparent: "",
            span: None,
            head: None,
            request_id: "",
            denied: None,
        };
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let tweaks = choice.tags.as_deref().map(|t| {
            let values = t
                .upserts(tcp.clone())
                .then(|| self.tag_values(t, tcp.clone(), &record, ms));
            tweaks(t, tcp.clone(), values.as_deref())
        });
        let mut labels = self.request_labels(0, flags, true, None, tweaks);
        labels.request_protocol = "tcp";
        // The connection's access log lines, as a request's (Istio's waypoints log TCP).
        let dst = crate::telemetry::AccessDst::of(&labels);
        self.write_logs(&choice.logs, &dst, &record, ms, true);
        let c = self.worker.metrics.tcp(&labels);
        c.shown.store(choice.metrics, Relaxed);
        let on = |m: usize| choice.metrics & (1 << m) != 0;
        let counts = [
            (&c.opened, 1),
            (&c.closed, 1),
            (&c.received_bytes, received),
            (&c.sent_bytes, sent),
        ];
        for (i, (counter, n)) in counts.into_iter().enumerate() {
            if on(crate::telemetry::TCP_OPENED + i) {
                counter.fetch_add(n, Relaxed);
            }
        }
    }

    /// The caller's address (the tunnel's client, as its view says).
    fn source_ip(&self) -> IpAddr {
        self.view.peer.addr
    }

    /// Telemetry, for what the tunnel was addressed to (a tunnel with no served target as
    /// the settings and the mesh-wide Telemetry say).
    fn telemetry_choice(&self) -> crate::config::TelemetryChoice {
        match self.view.ctx.as_deref() {
            Some(ctx) => self.view.l7.telemetry_for(&http1::subject(ctx)),
            None => self.view.l7.telemetry_for(&crate::authz::Subject {
                waypoint: &self.worker.shared.settings.me.gateway,
                root_namespace: &self.worker.shared.settings.root_namespace,
                service: None,
                workload: None,
            }),
        }
    }

    /// The values of `tags`' UPSERTs of `metrics` for the request `r`, in their order
    /// (`unknown` where an expression has none).
    fn tag_values(
        &self,
        tags: &crate::config::MetricTags,
        metrics: std::ops::Range<usize>,
        r: &http1::Record<'_>,
        ms: f64,
    ) -> Rc<[String]> {
        let input = self.cel_input(r, ms);
        tags.0[metrics]
            .iter()
            .flatten()
            .filter_map(|(_, t)| match t {
                crate::config::TagOverride::Upsert(e) => {
                    Some(e.text(&input).unwrap_or_else(|| "unknown".to_string()))
                }
                crate::config::TagOverride::Remove => None,
            })
            .collect()
    }

    /// The balancer's endpoint of `svc:port` for this request (`hdrs`: its headers when the
    /// service hashes on them): its node's HBONE address and the CONNECT `:authority`. It
    /// becomes the telemetry destination (copied only when it changed; the endpoint's
    /// identity is looked up only for a new connection) and `current`.
    fn pick(
        &mut self,
        svc: &ObjectRef,
        port: u16,
        hdrs: &[(&str, &str)],
        query: Option<&str>,
        now: Instant,
    ) -> io::Result<crate::upstream::ConnKey> {
        let input = HashInput {
            headers: hdrs,
            source_ip: Some(self.source_ip()),
            query,
        };
        let mut b = self.worker.balancers.borrow_mut();
        let (i, ep) = b
            .pick_ref(&self.view.l7, svc, port, &input, now, &mut self.rng)
            .ok_or_else(|| {
                io::Error::other(format!("{}/{} has no endpoints", svc.namespace, svc.name))
            })?;
        set_last(&mut self.last, &self.metric_cache, svc, &ep.workload_uid);
        self.current = Some((port, i));
        self.upstream_host = Some(ep.authority);
        Ok(self.conn_key(ep))
    }

    /// A failed exchange counted: an upstream timeout, or an upstream error.
    fn count_failed<T>(&self, r: &io::Result<T>) {
        if let Err(e) = r {
            let c = &self.worker.shared.counters;
            if e.kind() == io::ErrorKind::TimedOut {
                c.upstream_timeouts.fetch_add(1, Relaxed);
            } else {
                c.upstream_errors.fetch_add(1, Relaxed);
            }
        }
    }

    async fn exchange_inner(
        &mut self,
        service: Option<&(ObjectRef, u16)>,
        request: Bytes,
        timeout: Option<Duration>,
        discard: bool,
        force_h2: bool,
    ) -> io::Result<Vec<u8>> {
        let l7 = self.view.l7.clone();
        let snap = l7
            .mesh
            .as_ref()
            .ok_or_else(|| io::Error::other("no mesh model"))?;
        let (head, head_len) = match http1::parse_head(&request) {
            http1::Parsed::Head(h, n) => (h, n),
            _ => return Err(io::Error::other("unparsable upstream request")),
        };
        let h2 = force_h2
            || self.client_h2
                && service.is_some_and(|(svc, port)| {
                    l7.lb_ref(svc, Some(*port))
                        .is_some_and(|lb| lb.use_client_protocol)
                });
        // A mirror is not held to the service's circuit breakers.
        if let (Some((svc, port)), false) = (service, discard) {
            self.admit(svc, *port, !h2).await?;
        }
        let hdrs: Vec<(&str, &str)> = head
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let (ep, picked) = self.choose(snap, service, &hdrs, head.query.as_deref())?;
        self.last = Some(Rc::new((
            service.map(|s| s.0.clone()),
            ep.workload_uid.clone(),
        )));
        self.routed = true;
        let close = head
            .header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
            || head.version == 0;
        let send = async {
            if h2 {
                self.send_h2(&ep, &head, request.slice(head_len..), discard)
                    .await
            } else {
                self.send(&ep, request, head.method == "HEAD", close, discard)
                    .await
            }
        };
        let r = match timeout {
            // Dropped on expiry: the upstream stream is reset.
            Some(t) => match race(send, http1::timer(t)).await {
                Either::Left(r) => r,
                Either::Right(()) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "upstream request timeout",
                )),
            },
            None => send.await,
        };
        if let Some((svc, port, i)) = picked {
            let status = r.as_ref().map_or(0, |resp| status_of(resp));
            self.worker
                .balancers
                .borrow_mut()
                .finish(svc, port, i, status, Instant::now());
        }
        if !discard {
            self.leave_breakers();
        }
        r
    }

    /// One exchange with `ep` in HTTP/2, multiplexed on the worker's connection to it (an
    /// `h2` client over one HBONE stream, made on first use and replaced when it fails).
    /// The request comes and the response goes as HTTP/1.1 bytes (the shared form of
    /// [`Upstream::exchange`]).
    async fn send_h2(
        &mut self,
        ep: &Endpoint,
        head: &http1::RequestHead,
        raw_body: Bytes,
        discard: bool,
    ) -> io::Result<Vec<u8>> {
        let chunked = head
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            Bytes::from(
                h2srv::dechunk(&raw_body).ok_or_else(|| io::Error::other("bad chunked body"))?,
            )
        } else {
            raw_body
        };
        let authority = head
            .header("host")
            .map(str::to_string)
            .unwrap_or_else(|| ep.authority.to_string());
        let uri = format!("http://{authority}{}", http1::target_of(head));
        let mut b = http::Request::builder()
            .method(head.method.as_str())
            .uri(uri);
        for (n, v) in &head.headers {
            let l = n.to_ascii_lowercase();
            if matches!(
                l.as_str(),
                "host"
                    | "connection"
                    | "keep-alive"
                    | "proxy-connection"
                    | "transfer-encoding"
                    | "upgrade"
                    | "content-length"
            ) || (l == "te" && !v.eq_ignore_ascii_case("trailers"))
            {
                continue;
            }
            b = b.header(l, v.as_str());
        }
        if !body.is_empty() {
            b = b.header("content-length", body.len());
        }
        let req = b.body(()).map_err(io::Error::other)?;
        // In flight until this exchange ends.
        let (mut sender, _in_flight) = self.h2_sender(self.conn_key(ep)).await?;
        let (resp, mut tx) = sender
            .send_request(req, body.is_empty())
            .map_err(io::Error::other)?;
        if !body.is_empty() {
            let mut body = body;
            while !body.is_empty() {
                tx.reserve_capacity(body.len());
                match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                    Some(Ok(0)) => continue,
                    Some(Ok(cap)) => {
                        let chunk = body.split_to(cap.min(body.len()));
                        tx.send_data(chunk, body.is_empty())
                            .map_err(io::Error::other)?;
                    }
                    Some(Err(e)) => return Err(io::Error::other(e)),
                    None => return Err(io::Error::other("upstream h2 stream closed")),
                }
            }
        }
        let resp = resp.await.map_err(io::Error::other)?;
        let (parts, mut rx) = resp.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = rx.data().await {
            let chunk = chunk.map_err(io::Error::other)?;
            let _ = rx.flow_control().release_capacity(chunk.len());
            if discard {
                continue;
            }
            if data.len() + chunk.len() > MAX_RESPONSE {
                return Err(io::Error::other("upstream response too large"));
            }
            data.extend_from_slice(&chunk);
        }
        if head.method == "HEAD" {
            data.clear();
        }
        // Trailers (a gRPC status) are read too, and given as fields of the head.
        let trailers = if discard {
            None
        } else {
            rx.trailers().await.map_err(io::Error::other)?
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            parts.status.as_u16(),
            parts.status.canonical_reason().unwrap_or("")
        );
        for (n, v) in parts.headers.iter().chain(trailers.iter().flatten()) {
            if matches!(
                n.as_str(),
                "content-length" | "transfer-encoding" | "connection"
            ) {
                continue;
            }
            out.push_str(&format!(
                "{}: {}\r\n",
                n,
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
        out.push_str(&format!("content-length: {}\r\n\r\n", data.len()));
        let mut out = out.into_bytes();
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// The worker's HTTP/2 connection to `ep`, ready for a request (made on first use,
    /// replaced when it failed or was idle past its service's `idleTimeout`; concurrent
    /// first uses wait for one connect), and the request's hold on it (in flight until
    /// dropped).
    /// `key` is the [`crate::upstream::ConnKey`] of the endpoint of the current try (`last`).
    async fn h2_sender(
        &self,
        key: crate::upstream::ConnKey,
    ) -> io::Result<(h2::client::SendRequest<Bytes>, H2Use)> {
        // The expiry of the service this request goes to (its DestinationRule).
        let service = self.last.as_deref().and_then(|(svc, _)| svc.as_ref());
        let expiry = self.view.l7.idle_expiry(service, self.port);
        loop {
            let slot = self.worker.h2_clients.borrow().get(&key).cloned();
            match slot {
                Some(H2Slot::Ready(c, idle)) => {
                    // In flight from here: the connection's timer does not close it while
                    // this request waits for a stream.
                    let u = H2Use::new(&idle, expiry);
                    match c.ready().await {
                        Ok(s) => return Ok((s, u)),
                        Err(e) => {
                            tracing::debug!(error = %e, "upstream HTTP/2 connection unusable; replacing it");
                            self.worker.h2_clients.borrow_mut().remove(&key);
                        }
                    }
                }
                // Another request of this worker is connecting: use its connection.
                Some(H2Slot::Connecting(ev)) => ev.wait().await,
                None => {
                    let guard = Connecting::start(&self.worker, key);
                    // Boxed: a new connection is the rare case; its future would otherwise
                    // size every request's.
                    let c = Box::pin(self.h2_connect(key)).await?;
                    let idle = H2Idle::new(Instant::now());
                    let u = H2Use::new(&idle, expiry);
                    guard.done(H2Slot::Ready(c.clone(), idle.clone()));
                    spawn_h2_idle_timer(Rc::downgrade(&self.worker), key, idle);
                    return Ok((c.ready().await.map_err(io::Error::other)?, u));
                }
            }
        }
    }

    /// A new HTTP/2 connection to `ep` over one HBONE stream (or, outside the mesh, a
    /// connection of its own).
    async fn h2_connect(
        &self,
        key: crate::upstream::ConnKey,
    ) -> io::Result<h2::client::SendRequest<Bytes>> {
        let uid = self.last.as_deref().map_or("", |l| l.1.as_str());
        let s = self.open(key.0, key.1, uid, true).await?;
        let io = crate::plain::UpIo::new(s);
        let (send, conn) = self
            .worker
            .shared
            .settings
            .h2
            .client_builder()
            .handshake::<_, Bytes>(io)
            .await
            .map_err(io::Error::other)?;
        self.worker
            .shared
            .counters
            .upstream_h2_connections
            .fetch_add(1, Relaxed);
        runtime::busy::spawn_tracked(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(send)
    }

    /// The circuit breakers of the current request's service (`last`) at its port, if any.
    fn current_breaker(&self) -> Option<&Arc<crate::breaker::Breaker>> {
        let svc = self.last.as_deref()?.0.as_ref()?;
        self.view.l7.breaker(svc, self.port)
    }

    /// The current try is over: its connection slot and its request in flight go back.
    fn leave_breakers(&mut self) {
        self.slot = None;
        self.in_flight = None;
    }

    /// The current try's place under `svc`'s circuit breakers, when its DestinationRule sets
    /// limits ([`crate::breaker`]): for an HTTP/1.1 upstream (`connection`) an upstream
    /// connection, waiting as a pending request for one of this worker's when all are in
    /// use, then a request in flight. Refused: an [`crate::breaker::Overflow`] error
    /// (counted), nothing held, no endpoint picked.
    async fn admit(&mut self, svc: &ObjectRef, port: u16, connection: bool) -> io::Result<()> {
        self.port = Some(port);
        let Some(b) = self.view.l7.breaker(svc, Some(port)).cloned() else {
            return Ok(());
        };
        let w = self.worker.clone();
        let refused = |o: crate::breaker::Overflow| {
            w.shared.counters.overflowed(&o);
            io::Error::from(o)
        };
        if connection {
            let local = w.breakers.of(&b);
            // Boxed: the rare wait would otherwise size every request's future.
            self.slot = Some(Box::pin(b.connection(&local)).await.map_err(refused)?);
        }
        match b.request() {
            Ok(t) => self.in_flight = Some(t),
            Err(o) => {
                self.slot = None;
                return Err(refused(o));
            }
        }
        Ok(())
    }

    /// The endpoint for `service` (balanced; `None`: the tunnel's pod, R16) and the
    /// balancer slot to [`Balancers::finish`]. (The identity the endpoint must present is
    /// looked up by [`HboneUpstream::open`], only for a new stream.)
    #[allow(clippy::type_complexity)]
    fn choose<'s>(
        &mut self,
        snap: &Snapshot,
        service: Option<&'s (ObjectRef, u16)>,
        hdrs: &[(&str, &str)],
        query: Option<&str>,
    ) -> io::Result<(Endpoint, Option<(&'s ObjectRef, u16, usize)>)> {
        let (ep, picked) = match service {
            Some((svc, port)) => {
                let input = HashInput {
                    headers: hdrs,
                    source_ip: Some(self.source_ip()),
                    query,
                };
                let picked = self.worker.balancers.borrow_mut().pick(
                    &self.view.l7,
                    svc,
                    *port,
                    &input,
                    Instant::now(),
                    &mut self.rng,
                );
                let (i, ep) = picked.ok_or_else(|| {
                    io::Error::other(format!("{}/{} has no endpoints", svc.namespace, svc.name))
                })?;
                (ep, Some((svc, *port, i)))
            }
            None => (
                pod_endpoint(snap, self.target)
                    .ok_or_else(|| io::Error::other("target pod left the model"))?,
                None,
            ),
        };
        Ok((ep, picked))
    }

    /// A new upstream stream to `authority`, the endpoint (workload `uid`): a CONNECT
    /// stream through `hbone` (the worker's pool), the endpoint proving its identity; or,
    /// to a workload outside the mesh (not captured: R1, R5), a connection of its own to
    /// `authority` ([`crate::plain`]), in TLS when the service's DestinationRule
    /// originates it.
    async fn open(
        &self,
        hbone: SocketAddr,
        authority: SocketAddr,
        uid: &str,
        h2: bool,
    ) -> io::Result<UpStream> {
        let workload = self
            .view
            .l7
            .mesh
            .as_ref()
            .and_then(|snap| snap.workload(uid))
            .ok_or_else(|| io::Error::other("endpoint left the model"))?;
        let w = &self.worker;
        // The service's DestinationRule `tcp.connectTimeout`, when set.
        let limit = self
            .current_breaker()
            .and_then(|b| b.limits.connect_timeout);
        if workload.captured() {
            // (An HBONE connection's setup is bounded by the h2 settings' handshake
            // timeout as well.)
            let mut req = ConnectRequest::new(authority);
            req.forwarded_for = Some(self.source_ip());
            let key = PoolKey {
                src: w.shared.settings.identity.clone(),
                dst: vec![workload.identity()],
                addr: hbone,
            };
            let open = async {
                w.pool
                    .open(&key, &self.cert, &req)
                    .await
                    .map(UpStream::Hbone)
                    .map_err(io::Error::other)
            };
            let r = connect_result(limit, race(open, connect_bound(limit)).await);
            if r.is_ok() {
                w.shared.counters.upstream_streams.fetch_add(1, Relaxed);
            }
            r
        } else {
            let tls = self.origination(h2)?;
            let opts = w.ctx.listen_options();
            // TCP connect and TLS handshake within `connectTimeout`, else Istio's default.
            let limit = Some(limit.unwrap_or(crate::plain::CONNECT_TIMEOUT));
            let open = async {
                crate::plain::PlainConn::connect(authority, opts, tls.as_ref())
                    .await
                    .map(|c| UpStream::Plain(Box::new(c)))
            };
            let r = connect_result(limit, race(open, connect_bound(limit)).await);
            if r.is_ok() {
                w.shared.counters.upstream_plain.fetch_add(1, Relaxed);
            }
            r
        }
    }

    /// Where the current try's connections to `ep` are kept and found: its HBONE address
    /// and authority, and outside the mesh its TLS origination ([`Self::origin_id`]).
    fn conn_key(&self, ep: &Endpoint) -> crate::upstream::ConnKey {
        let origin = if ep.plain { self.origin_id() } else { 0 };
        (ep.hbone, ep.authority, origin)
    }

    /// `key`'s idle streams for this tunnel's client: a stream's CONNECT names the client
    /// (`forwarded`), so it is kept for that client's requests only.
    fn idle_key(&self, key: crate::upstream::ConnKey) -> crate::upstream::IdleKey {
        (key.0, key.1, key.2, self.source_ip())
    }

    /// Which TLS origination the current request's connections outside the mesh use
    /// ([`crate::plain::TlsOrigin::id`]; 0: none): part of the key its kept upstream
    /// connections are found by, so that one made for another service's TLS (its SNI, its
    /// client certificate) is not reused.
    fn origin_id(&self) -> u64 {
        self.last
            .as_deref()
            .and_then(|(svc, _)| svc.as_ref())
            .and_then(|svc| self.view.l7.tls_origin(svc, self.port))
            .map_or(0, |o| o.id())
    }

    /// The TLS the current request's service (its DestinationRule `tls`, at its port)
    /// originates to endpoints outside the mesh, for HTTP/2 (`h2`: ALPN `h2`) or not; the
    /// SNI is the rule's `sni`, else the service's hostname.
    fn origination(&self, h2: bool) -> io::Result<Option<crate::plain::Origination>> {
        let Some(svc) = self.last.as_deref().and_then(|(svc, _)| svc.as_ref()) else {
            return Ok(None);
        };
        let Some(origin) = self.view.l7.tls_origin(svc, self.port) else {
            return Ok(None);
        };
        let host = service_host(self.view.l7.mesh.as_ref(), svc);
        origin.to(&host, h2).map(Some)
    }

    /// An opaque TCP tunnel (R15 at L4, then bytes to the chosen endpoint).
    async fn opaque(&mut self, mut down: H2Stream, ctx: &TunnelCtx, first: Bytes) {
        let started = Instant::now();
        let counters = self.worker.shared.counters.clone();
        // Under the snapshot current at the first bytes; re-checked at each reload after.
        let fresh = self.begin();
        let ctx = match &fresh {
            http1::Begin::Same => ctx,
            http1::Begin::New(_, c) => c,
            http1::Begin::Refused => {
                down.reset(h2::Reason::REFUSED_STREAM);
                return;
            }
        };
        let l7 = self.view.l7.clone();
        let (verdict, authorizer) = tcp_policy(&l7, ctx);
        if !verdict.allowed {
            counters.tcp_denied.fetch_add(1, Relaxed);
            tracing::debug!(target = %self.target, policy = ?verdict.policy, "opaque TCP tunnel denied (R15)");
            down.reset(h2::Reason::REFUSED_STREAM);
            return;
        }
        // A CUSTOM policy's gRPC authorizer, asked about the connection (Envoy's ext_authz
        // network filter: its source, destination and the client's identity).
        if let Some(p) = authorizer {
            let request = crate::ext_authz::tcp_check_request(p, ctx);
            let service = (p.service.clone(), p.port);
            let answer = Box::pin(self.side_exchange(&service, request, p.timeout, true)).await;
            let (verdict, outcome) = crate::ext_authz::verdict(p, &answer, true);
            self.note(http1::Note::ExtAuthz(outcome));
            if !matches!(verdict, crate::ext_authz::Verdict::Allow(_)) {
                counters.tcp_denied.fetch_add(1, Relaxed);
                tracing::debug!(target = %self.target, provider = %p.name, outcome, "opaque TCP tunnel denied by its external authorizer (R15)");
                down.reset(h2::Reason::REFUSED_STREAM);
                return;
            }
        }
        let Some(snap) = l7.mesh.as_ref() else {
            down.reset(h2::Reason::REFUSED_STREAM);
            return;
        };
        let svc = match &ctx.destination {
            http1::Destination::Service { service, port } => {
                // A TCPRoute sends the connection to one of its backends (GAMMA).
                match l7
                    .routes
                    .tcp_route(ctx.client_namespace.as_deref(), service, *port)
                {
                    None => Some((service.clone(), *port)),
                    Some(route) => match route.pick(&mut self.rng) {
                        Some(b) if b.permitted && l7.service_exists(&b.service) => {
                            Some((b.service.clone(), b.port))
                        }
                        picked => {
                            counters.upstream_errors.fetch_add(1, Relaxed);
                            tracing::debug!(target = %self.target, route = ?route.id, backend = ?picked.map(|b| &b.service), "opaque TCP: no valid TCPRoute backend");
                            down.reset(h2::Reason::REFUSED_STREAM);
                            return;
                        }
                    },
                }
            }
            http1::Destination::Workload { .. } => None,
        };
        // The service's `maxConnections` (circuit breaking): held while the tunnel lives.
        self.port = svc.as_ref().map(|(_, p)| *p);
        let breaker = svc.as_ref().and_then(|(s, p)| l7.breaker(s, Some(*p)));
        let taken = breaker.map(|b| b.connection_now(&self.worker.breakers.of(b)));
        let _slot = match taken.transpose() {
            Ok(slot) => slot,
            Err(o) => {
                counters.overflowed(&o);
                tracing::debug!(target = %self.target, error = %o, "opaque TCP tunnel refused");
                down.reset(h2::Reason::REFUSED_STREAM);
                return;
            }
        };
        let opened = match self.choose(snap, svc.as_ref(), &[], None) {
            Ok((ep, picked)) => {
                self.upstream_host = Some(ep.authority);
                // The service's `connectTimeout` applies to the new stream ([`Self::open`]).
                self.last = Some(Rc::new((
                    svc.as_ref().map(|s| s.0.clone()),
                    ep.workload_uid.clone(),
                )));
                let r = self
                    .open(ep.hbone, ep.authority, &ep.workload_uid, false)
                    .await;
                if let (Some((svc, port, i)), Err(_)) = (picked, &r) {
                    self.worker
                        .balancers
                        .borrow_mut()
                        .finish(svc, port, i, 503, Instant::now());
                } else if let Some((svc, port, i)) = picked {
                    self.worker
                        .balancers
                        .borrow_mut()
                        .finish(svc, port, i, 200, Instant::now());
                }
                r
            }
            Err(e) => Err(e),
        };
        let up = match opened {
            Ok(s) => s,
            Err(e) => {
                counters.upstream_errors.fetch_add(1, Relaxed);
                tracing::debug!(target = %self.target, error = %e, "opaque TCP: upstream failed");
                self.record_tcp("UF", 0, 0, started);
                down.reset(h2::Reason::CONNECT_ERROR);
                return;
            }
        };
        let rt = &self.worker.shared.settings.runtime;
        let revoked = Cell::new(false);
        let aborted = self.worker.ctx.aborted();
        let recheck = revoked_by_reload(
            self.worker.clone(),
            self.tunnel.clone(),
            self.view.version,
            |l7, ctx| tcp_verdict(l7, ctx).allowed,
        );
        let abort = async {
            if let Either::Right(()) = race(aborted, recheck).await {
                revoked.set(true);
            }
        };
        let out = up.splice(down, first, rt.forward.idle_timeout, abort).await;
        if revoked.get() {
            counters.tcp_revoked.fetch_add(1, Relaxed);
        }
        counters
            .tcp_bytes_sent
            .fetch_add(out.downstream_to_upstream, Relaxed);
        counters
            .tcp_bytes_received
            .fetch_add(out.upstream_to_downstream, Relaxed);
        // Istio's names, as the waypoint sees them: received from the client, sent to it.
        self.record_tcp(
            "-",
            out.downstream_to_upstream,
            out.upstream_to_downstream,
            started,
        );
        tracing::debug!(target = %self.target, sent = out.downstream_to_upstream, received = out.upstream_to_downstream, end = ?out.end, "opaque TCP tunnel ended");
    }

    /// One exchange with `ep`: on an idle stream kept from an earlier request of this
    /// client (on any tunnel of the worker) when there is one (retried once on a fresh
    /// stream if it yields no response byte), else on a new stream from the pool.
    async fn send(
        &mut self,
        ep: &Endpoint,
        request: Bytes,
        head_request: bool,
        close: bool,
        discard: bool,
    ) -> io::Result<Vec<u8>> {
        let idle_key = self.conn_key(ep);
        let kept = self.worker.idle.borrow_mut().take(
            &self.idle_key(idle_key),
            Instant::now(),
            Duration::MAX,
        );
        if let Some((mut s, uses)) = kept {
            let mut got = false;
            let r = match s.write_all(request.clone(), false).await {
                Ok(()) => read_response(&mut s, head_request, discard, &mut got).await,
                Err(e) => Err(e),
            };
            match r {
                Ok((resp, reusable)) => {
                    self.keep(idle_key, s, uses + 1, reusable && !close, Instant::now());
                    return Ok(resp);
                }
                Err(e) if got || e.kind() == io::ErrorKind::TimedOut => {
                    s.reset(h2::Reason::CANCEL);
                    return Err(e);
                }
                Err(e) => {
                    s.reset(h2::Reason::CANCEL);
                    tracing::debug!(error = %e, authority = %ep.authority, "idle upstream stream unusable; opening a new one");
                }
            }
        }
        let mut s = self
            .open(ep.hbone, ep.authority, &ep.workload_uid, false)
            .await?;
        s.write_all(request, false).await?;
        match read_response(&mut s, head_request, discard, &mut false).await {
            Ok((resp, reusable)) => {
                self.keep(idle_key, s, 1, reusable && !close, Instant::now());
                Ok(resp)
            }
            Err(e) => {
                s.reset(h2::Reason::CANCEL);
                Err(e)
            }
        }
    }

    /// Keep a stream whose response was fully read for the next request to the same
    /// endpoint from the same client (on any of the worker's tunnels); otherwise (or with
    /// too many kept) end it as a closed connection ([`crate::upstream::close_stream`]:
    /// a FIN at the pod; only a failed exchange resets its stream).
    fn keep(
        &mut self,
        key: crate::upstream::ConnKey,
        s: UpStream,
        uses: u32,
        reusable: bool,
        now: Instant,
    ) {
        // The service this request went to (its DestinationRule): its expiry, and the
        // requests a connection may carry (`maxRequestsPerConnection`).
        let service = self.last.as_deref().and_then(|(svc, _)| svc.as_ref());
        let spent = self.current_breaker().is_some_and(|b| {
            let max = b.limits.max_requests_per_connection;
            max > 0 && uses >= max
        });
        if reusable && !spent {
            let expiry = self.view.l7.idle_expiry(service, self.port);
            self.worker
                .idle
                .borrow_mut()
                .put(self.idle_key(key), s, uses, now, expiry);
        } else {
            s.close();
        }
    }
}

/// An upstream connect's bound, the service's `connectTimeout` (`limit`) when set, raced
/// after the connect in place (`race(open, connect_bound(limit))`: the connect's future held
/// once; an `async fn` taking it would hold it twice) and read by [`connect_result`].
fn connect_bound(limit: Option<Duration>) -> http1::Bound<'static> {
    http1::Bound::deadline(limit.map(|t| Instant::now() + t))
}

/// A connect raced with [`connect_bound`]`(limit)`: its result, or past the bound a
/// connect failure (503, `UF`), not a timeout of the request (504).
fn connect_result<T>(limit: Option<Duration>, raced: Either<io::Result<T>, ()>) -> io::Result<T> {
    match raced {
        Either::Left(r) => r,
        Either::Right(()) => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "upstream connect timeout ({:?}, connectTimeout)",
                limit.unwrap_or_default()
            ),
        )),
    }
}

/// The outcome of a try as outlier detection counts it: a try abandoned without a verdict
/// (a kept stream found closed) is neutral (200); a response whose body timed out or was
/// cut counts as the gateway error the client effectively got (504, 502), whatever its
/// status said.
fn outlier_verdict(status: u16, error: Option<io::ErrorKind>) -> u16 {
    match error {
        None if status == 0 => 200,
        Some(io::ErrorKind::TimedOut) if status < 500 => 504,
        Some(io::ErrorKind::UnexpectedEof) if status < 500 => 502,
        _ => status,
    }
}

fn status_of(resp: &[u8]) -> u16 {
    resp.get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A complete response, and whether the stream can carry another request. `got` is set
/// once any response byte arrived. (Timeouts are the route's, applied around the whole
/// exchange by [`HboneUpstream::exchange`].)
async fn read_response(
    s: &mut UpStream,
    head_request: bool,
    discard: bool,
    got: &mut bool,
) -> io::Result<(Vec<u8>, bool)> {
    if discard {
        discard_response(s, head_request, got).await
    } else {
        read_response_inner(s, head_request, got).await
    }
}

/// Read one response and throw its body away as it comes (a mirror's): memory stays at
/// one read whatever the body's size. Returns its status line alone (for the balancer)
/// and whether the stream can carry another request.
async fn discard_response(
    s: &mut UpStream,
    head_request: bool,
    got: &mut bool,
) -> io::Result<(Vec<u8>, bool)> {
    let mut ubuf = bytes::BytesMut::new();
    let mut h = http1::read_response_head(s, &mut ubuf, head_request, got).await?;
    h.spill(&mut ubuf);
    let status = format!("HTTP/1.1 {} \r\n\r\n", h.status).into_bytes();
    if h.status == 101 {
        return Ok((status, false));
    }
    bytes::Buf::advance(&mut ubuf, h.len);
    crate::body::copy::<UpStream, UpStream>(s, &mut ubuf, h.framing, None, false)
        .await
        .map_err(|e| io::Error::other(format!("mirrored response body: {e:?}")))?;
    let reusable = !h.close && h.framing != crate::body::Framing::Eof && ubuf.is_empty();
    Ok((status, reusable))
}

/// The largest upstream response buffered (head and body); a larger one fails the
/// exchange (`503`) instead of growing without bound.
pub const MAX_RESPONSE: usize = h2srv::MAX_BODY + http1::MAX_HEAD;

async fn read_more(s: &mut UpStream, buf: &mut Vec<u8>, got: &mut bool) -> io::Result<bool> {
    match s.read().await {
        Some(Ok(b)) => {
            *got = true;
            if buf.len() + b.len() > MAX_RESPONSE {
                return Err(io::Error::other("upstream response too large"));
            }
            buf.extend_from_slice(&b);
            Ok(true)
        }
        Some(Err(e)) => Err(e),
        None => Ok(false),
    }
}

/// One complete HTTP/1.1 response (head and body) from the stream.
async fn read_response_inner(
    s: &mut UpStream,
    head_request: bool,
    got: &mut bool,
) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    let (head_len, framing, server_close) = loop {
        let mut hs = [httparse::EMPTY_HEADER; 128];
        let mut r = httparse::Response::new(&mut hs);
        match r.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let code = r.code.unwrap_or(0);
                if (100..200).contains(&code) && code != 101 {
                    // Interim response: drop it, keep reading.
                    buf.drain(..n);
                    continue;
                }
                let header = |name: &str| {
                    r.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                };
                let framing = if head_request || code == 204 || code == 304 {
                    Framing::Length(0)
                } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                    Framing::Chunked
                } else if let Some(cl) = header("content-length") {
                    // More than can be buffered is refused here (and cannot overflow
                    // `head_len + n` below).
                    Framing::Length(
                        cl.trim()
                            .parse()
                            .ok()
                            .filter(|&n: &usize| n <= MAX_RESPONSE)
                            .ok_or_else(|| io::Error::other("bad upstream content-length"))?,
                    )
                } else {
                    Framing::Eof
                };
                let server_close =
                    code == 101 || header("connection").is_some_and(|v| v.contains("close"));
                break (n, framing, server_close);
            }
            Ok(httparse::Status::Partial) if buf.len() <= http1::MAX_HEAD => {
                if !read_more(s, &mut buf, got).await? {
                    return Err(io::Error::other("upstream closed before a response"));
                }
            }
            _ => return Err(io::Error::other("malformed upstream response head")),
        }
    };
    let mut reusable = !server_close;
    match framing {
        Framing::Length(n) => {
            while buf.len() < head_len + n {
                if !read_more(s, &mut buf, got).await? {
                    return Err(io::Error::other("upstream body truncated"));
                }
            }
            buf.truncate(head_len + n);
        }
        Framing::Chunked => loop {
            if let Some(end) = chunked_end(&buf[head_len..]) {
                buf.truncate(head_len + end);
                break;
            }
            if !read_more(s, &mut buf, got).await? {
                return Err(io::Error::other("upstream chunked body truncated"));
            }
        },
        Framing::Eof => {
            reusable = false;
            while read_more(s, &mut buf, got).await? {}
            // Delimit it for the downstream keep-alive connection.
            let body = buf.split_off(head_len);
            buf.truncate(head_len - 2);
            buf.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            buf.extend_from_slice(&body);
        }
    }
    Ok((buf, reusable))
}

enum Framing {
    Length(usize),
    Chunked,
    Eof,
}

/// The length of a complete chunked body at the start of `b`, if it is complete and well
/// formed (the strict scanner of [`crate::body::ChunkScan`]: a bare LF in a trailer is no
/// end).
pub fn chunked_end(b: &[u8]) -> Option<usize> {
    crate::body::ChunkScan::default().feed(b).ok().flatten()
}

/// Re-issue the certificate at half life; running connections keep theirs.
fn spawn_renewer(source: Arc<dyn CertSource>, id: Identity, certs: Publisher<Certs>) {
    let _ = std::thread::Builder::new()
        .name("cert-renew".into())
        .spawn(move || loop {
            let wait = certs
                .load()
                .cert
                .refresh_at()
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            std::thread::sleep(wait.max(Duration::from_secs(1)));
            match issue(source.as_ref(), &id) {
                Ok(set) => {
                    let v = certs.publish(set);
                    tracing::info!(version = v, "waypoint certificate renewed");
                }
                Err(e) => {
                    tracing::error!(error = %e, "certificate renewal failed; retrying in 10 s");
                    std::thread::sleep(Duration::from_secs(10));
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_output<F: FnOnce() -> T, T>(_: &F) -> usize {
        std::mem::size_of::<T>()
    }

    /// Stands for the arguments of a future that is named, never built.
    fn never<T>() -> T {
        panic!("the closures naming the futures are never called")
    }

    /// An idle HTTP/1.1 tunnel holds its serve loop's future (boxed, sized by its largest
    /// state): the request body's wait is boxed apart, the route's forward is held by
    /// reference (not also moved out of the decision), so the loop stays small; it was
    /// 2,608 bytes (test build) before. (The await of a CUSTOM policy's check, itself
    /// boxed, took it from 1,696 to 1,704.) The closure is never called; it only names the
    /// future's type.
    #[test]
    fn idle_http1_tunnel_future_stays_small() {
        let serve = || {
            let (t, c, x, u, r): (
                &'static mut H2Stream,
                &'static WaypointConfig,
                &'static http1::TunnelCtx,
                &'static mut HboneUpstream,
                &'static mut SplitMix64,
            ) = never();
            http1::serve_from(t, bytes::BytesMut::new(), c, x, u, r)
        };
        let size = size_of_output(&serve);
        assert!(size <= 1_712, "HTTP/1.1 serve future: {size} bytes");
    }

    /// The state of an HTTP/1.1 request in flight (the future `serve_from` boxes per
    /// forwarded request) fits glibc's per-thread cache of small chunks (requests up to
    /// 1,032 bytes): past it every request's box took malloc's slow path. It was 3,248
    /// bytes (bounded waits as nested `async fn`s, each holding what it waits for twice,
    /// and the response relay inline). Names the future's type only, as above.
    #[test]
    fn http1_request_future_fits_the_small_allocation_cache() {
        let request = || {
            let (t, b, u, f, h, r): (
                &'static mut H2Stream,
                &'static mut bytes::BytesMut,
                &'static mut HboneUpstream,
                &'static crate::route::Forward,
                &'static http1::RequestHead,
                &'static mut SplitMix64,
            ) = never();
            let body = http1::ReqBody::Buffered(Bytes::new());
            http1::forward_request(t, b, u, f, h, Bytes::new(), body, false, r, None)
        };
        let size = size_of_output(&request);
        assert!(size <= 1_032, "HTTP/1.1 request future: {size} bytes");
    }

    /// A response whose body timed out or was cut is a gateway error for outlier
    /// detection, not the success its status said; an abandoned kept stream is neutral.
    #[test]
    fn outlier_verdict_counts_body_failures_as_gateway_errors() {
        assert_eq!(outlier_verdict(200, Some(io::ErrorKind::TimedOut)), 504);
        assert_eq!(
            outlier_verdict(200, Some(io::ErrorKind::UnexpectedEof)),
            502
        );
        assert_eq!(outlier_verdict(503, Some(io::ErrorKind::TimedOut)), 503);
        assert_eq!(outlier_verdict(0, None), 200);
        assert_eq!(
            outlier_verdict(0, Some(io::ErrorKind::ConnectionRefused)),
            0
        );
        assert_eq!(outlier_verdict(404, None), 404);
    }
}
