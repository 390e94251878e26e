//! [`TwoNodes`]: two routed nodes and pods behind them.

use std::net::IpAddr;

use crate::cmd::{run, run_in};
use crate::{Lab, Result};

/// The veth between the nodes: its name in node A (towards B) and in node B.
pub const NODE_LINK: [&str; 2] = ["to-b", "to-a"];

/// The addresses of one family (IPv4 or IPv6) in a [`TwoNodes`] lab.
#[derive(Debug, Clone)]
pub struct Addressing {
    /// The nodes' addresses on the node-to-node link…
    pub node_ips: [IpAddr; 2],
    /// …and its prefix length.
    pub link_prefix: u8,
    /// Per node, the pod-side gateway: the node's address on each of its pod veths.
    pub gateways: [IpAddr; 2],
    /// `(node, network)`: node `node` reaches `network` through the other node.
    pub routes: Vec<(usize, String)>,
}

/// Two node namespaces (`<prefix>-na`, `<prefix>-nb`) joined by a veth, and pods: see the
/// crate docs for the shape.
#[derive(Debug, Clone)]
pub struct TwoNodes {
    /// The node namespaces' full names.
    pub nodes: [String; 2],
}

impl TwoNodes {
    /// Create both node namespaces and the veth between them.
    pub fn build(lab: &mut Lab) -> Result<TwoNodes> {
        let nodes = [lab.add_ns("na")?, lab.add_ns("nb")?];
        let [na, nb] = &nodes;
        veth(na, NODE_LINK[0], nb, NODE_LINK[1])?;
        Ok(TwoNodes { nodes })
    }

    /// The name of pod `pod`'s veth on its node (`p-<pod>`, at most 15 bytes).
    pub fn pod_dev(pod: &str) -> String {
        format!("p-{pod}")
    }

    /// Create pod namespace `<prefix>-<pod>` behind node `node` (veth `p-<pod>` ⇄ `eth0`,
    /// both up, no addresses yet); returns its full name.
    pub fn add_pod(&self, lab: &mut Lab, pod: &str, node: usize) -> Result<String> {
        let ns = lab.add_ns(pod)?;
        veth(&self.nodes[node], &Self::pod_dev(pod), &ns, "eth0")?;
        Ok(ns)
    }

    /// Give the lab the addresses of one family: forwarding on in the nodes (and, for
    /// IPv4, reverse-path filtering off: replies of a proxy leave by another interface), the
    /// link addresses and the routes between the nodes, and for each `(pod, node, ip)` the
    /// pod's host route on its node and its default route via the gateway. IPv6 addresses
    /// skip duplicate address detection, so they are usable at once.
    pub fn address(
        &self,
        lab: &Lab,
        plan: &Addressing,
        pods: impl IntoIterator<Item = (String, usize, IpAddr)>,
    ) -> Result<()> {
        let v6 = plan.node_ips[0].is_ipv6();
        let (fam, host) = if v6 { ("-6", 128) } else { ("-4", 32) };
        let addr_add = |ns: &str, cidr: &str, dev: &str| {
            let mut a = vec!["ip", "-n", ns, fam, "addr", "add", cidr, "dev", dev];
            if v6 {
                a.push("nodad");
            }
            run(&a)
        };
        for n in &self.nodes {
            // New namespaces start with forwarding off.
            if v6 {
                run_in(n, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            } else {
                for kv in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"] {
                    run_in(n, &["sysctl", "-qw", kv])?;
                }
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let cidr = format!("{}/{}", plan.node_ips[i], plan.link_prefix);
            addr_add(n, &cidr, NODE_LINK[i])?;
        }
        for (i, net) in &plan.routes {
            let via = plan.node_ips[1 - i].to_string();
            run(&[
                "ip",
                "-n",
                &self.nodes[*i],
                fam,
                "route",
                "add",
                net,
                "via",
                &via,
            ])?;
        }
        for (pod, node, ip) in pods {
            let (pns, nns) = (lab.ns(&pod), &self.nodes[node]);
            let dev = Self::pod_dev(&pod);
            let gw = plan.gateways[node].to_string();
            addr_add(nns, &format!("{gw}/{host}"), &dev)?;
            let ip_host = format!("{ip}/{host}");
            run(&["ip", "-n", nns, fam, "route", "add", &ip_host, "dev", &dev])?;
            addr_add(&pns, &ip_host, "eth0")?;
            run(&["ip", "-n", &pns, fam, "route", "add", &gw, "dev", "eth0"])?;
            run(&[
                "ip", "-n", &pns, fam, "route", "add", "default", "via", &gw, "dev", "eth0",
            ])?;
        }
        Ok(())
    }
}

/// A veth pair: `dev_a` in `ns_a`, `dev_b` in `ns_b`, both up.
fn veth(ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str) -> Result<()> {
    run(&[
        "ip", "-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns",
        ns_b,
    ])?;
    run(&["ip", "-n", ns_a, "link", "set", dev_a, "up"])?;
    run(&["ip", "-n", ns_b, "link", "set", dev_b, "up"])
}
