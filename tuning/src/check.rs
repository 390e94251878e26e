//! `tuning check`: the host settings that matter to this data plane, what we recommend,
//! and why.

use std::fmt::Write;

/// One finding.
#[derive(Debug, Clone)]
pub struct Finding {
    pub name: String,
    pub value: String,
    pub recommended: String,
    pub ok: bool,
    pub why: &'static str,
    /// The command that applies the recommendation, when there is one.
    pub fix: Option<String>,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn sysctl(name: &str) -> Option<String> {
    read(&format!("/proc/sys/{}", name.replace('.', "/")))
}

fn num(s: &Option<String>, idx: usize) -> Option<u64> {
    s.as_ref()?.split_whitespace().nth(idx)?.parse().ok()
}

fn at_least(name: &str, idx: usize, min: u64, rec: &str, why: &'static str) -> Finding {
    let v = sysctl(name);
    let ok = num(&v, idx).is_some_and(|n| n >= min);
    Finding {
        name: name.into(),
        value: v.unwrap_or_else(|| "unavailable".into()),
        recommended: rec.into(),
        ok,
        why,
        fix: (!ok).then(|| format!("sysctl -w {name}=\"{rec}\"")),
    }
}

/// Inspect the host (recommendations for the default profile).
pub fn run() -> Vec<Finding> {
    run_for(&crate::Profile::default())
}

/// Inspect the host, with the recommendations that depend on the profile (busy polling).
pub fn run_for(profile: &crate::Profile) -> Vec<Finding> {
    let mut f = Vec::new();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    f.push(Finding {
        name: "cores".into(),
        value: format!(
            "{cores} usable, online {}",
            read("/sys/devices/system/cpu/online").unwrap_or_default()
        ),
        recommended: "one worker per core; load generators on other cores".into(),
        ok: true,
        why: "the runtime runs one pinned worker per selected core",
        fix: None,
    });
    let memlock = runtime::sys::memlock_limit().unwrap_or(0);
    let driver = runtime::driver::decide(runtime::DriverChoice::Auto, 1024);
    let (value, ok) = match &driver {
        Ok(d) => (
            format!(
                "{} ({}); ulimit -l {} KiB",
                d.kind,
                d.reason,
                memlock / 1024
            ),
            d.kind == runtime::DriverKind::Uring,
        ),
        Err(e) => (format!("error: {e}"), false),
    };
    f.push(Finding {
        name: "io_uring".into(),
        value,
        recommended: "available; ulimit -l ≥ 8192 KiB on kernels before 5.12".into(),
        ok,
        why: "without io_uring the workers fall back to epoll (works, fewer syscalls saved)",
        fix: (!ok).then(|| "sysctl -w kernel.io_uring_disabled=0; ulimit -l unlimited".into()),
    });
    if let Some(v) = sysctl("kernel.io_uring_disabled") {
        let ok = v == "0";
        f.push(Finding {
            name: "kernel.io_uring_disabled".into(),
            value: v,
            recommended: "0".into(),
            ok,
            why: "1 or 2 disables io_uring for this process",
            fix: (!ok).then(|| "sysctl -w kernel.io_uring_disabled=0".into()),
        });
    }
    let (soft, hard) = nofile();
    f.push(Finding {
        name: "RLIMIT_NOFILE".into(),
        value: format!("soft {soft}, hard {hard}"),
        recommended: "hard ≥ 1048576 (the proxies raise soft to hard at start)".into(),
        ok: hard >= 1 << 20,
        why: "every proxied connection holds two descriptors (four in splice mode)",
        fix: (hard < 1 << 20)
            .then(|| "ulimit -Hn 1048576  # or LimitNOFILE=1048576 in the unit".into()),
    });
    f.push(at_least(
        "fs.nr_open",
        0,
        1 << 20,
        "1048576",
        "upper bound for RLIMIT_NOFILE",
    ));
    f.push(at_least(
        "net.core.somaxconn",
        0,
        4096,
        "4096",
        "caps every listen backlog; bursts of connects beyond it are dropped",
    ));
    f.push(at_least(
        "net.ipv4.tcp_max_syn_backlog",
        0,
        4096,
        "8192",
        "half-open connections kept during connect bursts",
    ));
    f.push(at_least(
        "net.core.rmem_max",
        0,
        16 << 20,
        "16777216",
        "lets TCP autotuning grow receive windows for fast single streams",
    ));
    f.push(at_least(
        "net.core.wmem_max",
        0,
        16 << 20,
        "16777216",
        "lets TCP autotuning grow send buffers for fast single streams",
    ));
    f.push(at_least(
        "net.ipv4.tcp_rmem",
        2,
        16 << 20,
        "4096 131072 16777216",
        "the third value bounds a TCP receive buffer",
    ));
    f.push(at_least(
        "net.ipv4.tcp_wmem",
        2,
        16 << 20,
        "4096 16384 16777216",
        "the third value bounds a TCP send buffer",
    ));
    let ports = sysctl("net.ipv4.ip_local_port_range");
    let span = num(&ports, 1)
        .unwrap_or(0)
        .saturating_sub(num(&ports, 0).unwrap_or(0));
    f.push(Finding {
        name: "net.ipv4.ip_local_port_range".into(),
        value: ports.unwrap_or_else(|| "unavailable".into()),
        recommended: "1024 65535".into(),
        ok: span >= 60000,
        why: "each upstream connection takes a local port per destination (connection churn)",
        fix: (span < 60000).then(|| "sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"".into()),
    });
    f.push(congestion(
        profile,
        sysctl("net.ipv4.tcp_congestion_control").as_deref(),
        sysctl("net.core.default_qdisc").as_deref(),
    ));
    f.extend(busy_polling(profile));
    f.extend(idle(profile, &IdleState::read()));
    f.push(realtime(profile, &RtHost::read()));
    f
}

/// What the host allows for `runtime.sched_fifo_priority`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtHost {
    /// Effective uid of this process (shown; root without CAP_SYS_NICE, as in a typical
    /// pod, is refused like anyone else); `None`: unknown.
    pub euid: Option<u32>,
    /// CAP_SYS_NICE in the effective set (any FIFO priority); `None`: unknown, then root
    /// counts as holding it.
    pub cap_sys_nice: Option<bool>,
    /// Soft `RLIMIT_RTPRIO` (highest FIFO priority without CAP_SYS_NICE).
    pub rtprio_limit: Option<u64>,
    /// `kernel.sched_rt_runtime_us` / `kernel.sched_rt_period_us` (RT throttling; -1 = off).
    pub rt_runtime_us: Option<i64>,
    pub rt_period_us: Option<i64>,
}

impl RtHost {
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let euid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2)?.parse().ok());
        let cap_sys_nice = cap_sys_nice(&status);
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let rtprio_limit = limits
            .lines()
            .find(|l| l.starts_with("Max realtime priority"))
            .and_then(|l| {
                let v = l.split_whitespace().nth(3)?;
                if v == "unlimited" {
                    Some(u64::MAX)
                } else {
                    v.parse().ok()
                }
            });
        let int = |n: &str| sysctl(n).and_then(|v| v.parse().ok());
        RtHost {
            euid,
            cap_sys_nice,
            rtprio_limit,
            rt_runtime_us: int("kernel.sched_rt_runtime_us"),
            rt_period_us: int("kernel.sched_rt_period_us"),
        }
    }
}

/// CAP_SYS_NICE (bit 23) in the `CapEff:` line of a `/proc/<pid>/status` text; `None` when
/// the line is missing or not hex.
pub fn cap_sys_nice(status: &str) -> Option<bool> {
    const CAP_SYS_NICE: u32 = 23;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some((caps >> CAP_SYS_NICE) & 1 == 1)
}

/// `runtime.sched_fifo_priority` of `profile` against what this host allows.
pub fn realtime(profile: &crate::Profile, host: &RtHost) -> Finding {
    let throttle = match (host.rt_runtime_us, host.rt_period_us) {
        (Some(-1), _) => "RT throttling off (kernel.sched_rt_runtime_us -1)".to_string(),
        (Some(r), Some(p)) if p > 0 => format!(
            "RT throttling leaves normal threads {}% of a busy core",
            100 - (r * 100 / p).clamp(0, 100)
        ),
        _ => "RT throttling unknown".to_string(),
    };
    let nice = host.cap_sys_nice.unwrap_or(host.euid == Some(0));
    let allowed = |prio: u8| nice || host.rtprio_limit.is_some_and(|l| l >= u64::from(prio));
    let uid = host.euid.map_or("unknown".to_string(), |u| u.to_string());
    let cap = match host.cap_sys_nice {
        Some(true) => "with CAP_SYS_NICE",
        Some(false) => "without CAP_SYS_NICE",
        None => "CAP_SYS_NICE unknown",
    };
    let rlimit = match host.rtprio_limit {
        Some(u64::MAX) => "unlimited".to_string(),
        Some(n) => n.to_string(),
        None => "unknown".to_string(),
    };
    let (value, recommended, ok) = match profile.runtime.sched_fifo_priority {
        None => (
            format!("off in this profile; {throttle}"),
            "off by default; profile latency sets 10 where the proxy's cores are shared with \
             other work"
                .to_string(),
            true,
        ),
        Some(p) if allowed(p) => (
            format!("SCHED_FIFO {p}: allowed here (uid {uid} {cap}, RLIMIT_RTPRIO {rlimit}); {throttle}"),
            "keep the proxy's workers on their own cores where possible; never with \
             runtime.busy_poll"
                .to_string(),
            true,
        ),
        Some(p) => (
            format!(
                "SCHED_FIFO {p}: NOT allowed here (uid {uid} {cap}, RLIMIT_RTPRIO {rlimit}): the workers \
                 will warn and run with normal scheduling; {throttle}"
            ),
            format!("run the proxy with CAP_SYS_NICE (root in a pod needs it added: securityContext.capabilities.add [SYS_NICE]), or with RLIMIT_RTPRIO >= {p} (ulimit -r {p})"),
            false,
        ),
    };
    Finding {
        name: "runtime.sched_fifo_priority".into(),
        value,
        recommended,
        ok,
        why: "a SCHED_FIFO worker preempts the normal threads sharing its core as soon as it \
              wakes, instead of waiting out their time slice: on the dev VM under compile load \
              the worker's wake-up-to-run p99 fell from 3.6 ms to 44 µs. While it has work, \
              normal threads on its core get only what RT throttling leaves",
        fix: None,
    }
}

/// How this host's idle CPUs wait: the cpuidle driver and governor, and the PM QoS CPU
/// latency limit in force (`/dev/cpu_dma_latency`: the smallest request of any process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleState {
    /// `none`: no cpuidle driver, idle CPUs halt (the VM default).
    pub driver: Option<String>,
    pub governor: Option<String>,
    /// The aggregate limit (µs), or why it cannot be read (not root, no device).
    pub pm_qos_limit: Result<i32, String>,
}

impl IdleState {
    pub fn read() -> Self {
        IdleState {
            driver: read("/sys/devices/system/cpu/cpuidle/current_driver"),
            governor: read("/sys/devices/system/cpu/cpuidle/current_governor")
                .or_else(|| read("/sys/devices/system/cpu/cpuidle/current_governor_ro")),
            pm_qos_limit: runtime::pmqos::current_limit().map_err(|e| e.to_string()),
        }
    }
}

/// The kernel's CPU latency limit when nobody asks for one (2000 s).
const PM_QOS_DEFAULT_US: i32 = 2_000_000_000;

/// The idle findings: how idle CPUs wait, whether a PM QoS CPU latency request is in force,
/// and what `runtime.cpu_latency_limit` of `profile` will do about it.
pub fn idle(profile: &crate::Profile, st: &IdleState) -> Vec<Finding> {
    let mut f = Vec::new();
    f.push(Finding {
        name: "cpuidle".into(),
        value: format!(
            "driver {}, governor {}",
            st.driver.as_deref().unwrap_or("unavailable"),
            st.governor.as_deref().unwrap_or("unavailable")
        ),
        recommended: "any; what matters for latency is the PM QoS limit below".into(),
        ok: true,
        why: "driver none: idle CPUs halt (the VM default) and each wake-up costs tens of µs; \
              with a driver (intel_idle, acpi_idle, haltpoll) the governor picks idle states \
              no slower to leave than the PM QoS limit",
        fix: None,
    });
    let in_force = match &st.pm_qos_limit {
        Ok(us) if *us >= PM_QOS_DEFAULT_US => format!("{us} us: no request in force"),
        Ok(0) => "0 us: a request is in force, idle CPUs poll instead of halting".into(),
        Ok(us) => format!("{us} us: a request is in force"),
        Err(e) => format!("unreadable ({e}): run as root to see it"),
    };
    let readable = st.pm_qos_limit.is_ok();
    let (recommended, ok) = match profile.runtime.cpu_latency_limit {
        Some(l) => {
            let l = format!("{}us", l.as_micros());
            (
                if readable {
                    format!(
                        "this profile holds {l} while the proxy runs (runtime.cpu_latency_limit)"
                    )
                } else {
                    format!(
                        "this profile asks for {l} (runtime.cpu_latency_limit): run the proxy as \
                         root, or it only warns and the limit is not held"
                    )
                },
                readable,
            )
        }
        None => (
            "for small request/response latency: profile latency \
             (runtime.cpu_latency_limit: 0us) holds 0 while the proxy runs; otherwise leave it \
             (power)"
                .into(),
            true,
        ),
    };
    f.push(Finding {
        name: "PM QoS CPU latency".into(),
        value: in_force,
        recommended,
        ok,
        why: "/dev/cpu_dma_latency: the smallest request of any process bounds how slow an \
              idle state any CPU may enter; BENCHMARKING.md: held at 0 a loopback 64-byte round \
              trip went p50 54.6 -> 17.6 µs; not reproduced by bench tcp-rr on 2026-11-26 \
              (driver none: direct 31.9 -> 31.7 µs). Host-wide: it keeps every core out of deep idle \
              (power on all cores) and helps every process there",
        fix: None,
    });
    f
}

/// TCP congestion control of the proxy's sockets: the profile's `runtime.tcp_congestion` (and
/// `h2.tcp_congestion` for HBONE), else the host's `net.ipv4.tcp_congestion_control`. `bbr`
/// paces every sender; with no `fq` qdisc to do it (veths and loopback have no qdisc at all)
/// TCP paces itself with an hrtimer per burst, which costs CPU on hops with no bottleneck.
pub fn congestion(profile: &crate::Profile, host: Option<&str>, qdisc: Option<&str>) -> Finding {
    let host_cc = host.unwrap_or("unavailable");
    let pod = profile.runtime.tcp_congestion.as_deref().unwrap_or(host_cc);
    let hbone = profile.h2.tcp_congestion.as_deref().unwrap_or(pod);
    let ok = pod != "bbr" && hbone != "bbr";
    Finding {
        name: "net.ipv4.tcp_congestion_control".into(),
        value: format!(
            "{host_cc} (default_qdisc {}); proxy sockets: {pod}, HBONE sockets: {hbone}",
            qdisc.unwrap_or("unavailable")
        ),
        recommended: if ok {
            "as is".into()
        } else {
            "runtime.tcp_congestion: cubic (profile throughput), or keep bbr only where a real \
             bottleneck link needs it (h2.tcp_congestion: bbr for HBONE between nodes, with fq \
             on the NIC)"
                .into()
        },
        ok,
        why: "bbr paces each TCP sender; without an fq qdisc (veths and loopback have none) the \
              kernel paces with an hrtimer per burst, CPU spent on node-local hops that have no \
              bottleneck. On the 2-vCPU dev VM (host bbr) cubic on the proxies' sockets took \
              hbone from 1.25-1.33 to 1.12-1.15 CPU-s/GB, 5.9 to 6.9 Gbit/s",
        fix: None,
    }
}

/// Busy polling: the kernel's socket busy polling (`net.core.busy_read`, `net.core.busy_poll`,
/// per socket `SO_BUSY_POLL`) and the runtime's own (`runtime.busy_poll`). They are different
/// mechanisms: the kernel's spins in the NAPI poll loop of the device a socket's packets
/// arrived on (real multi-queue NICs; never loopback; veth only with GRO or XDP), the
/// runtime's spins reaping its io_uring completion queue and works on any path.
fn busy_polling(profile: &crate::Profile) -> Vec<Finding> {
    let runtime_bp = profile.runtime.busy_poll;
    let mut f = Vec::new();
    let why_kernel = "socket busy polling (µs) spins in the NIC's NAPI poll loop instead of \
                      waiting for its interrupt: lower latency on real NICs for a CPU per \
                      busy queue; no effect on loopback or plain veth (no NAPI), so the \
                      runtime's own runtime.busy_poll is what helps there";
    let (rec_read, rec_poll) = if runtime_bp.is_zero() {
        ("0 (default: no busy polling)", "0")
    } else {
        (
            "50 on a dedicated NIC queue + cores, else 0 (runtime.busy_poll covers veth/loopback)",
            "50 on a dedicated NIC queue + cores, else 0",
        )
    };
    for (name, rec, why) in [
        ("net.core.busy_read", rec_read, why_kernel),
        (
            "net.core.busy_poll",
            rec_poll,
            "the same for poll/select/epoll waits (µs; the epoll driver), not io_uring completions; needs busy_read's conditions",
        ),
    ] {
        let v = sysctl(name);
        f.push(Finding {
            name: name.into(),
            value: v.unwrap_or_else(|| "unavailable".into()),
            recommended: rec.into(),
            ok: true,
            why,
            fix: None,
        });
    }
    let cores = available_cores();
    f.push(Finding {
        name: "runtime.busy_poll".into(),
        value: if runtime_bp.is_zero() {
            "0 (off in this profile)".into()
        } else {
            format!(
                "{} after each burst of activity ({cores} usable cores)",
                runtime::config::duration::format(runtime_bp)
            )
        },
        recommended: if runtime_bp.is_zero() {
            "off: for latency hold runtime.cpu_latency_limit instead (profile latency), which \
             keeps every CPU on the path awake, not only the proxy's"
                .into()
        } else {
            "give the proxy's worker cores to it alone (cpuset/isolcpus, load generators elsewhere)"
                .into()
        },
        ok: runtime_bp.is_zero() || cores >= 2,
        why: "a worker that spins keeps its own CPU from halting between messages (wake-ups \
              cost tens of µs on VMs), burning that CPU while traffic flows; one that gets \
              less than 3/4 of its CPU while spinning stops for 0.1–5 s, so shared cores get \
              little from it. On the 2-vCPU dev VM 50us gave no tcp-rr gain beyond run-to-run \
              spread at +50-70% proxy CPU per round trip: the generator's and backend's CPUs \
              still halt",
        fix: None,
    });
    f
}

fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn nofile() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    for line in limits.lines() {
        if line.starts_with("Max open files") {
            let v: Vec<u64> = line
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            if v.len() >= 2 {
                return (v[0], v[1]);
            }
        }
    }
    (0, 0)
}

/// A table for people.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for x in findings {
        let _ = writeln!(
            out,
            "{} {:<30} {}",
            if x.ok { "ok  " } else { "WARN" },
            x.name,
            x.value
        );
        let _ = writeln!(
            out,
            "     {:<30} recommended: {} — {}",
            "", x.recommended, x.why
        );
    }
    out
}

/// The commands that apply the recommendations not met.
pub fn fixes(findings: &[Finding]) -> String {
    findings
        .iter()
        .filter_map(|x| x.fix.as_ref())
        .map(|c| format!("{c}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn congestion_finding_follows_the_profile_and_the_host() {
        let def = crate::load_profile("default").unwrap();
        let f = super::congestion(&def, Some("bbr"), Some("pfifo_fast"));
        assert!(!f.ok, "{f:?}");
        assert!(f.value.contains("proxy sockets: bbr"), "{}", f.value);
        assert!(f.recommended.contains("runtime.tcp_congestion: cubic"));
        assert!(super::congestion(&def, Some("cubic"), Some("fq")).ok);
        let t = crate::load_profile("throughput").unwrap();
        let f = super::congestion(&t, Some("bbr"), Some("pfifo_fast"));
        assert!(f.ok, "{f:?}");
        assert!(
            f.value
                .contains("proxy sockets: cubic, HBONE sockets: cubic"),
            "{}",
            f.value
        );
        // HBONE sockets on bbr while the pod side is cubic: still flagged.
        let mut mixed = t.clone();
        mixed.h2.tcp_congestion = Some("bbr".into());
        assert!(!super::congestion(&mixed, Some("cubic"), None).ok);
    }

    #[test]
    fn busy_poll_findings_follow_the_profile() {
        let mut lat = crate::load_profile("latency").unwrap();
        // Busy polling excludes SCHED_FIFO workers (the latency profile's).
        lat.runtime.sched_fifo_priority = None;
        lat.runtime.busy_poll = std::time::Duration::from_micros(50);
        let f = super::run_for(&lat);
        let rt = f.iter().find(|x| x.name == "runtime.busy_poll").unwrap();
        assert!(rt.value.contains("us after each burst"), "{}", rt.value);
        let br = f.iter().find(|x| x.name == "net.core.busy_read").unwrap();
        assert!(br.recommended.contains("50"), "{}", br.recommended);
        let def = super::run();
        let rt = def.iter().find(|x| x.name == "runtime.busy_poll").unwrap();
        assert!(rt.value.starts_with("0 (off"), "{}", rt.value);
    }

    /// The real-time finding follows the profile and what the host allows (root, or an
    /// `RLIMIT_RTPRIO` at least the priority), and states the RT throttling share.
    #[test]
    fn realtime_finding_follows_the_profile_and_the_host() {
        let lat = crate::load_profile("latency").unwrap();
        let def = crate::Profile::default();
        let host = |euid, rtprio| super::RtHost {
            euid: Some(euid),
            cap_sys_nice: Some(euid == 0),
            rtprio_limit: Some(rtprio),
            rt_runtime_us: Some(950_000),
            rt_period_us: Some(1_000_000),
        };
        let f = super::realtime(&def, &host(1000, 0));
        assert!(f.ok);
        assert!(f.value.starts_with("off in this profile"), "{}", f.value);
        assert!(f.value.contains("5% of a busy core"), "{}", f.value);

        let f = super::realtime(&lat, &host(0, 0));
        assert!(f.ok, "{}", f.value);
        assert!(f.value.starts_with("SCHED_FIFO 10: allowed"), "{}", f.value);
        let f = super::realtime(&lat, &host(1000, 10));
        assert!(f.ok, "{}", f.value);
        let f = super::realtime(&lat, &host(1000, 9));
        assert!(!f.ok);
        assert!(f.value.contains("NOT allowed"), "{}", f.value);
        assert!(f.recommended.contains("ulimit -r 10"), "{}", f.recommended);

        // Root without CAP_SYS_NICE (a typical pod) gets EPERM: not allowed.
        let mut pod_root = host(0, 0);
        pod_root.cap_sys_nice = Some(false);
        let f = super::realtime(&lat, &pod_root);
        assert!(!f.ok, "{}", f.value);
        assert!(f.value.contains("without CAP_SYS_NICE"), "{}", f.value);
        pod_root.rtprio_limit = Some(10);
        assert!(super::realtime(&lat, &pod_root).ok);
        // Capabilities unknown: root counts as holding it.
        let mut unknown = host(0, 0);
        unknown.cap_sys_nice = None;
        assert!(super::realtime(&lat, &unknown).ok);

        let mut off = host(0, 0);
        off.rt_runtime_us = Some(-1);
        let f = super::realtime(&lat, &off);
        assert!(f.value.contains("RT throttling off"), "{}", f.value);
    }

    /// CAP_SYS_NICE is bit 23 of `CapEff:` (hex) in /proc/<pid>/status.
    #[test]
    fn cap_sys_nice_from_status_text() {
        let status = |eff: &str| {
            format!(
                "Name:\tztunnel\nUid:\t0\t0\t0\t0\nCapInh:\t0000000000000000\n\
                 CapPrm:\t000001ffffffffff\nCapEff:\t{eff}\nCapBnd:\t000001ffffffffff\n"
            )
        };
        // Full root set; only CAP_SYS_NICE; Docker's default set (no SYS_NICE); all but it.
        assert_eq!(super::cap_sys_nice(&status("000001ffffffffff")), Some(true));
        assert_eq!(super::cap_sys_nice(&status("0000000000800000")), Some(true));
        assert_eq!(
            super::cap_sys_nice(&status("00000000a80425fb")),
            Some(false)
        );
        assert_eq!(
            super::cap_sys_nice(&status("0000000000000000")),
            Some(false)
        );
        assert_eq!(
            super::cap_sys_nice(&status("00000000ff7fffff")),
            Some(false)
        );
        assert_eq!(super::cap_sys_nice("Name:\tx\n"), None);
        assert_eq!(super::cap_sys_nice(&status("zz")), None);
    }

    fn idle_state(limit: Result<i32, &str>) -> super::IdleState {
        super::IdleState {
            driver: Some("none".into()),
            governor: Some("menu".into()),
            pm_qos_limit: limit.map_err(str::to_string),
        }
    }

    fn pm_qos(f: &[super::Finding]) -> &super::Finding {
        f.iter().find(|x| x.name == "PM QoS CPU latency").unwrap()
    }

    /// `--profile latency`: the profile will hold the limit (or, unable to read the device,
    /// must run as root); the default profile recommends the latency profile's knob.
    #[test]
    fn pm_qos_findings_follow_the_profile_and_the_host() {
        let lat = crate::load_profile("latency").unwrap();
        let def = crate::Profile::default();

        let f = super::idle(&lat, &idle_state(Ok(2_000_000_000)));
        let cpuidle = f.iter().find(|x| x.name == "cpuidle").unwrap();
        assert_eq!(cpuidle.value, "driver none, governor menu");
        let q = pm_qos(&f);
        assert_eq!(q.value, "2000000000 us: no request in force");
        assert_eq!(
            q.recommended,
            "this profile holds 0us while the proxy runs (runtime.cpu_latency_limit)"
        );
        assert!(q.ok);

        let f = super::idle(&lat, &idle_state(Err("Permission denied (os error 13)")));
        let q = pm_qos(&f);
        assert!(
            q.value.starts_with("unreadable (Permission denied"),
            "{}",
            q.value
        );
        assert!(q.recommended.contains("as root"), "{}", q.recommended);
        assert!(!q.ok);

        let f = super::idle(&def, &idle_state(Ok(0)));
        let q = pm_qos(&f);
        assert!(
            q.value.starts_with("0 us: a request is in force"),
            "{}",
            q.value
        );
        assert!(
            q.recommended.contains("profile latency")
                && q.recommended.contains("runtime.cpu_latency_limit: 0us"),
            "{}",
            q.recommended
        );
        assert!(q.ok);
        let f = super::idle(&def, &idle_state(Ok(20)));
        assert_eq!(pm_qos(&f).value, "20 us: a request is in force");
    }

    #[test]
    fn check_reads_this_host() {
        let f = super::run();
        assert!(f
            .iter()
            .any(|x| x.name == "net.core.somaxconn" && x.value != "unavailable"));
        assert!(f.iter().any(|x| x.name == "io_uring"));
        for name in [
            "net.core.busy_read",
            "net.core.busy_poll",
            "runtime.busy_poll",
            "cpuidle",
            "PM QoS CPU latency",
        ] {
            assert!(f.iter().any(|x| x.name == name), "{name} missing");
        }
        let (soft, hard) = super::nofile();
        assert!(soft > 0 && hard >= soft);
        // Every failing finding with a fix renders as a command.
        assert_eq!(
            super::fixes(&f).lines().count(),
            f.iter().filter(|x| x.fix.is_some()).count()
        );
    }
}
