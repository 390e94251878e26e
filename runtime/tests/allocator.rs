//! `runtime.allocator`: `spawn_workers` sets glibc malloc's thresholds once, at start-up,
//! before its workers exist; `retain_freed: false` leaves glibc's defaults. Each case runs in
//! a child process of its own (this test binary again), since the setting is process-wide:
//! the child measures a thread's page faults over 20 rounds of two 120 KiB buffers
//! allocated, written and freed, before and after `spawn_workers`. With glibc's defaults the
//! free heap top (240 KiB > 128 KiB) goes back to the kernel each round and is faulted in
//! again (~30 pages a round); retained, it is faulted in once.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::process::Command;
use std::time::Duration;

use runtime::config::AllocatorConfig;
use runtime::sys::{apply_allocator, AllocatorStatus};
use runtime::{RuntimeConfig, Shutdown, WorkerCtx};

const CHILD: &str = "RUNTIME_ALLOCATOR_TEST_CASE";
const TEST: &str = "allocator_thresholds_are_applied_once_at_worker_start_up";
const ROUNDS: u64 = 20;

/// Minor page faults of the calling thread so far (`/proc/thread-self/stat`, field 10).
fn thread_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("/proc/thread-self/stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 1..];
    // Fields from 3 (state) on; minflt is field 10.
    after_comm
        .split_whitespace()
        .nth(7)
        .expect("minflt")
        .parse()
        .expect("minflt")
}

/// Faults over `n` rounds, on a fresh thread (its own arena, like a worker's).
fn faults_over_rounds(n: u64) -> u64 {
    std::thread::spawn(move || {
        let round = || {
            let (mut a, mut b) = (vec![0u8; 120 << 10], vec![0u8; 120 << 10]);
            for i in (0..a.len()).step_by(4096) {
                a[i] = 1;
                b[i] = 1;
            }
            std::hint::black_box((&a, &b));
            drop(b);
            drop(a);
        };
        round(); // first touch of the heap: faulted in however the allocator is set
        let before = thread_faults();
        for _ in 0..n {
            round();
        }
        thread_faults() - before
    })
    .join()
    .unwrap()
}

fn start_and_stop_one_worker(allocator: AllocatorConfig) {
    let cfg = RuntimeConfig {
        workers: Some(1),
        pin: false,
        allocator,
        ..RuntimeConfig::default()
    };
    let shutdown = Shutdown::new();
    let workers = runtime::spawn_workers(&cfg, &shutdown, |_| |_ctx: WorkerCtx| async move {})
        .expect("spawn_workers");
    workers.join().expect("worker");
}

fn child(case: &str) {
    let by_default = faults_over_rounds(ROUNDS);
    eprintln!("{case}: faults over {ROUNDS} rounds before spawn_workers: {by_default}");
    assert!(
        by_default >= ROUNDS,
        "glibc's defaults should fault the freed heap top in again every round: {by_default} faults"
    );
    let allocator = match case {
        "on" => AllocatorConfig::default(),
        "off" => AllocatorConfig {
            retain_freed: false,
            ..AllocatorConfig::default()
        },
        other => panic!("unknown case {other}"),
    };
    start_and_stop_one_worker(allocator.clone());
    let after = faults_over_rounds(ROUNDS);
    eprintln!("{case}: faults over {ROUNDS} rounds after spawn_workers: {after}");
    // Once per process: a later call (another config) changes nothing and reports the first.
    let first = apply_allocator(&AllocatorConfig {
        retain_freed: !allocator.retain_freed,
        ..AllocatorConfig::default()
    });
    if case == "on" {
        assert_eq!(first, AllocatorStatus::Retaining);
        assert!(
            after < ROUNDS,
            "not retained: {after} faults over {ROUNDS} rounds"
        );
    } else {
        assert_eq!(first, AllocatorStatus::Defaults);
        assert!(
            after >= ROUNDS,
            "retain_freed: false still retained: {after} faults over {ROUNDS} rounds"
        );
    }
    // The later call really changed nothing.
    assert_eq!(faults_over_rounds(ROUNDS) < ROUNDS, case == "on");
}

#[test]
fn allocator_thresholds_are_applied_once_at_worker_start_up() {
    if let Ok(case) = std::env::var(CHILD) {
        return child(&case);
    }
    let exe = std::env::current_exe().unwrap();
    for case in ["on", "off"] {
        let mut cmd = Command::new(&exe);
        cmd.args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, case)
            // glibc's own tunables would change the defaults this compares against.
            .env_remove("GLIBC_TUNABLES")
            .env_remove("MALLOC_TRIM_THRESHOLD_")
            .env_remove("MALLOC_MMAP_THRESHOLD_")
            .env_remove("MALLOC_TOP_PAD_")
            .env_remove("MALLOC_ARENA_MAX");
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "case {case}: child still running after 120 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("--- case {case}:\n{text}");
        assert!(out.status.success(), "case {case} failed: {text}");
        assert!(
            text.contains("faults over 20 rounds after spawn_workers"),
            "case {case}: the child did not run the test: {text}"
        );
    }
}
