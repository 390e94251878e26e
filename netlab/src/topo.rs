//! [`TwoNodes`]: two routed nodes and pods behind them.

use std::net::{IpAddr, Ipv4Addr};

use crate::cmd::{run, run_in};
use crate::{Lab, Result};

/// The veth between the nodes: its name in node A (towards B) and in node B.
pub const NODE_LINK: [&str; 2] = ["to-b", "to-a"];

/// One pod of a [`TwoNodes`] lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pod {
    pub name: &'static str,
    /// 0: node A, 1: node B.
    pub node: usize,
    /// Its IPv4 address (an IPv6 plan gives its own, see [`TwoNodes::address`]).
    pub ip: Ipv4Addr,
    /// Whether its node's capture rules redirect its traffic ([`captured_devs`]: what the
    /// caller's rules must cover).
    pub captured: bool,
}

impl Pod {
    pub const fn new(name: &'static str, node: usize, ip: [u8; 4], captured: bool) -> Pod {
        Pod {
            name,
            node,
            ip: Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
            captured,
        }
    }
}

/// The node-side veths of the captured pods of node `node`, sorted: what its capture rules
/// must list.
pub fn captured_devs(pods: &[Pod], node: usize) -> Vec<String> {
    let mut devs: Vec<String> = pods
        .iter()
        .filter(|p| p.node == node && p.captured)
        .map(|p| TwoNodes::pod_dev(p.name))
        .collect();
    devs.sort();
    devs
}

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
    /// A pod's address in this family (IPv4: `|p| p.ip.into()`).
    pub pod_ip: fn(&Pod) -> IpAddr,
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

    /// The whole lab: both nodes, the pods, and the addresses of each plan (one per
    /// family).
    pub fn with_pods(lab: &mut Lab, pods: &[Pod], plans: &[Addressing]) -> Result<TwoNodes> {
        let nodes = TwoNodes::build(lab)?;
        nodes.add_pods(lab, pods)?;
        for plan in plans {
            nodes.address(lab, plan, pods)?;
        }
        Ok(nodes)
    }

    /// Create the pods' namespaces, each behind its node (veth `p-<pod>` ⇄ `eth0`, both
    /// up, no addresses yet).
    pub fn add_pods(&self, lab: &mut Lab, pods: &[Pod]) -> Result<()> {
        for p in pods {
            let ns = lab.add_ns(p.name)?;
            veth(&self.nodes[p.node], &Self::pod_dev(p.name), &ns, "eth0")?;
        }
        Ok(())
    }

    /// Give the lab the addresses of one family: forwarding on in the nodes (and, for
    /// IPv4, reverse-path filtering off: replies of a proxy leave by another interface), the
    /// link addresses and the routes between the nodes, and for each pod its address
    /// (`plan.pod_ip`), its host route on its node and its default route via the gateway.
    /// IPv6 addresses skip duplicate address detection, so they are usable at once.
    pub fn address(&self, lab: &Lab, plan: &Addressing, pods: &[Pod]) -> Result<()> {
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
        for p in pods {
            let (pns, nns) = (lab.ns(p.name), &self.nodes[p.node]);
            let dev = Self::pod_dev(p.name);
            let gw = plan.gateways[p.node].to_string();
            addr_add(nns, &format!("{gw}/{host}"), &dev)?;
            let ip_host = format!("{}/{host}", (plan.pod_ip)(p));
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
