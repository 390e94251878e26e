//! What the harness reads from the host: `/proc` counters (CPU busy, per-process CPU time,
//! TCP retransmits) and the facts recorded in every report. No `unsafe`: clock ticks come
//! from `getconf CLK_TCK` (100 when that fails), the kernel from `/proc/sys/kernel`.

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Clock ticks per second for `/proc/*/stat` times.
pub fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// The aggregate `cpu` line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    pub fn read() -> Option<CpuTimes> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let g = |i: usize| v.get(i).copied().unwrap_or(0);
        Some(CpuTimes {
            user: g(0),
            nice: g(1),
            system: g(2),
            idle: g(3),
            iowait: g(4),
            irq: g(5),
            softirq: g(6),
            steal: g(7),
        })
    }
    /// Ticks spent running something (guest time is already inside user).
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }
    pub fn total(&self) -> u64 {
        self.busy() + self.idle + self.iowait + self.steal
    }
}

/// utime+stime (ticks) of a process (all its threads) from `/proc/<pid>/stat`.
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).map(|s| s.utime + s.stime)
}

/// utime+stime (ticks) of this process.
pub fn self_cpu_ticks() -> u64 {
    proc_cpu_ticks(std::process::id()).unwrap_or(0)
}

struct StatLine {
    comm: String,
    pgrp: u64,
    flags: u64,
    utime: u64,
    stime: u64,
}

fn parse_stat(text: &str) -> Option<StatLine> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    // Fields after the comm start at field 3 (state).
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let f = |n: usize| -> u64 { rest.get(n - 3).and_then(|x| x.parse().ok()).unwrap_or(0) };
    Some(StatLine {
        comm,
        pgrp: f(5),
        flags: f(9),
        utime: f(14),
        stime: f(15),
    })
}

/// Processes whose process group is `pgid` (a peer and its workers).
pub fn pgrp_pids(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|t| parse_stat(&t))
                .is_some_and(|s| s.pgrp == pgid as u64)
        })
        .collect()
}

/// CPU ticks of this process's threads whose name starts with `prefix`.
pub fn thread_cpu_ticks(prefix: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|t| parse_stat(&t))
        .filter(|s| s.comm.starts_with(prefix))
        .map(|s| s.utime + s.stime)
        .sum()
}

/// utime+stime of every user-space process except `exclude`, by pid.
pub fn other_process_ticks(exclude: &[u32]) -> HashMap<u32, u64> {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if exclude.contains(&pid) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(s) = parse_stat(&text) {
            if s.flags & PF_KTHREAD == 0 {
                out.insert(pid, s.utime + s.stime);
            }
        }
    }
    out
}

/// Ticks other processes used between two [`other_process_ticks`] snapshots, and the
/// busiest of them (`comm`, ticks). A process that appeared in between counts fully.
pub fn other_process_delta(
    before: &HashMap<u32, u64>,
    after: &HashMap<u32, u64>,
) -> (u64, Option<(u32, u64)>) {
    let mut sum = 0;
    let mut top: Option<(u32, u64)> = None;
    for (pid, &t) in after {
        let d = t.saturating_sub(before.get(pid).copied().unwrap_or(0));
        sum += d;
        if d > 0 && top.is_none_or(|(_, td)| d > td) {
            top = Some((*pid, d));
        }
    }
    (sum, top)
}

/// Name of a process (for notes), if it still exists.
pub fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// `Tcp: RetransSegs` from `/proc/thread-self/net/snmp` (the calling thread's network
/// namespace; `/proc/net` would follow the process's main thread instead).
pub fn tcp_retrans_segs() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").ok()?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let names: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let values: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == "RetransSegs")?;
    values.get(i)?.parse().ok()
}

/// How busy the machine is outside this process, sampled over `window`: percent of one CPU
/// (0–100 × cores) from `/proc/stat` busy ticks minus this process's own ticks.
#[derive(Debug, Clone, Serialize)]
pub struct Busy {
    /// Busy CPU outside this process, % of one CPU.
    pub outside_pct: f64,
    /// Steal over the window, % of one CPU.
    pub steal_pct: f64,
    /// The user process that used the most CPU in the window: `comm (pid, %)`.
    pub top: Option<String>,
}

pub fn sample_busy(window: Duration, cores: usize, clk_tck: u64) -> Option<Busy> {
    let me = std::process::id();
    let a = CpuTimes::read()?;
    let sa = self_cpu_ticks();
    let oa = other_process_ticks(&[me]);
    std::thread::sleep(window);
    let b = CpuTimes::read()?;
    let sb = self_cpu_ticks();
    let ob = other_process_ticks(&[me]);
    let total = b.total().saturating_sub(a.total()).max(1) as f64;
    let busy = b.busy().saturating_sub(a.busy()) as f64;
    let ours = sb.saturating_sub(sa) as f64;
    let n = cores.max(1) as f64;
    let (_, top) = other_process_delta(&oa, &ob);
    let secs = window.as_secs_f64().max(1e-3);
    Some(Busy {
        outside_pct: ((busy - ours).max(0.0) / total * 100.0 * n).max(0.0),
        steal_pct: b.steal.saturating_sub(a.steal) as f64 / total * 100.0 * n,
        top: top.map(|(pid, t)| {
            format!(
                "{} (pid {pid}, {:.0}%)",
                proc_comm(pid).unwrap_or_else(|| "?".into()),
                t as f64 / clk_tck.max(1) as f64 / secs * 100.0
            )
        }),
    })
}

/// Host facts recorded in every report.
#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    /// CPUs this process may run on.
    pub cores: usize,
    /// `/sys/devices/system/cpu/online`.
    pub cpus_online: Option<String>,
    pub cpu_model: Option<String>,
    /// `uname -srvm` equivalent from `/proc/sys/kernel`.
    pub kernel: String,
    pub clk_tck: u64,
    pub loopback_mtu: Option<u64>,
    pub ulimit_nofile: Option<String>,
    pub ulimit_memlock: Option<String>,
    pub idle: IdleMode,
    /// `net.ipv4.tcp_congestion_control` (new network namespaces start with it): under `bbr`
    /// every sender on a veth or loopback paces itself with hrtimers, which halved direct
    /// bulk throughput on the dev VM (16 against 36 Gbit/s with `cubic`).
    pub tcp_congestion: Option<String>,
    /// `net.core.default_qdisc`.
    pub default_qdisc: Option<String>,
}

/// How idle CPUs wait, which moves loopback latency by ~3× (see BENCHMARKING.md).
#[derive(Debug, Clone, Serialize)]
pub struct IdleMode {
    /// `/sys/devices/system/cpu/cpuidle/current_driver` (`none`: the default halt loop).
    pub cpuidle_driver: Option<String>,
    pub cpuidle_governor: Option<String>,
    /// The PM QoS CPU latency limit read from `/dev/cpu_dma_latency` (µs), when readable.
    /// 0 means someone holds it at 0: idle CPUs poll instead of halting.
    pub cpu_dma_latency_us: Option<i64>,
    /// `polling` (held at 0), `halting` (not held), or `unknown`.
    pub mode: String,
}

impl HostFacts {
    pub fn collect(cores: usize) -> HostFacts {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let kernel = format!(
            "{} {} {} {}",
            read("/proc/sys/kernel/ostype").unwrap_or_else(|| "Linux".into()),
            read("/proc/sys/kernel/osrelease").unwrap_or_default(),
            read("/proc/sys/kernel/version").unwrap_or_default(),
            std::env::consts::ARCH
        );
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        });
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let limit = |name: &str| {
            limits.lines().find(|l| l.starts_with(name)).map(|l| {
                let v: Vec<&str> = l[name.len()..].split_whitespace().collect();
                format!(
                    "soft {} hard {}",
                    v.first().unwrap_or(&"?"),
                    v.get(1).unwrap_or(&"?")
                )
            })
        };
        HostFacts {
            cores,
            cpus_online: read("/sys/devices/system/cpu/online"),
            cpu_model,
            kernel,
            clk_tck: clk_tck(),
            loopback_mtu: read("/sys/class/net/lo/mtu").and_then(|s| s.parse().ok()),
            tcp_congestion: read("/proc/sys/net/ipv4/tcp_congestion_control"),
            default_qdisc: read("/proc/sys/net/core/default_qdisc"),
            ulimit_nofile: limit("Max open files"),
            ulimit_memlock: limit("Max locked memory"),
            idle: IdleMode::read(),
        }
    }
}

impl IdleMode {
    /// The host's idle facts now. Read again once the proxies run: a profile with
    /// `runtime.cpu_latency_limit` holds the PM QoS request only while they live.
    /// "polling" needs both a limit of 0 and a cpuidle driver to obey it: with driver
    /// `none` the kernel's default idle routine halts whatever the limit says.
    pub fn read() -> IdleMode {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let cpuidle_driver = read("/sys/devices/system/cpu/cpuidle/current_driver");
        let dma = read_cpu_dma_latency();
        let mode = match (dma, cpuidle_driver.as_deref()) {
            (Some(0), Some("none")) => "halting (limit 0 held, but no cpuidle driver obeys it)",
            (Some(0), _) => "polling",
            (Some(_), _) => "halting",
            (None, _) => "unknown",
        };
        IdleMode {
            cpuidle_driver,
            cpuidle_governor: read("/sys/devices/system/cpu/cpuidle/current_governor")
                .or_else(|| read("/sys/devices/system/cpu/cpuidle/current_governor_ro")),
            cpu_dma_latency_us: dma,
            mode: mode.to_string(),
        }
    }
}

/// Reading the device only queries the aggregate limit (our open adds a request at the
/// default value, which constrains nothing, and closing removes it).
fn read_cpu_dma_latency() -> Option<i64> {
    let mut f = std::fs::File::open("/dev/cpu_dma_latency").ok()?;
    let mut b = [0u8; 4];
    f.read_exact(&mut b).ok()?;
    Some(i32::from_ne_bytes(b) as i64)
}

/// `2025-01-31T12:34:56Z` and the folder-friendly `20250131T123456Z`.
pub fn utc_now() -> (String, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_format(secs)
}

pub fn utc_format(secs: u64) -> (String, String) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if mo <= 2 { 1 } else { 0 };
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z"),
        format!("{y:04}{mo:02}{d:02}T{h:02}{m:02}{s:02}Z"),
    )
}

/// This binary, to re-execute (idle clients, proxies, ztunnels): its path while that still
/// names this very file, else `/proc/<our pid>/exe`, which stays this file while the
/// harness runs (a `cargo build` during a run replaced it on disk, and `current_exe()` named
/// the deleted file: "starting the idle client process: No such file or directory"), and
/// which `ip netns exec` resolves the same (`/proc/self/exe` would be `ip`). The path is
/// preferred because a process's name is its executable's file name (`bench`, not `exe`).
pub fn own_exe() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let named = std::env::current_exe()?;
    let running = std::path::PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    match (std::fs::metadata(&named), std::fs::metadata(&running)) {
        (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino() => Ok(named),
        (_, Ok(_)) => Ok(running),
        _ => Ok(named),
    }
}

/// VmRSS of a process, in kB (`/proc/<pid>/status`).
pub fn proc_rss_kb(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The kernel's TCP socket memory (`/proc/net/sockstat`, `TCP: … mem PAGES`; the count is
/// machine-wide, every network namespace), in kB.
pub fn tcp_mem_kb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    parse_tcp_mem_pages(&text).map(|p| p * page_size() / 1024)
}

fn parse_tcp_mem_pages(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next()?.parse().ok();
        }
    }
    None
}

/// The kernel's page size, from this process's first mapping in `/proc/self/smaps`.
fn page_size() -> u64 {
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("KernelPageSize:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_tcp_mem() {
        let t =
            "sockets: used 301\nTCP: inuse 12 orphan 0 tw 3 alloc 14 mem 57\nUDP: inuse 1 mem 2\n";
        assert_eq!(parse_tcp_mem_pages(t), Some(57));
        assert_eq!(parse_tcp_mem_pages("UDP: inuse 1 mem 2\n"), None);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_format(0).0, "1970-01-01T00:00:00Z");
        assert_eq!(utc_format(951_782_400).0, "2000-02-29T00:00:00Z");
        assert_eq!(utc_format(1_735_689_599).1, "20241231T235959Z");
    }

    #[test]
    fn stat_parsing_handles_spaces_in_comm() {
        let line = "42 (a b) c) S 1 2 3 4 5 4194560 7 8 9 10 111 222 0 0 20 0 1 0 5 6 7";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.comm, "a b) c");
        assert_eq!(s.utime, 111);
        assert_eq!(s.stime, 222);
        assert_eq!(s.flags, 4_194_560);
    }

    /// The file [`own_exe`] gives runs this binary even once a build replaced it on disk:
    /// a copy of this test binary replaces its own file and re-executes itself through it
    /// ([`own_exe_after_the_file_is_replaced`] in the copy).
    #[test]
    fn own_exe_runs_this_binary_after_a_rebuild() {
        let exe = own_exe().expect("own_exe");
        assert_eq!(
            exe,
            std::env::current_exe().unwrap(),
            "named by its path while that is this file"
        );
        let dir = std::env::temp_dir().join(format!("bench-own-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let copy = dir.join("bench-copy");
        std::fs::copy(&exe, &copy).unwrap();
        let out = std::process::Command::new(&copy)
            .args([
                "--exact",
                "host::tests::own_exe_after_the_file_is_replaced",
                "--ignored",
                "--nocapture",
            ])
            .env("BENCH_OWN_EXE_CHILD", "1")
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child test ran: {text}");
    }

    #[test]
    #[ignore = "run by own_exe_runs_this_binary_after_a_rebuild, in a copy of this binary"]
    fn own_exe_after_the_file_is_replaced() {
        assert!(
            std::env::var_os("BENCH_OWN_EXE_CHILD").is_some(),
            "only in the copy own_exe_runs_this_binary_after_a_rebuild makes"
        );
        let named = std::env::current_exe().unwrap();
        // A build writes a new file where this one was.
        std::fs::remove_file(&named).unwrap();
        std::fs::write(&named, b"#!/bin/sh\nexit 3\n").unwrap();
        let exe = own_exe().expect("own_exe");
        assert_ne!(exe, named, "the path names another file now");
        let out = std::process::Command::new(&exe)
            .arg("--list")
            .output()
            .expect("re-executing this binary");
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{list}");
        assert!(
            list.contains("own_exe_after_the_file_is_replaced"),
            "this test binary ran: {list}"
        );
    }

    #[test]
    fn proc_readers_work_here() {
        assert!(CpuTimes::read().is_some());
        assert!(tcp_retrans_segs().is_some());
        assert!(proc_cpu_ticks(std::process::id()).is_some());
    }
}
