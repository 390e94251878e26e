//! The client side of `idle-http` in a child process (`bench __idle-client JSON`).
//!
//! Through the waypoint every idle client connection keeps an upstream stream of its own to
//! the backend (the waypoint keeps upstream streams per tunnel), and the backends run inside
//! the harness: 10,000 connections would need 20,000 descriptors in one process, above this
//! machine's 20,000 `RLIMIT_NOFILE` hard limit. So the clients live in a child process (the
//! bench binary re-executed) with its own limit; the backends stay in the harness.
//!
//! Protocol (line based): the parent gives the plan as one JSON argument ([`Spec`]); the
//! child prints `up N` (connections through so far) every 100 ms on stdout; a `stop` line
//! (or end of file) on its stdin ends the hold; it then prints `result JSON` ([`Outcome`])
//! and exits 0.

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::generator::{self, GenResult, Live, Plan, Work};

pub const ARG: &str = "__idle-client";

/// What the child runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub target: SocketAddr,
    pub netns: Option<String>,
    /// SOCKS5: (client pod address, proxy).
    pub socks: Option<(IpAddr, SocketAddr)>,
    pub host: String,
    pub conns: usize,
    pub resp_body: usize,
    pub core: Option<usize>,
    pub io_driver: String,
}

/// What the child reports at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub sent: u64,
    pub received: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub ops_window: u64,
}

/// The child's main.
pub fn child_main(args: Vec<String>) -> ExitCode {
    let spec: Spec = match args.first().map(|a| serde_json::from_str(a)) {
        Some(Ok(s)) => s,
        _ => {
            eprintln!("bench {ARG}: expected one JSON argument");
            return ExitCode::from(2);
        }
    };
    let _ = runtime::sys::raise_nofile_limit();
    let choice = spec
        .io_driver
        .parse::<runtime::DriverChoice>()
        .unwrap_or_default();
    let decision = match runtime::driver::decide(choice, 4096) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bench {ARG}: io driver: {e}");
            return ExitCode::from(1);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Live::default());
    let now = Instant::now();
    let plan = Plan {
        work: Work::IdleHttp {
            resp_body: spec.resp_body,
        },
        target: spec.target,
        conns: spec.conns,
        t_warm: now,
        t_end: now + Duration::from_secs(600),
        stop: stop.clone(),
        live: live.clone(),
        netns: spec.netns.clone(),
        host: spec.host.clone(),
        headers: Arc::from(Vec::new()),
        socks: spec
            .socks
            .map(|(src, proxy)| generator::Socks { src, proxy }),
    };
    let (tx, rx) = mpsc::channel();
    if let Err(e) = generator::spawn(0, spec.core, &decision, plan, tx) {
        eprintln!("bench {ARG}: generator thread: {e}");
        return ExitCode::from(1);
    }
    // `stop` (or the parent going away) ends the hold.
    let s2 = stop.clone();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) if l.trim() == "stop" => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        s2.store(true, Ordering::Relaxed);
    });
    let mut out = std::io::stdout();
    let res = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if writeln!(out, "up {}", live.ops.load(Ordering::Relaxed))
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err("the generator thread ended without a result".into())
            }
        }
    };
    let outcome = match res {
        Ok(r) => Outcome {
            sent: r.sent,
            received: r.received,
            errors: r.errors,
            error_samples: r.error_samples.clone(),
            ops_window: r.ops_window,
        },
        Err(e) => Outcome {
            errors: 1,
            error_samples: vec![e],
            ..Outcome::default()
        },
    };
    let _ = writeln!(out, "up {}", live.ops.load(Ordering::Relaxed));
    let _ = writeln!(
        out,
        "result {}",
        serde_json::to_string(&outcome).unwrap_or_default()
    );
    let _ = out.flush();
    ExitCode::SUCCESS
}

/// The running child, seen from the harness. Dropping it kills and reaps it.
pub struct IdleClient {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl IdleClient {
    /// Start the child; its `up N` lines go to `live.ops`, its result (or why there is none)
    /// to `tx` as a generator thread's would.
    pub fn start(
        spec: &Spec,
        live: Arc<Live>,
        tx: mpsc::Sender<Result<GenResult, String>>,
    ) -> std::io::Result<IdleClient> {
        let exe = crate::host::own_exe()?;
        let json = serde_json::to_string(spec).map_err(std::io::Error::other)?;
        let mut child = Command::new(exe)
            .arg(ARG)
            .arg(json)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("up ") {
                    if let Ok(n) = n.trim().parse::<u64>() {
                        live.ops.store(n, Ordering::Relaxed);
                    }
                } else if let Some(j) = line.strip_prefix("result ") {
                    let r = match serde_json::from_str::<Outcome>(j) {
                        Ok(o) => {
                            let mut g = GenResult::empty();
                            g.sent = o.sent;
                            g.received = o.received;
                            g.errors = o.errors;
                            g.error_samples = o.error_samples;
                            g.ops_window = o.ops_window;
                            Ok(g)
                        }
                        Err(e) => Err(format!("idle client: unreadable result: {e}")),
                    };
                    let _ = tx.send(r);
                    sent = true;
                }
            }
            if !sent {
                let _ = tx.send(Err("the idle client process ended without a result".into()));
            }
        });
        Ok(IdleClient { child, stdin })
    }

    /// End the hold: the child does its last request on each connection and reports.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "stop");
        }
    }
}

impl Drop for IdleClient {
    fn drop(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(70);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
