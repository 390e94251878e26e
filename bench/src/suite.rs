//! Scenarios, paths and the run loop: paths interleaved within each repetition, a quiet check
//! before every run, proxy CPU and TCP retransmits over every measured window.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::backend::{BackendCounters, Backends};
use crate::generator::{self, GenResult, Live, Plan, Work};
use crate::host;
use crate::mesh::{self, Mesh};
use crate::proxy::{HboneSpec, Proxy, ProxySpec};
use crate::report::{fmt_figure, si, Latency, OpenLoop, Run, SATURATED};

/// A run whose window saw no progress at all (every byte still arrived, no error).
pub const NOTHING_MEASURED: &str = "nothing was measured in the window";

/// tcp-rr-open: an achieved rate below this fraction of the target flags the run saturated.
pub const OPEN_LOOP_MIN_FRACTION: f64 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Throughput,
    Rr,
    Churn,
    /// Open-loop request/response at a fixed rate (`tcp-rr-open`).
    RrOpen,
    /// HTTP/1.1 keep-alive requests, closed loop (`http1-rps`).
    Http1,
    /// HTTP/2 cleartext, concurrent streams on few connections (`http2-rps`).
    Http2,
    /// HTTP/1.1 with large bodies (`large-body`): Gbit/s of echoed bodies.
    LargeBody,
    /// Idle connections held open: proxy memory per connection (`idle-connections`).
    Idle,
    /// At once on one path: one bulk tcp stream, tcp-rr round trips on one connection and
    /// HTTP/1.1 requests (`mixed`): the rr and http latency under the bulk load.
    Mixed,
    /// HTTP/1.1 open loop at a fixed request rate over keep-alive connections, latency from
    /// each request's due time (`http1-open`).
    Http1Open,
    /// Idle HTTP/1.1 keep-alive connections (one request each) held open: proxy memory per
    /// connection (`idle-http`; the waypoint path, where each is a tunnel to the waypoint).
    IdleHttp,
    /// Connections whose reader stops reading while the writer keeps sending: proxy memory
    /// per connection once the path's buffers are full (`slow-reader`).
    SlowReader,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Throughput => "tcp-throughput",
            Kind::Rr => "tcp-rr",
            Kind::Churn => "conn-churn",
            Kind::RrOpen => "tcp-rr-open",
            Kind::Http1 => "http1-rps",
            Kind::Http2 => "http2-rps",
            Kind::LargeBody => "large-body",
            Kind::Idle => "idle-connections",
            Kind::Mixed => "mixed",
            Kind::Http1Open => "http1-open",
            Kind::IdleHttp => "idle-http",
            Kind::SlowReader => "slow-reader",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "tcp-throughput" | "throughput" => Some(Kind::Throughput),
            "tcp-rr" | "rr" => Some(Kind::Rr),
            "conn-churn" | "churn" => Some(Kind::Churn),
            "tcp-rr-open" | "rr-open" => Some(Kind::RrOpen),
            "http1-rps" | "http1" => Some(Kind::Http1),
            "http2-rps" | "http2" => Some(Kind::Http2),
            "large-body" => Some(Kind::LargeBody),
            "idle-connections" | "idle" => Some(Kind::Idle),
            "mixed" => Some(Kind::Mixed),
            "http1-open" | "http-open" => Some(Kind::Http1Open),
            "idle-http" => Some(Kind::IdleHttp),
            "slow-reader" | "slow" => Some(Kind::SlowReader),
            _ => None,
        }
    }
    pub fn metric(self) -> (&'static str, &'static str) {
        match self {
            Kind::Throughput | Kind::LargeBody => ("gbit_per_s", "Gbit/s"),
            Kind::Rr => ("round_trips_per_s", "1/s"),
            Kind::Churn => ("connections_per_s", "1/s"),
            Kind::RrOpen | Kind::Mixed | Kind::Http1Open => ("p99_latency_us", "µs"),
            Kind::Http1 | Kind::Http2 => ("requests_per_s", "1/s"),
            Kind::Idle | Kind::IdleHttp => ("bytes_per_idle_connection", "B"),
            Kind::SlowReader => ("bytes_per_slow_connection", "B"),
        }
    }
    /// Memory scenarios: one run per path holding many connections (no repetitions).
    pub fn is_memory(self) -> bool {
        matches!(self, Kind::Idle | Kind::IdleHttp | Kind::SlowReader)
    }
    /// Latency scenarios whose figure is a p99 of a fixed-rate schedule (or under a bulk
    /// load): they get [`Knobs::latency_duration`], long enough for enough samples.
    pub fn is_latency(self) -> bool {
        matches!(self, Kind::RrOpen | Kind::Http1Open | Kind::Mixed)
    }
    /// HTTP scenarios (the only ones the waypoint path, an L7 proxy, can carry).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Kind::Http1 | Kind::Http2 | Kind::LargeBody | Kind::Http1Open | Kind::IdleHttp
        )
    }
}

/// One scenario with its parameters.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub kind: Kind,
    /// Parallel connections (throughput, rr) or concurrent loops (churn).
    pub conns: usize,
    pub size: usize,
    pub write_size: usize,
    /// tcp-rr-open: requests/s over all connections (0 elsewhere).
    pub rate: f64,
    /// large-body: body bytes each way per request.
    pub body: usize,
    /// http2-rps: concurrent streams per connection.
    pub h2_streams: usize,
}

impl Scenario {
    pub fn variant(&self) -> String {
        match self.kind {
            Kind::Throughput => format!("streams={}", self.conns),
            Kind::Rr if self.conns == 1 => format!("size={}B", self.size),
            Kind::Rr => format!("size={}B streams={}", self.size, self.conns),
            Kind::Churn => format!("size={}B conc={}", self.size, self.conns),
            Kind::RrOpen if self.conns == 1 => format!("size={}B rate={}/s", self.size, self.rate),
            Kind::RrOpen => format!(
                "size={}B rate={}/s streams={}",
                self.size, self.rate, self.conns
            ),
            Kind::Http1 => format!("body={}B conns={}", self.size, self.conns),
            Kind::Http2 => format!(
                "body={}B conns={} streams={}",
                self.size, self.conns, self.h2_streams
            ),
            Kind::LargeBody => format!(
                "body={} conns={}",
                crate::report::bytes(self.body),
                self.conns
            ),
            Kind::Idle => format!("conns={}", self.conns),
            Kind::Mixed => format!("size={}B http-conns={}", self.size, self.conns),
            Kind::Http1Open => format!(
                "body={}B rate={}/s conns={}",
                self.size, self.rate, self.conns
            ),
            Kind::IdleHttp => format!("conns={}", self.conns),
            Kind::SlowReader => format!("conns={}", self.conns),
        }
    }
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind.name(), self.variant())
    }
    pub fn params(&self) -> Value {
        match self.kind {
            Kind::Throughput => json!({"streams": self.conns, "write_size": self.write_size}),
            Kind::Rr => json!({"streams": self.conns, "size": self.size}),
            Kind::Churn => json!({"concurrency": self.conns, "size": self.size}),
            Kind::RrOpen => {
                json!({"streams": self.conns, "size": self.size, "rate_per_s": self.rate})
            }
            Kind::Http1 => json!({"connections": self.conns, "response_body": self.size}),
            Kind::Http2 => {
                json!({"connections": self.conns, "streams_per_connection": self.h2_streams, "response_body": self.size})
            }
            Kind::LargeBody => json!({"connections": self.conns, "body": self.body}),
            Kind::Idle => json!({"connections": self.conns, "size": self.size}),
            Kind::Mixed => json!({"bulk_streams": 1, "write_size": self.write_size,
                                  "rr_connections": 1, "size": self.size,
                                  "http_connections": self.conns, "response_body": self.size}),
            Kind::Http1Open => json!({"connections": self.conns, "response_body": self.size,
                                      "rate_per_s": self.rate}),
            Kind::IdleHttp => json!({"connections": self.conns, "response_body": self.size}),
            Kind::SlowReader => json!({"connections": self.conns, "write_size": self.write_size,
                                       "socket_buffer": crate::generator::SLOW_SOCKET_BUFFER}),
        }
    }
    fn work(&self) -> Work {
        match self.kind {
            Kind::Throughput => Work::Throughput {
                write_size: self.write_size,
            },
            Kind::Rr | Kind::Mixed => Work::Rr { size: self.size },
            Kind::Churn => Work::Churn { size: self.size },
            Kind::RrOpen => Work::RrOpen {
                size: self.size,
                // Each connection's share of the rate.
                interval: Duration::from_secs_f64(self.conns as f64 / self.rate.max(1e-3)),
            },
            Kind::Http1 => Work::Http1 {
                req_body: 0,
                resp_body: self.size,
            },
            Kind::LargeBody => Work::Http1 {
                req_body: self.body,
                resp_body: self.body,
            },
            Kind::Idle => Work::Idle { size: self.size },
            Kind::Http2 => Work::Http2 {
                streams: self.h2_streams,
                resp_body: self.size,
            },
            // The interval of one generator thread's schedule: `run_one` scales it by the
            // number of threads sharing the rate.
            Kind::Http1Open => Work::Http1Open {
                resp_body: self.size,
                interval: Duration::from_secs_f64(1.0 / self.rate.max(1e-3)),
            },
            Kind::IdleHttp => Work::IdleHttp {
                resp_body: self.size,
            },
            Kind::SlowReader => Work::SlowReader {
                write_size: self.write_size.min(64 * 1024),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Direct,
    /// Mesh: captured client → ztunnel A → plain TCP → pod outside the mesh.
    L4,
    /// Mesh: ztunnel A → HBONE → ztunnel B.
    Hbone,
    /// Mesh: ztunnel A → HBONE → waypoint → HBONE → ztunnel B.
    Waypoint,
    /// Loopback: the runtime's forwarder, copy mode.
    L4Copy,
    /// Loopback: the runtime's forwarder, splice mode.
    L4Splice,
    /// Loopback: two `hbone::proxy` processes.
    HboneProxy,
    /// Two `hbone::proxy` processes with the pool off: a new TLS connection (handshake) per
    /// stream (mesh: outbound in `plain-client`, inbound in `plain`; loopback: both here).
    HboneCold,
    /// An external proxy (`--peer`), see [`crate::peer`].
    Peer(&'static str),
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::L4 => "l4",
            PathKind::Hbone => "hbone",
            PathKind::Waypoint => "waypoint",
            PathKind::L4Copy => "l4-copy",
            PathKind::L4Splice => "l4-splice",
            PathKind::HboneProxy => "hbone-proxy",
            PathKind::HboneCold => "hbone-cold",
            PathKind::Peer(n) => n,
        }
    }
    pub fn parse(s: &str) -> Option<PathKind> {
        match s {
            "direct" => Some(PathKind::Direct),
            "l4" => Some(PathKind::L4),
            "hbone" => Some(PathKind::Hbone),
            "waypoint" => Some(PathKind::Waypoint),
            "l4-copy" | "copy" => Some(PathKind::L4Copy),
            "l4-splice" | "splice" => Some(PathKind::L4Splice),
            "hbone-proxy" => Some(PathKind::HboneProxy),
            "hbone-cold" => Some(PathKind::HboneCold),
            _ => None,
        }
    }
    /// Runs over the mesh topology only (`direct` and `hbone-cold` run on both; the others
    /// on loopback, with their own proxies per run).
    pub fn is_mesh(self) -> bool {
        matches!(
            self,
            PathKind::L4 | PathKind::Hbone | PathKind::Waypoint | PathKind::Peer(_)
        )
    }
    fn mode(self) -> Option<&'static str> {
        match self {
            PathKind::L4Copy => Some("copy"),
            PathKind::L4Splice => Some("splice"),
            _ => None,
        }
    }
    /// Can this path carry this scenario? (The waypoint is an HTTP proxy; idle
    /// connections measure a proxy's memory, so `direct` has nothing to measure.)
    pub fn carries(self, k: Kind) -> bool {
        // idle-http holds one backend connection per client connection unless the proxy
        // pools its upstream connections (the waypoint, nginx): over l4 or hbone the harness
        // would hold two descriptors per connection, as idle-connections does.
        if k == Kind::IdleHttp {
            return matches!(self, PathKind::Waypoint | PathKind::Peer(_));
        }
        match self {
            PathKind::Waypoint => k.is_http(),
            PathKind::Direct => !k.is_memory(),
            // Handshakes per second: one connection per exchange.
            PathKind::HboneCold => k == Kind::Churn,
            // The configs in bench/peers/ serve HTTP/1.1 only (and forward one port per
            // scenario: mixed needs three through one path).
            // (and have no slow-reader port).
            PathKind::Peer(_) => !matches!(k, Kind::Http2 | Kind::Mixed | Kind::SlowReader),
            // One upstream per proxy: mixed needs three (sink, echo, http).
            PathKind::L4Copy | PathKind::L4Splice | PathKind::HboneProxy => k != Kind::Mixed,
            _ => true,
        }
    }
}

/// TCP retransmits where the run's traffic flows: every mesh namespace, or this one.
fn retrans_segs(topo: &Topo<'_>) -> Option<u64> {
    match topo {
        Topo::Mesh { mesh, .. } => mesh.tcp_retrans_segs(),
        Topo::Loopback(_) => host::tcp_retrans_segs(),
    }
}

/// Where everything runs.
#[derive(Debug, Clone)]
pub struct Placement {
    pub pin: bool,
    pub gen_cores: Vec<usize>,
    pub proxy_cores: Vec<usize>,
    /// Generator (and backend) threads.
    pub gen_threads: usize,
    pub proxy_workers: usize,
    pub note: Option<String>,
}

impl Placement {
    pub fn decide(pin: bool) -> Placement {
        let mut ids: Vec<usize> = core_affinity::get_core_ids()
            .map(|v| v.into_iter().map(|c| c.id).collect())
            .unwrap_or_default();
        ids.sort_unstable();
        if ids.len() < 2 {
            return Placement {
                pin: false,
                gen_cores: vec![],
                proxy_cores: vec![],
                gen_threads: 1,
                proxy_workers: 1,
                note: Some(format!(
                    "only {} CPU(s) usable: generator, backend and proxy share them unpinned",
                    ids.len()
                )),
            };
        }
        // Generator + backends get the larger half: the client saturates first.
        let gen_n = ids.len().div_ceil(2);
        let (g, p) = ids.split_at(gen_n);
        Placement {
            pin,
            gen_cores: g.to_vec(),
            proxy_cores: p.to_vec(),
            gen_threads: g.len(),
            proxy_workers: p.len(),
            note: if pin {
                None
            } else {
                Some("--no-pin: nothing pinned; thread counts as with pinning".into())
            },
        }
    }
    /// The core of generator/backend thread `i` (None when unpinned).
    pub fn gen_core(&self, i: usize) -> Option<usize> {
        (self.pin && !self.gen_cores.is_empty()).then(|| self.gen_cores[i % self.gen_cores.len()])
    }
}

/// Suite-wide knobs.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Measured window of a run.
    pub duration: Duration,
    /// Measured window of a latency run ([`Kind::is_latency`]).
    pub latency_duration: Duration,
    pub warmup: Duration,
    pub reps: usize,
    pub quiet_threshold_pct: f64,
    pub quiet_sample: Duration,
    /// Total time the suite may spend waiting for the machine to become quiet.
    pub quiet_wait_budget: Duration,
    /// Re-runs of runs disturbed by outside load, suite-wide.
    pub max_retries: usize,
    pub io_driver: String,
    /// More fields on every HTTP request (`--header`).
    pub headers: Arc<[(String, String)]>,
}

/// The mesh's backends: one set per server pod.
pub struct MeshBackends {
    /// In `plain` (not captured; `direct` and `l4`).
    pub plain: Backends,
    /// In `echo` (captured; `hbone`).
    pub echo: Backends,
    /// In `echo-v1` (captured; where the waypoint's route sends `echo`'s requests).
    pub echo_v1: Backends,
}

/// Where the load goes.
pub enum Topo<'a> {
    /// Generator, backends and per-run proxies on 127.0.0.1 in this namespace.
    Loopback(&'a Backends),
    /// The mesh of [`crate::mesh`]: generator in a client pod, backends in server pods.
    Mesh {
        mesh: &'a mut Mesh,
        be: &'a MeshBackends,
    },
}

/// Shared state of a suite invocation.
pub struct Ctx<'a> {
    pub knobs: &'a Knobs,
    /// Running `--peer` proxies (mesh only).
    pub peers: &'a mut [crate::peer::Peer],
    pub placement: &'a Placement,
    pub topo: Topo<'a>,
    pub counters: Arc<BackendCounters>,
    pub decision: &'a runtime::driver::DriverDecision,
    pub cores: usize,
    pub clk_tck: u64,
    pub tmp: &'a Path,
    pub interrupted: Arc<AtomicBool>,
    pub tty: bool,
    pub quiet_waited: Duration,
    pub retries_left: usize,
    /// Proxies whose RSS an earlier memory scenario of this invocation already grew.
    pub memory_pids: Vec<u32>,
    pub total_runs: usize,
    /// Runs started, including re-runs (the `seq` of the next run).
    pub seq: usize,
    /// Planned runs started (progress counter; re-runs do not advance it).
    pub planned_done: usize,
    /// Memory runs sized or skipped to fit the descriptor limits ([`fit_memory_runs`],
    /// fitted again just before each run).
    pub sizing: Vec<(String, &'static str, crate::fds::Sizing)>,
    /// Descriptors the harness held when the suite started.
    pub fd_baseline: u64,
    /// Where the suite's time went.
    pub phases: crate::phases::Phases,
}

/// The run was interrupted (Ctrl-C): stop the suite.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}
impl std::error::Error for Interrupted {}

/// Run the whole suite; runs are appended to `runs` as they finish (so an interrupted suite
/// still reports what it measured).
pub fn run_suite(
    ctx: &mut Ctx<'_>,
    scenarios: &[Scenario],
    paths: &[PathKind],
    runs: &mut Vec<Run>,
) -> Result<(), Interrupted> {
    // The peers' memory runs come after all of ours: a peer that pools its upstream
    // connections keeps backend sockets of the harness open for a while after its run.
    let memory = |sc: &Scenario, path: PathKind| sc.kind.is_memory() && path.carries(sc.kind);
    let peers_memory: Vec<(&Scenario, PathKind)> = scenarios
        .iter()
        .flat_map(|sc| paths.iter().map(move |p| (sc, *p)))
        .filter(|(sc, p)| memory(sc, *p) && matches!(p, PathKind::Peer(_)))
        .collect();
    let mut plan: Vec<(&Scenario, usize, PathKind)> = Vec::new();
    for sc in scenarios {
        for rep in 1..=ctx.knobs.reps {
            for &path in paths {
                // Memory: one run per path (it holds thousands of sockets and its figure,
                // memory, does not vary like a rate).
                if !path.carries(sc.kind) || (sc.kind.is_memory() && rep > 1) {
                    continue;
                }
                if !(memory(sc, path) && matches!(path, PathKind::Peer(_))) {
                    plan.push((sc, rep, path));
                }
            }
        }
    }
    plan.extend(peers_memory.iter().map(|(sc, p)| (*sc, 1, *p)));
    for (sc, rep, path) in plan {
        let t_fit = Instant::now();
        let sizing = if sc.kind.is_memory() {
            let z = refit(ctx, sc, path)?;
            ctx.phases.lap("descriptor settle", t_fit);
            z
        } else {
            None
        };
        if let Some(z) = sizing.as_ref().filter(|z| z.skipped) {
            ctx.seq += 1;
            ctx.planned_done += 1;
            let mut run = blank_run(ctx.seq, sc, path, rep, 1);
            eprintln!(
                "[{:>2}/{}] {:<34} {:<9} {}",
                ctx.planned_done,
                ctx.total_runs,
                sc.id(),
                path.name(),
                z.reason
            );
            run.notes.push(z.reason.clone());
            run.sizing = Some(z.clone());
            runs.push(run);
            continue;
        }
        // A sized run holds fewer connections; it stays this scenario's row.
        let sized;
        let this = match &sizing {
            Some(z) => {
                sized = Scenario {
                    conns: z.connections,
                    ..sc.clone()
                };
                &sized
            }
            None => sc,
        };
        let mut attempt = 1;
        loop {
            let mut run = run_one(ctx, this, path, rep, attempt, QuietCheck::WarmUp)?;
            if run.busy_warmup {
                // Not a run: the same one again, once the machine is quiet.
                ctx.seq -= 1;
                if attempt == 1 {
                    ctx.planned_done -= 1;
                }
                run = run_one(ctx, this, path, rep, attempt, QuietCheck::First)?;
            }
            if let Some(z) = &sizing {
                run.id = sc.id();
                run.variant = sc.variant();
                run.notes.push(z.reason.clone());
                run.sizing = Some(z.clone());
            }
            // Starved: other processes took the CPUs for the whole window, yet
            // every byte arrived and nothing failed: outside load, not a failure
            // of the path; run it again like any disturbed run.
            let starved = run.failed.as_deref() == Some(NOTHING_MEASURED)
                && run.errors == 0
                && run.backend_errors == 0
                && run.bytes_sent == run.bytes_received;
            let retry = run.disturbed && (!run.is_failure() || starved) && ctx.retries_left > 0;
            runs.push(run);
            if !retry {
                break;
            }
            ctx.retries_left -= 1;
            runs.last_mut().expect("just pushed").superseded = true;
            eprintln!("         outside load during that run: running it again");
            attempt += 1;
        }
    }
    Ok(())
}

/// Fit every memory scenario × path to the descriptor limits of the processes it crosses
/// (see [`crate::fds`]); called once the mesh and the peers run, before the suite starts.
/// Returns the runs to size or skip.
pub fn fit_memory_runs(
    ctx: &Ctx<'_>,
    scenarios: &[Scenario],
    paths: &[PathKind],
) -> Vec<(String, &'static str, crate::fds::Sizing)> {
    let mut out = Vec::new();
    for sc in scenarios.iter().filter(|s| s.kind.is_memory()) {
        for &path in paths.iter().filter(|p| p.carries(sc.kind)) {
            if let Some(z) = fit_one(ctx, sc, path) {
                out.push((sc.id(), path.name(), z));
            }
        }
    }
    out
}

/// [`fit_memory_runs`] for one scenario × path, with the descriptors held now.
fn fit_one(ctx: &Ctx<'_>, sc: &Scenario, path: PathKind) -> Option<crate::fds::Sizing> {
    use crate::fds;
    // The harness: generator and backend sockets (idle-http: the backends only, the
    // clients being in a child process under the same limit, one each).
    let mut holders = vec![fds::harness(
        "the harness",
        if sc.kind == Kind::IdleHttp { 1 } else { 2 },
    )];
    if sc.kind == Kind::IdleHttp {
        let mut child = fds::harness("the idle-client process", 1);
        child.open = 3;
        holders.push(child);
    }
    let mut maxconn = None;
    match (&ctx.topo, path) {
        (_, PathKind::Peer(name)) => {
            if let Some(p) = ctx.peers.iter().find(|p| p.spec.name == name) {
                // One hop: the client's socket and its upstream socket.
                holders.extend(p.holder(2));
                maxconn = p.spec.maxconn.map(|n| fds::MaxConn {
                    name: name.to_string(),
                    maxconn: n,
                });
            }
        }
        (Topo::Mesh { mesh, .. }, _) => {
            let per_conn: &[(&str, u64)] = match path {
                PathKind::L4 => &[("ztunnel A", 2)],
                PathKind::Hbone => &[("ztunnel A", 1), ("ztunnel B", 1)],
                PathKind::Waypoint => &[("ztunnel A", 1), ("waypoint", 0), ("ztunnel B", 1)],
                _ => &[],
            };
            for (pid, (name, n)) in mesh.pids(path.name()).into_iter().zip(per_conn) {
                holders.extend(fds::process(name, pid, *n));
            }
        }
        // Legacy paths start their proxies per run, under the harness's limit (and
        // the forwarder raises its own): the harness binds.
        (Topo::Loopback(_), _) => {}
    }
    fds::fit(sc.conns, &holders, maxconn.as_ref())
}

/// Before a memory run: wait (at most [`FD_SETTLE`]) until the harness's descriptors have
/// settled ([`crate::fds::Settle`]: back to what it held when the suite started, within
/// [`crate::fds::MARGIN`], or no longer falling with the run's fit unchanged — a peer that
/// pools its upstream connections, HAProxy's `http-reuse`, nginx's `keepalive`, keeps up to
/// its pool's size of backend sockets here open for as long as its idle timeout, 60 s for
/// nginx), then fit the run again with what is held now. Returns the sizing to use, said
/// when it differs from the one announced at the start.
fn refit(
    ctx: &mut Ctx<'_>,
    sc: &Scenario,
    path: PathKind,
) -> Result<Option<crate::fds::Sizing>, Interrupted> {
    let deadline = Instant::now() + FD_SETTLE;
    let held = || crate::fds::open_fds("self").unwrap_or(0);
    let id = sc.id();
    let slot = ctx
        .sizing
        .iter()
        .position(|(i, p, _)| *i == id && *p == path.name());
    let before = slot.map(|i| ctx.sizing[i].2.clone());
    // What a fit decides (the counts in its reason may move with what is held). (A peer's
    // run right after another's timed out its upstream connects even after this wait: the
    // other peer's TIME_WAIT sockets in the peer pod did, see `crate::peer::tune_pod`.)
    let decides = |z: &Option<crate::fds::Sizing>| z.as_ref().map(|z| (z.connections, z.skipped));
    let mut settle = crate::fds::Settle::new(ctx.fd_baseline, held(), Instant::now());
    while !settle.settled(held(), Instant::now(), || {
        decides(&fit_one(ctx, sc, path)) == decides(&before)
    }) && Instant::now() < deadline
    {
        if ctx.interrupted.load(Ordering::Relaxed) {
            return Err(Interrupted);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let fresh = fit_one(ctx, sc, path);
    if fresh != before {
        eprintln!(
            "bench: {id} × {path}: fitted again (the harness holds {} descriptors, {} at the \
             start): {}",
            held(),
            ctx.fd_baseline,
            fresh
                .as_ref()
                .map_or("fits".to_string(), |z| z.reason.clone()),
            path = path.name()
        );
        match (slot, &fresh) {
            (Some(i), Some(z)) => ctx.sizing[i].2 = z.clone(),
            (Some(i), None) => {
                ctx.sizing.remove(i);
            }
            (None, Some(z)) => ctx.sizing.push((id, path.name(), z.clone())),
            (None, None) => {}
        }
    }
    Ok(fresh)
}

/// How long a memory run waits at most for the harness's descriptors to settle.
pub const FD_SETTLE: Duration = Duration::from_secs(20);

/// A run before anything was measured.
pub fn blank_run(seq: usize, sc: &Scenario, path: PathKind, rep: usize, attempt: usize) -> Run {
    Run {
        seq,
        scenario: sc.kind.name().into(),
        variant: sc.variant(),
        id: sc.id(),
        path: path.name().into(),
        rep,
        attempt,
        superseded: false,
        window_s: 0.0,
        figure: 0.0,
        gbit_per_s: None,
        round_trips_per_s: None,
        connections_per_s: None,
        open_loop: None,
        mixed: None,
        requests_per_s: None,
        idle: None,
        window_bytes: 0,
        ops_window: 0,
        latency_us: None,
        bytes_sent: 0,
        bytes_received: 0,
        errors: 0,
        backend_errors: 0,
        error_samples: vec![],
        proxy_pid: None,
        proxy_driver: None,
        proxy_cpu_s: None,
        proxy_cpu_pct: None,
        proxy_cpu_s_per_gb: None,
        proxy_cpu_us_per_op: None,
        proxy_cpu_by_process: vec![],
        proxy_exit: None,
        generator_cpu_pct: 0.0,
        backend_cpu_pct: 0.0,
        tcp_retransmits: None,
        pre_busy_pct: None,
        pre_steal_pct: None,
        quiet: true,
        other_procs_cpu_pct: 0.0,
        other_procs_top: None,
        disturbed: false,
        busy_warmup: false,
        sizing: None,
        notes: vec![],
        failed: None,
    }
}

/// Sleep until `until`, in slices, showing progress; stop early on Ctrl-C.
fn wait_until(ctx: &Ctx<'_>, until: Instant, mut tick: impl FnMut()) -> Result<(), Interrupted> {
    loop {
        if ctx.interrupted.load(Ordering::Relaxed) {
            return Err(Interrupted);
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        std::thread::sleep((until - now).min(Duration::from_millis(100)));
        tick();
    }
}

struct Snap {
    at: Instant,
    /// The path's proxies' CPU ticks together (None: one could not be read)…
    proxy_ticks: Option<u64>,
    /// …and each one's, in the order of `pids`.
    proc_ticks: Vec<Option<u64>>,
    gen_ticks: u64,
    be_ticks: u64,
    sink: u64,
    others: std::collections::HashMap<u32, u64>,
}

/// Memory scenarios: how long opening every connection may take.
pub const OPEN_BOUND: Duration = Duration::from_secs(90);

/// The note (and flag) of a memory figure taken on a proxy an earlier memory scenario grew.
pub const LOWER_BOUND: &str = "lower bound";

/// slow-reader: the bytes written must hold still this long before the RSS is read.
pub const SLOW_SETTLE: Duration = Duration::from_secs(1);

/// Releases the stall backends when dropped (also on an early return), so the slow-reader
/// clients' writes complete and every byte is counted.
struct ReleaseStalled(Arc<BackendCounters>);

impl ReleaseStalled {
    fn now(&mut self) {
        self.0.release_stalled.store(true, Ordering::Relaxed);
    }
}

impl Drop for ReleaseStalled {
    fn drop(&mut self) {
        self.now();
    }
}

/// The path's proxy CPU split per process: the same two samples of each pid as the sum
/// (`a`, `b`: ticks in the order of `names`), grouped by name (a peer's processes are one)
/// in path order, turned into figures by `figures` (CPU-seconds → s, %, per GB, per op).
fn cpu_by_process(
    names: &[String],
    a: &[Option<u64>],
    b: &[Option<u64>],
    tck: f64,
    figures: impl Fn(f64) -> (f64, f64, Option<f64>, Option<f64>),
) -> Vec<crate::report::ProcCpu> {
    let mut out: Vec<(String, Option<u64>)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ticks = match (a.get(i), b.get(i)) {
            (Some(Some(x)), Some(Some(y))) => Some(y.saturating_sub(*x)),
            _ => None,
        };
        match out.iter_mut().find(|(n, _)| n == name) {
            Some((_, t)) => *t = t.zip(ticks).map(|(s, t)| s + t),
            None => out.push((name.clone(), ticks)),
        }
    }
    out.into_iter()
        .map(|(name, ticks)| {
            let f = ticks.map(|t| figures(t as f64 / tck));
            crate::report::ProcCpu {
                name,
                cpu_s: f.map(|f| f.0),
                cpu_pct: f.map(|f| f.1),
                cpu_s_per_gb: f.and_then(|f| f.2),
                cpu_us_per_op: f.and_then(|f| f.3),
            }
        })
        .collect()
}

/// A proxy process's name in the report: `forwarder`, `hbone-in`, `hbone-out`.
fn proc_name(started_as: &str) -> String {
    match started_as {
        "hbone inbound proxy" => "hbone-in".into(),
        "hbone outbound proxy" => "hbone-out".into(),
        n => n.replace(' ', "-"),
    }
}

/// `pids`: every proxy process of the path (none on `direct`, two on `hbone`); their CPU
/// is summed. Every other proxy of the mesh is excluded from "other processes".
/// Our own processes, not counted as outside load: the harness, the path's proxies
/// (`pids`: a peer's or a run's own) and every proxy of the mesh.
fn exclude(ctx: &Ctx<'_>, pids: &[u32]) -> Vec<u32> {
    let mut exclude = vec![std::process::id()];
    exclude.extend(pids.iter().copied());
    if let Topo::Mesh { mesh, .. } = &ctx.topo {
        exclude.extend(mesh.pids("waypoint"));
    }
    exclude
}

fn snap(ctx: &Ctx<'_>, pids: &[u32]) -> Snap {
    let exclude = exclude(ctx, pids);
    // The cheap, time-critical readings first.
    let at = Instant::now();
    let proc_ticks: Vec<Option<u64>> = pids.iter().map(|p| host::proc_cpu_ticks(*p)).collect();
    let proxy_ticks = if pids.is_empty() {
        None
    } else {
        proc_ticks.iter().copied().sum::<Option<u64>>()
    };
    let sink = ctx
        .counters
        .sink_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    Snap {
        at,
        proxy_ticks,
        proc_ticks,
        gen_ticks: host::thread_cpu_ticks("bench-gen"),
        be_ticks: host::thread_cpu_ticks("bench-be"),
        sink,
        others: host::other_process_ticks(&exclude),
    }
}

/// How a run checks that the machine is quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuietCheck {
    /// Over the warm-up: the other processes' CPU (as [`Run::disturbed`] over the window;
    /// the harness, the proxies and any peer excluded). A busy warm-up ends the attempt
    /// (returned with [`Run::busy_warmup`]) so that it starts again after [`QuietCheck::First`].
    WarmUp,
    /// Before anything starts: `/proc/stat` busy CPU outside the harness over
    /// [`Knobs::quiet_sample`], waiting (within the suite's budget) while it is not quiet.
    /// Memory runs (no warm-up) and the second start of a run whose warm-up was busy.
    First,
}

fn run_one(
    ctx: &mut Ctx<'_>,
    sc: &Scenario,
    path: PathKind,
    rep: usize,
    attempt: usize,
    check: QuietCheck,
) -> Result<Run, Interrupted> {
    ctx.seq += 1;
    if attempt == 1 {
        ctx.planned_done += 1;
    }
    let k = ctx.knobs.clone();
    let label = format!(
        "[{:>2}/{}] {:<34} {:<9} rep {}/{}{}",
        ctx.planned_done,
        ctx.total_runs,
        sc.id(),
        path.name(),
        rep,
        if sc.kind.is_memory() { 1 } else { k.reps },
        if attempt > 1 {
            format!(" (attempt {attempt})")
        } else {
            String::new()
        }
    );
    let mut run = blank_run(ctx.seq, sc, path, rep, attempt);
    let t_quiet = Instant::now();

    // 1. Is the machine quiet? Wait (within the suite's budget) while it is not. (Runs with a
    //    warm-up check over it instead, see below.)
    // A warm-up shorter than the quiet sample is too short to judge (one 10 ms tick of any
    // process would read as a busy CPU): check before the run instead.
    let check = if sc.kind.is_memory() || k.warmup < k.quiet_sample {
        QuietCheck::First
    } else {
        check
    };
    if check == QuietCheck::First {
        loop {
            if ctx.interrupted.load(Ordering::Relaxed) {
                return Err(Interrupted);
            }
            let b = host::sample_busy(k.quiet_sample, ctx.cores, ctx.clk_tck);
            run.pre_busy_pct = b.as_ref().map(|b| crate::report::r(b.outside_pct));
            run.pre_steal_pct = b.as_ref().map(|b| crate::report::r(b.steal_pct));
            run.quiet = b
                .as_ref()
                .is_none_or(|b| b.outside_pct <= k.quiet_threshold_pct);
            if run.quiet || ctx.quiet_waited >= k.quiet_wait_budget {
                break;
            }
            eprintln!(
                "         machine busy ({:.0}% of a CPU outside the harness; busiest process: {}): waiting",
                b.as_ref().map(|b| b.outside_pct).unwrap_or(0.0),
                b.as_ref()
                    .and_then(|b| b.top.clone())
                    .unwrap_or_else(|| "none (kernel work)".into())
            );
            let w = Duration::from_millis(700);
            std::thread::sleep(w);
            ctx.quiet_waited += w + k.quiet_sample;
        }
    }
    if !run.quiet {
        run.notes.push(format!(
            "machine not quiet before the run: {:.0}% of a CPU busy outside the harness (waited {:.1}s of the suite's budget)",
            run.pre_busy_pct.unwrap_or(0.0),
            ctx.quiet_waited.as_secs_f64()
        ));
    }

    let t_start = ctx.phases.lap("quiet checks", t_quiet);

    // 2. Where to connect from and to, and the proxy, if this path has one.
    let pick = |be: &Backends| -> SocketAddr {
        match sc.kind {
            Kind::Throughput => be.sink,
            Kind::Rr | Kind::RrOpen | Kind::Idle | Kind::Mixed => be.echo,
            Kind::Churn => be.reply_close,
            Kind::Http1 | Kind::LargeBody | Kind::Http1Open | Kind::IdleHttp => be.http,
            Kind::Http2 => be.h2,
            Kind::SlowReader => be.stall,
        }
    };
    let mut proxies: Vec<Proxy> = Vec::new();
    let mut pids: Vec<u32> = Vec::new();
    // The report's name of each of `pids` (a peer's processes all carry the peer's name).
    let mut names: Vec<String> = Vec::new();
    let mut netns: Option<String> = None;
    let mut socks: Option<generator::Socks> = None;
    let mut host_header = "echo".to_string();
    let target = match &mut ctx.topo {
        Topo::Mesh { mesh, be } if path == PathKind::HboneCold => {
            let plain = mesh.layout.ip("plain");
            let lo = mesh.layout.is_loopback();
            let spec = HboneSpec {
                backend: pick(&be.plain),
                core: if ctx.placement.pin {
                    ctx.placement.proxy_cores.first().copied()
                } else {
                    None
                },
                io_driver: k.io_driver.clone(),
                ca_dir: mesh.dir.join("ca"),
                pool: false,
                netns: (!lo).then(|| (mesh.ns("plain"), mesh.ns("plain-client"), plain.into())),
                h2: Some(mesh.h2.clone()),
            };
            if !lo {
                netns = Some(mesh.ns("plain-client"));
            }
            match Proxy::start_hbone(&spec, ctx.tmp, &format!("{}", ctx.seq)) {
                Ok(ps) => {
                    let last = ps.last().expect("two proxies");
                    run.proxy_pid = Some(last.pid);
                    run.proxy_driver = Some(last.driver.clone());
                    run.notes.push(
                        "hbone-cold: hbone::proxy outbound (plain-client) → inbound (plain), \
                         pool off: one TLS handshake per connection; proxy CPU is both"
                            .into(),
                    );
                    let t = last.listen;
                    pids = ps.iter().map(|p| p.pid).collect();
                    names = ps.iter().map(|p| proc_name(&p.name)).collect();
                    proxies = ps;
                    t
                }
                Err(e) => {
                    run.failed = Some(format!("starting the hbone-cold proxies: {e:#}"));
                    eprintln!("{label}  FAILED: {}", run.failed.as_deref().unwrap_or(""));
                    return Ok(run);
                }
            }
        }
        Topo::Mesh { mesh, .. } if matches!(path, PathKind::Peer(_)) => {
            let Some(peer) = ctx
                .peers
                .iter_mut()
                .find(|p| PathKind::Peer(p.spec.name) == path)
            else {
                run.failed = Some(format!("peer {} is not running", path.name()));
                return Ok(run);
            };
            if !peer.alive() {
                run.failed = Some(format!(
                    "peer {} exited; its output: {}",
                    path.name(),
                    peer.log.display()
                ));
                eprintln!("{label}  FAILED: {}", run.failed.as_deref().unwrap_or(""));
                return Ok(run);
            }
            netns = Some(mesh.ns("plain-client"));
            pids = peer.pids();
            names = vec![path.name().to_string(); pids.len()];
            run.proxy_pid = Some(peer.pgid);
            run.notes.push(format!(
                "peer {}: plain-client → peer pod → plain; proxy CPU over its process group \
                 ({} process(es))",
                path.name(),
                pids.len()
            ));
            peer.spec.target(sc.kind)
        }
        Topo::Mesh { mesh, be } => {
            let (client, t) = match path {
                PathKind::Direct => ("plain-client", pick(&be.plain)),
                PathKind::L4 => ("client", pick(&be.plain)),
                PathKind::Hbone => ("client", pick(&be.echo)),
                PathKind::Waypoint if sc.kind == Kind::Http2 => {
                    host_header = "echo-h2.bench.svc.cluster.local".into();
                    (
                        "client",
                        SocketAddr::new(mesh::ECHO_H2_VIP.into(), mesh::SERVICE_PORT),
                    )
                }
                PathKind::Waypoint => {
                    host_header = "echo.bench.svc.cluster.local".into();
                    (
                        "client",
                        SocketAddr::new(mesh::ECHO_VIP.into(), mesh::SERVICE_PORT),
                    )
                }
                other => {
                    run.failed = Some(format!(
                        "path {} runs on the loopback topology only (--topology loopback)",
                        other.name()
                    ));
                    return Ok(run);
                }
            };
            if path == PathKind::Waypoint && mesh.waypoint.is_none() {
                run.failed = Some(format!(
                    "the waypoint is not running: {}",
                    mesh.waypoint_error.as_deref().unwrap_or("not started")
                ));
                eprintln!("{label}  FAILED: {}", run.failed.as_deref().unwrap_or(""));
                return Ok(run);
            }
            match mesh.socks5 {
                // Loopback: the client pod's address is the source, ztunnel A's SOCKS5 the way in.
                Some(proxy) if path != PathKind::Direct => {
                    socks = Some(generator::Socks {
                        src: mesh.layout.ip(client).into(),
                        proxy,
                    });
                }
                Some(_) => {}
                None => netns = Some(mesh.ns(client)),
            }
            let procs = mesh.procs(path.name());
            pids = procs.iter().map(|(_, p)| *p).collect();
            names = procs.iter().map(|(n, _)| n.to_string()).collect();
            run.proxy_pid = pids.first().copied();
            run.proxy_driver = if pids.is_empty() { None } else { mesh.driver() };
            if pids.len() > 1 {
                run.notes.push(format!(
                    "{} proxy processes (pids {pids:?}) share {}; proxy CPU is their sum",
                    pids.len(),
                    match ctx.placement.proxy_cores.first() {
                        Some(c) if ctx.placement.pin => format!("the proxy core (cpu{c})"),
                        _ => "the CPUs unpinned".into(),
                    }
                ));
            }
            t
        }
        Topo::Loopback(be) => {
            let upstream = pick(be);
            let started = match (path, path.mode()) {
                (PathKind::Direct, _) => Ok(None),
                (PathKind::HboneProxy | PathKind::HboneCold, _) => {
                    let spec = HboneSpec {
                        backend: upstream,
                        core: if ctx.placement.pin {
                            ctx.placement.proxy_cores.first().copied()
                        } else {
                            None
                        },
                        io_driver: k.io_driver.clone(),
                        ca_dir: ctx.tmp.join("ca"),
                        pool: path == PathKind::HboneProxy,
                        netns: None,
                        h2: None,
                    };
                    Proxy::start_hbone(&spec, ctx.tmp, &format!("{}", ctx.seq))
                        .map(Some)
                        .map_err(|e| format!("starting the hbone proxies: {e:#}"))
                }
                (_, Some(mode)) => {
                    let spec = ProxySpec {
                        mode,
                        upstream,
                        cores: if ctx.placement.pin {
                            ctx.placement.proxy_cores.clone()
                        } else {
                            vec![]
                        },
                        workers: ctx.placement.proxy_workers,
                        io_driver: k.io_driver.clone(),
                    };
                    Proxy::start(&spec, ctx.tmp, &format!("{}", ctx.seq))
                        .map(|p| Some(vec![p]))
                        .map_err(|e| format!("starting the forwarder: {e:#}"))
                }
                (other, None) => Err(format!(
                    "path {} needs the mesh topology (root; --topology mesh)",
                    other.name()
                )),
            };
            match started {
                Ok(None) => upstream,
                Ok(Some(ps)) => {
                    // The generator connects to the last one started (the hbone outbound).
                    let last = ps.last().expect("at least one proxy");
                    run.proxy_pid = Some(last.pid);
                    run.proxy_driver = Some(last.driver.clone());
                    let t = last.listen;
                    if ps.len() > 1 {
                        run.notes.push(format!(
                            "{} proxy processes ({}) share {}; proxy CPU is their sum",
                            ps.len(),
                            ps.iter()
                                .map(|p| format!("{} pid {}", p.name, p.pid))
                                .collect::<Vec<_>>()
                                .join(", "),
                            match ctx.placement.proxy_cores.first() {
                                Some(c) if ctx.placement.pin => {
                                    format!("the proxy core (cpu{c})")
                                }
                                _ => "the CPUs unpinned".into(),
                            }
                        ));
                    }
                    pids = ps.iter().map(|p| p.pid).collect();
                    names = ps.iter().map(|p| proc_name(&p.name)).collect();
                    proxies = ps;
                    t
                }
                Err(e) => {
                    run.failed = Some(e);
                    eprintln!("{label}  FAILED: {}", run.failed.as_deref().unwrap_or(""));
                    return Ok(run);
                }
            }
        }
    };
    // Let a proxy started for this run settle its threads (the mesh's run throughout).
    if !proxies.is_empty() {
        std::thread::sleep(Duration::from_millis(30));
    }
    let t_gen = ctx.phases.lap("proxy start", t_start);
    if sc.kind.is_memory() {
        let conn = Conn {
            target,
            netns,
            socks,
            host: host_header,
        };
        return idle_run(ctx, sc, run, &label, &pids, proxies, conn);
    }

    // 3. Generators. The other processes' CPU from here to the window is the quiet check.
    let others0 = (check == QuietCheck::WarmUp).then(|| {
        (
            Instant::now(),
            host::other_process_ticks(&exclude(ctx, &pids)),
            host::CpuTimes::read(),
        )
    });
    let retrans0 = retrans_segs(&ctx.topo);
    let be_err0 = ctx.counters.errors.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let t_warm = t0 + k.warmup;
    // Latency scenarios get the longer window (their p99 needs the samples).
    let window_len = if sc.kind.is_latency() {
        k.latency_duration
    } else {
        k.duration
    };
    let t_end = t_warm + window_len;
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Live::default());
    let (tx, rx) = mpsc::channel();
    // tcp-rr-open: one thread per connection (on the generator cores in turn), so each
    // can wait for its due times with a precise blocking sleep; several connections on one
    // monoio thread would have to busy-wait, and that delays the others' completions.
    // mixed: the main plan is its tcp-rr connection; the bulk stream and the HTTP
    // connections run beside it (same pod address, the backends' other ports), each on its
    // own thread and channel.
    let main_conns = if sc.kind == Kind::Mixed { 1 } else { sc.conns };
    let threads = if sc.kind == Kind::RrOpen {
        sc.conns.max(1)
    } else {
        ctx.placement.gen_threads.max(1).min(main_conns)
    };
    // http1-open: each thread runs its own schedule at its share of the rate.
    let work = match sc.work() {
        Work::Http1Open {
            resp_body,
            interval,
        } => Work::Http1Open {
            resp_body,
            interval: interval * threads as u32,
        },
        w => w,
    };
    let mut side: Vec<(&'static str, mpsc::Receiver<Result<GenResult, String>>)> = Vec::new();
    if sc.kind == Kind::Mixed {
        let ports = crate::backend::PORTS;
        for (i, (name, work, port, conns)) in [
            (
                "bulk",
                Work::Throughput {
                    write_size: sc.write_size,
                },
                ports.sink,
                1,
            ),
            (
                "http",
                Work::Http1 {
                    req_body: 0,
                    resp_body: sc.size,
                },
                ports.http,
                sc.conns,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let (stx, srx) = mpsc::channel();
            let plan = Plan {
                work,
                target: SocketAddr::new(target.ip(), port),
                conns,
                t_warm,
                t_end,
                stop: stop.clone(),
                live: Arc::new(Live::default()),
                netns: netns.clone(),
                host: host_header.clone(),
                headers: ctx.knobs.headers.clone(),
                socks,
            };
            match generator::spawn(100 + i, ctx.placement.gen_core(i), ctx.decision, plan, stx) {
                Ok(()) => side.push((name, srx)),
                Err(e) => run.notes.push(format!("mixed {name} thread: {e}")),
            }
        }
    }
    let mut spawned = 0;
    for i in 0..threads {
        let conns = main_conns / threads + usize::from(i < main_conns % threads);
        if conns == 0 {
            continue;
        }
        let plan = Plan {
            work,
            target,
            conns,
            t_warm,
            t_end,
            stop: stop.clone(),
            live: live.clone(),
            netns: netns.clone(),
            host: host_header.clone(),
            headers: ctx.knobs.headers.clone(),
            socks,
        };
        match generator::spawn(i, ctx.placement.gen_core(i), ctx.decision, plan, tx.clone()) {
            Ok(()) => spawned += 1,
            Err(e) => run.notes.push(format!("generator thread {i}: {e}")),
        }
    }
    drop(tx);

    // 4. Measure: snapshots at the window's edges, progress in between.
    let tty = ctx.tty;
    let progress = |phase: &str, start: Instant, total: Duration, sink0: Option<u64>| {
        if !tty {
            return;
        }
        let el = start.elapsed().min(total).as_secs_f64();
        let ops = live.ops.load(Ordering::Relaxed);
        let rate = match (sc.kind, sink0) {
            (Kind::Throughput, Some(s0)) if el > 0.0 => {
                let b = ctx.counters.sink_bytes.load(Ordering::Relaxed) - s0;
                format!("{:.2} Gbit/s", b as f64 * 8.0 / el / 1e9)
            }
            (Kind::Throughput, _) => String::new(),
            _ => format!("{} ops", si(ops as f64)),
        };
        eprint!(
            "\r{label}  {phase} {el:.1}/{:.1}s  {rate}\x1b[K",
            total.as_secs_f64()
        );
    };
    if let Err(e) = wait_until(ctx, t_warm, || progress("warm-up", t0, k.warmup, None)) {
        stop.store(true, Ordering::Relaxed);
        return Err(e);
    }
    let t_window = ctx.phases.lap("generator start + warm-ups", t_gen);
    let a = snap(ctx, &pids);
    if let Some((t, others, cpu)) = others0 {
        let (ticks, top) = host::other_process_delta(&others, &a.others);
        let secs = a.at.duration_since(t).as_secs_f64().max(1e-3);
        let tck = ctx.clk_tck.max(1) as f64;
        let pct = ticks as f64 / tck / secs * 100.0;
        run.pre_busy_pct = Some(crate::report::r(pct));
        run.pre_steal_pct = cpu.zip(host::CpuTimes::read()).map(|(x, y)| {
            let total = y.total().saturating_sub(x.total()).max(1) as f64;
            crate::report::r(
                y.steal.saturating_sub(x.steal) as f64 / total * 100.0 * ctx.cores as f64,
            )
        });
        run.quiet = pct <= k.quiet_threshold_pct;
        if !run.quiet {
            let busiest = top.map_or("?".to_string(), |(pid, t)| {
                format!(
                    "{} (pid {pid}, {:.0}%)",
                    host::proc_comm(pid).unwrap_or_else(|| "?".into()),
                    t as f64 / tck / secs * 100.0
                )
            });
            if ctx.quiet_waited < k.quiet_wait_budget {
                // Start again once the machine is quiet: stop the generators (they end
                // within their op timeouts) and this run's proxies, drop what they did.
                stop.store(true, Ordering::Relaxed);
                let deadline = Instant::now() + Duration::from_secs(30);
                for _ in 0..spawned {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if rx.recv_timeout(left).is_err() {
                        break;
                    }
                }
                for (_, srx) in &side {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let _ = srx.recv_timeout(left);
                }
                drop(proxies);
                ctx.quiet_waited += k.warmup;
                eprintln!(
                    "         machine busy during the warm-up ({pct:.0}% of a CPU in other \
                     processes; busiest: {busiest}): waiting, then starting the run again"
                );
                ctx.phases.lap("busy warm-ups", t_window);
                run.busy_warmup = true;
                return Ok(run);
            }
            run.notes.push(format!(
                "machine not quiet during the warm-up: other processes used {pct:.0}% of a \
                 CPU (busiest: {busiest}; waited {:.1}s of the suite's budget)",
                ctx.quiet_waited.as_secs_f64()
            ));
        }
    }
    let r = wait_until(ctx, t_end, || {
        progress("measure", a.at, window_len, Some(a.sink))
    });
    let t_snap = ctx.phases.lap("windows", t_window);
    let b = snap(ctx, &pids);
    let t_finish = ctx.phases.lap("end snapshots", t_snap);
    if let Err(e) = r {
        // Generators see the flag and end within their op timeouts; the proxy stops on drop.
        stop.store(true, Ordering::Relaxed);
        drop(proxies);
        return Err(e);
    }
    if tty {
        eprint!("\r{label}  finishing…\x1b[K");
    }

    // 5. Collect (bounded), then stop the proxy.
    let mut total = GenResult::empty();
    let collect_deadline = Instant::now() + Duration::from_secs(30);
    let mut got = 0;
    while got < spawned {
        if ctx.interrupted.load(Ordering::Relaxed) {
            stop.store(true, Ordering::Relaxed);
        }
        let left = collect_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(Ok(res)) => {
                total.merge(&res);
                got += 1;
            }
            Ok(Err(e)) => {
                run.failed = Some(e);
                got += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                run.failed = Some(format!(
                    "{} generator thread(s) did not finish within 30 s of the window's end",
                    spawned - got
                ));
                break;
            }
        }
    }
    let mut mixed_http: Option<GenResult> = None;
    for (name, srx) in side {
        let left = collect_deadline.saturating_duration_since(Instant::now());
        match srx.recv_timeout(left.max(Duration::from_secs(1))) {
            Ok(Ok(res)) => {
                // Every byte of every part is checked; only the rr part feeds the histogram.
                total.sent += res.sent;
                total.received += res.received;
                total.errors += res.errors;
                total
                    .error_samples
                    .extend(res.error_samples.iter().cloned());
                if name == "http" {
                    mixed_http = Some(res);
                }
            }
            Ok(Err(e)) => run.failed = Some(format!("mixed {name}: {e}")),
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                run.failed = Some(format!(
                    "mixed {name}: did not finish within 30 s of the window's end"
                ));
            }
        }
    }
    let retrans1 = retrans_segs(&ctx.topo);
    // Stop them in reverse start order (the hbone outbound before its inbound).
    let mut exits = Vec::new();
    for mut p in proxies.drain(..).rev() {
        if let Some(st) = p.exited() {
            run.failed
                .get_or_insert(format!("the {} died during the run ({st})", p.name));
        }
        let out = p.stop();
        exits.push(out.status.clone());
        if let Some(n) = out.note {
            run.notes.push(n);
        }
    }
    if !exits.is_empty() {
        exits.reverse();
        run.proxy_exit = Some(exits.join("; "));
    }
    if let Topo::Mesh { mesh, .. } = &mut ctx.topo {
        if let Some(d) = mesh.dead() {
            run.failed.get_or_insert(format!("a mesh proxy died: {d}"));
        }
    }
    ctx.phases.lap("finishing", t_finish);
    if ctx.interrupted.load(Ordering::Relaxed) {
        return Err(Interrupted);
    }

    // 6. Figures.
    let window = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
    let planned = window_len.as_secs_f64();
    let tck = ctx.clk_tck.max(1) as f64;
    run.window_s = crate::report::r(window);
    run.bytes_sent = total.sent;
    run.bytes_received = total.received;
    run.errors = total.errors;
    run.error_samples = total.error_samples.clone();
    run.backend_errors = ctx
        .counters
        .errors
        .load(Ordering::Relaxed)
        .saturating_sub(be_err0);
    run.ops_window = total.ops_window;
    run.latency_us = Latency::from_hist(&total.hist);
    run.tcp_retransmits = match (retrans0, retrans1) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x)),
        _ => None,
    };
    run.generator_cpu_pct =
        crate::report::r(b.gen_ticks.saturating_sub(a.gen_ticks) as f64 / tck / window * 100.0);
    run.backend_cpu_pct =
        crate::report::r(b.be_ticks.saturating_sub(a.be_ticks) as f64 / tck / window * 100.0);
    let (other, top) = host::other_process_delta(&a.others, &b.others);
    run.other_procs_cpu_pct = crate::report::r(other as f64 / tck / window * 100.0);
    run.other_procs_top = top.map(|(pid, t)| {
        format!(
            "{} (pid {pid}, {:.0}%)",
            host::proc_comm(pid).unwrap_or_else(|| "?".into()),
            t as f64 / tck / window * 100.0
        )
    });
    run.disturbed = run.other_procs_cpu_pct > k.quiet_threshold_pct;
    if run.disturbed {
        run.notes.push(format!(
            "other processes used {:.0}% of a CPU during the window (busiest: {})",
            run.other_procs_cpu_pct,
            run.other_procs_top.as_deref().unwrap_or("?")
        ));
    }
    let window_bytes = b.sink.saturating_sub(a.sink);
    let proxy_cpu_s = match (a.proxy_ticks, b.proxy_ticks) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / tck),
        _ => None,
    };
    // CPU-seconds to the per-unit figures, the same for the sum and for each process.
    let mut s_per_gb: Option<f64> = None;
    let mut us_per_op: Option<f64> = None;
    match sc.kind {
        Kind::Throughput => {
            run.window_bytes = window_bytes;
            let g = window_bytes as f64 * 8.0 / window / 1e9;
            run.gbit_per_s = Some(crate::report::r(g));
            run.figure = g;
            if window_bytes > 0 {
                s_per_gb = Some(1.0 / (window_bytes as f64 / 1e9));
            }
        }
        Kind::LargeBody => {
            // Body bytes moved both ways inside the window, each request write (64 KiB) and
            // response read counted when it completed, so exchanges straddling the window's
            // edges count in part, as tcp-throughput's sink bytes do. Whole exchanges counted
            // by start quantised the figure by up to one exchange per connection (±exchange
            // time ÷ window: 1 MiB echoed over the waypoint takes a sizeable part of a 0.6 s
            // window, and the connections run in step). Every byte is still checked
            // (`bytes_sent` = `bytes_received`, each body compared).
            let bytes = total.window_bytes as f64;
            let g = bytes * 8.0 / planned / 1e9;
            run.window_bytes = total.window_bytes;
            run.gbit_per_s = Some(crate::report::r(g));
            // Exchanges' worth of those bytes (2 × body each) per second.
            let exchanges = bytes / (2.0 * sc.body.max(1) as f64);
            run.requests_per_s = Some(crate::report::r(exchanges / planned));
            run.figure = g;
            if bytes > 0.0 {
                s_per_gb = Some(planned / window / (bytes / 1e9));
            }
        }
        Kind::Idle | Kind::IdleHttp | Kind::SlowReader => {}
        Kind::Mixed => {
            let rate = total.ops_window as f64 / planned;
            run.round_trips_per_s = Some(crate::report::r(rate));
            let g = window_bytes as f64 * 8.0 / window / 1e9;
            run.window_bytes = window_bytes;
            run.gbit_per_s = Some(crate::report::r(g));
            let http = mixed_http.as_ref();
            let http_rps = http.map_or(0.0, |h| h.ops_window as f64 / planned);
            run.requests_per_s = Some(crate::report::r(http_rps));
            run.mixed = Some(crate::report::Mixed {
                bulk_gbit_per_s: crate::report::r(g),
                http_requests_per_s: crate::report::r(http_rps),
                http_latency_us: http.and_then(|h| Latency::from_hist(&h.hist)),
            });
            run.figure = run.latency_us.map(|l| l.p99).unwrap_or(0.0);
            if g <= 0.0 || http_rps <= 0.0 {
                run.figure = 0.0;
            }
        }
        Kind::Rr | Kind::Churn | Kind::Http1 | Kind::Http2 => {
            let rate = total.ops_window as f64 / planned;
            run.figure = rate;
            match sc.kind {
                Kind::Rr => run.round_trips_per_s = Some(crate::report::r(rate)),
                Kind::Http1 | Kind::Http2 => run.requests_per_s = Some(crate::report::r(rate)),
                _ => run.connections_per_s = Some(crate::report::r(rate)),
            }
            if total.ops_window > 0 {
                // CPU over the snapshot window, operations over the planned one: scale.
                us_per_op = Some(planned / window / total.ops_window as f64 * 1e6);
            }
        }
        Kind::RrOpen | Kind::Http1Open => {
            // Answers received in the window, over the planned window (when behind
            // schedule, requests due in the window may be answered after it, or never).
            let achieved = total.done_window as f64 / planned;
            if sc.kind == Kind::RrOpen {
                run.round_trips_per_s = Some(crate::report::r(achieved));
            } else {
                run.requests_per_s = Some(crate::report::r(achieved));
            }
            let saturated = achieved < OPEN_LOOP_MIN_FRACTION * sc.rate;
            run.open_loop = Some(OpenLoop {
                target_rate_per_s: sc.rate,
                achieved_rate_per_s: crate::report::r(achieved),
                due: total.due_window,
                late: total.late,
                unsent: total.unsent,
                saturated,
            });
            if saturated {
                run.notes.push(format!(
                    "{SATURATED}: achieved {} of the {} requests/s asked ({} of {} due in the \
                     window answered, {} sent late, {} never sent)",
                    si(achieved),
                    si(sc.rate),
                    total.ops_window,
                    total.due_window,
                    total.late,
                    total.unsent
                ));
            }
            run.figure = run.latency_us.map(|l| l.p99).unwrap_or(0.0);
            if total.done_window > 0 {
                us_per_op = Some(planned / window / total.done_window as f64 * 1e6);
            }
        }
    }
    let figures = |cpu_s: f64| {
        let r = crate::report::r;
        (
            r(cpu_s),
            r(cpu_s / window * 100.0),
            s_per_gb.map(|f| r(cpu_s * f)),
            us_per_op.map(|f| r(cpu_s * f)),
        )
    };
    if let Some((c, pct, gb, op)) = proxy_cpu_s.map(figures) {
        run.proxy_cpu_s = Some(c);
        run.proxy_cpu_pct = Some(pct);
        run.proxy_cpu_s_per_gb = gb;
        run.proxy_cpu_us_per_op = op;
    }
    run.proxy_cpu_by_process = cpu_by_process(&names, &a.proc_ticks, &b.proc_ticks, tck, figures);
    if run.figure <= 0.0 && run.failed.is_none() {
        run.failed = Some(NOTHING_MEASURED.into());
    }

    // 7. Progress line.
    // tcp-rr-open's figure is its p99, shown with the latencies below.
    let mut line = if matches!(sc.kind, Kind::RrOpen | Kind::Mixed | Kind::Http1Open) {
        label.clone()
    } else {
        format!("{label}  {}", fmt_figure(sc.kind.metric().0, run.figure))
    };
    if let Some(l) = run.latency_us {
        line += &format!("  p50 {:.1} µs  p99 {:.1} µs", l.p50, l.p99);
    }
    if let Some(m) = &run.mixed {
        line += &format!(
            "  under bulk {:.2} Gbit/s: http {} req/s p50 {:.1} µs p99 {:.1} µs",
            m.bulk_gbit_per_s,
            si(m.http_requests_per_s),
            m.http_latency_us.map_or(0.0, |l| l.p50),
            m.http_latency_us.map_or(0.0, |l| l.p99)
        );
    }
    if let Some(o) = &run.open_loop {
        line += &format!(
            "  {}/{} req/s{}",
            si(o.achieved_rate_per_s),
            si(o.target_rate_per_s),
            if o.saturated { " SATURATED" } else { "" }
        );
    }
    if let Some(c) = run.proxy_cpu_pct {
        line += &format!("  proxy {c:.0}% CPU");
    }
    line += &format!(
        "  gen {:.0}% be {:.0}%",
        run.generator_cpu_pct, run.backend_cpu_pct
    );
    if let Some(rt) = run.tcp_retransmits {
        line += &format!("  retrans {rt}");
    }
    if !run.quiet || run.disturbed {
        line += "  [outside load]";
    }
    if run.is_failure() {
        line += &format!(
            "  FAILED: {}",
            run.failed.clone().unwrap_or_else(|| format!(
                "{} errors, sent {} received {}: {}",
                run.errors + run.backend_errors,
                run.bytes_sent,
                run.bytes_received,
                run.error_samples.join("; ")
            ))
        );
    }
    if tty {
        eprintln!("\r{line}\x1b[K");
    } else {
        eprintln!("{line}");
    }
    Ok(run)
}

/// Where a memory scenario's generators connect.
struct Conn {
    target: SocketAddr,
    netns: Option<String>,
    socks: Option<generator::Socks>,
    host: String,
}

/// The memory scenarios, one run per path:
///
/// - `idle-connections`, `idle-http`: read each proxy's RSS, open `sc.conns` connections
///   through the path (at most [`generator::OPEN_WINDOW`] opening at once per generator
///   thread; one echo or one HTTP request each), wait until all are up, read the RSS again,
///   then let the generators do one more exchange on each and close.
/// - `slow-reader`: open `sc.conns` connections to the stall backend, which reads nothing;
///   the clients write until the path's buffers are full (bytes written stop growing for
///   [`SLOW_SETTLE`]), then read the RSS (and the kernel's TCP memory from
///   `/proc/net/sockstat`), release the backends, which read everything and answer the count.
///
/// Figure: (RSS after − before) / connections, summed over the path's proxies.
#[allow(clippy::too_many_arguments)]
fn idle_run(
    ctx: &mut Ctx<'_>,
    sc: &Scenario,
    mut run: Run,
    label: &str,
    pids: &[u32],
    mut proxies: Vec<Proxy>,
    conn: Conn,
) -> Result<Run, Interrupted> {
    let Conn {
        target,
        netns,
        socks,
        host,
    } = conn;
    let slow = sc.kind == Kind::SlowReader;
    // Memory freed by an earlier memory scenario stays with the proxy's allocator and is
    // reused: that proxy's growth here is a lower bound.
    let reused: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| ctx.memory_pids.contains(p))
        .collect();
    if !reused.is_empty() {
        run.notes.push(format!(
            "{LOWER_BOUND}: proxy pid(s) {reused:?} already held connections of an earlier \
             memory scenario of this run (freed memory stays with the allocator and is reused)"
        ));
    }
    ctx.memory_pids
        .extend(pids.iter().copied().filter(|p| !reused.contains(p)));
    ctx.counters.release_stalled.store(false, Ordering::Relaxed);
    let tcp_mem0 = host::tcp_mem_kb();
    let before: Vec<Option<u64>> = pids.iter().map(|p| host::proc_rss_kb(*p)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Live::default());
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    let threads = ctx.placement.gen_threads.max(1);
    let mut spawned = 0;
    // idle-http: the clients in a child process (see `crate::idle_client`).
    let mut child: Option<crate::idle_client::IdleClient> = None;
    if sc.kind == Kind::IdleHttp {
        let spec = crate::idle_client::Spec {
            target,
            netns: netns.clone(),
            socks: socks.map(|s| (s.src, s.proxy)),
            host: host.clone(),
            conns: sc.conns,
            resp_body: sc.size,
            core: ctx.placement.gen_core(0),
            io_driver: ctx.knobs.io_driver.clone(),
        };
        match crate::idle_client::IdleClient::start(&spec, live.clone(), tx.clone()) {
            Ok(c) => {
                child = Some(c);
                spawned = 1;
            }
            Err(e) => run.failed = Some(format!("starting the idle client process: {e}")),
        }
    }
    for i in 0..threads {
        if sc.kind == Kind::IdleHttp {
            break;
        }
        let conns = sc.conns / threads + usize::from(i < sc.conns % threads);
        if conns == 0 {
            continue;
        }
        let plan = Plan {
            work: sc.work(),
            target,
            conns,
            t_warm: t0,
            // The generators hold their connections until told to stop.
            t_end: t0 + Duration::from_secs(600),
            stop: stop.clone(),
            live: live.clone(),
            netns: netns.clone(),
            host: host.clone(),
            headers: ctx.knobs.headers.clone(),
            socks,
        };
        match generator::spawn(i, ctx.placement.gen_core(i), ctx.decision, plan, tx.clone()) {
            Ok(()) => spawned += 1,
            Err(e) => run.notes.push(format!("generator thread {i}: {e}")),
        }
    }
    drop(tx);
    // Wait (bounded) until every connection answered its first exchange, or a thread gave up.
    let deadline = Instant::now() + OPEN_BOUND;
    let mut release = ReleaseStalled(ctx.counters.clone());
    let mut early: Vec<Result<GenResult, String>> = Vec::new();
    while live.ops.load(Ordering::Relaxed) < sc.conns as u64 && Instant::now() < deadline {
        if ctx.interrupted.load(Ordering::Relaxed) {
            stop.store(true, Ordering::Relaxed);
            return Err(Interrupted);
        }
        if let Ok(r) = rx.try_recv() {
            early.push(r);
        }
        if early.len() == spawned {
            break;
        }
        if ctx.tty {
            eprint!(
                "\r{label}  opening {}/{}\x1b[K",
                live.ops.load(Ordering::Relaxed),
                sc.conns
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let up = live.ops.load(Ordering::Relaxed);
    let opened_s = t0.elapsed().as_secs_f64();
    let t_settle = ctx.phases.lap("memory: open", t0);
    // Let the proxies finish whatever the last connections started.
    std::thread::sleep(Duration::from_millis(300));
    let mut buffered = None;
    if slow && early.is_empty() {
        // Until the bytes written stop growing: every buffer along the path is full.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = live.bytes_sent.load(Ordering::Relaxed);
        let mut still_since = Instant::now();
        while Instant::now() < deadline && still_since.elapsed() < SLOW_SETTLE {
            if ctx.interrupted.load(Ordering::Relaxed) {
                stop.store(true, Ordering::Relaxed);
                return Err(Interrupted);
            }
            std::thread::sleep(Duration::from_millis(100));
            let now = live.bytes_sent.load(Ordering::Relaxed);
            if now != last {
                last = now;
                still_since = Instant::now();
            }
        }
        if still_since.elapsed() < SLOW_SETTLE {
            run.notes.push(
                "slow-reader: bytes written were still growing after 30 s; RSS taken anyway".into(),
            );
        }
        buffered = Some(last);
    }
    let after: Vec<Option<u64>> = pids.iter().map(|p| host::proc_rss_kb(*p)).collect();
    let tcp_mem1 = host::tcp_mem_kb();
    let t_close = ctx.phases.lap("memory: settle", t_settle);
    stop.store(true, Ordering::Relaxed);
    release.now();
    if let Some(c) = child.as_mut() {
        c.stop();
    }
    let mut total = GenResult::empty();
    let mut got = early.len();
    for r in early {
        match r {
            Ok(r) => total.merge(&r),
            Err(e) => run.failed = Some(e),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < spawned {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(r)) => {
                total.merge(&r);
                got += 1;
            }
            Ok(Err(e)) => {
                run.failed = Some(e);
                got += 1;
            }
            Err(_) => {
                run.failed = Some("generator threads did not finish within 60 s".into());
                break;
            }
        }
    }
    for mut p in proxies.drain(..).rev() {
        let out = p.stop();
        if let Some(n) = out.note {
            run.notes.push(n);
        }
    }
    ctx.phases.lap("memory: close", t_close);
    run.bytes_sent = total.sent;
    run.bytes_received = total.received;
    run.errors = total.errors;
    run.error_samples = total.error_samples.clone();
    run.ops_window = total.ops_window;
    run.latency_us = Latency::from_hist(&total.hist);
    run.window_s = crate::report::r(t0.elapsed().as_secs_f64());
    let per_proxy: Vec<(u64, u64)> = before
        .iter()
        .zip(&after)
        .filter_map(|(b, a)| Some(((*b)?, (*a)?)))
        .collect();
    let delta_kb: i64 = per_proxy.iter().map(|(b, a)| *a as i64 - *b as i64).sum();
    let conns_up = total.ops_window.max(up.min(sc.conns as u64));
    run.idle = Some(crate::report::IdleMem {
        connections: sc.conns as u64,
        established: up,
        rss_before_kb: per_proxy.iter().map(|x| x.0).collect(),
        rss_after_kb: per_proxy.iter().map(|x| x.1).collect(),
        open_s: crate::report::r(opened_s),
        kernel_tcp_mem_kb: match (tcp_mem0, tcp_mem1) {
            (Some(a), Some(b)) => Some([a, b]),
            _ => None,
        },
        buffered_bytes: buffered,
    });
    if per_proxy.len() != pids.len() || pids.is_empty() {
        run.failed
            .get_or_insert("could not read the proxies' VmRSS".into());
    } else if up < sc.conns as u64 {
        run.failed.get_or_insert(format!(
            "only {up} of {} connections were established within {} s",
            sc.conns,
            OPEN_BOUND.as_secs()
        ));
    }
    run.figure = (delta_kb.max(0) as f64 * 1024.0 / conns_up.max(1) as f64).round();
    if let Topo::Mesh { mesh, .. } = &mut ctx.topo {
        if let Some(d) = mesh.dead() {
            run.failed.get_or_insert(format!("a mesh proxy died: {d}"));
        }
    }
    let mut line = format!(
        "{label}  {} B/conn over {} conns opened in {opened_s:.1}s (RSS {:?} → {:?} kB)",
        run.figure,
        conns_up,
        before.iter().flatten().collect::<Vec<_>>(),
        after.iter().flatten().collect::<Vec<_>>()
    );
    if let (Some(b), Some((m0, m1))) = (buffered, tcp_mem0.zip(tcp_mem1)) {
        line += &format!(
            "; {} kB written per conn into the path, kernel TCP memory {m0} → {m1} kB",
            b / 1024 / conns_up.max(1)
        );
    }
    if ctx.tty {
        eprintln!("\r{line}\x1b[K");
    } else {
        eprintln!("{line}");
    }
    if run.is_failure() {
        eprintln!(
            "         FAILED: {}",
            run.failed
                .clone()
                .unwrap_or_else(|| run.error_samples.join("; "))
        );
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_cpu_splits_per_process_and_the_parts_add_up_to_the_sum() {
        // ztunnel A, the waypoint, ztunnel B; a peer's two processes share its name.
        let names: Vec<String> = ["ztunnel-a", "waypoint", "ztunnel-b", "nginx", "nginx"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let a = [Some(100), Some(50), Some(10), Some(0), Some(7)];
        let b = [Some(130), Some(70), Some(35), Some(4), Some(13)];
        // 100 ticks/s, a 2 s window, 1,000 operations: µs/op = s * 1e6 / 1000.
        let figures = |c: f64| (c, c / 2.0 * 100.0, None, Some(c * 1e6 / 1000.0));
        let split = cpu_by_process(&names, &a, &b, 100.0, figures);
        let got: Vec<(&str, Option<f64>, Option<f64>)> = split
            .iter()
            .map(|p| (p.name.as_str(), p.cpu_s, p.cpu_us_per_op))
            .collect();
        assert_eq!(
            got,
            [
                ("ztunnel-a", Some(0.3), Some(300.0)),
                ("waypoint", Some(0.2), Some(200.0)),
                ("ztunnel-b", Some(0.25), Some(250.0)),
                ("nginx", Some(0.1), Some(100.0)),
            ]
        );
        assert_eq!(split[1].cpu_pct, Some(10.0));
        assert_eq!(split[1].cpu_s_per_gb, None);
        let sum: f64 = split.iter().filter_map(|p| p.cpu_s).sum();
        let total = a
            .iter()
            .zip(&b)
            .map(|(x, y)| y.unwrap() - x.unwrap())
            .sum::<u64>();
        assert!((sum - total as f64 / 100.0).abs() < 1e-9);
        // A process that could not be read has no figure (as the sum then has none).
        let split = cpu_by_process(
            &names[..2],
            &[Some(1), None],
            &[Some(2), Some(3)],
            100.0,
            figures,
        );
        assert_eq!(split[0].cpu_s, Some(0.01));
        assert_eq!(split[1].cpu_s, None);
        assert_eq!(split[1].cpu_us_per_op, None);
        assert_eq!(proc_name("hbone outbound proxy"), "hbone-out");
        assert_eq!(proc_name("hbone inbound proxy"), "hbone-in");
        assert_eq!(proc_name("forwarder"), "forwarder");
    }
}
