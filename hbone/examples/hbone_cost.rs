//! Fixed-work cost probe for the HBONE proxy pair (not a test; no timing thresholds).
//!
//! One process runs `hbone::proxy` with an outbound and an inbound on one worker (both ends
//! on one core, as in the bench), a blocking echo backend and blocking clients. It reports the
//! worker thread's CPU time (from `/proc/self/task/<tid>/schedstat`, ns) per unit of work:
//!
//! ```sh
//! cargo run --profile bench -p hbone --example hbone_cost -- churn --cold --conns 3000
//! cargo run --profile bench -p hbone --example hbone_cost -- churn --conns 3000   # warm pool
//! cargo run --profile bench -p hbone --example hbone_cost -- bulk --mib 2048
//! cargo run --profile bench -p hbone --example hbone_cost -- rr --count 20000
//! ```
//! `--core N` pins the worker (default 1); clients and the backend stay unpinned.
//! `--no-resumption` sets `h2.tls_resumption: false` (full TLS handshakes only; compare
//! `churn --cold` with and without it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Instant;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU ns of every thread named `worker-*` in this process.
fn worker_cpu_ns() -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.starts_with("worker-") {
            let s = std::fs::read_to_string(p.join("schedstat")).unwrap_or_default();
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A sink backend for bulk: reads everything, counts, answers nothing.
fn sink_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        let _ = c.write_all(b"done");
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "churn".into());
    let core: usize = arg(&args, "--core", 1);
    let cold = args.iter().any(|a| a == "--cold");
    let resumption = !args.iter().any(|a| a == "--no-resumption");
    let backend = if mode == "bulk" {
        sink_backend()
    } else {
        echo_backend()
    };
    let dir = std::env::temp_dir().join(format!("hbone-cost-{}", std::process::id()));
    let yaml = format!(
        "runtime:\n  workers: 1\n  cores: [{core}]\n  pin: true\n  drain_timeout: 1s\n\
         trust_domain: cluster.local\nca: {{builtin: {}}}\nh2:\n  tls_resumption: {resumption}\n\
         outbound:\n  - listen: 127.0.0.1:0\n    identity: spiffe://cluster.local/ns/b/sa/client\n    hbone: 127.0.0.1:{port}\n    peer_identity: spiffe://cluster.local/ns/b/sa/server\n    target: {backend}\n    pool: {pool}\n\
         inbound:\n  listen: 127.0.0.1:{port}\n  identity: spiffe://cluster.local/ns/b/sa/server\n  targets: [{backend}]\n",
        dir.display(),
        port = 20000 + (std::process::id() % 10000),
        pool = !cold,
    );
    let cfg: hbone::proxy::ProxyConfig =
        runtime::config::from_yaml_str(Path::new("cost.yaml"), &yaml).unwrap();
    cfg.validate().unwrap();
    let shutdown = runtime::Shutdown::new();
    let h = hbone::proxy::start(cfg, shutdown).unwrap();
    let out = h.outbound_addrs[0];
    // Warm up (first connection, lazy statics).
    for _ in 0..if mode == "bulk" { 0 } else { 20 } {
        let mut c = TcpStream::connect(out).unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
    }
    let cpu0 = worker_cpu_ns();
    let t0 = Instant::now();
    let (units, what) = match mode.as_str() {
        "churn" => {
            let conns: usize = arg(&args, "--conns", 3000);
            let conc: usize = arg(&args, "--concurrency", 4);
            let size: usize = arg(&args, "--size", 100);
            let threads: Vec<_> = (0..conc)
                .map(|_| {
                    std::thread::spawn(move || {
                        let msg = vec![7u8; size];
                        let mut back = vec![0u8; size];
                        for _ in 0..conns / conc {
                            let mut c = TcpStream::connect(out).unwrap();
                            c.set_nodelay(true).unwrap();
                            c.write_all(&msg).unwrap();
                            c.read_exact(&mut back).unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            ((conns / conc * conc) as f64, "connection")
        }
        "rr" => {
            let count: usize = arg(&args, "--count", 20000);
            let size: usize = arg(&args, "--size", 100);
            let mut c = TcpStream::connect(out).unwrap();
            c.set_nodelay(true).unwrap();
            let msg = vec![7u8; size];
            let mut back = vec![0u8; size];
            for _ in 0..count {
                c.write_all(&msg).unwrap();
                c.read_exact(&mut back).unwrap();
            }
            (count as f64, "round trip")
        }
        "bulk" => {
            let mib: usize = arg(&args, "--mib", 2048);
            let w: usize = arg(&args, "--write", 128 * 1024);
            let mut c = TcpStream::connect(out).unwrap();
            let buf = vec![0x5au8; w];
            let total = mib * 1024 * 1024;
            let mut sent = 0;
            while sent < total {
                c.write_all(&buf).unwrap();
                sent += w;
            }
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut done = Vec::new();
            c.read_to_end(&mut done).unwrap();
            assert_eq!(done, b"done");
            (sent as f64 / 1e9, "GB")
        }
        m => panic!("unknown mode {m}"),
    };
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (worker_cpu_ns() - cpu0) as f64 / 1e9;
    if what == "GB" {
        println!(
            "{mode}: {units:.2} GB in {wall:.2} s ({:.2} Gbit/s), proxy worker {cpu:.3} CPU-s = {:.3} CPU-s/GB",
            units * 8.0 / wall,
            cpu / units
        );
    } else {
        println!(
            "{mode}{}: {units} {what}s in {wall:.2} s ({:.0}/s), proxy worker {:.1} CPU-µs per {what}",
            if cold { " cold" } else { "" },
            units / wall,
            cpu * 1e6 / units
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(0);
}
