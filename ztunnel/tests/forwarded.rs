//! The HBONE request headers ztunnel trusts and sends, on loopback with real sockets:
//!
//! - Review #2 (R9, R11): inbound, `forwarded: for=` is the source address for policy
//!   (`sourceIps` / Istio's `ipBlocks`) only when the peer proved the destination's own
//!   waypoint identity; any other mesh peer is matched on its socket address, so a spoofed
//!   `for=` cannot dodge a DENY on its real address, and is not forwarded on the R12 hairpin.
//! - Review #7 (R5, R6): outbound CONNECTs carry Istio's `baggage` for the source workload.

mod common;

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, SystemTime};

use common::*;
use hbone::ca::{CertSource, SigningCa};
use hbone::wire::ConnectRequest;

/// A DENY on `addr` for the server pod (`ns-b`) and the waypoint-enabled pod (`ns-w`).
fn deny_source(addr: IpAddr) -> String {
    format!(
        r#"
  - name: deny-addr
    namespace: ns-b
    scope: Namespace
    action: Deny
    rules: [[[{{sourceIps: ["{addr}/32"]}}]]]
  - name: deny-addr-w
    namespace: ns-w
    scope: Namespace
    action: Deny
    rules: [[[{{sourceIps: ["{addr}/32"]}}]]]
"#
    )
}

/// Copy both ways between `a` and `b` until each side ends.
fn relay(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// One HBONE stream to `zt` for `authority`, as `identity`, from a socket bound to `src`
/// (through a loopback relay: the HBONE client cannot bind), with `forwarded: for=` set
/// to `claimed` when given. Returns the status and, on 200, the first line received.
fn hbone_from(
    ca: &SigningCa,
    identity: &str,
    src: IpAddr,
    zt: SocketAddr,
    authority: SocketAddr,
    claimed: Option<IpAddr>,
) -> (u16, String) {
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = local.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((down, _)) = local.accept() else {
            return;
        };
        let up = connect_from(src, zt);
        up.set_read_timeout(None).unwrap();
        relay(down, up);
    });
    let cert = ca
        .issue(&identity.parse().unwrap(), SystemTime::now())
        .unwrap();
    let mut req = ConnectRequest::new(authority);
    req.forwarded_for = claimed;
    try_hbone_request(cert, ZTUNNEL_ID.parse().unwrap(), relay_addr, req)
        .unwrap_or_else(|e| panic!("HBONE stream to {authority} through {zt}: {e}"))
}

#[test]
fn r9_a_mesh_peer_spoofing_forwarded_for_cannot_dodge_a_deny_on_its_address() {
    let t = Topo::new(141, &deny_source(Net { n: 141 }.client()));
    let _server = Pod::start(t.net.server(), "server");
    let zt_b = SocketAddr::new(t.net.zt_b(), 15008);
    let (denied, other) = (t.net.client(), t.net.legacy_client());
    // From the denied address, with and without a spoofed `for=`: refused either way.
    for claimed in [None, Some(other)] {
        let (status, _) = hbone_from(&t.ca(), CLIENT_ID, denied, zt_b, t.net.server(), claimed);
        assert_eq!(status, 401, "for={claimed:?} from {denied}");
    }
    // From another address, claiming the denied one: its own address counts, allowed.
    let (status, line) = hbone_from(
        &t.ca(),
        CLIENT_ID,
        other,
        zt_b,
        t.net.server(),
        Some(denied),
    );
    assert_eq!((status, line.as_str()), (200, "server"));
    let b = t.stats_b();
    assert_eq!(
        metric(
            &b,
            "ztunnel_connection_paths_total",
            &[("route", "hbone_deny"), ("peer", CLIENT_ID)]
        ),
        2
    );
}

#[test]
fn r11_the_destinations_waypoint_is_trusted_for_the_original_client_address() {
    let t = Topo::new(142, &deny_source(Net { n: 142 }.client()));
    let _wpod = Pod::start(t.net.wpod(), "wpod");
    let wp = waypoint(&t.ca(), t.net.waypoint());
    let zt_b = SocketAddr::new(t.net.zt_b(), 15008);
    let wp_ip = t.net.waypoint().ip();
    let (denied, other) = (t.net.client(), t.net.legacy_client());
    // The pod's own waypoint carried the denied client's connection: the DENY applies.
    let (status, _) = hbone_from(
        &t.ca(),
        WAYPOINT_ID,
        wp_ip,
        zt_b,
        t.net.wpod(),
        Some(denied),
    );
    assert_eq!(status, 401);
    // ... and another client through it is allowed.
    let (status, line) = hbone_from(&t.ca(), WAYPOINT_ID, wp_ip, zt_b, t.net.wpod(), Some(other));
    assert_eq!((status, line.as_str()), (200, "wpod"));
    // A plain mesh peer calling the pod is hairpinned (R12) to the waypoint, which is told
    // the peer's real address, not the one it claimed.
    let (status, line) = hbone_from(&t.ca(), CLIENT_ID, other, zt_b, t.net.wpod(), Some(denied));
    assert_eq!((status, line.as_str()), (200, "waypoint"));
    let Seen { peer, request, .. } = wp.seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(peer.unwrap().to_string(), ZTUNNEL_ID);
    assert_eq!(request.target, t.net.wpod());
    assert_eq!(request.forwarded_for, Some(other));
}

#[test]
fn r6_outbound_connect_carries_istios_baggage_for_the_source_workload() {
    let t = Topo::new(143, "[]");
    let wp = waypoint(&t.ca(), t.net.waypoint());
    let socks = t.a().addrs.socks5;
    // client (ns-a) → wpod: ztunnel A tunnels to wpod's waypoint (R6).
    let (code, mut s) = socks_connect(t.net.client(), socks, Dest::Addr(t.net.wpod()));
    assert_eq!(code, 0);
    assert_eq!(hello(&mut s), "waypoint");
    let Seen { peer, request, .. } = wp.seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(peer.unwrap().to_string(), CLIENT_ID);
    assert_eq!(request.target, t.net.wpod());
    assert_eq!(request.forwarded_for, Some(t.net.client()));
    // The test mesh's client has no workloadName, canonical name or revision: a bare pod,
    // with istiod's fallbacks; the cluster is Istio's default CLUSTER_ID.
    let b = request.baggage;
    assert_eq!(b.cluster.as_deref(), Some("Kubernetes"));
    assert_eq!(b.namespace.as_deref(), Some("ns-a"));
    assert_eq!(b.workload_kind.as_deref(), Some("pod"));
    assert_eq!(b.workload_name.as_deref(), Some("client"));
    assert_eq!(b.service_name.as_deref(), Some("client"));
    assert_eq!(b.service_version.as_deref(), Some("latest"));
    assert_eq!(
        b.to_header().as_deref(),
        Some(
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=ns-a,k8s.pod.name=client,\
             service.name=client,service.version=latest"
        )
    );
}

/// The `baggage` is rendered once per snapshot (per source workload): a reload that changes
/// the client workload changes what the next CONNECT carries, and exactly to Istio's format.
#[test]
fn r6_baggage_follows_a_reload_that_changes_the_source_workload() {
    let t = Topo::new(148, "[]");
    let wp = waypoint(&t.ca(), t.net.waypoint());
    let socks = t.a().addrs.socks5;
    let baggage_of_next_connect = || {
        let (code, mut s) = socks_connect(t.net.client(), socks, Dest::Addr(t.net.wpod()));
        assert_eq!(code, 0);
        assert_eq!(hello(&mut s), "waypoint");
        let seen = wp.seen.recv_timeout(Duration::from_secs(10)).unwrap();
        seen.request.baggage.to_header().unwrap()
    };
    let before = "k8s.cluster.name=Kubernetes,k8s.namespace.name=ns-a,k8s.pod.name=client,\
                  service.name=client,service.version=latest";
    assert_eq!(baggage_of_next_connect(), before);
    assert_eq!(
        baggage_of_next_connect(),
        before,
        "the same on every connect"
    );
    // The client becomes a Deployment's pod with a canonical name and revision.
    let n = t.net.n;
    let file = t.net.node_config("node-a", &t.ca_dir, "[]")
        .replace(
            &format!("{{name: client, namespace: ns-a, serviceAccount: client, workloadIps: [127.{n}.1.1], node: node-a}}"),
            &format!("{{name: client-7d9f-x1, namespace: ns-a, serviceAccount: client, workloadName: client, canonicalName: client-app, canonicalRevision: v3, workloadIps: [127.{n}.1.1], node: node-a}}"),
        );
    assert!(file.contains("canonicalRevision: v3"));
    let reloads = t
        .a()
        .reloads
        .reloads
        .load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&t.file_a, file).unwrap();
    eventually("ztunnel A reloads its config", || {
        t.a()
            .reloads
            .reloads
            .load(std::sync::atomic::Ordering::Relaxed)
            > reloads
    });
    assert_eq!(
        baggage_of_next_connect(),
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=ns-a,k8s.deployment.name=client,\
         service.name=client-app,service.version=v3"
    );
}

#[test]
fn r9_the_clients_node_ztunnel_is_believed_for_the_pod_address_it_speaks_for() {
    let net = Net { n: 146 };
    let t = Topo::new(146, &deny_ips("deny-addrs", &[net.client()]));
    let _server = Pod::start(t.net.server(), "server");
    let zt_b = SocketAddr::new(t.net.zt_b(), 15008);
    // Node A's ztunnel (its `nodes[]` address) with the client's certificate, for the
    // client pod that the model runs on node A: the pod's address counts, denied.
    let (status, _) = hbone_from(
        &t.ca(),
        CLIENT_ID,
        t.net.zt_a(),
        zt_b,
        t.net.server(),
        Some(t.net.client()),
    );
    assert_eq!(status, 401);
    // The same hop with no `for=`: its own address, allowed.
    let (status, line) = hbone_from(&t.ca(), CLIENT_ID, t.net.zt_a(), zt_b, t.net.server(), None);
    assert_eq!((status, line.as_str()), (200, "server"));
    let b = t.stats_b();
    assert_eq!(denied_total(&b, "hbone", "ns-b/deny-addrs"), 1);
}

#[test]
fn r9_forwarded_for_is_not_believed_from_the_wrong_node_address_or_identity() {
    let net = Net { n: 147 };
    let unknown = net.ip(1, 99);
    let t = Topo::new(
        147,
        &deny_ips("deny-addrs", &[net.client(), net.legacy_client(), unknown]),
    );
    let _server = Pod::start(t.net.server(), "server");
    let zt_b = SocketAddr::new(t.net.zt_b(), 15008);
    let other_sa = "spiffe://cluster.local/ns/ns-a/sa/other";
    let legacy_id = "spiffe://cluster.local/ns/legacy/sa/default";
    let (client, zt_a) = (net.client(), net.zt_a());
    let cases: [(&str, &str, IpAddr, IpAddr); 6] = [
        // The client's identity from an address near node A's that is not its ztunnel's.
        ("client id, other address", CLIENT_ID, net.ip(1, 50), client),
        // … from node B's ztunnel address (the model runs the client on node A).
        ("client id, node B's address", CLIENT_ID, net.zt_b(), client),
        // Node A's ztunnel address with another identity of the client's namespace …
        ("other identity, node A", other_sa, zt_a, client),
        // … or the ztunnel's own identity (trusted from the destination's waypoint only).
        ("ztunnel identity, node A", ZTUNNEL_ID, zt_a, client),
        // A `for=` naming no workload of the model.
        ("unknown workload", CLIENT_ID, zt_a, unknown),
        // An uncaptured workload of node A: its node ztunnel never speaks for it.
        ("uncaptured workload", legacy_id, zt_a, net.legacy_client()),
    ];
    for (what, id, from, claimed) in cases {
        let (status, line) = hbone_from(&t.ca(), id, from, zt_b, t.net.server(), Some(claimed));
        assert_eq!(
            (status, line.as_str()),
            (200, "server"),
            "{what}: {id} from {from} claiming {claimed}"
        );
    }
    let b = t.stats_b();
    assert_eq!(
        metric(
            &b,
            "ztunnel_authorization_denied_total",
            &[("transport", "hbone")]
        ),
        0
    );
    assert_eq!(
        metric(
            &b,
            "ztunnel_connection_paths_total",
            &[("direction", "inbound"), ("route", "hbone_allow")]
        ),
        6
    );
}
