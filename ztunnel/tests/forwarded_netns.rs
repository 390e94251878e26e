//! `forwarded: for=` from the client's node ztunnel, on real network namespaces with
//! transparent capture (needs root; topology in `netns/mod.rs`).
//!
//! This ztunnel opens its outbound tunnels from the node's address, not the pod's, so the
//! destination ztunnel sees node A's address on the socket of every captured pod-to-pod
//! tunnel. R9: an `ipBlocks` (`sourceIps`) DENY on one client pod's address must still be
//! enforced there, and another client pod of the same node, with the same identity, still
//! allowed: the destination believes `for=` from node A's ztunnel address (`nodes[]`) for
//! a workload the model runs on node A with the identity the tunnel proved.

mod common;
#[allow(unused_imports)] // `netns` re-exports helpers other test files use
mod netns;

use std::net::IpAddr;
use std::time::Duration;

use common::{metric, CLIENT_ID};
use netns::*;

const PATHS: &str = "ztunnel_connection_paths_total";

#[test]
fn r9_ip_block_deny_on_one_client_pod_is_enforced_at_the_destination_node_v4() {
    if netlab::require_root("r9_ip_block_deny_on_one_client_pod_v4") {
        r9_ip_block_deny_on_one_client_pod(Family::V4);
    }
}

#[test]
fn r9_ip_block_deny_on_one_client_pod_is_enforced_at_the_destination_node_v6() {
    if netlab::require_ipv6("r9_ip_block_deny_on_one_client_pod_v6") {
        r9_ip_block_deny_on_one_client_pod(Family::V6);
    }
}

/// Node B's DENY on `addr` (the client pod's address) for `ns-b`.
fn deny_ip(addr: IpAddr) -> String {
    let len = if addr.is_ipv4() { 32 } else { 128 };
    format!(
        r#"
  - name: deny-client-ip
    namespace: ns-b
    scope: Namespace
    action: Deny
    rules: [[[{{sourceIps: ["{addr}/{len}"]}}]]]
"#
    )
}

fn r9_ip_block_deny_on_one_client_pod(fam: Family) {
    let denied = fam.pod_ip("client");
    // The model names node A's ztunnel address: where its tunnels come from.
    let nodes = format!(
        "nodes:\n  - {{name: node-a, ztunnel: \"{}\"}}\n",
        fam.node_ip(0)
    );
    let w = World::with_mesh(&fam.tag("fwd"), &deny_ip(denied), &nodes);
    let dump = || {
        format!(
            "--- node-a stats\n{}\n--- node-b stats\n{}\n--- node-a log\n{}\n--- node-b log\n{}",
            w.stats(0),
            w.stats(1),
            w.log("node-a"),
            w.log("node-b")
        )
    };
    let server = w.server_on(fam, "server");

    // client2: same node, same namespace and service account, another address: allowed.
    let (who, s) = w.call("client2", server.addr, b"allowed");
    assert_eq!(who, "server");
    drop(s);
    let from = server.peers.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(from.ip(), fam.gateway(1), "delivered by node B");

    // client: captured on node A, tunnelled from node A's address; node B refuses it on
    // the pod's address, the pod never sees it.
    if let Ok(mut s) = w.connect("client", server.addr) {
        if let Err(got) = refused(&mut s) {
            panic!("denied connection delivered {got:?}\n{}", dump());
        }
    }
    eventually_or(
        "denied on B by the ipBlocks policy",
        || {
            metric(
                &w.stats(1),
                "ztunnel_authorization_denied_total",
                &[("transport", "hbone"), ("policy", "ns-b/deny-client-ip")],
            ) == 1
        },
        dump,
    );
    let (a, b) = (w.stats(0), w.stats(1));
    // Both went through node A's tunnels to node B, each from node A's address.
    assert_eq!(
        metric(&a, PATHS, &[("direction", "outbound"), ("route", "hbone")]),
        2,
        "{a}"
    );
    assert_eq!(
        metric(&b, PATHS, &[("route", "hbone_deny"), ("peer", CLIENT_ID)]),
        1,
        "{b}"
    );
    assert_eq!(
        metric(
            &b,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("source_workload", "client2")]
        ),
        1,
        "{b}"
    );
    assert_eq!(
        metric(&b, "istio_tcp_connections_opened_total", &[]),
        1,
        "{b}"
    );
    assert!(
        server.peers.try_recv().is_err(),
        "the denied pod's connection never reached the server"
    );
}
