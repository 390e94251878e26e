//! GAMMA producer and consumer routes (R17, review #5), from the Gateway API's mesh docs
//! and GEP-1294 ("Namespace boundaries", "Multiple routes for a Service"): a route in the
//! Service's namespace (producer) applies to every client; a route in another namespace
//! (consumer) applies only to clients of that namespace, and for them the consumer routes
//! replace the producer routes. The client's namespace is its verified identity's.

mod common;

use std::path::Path;
use std::time::SystemTime;

use common::{block_on, echo_node, id, ip, named_backend};
use hbone::ca::CertSource;
use waypoint::config::{load_str, WaypointConfig};

const MESH: &str = r#"
services:
  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.10"], ports: {80: 8080, 81: 8081}}
  - {name: echo-v1, namespace: app, hostname: echo-v1.app.svc.cluster.local, vips: ["10.96.0.11"], ports: {80: 8080}}
  - {name: echo-v2, namespace: app, hostname: echo-v2.app.svc.cluster.local, vips: ["10.96.0.12"], ports: {80: 8080}}
  - {name: echo-v3, namespace: app, hostname: echo-v3.app.svc.cluster.local, vips: ["10.96.0.13"], ports: {80: 8080}}
"#;

/// An HTTPRoute `name` in `ns` on Service `app/echo` (optionally one `port`), sending
/// `path` (PathPrefix) to service `to`.
fn route(ns: &str, name: &str, port: Option<u16>, path: &str, to: &str) -> String {
    let port = port.map_or(String::new(), |p| format!(", port: {p}"));
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, namespace: app{port}}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: "{path}"}}}}]
    backendRefs: [{{name: {to}, namespace: app, port: 80}}]
"#
    )
}

/// The ReferenceGrant in `app` that lets the consumer routes of `ns-a` and `ns-b` send to
/// its Services (Gateway API: a backendRef to another namespace needs one).
const GRANT: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: consumers, namespace: app}
spec:
  from:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: ns-a}
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: ns-b}
  to:
  - {group: "", kind: Service}
"#;

fn load(routes: &[String]) -> WaypointConfig {
    load_with(GRANT, routes)
}

fn load_with(grants: &str, routes: &[String]) -> WaypointConfig {
    let text = format!("{MESH}---\n{grants}---\n{}", routes.join("---\n"));
    load_str(Path::new("gamma.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"))
}

/// Where a GET of `path` to `app/echo:port` from a client in `ns` goes: the backend
/// service's name, or the status answered.
fn decide(cfg: &WaypointConfig, ns: Option<&str>, port: u16, path: &str) -> String {
    common::echo_route_decision(cfg, ns, port, path)
}

#[test]
fn r17_gamma_producer_and_consumer_routes_table() {
    let producer = route("app", "prod", None, "/", "echo-v1");
    let consumer = route("ns-a", "fast", None, "/", "echo-v2");
    let consumer_api = route("ns-a", "fast-api", None, "/api", "echo-v3");
    let consumer_narrow = route("ns-a", "narrow", None, "/only", "echo-v2");
    let consumer_81 = route("ns-a", "on-81", Some(81), "/", "echo-v2");
    let b_consumer = route("ns-b", "b", None, "/", "echo-v3");
    // (routes, client namespace, port, path, expected backend or status)
    type Row<'a> = (Vec<String>, Option<&'a str>, u16, &'a str, &'a str);
    let table: Vec<Row<'_>> = vec![
        // Producer route only: every client, whatever its namespace.
        (vec![producer.clone()], None, 80, "/", "echo-v1"),
        (vec![producer.clone()], Some("app"), 80, "/", "echo-v1"),
        (vec![producer.clone()], Some("ns-a"), 80, "/", "echo-v1"),
        // Consumer route only: its namespace's clients; others route to the service itself
        // (no route applies to them).
        (vec![consumer.clone()], Some("ns-a"), 80, "/", "echo-v2"),
        (vec![consumer.clone()], Some("ns-b"), 80, "/", "echo"),
        (vec![consumer.clone()], Some("app"), 80, "/", "echo"),
        (vec![consumer.clone()], None, 80, "/", "echo"),
        // Both: the consumer's clients get the consumer route, everyone else the producer's.
        (
            vec![producer.clone(), consumer.clone()],
            Some("ns-a"),
            80,
            "/",
            "echo-v2",
        ),
        (
            vec![producer.clone(), consumer.clone()],
            Some("ns-b"),
            80,
            "/",
            "echo-v1",
        ),
        (
            vec![producer.clone(), consumer.clone()],
            Some("app"),
            80,
            "/",
            "echo-v1",
        ),
        (
            vec![producer.clone(), consumer.clone()],
            None,
            80,
            "/",
            "echo-v1",
        ),
        // Each consumer namespace has its own.
        (
            vec![producer.clone(), consumer.clone(), b_consumer.clone()],
            Some("ns-b"),
            80,
            "/",
            "echo-v3",
        ),
        (
            vec![producer.clone(), consumer.clone(), b_consumer.clone()],
            Some("ns-a"),
            80,
            "/",
            "echo-v2",
        ),
        // Consumer routes of one namespace merge (longest prefix wins among them).
        (
            vec![producer.clone(), consumer.clone(), consumer_api.clone()],
            Some("ns-a"),
            80,
            "/api/x",
            "echo-v3",
        ),
        (
            vec![producer.clone(), consumer.clone(), consumer_api.clone()],
            Some("ns-a"),
            80,
            "/x",
            "echo-v2",
        ),
        // The consumer set replaces the producer set: none of it matches → 404, no fallback.
        (
            vec![producer.clone(), consumer_narrow.clone()],
            Some("ns-a"),
            80,
            "/x",
            "404",
        ),
        (
            vec![producer.clone(), consumer_narrow.clone()],
            Some("ns-a"),
            80,
            "/only",
            "echo-v2",
        ),
        (
            vec![producer.clone(), consumer_narrow.clone()],
            Some("ns-b"),
            80,
            "/x",
            "echo-v1",
        ),
        // Attachment is per port: a consumer route on port 81 leaves port 80 to the producer.
        (
            vec![producer.clone(), consumer_81.clone()],
            Some("ns-a"),
            80,
            "/",
            "echo-v1",
        ),
        (
            vec![producer.clone(), consumer_81.clone()],
            Some("ns-a"),
            81,
            "/",
            "echo-v2",
        ),
        (
            vec![producer.clone(), consumer_81.clone()],
            Some("ns-b"),
            81,
            "/",
            "echo-v1",
        ),
    ];
    for (i, (routes, ns, port, path, want)) in table.into_iter().enumerate() {
        let cfg = load(&routes);
        assert_eq!(
            decide(&cfg, ns, port, path),
            want,
            "row {i}: client {ns:?} port {port} path {path}"
        );
    }
}

#[test]
fn r17_gamma_consumer_route_applies_to_its_namespace_clients_end_to_end() {
    let (net, ca, _zt) = echo_node(11);
    let now = SystemTime::now();
    let (e, v1, v2) = (
        named_backend(ip(net, 2), "echo"),
        named_backend(ip(net, 3), "echo-v1"),
        named_backend(ip(net, 4), "echo-v2"),
    );
    let w = common::app_workload;
    let model = common::app_model(
        ip(net, 1),
        &format!("{}{}{}", w("echo", e), w("echo-v1", v1), w("echo-v2", v2)),
        "  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n  - {name: echo-v1, namespace: app, hostname: echo-v1.app.svc.cluster.local, vips: [\"10.96.0.2\"], ports: {80: 8080}}\n  - {name: echo-v2, namespace: app, hostname: echo-v2.app.svc.cluster.local, vips: [\"10.96.0.3\"], ports: {80: 8080}}\n",
    );
    let text = format!(
        "{model}---\n{GRANT}---\n{}---\n{}",
        route("app", "prod", None, "/", "echo-v1"),
        route("ns-a", "fast", None, "/", "echo-v2")
    );
    let (handle, shutdown) = common::start_service(&ca, &text, "gamma-e2e.yaml");
    let waypoint = handle.addr;
    // The same request to Service echo from clients of three namespaces.
    let ask = |client_ns: &'static str| {
        let cert = ca.issue(&id(client_ns, "client"), now).unwrap();
        block_on(common::tunnel_get(
            waypoint,
            &cert,
            None,
            "10.96.0.1:80",
            "echo.app.svc.cluster.local",
        ))
    };
    assert_eq!(ask("ns-a"), (200, "echo-v2".to_string()));
    assert_eq!(ask("ns-b"), (200, "echo-v1".to_string()));
    assert_eq!(ask("app"), (200, "echo-v1".to_string()));
    shutdown.drain(std::time::Duration::from_millis(200));
    let _ = handle.join();
}

/// Gateway API `ReferenceGrant`: a route's backendRef to a Service of another namespace is
/// refused (`500`, its weight still taken) unless a grant in that namespace lets routes of
/// the route's kind and namespace name it; a grant may name one Service.
#[test]
fn r17_cross_namespace_backends_need_a_reference_grant() {
    let consumer = route("ns-a", "fast", None, "/", "echo-v2");
    let grant = |from_kind: &str, from_ns: &str, to: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: app}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {from_ns}}}]\n  to: [{{group: \"\", kind: Service{to}}}]\n")
    };
    let cases = [
        (grant("HTTPRoute", "ns-a", ""), "echo-v2"),
        (grant("HTTPRoute", "ns-a", ", name: echo-v2"), "echo-v2"),
        (grant("HTTPRoute", "ns-a", ", name: echo-v3"), "500"),
        (grant("HTTPRoute", "ns-b", ""), "500"),
        (grant("GRPCRoute", "ns-a", ""), "500"),
        // A grant elsewhere is no grant: a comment-only document.
        ("# no grant\n".to_string(), "500"),
    ];
    for (g, want) in cases {
        let cfg = load_with(&g, std::slice::from_ref(&consumer));
        assert_eq!(decide(&cfg, Some("ns-a"), 80, "/"), want, "{g}");
    }
    // A producer route's backend in its own namespace needs none.
    let producer = route("app", "prod", None, "/", "echo-v1");
    let cfg = load_with("# no grant\n", &[producer]);
    assert_eq!(decide(&cfg, Some("ns-a"), 80, "/"), "echo-v1");
    // A grant with no `from` is a load error naming the field.
    let text = format!(
        "{MESH}---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: app}}\nspec:\n  from: []\n  to: [{{group: \"\", kind: Service}}]\n"
    );
    let e = load_str(Path::new("gamma.yaml"), &text, 1).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("spec.from"), "{e}");
}
