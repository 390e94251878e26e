//! The report: `report.json` (schema below) and `summary.md`, written to
//! `bench/results/<UTC timestamp>/` or the folder given by `--out`.
//!
//! # `report.json`, schema `mesh-bench/report/v1`
//!
//! One object. Numbers are JSON numbers; a figure that does not apply is `null`.
//! `Agg` below is `{"median": f64, "min": f64, "max": f64}` over the repetitions used.
//!
//! ```text
//! {
//!   "schema": "mesh-bench/report/v1",
//!   "ok": bool,                    // false: bytes lost, an exchange failed, a proxy failed
//!   "interrupted": bool,           // Ctrl-C: partial report
//!   "started_utc", "finished_utc": "2025-01-31T12:34:56Z", "wall_s": f64,
//!   "phases_s": { "mesh up": f64, "generator start + warm-ups": f64, … }, // wall time per
//!                                   // phase until the report (`crate::phases`; as printed)
//!   "command_line": [string],
//!   "suite": "default" | "quick" | "custom",
//!   "settings": { "scenarios": [string], "paths": [string], "duration_s", "warmup_s",
//!                 "reps", "size", "write_size", "throughput_streams": [int],
//!                 "rr_streams": [int], "rr_open_streams": [int],
//!                 "rr_open_rate_per_s": f64|null, "churn_concurrency", "pin": bool,
//!                 "io_driver_requested", "quiet_threshold_pct", "quiet_sample_s",
//!                 "max_retries", "topology": "netns"|"loopback"|"legacy",
//!                 "http_connections", "large_body", "profile",
//!                 "request_headers": [string] (names of --header fields; values not kept),
//!                 "waypoint_docs": string|null (the --waypoint-docs file),
//!                 "idle_connections", "idle_http_connections", "slow_reader_connections":
//!                     int|null (null: the scenario did not run),
//!                 "latency_duration_s",  // the window of tcp-rr-open, http1-open, mixed
//!                 "http_open_rate_per_s": f64|null },
//!   "mesh": null | { "namespaces_prefix", "socks5", "waypoint", "waypoint_error",
//!                    "ztunnel_pids", "backends" },
//!   "host": { "cores", "cpus_online", "cpu_model", "kernel", "clk_tck", "loopback_mtu",
//!             "ulimit_nofile", "ulimit_memlock",
//!             "tcp_congestion", "default_qdisc": string|null (the host's sysctls; the
//!                 proxies' own sockets follow the profile's runtime.tcp_congestion),
//!             "idle": { "cpuidle_driver", "cpuidle_governor", "cpu_dma_latency_us",
//!                       "mode": "halting" | "polling" | "unknown" | "halting (limit 0 held, but no cpuidle driver obeys it)" },
//!             "profile": "default",              // the runtime tuning profile in use
//!             "build": "release" | "debug",      // how this binary was compiled
//!             "io_driver": { "proxy": "io_uring"|"epoll"|null (from READY),
//!                            "generator": .., "backend": .. },
//!             "pinning": { "enabled", "generator_cores", "backend_cores", "proxy_cores",
//!                          "proxy_workers", "note" },
//!             "client": string },                // what the load generator is
//!   "sizing": [ { "id", "path", Sizing } ],  // memory runs sized or skipped to fit the
//!                                   // descriptor limits (see `crate::fds`): printed at the
//!                                   // start of the run, fitted again just before each one
//!   "results": [ Result ],          // one per scenario × path, in run order
//!   "runs": [ Run ],                // every run in execution order, incl. superseded ones
//!   "flags": [string],              // drift, noisy runs, forwarder trouble, failures
//!   "failures": [string]            // why "ok" is false
//! }
//!
//! Result = {
//!   "scenario": "tcp-throughput" | "tcp-rr" | "tcp-rr-open" | "conn-churn" | "http1-rps"
//!               | "http1-open" | "http2-rps" | "large-body" | "idle-connections"
//!               | "idle-http" | "mixed" | "slow-reader",
//!   "variant": "streams=8" | "size=100B" | "size=100B conc=8" | "size=100B rate=5000/s"
//!              | "body=100B rate=10000/s conns=64" | "conns=9000" ...,
//!   "id": "<scenario>/<variant>",
//!   "path": "direct" | "l4" | "hbone" | "waypoint" | "hbone-cold" | "l4-copy" | "l4-splice"
//!           | "hbone-proxy" | <a --peer name>,
//!   "params": { "streams", "size", "write_size", "concurrency", "rate_per_s", "connections",
//!               "response_body", "body", "streams_per_connection", "socket_buffer", … },
//!                                   // those that apply
//!   "metric": "gbit_per_s" | "round_trips_per_s" | "connections_per_s" | "requests_per_s"
//!             | "p99_latency_us"    // tcp-rr-open, http1-open (open-loop p99), mixed (tcp-rr
//!                                   // p99 under load): lower is better
//!             | "bytes_per_idle_connection"   // idle-connections, idle-http: lower is better
//!             | "bytes_per_slow_connection",  // slow-reader: lower is better
//!   "unit": "Gbit/s" | "1/s" | "µs" | "B",
//!   "figure": Agg + { "spread_pct": (max-min)/median*100, "runs": [f64] },
//!   "direct_median": f64|null,      // the same scenario's direct figure
//!   "ratio_to_direct": f64|null,    // figure.median / direct_median (path / direct, also
//!                                   // for a latency figure: there above 1 is worse)
//!   "lower_is_better": bool,        // true for latency and memory figures
//!   "mixed": null | { "bulk_gbit_per_s", "http_requests_per_s", "http_p50_us",
//!                     "http_p99_us" },       // mixed: medians of what ran beside tcp-rr
//!   "memory": null | {              // idle-connections, idle-http, slow-reader (one run)
//!       "connections", "established": int, "open_s": f64,   // asked, up, seconds to open
//!       "rss_before_kb", "rss_after_kb": [u64],   // VmRSS per proxy, in path order (waypoint:
//!                                   // ztunnel A, waypoint, ztunnel B)
//!       "kernel_tcp_mem_kb": [before, after]|null,   // /proc/net/sockstat TCP mem, machine-wide
//!       "kernel_tcp_bytes_per_connection": f64|null,
//!       "buffered_bytes_per_connection": f64|null }, // slow-reader: written into the path
//!   "open_loop": null | {           // tcp-rr-open, http1-open
//!       "target_rate_per_s": f64,   // --rate / --http-rate, all connections together
//!       "achieved_rate_per_s": Agg, // answers received in the window, per s
//!       "saturated_runs": int,      // runs with achieved < 95 % of target
//!       "saturated": bool },        // any: "saturated: open-loop latency beyond capacity"
//!   "latency_us": null | { "p50": Agg, "p90": Agg, "p99": Agg, "p999": Agg, "max": Agg,
//!                          "mean": Agg },
//!                  // tcp-rr: round trip; conn-churn: connect+exchange+close;
//!                  // http1-rps, http2-rps: request to whole response; idle-*: the first
//!                  // exchange (connect not included);
//!                  // tcp-rr-open, http1-open: completion - due time (coordinated-omission corrected:
//!                  // includes time behind schedule; unsent requests at the window's end
//!                  // enter with their wait so far); per-run percentiles from HdrHistogram
//!                  // (ns precision), then Agg over runs
//!   "added_latency_us": null | { "p50", "p90", "p99", "p999", "max" },
//!                  // median(path) - median(direct) per percentile; null for direct
//!   "proxy_cpu": null | { "cpu_pct": Agg (of one CPU), "cpu_s_per_gb": Agg|null,
//!                         "cpu_us_per_round_trip": Agg|null,   // tcp-rr, tcp-rr-open
//!                         "cpu_us_per_request": Agg|null,      // http1-rps, http1-open, http2-rps
//!                         "cpu_us_per_connection": Agg|null,         // null for direct
//!                         "by_process": { "<name>": { the keys above but by_process } } },
//!                  // all of it the SUM over the proxies the path crosses; by_process splits
//!                  // it per process, read from the same /proc/<pid>/stat samples and
//!                  // aggregated per process over the runs (median [min–max]: the per-process
//!                  // medians add up to the sum's only with one run used). Names, in path
//!                  // order: "ztunnel-a", "waypoint", "ztunnel-b" (mesh); "forwarder",
//!                  // "hbone-in", "hbone-out" (loopback, hbone-cold); a peer's name (its
//!                  // whole process group); {} when there is no CPU figure (memory rows)
//!   "client_cpu": { "generator_pct": Agg, "backend_pct": Agg },      // % of one CPU
//!   "tcp_retransmits": Agg + { "total": u64 },   // /proc/net/snmp RetransSegs per run, every mesh namespace
//!   "bytes": { "sent": u64, "received": u64, "lost": u64 },  // summed over used runs
//!   "errors": u64,
//!   "runs_used": int, "runs_superseded": int,
//!   "quiet": { "all_quiet": bool, "max_pre_busy_pct": f64, "max_other_procs_pct": f64 },
//!   "direct_drift_pct": f64|null,   // |last direct - first direct| / first, per scenario
//!   "drift_flag": bool,             // drift > 10 %
//!   "io_driver": string|null,       // the proxy's, from its READY line
//!   "sizing": null | Sizing,        // memory scenarios: the connections did not fit a
//!                                   // process's descriptor limit (or a peer's maxconn)
//!   "ok": bool                      // a sized or skipped row is not a failure
//! }
//!
//! Sizing = {                        // (see `crate::fds`)
//!   "asked": int,                   // the scenario's count
//!   "connections": int,             // the count the row was measured with; 0: skipped
//!   "skipped": bool,                // fewer than 100 fit: no figure ("figure": null)
//!   "limited_by": string,           // "nginx pid 42", "the harness", a peer's name (maxconn)
//!   "needs_fds", "limit_fds": u64,  // for "asked"; both 0 when a peer's maxconn binds
//!   "reason": string                // "skipped: needs 2,076 descriptors, limit 200 (…)",
//!                                   // "sized: measured with 9,900 of 10,000 connections: …"
//! }
//!
//! Run = {
//!   "seq", "scenario", "variant", "id", "path", "rep", "attempt",
//!   "superseded": bool,             // re-run because of outside load; not aggregated
//!   "window_s": f64,                // measured window (after warm-up)
//!   "figure": f64, "gbit_per_s", "round_trips_per_s", "connections_per_s": f64|null,
//!                                   // tcp-rr-open: figure = p99 µs, round_trips_per_s =
//!                                   // the achieved rate (answers received in the window);
//!                                   // http1-open: the same in requests_per_s
//!   "requests_per_s": f64|null,     // http1-rps, http2-rps, large-body, http1-open, mixed
//!   "mixed": absent | { "bulk_gbit_per_s", "http_requests_per_s", "http_latency_us" },
//!   "idle": null | { "connections", "established", "rss_before_kb", "rss_after_kb",
//!                    "open_s", "kernel_tcp_mem_kb"?, "buffered_bytes"? },  // memory scenarios
//!   "open_loop": null | { "target_rate_per_s", "achieved_rate_per_s": f64,   // open loop
//!                         "due", "late", "unsent": u64,  // requests due in the window;
//!                         // sent > 100 µs after due; never sent
//!                         "saturated": bool },           // achieved < 95 % of target
//!   "window_bytes": u64,            // throughput: bytes the sink received in the window;
//!                                   // large-body: body bytes moved both ways in it (each
//!                                   // write/read counted when it completed)
//!   "ops_window": u64,              // round trips / connections started (tcp-rr-open: due
//!                                   // and answered) in the window
//!   "latency_us": null | { "p50", "p90", "p99", "p999", "max", "mean", "count" },
//!   "bytes_sent", "bytes_received": u64, "errors": u64, "backend_errors": u64,
//!   "error_samples": [string],
//!   "proxy_pid": u32|null, "proxy_driver": string|null, "proxy_cpu_s": f64|null,
//!   "proxy_cpu_pct", "proxy_cpu_s_per_gb", "proxy_cpu_us_per_op": f64|null,
//!   "proxy_cpu_by_process": [ { "name", "cpu_s", "cpu_pct", "cpu_s_per_gb",
//!                               "cpu_us_per_op": f64|null } ],  // the sum split, path order
//!   "proxy_exit": string|null,
//!   "generator_cpu_pct", "backend_cpu_pct": f64,
//!   "tcp_retransmits": u64|null,
//!   "pre_busy_pct": f64|null,       // outside load before the window: other processes' CPU
//!                                   // over the warm-up (memory runs, and a run started again
//!                                   // after a busy warm-up: /proc/stat busy outside this
//!                                   // process over the quiet sample before it)
//!   "pre_steal_pct": f64|null,
//!   "quiet": bool,                  // pre_busy_pct <= threshold
//!   "other_procs_cpu_pct": f64,     // other user processes' CPU during the window
//!   "other_procs_top": string|null, // the busiest of them
//!   "disturbed": bool,              // other_procs_cpu_pct > threshold
//!   "sizing": null | Sizing,        // a memory run sized or skipped (skipped: nothing ran)
//!   "notes": [string], "failed": string|null
//! }
//! ```

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};

/// Median, min and max.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Agg {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Agg {
    pub fn of(values: &[f64]) -> Option<Agg> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Agg {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
    pub fn spread_pct(&self) -> f64 {
        if self.median.abs() > 0.0 {
            (self.max - self.min) / self.median * 100.0
        } else {
            0.0
        }
    }
    pub fn json(&self) -> Value {
        json!({"median": r(self.median), "min": r(self.min), "max": r(self.max)})
    }
}

/// Round for JSON readability (4 significant decimals is plenty for these figures).
pub fn r(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    let mag = if x.abs() >= 1000.0 {
        1.0
    } else if x.abs() >= 1.0 {
        1000.0
    } else {
        1_000_000.0
    };
    (x * mag).round() / mag
}

/// Latency percentiles of one run, µs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    pub count: u64,
}

impl Latency {
    pub fn from_hist(h: &hdrhistogram::Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| r(ns as f64 / 1000.0);
        Some(Latency {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: r(h.mean() / 1000.0),
            count: h.len(),
        })
    }
    pub fn field(&self, name: &str) -> f64 {
        match name {
            "p50" => self.p50,
            "p90" => self.p90,
            "p99" => self.p99,
            "p999" => self.p999,
            "max" => self.max,
            _ => self.mean,
        }
    }
}

/// The flag (and note prefix) of an open-loop run that could not keep its schedule.
pub const SATURATED: &str = "saturated: open-loop latency beyond capacity";

/// tcp-rr-open: the schedule asked for and what was achieved, of one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OpenLoop {
    pub target_rate_per_s: f64,
    /// Answers received in the window, per second of the planned window.
    pub achieved_rate_per_s: f64,
    /// Requests due in the window.
    pub due: u64,
    /// Of those, sent more than 100 µs after their due time.
    pub late: u64,
    /// Of those, never sent (behind schedule at the window's end).
    pub unsent: u64,
    /// achieved < 95 % of target.
    pub saturated: bool,
}

/// idle-connections: the proxies' resident memory around the idle connections.
#[derive(Debug, Clone, Serialize)]
pub struct IdleMem {
    /// Asked for.
    pub connections: u64,
    /// Answered their first exchange before the second RSS reading.
    pub established: u64,
    /// VmRSS of each proxy of the path (in path order), before and with the connections.
    pub rss_before_kb: Vec<u64>,
    pub rss_after_kb: Vec<u64>,
    /// Seconds from the start until every connection was up (or the 60 s bound).
    pub open_s: f64,
    /// Kernel TCP socket memory (`/proc/net/sockstat`, machine-wide) before and with them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_tcp_mem_kb: Option<[u64; 2]>,
    /// slow-reader: bytes the clients had written, all connections, when the path was full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffered_bytes: Option<u64>,
}

/// One proxy process's share of a run's proxy CPU (the run's `proxy_cpu_*` are the sum of
/// these), from the same two /proc/<pid>/stat samples and the same per-unit scaling.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProcCpu {
    /// `ztunnel-a`, `waypoint`, `ztunnel-b`, `forwarder`, `hbone-in`, `hbone-out` or a
    /// peer's name (every process of its group together).
    pub name: String,
    pub cpu_s: Option<f64>,
    pub cpu_pct: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    pub cpu_us_per_op: Option<f64>,
}

/// Proxy CPU over the runs used: the path's sum, or one process's share of it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuAgg {
    pub pct: Option<Agg>,
    pub per_gb: Option<Agg>,
    pub per_op: Option<Agg>,
}

/// mixed: what ran beside the tcp-rr round trips.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Mixed {
    pub bulk_gbit_per_s: f64,
    pub http_requests_per_s: f64,
    pub http_latency_us: Option<Latency>,
}

/// Everything measured in one run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub seq: usize,
    pub scenario: String,
    pub variant: String,
    pub id: String,
    pub path: String,
    pub rep: usize,
    pub attempt: usize,
    pub superseded: bool,
    pub window_s: f64,
    pub figure: f64,
    pub gbit_per_s: Option<f64>,
    pub round_trips_per_s: Option<f64>,
    pub connections_per_s: Option<f64>,
    pub open_loop: Option<OpenLoop>,
    /// mixed: the HTTP/1.1 requests' latency and rate, and the bulk stream's Gbit/s, beside
    /// the tcp-rr round trips (`latency_us`, the figure's p99).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixed: Option<Mixed>,
    /// http1-rps: requests started in the window, per second; large-body: the window's body
    /// bytes (`window_bytes`) in exchanges (2 × body each) per second.
    pub requests_per_s: Option<f64>,
    /// idle-connections.
    pub idle: Option<IdleMem>,
    pub window_bytes: u64,
    pub ops_window: u64,
    pub latency_us: Option<Latency>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub errors: u64,
    pub backend_errors: u64,
    pub error_samples: Vec<String>,
    pub proxy_pid: Option<u32>,
    pub proxy_driver: Option<String>,
    pub proxy_cpu_s: Option<f64>,
    pub proxy_cpu_pct: Option<f64>,
    pub proxy_cpu_s_per_gb: Option<f64>,
    pub proxy_cpu_us_per_op: Option<f64>,
    pub proxy_cpu_by_process: Vec<ProcCpu>,
    pub proxy_exit: Option<String>,
    pub generator_cpu_pct: f64,
    pub backend_cpu_pct: f64,
    pub tcp_retransmits: Option<u64>,
    /// Outside load before the window: other processes' CPU over the warm-up, or (memory
    /// runs, and a run started again after a busy warm-up) `/proc/stat` busy CPU outside the
    /// harness over the quiet sample before the run.
    pub pre_busy_pct: Option<f64>,
    pub pre_steal_pct: Option<f64>,
    pub quiet: bool,
    pub other_procs_cpu_pct: f64,
    pub other_procs_top: Option<String>,
    pub disturbed: bool,
    /// This attempt's warm-up was not quiet: it is dropped and started again (not reported).
    #[serde(skip)]
    pub busy_warmup: bool,
    /// Memory runs whose connections did not fit the descriptor limits.
    pub sizing: Option<crate::fds::Sizing>,
    pub notes: Vec<String>,
    pub failed: Option<String>,
}

impl Run {
    /// Skipped up front (too few descriptors): nothing ran, nothing failed.
    pub fn is_skipped(&self) -> bool {
        self.sizing.as_ref().is_some_and(|s| s.skipped)
    }
    /// Lost bytes or failed exchanges: the suite must exit non-zero.
    pub fn is_failure(&self) -> bool {
        self.failed.is_some()
            || self.errors > 0
            || self.backend_errors > 0
            || self.bytes_sent != self.bytes_received
    }
}

/// A scenario × path line of the report, built from its runs.
#[derive(Debug, Clone)]
pub struct Entry {
    pub scenario: String,
    pub variant: String,
    pub id: String,
    pub path: String,
    pub params: Value,
    pub metric: &'static str,
    pub unit: &'static str,
    pub figure: Option<Agg>,
    pub runs_fig: Vec<f64>,
    pub direct_median: Option<f64>,
    pub ratio: Option<f64>,
    pub latency: Option<[(&'static str, Agg); 6]>,
    pub added: Option<Vec<(&'static str, f64)>>,
    pub proxy_cpu_pct: Option<Agg>,
    pub proxy_cpu_per_gb: Option<Agg>,
    pub proxy_cpu_per_op: Option<Agg>,
    /// The sum split per proxy process, in path order (see [`ProcCpu`]).
    pub proxy_cpu_by_process: Vec<(String, CpuAgg)>,
    pub gen_cpu: Option<Agg>,
    pub be_cpu: Option<Agg>,
    pub retrans: Option<Agg>,
    pub retrans_total: u64,
    pub sent: u64,
    pub received: u64,
    pub errors: u64,
    pub used: usize,
    pub superseded: usize,
    pub all_quiet: bool,
    pub max_pre_busy: f64,
    pub max_other: f64,
    pub drift_pct: Option<f64>,
    pub drift_flag: bool,
    pub io_driver: Option<String>,
    pub ok: bool,
    /// The figure is a latency (tcp-rr-open's p99): the ratio to direct is path / direct as
    /// everywhere, so above 1 means worse.
    pub lower_is_better: bool,
    /// tcp-rr-open: the target rate, the achieved rate over runs, and runs saturated.
    pub target_rate: Option<f64>,
    pub achieved_rate: Option<Agg>,
    pub saturated_runs: usize,
    /// mixed: medians over runs of the bulk Gbit/s and the HTTP p50/p99 (µs).
    pub mixed: Option<[f64; 4]>,
    /// Memory scenarios: the (single) run's readings.
    pub memory: Option<IdleMem>,
    /// Memory scenarios: sized or skipped to fit the descriptor limits.
    pub sizing: Option<crate::fds::Sizing>,
}

const PCTS: [&str; 6] = ["p50", "p90", "p99", "p999", "max", "mean"];

impl Entry {
    /// Build from the runs of one scenario × path (superseded runs are counted, not used).
    pub fn build(runs: &[&Run], params: Value, metric: &'static str, unit: &'static str) -> Entry {
        let first = runs[0];
        let used: Vec<&Run> = runs
            .iter()
            .copied()
            .filter(|r| !r.superseded && r.failed.is_none() && !r.is_skipped())
            .collect();
        let vals = |f: &dyn Fn(&Run) -> Option<f64>| -> Option<Agg> {
            Agg::of(&used.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        let runs_fig: Vec<f64> = used.iter().map(|r| r.figure).collect();
        let latency = if used.iter().any(|r| r.latency_us.is_some()) {
            let mut out = [(
                "",
                Agg {
                    median: 0.0,
                    min: 0.0,
                    max: 0.0,
                },
            ); 6];
            let mut complete = true;
            for (i, name) in PCTS.iter().enumerate() {
                match vals(&|r: &Run| r.latency_us.map(|l| l.field(name))) {
                    Some(a) => out[i] = (name, a),
                    None => complete = false,
                }
            }
            complete.then_some(out)
        } else {
            None
        };
        let all: Vec<&Run> = runs.iter().copied().filter(|r| !r.superseded).collect();
        Entry {
            scenario: first.scenario.clone(),
            variant: first.variant.clone(),
            id: first.id.clone(),
            path: first.path.clone(),
            params,
            metric,
            unit,
            figure: Agg::of(&runs_fig),
            runs_fig,
            direct_median: None,
            ratio: None,
            latency,
            added: None,
            proxy_cpu_pct: vals(&|r: &Run| r.proxy_cpu_pct),
            proxy_cpu_per_gb: vals(&|r: &Run| r.proxy_cpu_s_per_gb),
            proxy_cpu_per_op: vals(&|r: &Run| r.proxy_cpu_us_per_op),
            proxy_cpu_by_process: {
                let mut names: Vec<&str> = Vec::new();
                for p in used.iter().flat_map(|r| &r.proxy_cpu_by_process) {
                    if !names.contains(&p.name.as_str()) {
                        names.push(&p.name);
                    }
                }
                names
                    .into_iter()
                    .map(|n| {
                        let of = |f: &dyn Fn(&ProcCpu) -> Option<f64>| {
                            vals(&|r: &Run| {
                                r.proxy_cpu_by_process
                                    .iter()
                                    .find(|p| p.name == n)
                                    .and_then(f)
                            })
                        };
                        let a = CpuAgg {
                            pct: of(&|p| p.cpu_pct),
                            per_gb: of(&|p| p.cpu_s_per_gb),
                            per_op: of(&|p| p.cpu_us_per_op),
                        };
                        (n.to_string(), a)
                    })
                    .collect()
            },
            gen_cpu: vals(&|r: &Run| Some(r.generator_cpu_pct)),
            be_cpu: vals(&|r: &Run| Some(r.backend_cpu_pct)),
            retrans: vals(&|r: &Run| r.tcp_retransmits.map(|x| x as f64)),
            retrans_total: used.iter().filter_map(|r| r.tcp_retransmits).sum(),
            sent: all.iter().map(|r| r.bytes_sent).sum(),
            received: all.iter().map(|r| r.bytes_received).sum(),
            errors: all.iter().map(|r| r.errors + r.backend_errors).sum(),
            used: used.len(),
            superseded: runs.iter().filter(|r| r.superseded).count(),
            all_quiet: all.iter().all(|r| r.quiet && !r.disturbed),
            max_pre_busy: all
                .iter()
                .filter_map(|r| r.pre_busy_pct)
                .fold(0.0, f64::max),
            max_other: all
                .iter()
                .map(|r| r.other_procs_cpu_pct)
                .fold(0.0, f64::max),
            drift_pct: None,
            drift_flag: false,
            io_driver: all.iter().find_map(|r| r.proxy_driver.clone()),
            ok: !all.iter().any(|r| r.is_failure())
                && (!used.is_empty() || (!all.is_empty() && all.iter().all(|r| r.is_skipped()))),
            lower_is_better: metric.ends_with("_latency_us") || metric.starts_with("bytes_per_"),
            target_rate: used
                .iter()
                .find_map(|r| r.open_loop.map(|o| o.target_rate_per_s)),
            achieved_rate: vals(&|r: &Run| r.open_loop.map(|o| o.achieved_rate_per_s)),
            memory: runs
                .iter()
                .filter(|r| !r.superseded)
                .find_map(|r| r.idle.clone()),
            sizing: all.iter().find_map(|r| r.sizing.clone()),
            saturated_runs: used
                .iter()
                .filter(|r| r.open_loop.is_some_and(|o| o.saturated))
                .count(),
            mixed: {
                let m = |f: &dyn Fn(&Mixed) -> Option<f64>| {
                    vals(&|r: &Run| r.mixed.as_ref().and_then(f)).map(|a| a.median)
                };
                match (
                    m(&|x| Some(x.bulk_gbit_per_s)),
                    m(&|x| Some(x.http_requests_per_s)),
                    m(&|x| x.http_latency_us.map(|l| l.p50)),
                    m(&|x| x.http_latency_us.map(|l| l.p99)),
                ) {
                    (Some(g), Some(rps), Some(p50), Some(p99)) => Some([g, rps, p50, p99]),
                    _ => None,
                }
            },
        }
    }

    /// Fill the fields that compare with the direct path of the same scenario.
    pub fn compare(&mut self, direct: Option<&Entry>, drift: Option<f64>) {
        self.drift_pct = drift;
        self.drift_flag = drift.is_some_and(|d| d > 10.0);
        let Some(d) = direct else { return };
        self.direct_median = d.figure.map(|a| a.median);
        if let (Some(me), Some(dm)) = (self.figure, self.direct_median) {
            if dm > 0.0 {
                self.ratio = Some(me.median / dm);
            }
        }
        if self.path != "direct" {
            if let (Some(me), Some(dl)) = (&self.latency, &d.latency) {
                self.added = Some(
                    me.iter()
                        .zip(dl.iter())
                        .filter(|((n, _), _)| *n != "mean")
                        .map(|((n, a), (_, b))| (*n, a.median - b.median))
                        .collect(),
                );
            }
        }
    }

    pub fn json(&self) -> Value {
        let is_direct = self.path == "direct";
        let per_op_key = match self.scenario.as_str() {
            "tcp-rr" | "tcp-rr-open" => "cpu_us_per_round_trip",
            "conn-churn" => "cpu_us_per_connection",
            "http1-rps" | "http2-rps" | "http1-open" => "cpu_us_per_request",
            _ => "cpu_us_per_op",
        };
        let agg = |a: &Option<Agg>| a.map(|a| a.json()).unwrap_or(Value::Null);
        // The same keys for the sum and for each process.
        let cpu_keys = |c: &CpuAgg| {
            let mut m = serde_json::Map::new();
            m.insert("cpu_pct".into(), agg(&c.pct));
            m.insert(
                "cpu_s_per_gb".into(),
                if self.scenario == "tcp-throughput" || self.scenario == "large-body" {
                    agg(&c.per_gb)
                } else {
                    Value::Null
                },
            );
            if self.scenario != "tcp-throughput" {
                m.insert(per_op_key.into(), agg(&c.per_op));
            }
            m
        };
        let mut proxy_cpu = serde_json::Map::new();
        if !is_direct {
            proxy_cpu = cpu_keys(&CpuAgg {
                pct: self.proxy_cpu_pct,
                per_gb: self.proxy_cpu_per_gb,
                per_op: self.proxy_cpu_per_op,
            });
            let by: serde_json::Map<String, Value> = self
                .proxy_cpu_by_process
                .iter()
                .map(|(n, c)| (n.clone(), Value::Object(cpu_keys(c))))
                .collect();
            proxy_cpu.insert("by_process".into(), Value::Object(by));
        }
        let mut figure = self.figure.map(|a| a.json()).unwrap_or(Value::Null);
        if let (Value::Object(m), Some(a)) = (&mut figure, self.figure) {
            m.insert("spread_pct".into(), json!(r(a.spread_pct())));
            m.insert(
                "runs".into(),
                json!(self.runs_fig.iter().map(|x| r(*x)).collect::<Vec<_>>()),
            );
        }
        let mut retrans = agg(&self.retrans);
        if let Value::Object(m) = &mut retrans {
            m.insert("total".into(), json!(self.retrans_total));
        }
        json!({
            "scenario": self.scenario,
            "variant": self.variant,
            "id": self.id,
            "path": self.path,
            "params": self.params,
            "metric": self.metric,
            "unit": self.unit,
            "figure": figure,
            "direct_median": self.direct_median.map(r),
            "ratio_to_direct": self.ratio.map(r),
            "lower_is_better": self.lower_is_better,
            "mixed": self.mixed.map(|[g, rps, p50, p99]| json!({
                "bulk_gbit_per_s": r(g),
                "http_requests_per_s": r(rps),
                "http_p50_us": r(p50),
                "http_p99_us": r(p99),
            })),
            "memory": self.memory.as_ref().map(|m| {
                let conns = m.established.max(1) as f64;
                json!({
                    "connections": m.connections,
                    "established": m.established,
                    "open_s": m.open_s,
                    "rss_before_kb": m.rss_before_kb,
                    "rss_after_kb": m.rss_after_kb,
                    "kernel_tcp_mem_kb": m.kernel_tcp_mem_kb,
                    "kernel_tcp_bytes_per_connection": m.kernel_tcp_mem_kb
                        .map(|[a, b]| ((b as f64 - a as f64) * 1024.0 / conns).round()),
                    "buffered_bytes_per_connection": m.buffered_bytes
                        .map(|b| (b as f64 / conns).round()),
                })
            }),
            "open_loop": self.target_rate.map(|t| json!({
                "target_rate_per_s": t,
                "achieved_rate_per_s": agg(&self.achieved_rate),
                "saturated_runs": self.saturated_runs,
                "saturated": self.saturated_runs > 0,
            })),
            "latency_us": self.latency.map(|l| {
                let m: serde_json::Map<String, Value> =
                    l.iter().map(|(n, a)| (n.to_string(), a.json())).collect();
                Value::Object(m)
            }),
            "added_latency_us": self.added.as_ref().map(|v| {
                let m: serde_json::Map<String, Value> =
                    v.iter().map(|(n, x)| (n.to_string(), json!(r(*x)))).collect();
                Value::Object(m)
            }),
            "proxy_cpu": if is_direct { Value::Null } else { Value::Object(proxy_cpu) },
            "client_cpu": {"generator_pct": agg(&self.gen_cpu), "backend_pct": agg(&self.be_cpu)},
            "tcp_retransmits": retrans,
            "bytes": {"sent": self.sent, "received": self.received,
                      "lost": self.sent.saturating_sub(self.received)},
            "errors": self.errors,
            "runs_used": self.used,
            "runs_superseded": self.superseded,
            "quiet": {"all_quiet": self.all_quiet, "max_pre_busy_pct": r(self.max_pre_busy),
                      "max_other_procs_pct": r(self.max_other)},
            "direct_drift_pct": self.drift_pct.map(r),
            "drift_flag": self.drift_flag,
            "io_driver": self.io_driver,
            "sizing": self.sizing,
            "ok": self.ok,
        })
    }
}

/// The memory scenarios' readings, per proxy and from the kernel, for the summary.
pub fn memory_note(m: &IdleMem) -> String {
    let conns = m.established.max(1) as f64;
    let rss: Vec<String> = m
        .rss_before_kb
        .iter()
        .zip(&m.rss_after_kb)
        .map(|(b, a)| {
            format!(
                "{:.1}→{:.1} MB ({:.1} kB/conn)",
                *b as f64 / 1024.0,
                *a as f64 / 1024.0,
                (*a as f64 - *b as f64) / conns
            )
        })
        .collect();
    let mut s = format!(
        "RSS per proxy {}; {} of {} up in {:.1} s",
        rss.join(", "),
        m.established,
        m.connections,
        m.open_s
    );
    if let Some(b) = m.buffered_bytes {
        let _ = write!(s, "; {:.0} kB written per conn", b as f64 / 1024.0 / conns);
    }
    if let Some([a, b]) = m.kernel_tcp_mem_kb {
        let _ = write!(
            s,
            "; kernel TCP memory {:.1}→{:.1} MB ({:.1} kB/conn, all sockets of the machine)",
            a as f64 / 1024.0,
            b as f64 / 1024.0,
            (b as f64 - a as f64) / conns
        );
    }
    s
}

/// Human units for a figure.
pub fn fmt_figure(metric: &str, x: f64) -> String {
    match metric {
        "gbit_per_s" => format!("{x:.2} Gbit/s"),
        "round_trips_per_s" => format!("{} rt/s", si(x)),
        "connections_per_s" => format!("{} conn/s", si(x)),
        "p99_latency_us" => format!("p99 {x:.1} µs"),
        "requests_per_s" => format!("{} req/s", si(x)),
        "bytes_per_idle_connection" | "bytes_per_slow_connection" => format!("{x:.0} B/conn"),
        _ => format!("{x:.3}"),
    }
}

/// Bytes in binary units (`64KiB`, `1MiB`).
pub fn bytes(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1024 && n % 1024 == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

pub fn si(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x >= 1000.0 {
        format!("{:.2}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn fmt_short(metric: &str, x: f64) -> String {
    match metric {
        "gbit_per_s" => format!("{x:.2}"),
        "p99_latency_us" => format!("{x:.1}"),
        _ => si(x),
    }
}

/// How a scenario's proxy CPU is shown.
#[derive(Debug, Clone, Copy, PartialEq)]
enum CpuUnit {
    /// % of one CPU (mixed: three kinds of operation at once).
    Pct,
    PerGb,
    PerRequest,
    PerRoundTrip,
    PerConnection,
}

impl CpuUnit {
    fn label(self) -> &'static str {
        match self {
            CpuUnit::Pct => "% of a CPU",
            CpuUnit::PerGb => "CPU-s/GB",
            CpuUnit::PerRequest => "CPU-µs/req",
            CpuUnit::PerRoundTrip => "CPU-µs/rt",
            CpuUnit::PerConnection => "CPU-µs/conn",
        }
    }
    /// The median, or "?" when it was not measured.
    fn value(self, c: &CpuAgg) -> String {
        let (a, prec) = match self {
            CpuUnit::Pct => (c.pct, 0),
            CpuUnit::PerGb => (c.per_gb, 3),
            _ => (c.per_op, 1),
        };
        a.map(|a| format!("{:.*}", prec, a.median))
            .unwrap_or("?".into())
    }
}

/// None: no CPU figure (memory scenarios).
fn cpu_unit(scenario: &str) -> Option<CpuUnit> {
    Some(match scenario {
        "idle-connections" | "idle-http" | "slow-reader" => return None,
        "mixed" => CpuUnit::Pct,
        "http1-rps" | "http2-rps" | "http1-open" => CpuUnit::PerRequest,
        "tcp-throughput" | "large-body" => CpuUnit::PerGb,
        "tcp-rr" | "tcp-rr-open" => CpuUnit::PerRoundTrip,
        _ => CpuUnit::PerConnection,
    })
}

/// `ztunnel-a 12.1 · waypoint 10.8 · ztunnel-b 12.4 CPU-µs/req (sum 35.3)`: a path's proxy
/// CPU split per process, in path order.
pub fn per_process(e: &Entry) -> String {
    let Some(u) = cpu_unit(&e.scenario) else {
        return String::new();
    };
    let parts: Vec<String> = e
        .proxy_cpu_by_process
        .iter()
        .map(|(n, c)| format!("{n} {}", u.value(c)))
        .collect();
    let sum = CpuAgg {
        pct: e.proxy_cpu_pct,
        per_gb: e.proxy_cpu_per_gb,
        per_op: e.proxy_cpu_per_op,
    };
    format!(
        "{} {} (sum {})",
        parts.join(" · "),
        u.label(),
        u.value(&sum)
    )
}

/// The Markdown summary table (also printed on stdout).
pub fn summary_table(entries: &[Entry]) -> String {
    let mut s = String::new();
    s.push_str("| scenario | path | figure: median [min–max] | direct | of direct | spread | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | added p50 / p99 µs | proxy CPU | retrans/run | notes |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for e in entries {
        let fig = match e.figure {
            None if e.sizing.as_ref().is_some_and(|z| z.skipped) => "skipped".into(),
            Some(a) => format!(
                "{} [{}–{}]",
                fmt_figure(e.metric, a.median),
                fmt_short(e.metric, a.min),
                fmt_short(e.metric, a.max)
            ),
            None => "—".into(),
        };
        // Always path / direct; for a latency figure (lower is better) above 1 is worse,
        // marked with a ↓ ("lower is better") and explained in the notes.
        let ratio = e
            .ratio
            .map(|x| {
                if e.lower_is_better {
                    format!("{x:.2} ↓")
                } else {
                    format!("{x:.2}")
                }
            })
            .unwrap_or("—".into());
        let spread = e
            .figure
            .map(|a| format!("{:.0}%", a.spread_pct()))
            .unwrap_or("—".into());
        let lat = |i: usize| {
            e.latency
                .as_ref()
                .map(|l| format!("{:.1}", l[i].1.median))
                .unwrap_or("—".into())
        };
        let added = e
            .added
            .as_ref()
            .map(|v| {
                let g = |n: &str| v.iter().find(|(k, _)| *k == n).map(|x| x.1).unwrap_or(0.0);
                format!("{:+.1} / {:+.1}", g("p50"), g("p99"))
            })
            .unwrap_or("—".into());
        let cpu = if e.path == "direct" {
            "—".to_string()
        } else {
            let pct = e
                .proxy_cpu_pct
                .map(|a| format!("{:.0}%", a.median))
                .unwrap_or("?".into());
            let sum = CpuAgg {
                pct: e.proxy_cpu_pct,
                per_gb: e.proxy_cpu_per_gb,
                per_op: e.proxy_cpu_per_op,
            };
            match cpu_unit(&e.scenario) {
                None => "—".to_string(),
                // Three kinds of operation at once: no single per-operation figure.
                Some(CpuUnit::Pct) => pct,
                Some(u) => format!("{} {} ({pct})", u.value(&sum), u.label()),
            }
        };
        let retrans = e
            .retrans
            .map(|a| format!("{:.0}", a.median))
            .unwrap_or("?".into());
        let mut notes = Vec::new();
        if !e.ok {
            notes.push("FAILED".to_string());
        }
        if e.drift_flag && e.path == "direct" {
            notes.push(format!(
                "direct drift {:.0}%",
                e.drift_pct.unwrap_or_default()
            ));
        }
        if !e.all_quiet {
            notes.push("outside load".into());
        }
        if let Some(t) = e.target_rate {
            notes.push(format!(
                "{} of {} req/s",
                e.achieved_rate
                    .map(|a| si(a.median))
                    .unwrap_or_else(|| "?".into()),
                si(t)
            ));
            if e.saturated_runs > 0 {
                notes.push(format!(
                    "{SATURATED} ({} of {} runs below 95% of the rate)",
                    e.saturated_runs, e.used
                ));
            }
        }
        if let Some([g, rps, p50, p99]) = e.mixed {
            notes.push(format!(
                "under bulk {g:.2} Gbit/s: http1 {} req/s p50 {p50:.1} µs p99 {p99:.1} µs; \
                 percentiles left are tcp-rr's",
                si(rps)
            ));
        }
        if e.lower_is_better && e.ratio.is_some() && e.path != "direct" {
            notes.push("of direct = p99 path/direct, lower is better".into());
        }
        if let Some(z) = &e.sizing {
            notes.push(z.reason.clone());
        }
        if let Some(m) = &e.memory {
            notes.push(memory_note(m));
        }
        if e.superseded > 0 {
            notes.push(format!("{} re-run", e.superseded));
        }
        let _ = writeln!(
            s,
            "| {} | {} | {fig} | {} | {ratio} | {spread} | {} | {} | {} | {} | {} | {added} | {cpu} | {retrans} | {} |",
            e.id,
            e.path,
            e.direct_median
                .map(|d| fmt_figure(e.metric, d))
                .unwrap_or_else(|| "—".into()),
            lat(0),
            lat(1),
            lat(2),
            lat(3),
            lat(4),
            notes.join("; ")
        );
    }
    let split: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.path != "direct" && e.proxy_cpu_by_process.len() > 1)
        .filter(|e| cpu_unit(&e.scenario).is_some())
        .collect();
    if !split.is_empty() {
        s.push_str(
            "\nProxy CPU per process, median over runs (the table's proxy CPU is the path's \
             sum of them; over several runs the medians need not add up to the sum's):\n\n",
        );
        for e in split {
            let _ = writeln!(s, "- {} × {}: {}", e.id, e.path, per_process(e));
        }
    }
    if entries.iter().any(|e| e.lower_is_better) {
        s.push_str(
            "\n\"of direct\" is path / direct throughout; for tcp-rr-open and http1-open (figure: \
             open-loop p99 latency, coordinated-omission corrected) lower is better, so above 1 \
             (marked ↓) means slower than direct; memory figures are bytes per connection.\n",
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agg_median_min_max() {
        let a = Agg::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((a.median, a.min, a.max), (2.0, 1.0, 3.0));
        let b = Agg::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(b.median, 2.5);
        assert!((b.spread_pct() - 120.0).abs() < 1e-9);
        assert!(Agg::of(&[]).is_none());
    }

    #[test]
    fn a_skipped_memory_run_is_a_row_without_a_figure_not_a_failure() {
        let sc = crate::suite::Scenario {
            kind: crate::suite::Kind::Idle,
            conns: 1000,
            size: 100,
            write_size: 1024,
            rate: 0.0,
            body: 0,
            h2_streams: 0,
        };
        let mut run = crate::suite::blank_run(1, &sc, crate::suite::PathKind::Peer("tiny"), 1, 1);
        let holder = crate::fds::Holder {
            name: "tiny pid 9".into(),
            limit: 200,
            open: 12,
            per_conn: 2,
        };
        run.sizing = crate::fds::fit(1000, &[holder], None);
        assert!(run.is_skipped());
        assert!(!run.is_failure());
        let e = Entry::build(&[&run], sc.params(), "bytes_per_idle_connection", "B");
        assert!(e.ok, "skipped is not failed");
        assert!(e.figure.is_none());
        let j = e.json();
        assert_eq!(j["sizing"]["skipped"], true);
        assert_eq!(j["sizing"]["limit_fds"], 200);
        assert!(j["figure"].is_null());
        let table = summary_table(&[e]);
        assert!(
            table.contains("| idle-connections/conns=1000 | tiny | skipped |"),
            "{table}"
        );
        assert!(
            table.contains("skipped: needs 2,076 descriptors, limit 200"),
            "{table}"
        );
        // A run that failed is still a failure, sized or not.
        let mut failed = crate::suite::blank_run(2, &sc, crate::suite::PathKind::Peer("p"), 1, 1);
        failed.sizing = Some(crate::fds::Sizing {
            skipped: false,
            connections: 500,
            ..run.sizing.clone().unwrap()
        });
        failed.failed = Some("only 400 of 500 connections were established".into());
        assert!(failed.is_failure());
        assert!(!Entry::build(&[&failed], sc.params(), "bytes_per_idle_connection", "B").ok);
    }

    /// A waypoint-path http1-rps run whose proxy CPU is split over the three processes.
    fn split_run(seq: usize, parts: [f64; 3]) -> Run {
        let sc = crate::suite::Scenario {
            kind: crate::suite::Kind::Http1,
            conns: 64,
            size: 100,
            write_size: 1024,
            rate: 0.0,
            body: 100,
            h2_streams: 0,
        };
        let mut run = crate::suite::blank_run(seq, &sc, crate::suite::PathKind::Waypoint, seq, 1);
        run.figure = 1000.0;
        run.bytes_sent = 10;
        run.bytes_received = 10;
        let names = ["ztunnel-a", "waypoint", "ztunnel-b"];
        run.proxy_cpu_by_process = names
            .iter()
            .zip(parts)
            .map(|(n, us)| ProcCpu {
                name: n.to_string(),
                cpu_s: Some(us / 1000.0),
                cpu_pct: Some(us / 10.0),
                cpu_s_per_gb: None,
                cpu_us_per_op: Some(us),
            })
            .collect();
        let sum: f64 = parts.iter().sum();
        run.proxy_cpu_s = Some(sum / 1000.0);
        run.proxy_cpu_pct = Some(sum / 10.0);
        run.proxy_cpu_us_per_op = Some(sum);
        run
    }

    #[test]
    fn proxy_cpu_by_process_aggregates_per_process_over_runs_and_renders() {
        let runs = [
            split_run(1, [12.0, 10.0, 13.0]),
            split_run(2, [11.0, 12.0, 12.0]),
            split_run(3, [14.0, 11.0, 11.0]),
        ];
        let refs: Vec<&Run> = runs.iter().collect();
        let params = json!({});
        let e = Entry::build(&refs, params, "requests_per_s", "1/s");
        let names: Vec<&str> = e
            .proxy_cpu_by_process
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["ztunnel-a", "waypoint", "ztunnel-b"], "path order");
        let a = e.proxy_cpu_by_process[0].1.per_op.unwrap();
        assert_eq!((a.median, a.min, a.max), (12.0, 11.0, 14.0));
        let w = e.proxy_cpu_by_process[1].1.pct.unwrap();
        assert_eq!((w.median, w.min, w.max), (1.1, 1.0, 1.2));
        let sum = e.proxy_cpu_per_op.unwrap();
        assert_eq!((sum.median, sum.min, sum.max), (35.0, 35.0, 36.0));

        let j = e.json();
        let by = &j["proxy_cpu"]["by_process"];
        assert_eq!(by.as_object().unwrap().len(), 3, "{j}");
        assert_eq!(by["waypoint"]["cpu_us_per_request"]["median"], 11.0);
        assert_eq!(by["ztunnel-b"]["cpu_us_per_request"]["max"], 13.0);
        // The same keys as the sum.
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.retain(|k| k != "by_process");
            k.sort();
            k
        };
        assert_eq!(keys(&by["ztunnel-a"]), keys(&j["proxy_cpu"]));
        assert!(keys(&j["proxy_cpu"]).contains(&"cpu_us_per_request".to_string()));
        assert!(by["ztunnel-a"]["cpu_s_per_gb"].is_null());

        // The table keeps one proxy CPU cell (the sum); the split is a line under it.
        let table = summary_table(std::slice::from_ref(&e));
        assert!(table.contains("| 35.0 CPU-µs/req (4%) |"), "{table}");
        assert!(
            table.contains(
                "- http1-rps/body=100B conns=64 × waypoint: ztunnel-a 12.0 · waypoint 11.0 · \
                 ztunnel-b 12.0 CPU-µs/req (sum 35.0)"
            ),
            "{table}"
        );

        // One proxy: no split line; direct: no proxy CPU at all.
        let mut one = split_run(4, [5.0, 0.0, 0.0]);
        one.path = "l4".into();
        one.proxy_cpu_by_process.truncate(1);
        let e1 = Entry::build(&[&one], json!({}), "requests_per_s", "1/s");
        assert_eq!(
            e1.json()["proxy_cpu"]["by_process"]["ztunnel-a"]["cpu_us_per_request"]["median"],
            5.0
        );
        assert!(!summary_table(&[e1]).contains("per process"));
        let mut d = split_run(5, [0.0; 3]);
        d.path = "direct".into();
        d.proxy_cpu_by_process.clear();
        assert!(
            Entry::build(&[&d], json!({}), "requests_per_s", "1/s").json()["proxy_cpu"].is_null()
        );
    }

    #[test]
    fn throughput_splits_in_cpu_s_per_gb() {
        let mut run = split_run(1, [1.0, 2.0, 3.0]);
        run.scenario = "tcp-throughput".into();
        run.id = "tcp-throughput/streams=1".into();
        run.path = "hbone".into();
        run.proxy_cpu_by_process.remove(1);
        for p in &mut run.proxy_cpu_by_process {
            p.cpu_s_per_gb = p.cpu_us_per_op.map(|x| x / 100.0);
        }
        run.proxy_cpu_s_per_gb = Some(0.04);
        let e = Entry::build(&[&run], json!({}), "gbit_per_s", "Gbit/s");
        let j = e.json();
        assert_eq!(
            j["proxy_cpu"]["by_process"]["ztunnel-b"]["cpu_s_per_gb"]["median"],
            0.03
        );
        assert!(j["proxy_cpu"]["by_process"]["ztunnel-b"]
            .get("cpu_us_per_op")
            .is_none());
        assert_eq!(
            per_process(&e),
            "ztunnel-a 0.010 · ztunnel-b 0.030 CPU-s/GB (sum 0.040)"
        );
    }

    #[test]
    fn rounding() {
        assert_eq!(r(12345.678), 12346.0);
        assert_eq!(r(1.23456), 1.235);
        assert_eq!(r(0.0123456), 0.012346);
    }
}
