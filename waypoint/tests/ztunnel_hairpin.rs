//! The ztunnel identity the waypoint trusts, and what a ztunnel's hairpin (R12) means for
//! GAMMA routing.
//!
//! - `waypoint.ztunnel_identity` is parsed once, when the configuration snapshot is loaded
//!   (a bad value is a load error naming file, line and field), and tunnels only borrow it.
//! - A destination ztunnel hairpins a direct call from outside the mesh to the waypoint
//!   with its own certificate: the client is unauthenticated, so it gets the producer
//!   routes only; the ztunnel's namespace (from its certificate) never selects consumer
//!   routes. (Istio's waypoint does not route by client namespace at all: it takes the
//!   routes of the Service's namespace, or its own, for every client.)

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::SystemTime;

use common::{block_on, echo_node, echo_tunnel_ctx, get, id, ip, named_backend};
use hbone::ca::CertSource;
use hbone::Identity;
use waypoint::config::{load_str, WaypointConfig};
use waypoint::http1::{decide, parse_head, Action, Parsed};

/// A settings document (the `waypoint:` section), with `extra` lines in it.
fn settings(identity: &str, extra: &str) -> String {
    format!(
        "waypoint:\n  gateway: app/wp\n  identity: {identity}\n  ca: {{static: /nonexistent}}\n{extra}"
    )
}

const SERVICES: &str = r#"services:
  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {80: 8080}}
  - {name: echo-v1, namespace: app, hostname: echo-v1.app.svc.cluster.local, vips: ["10.96.0.2"], ports: {80: 8080}}
  - {name: echo-v2, namespace: app, hostname: echo-v2.app.svc.cluster.local, vips: ["10.96.0.3"], ports: {80: 8080}}
  - {name: echo-v3, namespace: app, hostname: echo-v3.app.svc.cluster.local, vips: ["10.96.0.4"], ports: {80: 8080}}
"#;

/// An HTTPRoute `name` in `ns` on Service `app/echo`, sending everything to `to`.
fn route(ns: &str, name: &str, to: &str) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, namespace: app}}]
  rules:
  - backendRefs: [{{name: {to}, namespace: app, port: 80}}]
"#
    )
}

/// Producer route `app/prod` → echo-v1; consumer routes from `istio-system` (the default
/// ztunnel's namespace) → echo-v2 and from `ns-a` → echo-v3.
fn routes() -> String {
    [
        route("app", "prod", "echo-v1"),
        route("istio-system", "sys", "echo-v2"),
        route("ns-a", "a", "echo-v3"),
        // The consumer routes' backends are in `app`: a ReferenceGrant there lets them.
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: consumers, namespace: app}\nspec:\n  from:\n  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: istio-system}\n  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: ns-a}\n  to: [{group: \"\", kind: Service}]\n".to_string(),
    ]
    .join("---\n")
}

#[test]
fn r12_ztunnel_identity_is_parsed_into_the_snapshot_at_load() {
    let load =
        |text: &str| load_str(Path::new("zt.yaml"), text, 1).unwrap_or_else(|e| panic!("{e}"));
    // Named in the settings.
    let cfg = load(&settings(
        "spiffe://cluster.local/ns/app/sa/waypoint",
        "  ztunnel_identity: spiffe://Example.ORG/ns/kube-system/sa/zt\n",
    ));
    assert_eq!(
        *waypoint::source::ztunnel_identity(&cfg),
        Identity::new("example.org", "kube-system", "zt")
    );
    // What a tunnel uses is the snapshot's own, not a copy made for it.
    assert!(std::ptr::eq(
        waypoint::source::ztunnel_identity(&cfg),
        &cfg.ztunnel_identity.0
    ));
    // Not named: Istio's ztunnel account in the trust domain of the waypoint's identity.
    let cfg = load(&settings("spiffe://example.org/ns/app/sa/waypoint", ""));
    assert_eq!(
        cfg.ztunnel_identity.0,
        Identity::new("example.org", "istio-system", "ztunnel")
    );
    // No settings document: Istio's default trust domain.
    let cfg = load(SERVICES);
    assert_eq!(
        cfg.ztunnel_identity.0,
        Identity::new("cluster.local", "istio-system", "ztunnel")
    );
}

#[test]
fn r12_bad_ztunnel_identity_is_a_load_error_naming_file_line_and_field() {
    // Line 1..=5: the services; `---` on 6; the settings document from line 7, its
    // ztunnel_identity on line 11.
    let text = format!(
        "{SERVICES}---\n{}",
        settings(
            "spiffe://cluster.local/ns/app/sa/waypoint",
            "  ztunnel_identity: spiffe://cluster.local/ns/istio-system\n",
        )
    );
    assert_eq!(
        text.lines().nth(10),
        Some("  ztunnel_identity: spiffe://cluster.local/ns/istio-system")
    );
    let e = load_str(Path::new("bad-zt.yaml"), &text, 1).unwrap_err();
    assert_eq!(e.file, Path::new("bad-zt.yaml"));
    assert_eq!(e.document, 2);
    assert_eq!(e.line, Some(11));
    assert_eq!(e.field.as_deref(), Some("waypoint.ztunnel_identity"));
    let shown = e.to_string();
    assert!(
        shown.contains("bad-zt.yaml") && shown.contains("11") && shown.contains("ztunnel"),
        "{shown}"
    );
}

/// Where [`decide`] sends a GET to Service `app/echo` on a tunnel whose peer principal is
/// `principal` (`td/ns/N/sa/S`, as the service writes it from the certificate).
fn routed(cfg: &WaypointConfig, principal: Option<&str>) -> String {
    // The consumer namespace as the service derives it from the certificate's identity.
    let client_namespace = principal
        .map(|p| Identity::parse(&format!("spiffe://{p}")).expect("an identity"))
        .as_ref()
        .and_then(|id| waypoint::source::consumer_namespace(Some(id), &cfg.ztunnel_identity))
        .map(Into::into);
    let ctx = echo_tunnel_ctx("192.0.2.9", principal.map(str::to_string), client_namespace);
    let raw = get("/", "echo.app.svc.cluster.local");
    let mut head = match parse_head(raw.as_bytes()) {
        Parsed::Head(h, _) => h,
        other => panic!("{other:?}"),
    };
    match decide(cfg, &ctx, &mut head, &mut waypoint::lb::SplitMix64(1)) {
        Action::Forward { forward, .. } => forward.service.clone().expect("a service").0.name,
        Action::Respond(r) => String::from_utf8_lossy(&r).into_owned(),
        Action::Check { .. } => panic!("no CUSTOM policy here"),
    }
}

#[test]
fn r12_hairpinned_request_gets_producer_routes_not_the_ztunnels_namespace_consumer_routes() {
    let load = |extra: &str| {
        let text = format!(
            "{SERVICES}---\n{}---\n{}",
            routes(),
            settings("spiffe://cluster.local/ns/app/sa/waypoint", extra)
        );
        load_str(Path::new("hairpin.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"))
    };
    let default = load("");
    let table = [
        // The trusted ztunnel (default identity) hairpinning an outside client: producer.
        (Some("cluster.local/ns/istio-system/sa/ztunnel"), "echo-v1"),
        // Any other workload of istio-system is a client of that namespace: its consumer
        // route applies (the namespace is not special, the ztunnel's identity is).
        (Some("cluster.local/ns/istio-system/sa/other"), "echo-v2"),
        // A ztunnel account of another trust domain is not the trusted ztunnel.
        (Some("other.td/ns/istio-system/sa/ztunnel"), "echo-v2"),
        (Some("cluster.local/ns/ns-a/sa/client"), "echo-v3"),
        (Some("cluster.local/ns/ns-b/sa/client"), "echo-v1"),
        (None, "echo-v1"),
    ];
    for (principal, want) in table {
        assert_eq!(routed(&default, principal), want, "{principal:?}");
    }
    // A ztunnel named in the settings: its hairpins get the producer routes, and the
    // default account is then an ordinary istio-system client.
    let named = load("  ztunnel_identity: spiffe://cluster.local/ns/ns-a/sa/zt\n");
    let table = [
        (Some("cluster.local/ns/ns-a/sa/zt"), "echo-v1"),
        (Some("cluster.local/ns/ns-a/sa/client"), "echo-v3"),
        (Some("cluster.local/ns/istio-system/sa/ztunnel"), "echo-v2"),
    ];
    for (principal, want) in table {
        assert_eq!(routed(&named, principal), want, "{principal:?}");
    }
}

#[test]
fn r12_hairpin_through_the_waypoint_gets_producer_routes_end_to_end() {
    let (net, ca, _zt) = echo_node(31);
    let now = SystemTime::now();
    let backends = [
        ("echo", named_backend(ip(net, 2), "echo")),
        ("echo-v1", named_backend(ip(net, 3), "echo-v1")),
        ("echo-v2", named_backend(ip(net, 4), "echo-v2")),
        ("echo-v3", named_backend(ip(net, 5), "echo-v3")),
    ];
    let w = common::app_workload;
    let workloads: String = backends.iter().map(|(n, a)| w(n, *a)).collect();
    let services = SERVICES.strip_prefix("services:\n").unwrap();
    let model = common::app_model(ip(net, 1), &workloads, services);
    let text = format!("{model}---\n{}", routes());
    let (handle, shutdown) = common::start_service(&ca, &text, "hairpin-e2e.yaml");
    let waypoint = handle.addr;
    // A GET to Service echo on a tunnel as `who`, with the CONNECT's `forwarded: for=`.
    let ask = |who: Identity, forwarded: Option<Ipv4Addr>| {
        let cert = ca.issue(&who, now).unwrap();
        block_on(common::tunnel_get(
            waypoint,
            &cert,
            forwarded,
            "10.96.0.1:80",
            "echo.app.svc.cluster.local",
        ))
    };
    // The node ztunnel hairpinning a direct call from outside the mesh (R12): producer.
    let outside = Some(Ipv4Addr::new(192, 0, 2, 9));
    assert_eq!(
        ask(id("istio-system", "ztunnel"), outside),
        (200, "echo-v1".to_string())
    );
    // The consumer routes are live for authenticated clients of their namespaces.
    assert_eq!(
        ask(id("istio-system", "other"), None),
        (200, "echo-v2".to_string())
    );
    assert_eq!(
        ask(id("ns-a", "client"), None),
        (200, "echo-v3".to_string())
    );
    shutdown.drain(std::time::Duration::from_millis(200));
    let _ = handle.join();
}
