//! Pod labels in the model and Istio's workload `selector` on L4 policies (R9): the local
//! config resolves a selector as istiod does (the policy's namespace, every namespace from
//! the root namespace), so the destination's ztunnel enforces it — also for a connection
//! from a waypoint, as Istio's ambient docs list ("Selector | waypoint | destination
//! ztunnel").

use std::net::SocketAddr;
use std::path::Path;

use mesh_model::authz::Connection;
use mesh_model::config;
use mesh_model::model::Identity;
use mesh_model::snapshot::Snapshot;

fn load(text: &str) -> Result<Snapshot, runtime::config::ConfigError> {
    config::load_str(Path::new("mesh.yaml"), text, 1)
}

const WORKLOADS: &str = r#"namespaces:
  - {name: app, labels: {istio.io/dataplane-mode: ambient}}
  - {name: other, labels: {istio.io/dataplane-mode: ambient}}
workloads:
  - name: echo
    namespace: app
    workloadIps: [10.0.0.2]
    labels: {app: echo, version: v1}
  - name: echo-v2
    namespace: app
    workloadIps: [10.0.0.3]
    labels: {app: echo, version: v2}
  - name: db
    namespace: app
    workloadIps: [10.0.0.4]
    labels: {app: db}
  - name: echo
    namespace: other
    workloadIps: [10.0.1.2]
    labels: {app: echo}
"#;

fn verdict(snap: &Snapshot, pod: &str, peer: &Identity) -> bool {
    let ip = pod.parse().unwrap();
    let w = snap.workload_by_ip(ip).expect("workload");
    snap.authorize(
        w,
        &Connection {
            peer: Some(peer),
            src: "10.9.0.1".parse().unwrap(),
            dst: SocketAddr::new(ip, 8080),
        },
    )
    .allowed
}

#[test]
fn workload_labels_are_kept_in_the_model() {
    let snap = load(WORKLOADS).unwrap();
    let w = snap.workload("app/echo-v2").unwrap();
    assert_eq!(w.labels.get("app").map(String::as_str), Some("echo"));
    assert_eq!(w.labels.get("version").map(String::as_str), Some("v2"));
    // The binding labels stay labels too (R2 still reads them).
    assert!(snap.workload("app/db").unwrap().captured());
}

#[test]
fn r9_selector_deny_applies_to_matching_pods_of_its_namespace_only() {
    let text = format!(
        "{WORKLOADS}policies:
  - name: deny-echo-v1
    namespace: app
    action: Deny
    selector: {{matchLabels: {{app: echo, version: v1}}}}
    rules: [[[{{namespaces: [app]}}]]]
  - name: deny-echo
    namespace: app
    action: Deny
    selector: {{matchLabels: {{app: echo}}}}
    rules: [[[{{principals: [cluster.local/ns/app/sa/waypoint]}}]]]
"
    );
    let snap = load(&text).unwrap();
    let waypoint = Identity::new("cluster.local", "app", "waypoint");
    let client = Identity::new("cluster.local", "ns-a", "client");
    let neighbour = Identity::new("cluster.local", "app", "client");
    // From the waypoint (Istio: traffic through a waypoint reaches the destination's ztunnel
    // with the waypoint's identity): denied at both app=echo pods of `app`…
    assert!(!verdict(&snap, "10.0.0.2", &waypoint));
    assert!(!verdict(&snap, "10.0.0.3", &waypoint));
    // …not at the unlabelled one, nor at app=echo in another namespace.
    assert!(verdict(&snap, "10.0.0.4", &waypoint));
    assert!(verdict(&snap, "10.0.1.2", &waypoint));
    // Both labels must match: version v1 only.
    assert!(!verdict(&snap, "10.0.0.2", &neighbour));
    assert!(verdict(&snap, "10.0.0.3", &neighbour));
    assert!(verdict(&snap, "10.0.0.2", &client));
    assert_eq!(
        snap.workload("app/echo").unwrap().authorization_policies,
        vec!["app/deny-echo-v1".to_string(), "app/deny-echo".to_string()]
    );
    assert!(snap
        .workload("other/echo")
        .unwrap()
        .authorization_policies
        .is_empty());
}

#[test]
fn r9_selector_policy_in_the_root_namespace_applies_mesh_wide() {
    let text = format!(
        "{WORKLOADS}policies:
  - name: deny-echo
    namespace: istio-system
    action: Deny
    selector: {{matchLabels: {{app: echo}}}}
    rules: [[[{{destinationPorts: [8080]}}]]]
"
    );
    let snap = load(&text).unwrap();
    let peer = Identity::new("cluster.local", "ns-a", "client");
    assert!(!verdict(&snap, "10.0.0.2", &peer));
    assert!(!verdict(&snap, "10.0.1.2", &peer));
    assert!(verdict(&snap, "10.0.0.4", &peer));
}

#[test]
fn r9_selector_allow_makes_matching_pods_allow_only_what_it_lists() {
    let text = format!(
        "{WORKLOADS}policies:
  - name: allow-client
    namespace: app
    selector: {{matchLabels: {{app: db}}}}
    rules: [[[{{principals: [cluster.local/ns/app/sa/waypoint]}}]]]
"
    );
    let snap = load(&text).unwrap();
    let waypoint = Identity::new("cluster.local", "app", "waypoint");
    let client = Identity::new("cluster.local", "ns-a", "client");
    assert!(verdict(&snap, "10.0.0.4", &waypoint));
    assert!(!verdict(&snap, "10.0.0.4", &client));
    // Not selected: no ALLOW policy applies, allowed.
    assert!(verdict(&snap, "10.0.0.2", &client));
}

#[test]
fn selector_with_another_scope_is_an_error_naming_its_line() {
    let text = format!(
        "{WORKLOADS}policies:
  - name: p
    namespace: app
    scope: Namespace
    selector: {{matchLabels: {{app: echo}}}}
"
    );
    let e = load(&text).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("policies[0].selector"), "{e}");
    assert_eq!(e.line, Some(WORKLOADS.lines().count() + 5), "{e}");
    assert!(e.message.contains("WorkloadSelector"), "{e}");
    // A misspelt selector key is named too.
    let text = format!(
        "{WORKLOADS}policies:
  - name: p
    namespace: app
    selector: {{matchLabel: {{app: echo}}}}
"
    );
    let e = load(&text).unwrap_err();
    assert!(e.message.contains("matchLabel"), "{e}");
    assert_eq!(e.line, Some(WORKLOADS.lines().count() + 4), "{e}");
}
