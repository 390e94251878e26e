//! External proxies to compare with (`--peer NAME=ADDR,cmd=COMMAND`, repeatable): the same
//! scenarios through HAProxy, nginx, Envoy, Istio's ztunnel… in the same invocation, as
//! ratios to `direct` like the built-in paths.
//!
//! `NAME=ADDR[,maxconn=N],cmd=COMMAND`: `maxconn` is the most client connections the peer's
//! config admits at once (HAProxy's `maxconn`; nginx's usable `worker_connections` / 2, each
//! client connection having an upstream one, where usable is 15/16 of them — nginx closes
//! idle keep-alive clients once fewer than 1/16 are free — less its upstream keep-alive pool
//! and listeners: see `bench/peers/nginx.conf`), used with its descriptor limit to size the
//! memory scenarios for it ([`crate::fds`]).
//!
//! A peer runs in the mesh's `peer` pod (10.181.0.5, node A, not captured): the harness runs
//! `sh -c COMMAND` there (`ip netns exec`), in its own process group, waits (≤ 15 s) until
//! `ADDR` accepts a connection from the client pod, and stops the group (SIGTERM, SIGKILL
//! after 4 s) at the end. The generator connects from `plain-client` — the `direct` path's
//! client — so a peer adds exactly one proxy hop on node A, as the `l4` path does.
//!
//! Before the peers start, the harness lets the peer pod reuse TIME_WAIT ports for its
//! outgoing connections and gives them the whole port range ([`tune_pod`]): a proxy that
//! closes its upstream connections leaves them there, thousands after a memory scenario, all
//! to the same backend address.
//!
//! A peer forwards to the `plain` pod's backends (10.182.0.4) by port, `ADDR`'s port `P`
//! being the base: `P` → `:8080` (echo: tcp-rr, tcp-rr-open, idle), `P+1` → `:8081` (sink:
//! tcp-throughput), `P+2` → `:8082` (reply-close: conn-churn), `P+10` → `:8090` (HTTP/1.1:
//! http1-rps, http1-open, large-body, idle-http). `bench/peers/` has nginx and HAProxy configs in this shape. The
//! command gets `BENCH_PEER_DIR` (a scratch folder for pid and temp files) in its
//! environment. The peer's CPU is the sum over its process group (e.g. nginx's master and
//! workers).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::mesh::Mesh;
use crate::suite::Kind;

/// One `--peer` argument.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub cmd: String,
    /// The most client connections its config admits (`maxconn=N`), when given.
    pub maxconn: Option<usize>,
}

impl PeerSpec {
    /// `NAME=ADDR[,maxconn=N],cmd=COMMAND` (the command is everything after `cmd=`).
    pub fn parse(s: &str) -> Result<PeerSpec> {
        let (name, rest) = s
            .split_once('=')
            .with_context(|| format!("--peer {s:?}: expected NAME=ADDR,cmd=COMMAND"))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("--peer {s:?}: the name must be letters, digits, '-' or '_'");
        }
        if [
            "direct",
            "l4",
            "hbone",
            "waypoint",
            "hbone-cold",
            "l4-copy",
            "l4-splice",
        ]
        .contains(&name)
        {
            bail!("--peer {s:?}: {name} is a built-in path's name");
        }
        let (head, cmd) = match rest.split_once(",cmd=") {
            Some((a, c)) => (a, c.trim().to_string()),
            None => (rest, String::new()),
        };
        let mut parts = head.split(',');
        let addr = parts.next().unwrap_or_default();
        let mut maxconn = None;
        for opt in parts {
            match opt.trim().split_once('=') {
                Some(("maxconn", n)) => {
                    let n: usize = n.trim().parse().ok().filter(|n| *n > 0).with_context(|| {
                        format!("--peer {s:?}: maxconn must be a positive count")
                    })?;
                    maxconn = Some(n);
                }
                _ => bail!(
                    "--peer {s:?}: unknown option {opt:?} (NAME=ADDR[,maxconn=N],cmd=COMMAND)"
                ),
            }
        }
        if cmd.is_empty() {
            bail!(
                "--peer {s:?}: give the command that starts it (,cmd=COMMAND): peers run in \
                 the mesh's peer pod"
            );
        }
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .with_context(|| format!("--peer {s:?}: bad address {addr:?}"))?;
        if addr.port() > u16::MAX - 10 {
            bail!("--peer {s:?}: the base port leaves no room for +10 (HTTP)");
        }
        Ok(PeerSpec {
            name: Box::leak(name.to_string().into_boxed_str()),
            addr,
            cmd,
            maxconn,
        })
    }

    /// The peer's address for a scenario (see the module docs).
    pub fn target(&self, k: Kind) -> SocketAddr {
        let off = match k {
            // mixed does not run on peers (`PathKind::carries`).
            // slow-reader does not run on peers either.
            Kind::Rr | Kind::RrOpen | Kind::Idle | Kind::Mixed | Kind::SlowReader => 0,
            Kind::Throughput => 1,
            Kind::Churn => 2,
            Kind::Http1 | Kind::LargeBody | Kind::Http2 | Kind::Http1Open | Kind::IdleHttp => 10,
        };
        SocketAddr::new(self.addr.ip(), self.addr.port() + off)
    }
}

/// What [`tune_pod`] sets in the peer pod (its network namespace's own sysctls).
pub const POD_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.tcp_tw_reuse", "1"),
    ("net.ipv4.ip_local_port_range", "1024 65535"),
];

/// Let the peer pod's outgoing connections reuse a port whose earlier connection to the same
/// address is in TIME_WAIT (`net.ipv4.tcp_tw_reuse=1`, timestamps telling the two apart,
/// once the TIME_WAIT is a second old; a new namespace has 2, loopback only), and give them
/// the whole unprivileged port range, as `tuning check` recommends for a proxy's host (a run
/// starting within that second after another's still finds free ports: `connect()` tries
/// ports of one parity first, half the range).
///
/// A proxy that closes its upstream connections first keeps each port for 60 s in
/// TIME_WAIT, per destination: nginx's `idle-http`, for one, closes 9,300 connections to the
/// HTTP backend beyond its keep-alive pool, and HAProxy's `idle-http` after it then opens
/// 8,900 to the same address at once. Every `connect()` then walked the ephemeral range past
/// those ports (perf: 77 % of HAProxy's cycles in `__inet_hash_connect` and
/// `__inet_check_established`), ~450 connections a second: its close took 22–36 s and its
/// last requests timed out (8,480 of 8,900, "no answer within 30 s").
pub fn tune_pod(mesh: &Mesh) -> Result<()> {
    let ns = mesh.ns("peer");
    for (key, value) in POD_SYSCTLS {
        netlab::run_in(&ns, &["sysctl", "-qw", &format!("{key}={value}")])
            .with_context(|| format!("setting {key}={value} in the peer pod ({ns})"))?;
    }
    Ok(())
}

/// A running peer (its process group). Drop stops it.
pub struct Peer {
    pub spec: PeerSpec,
    child: Option<Child>,
    pub pgid: u32,
    pub log: PathBuf,
}

impl Peer {
    /// `cpus`: the proxy cores when the suite pins (the peer runs under `taskset -c`, as our
    /// proxies run on those cores; its own config's pinning, if any, must lie within them).
    /// Unpinned, a peer floats: on the 2-CPU box the scheduler put an unpinned HAProxy on the
    /// generator's CPU in tcp-rr-open, and its round trip (no cross-CPU wake-ups) came out
    /// 49 µs at p50 against 118 µs pinned, which compared placements, not proxies.
    pub fn start(spec: &PeerSpec, mesh: &Mesh, dir: &Path, cpus: Option<&[usize]>) -> Result<Peer> {
        let busy = crate::mesh::in_ns(&mesh.ns("plain-client"), {
            let a = spec.addr;
            move || Ok(std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
        })
        .unwrap_or(false);
        if busy {
            bail!(
                "peer {}: {} already accepts connections before its command ran (another \
                 peer on the same ports?)",
                spec.name,
                spec.addr
            );
        }
        let pdir = dir.join(format!("peer-{}", spec.name));
        std::fs::create_dir_all(&pdir).with_context(|| format!("creating {}", pdir.display()))?;
        let log = pdir.join("output.log");
        let out = std::fs::File::create(&log)?;
        let ns = mesh.ns("peer");
        let mut argv: Vec<String> = vec!["netns".into(), "exec".into(), ns];
        if let Some(cpus) = cpus.filter(|c| !c.is_empty()) {
            let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
            argv.extend(["taskset".into(), "-c".into(), list.join(",")]);
        }
        argv.extend(["sh".into(), "-c".into(), spec.cmd.clone()]);
        let child = Command::new("ip")
            .args(&argv)
            .env("BENCH_PEER_DIR", &pdir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting peer {}: {}", spec.name, spec.cmd))?;
        let pgid = child.id();
        let mut p = Peer {
            spec: spec.clone(),
            child: Some(child),
            pgid,
            log,
        };
        // Wait until it accepts connections from the client pod.
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr = spec.addr;
        let ns = mesh.ns("plain-client");
        loop {
            let ok = crate::mesh::in_ns(&ns, move || {
                Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
            })
            .unwrap_or(false);
            if ok {
                return Ok(p);
            }
            if let Some(Ok(Some(st))) = p.child.as_mut().map(|c| c.try_wait()) {
                let tail = std::fs::read_to_string(&p.log).unwrap_or_default();
                bail!(
                    "peer {} exited ({st}) before accepting on {addr}:\n{tail}",
                    spec.name
                );
            }
            if Instant::now() > deadline {
                let tail = std::fs::read_to_string(&p.log).unwrap_or_default();
                p.stop();
                bail!(
                    "peer {} did not accept on {addr} within 15 s:\n{tail}",
                    spec.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process of its group with the least room, as a holder of `per_conn` descriptors
    /// per connection (which process holds the connections is not known from outside: with
    /// nginx, the worker under `worker_rlimit_nofile` while the master keeps what it
    /// inherited; the tightest one is the safe guess); None when `/proc` cannot tell.
    pub fn holder(&self, per_conn: u64) -> Option<crate::fds::Holder> {
        self.pids()
            .into_iter()
            .filter_map(|pid| crate::fds::process(self.spec.name, pid, per_conn))
            .min_by_key(|h| h.room())
    }

    /// Processes of its group now (for CPU).
    pub fn pids(&self) -> Vec<u32> {
        crate::host::pgrp_pids(self.pgid)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", self.pgid);
        let _ = Command::new("kill")
            .args(["-TERM", "--", &group])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline {
            if crate::host::pgrp_pids(self.pgid).is_empty() {
                break;
            }
            let _ = child.try_wait();
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_arguments() {
        let p = PeerSpec::parse("nginx=10.181.0.5:9000,cmd=nginx -c /x -g 'daemon off;'").unwrap();
        assert_eq!(p.name, "nginx");
        assert_eq!(p.addr.port(), 9000);
        assert_eq!(p.cmd, "nginx -c /x -g 'daemon off;'");
        assert_eq!(p.target(Kind::Http1).port(), 9010);
        assert_eq!(p.target(Kind::Churn).port(), 9002);
        assert_eq!(p.target(Kind::Throughput).port(), 9001);
        assert!(PeerSpec::parse("nginx=10.181.0.5:9000").is_err());
        assert!(PeerSpec::parse("direct=10.181.0.5:9000,cmd=x").is_err());
        assert!(PeerSpec::parse("a b=1.2.3.4:5,cmd=x").is_err());
        assert!(PeerSpec::parse("x=nope,cmd=x").is_err());
        assert_eq!(p.maxconn, None);
        let h = PeerSpec::parse("haproxy=10.181.0.5:9100,maxconn=9000,cmd=haproxy -f x,y").unwrap();
        assert_eq!(h.maxconn, Some(9000));
        assert_eq!(h.addr.port(), 9100);
        assert_eq!(h.cmd, "haproxy -f x,y");
        assert!(PeerSpec::parse("h=10.181.0.5:9100,maxconn=0,cmd=x").is_err());
        assert!(PeerSpec::parse("h=10.181.0.5:9100,maxconn=many,cmd=x").is_err());
        assert!(PeerSpec::parse("h=10.181.0.5:9100,conns=5,cmd=x").is_err());
    }

    #[test]
    fn the_forwarder_peer_config_forwards_the_peer_port_layout() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/l4fwd.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let cfg = runtime::forwarder::ForwarderConfig::from_str(Path::new(path), &text).unwrap();
        let spec = PeerSpec::parse("l4fwd=10.181.0.5:9200,cmd=x").unwrap();
        // Each scenario's port on the peer goes to the plain pod's backend for it.
        for (k, backend) in [
            (Kind::Rr, 8080),
            (Kind::Throughput, 8081),
            (Kind::Churn, 8082),
            (Kind::Http1, 8090),
        ] {
            let l = cfg
                .listeners
                .iter()
                .find(|l| l.listen == spec.target(k))
                .unwrap_or_else(|| panic!("no listener on {}", spec.target(k)));
            assert_eq!(l.upstream, format!("10.182.0.4:{backend}").parse().unwrap());
        }
    }
}
