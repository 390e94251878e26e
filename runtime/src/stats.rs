//! Per-worker counters. Each worker writes only its own (relaxed atomics, no contention);
//! anyone may read them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct WorkerStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub closed: AtomicU64,
    /// Times the accept loop paused because the worker was at `max_connections_per_worker`.
    pub accept_paused: AtomicU64,
    pub accept_errors: AtomicU64,
    pub upstream_connect_errors: AtomicU64,
    pub bytes_client_to_upstream: AtomicU64,
    pub bytes_upstream_to_client: AtomicU64,
    pub resets: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Connections cut when the drain deadline passed.
    pub drain_aborted: AtomicU64,
    /// Busy polling (`runtime.busy_poll`): times the worker started spinning after activity.
    pub busy_poll_spins: AtomicU64,
    /// Busy polling: microseconds spent spinning (CPU the worker burnt instead of sleeping).
    pub busy_poll_us: AtomicU64,
    /// Busy polling: times it paused because other threads took a share of its CPU.
    pub busy_poll_backoffs: AtomicU64,
    /// Connection tasks ended by a panic in their handler (caught: the worker serves on).
    pub worker_task_panics: AtomicU64,
}

impl WorkerStats {
    #[inline]
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// (name, value) pairs, for text exposition.
    pub fn snapshot(&self) -> [(&'static str, u64); 15] {
        [
            ("accepted", self.accepted.load(Relaxed)),
            ("active", self.active.load(Relaxed)),
            ("closed", self.closed.load(Relaxed)),
            ("accept_paused", self.accept_paused.load(Relaxed)),
            ("accept_errors", self.accept_errors.load(Relaxed)),
            (
                "upstream_connect_errors",
                self.upstream_connect_errors.load(Relaxed),
            ),
            (
                "bytes_client_to_upstream",
                self.bytes_client_to_upstream.load(Relaxed),
            ),
            (
                "bytes_upstream_to_client",
                self.bytes_upstream_to_client.load(Relaxed),
            ),
            ("resets", self.resets.load(Relaxed)),
            ("idle_timeouts", self.idle_timeouts.load(Relaxed)),
            ("drain_aborted", self.drain_aborted.load(Relaxed)),
            ("busy_poll_spins", self.busy_poll_spins.load(Relaxed)),
            ("busy_poll_us", self.busy_poll_us.load(Relaxed)),
            ("busy_poll_backoffs", self.busy_poll_backoffs.load(Relaxed)),
            ("worker_task_panics", self.worker_task_panics.load(Relaxed)),
        ]
    }
}

/// Prometheus text exposition of every worker's counters, labelled by worker.
pub fn render_prometheus(prefix: &str, workers: &[std::sync::Arc<WorkerStats>]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if workers.is_empty() {
        return out;
    }
    for (i, (name, _)) in workers[0].snapshot().iter().enumerate() {
        let kind = if *name == "active" {
            "gauge"
        } else {
            "counter"
        };
        let full = if kind == "counter" {
            format!("{prefix}_{name}_total")
        } else {
            format!("{prefix}_{name}")
        };
        let _ = writeln!(out, "# TYPE {full} {kind}");
        for (w, s) in workers.iter().enumerate() {
            let _ = writeln!(out, "{full}{{worker=\"{w}\"}} {}", s.snapshot()[i].1);
        }
    }
    out
}
