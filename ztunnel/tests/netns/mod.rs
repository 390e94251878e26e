//! Two-node network-namespace topology for the transparent-capture tests (needs root).
//!
//! ```text
//!  pod ns "client" 10.1.0.2 ──veth── node ns A (ztunnel) ──veth── node ns B (ztunnel) ──veth── pod ns "server" 10.2.0.2
//!  pod ns "legacy-client" 10.1.0.3 ─┤   192.168.100.1     192.168.100.2   ├─ server2 10.2.0.3, legacy 10.2.0.4
//!  pod ns "client2" 10.1.0.4 ────────┘                                    └─ wpod 10.2.0.5, waypoint 10.2.0.10
//! ```
//!
//! Built with `netlab::TwoNodes` (routed pods: every pod packet crosses its node's
//! `PREROUTING`, where `ztunnel::capture` installs the redirects for the captured pods);
//! dual stack where the host has IPv6 (`fd00:<node+1>::<last octet>` pods, nodes on
//! `fd00:100::/64`), so each test picks its [`Family`]. Each node runs the `ztunnel` binary
//! (`ip netns exec <node> ztunnel --config …`). Namespace names are `zt<pid>-<tag>-…`; the
//! [`netlab::Lab`] inside [`World`] kills the processes and deletes the namespaces on drop,
//! also on panic (and a later run sweeps what a killed one left).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use netlab::{Addressing, Lab, Pod, TwoNodes};

pub use netlab::in_ns;

/// The address family a test runs over: the same rule, the same pods, their IPv4 or their
/// IPv6 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The world's tag for test `t` (`t`, or `t` + `v6`: the namespaces stay apart).
    pub fn tag(self, t: &str) -> String {
        match self {
            Family::V4 => t.to_string(),
            Family::V6 => format!("{t}v6"),
        }
    }

    pub fn pod_ip(self, name: &str) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(pod(name).ip),
            Family::V6 => IpAddr::V6(pod_ip6(name)),
        }
    }

    /// Pod `name`'s echo server address (`:8080`).
    pub fn pod_addr(self, name: &str) -> SocketAddr {
        SocketAddr::new(self.pod_ip(name), 8080)
    }

    /// Where HBONE to pod `name` is addressed (`podIP:15008`).
    pub fn pod_hbone(self, name: &str) -> SocketAddr {
        SocketAddr::new(self.pod_ip(name), 15008)
    }

    /// Node `i`'s address on the node-to-node link.
    pub fn node_ip(self, i: usize) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(NODE_IPS[i]),
            Family::V6 => IpAddr::V6(NODE_IP6S[i]),
        }
    }

    /// The pod-side gateway of node `node` (its address on every pod veth).
    pub fn gateway(self, node: usize) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(gateway(node)),
            Family::V6 => IpAddr::V6(gateway6(node)),
        }
    }

    /// The `echo` service's VIP (dual stack).
    pub fn echo_vip(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(ECHO_VIP),
            Family::V6 => IpAddr::V6(ECHO_VIP6),
        }
    }

    /// This family's addresses of the topology.
    fn addressing(self) -> Addressing {
        let (nets, link_prefix) = match self {
            Family::V4 => (["10.1.0.0/24", "10.2.0.0/24"], 24),
            Family::V6 => (["fd00:1::/64", "fd00:2::/64"], 64),
        };
        Addressing {
            node_ips: [self.node_ip(0), self.node_ip(1)],
            link_prefix,
            gateways: [self.gateway(0), self.gateway(1)],
            // Each node reaches the other node's pods through it.
            routes: vec![(0, nets[1].to_string()), (1, nets[0].to_string())],
            pod_ip: match self {
                Family::V4 => |p| IpAddr::V4(p.ip),
                Family::V6 => |p| IpAddr::V6(pod_ip6(p.name)),
            },
        }
    }
}

/// Pass/SKIP/fail gate of a namespace test (root; see `netlab::require_root`).
pub fn can_run(test: &str) -> bool {
    netlab::require_root(test)
}

/// A TCP connection made from inside pod namespace `ns`.
pub fn connect_in(ns: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
    netlab::connect_in(ns, dst, Duration::from_secs(3), Duration::from_secs(5))
}

/// An echo server in a pod namespace: writes `name\n`, then echoes; records peers.
pub struct Server {
    pub addr: SocketAddr,
    pub peers: mpsc::Receiver<SocketAddr>,
    _served: netlab::Served,
}

impl Server {
    pub fn start(ns: &str, addr: SocketAddr, name: &str) -> Server {
        let (tx, peers) = mpsc::channel();
        let name = name.to_string();
        let served = netlab::serve_in(ns, addr, move |c, peer| {
            let _ = tx.send(peer);
            crate::common::named_echo(c, &name)
        })
        .unwrap_or_else(|e| panic!("echo server on {addr} in {ns}: {e}"));
        Server {
            addr,
            peers,
            _served: served,
        }
    }
}

/// The pods: `(name, node, IPv4, captured)`; the config's namespace labels must agree.
pub const PODS: &[Pod] = &[
    Pod::new("client", 0, [10, 1, 0, 2], true),
    Pod::new("legacy-client", 0, [10, 1, 0, 3], false),
    // A second captured pod of node A, same namespace and service account as "client".
    Pod::new("client2", 0, [10, 1, 0, 4], true),
    Pod::new("server", 1, [10, 2, 0, 2], true),
    Pod::new("server2", 1, [10, 2, 0, 3], true),
    Pod::new("legacy", 1, [10, 2, 0, 4], false),
    Pod::new("wpod", 1, [10, 2, 0, 5], true),
    Pod::new("wpod2", 1, [10, 2, 0, 6], true),
    // Host the test waypoints (HBONE servers); not mesh workloads.
    Pod::new("waypoint", 1, [10, 2, 0, 10], false),
    Pod::new("waypoint2", 1, [10, 2, 0, 11], false),
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

pub fn pod(name: &str) -> Pod {
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

pub fn pod_addr(name: &str) -> SocketAddr {
    Family::V4.pod_addr(name)
}

/// Where HBONE to pod `name` is addressed (`podIP:15008`).
pub fn pod_hbone(name: &str) -> SocketAddr {
    Family::V4.pod_hbone(name)
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

fn gateway6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, node as u16 + 1, 0, 0, 0, 0, 0, 1)
}

fn mesh(policies: &str, waypoint_for: Option<&str>) -> String {
    // No `nodes:` entries: HBONE is addressed to the destination pod (`podIP:15008`, Istio's
    // way), redirected to the node's ztunnel by the capture rules, and answered with the
    // pod's own identity.
    let wp = waypoint_addr();
    let wp2 = waypoint2_addr();
    let waypoint_labels = waypoint_for
        .map(|t| format!(", labels: {{istio.io/waypoint-for: {t}}}"))
        .unwrap_or_default();
    // Dual stack when IPv6 is here: every pod has both addresses.
    let v6 = netlab::ipv6_available();
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
  - {{name: waypoint, namespace: ns-w, address: "{wp}"{waypoint_labels}}}
  - {{name: waypoint2, namespace: ns-w, address: "{wp2}", annotations: {{istio.io/for-service-account: wpod2}}}}
workloads:
  - {{name: client, namespace: ns-a, serviceAccount: client, workloadIps: [{}], node: node-a}}
  - {{name: legacy-client, namespace: legacy, workloadIps: [{}], node: node-a}}
  - {{name: client2, namespace: ns-a, serviceAccount: client, workloadIps: [{}], node: node-a}}
  - {{name: server, namespace: ns-b, serviceAccount: server, workloadIps: [{}], node: node-b}}
  - {{name: server2, namespace: ns-b, serviceAccount: server, workloadIps: [{}], node: node-b, labels: {{app: server2}}}}
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
        ip("client2"),
        ip("server"),
        ip("server2"),
        ip("legacy"),
        ip("wpod"),
        ip("wpod2"),
    )
}

/// The running topology.
pub struct World {
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
    nodes: TwoNodes,
    lab: Lab,
    /// The namespace waypoint's `istio.io/waypoint-for` label, when it has one.
    waypoint_for: Option<String>,
}

impl World {
    /// Build the namespaces, install capture rules, start both ztunnels (node B with
    /// `policies_b`, a YAML list) and wait for their READY lines.
    pub fn new(tag: &str, policies_b: &str) -> World {
        World::with_mesh(tag, policies_b, "")
    }

    /// As [`World::new`], with `extra` (top-level YAML, e.g. `nodes:`) appended to both
    /// nodes' mesh.
    pub fn with_mesh(tag: &str, policies_b: &str, extra: &str) -> World {
        World::build(tag, policies_b, extra, None)
    }

    /// As [`World::new`], the namespace waypoint labelled `istio.io/waypoint-for: traffic`.
    pub fn with_waypoint_for(tag: &str, traffic: &str) -> World {
        World::build(tag, "[]", "", Some(traffic.to_string()))
    }

    fn build(tag: &str, policies_b: &str, extra: &str, waypoint_for: Option<String>) -> World {
        let mut lab = Lab::for_test("zt", tag).unwrap();
        let dir = lab.dir().expect("the test's folder").to_path_buf();
        let ca_dir = dir.join("ca");
        hbone::ca::SigningCa::builtin(&ca_dir, "cluster.local").unwrap();
        let nodes = build(&mut lab).unwrap_or_else(|e| panic!("building the topology: {e}"));
        let mut w = World {
            dir,
            ca_dir,
            nodes,
            lab,
            waypoint_for,
        };
        w.start_ztunnels(policies_b, extra);
        w
    }

    pub fn node(&self, i: usize) -> String {
        self.nodes.nodes[i].clone()
    }

    pub fn pod_ns(&self, name: &str) -> String {
        self.lab.ns(name)
    }

    /// Capture rules (from the config: R2) and ztunnels.
    fn start_ztunnels(&mut self, policies_b: &str, extra: &str) {
        for i in 0..2 {
            let name = ["node-a", "node-b"][i];
            let policies = if i == 1 { policies_b } else { "[]" };
            let file = self.dir.join(format!("{name}.yaml"));
            // Node A's rules are installed from outside (as `ztunnel capture install`
            // would); node B's ztunnel owns its rules (`capture:`) and keeps them in step
            // with reloads.
            let mut owned = if i == 1 { "  capture: {}\n" } else { "" }.to_string();
            if netlab::ipv6_available() {
                // Dual stack: the capture listeners again on [::].
                owned.push_str("  address6: \"::\"\n");
            }
            std::fs::write(
                &file,
                format!(
                    "ztunnel:\n  node: {name}\n  address: 0.0.0.0\n  outbound: 0.0.0.0:15001\n  plaintext:\n    - listen: 0.0.0.0:15006\n{owned}  ca: {{builtin: {}}}\nruntime: {{workers: 1, pin: false, drain_timeout: 1s}}\n{}",
                    self.ca_dir.display(),
                    mesh(policies, self.waypoint_for.as_deref()) + extra
                ),
            )
            .unwrap();
            let loaded = ztunnel::config::load_file(&file, &tuning::Profile::default(), 1).unwrap();
            let rules = ztunnel::capture::Rules::for_node(&loaded.snapshot, name, |w| {
                Some(TwoNodes::pod_dev(&w.name))
            });
            // The config (namespace labels) and the topology agree on who is captured.
            let expected = netlab::captured_devs(PODS, i);
            assert_eq!(rules.pod_interfaces, expected, "captured pods of {name}");
            if i == 0 {
                rules.install(Some(&self.node(i))).unwrap();
            }
            let mut cmd = netlab::netns_command(&self.node(i), env!("CARGO_BIN_EXE_ztunnel"));
            cmd.arg("--config").arg(&file).env("RUST_LOG", "info");
            self.lab
                .spawn_logged(name, &mut cmd, Duration::from_secs(15));
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

    /// The node-side interfaces node `i`'s capture table captures outbound (sorted), read
    /// back from the kernel with `nft list table`.
    pub fn capture_rules(&self, i: usize) -> Vec<String> {
        let text = netlab::nft_list_table(&self.node(i), "inet", "ztunnel_capture")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut ifaces: Vec<String> = text
            .lines()
            .filter(|l| l.contains("iifname") && l.contains("tproxy to :15001"))
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
        self.lab.log(name)
    }

    /// `/stats/prometheus` of node `i`, fetched from inside its namespace.
    pub fn stats(&self, i: usize) -> String {
        let stats = SocketAddr::from(([127, 0, 0, 1], 15020));
        netlab::http_get_in(&self.node(i), stats, "/stats/prometheus")
            .unwrap_or_else(|e| panic!("stats of node {i}: {e}"))
    }

    /// Both nodes' stats pages and logs, for a failing test's message.
    pub fn dump(&self) -> impl Fn() -> String + '_ {
        move || {
            format!(
                "--- node-a stats\n{}\n--- node-b stats\n{}\n--- node-a log\n{}\n--- node-b log\n{}",
                self.stats(0),
                self.stats(1),
                self.log("node-a"),
                self.log("node-b")
            )
        }
    }

    /// Connect from pod `from` to `dst`.
    pub fn connect(&self, from: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
        connect_in(&self.pod_ns(from), dst)
    }

    /// Connect from pod `from` to `dst` and expect no byte back: Ok when the connection is
    /// refused, reset or ended without data (see [`refused`]), Err with what came back.
    pub fn connect_refused(&self, from: &str, dst: SocketAddr) -> Result<(), Vec<u8>> {
        match self.connect(from, dst) {
            Ok(mut s) => refused(&mut s),
            Err(_) => Ok(()),
        }
    }

    /// Connect from pod `from` to `dst`, read the greeting of whoever answered and check
    /// `data` comes back: (the greeting, the stream).
    pub fn call(&self, from: &str, dst: SocketAddr, data: &[u8]) -> (String, TcpStream) {
        let mut s = self
            .connect(from, dst)
            .unwrap_or_else(|e| panic!("{from} to {dst}: {e}"));
        let who = crate::common::hello(&mut s);
        assert_eq!(crate::common::roundtrip(&mut s, data), data);
        (who, s)
    }

    /// Start the echo server of pod `name` on `:8080` of its `fam` address.
    pub fn server_on(&self, fam: Family, name: &str) -> Server {
        Server::start(&self.pod_ns(name), fam.pod_addr(name), name)
    }

    /// Start the echo server of pod `name` on `:8080` (IPv4).
    pub fn server(&self, name: &str) -> Server {
        self.server_on(Family::V4, name)
    }
}

/// The namespaces, veths, addresses and routes (both families where IPv6 is here).
fn build(lab: &mut Lab) -> netlab::Result<TwoNodes> {
    let mut plans = vec![Family::V4.addressing()];
    if netlab::ipv6_available() {
        plans.push(Family::V6.addressing());
    }
    TwoNodes::with_pods(lab, PODS, &plans)
}

/// Poll `f` until true or 5 s; on timeout panic with `dump()`.
pub fn eventually_or(what: &str, f: impl FnMut() -> bool, dump: impl FnOnce() -> String) {
    netlab::eventually(what, Duration::from_secs(5), f, dump)
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
            Err(e) if crate::common::still_open(&e) => {
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
