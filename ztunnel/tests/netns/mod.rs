//! Two-node network-namespace topology for the transparent-capture tests (needs root).
//!
//! ```text
//!  pod ns "client" 10.1.0.2 ──veth── node ns A (ztunnel) ──veth── node ns B (ztunnel) ──veth── pod ns "server" 10.2.0.2
//!  pod ns "legacy-client" 10.1.0.3 ─┘   192.168.100.1     192.168.100.2   ├─ server2 10.2.0.3, legacy 10.2.0.4
//!                                                                          └─ wpod 10.2.0.5, waypoint 10.2.0.10
//! ```
//!
//! Pods are routed, not bridged (a /32 route per pod on the node, the pod's default route via
//! the node's `10.x.0.1`), so every pod packet crosses its node's `PREROUTING`, where
//! `ztunnel::capture` installs the redirects for the captured pods. Each node runs the
//! `ztunnel` binary (`ip netns exec <node> ztunnel --config …`). Namespace names carry the
//! process id and the test's tag; [`World`]'s `Drop` kills the processes and deletes the
//! namespaces, also on panic. Test code enters a namespace from a dedicated thread
//! ([`in_ns`]): sockets created there stay in that namespace.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

/// Can this process build namespaces? Not root: panic under `CI`, else print SKIP.
pub fn can_run(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false);
    if root {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (network namespaces, nftables) and CI is set: failing, not skipping");
    }
    eprintln!("SKIP {test}: needs root for network namespaces and nftables (run as root, or set CI to make this a failure)");
    false
}

/// Run a command; panic with its stderr on failure.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `f` on a fresh thread that has joined network namespace `ns`.
pub fn in_ns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/var/run/netns/{ns}");
    let r = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        setns(file.as_raw_fd(), CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join();
    match r {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// A TCP connection made from inside pod namespace `ns`.
pub fn connect_in(ns: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
    in_ns(ns, move || {
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    })
}

/// An echo server in a pod namespace: writes `name\n`, then echoes; records peers.
pub struct Server {
    pub addr: SocketAddr,
    pub peers: mpsc::Receiver<SocketAddr>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(ns: &str, addr: SocketAddr, name: &str) -> Server {
        let l = in_ns(ns, move || TcpListener::bind(addr).unwrap());
        l.set_nonblocking(true).unwrap();
        let (tx, peers) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, name) = (stop.clone(), name.to_string());
        std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                let (c, peer) = match l.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = tx.send(peer);
                let name = name.clone();
                std::thread::spawn(move || crate::common::named_echo(c, &name));
            }
        });
        Server { addr, peers, stop }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One pod of the topology.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec {
    pub name: &'static str,
    /// 0 = node A, 1 = node B.
    pub node: usize,
    pub ip: Ipv4Addr,
    pub captured: bool,
}

pub const PODS: &[PodSpec] = &[
    PodSpec {
        name: "client",
        node: 0,
        ip: Ipv4Addr::new(10, 1, 0, 2),
        captured: true,
    },
    PodSpec {
        name: "legacy-client",
        node: 0,
        ip: Ipv4Addr::new(10, 1, 0, 3),
        captured: false,
    },
    PodSpec {
        name: "server",
        node: 1,
        ip: Ipv4Addr::new(10, 2, 0, 2),
        captured: true,
    },
    PodSpec {
        name: "server2",
        node: 1,
        ip: Ipv4Addr::new(10, 2, 0, 3),
        captured: true,
    },
    PodSpec {
        name: "legacy",
        node: 1,
        ip: Ipv4Addr::new(10, 2, 0, 4),
        captured: false,
    },
    PodSpec {
        name: "wpod",
        node: 1,
        ip: Ipv4Addr::new(10, 2, 0, 5),
        captured: true,
    },
    PodSpec {
        name: "wpod2",
        node: 1,
        ip: Ipv4Addr::new(10, 2, 0, 6),
        captured: true,
    },
    // Host the test waypoints (HBONE servers); not mesh workloads.
    PodSpec {
        name: "waypoint",
        node: 1,
        ip: Ipv4Addr::new(10, 2, 0, 10),
        captured: false,
    },
    PodSpec {
        name: "waypoint2",
        node: 1,
        ip: Ipv4Addr::new(10, 2, 0, 11),
        captured: false,
    },
];

pub const NODE_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 100, 1),
    Ipv4Addr::new(192, 168, 100, 2),
];
/// Dual stack: node addresses on the node-to-node link.
pub const NODE_IP6S: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2),
];
pub const ECHO_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1);
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
pub const WSVC_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
pub const MIXED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 3);

pub fn pod(name: &str) -> PodSpec {
    *PODS.iter().find(|p| p.name == name).expect("pod")
}

/// Pod `name`'s IPv6 address: `fd00:<node+1>::<last octet of its IPv4>`.
pub fn pod_ip6(name: &str) -> Ipv6Addr {
    let p = pod(name);
    Ipv6Addr::new(
        0xfd00,
        p.node as u16 + 1,
        0,
        0,
        0,
        0,
        0,
        p.ip.octets()[3].into(),
    )
}

pub fn pod_addr6(name: &str) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(pod_ip6(name)), 8080)
}

/// The pod-side gateway (node side of every pod veth) of node `node`, IPv6.
pub fn gateway6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, node as u16 + 1, 0, 0, 0, 0, 0, 1)
}

/// Can namespaces here carry IPv6? Checked on the host (`/proc/sys/net/ipv6` present and
/// not disabled); new namespaces inherit `disable_ipv6` from `default`.
pub fn ipv6_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

/// IPv6 tests: without IPv6, panic under `CI`, else print SKIP.
pub fn can_run_v6(test: &str) -> bool {
    if !can_run(test) {
        return false;
    }
    if ipv6_available() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: IPv6 is unavailable (net.ipv6 missing or disabled) and CI is set: failing, not skipping");
    }
    eprintln!("SKIP {test}: IPv6 is unavailable here");
    false
}

pub fn pod_addr(name: &str) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod(name).ip), 8080)
}

/// Where HBONE to pod `name` is addressed (`podIP:15008`).
pub fn pod_hbone(name: &str) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod(name).ip), 15008)
}

/// The namespace waypoint of `ns-w`.
pub fn waypoint_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod("waypoint").ip), 15008)
}

/// The service-account waypoint (for `wpod2`'s service account).
pub fn waypoint2_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod("waypoint2").ip), 15008)
}

fn gateway(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, node as u8 + 1, 0, 1)
}

fn mesh(policies: &str) -> String {
    // No `nodes:` entries: HBONE is addressed to the destination pod (`podIP:15008`, Istio's
    // way), redirected to the node's ztunnel by the capture rules, and answered with the
    // pod's own identity.
    let wp = waypoint_addr();
    let wp2 = waypoint2_addr();
    // Dual stack when IPv6 is here: every pod has both addresses.
    let v6 = ipv6_available();
    let ip = |n: &str| {
        if v6 {
            format!("{}, \"{}\"", pod(n).ip, pod_ip6(n))
        } else {
            pod(n).ip.to_string()
        }
    };
    let echo_vips = if v6 {
        format!("{ECHO_VIP}, \"{ECHO_VIP6}\"")
    } else {
        ECHO_VIP.to_string()
    };
    format!(
        r#"namespaces:
  - name: ns-a
    labels: {{istio.io/dataplane-mode: ambient}}
  - name: ns-b
    labels: {{istio.io/dataplane-mode: ambient}}
  - name: ns-w
    labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
  - name: legacy
waypoints:
  - {{name: waypoint, namespace: ns-w, address: "{wp}"}}
  - {{name: waypoint2, namespace: ns-w, address: "{wp2}", annotations: {{istio.io/for-service-account: wpod2}}}}
workloads:
  - {{name: client, namespace: ns-a, serviceAccount: client, workloadIps: [{}], node: node-a}}
  - {{name: legacy-client, namespace: legacy, workloadIps: [{}], node: node-a}}
  - {{name: server, namespace: ns-b, serviceAccount: server, workloadIps: [{}], node: node-b}}
  - {{name: server2, namespace: ns-b, serviceAccount: server, workloadIps: [{}], node: node-b}}
  - {{name: legacy, namespace: legacy, workloadIps: [{}], node: node-b}}
  - {{name: wpod, namespace: ns-w, serviceAccount: wpod, workloadIps: [{}], node: node-b}}
  - {{name: wpod2, namespace: ns-w, serviceAccount: wpod2, workloadIps: [{}], node: node-b}}
services:
  - name: echo
    namespace: ns-b
    hostname: echo.ns-b.svc.cluster.local
    vips: [{echo_vips}]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: ns-b/server}}, {{workloadUid: ns-b/server2}}]
  - name: wsvc
    namespace: ns-w
    hostname: wsvc.ns-w.svc.cluster.local
    vips: [{WSVC_VIP}]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: ns-w/wpod}}]
  - name: mixed
    namespace: ns-b
    hostname: mixed.ns-b.svc.cluster.local
    vips: [{MIXED_VIP}]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: ns-b/server}}, {{workloadUid: ns-w/wpod}}]
policies: {policies}
"#,
        ip("client"),
        ip("legacy-client"),
        ip("server"),
        ip("server2"),
        ip("legacy"),
        ip("wpod"),
        ip("wpod2"),
    )
}

/// The running topology.
pub struct World {
    pub prefix: String,
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
    namespaces: Vec<String>,
    procs: Vec<Child>,
}

impl World {
    /// Build the namespaces, install capture rules, start both ztunnels (node B with
    /// `policies_b`, a YAML list) and wait for their READY lines.
    pub fn new(tag: &str, policies_b: &str) -> World {
        let prefix = format!("zt{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(format!("ztunnel-netns-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_dir = dir.join("ca");
        hbone::ca::SigningCa::builtin(&ca_dir, "cluster.local").unwrap();
        let mut w = World {
            prefix,
            dir,
            ca_dir,
            namespaces: Vec::new(),
            procs: Vec::new(),
        };
        w.build(policies_b);
        w
    }

    pub fn node(&self, i: usize) -> String {
        format!("{}-n{}", self.prefix, ["a", "b"][i])
    }

    pub fn pod_ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn add_ns(&mut self, ns: &str) {
        run(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    fn build(&mut self, policies_b: &str) {
        for i in 0..2 {
            let n = self.node(i);
            self.add_ns(&n);
            // New namespaces start with forwarding off (this host has it off too).
            run(&[
                "ip",
                "netns",
                "exec",
                &n,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
            run(&[
                "ip",
                "netns",
                "exec",
                &n,
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.rp_filter=0",
            ]);
        }
        let (na, nb) = (self.node(0), self.node(1));
        // Node to node.
        run(&[
            "ip", "-n", &na, "link", "add", "to-b", "type", "veth", "peer", "name", "to-a",
            "netns", &nb,
        ]);
        for (ns, dev, ip) in [(&na, "to-b", NODE_IPS[0]), (&nb, "to-a", NODE_IPS[1])] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        run(&[
            "ip",
            "-n",
            &na,
            "route",
            "add",
            "10.2.0.0/24",
            "via",
            &NODE_IPS[1].to_string(),
        ]);
        run(&[
            "ip",
            "-n",
            &nb,
            "route",
            "add",
            "10.1.0.0/24",
            "via",
            &NODE_IPS[0].to_string(),
        ]);
        // Pods: routed veths.
        for p in PODS {
            let (pns, node) = (self.pod_ns(p.name), self.node(p.node));
            self.add_ns(&pns);
            let dev = format!("p-{}", p.name);
            let gw = gateway(p.node).to_string();
            let ip = p.ip.to_string();
            run(&[
                "ip", "-n", &node, "link", "add", &dev, "type", "veth", "peer", "name", "eth0",
                "netns", &pns,
            ]);
            run(&[
                "ip",
                "-n",
                &node,
                "addr",
                "add",
                &format!("{gw}/32"),
                "dev",
                &dev,
            ]);
            run(&["ip", "-n", &node, "link", "set", &dev, "up"]);
            run(&[
                "ip",
                "-n",
                &node,
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &dev,
            ]);
            run(&[
                "ip",
                "-n",
                &pns,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "eth0",
            ]);
            run(&["ip", "-n", &pns, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", &pns, "route", "add", &gw, "dev", "eth0"]);
            run(&[
                "ip", "-n", &pns, "route", "add", "default", "via", &gw, "dev", "eth0",
            ]);
        }
        if ipv6_available() {
            self.build_v6();
        }
        // Capture rules (from the config: R2) and ztunnels.
        for i in 0..2 {
            let name = ["node-a", "node-b"][i];
            let policies = if i == 1 { policies_b } else { "[]" };
            let file = self.dir.join(format!("{name}.yaml"));
            // Node A's rules are installed from outside (as `ztunnel capture install`
            // would); node B's ztunnel owns its rules (`capture:`) and keeps them in step
            // with reloads.
            let mut owned = if i == 1 { "  capture: {}\n" } else { "" }.to_string();
            if ipv6_available() {
                // Dual stack: the capture listeners again on [::].
                owned.push_str("  address6: \"::\"\n");
            }
            std::fs::write(
                &file,
                format!(
                    "ztunnel:\n  node: {name}\n  address: 0.0.0.0\n  outbound: 0.0.0.0:15001\n  plaintext:\n    - listen: 0.0.0.0:15006\n{owned}  ca: {{builtin: {}}}\nruntime: {{workers: 1, pin: false, drain_timeout: 1s}}\n{}",
                    self.ca_dir.display(),
                    mesh(policies)
                ),
            )
            .unwrap();
            let loaded = ztunnel::config::load_file(&file, &tuning::Profile::default(), 1).unwrap();
            let rules = ztunnel::capture::Rules::for_node(&loaded.snapshot, name, |w| {
                Some(format!("p-{}", w.name))
            });
            // The config (namespace labels) and the topology agree on who is captured.
            let mut expected: Vec<String> = PODS
                .iter()
                .filter(|p| p.node == i && p.captured)
                .map(|p| format!("p-{}", p.name))
                .collect();
            expected.sort();
            assert_eq!(rules.pod_interfaces, expected, "captured pods of {name}");
            if i == 0 {
                rules.install(Some(&self.node(i))).unwrap();
            }
            self.spawn_ztunnel(&self.node(i), &file, name);
            if i == 1 {
                // What node B's ztunnel installed (before READY) is what the config says.
                assert_eq!(
                    self.capture_rules(1),
                    rules.pod_interfaces,
                    "node B's own rules"
                );
            }
        }
    }

    /// The IPv6 half of the topology: same shape, `fd00:<node+1>::/64` pods, the nodes on
    /// `fd00:100::/64`, forwarding on, no duplicate address detection (addresses are
    /// usable at once).
    fn build_v6(&mut self) {
        let (na, nb) = (self.node(0), self.node(1));
        for n in [&na, &nb] {
            run(&[
                "ip",
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
            ]);
        }
        for (ns, dev, ip) in [(&na, "to-b", NODE_IP6S[0]), (&nb, "to-a", NODE_IP6S[1])] {
            run(&[
                "ip",
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                dev,
                "nodad",
            ]);
        }
        run(&[
            "ip",
            "-n",
            &na,
            "-6",
            "route",
            "add",
            "fd00:2::/64",
            "via",
            &NODE_IP6S[1].to_string(),
        ]);
        run(&[
            "ip",
            "-n",
            &nb,
            "-6",
            "route",
            "add",
            "fd00:1::/64",
            "via",
            &NODE_IP6S[0].to_string(),
        ]);
        for p in PODS {
            let (pns, node) = (self.pod_ns(p.name), self.node(p.node));
            let dev = format!("p-{}", p.name);
            let gw = gateway6(p.node).to_string();
            let ip = pod_ip6(p.name).to_string();
            run(&[
                "ip",
                "-n",
                &node,
                "-6",
                "addr",
                "add",
                &format!("{gw}/128"),
                "dev",
                &dev,
                "nodad",
            ]);
            run(&[
                "ip",
                "-n",
                &node,
                "-6",
                "route",
                "add",
                &format!("{ip}/128"),
                "dev",
                &dev,
            ]);
            run(&[
                "ip",
                "-n",
                &pns,
                "-6",
                "addr",
                "add",
                &format!("{ip}/128"),
                "dev",
                "eth0",
                "nodad",
            ]);
            run(&["ip", "-n", &pns, "-6", "route", "add", &gw, "dev", "eth0"]);
            run(&[
                "ip", "-n", &pns, "-6", "route", "add", "default", "via", &gw, "dev", "eth0",
            ]);
        }
    }

    fn spawn_ztunnel(&mut self, ns: &str, file: &std::path::Path, name: &str) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_ztunnel"),
                "--config",
            ])
            .arg(file)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        self.procs.push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            // Keep draining so the process never blocks on stdout.
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(l) if l.starts_with("READY ") => {}
            other => panic!(
                "{name}: no READY line ({other:?}); log:\n{}",
                self.log(name)
            ),
        }
    }

    /// The node-side interfaces node `i`'s capture table redirects outbound (sorted), read
    /// back from the kernel with `nft list table`.
    pub fn capture_rules(&self, i: usize) -> Vec<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.node(i),
                "nft",
                "list",
                "table",
                "inet",
                "ztunnel_capture",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut ifaces: Vec<String> = text
            .lines()
            .filter(|l| l.contains("iifname") && l.contains("redirect to :15001"))
            .flat_map(|l| {
                l.split('"')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        ifaces.sort();
        ifaces
    }

    /// Rewrite node `name`'s config file with `f` (the ztunnel reloads it).
    pub fn rewrite(&self, name: &str, f: impl FnOnce(String) -> String) {
        let file = self.dir.join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(&file).unwrap();
        // The mtime must move: wait past the filesystem's timestamp granularity.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, f(text)).unwrap();
    }

    /// The ztunnel's log (stderr) of `node-a` / `node-b`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `/stats/prometheus` of node `i`, fetched from inside its namespace.
    pub fn stats(&self, i: usize) -> String {
        in_ns(&self.node(i), || {
            let mut s = TcpStream::connect_timeout(
                &"127.0.0.1:15020".parse().unwrap(),
                Duration::from_secs(2),
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(s, "GET /stats/prometheus HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default()
        })
    }

    /// Connect from pod `from` to `dst`.
    pub fn connect(&self, from: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
        connect_in(&self.pod_ns(from), dst)
    }

    /// Start the echo server of pod `name` on `[its IPv6]:8080`.
    pub fn server6(&self, name: &str) -> Server {
        Server::start(&self.pod_ns(name), pod_addr6(name), name)
    }

    /// Start the echo server of pod `name` on `:8080`.
    pub fn server(&self, name: &str) -> Server {
        Server::start(&self.pod_ns(name), pod_addr(name), name)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("logs kept in {}", self.dir.display());
        }
    }
}

/// Poll `f` until true or 5 s; on timeout panic with `dump()`.
pub fn eventually_or(what: &str, mut f: impl FnMut() -> bool, dump: impl Fn() -> String) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for: {what}\n{}", dump());
}

/// Read until EOF or error; true if the connection ended without any data (refused/reset).
pub fn refused(s: &mut TcpStream) -> Result<(), Vec<u8>> {
    let _ = s.write_all(b"hello?");
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            // EOF or reset; not a timeout or EINTR (that would be a connection still open,
            // as the other closed-connection checks treat it).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                panic!("no refusal: the connection is still open ({e})")
            }
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    if got.is_empty() {
        Ok(())
    } else {
        Err(got)
    }
}
