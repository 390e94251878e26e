//! `runtime.cpu_latency_limit`: a real l4fwd process holds a PM QoS CPU latency request on
//! `/dev/cpu_dma_latency` while it runs (the host's aggregate reads back as its limit) and
//! the kernel withdraws it when the process exits; without the rights to open the device it
//! still serves, warns naming the file and the OS error, and its stats say it is not held.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use common::*;
use runtime::pmqos::{current_limit, CPU_DMA_LATENCY};
use runtime::DriverChoice;

/// The two tests read the host-wide aggregate: one at a time (a test-only lock, no data path).
#[allow(clippy::disallowed_types)]
static HOST: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Root and the device, or a failure under `CI` / a printed SKIP. Returns the aggregate in
/// force before the test and the limit the test asks for (below it, so it is observable).
fn gate(test: &str) -> Option<(i32, i32)> {
    let why = if euid() != Some(0) {
        Some("needs root (opening /dev/cpu_dma_latency)".to_string())
    } else if !Path::new(CPU_DMA_LATENCY).exists() {
        Some(format!(
            "{CPU_DMA_LATENCY} does not exist (kernel without PM QoS?)"
        ))
    } else {
        None
    };
    let before = why.is_none().then(|| {
        current_limit().unwrap_or_else(|e| panic!("{test}: reading {CPU_DMA_LATENCY} as root: {e}"))
    });
    let why = why.or_else(|| {
        (before == Some(0)).then(|| {
            "another process holds the host's CPU latency limit at 0 already: a request of \
             this test would not show"
                .to_string()
        })
    });
    if let Some(why) = why {
        netlab::cannot_run(&format!("{test}: {why}"));
        return None;
    }
    let before = before.unwrap();
    Some((before, (before - 1).min(123)))
}

fn config(dir: &Path, backend: &Backend, limit_us: i32) -> std::path::PathBuf {
    write_config(
        dir,
        "fw.yaml",
        &format!(
            "admin: 127.0.0.1:0\nruntime:\n  workers: 1\n  pin: false\n  cpu_latency_limit: {limit_us}us\nlisteners:\n  - listen: 127.0.0.1:0\n    upstream: {}\n",
            backend.addr
        ),
    )
}

fn gauge(stats: &str, name: &str) -> Option<i64> {
    stats.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
    })
}

fn round_trip(p: &Proc) {
    let mut s = connect(p.listen[0]);
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

/// Does process `pid` have `path` open?
fn holds_open(pid: i32, path: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new(path)))
        })
        .unwrap_or(false)
}

#[test]
fn cpu_latency_limit_is_held_while_the_process_runs_and_withdrawn_when_it_exits() {
    let test = "cpu_latency_limit_is_held_while_the_process_runs_and_withdrawn_when_it_exits";
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let Some((before, limit)) = gate(test) else {
        return;
    };
    let backend = Backend::echo();
    let dir = temp_dir("pmqos-held");
    let cfg = config(&dir, &backend, limit);
    let mut p = Proc::start(&cfg, DriverChoice::Epoll, None);
    assert!(
        holds_open(p.pid(), CPU_DMA_LATENCY),
        "l4fwd has no {CPU_DMA_LATENCY} open; stderr:\n{}",
        p.stderr()
    );
    // The host's aggregate is the smallest request: ours.
    assert_eq!(
        current_limit().unwrap(),
        limit,
        "before: {before}; stderr:\n{}",
        p.stderr()
    );
    round_trip(&p);
    let stats = p.admin_stats();
    assert_eq!(
        gauge(&stats, "l4fwd_cpu_latency_limit_held"),
        Some(1),
        "{stats}"
    );
    assert_eq!(
        gauge(&stats, "l4fwd_cpu_latency_limit_us"),
        Some(limit as i64),
        "{stats}"
    );
    assert!(
        p.stderr().contains("PM QoS CPU latency request held"),
        "{}",
        p.stderr()
    );
    // Still held a while later (the file stays open, not just written once).
    round_trip(&p);
    assert_eq!(current_limit().unwrap(), limit);
    p.sigterm();
    assert_eq!(p.wait(TIMEOUT).code(), Some(0), "stderr:\n{}", p.stderr());
    // Closing the file (here: the process exiting) withdraws the request.
    wait_until(
        "the host's CPU latency limit to return to its value before l4fwd",
        TIMEOUT,
        || current_limit().unwrap(),
        |v| *v == before,
    );
}

#[test]
fn cpu_latency_limit_not_held_without_the_rights_is_a_warning_naming_the_device() {
    let test = "cpu_latency_limit_not_held_without_the_rights_is_a_warning_naming_the_device";
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let Some((before, limit)) = gate(test) else {
        return;
    };
    let backend = Backend::echo();
    let dir = temp_dir("pmqos-denied");
    let cfg = config(&dir, &backend, limit);
    // The same l4fwd as user `nobody` (root is needed to switch to it).
    let inner = l4fwd_command(&cfg, Some(DriverChoice::Epoll), None);
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(inner.get_program())
        .args(inner.get_args())
        .env_remove("MESH_IO_DRIVER")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null());
    let mut p = Proc::start_command(cmd, DriverChoice::Epoll);
    // It serves anyway.
    round_trip(&p);
    let err = p.stderr();
    assert!(
        err.contains("WARN") && err.contains("runtime.cpu_latency_limit"),
        "{err}"
    );
    assert!(err.contains(CPU_DMA_LATENCY), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    let stats = p.admin_stats();
    assert_eq!(
        gauge(&stats, "l4fwd_cpu_latency_limit_held"),
        Some(0),
        "{stats}"
    );
    assert_eq!(
        gauge(&stats, "l4fwd_cpu_latency_limit_us"),
        Some(limit as i64),
        "{stats}"
    );
    assert_eq!(current_limit().unwrap(), before);
    p.sigterm();
    assert_eq!(p.wait(TIMEOUT).code(), Some(0), "stderr:\n{}", p.stderr());
}
