//! Locality-aware endpoint choice (R4): Kubernetes' `trafficDistribution` and
//! `internalTrafficPolicy` on a service, as istiod hands them to ztunnel (`LoadBalancing`
//! scopes and mode), measured from the client workload's `locality`, node and network.

use std::collections::BTreeSet;
use std::path::Path;

use mesh_model::config;
use mesh_model::model::{PreferenceMode, Scope};
use mesh_model::route::{outbound, Outbound, SeededChooser};
use mesh_model::snapshot::Snapshot;

/// A client on node `n1` in `r1/z1`, and `echo`'s endpoints around it; `svc` adds the
/// service's fields, `near` is the status of the client's zone's endpoints.
fn model(svc: &str, near: &str) -> Snapshot {
    let text = format!(
        r#"namespaces:
  - {{name: app, labels: {{istio.io/dataplane-mode: ambient}}}}
nodes:
  - {{name: n1, ztunnel: 10.0.0.1}}
  - {{name: n2, ztunnel: 10.0.0.2}}
  - {{name: n3, ztunnel: 10.0.0.3}}
  - {{name: n4, ztunnel: 10.0.0.4}}
workloads:
  - {{name: client, namespace: app, workloadIps: [10.1.0.1], node: n1, locality: {{region: r1, zone: z1}}}}
  - {{name: same-node, namespace: app, workloadIps: [10.1.0.2], node: n1, status: {near}, locality: {{region: r1, zone: z1}}}}
  - {{name: same-zone, namespace: app, workloadIps: [10.1.0.3], node: n2, status: {near}, locality: {{region: r1, zone: z1}}}}
  - {{name: same-region, namespace: app, workloadIps: [10.1.0.4], node: n3, locality: {{region: r1, zone: z2}}}}
  - {{name: far, namespace: app, workloadIps: [10.1.0.5], node: n4, locality: {{region: r2, zone: z9}}}}
services:
  - name: echo
    namespace: app
    hostname: echo.app.svc.cluster.local
    vips: [10.96.0.1]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: app/same-node}}, {{workloadUid: app/same-zone}}, {{workloadUid: app/same-region}}, {{workloadUid: app/far}}]
{svc}"#
    );
    config::load_str(Path::new("mesh.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"))
}

/// The pods 200 connections from the client to `echo` go to (`None`: refused, no endpoint).
fn chosen(snap: &Snapshot) -> Option<BTreeSet<String>> {
    let client = snap.workload("app/client");
    let mut chooser = SeededChooser::new(7);
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        match outbound(snap, client, "10.96.0.1:80".parse().unwrap(), &mut chooser) {
            Outbound::Hbone { authority, .. } => {
                let pod = snap.workload_by_ip(authority.ip()).unwrap();
                seen.insert(pod.name.clone());
            }
            Outbound::NoEndpoint { .. } => return None,
            other => panic!("{other:?}"),
        }
    }
    Some(seen)
}

fn set(names: &[&str]) -> Option<BTreeSet<String>> {
    Some(names.iter().map(|n| n.to_string()).collect())
}

#[test]
fn r4_without_a_preference_every_healthy_endpoint_is_used() {
    assert_eq!(
        chosen(&model("", "Healthy")),
        set(&["far", "same-node", "same-region", "same-zone"])
    );
}

#[test]
fn r4_prefer_close_keeps_the_clients_zone_and_fails_over_outward() {
    let svc = "    trafficDistribution: PreferClose\n";
    let snap = model(svc, "Healthy");
    let pref = snap.service("app/echo.app.svc.cluster.local").unwrap();
    let pref = pref.preference.as_ref().unwrap();
    assert_eq!(
        pref.scopes,
        [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone]
    );
    assert_eq!(pref.mode, PreferenceMode::Failover);
    assert_eq!(chosen(&snap), set(&["same-node", "same-zone"]));
    // The zone has no healthy endpoint: the region.
    assert_eq!(chosen(&model(svc, "Unhealthy")), set(&["same-region"]));
    // PreferSameNode: the client's node first.
    let svc = "    trafficDistribution: PreferSameNode\n";
    assert_eq!(chosen(&model(svc, "Healthy")), set(&["same-node"]));
    assert_eq!(chosen(&model(svc, "Unhealthy")), set(&["same-region"]));
}

#[test]
fn r4_internal_traffic_policy_local_is_the_node_only() {
    let svc = "    internalTrafficPolicy: Local\n    trafficDistribution: PreferClose\n";
    assert_eq!(chosen(&model(svc, "Healthy")), set(&["same-node"]));
    // Nothing healthy on the node: refused, never sent elsewhere.
    assert_eq!(chosen(&model(svc, "Unhealthy")), None);
}

#[test]
fn locality_fields_are_checked() {
    let bad = [
        (
            "    trafficDistribution: PreferFar\n",
            "services[0].trafficDistribution",
        ),
        (
            "    internalTrafficPolicy: Node\n",
            "services[0].internalTrafficPolicy",
        ),
    ];
    for (svc, field) in bad {
        let text = format!(
            "services:\n  - name: echo\n    namespace: app\n    hostname: echo.app.svc.cluster.local\n{svc}"
        );
        let e = config::load_str(Path::new("mesh.yaml"), &text, 1).unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
    }
    let text = "workloads:\n  - name: w\n    namespace: app\n    locality:\n      zone: \"z 1\"\n";
    let e = config::load_str(Path::new("mesh.yaml"), text, 1).unwrap_err();
    assert_eq!(
        e.field.as_deref(),
        Some("workloads[0].locality.zone"),
        "{e}"
    );
    let text = "workloads:\n  - name: w\n    namespace: app\n    locality:\n      rack: r\n";
    let e = config::load_str(Path::new("mesh.yaml"), text, 1).unwrap_err();
    assert!(e.message.contains("rack"), "{e}");
}
