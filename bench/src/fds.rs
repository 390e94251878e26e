//! Descriptor budgets of the memory scenarios, settled before the suite starts.
//!
//! `idle-connections`, `idle-http` and `slow-reader` hold thousands of connections at once,
//! and every process along the path holds descriptors for them under its `RLIMIT_NOFILE`:
//! the harness two per connection (generator and backend; `idle-http`: one, the clients
//! being in a child process that holds the other), a one-hop proxy two (client side and
//! upstream; a `--peer` is taken to be one), ztunnel A on `l4` two, each ztunnel on `hbone`
//! one, ztunnel A and B on the waypoint path one each (the waypoint multiplexes its tunnels
//! on pooled HBONE connections). A run that needs more than a process may open fails
//! half-way (resets, connections never accepted) and says nothing about memory.
//!
//! So each memory scenario × path is fitted first ([`fit`]): every process's limit (read from
//! `/proc/<pid>/limits` once it runs, the tightest of a peer's processes; the harness's own
//! for itself and its child), less the descriptors it holds already and [`MARGIN`], divided
//! by what it needs per connection; and a peer's `maxconn=` (its config's ceiling on client
//! connections) less 1 % (at least 16) kept spare. When the scenario's count fits, nothing changes. Otherwise the run is
//! *sized*: measured with the largest count that fits, rounded down to two significant
//! digits (memory per connection stays comparable; the count it was measured with is
//! reported), or *skipped* when fewer than [`MIN_CONNS`] fit. Neither is a failure.

use serde::Serialize;

/// Descriptors kept spare in every process beyond those it holds when fitted (rings,
/// eventfds, pipes and files opened later, connections of the harness's own checks).
pub const MARGIN: u64 = 64;

/// Below this many connections a memory figure is mostly noise: the run is skipped.
pub const MIN_CONNS: usize = 100;

/// A process that holds descriptors for a memory scenario's connections.
#[derive(Debug, Clone)]
pub struct Holder {
    /// For messages: "the harness", "nginx pid 42", "ztunnel A pid 7".
    pub name: String,
    /// Its soft `RLIMIT_NOFILE`.
    pub limit: u64,
    /// Descriptors it holds now.
    pub open: u64,
    /// Descriptors it needs per connection of the scenario.
    pub per_conn: u64,
}

impl Holder {
    /// Descriptors it needs for `conns` connections (with what it holds and the margin).
    pub fn needs(&self, conns: usize) -> u64 {
        self.open + MARGIN + self.per_conn * conns as u64
    }
    /// Connections it has room for.
    pub fn room(&self) -> usize {
        if self.per_conn == 0 {
            return usize::MAX;
        }
        (self.limit.saturating_sub(self.open + MARGIN) / self.per_conn) as usize
    }
}

/// A peer's configured ceiling on client connections (`--peer …,maxconn=N`).
#[derive(Debug, Clone)]
pub struct MaxConn {
    pub name: String,
    pub maxconn: usize,
}

impl MaxConn {
    /// Connections kept spare below the ceiling: 1 %, at least 16.
    pub fn spare(&self) -> usize {
        (self.maxconn / 100).max(16)
    }
    pub fn room(&self) -> usize {
        self.maxconn.saturating_sub(self.spare())
    }
}

/// A memory run that cannot have the connections its scenario asks for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sizing {
    /// The scenario's count.
    pub asked: usize,
    /// The count the run is measured with; 0 when skipped.
    pub connections: usize,
    pub skipped: bool,
    /// What binds: "nginx pid 42", "the harness", a peer's name (its maxconn).
    pub limited_by: String,
    /// Descriptors it would need for `asked` (0 when a `maxconn` binds).
    pub needs_fds: u64,
    /// Its descriptor limit (0 when a `maxconn` binds).
    pub limit_fds: u64,
    /// One sentence for the summary, the flags and the start of the run.
    pub reason: String,
}

/// `n` rounded down to two significant digits (9,968 → 9,900; 568 → 560; 43 → 43).
pub fn round_down(n: usize) -> usize {
    let mut unit = 1;
    while n / unit >= 100 {
        unit *= 10;
    }
    n / unit * unit
}

/// Thousands separated with commas, for messages.
pub fn commas(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Fit `asked` connections to `holders` and a peer's `maxconn`: `None` when they fit, else
/// the count to measure with (or a skip) and why.
pub fn fit(asked: usize, holders: &[Holder], maxconn: Option<&MaxConn>) -> Option<Sizing> {
    // The tightest descriptor budget, then the peer's ceiling if tighter.
    let tightest = holders.iter().min_by_key(|h| h.room());
    let fd_room = tightest.map_or(usize::MAX, Holder::room);
    let mc_room = maxconn.map_or(usize::MAX, MaxConn::room);
    let room = fd_room.min(mc_room);
    if room >= asked {
        return None;
    }
    let conns = round_down(room);
    let skipped = conns < MIN_CONNS.min(asked);
    let fd_binds = tightest.filter(|_| fd_room <= mc_room);
    let (limited_by, needs_fds, limit_fds, why) = match (fd_binds, maxconn) {
        (Some(h), _) => (
            h.name.clone(),
            h.needs(asked),
            h.limit,
            format!(
                "needs {} descriptors, limit {} ({}: {} per connection × {} + {} held + {} \
                 spare)",
                commas(h.needs(asked)),
                commas(h.limit),
                h.name,
                h.per_conn,
                commas(asked as u64),
                h.open,
                MARGIN
            ),
        ),
        (None, Some(m)) => (
            m.name.clone(),
            0,
            0,
            format!(
                "{} admits {} connections (maxconn={}, {} kept spare), {} asked",
                m.name,
                commas(m.room() as u64),
                m.maxconn,
                m.spare(),
                commas(asked as u64)
            ),
        ),
        (None, None) => unreachable!("room < asked needs a holder or a maxconn"),
    };
    let reason = if skipped {
        format!(
            "skipped: {why}; room for {room}, under the {} a memory figure needs",
            MIN_CONNS.min(asked)
        )
    } else {
        format!(
            "sized: measured with {} of {} connections: {why}",
            commas(conns as u64),
            commas(asked as u64)
        )
    };
    Some(Sizing {
        asked,
        connections: if skipped { 0 } else { conns },
        skipped,
        limited_by,
        needs_fds,
        limit_fds,
        reason,
    })
}

/// How long the harness's descriptor count must stop falling before a memory run starts
/// with more held than at the suite's start ([`Settle`]).
pub const STILL: std::time::Duration = std::time::Duration::from_secs(1);

/// Before a memory run: have the harness's descriptors settled since the last run?
///
/// Settled when it holds no more than [`MARGIN`] over the suite's start, or when the count
/// has not fallen for [`STILL`] and what it holds leaves the run's fit as announced. The
/// second case is a peer's keep-alive pool of upstream connections (nginx's `keepalive 128`
/// for its `keepalive_timeout`, 60 s; HAProxy's `pool-max-conn`): a bounded number of the
/// harness's backend sockets that stays open whatever it waits, and that the run's fit
/// counts. A count still falling is a run's connections still closing: waited for.
#[derive(Debug, Clone)]
pub struct Settle {
    baseline: u64,
    /// The lowest count seen, and since when.
    low: u64,
    since: std::time::Instant,
}

impl Settle {
    pub fn new(baseline: u64, held: u64, now: std::time::Instant) -> Settle {
        Settle {
            baseline,
            low: held,
            since: now,
        }
    }

    /// One look at the count `held` at `now`; `fit_unchanged`: whether the run's fit with
    /// what is held now is the one announced (asked only once the count has held still, as
    /// a fit reads `/proc`). True when settled.
    pub fn settled(
        &mut self,
        held: u64,
        now: std::time::Instant,
        fit_unchanged: impl FnOnce() -> bool,
    ) -> bool {
        if held <= self.baseline + MARGIN {
            return true;
        }
        if held < self.low {
            self.low = held;
            self.since = now;
        }
        now.saturating_duration_since(self.since) >= STILL && fit_unchanged()
    }
}

/// The soft `RLIMIT_NOFILE` of `pid` ("self" for this process), from `/proc/<pid>/limits`.
pub fn nofile_limit(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    parse_nofile(&text)
}

fn parse_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// Descriptors `pid` ("self") holds now.
pub fn open_fds(pid: &str) -> Option<u64> {
    let d = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(d.count() as u64)
}

/// The harness itself as a holder (`per_conn` descriptors per connection).
pub fn harness(name: &str, per_conn: u64) -> Holder {
    Holder {
        name: name.to_string(),
        limit: nofile_limit("self").unwrap_or(1024),
        open: open_fds("self").unwrap_or(0),
        per_conn,
    }
}

/// Another process as a holder, when `/proc` can tell its limit.
pub fn process(name: &str, pid: u32, per_conn: u64) -> Option<Holder> {
    let p = pid.to_string();
    Some(Holder {
        name: format!("{name} pid {pid}"),
        limit: nofile_limit(&p)?,
        open: open_fds(&p).unwrap_or(0),
        per_conn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_reason(s: &Sizing, prefix: &str) {
        assert!(
            s.reason.starts_with(prefix),
            "{:?} (want {prefix:?}…)",
            s.reason
        );
    }

    fn holder(name: &str, limit: u64, open: u64, per_conn: u64) -> Holder {
        Holder {
            name: name.into(),
            limit,
            open,
            per_conn,
        }
    }

    #[test]
    fn rounding_keeps_two_significant_digits() {
        assert_eq!(round_down(9968), 9900);
        assert_eq!(round_down(10_000), 10_000);
        assert_eq!(round_down(12_345), 12_000);
        assert_eq!(round_down(568), 560);
        assert_eq!(round_down(100), 100);
        assert_eq!(round_down(99), 99);
        assert_eq!(round_down(43), 43);
        assert_eq!(round_down(0), 0);
        assert_eq!(commas(20_064), "20,064");
        assert_eq!(commas(150), "150");
        assert_eq!(commas(1_000_000), "1,000,000");
    }

    #[test]
    fn what_fits_is_left_alone() {
        // nginx's worker under 20,000 holding 10: 2 × 9,000 + 74 fit.
        let nginx = holder("nginx pid 42", 20_000, 10, 2);
        let harness = holder("the harness", 20_000, 150, 2);
        assert_eq!(fit(9000, &[harness.clone(), nginx.clone()], None), None);
        // A holder with nothing per connection never binds.
        assert_eq!(
            fit(1_000_000, &[holder("waypoint", 100, 90, 0)], None),
            None
        );
        assert_eq!(fit(9000, &[], None), None);
    }

    #[test]
    fn a_one_hop_proxy_under_20000_is_sized_for_10000() {
        let nginx = holder("nginx pid 42", 20_000, 10, 2);
        let harness = holder("the harness", 20_000, 150, 1);
        let s = fit(10_000, &[harness, nginx], None).expect("does not fit");
        // (20,000 - 10 - 64) / 2 = 9,963 → 9,900.
        assert_eq!(s.connections, 9900);
        assert!(!s.skipped);
        assert_eq!(s.asked, 10_000);
        assert_eq!(s.limited_by, "nginx pid 42");
        assert_eq!(s.needs_fds, 20_074);
        assert_eq!(s.limit_fds, 20_000);
        assert_reason(
            &s,
            "sized: measured with 9,900 of 10,000 connections: needs 20,074 descriptors, limit 20,000",
        );
    }

    #[test]
    fn the_tightest_process_binds() {
        let peer = holder("peer pid 9", 1200, 16, 2);
        let harness = holder("the harness", 20_000, 150, 2);
        let s = fit(1000, &[harness, peer], None).unwrap();
        // (1,200 - 16 - 64) / 2 = 560.
        assert_eq!(s.connections, 560);
        assert_eq!(s.limited_by, "peer pid 9");
        // The harness binds when it is the tighter one.
        let harness = holder("the harness", 1024, 40, 2);
        let peer = holder("peer pid 9", 20_000, 16, 2);
        let s = fit(9000, &[peer, harness], None).unwrap();
        assert_eq!(s.connections, 460);
        assert_eq!(s.limited_by, "the harness");
    }

    #[test]
    fn too_few_descriptors_skip_the_run() {
        let peer = holder("tiny pid 9", 200, 12, 2);
        let s = fit(1000, &[peer], None).unwrap();
        // (200 - 12 - 64) / 2 = 62 < 100.
        assert!(s.skipped);
        assert_eq!(s.connections, 0);
        assert_eq!(s.needs_fds, 2076);
        assert_eq!(s.limit_fds, 200);
        assert_reason(&s, "skipped: needs 2,076 descriptors, limit 200");
        // A small scenario is skipped only under its own count.
        let peer = holder("tiny pid 9", 200, 12, 2);
        assert_eq!(fit(60, std::slice::from_ref(&peer), None), None);
        let s = fit(70, &[peer], None).unwrap();
        assert!(s.skipped, "62 of 70 fit: under the scenario's count");
    }

    #[test]
    fn a_peers_maxconn_binds_when_tighter() {
        let haproxy = holder("haproxy pid 5", 18_050, 20, 2);
        let mc = MaxConn {
            name: "haproxy".into(),
            maxconn: 9000,
        };
        let s = fit(9000, std::slice::from_ref(&haproxy), Some(&mc)).unwrap();
        // 9,000 - 90 spare = 8,910 → 8,900 (descriptors would allow 8,983).
        assert_eq!(s.connections, 8900);
        assert_eq!(s.limited_by, "haproxy");
        assert!(s.reason.contains("maxconn=9000"), "{}", s.reason);
        // Descriptors bind when they are tighter than the ceiling.
        let s = fit(10_000, &[holder("haproxy pid 5", 10_000, 20, 2)], Some(&mc)).unwrap();
        assert_eq!(s.connections, 4900);
        assert_eq!(s.limit_fds, 10_000);
        // A small ceiling keeps 16 spare.
        let small = MaxConn {
            name: "p".into(),
            maxconn: 500,
        };
        assert_eq!(small.room(), 484);
        assert_eq!(fit(1000, &[], Some(&small)).unwrap().connections, 480);
    }

    #[test]
    fn settled_at_the_baseline_or_once_a_pool_holds_still() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Back to the start's count (within the margin): settled at once.
        let mut s = Settle::new(100, 9_000, t0);
        assert!(s.settled(164, t0, || false));
        // A run's connections closing: not settled while the count falls.
        let mut s = Settle::new(100, 9_000, t0);
        assert!(!s.settled(6_000, at(200), || true));
        assert!(!s.settled(2_000, at(1_100), || true));
        assert!(!s.settled(228, at(2_000), || true));
        // A pool of 128 held: settled once the count has not fallen for STILL…
        assert!(!s.settled(228, at(2_000) + STILL - Duration::from_millis(1), || true));
        assert!(s.settled(228, at(2_000) + STILL, || true));
        // …a count that rises again is no fall: the time since the low still counts.
        assert!(s.settled(240, at(2_000) + STILL * 2, || true));
        // …but not while what is held changes the run's fit.
        assert!(!s.settled(228, at(2_000) + STILL * 5, || false));
        // A fall late in the hold starts the wait for stillness again.
        assert!(!s.settled(200, at(9_000), || true));
        assert!(s.settled(200, at(9_000) + STILL, || true));
    }

    #[test]
    fn limits_are_read_from_proc() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1200                 4096                 files     \n";
        assert_eq!(parse_nofile(text), Some(1200));
        assert_eq!(
            parse_nofile(
                "Max open files            unlimited            unlimited            files\n"
            ),
            Some(u64::MAX)
        );
        assert_eq!(parse_nofile("Max processes 10 10\n"), None);
        // This process: a real limit and at least stdin/stdout/stderr open.
        let me = harness("the harness", 2);
        assert!(me.limit >= 3, "{me:?}");
        assert!(me.open >= 3, "{me:?}");
        let pid = std::process::id();
        let p = process("me", pid, 1).expect("our own /proc entry");
        assert_eq!(p.limit, me.limit);
        assert_eq!(p.name, format!("me pid {pid}"));
    }
}
