//! Istio's ServiceEntry in the local file, converted as istiod converts it for ambient:
//! a service with the entry's host, VIPs and ports, and a workload outside the mesh per
//! endpoint address (R1: plain TCP). Bound to a waypoint by its `istio.io/use-waypoint`
//! label, its traffic goes there (R7: egress through a waypoint); unbound, ztunnel passes
//! it to the endpoint in plain TCP.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use mesh_model::config::{self, LocalConfig};
use mesh_model::route::{outbound, Outbound, SeededChooser};
use mesh_model::snapshot::Snapshot;

const MESH: &str = r#"namespaces:
  - {name: app, labels: {istio.io/dataplane-mode: ambient}}
  - {name: egress, labels: {istio.io/dataplane-mode: ambient}}
waypoints:
  - {name: egress-wp, namespace: egress, address: 10.0.9.9}
workloads:
  - {name: client, namespace: app, workloadIps: [10.0.0.2], node: n}
  - {name: egress-wp, namespace: egress, serviceAccount: egress-wp, workloadIps: [10.0.9.9], node: n}
"#;

/// A resolver that knows `api.example.com` (two addresses) and `db.example.com`.
fn resolver(host: &str) -> Result<Vec<IpAddr>, String> {
    match host {
        "api.example.com" => Ok(vec![
            "203.0.113.10".parse().unwrap(),
            "203.0.113.11".parse().unwrap(),
        ]),
        "db.example.com" => Ok(vec!["203.0.113.20".parse().unwrap()]),
        _ => Err("no such host".into()),
    }
}

fn compile(entries: &str) -> Result<Snapshot, runtime::config::Invalid> {
    let text = format!("{MESH}serviceEntries:\n{entries}");
    let cfg: LocalConfig = runtime::config::from_yaml_str(Path::new("mesh.yaml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    let wire = cfg.compile_with(&resolver)?;
    Ok(Snapshot::from_wire(1, &wire).unwrap())
}

fn route(snap: &Snapshot, dst: &str) -> Outbound {
    let client = snap.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    outbound(snap, Some(client), dst, &mut SeededChooser::new(7))
}

#[test]
fn r7_a_service_entry_bound_to_a_waypoint_sends_its_traffic_there() {
    let snap = compile(
        r#"  - name: httpbin
    namespace: egress
    labels: {istio.io/use-waypoint: egress-wp}
    hosts: [httpbin.org]
    addresses: [240.240.0.1]
    ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: https, protocol: TLS}]
    resolution: STATIC
    endpoints: [{address: 198.51.100.7}]
"#,
    )
    .unwrap();
    let svc = snap.service_by_vip("240.240.0.1".parse().unwrap()).unwrap();
    assert_eq!(
        (
            svc.name.as_str(),
            svc.namespace.as_str(),
            svc.hostname.as_str()
        ),
        ("httpbin", "egress", "httpbin.org")
    );
    assert_eq!(svc.ports.get(&80), Some(&80));
    assert_eq!(svc.ports.get(&443), Some(&443));
    // Its endpoint is a workload outside the mesh, serving both ports.
    let w = snap
        .workload_by_ip("198.51.100.7".parse().unwrap())
        .unwrap();
    assert!(!w.captured());
    assert_eq!(svc.endpoints.len(), 1);
    assert_eq!(svc.endpoints[0].workload_uid, w.uid);
    match route(&snap, "240.240.0.1:80") {
        Outbound::Waypoint {
            target, authority, ..
        } => {
            assert_eq!(target, "10.0.9.9:15008".parse().unwrap());
            assert_eq!(authority, "240.240.0.1:80".parse().unwrap());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn r1_an_unbound_service_entry_reaches_its_endpoints_in_plain_tcp() {
    let snap = compile(
        r#"  - name: db
    namespace: app
    hosts: [db.example.com]
    addresses: [240.240.0.2]
    ports: [{number: 5432, name: tcp-pg, protocol: TCP, targetPort: 15432}]
    resolution: DNS
"#,
    )
    .unwrap();
    // DNS with no endpoints: the host itself, resolved at load; the target port applies.
    match route(&snap, "240.240.0.2:5432") {
        Outbound::Passthrough {
            target, service, ..
        } => {
            assert_eq!(target, "203.0.113.20:15432".parse().unwrap());
            assert_eq!(service.as_deref(), Some("app/db.example.com"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn dns_endpoints_resolve_to_a_workload_per_address_shared_between_entries() {
    let snap = compile(
        r#"  - name: api
    namespace: app
    hosts: [api.example.com]
    addresses: [240.240.0.3]
    ports: [{number: 443, name: https}]
    resolution: DNS
    endpoints: [{address: api.example.com, ports: {https: 8443}, locality: us-east/a, weight: 3}]
  - name: api-v2
    namespace: app
    hosts: [v2.api.example.com]
    addresses: [240.240.0.4]
    ports: [{number: 443, name: https}]
    resolution: STATIC
    endpoints: [{address: 203.0.113.10, ports: {https: 9443}, locality: us-east/a, weight: 3}]
"#,
    )
    .unwrap();
    let api = snap.service_by_vip("240.240.0.3".parse().unwrap()).unwrap();
    assert_eq!(api.endpoints.len(), 2);
    let a = snap
        .workload_by_ip("203.0.113.10".parse().unwrap())
        .unwrap();
    assert_eq!(a.capacity, 3);
    assert_eq!(a.locality.region, "us-east");
    assert_eq!(a.locality.zone, "a");
    // One workload at 203.0.113.10 backs both entries, each with its own port.
    assert_eq!(a.services.len(), 2);
    assert_eq!(a.services["app/api.example.com"].get(&443), Some(&8443));
    assert_eq!(a.services["app/v2.api.example.com"].get(&443), Some(&9443));
    assert!(snap
        .workload_by_ip("203.0.113.11".parse().unwrap())
        .is_some());
}

#[test]
fn service_entry_errors_name_the_field() {
    let entry = |fields: &str| {
        format!("  - name: e\n    namespace: app\n    hosts: [e.example.com]\n    ports: [{{number: 80, name: http}}]\n{fields}")
    };
    let cases = [
        (entry("    resolution: NONE\n"), "serviceEntries[0].resolution", "NONE"),
        (
            "  - {name: e, namespace: app, hosts: [\"*.example.com\"], ports: [{number: 80, name: http}], resolution: DNS}\n".to_string(),
            "serviceEntries[0].hosts[0]",
            "wildcard",
        ),
        (
            "  - {name: e, namespace: app, hosts: [a.example.com, b.example.com], ports: [{number: 80, name: http}], resolution: DNS}\n".to_string(),
            "serviceEntries[0].hosts",
            "one host per ServiceEntry",
        ),
        (
            entry("    resolution: STATIC\n    endpoints: [{address: api.example.com}]\n"),
            "serviceEntries[0].endpoints[0].address",
            "an IP address",
        ),
        (
            entry("    resolution: DNS\n    endpoints: [{address: nowhere.example.com}]\n"),
            "serviceEntries[0].endpoints[0].address",
            "cannot resolve \"nowhere.example.com\"",
        ),
        (
            entry("    resolution: STATIC\n    endpoints: [{address: 10.0.0.2}]\n"),
            "serviceEntries[0].endpoints[0].address",
            "workload app/client",
        ),
        (
            entry("    resolution: STATIC\n    addresses: [10.0.9.9]\n    endpoints: [{address: 198.51.100.1}]\n"),
            "serviceEntries[0].addresses[0]",
            "duplicate IP 10.0.9.9",
        ),
        (
            entry("    resolution: STATIC\n    endpoints: [{address: 198.51.100.1, ports: {grpc: 9000}}]\n"),
            "serviceEntries[0].endpoints[0].ports",
            "\"grpc\" is not the name",
        ),
        (
            entry("    resolution: STATIC\n    workloadSelector: {labels: {app: vm}}\n"),
            "serviceEntries[0].workloadSelector",
            "not supported",
        ),
        (
            entry("    resolution: STATIC\n    exportTo: [\".\"]\n"),
            "serviceEntries[0].exportTo",
            "only",
        ),
        (
            "  - {name: e, namespace: app, hosts: [e.example.com], ports: [{number: 53, name: dns, protocol: UDP}], resolution: DNS}\n".to_string(),
            "serviceEntries[0].ports[0].protocol",
            "UDP",
        ),
        (
            entry("    resolution: STATIC\n    addresses: [240.240.0.99]\n    labels: {istio.io/use-waypoint: nowhere}\n    endpoints: [{address: 198.51.100.1}]\n"),
            "serviceEntries[0].labels",
            "nowhere",
        ),
    ];
    for (text, field, message) in cases {
        let e = compile(&text)
            .err()
            .unwrap_or_else(|| panic!("loaded: {text}"));
        assert_eq!(e.field, field, "{text}: {e:?}");
        assert!(e.message.contains(message), "{text}: {e:?}");
    }
}

#[test]
fn the_file_loader_resolves_with_the_system_resolver() {
    // `localhost` resolves everywhere, without a network.
    let text = format!(
        "{MESH}serviceEntries:\n  - {{name: local, namespace: app, hosts: [localhost], addresses: [240.240.0.9], ports: [{{number: 80, name: http}}], resolution: DNS}}\n"
    );
    let snap = config::load_str(Path::new("mesh.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"));
    let svc = snap.service_by_vip("240.240.0.9".parse().unwrap()).unwrap();
    assert!(!svc.endpoints.is_empty());
    let w = snap.workload(&svc.endpoints[0].workload_uid).unwrap();
    assert!(w.ips[0].is_loopback(), "{:?}", w.ips);
}

#[test]
fn dns_answers_are_kept_and_a_changed_answer_is_seen() {
    let snap = compile(
        r#"  - {name: api, namespace: app, hosts: [api.example.com], addresses: [240.240.0.5], ports: [{number: 443, name: https}], resolution: DNS}
  - {name: s, namespace: app, hosts: [s.example.com], addresses: [240.240.0.6], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: 198.51.100.9}]}
"#,
    )
    .unwrap();
    // Only DNS names, each with its sorted answer.
    let answers: Vec<(&str, Vec<String>)> = snap
        .dns_answers()
        .iter()
        .map(|(h, ips)| (h.as_str(), ips.iter().map(|i| i.to_string()).collect()))
        .collect();
    assert_eq!(
        answers,
        vec![(
            "api.example.com",
            vec!["203.0.113.10".to_string(), "203.0.113.11".to_string()]
        )]
    );
    // The same addresses in another order: no change.
    let same = |h: &str| -> Result<Vec<IpAddr>, String> {
        let mut v = resolver(h)?;
        v.reverse();
        Ok(v)
    };
    assert!(!config::dns_changed(&snap, &same));
    // Another set: a change.
    let moved =
        |_: &str| -> Result<Vec<IpAddr>, String> { Ok(vec!["203.0.113.12".parse().unwrap()]) };
    assert!(config::dns_changed(&snap, &moved));
    // A failed lookup keeps the last answer.
    let failing = |_: &str| -> Result<Vec<IpAddr>, String> { Err("timeout".into()) };
    assert!(!config::dns_changed(&snap, &failing));
}

#[test]
fn r7_a_service_entry_uses_a_waypoint_of_another_namespace() {
    // Istio's egress layout: the entry in the application's namespace, the waypoint in a
    // namespace of its own (`istio.io/use-waypoint-namespace`).
    let snap = compile(
        r#"  - name: httpbin
    namespace: app
    labels: {istio.io/use-waypoint: egress-wp, istio.io/use-waypoint-namespace: egress}
    hosts: [httpbin.org]
    addresses: [240.240.0.7]
    ports: [{number: 80, name: http}]
    resolution: STATIC
    endpoints: [{address: 198.51.100.8}]
"#,
    )
    .unwrap();
    match route(&snap, "240.240.0.7:80") {
        Outbound::Waypoint {
            target, waypoint, ..
        } => {
            assert_eq!(target, "10.0.9.9:15008".parse().unwrap());
            assert_eq!(waypoint.as_deref(), Some("egress/egress-wp"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_entry_without_addresses_is_given_one_as_istio_allocates_them() {
    let text = r#"  - {name: a, namespace: app, hosts: [a.example.com], ports: [{number: 80, name: http}], resolution: DNS, endpoints: [{address: api.example.com}]}
  - {name: b, namespace: app, labels: {istio.io/use-waypoint: egress-wp, istio.io/use-waypoint-namespace: egress}, hosts: [httpbin.org], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: 198.51.100.1}]}
"#;
    let snap = compile(text).unwrap();
    let vip = |host: &str| {
        let s = snap.service_by_host(host).unwrap();
        assert_eq!(s.vips.len(), 1, "{host}");
        s.vips[0].1
    };
    let (a, b) = (vip("a.example.com"), vip("httpbin.org"));
    assert_ne!(a, b);
    for ip in [a, b] {
        match ip {
            IpAddr::V4(v4) => assert_eq!(v4.octets()[..2], [240, 240], "{ip}"),
            IpAddr::V6(_) => panic!("{ip}"),
        }
    }
    // The same at every load.
    assert_eq!(vip("httpbin.org"), {
        let again = compile(text).unwrap();
        again.service_by_host("httpbin.org").unwrap().vips[0].1
    });
    // Reached by it: through its waypoint.
    match route(&snap, &format!("{b}:80")) {
        Outbound::Waypoint { waypoint, .. } => {
            assert_eq!(waypoint.as_deref(), Some("egress/egress-wp"))
        }
        other => panic!("{other:?}"),
    }
    // A collision takes the next free address.
    let first = config::allocate_vip("app", "httpbin.org", |_| false).unwrap();
    let next = config::allocate_vip("app", "httpbin.org", |ip| ip == first).unwrap();
    assert_ne!(first, next);
    assert_eq!(config::allocate_vip("app", "httpbin.org", |_| true), None);
}
