//! The proxy under test as a child process: this binary re-executed with `__l4fwd`, which
//! runs `runtime::forwarder::main_with_args`, or with `__hbone`, which runs
//! `hbone::proxy::main_with_args` (the `hbone` path runs two of these: an inbound and an
//! outbound, sharing one built-in CA folder).
//!
//! The child gets its own process group (a terminal's Ctrl-C reaches only the harness, which
//! then stops it) and a piped stdin it watches: when the harness dies without cleaning up,
//! stdin reaches end of file and the orphaned forwarder exits. Every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// First argument that turns this binary into the forwarder.
pub const FORWARDER_ARG: &str = "__l4fwd";

/// First argument that turns this binary into the HBONE proxy.
pub const HBONE_ARG: &str = "__hbone";

/// First argument that turns this binary into a ztunnel (`ztunnel::cli::main_with_args`).
pub const ZTUNNEL_ARG: &str = "__ztunnel";

/// First argument that turns this binary into a waypoint (`waypoint::cli::main_with_args`).
pub const WAYPOINT_ARG: &str = "__waypoint";

/// Watch stdin for the harness's death: at end of file, exit. Only when stdin is a pipe
/// (the harness's children): a process started otherwise (as a `--peer`, whose stdin is
/// `/dev/null` and whose process group the harness stops) has no harness to watch.
fn watch_parent(name: &'static str) {
    use std::os::unix::fs::FileTypeExt;
    let piped = std::fs::metadata("/proc/self/fd/0").is_ok_and(|m| m.file_type().is_fifo());
    if !piped {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            // The harness is gone. Our stderr probably went with it: never panic on the
            // write (eprintln! would, on EPIPE, and this thread would die instead of exiting).
            let _ = writeln!(std::io::stderr(), "{name}: harness went away; exiting");
            std::process::exit(3);
        });
}

/// Entry point of the child: watch stdin for the harness's death, then run the forwarder.
pub fn forwarder_main(rest: Vec<String>) -> std::process::ExitCode {
    watch_parent("l4fwd");
    let args = std::iter::once("l4fwd".to_string()).chain(rest);
    runtime::forwarder::main_with_args(args)
}

/// Entry point of the child: watch stdin for the harness's death, then run the HBONE proxy.
pub fn hbone_main(rest: Vec<String>) -> std::process::ExitCode {
    watch_parent("hbone");
    let args = std::iter::once("hbone".to_string()).chain(rest);
    hbone::proxy::main_with_args(args)
}

/// Entry point of the child: a ztunnel.
pub fn ztunnel_main(rest: Vec<String>) -> std::process::ExitCode {
    watch_parent("ztunnel");
    let args = std::iter::once("ztunnel".to_string())
        .chain(rest)
        .map(std::ffi::OsString::from)
        .collect();
    ztunnel::cli::main_with_args(args)
}

/// Entry point of the child: a waypoint.
pub fn waypoint_main(rest: Vec<String>) -> std::process::ExitCode {
    watch_parent("waypoint");
    let args = std::iter::once("waypoint".to_string())
        .chain(rest)
        .map(std::ffi::OsString::from)
        .collect();
    waypoint::cli::main_with_args(args)
}

fn runtime_yaml(cores: &[usize], workers: usize, io_driver: &str) -> String {
    let placement = if cores.is_empty() {
        format!("  workers: {workers}\n  pin: false\n")
    } else {
        format!(
            "  workers: {}\n  cores: [{}]\n  pin: true\n",
            cores.len(),
            cores
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!("runtime:\n{placement}  io_driver: {io_driver}\n  drain_timeout: 1s\n")
}

/// How to start the HBONE pair (inbound, then outbound).
#[derive(Debug, Clone)]
pub struct HboneSpec {
    pub backend: SocketAddr,
    /// The proxy core (both processes get one worker there); empty = unpinned.
    pub core: Option<usize>,
    pub io_driver: String,
    /// The built-in CA folder, shared by both (the inbound creates it, the outbound loads it).
    pub ca_dir: PathBuf,
    /// Pool HBONE connections (warm) or open a TLS connection per stream (cold).
    pub pool: bool,
    /// Network namespaces of the inbound and the outbound (mesh `hbone-cold`: the server
    /// pod and the client pod), with the address the outbound reaches the inbound at;
    /// `None`: both on 127.0.0.1 here.
    pub netns: Option<(String, String, std::net::IpAddr)>,
    /// The profile's `h2` section for both, as the mesh's proxies get it
    /// (`h2.tls_resumption`, `h2.handshake_timeout`, windows…); `None`: the proxy's defaults.
    pub h2: Option<hbone::H2Settings>,
}

pub const HBONE_SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
pub const HBONE_CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
/// Port of the `hbone-cold` inbound in the server pod.
pub const COLD_INBOUND_PORT: u16 = 15009;

impl HboneSpec {
    fn head(&self) -> String {
        let cores: Vec<usize> = self.core.into_iter().collect();
        format!(
            "# written by bench\n{}trust_domain: cluster.local\nca: {{builtin: {}}}\n{}",
            runtime_yaml(&cores, 1, &self.io_driver),
            self.ca_dir.display(),
            self.h2
                .as_ref()
                .map(|h| format!(
                    "h2: {}\n",
                    serde_json::to_string(h).expect("settings serialize")
                ))
                .unwrap_or_default()
        )
    }
    pub fn inbound_yaml(&self) -> String {
        let listen = if self.netns.is_some() {
            format!("0.0.0.0:{COLD_INBOUND_PORT}")
        } else {
            "127.0.0.1:0".into()
        };
        format!(
            "{}inbound:\n  listen: {listen}\n  identity: {HBONE_SERVER_ID}\n  targets: [{}]\n",
            self.head(),
            self.backend
        )
    }
    pub fn outbound_yaml(&self, inbound: SocketAddr) -> String {
        format!(
            "{}outbound:\n  - listen: 127.0.0.1:0\n    identity: {HBONE_CLIENT_ID}\n    hbone: {inbound}\n    peer_identity: {HBONE_SERVER_ID}\n    target: {}\n    pool: {}\n",
            self.head(),
            self.backend,
            self.pool
        )
    }
}

/// How to start the forwarder.
#[derive(Debug, Clone)]
pub struct ProxySpec {
    pub mode: &'static str,
    pub upstream: SocketAddr,
    /// CPUs for its workers (one worker per CPU); empty = unpinned, `workers` workers.
    pub cores: Vec<usize>,
    pub workers: usize,
    pub io_driver: String,
}

impl ProxySpec {
    pub fn yaml(&self) -> String {
        format!(
            "# written by bench\n{}  forward:\n    mode: {}\nlisteners:\n  - name: bench\n    listen: 127.0.0.1:0\n    upstream: {}\n",
            runtime_yaml(&self.cores, self.workers, &self.io_driver),
            self.mode,
            self.upstream
        )
    }
}

/// What a child's READY line must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `listen=` (forwarder, hbone outbound).
    Listen,
    /// `inbound=` or `hbone=` (hbone inbound, ztunnel, waypoint).
    Inbound,
}

/// A running proxy child. Dropping it stops it (SIGTERM, bounded wait, then SIGKILL).
pub struct Proxy {
    /// For messages: `forwarder`, `hbone inbound proxy`, `hbone outbound proxy`.
    pub name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    pub pid: u32,
    pub listen: SocketAddr,
    /// `inbound=` of the READY line (HBONE inbound only).
    pub inbound: Option<SocketAddr>,
    /// `driver=` of the READY line (`io_uring` or `epoll`).
    pub driver: String,
    pub workers: usize,
    /// The child's stderr lines (also echoed to ours), for error messages.
    stderr_rx: mpsc::Receiver<String>,
    stderr_tail: Vec<String>,
}

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const TERM_TIMEOUT: Duration = Duration::from_secs(4);

impl Proxy {
    /// Write the config into `dir`, start the forwarder, wait (bounded) for its READY line.
    pub fn start(spec: &ProxySpec, dir: &Path, tag: &str) -> Result<Proxy> {
        let cfg_path: PathBuf = dir.join(format!("l4fwd-{tag}.yaml"));
        std::fs::write(&cfg_path, spec.yaml())
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        Proxy::spawn(FORWARDER_ARG, &cfg_path, "forwarder", Expect::Listen)
    }

    /// Start the HBONE inbound, wait for READY, then the outbound pointing at it. Returns
    /// `[inbound, outbound]`; the generator connects to the outbound's `listen`. When the
    /// outbound fails, the inbound is stopped (on drop) before the error returns.
    pub fn start_hbone(spec: &HboneSpec, dir: &Path, tag: &str) -> Result<Vec<Proxy>> {
        let in_path: PathBuf = dir.join(format!("hbone-in-{tag}.yaml"));
        std::fs::write(&in_path, spec.inbound_yaml())
            .with_context(|| format!("writing {}", in_path.display()))?;
        let out_path: PathBuf = dir.join(format!("hbone-out-{tag}.yaml"));
        let (inbound, in_addr) = match &spec.netns {
            None => {
                let p = Proxy::spawn(HBONE_ARG, &in_path, "hbone inbound proxy", Expect::Inbound)?;
                let a = p.inbound.expect("checked in parse_ready");
                (p, a)
            }
            Some((ns_in, _, ip)) => {
                let p = Proxy::spawn_hbone_in_ns(
                    ns_in,
                    &in_path,
                    "hbone inbound proxy",
                    Expect::Inbound,
                )?;
                (p, SocketAddr::new(*ip, COLD_INBOUND_PORT))
            }
        };
        std::fs::write(&out_path, spec.outbound_yaml(in_addr))
            .with_context(|| format!("writing {}", out_path.display()))?;
        let outbound = match &spec.netns {
            None => Proxy::spawn(HBONE_ARG, &out_path, "hbone outbound proxy", Expect::Listen)?,
            Some((_, ns_out, _)) => {
                Proxy::spawn_hbone_in_ns(ns_out, &out_path, "hbone outbound proxy", Expect::Listen)?
            }
        };
        Ok(vec![inbound, outbound])
    }

    fn spawn_hbone_in_ns(ns: &str, cfg: &Path, name: &str, expect: Expect) -> Result<Proxy> {
        let exe = crate::host::own_exe().context("locating the bench binary")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(exe)
            .arg(HBONE_ARG)
            .arg("--config")
            .arg(cfg);
        Proxy::spawn_cmd(cmd, name, expect)
    }

    fn spawn(arg: &str, cfg_path: &Path, name: &str, expect: Expect) -> Result<Proxy> {
        let exe = crate::host::own_exe().context("locating the bench binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg(arg).arg("--config").arg(cfg_path);
        Proxy::spawn_cmd(cmd, name, expect)
    }

    /// A ztunnel (`__ztunnel --config FILE --profile P`) inside network namespace `ns`
    /// (`ip netns exec` enters it and executes the binary in the same process).
    pub fn spawn_ztunnel(ns: &str, cfg_path: &Path, profile: &str, node: &str) -> Result<Proxy> {
        Proxy::spawn_in_ns(
            ns,
            ZTUNNEL_ARG,
            cfg_path,
            profile,
            &format!("ztunnel {node}"),
        )
    }

    /// This binary re-executed as `arg --config FILE --profile P` inside `ns`; READY must
    /// name an `hbone=` address.
    pub fn spawn_in_ns(
        ns: &str,
        arg: &str,
        cfg_path: &Path,
        profile: &str,
        name: &str,
    ) -> Result<Proxy> {
        let exe = crate::host::own_exe().context("locating the bench binary")?;
        // `ns` empty: this namespace (the loopback mesh).
        let mut cmd = if ns.is_empty() {
            Command::new(exe)
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        };
        cmd.arg(arg)
            .arg("--config")
            .arg(cfg_path)
            .arg("--profile")
            .arg(profile);
        Proxy::spawn_cmd(cmd, name, Expect::Inbound)
    }

    fn spawn_cmd(mut cmd: Command, name: &str, expect: Expect) -> Result<Proxy> {
        let name_s = name.to_string();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning the {name}"))?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let stdin = child.stdin.take();
        let (etx, stderr_rx) = mpsc::channel::<String>();
        let name2 = name_s.clone();
        let _ = std::thread::Builder::new()
            .name("l4fwd-stderr".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    let _ = writeln!(std::io::stderr(), "  [{name2} {pid}] {line}");
                    let _ = etx.send(line);
                }
            });
        let (tx, rx) = mpsc::channel::<String>();
        let _ = std::thread::Builder::new()
            .name("l4fwd-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                    let _ = tx.send(line);
                }
            });
        let mut proxy = Proxy {
            name: name_s,
            child: Some(child),
            stdin,
            pid,
            listen: "0.0.0.0:0".parse().expect("literal"),
            inbound: None,
            driver: String::new(),
            workers: 0,
            stderr_rx,
            stderr_tail: Vec::new(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("READY ") {
                        proxy.parse_ready(rest, expect)?;
                        return Ok(proxy);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let tail = proxy.tail();
                    proxy.stop();
                    bail!(
                        "{name} did not print READY within {}s{tail}",
                        READY_TIMEOUT.as_secs()
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closed: it exited. Give stderr a moment to be read.
                    let status = proxy.wait_exit(Duration::from_secs(2));
                    std::thread::sleep(Duration::from_millis(50));
                    let tail = proxy.tail();
                    proxy.stop();
                    bail!("{name} exited before READY ({status}){tail}");
                }
            }
        }
    }

    fn parse_ready(&mut self, rest: &str, expect: Expect) -> Result<()> {
        for kv in rest.split_whitespace() {
            match kv.split_once('=') {
                Some(("driver", v)) => self.driver = v.to_string(),
                Some(("workers", v)) => self.workers = v.parse().unwrap_or(0),
                Some(("listen", v)) if !v.is_empty() => {
                    let first = v.split(',').next().unwrap_or(v);
                    self.listen = first
                        .parse()
                        .map_err(|e| anyhow!("READY line: bad listen address {first:?}: {e}"))?;
                }
                Some(("socks5", v)) => {
                    self.listen = v
                        .parse()
                        .map_err(|e| anyhow!("READY line: bad socks5 address {v:?}: {e}"))?;
                }
                Some(("inbound" | "hbone", v)) => {
                    self.inbound = Some(
                        v.parse()
                            .map_err(|e| anyhow!("READY line: bad inbound address {v:?}: {e}"))?,
                    );
                }
                _ => {}
            }
        }
        if expect == Expect::Inbound {
            if self.inbound.is_none_or(|a| a.port() == 0) {
                bail!("READY line without an inbound address: {rest:?}");
            }
        } else if self.listen.port() == 0 {
            bail!("READY line without a listen address: {rest:?}");
        }
        Ok(())
    }

    fn tail(&mut self) -> String {
        self.stderr_tail.extend(self.stderr_rx.try_iter());
        let t = &self.stderr_tail[self.stderr_tail.len().saturating_sub(20)..];
        if t.is_empty() {
            String::new()
        } else {
            format!("; its stderr:\n{}", t.join("\n"))
        }
    }

    /// Still running? (`Some(status)` once it exited.)
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    fn wait_exit(&mut self, bound: Duration) -> String {
        let Some(child) = self.child.as_mut() else {
            return "already reaped".into();
        };
        let deadline = Instant::now() + bound;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return st.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => return "still running".into(),
                Err(e) => return format!("wait failed: {e}"),
            }
        }
    }

    /// SIGTERM (via `kill -TERM`), wait up to 4 s for the drain, then SIGKILL. Returns how it
    /// ended: `exit status: 0`, or a note when it had to be killed.
    pub fn stop(&mut self) -> StopOutcome {
        let Some(mut child) = self.child.take() else {
            return StopOutcome::default();
        };
        if let Ok(Some(st)) = child.try_wait() {
            self.stdin.take();
            return StopOutcome {
                status: st.to_string(),
                clean: false,
                note: Some(format!("{} had already exited ({st})", self.name)),
            };
        }
        let term = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + TERM_TIMEOUT;
        let mut out = StopOutcome::default();
        if term.map(|s| s.success()).unwrap_or(false) {
            loop {
                match child.try_wait() {
                    Ok(Some(st)) => {
                        out.status = st.to_string();
                        out.clean = st.success();
                        if !st.success() {
                            out.note =
                                Some(format!("{} exited with {st} after SIGTERM", self.name));
                        }
                        self.stdin.take();
                        return out;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => break,
                }
            }
        }
        let _ = child.kill();
        self.stdin.take();
        // SIGKILL cannot be ignored; reaping is immediate in practice, but stay bounded.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        out.status = "killed".into();
        out.clean = false;
        out.note = Some(format!(
            "{} did not exit within {}s of SIGTERM; killed",
            self.name,
            TERM_TIMEOUT.as_secs()
        ));
        out
    }
}

/// How a stop went.
#[derive(Debug, Clone, Default)]
pub struct StopOutcome {
    pub status: String,
    /// Exited 0 after SIGTERM.
    pub clean: bool,
    pub note: Option<String>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_parses_as_forwarder_config() {
        let spec = ProxySpec {
            mode: "splice",
            upstream: "127.0.0.1:9".parse().unwrap(),
            cores: vec![0],
            workers: 1,
            io_driver: "auto".into(),
        };
        let text = spec.yaml();
        let cfg =
            runtime::forwarder::ForwarderConfig::from_str(Path::new("t.yaml"), &text).unwrap();
        assert_eq!(cfg.runtime.workers, Some(1));
        assert_eq!(cfg.runtime.cores, Some(vec![0]));
        assert_eq!(cfg.listeners[0].listen.port(), 0);
        let unpinned = ProxySpec {
            cores: vec![],
            ..spec
        };
        let cfg =
            runtime::forwarder::ForwarderConfig::from_str(Path::new("t.yaml"), &unpinned.yaml())
                .unwrap();
        assert!(!cfg.runtime.pin);
    }

    #[test]
    fn yaml_parses_as_hbone_config() {
        let spec = HboneSpec {
            backend: "127.0.0.1:9".parse().unwrap(),
            core: Some(1),
            io_driver: "auto".into(),
            ca_dir: PathBuf::from("/tmp/x/ca"),
            pool: false,
            netns: None,
            h2: None,
        };
        let parse = |text: &str| -> hbone::proxy::ProxyConfig {
            let cfg: hbone::proxy::ProxyConfig =
                runtime::config::from_yaml_str(Path::new("t.yaml"), text).unwrap();
            cfg.validate().unwrap();
            cfg
        };
        let inb = parse(&spec.inbound_yaml());
        assert!(inb.outbound.is_empty());
        let i = inb.inbound.as_ref().unwrap();
        assert_eq!(i.targets, vec![spec.backend]);
        assert_eq!(i.identity, HBONE_SERVER_ID);
        assert_eq!(inb.runtime.workers, Some(1));
        assert_eq!(inb.runtime.cores, Some(vec![1]));
        let out = parse(&spec.outbound_yaml("127.0.0.1:15008".parse().unwrap()));
        assert!(out.inbound.is_none());
        assert_eq!(out.outbound.len(), 1);
        assert_eq!(out.outbound[0].hbone.port(), 15008);
        assert_eq!(out.outbound[0].peer_identity, HBONE_SERVER_ID);
        assert_eq!(out.outbound[0].identity, HBONE_CLIENT_ID);
        assert_eq!(out.outbound[0].target, spec.backend);
        assert!(!out.outbound[0].pool, "cold: a TLS connection per stream");
        assert!(out.h2.tls_resumption, "the proxy's default");
        // The profile's h2 section reaches both (as the mesh's proxies get it).
        let mut h2 = tuning::load_profile("default").unwrap().h2;
        h2.tls_resumption = false;
        h2.handshake_timeout = std::time::Duration::from_secs(3);
        let spec = HboneSpec {
            h2: Some(h2.clone()),
            ..spec
        };
        for cfg in [
            parse(&spec.inbound_yaml()),
            parse(&spec.outbound_yaml("127.0.0.1:15008".parse().unwrap())),
        ] {
            assert_eq!(cfg.h2, h2);
        }
    }

    #[test]
    fn ready_lines() {
        let mut p = Proxy {
            name: "t".into(),
            child: None,
            stdin: None,
            pid: 0,
            listen: "0.0.0.0:0".parse().unwrap(),
            inbound: None,
            driver: String::new(),
            workers: 0,
            stderr_rx: mpsc::channel().1,
            stderr_tail: vec![],
        };
        p.parse_ready(
            "driver=io_uring workers=1 listen= inbound=127.0.0.1:4000",
            Expect::Inbound,
        )
        .unwrap();
        assert_eq!(p.inbound.unwrap().port(), 4000);
        assert_eq!(p.driver, "io_uring");
        assert!(p
            .parse_ready("driver=epoll workers=1 listen=", Expect::Listen)
            .is_err());
        p.parse_ready(
            "driver=epoll workers=1 listen=127.0.0.1:5,127.0.0.1:6",
            Expect::Listen,
        )
        .unwrap();
        assert_eq!(p.listen.port(), 5);
    }
}
