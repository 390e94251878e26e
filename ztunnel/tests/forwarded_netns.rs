//! `forwarded: for=` from the client's node ztunnel, on real network namespaces with
//! transparent capture (needs root; topology in `netns/mod.rs`).
//!
//! This ztunnel opens its outbound tunnels from the node's address, not the pod's, so the
//! destination ztunnel sees a node address on the socket of every captured pod-to-pod
//! tunnel. R9: an `ipBlocks` (`sourceIps`) DENY on one client pod's address must still be
//! enforced there, and another client pod of the same node, with the same identity, still
//! allowed: the destination believes `for=` for a captured workload whose identity the
//! tunnel proved, from the ztunnel address the model names for that workload's node
//! (`nodes[]`), or from anywhere when the model names none (Istio's `podIP:15008`
//! addressing). Across nodes and within node B.

mod common;
#[allow(unused_imports)] // `netns` re-exports helpers other test files use
mod netns;

use std::time::Duration;

use common::{denied_total, deny_ips, metric, CLIENT_ID, SERVER_ID};
use netns::*;

const PATHS: &str = "ztunnel_connection_paths_total";

#[test]
fn r9_ip_block_deny_on_one_client_pod_with_node_addresses_v4() {
    if netlab::require_root("r9_ip_block_deny_on_one_client_pod_with_node_addresses_v4") {
        r9_ip_block_deny_on_one_client_pod(Family::V4, true);
    }
}

#[test]
fn r9_ip_block_deny_on_one_client_pod_with_node_addresses_v6() {
    if netlab::require_ipv6("r9_ip_block_deny_on_one_client_pod_with_node_addresses_v6") {
        r9_ip_block_deny_on_one_client_pod(Family::V6, true);
    }
}

#[test]
fn r9_ip_block_deny_on_one_client_pod_with_pod_addressing_v4() {
    if netlab::require_root("r9_ip_block_deny_on_one_client_pod_with_pod_addressing_v4") {
        r9_ip_block_deny_on_one_client_pod(Family::V4, false);
    }
}

#[test]
fn r9_ip_block_deny_on_one_client_pod_with_pod_addressing_v6() {
    if netlab::require_ipv6("r9_ip_block_deny_on_one_client_pod_with_pod_addressing_v6") {
        r9_ip_block_deny_on_one_client_pod(Family::V6, false);
    }
}

/// DENY `client` (node A) and `server2` (node B) by address; `client2` (node A) and
/// `server` (node B), with the same identities, are allowed. `node_addresses`: the model
/// names both nodes' ztunnel addresses (tunnels go to and come from them), else tunnels go
/// to `podIP:15008` and the model names no node.
fn r9_ip_block_deny_on_one_client_pod(fam: Family, node_addresses: bool) {
    let denied = [fam.pod_ip("client"), fam.pod_ip("server2")];
    let nodes = if node_addresses {
        format!(
            "nodes:\n  - {{name: node-a, ztunnel: \"{}\"}}\n  - {{name: node-b, ztunnel: \"{}\"}}\n",
            fam.node_ip(0),
            fam.node_ip(1)
        )
    } else {
        String::new()
    };
    let tag = if node_addresses { "fwdn" } else { "fwdp" };
    let w = World::with_mesh(&fam.tag(tag), &deny_ips("deny-pod-ips", &denied), &nodes);
    let dump = w.dump();
    let server = w.server_on(fam, "server");
    let server2 = w.server_on(fam, "server2");

    // Allowed: client2 → server across nodes, server → server2 within node B (both
    // captured, tunnelled by their node's ztunnel from its address).
    for (from, to, name) in [
        ("client2", &server, "server"),
        ("server", &server2, "server2"),
    ] {
        let (who, s) = w.call(from, to.addr, b"allowed");
        assert_eq!(who, name, "{from} to {name}");
        drop(s);
        let peer = to.peers.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            peer.ip(),
            fam.gateway(1),
            "{from} to {name}: delivered by node B"
        );
    }

    // Denied on the pod's address: client → server across nodes, server2 → server
    // within node B; the pod never sees them.
    for from in ["client", "server2"] {
        if let Err(got) = w.connect_refused(from, server.addr) {
            panic!("{from}'s denied connection delivered {got:?}\n{}", dump());
        }
    }
    eventually_or(
        "both denied on B by the ipBlocks policy",
        || denied_total(&w.stats(1), "hbone", "ns-b/deny-pod-ips") == 2,
        dump,
    );
    let (a, b) = (w.stats(0), w.stats(1));
    // Node A tunnelled both of its pods' connections to node B.
    assert_eq!(
        metric(&a, PATHS, &[("direction", "outbound"), ("route", "hbone")]),
        2,
        "{a}"
    );
    for peer in [CLIENT_ID, SERVER_ID] {
        assert_eq!(
            metric(&b, PATHS, &[("route", "hbone_deny"), ("peer", peer)]),
            1,
            "{peer}\n{b}"
        );
    }
    let opened = |source: &str| {
        metric(
            &b,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("source_workload", source)],
        )
    };
    assert_eq!((opened("client2"), opened("server")), (1, 1), "{b}");
    assert_eq!(
        metric(
            &b,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ),
        2,
        "{b}"
    );
    assert!(
        server.peers.try_recv().is_err(),
        "the denied pods' connections never reached the server"
    );
}
