//! Local config: errors name file:line:column and the field; the ztunnel example shape
//! loads; YAML → wire (prost bytes) → model round trip.

use std::path::Path;

use mesh_model::config::{self, LocalConfig};
use mesh_model::model::{LoadBalancing, Protocol};
use mesh_model::route::{outbound, Outbound, SeededChooser};
use mesh_model::snapshot::{Snapshot, WireState};
use mesh_model::wire::{security as ws, workload as ww};
use prost::Message;

fn load(text: &str) -> Result<Snapshot, runtime::config::ConfigError> {
    config::load_str(Path::new("mesh.yaml"), text, 7)
}

#[test]
fn config_unknown_field_names_line_column_and_field() {
    let text = "workloads:\n  - name: a\n    namespace: ns\n    workloadIps: [\"10.0.0.1\"]\n    serviceAcount: x\n";
    let e = load(text).unwrap_err();
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.column.is_some(), "{e}");
    assert!(e.message.contains("serviceAcount"), "{e}");
    assert!(
        e.field.as_deref().unwrap_or("").starts_with("workloads[0]"),
        "{e}"
    );
    let shown = e.to_string();
    assert!(shown.starts_with("mesh.yaml:5:"), "{shown}");
}

#[test]
fn config_bad_cidr_names_its_line() {
    let text = "policies:\n  - name: p\n    namespace: ns\n    rules:\n      - - - sourceIps: [\"10.0.0.0/40\"]\n";
    let e = load(text).unwrap_err();
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("prefix length 40"), "{e}");
}

#[test]
fn config_duplicate_ip_is_rejected() {
    let text = "\
workloads:
  - name: a
    namespace: ns
    workloadIps: [\"10.0.0.1\"]
  - name: b
    namespace: ns
    workloadIps: [\"10.0.0.2\", \"10.0.0.1\"]
";
    let e = load(text).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("workloads[1].workloadIps"), "{e}");
    assert_eq!(e.line, Some(7), "{e}");
    assert!(
        e.message
            .contains("duplicate IP 10.0.0.1: already used by workload ns/a"),
        "{e}"
    );
    // A VIP that is also a pod IP.
    let text = "\
services:
  - name: s
    namespace: ns
    hostname: s.ns
    vips: [\"/10.0.0.1\"]
workloads:
  - name: a
    namespace: ns
    workloadIps: [\"10.0.0.1\"]
";
    let e = load(text).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("workloads[0].workloadIps"), "{e}");
    assert!(e.message.contains("service ns/s.ns"), "{e}");
}

/// A service whose hostname differs from another's of its namespace only in case or a
/// trailing dot is the same service (a SOCKS5 name finds both): refused at load, naming the
/// second's line and field. The same hostname in another namespace is another service.
#[test]
fn config_service_defined_twice_ignoring_case_and_trailing_dot_is_rejected() {
    let text = "\
services:
  - name: echo
    namespace: shop
    hostname: Echo.Shop.
  - name: echo2
    namespace: shop
    hostname: echo.shop
";
    let e = load(text).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("services[1].hostname"), "{e}");
    assert_eq!(e.line, Some(7), "{e}");
    assert!(
        e.message
            .contains("service shop/echo.shop is defined twice (as shop/Echo.Shop.:"),
        "{e}"
    );
    assert!(e.to_string().starts_with("mesh.yaml:7:"), "{e}");
    // Written the same way: the plain message.
    let e = load(&text.replace("hostname: echo.shop", "hostname: Echo.Shop.")).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("services[1].hostname"), "{e}");
    assert!(
        e.message
            .ends_with("service shop/Echo.Shop. is defined twice"),
        "{e}"
    );
    // Another namespace: another service.
    load(&text.replace(
        "namespace: shop\n    hostname: echo.shop",
        "namespace: other\n    hostname: echo.shop",
    ))
    .expect("the same hostname in two namespaces loads");
}

#[test]
fn config_dangling_endpoint_workload_is_rejected() {
    let text = "\
services:
  - name: s
    namespace: ns
    hostname: s.ns
    endpoints:
      - workloadUid: ghost
";
    let e = load(text).unwrap_err();
    assert_eq!(
        e.field.as_deref(),
        Some("services[0].endpoints[0].workloadUid"),
        "{e}"
    );
    assert_eq!(e.line, Some(6), "{e}");
    assert!(e.message.contains("\"ghost\""), "{e}");
    assert!(e.message.contains("not defined under `workloads`"), "{e}");
}

#[test]
fn config_dangling_service_and_policy_references_are_rejected() {
    let text = "\
workloads:
  - name: a
    namespace: ns
    services:
      \"ns/missing.ns\": {80: 8080}
";
    let e = load(text).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("workloads[0].services"), "{e}");
    assert!(e.message.contains("ns/missing.ns"), "{e}");
    let text = "\
workloads:
  - name: a
    namespace: ns
    authorizationPolicies: [ns/nope]
";
    let e = load(text).unwrap_err();
    assert_eq!(
        e.field.as_deref(),
        Some("workloads[0].authorizationPolicies"),
        "{e}"
    );
}

#[test]
fn config_dangling_waypoint_is_rejected() {
    let text = "\
namespaces:
  - name: ns
    labels:
      istio.io/use-waypoint: ghost
";
    let e = load(text).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("namespaces[0].labels"), "{e}");
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.message.contains("waypoint ns/ghost"), "{e}");
    let text = "\
workloads:
  - name: a
    namespace: ns
    labels:
      istio.io/use-waypoint: ghost
";
    let e = load(text).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("workloads[0].labels"), "{e}");
    let text = "\
services:
  - name: s
    namespace: ns
    hostname: s.ns
    labels:
      istio.io/use-waypoint: ghost
";
    let e = load(text).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("services[0].labels"), "{e}");
}

/// The shape of istio/ztunnel's `examples/localhost.yaml` loads unchanged.
#[test]
fn config_ztunnel_local_config_shape_loads() {
    let text = "\
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: [\"127.0.0.1\"]
  protocol: HBONE
  node: local
  network: \"\"
  services:
    \"default/example.com\":
      80: 8080
- uid: cluster1//v1/Pod/default/local-tcp
  name: local-tcp
  namespace: default
  serviceAccount: default
  workloadIps: [\"127.0.0.2\"]
  protocol: TCP
  node: local
  network: \"\"
  services:
    \"default/example.com\":
      80: 8080
policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
    name: deny-9999
    namespace: default
    scope: Namespace
services:
- name: local
  namespace: default
  hostname: example.com
  vips:
    - /127.10.0.1
  ports:
    80: 8080
  subjectAltNames:
   - spiffe://cluster.local/ns/default/sa/local
";
    let s = load(text).unwrap();
    assert_eq!(s.version, 7);
    let w = s.workload("cluster1//v1/Pod/default/local").unwrap();
    assert_eq!(w.protocol, Protocol::Hbone);
    assert_eq!(
        s.workload("cluster1//v1/Pod/default/local-tcp")
            .unwrap()
            .protocol,
        Protocol::Tcp
    );
    let svc = s.service("default/example.com").unwrap();
    assert_eq!(svc.endpoints.len(), 2);
    assert_eq!(s.policies()[0].key(), "default/deny-9999");
}

#[test]
fn weighted_random_follows_capacity() {
    let text = "\
workloads:
  - {name: heavy, namespace: ns, workloadIps: [\"10.0.0.1\"], capacity: 9, protocol: TCP}
  - {name: light, namespace: ns, workloadIps: [\"10.0.0.2\"], protocol: TCP}
services:
  - name: s
    namespace: ns
    hostname: s.ns
    vips: [\"10.96.0.1\"]
    ports: {80: 80}
    endpoints: [{workloadUid: ns/heavy}, {workloadUid: ns/light}]
";
    let s = load(text).unwrap();
    let mut c = SeededChooser::new(9);
    let heavy = (0..1000)
        .filter(|_| {
            matches!(
                outbound(&s, None, "10.96.0.1:80".parse().unwrap(), &mut c),
                Outbound::Passthrough { workload: Some(ref w), .. } if w == "ns/heavy"
            )
        })
        .count();
    assert!((850..=950).contains(&heavy), "heavy picked {heavy}/1000");
}

/// YAML → wire types → protobuf bytes → wire types → internal model.
#[test]
fn round_trip_yaml_to_wire_to_model() {
    let text = include_str!("topology.yaml");
    let cfg: LocalConfig = runtime::config::from_yaml_str(Path::new("t.yaml"), text).unwrap();
    let wire = cfg.compile().unwrap();
    // Through the bytes, as an xDS client would receive them.
    let addresses: Vec<ww::Address> = wire
        .addresses
        .iter()
        .map(|a| ww::Address::decode(a.encode_to_vec().as_slice()).unwrap())
        .collect();
    let authorizations: Vec<ws::Authorization> = wire
        .authorizations
        .iter()
        .map(|a| ws::Authorization::decode(a.encode_to_vec().as_slice()).unwrap())
        .collect();
    assert_eq!(addresses, wire.addresses);
    assert_eq!(authorizations, wire.authorizations);
    let decoded = WireState {
        addresses,
        authorizations,
        extras: wire.extras.clone(),
    };
    let a = Snapshot::from_wire(3, &decoded).unwrap();
    let b = config::load_str(Path::new("t.yaml"), text, 3).unwrap();
    // The model holds every field of the file.
    let server = a.workload("server").unwrap();
    assert_eq!(server.namespace, "mesh");
    assert_eq!(server.service_account, "server");
    assert_eq!(server.trust_domain, "cluster.local");
    assert_eq!(server.node, "node-b");
    assert_eq!(server.ips.len(), 2);
    assert_eq!(server.authorization_policies, ["mesh/require-identity"]);
    assert_eq!(
        server.services["mesh/multi.mesh.svc.cluster.local"][&80], 9090,
        "per-endpoint override survives"
    );
    let wp = a.workload("reviews-v2").unwrap().waypoint.clone().unwrap();
    assert_eq!(wp.address.to_string(), "10.1.0.101:15008");
    assert_eq!(wp.name.as_deref(), Some("mesh/reviews-v2-wp"));
    assert!(!a.workload("sick").unwrap().healthy);
    let rr = a.service("mesh/rr.mesh.svc.cluster.local").unwrap();
    assert_eq!(rr.load_balancing, LoadBalancing::RoundRobin);
    assert_eq!(rr.endpoints.len(), 3);
    let p = &a.policies()[1];
    assert_eq!(p.key(), "mesh/require-identity");
    // And it equals the model built without the byte round trip.
    for w in b.workloads() {
        assert_eq!(a.workload(&w.uid), Some(w));
    }
    for s in b.services() {
        assert_eq!(a.service(&s.key()), Some(s));
    }
    assert_eq!(a.policies(), b.policies());
    assert_eq!(a.workloads().count(), b.workloads().count());
}

/// Every field the checks cover set to a valid value; line numbers below are 1-based.
const NAMED: &str = r#"namespaces:
  - name: ns
    labels: {istio.io/dataplane-mode: ambient}
waypoints:
  - name: wp
    namespace: ns
    address: 10.0.9.1
    serviceAccount: wp
    trustDomain: cluster.local
    network: net1
nodes:
  - name: node-a
    ztunnel: 10.0.8.1
policies:
  - name: p
    namespace: ns
    selector: {matchLabels: {app: web}}
services:
  - name: svc
    namespace: ns
    hostname: svc.ns.svc.cluster.local
    subjectAltNames: [spiffe://cluster.local/ns/ns/sa/web]
    labels: {app: svc}
workloads:
  - name: web-7d9f-x1
    namespace: ns
    uid: cluster1//Pod/ns/web-7d9f-x1
    serviceAccount: web
    trustDomain: cluster.local
    workloadIps: ["10.0.0.1"]
    hostname: web.ns
    node: node-a
    network: net1
    clusterId: Kubernetes
    canonicalName: web
    canonicalRevision: v1
    workloadName: web
    labels: {app: web, app.kubernetes.io/version: v1.2_3}
"#;

/// `NAMED` with line `line` replaced.
fn named_with(line: usize, new: &str) -> String {
    let mut lines: Vec<&str> = NAMED.lines().collect();
    lines[line - 1] = new;
    lines.join("\n") + "\n"
}

/// A name or text that would reach a header, baggage, a certificate or telemetry with a
/// byte its Kubernetes syntax forbids (a control character, `,`, a space, upper case…) is a
/// load error naming file, line and field — before, `web\x07` loaded and every outbound
/// HBONE connection of that workload panicked building its CONNECT headers.
#[test]
fn config_bad_names_are_load_errors_naming_file_line_and_field() {
    load(NAMED).expect("the valid names load");
    let cases: &[(usize, &str, &str)] = &[
        (2, r#"  - name: "ns\x07""#, "namespaces[0].name"),
        (
            3,
            r#"    labels: {istio.io/dataplane-mode: "ambient,x"}"#,
            "namespaces[0].labels",
        ),
        (5, "  - name: Wp", "waypoints[0].name"),
        (6, "    namespace: n.s", "waypoints[0].namespace"),
        (
            8,
            r#"    serviceAccount: "wp\r\nx: y""#,
            "waypoints[0].serviceAccount",
        ),
        (
            9,
            "    trustDomain: Cluster.Local",
            "waypoints[0].trustDomain",
        ),
        (10, "    network: net 1", "waypoints[0].network"),
        (12, "  - name: node_a", "nodes[0].name"),
        (15, r#"  - name: "p\x00""#, "policies[0].name"),
        (16, "    namespace: -ns", "policies[0].namespace"),
        (
            17,
            r#"    selector: {matchLabels: {"a b": web}}"#,
            "policies[0].selector",
        ),
        (19, "  - name: svc;x", "services[0].name"),
        (20, r#"    namespace: "ns\t""#, "services[0].namespace"),
        (21, "    hostname: svc..ns", "services[0].hostname"),
        (
            22,
            r#"    subjectAltNames: ["a,b"]"#,
            "services[0].subjectAltNames",
        ),
        (23, r#"    labels: {app: "svc\x07"}"#, "services[0].labels"),
        (25, r#"  - name: "web\x07""#, "workloads[0].name"),
        (26, "    namespace: NS", "workloads[0].namespace"),
        (27, r#"    uid: "a b""#, "workloads[0].uid"),
        (
            28,
            r#"    serviceAccount: "web\x07""#,
            "workloads[0].serviceAccount",
        ),
        (
            29,
            "    trustDomain: cluster local",
            "workloads[0].trustDomain",
        ),
        (31, "    hostname: web,ns", "workloads[0].hostname"),
        (32, "    node: node=a", "workloads[0].node"),
        (33, r#"    network: "net1\n""#, "workloads[0].network"),
        (
            34,
            r#"    clusterId: "Kubernetes,k8s.namespace.name=x""#,
            "workloads[0].clusterId",
        ),
        (
            35,
            r#"    canonicalName: "web\x07""#,
            "workloads[0].canonicalName",
        ),
        (
            36,
            "    canonicalRevision: v1=2",
            "workloads[0].canonicalRevision",
        ),
        (
            37,
            r#"    workloadName: "web\x07""#,
            "workloads[0].workloadName",
        ),
        (38, r#"    labels: {app: "web\x7f"}"#, "workloads[0].labels"),
    ];
    for &(line, text, field) in cases {
        let e = load(&named_with(line, text)).expect_err(text);
        assert_eq!(e.field.as_deref(), Some(field), "{text}: {e}");
        assert_eq!(e.line, Some(line), "{text}: {e}");
        let shown = e.to_string();
        assert!(shown.starts_with(&format!("mesh.yaml:{line}")), "{shown}");
        assert!(shown.contains(field), "{shown}");
    }
}

/// Values upstream accepts load: a GKE cluster id longer than a label value's 63 characters
/// (`cn-<project>-<zone>-<cluster>`), and service/workload hostnames Istio's host rule takes
/// (upper case, a trailing dot, a `*`/`*-` prefixed first label). Before, each was refused.
#[test]
fn config_names_upstream_accepts_load() {
    let gke = format!("cn-{}-us-central1-c-{}", "p".repeat(30), "c".repeat(40));
    assert!(gke.len() > 63);
    let cases = [
        (34, format!("    clusterId: {gke}")),
        (21, "    hostname: Svc.NS.svc.cluster.local".to_string()),
        (21, "    hostname: istio.io.".to_string()),
        (21, r#"    hostname: "*-foo.example.com""#.to_string()),
        (21, r#"    hostname: "*""#.to_string()),
        (31, "    hostname: Web.ns.".to_string()),
    ];
    for (line, text) in &cases {
        load(&named_with(*line, text)).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
    // Still refused: a clusterId that would split a header or baggage.
    for bad in [r#"    clusterId: "a b""#, r#"    clusterId: "a;b""#] {
        let e = load(&named_with(34, bad)).expect_err(bad);
        assert_eq!(e.field.as_deref(), Some("workloads[0].clusterId"), "{e}");
    }
}
