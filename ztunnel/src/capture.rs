//! Transparent capture (issue 4 item 5a): the node-level redirect rules and the helper that
//! installs and removes them.
//!
//! # Design: node-level redirection, not in-pod listeners
//!
//! ztunnel runs in the **node's** network namespace. Each pod is its own network namespace
//! joined to the node by a veth pair and routed (a /32 route per pod on the node side, the
//! pod's default route via the node), so every packet a pod sends or receives crosses the
//! node's IP stack and its `PREROUTING` hook. One nftables table on the node, a `filter`
//! chain in the `prerouting` hook (and a `nat` one in `output`, below), does all the
//! capturing:
//!
//! - TCP **arriving from the veth of a captured pod** → `tproxy to :15001` (outbound
//!   capture), in a `filter` chain at `prerouting` priority `mangle`, which also marks the
//!   packet ([`TPROXY_MARK`]); a policy route (`ip rule fwmark … lookup` [`TPROXY_TABLE`],
//!   `local default dev lo` in that table) then delivers it locally whatever its
//!   destination. The accepted socket keeps both addresses: ztunnel identifies the client
//!   workload by its peer IP and reads the destination (pod IP or service VIP) as the
//!   socket's local address. Why not `REDIRECT` (which this capture used first): it maps
//!   every destination onto one local `node:15001`, so a client port reused for another
//!   destination while ztunnel still holds the earlier connection in TIME_WAIT (it closes
//!   first whenever the upstream does) meets that TIME_WAIT, whose timestamps came from the
//!   other destination (Linux offsets TCP timestamps per address pair): PAWS refuses the SYN
//!   and the client retries it after a second (measured in the bench's conn-churn: 329 of
//!   ~40,000 connections, `TcpExtPAWSTimewait` on the node, `TCPSynRetrans` in the pod;
//!   Istio's sidecar capture has the same issue, istio/istio#38982, #43301). With `tproxy`
//!   each destination has its own 4-tuple. A packet the `tproxy` statement finds no socket
//!   for (ztunnel not running) is still marked and delivered locally, where nothing listens:
//!   the client gets a reset, as it got from `REDIRECT` to an unserved port (fail closed).
//! - TCP **addressed to a captured pod's `:15008`** (HBONE, Istio's way: peers tunnel to
//!   `podIP:15008`) → `tproxy to :15008`, marked and routed locally like outbound, to the
//!   node's (transparent) HBONE listener, which reads the address the connection was made to
//!   (its local address) to present *that pod's* certificate (every tunnel uses the
//!   identity of the workload it acts for). This node's own ztunnel tunnelling to a pod of
//!   the same node is locally generated, so it never crosses `prerouting`, and `tproxy`
//!   works nowhere else: a `redirect to :15008` in a `nat` chain of the `output` hook
//!   catches it (`REDIRECT` there goes to the loopback address, so the HBONE listener must
//!   be bound on the wildcard address for that case; it reads `SO_ORIGINAL_DST`). `REDIRECT`
//!   captured HBONE from other nodes too until the port-reuse test below showed the same
//!   TIME_WAIT aliasing as outbound: two pods' `:15008` mapped onto one `node:15008`
//!   (`r5_hbone_client_port_reused_for_another_pod_is_captured_at_once`).
//! - Any other TCP **addressed to a captured pod** (from anywhere else: another node, an
//!   uncaptured pod) → `tproxy ip|ip6 to :15006` (plaintext inbound, no identity, R10), marked and
//!   routed locally like outbound, for the same reason (a client port reused for two pods
//!   of the node must not meet one TIME_WAIT). HBONE
//!   addressed to the node's ztunnel (`nodes[].ztunnel`, `:15008`) is not redirected and is
//!   answered with the ztunnel's own identity.
//!
//! Why node level: one set of listeners per node serves every pod (no per-pod sockets,
//! threads or `setns` dance inside the thread-per-core runtime, whose workers own their
//! listeners for life), adding a pod is adding its interface and address to two sets, and
//! the pod's own namespace is left untouched (nothing to install when a pod starts, nothing
//! the pod can tamper with). Per-pod identity on the HBONE inbound is kept by addressing
//! tunnels to the pod (`podIP:15008`) and choosing the certificate from the original
//! destination, as above.
//!
//! # Why ztunnel's own connections are not captured again
//!
//! Only the `prerouting` hook redirects, except HBONE to a pod of this node (`output` hook,
//! above: it lands on ztunnel's own HBONE listener, which is where it was going anyway).
//! Other packets that ztunnel itself sends (to a pod, a
//! waypoint, another node's `:15008`, or a passthrough destination) are locally generated:
//! they traverse `output`/`postrouting`, never `prerouting`, on this node. So no `SO_MARK`
//! is needed. (On the *peer* node, ztunnel's HBONE arrives addressed to that node's ztunnel
//! or to a pod's `:15008`, which the HBONE rule hands to that node's HBONE listener, its
//! destination either way; a plaintext
//! passthrough to a captured pod is captured there as plaintext inbound, as it should be.)
//! An `output`-hook design would have to mark ztunnel's sockets with `SO_MARK` and exclude
//! the mark; this one has no such rule to get wrong.
//!
//! IPv4 and IPv6 are both handled (`inet` table: the interface rule is family-blind, the
//! address rules come as `ip` and `ip6`); `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` are
//! read by [`runtime::sys::original_dst`]. IPv6 `REDIRECT` lands on the interface's IPv6
//! address, so a dual-stack node runs the capture listeners on `[::]` too (`address6`,
//! see [`crate::config`]; the runtime's IPv6 sockets are IPv6-only). Tested over IPv6 in
//! `tests/namespaced.rs` (`r1_ipv6_…`, `r4_ipv6_…`, `r5_ipv6_…`, `r9_ipv6_…`).

//! # Who owns the rules
//!
//! Either the **ztunnel process**, when its config has a `ztunnel.capture` section
//! ([`crate::config::CaptureSettings`]): it derives the rules from its own snapshot
//! ([`Rules::for_node`], R2: namespace label `istio.io/dataplane-mode=ambient` and the
//! workload override; each pod's veth found by asking the kernel which interface routes its
//! address, [`route_interface`]), installs them before it reports ready, and after every
//! published reload whose captured set changed replaces them in one `nft -f` transaction
//! (the table is deleted and recreated atomically: no instant without rules, no half
//! state); a failure is logged and counted (`ztunnel_capture_errors_total`) and the old
//! rules stay. The rules are *not* removed when ztunnel exits: captured pods then fail
//! closed (their connections delivered locally where nothing listens, or redirected to a
//! port nobody serves: reset) instead of silently bypassing the mesh;
//! `ztunnel capture remove` removes them.
//! Or, without that section, **whoever runs `ztunnel capture install|remove`** (a CNI
//! plug-in, a script): ztunnel then never touches nftables.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::config::{HBONE_PORT, OUTBOUND_CAPTURE_PORT, PLAINTEXT_PORT};

/// The nftables table this module owns (and deletes as a whole).
pub const DEFAULT_TABLE: &str = "ztunnel_capture";

/// Packet mark of outbound-captured packets (set by the `tproxy` rule; Istio's in-pod
/// capture uses the same value).
pub const TPROXY_MARK: u32 = 0x111;
/// Routing table that delivers marked packets locally (`local default dev lo`).
pub const TPROXY_TABLE: u32 = 133;

/// What to capture on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// nftables table name (family `inet`).
    pub table: String,
    /// Node-side interfaces (veths) of captured pods: their TCP goes to `outbound_port`.
    pub pod_interfaces: Vec<String>,
    /// Addresses or CIDRs of captured pods: TCP to them goes to `inbound_port`.
    pub pod_cidrs: Vec<String>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// HBONE to a captured pod's `:hbone_port` goes to this node's `:hbone_port`.
    pub hbone_port: u16,
    /// With the DNS proxy ([`crate::dns`]): UDP and TCP to port 53 from a captured pod go
    /// to this node's `:dns_port` (a `redirect`: the answer's source is put back by
    /// conntrack; TCP to port 53 is left out of the outbound `tproxy`).
    pub dns_port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("invalid {what} {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error("running {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
}

impl Rules {
    /// Rules with Istio's ports (`:15001` outbound, `:15006` inbound).
    pub fn new(pod_interfaces: Vec<String>, pod_cidrs: Vec<String>) -> Rules {
        Rules {
            table: DEFAULT_TABLE.into(),
            pod_interfaces,
            pod_cidrs,
            outbound_port: OUTBOUND_CAPTURE_PORT,
            inbound_port: PLAINTEXT_PORT,
            hbone_port: HBONE_PORT,
            dns_port: None,
        }
    }

    /// The rules for node `node` from a mesh snapshot (R2): every captured workload on that
    /// node (namespace labelled `istio.io/dataplane-mode=ambient`, or its workload override)
    /// has its addresses captured inbound and, when `iface` names the node-side interface of
    /// its veth, its traffic captured outbound.
    pub fn for_node(
        snapshot: &mesh_model::snapshot::Snapshot,
        node: &str,
        iface: impl Fn(&mesh_model::model::Workload) -> Option<String>,
    ) -> Rules {
        let mut ifaces = Vec::new();
        let mut cidrs = Vec::new();
        for w in snapshot
            .workloads()
            .filter(|w| w.node == node && w.captured())
        {
            ifaces.extend(iface(w));
            cidrs.extend(w.ips.iter().map(|ip| match ip {
                IpAddr::V4(a) => format!("{a}/32"),
                IpAddr::V6(a) => format!("{a}/128"),
            }));
        }
        ifaces.sort();
        ifaces.dedup();
        cidrs.sort();
        cidrs.dedup();
        Rules::new(ifaces, cidrs)
    }

    fn validate(&self) -> Result<(), CaptureError> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 15
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        };
        let table_ok = !self.table.is_empty()
            && self
                .table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !table_ok {
            return Err(CaptureError::Invalid {
                what: "table name",
                value: self.table.clone(),
            });
        }
        for i in &self.pod_interfaces {
            if !name_ok(i) {
                return Err(CaptureError::Invalid {
                    what: "interface name",
                    value: i.clone(),
                });
            }
        }
        for c in &self.pod_cidrs {
            let (ip, len) = c.split_once('/').unwrap_or((c, ""));
            let ip_ok = ip.parse::<IpAddr>().is_ok();
            let len_ok = len.is_empty() || len.parse::<u8>().is_ok_and(|l| l <= 128);
            if !(ip_ok && len_ok) {
                return Err(CaptureError::Invalid {
                    what: "pod address/CIDR",
                    value: c.clone(),
                });
            }
        }
        Ok(())
    }

    /// The nftables script that (re)creates the table.
    pub fn ruleset(&self) -> Result<String, CaptureError> {
        self.validate()?;
        let t = &self.table;
        let m = TPROXY_MARK;
        let h = self.hbone_port;
        let ifs: Vec<String> = self
            .pod_interfaces
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect();
        let ifs = ifs.join(", ");
        let (v4, v6): (Vec<&String>, Vec<&String>) = self
            .pod_cidrs
            .iter()
            .partition(|c| c.split('/').next().is_some_and(|ip| !ip.contains(':')));
        let sets: Vec<(&str, String)> = [("ip", v4), ("ip6", v6)]
            .into_iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(fam, set)| {
                let list: Vec<&str> = set.iter().map(|c| c.as_str()).collect();
                (fam, list.join(", "))
            })
            .collect();
        // tproxy (its established-socket lookup also claims every later packet of a
        // captured connection), each followed by the same mark alone: a packet it found no
        // listener for is delivered locally and reset (fail closed).
        let mut tp = String::new();
        if !self.pod_interfaces.is_empty() {
            // DNS over TCP goes to the DNS proxy (the `dns` chain's redirect), not to the
            // outbound listener.
            if self.dns_port.is_some() {
                tp.push_str(&format!("    iifname {{ {ifs} }} tcp dport 53 accept\n"));
            }
            // Outbound: everything a captured pod sends.
            let p = self.outbound_port;
            tp.push_str(&format!(
                "    iifname {{ {ifs} }} meta l4proto tcp tproxy to :{p} meta mark set {m:#x} accept\n    iifname {{ {ifs} }} meta l4proto tcp meta mark set {m:#x} accept\n"
            ));
        }
        for (fam, list) in &sets {
            // Inbound: HBONE to a captured pod to this node's HBONE listener, any other TCP
            // to a captured pod to the plaintext listener.
            let p = self.inbound_port;
            tp.push_str(&format!(
                "    {fam} daddr {{ {list} }} tcp dport {h} tproxy {fam} to :{h} meta mark set {m:#x} accept\n    {fam} daddr {{ {list} }} tcp dport != {h} tproxy {fam} to :{p} meta mark set {m:#x} accept\n    {fam} daddr {{ {list} }} meta l4proto tcp meta mark set {m:#x} accept\n"
            ));
        }
        let mut s = format!("table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n");
        if !tp.is_empty() {
            s.push_str(&format!(
                "  chain capture {{\n    type filter hook prerouting priority mangle; policy accept;\n{tp}  }}\n"
            ));
        }
        // This node's own HBONE to a pod of the node is locally generated: it never crosses
        // `prerouting`, and `tproxy` works nowhere else, so the `output` hook redirects it.
        let mut hbone = String::new();
        for (fam, list) in &sets {
            hbone.push_str(&format!(
                "    {fam} daddr {{ {list} }} tcp dport {h} redirect to :{h}\n"
            ));
        }
        if !hbone.is_empty() {
            s.push_str(&format!(
                "  chain output {{\n    type nat hook output priority -100; policy accept;\n{hbone}  }}\n"
            ));
        }
        // DNS of captured pods (UDP and TCP) to the DNS proxy: a `redirect` (UDP has no
        // tproxy socket lookup to rely on; conntrack puts the answer's source back).
        if let (Some(d), false) = (self.dns_port, self.pod_interfaces.is_empty()) {
            s.push_str(&format!(
                "  chain dns {{\n    type nat hook prerouting priority dstnat; policy accept;\n    iifname {{ {ifs} }} udp dport 53 redirect to :{d}\n    iifname {{ {ifs} }} tcp dport 53 redirect to :{d}\n  }}\n"
            ));
        }
        s.push_str("}\n");
        Ok(s)
    }

    /// Install (or replace) the rules, in network namespace `netns` (via `ip netns exec`)
    /// or in the current one: the policy routing of `tproxy` capture, then the table.
    pub fn install(&self, netns: Option<&str>) -> Result<(), CaptureError> {
        self.install_routing(netns)?;
        self.replace_table(netns)
    }

    /// Replace the table only (one `nft -f` transaction), for a change of who is captured:
    /// the policy routing [`Rules::install`] put in place does not depend on it.
    pub fn replace_table(&self, netns: Option<&str>) -> Result<(), CaptureError> {
        nft(netns, &self.ruleset()?)
    }

    /// Remove the table and the policy routing (no error if they are not there).
    pub fn remove(&self, netns: Option<&str>) -> Result<(), CaptureError> {
        self.validate()?;
        let t = &self.table;
        nft(netns, &format!("table inet {t}\ndelete table inet {t}\n"))?;
        remove_routing(netns);
        Ok(())
    }

    /// The policy routing that delivers captured (marked) packets locally, for IPv4 and
    /// IPv6: exactly one `ip rule … fwmark` [`TPROXY_MARK`] `lookup` [`TPROXY_TABLE`] and
    /// `local default dev lo` in that table. Added only where missing (extra copies are
    /// deleted), never deleted and re-added: in between, a marked packet would be routed to
    /// its real destination, past ztunnel. IPv6 failing is an error only when pods have
    /// IPv6 addresses (a namespace with IPv6 off has no IPv6 to capture).
    pub fn install_routing(&self, netns: Option<&str>) -> Result<(), CaptureError> {
        let v6_pods = self.pod_cidrs.iter().any(|c| c.contains(':'));
        for fam in ["-4", "-6"] {
            let r = ensure_rule(netns, fam).and_then(|()| {
                ip(
                    netns,
                    &[
                        fam,
                        "route",
                        "replace",
                        "local",
                        "default",
                        "dev",
                        "lo",
                        "table",
                        &table(),
                    ],
                )
                .map(drop)
            });
            match r {
                Err(e) if fam == "-4" || v6_pods => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "IPv6 capture routing not installed (no IPv6 pods)")
                }
                Ok(()) => {}
            }
        }
        Ok(())
    }
}

fn mark() -> String {
    format!("{TPROXY_MARK:#x}")
}

fn table() -> String {
    TPROXY_TABLE.to_string()
}

/// How many `fwmark TPROXY_MARK lookup TPROXY_TABLE` rules family `fam` has (a rule added
/// twice is listed twice).
fn count_rules(netns: Option<&str>, fam: &str) -> Result<usize, CaptureError> {
    let (m, t) = (mark(), table());
    let want = ["fwmark", m.as_str(), "lookup", t.as_str()];
    Ok(ip(netns, &[fam, "rule", "show"])?
        .lines()
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.windows(4).any(|w| w == want)
        })
        .count())
}

/// Exactly one such rule: added when there is none, extra copies deleted.
fn ensure_rule(netns: Option<&str>, fam: &str) -> Result<(), CaptureError> {
    let rule = [fam, "rule", "add", "fwmark", &mark(), "lookup", &table()];
    match count_rules(netns, fam)? {
        0 => ip(netns, &rule).map(drop),
        n => {
            for _ in 1..n {
                ip(
                    netns,
                    &[fam, "rule", "del", "fwmark", &mark(), "lookup", &table()],
                )?;
            }
            Ok(())
        }
    }
}

/// Delete every such rule of family `fam`.
fn delete_rules(netns: Option<&str>, fam: &str) {
    for _ in 0..count_rules(netns, fam).unwrap_or(0) {
        let _ = ip(
            netns,
            &[fam, "rule", "del", "fwmark", &mark(), "lookup", &table()],
        );
    }
}

fn remove_routing(netns: Option<&str>) {
    for fam in ["-4", "-6"] {
        delete_rules(netns, fam);
        let _ = ip(netns, &[fam, "route", "flush", "table", &table()]);
    }
}

/// Run `ip ARGS` (in `netns` when given): its standard output.
fn ip(netns: Option<&str>, args: &[&str]) -> Result<String, CaptureError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["netns", "exec", ns, "ip"]);
    }
    cmd.args(args);
    run(cmd, None)
}

/// Run `cmd` with `input` on its stdin (or none): its standard output; its stderr becomes
/// the error's text.
fn run(mut cmd: Command, input: Option<&[u8]>) -> Result<String, CaptureError> {
    let what = format!("{cmd:?}");
    let spawn_err = |source| CaptureError::Spawn {
        cmd: what.clone(),
        source,
    };
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        let _ = stdin.write_all(input);
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CaptureError::Failed {
            cmd: what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The interface the kernel routes `ip` through in the current network namespace
/// (`ip -o route get IP` → the word after `dev`): a pod's node-side veth in the routed
/// topology. None when there is no route or `ip` fails.
pub fn route_interface(ip: IpAddr) -> Option<String> {
    let out = Command::new("ip")
        .args(["-o", "route", "get", &ip.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "dev")?;
    let dev = words.next()?;
    // A pod reached through loopback or with no interface of its own is not a veth.
    (dev != "lo").then(|| dev.to_string())
}

/// The rules the ztunnel process owns for `node` (see "Who owns the rules"), in table
/// `table`.
pub fn owned_rules(snapshot: &mesh_model::snapshot::Snapshot, node: &str, table: &str) -> Rules {
    let mut r = Rules::for_node(snapshot, node, |w| {
        w.ips.iter().find_map(|ip| route_interface(*ip))
    });
    r.table = table.to_string();
    r
}

/// Run `nft -f -` with `script` on stdin.
fn nft(netns: Option<&str>, script: &str) -> Result<(), CaptureError> {
    let cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft", "-f", "-"]);
            c
        }
        None => {
            let mut c = Command::new("nft");
            c.args(["-f", "-"]);
            c
        }
    };
    run(cmd, Some(script.as_bytes())).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_redirects_pod_interfaces_and_pod_addresses() {
        let r = Rules::new(
            vec!["p-client".into(), "p-two".into()],
            vec![
                "10.1.0.2".into(),
                "10.1.0.0/24".into(),
                "fd00::2/128".into(),
            ],
        );
        let s = r.ruleset().unwrap();
        // Everything arriving is captured in `prerouting` by tproxy: no nat chain there.
        assert!(!s.contains("type nat hook prerouting"), "{s}");
        // Outbound: tproxy with the mark, then the same mark for what it found no socket for.
        let out = &s[s.find("chain capture").unwrap()..s.find("chain output").unwrap()];
        assert!(
            out.contains("type filter hook prerouting priority mangle"),
            "{out}"
        );
        assert!(
            out.contains("iifname { \"p-client\", \"p-two\" } meta l4proto tcp tproxy to :15001 meta mark set 0x111 accept"),
            "{out}"
        );
        assert!(
            out.contains(
                "iifname { \"p-client\", \"p-two\" } meta l4proto tcp meta mark set 0x111 accept"
            ),
            "{out}"
        );
        assert!(!s.contains("redirect to :15001"), "{s}");
        // Inbound: HBONE to :15008, any other TCP to :15006, then the mark alone.
        for fam_list in [
            "ip daddr { 10.1.0.2, 10.1.0.0/24 }",
            "ip6 daddr { fd00::2/128 }",
        ] {
            let fam = fam_list.split(' ').next().unwrap();
            for rule in [
                format!("{fam_list} tcp dport 15008 tproxy {fam} to :15008 meta mark set 0x111 accept"),
                format!("{fam_list} tcp dport != 15008 tproxy {fam} to :15006 meta mark set 0x111 accept"),
                format!("{fam_list} meta l4proto tcp meta mark set 0x111 accept"),
            ] {
                assert!(out.contains(&rule), "no {rule:?} in {out}");
            }
            // The mark alone comes after both tproxy rules of the family.
            assert!(
                out.find(&format!("{fam_list} meta l4proto")).unwrap()
                    > out.find(&format!("{fam_list} tcp dport != 15008")).unwrap()
            );
        }
        // Outbound (a captured pod's own traffic, whatever its destination) comes first.
        assert!(out.find("tproxy to :15001").unwrap() < out.find("daddr").unwrap());
        assert!(!s.contains("redirect to :15006"), "{s}");
        // The output hook (ztunnel's own, locally generated connections) only redirects HBONE
        // to a pod of this node; nothing else ztunnel sends is captured again.
        let output = &s[s.find("chain output").unwrap()..];
        assert!(
            output.contains("type nat hook output priority -100"),
            "{output}"
        );
        assert_eq!(s.matches("redirect").count(), 2, "{s}");
        assert!(
            output
                .contains("ip daddr { 10.1.0.2, 10.1.0.0/24 } tcp dport 15008 redirect to :15008"),
            "{output}"
        );
        assert!(
            output.contains("ip6 daddr { fd00::2/128 } tcp dport 15008 redirect to :15008"),
            "{output}"
        );
    }

    #[test]
    fn for_node_takes_the_captured_workloads_of_that_node() {
        let text = r#"
ztunnel: {node: node-a, ca: {builtin: /nonexistent}}
namespaces:
  - {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
  - {name: legacy}
workloads:
  - {name: a1, namespace: mesh, workloadIps: [10.1.0.2], node: node-a}
  - {name: a2, namespace: legacy, workloadIps: [10.1.0.3], node: node-a}
  - {name: b1, namespace: mesh, workloadIps: [10.2.0.2], node: node-b}
"#;
        let loaded = crate::config::load_str(
            std::path::Path::new("t.yaml"),
            text,
            &tuning::Profile::default(),
            1,
        )
        .unwrap();
        let r = Rules::for_node(&loaded.snapshot, "node-a", |w| {
            Some(format!("p-{}", w.name))
        });
        assert_eq!(r.pod_interfaces, vec!["p-a1".to_string()]);
        assert_eq!(r.pod_cidrs, vec!["10.1.0.2/32".to_string()]);
    }

    #[test]
    fn ruleset_sends_captured_pods_dns_to_the_proxy() {
        let mut r = Rules::new(vec!["p-client".into()], vec!["10.1.0.2/32".into()]);
        assert!(!r.ruleset().unwrap().contains("udp dport 53"));
        r.dns_port = Some(15053);
        let s = r.ruleset().unwrap();
        assert!(
            s.contains("type nat hook prerouting priority dstnat; policy accept;\n    iifname { \"p-client\" } udp dport 53 redirect to :15053\n    iifname { \"p-client\" } tcp dport 53 redirect to :15053\n"),
            "{s}"
        );
        // TCP DNS is let past the outbound tproxy (before it), to the redirect.
        let pass = s
            .find("iifname { \"p-client\" } tcp dport 53 accept\n")
            .expect(&s);
        let tproxy = s.find("meta l4proto tcp tproxy to :15001").expect(&s);
        assert!(pass < tproxy, "{s}");
        // No captured pod: no DNS rule.
        let mut none = Rules::new(vec![], vec!["10.1.0.2/32".into()]);
        none.dns_port = Some(15053);
        assert!(!none.ruleset().unwrap().contains("dport 53"));
        // No DNS proxy: pods' TCP to port 53 is captured as any other.
        r.dns_port = None;
        assert!(!r.ruleset().unwrap().contains("dport 53"));
    }

    #[test]
    fn ruleset_rejects_injection() {
        let bad_if = Rules::new(vec!["x\"; flush ruleset".into()], vec![]);
        assert!(bad_if.ruleset().is_err());
        let bad_cidr = Rules::new(vec![], vec!["10.0.0.1 } ; flush".into()]);
        assert!(bad_cidr.ruleset().is_err());
        let mut bad_table = Rules::new(vec![], vec![]);
        bad_table.table = "a b".into();
        assert!(bad_table.remove(None).is_err());
    }
}
