//! Scenarios, paths and the run loop: paths interleaved within each repetition, a quiet check
//! before every run, proxy CPU and TCP retransmits over every measured window.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::backend::Backends;
use crate::generator::{self, GenResult, Live, Plan, Work};
use crate::host;
use crate::proxy::{HboneSpec, Proxy, ProxySpec};
use crate::report::{fmt_figure, si, Latency, OpenLoop, Run, SATURATED};

/// tcp-rr-open: an achieved rate below this fraction of the target flags the run saturated.
pub const OPEN_LOOP_MIN_FRACTION: f64 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Throughput,
    Rr,
    Churn,
    /// Open-loop request/response at a fixed rate (`tcp-rr-open`).
    RrOpen,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Throughput => "tcp-throughput",
            Kind::Rr => "tcp-rr",
            Kind::Churn => "conn-churn",
            Kind::RrOpen => "tcp-rr-open",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "tcp-throughput" | "throughput" => Some(Kind::Throughput),
            "tcp-rr" | "rr" => Some(Kind::Rr),
            "conn-churn" | "churn" => Some(Kind::Churn),
            "tcp-rr-open" | "rr-open" => Some(Kind::RrOpen),
            _ => None,
        }
    }
    pub fn metric(self) -> (&'static str, &'static str) {
        match self {
            Kind::Throughput => ("gbit_per_s", "Gbit/s"),
            Kind::Rr => ("round_trips_per_s", "1/s"),
            Kind::Churn => ("connections_per_s", "1/s"),
            Kind::RrOpen => ("p99_latency_us", "µs"),
        }
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
        }
    }
    fn work(&self) -> Work {
        match self.kind {
            Kind::Throughput => Work::Throughput {
                write_size: self.write_size,
            },
            Kind::Rr => Work::Rr { size: self.size },
            Kind::Churn => Work::Churn { size: self.size },
            Kind::RrOpen => Work::RrOpen {
                size: self.size,
                // Each connection's share of the rate.
                interval: Duration::from_secs_f64(self.conns as f64 / self.rate.max(1e-3)),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Direct,
    L4Copy,
    L4Splice,
    Hbone,
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::L4Copy => "l4-copy",
            PathKind::L4Splice => "l4-splice",
            PathKind::Hbone => "hbone",
        }
    }
    pub fn parse(s: &str) -> Option<PathKind> {
        match s {
            "direct" => Some(PathKind::Direct),
            "l4-copy" | "copy" => Some(PathKind::L4Copy),
            "l4-splice" | "splice" => Some(PathKind::L4Splice),
            "hbone" => Some(PathKind::Hbone),
            _ => None,
        }
    }
    fn mode(self) -> Option<&'static str> {
        match self {
            PathKind::Direct | PathKind::Hbone => None,
            PathKind::L4Copy => Some("copy"),
            PathKind::L4Splice => Some("splice"),
        }
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
    pub duration: Duration,
    pub warmup: Duration,
    pub reps: usize,
    pub quiet_threshold_pct: f64,
    pub quiet_sample: Duration,
    /// Total time the suite may spend waiting for the machine to become quiet.
    pub quiet_wait_budget: Duration,
    /// Re-runs of runs disturbed by outside load, suite-wide.
    pub max_retries: usize,
    pub io_driver: String,
}

/// Shared state of a suite invocation.
pub struct Ctx<'a> {
    pub knobs: &'a Knobs,
    pub placement: &'a Placement,
    pub backends: &'a Backends,
    pub decision: &'a runtime::driver::DriverDecision,
    pub cores: usize,
    pub clk_tck: u64,
    pub tmp: &'a Path,
    pub interrupted: Arc<AtomicBool>,
    pub tty: bool,
    pub quiet_waited: Duration,
    pub retries_left: usize,
    pub total_runs: usize,
    /// Runs started, including re-runs (the `seq` of the next run).
    pub seq: usize,
    /// Planned runs started (progress counter; re-runs do not advance it).
    pub planned_done: usize,
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
    for sc in scenarios {
        for rep in 1..=ctx.knobs.reps {
            for &path in paths {
                let mut attempt = 1;
                loop {
                    let run = run_one(ctx, sc, path, rep, attempt)?;
                    let retry = run.disturbed && !run.is_failure() && ctx.retries_left > 0;
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
        }
    }
    Ok(())
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
    proxy_ticks: Option<u64>,
    gen_ticks: u64,
    be_ticks: u64,
    sink: u64,
    others: std::collections::HashMap<u32, u64>,
}

/// `proxies`: every proxy process of the path (none on `direct`, two on `hbone`); their CPU
/// is summed.
fn snap(ctx: &Ctx<'_>, proxies: &[Proxy]) -> Snap {
    let mut exclude = vec![std::process::id()];
    exclude.extend(proxies.iter().map(|p| p.pid));
    // The cheap, time-critical readings first.
    let at = Instant::now();
    let proxy_ticks = if proxies.is_empty() {
        None
    } else {
        proxies
            .iter()
            .map(|p| host::proc_cpu_ticks(p.pid))
            .sum::<Option<u64>>()
    };
    let sink = ctx
        .backends
        .counters
        .sink_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    Snap {
        at,
        proxy_ticks,
        gen_ticks: host::thread_cpu_ticks("bench-gen"),
        be_ticks: host::thread_cpu_ticks("bench-be"),
        sink,
        others: host::other_process_ticks(&exclude),
    }
}

fn run_one(
    ctx: &mut Ctx<'_>,
    sc: &Scenario,
    path: PathKind,
    rep: usize,
    attempt: usize,
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
        k.reps,
        if attempt > 1 {
            format!(" (attempt {attempt})")
        } else {
            String::new()
        }
    );
    let mut run = Run {
        seq: ctx.seq,
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
        notes: vec![],
        failed: None,
    };

    // 1. Is the machine quiet? Wait (within the suite's budget) while it is not.
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
    if !run.quiet {
        run.notes.push(format!(
            "machine not quiet before the run: {:.0}% of a CPU busy outside the harness (waited {:.1}s of the suite's budget)",
            run.pre_busy_pct.unwrap_or(0.0),
            ctx.quiet_waited.as_secs_f64()
        ));
    }

    // 2. The proxy, if this path has one.
    let upstream: SocketAddr = match sc.kind {
        Kind::Throughput => ctx.backends.sink,
        Kind::Rr | Kind::RrOpen => ctx.backends.echo,
        Kind::Churn => ctx.backends.reply_close,
    };
    let mut proxies: Vec<Proxy> = Vec::new();
    let started = match (path, path.mode()) {
        (PathKind::Direct, _) => Ok(None),
        (PathKind::Hbone, _) => {
            let spec = HboneSpec {
                backend: upstream,
                core: if ctx.placement.pin {
                    ctx.placement.proxy_cores.first().copied()
                } else {
                    None
                },
                io_driver: k.io_driver.clone(),
                ca_dir: ctx.tmp.join("ca"),
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
        (_, None) => Ok(None),
    };
    let target = match started {
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
                        Some(c) if ctx.placement.pin => format!("the proxy core (cpu{c})"),
                        _ => "the CPUs unpinned".into(),
                    }
                ));
            }
            proxies = ps;
            t
        }
        Err(e) => {
            run.failed = Some(e);
            eprintln!("{label}  FAILED: {}", run.failed.as_deref().unwrap_or(""));
            return Ok(run);
        }
    };
    // Let the proxy's threads settle after start-up.
    std::thread::sleep(Duration::from_millis(30));

    // 3. Generators.
    let retrans0 = host::tcp_retrans_segs();
    let be_err0 = ctx.backends.counters.errors.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let t_warm = t0 + k.warmup;
    let t_end = t_warm + k.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Live::default());
    let (tx, rx) = mpsc::channel();
    // tcp-rr-open: one thread per connection (on the generator cores in turn), so each
    // can wait for its due times with a precise blocking sleep; several connections on one
    // monoio thread would have to busy-wait, and that delays the others' completions.
    let threads = if sc.kind == Kind::RrOpen {
        sc.conns.max(1)
    } else {
        ctx.placement.gen_threads.max(1)
    };
    let mut spawned = 0;
    for i in 0..threads {
        let conns = sc.conns / threads + usize::from(i < sc.conns % threads);
        if conns == 0 {
            continue;
        }
        let plan = Plan {
            work: sc.work(),
            target,
            conns,
            t_warm,
            t_end,
            stop: stop.clone(),
            live: live.clone(),
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
                let b = ctx.backends.counters.sink_bytes.load(Ordering::Relaxed) - s0;
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
    let a = snap(ctx, &proxies);
    let r = wait_until(ctx, t_end, || {
        progress("measure", a.at, k.duration, Some(a.sink))
    });
    let b = snap(ctx, &proxies);
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
    let retrans1 = host::tcp_retrans_segs();
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
    if ctx.interrupted.load(Ordering::Relaxed) {
        return Err(Interrupted);
    }

    // 6. Figures.
    let window = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
    let planned = k.duration.as_secs_f64();
    let tck = ctx.clk_tck.max(1) as f64;
    run.window_s = crate::report::r(window);
    run.bytes_sent = total.sent;
    run.bytes_received = total.received;
    run.errors = total.errors;
    run.error_samples = total.error_samples.clone();
    run.backend_errors = ctx
        .backends
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
    run.proxy_cpu_s = proxy_cpu_s.map(crate::report::r);
    run.proxy_cpu_pct = proxy_cpu_s.map(|c| crate::report::r(c / window * 100.0));
    match sc.kind {
        Kind::Throughput => {
            run.window_bytes = window_bytes;
            let g = window_bytes as f64 * 8.0 / window / 1e9;
            run.gbit_per_s = Some(crate::report::r(g));
            run.figure = g;
            if window_bytes > 0 {
                run.proxy_cpu_s_per_gb =
                    proxy_cpu_s.map(|c| crate::report::r(c / (window_bytes as f64 / 1e9)));
            }
        }
        Kind::Rr | Kind::Churn => {
            let rate = total.ops_window as f64 / planned;
            run.figure = rate;
            if sc.kind == Kind::Rr {
                run.round_trips_per_s = Some(crate::report::r(rate));
            } else {
                run.connections_per_s = Some(crate::report::r(rate));
            }
            if total.ops_window > 0 {
                // CPU over the snapshot window, operations over the planned one: scale.
                run.proxy_cpu_us_per_op = proxy_cpu_s.map(|c| {
                    crate::report::r(c / window * planned / total.ops_window as f64 * 1e6)
                });
            }
        }
        Kind::RrOpen => {
            // Answers received in the window, over the planned window (when behind
            // schedule, requests due in the window may be answered after it, or never).
            let achieved = total.done_window as f64 / planned;
            run.round_trips_per_s = Some(crate::report::r(achieved));
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
                run.proxy_cpu_us_per_op = proxy_cpu_s.map(|c| {
                    crate::report::r(c / window * planned / total.done_window as f64 * 1e6)
                });
            }
        }
    }
    if run.figure <= 0.0 && run.failed.is_none() {
        run.failed = Some("nothing was measured in the window".into());
    }

    // 7. Progress line.
    // tcp-rr-open's figure is its p99, shown with the latencies below.
    let mut line = if sc.kind == Kind::RrOpen {
        label.clone()
    } else {
        format!("{label}  {}", fmt_figure(sc.kind.metric().0, run.figure))
    };
    if let Some(l) = run.latency_us {
        line += &format!("  p50 {:.1} µs  p99 {:.1} µs", l.p50, l.p99);
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
