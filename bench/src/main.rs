//! `bench`: the bundled load harness. Direct and proxied paths in one invocation, interleaved
//! and repeated, with the machine's noise accounted for as `/work/shared/BENCHMARKING.md`
//! asks.
//!
//! ```text
//! cargo run --release -p bench                      # default suite, about two minutes
//! cargo run --release -p bench -- --quick           # 0.5 s runs, 1 repetition (~20 s)
//! cargo run --release -p bench -- --scenario tcp-rr --duration 5s --size 100 --reps 5
//! cargo run --release -p bench -- --scenario tcp-rr-open --rate 20000 --streams 4
//! cargo run --release -p bench -- --scenario http1-open --http-rate 15000 --path direct,waypoint
//! cargo run --release -p bench -- --scenario slow-reader --path l4,hbone --profile low-memory
//! cargo run --release -p bench -- --scenario tcp-throughput --streams 1,4,8 --path direct,l4-splice
//! ```
//!
//! **Scenarios.** `tcp-throughput`: N parallel bulk streams (default 1 and 8) for a fixed
//! time, Gbit/s measured at the receiver. `tcp-rr`: fixed-size request/response (default
//! 100 B) on one connection, closed loop; HdrHistogram of round trips. `tcp-rr-open`: the
//! same exchange open loop at a fixed rate (`--rate`, default 5000 requests/s in total,
//! shared equally by `--streams` connections, default 1): request `i` of a connection is due
//! at `t0 + i / rate_per_conn`; the generator waits until then if early (each connection
//! has its own generator thread, on the generator cores in turn, and waits with a blocking
//! sleep and a ≤ 80 µs spin: the runtime's timer has 1 ms granularity), sends `--size` bytes, reads the
//! echo, and records *completion − due time*, not − send time, so a slow answer that delays
//! later sends has their queueing counted (coordinated-omission correction, as wrk2 does).
//! Requests due in the window count; late sends keep their due time; requests still unsent
//! at the window's end enter the histogram with their wait so far (a lower bound). Figure:
//! the p99 in µs (lower is better; its "of direct" ratio is path / direct, so above 1 is
//! slower), with p50/p90/p99/p99.9/max as for tcp-rr, and the achieved rate (answers
//! received in the window, per second) beside the target; a run achieving under 95 % of the target is flagged "saturated: open-loop latency
//! beyond capacity". `conn-churn`:
//! concurrent loops (default 8) of connect, one exchange, close; connections/s.
//! `http1-open`: HTTP/1.1 open loop at `--http-rate` requests/s (default 10,000) over
//! `--conns` keep-alive connections (default 64), as wrk2 measures: one schedule per
//! generator thread, each due request sent on the next free connection (or queued while all
//! are busy), latency = completion − due time; paced by a timerfd thread (the runtime's
//! timer has 1 ms granularity); figure, saturation flag and achieved rate as tcp-rr-open.
//! `idle-connections`: each proxy's VmRSS before and with `--idle-conns` (9,000) idle echo
//! connections (at most 64 opening at once per generator thread: more overflow a proxy's
//! accept queue); `idle-http`: the same with `--idle-http-conns` (10,000) idle HTTP/1.1
//! keep-alive connections through the waypoint (each a tunnel to it, and the waypoint keeps an
//! upstream stream per tunnel to the backend, so the clients run in a child process, the
//! backends staying in the harness: each process under its own 20,000 descriptors) or a
//! peer.
//! `slow-reader`: `--slow-conns` (100) connections to a backend that reads nothing until
//! released, the client writing until the path is full; figure: proxy RSS growth per
//! connection (what the profile's buffer and window sizes bound), beside the kernel's TCP
//! memory and the bytes the path absorbed per connection; then the backend reads everything
//! and the count is checked. The three memory scenarios run once per path (no repetitions).
//! Before the suite starts, each memory scenario × path is fitted to the descriptor limits of
//! the processes it crosses (the harness, our proxies, a peer; see [`fds`]): a run that would
//! not fit is measured with the largest count that does, or skipped when under 100 fit;
//! either is said at the start, in the summary, the flags and the JSON, and is no failure.
//!
//! **Topologies.** `--topology netns` (root): the default mesh in network namespaces with
//! transparent capture ([`mesh`]). `--topology loopback` (the default without root): the
//! same mesh on `127.<net>.*` addresses, clients through ztunnel A's SOCKS5 (the generator
//! binds the `client` pod's address, then does the SOCKS5 CONNECT before the measured
//! exchange; conn-churn counts it in the connection time). Mesh paths: `direct`, `l4`,
//! `hbone`, `waypoint`, `hbone-cold`. `--topology legacy`: the per-run proxies below.
//!
//! **Legacy paths.** `direct` (generator → backend), `l4-copy` and `l4-splice` (generator →
//! `runtime::forwarder` → backend), `hbone` (generator → outbound `hbone::proxy` → mTLS
//! HTTP/2 CONNECT over loopback → inbound `hbone::proxy` → backend). The forwarder is this
//! binary re-executed as `bench __l4fwd --config FILE`, one fresh process per run; the hbone
//! path starts two, `bench __hbone --config FILE` each (the inbound first: it creates the
//! built-in CA in the suite's temp folder; then the outbound, which loads it). Each child is
//! stopped with SIGTERM (SIGKILL after 4 s); the harness waits at most 10 s for each `READY`
//! line. Both hbone processes run one worker on the proxy core: they share it, and the
//! path's proxy CPU is the sum of the two.
//!
//! **Placement.** Pinned by default: generator and backend threads on the first half of the
//! CPUs (cpu0 on a 2-CPU machine), the proxy's workers on the other half (cpu1). The
//! generator and the backends are thread-per-core monoio (io_uring, or epoll as
//! `runtime::driver::decide` says), one generator and one backend thread per generator CPU.
//! On the direct path the generator and the backend share their CPU(s); on proxied paths the
//! proxy has the other half to itself.
//!
//! **Method.** For each scenario, every repetition runs the paths in order (direct, l4-copy,
//! l4-splice, hbone, direct, …). Before each run the machine must be quiet (`/proc/stat` busy CPU
//! outside this process ≤ threshold, waiting within a budget); during the window the CPU of
//! other processes is measured and a disturbed run is re-run (within a budget). Each run has
//! a warm-up, then a measured window over which the proxy's CPU (`/proc/<pid>/stat`) and TCP
//! retransmits (`RetransSegs` of `/proc/net/snmp`, summed over every namespace of the mesh)
//! are taken. Results: median [min–max] over repetitions,
//! ratio of medians to direct, added latency (path − direct per percentile), and a flag when
//! a scenario's first and last direct runs differ by more than 10 %.
//!
//! **Reading the CPU figures.** Proxy CPU is the forwarder process's utime+stime (on the
//! hbone path: both proxy processes' together) over the window (clock-tick resolution, 10 ms at 100 Hz). On loopback the sender's context also
//! runs the receiver's TCP processing, so it includes kernel work for both of its sockets'
//! peers; compare it between paths and with other proxies measured the same way, not with
//! figures taken across machines. Generator and backend CPU (`gen`, `be`) are this process's
//! threads; when their sum reaches 100 % of their core the client, not the proxy, is the
//! bound (always so on the direct path, where both share one core).
//!
//! **Output.** Live progress on stderr, the summary table (Markdown) on stdout, and
//! `report.json` + `summary.md` in `bench/results/<UTC timestamp>/` (or `--out DIR`). The
//! JSON schema is documented in [`report`]. Exit status: 0 when every byte sent arrived and
//! no exchange failed, 1 otherwise, 2 on bad arguments, 130 on Ctrl-C (partial report
//! written).

mod backend;
mod fds;
mod generator;
mod host;
mod http1;
mod http2;
mod idle_client;
mod mesh;
mod peer;
mod phases;
mod proxy;
mod report;
mod suite;
mod svg;
mod waypoint;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use report::{Entry, Run};
use suite::{Ctx, Kind, Knobs, MeshBackends, PathKind, Placement, Scenario, Topo};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Load harness: direct vs the L4 forwarder (copy, splice) and the HBONE proxies, \
             interleaved and repeated",
    after_help = "With no arguments: the default suite (about two minutes). Results go to \
                  bench/results/<UTC timestamp>/ unless --out is given."
)]
struct Args {
    /// Scenarios to run (comma-separated or repeated): tcp-throughput, tcp-rr, tcp-rr-open,
    /// conn-churn, http1-rps, http1-open (open loop at --http-rate over --conns keep-alive
    /// connections), http2-rps, large-body, idle-connections, idle-http (--idle-http-conns
    /// idle HTTP keep-alive connections: the waypoint and peers), mixed (one bulk stream,
    /// tcp-rr and --conns HTTP/1.1 connections (default 8) at once; mesh topologies),
    /// slow-reader (--slow-conns connections whose backend stops reading; mesh topologies).
    #[arg(long = "scenario", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Paths to compare. Mesh topology: direct, l4, hbone, waypoint. Loopback topology:
    /// direct, l4-copy, l4-splice, hbone-proxy. Direct is the baseline for ratios.
    #[arg(long = "path", value_delimiter = ',')]
    paths: Vec<String>,
    /// The default mesh (two ztunnels and a waypoint) as `netns` (network namespaces with
    /// transparent capture; needs root; `mesh` is an alias) or `loopback` (its own 127.x
    /// addresses, clients through ztunnel A's SOCKS5; no root); `legacy`: the older per-run
    /// proxies on 127.0.0.1 (l4-copy, l4-splice, hbone-proxy); auto: netns when root, else
    /// loopback.
    #[arg(long, default_value = "auto")]
    topology: String,
    /// Loopback topology: ztunnel A's SOCKS5 address (default 127.<net>.1.10:15080, node
    /// A's address).
    #[arg(long)]
    socks5: Option<std::net::SocketAddr>,
    /// An external proxy to compare with, run in the mesh's `peer` pod:
    /// NAME=ADDR[,maxconn=N],cmd=COMMAND (repeatable; see bench/peers/ and
    /// `bench/src/peer.rs` for the port layout it must forward). maxconn: the most client
    /// connections its config admits (HAProxy's maxconn; nginx's: see bench/peers/nginx.conf):
    /// the memory scenarios are sized to it and to its descriptor limit. Pinned runs start it
    /// under `taskset -c` on the proxy cores, as our proxies.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// A field added to every HTTP request of the HTTP scenarios, `NAME: VALUE`
    /// (repeatable), e.g. a bearer token for a RequestAuthentication of --waypoint-docs.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Kubernetes documents (YAML, `---` separated) added to the waypoint's configuration:
    /// policies, RequestAuthentications, DestinationRules, a meshConfig document… (their
    /// cost, measured beside the default mesh's). Checked by the waypoint at start.
    #[arg(long)]
    waypoint_docs: Option<PathBuf>,
    /// Tuning profile (built-in name or YAML file) passed to the ztunnels and the waypoint.
    #[arg(long, default_value = "default")]
    profile: String,
    /// http1-rps and large-body: concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// http2-rps: concurrent streams per connection (with the default --conns, the
    /// connections are 64 / this, so 64 requests are in flight as in http1-rps).
    #[arg(long, default_value_t = 8)]
    h2_streams: usize,
    /// large-body: bytes up and (echoed) down per request.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    body: usize,
    /// idle-connections: connections held open through the path. The harness holds two
    /// descriptors per connection (client and backend) under RLIMIT_NOFILE, so the default
    /// 9,000 is the largest round number that fits a 20,000 limit (a run that does not fit
    /// the harness's, a proxy's or a peer's limit is sized down or skipped, and said so).
    #[arg(long, default_value_t = 9000)]
    idle_conns: usize,
    /// idle-http: idle HTTP/1.1 keep-alive connections held through the waypoint (each a
    /// tunnel from ztunnel A to the waypoint; the waypoint pools its upstream connections,
    /// so the harness holds about one descriptor per connection).
    #[arg(long, default_value_t = 10000)]
    idle_http_conns: usize,
    /// slow-reader: connections whose backend stops reading while the client writes.
    #[arg(long, default_value_t = 100)]
    slow_conns: usize,
    /// http1-open: requests per second in total (open loop, one schedule over the --conns
    /// keep-alive connections; the default is one the waypoint path sustains on a 2-CPU box).
    #[arg(long, default_value_t = DEFAULT_HTTP_RATE)]
    http_rate: f64,
    /// Measured time per run (e.g. 2s, 500ms). Default 0.6s, and 1s for tcp-rr-open,
    /// http1-open and mixed (their p99 needs the samples); quick: 0.5s. Sets both.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Unmeasured warm-up before each window. Default 200ms (quick: 100ms).
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Repetitions of every scenario × path. Default 3 (quick: 1).
    #[arg(long)]
    reps: Option<usize>,
    /// Message size in bytes for tcp-rr and conn-churn (default 100; churn needs ≥ 4).
    #[arg(long, value_parser = parse_size)]
    size: Option<usize>,
    /// Parallel connections: tcp-throughput streams (default 1,8), tcp-rr and tcp-rr-open
    /// connections (default 1). A list runs each value as its own scenario.
    #[arg(long, value_delimiter = ',')]
    streams: Vec<usize>,
    /// tcp-rr-open: requests per second, in total over its connections (each connection
    /// gets an equal share, on a fixed schedule).
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Concurrent connect/exchange/close loops for conn-churn.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Bytes per write in tcp-throughput.
    #[arg(long, default_value = "128KiB", value_parser = parse_size)]
    write_size: usize,
    /// The shortened suite: 0.5 s runs, one repetition, no waiting for quiet, 1,000 idle
    /// connections.
    #[arg(long)]
    quick: bool,
    /// Do not pin generator, backend and proxy to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Report folder (default bench/results/<UTC timestamp>/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// io driver for generator, backends and proxy: auto, uring, epoll
    /// (MESH_IO_DRIVER wins, as in the runtime).
    #[arg(long, default_value = "auto")]
    io_driver: runtime::DriverChoice,
    /// Busy CPU outside the harness (% of one CPU) above which the machine is not quiet.
    #[arg(long, default_value_t = 10.0)]
    quiet_threshold: f64,
    /// Re-runs allowed, suite-wide, for runs disturbed by outside load.
    /// Default 4 (quick: 3).
    #[arg(long)]
    max_retries: Option<usize>,
}

/// http1-open's default rate (requests/s).
const DEFAULT_HTTP_RATE: f64 = 10_000.0;

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = runtime::config::duration::parse(s)?;
    if d.is_zero() && !s.trim().starts_with('0') {
        return Err("duration must be positive".into());
    }
    Ok(d)
}

/// `NAME: VALUE`, a valid HTTP field.
fn parse_header(s: &str) -> Result<(String, String), String> {
    let (n, v) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected NAME: VALUE"))?;
    let (n, v) = (n.trim(), v.trim());
    let token = !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token || v.bytes().any(|b| b < b' ' && b != b'\t') {
        return Err(format!("{s:?}: not a valid HTTP field"));
    }
    if matches!(
        n.to_ascii_lowercase().as_str(),
        "host" | "content-length" | "transfer-encoding" | "connection"
    ) {
        return Err(format!("{n}: set by the harness itself"));
    }
    Ok((n.to_ascii_lowercase(), v.to_string()))
}

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: usize = n.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        u => return Err(format!("unknown size unit {u:?} (use B, KiB or MiB)")),
    };
    Ok(n * mul)
}

fn main() -> ExitCode {
    let mut argv = std::env::args();
    let _argv0 = argv.next();
    let rest: Vec<String> = argv.collect();
    if rest.first().map(String::as_str) == Some(proxy::FORWARDER_ARG) {
        return proxy::forwarder_main(rest[1..].to_vec());
    }
    if rest.first().map(String::as_str) == Some(proxy::HBONE_ARG) {
        return proxy::hbone_main(rest[1..].to_vec());
    }
    if rest.first().map(String::as_str) == Some(proxy::ZTUNNEL_ARG) {
        return proxy::ztunnel_main(rest[1..].to_vec());
    }
    if rest.first().map(String::as_str) == Some(proxy::WAYPOINT_ARG) {
        return proxy::waypoint_main(rest[1..].to_vec());
    }
    if rest.first().map(String::as_str) == Some(idle_client::ARG) {
        return idle_client::child_main(rest[1..].to_vec());
    }
    if std::env::var_os("RUST_LOG").is_some() {
        runtime::init_logging();
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let suite = match plan(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args, suite) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

struct Suite {
    name: &'static str,
    scenarios: Vec<Scenario>,
    paths: Vec<PathKind>,
    knobs: Knobs,
    mesh: bool,
    /// The mesh's layout (None: the legacy per-run proxies).
    layout: Option<mesh::Layout>,
    profile: tuning::Profile,
    peers: Vec<peer::PeerSpec>,
}

fn plan(args: &Args) -> Result<Suite> {
    let custom = !args.scenarios.is_empty()
        || !args.paths.is_empty()
        || args.duration.is_some()
        || args.reps.is_some()
        || args.size.is_some()
        || !args.streams.is_empty()
        || args.rate != 5000.0
        || args.http_rate != DEFAULT_HTTP_RATE;
    let name = if custom {
        "custom"
    } else if args.quick {
        "quick"
    } else {
        "default"
    };
    let quick = args.quick;
    let root = mesh::is_root();
    let layout = match args.topology.as_str() {
        "auto" if root => Some(mesh::Layout::Netns),
        "auto" | "loopback" => Some(mesh::Layout::loopback()),
        "netns" | "mesh" if root => Some(mesh::Layout::Netns),
        "netns" | "mesh" => bail!(
            "--topology netns needs root (network namespaces, nftables); run as root or use \
             --topology loopback"
        ),
        "legacy" => None,
        t => bail!("unknown topology {t:?} (auto, netns, loopback, legacy)"),
    };
    let mesh = layout.is_some();
    if args.socks5.is_some() && !layout.is_some_and(|l| l.is_loopback()) {
        bail!("--socks5 is for --topology loopback");
    }
    let profile = tuning::load_profile(&args.profile)
        .map_err(|e| anyhow::anyhow!("--profile {}: {e}", args.profile))?;
    let kinds: Vec<Kind> = if args.scenarios.is_empty() {
        let mut v = vec![
            Kind::Throughput,
            Kind::Rr,
            Kind::RrOpen,
            Kind::Churn,
            Kind::Http1,
            Kind::Http1Open,
            Kind::Http2,
            Kind::Mixed,
        ];
        // Memory last; idle-http first of them: its figure is the waypoint's, which no
        // earlier memory scenario has grown (see the lower-bound note in `suite::idle_run`);
        // slow-reader (l4, hbone) after the idle ones.
        if layout.is_some() {
            v.push(Kind::IdleHttp);
            v.push(Kind::Idle);
            v.push(Kind::SlowReader);
        }
        // mixed: mesh topologies only; not in --quick (a 0.5 s window of a debug build under
        // outside load can hold no tcp-rr round trip behind the bulk stream; the loopback
        // test runs it explicitly).
        if layout.is_none() || quick {
            v.retain(|k| *k != Kind::Mixed);
        }
        v
    } else {
        let mut v = Vec::new();
        for s in &args.scenarios {
            let k = Kind::parse(s.trim()).with_context(|| {
                format!(
                    "unknown scenario {s:?} (tcp-throughput, tcp-rr, tcp-rr-open, conn-churn, \
                     http1-rps, http1-open, http2-rps, large-body, idle-connections, idle-http, \
                     mixed, slow-reader)"
                )
            })?;
            if !v.contains(&k) {
                v.push(k);
            }
        }
        v
    };
    let mut peers = Vec::new();
    for p in &args.peers {
        let spec = peer::PeerSpec::parse(p)?;
        if peers.iter().any(|x: &peer::PeerSpec| x.name == spec.name) {
            bail!("--peer {}: given twice", spec.name);
        }
        peers.push(spec);
    }
    if !peers.is_empty() && layout != Some(mesh::Layout::Netns) {
        bail!("--peer runs in the netns topology (root)");
    }
    let mut paths: Vec<PathKind> = if args.paths.is_empty() {
        if mesh {
            vec![
                PathKind::Direct,
                PathKind::L4,
                PathKind::Hbone,
                PathKind::Waypoint,
                PathKind::HboneCold,
            ]
        } else {
            vec![
                PathKind::Direct,
                PathKind::L4Copy,
                PathKind::L4Splice,
                PathKind::HboneProxy,
                PathKind::HboneCold,
            ]
        }
    } else {
        let mut v = Vec::new();
        for s in &args.paths {
            let p = PathKind::parse(s.trim()).with_context(|| {
                format!(
                    "unknown path {s:?} (netns, loopback: direct, l4, hbone, waypoint, \
                     hbone-cold; legacy: direct, l4-copy, l4-splice, hbone-proxy, hbone-cold)"
                )
            })?;
            if !matches!(p, PathKind::Direct | PathKind::HboneCold) && p.is_mesh() != mesh {
                bail!(
                    "path {} needs the {} topology (this run: {}{})",
                    p.name(),
                    if p.is_mesh() {
                        "netns or loopback"
                    } else {
                        "legacy"
                    },
                    if mesh { "a mesh" } else { "legacy" },
                    if p.is_mesh() && !root {
                        "; the mesh needs root"
                    } else {
                        ""
                    }
                );
            }
            if !v.contains(&p) {
                v.push(p);
            }
        }
        // The baseline goes first so that each repetition starts from it.
        v.sort_by_key(|p| *p != PathKind::Direct);
        v
    };
    paths.extend(peers.iter().map(|p| PathKind::Peer(p.name)));
    let size = args.size.unwrap_or(100);
    if size == 0 {
        bail!("--size must be at least 1 byte");
    }
    if kinds.contains(&Kind::Mixed) && !mesh {
        bail!("mixed runs on the mesh topologies (netns, loopback): its three parts use the pod backends' fixed ports");
    }
    if kinds.contains(&Kind::Churn) && size < 4 {
        bail!("conn-churn needs --size of at least 4 bytes (its length header)");
    }
    if !(args.rate.is_finite() && args.rate >= 1.0 && args.rate <= 10_000_000.0) {
        bail!("--rate must be between 1 and 10000000 requests/s");
    }
    if !(args.http_rate.is_finite() && args.http_rate >= 1.0 && args.http_rate <= 10_000_000.0) {
        bail!("--http-rate must be between 1 and 10000000 requests/s");
    }
    if args.idle_http_conns == 0 || args.slow_conns == 0 {
        bail!("--idle-http-conns and --slow-conns must be at least 1");
    }
    if args.streams.contains(&0) || args.concurrency == 0 || args.write_size == 0 {
        bail!("--streams, --concurrency and --write-size must be at least 1");
    }
    let mut scenarios = Vec::new();
    for k in kinds {
        match k {
            Kind::Throughput => {
                let streams = if args.streams.is_empty() {
                    vec![1, 8]
                } else {
                    args.streams.clone()
                };
                for s in streams {
                    scenarios.push(Scenario {
                        kind: k,
                        conns: s,
                        size,
                        write_size: args.write_size,
                        rate: if k == Kind::RrOpen { args.rate } else { 0.0 },
                        body: 0,
                        h2_streams: 0,
                    });
                }
            }
            Kind::Rr | Kind::RrOpen => {
                let streams = if args.streams.is_empty() {
                    vec![1]
                } else {
                    args.streams.clone()
                };
                for s in streams {
                    scenarios.push(Scenario {
                        kind: k,
                        conns: s,
                        size,
                        write_size: args.write_size,
                        rate: if k == Kind::RrOpen { args.rate } else { 0.0 },
                        body: 0,
                        h2_streams: 0,
                    });
                }
            }
            Kind::Churn => scenarios.push(Scenario {
                kind: k,
                conns: args.concurrency,
                size,
                write_size: args.write_size,
                rate: 0.0,
                body: 0,
                h2_streams: 0,
            }),
            Kind::Http1 | Kind::LargeBody => scenarios.push(Scenario {
                kind: k,
                conns: if k == Kind::LargeBody && args.conns == 64 {
                    // 64 × 1 MiB each way in flight is more than the point; 8 fill the path.
                    8
                } else {
                    args.conns
                },
                size,
                write_size: args.write_size,
                rate: 0.0,
                body: if k == Kind::LargeBody { args.body } else { 0 },
                h2_streams: 0,
            }),
            Kind::Http2 => scenarios.push(Scenario {
                kind: k,
                conns: if args.conns == 64 {
                    64 / args.h2_streams.clamp(1, 64)
                } else {
                    args.conns
                },
                size,
                write_size: args.write_size,
                rate: 0.0,
                body: 0,
                h2_streams: args.h2_streams.max(1),
            }),
            Kind::Mixed => scenarios.push(Scenario {
                kind: k,
                // HTTP connections beside the bulk stream and the rr connection.
                conns: if args.conns == 64 { 8 } else { args.conns },
                size,
                write_size: args.write_size,
                rate: 0.0,
                body: 0,
                h2_streams: 0,
            }),
            Kind::Http1Open => scenarios.push(Scenario {
                kind: k,
                conns: args.conns,
                size,
                write_size: args.write_size,
                rate: args.http_rate,
                body: 0,
                h2_streams: 0,
            }),
            Kind::IdleHttp | Kind::SlowReader => scenarios.push(Scenario {
                kind: k,
                conns: match k {
                    Kind::IdleHttp if quick && args.idle_http_conns == 10000 => 1000,
                    Kind::IdleHttp => args.idle_http_conns,
                    _ => args.slow_conns,
                },
                size,
                write_size: args.write_size,
                rate: 0.0,
                body: 0,
                h2_streams: 0,
            }),
            Kind::Idle => scenarios.push(Scenario {
                kind: k,
                conns: if quick && args.idle_conns == 9000 {
                    1000
                } else {
                    args.idle_conns
                },
                size,
                write_size: args.write_size,
                rate: 0.0,
                body: 0,
                h2_streams: 0,
            }),
        }
    }
    if args.body == 0 || args.body > http1::MAX_BODY || args.conns == 0 || args.idle_conns == 0 {
        bail!("--body must be 1 B..64 MiB; --conns and --idle-conns at least 1");
    }
    // The default suite's budget (about two minutes): rates settle within 0.6 s windows
    // (thousands of operations each); the open-loop and mixed p99s get 1 s (5,000 samples at
    // tcp-rr-open's rate). --duration sets both.
    let duration = args.duration.unwrap_or(if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_millis(600)
    });
    let latency_duration = args.duration.unwrap_or(if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_millis(1000)
    });
    if duration < Duration::from_millis(100) {
        bail!("--duration must be at least 100ms");
    }
    if duration > Duration::from_secs(3600) {
        bail!("--duration must be at most 1h");
    }
    let knobs = Knobs {
        duration,
        latency_duration,
        warmup: args.warmup.unwrap_or(if quick {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(200)
        }),
        reps: args.reps.unwrap_or(if quick { 1 } else { 3 }).max(1),
        quiet_threshold_pct: args.quiet_threshold,
        quiet_sample: if quick {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(200)
        },
        quiet_wait_budget: if quick {
            Duration::ZERO
        } else {
            Duration::from_secs(15)
        },
        max_retries: args.max_retries.unwrap_or(if quick { 3 } else { 4 }),
        io_driver: match args.io_driver {
            runtime::DriverChoice::Auto => "auto",
            runtime::DriverChoice::Uring => "uring",
            runtime::DriverChoice::Epoll => "epoll",
        }
        .to_string(),
        headers: Arc::from(args.headers.clone()),
    };
    Ok(Suite {
        name,
        scenarios,
        paths,
        knobs,
        mesh,
        layout,
        profile,
        peers,
    })
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: Args, suite: Suite) -> Result<ExitCode> {
    let started = Instant::now();
    let (started_utc, stamp) = host::utc_now();
    let out_dir = match &args.out {
        Some(d) => d.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(&stamp),
    };
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating the report folder {}", out_dir.display()))?;

    // Ctrl-C (and SIGTERM): stop at the next check, stop the forwarder, write what we have.
    // A second Ctrl-C exits at once (the forwarder then sees its stdin close and exits too).
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, interrupted.clone())
            .context("installing the signal handler")?;
        signal_hook::flag::register(sig, interrupted.clone())
            .context("installing the signal handler")?;
    }

    // The memory scenarios hold two descriptors per connection here: take the hard limit
    // (children, peers included, inherit it). What still does not fit is sized up front.
    let _ = runtime::sys::raise_nofile_limit();
    let placement = Placement::decide(!args.no_pin);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut host_facts = host::HostFacts::collect(cores);
    let decision = runtime::driver::decide(args.io_driver, 1024).context("io driver")?;
    let gen_cores: Vec<Option<usize>> = (0..placement.gen_threads)
        .map(|i| placement.gen_core(i))
        .collect();
    let tmp = TempDir::new()?;
    let counters = Arc::new(backend::BackendCounters::default());
    // The topology: loopback backends, or the mesh with a backend set in each server pod.
    let mut loop_be = None;
    let mut mesh_up = None;
    let mut peers: Vec<peer::Peer> = Vec::new();
    let mut phases = phases::Phases::default();
    let mut lap = phases.lap("start", started);
    if let Some(layout) = suite.layout {
        eprintln!(
            "bench: bringing up the mesh ({}, two ztunnels{}, profile {})",
            match layout {
                mesh::Layout::Netns => format!(
                    "network namespaces {}{}-*",
                    mesh::PREFIX,
                    std::process::id()
                ),
                mesh::Layout::Loopback { net } =>
                    format!("loopback addresses 127.{net}.*, clients through SOCKS5"),
            },
            if suite.paths.contains(&PathKind::Waypoint) {
                ", a waypoint"
            } else {
                ""
            },
            args.profile
        );
        let spec = mesh::MeshSpec {
            proxy_cores: if placement.pin {
                placement.proxy_cores.clone()
            } else {
                vec![]
            },
            workers: placement.proxy_workers,
            io_driver: suite.knobs.io_driver.clone(),
            profile_name: args.profile.clone(),
            profile: suite.profile.clone(),
            waypoint: suite.paths.contains(&PathKind::Waypoint),
            layout,
            socks5: args.socks5,
            waypoint_docs: match &args.waypoint_docs {
                None => None,
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("--waypoint-docs {}", f.display()))?,
                ),
            },
        };
        let m = mesh::Mesh::up(&spec, &tmp.0).context("bringing up the mesh")?;
        lap = phases.lap("mesh up", lap);
        // The proxies may hold a PM QoS request (the latency profile): record what is in
        // force while they run, not before they started.
        host_facts.idle = host::IdleMode::read();
        if let Some(e) = &m.waypoint_error {
            eprintln!("bench: the waypoint did not start: {e}");
        }
        let in_pod = |name: &str| {
            let ns = m.ns(name);
            backend::start(
                &gen_cores,
                &decision,
                Some((ns.as_str(), m.layout.ip(name).into())),
                counters.clone(),
            )
            .with_context(|| format!("starting the backends in pod {name}"))
        };
        let be = MeshBackends {
            plain: in_pod("plain")?,
            echo: in_pod("echo")?,
            echo_v1: in_pod("echo-v1")?,
        };
        lap = phases.lap("backends", lap);
        if !suite.peers.is_empty() {
            peer::tune_pod(&m)?;
        }
        for spec in &suite.peers {
            eprintln!("bench: starting peer {}: {}", spec.name, spec.cmd);
            let cpus = placement.pin.then_some(placement.proxy_cores.as_slice());
            peers.push(peer::Peer::start(spec, &m, &tmp.0, cpus)?);
        }
        if !suite.peers.is_empty() {
            lap = phases.lap("peers start", lap);
        }
        mesh_up = Some((m, be));
    } else {
        loop_be = Some(backend::start(
            &gen_cores,
            &decision,
            None,
            counters.clone(),
        )?);
    }
    let backend_drivers = loop_be
        .as_ref()
        .map(|b| b.drivers.clone())
        .or_else(|| mesh_up.as_ref().map(|(_, be)| be.plain.drivers.clone()))
        .unwrap_or_default();

    let total_runs: usize = suite
        .scenarios
        .iter()
        .map(|sc| {
            let paths = suite.paths.iter().filter(|p| p.carries(sc.kind)).count();
            paths
                * if sc.kind.is_memory() {
                    1
                } else {
                    suite.knobs.reps
                }
        })
        .sum();
    // Rough: each run's warm-up (its quiet check) and window; a memory run ≈ 5 s.
    let estimate: f64 = suite
        .scenarios
        .iter()
        .map(|sc| {
            let paths = suite.paths.iter().filter(|p| p.carries(sc.kind)).count() as f64;
            if sc.kind.is_memory() {
                return paths * 5.0;
            }
            let window = if sc.kind.is_latency() {
                suite.knobs.latency_duration
            } else {
                suite.knobs.duration
            };
            let per_run = window + suite.knobs.warmup;
            paths * suite.knobs.reps as f64 * (per_run.as_secs_f64() + 0.05)
        })
        .sum();
    eprintln!(
        "bench: {} suite: {} scenario(s) × {} path(s) × {} rep(s): {total_runs} runs of {:.1}s{} (≈{:.0}s); \
         pinning {}; generator driver {}; report → {}",
        suite.name,
        suite.scenarios.len(),
        suite.paths.len(),
        suite.knobs.reps,
        suite.knobs.duration.as_secs_f64(),
        latency_window(&suite.knobs, "open loop and mixed "),
        estimate,
        if placement.pin {
            format!(
                "generator+backend on {:?}, proxy on {:?}",
                placement.gen_cores, placement.proxy_cores
            )
        } else {
            "off".to_string()
        },
        decision.kind,
        out_dir.display()
    );
    if let Some(n) = &placement.note {
        eprintln!("bench: {n}");
    }
    if host_facts.idle.mode != "polling" {
        eprintln!(
            "bench: idle CPUs halt (cpuidle driver {}, cpu_dma_latency {}): \
             latency includes wake-ups; compare added µs",
            host_facts
                .idle
                .cpuidle_driver
                .as_deref()
                .unwrap_or("unknown"),
            host_facts
                .idle
                .cpu_dma_latency_us
                .map_or("unreadable".to_string(), |v| format!("{v} µs"))
        );
    }

    let topo = match (&mut mesh_up, &loop_be) {
        (Some((m, be)), _) => Topo::Mesh { mesh: m, be },
        (None, Some(be)) => Topo::Loopback(be),
        (None, None) => unreachable!("one topology is always built"),
    };
    let mut ctx = Ctx {
        knobs: &suite.knobs,
        peers: &mut peers,
        placement: &placement,
        topo,
        counters: counters.clone(),
        decision: &decision,
        cores,
        clk_tck: host_facts.clk_tck,
        tmp: &tmp.0,
        interrupted: interrupted.clone(),
        sizing: Vec::new(),
        fd_baseline: 0,
        phases,
        tty: std::io::stderr().is_terminal(),
        quiet_waited: Duration::ZERO,
        retries_left: suite.knobs.max_retries,
        memory_pids: Vec::new(),
        total_runs,
        seq: 0,
        planned_done: 0,
    };
    // Memory runs that would not fit a process's descriptor limit: sized or skipped, said now.
    ctx.sizing = suite::fit_memory_runs(&ctx, &suite.scenarios, &suite.paths);
    ctx.fd_baseline = fds::open_fds("self").unwrap_or(0);
    for (id, path, z) in &ctx.sizing {
        eprintln!("bench: {id} × {path}: {}", z.reason);
    }
    let mut runs: Vec<Run> = Vec::new();
    let suite_t0 = ctx.phases.lap("planning", lap);
    let before = ctx.phases.total();
    let was_interrupted = suite::run_suite(&mut ctx, &suite.scenarios, &suite.paths, &mut runs)
        .is_err()
        || interrupted.load(std::sync::atomic::Ordering::Relaxed);
    // The decisions as taken (announced at the start, fitted again before each run).
    let sizing_json: Vec<Value> = ctx
        .sizing
        .iter()
        .map(|(id, path, z)| {
            let mut v = json!({"id": id, "path": path});
            if let (Value::Object(o), Ok(Value::Object(z))) = (&mut v, serde_json::to_value(z)) {
                o.extend(z);
            }
            v
        })
        .collect();
    let mut phases = std::mem::take(&mut ctx.phases);
    drop(ctx);
    // The suite's time outside the phases its runs timed (progress lines, figures).
    let inner = phases.total().saturating_sub(before);
    phases.add("between runs", suite_t0.elapsed().saturating_sub(inner));
    lap = Instant::now();
    if was_interrupted {
        eprintln!("\nbench: interrupted; writing a partial report");
    }
    let mesh_facts = mesh_up.as_ref().map(|(m, _)| {
        json!({
            "namespaces_prefix": (!m.layout.is_loopback()).then_some(&m.prefix),
            "socks5": m.socks5,
            "waypoint": m.waypoint.as_ref().map(|w| w.pid),
            "waypoint_error": m.waypoint_error,
            "ztunnel_pids": m.ztunnels.iter().map(|z| z.pid).collect::<Vec<_>>(),
        })
    });
    let mesh_facts = mesh_facts.map(|mut v| {
        if let (Value::Object(o), Some((_, be))) = (&mut v, &mesh_up) {
            o.insert(
                "backends".into(),
                json!({"plain": be.plain.echo.ip(), "echo": be.echo.echo.ip(),
                       "echo_v1": be.echo_v1.http.to_string()}),
            );
        }
        v
    });
    // Tear the mesh down now (peers, children, namespaces, their rules), before the report.
    let peer_logs: Vec<(String, PathBuf)> = peers
        .iter()
        .map(|p| (format!("peer-{}.log", p.spec.name), p.log.clone()))
        .collect();
    drop(peers);
    drop(mesh_up);
    // Each peer's output (nginx's and HAProxy's error logs go there) beside the report.
    for (name, log) in &peer_logs {
        if let Err(e) = std::fs::copy(log, out_dir.join(name)) {
            eprintln!("bench: keeping {}: {e}", log.display());
        }
    }
    lap = phases.lap("teardown", lap);

    // Aggregate per scenario × path.
    let mut entries: Vec<Entry> = Vec::new();
    let mut flags: Vec<String> = Vec::new();
    for sc in &suite.scenarios {
        let direct_runs: Vec<&Run> = runs
            .iter()
            .filter(|r| r.id == sc.id() && r.path == "direct" && !r.superseded)
            .filter(|r| r.failed.is_none())
            .collect();
        let drift = if direct_runs.len() >= 2 {
            let (f, l) = (
                direct_runs[0].figure,
                direct_runs[direct_runs.len() - 1].figure,
            );
            (f > 0.0).then(|| (l - f).abs() / f * 100.0)
        } else {
            None
        };
        if let Some(d) = drift.filter(|d| *d > 10.0) {
            flags.push(format!(
                "{}: first and last direct runs differ by {d:.0}% (> 10%): the machine drifted; \
                 treat this scenario's ratios with care",
                sc.id()
            ));
        }
        let (metric, unit) = sc.kind.metric();
        let mut sc_entries: Vec<Entry> = Vec::new();
        for p in &suite.paths {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.id == sc.id() && r.path == p.name())
                .collect();
            if rs.is_empty() {
                continue;
            }
            sc_entries.push(Entry::build(&rs, sc.params(), metric, unit));
        }
        let direct = sc_entries.iter().find(|e| e.path == "direct").cloned();
        for e in &mut sc_entries {
            e.compare(direct.as_ref(), drift);
        }
        entries.extend(sc_entries);
    }
    let mut failures: Vec<String> = Vec::new();
    let mut rerun: Vec<String> = Vec::new();
    let mut loaded: Vec<String> = Vec::new();
    for r in &runs {
        // A superseded run is not aggregated: re-run for outside load, or starved by it.
        let starved = r.superseded
            && r.failed.as_deref() == Some(suite::NOTHING_MEASURED)
            && r.errors == 0
            && r.backend_errors == 0
            && r.bytes_sent == r.bytes_received;
        if r.superseded && ((r.failed.is_none() && r.errors == 0) || starved) {
            rerun.push(r.seq.to_string());
        } else if !r.quiet || r.disturbed {
            loaded.push(format!(
                "{} ({:.0}%/{:.0}%)",
                r.seq,
                r.pre_busy_pct.unwrap_or(0.0),
                r.other_procs_cpu_pct
            ));
        }
        if let Some(z) = &r.sizing {
            flags.push(format!("{} {}: {}", r.id, r.path, z.reason));
        }
        for n in r.notes.iter().filter(|n| {
            n.contains("forwarder")
                || (n.contains(" proxy") && n.contains("exit"))
                || n.starts_with(suite::LOWER_BOUND)
                || n.starts_with("slow-reader:")
        }) {
            flags.push(format!("run {} ({} {}): {n}", r.seq, r.id, r.path));
        }
        if r.is_failure() && !starved {
            failures.push(format!(
                "run {} ({} {} rep {}): {}",
                r.seq,
                r.id,
                r.path,
                r.rep,
                r.failed.clone().unwrap_or_else(|| format!(
                    "{} client error(s), {} backend error(s), bytes sent {} received {}{}",
                    r.errors,
                    r.backend_errors,
                    r.bytes_sent,
                    r.bytes_received,
                    if r.error_samples.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.error_samples.join("; "))
                    }
                ))
            ));
        }
    }
    for e in &entries {
        if e.saturated_runs > 0 {
            flags.push(format!(
                "{} {}: {} ({} of {} runs achieved below 95% of the {} requests/s asked; \
                 median achieved {}/s): its latency is that of an overloaded path",
                e.id,
                e.path,
                report::SATURATED,
                e.saturated_runs,
                e.used,
                e.target_rate.unwrap_or_default(),
                e.achieved_rate
                    .map(|a| report::r(a.median))
                    .unwrap_or_default()
            ));
        }
    }
    if suite.paths.contains(&PathKind::HboneProxy) && placement.pin {
        flags.push(format!(
            "hbone-proxy: two proxy processes per run (inbound and outbound, one worker each) \
             share the proxy core cpu{}; its proxy CPU is their sum",
            placement.proxy_cores.first().copied().unwrap_or(0)
        ));
    }
    if suite.mesh && placement.pin {
        flags.push(format!(
            "mesh: both ztunnels and the waypoint run one worker each on the proxy core cpu{}; \
             a path's proxy CPU is the sum over the proxies it crosses (l4: ztunnel A; hbone: \
             both ztunnels; waypoint: both ztunnels and the waypoint)",
            placement.proxy_cores.first().copied().unwrap_or(0)
        ));
    }
    if !rerun.is_empty() {
        flags.push(format!(
            "{} run(s) disturbed by outside load were re-run (not aggregated): runs {}",
            rerun.len(),
            rerun.join(", ")
        ));
    }
    if !loaded.is_empty() {
        flags.push(format!(
            "{} run(s) ran under outside load (quiet-wait or re-run budget spent) and are \
             aggregated anyway; run (busy before / other processes during, % of a CPU): {}",
            loaded.len(),
            loaded.join(", ")
        ));
    }
    let ok = failures.is_empty() && !was_interrupted && !runs.is_empty();

    let (finished_utc, _) = host::utc_now();
    let proxy_driver = runs.iter().find_map(|r| r.proxy_driver.clone());
    let kind_str = |k: runtime::DriverKind| k.to_string();
    let report = json!({
        "schema": "mesh-bench/report/v1",
        "ok": ok,
        "interrupted": was_interrupted,
        "started_utc": started_utc,
        "finished_utc": finished_utc,
        "wall_s": report::r(started.elapsed().as_secs_f64()),
        "phases_s": phases.json(),
        "command_line": std::env::args().collect::<Vec<_>>(),
        "suite": suite.name,
        "settings": {
            "scenarios": suite.scenarios.iter().map(|s| s.id()).collect::<Vec<_>>(),
            "paths": suite.paths.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "duration_s": suite.knobs.duration.as_secs_f64(),
            "latency_duration_s": suite.knobs.latency_duration.as_secs_f64(),
            "warmup_s": suite.knobs.warmup.as_secs_f64(),
            "reps": suite.knobs.reps,
            "size": suite.scenarios.first().map(|s| s.size),
            "write_size": args.write_size,
            "throughput_streams": suite.scenarios.iter().filter(|s| s.kind == Kind::Throughput).map(|s| s.conns).collect::<Vec<_>>(),
            "rr_streams": suite.scenarios.iter().filter(|s| s.kind == Kind::Rr).map(|s| s.conns).collect::<Vec<_>>(),
            "rr_open_streams": suite.scenarios.iter().filter(|s| s.kind == Kind::RrOpen).map(|s| s.conns).collect::<Vec<_>>(),
            "rr_open_rate_per_s": suite.scenarios.iter().any(|s| s.kind == Kind::RrOpen).then_some(args.rate),
            "churn_concurrency": args.concurrency,
            "pin": placement.pin,
            "io_driver_requested": suite.knobs.io_driver,
            "quiet_threshold_pct": suite.knobs.quiet_threshold_pct,
            "quiet_sample_s": suite.knobs.quiet_sample.as_secs_f64(),
            "max_retries": suite.knobs.max_retries,
            "topology": match suite.layout {
                Some(mesh::Layout::Netns) => "netns",
                Some(mesh::Layout::Loopback { .. }) => "loopback",
                None => "legacy",
            },
            "http_connections": args.conns,
            "request_headers": args.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "waypoint_docs": args.waypoint_docs.as_ref().map(|f| f.display().to_string()),
            "large_body": args.body,
            "idle_connections": suite.scenarios.iter().find(|s| s.kind == Kind::Idle).map(|s| s.conns),
            "idle_http_connections": suite.scenarios.iter().find(|s| s.kind == Kind::IdleHttp).map(|s| s.conns),
            "slow_reader_connections": suite.scenarios.iter().find(|s| s.kind == Kind::SlowReader).map(|s| s.conns),
            "http_open_rate_per_s": suite.scenarios.iter().any(|s| s.kind == Kind::Http1Open).then_some(args.http_rate),
            "profile": args.profile,
        },
        "mesh": mesh_facts,
        "sizing": sizing_json,
        "host": host_json(&host_facts, &placement, proxy_driver, kind_str(decision.kind),
                          backend_drivers.first().map(|k| kind_str(*k)), &args.profile),
        "results": entries.iter().map(Entry::json).collect::<Vec<Value>>(),
        "runs": runs,
        "flags": flags,
        "failures": failures,
    });
    let json_path = out_dir.join("report.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;

    let table = report::summary_table(&entries);
    let mut md = format!(
        "# bench {} — {started_utc}\n\n{} CPUs ({}), {}; idle: {} (cpuidle driver {}); TCP \
         congestion control: {} (qdisc {}); pinning: {}; proxy io driver: {}; profile: {}; \
         build: {}\n\n\
         Each figure: median [min–max] of {} run(s) of {:.1} s{}; paths interleaved. \
         Client: {} generator + {} backend thread(s), monoio ({}).\n\n{table}",
        suite.name,
        host_facts.cores,
        host_facts.cpu_model.as_deref().unwrap_or("?"),
        host_facts.kernel,
        host_facts.idle.mode,
        host_facts.idle.cpuidle_driver.as_deref().unwrap_or("?"),
        host_facts.tcp_congestion.as_deref().unwrap_or("?"),
        host_facts.default_qdisc.as_deref().unwrap_or("?"),
        if placement.pin {
            format!(
                "generator+backend {:?}, proxy {:?}",
                placement.gen_cores, placement.proxy_cores
            )
        } else {
            "off".into()
        },
        runs.iter()
            .find_map(|r| r.proxy_driver.clone())
            .unwrap_or_else(|| "-".into()),
        args.profile,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        suite.knobs.reps,
        suite.knobs.duration.as_secs_f64(),
        latency_window(&suite.knobs, "tcp-rr-open, http1-open, mixed: "),
        placement.gen_threads,
        placement.gen_threads,
        decision.kind,
    );
    if !flags.is_empty() {
        md.push_str("\nFlags:\n");
        for f in &flags {
            md.push_str(&format!("- {f}\n"));
        }
    }
    if !failures.is_empty() {
        md.push_str("\nFailures:\n");
        for f in &failures {
            md.push_str(&format!("- {f}\n"));
        }
    }
    match svg::write_all(&out_dir, &entries) {
        Ok(files) if !files.is_empty() => {
            md.push_str("\nCharts:\n\n");
            for f in &files {
                md.push_str(&format!("![{f}]({f})\n"));
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("bench: writing the SVG charts: {e}"),
    }
    std::fs::write(out_dir.join("summary.md"), &md)
        .with_context(|| format!("writing {}", out_dir.join("summary.md").display()))?;

    println!("{table}");
    for f in &flags {
        eprintln!("bench: flag: {f}");
    }
    for f in &failures {
        eprintln!("bench: FAILURE: {f}");
    }
    phases.lap("report", lap);
    eprintln!(
        "bench: {} in {:.0}s ({}); report: {}",
        if ok { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64(),
        phases.summary(started.elapsed()),
        json_path.display()
    );
    Ok(if was_interrupted {
        ExitCode::from(130)
    } else if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// ` (WHAT1.0s)` when the latency scenarios' window differs from the others', else nothing.
fn latency_window(k: &Knobs, what: &str) -> String {
    if k.latency_duration == k.duration {
        return String::new();
    }
    format!(" ({what}{:.1}s)", k.latency_duration.as_secs_f64())
}

fn host_json(
    h: &host::HostFacts,
    p: &Placement,
    proxy_driver: Option<String>,
    gen_driver: String,
    be_driver: Option<String>,
    profile: &str,
) -> Value {
    let mut v = serde_json::to_value(h).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("profile".into(), json!(profile));
        m.insert(
            "build".into(),
            json!(if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }),
        );
        m.insert(
            "io_driver".into(),
            json!({"proxy": proxy_driver, "generator": gen_driver, "backend": be_driver}),
        );
        m.insert(
            "pinning".into(),
            json!({
                "enabled": p.pin,
                "generator_cores": if p.pin { json!(p.gen_cores) } else { Value::Null },
                "backend_cores": if p.pin { json!(p.gen_cores) } else { Value::Null },
                "proxy_cores": if p.pin { json!(p.proxy_cores) } else { Value::Null },
                "proxy_workers": p.proxy_workers,
                "note": p.note,
            }),
        );
        m.insert(
            "client".into(),
            json!(format!(
                "built-in: {} generator thread(s) and {} backend thread(s), thread-per-core monoio \
                 ({gen_driver}), in the harness process; throughput measured at the receiving backend",
                p.gen_threads, p.gen_threads
            )),
        );
    }
    v
}
