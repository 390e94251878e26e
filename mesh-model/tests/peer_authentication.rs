//! Istio's PeerAuthentication in the local file (R10: "accepts both HBONE and plaintext by
//! default"): converted as istiod converts it for ambient — mesh, namespace and workload
//! levels, `UNSET` inheriting, `portLevelMtls` — into L4 DENY policies on the destination
//! workloads, and enforced by their ztunnel before an R12 hairpin.

use std::net::SocketAddr;
use std::path::Path;

use mesh_model::authz::Connection;
use mesh_model::config;
use mesh_model::model::Identity;
use mesh_model::route::{inbound, Inbound, InboundRequest};
use mesh_model::snapshot::Snapshot;

fn load(text: &str) -> Result<Snapshot, runtime::config::ConfigError> {
    config::load_str(Path::new("mesh.yaml"), text, 1)
}

const WORKLOADS: &str = r#"namespaces:
  - {name: app, labels: {istio.io/dataplane-mode: ambient}}
  - {name: other, labels: {istio.io/dataplane-mode: ambient}}
  - {name: wns, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
waypoints:
  - {name: wp, namespace: wns, address: 10.0.9.9}
workloads:
  - {name: echo, namespace: app, workloadIps: [10.0.0.2], node: n, labels: {app: echo}}
  - {name: db, namespace: app, workloadIps: [10.0.0.3], node: n, labels: {app: db}}
  - {name: web, namespace: other, workloadIps: [10.0.1.2], node: n, labels: {app: web}}
  - {name: behind, namespace: wns, workloadIps: [10.0.2.2], node: n, labels: {app: behind}}
"#;

const STATIC_STRICT: &str = "istio-system/istio_converted_static_strict";

fn with(peer_authentications: &str) -> Snapshot {
    load(&format!(
        "{WORKLOADS}peerAuthentications:\n{peer_authentications}"
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Whether a connection to `ip:port` is allowed in plaintext (no peer identity) and over
/// mTLS (an identity), and which policy decided the plaintext one.
fn allowed(snap: &Snapshot, ip: &str, port: u16) -> (bool, bool, Option<String>) {
    let ip = ip.parse().unwrap();
    let w = snap.workload_by_ip(ip).expect("workload");
    let client = Identity::new("cluster.local", "app", "client");
    let conn = |peer| Connection {
        peer,
        src: "10.9.0.1".parse().unwrap(),
        dst: SocketAddr::new(ip, port),
    };
    let plain = snap.authorize(w, &conn(None));
    let mtls = snap.authorize(w, &conn(Some(&client)));
    (
        plain.allowed,
        mtls.allowed,
        plain.policy().map(str::to_string),
    )
}

/// Plaintext allowed, no policy involved.
fn permissive(snap: &Snapshot, ip: &str, port: u16) {
    assert_eq!(allowed(snap, ip, port), (true, true, None), "{ip}:{port}");
}

/// Plaintext denied by `policy`, mTLS allowed.
fn strict(snap: &Snapshot, ip: &str, port: u16, policy: &str) {
    assert_eq!(
        allowed(snap, ip, port),
        (false, true, Some(policy.to_string())),
        "{ip}:{port}"
    );
}

#[test]
fn r10_without_peer_authentication_plaintext_is_accepted() {
    let snap = with("  []\n");
    for ip in ["10.0.0.2", "10.0.0.3", "10.0.1.2"] {
        permissive(&snap, ip, 8080);
    }
    assert!(snap
        .workload("app/echo")
        .unwrap()
        .authorization_policies
        .is_empty());
}

#[test]
fn r10_mesh_wide_strict_refuses_plaintext_everywhere() {
    let snap = with(
        "  - name: default
    namespace: istio-system
    mtls: {mode: STRICT}
",
    );
    for ip in ["10.0.0.2", "10.0.0.3", "10.0.1.2"] {
        strict(&snap, ip, 8080, STATIC_STRICT);
    }
    // One shared policy, attached to every workload (istiod's static STRICT policy).
    assert_eq!(
        snap.workload("other/web").unwrap().authorization_policies,
        vec![STATIC_STRICT.to_string()]
    );
}

#[test]
fn r10_namespace_overrides_the_mesh_and_unset_inherits() {
    let snap = with(
        "  - name: default
    namespace: istio-system
    mtls: {mode: STRICT}
  - name: relaxed
    namespace: app
    mtls: {mode: PERMISSIVE}
  - name: unset
    namespace: other
",
    );
    permissive(&snap, "10.0.0.2", 8080);
    permissive(&snap, "10.0.0.3", 8080);
    // `other`'s policy sets no mode: the mesh's STRICT stands.
    strict(&snap, "10.0.1.2", 8080, STATIC_STRICT);
}

#[test]
fn r10_workload_overrides_its_namespace_and_disable_is_permissive() {
    let snap = with(
        "  - name: strict
    namespace: app
    mtls: {mode: STRICT}
  - name: echo-open
    namespace: app
    selector: {matchLabels: {app: echo}}
    mtls: {mode: DISABLE}
  - name: web-strict
    namespace: other
    selector: {matchLabels: {app: web}}
    mtls: {mode: STRICT}
",
    );
    permissive(&snap, "10.0.0.2", 8080);
    strict(&snap, "10.0.0.3", 8080, STATIC_STRICT);
    strict(&snap, "10.0.1.2", 8080, STATIC_STRICT);
}

#[test]
fn r10_port_level_permissive_under_a_strict_namespace() {
    let snap = with(
        "  - name: strict
    namespace: app
    mtls: {mode: STRICT}
  - name: echo-metrics
    namespace: app
    selector: {matchLabels: {app: echo}}
    portLevelMtls:
      9090: {mode: PERMISSIVE}
      9091: {mode: STRICT}
",
    );
    let converted = "app/converted_peer_authentication_echo-metrics";
    strict(&snap, "10.0.0.2", 8080, converted);
    strict(&snap, "10.0.0.2", 9091, converted);
    permissive(&snap, "10.0.0.2", 9090);
    // The namespace's other workload: strict on every port.
    strict(&snap, "10.0.0.3", 9090, STATIC_STRICT);
    assert_eq!(
        snap.workload("app/echo").unwrap().authorization_policies,
        vec![converted.to_string()],
        "the converted policy replaces the static one"
    );
}

#[test]
fn r10_port_level_strict_under_a_permissive_default() {
    let snap = with(
        "  - name: echo-admin
    namespace: app
    selector: {matchLabels: {app: echo}}
    mtls: {mode: PERMISSIVE}
    portLevelMtls:
      15000: {mode: STRICT}
      15001: {mode: STRICT}
      8080: {mode: UNSET}
",
    );
    let converted = "app/converted_peer_authentication_echo-admin";
    strict(&snap, "10.0.0.2", 15000, converted);
    strict(&snap, "10.0.0.2", 15001, converted);
    permissive(&snap, "10.0.0.2", 8080);
    permissive(&snap, "10.0.0.3", 15000);
}

#[test]
fn r10_strict_workload_with_only_strict_ports_is_the_static_policy() {
    let snap = with(
        "  - name: echo
    namespace: app
    selector: {matchLabels: {app: echo}}
    mtls: {mode: STRICT}
    portLevelMtls: {9090: {mode: STRICT}, 9091: {mode: UNSET}}
",
    );
    strict(&snap, "10.0.0.2", 9091, STATIC_STRICT);
    strict(&snap, "10.0.0.2", 9090, STATIC_STRICT);
    permissive(&snap, "10.0.0.3", 9090);
}

#[test]
fn r12_strict_plaintext_is_refused_before_the_hairpin() {
    let req = |peer| InboundRequest {
        peer,
        src: "10.9.0.1".parse().unwrap(),
        dst: "10.0.2.2:8080".parse().unwrap(),
    };
    // Permissive: plaintext to a waypoint's pod is hairpinned to the waypoint (R12).
    let snap = with("  []\n");
    assert!(matches!(
        inbound(&snap, &req(None), "n"),
        Inbound::Hairpin { .. }
    ));
    // STRICT: refused by the destination's ztunnel, never sent on to the waypoint…
    let snap = with(
        "  - name: default
    namespace: istio-system
    mtls: {mode: STRICT}
",
    );
    match inbound(&snap, &req(None), "n") {
        Inbound::Deny { workload, verdict } => {
            assert_eq!(workload, "wns/behind");
            assert_eq!(verdict.policy(), Some(STATIC_STRICT));
        }
        other => panic!("plaintext to a STRICT pod: {other:?}"),
    }
    // …while a mesh client that is not the waypoint is still hairpinned, and the waypoint
    // itself reaches the pod.
    let client = Identity::new("cluster.local", "app", "client");
    assert!(matches!(
        inbound(&snap, &req(Some(&client)), "n"),
        Inbound::Hairpin { .. }
    ));
    let wp = Identity::new("cluster.local", "wns", "wp");
    assert!(matches!(
        inbound(&snap, &req(Some(&wp)), "n"),
        Inbound::Allow { .. }
    ));
}

#[test]
fn peer_authentication_errors_name_the_field() {
    // Block style, as users write them (the line is found by walking the keys).
    let pa =
        |name: &str, ns: &str, rest: &str| format!("  - name: {name}\n    namespace: {ns}\n{rest}");
    let echo = "    selector: {matchLabels: {app: echo}}\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            pa("a", "app", "    portLevelMtls: {9090: {mode: STRICT}}\n"),
            "peerAuthentications[0].portLevelMtls",
            "needs a selector",
        ),
        (
            pa("a", "istio-system", echo),
            "peerAuthentications[0].selector",
            "root namespace",
        ),
        (
            pa("a", "istio-system", "    mtls: {mode: STRICT}\n") + &pa("b", "istio-system", ""),
            "peerAuthentications[1].name",
            "istio-system/a and istio-system/b are both mesh-wide",
        ),
        (
            pa("a", "app", "") + &pa("b", "app", "    selector: {matchLabels: {}}\n"),
            "peerAuthentications[1].name",
            "both namespace-wide in app",
        ),
        (
            pa("a", "app", echo) + &pa("b", "app", echo),
            "peerAuthentications[1].selector",
            "both select workload app/echo",
        ),
        (
            pa("a", "app", "") + &pa("a", "app", "    selector: {matchLabels: {app: db}}\n"),
            "peerAuthentications[1].name",
            "defined twice",
        ),
        (
            pa("a", "app", echo) + "    portLevelMtls: {0: {mode: STRICT}}\n",
            "peerAuthentications[0].portLevelMtls",
            "port 0",
        ),
        (
            pa("a", "app", "    mtls:\n      mode: STRICTER\n"),
            "peerAuthentications[0].mtls.mode",
            "STRICT",
        ),
        (
            pa(
                "a",
                "app",
                "    mtls:\n      mode: STRICT\n      other: 1\n",
            ),
            "peerAuthentications[0].mtls",
            "other",
        ),
        (pa("A", "app", ""), "peerAuthentications[0].name", ""),
    ];
    for (yaml, field, says) in cases {
        let text = format!("{WORKLOADS}peerAuthentications:\n{yaml}");
        let e = load(&text).expect_err(&yaml);
        assert_eq!(e.field.as_deref(), Some(field), "{yaml}: {e}");
        assert!(e.message.contains(says), "{yaml}: {e}");
        assert!(e.line.is_some(), "{yaml}: {e} has no line");
    }
}
