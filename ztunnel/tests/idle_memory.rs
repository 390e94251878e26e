//! Memory per idle connection (issue 4): two `ztunnel` processes on loopback, N idle
//! connections SOCKS5 → ztunnel A → HBONE → ztunnel B → pod, RSS of each process before and
//! after (`/proc/PID/status` VmRSS). Ignored by default (it measures, it does not judge):
//!
//! ```sh
//! cargo test -p ztunnel --release --test idle_memory -- --ignored --nocapture
//! IDLE_CONNS=8000 cargo test -p ztunnel --release --test idle_memory -- --ignored --nocapture
//! ```
//!
//! It still checks what it measures: every connection is established end to end (the pod
//! accepted it, node B counted it), and each one still carries bytes afterwards.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the binary; returns the process and its READY line.
fn spawn(file: &std::path::Path) -> (Proc, String) {
    // Owned by `Proc` at once: killed and reaped even if the READY check below panics.
    let mut c = Proc(
        Command::new(env!("CARGO_BIN_EXE_ztunnel"))
            .arg("--config")
            .arg(file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let out = c.0.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let ready = lines.next().unwrap().unwrap();
    assert!(ready.starts_with("READY "), "{ready}");
    std::thread::spawn(move || for _ in lines {});
    (c, ready)
}

/// A pod that accepts and holds connections, echoing whatever arrives (one thread polls
/// them all, non-blocking: no thread per connection).
fn holding_pod(addr: SocketAddr, stop: Arc<AtomicBool>, accepted: Arc<AtomicUsize>) {
    let l = TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = Vec::new();
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::SeqCst) {
            let mut idle = true;
            while let Ok((c, _)) = l.accept() {
                c.set_nonblocking(true).unwrap();
                conns.push(c);
                accepted.fetch_add(1, Ordering::SeqCst);
                idle = false;
            }
            for c in &mut conns {
                if let Ok(n) = c.read(&mut buf) {
                    if n > 0 {
                        let _ = c.write_all(&buf[..n]);
                        idle = false;
                    }
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
}

fn stats(addr: &str) -> String {
    http_get(addr.parse().unwrap(), "/stats/prometheus").1
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture (release build recommended)"]
fn idle_connection_memory_through_both_ztunnels() {
    let n: usize = std::env::var("IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let net = Net { n: 130 };
    let dir = tmpdir("idle");
    let ca_dir = dir.join("ca");
    hbone::ca::SigningCa::builtin(&ca_dir, "cluster.local").unwrap();
    let (fa, fb) = (dir.join("a.yaml"), dir.join("b.yaml"));
    // IDLE_EXTRA_YAML: top-level sections appended to both configs (e.g. `h2: {…}`), to
    // compare settings.
    let extra = std::env::var("IDLE_EXTRA_YAML").unwrap_or_default();
    let cfg = |node| format!("{}\n{extra}\n", net.node_config(node, &ca_dir, "[]"));
    std::fs::write(&fa, cfg("node-a")).unwrap();
    std::fs::write(&fb, cfg("node-b")).unwrap();
    // IDLE_DEST=legacy: to an uncaptured pod instead (plain TCP passthrough from A; B idle),
    // to separate the SOCKS5/forwarding cost from the HBONE one.
    let dest = match std::env::var("IDLE_DEST").as_deref() {
        Ok("legacy") => net.legacy(),
        _ => net.server(),
    };
    let via_hbone = dest == net.server();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    holding_pod(dest, stop.clone(), accepted.clone());
    let (a, ready_a) = spawn(&fa);
    let (b, ready_b) = spawn(&fb);
    let field = |ready: &str, k: &str| {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let socks: SocketAddr = field(&ready_a, "socks5").parse().unwrap();
    let stats_b = field(&ready_b, "stats");
    // Warm up: one connection through, so pools, TLS and allocator arenas exist.
    let (code, mut w) = socks_connect(net.client(), socks, Dest::Addr(dest));
    assert_eq!(code, 0);
    assert_eq!(roundtrip(&mut w, b"warm"), b"warm");
    std::thread::sleep(Duration::from_millis(300));
    let (a0, b0) = (rss_kib(a.0.id()), rss_kib(b.0.id()));
    let t = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let (code, s) = socks_connect(net.client(), socks, Dest::Addr(dest));
        assert_eq!(code, 0);
        conns.push(s);
    }
    let open_time = t.elapsed();
    eventually_long("every connection reached the pod", || {
        accepted.load(Ordering::SeqCst) == n + 1
    });
    let expect_b = if via_hbone { n as u64 + 1 } else { 0 };
    eventually_long("node B counted them (none when passthrough)", || {
        metric(
            &stats(&stats_b),
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")],
        ) == expect_b
    });
    // Let lazily freed memory settle, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let (a1, b1) = (rss_kib(a.0.id()), rss_kib(b.0.id()));
    // Still alive: a sample of them carries bytes.
    for s in conns.iter_mut().step_by((n / 50).max(1)) {
        assert_eq!(roundtrip(s, b"alive"), b"alive");
    }
    let per = |before: u64, after: u64| (after.saturating_sub(before) * 1024) as f64 / n as f64;
    println!(
        "IDLE dest={dest} n={n} open_s={:.2} ztunnel_a rss_kib {a0} -> {a1} ({:.0} B/conn) ztunnel_b rss_kib {b0} -> {b1} ({:.0} B/conn) total {:.0} B/conn",
        open_time.as_secs_f64(),
        per(a0, a1),
        per(b0, b1),
        per(a0 + b0, a1 + b1),
    );
    drop(conns);
    stop.store(true, Ordering::SeqCst);
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Poll `f` until true or 60 s (thousands of connections take a while on a loaded host).
fn eventually_long(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(60), f)
}
