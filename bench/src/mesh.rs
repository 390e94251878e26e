//! The default mesh the main job brings up (root: network namespaces with transparent
//! capture; see `ztunnel/tests/netns/mod.rs` for the same shape in the ztunnel tests).
//!
//! ```text
//!  pod "client"       10.181.0.2 (captured) ─┐                                  ┌─ pod "echo"     10.182.0.2 (captured)
//!  pod "plain-client" 10.181.0.3 ────────────┤ node A ── veth ── node B ────────┼─ pod "echo-v1"  10.182.0.3 (captured)
//!  pod "peer"         10.181.0.5 ────────────┘
//!                                          ztunnel A        ztunnel B           ├─ pod "plain"    10.182.0.4 (not captured)
//!                                       10.180.255.1      10.180.255.2          └─ pod "waypoint" 10.182.0.10 (the waypoint)
//! ```
//!
//! Namespaces are named `bn<pid>-<name>` (`na`, `nb` for the nodes); addresses are in
//! 10.180.0.0/14, apart from the ztunnel tests' (`zt…`, 10.1/10.2/192.168.100) and the
//! waypoint tests' (`wp…`) so all can run at once. Pods are routed (a /32 per pod on its
//! node, default route via the node's `10.18x.0.1`), so every pod packet crosses its node's
//! `PREROUTING`, where `ztunnel::capture` installs the redirects for the captured pods (those
//! of a namespace labelled `istio.io/dataplane-mode: ambient`).
//!
//! Paths over this mesh (all with the same backends, in pods on node B):
//! - `direct`: `plain-client` → `plain`: the same veths and node routing, no proxy.
//! - `l4`: `client` → `plain`: captured by ztunnel A and passed through as plain TCP
//!   (R1: the destination is not in the mesh), i.e. one L4 proxy hop.
//! - `hbone`: `client` → `echo` (pod address): ztunnel A → HBONE (mTLS, HTTP/2 CONNECT) →
//!   ztunnel B → pod (R5). The pods opt out of their namespace's waypoint
//!   (`istio.io/use-waypoint: none` on the workload, R3), so pod-addressed traffic is not
//!   sent to it; only the services are bound to it (their own label, R7).
//! - `waypoint`: `client` → the `echo` service VIP: ztunnel A → HBONE → waypoint (R7;
//!   HTTPRoute `echo` → `echo-v1`, R17) → HBONE → ztunnel B → `echo-v1`.
//!
//! The namespaces, veths, addresses and routes are `netlab`'s (`TwoNodes`, the same shape as
//! the ztunnel and waypoint namespace tests). Everything is removed on drop (children
//! stopped, then the `netlab::Lab` deletes the namespaces, which takes their veths and
//! nftables rules with them); a Ctrl-C ends the suite and the report is written after this
//! teardown; namespaces left by a harness that was killed (or a second Ctrl-C) are swept at
//! the next start.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use netlab::{Addressing, Lab, Pod, TwoNodes};

use crate::proxy::Proxy;

pub const PREFIX: &str = "bn";
pub const NODE_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(10, 180, 255, 1),
    Ipv4Addr::new(10, 180, 255, 2),
];
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 183, 0, 1);
pub const ECHO_V1_VIP: Ipv4Addr = Ipv4Addr::new(10, 183, 0, 2);
/// `echo-h2`: `echo-v1`'s HTTP/2 backend port behind the waypoint (DestinationRule
/// `useClientProtocol`, so the waypoint speaks HTTP/2 upstream too).
pub const ECHO_H2_VIP: Ipv4Addr = Ipv4Addr::new(10, 183, 0, 3);
/// Service port of `echo` and `echo-v1` (to the pods' HTTP backend).
pub const SERVICE_PORT: u16 = 80;

/// The pods: `(name, node, IPv4, captured)`; the mesh model's namespace labels must agree.
pub const PODS: &[Pod] = &[
    Pod::new("client", 0, [10, 181, 0, 2], true),
    Pod::new("plain-client", 0, [10, 181, 0, 3], false),
    // Hosts `--peer` proxies (see `crate::peer`); not a mesh workload.
    Pod::new("peer", 0, [10, 181, 0, 5], false),
    Pod::new("echo", 1, [10, 182, 0, 2], true),
    Pod::new("echo-v1", 1, [10, 182, 0, 3], true),
    Pod::new("plain", 1, [10, 182, 0, 4], false),
    Pod::new("waypoint", 1, [10, 182, 0, 10], false),
];

pub fn pod(name: &str) -> Pod {
    *PODS.iter().find(|p| p.name == name).expect("known pod")
}

fn gateway(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 181 + node as u8, 0, 1)
}

/// Where the mesh's pods and nodes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Network namespaces with transparent capture (root).
    Netns,
    /// Loopback addresses `127.<net>.x.y` in this namespace; clients go through ztunnel A's
    /// SOCKS5 (no root needed). Node A's pods are `127.<net>.1.*`, node B's `127.<net>.2.*`,
    /// the nodes' ztunnels `.10` of their /24, the waypoint `127.<net>.5.10`.
    Loopback { net: u8 },
}

impl Layout {
    /// This run's loopback layout (the second octet from the pid, so concurrent runs and
    /// the ztunnel tests' `127.<small n>` worlds stay apart).
    pub fn loopback() -> Layout {
        Layout::Loopback {
            net: 150 + (std::process::id() % 50) as u8,
        }
    }
    pub fn is_loopback(self) -> bool {
        matches!(self, Layout::Loopback { .. })
    }
    /// A pod's address.
    pub fn ip(self, name: &str) -> Ipv4Addr {
        match self {
            Layout::Netns => pod(name).ip,
            Layout::Loopback { net } => {
                let (c, d) = match name {
                    "client" => (1, 2),
                    "plain-client" => (1, 3),
                    "peer" => (1, 5),
                    "echo" => (2, 2),
                    "echo-v1" => (2, 3),
                    "plain" => (2, 4),
                    "waypoint" => (5, 10),
                    other => panic!("unknown pod {other}"),
                };
                Ipv4Addr::new(127, net, c, d)
            }
        }
    }
    /// The waypoint's HBONE address. On loopback its port is not 15008: ztunnel B's HBONE
    /// listens on `0.0.0.0:15008` there (see [`Mesh::build_loopback`]).
    pub fn waypoint_addr(self) -> SocketAddr {
        let port = if self.is_loopback() { 15018 } else { 15008 };
        SocketAddr::new(IpAddr::V4(self.ip("waypoint")), port)
    }
    /// Node `i`'s ztunnel address.
    pub fn node_ip(self, i: usize) -> Ipv4Addr {
        match self {
            Layout::Netns => NODE_IPS[i],
            Layout::Loopback { net } => Ipv4Addr::new(127, net, 1 + i as u8, 10),
        }
    }
}

/// Is this process root (effective uid 0)?
pub use netlab::is_root;

/// Move the calling thread into network namespace `ns` (sockets it creates from then on
/// live there; threads it spawns inherit it).
pub use netlab::enter;

/// Run `f` on a fresh thread inside `ns`.
pub fn in_ns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    netlab::try_in_ns(ns, f)?
}

/// Install ztunnel's capture rules (table and policy routing) in `ns`, as `ztunnel capture
/// install` does.
fn install_rules(rules: &ztunnel::capture::Rules, ns: &str) -> Result<()> {
    rules
        .install(Some(ns))
        .map_err(|e| anyhow::anyhow!("installing capture rules in {ns}: {e}"))
}

/// The mesh-model part of the config, shared by both ztunnels and the waypoint.
pub fn mesh_yaml(layout: Layout) -> String {
    mesh_yaml_nodes(layout, true)
}

/// `nodes`: on loopback, list the nodes' ztunnel addresses (the ztunnels' config). The
/// waypoint's config leaves them out: it then sends to `podIP:15008`, which ztunnel B
/// answers with the pod's identity, the one the waypoint checks.
pub fn mesh_yaml_nodes(layout: Layout, nodes: bool) -> String {
    let ip = |n: &str| layout.ip(n);
    let wp = layout.waypoint_addr();
    // On loopback nothing is captured: HBONE goes to the destination node's ztunnel.
    let nodes = if layout.is_loopback() && nodes {
        format!(
            "nodes:\n  - {{name: node-a, ztunnel: {}}}\n  - {{name: node-b, ztunnel: {}}}\n",
            layout.node_ip(0),
            layout.node_ip(1)
        )
    } else {
        String::new()
    };
    format!(
        r#"{nodes}namespaces:
  - name: bench-client
    labels: {{istio.io/dataplane-mode: ambient}}
  - name: bench
    labels: {{istio.io/dataplane-mode: ambient}}
  - name: legacy
waypoints:
  - {{name: waypoint, namespace: bench, address: "{wp}"}}
workloads:
  - {{name: client, namespace: bench-client, serviceAccount: client, workloadIps: [{}], node: node-a}}
  - {{name: plain-client, namespace: legacy, workloadIps: [{}], node: node-a}}
  - {{name: echo, namespace: bench, serviceAccount: echo, workloadIps: [{}], node: node-b, labels: {{istio.io/use-waypoint: none}}}}
  - {{name: echo-v1, namespace: bench, serviceAccount: echo, workloadIps: [{}], node: node-b, labels: {{istio.io/use-waypoint: none}}}}
  - {{name: plain, namespace: legacy, workloadIps: [{}], node: node-b}}
services:
  - name: echo
    namespace: bench
    hostname: echo.bench.svc.cluster.local
    vips: [{ECHO_VIP}]
    ports: {{{SERVICE_PORT}: {http}}}
    endpoints: [{{workloadUid: bench/echo}}]
    labels: {{istio.io/use-waypoint: waypoint}}
  - name: echo-v1
    namespace: bench
    hostname: echo-v1.bench.svc.cluster.local
    vips: [{ECHO_V1_VIP}]
    ports: {{{SERVICE_PORT}: {http}}}
    endpoints: [{{workloadUid: bench/echo-v1}}]
    labels: {{istio.io/use-waypoint: waypoint}}
  - name: echo-h2
    namespace: bench
    hostname: echo-h2.bench.svc.cluster.local
    vips: [{ECHO_H2_VIP}]
    ports: {{{SERVICE_PORT}: {h2}}}
    endpoints: [{{workloadUid: bench/echo-v1}}]
    labels: {{istio.io/use-waypoint: waypoint}}
policies: []
"#,
        ip("client"),
        ip("plain-client"),
        ip("echo"),
        ip("echo-v1"),
        ip("plain"),
        http = crate::backend::PORTS.http,
        h2 = crate::backend::PORTS.h2,
    )
}

/// Runtime and HTTP/2 sections for a proxy of the mesh: the profile's knobs, with the
/// placement (cores, workers, pinning, driver) the harness decides.
pub fn tuning_yaml(
    profile: &tuning::Profile,
    cores: &[usize],
    workers: usize,
    io_driver: &str,
) -> Result<String> {
    let mut rt = profile.runtime.clone();
    if cores.is_empty() {
        rt.cores = None;
        rt.pin = false;
        rt.workers = Some(workers);
    } else {
        rt.cores = Some(cores.to_vec());
        rt.pin = true;
        rt.workers = Some(cores.len());
    }
    rt.io_driver = io_driver
        .parse()
        .map_err(|e| anyhow::anyhow!("io driver {io_driver:?}: {e}"))?;
    rt.drain_timeout = std::time::Duration::from_secs(1);
    // JSON is YAML: one line each.
    Ok(format!(
        "runtime: {}\nh2: {}\n",
        serde_json::to_string(&rt)?,
        serde_json::to_string(&profile.h2)?
    ))
}

/// How to bring the mesh up.
#[derive(Debug, Clone)]
pub struct MeshSpec {
    /// Proxy cores (both ztunnels and the waypoint share them); empty = unpinned.
    pub proxy_cores: Vec<usize>,
    pub workers: usize,
    pub io_driver: String,
    pub profile_name: String,
    pub profile: tuning::Profile,
    /// Start the waypoint too.
    pub waypoint: bool,
    pub layout: Layout,
    /// Loopback layout: ztunnel A's SOCKS5 address (default node A's address, port 15080).
    pub socks5: Option<SocketAddr>,
    /// More documents for the waypoint's configuration (`--waypoint-docs`).
    pub waypoint_docs: Option<String>,
}

/// The running mesh. Drop tears it down.
pub struct Mesh {
    pub prefix: String,
    pub dir: PathBuf,
    /// The namespaces (none on the loopback layout); deleted after the proxies stopped.
    lab: Lab,
    /// ztunnel A, ztunnel B.
    pub ztunnels: Vec<Proxy>,
    pub waypoint: Option<Proxy>,
    /// Why the waypoint is not running, when it is not.
    pub waypoint_error: Option<String>,
    pub layout: Layout,
    /// Loopback layout: where clients ask ztunnel A for their connections.
    pub socks5: Option<SocketAddr>,
    /// The profile's `h2` section, also given to `hbone-cold`'s proxy pair.
    pub h2: hbone::H2Settings,
}

impl Mesh {
    /// A pod's or node's network namespace ("" on the loopback layout: this one).
    pub fn ns(&self, pod_or_node: &str) -> String {
        if self.layout.is_loopback() {
            return String::new();
        }
        format!("{}-{pod_or_node}", self.prefix)
    }

    pub fn node_ns(&self, i: usize) -> String {
        self.ns(["na", "nb"][i])
    }

    /// `Tcp: RetransSegs` summed over every namespace of the mesh (pods and nodes; the
    /// harness's own namespace on the loopback layout). Traffic here never touches the
    /// harness's namespace, so its counter alone read 0 whatever happened.
    pub fn tcp_retrans_segs(&self) -> Option<u64> {
        if self.layout.is_loopback() {
            return crate::host::tcp_retrans_segs();
        }
        let mut total = 0;
        for name in PODS.iter().map(|p| p.name).chain(["na", "nb"]) {
            total += in_ns(&self.ns(name), || Ok(crate::host::tcp_retrans_segs())).ok()??;
        }
        Some(total)
    }

    /// Build the namespaces, install capture, start both ztunnels (and the waypoint).
    pub fn up(spec: &MeshSpec, dir: &Path) -> Result<Mesh> {
        if !spec.layout.is_loopback() {
            netlab::sweep_stale(PREFIX);
        }
        let prefix = netlab::process_prefix(PREFIX);
        let dir = dir.join("mesh");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut m = Mesh {
            lab: Lab::new(prefix.clone()),
            prefix,
            dir,
            ztunnels: Vec::new(),
            waypoint: None,
            waypoint_error: None,
            layout: spec.layout,
            socks5: None,
            h2: spec.profile.h2.clone(),
        };
        if spec.layout.is_loopback() {
            m.build_loopback(spec)?;
        } else {
            m.build(spec)?;
        }
        Ok(m)
    }

    /// The built-in CA (created once for both ztunnels and the waypoint) and the proxies'
    /// runtime/HTTP/2 sections.
    fn ca_and_tuning(&self, spec: &MeshSpec) -> Result<(PathBuf, String)> {
        let ca_dir = self.dir.join("ca");
        hbone::ca::SigningCa::builtin(&ca_dir, "cluster.local").map_err(|e| {
            anyhow::anyhow!("creating the built-in CA in {}: {e}", ca_dir.display())
        })?;
        let tun = tuning_yaml(
            &spec.profile,
            &spec.proxy_cores,
            spec.workers,
            &spec.io_driver,
        )?;
        Ok((ca_dir, tun))
    }

    /// The waypoint, when the suite has a waypoint path; why it did not start is kept, not
    /// fatal (the other paths still run).
    fn start_waypoint(&mut self, spec: &MeshSpec, ca_dir: &Path, tun: &str) {
        if spec.waypoint {
            match crate::waypoint::start(self, spec, ca_dir, tun) {
                Ok(p) => self.waypoint = Some(p),
                Err(e) => self.waypoint_error = Some(format!("{e:#}")),
            }
        }
    }

    /// The loopback layout: both ztunnels and the waypoint on their own 127.x addresses,
    /// no namespaces, no capture; clients use ztunnel A's SOCKS5.
    ///
    /// ztunnel B's HBONE inbound listens on `0.0.0.0:15008`: the waypoint sends to a pod's
    /// `podIP:15008` (it checks the pod's identity, which ztunnel B presents for connections
    /// addressed to its pods, by local address), while ztunnel A goes to node B's address
    /// (`nodes:`) and expects the ztunnel identity. So nothing else may listen on port 15008:
    /// ztunnel A's (unused) HBONE inbound is on 15009, the waypoint on 15018.
    fn build_loopback(&mut self, spec: &MeshSpec) -> Result<()> {
        let (ca_dir, tun) = self.ca_and_tuning(spec)?;
        let socks_a = spec
            .socks5
            .unwrap_or(SocketAddr::new(self.layout.node_ip(0).into(), 15080));
        for (i, name) in ["node-a", "node-b"].into_iter().enumerate() {
            let address = self.layout.node_ip(i);
            let (socks, hbone) = if i == 0 {
                (socks_a, format!("{address}:15009"))
            } else {
                (
                    SocketAddr::new(address.into(), 15080),
                    "0.0.0.0:15008".to_string(),
                )
            };
            let file = self.dir.join(format!("{name}.yaml"));
            std::fs::write(
                &file,
                format!(
                    "# written by bench (loopback)\nztunnel:\n  node: {name}\n  address: {address}\n  socks5: \"{socks}\"\n  hbone: \"{hbone}\"\n  ca: {{builtin: {}}}\n{tun}{}",
                    ca_dir.display(),
                    mesh_yaml(self.layout)
                ),
            )
            .with_context(|| format!("writing {}", file.display()))?;
            let z = Proxy::spawn_ztunnel("", &file, &spec.profile_name, name)?;
            self.ztunnels.push(z);
        }
        self.socks5 = Some(socks_a);
        self.start_waypoint(spec, &ca_dir, &tun);
        Ok(())
    }

    fn build(&mut self, spec: &MeshSpec) -> Result<()> {
        let plan = Addressing {
            node_ips: NODE_IPS.map(IpAddr::V4),
            link_prefix: 24,
            gateways: [gateway(0).into(), gateway(1).into()],
            // Node B's pods and the service VIPs lie beyond node B, node A's pods beyond A.
            routes: vec![
                (0, "10.182.0.0/24".into()),
                (0, "10.183.0.0/24".into()),
                (1, "10.181.0.0/24".into()),
            ],
            pod_ip: |p| IpAddr::V4(p.ip),
        };
        TwoNodes::with_pods(&mut self.lab, PODS, &[plan]).context("building the mesh's network")?;
        let (ca_dir, tun) = self.ca_and_tuning(spec)?;
        for (i, name) in ["node-a", "node-b"].into_iter().enumerate() {
            let file = self.dir.join(format!("{name}.yaml"));
            std::fs::write(
                &file,
                format!(
                    "# written by bench\nztunnel:\n  node: {name}\n  address: 0.0.0.0\n  outbound: 0.0.0.0:15001\n  plaintext:\n    - listen: 0.0.0.0:15006\n  ca: {{builtin: {}}}\n{tun}{}",
                    ca_dir.display(),
                    mesh_yaml(self.layout)
                ),
            )
            .with_context(|| format!("writing {}", file.display()))?;
            let loaded = ztunnel::config::load_file(&file, &spec.profile, 1)
                .map_err(|e| anyhow::anyhow!("the generated ztunnel config: {e}"))?;
            let rules = ztunnel::capture::Rules::for_node(&loaded.snapshot, name, |w| {
                Some(TwoNodes::pod_dev(&w.name))
            });
            let expected = netlab::captured_devs(PODS, i);
            if rules.pod_interfaces != expected {
                bail!(
                    "capture rules of {name} cover {:?}, the topology captures {expected:?}",
                    rules.pod_interfaces
                );
            }
            let ns = self.node_ns(i);
            install_rules(&rules, &ns)?;
            let z = Proxy::spawn_ztunnel(&ns, &file, &spec.profile_name, name)?;
            self.ztunnels.push(z);
        }
        self.start_waypoint(spec, &ca_dir, &tun);
        Ok(())
    }

    /// Process ids of the proxies a path goes through.
    pub fn pids(&self, path: &str) -> Vec<u32> {
        self.procs(path).into_iter().map(|(_, p)| p).collect()
    }

    /// The proxies `path` crosses, in path order, with the names the report gives them
    /// (`ztunnel-a`, `waypoint`, `ztunnel-b`).
    pub fn procs(&self, path: &str) -> Vec<(&'static str, u32)> {
        let z = |i: usize| self.ztunnels.get(i).map(|p| p.pid);
        let a = z(0).map(|p| ("ztunnel-a", p));
        let b = z(1).map(|p| ("ztunnel-b", p));
        let w = self.waypoint.as_ref().map(|w| ("waypoint", w.pid));
        match path {
            "l4" => a.into_iter().collect(),
            "hbone" => [a, b].into_iter().flatten().collect(),
            "waypoint" => [a, w, b].into_iter().flatten().collect(),
            _ => vec![],
        }
    }

    /// Any proxy that died: its name and status.
    pub fn dead(&mut self) -> Option<String> {
        for p in self.ztunnels.iter_mut().chain(self.waypoint.iter_mut()) {
            if let Some(st) = p.exited() {
                return Some(format!("{} exited ({st})", p.name));
            }
        }
        None
    }

    pub fn driver(&self) -> Option<String> {
        self.ztunnels.first().map(|z| z.driver.clone())
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some(mut w) = self.waypoint.take() {
            w.stop();
        }
        for mut z in self.ztunnels.drain(..).rev() {
            z.stop();
        }
        // Only now that nothing runs in them.
        self.lab.teardown();
    }
}
